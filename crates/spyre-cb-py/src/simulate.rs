//! Model-free simulation and the synthetic workload generator.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use spyre_cb_core as core;

use crate::config::SchedulerConfig;
use crate::convert::{opt_uint, type_name, uint, uint_list, MAX_STEPS, U32};
use crate::errors::{err, panic_message, Kind};
use crate::records::{counters_dict, latency_dict, SharedTrace, Trace};

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

/// Model-free simulation: ``simulate(requests, config)`` or
/// ``simulate(requests, max_num_seqs=..., max_model_len=..., ..., policy=..., steps=None)``.
/// Returns a Trace (records with the block-level fields under the chunked
/// policy); requests refused at add time are in ``trace.rejected``.
#[pyfunction]
#[pyo3(signature = (requests, *config, **kwargs))]
pub fn simulate<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Trace> {
    let (cfg, steps, _) = split_kwargs(py, config, kwargs)?;
    let reqs = sim_requests(requests)?;
    let trace = run_simulation(py, "simulate", |hook| core::simulate_trace(cfg, &reqs, steps, hook))?;
    let rejected = PyDict::new(py);
    for (i, e) in &trace.rejected {
        rejected.set_item(&trace.names[*i as usize], e.to_string())?;
    }
    let names = trace.names.iter().map(|n| PyString::new(py, n).unbind()).collect();
    Ok(Trace::new(Arc::new(SharedTrace { trace, names }), rejected.unbind()))
}

/// Compact statistics of a simulation as a dict of columns: per row (a step,
/// or a stretch of idle steps: see ``step`` and ``span``) and per request
/// (first prefill, first token and finish steps, -1 for rejected requests),
/// latency, counters and the steps the next prefill waited, by reason.
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
    let reqs = sim_requests(requests)?;
    let resolved = SchedulerConfig { inner: cfg.clone() };
    let st = run_simulation(py, "simulate_stats", |hook| core::simulate_stats(cfg, &reqs, steps, record_steps, hook))?;
    let d = PyDict::new(py);
    d.set_item("config", resolved)?;
    d.set_item("step", st.step)?;
    d.set_item("span", st.span)?;
    d.set_item("tkv", st.tkv)?;
    d.set_item("kind", st.kind.into_iter().map(u32::from).collect::<Vec<u32>>())?;
    d.set_item("n_running", st.n_running)?;
    d.set_item("n_waiting", st.n_waiting)?;
    d.set_item("n_paused", st.n_paused)?;
    d.set_item("n_reserved_blocks", st.n_reserved_blocks)?;
    d.set_item("n_used_blocks", st.n_used_blocks)?;
    d.set_item("n_cached_blocks", st.n_cached_blocks)?;
    d.set_item("computed_slots", st.computed_slots)?;
    d.set_item("padding_slots", st.padding_slots)?;
    let opt = |v: Option<u64>| v.map_or(-1, |s| s as i64);
    let times = &st.latency.times;
    d.set_item("admitted", times.iter().map(|t| opt(t.scheduled)).collect::<Vec<i64>>())?;
    d.set_item("first_token", times.iter().map(|t| opt(t.first_token)).collect::<Vec<i64>>())?;
    d.set_item("finished", times.iter().map(|t| opt(t.finished)).collect::<Vec<i64>>())?;
    d.set_item("latency", latency_dict(py, &st.latency.summary())?)?;
    let rejected: Vec<(String, String)> =
        st.rejected.iter().map(|(i, e)| (reqs[*i as usize].name(*i as usize), e.to_string())).collect();
    d.set_item("rejected", rejected)?;
    let waits = PyDict::new(py);
    for (why, count) in core::Rejection::ALL.iter().zip(st.waits) {
        waits.set_item(why.name(), count)?;
    }
    d.set_item("waits_by_reason", waits)?;
    d.set_item("counters", counters_dict(py, &st.counters)?)?;
    d.set_item("max_decode_volume", st.max_decode_volume)?;
    Ok(d)
}

