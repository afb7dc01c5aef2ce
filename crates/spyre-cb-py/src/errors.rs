//! The exception classes of spyre_cb, defined here (the native module owns
//! them; `spyre_cb.errors` re-exports them) and the mapping of core errors.
//!
//! Each class derives from `SpyreCBError` and from the builtin a caller
//! would catch for that kind of failure (`ValueError`, `KeyError`,
//! `RuntimeError`), which a single-base `create_exception!` cannot express,
//! so the classes are built once with `type(name, bases, namespace)`.

use pyo3::exceptions::{PyException, PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use spyre_cb_core as core;

/// Which exception class to raise.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    InvalidRequest,
    Config,
    UnknownRequest,
    BackendUnavailable,
    SchedulerState,
    Executor,
}

pub struct Classes {
    pub base: Py<PyType>,
    invalid_request: Py<PyType>,
    config: Py<PyType>,
    unknown_request: Py<PyType>,
    backend_unavailable: Py<PyType>,
    scheduler_state: Py<PyType>,
    executor: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make(py: Python<'_>, name: &str, bases: Vec<Bound<'_, PyType>>, doc: &str) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "spyre_cb.errors")?;
    ns.set_item("__doc__", doc)?;
    if bases.iter().any(|b| b.is(py.get_type::<PyKeyError>())) {
        // KeyError would repr() the message; show it as written
        ns.set_item("__str__", py.get_type::<PyException>().getattr("__str__")?)?;
    }
    let cls = py.get_type::<PyType>().call1((name, PyTuple::new(py, bases)?, ns))?;
    Ok(cls.cast_into::<PyType>()?.unbind())
}

fn build(py: Python<'_>) -> PyResult<Classes> {
    let base = make(
        py,
        "SpyreCBError",
        vec![py.get_type::<PyException>()],
        "Base class of every error spyre_cb raises on purpose.",
    )?;
    let b = || base.bind(py).clone();
    Ok(Classes {
        invalid_request: make(
            py,
            "InvalidRequestError",
            vec![b(), py.get_type::<PyValueError>()],
            "A request was refused; the engine state is unchanged and other requests go on.",
        )?,
        config: make(
            py,
            "ConfigError",
            vec![b(), py.get_type::<PyValueError>()],
            "The engine cannot be built with these limits or this model.",
        )?,
        unknown_request: make(
            py,
            "UnknownRequestError",
            vec![b(), py.get_type::<PyKeyError>()],
            "No unfinished request has this id.",
        )?,
        backend_unavailable: make(
            py,
            "BackendUnavailableError",
            vec![b(), py.get_type::<PyRuntimeError>()],
            "The requested backend's software stack is not installed here.",
        )?,
        scheduler_state: make(
            py,
            "SchedulerStateError",
            vec![b(), py.get_type::<PyRuntimeError>()],
            "A call broke the schedule -> execute -> update protocol, or the scheduler must be rebuilt.",
        )?,
        executor: make(
            py,
            "ExecutorError",
            vec![b(), py.get_type::<PyRuntimeError>()],
            "A model executor failed: a tensor-parallel worker did not start, died, or timed out.",
        )?,
        base,
    })
}

pub fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || build(py))
}

impl Classes {
    fn of(&self, kind: Kind) -> &Py<PyType> {
        match kind {
            Kind::InvalidRequest => &self.invalid_request,
            Kind::Config => &self.config,
            Kind::UnknownRequest => &self.unknown_request,
            Kind::BackendUnavailable => &self.backend_unavailable,
            Kind::SchedulerState => &self.scheduler_state,
            Kind::Executor => &self.executor,
        }
    }

    pub fn register(&self, m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add("SpyreCBError", self.base.bind(py))?;
        for kind in [
            Kind::InvalidRequest,
            Kind::Config,
            Kind::UnknownRequest,
            Kind::BackendUnavailable,
            Kind::SchedulerState,
            Kind::Executor,
        ] {
            let cls = self.of(kind).bind(py);
            m.add(cls.name()?, cls)?;
        }
        Ok(())
    }
}

/// A typed spyre_cb exception.
pub fn err(py: Python<'_>, kind: Kind, message: impl Into<String>) -> PyErr {
    match classes(py) {
        Ok(c) => PyErr::from_type(c.of(kind).bind(py).clone(), message.into()),
        Err(e) => e,
    }
}

pub fn core_err(py: Python<'_>, e: core::CoreError) -> PyErr {
    let kind = match &e {
        core::CoreError::Config(_) => Kind::Config,
        core::CoreError::InvalidRequest(_) => Kind::InvalidRequest,
        core::CoreError::UnknownRequest { .. } => Kind::UnknownRequest,
        core::CoreError::State(_) => Kind::SchedulerState,
    };
    err(py, kind, e.to_string())
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
