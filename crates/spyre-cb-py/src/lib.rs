//! `spyre_cb._core`: a thin PyO3 layer over `spyre-cb-core`.
//!
//! No scheduling logic lives here: arguments are checked and converted, core
//! errors become the typed exceptions of `spyre_cb.errors`, plans become plain
//! dicts (picklable, for broadcasting to tensor-parallel ranks).

use pyo3::prelude::*;
use std::sync::Arc;

use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};

use spyre_cb_core as core;

// ----- errors -----------------------------------------------------------------

fn py_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let made = (|| -> PyResult<PyErr> {
        let errors = py.import("spyre_cb.errors")?;
        let cls = errors.getattr(class)?;
        Ok(PyErr::from_value(cls.call1((message.clone(),))?))
    })();
    match made {
        Ok(e) => e,
        // The Python package is missing (the module was loaded on its own):
        // still a ValueError/RuntimeError with the message.
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
    }
}

/// Runs a core call so that a Rust panic (a bug) reaches Python as a typed
/// SchedulerStateError instead of a PanicException.
fn guard<T>(py: Python<'_>, what: &str, f: impl FnOnce() -> Result<T, core::CoreError>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| core_err(py, e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(py_error(py, "SchedulerStateError", format!("internal error in {what}: {msg}")))
        }
    }
}

fn core_err(py: Python<'_>, e: core::CoreError) -> PyErr {
    let class = match &e {
        core::CoreError::Config(_) => "ConfigError",
        core::CoreError::InvalidRequest(_) => "InvalidRequestError",
        core::CoreError::UnknownRequest { .. } => "UnknownRequestError",
        core::CoreError::State(_) => "SchedulerStateError",
    };
    py_error(py, class, e.to_string())
}

/// A non-negative integer argument that fits `max`, or the typed error `class`.
fn uint(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str, max: u64, class: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(py_error(py, class, format!("{name} must be an int, got bool")));
    }
    let v: i128 = match obj.extract::<i128>() {
        Ok(v) => v,
        Err(_) => {
            return Err(py_error(py, class, format!("{name} must be an int, got {}", type_name(obj))));
        }
    };
    if v < 0 {
        return Err(py_error(py, class, format!("{name} must be >= 0, got {v}")));
    }
    if v > i128::from(max) {
        return Err(py_error(py, class, format!("{name} = {v} is larger than the supported maximum {max}")));
    }
    Ok(v as u64)
}

fn opt_uint(py: Python<'_>, obj: Option<&Bound<'_, PyAny>>, name: &str, max: u64, class: &str) -> PyResult<Option<u64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => uint(py, o, name, max, class).map(Some),
    }
}

const U32: u64 = u32::MAX as u64;

fn make_config(
    py: Python<'_>,
    max_num_seqs: &Bound<'_, PyAny>,
    max_model_len: &Bound<'_, PyAny>,
    available_blocks: Option<&Bound<'_, PyAny>>,
    max_batch_tkv_limit: Option<&Bound<'_, PyAny>>,
) -> PyResult<core::Config> {
    let c = "ConfigError";
    let seqs = uint(py, max_num_seqs, "max_num_seqs", U32, c)? as u32;
    let mml = uint(py, max_model_len, "max_model_len", U32, c)? as u32;
    let blocks = opt_uint(py, available_blocks, "available_blocks", U32 - 1, c)?.map(|b| b as u32);
    let limit = opt_uint(py, max_batch_tkv_limit, "max_batch_tkv_limit", u64::MAX >> 1, c)?;
    core::Config::new(seqs, mml, blocks, limit).map_err(|e| core_err(py, e.into()))
}

// ----- step records -----------------------------------------------------------

/// A simulation's compact trace with the request ids made into Python strings
/// once; step records are views into it, so building a trace costs
/// O(steps x batch) and a record's lists are made only when read.
struct SharedTrace {
    trace: core::CompactTrace,
    names: Vec<Py<PyString>>,
}

enum RecordData {
    Owned(core::StepRecord),
    View(Arc<SharedTrace>, usize),
}

/// One observation of the scheduler after a step (step 0: before any step).
#[pyclass(module = "spyre_cb._core", frozen)]
pub struct StepRecord {
    data: RecordData,
}

impl From<core::StepRecord> for StepRecord {
    fn from(r: core::StepRecord) -> Self {
        Self { data: RecordData::Owned(r) }
    }
}

