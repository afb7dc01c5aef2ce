//! The chunked-prefill policy: prompts prefilled in chunks that run alone in
//! their step, interleaved with decode steps; per-request tkv with whole
//! blocks of left padding; decodes paused when the batch x tkv volume would
//! overflow; prompt blocks reused from a prefix cache.
//!
//! Same protocol as the continuous policy ([`crate::Scheduler`]): `schedule`
//! returns a [`StepPlan`] (here `Chunk`, `Decode` or `Idle`), the runner
//! executes it, `update` takes the sampled tokens back (none for a non-final
//! chunk). The rules are in `docs/design.md` ("The chunked policy").

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::block_cache::{BlockCache, BlockHash, ROOT_HASH};
use crate::block_pool::{BlockId, NULL_BLOCK};
use crate::config::{ChunkOptions, SchedulerConfig, BLOCK_SIZE};
use crate::error::{CoreError, InvalidRequest, StateError};
use crate::plan::{ChunkPlan, DecodePlan, StepPlan};
use crate::request::{check_new_request, check_token_count, finish_of, StopRule};
use crate::scheduler::{PlanDetail, RequestRef, UpdateOutcome};
use crate::trace::StepRecord;

type Handle = u32;
const B: u32 = BLOCK_SIZE;

/// Why the next prefill chunk did not run in the last step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkRejection {
    /// The decode batch has no room (max_num_seqs).
    BatchFull,
    /// Not enough unreserved blocks for the request's prompt + max_tokens.
    Blocks,
    /// The batch x tkv volume check failed (decode pausing off).
    Volume,
    /// Interleaving: a decode step must run between two prefill chunks.
    Interleave,
    /// Paused decodes exist: they resume before any prefill.
    PausedDecodes,
}

impl ChunkRejection {
    pub const ALL: [Self; 5] = [Self::BatchFull, Self::Blocks, Self::Volume, Self::Interleave, Self::PausedDecodes];
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::BatchFull => "batch_full",
            Self::Blocks => "blocks",
            Self::Volume => "volume",
            Self::Interleave => "interleave",
            Self::PausedDecodes => "paused_decodes",
        }
    }
}

/// Event counters of a chunked scheduler since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Net increases of the number of paused requests, summed over steps.
    pub pause_events: u64,
    /// Net decreases of the number of paused requests, summed over steps.
    pub resume_events: u64,
    pub prefill_steps: u64,
    pub decode_steps: u64,
    pub idle_steps: u64,
    /// Prompt blocks whose prefill was skipped thanks to the prefix cache.
    pub prefix_cached_blocks: u64,
    /// Requests that started with a usable prefix-cache hit.
    pub prefix_hit_requests: u64,
}

/// The observation of a chunked scheduler: the continuous policy's fields
/// plus the block-level state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkedRecord {
    pub base: StepRecord,
    /// Paused requests (in neither waiting nor running).
    pub paused: Vec<String>,
    /// Sum over requests holding blocks of their usable (chunk-aligned) hit blocks.
    pub n_cached_blocks: u32,
    /// Requests whose usable hit exceeds their computed tokens (always 0
    /// here: a prefill starts right after its usable hit).
    pub n_prefix_hits: u32,
    /// Block table of every request holding one (running order, then paused).
    pub block_tables: Vec<(String, Vec<BlockId>)>,
    /// Reference count of every block some request holds (ascending ids).
    pub block_ref_count: Vec<(BlockId, u32)>,
    /// The last step's prefill chunk, block by block (0 = null block).
    pub prefill_slot_mappings: Vec<(String, Vec<u32>)>,
}

#[derive(Clone, Debug)]
struct Req {
    id: Arc<str>,
    tag: u32,
    /// Prompt then generated token ids; empty for token-less requests.
    tokens: Vec<u32>,
    prompt_len: u32,
    max_tokens: u32,
    generated: u32,
    /// Tokens whose KV is in the cache (prompt positions from 0).
    computed: u32,
    blocks: Vec<BlockId>,
    /// Leading table blocks shared through a prefix hit (never written).
    n_shared: u32,
    /// Chain hashes of the table's cached full blocks, in order.
    hashes: Vec<BlockHash>,
    /// Usable hit in blocks (whole chunks skipped).
    usable_hit: u32,
    reserved: u32,
    started: bool,
    /// Consecutive steps paused.
    paused_steps: u32,
    stop: Option<Box<StopRule>>,
}

impl Req {
    fn remaining(&self) -> u32 {
        self.max_tokens - self.generated
    }
    fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    Idle,
    Chunk { h: Handle, end: u32, last: bool },
    Decode,
}

