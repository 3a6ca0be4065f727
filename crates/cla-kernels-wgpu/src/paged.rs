//! The paged K/V cache as the kernels see it: a pool view ([`KvPool`]: buffers, base offset
//! and strides) and a batch of sequences ([`SeqBatch`]: per-sequence query rows, length and
//! block table).
//!
//! Element (block `b`, kv head `h`, token-in-block `t`, dim `d`) of a pool lives at
//! `base + b*block_stride + h*head_stride + t*token_stride + d`. Logical token `p` of a sequence
//! lives in block `table[p / block_size]` at offset `p % block_size`. The cache crate owns the
//! CPU side (allocation, tables); these types only describe it. With Cross-Layer Attention, a
//! consumer layer is simply given the producer layer's base.

use crate::context::GpuContext;
use crate::error::{GpuError, Result, ensure_arg};
use crate::tensor::{DType, GpuTensor, ReusableBuffer};

/// Shape and strides (in elements) of one layer's region of a paged pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// Tokens per block.
    pub block_size: u32,
    /// Blocks in the region (block ids must be below this).
    pub num_blocks: u32,
    /// K/V heads.
    pub n_kv_heads: u32,
    /// Dims per head (even).
    pub head_dim: u32,
    /// Elements from one block to the next.
    pub block_stride: u32,
    /// Elements from one head to the next within a block.
    pub head_stride: u32,
    /// Elements from one token to the next within a block and head.
    pub token_stride: u32,
}

impl PagedKvLayout {
    /// The block-major, head-major layout `[block][head][token][dim]`.
    pub fn contiguous(num_blocks: u32, block_size: u32, n_kv_heads: u32, head_dim: u32) -> Self {
        Self {
            block_size,
            num_blocks,
            n_kv_heads,
            head_dim,
            block_stride: n_kv_heads * block_size * head_dim,
            head_stride: block_size * head_dim,
            token_stride: head_dim,
        }
    }

    /// One past the largest element offset the region addresses (relative to its base).
    pub fn extent(&self) -> u64 {
        if self.num_blocks == 0 || self.n_kv_heads == 0 || self.block_size == 0 {
            return 0;
        }
        u64::from(self.num_blocks - 1) * u64::from(self.block_stride)
            + u64::from(self.n_kv_heads - 1) * u64::from(self.head_stride)
            + u64::from(self.block_size - 1) * u64::from(self.token_stride)
            + u64::from(self.head_dim)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        ensure_arg!(
            self.block_size > 0 && self.num_blocks > 0 && self.n_kv_heads > 0,
            "kv layout: block_size, num_blocks and n_kv_heads must be > 0 ({self:?})"
        );
        ensure_arg!(
            self.head_dim >= 2 && self.head_dim.is_multiple_of(2),
            "kv layout: head_dim must be even and >= 2, got {}",
            self.head_dim
        );
        ensure_arg!(
            self.token_stride >= self.head_dim,
            "kv layout: token_stride {} < head_dim {}",
            self.token_stride,
            self.head_dim
        );
        ensure_arg!(
            self.extent() <= u64::from(u32::MAX),
            "kv layout: a region of {} elements is above the u32 index range",
            self.extent()
        );
        Ok(())
    }
}

/// K and V pools of one layer (or of the producer layer whose K/V a CLA consumer reads).
#[derive(Debug, Clone, Copy)]
pub struct KvPool<'a> {
    /// K pool (f32 or f16).
    pub k: &'a GpuTensor,
    /// V pool (f32 or f16).
    pub v: &'a GpuTensor,
    /// Element offset of this layer's K region in `k`.
    pub k_base: u64,
    /// Element offset of this layer's V region in `v`.
    pub v_base: u64,
    /// Region layout, shared by K and V.
    pub layout: PagedKvLayout,
}

impl KvPool<'_> {
    pub(crate) fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        for (name, t, base) in [("k", self.k, self.k_base), ("v", self.v, self.v_base)] {
            ensure_arg!(
                matches!(t.dtype, DType::F32 | DType::F16),
                "kv pool {name}: expected f32 or f16, got {}",
                t.dtype.name()
            );
            let end = base + self.layout.extent();
            ensure_arg!(
                end <= t.numel() as u64,
                "kv pool {name}: base {base} + region {} exceeds the pool's {} elements",
                self.layout.extent(),
                t.numel()
            );
        }
        Ok(())
    }
}