type RecordTuple = (u64, u32, Vec<String>, Vec<String>, Vec<String>, Vec<String>, u32, u32);

impl StepRecord {
    fn names<'py>(&self, py: Python<'py>, which: u8) -> PyResult<Bound<'py, PyList>> {
        match &self.data {
            RecordData::Owned(r) => {
                let v = match which {
                    0 => &r.waiting,
                    1 => &r.running,
                    2 => &r.request_outputs,
                    _ => &r.finished_requests,
                };
                PyList::new(py, v)
            }
            RecordData::View(t, i) => {
                let rec = &t.trace.records[*i];
                let idx: &[u32] = match which {
                    0 => t.trace.waiting(*i),
                    1 => &rec.running,
                    2 => &rec.request_outputs,
                    _ => &rec.finished_requests,
                };
                PyList::new(py, idx.iter().map(|&k| t.names[k as usize].bind(py)))
            }
        }
    }

    fn numbers(&self) -> (u64, u32, u32, u32) {
        match &self.data {
            RecordData::Owned(r) => (r.step, r.tkv, r.n_reserved_blocks, r.n_used_blocks),
            RecordData::View(t, i) => {
                let r = &t.trace.records[*i];
                (r.step, r.tkv, r.n_reserved_blocks, r.n_used_blocks)
            }
        }
    }

    fn owned(&self) -> core::StepRecord {
        match &self.data {
            RecordData::Owned(r) => r.clone(),
            RecordData::View(t, i) => t.trace.record(*i),
        }
    }
}

#[pymethods]
impl StepRecord {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        step: u64,
        tkv: u32,
        waiting: Vec<String>,
        running: Vec<String>,
        request_outputs: Vec<String>,
        finished_requests: Vec<String>,
        n_reserved_blocks: u32,
        n_used_blocks: u32,
    ) -> Self {
        core::StepRecord { step, tkv, waiting, running, request_outputs, finished_requests, n_reserved_blocks, n_used_blocks }
            .into()
    }

    #[getter]
    fn step(&self) -> u64 {
        self.numbers().0
    }
    #[getter]
    fn tkv(&self) -> u32 {
        self.numbers().1
    }
    #[getter]
    fn n_reserved_blocks(&self) -> u32 {
        self.numbers().2
    }
    #[getter]
    fn n_used_blocks(&self) -> u32 {
        self.numbers().3
    }
    #[getter]
    fn waiting<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.names(py, 0)
    }
    #[getter]
    fn running<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.names(py, 1)
    }
    #[getter]
    fn request_outputs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.names(py, 2)
    }
    #[getter]
    fn finished_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.names(py, 3)
    }

    /// The record with the published spec's keys.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (step, tkv, reserved, used) = self.numbers();
        let d = PyDict::new(py);
        d.set_item("step", step)?;
        d.set_item("tkv", tkv)?;
        d.set_item("waiting", self.names(py, 0)?)?;
        d.set_item("running", self.names(py, 1)?)?;
        d.set_item("request_outputs", self.names(py, 2)?)?;
        d.set_item("finished_requests", self.names(py, 3)?)?;
        d.set_item("n_reserved_blocks", reserved)?;
        d.set_item("n_used_blocks", used)?;
        Ok(d)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<StepRecord>() {
            Ok(o) => self.owned() == o.get().owned(),
            Err(_) => false,
        }
    }

    fn __getnewargs__(&self) -> RecordTuple {
        let r = self.owned();
        (r.step, r.tkv, r.waiting, r.running, r.request_outputs, r.finished_requests, r.n_reserved_blocks, r.n_used_blocks)
    }

    fn __repr__(&self) -> String {
        let r = self.owned();
        format!(
            "StepRecord(step={}, tkv={}, waiting={:?}, running={:?}, request_outputs={:?}, finished_requests={:?}, n_reserved_blocks={}, n_used_blocks={})",
            r.step, r.tkv, r.waiting, r.running, r.request_outputs, r.finished_requests, r.n_reserved_blocks, r.n_used_blocks
        )
    }
}

// ----- plans ------------------------------------------------------------------

