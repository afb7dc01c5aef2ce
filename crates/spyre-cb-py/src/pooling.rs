//! Batches of an encoder (pooling) model's requests (`spyre_cb_core::pooling`).

use pyo3::prelude::*;

use crate::config::SchedulerConfig;
use crate::convert::{uint_list, U32};
use crate::core;
use crate::errors::{err, Kind};

/// The batches that run requests of `lengths` tokens (in arrival order) under
/// `config`'s limits: a list of `(indices, padded_len)`; every row is
/// right-padded to `padded_len`, a multiple of the block size.
#[pyfunction]
pub fn plan_pooling(
    py: Python<'_>,
    lengths: &Bound<'_, PyAny>,
    config: &SchedulerConfig,
) -> PyResult<Vec<(Vec<usize>, u32)>> {
    let lengths = uint_list(lengths, "lengths", U32, Kind::InvalidRequest)?;
    let c = &config.inner;
    let plan = core::plan_pooling(&lengths, c.max_num_seqs, c.max_batch_tkv_limit, c.max_model_len).map_err(|e| {
        let kind = match e {
            core::PoolingError::Limits { .. } => Kind::Config,
            _ => Kind::InvalidRequest,
        };
        err(py, kind, e.to_string())
    })?;
    Ok(plan.into_iter().map(|b| (b.rows, b.padded_len)).collect())
}
