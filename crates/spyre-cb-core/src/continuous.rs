//! The continuous policy: one shared batch tkv, whole-prompt prefills.
//!
//! Before each step whole blocks of left padding common to every running
//! sequence are dropped; then the head of the queue joins if the five
//! conditions of [`crate::admission`] hold (a prefill, alone in its step),
//! else every running request decodes, else the step is idle. Blocks of a
//! request that leaves return at the start of the next step.

use crate::admission::{self, Admission, BatchView};
use crate::block_pool::NULL_BLOCK;
use crate::config::{SchedulerConfig, BLOCK_SIZE};
use crate::error::CoreError;
use crate::plan::{DecodePlan, PrefillPlan, StepPlan};
use crate::policy::{Core, PlanDetail, Rules};
use crate::request::Request;
use crate::requests::Handle;

const B: u32 = BLOCK_SIZE;

#[derive(Clone, Debug, Default)]
pub(crate) struct Continuous {
    tkv: u32,
    /// The pending step is a decode (its `update` moves tkv on).
    decoding: bool,
    /// Reused buffers (no allocation per step).
    scratch_remaining: Vec<u32>,
    scratch_ends: Vec<u64>,
}

impl Rules for Continuous {
    fn alone(&self, cfg: &SchedulerConfig, prompt_len: u32, max_tokens: u32) -> (u64, u64) {
        let start = admission::new_batch_tkv(cfg, prompt_len, max_tokens);
        (admission::reserved_blocks(start, prompt_len, max_tokens), u64::from(start) + u64::from(max_tokens) - 1)
    }

    fn defers_release(&self) -> bool {
        true
    }

    fn keeps_tokens(&self) -> bool {
        false
    }

    fn tkv(&self) -> u32 {
        self.tkv
    }

    #[inline] // into the scheduler's schedule_with: the large plan is then built where it is returned
    fn plan(&mut self, core: &mut Core, detail: PlanDetail) -> Result<StepPlan, CoreError> {
        if core.reqs.running.is_empty() {
            self.tkv = 0;
        }
        self.reduce_left_padding(core);
        self.decoding = false;
        if let Some(&head) = core.reqs.waiting.front() {
            let mut remaining = std::mem::take(&mut self.scratch_remaining);
            remaining.clear();
            remaining.extend(core.reqs.running.iter().map(|&h| core.reqs.get(h).remaining()));
            let view = BatchView {
                tkv: self.tkv,
                running_remaining: &remaining,
                n_unreserved_blocks: core.kv.n_unreserved(),
                admitted_this_step: 0,
            };
            let (pl, mt, width) = {
                let r = core.reqs.get(head);
                (r.prompt_len, r.max_tokens, r.beam_width)
            };
            let decision = admission::can_schedule_beams(&core.cfg, &view, pl, mt, width, &mut self.scratch_ends);
            self.scratch_remaining = remaining;
            match decision {
                Ok(adm) => {
                    let plan = self.prefill(core, head, adm, detail)?;
                    core.reqs.waiting.pop_front();
                    core.reqs.running.insert(0, head);
                    core.reqs.outputs.push(head);
                    if width > 1 {
                        core.spawn_beams(head, adm.reserved);
                    }
                    return Ok(StepPlan::Prefill(plan));
                }
                Err(why) => core.last_rejection = Some(why),
            }
        }
        if core.reqs.running.is_empty() {
            self.tkv = 0;
            return Ok(StepPlan::Idle);
        }
        // built in place (no copy of the plan into the enum)
        let mut out = StepPlan::Decode(DecodePlan::empty(core.reqs.running.len() as u32, self.tkv));
        let StepPlan::Decode(plan) = &mut out else { unreachable!() };
        self.decode(core, detail, plan)?;
        core.reqs.outputs.extend_from_slice(&core.reqs.running);
        self.decoding = true;
        Ok(out)
    }

