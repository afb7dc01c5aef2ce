//! The KV block pool of both policies: reference counts, an optional prefix
//! cache of full blocks, and an ordered free queue whose order gives block ids.
//!
//! Physical block 0 is the null block: it pads block tables and the slots of
//! padding tokens, and is never handed out. Usable blocks are `1..=n_blocks`.
//! Without caching (the continuous policy) it behaves as a LIFO free list:
//! released blocks go to the front, the table's last block first.
//!
//! - Ids `1..=n_blocks` start in the free queue in order (0 is the null block,
//!   never handed out). Allocation takes the front of the queue; a block taken
//!   that way loses whatever it cached (eviction).
//! - A full 64-token block can be *cached*: its key is a hash chained to its
//!   parent block's, so it matches only when the whole prefix is identical.
//!   Keys are verified (parent and tokens), never trusted on the hash alone.
//! - A hit on a cached block adds a reference; a hit on a free cached block
//!   takes it out of the queue.
//! - Released blocks whose count drops to 0 go back to the queue: blocks that
//!   cache nothing at the front (they have no reuse value), cached ones at the
//!   back (they stay reusable longest).
//!
//! So every free block that caches nothing is ahead of every free cached
//! one: the queue is stored as a stack of the former (its top is the front)
//! followed by a doubly-linked list of the latter (a hit takes a block out
//! of its middle). Without caching only the stack is used: a LIFO free list.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::config::BLOCK_SIZE;

/// Index of a physical KV block.
pub type BlockId = u32;

/// The physical block that pads block tables; never allocated.
pub const NULL_BLOCK: BlockId = 0;

/// Chain hash of a full block: depends on every token up to the block's end.
pub type BlockHash = u64;

/// The chain's root (the parent of a sequence's first block).
pub const ROOT_HASH: BlockHash = 0x5350_5952_455f_4342; // "SPYRE_CB"

/// The chained hash of a block of tokens after `parent`.
pub fn chain_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    // fixed keys: the same ids give the same hash throughout a process
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What a cached block holds, kept to verify a hash match.
#[derive(Clone, Debug)]
struct Content {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Box<[u32]>,
}

const NIL: u32 = 0; // the null block doubles as the queue's sentinel

/// A block's bookkeeping in one word: its reference count in the low bits,
/// whether it caches a prefix and whether it is in the cached free list in
/// the two high bits (one load serves an allocation or a free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Meta(u32);

impl Meta {
    const CACHED: u32 = 1 << 31;
    const LISTED: u32 = 1 << 30;
    const COUNT: u32 = Self::LISTED - 1;

    #[inline(always)]
    fn ref_count(self) -> u32 {
        self.0 & Self::COUNT
    }
    #[inline(always)]
    fn cached(self) -> bool {
        self.0 & Self::CACHED != 0
    }
    #[inline(always)]
    fn listed(self) -> bool {
        self.0 & Self::LISTED != 0
    }
    #[inline(always)]
    fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }
}

#[derive(Clone, Debug)]
pub struct BlockPool {
    n_blocks: u32,
    /// The front of the free queue: free blocks that cache nothing, the
    /// front last (a stack).
    uncached: Vec<BlockId>,
    /// The rest of the free queue: free cached blocks, a doubly-linked list
    /// over block ids with sentinel `NIL`.
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Per block: reference count, whether it is in the free queue, whether it caches a prefix.
    meta: Vec<Meta>,
    /// Blocks in the linked list (free and cached).
    n_listed: u32,
    content: Vec<Option<Content>>,
    /// Cached blocks by hash, oldest first.
    by_hash: HashMap<BlockHash, Vec<BlockId>>,
}

impl BlockPool {
    pub fn new(n_blocks: u32) -> Self {
        let n = n_blocks as usize + 1;
        Self {
            n_blocks,
            uncached: (1..=n_blocks).rev().collect(),
            prev: vec![NIL; n],
            next: vec![NIL; n],
            meta: vec![Meta::default(); n],
            n_listed: 0,
            content: vec![None; n],
            by_hash: HashMap::new(),
        }
    }

