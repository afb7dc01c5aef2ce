//! Errors of the core. The binding maps each to a typed Python exception.

use std::fmt;

/// A configuration the engine cannot run with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(message: String) -> Self {
        Self { message }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why a request was refused at `add_request`; the scheduler state is untouched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidRequest {
    EmptyPrompt,
    MaxTokensTooSmall { max_tokens: u32 },
    TooLong { prompt_len: u32, max_tokens: u32, max_model_len: u32 },
    TooManyBlocks { needed: u64, n_blocks: u32 },
    TooMuchVolume { volume: u64, limit: u64 },
    DuplicateId { request_id: String },
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
            Self::TooManyBlocks { needed, n_blocks } => write!(
                f,
                "request needs {needed} KV blocks even alone in a fresh batch, more than the {n_blocks} available_blocks"
            ),
            Self::TooMuchVolume { volume, limit } => write!(
                f,
                "request reaches batch x tkv = {volume} even alone in a fresh batch, above max_batch_tkv_limit {limit}"
            ),
            Self::DuplicateId { request_id } => {
                write!(f, "request id '{request_id}' is already in use by an unfinished request")
            }
        }
    }
}

/// Every failure a scheduler call can report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreError {
    Config(ConfigError),
    InvalidRequest(InvalidRequest),
    UnknownRequest { request_id: String },
    /// The call does not fit the schedule/update protocol (e.g. `update`
    /// without a pending plan, or with the wrong number of tokens).
    State(String),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::InvalidRequest(e) => e.fmt(f),
            Self::UnknownRequest { request_id } => {
                write!(f, "no unfinished request with id '{request_id}'")
            }
            Self::State(m) => f.write_str(m),
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