    fn commit(&mut self, _core: &mut Core) {
        if std::mem::take(&mut self.decoding) {
            self.tkv += 1;
        }
    }

    fn victims(&mut self, core: &mut Core) -> Vec<Handle> {
        self.decoding = false;
        std::mem::take(&mut core.reqs.outputs)
    }

    fn leave(&mut self, _h: Handle) {}

    fn skip_idle(&mut self) {
        self.tkv = 0;
    }

    fn decode_padding(&self, core: &Core) -> u64 {
        core.reqs.running.iter().map(|&h| u64::from(core.reqs.get(h).left_pad)).sum()
    }

    fn next_write_index(&self, r: &Request) -> u32 {
        // tkv is where the next decode writes (moved on by the commit)
        self.tkv / B - r.fully_padded_blocks()
    }

    fn check(&self, core: &Core) -> Result<(), String> {
        let cfg = &core.cfg;
        if self.tkv > cfg.max_model_len {
            return Err(format!("tkv {} > max_model_len {}", self.tkv, cfg.max_model_len));
        }
        for &h in core.reqs.running.iter().chain(core.reqs.gone.iter()) {
            let r = core.reqs.get(h);
            if r.blocks.len() as u32 > r.reserved {
                return Err(format!("request {}: {} blocks used > {} reserved", r.id, r.blocks.len(), r.reserved));
            }
        }
        for &h in &core.reqs.running {
            let r = core.reqs.get(h);
            if r.left_pad > self.tkv {
                return Err(format!("request {}: left padding {} > tkv {}", r.id, r.left_pad, self.tkv));
            }
            let real = self.tkv - r.left_pad;
            // prompt tokens plus every generated token but the newest are in the cache
            if real != r.prompt_len + r.generated - 1 {
                return Err(format!(
                    "request {}: {} real positions but {} prompt + {} generated",
                    r.id, real, r.prompt_len, r.generated
                ));
            }
            let need = self.tkv.div_ceil(B) - r.fully_padded_blocks();
            if r.blocks.len() as u32 != need {
                return Err(format!("request {}: {} blocks for {need} needed", r.id, r.blocks.len()));
            }
        }
        Ok(())
    }
}

impl Continuous {
    #[inline]
    fn reduce_left_padding(&mut self, core: &mut Core) {
        let reqs = &mut core.reqs;
        let Some(min_fp) = reqs.running.iter().map(|&h| reqs.get(h).fully_padded_blocks()).min() else {
            return;
        };
        if min_fp == 0 {
            return;
        }
        let cut = min_fp * B;
        for i in 0..reqs.running.len() {
            let h = reqs.running[i];
            reqs.get_mut(h).left_pad -= cut;
        }
        self.tkv -= cut;
    }

