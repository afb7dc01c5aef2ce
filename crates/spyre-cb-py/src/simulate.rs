//! Model-free simulation and the synthetic workload generator.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use spyre_cb_core as core;

use crate::chunked::{counters_dict, latency_dict, ChunkedTrace};
use crate::config::SchedulerConfig;
use crate::convert::{opt_uint, uint, MAX_STEPS, U32};
use crate::errors::{err, panic_message, Kind};
use crate::records::{SharedTrace, Trace};

/// Pops `steps` and `record_steps` out of the keyword arguments; the rest
/// resolve the SchedulerConfig.
fn split_kwargs<'py>(
    py: Python<'py>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<(core::SchedulerConfig, Option<u64>, Option<Bound<'py, PyAny>>)> {
    let kwargs = match kwargs {
        Some(k) => Some(k.copy()?),
        None => None,
    };
    let pop = |name: &str| -> PyResult<Option<Bound<'py, PyAny>>> {
        match &kwargs {
            Some(k) => {
                let v = k.get_item(name)?;
                if v.is_some() {
                    k.del_item(name)?;
                }
                Ok(v)
            }
            None => Ok(None),
        }
    };
    let steps = pop("steps")?;
    let record_steps = pop("record_steps")?;
    let steps = opt_uint(steps.as_ref(), "steps", MAX_STEPS - 1, Kind::InvalidRequest)?;
    let cfg = SchedulerConfig::resolve(py, config, kwargs.as_ref())?;
    Ok((cfg, steps, record_steps))
}

/// Runs a simulation without the GIL, giving Python a chance to raise
/// (Ctrl-C) every few thousand steps; a panic (a bug) becomes a
/// SchedulerStateError.
fn run_simulation<T: Send>(
    py: Python<'_>,
    what: &str,
    f: impl FnOnce(&mut dyn FnMut() -> bool) -> Result<T, core::Interrupted> + Send,
) -> PyResult<T> {
    let mut pending: Option<PyErr> = None;
    let out = py.detach(|| {
        let mut hook = || match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                pending = Some(e);
                true
            }
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut hook)))
    });
    match out {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(core::Interrupted)) => {
            Err(pending.unwrap_or_else(|| err(py, Kind::SchedulerState, format!("{what} interrupted"))))
        }
        Err(p) => Err(err(py, Kind::SchedulerState, format!("internal error in {what}: {}", panic_message(&*p)))),
    }
}

fn name(r: &core::ChunkedSimRequest, i: usize) -> String {
    r.id.clone().unwrap_or_else(|| i.to_string())
}

fn continuous_requests(reqs: &[core::ChunkedSimRequest]) -> Vec<core::SimRequest> {
    reqs.iter()
        .map(|r| core::SimRequest { arrival: r.arrival, prompt_len: r.prompt_len, max_tokens: r.max_tokens })
        .collect()
}

/// Model-free simulation: ``simulate(requests, config)`` or
/// ``simulate(requests, max_num_seqs=..., max_model_len=..., ..., policy=..., steps=None)``.
/// Returns a Trace (continuous policy) or a ChunkedTrace; requests refused at
/// add time are in ``trace.rejected``.
#[pyfunction]
#[pyo3(signature = (requests, *config, **kwargs))]
pub fn simulate<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (cfg, steps, _) = split_kwargs(py, config, kwargs)?;
    let reqs = crate::chunked::requests(requests)?;
    let rejected = PyDict::new(py);
    if cfg.policy.is_chunked() {
        let res = run_simulation(py, "simulate", |hook| core::simulate_chunked(cfg, &reqs, steps, true, hook))?;
        for (i, e) in &res.rejected {
            rejected.set_item(name(&reqs[*i], *i), e.to_string())?;
        }
        let t = ChunkedTrace { result: Arc::new(res), rejected: rejected.unbind() };
        return Ok(Bound::new(py, t)?.into_any());
    }
    let plain = continuous_requests(&reqs);
    let trace = run_simulation(py, "simulate", |hook| core::simulate_compact(cfg, &plain, steps, hook))?;
    for (i, e) in &trace.rejected {
        rejected.set_item(name(&reqs[*i as usize], *i as usize), e.to_string())?;
    }
    let names = reqs.iter().enumerate().map(|(i, r)| PyString::new(py, &name(r, i)).unbind()).collect();
    Ok(Bound::new(py, Trace::new(Arc::new(SharedTrace { trace, names }), rejected.unbind()))?.into_any())
}

