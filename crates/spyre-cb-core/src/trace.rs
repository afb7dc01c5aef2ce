//! The observable state after a step: what the published step traces compare.

/// One observation of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StepRecord {
    pub step: u64,
    pub tkv: u32,
    /// Waiting ids in queue order.
    pub waiting: Vec<String>,
    /// Running ids, most recently admitted first.
    pub running: Vec<String>,
    /// Ids that produced a token in the last step (same order as running).
    pub request_outputs: Vec<String>,
    /// Ids that finished in the last step.
    pub finished_requests: Vec<String>,
    /// `available_blocks - n_unreserved_blocks`: blocks reserved by admitted requests.
    pub n_reserved_blocks: u32,
    /// Distinct blocks allocated.
    pub n_used_blocks: u32,
}