fn plan_dict<'py>(py: Python<'py>, plan: core::StepPlan) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match plan {
        core::StepPlan::Idle => {
            d.set_item("kind", "idle")?;
        }
        core::StepPlan::Prefill(p) => {
            d.set_item("kind", "prefill")?;
            d.set_item("request_id", &*p.request_id)?;
            d.set_item("tkv", p.tkv)?;
            d.set_item("tkv_shift", p.tkv_shift)?;
            d.set_item("new_batch", p.new_batch)?;
            d.set_item("prompt_len", p.prompt_len)?;
            d.set_item("left_padding", p.left_padding)?;
            d.set_item("right_padding", p.right_padding)?;
            d.set_item("input_ids", p.input_ids)?;
            d.set_item("positions", p.positions)?;
            d.set_item("slot_mapping", p.slot_mapping)?;
            d.set_item("block_table", p.block_table)?;
            d.set_item("logits_index", p.logits_index)?;
        }
        core::StepPlan::Decode(p) => {
            d.set_item("kind", "decode")?;
            let w = p.width as usize;
            let rows: Vec<&[u32]> = if w == 0 {
                Vec::new()
            } else {
                p.block_table.chunks(w).collect()
            };
            d.set_item("block_table", PyList::new(py, rows)?)?;
            d.set_item("request_ids", PyList::new(py, p.request_ids.iter().map(|s| &**s))?)?;
            d.set_item("tkv", p.tkv)?;
            d.set_item("input_ids", p.input_ids)?;
            d.set_item("positions", p.positions)?;
            d.set_item("slot_mapping", p.slot_mapping)?;
            d.set_item("left_padding", p.left_padding)?;
            d.set_item("current_tkv", p.current_tkv)?;
        }
    }
    Ok(d)
}

// ----- scheduler --------------------------------------------------------------

