//! `SchedulerConfig`: the scheduler's limits, resolved once by the core.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use spyre_cb_core as core;

use crate::convert::{opt_uint, uint, U32};
use crate::errors::{core_err, err, Kind};

/// The scheduler's static limits with their defaults filled in and checked
/// (immutable). Every entry point (Scheduler, simulate, Engine, LLM, CLI)
/// resolves its scheduling options through this one class.
#[pyclass(module = "spyre_cb._core", name = "SchedulerConfig", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchedulerConfig {
    pub inner: core::SchedulerConfig,
}

/// The constructor's arguments, in order: what other entry points forward.
pub const FIELDS: [&str; 9] = [
    "max_num_seqs",
    "max_model_len",
    "available_blocks",
    "max_batch_tkv_limit",
    "policy",
    "chunk_size",
    "interleave",
    "decode_pausing",
    "prefix_caching",
];

/// The policy names ``SchedulerConfig`` takes.
pub const POLICIES: [&str; 2] = ["continuous", "chunked"];

fn flag(v: Option<&Bound<'_, PyAny>>, name: &str, default: bool) -> PyResult<bool> {
    match v {
        None => Ok(default),
        Some(v) if v.is_none() => Ok(default),
        Some(v) => v.extract::<bool>().map_err(|_| {
            err(
                v.py(),
                Kind::Config,
                format!(
                    "{name} must be a bool, got {}",
                    v.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                ),
            )
        }),
    }
}

#[pymethods]
impl SchedulerConfig {
    #[new]
    #[pyo3(signature = (max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None,
                        policy=None, chunk_size=None, interleave=None, decode_pausing=None, prefix_caching=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        max_num_seqs: &Bound<'_, PyAny>,
        max_model_len: &Bound<'_, PyAny>,
        available_blocks: Option<&Bound<'_, PyAny>>,
        max_batch_tkv_limit: Option<&Bound<'_, PyAny>>,
        policy: Option<&Bound<'_, PyAny>>,
        chunk_size: Option<&Bound<'_, PyAny>>,
        interleave: Option<&Bound<'_, PyAny>>,
        decode_pausing: Option<&Bound<'_, PyAny>>,
        prefix_caching: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let c = Kind::Config;
        // below 1, negative too, the message names the real limit (as the core's for 0)
        if let Ok(v) = max_num_seqs.extract::<i64>() {
            if v < 0 && !max_num_seqs.is_instance_of::<pyo3::types::PyBool>() {
                return Err(err(py, c, format!("max_num_seqs must be at least 1, got {v}")));
            }
        }
        let seqs = uint(max_num_seqs, "max_num_seqs", U32, c)? as u32;
        let mml = uint(max_model_len, "max_model_len", U32, c)? as u32;
        let blocks = opt_uint(available_blocks, "available_blocks", U32, c)?.map(|b| b as u32);
        let limit = opt_uint(max_batch_tkv_limit, "max_batch_tkv_limit", u64::MAX >> 1, c)?;
        let name: String = match policy {
            None => "continuous".into(),
            Some(p) if p.is_none() => "continuous".into(),
            Some(p) => p.extract().map_err(|_| err(py, c, "policy must be a str"))?,
        };
        let d = core::ChunkOptions::default();
        let opts = core::ChunkOptions {
            chunk_size: opt_uint(chunk_size, "chunk_size", U32, c)?.map_or(d.chunk_size, |v| v as u32),
            interleave: flag(interleave, "interleave", d.interleave)?,
            decode_pausing: flag(decode_pausing, "decode_pausing", d.decode_pausing)?,
            prefix_caching: flag(prefix_caching, "prefix_caching", d.prefix_caching)?,
        };
        let policy = match name.as_str() {
            "continuous" => {
                if opts != d {
                    return Err(err(
                        py,
                        c,
                        "chunk_size, interleave, decode_pausing and prefix_caching are options of policy='chunked'; \
                         the continuous policy takes none of them",
                    ));
                }
                core::Policy::Continuous
            }
            "chunked" => core::Policy::Chunked(opts),
            other => {
                return Err(err(py, c, format!("policy must be one of {}, got {other:?}", POLICIES.join(", "))));
            }
        };
        let inner =
            core::SchedulerConfig::with_policy(seqs, mml, blocks, limit, policy).map_err(|e| core_err(py, e.into()))?;
        Ok(Self { inner })
    }

    /// Names of the constructor's arguments.
    #[classattr]
    #[pyo3(name = "FIELDS")]
    fn fields() -> [&'static str; 9] {
        FIELDS
    }

    /// The policy names: ``("continuous", "chunked")``.
    #[classattr]
    #[pyo3(name = "POLICIES")]
    fn policies() -> (&'static str, &'static str) {
        (POLICIES[0], POLICIES[1])
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
    /// ``"continuous"`` (the published policy) or ``"chunked"``.
    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.policy.name()
    }
    /// Prompt tokens per prefill chunk (chunked policy).
    #[getter]
    fn chunk_size(&self) -> u32 {
        self.opts().chunk_size
    }
    #[getter]
    fn interleave(&self) -> bool {
        self.opts().interleave
    }
    #[getter]
    fn decode_pausing(&self) -> bool {
        self.opts().decode_pausing
    }
    #[getter]
    fn prefix_caching(&self) -> bool {
        self.opts().prefix_caching
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
        let o = self.opts();
        d.set_item(FIELDS[4], c.policy.name())?;
        d.set_item(FIELDS[5], o.chunk_size)?;
        d.set_item(FIELDS[6], o.interleave)?;
        d.set_item(FIELDS[7], o.decode_pausing)?;
        d.set_item(FIELDS[8], o.prefix_caching)?;
        Ok(d)
    }

    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> (Bound<'py, pyo3::types::PyType>, (u32, u32, u32, u64, &'static str, u32, bool, bool, bool)) {
        let me = slf.get();
        let (c, o) = (&me.inner, me.opts());
        let args = (
            c.max_num_seqs,
            c.max_model_len,
            c.available_blocks,
            c.max_batch_tkv_limit,
            c.policy.name(),
            o.chunk_size,
            o.interleave,
            o.decode_pausing,
            o.prefix_caching,
        );
        (slf.get_type(), args)
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        let base = format!(
            "SchedulerConfig(max_num_seqs={}, max_model_len={}, available_blocks={}, max_batch_tkv_limit={}",
            c.max_num_seqs, c.max_model_len, c.available_blocks, c.max_batch_tkv_limit
        );
        match c.policy.chunk_options() {
            None => base + ")",
            Some(o) => format!(
                "{base}, policy='chunked', chunk_size={}, interleave={}, decode_pausing={}, prefix_caching={})",
                o.chunk_size,
                if o.interleave { "True" } else { "False" },
                if o.decode_pausing { "True" } else { "False" },
                if o.prefix_caching { "True" } else { "False" }
            ),
        }
    }
}

impl SchedulerConfig {
    /// The chunk options (their defaults under the continuous policy).
    pub fn opts(&self) -> core::ChunkOptions {
        self.inner.policy.chunk_options().copied().unwrap_or_default()
    }

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