/// One sequence of a batch, described on the CPU.
#[derive(Debug, Clone, Copy)]
pub struct SeqDesc<'a> {
    /// New query tokens of this step (prefill chunk length; 1 for decode). They are the last
    /// `n_query` tokens of the sequence: positions `kv_len - n_query .. kv_len`.
    pub n_query: usize,
    /// Tokens in the cache after this step's K/V are appended.
    pub kv_len: usize,
    /// Block ids; at least `kv_len.div_ceil(block_size)` of them.
    pub block_table: &'a [u32],
}

/// Per-sequence metadata on the GPU, for one batched dispatch.
///
/// `meta` holds four u32 per sequence: first query row, query count, kv length, offset of the
/// sequence's block table in `block_tables`. `slots` holds, per query row, the pool slot
/// (`block * block_size + offset`) where that token's K/V go, for [`GpuContext::kv_append`].
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// `[n_seqs, 4]` u32.
    pub meta: GpuTensor,
    /// All block tables, concatenated, u32.
    pub block_tables: GpuTensor,
    /// `[total_query]` u32 slots.
    pub slots: GpuTensor,
    /// Sequences.
    pub n_seqs: usize,
    /// Query rows over all sequences.
    pub total_query: usize,
    /// Largest `n_query`.
    pub max_query: usize,
    /// Largest `kv_len`.
    pub max_kv_len: usize,
}

/// The buffers [`SeqBatch::upload_reusing`] writes a batch into, kept from step to step (see
/// [`ReusableBuffer`] for when the values arrive).
#[derive(Debug, Default)]
pub struct SeqBatchBuffers {
    meta: ReusableBuffer,
    block_tables: ReusableBuffer,
    slots: ReusableBuffer,
}

