//! One request's scheduling state.

use std::sync::Arc;

use crate::block_pool::{BlockHash, BlockId};
use crate::config::BLOCK_SIZE;
use crate::error::StateError;

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// It generated `max_tokens` tokens.
    Length,
    /// A stop token, EOS, or a stop the caller flagged (a stop string).
    Stop,
    /// Aborted (by the caller, or because its step failed).
    Abort,
}

impl FinishReason {
    /// `"length"`, `"stop"` or `"abort"` (vLLM's and OpenAI's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Abort => "abort",
        }
    }
}

/// The tokens that end a request, applied by the core to every sampled token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopRule {
    /// Ids that end the request and are reported as its stop reason.
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence ids (empty when the request ignores EOS).
    pub eos_token_ids: Vec<u32>,
    /// Neither stops the request before it has this many tokens.
    pub min_tokens: u32,
}

impl StopRule {
    pub fn is_empty(&self) -> bool {
        self.stop_token_ids.is_empty() && self.eos_token_ids.is_empty()
    }
    /// Whether `token`, the request's `generated`-th token, ends it; and
    /// whether it is one of the stop ids (reported as the stop reason).
    pub fn check(&self, token: u32, generated: u32) -> (bool, bool) {
        if generated < self.min_tokens {
            return (false, false);
        }
        let by_id = self.stop_token_ids.contains(&token);
        (by_id || self.eos_token_ids.contains(&token), by_id)
    }
}

/// The checks every policy makes of a new request first: its id is free
/// (`in_use`: `Some(finishing)` when taken), its prompt is not empty, it asks
/// for at least one token and prompt + max_tokens fit `max_model_len`.
pub(crate) fn check_new_request(
    in_use: Option<bool>,
    request_id: &str,
    prompt_len: u32,
    max_tokens: u32,
    max_model_len: u32,
) -> Result<(), crate::error::InvalidRequest> {
    use crate::error::InvalidRequest;
    if let Some(finishing) = in_use {
        return Err(InvalidRequest::DuplicateId { request_id: request_id.to_owned(), finishing });
    }
    if prompt_len == 0 {
        return Err(InvalidRequest::EmptyPrompt);
    }
    if max_tokens < 1 {
        return Err(InvalidRequest::MaxTokensTooSmall { max_tokens });
    }
    if u64::from(prompt_len) + u64::from(max_tokens) > u64::from(max_model_len) {
        return Err(InvalidRequest::TooLong { prompt_len, max_tokens, max_model_len });
    }
    Ok(())
}

/// `update`'s argument check, shared by the policies: one token per sampling
/// sequence, and as many stop flags (or none).
pub(crate) fn check_token_count(expected: usize, tokens: &[u32], stopped: &[bool]) -> Result<(), StateError> {
    if tokens.len() != expected || (!stopped.is_empty() && stopped.len() != expected) {
        return Err(StateError::WrongTokenCount { expected, tokens: tokens.len(), stop_flags: stopped.len() });
    }
    Ok(())
}

/// How one sequence of a step ends, if it does: decided by the core from
/// its stop rule, `max_tokens` and the caller's stop flag.
pub(crate) fn finish_of(
    rule: Option<&StopRule>,
    token: u32,
    generated: u32,
    max_tokens: u32,
    flagged: bool,
) -> Option<(FinishReason, Option<u32>)> {
    let (by_rule, by_id) = rule.map_or((false, false), |r| r.check(token, generated));
    if flagged || by_rule {
        return Some((FinishReason::Stop, by_id.then_some(token)));
    }
    (generated >= max_tokens).then_some((FinishReason::Length, None))
}