    fn prefill(
        &mut self,
        core: &mut Core,
        h: Handle,
        adm: Admission,
        detail: PlanDetail,
    ) -> Result<PrefillPlan, CoreError> {
        // decide, then mutate: every check before the first change
        let prompt_len = core.reqs.get(h).prompt_len;
        let fp = (adm.tkv - prompt_len) / B;
        core.kv.ensure_free(adm.tkv.div_ceil(B) - fp)?;
        if adm.shift > 0 {
            for i in 0..core.reqs.running.len() {
                let rh = core.reqs.running[i];
                core.reqs.get_mut(rh).left_pad += adm.shift;
            }
        }
        self.tkv = adm.tkv;
        let tkv = adm.tkv;
        let pl = prompt_len;
        let left_pad = tkv - pl;
        let fp = left_pad / B;
        let in_left = left_pad - fp * B;
        let n_alloc = tkv.div_ceil(B) - fp;
        let input_len = n_alloc * B;
        let right = input_len - in_left - pl;
        let mut blocks = Vec::with_capacity(n_alloc as usize);
        for _ in 0..n_alloc {
            blocks.push(core.kv.allocate());
        }
        core.kv.reserve(adm.reserved);
        let prompt = {
            let r = core.reqs.get_mut(h);
            r.left_pad = left_pad;
            r.reserved = adm.reserved;
            r.blocks = blocks.clone();
            std::mem::take(&mut r.tokens)
        };

        let full = detail == PlanDetail::Full;
        let mut input_ids = Vec::new();
        let mut positions = Vec::new();
        let mut slot_mapping = Vec::new();
        if full {
            if !prompt.is_empty() {
                input_ids.reserve(input_len as usize);
                input_ids.resize(in_left as usize, 0);
                input_ids.extend_from_slice(&prompt);
                input_ids.resize(input_len as usize, 0);
            }
            positions.reserve(input_len as usize);
            positions.resize(in_left as usize, 0);
            positions.extend(0..pl);
            positions.resize(input_len as usize, 0);
            slot_mapping =
                (0..input_len).map(|i| i64::from(blocks[(i / B) as usize]) * i64::from(B) + i64::from(i % B)).collect();
        }
        Ok(PrefillPlan {
            request_id: core.reqs.get(h).id.clone(),
            tkv,
            tkv_shift: adm.shift,
            new_batch: adm.new_batch,
            prompt_len: pl,
            left_padding: in_left,
            right_padding: right,
            input_ids,
            positions,
            slot_mapping,
            block_table: if full { blocks } else { Vec::new() },
            logits_index: in_left + pl - 1,
            block_copies: Vec::new(),
        })
    }

    /// Every running request decodes, most recently admitted first.
    #[inline]
    fn decode(&mut self, core: &mut Core, detail: PlanDetail, plan: &mut DecodePlan) -> Result<(), CoreError> {
        let pos = self.tkv;
        let reqs = &mut core.reqs;
        let n = reqs.running.len();
        // decide, then mutate: the sequences that start a new block this step
        let new_blocks = reqs
            .running
            .iter()
            .filter(|&&h| {
                let r = reqs.get(h);
                pos / B - r.fully_padded_blocks() >= r.blocks.len() as u32
            })
            .count();
        core.kv.ensure_free(new_blocks as u32)?;
        let full = detail == PlanDetail::Full;
        let ids = detail != PlanDetail::Minimal;
        if ids {
            plan.request_ids.reserve(n);
        }
        if full {
            plan.input_ids.reserve(n);
            plan.positions.reserve(n);
            plan.slot_mapping.reserve(n);
            plan.left_padding.reserve(n);
            plan.current_tkv.reserve(n);
        }
        for i in 0..n {
            let h = reqs.running[i];
            let (fp, nb) = {
                let r = reqs.get(h);
                (r.fully_padded_blocks(), r.blocks.len() as u32)
            };
            let idx = pos / B - fp;
            if idx >= nb {
                debug_assert_eq!(idx, nb, "a decode never skips a block");
                let b = core.kv.allocate();
                let r = reqs.get_mut(h);
                debug_assert!(r.blocks.len() < r.reserved as usize, "allocation beyond reservation");
                r.blocks.push(b);
            }
            let r = reqs.get(h);
            if ids {
                plan.request_ids.push(r.id.clone());
            }
            if full {
                let base = fp * B;
                plan.input_ids.push(r.last_token);
                plan.positions.push(pos - r.left_pad);
                plan.slot_mapping.push(i64::from(r.blocks[idx as usize]) * i64::from(B) + i64::from(pos % B));
                plan.left_padding.push(r.left_pad - base);
                plan.current_tkv.push(pos + 1 - base);
            }
        }
        if full {
            let width = reqs.running.iter().map(|&h| reqs.get(h).blocks.len()).max().unwrap_or(0);
            plan.width = width as u32;
            plan.block_table.reserve(width * n);
            for &h in &reqs.running {
                let r = reqs.get(h);
                plan.block_table.extend_from_slice(&r.blocks);
                plan.block_table.extend(std::iter::repeat_n(NULL_BLOCK, width - r.blocks.len()));
            }
        }
        Ok(())
    }
}
