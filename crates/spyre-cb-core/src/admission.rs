//! Admission: may the head of the waiting queue join the running batch now?
//!
//! A pure function of the current state, so it can be tested rule by rule.
//! The five conditions are those of `docs/design.md`; every admitted request is
//! guaranteed the context and blocks of its worst case, so nothing is ever
//! preempted.

use crate::config::{SchedulerConfig, BLOCK_SIZE};
use crate::div_ceil;

const B: u64 = BLOCK_SIZE as u64;

/// The state admission looks at (after this step's frees and padding reduction).
#[derive(Clone, Copy, Debug)]
pub struct BatchView<'a> {
    /// Current batch tkv (meaningless when nothing runs).
    pub tkv: u32,
    /// Tokens each running request may still generate.
    pub running_remaining: &'a [u32],
    pub n_unreserved_blocks: u32,
    pub admitted_this_step: u32,
}

/// A positive admission decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Batch tkv once the request is prefilled.
    pub tkv: u32,
    /// How far the running sequences move right (a multiple of 64).
    pub shift: u32,
    /// Whether the request starts a fresh batch.
    pub new_batch: bool,
    /// Blocks reserved for the request's worst case.
    pub reserved: u32,
}

/// Why the next prefill (the head of the queue, or the chunked policy's
/// next chunk) did not run in the last step: one vocabulary for both
/// policies (the continuous policy's five conditions, then the chunked
/// policy's own two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// 1: the batch is full (max_num_seqs).
    BatchFull,
    /// 2: one prefill per step.
    PrefillTaken,
    /// 3: the request's tokens would not fit before `max_model_len`.
    NoRoomForTokens,
    /// 3: the shift would push a running request past `max_model_len`.
    ShiftOverflowsRunning,
    /// 4: not enough unreserved blocks.
    NotEnoughBlocks,
    /// 5: batch x tkv would exceed the volumetric limit at some future step.
    VolumeLimit,
    /// Chunked, interleaving: a decode step must run between two prefill chunks.
    Interleave,
    /// Chunked, decode pausing: paused decodes resume before any prefill.
    PausedDecodes,
}

impl Rejection {
    /// Every reason, continuous conditions first.
    pub const ALL: [Rejection; 8] = [
        Rejection::BatchFull,
        Rejection::PrefillTaken,
        Rejection::NoRoomForTokens,
        Rejection::ShiftOverflowsRunning,
        Rejection::NotEnoughBlocks,
        Rejection::VolumeLimit,
        Rejection::Interleave,
        Rejection::PausedDecodes,
    ];

    /// Position in [`Rejection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name Python sees (`RejectionReason.BATCH_FULL`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::BatchFull => "BATCH_FULL",
            Rejection::PrefillTaken => "PREFILL_TAKEN",
            Rejection::NoRoomForTokens => "NO_ROOM_FOR_TOKENS",
            Rejection::ShiftOverflowsRunning => "SHIFT_OVERFLOWS_RUNNING",
            Rejection::NotEnoughBlocks => "NOT_ENOUGH_BLOCKS",
            Rejection::VolumeLimit => "VOLUME_LIMIT",
            Rejection::Interleave => "INTERLEAVE",
            Rejection::PausedDecodes => "PAUSED_DECODES",
        }
    }
}

/// tkv at which a request alone in a fresh batch starts: its prompt rounded up
/// to a block boundary, unless that leaves no room for `max_tokens` (then the
/// prompt length itself, with the prefill right-padded).
pub fn new_batch_tkv(cfg: &SchedulerConfig, prompt_len: u32, max_tokens: u32) -> u32 {
    let aligned = div_ceil(u64::from(prompt_len), B) * B;
    if aligned + u64::from(max_tokens) > u64::from(cfg.max_model_len) {
        prompt_len
    } else {
        aligned as u32
    }
}

/// Blocks a request reserves when it is prefilled at batch tkv `tkv`:
/// `ceil((tkv + max_tokens - 1) / 64) - floor((tkv - prompt_len) / 64)`.
pub fn reserved_blocks(tkv: u32, prompt_len: u32, max_tokens: u32) -> u64 {
    let last = u64::from(tkv) + u64::from(max_tokens) - 1;
    div_ceil(last, B) - u64::from(tkv - prompt_len) / B
}

/// Largest batch x tkv from now until the joining request finishes
/// (condition 5's staircase walk, [`crate::volume::peak_volume`]).
pub fn peak_volume(tkv: u32, running_remaining: &[u32], max_tokens: u32) -> u64 {
    peak_volume_with(tkv, running_remaining, max_tokens, 1, &mut Vec::new())
}

