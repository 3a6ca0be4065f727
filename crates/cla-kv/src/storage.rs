//! Where the bytes live: the [`KvStorage`] trait and its CPU implementation
//! [`CpuKvStorage`].
//!
//! The cache is split in two. [`crate::PagedKvCache`] owns everything that is bookkeeping
//! (sequences, block tables, the allocator, reservations, accounting) and checks every
//! request before touching memory. A storage owns only the pool laid out as [`KvLayout`]
//! says, and moves elements when the cache tells it to: write tokens into a block, copy a
//! block (copy-on-write), read tokens back. A GPU storage (in a crate that knows the GPU)
//! implements the same trait over device buffers and reuses the allocator, the block
//! tables and all their tests unchanged; its kernels address blocks through the same
//! [`KvLayout`] and the `u32` block tables of [`crate::BlockTable::as_u32`], and when they
//! store a step's rows themselves the cache only records it
//! ([`crate::PagedKvCache::mark_written`]).

use crate::block::BlockId;
use crate::config::KvDType;
use crate::layout::{KvLayout, KvPart};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::fmt;

/// A pool of keys and values laid out as its [`KvLayout`].
///
/// The cache validates every argument before calling, so implementations may assume:
/// `slot < num_slots`, blocks `< num_blocks`, `keys.len() == values.len()` is a multiple
/// of `num_kv_heads * head_dim`, and `offset + tokens <= block_size`. Token buffers are
/// token-major, `[token][kv head][dim]`, the order a K/V projection produces; the storage
/// scatters them into the head-major block layout.
pub trait KvStorage {
    /// The layout of the pool.
    fn layout(&self) -> &KvLayout;

    /// Stores `keys.len() / (num_kv_heads * head_dim)` tokens into tokens
    /// `offset..` of `block` in `slot`'s planes, converting from `f32` to the stored type.
    fn write_tokens(
        &mut self,
        slot: usize,
        block: BlockId,
        offset: usize,
        keys: &[f32],
        values: &[f32],
    );

    /// Copies all of block `src` onto block `dst`, in every slot, keys and values. Used for
    /// copy-on-write of a shared, partly filled block.
    fn copy_block(&mut self, src: BlockId, dst: BlockId);

    /// Reads tokens `offset..` of `block` in `slot`'s planes into token-major `f32` buffers
    /// (`keys_out.len() / (num_kv_heads * head_dim)` tokens).
    fn read_tokens(
        &self,
        slot: usize,
        block: BlockId,
        offset: usize,
        keys_out: &mut [f32],
        values_out: &mut [f32],
    );
}

/// A borrowed run of stored elements, in the stored type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSlice<'a> {
    /// `f32` storage.
    F32(&'a [f32]),
    /// `f16` storage.
    F16(&'a [f16]),
}

impl<'a> KvSlice<'a> {
    /// Elements in the run.
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
        }
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored type.
    pub fn dtype(&self) -> KvDType {
        match self {
            KvSlice::F32(_) => KvDType::F32,
            KvSlice::F16(_) => KvDType::F16,
        }
    }

    /// Element `i` as `f32`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            KvSlice::F32(s) => s.get(i).copied(),
            KvSlice::F16(s) => s.get(i).map(|x| x.to_f32()),
        }
    }

    /// The sub-run `start..start + len`, or `None` if it is out of range.
    pub fn sub(&self, start: usize, len: usize) -> Option<KvSlice<'a>> {
        let end = start.checked_add(len)?;
        match *self {
            KvSlice::F32(s) => s.get(start..end).map(KvSlice::F32),
            KvSlice::F16(s) => s.get(start..end).map(KvSlice::F16),
        }
    }

    /// Converts into `out`, over the shorter of the two.
    pub fn to_f32_into(&self, out: &mut [f32]) {
        match self {
            KvSlice::F32(s) => {
                let n = s.len().min(out.len());
                out[..n].copy_from_slice(&s[..n]);
            }
            KvSlice::F16(s) => {
                let n = s.len().min(out.len());
                s[..n].convert_to_f32_slice(&mut out[..n]);
            }
        }
    }

    /// The run as a new `f32` vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.to_f32_into(&mut v);
        v
    }

    /// `sum_i self[i] * x[i]` over the shorter of the two (an attention score `q . k`).
    /// The summation order is unspecified (it is split for vectorisation).
    pub fn dot(&self, x: &[f32]) -> f32 {
        match self {
            KvSlice::F32(s) => dot_f32(s, x),
            KvSlice::F16(s) => {
                let mut buf = [0.0f32; CHUNK];
                let mut sum = 0.0;
                for (h, x) in s.chunks(CHUNK).zip(x.chunks(CHUNK)) {
                    let m = h.len().min(x.len());
                    h[..m].convert_to_f32_slice(&mut buf[..m]);
                    sum += dot_f32(&buf[..m], &x[..m]);
                }
                sum
            }
        }
    }

    /// `out[i] += weight * self[i]` over the shorter of the two (accumulating `p * v`).
    pub fn add_scaled_into(&self, weight: f32, out: &mut [f32]) {
        match self {
            KvSlice::F32(s) => axpy_f32(weight, s, out),
            KvSlice::F16(s) => {
                let mut buf = [0.0f32; CHUNK];
                for (h, o) in s.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
                    let m = h.len().min(o.len());
                    h[..m].convert_to_f32_slice(&mut buf[..m]);
                    axpy_f32(weight, &buf[..m], &mut o[..m]);
                }
            }
        }
    }
}

