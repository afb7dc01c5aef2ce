//! The chunked-prefill policy: prompts prefilled in chunks that run alone in
//! their step, interleaved with decode steps; per-request tkv with whole
//! blocks of left padding; decodes paused when the batch x tkv volume would
//! overflow; prompt blocks reused from the prefix cache.
//!
//! Plans are `Chunk`, `Decode` or `Idle`; a non-final chunk samples nothing.
//! Blocks of a request that leaves return at once. The rules are in
//! `docs/design.md` ("The chunked policy").

use crate::admission::Rejection;
use crate::block_pool::{BlockHash, BlockId, NULL_BLOCK};
use crate::config::{ChunkOptions, SchedulerConfig, BLOCK_SIZE};
use crate::error::CoreError;
use crate::plan::{ChunkPlan, DecodePlan, StepPlan};
use crate::policy::{Core, PlanDetail, Rules};
use crate::record::ChunkedState;
use crate::request::Request;
use crate::requests::Handle;

const B: u32 = BLOCK_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    Chunk { h: Handle, end: u32, last: bool },
    Decode,
}

/// Chunk geometry of a prompt.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    chunk_count: u32,
    pad_blocks: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct Chunked {
    opts: ChunkOptions,
    paused: Vec<Handle>,
    /// The request whose prompt is being prefilled (it is in `running`).
    ongoing: Option<Handle>,
    tkv: u32,
    prev_prefill: bool,
    pending: Pending,
    /// Block-level slots of the last step's chunk.
    last_slots: Option<(Handle, Vec<u32>)>,
    /// Left-padding slots of the last decode step.
    last_padding: u64,
}

impl Chunked {
    pub fn new(opts: ChunkOptions) -> Self {
        Self {
            opts,
            paused: Vec::new(),
            ongoing: None,
            tkv: 0,
            prev_prefill: false,
            pending: Pending::None,
            last_slots: None,
            last_padding: 0,
        }
    }
}

impl Rules for Chunked {
    fn alone(&self, _cfg: &SchedulerConfig, prompt_len: u32, max_tokens: u32) -> (u64, u64) {
        // its blocks hold prompt + max_tokens; alone it ends at tkv = prompt + max_tokens - 1
        let total = u64::from(prompt_len) + u64::from(max_tokens);
        (total.div_ceil(u64::from(B)), total - 1)
    }

    fn defers_release(&self) -> bool {
        false
    }

    fn keeps_tokens(&self) -> bool {
        true
    }

    fn tkv(&self) -> u32 {
        self.tkv
    }

    #[inline] // into the scheduler's schedule_with: the large plan is then built where it is returned
    fn plan(&mut self, core: &mut Core, detail: PlanDetail) -> Result<StepPlan, CoreError> {
        self.last_slots = None;
        let choice = match self.ongoing {
            Some(h) => match self.may_prefill(core, h, &[]) {
                Ok(()) => Some((h, Vec::new())),
                Err(why) => {
                    core.last_rejection = Some(why);
                    None
                }
            },
            None => match core.reqs.waiting.front().copied() {
                Some(head) => {
                    let r = core.reqs.get(head);
                    let hits = core.kv.lookup_prefix(&r.tokens, r.prompt_len);
                    match self.may_prefill(core, head, &hits).and_then(|()| self.block_gate(core, head, &hits)) {
                        Ok(()) => Some((head, hits)),
                        Err(why) => {
                            core.last_rejection = Some(why);
                            None
                        }
                    }
                }
                None => None,
            },
        };
        let n_decoders = core.reqs.running.len() - usize::from(self.ongoing.is_some());
        let choice = match choice {
            // progress guarantee: an ongoing prefill with nothing to decode runs
            None if n_decoders == 0 && self.paused.is_empty() => self.ongoing.map(|h| (h, Vec::new())),
            c => c,
        };
        if let Some((h, hits)) = choice {
            return Ok(StepPlan::Chunk(self.chunk(core, h, hits, detail)?));
        }
        if n_decoders == 0 && self.paused.is_empty() {
            self.tkv = 0;
            self.prev_prefill = false;
            return Ok(StepPlan::Idle);
        }
        Ok(StepPlan::Decode(self.decode(core, detail)?))
    }

