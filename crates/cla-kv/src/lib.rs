//! `cla-kv`: the key/value cache of a Cross-Layer Attention decoder.
//!
//! # What it stores
//!
//! Cross-Layer Attention (Brandon et al. 2024, section 2) lets a *consumer* layer attend
//! over the keys and values of an earlier *producer* layer. Only producers get storage
//! here: one cache *slot* per producer, numbered densely as cla-core's
//! `KvSharing::slot_of` does. Reading any layer resolves through the sharing map to its
//! producer's slot, in place, without a copy. The cache's footprint per token is therefore
//! `2 * num_kv_heads * head_dim * num_producers * element size`, exactly
//! `cla_core::memory::kv_bytes_per_token`: half of a plain model's for CLA2.
//!
//! # Paging
//!
//! As in PagedAttention (Kwon et al. 2023, vLLM), positions live in fixed-size blocks
//! ([`KvCacheConfig::block_size`], 16 by default) drawn from a pool by a reference-counted
//! [`BlockAllocator`]; a sequence's [`BlockTable`] maps its logical blocks to physical
//! ones. Because every producer holds the same positions of a sequence, there is ONE
//! table per sequence for all slots, and a block id names the same positions in each
//! slot's plane ([`KvLayout`]). [`PagedKvCache::fork`] shares blocks by reference count;
//! a shared, partly filled block is copied before either side appends into it.
//!
//! # Storage split
//!
//! [`PagedKvCache`] is bookkeeping (sequences, tables, allocator, reservations,
//! accounting); it is generic over a [`KvStorage`] that only moves elements. The CPU
//! storage [`CpuKvStorage`] keeps the pool in host memory; a GPU storage elsewhere
//! implements the same trait and reuses everything else. Kernels address blocks through
//! [`KvLayout`] and the `u32` view of a [`BlockTable`]; a kernel that appends the reserved
//! rows itself tells the cache with [`PagedKvCache::mark_written`] instead of `write`.
//!
//! # A decoder step
//!
//! ```
//! use cla_core::SharingPattern;
//! use cla_kv::{KvCacheConfig, KvDType, KvShape, PagedKvCache};
//!
//! let sharing = SharingPattern::Cla(2).build(4).unwrap(); // layers 0,1 | 2,3
//! let shape = KvShape::new(2, 4, sharing).unwrap(); // 2 kv heads of 4 dims
//! let mut cache = PagedKvCache::new(shape, KvCacheConfig::new(8, KvDType::F32)).unwrap();
//! let seq = cache.add_sequence();
//!
//! let n = 3; // a prompt of 3 tokens
//! cache.reserve(seq, n).unwrap(); // once per forward; the only step that can be "full"
//! for layer in 0..4 {
//!     if cache.sharing().is_producer(layer) {
//!         let kv = vec![layer as f32; n * 2 * 4]; // [token][kv head][dim]
//!         cache.write(seq, layer, &kv, &kv).unwrap();
//!     }
//!     // Attention of `layer` reads its producer's slot in place.
//!     for block in cache.blocks(seq, layer).unwrap() {
//!         let k = block.keys_of_head(0).unwrap(); // block.len rows of head_dim
//!         assert_eq!(k.get(0), Some(cache.sharing().producer_of(layer) as f32));
//!     }
//! }
//! assert_eq!(cache.commit(seq).unwrap(), 3);
//! ```

#![warn(missing_docs)]

pub mod block;
pub mod cache;
pub mod config;
pub mod error;
pub mod layout;
pub mod storage;

pub use block::{BlockAllocator, BlockId, BlockTable};
pub use cache::{KvBlock, KvBlocks, KvMemory, PagedKvCache, SequenceId, SlotView};
pub use config::{KvCacheConfig, KvDType, KvShape};
pub use error::{KvError, Result};
pub use layout::{KvLayout, KvPart};
pub use storage::{CpuKvStorage, KvSlice, KvStorage};
