//! The KV-cache manager both policies allocate through: one [`BlockPool`],
//! the worst-case reservations, and the prefix cache when it is on (the
//! continuous policy runs with it off).
//!
//! Reservation is the project's "nothing is ever preempted" guarantee: an
//! admitted request reserves the blocks its worst case needs. The policies
//! publish different counts, so each says when a reservation shrinks: the
//! continuous policy reserves the whole worst case (allocated blocks
//! included) until the request's blocks return; the chunked policy reserves
//! what is still to allocate and takes every allocation out of it.

use crate::block_pool::{BlockHash, BlockId, BlockPool, ROOT_HASH};
use crate::config::BLOCK_SIZE;
use crate::error::{CoreError, StateError};

const B: u32 = BLOCK_SIZE;

#[derive(Clone, Debug)]
pub struct KvManager {
    pool: BlockPool,
    caching: bool,
    n_reserved: u32,
}

impl KvManager {
    #[inline]
    pub fn new(n_blocks: u32, caching: bool) -> Self {
        Self { pool: BlockPool::new(n_blocks), caching, n_reserved: 0 }
    }

    #[inline]
    pub fn n_blocks(&self) -> u32 {
        self.pool.n_blocks()
    }
    /// Free blocks (cached ones included: they can be evicted).
    #[inline]
    pub fn n_free(&self) -> u32 {
        self.pool.n_free()
    }
    /// Blocks held by at least one request.
    #[inline]
    pub fn n_used(&self) -> u32 {
        self.pool.n_used()
    }
    /// Blocks reserved, over all requests, for what they may still allocate.
    #[inline]
    pub fn n_reserved(&self) -> u32 {
        self.n_reserved
    }
    /// `n_blocks - n_reserved` (the continuous policy's admission budget).
    #[inline]
    pub fn n_unreserved(&self) -> u32 {
        self.pool.n_blocks() - self.n_reserved
    }
    /// Free blocks nobody has reserved (the chunked policy's admission budget).
    #[inline]
    pub fn n_free_unreserved(&self) -> u32 {
        self.pool.n_free().saturating_sub(self.n_reserved)
    }
    #[inline]
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.pool.ref_count(b)
    }

    /// Fails (before anything is changed) when the pool cannot give `n`
    /// blocks. Reservations make that impossible; this keeps a bug from
    /// leaving the state half-changed.
    #[inline]
    pub fn ensure_free(&self, n: u32) -> Result<(), CoreError> {
        if self.pool.n_free() < n {
            return Err(StateError::PoolExhausted.into());
        }
        Ok(())
    }

    /// One block; only after [`KvManager::ensure_free`] said it is there.
    #[inline]
    pub fn allocate(&mut self) -> BlockId {
        self.pool.allocate().expect("ensure_free checked the pool first")
    }

    /// Adds `n` blocks to the reservations.
    #[inline]
    pub fn reserve(&mut self, n: u32) {
        self.n_reserved += n;
    }
    /// Takes `n` blocks out of the reservations (they were allocated or given up).
    #[inline]
    pub fn unreserve(&mut self, n: u32) {
        debug_assert!(n <= self.n_reserved, "unreserving {n} of {} reserved", self.n_reserved);
        self.n_reserved -= n;
    }

    /// A request leaves: its table's blocks go back (last block first) and
    /// its remaining reservation is dropped.
    #[inline]
    pub fn release(&mut self, table: &[BlockId], reserved: u32) {
        self.pool.release(table);
        self.unreserve(reserved);
    }

    /// One more holder of cached block `b` (a prefix hit).
    #[inline]
    pub fn share(&mut self, b: BlockId) {
        self.pool.share(b);
    }

    /// One more holder of held block `b` (beams sharing blocks).
    #[inline]
    pub fn hold(&mut self, b: BlockId) {
        self.pool.hold(b);
    }

    /// Drops one holder of `b` (it returns to the queue when nobody holds it).
    #[inline]
    pub fn drop_one(&mut self, b: BlockId) {
        self.pool.free(b);
    }

    /// The longest cached prefix of full blocks of `tokens`, at most
    /// `prompt_len - 1` tokens' worth (the raw hit); empty without caching
    /// or tokens.
    #[inline]
    pub fn lookup_prefix(&self, tokens: &[u32], prompt_len: u32) -> Vec<(BlockId, BlockHash)> {
        if !self.caching || tokens.is_empty() {
            return Vec::new();
        }
        let max_blocks = (prompt_len - 1) / B;
        let mut hits = Vec::new();
        let mut parent = ROOT_HASH;
        for j in 0..max_blocks {
            let toks = &tokens[(j * B) as usize..((j + 1) * B) as usize];
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

    /// Caches the table's full blocks below `computed` tokens that `hashes`
    /// does not cover yet (a no-op without caching or tokens).
    #[inline]
    pub fn cache_full_blocks(&mut self, table: &[BlockId], hashes: &mut Vec<BlockHash>, tokens: &[u32], computed: u32) {
        if !self.caching || tokens.is_empty() {
            return;
        }
        let to = (computed / B).min(table.len() as u32);
        for j in hashes.len() as u32..to {
            let parent = hashes.last().copied().unwrap_or(ROOT_HASH);
            let toks = &tokens[(j * B) as usize..((j + 1) * B) as usize];
            hashes.push(self.pool.cache(table[j as usize], parent, toks));
        }
    }

    /// The pool's own bookkeeping.
    #[inline]
    pub fn check(&self) -> Result<(), String> {
        self.pool.check()
    }
}