/// Elements of `f16` converted at a time on the stack by [`KvSlice::dot`] and
/// [`KvSlice::add_scaled_into`]: half of a typical head, small enough to stay in registers
/// and L1, large enough to amortise the conversion call.
const CHUNK: usize = 64;

/// Dot product with eight independent partial sums, so the compiler can vectorise it
/// (a single running sum forces sequential additions).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[i] += w * x[i]` over the shorter of the two.
fn axpy_f32(w: f32, x: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(o, v)| *o += w * v);
}

/// The pool in host memory: one vector of all planes, laid out as its [`KvLayout`].
#[derive(Clone, PartialEq)]
pub struct CpuKvStorage {
    layout: KvLayout,
    data: CpuData,
}

/// `f16` is kept as its bits so that a fresh pool is zeroed by the allocator (lazily).
#[derive(Clone, PartialEq)]
enum CpuData {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl CpuKvStorage {
    /// A zeroed pool for `layout`.
    pub fn new(layout: KvLayout) -> Self {
        let n = layout.total_len();
        let data = match layout.dtype {
            KvDType::F32 => CpuData::F32(vec![0.0; n]),
            KvDType::F16 => CpuData::F16(vec![0; n]),
        };
        Self { layout, data }
    }

    /// The whole pool in the stored type (`layout().total_len()` elements), e.g. to upload.
    pub fn raw(&self) -> KvSlice<'_> {
        match &self.data {
            CpuData::F32(v) => KvSlice::F32(v),
            CpuData::F16(v) => KvSlice::F16(bytemuck::cast_slice(v)),
        }
    }

    /// The whole pool as bytes (little-endian host order).
    pub fn raw_bytes(&self) -> &[u8] {
        match &self.data {
            CpuData::F32(v) => bytemuck::cast_slice(v),
            CpuData::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The `block_stride` elements of `block` in `slot`'s `part` plane, head-major:
    /// `[kv head][token in block][dim]`. `None` if `slot` or `block` is out of range.
    pub fn block(&self, slot: usize, part: KvPart, block: BlockId) -> Option<KvSlice<'_>> {
        let l = &self.layout;
        if slot >= l.num_slots || block.index() >= l.num_blocks {
            return None;
        }
        let start = l.offset(slot, part, block.index(), 0, 0, 0);
        self.raw().sub(start, l.block_stride)
    }

    fn scatter(&mut self, base: usize, offset: usize, src: &[f32]) {
        let l = self.layout;
        let d = l.head_dim;
        for (t, token) in src.chunks_exact(l.num_kv_heads * d).enumerate() {
            for (h, row) in token.chunks_exact(d).enumerate() {
                let at = base + h * l.head_stride + (offset + t) * l.token_stride;
                match &mut self.data {
                    CpuData::F32(v) => v[at..at + d].copy_from_slice(row),
                    CpuData::F16(v) => {
                        let dst: &mut [f16] = bytemuck::cast_slice_mut(&mut v[at..at + d]);
                        dst.convert_from_f32_slice(row);
                    }
                }
            }
        }
    }

    fn gather(&self, base: usize, offset: usize, out: &mut [f32]) {
        let l = self.layout;
        let d = l.head_dim;
        for (t, token) in out.chunks_exact_mut(l.num_kv_heads * d).enumerate() {
            for (h, row) in token.chunks_exact_mut(d).enumerate() {
                let at = base + h * l.head_stride + (offset + t) * l.token_stride;
                match &self.data {
                    CpuData::F32(v) => row.copy_from_slice(&v[at..at + d]),
                    CpuData::F16(v) => {
                        let src: &[f16] = bytemuck::cast_slice(&v[at..at + d]);
                        src.convert_to_f32_slice(row);
                    }
                }
            }
        }
    }
}

impl KvStorage for CpuKvStorage {
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
        let l = self.layout;
        let b = block.index() * l.block_stride;
        self.scatter(l.key_base(slot) + b, offset, keys);
        self.scatter(l.value_base(slot) + b, offset, values);
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let l = self.layout;
        for plane in 0..2 * l.num_slots {
            let s = plane * l.plane_len + src.index() * l.block_stride;
            let d = plane * l.plane_len + dst.index() * l.block_stride;
            match &mut self.data {
                CpuData::F32(v) => v.copy_within(s..s + l.block_stride, d),
                CpuData::F16(v) => v.copy_within(s..s + l.block_stride, d),
            }
        }
    }

