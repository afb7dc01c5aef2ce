//! The chunked policy's observations: `ChunkedStepRecord` (one step, with
//! block tables and ref counts) and `ChunkedTrace` (a whole simulation,
//! with its counters and latency figures); and the request forms a
//! simulation takes (tuples or dicts with token ids).

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use spyre_cb_core as core;

use crate::convert::{type_name, uint, uint_list, MAX_STEPS, U32};
use crate::errors::{err, Kind};

/// One observation of the chunked scheduler after a step.
#[pyclass(module = "spyre_cb._core", frozen)]
pub struct ChunkedStepRecord {
    pub inner: core::ChunkedRecord,
}

impl From<core::ChunkedRecord> for ChunkedStepRecord {
    fn from(inner: core::ChunkedRecord) -> Self {
        Self { inner }
    }
}

#[pymethods]
impl ChunkedStepRecord {
    #[getter]
    fn step(&self) -> u64 {
        self.inner.base.step
    }
    #[getter]
    fn tkv(&self) -> u32 {
        self.inner.base.tkv
    }
    #[getter]
    fn waiting(&self) -> Vec<String> {
        self.inner.base.waiting.clone()
    }
    #[getter]
    fn running(&self) -> Vec<String> {
        self.inner.base.running.clone()
    }
    #[getter]
    fn request_outputs(&self) -> Vec<String> {
        self.inner.base.request_outputs.clone()
    }
    #[getter]
    fn finished_requests(&self) -> Vec<String> {
        self.inner.base.finished_requests.clone()
    }
    #[getter]
    fn n_reserved_blocks(&self) -> u32 {
        self.inner.base.n_reserved_blocks
    }
    #[getter]
    fn n_used_blocks(&self) -> u32 {
        self.inner.base.n_used_blocks
    }
    /// Paused requests (in neither waiting nor running).
    #[getter]
    fn paused(&self) -> Vec<String> {
        self.inner.paused.clone()
    }
    /// Usable (chunk-aligned) prefix-hit blocks of the requests holding blocks.
    #[getter]
    fn n_cached_blocks(&self) -> u32 {
        self.inner.n_cached_blocks
    }
    #[getter]
    fn n_prefix_hits(&self) -> u32 {
        self.inner.n_prefix_hits
    }
    /// ``{request id: [block ids]}`` for every request holding blocks.
    #[getter]
    fn block_tables<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.block_tables {
            d.set_item(k, v.clone())?;
        }
        Ok(d)
    }
    /// ``{block id: reference count}`` over blocks some request holds.
    #[getter]
    fn block_ref_count<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for &(b, n) in &self.inner.block_ref_count {
            d.set_item(b, n)?;
        }
        Ok(d)
    }
    /// The last step's prefill chunk block by block: ``{request id: [block or 0]}``.
    #[getter]
    fn prefill_slot_mappings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.prefill_slot_mappings {
            d.set_item(k, v.clone())?;
        }
        Ok(d)
    }

    /// The continuous policy's keys plus n_cached_blocks, n_prefix_hits,
    /// block_tables and block_ref_count.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let b = &self.inner.base;
        let d = PyDict::new(py);
        d.set_item("step", b.step)?;
        d.set_item("tkv", b.tkv)?;
        d.set_item("waiting", b.waiting.clone())?;
        d.set_item("running", b.running.clone())?;
        d.set_item("request_outputs", b.request_outputs.clone())?;
        d.set_item("finished_requests", b.finished_requests.clone())?;
        d.set_item("n_reserved_blocks", b.n_reserved_blocks)?;
        d.set_item("n_used_blocks", b.n_used_blocks)?;
        d.set_item("n_cached_blocks", self.inner.n_cached_blocks)?;
        d.set_item("n_prefix_hits", self.inner.n_prefix_hits)?;
        d.set_item("block_tables", self.block_tables(py)?)?;
        d.set_item("block_ref_count", self.block_ref_count(py)?)?;
        Ok(d)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<ChunkedStepRecord>().is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        let b = &r.base;
        format!(
            "ChunkedStepRecord(step={}, tkv={}, waiting={:?}, running={:?}, paused={:?}, request_outputs={:?}, \
             finished_requests={:?}, n_reserved_blocks={}, n_used_blocks={}, n_cached_blocks={}, block_tables={:?})",
            b.step,
            b.tkv,
            b.waiting,
            b.running,
            r.paused,
            b.request_outputs,
            b.finished_requests,
            b.n_reserved_blocks,
            b.n_used_blocks,
            r.n_cached_blocks,
            r.block_tables
        )
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

/// The counters of a chunked run as a dict.
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

/// A chunked-policy simulation: ``trace[i]`` is the record of step ``i``.
#[pyclass(module = "spyre_cb._core", frozen, sequence)]
pub struct ChunkedTrace {
    pub result: Arc<core::ChunkedSimResult>,
    pub rejected: Py<PyDict>,
}

impl ChunkedTrace {
    fn at(&self, step: u64) -> ChunkedStepRecord {
        self.result.record_at(step).expect("step within the trace").into()
    }
}

