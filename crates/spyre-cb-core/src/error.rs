//! Errors of the core, as data: the binding maps each kind to its typed
//! Python exception, and each message names the value and the limit it broke.

use std::fmt;

use crate::{BLOCK_SIZE, MAX_AVAILABLE_BLOCKS};

/// A configuration the scheduler cannot run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    MaxNumSeqs {
        got: u32,
    },
    MaxModelLen {
        got: u32,
    },
    /// More blocks than [`MAX_AVAILABLE_BLOCKS`] (given, or by default).
    TooManyBlocks {
        blocks: u64,
        defaulted: bool,
    },
    TooFewBlocks {
        blocks: u32,
        max_model_len: u32,
        blocks_per_seq: u32,
    },
    BatchTkvLimit {
        got: u64,
    },
    MaxModelLenChunked {
        got: u32,
    },
    ChunkSize {
        got: u32,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MaxNumSeqs { got } => write!(f, "max_num_seqs must be at least 1, got {got}"),
            Self::MaxModelLen { got } => {
                write!(f, "max_model_len must be a positive multiple of the block size {BLOCK_SIZE}, got {got}")
            }
            Self::TooManyBlocks { blocks, defaulted: true } => write!(
                f,
                "default available_blocks = max_num_seqs * max_model_len / {BLOCK_SIZE} = {blocks} exceeds the \
                 supported maximum {MAX_AVAILABLE_BLOCKS}: lower max_num_seqs or max_model_len, or give available_blocks"
            ),
            Self::TooManyBlocks { blocks, defaulted: false } => write!(
                f,
                "available_blocks = {blocks} exceeds the supported maximum {MAX_AVAILABLE_BLOCKS} ({} token slots)",
                u64::from(MAX_AVAILABLE_BLOCKS) * u64::from(BLOCK_SIZE)
            ),
            Self::TooFewBlocks { blocks, max_model_len, blocks_per_seq } => write!(
                f,
                "available_blocks {blocks} is fewer than one sequence of max_model_len {max_model_len} needs \
                 ({blocks_per_seq} blocks of {BLOCK_SIZE})"
            ),
            Self::BatchTkvLimit { got } => write!(f, "max_batch_tkv_limit must be at least 1, got {got}"),
            Self::MaxModelLenChunked { got } => write!(f, "max_model_len must be at least 2, got {got}"),
            Self::ChunkSize { got } => {
                write!(f, "chunk_size must be a positive multiple of the block size {BLOCK_SIZE}, got {got}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why a request was refused at `add_request`; the scheduler state is untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidRequest {
    EmptyPrompt,
    MaxTokensTooSmall {
        max_tokens: u32,
    },
    TooLong {
        prompt_len: u32,
        max_tokens: u32,
        max_model_len: u32,
    },
    TooManyBlocks {
        needed: u64,
        available_blocks: u32,
    },
    TooMuchVolume {
        volume: u64,
        limit: u64,
    },
    /// A beam search's width is 0 or more than `max_num_seqs`.
    BeamWidth {
        width: u32,
        max_num_seqs: u32,
    },
    /// The id belongs to a request that is waiting, running, or finished in
    /// the last step (its blocks return at the next step).
    DuplicateId {
        request_id: String,
        finishing: bool,
    },
}

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyPrompt => f.write_str("prompt is empty: a request needs at least 1 prompt token"),
            Self::MaxTokensTooSmall { max_tokens } => {
                write!(f, "max_tokens must be at least 1, got {max_tokens}")
            }
            Self::TooLong { prompt_len, max_tokens, max_model_len } => write!(
                f,
                "prompt of {prompt_len} tokens plus max_tokens {max_tokens} = {} exceeds max_model_len {max_model_len}",
                u64::from(*prompt_len) + u64::from(*max_tokens)
            ),
            Self::TooManyBlocks { needed, available_blocks } => write!(
                f,
                "request needs {needed} KV blocks even alone in a fresh batch, more than the {available_blocks} available_blocks"
            ),
            Self::TooMuchVolume { volume, limit } => write!(
                f,
                "request reaches batch x tkv = {volume} even alone in a fresh batch, above max_batch_tkv_limit {limit}"
            ),
            Self::BeamWidth { width, max_num_seqs } => write!(
                f,
                "beam width {width} must be in [1, max_num_seqs {max_num_seqs}]: every beam is a sequence of the batch"
            ),
            Self::DuplicateId { request_id, finishing: false } => {
                write!(f, "request id '{request_id}' is already in use by an unfinished request")
            }
            Self::DuplicateId { request_id, finishing: true } => write!(
                f,
                "request id '{request_id}' belongs to a request that finished in the last step (or was \
                 aborted since); it can be reused after the next step"
            ),
        }
    }
}

/// A call that does not fit the schedule -> execute -> update protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    ScheduleWhilePending,
    UpdateWithoutPlan,
    WrongTokenCount {
        expected: usize,
        tokens: usize,
        stop_flags: usize,
    },
    /// `update`'s beam parents do not fit the step: wrong count, or a
    /// sequence continuing one of another request.
    BadBeamParents {
        detail: String,
    },
    /// A bug: the pool ran dry although every allocation is reserved.
    PoolExhausted,
    /// An earlier call panicked; the state is unknown and the scheduler refuses further use.
    Poisoned {
        cause: String,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ScheduleWhilePending => {
                f.write_str("schedule called twice: call update() (or cancel()) for the pending plan first")
            }
            Self::UpdateWithoutPlan => f.write_str("update called without a pending plan: call schedule() first"),
            Self::WrongTokenCount { expected, tokens, stop_flags } => write!(
                f,
                "update expects {expected} tokens and {expected} (or 0) stop flags for this step, got {tokens} and {stop_flags}"
            ),
            Self::BadBeamParents { detail } => write!(f, "update's beam parents do not fit this step: {detail}"),
            Self::PoolExhausted => f.write_str("internal error: block pool exhausted despite reservations"),
            Self::Poisoned { cause } => write!(
                f,
                "the scheduler hit an internal error earlier ({cause}) and its state is unknown: build a new one"
            ),
        }
    }
}

/// Every failure a scheduler call can report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreError {
    Config(ConfigError),
    InvalidRequest(InvalidRequest),
    UnknownRequest { request_id: String },
    State(StateError),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::InvalidRequest(e) => e.fmt(f),
            Self::UnknownRequest { request_id } => {
                write!(f, "no unfinished request with id '{request_id}'")
            }
            Self::State(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CoreError {}

impl From<ConfigError> for CoreError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<InvalidRequest> for CoreError {
    fn from(e: InvalidRequest) -> Self {
        Self::InvalidRequest(e)
    }
}

impl From<StateError> for CoreError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}