    fn read_tokens(
        &self,
        slot: usize,
        block: BlockId,
        offset: usize,
        keys_out: &mut [f32],
        values_out: &mut [f32],
    ) {
        let l = self.layout;
        let b = block.index() * l.block_stride;
        self.gather(l.key_base(slot) + b, offset, keys_out);
        self.gather(l.value_base(slot) + b, offset, values_out);
    }
}

impl fmt::Debug for CpuKvStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuKvStorage({})", self.layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KvCacheConfig, KvShape};
    use cla_core::KvSharing;

    fn naive_dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn slice_arithmetic_matches_naive_loops() {
        for n in [0, 1, 7, 8, 63, 64, 65, 128, 200] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let a16_f32: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            for (slice, reference) in [(KvSlice::F32(&a), &a), (KvSlice::F16(&a16), &a16_f32)] {
                let want = naive_dot(reference, &x);
                assert!(
                    (slice.dot(&x) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "n={n}"
                );
                let mut out = x.clone();
                slice.add_scaled_into(0.5, &mut out);
                for i in 0..n {
                    assert!((out[i] - (x[i] + 0.5 * reference[i])).abs() <= 1e-6);
                }
                assert_eq!(slice.to_f32_vec(), *reference);
                assert_eq!(slice.len(), n);
                assert_eq!(slice.get(n), None);
                assert_eq!(slice.sub(n, 1), None);
            }
        }
    }

    #[test]
    fn writes_land_where_the_layout_says() {
        let shape = KvShape::new(2, 4, KvSharing::all_producers(2)).unwrap();
        for dtype in KvDType::ALL {
            let config = KvCacheConfig::new(3, dtype).with_block_size(4);
            let layout = KvLayout::new(&shape, &config).unwrap();
            assert_eq!(
                (layout.token_stride, layout.head_stride, layout.block_stride),
                (4, 16, 32)
            );
            assert_eq!((layout.plane_len, layout.total_len()), (96, 384));
            let mut s = CpuKvStorage::new(layout);
            // Two tokens, token-major [t][h][d], at token 1 of block 2 in slot 1.
            let keys: Vec<f32> = (0..16).map(|i| i as f32).collect();
            let values: Vec<f32> = (0..16).map(|i| -(i as f32)).collect();
            s.write_tokens(1, BlockId::zeroed_at(2), 1, &keys, &values);
            let raw = s.raw();
            for t in 0..2 {
                for h in 0..2 {
                    for d in 0..4 {
                        let src = (t * 2 + h) * 4 + d;
                        let k = layout.offset(1, KvPart::Keys, 2, h, 1 + t, d);
                        let v = layout.offset(1, KvPart::Values, 2, h, 1 + t, d);
                        assert_eq!(raw.get(k), Some(keys[src]));
                        assert_eq!(raw.get(v), Some(values[src]));
                    }
                }
            }
            let (mut k, mut v) = (vec![0.0; 16], vec![0.0; 16]);
            s.read_tokens(1, BlockId::zeroed_at(2), 1, &mut k, &mut v);
            assert_eq!((k, v), (keys.clone(), values.clone()));
            s.copy_block(BlockId::zeroed_at(2), BlockId::zeroed_at(0));
            assert_eq!(
                s.block(1, KvPart::Keys, BlockId::zeroed_at(0)),
                s.block(1, KvPart::Keys, BlockId::zeroed_at(2))
            );
            assert_eq!(s.block(2, KvPart::Keys, BlockId::zeroed_at(0)), None);
            assert_eq!(s.raw_bytes().len() as u64, layout.total_bytes());
        }
    }
}