/// The scheduling core: waiting queue, running batch, KV block pool and tkv.
#[pyclass(module = "spyre_cb._core")]
pub struct Scheduler {
    inner: core::Scheduler,
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None))]
    fn new(
        py: Python<'_>,
        max_num_seqs: &Bound<'_, PyAny>,
        max_model_len: &Bound<'_, PyAny>,
        available_blocks: Option<&Bound<'_, PyAny>>,
        max_batch_tkv_limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cfg = make_config(py, max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit)?;
        Ok(Self { inner: core::Scheduler::new(cfg) })
    }

    /// Queues a request with its prompt token ids.
    fn add_request(
        &mut self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_token_ids: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let id = request_id_str(py, request_id)?;
        let c = "InvalidRequestError";
        let mt = uint(py, max_tokens, "max_tokens", U32, c)? as u32;
        let ids = token_ids(py, prompt_token_ids)?;
        guard(py, "add_request", || self.inner.add_request(&id, ids, mt))
    }

    /// Queues a token-less request (for simulations: plans carry no input ids).
    fn add_request_len(
        &mut self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_len: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (id, pl, mt) = len_request(py, request_id, prompt_len, max_tokens)?;
        guard(py, "add_request_len", || self.inner.add_request_len(&id, pl, mt))
    }

    /// Checks a request against the limits without queuing it.
    fn validate(
        &self,
        py: Python<'_>,
        request_id: &Bound<'_, PyAny>,
        prompt_len: &Bound<'_, PyAny>,
        max_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (id, pl, mt) = len_request(py, request_id, prompt_len, max_tokens)?;
        self.inner.validate(&id, pl, mt).map_err(|e| core_err(py, e.into()))
    }

    /// Aborts a waiting or running request.
    fn abort(&mut self, py: Python<'_>, request_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let id = request_id_str(py, request_id)?;
        guard(py, "abort", || self.inner.abort(&id))
    }

    /// Starts a step; returns its plan as a dict (`kind`: prefill/decode/idle).
    fn schedule<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let plan = guard(py, "schedule", || self.inner.schedule())?;
        plan_dict(py, plan)
    }

    /// Closes the step: one token per planned sequence (plan order), optional
    /// stop flags. Returns the ids that finished in this step.
    #[pyo3(signature = (tokens, stopped=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        tokens: Vec<u32>,
        stopped: Option<Vec<bool>>,
    ) -> PyResult<Vec<String>> {
        let stopped = stopped.unwrap_or_default();
        let out = guard(py, "update", || self.inner.update(&tokens, &stopped))?;
        Ok(out.finished.into_iter().map(|id| id.to_string()).collect())
    }

    fn snapshot(&self) -> StepRecord {
        self.inner.snapshot().into()
    }

    fn has_unfinished_requests(&self) -> bool {
        self.inner.has_unfinished_requests()
    }
    /// Raises SchedulerStateError naming the first broken bookkeeping invariant.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.check_invariants().map_err(|m| py_error(py, "SchedulerStateError", m))
    }
    /// Blocks held by a running request (or one that finished in the last step).
    fn request_blocks(&self, request_id: &str) -> Option<Vec<u32>> {
        self.inner.request_blocks(request_id)
    }
    fn contains(&self, request_id: &str) -> bool {
        self.inner.contains(request_id)
    }
    /// Why the head of the waiting queue was not admitted in the last step.
    #[getter]
    fn last_rejection(&self) -> Option<String> {
        self.inner.last_rejection().map(|r| format!("{r:?}"))
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
    #[getter]
    fn n_reserved_blocks(&self) -> u32 {
        self.inner.n_reserved_blocks()
    }
    #[getter]
    fn n_free_blocks(&self) -> u32 {
        self.inner.n_free_blocks()
    }
    #[getter]
    fn n_used_blocks(&self) -> u32 {
        self.inner.n_used_blocks()
    }
    #[getter]
    fn n_physical_blocks(&self) -> u32 {
        self.inner.n_physical_blocks()
    }
    #[getter]
    fn max_num_seqs(&self) -> u32 {
        self.inner.config().max_num_seqs
    }
    #[getter]
    fn max_model_len(&self) -> u32 {
        self.inner.config().max_model_len
    }
    #[getter]
    fn n_blocks(&self) -> u32 {
        self.inner.config().n_blocks
    }
    #[getter]
    fn max_batch_tkv_limit(&self) -> u64 {
        self.inner.config().max_batch_tkv_limit
    }
    #[getter]
    fn block_size(&self) -> u32 {
        core::BLOCK_SIZE
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// The `(request_id, prompt_len, max_tokens)` arguments of a token-less request.
fn len_request(
    py: Python<'_>,
    request_id: &Bound<'_, PyAny>,
    prompt_len: &Bound<'_, PyAny>,
    max_tokens: &Bound<'_, PyAny>,
) -> PyResult<(String, u32, u32)> {
    let c = "InvalidRequestError";
    Ok((
        request_id_str(py, request_id)?,
        uint(py, prompt_len, "prompt_len", U32, c)? as u32,
        uint(py, max_tokens, "max_tokens", U32, c)? as u32,
    ))
}

fn request_id_str(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    match obj.extract::<String>() {
        Ok(s) => Ok(s),
        Err(_) => Err(py_error(py, "InvalidRequestError", format!("request_id must be a str, got {}", type_name(obj)))),
    }
}

fn token_ids(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<pyo3::types::PyString>() {
        return Err(py_error(py, "InvalidRequestError", "prompt_token_ids must be a sequence of ints, got str".into()));
    }
    let mut out = Vec::new();
    let iter = obj.try_iter().map_err(|_| {
        let msg = format!("prompt_token_ids must be a sequence of ints, got {}", type_name(obj));
        py_error(py, "InvalidRequestError", msg)
    })?;
    for (i, item) in iter.enumerate() {
        let item = item?;
        let v = uint(py, &item, &format!("prompt_token_ids[{i}]"), U32, "InvalidRequestError")?;
        out.push(v as u32);
    }
    Ok(out)
}

// ----- simulation -------------------------------------------------------------

fn sim_requests(py: Python<'_>, requests: &Bound<'_, PyAny>) -> PyResult<Vec<core::SimRequest>> {
    let c = "InvalidRequestError";
    let mut reqs = Vec::new();
    let iter = requests
        .try_iter()
        .map_err(|_| py_error(py, c, "requests must be an iterable of (arrival_step, prompt_len, max_tokens)".into()))?;
    for (i, item) in iter.enumerate() {
        let item = item?;
        let t = item.cast::<PyTuple>().ok().filter(|t| t.len() == 3).map(|t| t.to_owned());
        let t = match t {
            Some(t) => t,
            None => {
                let seq: Vec<Bound<'_, PyAny>> = item.extract().map_err(|_| {
                    py_error(py, c, format!("requests[{i}] must be (arrival_step, prompt_len, max_tokens)"))
                })?;
                if seq.len() != 3 {
                    return Err(py_error(py, c, format!("requests[{i}] must have 3 items, got {}", seq.len())));
                }
                PyTuple::new(py, seq)?
            }
        };
        reqs.push(core::SimRequest {
            arrival: uint(py, &t.get_item(0)?, &format!("requests[{i}] arrival_step"), u64::MAX >> 1, c)?,
            prompt_len: uint(py, &t.get_item(1)?, &format!("requests[{i}] prompt_len"), U32, c)? as u32,
            max_tokens: uint(py, &t.get_item(2)?, &format!("requests[{i}] max_tokens"), U32, c)? as u32,
        });
    }
    Ok(reqs)
}

