//! [`KvLayout`]: where every cached element lives, as plain numbers a GPU kernel can use.
//!
//! The pool is one array with a slot dimension, ordered
//! `[slot][K|V][block][kv head][token in block][dim]`:
//!
//! - `slot` is the producer's dense cache slot (`KvSharing::slot_of`); consumers have none.
//! - Each `(slot, K|V)` *plane* is contiguous (`plane_len` elements), so a kernel for one
//!   layer binds or addresses only its producer's two planes, and a storage may keep each
//!   plane in its own buffer (useful under GPU binding-size limits) using offsets relative
//!   to the plane start.
//! - Inside a block the kv head is outermost: the `block_size x head_dim` tile of one kv head
//!   is contiguous, which is what every query head of a GQA group reads.
//! - A block id means the same tokens in every plane: one block table per sequence serves
//!   every producer slot (all producers hold the same positions of a sequence).
//!
//! Element `(slot, K, block b, head h, token t, dim d)` is at
//! `key_base(slot) + b*block_stride + h*head_stride + t*token_stride + d`; values the same
//! from `value_base(slot)`. All offsets count elements of `dtype`, not bytes.

use crate::config::{KvCacheConfig, KvDType, KvShape};
use crate::error::{KvError, Result};
use std::fmt;

/// Keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvPart {
    /// The keys.
    Keys,
    /// The values.
    Values,
}

/// The flat description of the pool's layout (see the module docs). Built by
/// [`KvLayout::new`]; every stride is derived from the sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Producer slots (one per producer layer).
    pub num_slots: usize,
    /// Blocks in the pool; block ids run `0..num_blocks`.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads per token.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type.
    pub dtype: KvDType,
    /// Elements between consecutive tokens of one head in a block (`head_dim`).
    pub token_stride: usize,
    /// Elements between consecutive kv heads in a block (`block_size * head_dim`).
    pub head_stride: usize,
    /// Elements between consecutive blocks of a plane (`num_kv_heads * block_size * head_dim`).
    pub block_stride: usize,
    /// Elements of one `(slot, K|V)` plane (`num_blocks * block_stride`).
    pub plane_len: usize,
}

impl KvLayout {
    /// The layout of a pool for `shape` sized by `config`. Fails on a zero size or if the
    /// pool's element count overflows `usize`.
    pub fn new(shape: &KvShape, config: &KvCacheConfig) -> Result<Self> {
        if config.block_size == 0 || config.num_blocks == 0 {
            return Err(KvError::InvalidConfig {
                reason: format!(
                    "block_size ({}) and num_blocks ({}) must be positive",
                    config.block_size, config.num_blocks
                ),
            });
        }
        let overflow = || KvError::InvalidConfig {
            reason: format!(
                "a pool of {} blocks x {} tokens x {} slots does not fit in memory addresses",
                config.num_blocks,
                config.block_size,
                shape.num_slots()
            ),
        };
        let head_stride = config
            .block_size
            .checked_mul(shape.head_dim())
            .ok_or_else(overflow)?;
        let block_stride = head_stride
            .checked_mul(shape.num_kv_heads())
            .ok_or_else(overflow)?;
        let plane_len = block_stride
            .checked_mul(config.num_blocks)
            .ok_or_else(overflow)?;
        let layout = Self {
            num_slots: shape.num_slots(),
            num_blocks: config.num_blocks,
            block_size: config.block_size,
            num_kv_heads: shape.num_kv_heads(),
            head_dim: shape.head_dim(),
            dtype: config.dtype,
            token_stride: shape.head_dim(),
            head_stride,
            block_stride,
            plane_len,
        };
        layout
            .total_len()
            .checked_mul(config.dtype.size_bytes())
            .ok_or_else(overflow)?;
        Ok(layout)
    }

    /// Elements of the whole pool: `2 * num_slots * plane_len`. Never overflows for a
    /// layout built by [`KvLayout::new`].
    pub fn total_len(&self) -> usize {
        2 * self.num_slots * self.plane_len
    }

    /// Bytes of the whole pool.
    pub fn total_bytes(&self) -> u64 {
        self.total_len() as u64 * self.dtype.size_bytes() as u64
    }

    /// Offset of the keys plane of `slot`.
    pub fn key_base(&self, slot: usize) -> usize {
        2 * slot * self.plane_len
    }

    /// Offset of the values plane of `slot`.
    pub fn value_base(&self, slot: usize) -> usize {
        (2 * slot + 1) * self.plane_len
    }

    /// Offset of the plane of `slot` holding `part`.
    pub fn base(&self, slot: usize, part: KvPart) -> usize {
        match part {
            KvPart::Keys => self.key_base(slot),
            KvPart::Values => self.value_base(slot),
        }
    }

    /// Offset of element `(slot, part, block, head, token, dim)`.
    pub fn offset(
        &self,
        slot: usize,
        part: KvPart,
        block: usize,
        head: usize,
        token: usize,
        dim: usize,
    ) -> usize {
        self.base(slot, part)
            + block * self.block_stride
            + head * self.head_stride
            + token * self.token_stride
            + dim
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} slots x {} blocks x {} tokens x {} kv heads x {} dims, {}",
            self.num_slots,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype
        )
    }
}
