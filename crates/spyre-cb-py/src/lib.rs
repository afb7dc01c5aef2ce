//! `spyre_cb._core`: a thin PyO3 layer over `spyre-cb-core`.
//!
//! No scheduling logic lives here: arguments are checked and converted
//! (`convert`), core errors become the exception classes this module defines
//! (`errors`), and core values become Python objects: the config (`config`),
//! observations (`records`), step plans (`plans`), the scheduler
//! (`scheduler`), simulations (`simulate`), a request's stop strings
//! (`text`), an encoder's batches (`pooling`) and a data-parallel
//! server's routing (`router`); and the
//! runner's CPU kernels over numpy views (`kernels`).

use pyo3::prelude::*;

use spyre_cb_core as core;

mod config;
mod convert;
mod errors;
mod kernels;
mod plans;
mod pooling;
mod records;
mod router;
mod scheduler;
mod simulate;
mod text;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::classes(m.py())?.register(m)?;
    m.add_class::<config::SchedulerConfig>()?;
    m.add_class::<scheduler::Scheduler>()?;
    m.add_class::<records::StepRecord>()?;
    m.add_class::<records::Trace>()?;
    m.add_class::<records::TraceIter>()?;
    // the names of the chunked policy's own classes before there was one of each
    m.add("ChunkedStepRecord", m.getattr("StepRecord")?)?;
    m.add("ChunkedTrace", m.getattr("Trace")?)?;
    m.add_class::<records::UpdateOutcome>()?;
    m.add_class::<records::RejectionReason>()?;
    m.add_class::<plans::PrefillPlan>()?;
    m.add_class::<plans::DecodePlan>()?;
    m.add_class::<plans::IdlePlan>()?;
    m.add_class::<plans::ChunkPlan>()?;
    m.add_class::<text::StopStringMatcher>()?;
    m.add_class::<router::Router>()?;
    m.add_function(wrap_pyfunction!(pooling::plan_pooling, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::simulate, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::simulate_stats, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::simulate_fleet, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::fleet_size, m)?)?;
    m.add_function(wrap_pyfunction!(simulate::synthetic_workload, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::paged_decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::paged_decode_attention_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::linear_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::pack_linear_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::linear_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::pack_linear_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::linear_f32_is_fast, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::packed_linear_len, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::linear_bf16_is_fast, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::share_openmp_workers, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::paged_decode_qkv_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::paged_decode_qkv_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::add_rms_norm_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::add_rms_norm_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::rms_norm_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::rms_norm_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::rope_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::rope_f32, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::openmp_workers_shared, m)?)?;
    m.add("BLOCK_SIZE", core::BLOCK_SIZE)?;
    m.add("NULL_BLOCK", core::NULL_BLOCK)?;
    m.add("MAX_AVAILABLE_BLOCKS", core::MAX_AVAILABLE_BLOCKS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
