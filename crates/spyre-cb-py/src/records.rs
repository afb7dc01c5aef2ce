//! Observations of either policy: `StepRecord` (one step; the chunked
//! policy's block-level fields when it has them), `Trace` (a whole
//! simulation, idle stretches stored once, with its counters and latency),
//! `UpdateOutcome` and `RejectionReason`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySlice, PyString};

use spyre_cb_core as core;

use crate::errors::{err, Kind};

/// A simulation's compact trace with the request ids made into Python strings
/// once; step records are views into it, so building a trace costs
/// O(steps x batch) and a record's lists are made only when read.
pub struct SharedTrace {
    pub trace: core::Trace,
    pub names: Vec<Py<PyString>>,
}

enum RecordData {
    Owned(core::StepRecord),
    /// Record `index` of the trace, seen at `step` (inside its span).
    View {
        trace: Arc<SharedTrace>,
        index: usize,
        step: u64,
    },
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

#[derive(Clone, Copy)]
enum Ids {
    Waiting,
    Running,
    Outputs,
    Finished,
}

type RecordTuple = (u64, u32, Vec<String>, Vec<String>, Vec<String>, Vec<String>, u32, u32);

impl StepRecord {
    fn ids<'py>(&self, py: Python<'py>, which: Ids) -> PyResult<Bound<'py, PyList>> {
        match &self.data {
            RecordData::Owned(r) => PyList::new(
                py,
                match which {
                    Ids::Waiting => &r.waiting,
                    Ids::Running => &r.running,
                    Ids::Outputs => &r.request_outputs,
                    Ids::Finished => &r.finished_requests,
                },
            ),
            RecordData::View { trace, index, .. } => {
                let rec = &trace.trace.records[*index];
                let idx: &[u32] = match which {
                    Ids::Waiting => trace.trace.waiting(*index),
                    Ids::Running => &rec.running,
                    Ids::Outputs => &rec.request_outputs,
                    Ids::Finished => &rec.finished_requests,
                };
                PyList::new(py, idx.iter().map(|&k| trace.names[k as usize].bind(py)))
            }
        }
    }

    /// (step, tkv, reserved, used)
    fn numbers(&self) -> (u64, u32, u32, u32) {
        match &self.data {
            RecordData::Owned(r) => (r.step, r.tkv, r.n_reserved_blocks, r.n_used_blocks),
            RecordData::View { trace, index, step } => {
                let r = &trace.trace.records[*index];
                (*step, r.tkv, r.n_reserved_blocks, r.n_used_blocks)
            }
        }
    }

    /// The chunked policy's fields of this record, if it has them.
    fn chunked(&self) -> Option<std::borrow::Cow<'_, core::ChunkedState>> {
        match &self.data {
            RecordData::Owned(r) => r.chunked.as_deref().map(std::borrow::Cow::Borrowed),
            RecordData::View { trace, index, .. } => trace.trace.chunked.get(*index).map(std::borrow::Cow::Borrowed),
        }
    }

    fn owned(&self) -> core::StepRecord {
        match &self.data {
            RecordData::Owned(r) => r.clone(),
            RecordData::View { trace, index, step } => {
                let mut r = trace.trace.record(*index);
                r.step = *step;
                r
            }
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
        core::StepRecord {
            step,
            tkv,
            waiting,
            running,
            request_outputs,
            finished_requests,
            n_reserved_blocks,
            n_used_blocks,
            chunked: None,
        }
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
        self.ids(py, Ids::Waiting)
    }
    #[getter]
    fn running<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.ids(py, Ids::Running)
    }
    #[getter]
    fn request_outputs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.ids(py, Ids::Outputs)
    }
    #[getter]
    fn finished_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.ids(py, Ids::Finished)
    }

    /// Chunked policy: paused requests (in neither waiting nor running); None
    /// under the continuous policy (as for every chunk-only field below).
    #[getter]
    fn paused(&self) -> Option<Vec<String>> {
        self.chunked().map(|c| c.paused.clone())
    }
    /// Chunked policy: usable (chunk-aligned) prefix-hit blocks of the requests holding blocks.
    #[getter]
    fn n_cached_blocks(&self) -> Option<u32> {
        self.chunked().map(|c| c.n_cached_blocks)
    }
    /// Chunked policy: requests whose usable hit exceeds their computed tokens.
    #[getter]
    fn n_prefix_hits(&self) -> Option<u32> {
        self.chunked().map(|c| c.n_prefix_hits)
    }
    /// Chunked policy: ``{request id: [block ids]}`` for every request holding blocks.
    #[getter]
    fn block_tables<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.chunked().map(|c| pairs(py, &c.block_tables)).transpose()
    }
    /// Chunked policy: ``{block id: reference count}`` over blocks some request holds.
    #[getter]
    fn block_ref_count<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.chunked().map(|c| pairs(py, &c.block_ref_count)).transpose()
    }
    /// Chunked policy: the last step's prefill chunk block by block,
    /// ``{request id: [block or 0]}``.
    #[getter]
    fn prefill_slot_mappings<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.chunked().map(|c| pairs(py, &c.prefill_slot_mappings)).transpose()
    }

    /// The record with the published spec's keys (the chunked policy's
    /// add n_cached_blocks, n_prefix_hits, block_tables and block_ref_count).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (step, tkv, reserved, used) = self.numbers();
        let d = PyDict::new(py);
        d.set_item("step", step)?;
        d.set_item("tkv", tkv)?;
        d.set_item("waiting", self.ids(py, Ids::Waiting)?)?;
        d.set_item("running", self.ids(py, Ids::Running)?)?;
        d.set_item("request_outputs", self.ids(py, Ids::Outputs)?)?;
        d.set_item("finished_requests", self.ids(py, Ids::Finished)?)?;
        d.set_item("n_reserved_blocks", reserved)?;
        d.set_item("n_used_blocks", used)?;
        if let Some(c) = self.chunked() {
            d.set_item("n_cached_blocks", c.n_cached_blocks)?;
            d.set_item("n_prefix_hits", c.n_prefix_hits)?;
            d.set_item("block_tables", pairs(py, &c.block_tables)?)?;
            d.set_item("block_ref_count", pairs(py, &c.block_ref_count)?)?;
        }
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
        (
            r.step,
            r.tkv,
            r.waiting,
            r.running,
            r.request_outputs,
            r.finished_requests,
            r.n_reserved_blocks,
            r.n_used_blocks,
        )
    }

    fn __repr__(&self) -> String {
        let r = self.owned();
        let chunked = r.chunked.as_deref().map_or(String::new(), |c| {
            format!(", paused={:?}, n_cached_blocks={}, block_tables={:?}", c.paused, c.n_cached_blocks, c.block_tables)
        });
        format!(
            "StepRecord(step={}, tkv={}, waiting={:?}, running={:?}, request_outputs={:?}, finished_requests={:?}, n_reserved_blocks={}, n_used_blocks={}{chunked})",
            r.step, r.tkv, r.waiting, r.running, r.request_outputs, r.finished_requests, r.n_reserved_blocks, r.n_used_blocks
        )
    }
}