/// Compact statistics of a simulation as a dict of columns: per row (a step,
/// or a stretch of idle steps: see ``step`` and ``span``) and per request
/// (admission and finish steps, -1 for rejected requests).
#[pyfunction]
#[pyo3(signature = (requests, *config, **kwargs))]
pub fn simulate_stats<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (cfg, steps, record_steps) = split_kwargs(py, config, kwargs)?;
    let record_steps = match record_steps {
        Some(v) => v.is_truthy()?,
        None => true,
    };
    let reqs = crate::chunked::requests(requests)?;
    let resolved = SchedulerConfig { inner: cfg.clone() };
    if cfg.policy.is_chunked() {
        return chunked_stats(py, cfg, resolved, &reqs, steps, record_steps);
    }
    let reqs = continuous_requests(&reqs);
    let st = run_simulation(py, "simulate_stats", |hook| core::simulate_stats(cfg, &reqs, steps, record_steps, hook))?;
    let d = PyDict::new(py);
    d.set_item("config", resolved)?;
    d.set_item("step", st.step)?;
    d.set_item("span", st.span)?;
    d.set_item("tkv", st.tkv)?;
    d.set_item("kind", st.kind.into_iter().map(u32::from).collect::<Vec<u32>>())?;
    d.set_item("n_running", st.n_running)?;
    d.set_item("n_waiting", st.n_waiting)?;
    d.set_item("n_reserved_blocks", st.n_reserved_blocks)?;
    d.set_item("n_used_blocks", st.n_used_blocks)?;
    d.set_item("computed_slots", st.computed_slots)?;
    d.set_item("padding_slots", st.padding_slots)?;
    let steps_of =
        |v: Vec<u64>| -> Vec<i64> { v.into_iter().map(|s| if s == u64::MAX { -1 } else { s as i64 }).collect() };
    d.set_item("admitted", steps_of(st.admitted.clone()))?;
    d.set_item("first_token", steps_of(st.admitted))?;
    d.set_item("finished", steps_of(st.finished))?;
    d.set_item("latency", latency_dict(py, &st.latency.summary())?)?;
    let rejected: Vec<(String, String)> = st.rejected.into_iter().map(|(id, e)| (id, e.to_string())).collect();
    d.set_item("rejected", rejected)?;
    let waits = PyDict::new(py);
    for (why, count) in core::Rejection::ALL.iter().zip(st.waits) {
        waits.set_item(why.name(), count)?;
    }
    d.set_item("waits_by_reason", waits)?;
    Ok(d)
}

