//! `Scheduler`: the core's scheduler behind the schedule -> update protocol.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use spyre_cb_core as core;

use crate::config::SchedulerConfig;
use crate::convert::{bool_list, request_id, uint, uint_list, U32};
use crate::errors::{core_err, err, panic_message, Kind};
use crate::plans;
use crate::records::{counters_dict, RejectionReason, StepRecord, UpdateOutcome};

/// The scheduling core: waiting queue, running batch, KV block pool and tkv.
///
/// ``Scheduler(config)`` or ``Scheduler(max_num_seqs, max_model_len,
/// available_blocks=None, max_batch_tkv_limit=None, policy=..., ...)``. The
/// config's policy (continuous by default, or chunked) decides admission and
/// plans; the protocol is the same. One
/// thread at a time (an engine serializes its calls); a call from a second
/// thread while one runs raises instead of racing.
#[pyclass(module = "spyre_cb._core")]
pub struct Scheduler {
    inner: core::Scheduler,
    /// Set when a core call panicked: the state may be half-changed, so every
    /// later call refuses (the scheduler must be rebuilt).
    poisoned: Option<String>,
}

impl Scheduler {
    /// Runs a mutating core call; a panic poisons the scheduler.
    fn call<T>(
        &mut self,
        py: Python<'_>,
        what: &str,
        f: impl FnOnce(&mut core::Scheduler) -> Result<T, core::CoreError>,
    ) -> PyResult<T> {
        self.check(py)?;
        let inner = &mut self.inner;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(inner))) {
            Ok(r) => r.map_err(|e| core_err(py, e)),
            Err(p) => {
                let cause = format!("a panic in {what}: {}", panic_message(&*p));
                self.poisoned = Some(cause.clone());
                Err(core_err(py, core::StateError::Poisoned { cause }.into()))
            }
        }
    }

    fn check(&self, py: Python<'_>) -> PyResult<()> {
        match &self.poisoned {
            Some(cause) => Err(core_err(py, core::StateError::Poisoned { cause: cause.clone() }.into())),
            None => Ok(()),
        }
    }
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (*args, **kwargs))]
    fn new(py: Python<'_>, args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let cfg = SchedulerConfig::resolve(py, args, kwargs)?;
        Ok(Self { inner: core::Scheduler::new(cfg), poisoned: None })
    }

    /// The resolved limits.
    #[getter]
    fn config(&self) -> SchedulerConfig {
        SchedulerConfig { inner: self.inner.config().clone() }
    }

    /// ``"continuous"`` or ``"chunked"``.
    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.config().policy.name()
    }

    /// Event counters since the scheduler was built (steps by kind, pauses,
    /// prefix-cache hits).
    #[getter]
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, &self.inner.counters())
    }

    /// Paused requests (chunked policy with decode pausing).
    #[getter]
    fn n_paused(&self) -> usize {
        self.inner.n_paused()
    }

    /// Queues a request with its prompt token ids. The core ends it on any
    /// of ``stop_token_ids`` or ``eos_token_ids`` once it has ``min_tokens``
    /// tokens (and at ``max_tokens``); ``update``'s stop flags end it too.
    /// With ``beam_width`` k > 1 it is a beam search: prefilled once, then k
    /// sequences under its id (``update``'s ``parents`` fork them).
    #[pyo3(signature = (request_id, prompt_token_ids, max_tokens, *, stop_token_ids=None, eos_token_ids=None, min_tokens=None, beam_width=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &mut self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_token_ids: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
        stop_token_ids: Option<&Bound<'_, PyAny>>,
        eos_token_ids: Option<&Bound<'_, PyAny>>,
        min_tokens: Option<&Bound<'_, PyAny>>,
        beam_width: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let width = crate::convert::opt_uint(beam_width, "beam_width", U32, Kind::InvalidRequest)?.unwrap_or(1) as u32;
        let c = Kind::InvalidRequest;
        let id = crate::convert::request_id(request_id)?;
        let mt = uint(max_tokens, "max_tokens", U32, c)? as u32;
        let ids = uint_list(prompt_token_ids, "prompt_token_ids", U32, c)?;
        let list = |v: Option<&Bound<'_, PyAny>>, name: &str| match v {
            Some(v) if !v.is_none() => uint_list(v, name, U32, c),
            _ => Ok(Vec::new()),
        };
        let rule = core::StopRule {
            stop_token_ids: list(stop_token_ids, "stop_token_ids")?,
            eos_token_ids: list(eos_token_ids, "eos_token_ids")?,
            min_tokens: crate::convert::opt_uint(min_tokens, "min_tokens", U32, c)?.unwrap_or(0) as u32,
        };
        if width == 1 {
            self.call(py, "add_request", |s| s.add_request_with(&id, ids, mt, rule))
        } else {
            self.call(py, "add_request", |s| s.add_request_beams(&id, ids, mt, width, rule))
        }
    }

    /// Queues a token-less request (for simulations: plans carry no input ids).
    fn add_request_len(
        &mut self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_len: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (id, pl, mt) = len_request(request_id, prompt_len, max_tokens)?;
        self.call(py, "add_request_len", |s| s.add_request_tagged(&id, 0, pl, mt))
    }

    /// Checks a request (of ``beam_width`` beams) against the limits without queuing it.
    #[pyo3(signature = (request_id, prompt_len, max_tokens, *, beam_width=None))]
    fn validate(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_len: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
        beam_width: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.check(py)?;
        let (id, pl, mt) = len_request(request_id, prompt_len, max_tokens)?;
        let width = crate::convert::opt_uint(beam_width, "beam_width", U32, Kind::InvalidRequest)?.unwrap_or(1) as u32;
        self.inner.validate_beams(&id, pl, mt, width).map_err(|e| core_err(py, e.into()))
    }

    /// Aborts a waiting or running request. During a step (after
    /// ``schedule()``) the abort is queued and applied when the step closes.
    fn abort(&mut self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = crate::convert::request_id(request_id)?;
        self.call(py, "abort", |s| s.abort(&id))
    }

    /// Starts a step; returns its plan (PrefillPlan, DecodePlan or IdlePlan).
    fn schedule(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let plan = self.call(py, "schedule", |s| s.schedule())?;
        plans::to_python(py, plan)
    }

    /// Closes the step: one token per planned sequence (plan order), optional
    /// stop flags, and for beam searches each sequence's ``parents`` entry:
    /// the index of the sequence whose history it continues (its own for
    /// every other sequence).
    #[pyo3(signature = (tokens, stopped=None, parents=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        stopped: Option<&Bound<'_, PyAny>>,
        parents: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<UpdateOutcome> {
        self.check(py)?;
        let tokens = uint_list(tokens, "tokens", U32, Kind::InvalidRequest)?;
        let stopped = match stopped {
            Some(s) if !s.is_none() => bool_list(s, "stopped")?,
            _ => Vec::new(),
        };
        let parents = match parents {
            Some(p) if !p.is_none() => uint_list(p, "parents", U32, Kind::InvalidRequest)?,
            _ => Vec::new(),
        };
        Ok(self.call(py, "update", |s| s.update_beams(&tokens, &stopped, &parents))?.into())
    }

    /// Closes the pending step without tokens: its requests are aborted
    /// (blocks back at the next step), everything else is untouched.
    fn cancel(&mut self, py: Python<'_>) -> PyResult<UpdateOutcome> {
        Ok(self.call(py, "cancel", |s| s.cancel())?.into())
    }

    /// True between ``schedule()`` and ``update()``/``cancel()``.
    #[getter]
    fn step_in_flight(&self) -> bool {
        self.inner.step_in_flight()
    }

    /// The current observation (with the block-level fields under the
    /// chunked policy). Observers that need a few counts read the
    /// properties below instead.
    fn snapshot(&self, py: Python<'_>) -> PyResult<StepRecord> {
        self.check(py)?;
        Ok(self.inner.snapshot().into())
    }

    /// Requests waiting, running or paused.
    fn has_unfinished_requests(&self) -> bool {
        self.inner.has_unfinished_requests()
    }

    /// Raises SchedulerStateError naming the first broken bookkeeping invariant.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.check(py)?;
        self.inner.check_invariants().map_err(|m| err(py, Kind::SchedulerState, m))
    }

    /// Blocks held by a running request (or one that finished in the last step).
    fn request_blocks(&self, request_id: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u32>>> {
        let id = crate::convert::request_id(request_id)?;
        Ok(self.inner.request_blocks(&id))
    }

    /// Whether the id belongs to a waiting, running or just-finished request.
    fn contains(&self, request_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let id = crate::convert::request_id(request_id)?;
        Ok(self.inner.contains(&id))
    }

    /// Why the next prefill (the head of the queue, or the next chunk) did
    /// not run in the last step.
    #[getter]
    fn last_rejection(&self) -> Option<RejectionReason> {
        self.inner.last_rejection().map(Into::into)
    }

    /// The ids the last ``update()`` or ``cancel()`` reported aborted (for a
    /// caller whose step failed after the commit, before it read the outcome).
    #[getter]
    fn last_aborted(&self) -> Vec<String> {
        self.inner.last_aborted().iter().map(|x| x.to_string()).collect()
    }

    /// Nothing waiting, running or paused, and every KV block back in the pool.
    #[getter]
    fn is_drained(&self) -> bool {
        self.inner.is_drained()
    }
    #[getter]
    fn step(&self) -> u64 {
        self.inner.step()
    }
    #[getter]
    fn tkv(&self) -> u32 {
        self.inner.tkv()
    }
    #[getter]
    fn n_waiting(&self) -> usize {
        self.inner.n_waiting()
    }
    #[getter]
    fn n_running(&self) -> usize {
        self.inner.n_running()
    }
    /// Blocks reserved by admitted requests (available_blocks - n_unreserved_blocks).
    #[getter]
    fn n_reserved_blocks(&self) -> u32 {
        self.inner.n_reserved_blocks()
    }
    /// Blocks no admitted request has reserved (what admission may still give).
    #[getter]
    fn n_unreserved_blocks(&self) -> u32 {
        self.inner.n_unreserved_blocks()
    }
    /// Blocks allocated in the pool.
    #[getter]
    fn n_used_blocks(&self) -> u32 {
        self.inner.n_used_blocks()
    }
}

/// The `(request_id, prompt_len, max_tokens)` arguments of a token-less request.
fn len_request(
    id: &Bound<'_, PyAny>,
    prompt_len: &Bound<'_, PyAny>,
    max_tokens: &Bound<'_, PyAny>,
) -> PyResult<(String, u32, u32)> {
    let c = Kind::InvalidRequest;
    Ok((
        request_id(id)?,
        uint(prompt_len, "prompt_len", U32, c)? as u32,
        uint(max_tokens, "max_tokens", U32, c)? as u32,
    ))
}
