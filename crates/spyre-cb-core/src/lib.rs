//! Scheduling core of spyre_cb.
//!
//! A Spyre AIU runs static shapes only, so every sequence of the decode batch
//! is left-padded to end at one shared position, the batch `tkv`. This crate
//! owns all of the state that follows from that: the paged KV block pool, the
//! per-request padding and block tables, admission (`can_schedule`) and the
//! per-step plan a model runner executes. It has no Python in it; the
//! `spyre-cb-py` crate is a thin binding on top.
//!
//! One [`Scheduler`] speaks the protocol for both policies: a request table
//! ([`requests`]), a KV manager over one block pool with an optional prefix
//! cache ([`kv`]), and the configured policy's rules ([`continuous`] or
//! [`chunked`]) behind one interface. Data flows one way:
//! [`Scheduler::schedule`] returns a [`StepPlan`], the runner executes it,
//! and [`Scheduler::update`] takes the sampled tokens back.

pub mod admission;
pub mod block_pool;
pub(crate) mod chunked;
pub mod config;
pub(crate) mod continuous;
pub mod error;
pub mod fleet;
pub mod kv;
pub mod latency;
pub mod plan;
pub mod policy;
pub mod pooling;
pub mod record;
pub mod request;
pub mod requests;
pub mod scheduler;
pub mod simulate;
pub mod stop_strings;
pub mod volume;
pub mod workload;

pub use admission::{Admission, Rejection};
pub use block_pool::{BlockId, BlockPool, NULL_BLOCK};
pub use config::{ChunkOptions, Policy, SchedulerConfig};
pub use error::{ConfigError, CoreError, InvalidRequest, StateError};
pub use fleet::{fleet_size, simulate_fleet, FleetRouter, FleetStats, PrefixIndex, ReplicaStats, Router};
pub use kv::KvManager;
pub use latency::{LatencySummary, LatencyTracker, RequestTimes, Summary};
pub use plan::{ChunkPlan, DecodePlan, PrefillPlan, StepPlan};
pub use pooling::{plan_pooling, PoolingBatch, PoolingError};
pub use record::{ChunkedState, Counters, StepRecord};
pub use request::{FinishReason, StopRule};
pub use requests::RequestRef;
pub use scheduler::{PlanDetail, Scheduler, UpdateOutcome};
pub use simulate::{
    drive, simulate, simulate_stats, simulate_trace, CompactRecord, Interrupted, Recorder, SimRequest, SimStats, Trace,
    NO_MATCH_TOKEN,
};
pub use stop_strings::{StopMatch, StopStrings};

/// KV-cache slots per block (a Spyre constraint).
pub const BLOCK_SIZE: u32 = 64;

/// Most usable KV blocks a pool may have: 2^24 blocks of 64 slots is 2^30
/// token slots, far beyond any accelerator's memory, while the pool's own
/// bookkeeping for it stays below 100 MB.
pub const MAX_AVAILABLE_BLOCKS: u32 = 1 << 24;

/// `ceil(a / b)` for unsigned integers.
#[inline]
pub(crate) fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}