/// A request known to the scheduler, waiting or running (or paused). The
/// fields every decode step reads (id, blocks, stop rule, counts, last
/// token, padding) come first: 64 bytes, so they share one or two cache
/// lines. (Aligning the struct to a line measured slower: it grows the
/// arena by a quarter.)
#[derive(Clone, Debug)]
#[repr(C)]
pub(crate) struct Request {
    pub id: Arc<str>,
    /// Allocated blocks: the block table, from the first block that is not
    /// fully padded.
    pub blocks: Vec<BlockId>,
    /// Stop tokens applied by the core (none: only max_tokens and flags end it).
    pub stop: Option<Box<StopRule>>,
    /// Tokens generated so far (the prefill produces the first).
    pub generated: u32,
    pub max_tokens: u32,
    /// The most recent generated token: the next decode's input.
    pub last_token: u32,
    /// Continuous policy: left padding in tokens, counted from virtual
    /// position 0 of the batch, fully padded (never allocated) blocks
    /// included. The sequence's tokens occupy positions `left_pad..tkv`.
    pub left_pad: u32,
    // ---- read at admission, by the chunked policy and by observers
    /// Prompt token ids, then (chunked policy) the generated ones; empty for
    /// token-less (simulation) requests. The continuous policy moves the
    /// prompt into the prefill plan and keeps only `last_token`.
    pub tokens: Vec<u32>,
    /// Chunked policy: tokens whose KV is in the cache (prompt positions from 0).
    pub computed: u32,
    pub prompt_len: u32,
    /// Blocks reserved (what counts as reserved is the policy's; see `kv`).
    pub reserved: u32,
    /// Caller's numeric tag (simulations: the request's index).
    pub tag: u32,
    /// Chunked policy: leading table blocks shared through a prefix hit (never written).
    pub n_shared: u32,
    /// Chunked policy: usable prefix hit in blocks (whole chunks skipped).
    pub usable_hit: u32,
    /// Chunked policy: consecutive steps paused.
    pub paused_steps: u32,
    /// Chunked policy: its first chunk ran.
    pub started: bool,
    /// Chunked policy: chain hashes of the table's cached full blocks, in order.
    pub hashes: Vec<BlockHash>,
    /// Beam search: the beams this request runs (1: an ordinary request).
    pub beam_width: u32,
    /// Beam search, on the request added: its other beams (running
    /// sequences under its id, right after it in the running list).
    pub beams: Vec<u32>,
    /// Beam search, on a beam the core made: the request it belongs to.
    pub member_of: Option<u32>,
}

impl Request {
    pub fn new(id: Arc<str>, tag: u32, tokens: Vec<u32>, prompt_len: u32, max_tokens: u32) -> Self {
        Self {
            id,
            tag,
            tokens,
            prompt_len,
            max_tokens,
            generated: 0,
            last_token: 0,
            blocks: Vec::new(),
            reserved: 0,
            stop: None,
            left_pad: 0,
            computed: 0,
            n_shared: 0,
            hashes: Vec::new(),
            usable_hit: 0,
            started: false,
            paused_steps: 0,
            beam_width: 1,
            beams: Vec::new(),
            member_of: None,
        }
    }

    /// A beam of `head`: its history (blocks, tokens, padding, counts) is
    /// given to it by the fork that follows its first token.
    pub fn beam_of(head: &Request, head_handle: u32) -> Self {
        let mut r = Self::new(head.id.clone(), head.tag, Vec::new(), head.prompt_len, head.max_tokens);
        r.member_of = Some(head_handle);
        r.beam_width = 0;
        r
    }

    /// Takes over `parent`'s history (its blocks are already counted for
    /// this request by the caller): what it computed, where it sits.
    pub fn continue_from(&mut self, parent: &Request, blocks: Vec<BlockId>) {
        self.blocks = blocks;
        self.left_pad = parent.left_pad;
        self.computed = parent.computed;
        self.generated = parent.generated;
        self.n_shared = parent.n_shared;
        self.usable_hit = parent.usable_hit;
        self.started = parent.started;
        self.tokens.clone_from(&parent.tokens);
        self.hashes.clone_from(&parent.hashes);
    }

    /// Leading blocks that hold nothing but padding (continuous policy).
    #[inline]
    pub fn fully_padded_blocks(&self) -> u32 {
        self.left_pad / BLOCK_SIZE
    }

    /// Decode steps still to run (and tokens still to generate).
    #[inline]
    pub fn remaining(&self) -> u32 {
        self.max_tokens - self.generated
    }

    /// A beam search's request or one of its beams.
    #[inline]
    pub fn in_beam_search(&self) -> bool {
        self.member_of.is_some() || self.beam_width > 1
    }

    /// It carries token ids (not a token-less simulation request).
    #[inline]
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }
}