    fn commit(&mut self, core: &mut Core) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Chunk { h, end, last } => {
                let r = core.reqs.get_mut(h);
                r.computed = end;
                cache_full_blocks(core, h);
                if last {
                    self.ongoing = None;
                }
            }
            Pending::Decode => {
                for i in 0..core.reqs.outputs.len() {
                    let h = core.reqs.outputs[i];
                    let r = core.reqs.get_mut(h);
                    r.computed += 1;
                    // a beam search's generated blocks stay out of the prefix cache: a fork may
                    // drop them, and one another request held would not come back to the pool
                    if r.computed.is_multiple_of(B) && !r.in_beam_search() {
                        cache_full_blocks(core, h);
                    }
                }
            }
            Pending::None => {}
        }
    }

    fn victims(&mut self, core: &mut Core) -> Vec<Handle> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Chunk { h, .. } => vec![h],
            Pending::Decode => core.reqs.outputs.clone(),
            Pending::None => Vec::new(),
        }
    }

    fn next_write_index(&self, r: &Request) -> u32 {
        // prompt coordinates: the next token's KV goes to position `computed`
        r.computed / B
    }

    fn rebalance_beams(&self, core: &mut Core, head: Handle) {
        // what its beams may still need at once: every beam's whole table, less the
        // distinct blocks they hold now (sharing frees room; a copy takes it)
        let distinct = beam_blocks(core, head).len() as u32;
        let r = core.reqs.get(head);
        let target = ((r.prompt_len + r.max_tokens).div_ceil(B) * r.beam_width).saturating_sub(distinct);
        let before = r.reserved;
        core.reqs.get_mut(head).reserved = target;
        if target > before {
            core.kv.reserve(target - before);
        } else {
            core.kv.unreserve(before - target);
        }
    }

    fn leave(&mut self, h: Handle) {
        self.paused.retain(|&x| x != h);
        if self.ongoing == Some(h) {
            self.ongoing = None;
        }
    }

    fn skip_idle(&mut self) {
        self.tkv = 0;
        self.prev_prefill = false;
        self.last_slots = None;
    }

    fn paused(&self) -> &[Handle] {
        &self.paused
    }

    fn decode_padding(&self, _core: &Core) -> u64 {
        self.last_padding
    }

    fn chunked_state(&self, core: &Core) -> Option<ChunkedState> {
        let reqs = &core.reqs;
        let holders = || reqs.running.iter().chain(self.paused.iter()).map(|&h| reqs.get(h));
        let mut refs: Vec<(BlockId, u32)> = Vec::new();
        let mut tables = Vec::new();
        for r in holders() {
            tables.push((r.id.to_string(), r.blocks.clone()));
            refs.extend(r.blocks.iter().map(|&b| (b, core.kv.ref_count(b))));
        }
        refs.sort_unstable();
        refs.dedup();
        Some(ChunkedState {
            paused: reqs.names(&self.paused),
            // (a beam search's hit counts once, not per beam)
            n_cached_blocks: holders().filter(|r| r.member_of.is_none()).map(|r| r.usable_hit).sum(),
            n_prefix_hits: holders().filter(|r| r.member_of.is_none() && r.usable_hit * B > r.computed).count() as u32,
            block_tables: tables,
            block_ref_count: refs,
            prefill_slot_mappings: match &self.last_slots {
                Some((h, s)) if reqs.is_live(*h) => vec![(reqs.get(*h).id.to_string(), s.clone())],
                _ => Vec::new(),
            },
        })
    }

    fn check(&self, core: &Core) -> Result<(), String> {
        if core.kv.n_reserved() > core.kv.n_free() {
            return Err(format!("{} blocks reserved but only {} free", core.kv.n_reserved(), core.kv.n_free()));
        }
        for &h in core.reqs.running.iter().chain(self.paused.iter()) {
            let r = core.reqs.get(h);
            let total = (r.prompt_len + r.max_tokens).div_ceil(B);
            if r.beam_width > 1 && r.member_of.is_none() {
                // a beam search: its distinct blocks and reservation cover all its beams
                let distinct = beam_blocks(core, h).len() as u32;
                if distinct + r.reserved > total * r.beam_width {
                    return Err(format!(
                        "beam search {}: {distinct} blocks + {} reserved > {} its beams can need",
                        r.id,
                        r.reserved,
                        total * r.beam_width
                    ));
                }
            }
            if r.member_of.is_some() && r.reserved != 0 {
                return Err(format!("a beam of {} reserves {} blocks itself", r.id, r.reserved));
            }
            if r.beam_width <= 1 && r.member_of.is_none() && r.blocks.len() as u32 + r.reserved > total {
                return Err(format!(
                    "request {}: {} blocks + {} reserved > {total} it can need",
                    r.id,
                    r.blocks.len(),
                    r.reserved
                ));
            }
            if (r.blocks.len() as u32) < r.computed.div_ceil(B) {
                return Err(format!("request {}: {} computed tokens in {} blocks", r.id, r.computed, r.blocks.len()));
            }
            if r.started && r.hashes.len() as u32 > r.blocks.len() as u32 {
                return Err(format!("request {}: more block hashes than blocks", r.id));
            }
        }
        for &h in &core.reqs.gone {
            if !core.reqs.get(h).blocks.is_empty() {
                return Err(format!("request {} left but holds blocks", core.reqs.get(h).id));
            }
        }
        if let Some(o) = self.ongoing {
            if !core.reqs.running.contains(&o) {
                return Err("the ongoing prefill is not running".into());
            }
        }
        Ok(())
    }
}