/// `[(key, value)]` as a dict.
fn pairs<'py, K, V>(py: Python<'py>, v: &[(K, V)]) -> PyResult<Bound<'py, PyDict>>
where
    K: IntoPyObject<'py> + Clone,
    V: IntoPyObject<'py> + Clone,
{
    let d = PyDict::new(py);
    for (k, x) in v {
        d.set_item(k.clone(), x.clone())?;
    }
    Ok(d)
}

/// A simulation's observations: ``trace[i]`` is the record of step ``i``
/// (``len(trace)`` steps), with the run's counters and latency figures.
/// Stretches of idle steps are stored once, so a far-future arrival costs
/// no memory; records are made when read.
#[pyclass(module = "spyre_cb._core", frozen, sequence)]
pub struct Trace {
    shared: Arc<SharedTrace>,
    rejected: Py<PyDict>,
}

impl Trace {
    pub fn new(shared: Arc<SharedTrace>, rejected: Py<PyDict>) -> Self {
        Self { shared, rejected }
    }

    fn at(&self, step: u64) -> StepRecord {
        let index = self.shared.trace.record_index(step).expect("step within the trace");
        StepRecord { data: RecordData::View { trace: self.shared.clone(), index, step } }
    }
}

#[pymethods]
impl Trace {
    fn __len__(&self) -> usize {
        self.shared.trace.n_steps() as usize
    }