/// `simulate_stats` of the chunked policy: the same row columns (plus
/// ``n_paused``), per-request first-token and finish steps, latency and counters.
fn chunked_stats<'py>(
    py: Python<'py>,
    cfg: core::SchedulerConfig,
    resolved: SchedulerConfig,
    reqs: &[core::ChunkedSimRequest],
    steps: Option<u64>,
    record_steps: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let res =
        run_simulation(py, "simulate_stats", |hook| core::simulate_chunked(cfg, reqs, steps, record_steps, hook))?;
    let d = PyDict::new(py);
    d.set_item("config", resolved)?;
    let col = |f: &dyn Fn(&core::ChunkedRecord) -> u64| -> Vec<u64> { res.records.iter().map(|(r, _)| f(r)).collect() };
    d.set_item("step", col(&|r| r.base.step))?;
    d.set_item("span", res.records.iter().map(|(_, s)| *s).collect::<Vec<u64>>())?;
    d.set_item("tkv", col(&|r| u64::from(r.base.tkv)))?;
    d.set_item("kind", res.kinds.iter().map(|&k| u32::from(k)).collect::<Vec<u32>>())?;
    d.set_item("n_running", col(&|r| r.base.running.len() as u64))?;
    d.set_item("n_waiting", col(&|r| r.base.waiting.len() as u64))?;
    d.set_item("n_paused", col(&|r| r.paused.len() as u64))?;
    d.set_item("n_reserved_blocks", col(&|r| u64::from(r.base.n_reserved_blocks)))?;
    d.set_item("n_used_blocks", col(&|r| u64::from(r.base.n_used_blocks)))?;
    d.set_item("n_cached_blocks", col(&|r| u64::from(r.n_cached_blocks)))?;
    d.set_item("computed_slots", res.computed_slots.clone())?;
    d.set_item("padding_slots", res.padding_slots.clone())?;
    let opt = |v: Option<u64>| v.map_or(-1, |s| s as i64);
    let times = &res.latency.times;
    d.set_item("admitted", times.iter().map(|t| opt(t.scheduled)).collect::<Vec<i64>>())?;
    let waits = PyDict::new(py);
    for (why, count) in core::ChunkRejection::ALL.iter().zip(res.waits) {
        waits.set_item(why.name(), count)?;
    }
    d.set_item("waits_by_reason", waits)?;
    d.set_item("first_token", times.iter().map(|t| opt(t.first_token)).collect::<Vec<i64>>())?;
    d.set_item("finished", times.iter().map(|t| opt(t.finished)).collect::<Vec<i64>>())?;
    let rejected: Vec<(String, String)> =
        res.rejected.iter().map(|(i, e)| (name(&reqs[*i], *i), e.to_string())).collect();
    d.set_item("rejected", rejected)?;
    d.set_item("latency", latency_dict(py, &res.latency.summary())?)?;
    d.set_item("counters", counters_dict(py, &res.counters)?)?;
    d.set_item("max_decode_volume", res.max_decode_volume)?;
    Ok(d)
}

fn lengths(median: f64, sigma: f64, range: Option<(u32, u32)>) -> core::workload::Lengths {
    match range {
        Some((lo, hi)) => core::workload::Lengths::Uniform { lo, hi },
        None => core::workload::Lengths::LogNormal { median, sigma },
    }
}

/// ``n`` requests ``(arrival_step, prompt_len, max_tokens)``: Poisson
/// arrivals, log-normal lengths around their medians (or uniform in a
/// ``(lo, hi)`` range), clipped to fit ``max_model_len``. Deterministic per seed.
#[pyfunction]
#[pyo3(signature = (n, *, seed=None, max_model_len=None, mean_interarrival=4.0, prompt_median=200.0,
                    tokens_median=100.0, sigma=1.0, prompt_range=None, tokens_range=None))]
#[allow(clippy::too_many_arguments)]
pub fn synthetic_workload(
    py: Python<'_>,
    n: &Bound<'_, PyAny>,
    seed: Option<&Bound<'_, PyAny>>,
    max_model_len: Option<&Bound<'_, PyAny>>,
    mean_interarrival: f64,
    prompt_median: f64,
    tokens_median: f64,
    sigma: f64,
    prompt_range: Option<(u32, u32)>,
    tokens_range: Option<(u32, u32)>,
) -> PyResult<Vec<(u64, u32, u32)>> {
    let c = Kind::InvalidRequest;
    let n = uint(n, "n", 100_000_000, c)? as usize;
    let seed = opt_uint(seed, "seed", u64::MAX, c)?.unwrap_or(0);
    let mml = opt_uint(max_model_len, "max_model_len", U32, c)?.unwrap_or(2048) as u32;
    let gen = core::workload::Synthetic::new(
        seed,
        mml,
        mean_interarrival,
        lengths(prompt_median, sigma, prompt_range),
        lengths(tokens_median, sigma, tokens_range),
    )
    .map_err(|m| err(py, c, m))?;
    Ok(gen.take(n).map(|r| (r.arrival, r.prompt_len, r.max_tokens)).collect())
}