/// Chunk geometry of a prompt.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    chunk_count: u32,
    pad_blocks: u32,
}

/// The chunked-prefill scheduler (see the module docs).
#[derive(Clone, Debug)]
pub struct ChunkedScheduler {
    cfg: SchedulerConfig,
    opts: ChunkOptions,
    pool: BlockCache,
    arena: Vec<Option<Req>>,
    free_handles: Vec<Handle>,
    ids: HashMap<Arc<str>, Handle>,
    waiting: VecDeque<Handle>,
    /// Observation order (the ongoing prefill included).
    running: Vec<Handle>,
    paused: Vec<Handle>,
    ongoing: Option<Handle>,
    tkv: u32,
    n_reserved: u32,
    prev_prefill: bool,
    /// Sequences sampling in the pending step; after `update`, those that
    /// produced a token.
    outputs: Vec<Handle>,
    finished: Vec<Handle>,
    /// Finished or aborted requests, removed from the arena at the next step.
    gone: Vec<Handle>,
    pending: Pending,
    queued_aborts: Vec<Handle>,
    step: u64,
    counters: Counters,
    last_rejection: Option<ChunkRejection>,
    /// Block-level slots of the last step's chunk.
    last_slots: Option<(Handle, Vec<u32>)>,
    /// Batch x tkv of the last decode step, and its padding slots.
    last_volume: u64,
    last_padding: u64,
}

impl ChunkedScheduler {
    /// Panics unless `cfg.policy` is chunked (use [`crate::AnyScheduler`]).
    pub fn new(cfg: SchedulerConfig) -> Self {
        let opts = *cfg.policy.chunk_options().expect("a chunked-policy config");
        Self {
            pool: BlockCache::new(cfg.available_blocks),
            cfg,
            opts,
            arena: Vec::new(),
            free_handles: Vec::new(),
            ids: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            paused: Vec::new(),
            ongoing: None,
            tkv: 0,
            n_reserved: 0,
            prev_prefill: false,
            outputs: Vec::new(),
            finished: Vec::new(),
            gone: Vec::new(),
            pending: Pending::None,
            queued_aborts: Vec::new(),
            step: 0,
            counters: Counters::default(),
            last_rejection: None,
            last_slots: None,
            last_volume: 0,
            last_padding: 0,
        }
    }

    // ----- accessors -------------------------------------------------------

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn options(&self) -> &ChunkOptions {
        &self.opts
    }
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn tkv(&self) -> u32 {
        self.tkv
    }
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn n_running(&self) -> usize {
        self.running.len()
    }
    pub fn n_paused(&self) -> usize {
        self.paused.len()
    }
    pub fn n_reserved_blocks(&self) -> u32 {
        self.n_reserved
    }
    pub fn n_unreserved_blocks(&self) -> u32 {
        self.cfg.available_blocks - self.n_reserved
    }
    pub fn n_used_blocks(&self) -> u32 {
        self.pool.n_used()
    }
    pub fn n_physical_blocks(&self) -> u32 {
        self.cfg.n_physical_blocks()
    }
    pub fn counters(&self) -> Counters {
        self.counters
    }
    pub fn last_rejection(&self) -> Option<ChunkRejection> {
        self.last_rejection
    }
    /// Batch size x tkv of the last decode step (0 before any).
    pub fn last_decode_volume(&self) -> u64 {
        self.last_volume
    }
    /// Left-padding slots of the last decode step (of its batch x tkv).
    pub fn last_decode_padding(&self) -> u64 {
        self.last_padding
    }
    pub fn step_in_flight(&self) -> bool {
        self.pending != Pending::None
    }
    pub fn has_unfinished_requests(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.paused.is_empty()
    }
    /// Nothing queued, running or paused.
    pub fn is_drained(&self) -> bool {
        !self.has_unfinished_requests()
    }
    pub fn contains(&self, request_id: &str) -> bool {
        self.ids.contains_key(request_id)
    }
    pub fn pool(&self) -> &BlockCache {
        &self.pool
    }

