//! [`GpuKvStorage`]: the paged KV pool in GPU buffers, behind `cla-kv`'s [`KvStorage`]
//! trait, so that the GPU decoder reuses the cache's allocator, block tables, reservations
//! and accounting unchanged.
//!
//! The pool is laid out exactly as [`KvLayout`] describes, with each `(slot, K|V)` plane in
//! its own buffer (offsets relative to the plane start, as the layout allows): a kernel for
//! one layer binds only its producer's two planes, and no single buffer has to hold the whole
//! pool (GPU buffers and bindings have size limits).
//!
//! Keys and values of a forward pass are written by the `kv_append` kernel, not through
//! [`KvStorage::write_tokens`]; the decoder then tells the cache with
//! `PagedKvCache::mark_written`, which moves nothing. `write_tokens` uploads host data (used
//! by tests and by anyone filling a pool from the CPU).

use cla_kernels_wgpu::{DType, GpuContext, GpuError, GpuTensor, KvPool, PagedKvLayout};
use cla_kv::{BlockId, KvDType, KvLayout, KvPart, KvStorage};
use half::f16;
use std::fmt;
use std::sync::Arc;

/// A paged KV pool on the GPU: one buffer per `(producer slot, K|V)` plane.
pub struct GpuKvStorage {
    ctx: Arc<GpuContext>,
    layout: KvLayout,
    paged: PagedKvLayout,
    /// Plane `2 * slot` holds the keys of `slot`, plane `2 * slot + 1` its values.
    planes: Vec<GpuTensor>,
}

impl GpuKvStorage {
    /// A zeroed pool for `layout` on `ctx`. Fails when a plane exceeds the adapter's buffer
    /// size or the kernels' 32-bit element offsets.
    pub fn new(ctx: Arc<GpuContext>, layout: KvLayout) -> Result<Self, GpuError> {
        let to_u32 = |what: &str, v: usize| {
            u32::try_from(v).map_err(|_| {
                GpuError::InvalidArgument(format!("kv pool: {what} = {v} does not fit in u32"))
            })
        };
        let paged = PagedKvLayout {
            block_size: to_u32("block_size", layout.block_size)?,
            num_blocks: to_u32("num_blocks", layout.num_blocks)?,
            n_kv_heads: to_u32("num_kv_heads", layout.num_kv_heads)?,
            head_dim: to_u32("head_dim", layout.head_dim)?,
            block_stride: to_u32("block_stride", layout.block_stride)?,
            head_stride: to_u32("head_stride", layout.head_stride)?,
            token_stride: to_u32("token_stride", layout.token_stride)?,
        };
        to_u32("plane length", layout.plane_len)?;
        let dtype = gpu_dtype(layout.dtype);
        let planes = (0..2 * layout.num_slots)
            .map(|p| {
                let label = format!(
                    "kv slot {} {}",
                    p / 2,
                    if p % 2 == 0 { "keys" } else { "values" }
                );
                ctx.create_tensor(&[layout.plane_len], dtype, &label)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            ctx,
            layout,
            paged,
            planes,
        })
    }

    /// The buffer of `slot`'s `part` plane (`plane_len` elements of the pool's type).
    pub fn plane(&self, slot: usize, part: KvPart) -> &GpuTensor {
        let i = 2 * slot
            + match part {
                KvPart::Keys => 0,
                KvPart::Values => 1,
            };
        &self.planes[i]
    }

    /// The layout as the kernels take it (identical strides to [`KvLayout`]).
    pub fn paged_layout(&self) -> PagedKvLayout {
        self.paged
    }