/// The staircase with `width` rows joining (a beam search's beams end together).
fn peak_volume_with(tkv: u32, running_remaining: &[u32], max_tokens: u32, width: u32, ends: &mut Vec<u64>) -> u64 {
    let end_new = u64::from(tkv) + u64::from(max_tokens) - 1;
    ends.clear();
    ends.extend(running_remaining.iter().map(|&r| u64::from(tkv) + u64::from(r)));
    // the other beams end with the joining one: rows of the last stair
    ends.extend(std::iter::repeat_n(end_new, width.saturating_sub(1) as usize));
    crate::volume::peak_volume(ends, end_new, true)
}

/// `can_schedule` for one request against the current batch.
pub fn can_schedule(
    cfg: &SchedulerConfig,
    view: &BatchView<'_>,
    prompt_len: u32,
    max_tokens: u32,
) -> Result<Admission, Rejection> {
    can_schedule_with(cfg, view, prompt_len, max_tokens, &mut Vec::new())
}

/// [`can_schedule`] with a reusable buffer (no allocation per call).
#[inline]
pub fn can_schedule_with(
    cfg: &SchedulerConfig,
    view: &BatchView<'_>,
    prompt_len: u32,
    max_tokens: u32,
    scratch: &mut Vec<u64>,
) -> Result<Admission, Rejection> {
    can_schedule_beams(cfg, view, prompt_len, max_tokens, 1, scratch)
}

