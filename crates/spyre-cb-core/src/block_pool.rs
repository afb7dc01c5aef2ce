//! The KV block pool: O(1) allocate and free over a LIFO free list.
//!
//! Physical block 0 is the null block: it pads block tables and the slots of
//! padding tokens, and is never handed out. Usable blocks are `1..=n_blocks`.

/// Index of a physical KV block.
pub type BlockId = u32;

/// The physical block that pads block tables; never allocated.
pub const NULL_BLOCK: BlockId = 0;

#[derive(Clone, Debug)]
pub struct BlockPool {
    n_blocks: u32,
    free: Vec<BlockId>,
    allocated: Vec<bool>,
}

impl BlockPool {
    pub fn new(n_blocks: u32) -> Self {
        // Lowest ids on top of the stack, so allocation order is 1, 2, 3, ...
        let free: Vec<BlockId> = (1..=n_blocks).rev().collect();
        Self { n_blocks, free, allocated: vec![false; n_blocks as usize + 1] }
    }

    /// Usable blocks (excluding the null block).
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }

    /// Physical blocks a KV cache needs: the usable ones plus the null block.
    pub fn n_physical_blocks(&self) -> u32 {
        self.n_blocks + 1
    }

    pub fn n_free(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn n_used(&self) -> u32 {
        self.n_blocks - self.n_free()
    }

    pub fn is_allocated(&self, block: BlockId) -> bool {
        self.allocated.get(block as usize).copied().unwrap_or(false)
    }

    /// Takes one free block, or `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        self.allocated[b as usize] = true;
        Some(b)
    }

    /// Returns a block to the pool. Returns `false` (and changes nothing) for
    /// the null block, an id out of range, or a block that is not allocated.
    pub fn free(&mut self, block: BlockId) -> bool {
        match self.allocated.get_mut(block as usize) {
            Some(a) if *a && block != NULL_BLOCK => {
                *a = false;
                self.free.push(block);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_order_and_never_the_null_block() {
        let mut p = BlockPool::new(3);
        assert_eq!(p.n_physical_blocks(), 4);
        assert_eq!(p.allocate(), Some(1));
        assert_eq!(p.allocate(), Some(2));
        assert_eq!(p.allocate(), Some(3));
        assert_eq!(p.allocate(), None);
        assert_eq!(p.n_used(), 3);
        assert_eq!(p.n_free(), 0);
    }

    #[test]
    fn free_returns_blocks_and_rejects_double_free() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        assert!(p.free(a));
        assert!(!p.free(a), "double free must be refused");
        assert!(!p.free(NULL_BLOCK));
        assert!(!p.free(99));
        assert_eq!(p.n_free(), 2);
        // LIFO: the block just freed comes back first.
        assert_eq!(p.allocate(), Some(a));
    }
}