/// Compact statistics of a simulation: per-step columns and per-request
/// admission/finish steps (-1 for rejected requests), as a dict of lists.
#[pyfunction]
#[pyo3(signature = (requests, max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None, steps=None, record_steps=true))]
#[allow(clippy::too_many_arguments)]
fn simulate_stats<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    max_num_seqs: &Bound<'py, PyAny>,
    max_model_len: &Bound<'py, PyAny>,
    available_blocks: Option<&Bound<'py, PyAny>>,
    max_batch_tkv_limit: Option<&Bound<'py, PyAny>>,
    steps: Option<&Bound<'py, PyAny>>,
    record_steps: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let cfg = make_config(py, max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit)?;
    let steps = opt_uint(py, steps, "steps", u64::MAX >> 1, "InvalidRequestError")?;
    let reqs = sim_requests(py, requests)?;
    let st = guard(py, "simulate_stats", || Ok(py.detach(|| core::simulate_stats(cfg, &reqs, steps, record_steps))))?;
    let d = PyDict::new(py);
    d.set_item("tkv", st.tkv)?;
    d.set_item("kind", st.kind.into_iter().map(u32::from).collect::<Vec<u32>>())?;
    d.set_item("n_running", st.n_running)?;
    d.set_item("n_waiting", st.n_waiting)?;
    d.set_item("n_reserved_blocks", st.n_reserved_blocks)?;
    d.set_item("n_used_blocks", st.n_used_blocks)?;
    d.set_item("computed_slots", st.computed_slots)?;
    d.set_item("padding_slots", st.padding_slots)?;
    let steps_of = |v: Vec<u64>| -> Vec<i64> { v.into_iter().map(|s| if s == u64::MAX { -1 } else { s as i64 }).collect() };
    d.set_item("admitted", steps_of(st.admitted))?;
    d.set_item("finished", steps_of(st.finished))?;
    let rejected: Vec<(String, String)> = st.rejected.into_iter().map(|(id, e)| (id, e.to_string())).collect();
    d.set_item("rejected", rejected)?;
    Ok(d)
}

/// Model-free simulation; returns `(records, rejected)` with `rejected` a list
/// of `(request_id, message)` for requests refused at add time.
#[pyfunction]
#[pyo3(signature = (requests, max_num_seqs, max_model_len, available_blocks=None, max_batch_tkv_limit=None, steps=None))]
fn simulate(
    py: Python<'_>,
    requests: &Bound<'_, PyAny>,
    max_num_seqs: &Bound<'_, PyAny>,
    max_model_len: &Bound<'_, PyAny>,
    available_blocks: Option<&Bound<'_, PyAny>>,
    max_batch_tkv_limit: Option<&Bound<'_, PyAny>>,
    steps: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Vec<StepRecord>, Vec<(String, String)>)> {
    let cfg = make_config(py, max_num_seqs, max_model_len, available_blocks, max_batch_tkv_limit)?;
    let steps = opt_uint(py, steps, "steps", u64::MAX >> 1, "InvalidRequestError")?;
    let reqs = sim_requests(py, requests)?;
    let n = reqs.len();
    let trace = guard(py, "simulate", || Ok(py.detach(|| core::simulate_compact(cfg, &reqs, steps))))?;
    let rejected = trace.rejected.iter().map(|(i, e)| (i.to_string(), e.to_string())).collect();
    let names = (0..n).map(|i| PyString::new(py, &i.to_string()).unbind()).collect();
    let n_records = trace.records.len();
    let shared = Arc::new(SharedTrace { trace, names });
    let records = (0..n_records).map(|i| StepRecord { data: RecordData::View(shared.clone(), i) }).collect();
    Ok((records, rejected))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Scheduler>()?;
    m.add_class::<StepRecord>()?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(simulate_stats, m)?)?;
    m.add("BLOCK_SIZE", core::BLOCK_SIZE)?;
    m.add("NULL_BLOCK", core::NULL_BLOCK)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