/// [`can_schedule`] for a request of `width` beams: each beam is a sequence
/// of the batch (condition 1 counts `width`, condition 5's staircase has
/// `width` rows ending with the request) and reserves the worst case of one
/// sequence (condition 4 counts `width` reservations, as if no beam shared
/// a block). `Admission::reserved` is one beam's.
pub fn can_schedule_beams(
    cfg: &SchedulerConfig,
    view: &BatchView<'_>,
    prompt_len: u32,
    max_tokens: u32,
    width: u32,
    scratch: &mut Vec<u64>,
) -> Result<Admission, Rejection> {
    let n_running = view.running_remaining.len() as u64;
    let w = u64::from(width);
    if n_running + u64::from(view.admitted_this_step) + w > u64::from(cfg.max_num_seqs) {
        return Err(Rejection::BatchFull);
    }
    if view.admitted_this_step >= 1 {
        return Err(Rejection::PrefillTaken);
    }
    if n_running == 0 {
        let tkv = new_batch_tkv(cfg, prompt_len, max_tokens);
        let reserved = reserved_blocks(tkv, prompt_len, max_tokens);
        // Validation at add_request guarantees this; keep the pool honest anyway.
        if reserved * w > u64::from(view.n_unreserved_blocks) {
            return Err(Rejection::NotEnoughBlocks);
        }
        return Ok(Admission { tkv, shift: 0, new_batch: true, reserved: reserved as u32 });
    }
    let mml = u64::from(cfg.max_model_len);
    let tkv = u64::from(view.tkv);
    let shift = if u64::from(prompt_len) > tkv { div_ceil(u64::from(prompt_len) - tkv, B) * B } else { 0 };
    let new_tkv = tkv + shift;
    if new_tkv > mml || u64::from(max_tokens) > mml - new_tkv {
        return Err(Rejection::NoRoomForTokens);
    }
    if shift > 0 && view.running_remaining.iter().any(|&r| u64::from(r) > mml - new_tkv) {
        return Err(Rejection::ShiftOverflowsRunning);
    }
    let new_tkv = new_tkv as u32;
    let reserved = reserved_blocks(new_tkv, prompt_len, max_tokens);
    if reserved * w > u64::from(view.n_unreserved_blocks) {
        return Err(Rejection::NotEnoughBlocks);
    }
    if peak_volume_with(new_tkv, view.running_remaining, max_tokens, width, scratch) > cfg.max_batch_tkv_limit {
        return Err(Rejection::VolumeLimit);
    }
    Ok(Admission { tkv: new_tkv, shift: shift as u32, new_batch: false, reserved: reserved as u32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seqs: u32, mml: u32, blocks: Option<u32>, limit: Option<u64>) -> SchedulerConfig {
        SchedulerConfig::new(seqs, mml, blocks, limit).unwrap()
    }

    fn view(tkv: u32, rem: &[u32], free: u32) -> BatchView<'_> {
        BatchView { tkv, running_remaining: rem, n_unreserved_blocks: free, admitted_this_step: 0 }
    }

    #[test]
    fn new_batch_aligns_unless_it_leaves_no_room() {
        let c = cfg(2, 128, None, None);
        assert_eq!(new_batch_tkv(&c, 49, 10), 64);
        assert_eq!(new_batch_tkv(&c, 64, 64), 64);
        // 128 + 4 > 128: start at the prompt length instead.
        assert_eq!(new_batch_tkv(&c, 70, 4), 70);
        assert_eq!(new_batch_tkv(&c, 65, 63), 65);
    }

    #[test]
    fn reservation_skips_fully_padded_blocks() {
        // prompt 9 joining at tkv 128, 3 tokens: blocks 1..=2 of 0..=2
        assert_eq!(reserved_blocks(128, 9, 3), 2);
        assert_eq!(reserved_blocks(64, 49, 60), 2);
        assert_eq!(reserved_blocks(94, 89, 37), 3);
        assert_eq!(reserved_blocks(73, 5, 2), 1);
    }

    #[test]
    fn condition_1_batch_full() {
        let c = cfg(2, 256, None, None);
        assert_eq!(can_schedule(&c, &view(64, &[5, 5], 8), 10, 2), Err(Rejection::BatchFull));
        let mut v = view(64, &[5], 8);
        v.admitted_this_step = 1;
        assert_eq!(can_schedule(&c, &v, 10, 2), Err(Rejection::BatchFull));
    }

    #[test]
    fn condition_2_one_prefill_per_step() {
        let c = cfg(4, 256, None, None);
        let mut v = view(64, &[5], 16);
        v.admitted_this_step = 1;
        assert_eq!(can_schedule(&c, &v, 10, 2), Err(Rejection::PrefillTaken));
    }

    #[test]
    fn condition_3_tokens_must_fit() {
        // published: 78 + 55 > 128
        let c = cfg(2, 128, None, None);
        assert_eq!(can_schedule(&c, &view(78, &[2], 2), 30, 55), Err(Rejection::NoRoomForTokens));
        assert!(can_schedule(&c, &view(73, &[2], 2), 30, 55).is_ok());
    }

    #[test]
    fn condition_3_shift_must_not_push_running_past_the_end() {
        // published: seq 0 (66 tokens left) cannot move to 128 when max_model_len is 192
        let c = cfg(2, 192, None, None);
        assert_eq!(can_schedule(&c, &view(64, &[66], 4), 70, 50), Err(Rejection::ShiftOverflowsRunning));
        // without a shift the running request's tokens are not re-checked
        assert!(can_schedule(&c, &view(70, &[61], 4), 70, 50).is_ok());
    }

    #[test]
    fn condition_4_blocks() {
        let c = cfg(4, 128, Some(4), None);
        assert_eq!(can_schedule(&c, &view(64, &[3, 3], 0), 10, 3), Err(Rejection::NotEnoughBlocks));
        assert!(can_schedule(&c, &view(64, &[3, 3], 2), 10, 3).is_ok());
    }

    #[test]
    fn condition_5_volume_staircase() {
        // published: 2 * (128 + 1) = 258
        let c = cfg(2, 192, None, Some(257));
        assert_eq!(can_schedule(&c, &view(64, &[1], 4), 65, 2), Err(Rejection::VolumeLimit));
        let c = cfg(2, 192, None, Some(258));
        let a = can_schedule(&c, &view(64, &[1], 4), 65, 2).unwrap();
        assert_eq!(a, Admission { tkv: 128, shift: 64, new_batch: false, reserved: 3 });
    }

    #[test]
    fn beams_count_as_sequences_reservations_and_rows() {
        let c = cfg(4, 256, Some(12), None);
        // 2 running + 3 beams > 4 sequences
        assert_eq!(
            can_schedule_beams(&c, &view(64, &[5, 5], 12), 10, 2, 3, &mut Vec::new()),
            Err(Rejection::BatchFull)
        );
        // 2 beams of 2 blocks each need 4 unreserved blocks
        assert_eq!(
            can_schedule_beams(&c, &view(64, &[5], 3), 10, 64, 2, &mut Vec::new()),
            Err(Rejection::NotEnoughBlocks)
        );
        assert!(can_schedule_beams(&c, &view(64, &[5], 4), 10, 64, 2, &mut Vec::new()).is_ok());
        // volume: 3 rows until the running one ends at 69, then 2 beams to 64 + 100 - 1
        let c = cfg(4, 256, None, Some(2 * 163));
        let a = can_schedule_beams(&c, &view(64, &[5], 8), 10, 100, 2, &mut Vec::new()).unwrap();
        assert_eq!(a.reserved, 3);
        let c = cfg(4, 256, None, Some(2 * 163 - 1));
        assert_eq!(
            can_schedule_beams(&c, &view(64, &[5], 8), 10, 100, 2, &mut Vec::new()),
            Err(Rejection::VolumeLimit)
        );
    }

    #[test]
    fn peak_volume_walks_shrinking_batch() {
        // running ends at 110 and 300, new ends at 200: max(3*110, 2*200)
        assert_eq!(peak_volume(100, &[10, 200], 101), 400);
        // a running request that ends after the new one does not shrink the batch
        assert_eq!(peak_volume(100, &[500], 11), 2 * 110);
        // batch of three all longer than new
        assert_eq!(peak_volume(64, &[100, 100], 2), 3 * 65);
        // running request ends first and is much shorter: peak is later with b=1
        // peak is later with b=1: 64 + 199 = 263 beats 2 * 65 = 130
        assert_eq!(peak_volume(64, &[1], 200), 64 + 199);
    }
}