    fn __getitem__<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        sequence_item(py, key, self.shared.trace.n_steps(), |s| self.at(s))
    }

    fn __iter__(slf: Bound<'_, Self>) -> TraceIter {
        TraceIter { trace: slf.unbind(), next: 0 }
    }

    /// Requests refused at add time: ``{request id: reason}``.
    #[getter]
    fn rejected<'py>(&self, py: Python<'py>) -> Bound<'py, PyDict> {
        self.rejected.bind(py).clone()
    }

    /// Event counters of the run (steps by kind, pauses, prefix-cache hits).
    #[getter]
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, &self.shared.trace.counters)
    }

    /// Time to first token, inter-token latency (steps) and the longest pause.
    #[getter]
    fn latency<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        latency_dict(py, &self.shared.trace.latency.summary())
    }

    /// Largest batch x tkv of any decode step.
    #[getter]
    fn max_decode_volume(&self) -> u64 {
        self.shared.trace.max_decode_volume
    }

    /// Records actually stored (an idle stretch counts once).
    #[getter]
    fn n_stored_records(&self) -> usize {
        self.shared.trace.records.len()
    }

    /// Every step's record as a dict.
    fn to_dicts<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        (0..self.shared.trace.n_steps()).map(|s| self.at(s).to_dict(py)).collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Trace({} steps, {} stored records, {} rejected)",
            self.shared.trace.n_steps(),
            self.shared.trace.records.len(),
            self.shared.trace.rejected.len()
        )
    }
}

/// ``trace[key]`` for a trace of `n` steps: an int (negative from the end)
/// gives the record `at(step)` makes, a slice a list of them.
pub fn sequence_item<'py, T>(
    py: Python<'py>,
    key: &Bound<'py, PyAny>,
    n: u64,
    at: impl Fn(u64) -> T,
) -> PyResult<Bound<'py, PyAny>>
where
    T: pyo3::PyClass + Into<pyo3::PyClassInitializer<T>>,
{
    let n = n as isize;
    if let Ok(slice) = key.cast::<PySlice>() {
        let ix = slice.indices(n)?;
        let mut out = Vec::with_capacity(ix.slicelength);
        let mut i = ix.start;
        for _ in 0..ix.slicelength {
            out.push(Bound::new(py, at(i as u64))?);
            i += ix.step;
        }
        return Ok(PyList::new(py, out)?.into_any());
    }
    let i: isize = key.extract().map_err(|_| {
        err(
            py,
            Kind::InvalidRequest,
            format!("trace indices must be ints or slices, got {}", crate::convert::type_name(key)),
        )
    })?;
    let j = if i < 0 { i + n } else { i };
    if !(0..n).contains(&j) {
        return Err(pyo3::exceptions::PyIndexError::new_err(format!("step {i} is outside the trace (0..{n})")));
    }
    Ok(Bound::new(py, at(j as u64))?.into_any())
}

#[pyclass(module = "spyre_cb._core")]
pub struct TraceIter {
    trace: Py<Trace>,
    next: u64,
}

#[pymethods]
impl TraceIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __next__(&mut self, py: Python<'_>) -> Option<StepRecord> {
        let t = self.trace.bind(py).get();
        if self.next >= t.shared.trace.n_steps() {
            return None;
        }
        self.next += 1;
        Some(t.at(self.next - 1))
    }
}

/// What closing a step reported: the ids that finished in it and those
/// aborted when it closed (by ``cancel()``, or an abort that arrived while
/// the step was in flight).
#[pyclass(module = "spyre_cb._core", frozen, get_all)]
pub struct UpdateOutcome {
    pub finished: Vec<String>,
    /// Why each of ``finished`` ended: "length" or "stop" (same order).
    pub finish_reasons: Vec<&'static str>,
    /// The stop token id each of ``finished`` ended on, if it was one of its
    /// ``stop_token_ids`` (EOS, length and stop flags: None).
    pub stop_reasons: Vec<Option<u32>>,
    pub aborted: Vec<String>,
}

impl From<core::UpdateOutcome> for UpdateOutcome {
    fn from(o: core::UpdateOutcome) -> Self {
        let s = |v: Vec<Arc<str>>| v.into_iter().map(|x| x.to_string()).collect();
        Self {
            finished: s(o.finished),
            finish_reasons: o.finish_reasons.iter().map(|r| r.name()).collect(),
            stop_reasons: o.stop_tokens,
            aborted: s(o.aborted),
        }
    }
}

#[pymethods]
impl UpdateOutcome {
    fn __repr__(&self) -> String {
        format!(
            "UpdateOutcome(finished={:?}, finish_reasons={:?}, aborted={:?})",
            self.finished, self.finish_reasons, self.aborted
        )
    }
}

