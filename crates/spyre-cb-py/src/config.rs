//! `SchedulerConfig`: the scheduler's limits, resolved once by the core.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use spyre_cb_core as core;

use crate::convert::{opt_uint, uint, U32};
use crate::errors::{core_err, Kind};

/// The scheduler's static limits with their defaults filled in and checked
/// (immutable). Every entry point (Scheduler, simulate, Engine, LLM, CLI)
/// resolves its scheduling options through this one class.
#[pyclass(module = "spyre_cb._core", name = "SchedulerConfig", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchedulerConfig {
    pub inner: core::SchedulerConfig,
}

/// The constructor's arguments, in order: what other entry points forward.
pub const FIELDS: [&str; 4] = ["max_num_seqs", "max_model_len", "available_blocks", "max_batch_tkv_limit"];

#[pymethods]
impl SchedulerConfig {
    #[new]
    #[pyo3(signature = (max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None))]
    fn new(
        py: Python<'_>,
        max_num_seqs: &Bound<'_, PyAny>,
        max_model_len: &Bound<'_, PyAny>,
        available_blocks: Option<&Bound<'_, PyAny>>,
        max_batch_tkv_limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let c = Kind::Config;
        let seqs = uint(max_num_seqs, "max_num_seqs", U32, c)? as u32;
        let mml = uint(max_model_len, "max_model_len", U32, c)? as u32;
        let blocks = opt_uint(available_blocks, "available_blocks", U32, c)?.map(|b| b as u32);
        let limit = opt_uint(max_batch_tkv_limit, "max_batch_tkv_limit", u64::MAX >> 1, c)?;
        let inner = core::SchedulerConfig::new(seqs, mml, blocks, limit).map_err(|e| core_err(py, e.into()))?;
        Ok(Self { inner })
    }

    /// Names of the constructor's arguments.
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn fields() -> (&'static str, &'static str, &'static str, &'static str) {
        (FIELDS[0], FIELDS[1], FIELDS[2], FIELDS[3])
    }

    #[getter]
    fn max_num_seqs(&self) -> u32 {
        self.inner.max_num_seqs
    }
    #[getter]
    fn max_model_len(&self) -> u32 {
        self.inner.max_model_len
    }
    /// Usable KV blocks (resolved: the default is max_num_seqs * max_model_len / 64).
    #[getter]
    fn available_blocks(&self) -> u32 {
        self.inner.available_blocks
    }
    #[getter]
    fn max_batch_tkv_limit(&self) -> u64 {
        self.inner.max_batch_tkv_limit
    }
    /// KV slots per block.
    #[getter]
    fn block_size(&self) -> u32 {
        core::BLOCK_SIZE
    }
    /// Blocks a KV cache must hold: available_blocks plus the null block 0.
    #[getter]
    fn n_physical_blocks(&self) -> u32 {
        self.inner.n_physical_blocks()
    }
    /// Blocks one sequence of max_model_len tokens spans.
    #[getter]
    fn max_blocks_per_seq(&self) -> u32 {
        self.inner.max_blocks_per_seq()
    }

    /// The resolved fields as a dict (keys: FIELDS).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let c = &self.inner;
        d.set_item(FIELDS[0], c.max_num_seqs)?;
        d.set_item(FIELDS[1], c.max_model_len)?;
        d.set_item(FIELDS[2], c.available_blocks)?;
        d.set_item(FIELDS[3], c.max_batch_tkv_limit)?;
        Ok(d)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> (Bound<'py, pyo3::types::PyType>, (u32, u32, u32, u64)) {
        let c = &slf.get().inner;
        (slf.get_type(), (c.max_num_seqs, c.max_model_len, c.available_blocks, c.max_batch_tkv_limit))
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "SchedulerConfig(max_num_seqs={}, max_model_len={}, available_blocks={}, max_batch_tkv_limit={})",
            c.max_num_seqs, c.max_model_len, c.available_blocks, c.max_batch_tkv_limit
        )
    }
}

impl SchedulerConfig {
    /// A config from `(config)` or from the constructor's own arguments.
    pub fn resolve(
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<core::SchedulerConfig> {
        if args.len() == 1 && kwargs.is_none_or(|k| k.is_empty()) {
            if let Ok(c) = args.get_item(0)?.cast::<SchedulerConfig>() {
                return Ok(c.get().inner.clone());
            }
        }
        let made = py.get_type::<SchedulerConfig>().call(args, kwargs)?;
        Ok(made.cast::<SchedulerConfig>()?.get().inner.clone())
    }
}