    /// The kernels' view of producer `slot`'s keys and values. A consumer layer is given its
    /// producer's slot: that is all Cross-Layer Attention asks of the kernels.
    pub fn pool(&self, slot: usize) -> KvPool<'_> {
        KvPool {
            k: self.plane(slot, KvPart::Keys),
            v: self.plane(slot, KvPart::Values),
            k_base: 0,
            v_base: 0,
            layout: self.paged,
        }
    }

    fn elem_bytes(&self) -> u64 {
        self.layout.dtype.size_bytes() as u64
    }

    /// Byte range of `block` inside a plane.
    fn block_bytes(&self, block: BlockId) -> (u64, u64) {
        let size = self.layout.block_stride as u64 * self.elem_bytes();
        (block.index() as u64 * size, size)
    }

    fn scratch(&self, size: u64, label: &str) -> wgpu::Buffer {
        self.ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4),
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Uploads `src` (token-major `[token][kv head][dim]`) into tokens `offset..` of the
    /// block at byte `block_start` of `plane`, one write per kv head.
    fn scatter(&self, plane: &GpuTensor, block_start: u64, offset: usize, src: &[f32]) {
        let l = &self.layout;
        let d = l.head_dim;
        let tokens = src.len() / (l.num_kv_heads * d);
        let mut row = Vec::with_capacity(tokens * d);
        for h in 0..l.num_kv_heads {
            row.clear();
            for t in 0..tokens {
                let at = (t * l.num_kv_heads + h) * d;
                row.extend_from_slice(&src[at..at + d]);
            }
            let elem = h * l.head_stride + offset * l.token_stride;
            let at = block_start + elem as u64 * self.elem_bytes();
            match l.dtype {
                KvDType::F32 => {
                    self.ctx
                        .queue()
                        .write_buffer(&plane.buffer, at, bytemuck::cast_slice(&row));
                }
                KvDType::F16 => {
                    // head_dim is even, so offsets and sizes stay multiples of 4 bytes.
                    let halves: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
                    self.ctx
                        .queue()
                        .write_buffer(&plane.buffer, at, bytemuck::cast_slice(&halves));
                }
            }
        }
    }
}

fn gpu_dtype(dtype: KvDType) -> DType {
    match dtype {
        KvDType::F32 => DType::F32,
        KvDType::F16 => DType::F16,
    }
}

impl KvStorage for GpuKvStorage {
    fn layout(&self) -> &KvLayout {
        &self.layout
    }

    fn write_tokens(
        &mut self,
        slot: usize,
        block: BlockId,
        offset: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let (start, _) = self.block_bytes(block);
        self.scatter(self.plane(slot, KvPart::Keys), start, offset, keys);
        self.scatter(self.plane(slot, KvPart::Values), start, offset, values);
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        // A buffer cannot be both source and destination of one copy: go through a
        // temporary holding the block of every plane. Submitted without waiting; later
        // submissions (the forward pass) are ordered after it.
        let (s, size) = self.block_bytes(src);
        let (d, _) = self.block_bytes(dst);
        let tmp = self.scratch(size * self.planes.len() as u64, "kv copy-on-write");
        let mut enc = self.ctx.encoder();
        for (i, plane) in self.planes.iter().enumerate() {
            enc.copy_buffer_to_buffer(&plane.buffer, s, &tmp, i as u64 * size, size);
        }
        for (i, plane) in self.planes.iter().enumerate() {
            enc.copy_buffer_to_buffer(&tmp, i as u64 * size, &plane.buffer, d, size);
        }
        self.ctx.queue().submit([enc.finish()]);
    }

    /// Reads back from the device (waits for all submitted work). The trait cannot report an
    /// error: if the read-back fails, the outputs are filled with NaN.
    fn read_tokens(
        &self,
        slot: usize,
        block: BlockId,
        offset: usize,
        keys_out: &mut [f32],
        values_out: &mut [f32],
    ) {
        let (start, size) = self.block_bytes(block);
        let tmp = self.scratch(2 * size, "kv read-back");
        let mut enc = self.ctx.encoder();
        enc.copy_buffer_to_buffer(&self.plane(slot, KvPart::Keys).buffer, start, &tmp, 0, size);
        enc.copy_buffer_to_buffer(
            &self.plane(slot, KvPart::Values).buffer,
            start,
            &tmp,
            size,
            size,
        );
        self.ctx.queue().submit([enc.finish()]);
        let Ok(bytes) = self.ctx.read_bytes(&tmp) else {
            keys_out.fill(f32::NAN);
            values_out.fill(f32::NAN);
            return;
        };
        let block_elems: Vec<f32> = match self.layout.dtype {
            KvDType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            KvDType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&bytes)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        };
        let l = &self.layout;
        let d = l.head_dim;
        let (k_tile, v_tile) = block_elems.split_at(l.block_stride);
        for (tile, out) in [(k_tile, keys_out), (v_tile, values_out)] {
            for (t, token) in out.chunks_exact_mut(l.num_kv_heads * d).enumerate() {
                for (h, row) in token.chunks_exact_mut(d).enumerate() {
                    let at = h * l.head_stride + (offset + t) * l.token_stride;
                    row.copy_from_slice(&tile[at..at + d]);
                }
            }
        }
    }
}

impl fmt::Debug for GpuKvStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GpuKvStorage({} on {})",
            self.layout,
            self.ctx.info().name
        )
    }
}