/// The distinct blocks a beam search's beams hold.
fn beam_blocks(core: &Core, head: Handle) -> Vec<BlockId> {
    let r = core.reqs.get(head);
    let mut all: Vec<BlockId> = r.beams.iter().flat_map(|&m| core.reqs.get(m).blocks.iter().copied()).collect();
    all.extend_from_slice(&r.blocks);
    all.sort_unstable();
    all.dedup();
    all
}

/// Caches the request's full blocks below its computed tokens.
fn cache_full_blocks(core: &mut Core, h: Handle) {
    let r: &mut Request = core.reqs.get_mut(h);
    core.kv.cache_full_blocks(&r.blocks, &mut r.hashes, &r.tokens, r.computed);
}

impl Chunked {
    fn geometry(&self, prompt_len: u32) -> Geometry {
        let chunk = self.opts.chunk_size;
        let chunk_count = prompt_len.div_ceil(chunk);
        let pad_blocks = chunk_count * (chunk / B) - prompt_len.div_ceil(B);
        Geometry { chunk_count, pad_blocks }
    }

    /// Usable hit in blocks: whole chunks only, the last chunk always recomputed.
    fn usable_hit(&self, g: Geometry, raw_hit: u32) -> u32 {
        let bpc = self.opts.chunk_size / B;
        let mut full = (g.pad_blocks + raw_hit) / bpc;
        if full == g.chunk_count {
            full -= 1;
        }
        (full * bpc).saturating_sub(g.pad_blocks)
    }

    /// The chunk a request runs next: (index, first prompt position, end).
    fn next_chunk(&self, r: &Request, hits: &[(BlockId, BlockHash)]) -> (u32, u32, u32) {
        let g = self.geometry(r.prompt_len);
        let chunk = self.opts.chunk_size;
        let lp = g.pad_blocks * B;
        let start = if r.started { r.computed } else { self.usable_hit(g, hits.len() as u32) * B };
        let idx = (lp + start) / chunk;
        let end = ((idx + 1) * chunk - lp).min(r.prompt_len);
        (idx, start, end)
    }

    /// Rules 2a-2d of the design: may this request's next chunk run now?
    fn may_prefill(&self, core: &Core, h: Handle, hits: &[(BlockId, BlockHash)]) -> Result<(), Rejection> {
        let running = &core.reqs.running;
        if running.is_empty() && self.paused.is_empty() {
            return Ok(());
        }
        if !self.paused.is_empty() {
            return Err(Rejection::PausedDecodes);
        }
        let n_decoders = running.len() - usize::from(self.ongoing.is_some());
        if self.opts.interleave && self.prev_prefill && n_decoders > 0 {
            return Err(Rejection::Interleave);
        }
        let r = core.reqs.get(h);
        let first = !r.started;
        let (_, _, end) = self.next_chunk(r, hits);
        let last = end == r.prompt_len;
        let seqs = core.cfg.max_num_seqs as usize;
        let width = r.beam_width.max(1) as usize; // a beam search's beams are sequences
        let first_ok = || if running.len() + width <= seqs { Ok(()) } else { Err(Rejection::BatchFull) };
        let last_ok = || {
            if n_decoders + width > seqs {
                Err(Rejection::BatchFull)
            } else if !self.opts.decode_pausing && !self.volume_fits(core, h) {
                Err(Rejection::VolumeLimit)
            } else {
                Ok(())
            }
        };
        if !self.opts.interleave {
            return if first { first_ok().and_then(|()| last_ok()) } else { Ok(()) };
        }
        if first {
            first_ok()?;
        }
        if last {
            last_ok()?;
        }
        Ok(())
    }