#[pymethods]
impl ChunkedTrace {
    fn __len__(&self) -> usize {
        self.result.n_steps as usize
    }

    fn __getitem__<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        crate::records::sequence_item(py, key, self.result.n_steps, |s| self.at(s))
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyIterator>> {
        let all: Vec<ChunkedStepRecord> = (0..self.result.n_steps).map(|s| self.at(s)).collect();
        PyList::new(py, all)?.try_iter()
    }

    /// ``{"pause_events": n, "resume_events": n, "prefill_steps": n, ...}``.
    #[getter]
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        counters_dict(py, &self.result.counters)
    }

    /// Time to first token and inter-token latency in steps (n, mean, p50,
    /// p99, max) and the longest pause.
    #[getter]
    fn latency<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        latency_dict(py, &self.result.latency.summary())
    }

    /// Largest batch x tkv of any decode step.
    #[getter]
    fn max_decode_volume(&self) -> u64 {
        self.result.max_decode_volume
    }

    /// Requests refused at add time: ``{request id: reason}``.
    #[getter]
    fn rejected<'py>(&self, py: Python<'py>) -> Bound<'py, PyDict> {
        self.rejected.bind(py).clone()
    }

    #[getter]
    fn n_stored_records(&self) -> usize {
        self.result.records.len()
    }

    fn to_dicts<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        (0..self.result.n_steps).map(|s| self.at(s).to_dict(py)).collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "ChunkedTrace({} steps, {} stored records, {} rejected)",
            self.result.n_steps,
            self.result.records.len(),
            self.result.rejected.len()
        )
    }
}

/// Requests of a simulation: ``(arrival_step, prompt_len, max_tokens)``
/// tuples or dicts ``{"id", "arrival_step", "prompt_token_ids",
/// "max_tokens", "output_token_ids" (optional)}``.
pub fn requests(requests: &Bound<'_, PyAny>) -> PyResult<Vec<core::ChunkedSimRequest>> {
    let py = requests.py();
    let c = Kind::InvalidRequest;
    let iter = requests.try_iter().map_err(|_| {
        err(py, c, "requests must be an iterable of (arrival_step, prompt_len, max_tokens) tuples or request dicts")
    })?;
    let mut reqs = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        if let Ok(d) = item.cast::<PyDict>() {
            let known = ["id", "arrival_step", "prompt_token_ids", "max_tokens", "output_token_ids"];
            for k in d.keys() {
                let k: String = k.extract().unwrap_or_default();
                if !known.contains(&k.as_str()) {
                    return Err(err(
                        py,
                        c,
                        format!("requests[{i}] has unknown key {k:?}; keys are {}", known.join(", ")),
                    ));
                }
            }
            let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
                d.get_item(k)?.ok_or_else(|| err(py, c, format!("requests[{i}] needs {k:?}")))
            };
            let id = match d.get_item("id")? {
                Some(v) if !v.is_none() => Some(
                    v.cast::<PyString>()
                        .map_err(|_| err(py, c, format!("requests[{i}] id must be a str")))?
                        .to_str()?
                        .to_owned(),
                ),
                _ => None,
            };
            let prompt = uint_list(&get("prompt_token_ids")?, &format!("requests[{i}] prompt_token_ids"), U32 - 1, c)?;
            let outputs = match d.get_item("output_token_ids")? {
                Some(v) if !v.is_none() => uint_list(&v, &format!("requests[{i}] output_token_ids"), U32 - 1, c)?,
                _ => Vec::new(),
            };
            reqs.push(core::ChunkedSimRequest {
                id,
                arrival: uint(&get("arrival_step")?, &format!("requests[{i}] arrival_step"), MAX_STEPS, c)?,
                prompt_len: prompt.len() as u32,
                prompt,
                max_tokens: uint(&get("max_tokens")?, &format!("requests[{i}] max_tokens"), U32, c)? as u32,
                outputs,
            });
            continue;
        }
        let seq: Vec<Bound<'_, PyAny>> = match item.cast::<PyTuple>() {
            Ok(t) => t.iter().collect(),
            Err(_) if item.is_instance_of::<PyString>() => Vec::new(),
            Err(_) => item.extract().unwrap_or_default(),
        };
        if seq.len() != 3 {
            let msg = format!(
                "requests[{i}] must be (arrival_step, prompt_len, max_tokens) or a request dict, got {}",
                type_name(&item)
            );
            return Err(err(py, c, msg));
        }
        reqs.push(core::ChunkedSimRequest {
            id: None,
            arrival: uint(&seq[0], &format!("requests[{i}] arrival_step"), MAX_STEPS, c)?,
            prompt_len: uint(&seq[1], &format!("requests[{i}] prompt_len"), U32, c)? as u32,
            prompt: Vec::new(),
            max_tokens: uint(&seq[2], &format!("requests[{i}] max_tokens"), U32, c)? as u32,
            outputs: Vec::new(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (i, r) in reqs.iter().enumerate() {
        let id = r.id.clone().unwrap_or_else(|| i.to_string());
        if !seen.insert(id.clone()) {
            return Err(err(py, c, format!("requests[{i}]: request id {id:?} is used twice")));
        }
    }
    Ok(reqs)
}
