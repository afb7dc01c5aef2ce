//! Scheduling core of spyre_cb.
//!
//! A Spyre AIU runs static shapes only, so every sequence of the decode batch
//! is left-padded to end at one shared position, the batch `tkv`. This crate
//! owns all of the state that follows from that: the paged KV block pool, the
//! per-request padding and block tables, admission (`can_schedule`) and the
//! per-step plan a model runner executes. It has no Python in it; the
//! `spyre-cb-py` crate is a thin binding on top.
//!
//! Data flows one way: [`Scheduler::schedule`] returns a [`StepPlan`], the
//! runner executes it, and [`Scheduler::update`] takes the sampled tokens back.

pub mod admission;
pub mod block_cache;
pub mod block_pool;
pub mod chunked;
pub mod chunked_sim;
pub mod config;
pub mod error;
pub mod plan;
pub mod request;
pub mod scheduler;
pub mod simulate;
pub mod trace;
pub mod workload;

pub use admission::{Admission, Rejection};
pub use block_cache::BlockCache;
pub use block_pool::{BlockId, BlockPool, NULL_BLOCK};
pub use chunked::{ChunkRejection, ChunkedRecord, ChunkedScheduler, Counters};
pub use chunked_sim::{
    simulate_chunked, ChunkedSimRequest, ChunkedSimResult, LatencySummary, LatencyTracker, RequestTimes, Summary,
    NO_MATCH_TOKEN,
};
pub use config::{ChunkOptions, Policy, SchedulerConfig, BLOCK_SIZE, MAX_AVAILABLE_BLOCKS};
pub use error::{ConfigError, CoreError, InvalidRequest, StateError};
pub use plan::{ChunkPlan, DecodePlan, PrefillPlan, StepPlan};
pub use request::{FinishReason, StopRule};
pub use scheduler::{PlanDetail, RequestRef, Scheduler, UpdateOutcome};
pub use simulate::{
    drive, simulate, simulate_compact, simulate_stats, CompactRecord, CompactTrace, Interrupted, Recorder, SimRequest,
    SimResult, SimStats,
};
pub use trace::StepRecord;

/// `ceil(a / b)` for unsigned integers.
#[inline]
pub(crate) fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}