    /// Usable blocks (the null block excluded).
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }
    /// Physical blocks a KV cache needs: the usable ones plus the null block.
    pub fn n_physical_blocks(&self) -> u32 {
        self.n_blocks + 1
    }
    /// Blocks in the free queue (cached ones included: they can be evicted).
    #[inline]
    pub fn n_free(&self) -> u32 {
        self.uncached.len() as u32 + self.n_listed
    }
    /// Blocks held by at least one request.
    pub fn n_used(&self) -> u32 {
        self.n_blocks - self.n_free()
    }
    pub fn ref_count(&self, b: BlockId) -> u32 {
        self.meta.get(b as usize).map_or(0, |m| m.ref_count())
    }
    pub fn is_cached(&self, b: BlockId) -> bool {
        self.content.get(b as usize).is_some_and(Option::is_some)
    }
    /// The free queue, front first (for tests and invariant checks).
    pub fn free_queue(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.n_free() as usize);
        out.extend(self.uncached.iter().rev());
        let mut b = self.next[NIL as usize];
        while b != NIL {
            out.push(b);
            b = self.next[b as usize];
        }
        out
    }

    fn unlink(&mut self, b: BlockId) {
        debug_assert!(self.meta[b as usize].listed());
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.meta[b as usize].set(Meta::LISTED, false);
        self.n_listed -= 1;
    }
    fn push_back(&mut self, b: BlockId) {
        let last = self.prev[NIL as usize];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = NIL;
        self.prev[NIL as usize] = b;
        self.meta[b as usize].set(Meta::LISTED, true);
        self.n_listed += 1;
    }
    /// The cached block holding `tokens` after `parent`, if any (verified).
    pub fn lookup(&self, parent: BlockHash, tokens: &[u32]) -> Option<(BlockId, BlockHash)> {
        let h = chain_hash(parent, tokens);
        let blocks = self.by_hash.get(&h)?;
        blocks.iter().copied().find_map(|b| {
            let c = self.content[b as usize].as_ref()?;
            (c.parent == parent && &*c.tokens == tokens).then_some((b, h))
        })
    }

    /// Takes the front of the free queue (evicting what it cached).
    #[inline(always)]
    pub fn allocate(&mut self) -> Option<BlockId> {
        // (the fast path returns on its own: nothing after it reloads the pool)
        if let Some(b) = self.uncached.pop() {
            self.meta[b as usize] = Meta(1);
            return Some(b);
        }
        self.allocate_cached()
    }

    /// Every free block caches a prefix: the oldest is evicted and taken.
    #[cold]
    #[inline(never)]
    fn allocate_cached(&mut self) -> Option<BlockId> {
        let b = self.next[NIL as usize];
        if b == NIL {
            return None;
        }
        self.unlink(b);
        self.evict(b);
        // a block leaves the free queue unlisted and uncached (evicted above)
        self.meta[b as usize] = Meta(1);
        Some(b)
    }

    fn evict(&mut self, b: BlockId) {
        if let Some(c) = self.content[b as usize].take() {
            self.meta[b as usize].set(Meta::CACHED, false);
            if let Some(v) = self.by_hash.get_mut(&c.hash) {
                v.retain(|&x| x != b);
                if v.is_empty() {
                    self.by_hash.remove(&c.hash);
                }
            }
        }
    }

    /// A hit: one more holder of cached block `b` (taken out of the free
    /// queue if it was free).
    pub fn share(&mut self, b: BlockId) {
        debug_assert!(b != NULL_BLOCK && self.is_cached(b));
        if self.meta[b as usize].listed() {
            self.unlink(b);
        }
        self.meta[b as usize].0 += 1;
    }

    /// One more holder of held block `b` (a beam sharing another beam's block).
    pub fn hold(&mut self, b: BlockId) {
        debug_assert!(b != NULL_BLOCK && self.ref_count(b) > 0, "block {b} is not held");
        self.meta[b as usize].0 += 1;
    }

    /// Marks held block `b` as holding `tokens` (a full block) after `parent`;
    /// returns its chain hash. A block already cached keeps its content.
    pub fn cache(&mut self, b: BlockId, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        debug_assert_eq!(tokens.len(), BLOCK_SIZE as usize);
        if let Some(c) = &self.content[b as usize] {
            return c.hash;
        }
        let hash = chain_hash(parent, tokens);
        self.content[b as usize] = Some(Content { hash, parent, tokens: tokens.into() });
        self.meta[b as usize].set(Meta::CACHED, true);
        self.by_hash.entry(hash).or_default().push(b);
        hash
    }

    /// Drops one reference to block `b` (`release(&[b])`); `false`, and
    /// nothing changed, for the null block, an id out of range or a block
    /// nobody holds.
    #[inline(always)]
    pub fn free(&mut self, b: BlockId) -> bool {
        // (the null block's count stays 0: it is never handed out; a held
        // block is never listed, so its word is its count plus CACHED)
        match self.meta.get_mut(b as usize) {
            Some(m) if m.0 == 1 => {
                // the common case: its only holder, caching nothing
                m.0 = 0;
                self.uncached.push(b);
                true
            }
            _ => self.free_shared(b),
        }
    }

    /// [`BlockPool::free`] of a block that is shared, cached, or not held.
    #[cold]
    #[inline(never)]
    fn free_shared(&mut self, b: BlockId) -> bool {
        let Some(m) = self.meta.get_mut(b as usize) else { return false };
        if m.ref_count() == 0 {
            return false;
        }
        m.0 -= 1;
        match m.0 {
            0 => self.uncached.push(b),
            Meta::CACHED => self.push_back(b),
            _ => {}
        }
        true
    }

    /// Drops one reference to each block of a table, last block first;
    /// blocks nobody holds any more return to the queue.
    #[inline(always)]
    pub fn release(&mut self, table: &[BlockId]) {
        // Blocks caching nothing go to the front in release order (the table's
        // last block first: pushed onto the stack first block first), cached
        // ones to the back in release order (a second pass, only if there are any).
        let mut any_cached = false;
        for &b in table {
            let m = &mut self.meta[b as usize];
            debug_assert!(m.ref_count() > 0, "block {b} released more often than held");
            m.0 -= 1;
            if m.ref_count() == 0 {
                if m.cached() {
                    any_cached = true;
                } else {
                    self.uncached.push(b);
                }
            }
        }
        if any_cached {
            for &b in table.iter().rev() {
                let m = self.meta[b as usize];
                if m.ref_count() == 0 && m.cached() && !m.listed() {
                    self.push_back(b);
                }
            }
        }
    }

    /// Checks the pool's own bookkeeping: queue links, counts, cache index.
    pub fn check(&self) -> Result<(), String> {
        let q = self.free_queue();
        if q.len() as u32 != self.n_free() {
            return Err(format!("free queue holds {} blocks, counters say {}", q.len(), self.n_free()));
        }
        let mut in_stack = vec![false; self.n_blocks as usize + 1];
        for &b in &self.uncached {
            if std::mem::replace(&mut in_stack[b as usize], true) {
                return Err(format!("block {b} twice among the free blocks"));
            }
        }
        for b in 1..=self.n_blocks {
            let m = self.meta[b as usize];
            let free = in_stack[b as usize] || m.listed();
            if free == (m.ref_count() > 0) || (in_stack[b as usize] && m.listed()) {
                return Err(format!("block {b}: ref count {} but free = {free}", m.ref_count()));
            }
            if (in_stack[b as usize] && m.cached()) || (m.listed() && !m.cached()) {
                return Err(format!("block {b}: cached = {} in the wrong part of the free queue", m.cached()));
            }
            if m.cached() != self.content[b as usize].is_some() {
                return Err(format!("block {b}: cached flag {} disagrees with its content", m.cached()));
            }
            if let Some(c) = &self.content[b as usize] {
                if !self.by_hash.get(&c.hash).is_some_and(|v| v.contains(&b)) {
                    return Err(format!("cached block {b} missing from the hash index"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(x: u32) -> Vec<u32> {
        vec![x; BLOCK_SIZE as usize]
    }

    #[test]
    fn queue_order_eviction_and_sharing() {
        let mut c = BlockPool::new(4);
        let (a, b) = (c.allocate().unwrap(), c.allocate().unwrap());
        assert_eq!((a, b), (1, 2));
        let ha = c.cache(a, ROOT_HASH, &toks(7));
        // b caches nothing: released to the front; a is cached: to the back
        c.release(&[a, b]);
        assert_eq!(c.free_queue(), vec![2, 3, 4, 1]);
        assert_eq!(c.lookup(ROOT_HASH, &toks(7)), Some((1, ha)));
        assert_eq!(c.lookup(ROOT_HASH, &toks(8)), None);
        assert_eq!(c.lookup(ha, &toks(7)), None, "a different parent never matches");
        c.share(1);
        assert_eq!((c.ref_count(1), c.n_free()), (1, 3));
        c.release(&[1]);
        // allocating everything evicts block 1's content
        for _ in 0..4 {
            c.allocate().unwrap();
        }
        assert_eq!(c.lookup(ROOT_HASH, &toks(7)), None);
        assert!(c.allocate().is_none());
        c.check().unwrap();
    }

    #[test]
    fn free_refuses_what_nobody_holds() {
        let mut c = BlockPool::new(2);
        let a = c.allocate().unwrap();
        assert!(!c.free(NULL_BLOCK) && !c.free(7) && !c.free(2));
        assert!(c.free(a) && !c.free(a), "a block is freed once");
        assert_eq!(c.free_queue(), vec![1, 2]);
        c.check().unwrap();
    }

    #[test]
    fn without_caching_it_is_a_lifo_free_list() {
        let mut c = BlockPool::new(6);
        let a: Vec<_> = (0..3).map(|_| c.allocate().unwrap()).collect();
        let b: Vec<_> = (0..2).map(|_| c.allocate().unwrap()).collect();
        assert_eq!((a.clone(), b.clone()), (vec![1, 2, 3], vec![4, 5]));
        c.release(&a);
        c.release(&b);
        // the last released table's last block first, as a stack would give them
        let order: Vec<_> = (0..6).map(|_| c.allocate().unwrap()).collect();
        assert_eq!(order, vec![5, 4, 3, 2, 1, 6]);
        c.check().unwrap();
    }
}
