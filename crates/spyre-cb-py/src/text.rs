//! Text-side helpers of the request lifecycle: a request's stop strings
//! matched as its text grows (`spyre_cb_core::stop_strings`).

use pyo3::prelude::*;

use crate::core;
use crate::errors::{err, Kind};

/// A request's stop strings, matched incrementally as its text grows: each
/// `feed` costs O(stop strings x new characters), whatever their lengths.
#[pyclass(module = "spyre_cb._core")]
pub struct StopStringMatcher {
    inner: core::StopStrings,
}

#[pymethods]
impl StopStringMatcher {
    #[new]
    fn new(py: Python<'_>, stops: Vec<String>) -> PyResult<Self> {
        core::StopStrings::new(&stops)
            .map(|inner| Self { inner })
            .ok_or_else(|| err(py, Kind::InvalidRequest, "stop strings must not be empty"))
    }

    /// Appends `text`; returns `(index of the stop string, character offset in
    /// the whole text where it starts)` for the first stop string (in the order
    /// given) that now occurs ending inside `text`, or None.
    fn feed(&mut self, text: &str) -> Option<(usize, u64)> {
        self.inner.feed(text).map(|m| (m.stop, m.start))
    }

    /// Characters at the text's end that may still be the start of a stop string.
    #[getter]
    fn held(&self) -> u64 {
        self.inner.held()
    }

    /// Characters fed so far.
    #[getter]
    fn fed(&self) -> u64 {
        self.inner.fed()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}
