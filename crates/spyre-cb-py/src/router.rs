//! The data-parallel server's routing state: the core's `FleetRouter`.

use pyo3::prelude::*;

use spyre_cb_core as core;

use crate::convert::{uint, uint_list, U32};
use crate::errors::{err, Kind};
use crate::simulate::router;

/// ``Router(rule="least-loaded", replicas=2, capacity_blocks=..., slack=None)``:
/// the rule ``simulate_fleet`` routes by (``least-loaded``, ``round-robin``,
/// ``prefix-affinity`` within ``slack`` sequences of the least loaded), for a
/// server whose replicas run in other processes: ``route(loads, prompt)`` takes
/// each replica's outstanding sequences (None: down) and returns the replica's
/// index (None: all down). Prefix affinity estimates each replica's cache from
/// the prompts routed to it (at most ``capacity_blocks`` blocks each).
#[pyclass(module = "spyre_cb._core")]
pub struct Router {
    inner: core::FleetRouter,
    name: String,
}

#[pymethods]
impl Router {
    #[new]
    #[pyo3(signature = (rule=None, replicas=None, capacity_blocks=None, slack=None))]
    fn new(
        py: Python<'_>,
        rule: Option<&Bound<'_, PyAny>>,
        replicas: Option<&Bound<'_, PyAny>>,
        capacity_blocks: Option<&Bound<'_, PyAny>>,
        slack: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let rule_ = router(py, rule, slack)?;
        let n = match replicas {
            Some(v) => uint(v, "replicas", 1024, Kind::Config)? as usize,
            None => 2,
        };
        if n == 0 {
            return Err(err(py, Kind::Config, "replicas must be at least 1"));
        }
        let cap = match capacity_blocks {
            Some(v) => uint(v, "capacity_blocks", U32, Kind::Config)? as u32,
            None => core::MAX_AVAILABLE_BLOCKS,
        };
        let name = rule_.name().to_owned();
        Ok(Self { inner: core::FleetRouter::new(rule_, n, cap), name })
    }

    /// The rule's name.
    #[getter]
    fn rule(&self) -> &str {
        &self.name
    }

    #[getter]
    fn replicas(&self) -> usize {
        self.inner.replicas()
    }

    /// The replica for a request (its ``prompt`` token ids) given each replica's
    /// load (outstanding sequences; None: down). None when every replica is down.
    fn route(&mut self, py: Python<'_>, loads: Vec<Option<u64>>, prompt: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        if loads.len() != self.inner.replicas() {
            return Err(err(
                py,
                Kind::Config,
                format!("route needs one load per replica ({}), got {}", self.inner.replicas(), loads.len()),
            ));
        }
        // only prefix affinity reads the prompt (its conversion is most of a call's cost)
        let prompt = match self.inner.rule {
            core::Router::PrefixAffinity { .. } => uint_list(prompt, "prompt", U32, Kind::InvalidRequest)?,
            _ => Vec::new(),
        };
        Ok(self.inner.route(&loads, &prompt))
    }

    /// How many leading blocks of ``prompt`` replica ``replica`` is estimated to hold.
    fn cached_blocks(&self, py: Python<'_>, replica: usize, prompt: &Bound<'_, PyAny>) -> PyResult<u32> {
        self.check(py, replica)?;
        let prompt = uint_list(prompt, "prompt", U32, Kind::InvalidRequest)?;
        Ok(self.inner.cached_blocks(replica, &prompt))
    }

    /// Replica ``replica`` restarted: its estimated cache is empty.
    fn forget(&mut self, py: Python<'_>, replica: usize) -> PyResult<()> {
        self.check(py, replica)?;
        self.inner.forget(replica);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("Router(rule={:?}, replicas={})", self.name, self.inner.replicas())
    }
}

impl Router {
    fn check(&self, py: Python<'_>, replica: usize) -> PyResult<()> {
        if replica >= self.inner.replicas() {
            return Err(err(
                py,
                Kind::Config,
                format!("replica {replica} out of range (replicas: {})", self.inner.replicas()),
            ));
        }
        Ok(())
    }
}