    /// The published volumetric check (decode pausing off): the staircase
    /// over block-rounded ends, from the batch tkv with the request included.
    fn volume_fits(&self, core: &Core, h: Handle) -> bool {
        let b = u64::from(B);
        let r = core.reqs.get(h);
        let round = |x: u64| x.div_ceil(b) * b;
        let (p, mt) = (u64::from(r.prompt_len), u64::from(r.max_tokens));
        let m = u64::from(self.tkv).max(p);
        let new_tkv = m / b * b + p % b;
        let end_new = round(new_tkv + mt - 1) + b;
        let mut ends: Vec<u64> = core
            .reqs
            .running
            .iter()
            .filter(|&&d| Some(d) != self.ongoing && d != h)
            .map(|&d| round(m + u64::from(core.reqs.get(d).remaining()) - 1) + b)
            .collect();
        // a beam search's other beams end with it
        ends.extend(std::iter::repeat_n(end_new, r.beam_width.saturating_sub(1) as usize));
        crate::volume::peak_volume(&mut ends, end_new, false) <= core.cfg.max_batch_tkv_limit
    }

    /// Rule 1: the request's blocks (minus hits others hold) fit in the
    /// unreserved free blocks.
    fn block_gate(&self, core: &Core, h: Handle, hits: &[(BlockId, BlockHash)]) -> Result<(), Rejection> {
        let r = core.reqs.get(h);
        // a beam search's beams may each come to hold all their blocks
        let total = (r.prompt_len + r.max_tokens).div_ceil(B) * r.beam_width.max(1);
        let held = hits.iter().filter(|&&(b, _)| core.kv.ref_count(b) > 0).count() as u32;
        if total.saturating_sub(held) <= core.kv.n_free_unreserved() {
            Ok(())
        } else {
            Err(Rejection::NotEnoughBlocks)
        }
    }