    fn req(&self, h: Handle) -> &Req {
        self.arena[h as usize].as_ref().expect("live handle")
    }
    fn req_mut(&mut self, h: Handle) -> &mut Req {
        self.arena[h as usize].as_mut().expect("live handle")
    }
    fn live(&self, h: Handle) -> bool {
        self.running.contains(&h) || self.paused.contains(&h)
    }
    fn holders(&self) -> impl Iterator<Item = Handle> + '_ {
        self.running.iter().chain(self.paused.iter()).copied()
    }

    /// Blocks held by a running or paused request.
    pub fn request_blocks(&self, request_id: &str) -> Option<Vec<u32>> {
        let h = *self.ids.get(request_id)?;
        self.live(h).then(|| self.req(h).blocks.clone())
    }

    fn geometry(&self, prompt_len: u32) -> Geometry {
        let chunk = self.opts.chunk_size;
        let chunk_count = prompt_len.div_ceil(chunk);
        let pad_blocks = chunk_count * (chunk / B) - prompt_len.div_ceil(B);
        Geometry { chunk_count, pad_blocks }
    }

    // ----- requests --------------------------------------------------------

    pub fn validate(&self, request_id: &str, prompt_len: u32, max_tokens: u32) -> Result<(), InvalidRequest> {
        let in_use = self.ids.get(request_id).map(|h| self.gone.contains(h));
        check_new_request(in_use, request_id, prompt_len, max_tokens, self.cfg.max_model_len)?;
        let total = u64::from(prompt_len) + u64::from(max_tokens);
        let needed = total.div_ceil(u64::from(B));
        if needed > u64::from(self.cfg.available_blocks) {
            return Err(InvalidRequest::TooManyBlocks { needed, available_blocks: self.cfg.available_blocks });
        }
        // alone in the batch a request ends at tkv = prompt + max_tokens - 1
        let volume = total - 1;
        if volume > self.cfg.max_batch_tkv_limit {
            return Err(InvalidRequest::TooMuchVolume { volume, limit: self.cfg.max_batch_tkv_limit });
        }
        Ok(())
    }

    /// Queues a request with its prompt token ids (prefix caching needs them).
    pub fn add_request(&mut self, request_id: &str, prompt: Vec<u32>, max_tokens: u32) -> Result<(), CoreError> {
        self.add_request_with(request_id, prompt, max_tokens, StopRule::default())
    }

    /// Queues a request whose sampled tokens the core checks against `stop`.
    pub fn add_request_with(
        &mut self,
        request_id: &str,
        prompt: Vec<u32>,
        max_tokens: u32,
        stop: StopRule,
    ) -> Result<(), CoreError> {
        let len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        self.validate(request_id, len, max_tokens)?;
        self.insert(request_id, 0, prompt, len, max_tokens);
        if !stop.is_empty() {
            let h = self.ids[request_id];
            self.req_mut(h).stop = Some(Box::new(stop));
        }
        Ok(())
    }

    /// Queues a token-less request (simulation; never hits the prefix cache).
    pub fn add_request_tagged(
        &mut self,
        request_id: &str,
        tag: u32,
        prompt_len: u32,
        max_tokens: u32,
    ) -> Result<(), CoreError> {
        self.validate(request_id, prompt_len, max_tokens)?;
        self.insert(request_id, tag, Vec::new(), prompt_len, max_tokens);
        Ok(())
    }

    /// [`ChunkedScheduler::add_request`] with a numeric tag.
    pub fn add_request_tokens_tagged(
        &mut self,
        request_id: &str,
        tag: u32,
        prompt: Vec<u32>,
        max_tokens: u32,
    ) -> Result<(), CoreError> {
        let len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        self.validate(request_id, len, max_tokens)?;
        self.insert(request_id, tag, prompt, len, max_tokens);
        Ok(())
    }

    fn insert(&mut self, id: &str, tag: u32, tokens: Vec<u32>, prompt_len: u32, max_tokens: u32) {
        let id: Arc<str> = Arc::from(id);
        let req = Req {
            id: id.clone(),
            tag,
            tokens,
            prompt_len,
            max_tokens,
            generated: 0,
            computed: 0,
            blocks: Vec::new(),
            n_shared: 0,
            hashes: Vec::new(),
            usable_hit: 0,
            reserved: 0,
            started: false,
            paused_steps: 0,
            stop: None,
        };
        let h = match self.free_handles.pop() {
            Some(h) => {
                self.arena[h as usize] = Some(req);
                h
            }
            None => {
                self.arena.push(Some(req));
                (self.arena.len() - 1) as Handle
            }
        };
        self.ids.insert(id, h);
        self.waiting.push_back(h);
    }

    /// Aborts a waiting, running or paused request; its blocks return at
    /// once. During a step the abort is queued until the step closes.
    pub fn abort(&mut self, request_id: &str) -> Result<(), CoreError> {
        let h = match self.ids.get(request_id) {
            Some(&h) if !self.gone.contains(&h) => h,
            _ => return Err(CoreError::UnknownRequest { request_id: request_id.to_owned() }),
        };
        if self.pending != Pending::None {
            if !self.queued_aborts.contains(&h) {
                self.queued_aborts.push(h);
            }
            return Ok(());
        }
        self.abort_now(h);
        Ok(())
    }

    fn abort_now(&mut self, h: Handle) {
        if let Some(pos) = self.waiting.iter().position(|&w| w == h) {
            self.waiting.remove(pos);
            let r = self.arena[h as usize].take().expect("live handle");
            self.ids.remove(&r.id);
            self.free_handles.push(h);
        } else {
            self.retire(h);
        }
    }

    /// Takes a running or paused request out: blocks and reservation return now.
    fn retire(&mut self, h: Handle) {
        self.running.retain(|&x| x != h);
        self.paused.retain(|&x| x != h);
        if self.ongoing == Some(h) {
            self.ongoing = None;
        }
        let (blocks, reserved) = {
            let r = self.req_mut(h);
            (std::mem::take(&mut r.blocks), std::mem::replace(&mut r.reserved, 0))
        };
        self.pool.release(&blocks);
        self.n_reserved -= reserved;
        self.gone.push(h);
    }

    // ----- stepping --------------------------------------------------------

    pub fn schedule(&mut self) -> Result<StepPlan, CoreError> {
        self.schedule_with(PlanDetail::Full)
    }

    pub fn schedule_with(&mut self, detail: PlanDetail) -> Result<StepPlan, CoreError> {
        if self.pending != Pending::None {
            return Err(StateError::ScheduleWhilePending.into());
        }
        self.step += 1;
        self.outputs.clear();
        self.finished.clear();
        self.last_slots = None;
        self.reap_gone();
        self.last_rejection = None;

        let choice = match self.ongoing {
            Some(h) => match self.may_prefill(h, &[]) {
                Ok(()) => Some((h, Vec::new())),
                Err(why) => {
                    self.last_rejection = Some(why);
                    None
                }
            },
            None => match self.waiting.front().copied() {
                Some(head) => {
                    let hits = self.lookahead(head);
                    match self.may_prefill(head, &hits).and_then(|()| self.block_gate(head, &hits)) {
                        Ok(()) => Some((head, hits)),
                        Err(why) => {
                            self.last_rejection = Some(why);
                            None
                        }
                    }
                }
                None => None,
            },
        };
        let n_decoders = self.running.len() - usize::from(self.ongoing.is_some());
        let choice = match choice {
            // progress guarantee: an ongoing prefill with nothing to decode runs
            None if n_decoders == 0 && self.paused.is_empty() => self.ongoing.map(|h| (h, Vec::new())),
            c => c,
        };
        if let Some((h, hits)) = choice {
            let plan = self.chunk(h, hits, detail)?;
            self.counters.prefill_steps += 1;
            return Ok(StepPlan::Chunk(plan));
        }
        if n_decoders == 0 && self.paused.is_empty() {
            self.tkv = 0;
            self.prev_prefill = false;
            self.pending = Pending::Idle;
            self.counters.idle_steps += 1;
            return Ok(StepPlan::Idle);
        }
        let plan = self.decode(detail)?;
        self.counters.decode_steps += 1;
        Ok(StepPlan::Decode(plan))
    }

    /// Runs `k` idle steps at once (only when nothing is queued or running).
    pub fn skip_idle_steps(&mut self, k: u64) {
        assert!(self.pending == Pending::None && !self.has_unfinished_requests(), "idle steps need an empty scheduler");
        self.reap_gone();
        self.step += k;
        self.tkv = 0;
        self.prev_prefill = false;
        self.outputs.clear();
        self.finished.clear();
        self.last_slots = None;
        self.last_rejection = None;
        self.counters.idle_steps += k;
    }

    /// Forgets the requests that finished or were aborted before this step
    /// (their ids become free).
    fn reap_gone(&mut self) {
        for h in std::mem::take(&mut self.gone) {
            let r = self.arena[h as usize].take().expect("live handle");
            self.ids.remove(&r.id);
            self.free_handles.push(h);
        }
    }

    /// Full prompt blocks of a waiting request already in the cache, at most
    /// `prompt_len - 1` tokens' worth (the raw hit).
    fn lookahead(&self, h: Handle) -> Vec<(BlockId, BlockHash)> {
        let r = self.req(h);
        if !self.opts.prefix_caching || !r.has_tokens() {
            return Vec::new();
        }
        let max_blocks = (r.prompt_len - 1) / B;
        let mut hits = Vec::new();
        let mut parent = ROOT_HASH;
        for j in 0..max_blocks {
            let toks = &r.tokens[(j * B) as usize..((j + 1) * B) as usize];
            match self.pool.lookup(parent, toks) {
                Some((b, hash)) => {
                    hits.push((b, hash));
                    parent = hash;
                }
                None => break,
            }
        }
        hits
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
    fn next_chunk(&self, h: Handle, hits: &[(BlockId, BlockHash)]) -> (u32, u32, u32) {
        let r = self.req(h);
        let g = self.geometry(r.prompt_len);
        let chunk = self.opts.chunk_size;
        let lp = g.pad_blocks * B;
        let start = if r.started { r.computed } else { self.usable_hit(g, hits.len() as u32) * B };
        let idx = (lp + start) / chunk;
        let end = ((idx + 1) * chunk - lp).min(r.prompt_len);
        (idx, start, end)
    }

    /// Rules 2a-2d of the design: may this request's next chunk run now?
    fn may_prefill(&self, h: Handle, hits: &[(BlockId, BlockHash)]) -> Result<(), ChunkRejection> {
        if self.running.is_empty() && self.paused.is_empty() {
            return Ok(());
        }
        if !self.paused.is_empty() {
            return Err(ChunkRejection::PausedDecodes);
        }
        let n_decoders = self.running.len() - usize::from(self.ongoing.is_some());
        if self.opts.interleave && self.prev_prefill && n_decoders > 0 {
            return Err(ChunkRejection::Interleave);
        }
        let r = self.req(h);
        let first = !r.started;
        let (_, _, end) = self.next_chunk(h, hits);
        let last = end == r.prompt_len;
        let seqs = self.cfg.max_num_seqs as usize;
        let first_ok = || if self.running.len() < seqs { Ok(()) } else { Err(ChunkRejection::BatchFull) };
        let last_ok = || {
            if n_decoders >= seqs {
                Err(ChunkRejection::BatchFull)
            } else if !self.opts.decode_pausing && !self.volume_fits(h) {
                Err(ChunkRejection::Volume)
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

    /// The volumetric check of the design (rule 4, decode pausing off).
    fn volume_fits(&self, h: Handle) -> bool {
        let r = self.req(h);
        let round = |x: u64| x.div_ceil(64) * 64;
        let (p, mt) = (u64::from(r.prompt_len), u64::from(r.max_tokens));
        let m = u64::from(self.tkv).max(p);
        let new_tkv = m / 64 * 64 + p % 64;
        let new_max = round(new_tkv + mt - 1) + 64;
        let mut decs: Vec<u64> = self
            .running
            .iter()
            .filter(|&&d| Some(d) != self.ongoing && d != h)
            .map(|&d| round(m + u64::from(self.req(d).remaining()) - 1) + 64)
            .collect();
        decs.sort_unstable();
        let mut bs = decs.len() as u64 + 1;
        let mut worst = 0u64;
        for d in decs {
            if d < new_max {
                worst = worst.max(bs * d);
                bs -= 1;
            } else {
                worst = worst.max(bs * new_max);
                break;
            }
        }
        worst <= self.cfg.max_batch_tkv_limit
    }

    /// Rule 1: the request's blocks (minus hits others hold) fit in the
    /// unreserved free blocks.
    fn block_gate(&self, h: Handle, hits: &[(BlockId, BlockHash)]) -> Result<(), ChunkRejection> {
        let r = self.req(h);
        let total = (r.prompt_len + r.max_tokens).div_ceil(B);
        let held = hits.iter().filter(|&&(b, _)| self.pool.ref_count(b) > 0).count() as u32;
        let free = self.pool.n_free().saturating_sub(self.n_reserved);
        if total.saturating_sub(held) <= free {
            Ok(())
        } else {
            Err(ChunkRejection::Blocks)
        }
    }

    fn chunk(
        &mut self,
        h: Handle,
        hits: Vec<(BlockId, BlockHash)>,
        detail: PlanDetail,
    ) -> Result<ChunkPlan, CoreError> {
        let (idx, start, end) = self.next_chunk(h, &hits);
        let (prompt_len, max_tokens, first, have) = {
            let r = self.req(h);
            (r.prompt_len, r.max_tokens, !r.started, if r.started { r.blocks.len() as u32 } else { hits.len() as u32 })
        };
        let g = self.geometry(prompt_len);
        let alloc_end = if first { hits.len() as u32 * B + (end - start) } else { end }.min(prompt_len);
        let need = alloc_end.div_ceil(B).saturating_sub(have);
        // decide, then mutate
        let free_hits = hits.iter().filter(|&&(b, _)| self.pool.ref_count(b) == 0).count() as u32;
        if self.pool.n_free() < need + free_hits {
            return Err(StateError::PoolExhausted.into());
        }
        if first {
            let pos = self.waiting.iter().position(|&w| w == h).expect("a new request is waiting");
            self.waiting.remove(pos);
            for &(b, _) in &hits {
                self.pool.share(b);
            }
        }
        let mut fresh = Vec::with_capacity(need as usize);
        for _ in 0..need {
            fresh.push(self.pool.allocate().expect("checked the pool first"));
        }
        let usable = self.usable_hit(g, hits.len() as u32);
        let total_blocks = (prompt_len + max_tokens).div_ceil(B);
        let reserve_change: i64;
        {
            let r = self.req_mut(h);
            if first {
                r.started = true;
                r.blocks = hits.iter().map(|&(b, _)| b).collect();
                r.hashes = hits.iter().map(|&(_, hash)| hash).collect();
                r.n_shared = hits.len() as u32;
                r.usable_hit = usable;
                r.computed = start;
                r.blocks.extend_from_slice(&fresh);
                r.reserved = total_blocks.saturating_sub(r.blocks.len() as u32);
                reserve_change = i64::from(r.reserved);
            } else {
                r.blocks.extend_from_slice(&fresh);
                let take = need.min(r.reserved);
                r.reserved -= take;
                reserve_change = -i64::from(take);
            }
        }
        self.n_reserved = (i64::from(self.n_reserved) + reserve_change) as u32;
        if first && usable > 0 {
            self.counters.prefix_hit_requests += 1;
            self.counters.prefix_cached_blocks += u64::from(usable);
        }
        self.running.retain(|&x| x != h);
        self.running.insert(0, h);
        self.ongoing = Some(h);
        self.tkv = prompt_len;
        self.prev_prefill = true;
        let last = end == prompt_len;
        if last {
            self.outputs.push(h);
        }
        self.pending = Pending::Chunk { h, end, last };

        // the plan
        let chunk = self.opts.chunk_size;
        let bpc = chunk / B;
        let lp = g.pad_blocks * B;
        let r = self.req(h);
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
        };
        self.last_slots = Some((h, plan.block_slots.clone()));
        Ok(plan)
    }

    fn decode(&mut self, detail: PlanDetail) -> Result<DecodePlan, CoreError> {
        let decoders: Vec<Handle> = self.running.iter().copied().filter(|&x| Some(x) != self.ongoing).collect();
        // candidates: paused first, then decoders; most paused steps first,
        // then fewer generated tokens (stable)
        let mut cand: Vec<Handle> = self.paused.iter().chain(decoders.iter()).copied().collect();
        if self.opts.decode_pausing {
            cand.sort_by_key(|&x| {
                let r = self.req(x);
                (std::cmp::Reverse(r.paused_steps), r.generated)
            });
        }
        let limit = self.cfg.max_batch_tkv_limit;
        let blocks_after = |r: &Req| (r.blocks.len() as u32).max(r.computed / B + 1);
        let mut joined: Vec<Handle> = Vec::with_capacity(cand.len());
        let mut left_out: Vec<Handle> = Vec::new();
        let (mut m, mut off) = (0u32, i64::MIN);
        for &c in &cand {
            let r = self.req(c);
            let b = blocks_after(r);
            let o = i64::from(r.computed) + 1 - i64::from(b * B);
            let (m2, off2) = (m.max(b), off.max(o));
            let tkv = (i64::from(m2 * B) + off2) as u64;
            if !self.opts.decode_pausing || joined.is_empty() || (joined.len() as u64 + 1) * tkv <= limit {
                joined.push(c);
                m = m2;
                off = off2;
            } else {
                left_out.push(c);
            }
        }
        let need = joined.iter().filter(|&&x| blocks_after(self.req(x)) > self.req(x).blocks.len() as u32).count();
        if (self.pool.n_free() as usize) < need {
            return Err(StateError::PoolExhausted.into());
        }
        // mutate
        let was_paused = self.paused.len();
        let resumed: Vec<Handle> = joined.iter().copied().filter(|x| self.paused.contains(x)).collect();
        let mut running: Vec<Handle> = decoders.iter().copied().filter(|x| joined.contains(x)).collect();
        running.extend_from_slice(&resumed);
        let members = running.clone();
        if let Some(o) = self.ongoing {
            running.push(o);
        }
        self.running = running;
        self.paused = left_out;
        for i in 0..self.paused.len() {
            let p = self.paused[i];
            self.req_mut(p).paused_steps += 1;
        }
        let now = self.paused.len();
        if now > was_paused {
            self.counters.pause_events += (now - was_paused) as u64;
        } else {
            self.counters.resume_events += (was_paused - now) as u64;
        }
        for &x in &members {
            let fresh = {
                let r = self.req(x);
                blocks_after(r) > r.blocks.len() as u32
            };
            if fresh {
                let b = self.pool.allocate().expect("checked the pool first");
                self.n_reserved -= u32::from(self.req(x).reserved > 0);
                let r = self.req_mut(x);
                r.blocks.push(b);
                r.reserved = r.reserved.saturating_sub(1);
            }
            self.req_mut(x).paused_steps = 0;
        }
        let tkv = (i64::from(m * B) + off) as u32;
        self.last_padding = members
            .iter()
            .map(|&x| {
                let r = self.req(x);
                u64::from(tkv - ((m - r.blocks.len() as u32) * B + r.computed + 1))
            })
            .sum();
        self.tkv = tkv;
        self.prev_prefill = false;
        self.last_volume = members.len() as u64 * u64::from(tkv);
        self.outputs.extend_from_slice(&members);
        self.pending = Pending::Decode;

        let n = members.len();
        let full = detail == PlanDetail::Full;
        let mut plan = DecodePlan {
            request_ids: Vec::new(),
            batch_size: n as u32,
            tkv: tkv - 1,
            input_ids: Vec::new(),
            positions: Vec::new(),
            slot_mapping: Vec::new(),
            block_table: Vec::new(),
            width: 0,
            left_padding: Vec::new(),
            current_tkv: Vec::new(),
        };
        if detail != PlanDetail::Minimal {
            plan.request_ids = members.iter().map(|&x| self.req(x).id.clone()).collect();
        }
        if full {
            plan.width = m;
            for &x in &members {
                let r = self.req(x);
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

    /// Closes the pending step: one token per sampling sequence in plan order
    /// (none for a non-final chunk) and optional stop flags.
    pub fn update(&mut self, tokens: &[u32], stopped: &[bool]) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        self.update_into(tokens, stopped, &mut outcome)?;
        Ok(outcome)
    }

    pub fn update_into(
        &mut self,
        tokens: &[u32],
        stopped: &[bool],
        outcome: &mut UpdateOutcome,
    ) -> Result<(), CoreError> {
        outcome.clear();
        if self.pending == Pending::None {
            return Err(StateError::UpdateWithoutPlan.into());
        }
        check_token_count(self.outputs.len(), tokens, stopped)?;
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        let caching = self.opts.prefix_caching;
        match pending {
            Pending::Chunk { h, end, last } => {
                let r = self.req_mut(h);
                r.computed = end;
                if caching && r.has_tokens() {
                    self.cache_full_blocks(h);
                }
                if last {
                    self.ongoing = None;
                }
            }
            Pending::Decode => {
                for &h in &self.outputs.clone() {
                    self.req_mut(h).computed += 1;
                    if caching && self.req(h).has_tokens() && self.req(h).computed % B == 0 {
                        self.cache_full_blocks(h);
                    }
                }
            }
            Pending::Idle | Pending::None => {}
        }
        for (i, &token) in tokens.iter().enumerate() {
            let h = self.outputs[i];
            let stop = stopped.get(i).copied().unwrap_or(false);
            let done = {
                let r = self.req_mut(h);
                r.generated += 1;
                if r.has_tokens() {
                    r.tokens.push(token);
                }
                finish_of(r.stop.as_deref(), token, r.generated, r.max_tokens, stop)
            };
            if let Some((why, stop_token)) = done {
                outcome.finished.push(self.req(h).id.clone());
                outcome.finish_reasons.push(why);
                outcome.stop_tokens.push(stop_token);
                self.finished.push(h);
                self.retire(h);
            }
        }
        self.apply_queued_aborts(outcome);
        Ok(())
    }

    /// Caches the request's full blocks below its computed tokens that are not cached yet.
    fn cache_full_blocks(&mut self, h: Handle) {
        let (from, to) = {
            let r = self.req(h);
            (r.hashes.len() as u32, (r.computed / B).min(r.blocks.len() as u32))
        };
        for j in from..to {
            let r = self.arena[h as usize].as_mut().expect("live handle");
            let parent = r.hashes.last().copied().unwrap_or(ROOT_HASH);
            let toks = &r.tokens[(j * B) as usize..((j + 1) * B) as usize];
            let hash = self.pool.cache(r.blocks[j as usize], parent, toks);
            r.hashes.push(hash);
        }
    }

    /// Closes the pending step without tokens: its requests are aborted.
    pub fn cancel(&mut self) -> Result<UpdateOutcome, CoreError> {
        let mut outcome = UpdateOutcome::default();
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        let victims: Vec<Handle> = match pending {
            Pending::None => return Err(StateError::UpdateWithoutPlan.into()),
            Pending::Idle => Vec::new(),
            Pending::Chunk { h, .. } => vec![h],
            Pending::Decode => std::mem::take(&mut self.outputs),
        };
        self.outputs.clear();
        for h in victims {
            outcome.aborted.push(self.req(h).id.clone());
            self.queued_aborts.retain(|&x| x != h);
            self.retire(h);
        }
        self.apply_queued_aborts(&mut outcome);
        Ok(outcome)
    }

    fn apply_queued_aborts(&mut self, outcome: &mut UpdateOutcome) {
        for h in std::mem::take(&mut self.queued_aborts) {
            if self.gone.contains(&h) {
                continue; // finished in this very step
            }
            outcome.aborted.push(self.req(h).id.clone());
            self.abort_now(h);
        }
    }

    // ----- observation -----------------------------------------------------

    fn view(&self, h: Handle) -> RequestRef<'_> {
        let r = self.req(h);
        RequestRef { id: &r.id, tag: r.tag }
    }
    pub fn waiting(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.waiting.iter().map(|&h| self.view(h))
    }
    pub fn running(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.running.iter().map(|&h| self.view(h))
    }
    pub fn paused(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.paused.iter().map(|&h| self.view(h))
    }
    pub fn last_outputs(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.outputs.iter().map(|&h| self.view(h))
    }
    pub fn last_finished(&self) -> impl Iterator<Item = RequestRef<'_>> + '_ {
        self.finished.iter().map(|&h| self.view(h))
    }
    /// Tokens generated so far by a known request.
    pub fn generated(&self, request_id: &str) -> Option<u32> {
        self.ids.get(request_id).map(|&h| self.req(h).generated)
    }

    pub fn n_cached_blocks(&self) -> u32 {
        self.holders().map(|h| self.req(h).usable_hit).sum()
    }

    pub fn snapshot(&self) -> ChunkedRecord {
        let names = |v: &mut dyn Iterator<Item = RequestRef<'_>>| v.map(|r| r.id.to_owned()).collect::<Vec<_>>();
        let mut refs: Vec<(BlockId, u32)> = Vec::new();
        let mut tables = Vec::new();
        for h in self.holders() {
            let r = self.req(h);
            tables.push((r.id.to_string(), r.blocks.clone()));
            for &b in &r.blocks {
                refs.push((b, self.pool.ref_count(b)));
            }
        }
        refs.sort_unstable();
        refs.dedup();
        ChunkedRecord {
            base: StepRecord {
                step: self.step,
                tkv: self.tkv,
                waiting: names(&mut self.waiting()),
                running: names(&mut self.running()),
                request_outputs: names(&mut self.last_outputs()),
                finished_requests: names(&mut self.last_finished()),
                n_reserved_blocks: self.n_reserved,
                n_used_blocks: self.pool.n_used(),
            },
            paused: names(&mut self.paused()),
            n_cached_blocks: self.n_cached_blocks(),
            n_prefix_hits: self.holders().filter(|&h| self.req(h).usable_hit * B > self.req(h).computed).count() as u32,
            block_tables: tables,
            block_ref_count: refs,
            prefill_slot_mappings: match &self.last_slots {
                Some((h, s)) if self.arena[*h as usize].is_some() => vec![(self.req(*h).id.to_string(), s.clone())],
                _ => Vec::new(),
            },
        }
    }

    /// Checks the bookkeeping invariants; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        let mut holders = vec![0u32; self.cfg.available_blocks as usize + 1];
        let mut reserved = 0u32;
        for h in self.holders() {
            let r = self.req(h);
            reserved += r.reserved;
            for &b in &r.blocks {
                if b == NULL_BLOCK || b > self.cfg.available_blocks {
                    return Err(format!("request {} holds invalid block {b}", r.id));
                }
                holders[b as usize] += 1;
            }
            let total = (r.prompt_len + r.max_tokens).div_ceil(B);
            if r.blocks.len() as u32 + r.reserved > total {
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
        for (b, &n) in holders.iter().enumerate().skip(1) {
            if n != self.pool.ref_count(b as u32) {
                return Err(format!("block {b}: {n} holders but ref count {}", self.pool.ref_count(b as u32)));
            }
        }
        if reserved != self.n_reserved {
            return Err(format!("reserved sum {reserved} != counter {}", self.n_reserved));
        }
        if self.n_reserved > self.pool.n_free() {
            return Err(format!("{} blocks reserved but only {} free", self.n_reserved, self.pool.n_free()));
        }
        if let Some(o) = self.ongoing {
            if !self.running.contains(&o) {
                return Err("the ongoing prefill is not running".into());
            }
        }
        Ok(())
    }
}