/// Why the next prefill (the head of the queue, or the next chunk) did not
/// run: one vocabulary for both policies.
#[pyclass(module = "spyre_cb._core", eq, eq_int, frozen, hash)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionReason {
    /// 1: the batch is full.
    #[pyo3(name = "BATCH_FULL")]
    BatchFull,
    /// 2: one prefill per step.
    #[pyo3(name = "PREFILL_TAKEN")]
    PrefillTaken,
    /// 3: the request's tokens would not fit before max_model_len.
    #[pyo3(name = "NO_ROOM_FOR_TOKENS")]
    NoRoomForTokens,
    /// 3: the tkv shift would push a running request past max_model_len.
    #[pyo3(name = "SHIFT_OVERFLOWS_RUNNING")]
    ShiftOverflowsRunning,
    /// 4: not enough unreserved blocks.
    #[pyo3(name = "NOT_ENOUGH_BLOCKS")]
    NotEnoughBlocks,
    /// 5: batch x tkv would exceed max_batch_tkv_limit at some future step.
    #[pyo3(name = "VOLUME_LIMIT")]
    VolumeLimit,
    /// Chunked, interleaving: a decode step must run between two prefill chunks.
    #[pyo3(name = "INTERLEAVE")]
    Interleave,
    /// Chunked, decode pausing: paused decodes resume before any prefill.
    #[pyo3(name = "PAUSED_DECODES")]
    PausedDecodes,
}

impl From<core::Rejection> for RejectionReason {
    fn from(r: core::Rejection) -> Self {
        match r {
            core::Rejection::BatchFull => Self::BatchFull,
            core::Rejection::PrefillTaken => Self::PrefillTaken,
            core::Rejection::NoRoomForTokens => Self::NoRoomForTokens,
            core::Rejection::ShiftOverflowsRunning => Self::ShiftOverflowsRunning,
            core::Rejection::NotEnoughBlocks => Self::NotEnoughBlocks,
            core::Rejection::VolumeLimit => Self::VolumeLimit,
            core::Rejection::Interleave => Self::Interleave,
            core::Rejection::PausedDecodes => Self::PausedDecodes,
        }
    }
}

#[pymethods]
impl RejectionReason {
    /// The reason in words.
    #[getter]
    fn description(&self) -> &'static str {
        match self {
            Self::BatchFull => "the batch is full (max_num_seqs)",
            Self::PrefillTaken => "a prefill already runs this step",
            Self::NoRoomForTokens => "its tokens would not fit before max_model_len",
            Self::ShiftOverflowsRunning => "the tkv shift would push a running request past max_model_len",
            Self::NotEnoughBlocks => "not enough unreserved KV blocks",
            Self::VolumeLimit => "batch x tkv would exceed max_batch_tkv_limit",
            Self::Interleave => "a decode step had to run between two prefill chunks (interleaving)",
            Self::PausedDecodes => "paused decodes resume before any prefill",
        }
    }
}

/// The summary dict of a latency tracker (steps).
pub fn latency_dict<'py>(py: Python<'py>, s: &core::LatencySummary) -> PyResult<Bound<'py, PyDict>> {
    let one = |x: &core::Summary| -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("n", x.n)?;
        d.set_item("mean", x.mean)?;
        d.set_item("p50", x.p50)?;
        d.set_item("p99", x.p99)?;
        d.set_item("max", x.max)?;
        Ok(d)
    };
    let d = PyDict::new(py);
    d.set_item("ttft_steps", one(&s.ttft)?)?;
    d.set_item("itl_steps", one(&s.itl)?)?;
    d.set_item("max_pause_steps", s.max_pause)?;
    Ok(d)
}

/// A scheduler's or a run's counters as a dict.
pub fn counters_dict<'py>(py: Python<'py>, c: &core::Counters) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("pause_events", c.pause_events)?;
    d.set_item("resume_events", c.resume_events)?;
    d.set_item("prefill_steps", c.prefill_steps)?;
    d.set_item("decode_steps", c.decode_steps)?;
    d.set_item("idle_steps", c.idle_steps)?;
    d.set_item("prefix_cached_blocks", c.prefix_cached_blocks)?;
    d.set_item("prefix_hit_requests", c.prefix_hit_requests)?;
    Ok(d)
}