    fn chunk(
        &mut self,
        core: &mut Core,
        h: Handle,
        hits: Vec<(BlockId, BlockHash)>,
        detail: PlanDetail,
    ) -> Result<ChunkPlan, CoreError> {
        let (idx, start, end) = self.next_chunk(core.reqs.get(h), &hits);
        let (prompt_len, max_tokens, first, have) = {
            let r = core.reqs.get(h);
            (r.prompt_len, r.max_tokens, !r.started, if r.started { r.blocks.len() as u32 } else { hits.len() as u32 })
        };
        let g = self.geometry(prompt_len);
        let alloc_end = if first { hits.len() as u32 * B + (end - start) } else { end }.min(prompt_len);
        let need = alloc_end.div_ceil(B).saturating_sub(have);
        // decide, then mutate
        let free_hits = hits.iter().filter(|&&(b, _)| core.kv.ref_count(b) == 0).count() as u32;
        core.kv.ensure_free(need + free_hits)?;
        if first {
            core.reqs.take_waiting(h);
            for &(b, _) in &hits {
                core.kv.share(b);
            }
        }
        let mut fresh = Vec::with_capacity(need as usize);
        for _ in 0..need {
            fresh.push(core.kv.allocate());
        }
        let usable = self.usable_hit(g, hits.len() as u32);
        let width = core.reqs.get(h).beam_width.max(1);
        // a beam search reserves for all its beams (see `rebalance_beams`)
        let total_blocks = (prompt_len + max_tokens).div_ceil(B) * width;
        {
            let r = core.reqs.get_mut(h);
            if first {
                r.started = true;
                r.blocks = hits.iter().map(|&(b, _)| b).collect();
                r.hashes = hits.iter().map(|&(_, hash)| hash).collect();
                r.n_shared = hits.len() as u32;
                r.usable_hit = usable;
                r.computed = start;
                r.blocks.extend_from_slice(&fresh);
                r.reserved = total_blocks.saturating_sub(r.blocks.len() as u32);
                core.kv.reserve(r.reserved);
            } else {
                r.blocks.extend_from_slice(&fresh);
                let take = need.min(r.reserved);
                r.reserved -= take;
                core.kv.unreserve(take);
            }
        }
        if first && usable > 0 {
            core.counters.prefix_hit_requests += 1;
            core.counters.prefix_cached_blocks += u64::from(usable);
        }
        core.reqs.running.retain(|&x| x != h);
        core.reqs.running.insert(0, h);
        self.ongoing = Some(h);
        self.tkv = prompt_len;
        self.prev_prefill = true;
        let last = end == prompt_len;
        if last {
            core.reqs.outputs.push(h);
            if width > 1 {
                core.spawn_beams(h, 0); // the request's reservation covers its beams
            }
        }
        self.pending = Pending::Chunk { h, end, last };

        // the plan
        let chunk = self.opts.chunk_size;
        let bpc = chunk / B;
        let lp = g.pad_blocks * B;
        let r = core.reqs.get(h);
        let block_slots: Vec<u32> = (0..bpc)
            .map(|k| {
                let pb = idx * bpc + k;
                if pb < g.pad_blocks {
                    return NULL_BLOCK;
                }
                let j = pb - g.pad_blocks;
                if j < r.n_shared {
                    NULL_BLOCK
                } else {
                    r.blocks.get(j as usize).copied().unwrap_or(NULL_BLOCK)
                }
            })
            .collect();
        let in_left = if idx == 0 { lp } else { 0 };
        let base = idx * chunk; // padded position of input token 0
        let full = detail == PlanDetail::Full;
        let (mut input_ids, mut positions, mut slot_mapping) = (Vec::new(), Vec::new(), Vec::new());
        if full {
            positions.reserve(chunk as usize);
            slot_mapping.reserve(chunk as usize);
            if r.has_tokens() {
                input_ids.reserve(chunk as usize);
            }
            for t in 0..chunk {
                // the prompt position of input token t, if it is not padding
                let real = (base + t).checked_sub(lp).filter(|&p| p >= start && p < end);
                positions.push(real.unwrap_or(0));
                if r.has_tokens() {
                    input_ids.push(real.map_or(0, |p| r.tokens[p as usize]));
                }
                let blk = block_slots[(t / B) as usize];
                slot_mapping.push(i64::from(blk) * i64::from(B) + i64::from(t % B));
            }
        }
        let plan = ChunkPlan {
            request_id: r.id.clone(),
            prompt_len,
            chunk_index: idx,
            chunk_count: g.chunk_count,
            chunk_size: chunk,
            left_padding: in_left,
            start,
            end,
            context_end: (idx + 1) * chunk - lp,
            is_last: last,
            input_ids,
            positions,
            slot_mapping,
            block_slots,
            block_table: if full { r.blocks.clone() } else { Vec::new() },
            logits_index: (end - 1 + lp) - base,
            cached_blocks: usable,
            block_copies: Vec::new(),
        };
        self.last_slots = Some((h, plan.block_slots.clone()));
        Ok(plan)
    }