/// Requests of a simulation: ``(arrival_step, prompt_len, max_tokens)``
/// tuples or dicts ``{"id", "arrival_step", "prompt_token_ids",
/// "max_tokens", "output_token_ids" (optional)}``.
fn sim_requests(requests: &Bound<'_, PyAny>) -> PyResult<Vec<core::SimRequest>> {
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
            reqs.push(core::SimRequest {
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
        reqs.push(core::SimRequest {
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

/// Keyword arguments popped by name (None: not given), and the rest.
type Popped<'py> = (Vec<Option<Bound<'py, PyAny>>>, Option<Bound<'py, PyDict>>);

/// Pops `names` out of the keyword arguments (a copy), returning them and the rest.
fn pop_kwargs<'py>(kwargs: Option<&Bound<'py, PyDict>>, names: &[&str]) -> PyResult<Popped<'py>> {
    let Some(k) = kwargs else { return Ok((names.iter().map(|_| None).collect(), None)) };
    let rest = k.copy()?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let v = rest.get_item(name)?;
        if v.is_some() {
            rest.del_item(name)?;
        }
        out.push(v.filter(|v| !v.is_none()));
    }
    Ok((out, Some(rest)))
}

pub(crate) fn router(
    py: Python<'_>,
    name: Option<&Bound<'_, PyAny>>,
    slack: Option<&Bound<'_, PyAny>>,
) -> PyResult<core::Router> {
    let name: String = match name {
        Some(v) => v.extract().map_err(|_| err(py, Kind::Config, "router must be a str"))?,
        None => "least-loaded".to_owned(),
    };
    let mut r = core::Router::parse(&name).ok_or_else(|| {
        err(py, Kind::Config, format!("router must be one of {}, got {name:?}", core::Router::NAMES.join(", ")))
    })?;
    if let (core::Router::PrefixAffinity { slack: s }, Some(v)) = (&mut r, slack) {
        *s = uint(v, "slack", U32, Kind::Config)? as u32;
    }
    Ok(r)
}

fn fleet_dict<'py>(py: Python<'py>, st: &core::FleetStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("steps", st.steps)?;
    d.set_item("latency", latency_dict(py, &st.latency)?)?;
    let steps = st.steps.max(1) as f64;
    let reps = st
        .replicas
        .iter()
        .map(|r| -> PyResult<Bound<'py, PyDict>> {
            let x = PyDict::new(py);
            x.set_item("requests", r.requests)?;
            x.set_item("busy_steps", r.busy_steps)?;
            x.set_item("utilisation", r.busy_steps as f64 / steps)?;
            x.set_item("mean_waiting", r.waiting_sum as f64 / (st.steps + 1) as f64)?;
            x.set_item("max_waiting", r.max_waiting)?;
            x.set_item("latency", latency_dict(py, &r.latency)?)?;
            x.set_item("counters", counters_dict(py, &r.counters)?)?;
            Ok(x)
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("replicas", reps)?;
    d.set_item(
        "assignment",
        st.assignment.iter().map(|&a| if a == u32::MAX { -1 } else { i64::from(a) }).collect::<Vec<i64>>(),
    )?;
    d.set_item("rejected", st.rejected.iter().map(|(i, e)| (*i, e.to_string())).collect::<Vec<(u32, String)>>())?;
    Ok(d)
}

/// Fleet sizing: ``simulate_fleet(requests, config, replicas=2, router="least-loaded")``
/// runs the workload through ``replicas`` schedulers of one configuration
/// behind a routing rule (``least-loaded``, ``round-robin``,
/// ``prefix-affinity`` with ``slack``), stepped together; returns a dict:
/// ``steps``, fleet ``latency`` (TTFT/ITL in steps), per replica (requests,
/// busy steps, utilisation, mean and max waiting, latency, counters), the
/// replica of each request (``assignment``, -1 rejected) and ``rejected``.
#[pyfunction]
#[pyo3(signature = (requests, *config, **kwargs))]
pub fn simulate_fleet<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let (got, rest) = pop_kwargs(kwargs, &["replicas", "router", "slack"])?;
    let replicas = match &got[0] {
        Some(v) => uint(v, "replicas", 1024, Kind::Config)? as usize,
        None => 2,
    };
    if replicas == 0 {
        return Err(err(py, Kind::Config, "replicas must be at least 1"));
    }
    let router = router(py, got[1].as_ref(), got[2].as_ref())?;
    let (cfg, steps, _) = split_kwargs(py, config, rest.as_ref())?;
    let reqs = sim_requests(requests)?;
    let st =
        run_simulation(py, "simulate_fleet", |hook| core::simulate_fleet(cfg, &reqs, replicas, router, steps, hook))?;
    fleet_dict(py, &st)
}

/// The fewest replicas (up to ``max_replicas``) whose fleet meets the p99
/// targets ``ttft_p99`` and ``itl_p99`` (steps) on ``requests``:
/// ``(replicas, stats)`` as ``simulate_fleet`` gives them, or None.
#[pyfunction]
#[pyo3(signature = (requests, *config, **kwargs))]
pub fn fleet_size<'py>(
    py: Python<'py>,
    requests: &Bound<'py, PyAny>,
    config: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Option<(usize, Bound<'py, PyDict>)>> {
    let (got, rest) = pop_kwargs(kwargs, &["router", "slack", "ttft_p99", "itl_p99", "max_replicas"])?;
    let router = router(py, got[0].as_ref(), got[1].as_ref())?;
    let target = |v: &Option<Bound<'_, PyAny>>, name: &str| -> PyResult<Option<f64>> {
        v.as_ref()
            .map(|v| v.extract::<f64>().map_err(|_| err(py, Kind::Config, format!("{name} must be a number of steps"))))
            .transpose()
    };
    let (ttft, itl) = (target(&got[2], "ttft_p99")?, target(&got[3], "itl_p99")?);
    let max = match &got[4] {
        Some(v) => uint(v, "max_replicas", 1024, Kind::Config)? as usize,
        None => 16,
    };
    let (cfg, _, _) = split_kwargs(py, config, rest.as_ref())?;
    let reqs = sim_requests(requests)?;
    let found = run_simulation(py, "fleet_size", |hook| core::fleet_size(&cfg, &reqs, router, ttft, itl, max, hook))?;
    found.map(|(n, st)| Ok((n, fleet_dict(py, &st)?))).transpose()
}
