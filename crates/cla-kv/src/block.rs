//! Blocks and who holds them: [`BlockAllocator`] (a free list with reference counts) and
//! [`BlockTable`] (a sequence's logical -> physical block map).
//!
//! As in PagedAttention (Kwon et al. 2023, the vLLM paper, section 4), a sequence's keys
//! and values live in fixed-size blocks that need not be contiguous; a block table maps
//! the sequence's `i`-th block of `block_size` positions to a physical block. Blocks are
//! reference-counted so that forked sequences share their common prefix; a shared block
//! is copied before anyone writes into it (copy-on-write).
//!
//! Cross-Layer Attention (Brandon et al. 2024, section 2) adds one fact: every producer
//! layer caches the same positions of a sequence, so ONE table per sequence serves every
//! producer slot; a block id names the same tokens in every slot's plane.

use bytemuck::{Pod, Zeroable};
use std::fmt;

/// A physical block of the pool, `0..num_blocks`. `#[repr(transparent)]` over `u32`, so a
/// block table can be handed to a GPU kernel as `&[u32]` with `bytemuck::cast_slice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
#[repr(transparent)]
pub struct BlockId(u32);

impl BlockId {
    /// The block's index in the pool.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    #[cfg(test)]
    pub(crate) fn zeroed_at(i: u32) -> Self {
        BlockId(i)
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// The pool's free list and per-block reference counts.
///
/// Mutation is private to the crate: only the cache allocates and releases, so the
/// counts always equal the number of block-table entries naming each block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    /// Free blocks; the next allocation pops the last one.
    free: Vec<BlockId>,
    /// References per block (0 = free).
    ref_counts: Vec<u32>,
}

impl BlockAllocator {
    /// An allocator of `num_blocks` free blocks. The caller guarantees
    /// `num_blocks <= u32::MAX as usize + 1`.
    pub(crate) fn new(num_blocks: usize) -> Self {
        let free = (0..num_blocks)
            .rev()
            .map(|i| BlockId(u32::try_from(i).expect("block count checked by the cache")))
            .collect();
        Self {
            free,
            ref_counts: vec![0; num_blocks],
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks no sequence holds.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// How many block-table entries name `block` (0 if it is free or out of range).
    pub fn ref_count(&self, block: BlockId) -> usize {
        self.ref_counts.get(block.index()).copied().unwrap_or(0) as usize
    }

    /// Takes a free block with one reference, or `None` if none is free.
    pub(crate) fn allocate(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        self.ref_counts[b.index()] = 1;
        Some(b)
    }

    /// Adds a reference to a held block.
    pub(crate) fn retain(&mut self, block: BlockId) {
        debug_assert!(self.ref_counts[block.index()] > 0, "retain of a free block");
        self.ref_counts[block.index()] += 1;
    }

    /// Drops a reference; the block returns to the free list at zero.
    pub(crate) fn release(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block.index()];
        debug_assert!(*rc > 0, "release of a free block");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }
}

/// A sequence's blocks, in position order: position `p` lives in `blocks()[p / block_size]`
/// at token `p % block_size`. Holds the committed tokens and, while a reservation is open,
/// the blocks reserved for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
}

impl BlockTable {
    /// The physical blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// The table as `u32` block indices, ready to upload for a GPU kernel.
    pub fn as_u32(&self) -> &[u32] {
        bytemuck::cast_slice(&self.blocks)
    }
}