    fn decode(&mut self, core: &mut Core, detail: PlanDetail) -> Result<DecodePlan, CoreError> {
        let reqs = &core.reqs;
        let decoders: Vec<Handle> = reqs.running.iter().copied().filter(|&x| Some(x) != self.ongoing).collect();
        // candidates: paused first, then decoders; most paused steps first,
        // then fewer generated tokens (stable)
        // (a beam search's beams are one candidate: they decode or pause together, in order)
        let beams = reqs.n_beam_searches > 0;
        let mut cand: Vec<Handle> = self
            .paused
            .iter()
            .chain(decoders.iter())
            .copied()
            .filter(|&x| !beams || reqs.get(x).member_of.is_none())
            .collect();
        if self.opts.decode_pausing {
            cand.sort_by_key(|&x| {
                let r = reqs.get(x);
                (std::cmp::Reverse(r.paused_steps), r.generated)
            });
        }
        let limit = core.cfg.max_batch_tkv_limit;
        let blocks_after = |r: &Request| (r.blocks.len() as u32).max(r.computed / B + 1);
        let mut joined: Vec<Handle> = Vec::with_capacity(cand.len());
        let mut left_out: Vec<Handle> = Vec::new();
        let (mut m, mut off) = (0u32, i64::MIN);
        for &c in &cand {
            let r = reqs.get(c);
            let b = blocks_after(r);
            let o = i64::from(r.computed) + 1 - i64::from(b * B);
            let (m2, off2) = (m.max(b), off.max(o));
            let tkv = (i64::from(m2 * B) + off2) as u64;
            let others: &[Handle] = if beams { &r.beams } else { &[] };
            let rows = 1 + others.len();
            let unit = std::iter::once(c).chain(others.iter().copied());
            if !self.opts.decode_pausing || joined.is_empty() || (joined.len() + rows) as u64 * tkv <= limit {
                joined.extend(unit);
                m = m2;
                off = off2;
            } else {
                left_out.extend(unit);
            }
        }
        let need = joined.iter().filter(|&&x| blocks_after(reqs.get(x)) > reqs.get(x).blocks.len() as u32).count();
        core.kv.ensure_free(need as u32)?;
        // mutate
        let was_paused = self.paused.len();
        let resumed: Vec<Handle> = joined.iter().copied().filter(|x| self.paused.contains(x)).collect();
        let mut running: Vec<Handle> = decoders.iter().copied().filter(|x| joined.contains(x)).collect();
        running.extend_from_slice(&resumed);
        let members = running.clone();
        if let Some(o) = self.ongoing {
            running.push(o);
        }
        core.reqs.running = running;
        self.paused = left_out;
        for &p in &self.paused {
            core.reqs.get_mut(p).paused_steps += 1;
        }
        let now = self.paused.len();
        if now > was_paused {
            core.counters.pause_events += (now - was_paused) as u64;
        } else {
            core.counters.resume_events += (was_paused - now) as u64;
        }
        for &x in &members {
            let fresh = {
                let r = core.reqs.get(x);
                blocks_after(r) > r.blocks.len() as u32
            };
            if fresh {
                let b = core.kv.allocate();
                core.reqs.get_mut(x).blocks.push(b);
                // a beam's blocks come out of its request's reservation
                let owner = core.reqs.group_of(x);
                let r = core.reqs.get_mut(owner);
                if r.reserved > 0 {
                    r.reserved -= 1;
                    core.kv.unreserve(1);
                }
            }
            core.reqs.get_mut(x).paused_steps = 0;
        }
        let tkv = (i64::from(m * B) + off) as u32;
        let reqs = &core.reqs;
        self.last_padding = members
            .iter()
            .map(|&x| {
                let r = reqs.get(x);
                u64::from(tkv - ((m - r.blocks.len() as u32) * B + r.computed + 1))
            })
            .sum();
        self.tkv = tkv;
        self.prev_prefill = false;
        core.reqs.outputs.extend_from_slice(&members);
        self.pending = Pending::Decode;

        let reqs = &core.reqs;
        let n = members.len();
        let full = detail == PlanDetail::Full;
        let mut plan = DecodePlan::empty(n as u32, tkv - 1);
        if detail != PlanDetail::Minimal {
            plan.request_ids = members.iter().map(|&x| reqs.get(x).id.clone()).collect();
        }
        if full {
            plan.width = m;
            for &x in &members {
                let r = reqs.get(x);
                let pos = r.computed;
                plan.input_ids.push(r.tokens.get(pos as usize).copied().unwrap_or(0));
                plan.positions.push(pos);
                let blk = r.blocks[(pos / B) as usize];
                plan.slot_mapping.push(i64::from(blk) * i64::from(B) + i64::from(pos % B));
                plan.left_padding.push(0);
                plan.current_tkv.push(pos + 1);
                plan.block_table.extend_from_slice(&r.blocks);
                plan.block_table.extend(std::iter::repeat_n(NULL_BLOCK, (m as usize).saturating_sub(r.blocks.len())));
            }
        }
        Ok(plan)
    }
}