impl SeqBatchBuffers {
    /// Empty buffers; the first upload creates them.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A batch's metadata, tables and slots on the CPU, checked against the layout.
struct Packed {
    meta: Vec<u32>,
    tables: Vec<u32>,
    slots: Vec<u32>,
    max_query: usize,
    max_kv_len: usize,
}

impl Packed {
    fn new(seqs: &[SeqDesc<'_>], layout: &PagedKvLayout) -> Result<Self> {
        layout.validate()?;
        ensure_arg!(!seqs.is_empty(), "seq batch: no sequences");
        let bs = layout.block_size as usize;
        let mut meta = Vec::with_capacity(seqs.len() * 4);
        let mut tables = Vec::new();
        let mut slots = Vec::new();
        let to_u32 = |what: &str, v: usize| {
            u32::try_from(v)
                .map_err(|_| GpuError::InvalidArgument(format!("seq batch: {what} {v} too large")))
        };
        for (i, s) in seqs.iter().enumerate() {
            ensure_arg!(
                s.n_query >= 1 && s.n_query <= s.kv_len,
                "seq {i}: n_query {} must be in 1..=kv_len ({})",
                s.n_query,
                s.kv_len
            );
            let blocks = s.kv_len.div_ceil(bs);
            ensure_arg!(
                s.block_table.len() >= blocks,
                "seq {i}: kv_len {} needs {blocks} blocks of {bs}, block table has {}",
                s.kv_len,
                s.block_table.len()
            );
            if let Some(&b) = s.block_table[..blocks]
                .iter()
                .find(|&&b| b >= layout.num_blocks)
            {
                return Err(GpuError::InvalidArgument(format!(
                    "seq {i}: block id {b} >= num_blocks {}",
                    layout.num_blocks
                )));
            }
            meta.extend([
                to_u32("query row", slots.len())?,
                to_u32("n_query", s.n_query)?,
                to_u32("kv_len", s.kv_len)?,
                to_u32("table offset", tables.len())?,
            ]);
            for p in s.kv_len - s.n_query..s.kv_len {
                slots.push(to_u32(
                    "slot",
                    s.block_table[p / bs] as usize * bs + p % bs,
                )?);
            }
            tables.extend_from_slice(&s.block_table[..blocks]);
        }
        Ok(Self {
            meta,
            tables,
            slots,
            max_query: seqs.iter().map(|s| s.n_query).max().unwrap_or(0),
            max_kv_len: seqs.iter().map(|s| s.kv_len).max().unwrap_or(0),
        })
    }

    fn into_batch(
        self,
        mut upload: impl FnMut(&[u32], &[usize], Part) -> Result<GpuTensor>,
    ) -> Result<SeqBatch> {
        let n_seqs = self.meta.len() / 4;
        Ok(SeqBatch {
            meta: upload(&self.meta, &[n_seqs, 4], Part::Meta)?,
            block_tables: upload(&self.tables, &[self.tables.len()], Part::Tables)?,
            slots: upload(&self.slots, &[self.slots.len()], Part::Slots)?,
            n_seqs,
            total_query: self.slots.len(),
            max_query: self.max_query,
            max_kv_len: self.max_kv_len,
        })
    }
}

/// Which of a batch's three buffers an upload is for.
#[derive(Clone, Copy)]
enum Part {
    Meta,
    Tables,
    Slots,
}

impl SeqBatch {
    /// Validates `seqs` against `layout` and uploads the metadata, tables and slots into new
    /// buffers.
    pub fn upload(ctx: &GpuContext, seqs: &[SeqDesc<'_>], layout: &PagedKvLayout) -> Result<Self> {
        Packed::new(seqs, layout)?.into_batch(|data, shape, _| ctx.upload_u32(data, shape))
    }

    /// [`SeqBatch::upload`] into `buffers`, which a decoder keeps from step to step: no
    /// buffers are created once they are large enough, so the bind groups that use them can
    /// be reused.
    pub fn upload_reusing(
        ctx: &GpuContext,
        seqs: &[SeqDesc<'_>],
        layout: &PagedKvLayout,
        buffers: &mut SeqBatchBuffers,
    ) -> Result<Self> {
        Packed::new(seqs, layout)?.into_batch(|data, shape, part| {
            let (slot, label) = match part {
                Part::Meta => (&mut buffers.meta, "cla seq meta"),
                Part::Tables => (&mut buffers.block_tables, "cla block tables"),
                Part::Slots => (&mut buffers.slots, "cla kv slots"),
            };
            ctx.upload_u32_reusing(slot, data, shape, label)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ctx;

    /// A batch written into kept buffers holds what a freshly uploaded one holds, step after
    /// step, with tables growing and shrinking.
    #[test]
    fn reused_batch_buffers_hold_what_an_upload_holds() {
        let c = ctx();
        let layout = PagedKvLayout::contiguous(64, 4, 2, 8);
        let mut buffers = SeqBatchBuffers::new();
        let table_a: Vec<u32> = (0..20).rev().collect();
        let table_b: Vec<u32> = (20..40).collect();
        let steps: [Vec<SeqDesc<'_>>; 3] = [
            vec![SeqDesc {
                n_query: 5,
                kv_len: 5,
                block_table: &table_a,
            }],
            vec![
                SeqDesc {
                    n_query: 1,
                    kv_len: 6,
                    block_table: &table_a,
                },
                SeqDesc {
                    n_query: 3,
                    kv_len: 70,
                    block_table: &table_b,
                },
            ],
            vec![SeqDesc {
                n_query: 1,
                kv_len: 2,
                block_table: &table_b,
            }],
        ];
        for seqs in &steps {
            let fresh = SeqBatch::upload(c, seqs, &layout).unwrap();
            let kept = SeqBatch::upload_reusing(c, seqs, &layout, &mut buffers).unwrap();
            for (a, b) in [
                (&fresh.meta, &kept.meta),
                (&fresh.block_tables, &kept.block_tables),
                (&fresh.slots, &kept.slots),
            ] {
                assert_eq!(a.shape, b.shape);
                assert_eq!(c.read_u32(a).unwrap(), c.read_u32(b).unwrap());
            }
            assert_eq!(
                (
                    fresh.n_seqs,
                    fresh.total_query,
                    fresh.max_query,
                    fresh.max_kv_len
                ),
                (
                    kept.n_seqs,
                    kept.total_query,
                    kept.max_query,
                    kept.max_kv_len
                )
            );
        }
        // Bad input is refused before anything is written.
        let short = [SeqDesc {
            n_query: 1,
            kv_len: 90,
            block_table: &table_a,
        }];
        assert!(SeqBatch::upload_reusing(c, &short, &layout, &mut buffers).is_err());
    }
}
