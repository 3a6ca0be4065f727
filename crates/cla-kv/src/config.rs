//! What a cache holds ([`KvShape`]: heads, head size, sharing map) and how big it is
//! ([`KvCacheConfig`]: block size, block count, element type).

use crate::error::{KvError, Result};
use cla_core::memory::kv_bytes_per_token_for;
use cla_core::{DType, KvSharing, ModelConfig};
use std::fmt;

/// Element type of cached keys and values. Appends take `f32` and convert; reads return
/// `f32` (raw access gives the stored type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDType {
    /// 32-bit IEEE float: exact.
    F32,
    /// 16-bit IEEE float: values are rounded to nearest on write.
    F16,
}

impl KvDType {
    /// Both types, in a stable order.
    pub const ALL: [KvDType; 2] = [KvDType::F32, KvDType::F16];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        self.to_dtype().size_bytes()
    }

    /// The matching `cla-core` type, for its memory arithmetic.
    pub const fn to_dtype(self) -> DType {
        match self {
            KvDType::F32 => DType::F32,
            KvDType::F16 => DType::F16,
        }
    }
}

impl TryFrom<DType> for KvDType {
    type Error = KvError;

    fn try_from(d: DType) -> Result<Self> {
        match d {
            DType::F32 => Ok(KvDType::F32),
            DType::F16 => Ok(KvDType::F16),
            other => Err(KvError::InvalidConfig {
                reason: format!("the KV cache stores f32 or f16, not {other}"),
            }),
        }
    }
}

impl fmt::Display for KvDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_dtype().name())
    }
}

/// The shape of what is cached per token: `num_kv_heads` heads of `head_dim` elements, for
/// keys and for values, in each producer layer of `sharing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvShape {
    num_kv_heads: usize,
    head_dim: usize,
    sharing: KvSharing,
}

impl KvShape {
    /// A shape from its parts; both sizes must be positive.
    pub fn new(num_kv_heads: usize, head_dim: usize, sharing: KvSharing) -> Result<Self> {
        if num_kv_heads == 0 || head_dim == 0 {
            return Err(KvError::InvalidConfig {
                reason: format!(
                    "num_kv_heads ({num_kv_heads}) and head_dim ({head_dim}) must be positive"
                ),
            });
        }
        Ok(Self {
            num_kv_heads,
            head_dim,
            sharing,
        })
    }

    /// The shape of `config`'s cache.
    pub fn from_model(config: &ModelConfig) -> Result<Self> {
        Self::new(
            config.num_key_value_heads,
            config.head_dim,
            config.kv_sharing.clone(),
        )
    }

    /// Key/value heads per producer layer.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Elements of one token's keys (or values) in one layer: `num_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The layer -> K/V-source map.
    pub fn sharing(&self) -> &KvSharing {
        &self.sharing
    }

    /// Cache slots: one per producer layer.
    pub fn num_slots(&self) -> usize {
        self.sharing.num_producers()
    }

    /// Bytes one token costs in every producer slot together, stored as `dtype`; equal to
    /// `cla_core::memory::kv_bytes_per_token`.
    pub fn bytes_per_token(&self, dtype: KvDType) -> u64 {
        kv_bytes_per_token_for(
            self.num_kv_heads,
            self.head_dim,
            self.sharing.num_producers(),
            dtype.to_dtype(),
        )
    }
}

/// How big the cache is: `num_blocks` blocks of `block_size` tokens, stored as `dtype`.
///
/// A block id names the same tokens in every producer slot, so one block costs
/// `block_size * KvShape::bytes_per_token(dtype)` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheConfig {
    /// Tokens per block (PagedAttention's block size). Default 16.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Element type of the stored keys and values.
    pub dtype: KvDType,
}

impl KvCacheConfig {
    /// The default tokens per block, as in vLLM.
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    /// `num_blocks` blocks of [`Self::DEFAULT_BLOCK_SIZE`] tokens.
    pub fn new(num_blocks: usize, dtype: KvDType) -> Self {
        Self {
            block_size: Self::DEFAULT_BLOCK_SIZE,
            num_blocks,
            dtype,
        }
    }

    /// The same config with `block_size` tokens per block.
    pub fn with_block_size(mut self, block_size: usize) -> Self {
        self.block_size = block_size;
        self
    }

    /// As many blocks of `block_size` tokens as fit in `budget_bytes` for `shape`.
    /// Fails if not even one block fits.
    pub fn from_byte_budget(
        shape: &KvShape,
        budget_bytes: u64,
        block_size: usize,
        dtype: KvDType,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(KvError::InvalidConfig {
                reason: "block_size must be positive".into(),
            });
        }
        let block_bytes = block_size as u64 * shape.bytes_per_token(dtype);
        let num_blocks = budget_bytes / block_bytes;
        if num_blocks == 0 {
            return Err(KvError::InvalidConfig {
                reason: format!(
                    "a budget of {budget_bytes} bytes holds no block of {block_size} tokens \
                     ({block_bytes} bytes); raise the budget or lower block_size"
                ),
            });
        }
        Ok(Self {
            block_size,
            num_blocks: usize::try_from(num_blocks).unwrap_or(usize::MAX),
            dtype,
        })
    }

    /// Bytes of one block for `shape` (all producer slots, keys and values).
    pub fn block_bytes(&self, shape: &KvShape) -> u64 {
        self.block_size as u64 * shape.bytes_per_token(self.dtype)
    }

    /// Bytes of the whole pool for `shape`.
    pub fn capacity_bytes(&self, shape: &KvShape) -> u64 {
        self.num_blocks as u64 * self.block_bytes(shape)
    }
}
