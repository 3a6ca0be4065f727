//! Appends new K/V rows into a paged pool (`shaders/kv_append.wgsl`), converting to the
//! pool's element type (f32 or f16); and the same with RoPE on the step's queries and keys
//! in one dispatch, reading the projections' output rows in place
//! (`shaders/rope_append.wgsl`).

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::rope::COMMON_SRC as ROPE_COMMON_SRC;
use crate::ops::{expect, u32_of};
use crate::paged::KvPool;
use crate::pipeline::{
    Bind, ElemStorage, PipelineKey, elem_buffer, render, whole, with_f16_header,
};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/kv_append.wgsl");
const ROPE_APPEND_SRC: &str = include_str!("../shaders/rope_append.wgsl");

/// Where a step's projections left its queries, keys and values: row `t` of `q` holds the
/// queries of token `t` (all heads, `n_heads * head_dim` values) from column `q_col`; row `t`
/// of `kv` holds its keys from column `k_col` and its values from `v_col` (`n_kv_heads *
/// head_dim` each). Both are `[n_tokens, width]` f32; they may be the same tensor (Q, K and V
/// projected by one matrix).
#[derive(Debug, Clone, Copy)]
pub struct QkvRows<'a> {
    /// Rows holding the queries.
    pub q: &'a GpuTensor,
    /// First column of the queries.
    pub q_col: usize,
    /// Rows holding the keys and values.
    pub kv: &'a GpuTensor,
    /// First column of the keys.
    pub k_col: usize,
    /// First column of the values.
    pub v_col: usize,
}
const WG: u64 = 256;

/// A pool bound for a kernel that writes two neighbouring dims at a time (one packed-f16
/// word): its element storages, the K and V windows, and the parameter words that place a
/// token's row (block size, block count, the two bases in the windows, the strides).
struct PairedPool<'a> {
    sk: ElemStorage,
    sv: ElemStorage,
    k: wgpu::BindingResource<'a>,
    v: wgpu::BindingResource<'a>,
    words: [u32; 7],
}

impl GpuContext {
    /// Binds `pool` for `what`; packed f16 (adapters without SHADER_F16) needs even bases
    /// and strides.
    fn paired_pool<'a>(&self, what: &str, pool: &KvPool<'a>) -> Result<PairedPool<'a>> {
        let l = pool.layout;
        let sk = self.elem_storage(pool.k.dtype)?;
        let sv = self.elem_storage(pool.v.dtype)?;
        let ((k, k_off), (v, v_off)) = self.kv_windows(what, pool, sk, sv)?;
        if sk == ElemStorage::F16Packed || sv == ElemStorage::F16Packed {
            ensure_arg!(
                k_off.is_multiple_of(2)
                    && v_off.is_multiple_of(2)
                    && l.block_stride.is_multiple_of(2)
                    && l.head_stride.is_multiple_of(2)
                    && l.token_stride.is_multiple_of(2),
                "{what}: f16 pools need even bases and strides on adapters without SHADER_F16"
            );
        }
        let words = [
            l.block_size,
            l.num_blocks,
            u32_of("k base", k_off as usize)?,
            u32_of("v base", v_off as usize)?,
            l.block_stride,
            l.head_stride,
            l.token_stride,
        ];
        Ok(PairedPool {
            sk,
            sv,
            k,
            v,
            words,
        })
    }

    /// Writes `k_new` and `v_new` (`[n_tokens, n_kv_heads, head_dim]` f32) into `pool` at the
    /// per-token `slots` (`[n_tokens]` u32, `block * block_size + offset`, or `u32::MAX` to
    /// skip; [`crate::SeqBatch::slots`] gives them for a batch).
    pub fn kv_append(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        k_new: &GpuTensor,
        v_new: &GpuTensor,
        slots: &GpuTensor,
        pool: &KvPool<'_>,
    ) -> Result<()> {
        pool.validate()?;
        let l = pool.layout;
        let n_tokens = slots.numel();
        let row = (l.n_kv_heads * l.head_dim) as usize;
        expect(slots, "kv_append slots", DType::U32, n_tokens)?;
        expect(k_new, "kv_append k_new", DType::F32, n_tokens * row)?;
        expect(v_new, "kv_append v_new", DType::F32, n_tokens * row)?;
        let pp = self.paired_pool("kv_append", pool)?;
        let (sk, sv) = (pp.sk, pp.sv);
        let key = PipelineKey {
            kernel: "kv_append",
            elems: vec![sk, sv],
            params: vec![],
        };
        let kernel = self.kernel(
            key,
            &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
                Bind::ReadWrite,
            ],
            |name| {
                let body = render(
                    name,
                    SRC,
                    &[
                        ("K_DECL", elem_buffer("k", 4, sk, true)),
                        ("V_DECL", elem_buffer("v", 5, sv, true)),
                    ],
                )?;
                Ok(with_f16_header(&[sk, sv], body))
            },
        )?;
        let mut words = vec![u32_of("n_tokens", n_tokens)?, l.n_kv_heads, l.head_dim];
        words.extend(pp.words);
        let params = self.uniform(&words);
        let pairs = (n_tokens * row / 2) as u64;
        let (gx, gy) = self.grid(pairs.div_ceil(WG))?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(k_new),
                whole(v_new),
                whole(slots),
                pp.k,
                pp.v,
            ],
            (gx, gy, 1),
        );
        Ok(())
    }

    /// RoPE on a step's queries (into `q_out`, `[n_tokens, n_heads, head_dim]` f32) and keys,
    /// and the rotated keys with the values into `pool` at `slots` (as
    /// [`GpuContext::kv_append`]): one dispatch for [`GpuContext::rope`] twice and
    /// [`GpuContext::kv_append`], with the same values. `positions` is `[n_tokens]` u32,
    /// `inv_freq` `[head_dim / 2]` f32 ([`GpuContext::rope_inv_freq`]). `q_out` must be a
    /// buffer of its own (not one of the sources).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_append(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: QkvRows<'_>,
        positions: &GpuTensor,
        inv_freq: &GpuTensor,
        slots: &GpuTensor,
        pool: &KvPool<'_>,
        q_out: &GpuTensor,
    ) -> Result<()> {
        pool.validate()?;
        let l = pool.layout;
        ensure_arg!(
            q_out.shape.len() == 3 && q_out.shape[2] == l.head_dim as usize,
            "rope_append: q_out must be [n_tokens, n_heads, {}], got {:?}",
            l.head_dim,
            q_out.shape
        );
        let (n_tokens, n_heads, hd) = (q_out.shape[0], q_out.shape[1], q_out.shape[2]);
        let kv_row = l.n_kv_heads as usize * hd;
        expect(
            q_out,
            "rope_append q_out",
            DType::F32,
            n_tokens * n_heads * hd,
        )?;
        expect(positions, "rope_append positions", DType::U32, n_tokens)?;
        expect(inv_freq, "rope_append inv_freq", DType::F32, hd / 2)?;
        expect(slots, "rope_append slots", DType::U32, n_tokens)?;
        let rows = |t: &GpuTensor, what: &str, cols: &[(usize, usize)]| -> Result<usize> {
            ensure_arg!(
                t.dtype == DType::F32 && t.shape.len() == 2 && t.shape[0] == n_tokens,
                "rope_append {what}: expected [{n_tokens}, width] f32, got {:?} {}",
                t.shape,
                t.dtype.name()
            );
            let width = t.shape[1];
            for &(col, len) in cols {
                ensure_arg!(
                    col + len <= width,
                    "rope_append {what}: columns {col}..{} exceed the rows' width {width}",
                    col + len
                );
            }
            Ok(width)
        };
        let q_stride = rows(src.q, "queries", &[(src.q_col, n_heads * hd)])?;
        let kv_stride = rows(
            src.kv,
            "keys and values",
            &[(src.k_col, kv_row), (src.v_col, kv_row)],
        )?;
        ensure_arg!(
            q_out.buffer != src.q.buffer && q_out.buffer != src.kv.buffer,
            "rope_append: q_out must not be one of the source buffers"
        );
        let pp = self.paired_pool("rope_append", pool)?;
        let (sk, sv) = (pp.sk, pp.sv);
        let key = PipelineKey {
            kernel: "rope_append",
            elems: vec![sk, sv],
            params: vec![],
        };
        let kernel = self.kernel(
            key,
            &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
                Bind::ReadWrite,
                Bind::ReadWrite,
            ],
            |name| {
                let body = render(
                    name,
                    ROPE_APPEND_SRC,
                    &[
                        ("ROPE_COMMON", ROPE_COMMON_SRC.to_owned()),
                        ("K_DECL", elem_buffer("k", 7, sk, true)),
                        ("V_DECL", elem_buffer("v", 8, sv, true)),
                    ],
                )?;
                Ok(with_f16_header(&[sk, sv], body))
            },
        )?;
        let mut words = vec![
            u32_of("n_tokens", n_tokens)?,
            u32_of("n_heads", n_heads)?,
            l.n_kv_heads,
            l.head_dim,
            u32_of("q row width", q_stride)?,
            u32_of("q column", src.q_col)?,
            u32_of("kv row width", kv_stride)?,
            u32_of("k column", src.k_col)?,
            u32_of("v column", src.v_col)?,
        ];
        words.extend(pp.words);
        let params = self.uniform(&words);
        // Index arithmetic in u32: the sources' elements must be addressable.
        u32_of("query rows", n_tokens * q_stride)?;
        u32_of("key/value rows", n_tokens * kv_stride)?;
        let items = (n_tokens * (n_heads + l.n_kv_heads as usize) * hd / 2) as u64;
        let (gx, gy) = self.grid(items.div_ceil(WG))?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(src.q),
                whole(src.kv),
                whole(positions),
                whole(inv_freq),
                whole(slots),
                whole(q_out),
                pp.k,
                pp.v,
            ],
            (gx, gy, 1),
        );
        Ok(())
    }
}

#[cfg(test)]
// The reference indexes like the math it follows.
#[allow(clippy::needless_range_loop)]
mod tests {
    use proptest::prelude::*;

    use super::QkvRows;
    use crate::ops::rope::inv_freq;
    use crate::paged::{KvPool, PagedKvLayout};
    use crate::testing::{POISON, assert_close, both_ctx, cases, round_f16, values};
    use crate::{DType, GpuError};

    /// Dims `i`, `i + half` of `x` rotated by `pos * f[i]` (the angle as the GPU forms it, one
    /// f32 multiply; exact cos/sin).
    fn rotate(x: &[f32], pos: u32, f: &[f32]) -> Vec<f32> {
        let half = x.len() / 2;
        let mut out = x.to_vec();
        for i in 0..half {
            let (s, c) = f64::from(pos as f32 * f[i]).sin_cos();
            let (x1, x2) = (f64::from(x[i]), f64::from(x[i + half]));
            out[i] = (x1 * c - x2 * s) as f32;
            out[i + half] = (x2 * c + x1 * s) as f32;
        }
        out
    }

    proptest! {
        #![proptest_config(cases(16))]
        /// Rotated queries in `q_out`, rotated keys and the values at their slots of the pool,
        /// every other pool element untouched; from one [q | k | v] matrix or from two source
        /// tensors with other column orders.
        #[test]
        fn rope_append_matches_rope_then_append(
            n in 1usize..6, kv_heads in 1usize..4,
            group in prop::sample::select(vec![1usize, 2, 4]),
            half in prop::sample::select(vec![1usize, 2, 23, 32, 45]),
            f16: bool, one_matrix: bool, skip_one: bool, seed: u64,
        ) {
            for c in both_ctx() {
                let (hd, heads) = (2 * half, kv_heads * group);
                let (qw, kvw) = (heads * hd, kv_heads * hd);
                let (bs, num_blocks) = (4u32, 8u32);
                let layout = PagedKvLayout::contiguous(num_blocks, bs, kv_heads as u32, hd as u32);
                // Distinct slots in shuffled order; the last token skipped (u32::MAX) if asked.
                let mut slots: Vec<u32> = (0..n as u32)
                    .map(|t| (t * 7 + (seed % 5) as u32 * 3) % (num_blocks * bs))
                    .collect();
                if skip_one {
                    slots[n - 1] = u32::MAX;
                }
                let pos: Vec<u32> = (0..n).map(|t| ((seed >> (t * 7)) % 8192) as u32).collect();
                let q = values(seed, n * qw);
                let k = values(seed ^ 1, n * kvw);
                let v = values(seed ^ 2, n * kvw);
                // Source rows: [q | k | v] in one tensor, or [pad, q] and [pad, v, k].
                let (q_rows, kv_rows, q_col, k_col, v_col) = if one_matrix {
                    let rows: Vec<f32> = (0..n)
                        .flat_map(|t| {
                            [&q[t * qw..(t + 1) * qw], &k[t * kvw..(t + 1) * kvw], &v[t * kvw..(t + 1) * kvw]]
                                .concat()
                        })
                        .collect();
                    let t = c.upload_f32(&rows, &[n, qw + 2 * kvw]).unwrap();
                    (t.clone(), t, 0, qw, qw + kvw)
                } else {
                    let qr: Vec<f32> = (0..n).flat_map(|t| [&[9.0][..], &q[t * qw..(t + 1) * qw]].concat()).collect();
                    let kr: Vec<f32> = (0..n)
                        .flat_map(|t| [&[9.0, 9.0][..], &v[t * kvw..(t + 1) * kvw], &k[t * kvw..(t + 1) * kvw]].concat())
                        .collect();
                    (
                        c.upload_f32(&qr, &[n, qw + 1]).unwrap(),
                        c.upload_f32(&kr, &[n, 2 * kvw + 2]).unwrap(),
                        1, 2 + kvw, 2,
                    )
                };
                let dt = if f16 { DType::F16 } else { DType::F32 };
                let pool_len = layout.extent() as usize;
                let k_pool = c.create_tensor(&[pool_len], dt, "k pool").unwrap();
                let v_pool = c.create_tensor(&[pool_len], dt, "v pool").unwrap();
                c.fill_u32_pattern(&k_pool, POISON);
                c.fill_u32_pattern(&v_pool, POISON ^ 0x1234);
                let (k_before, v_before) = (c.read_f32(&k_pool).unwrap(), c.read_f32(&v_pool).unwrap());
                let q_out = c.create_tensor(&[n, heads, hd], DType::F32, "q out").unwrap();
                c.fill_u32_pattern(&q_out, POISON);
                let tp = c.upload_u32(&pos, &[n]).unwrap();
                let ts = c.upload_u32(&slots, &[n]).unwrap();
                let tf = c.rope_inv_freq(hd, 1e4).unwrap();
                let pool = KvPool { k: &k_pool, v: &v_pool, k_base: 0, v_base: 0, layout };
                let src = QkvRows { q: &q_rows, q_col, kv: &kv_rows, k_col, v_col };
                let mut enc = c.encoder();
                c.rope_append(&mut enc, src, &tp, &tf, &ts, &pool, &q_out).unwrap();
                c.submit_and_wait(enc).unwrap();

                let f = inv_freq(hd, 1e4);
                let q_ref: Vec<f32> = (0..n * heads)
                    .flat_map(|r| rotate(&q[r * hd..(r + 1) * hd], pos[r / heads], &f))
                    .collect();
                assert_close("rope_append q", &c.read_f32(&q_out).unwrap(), &q_ref, 1e-5);
                // Expected pool contents: the poison, with each kept token's rows in place.
                let (mut k_ref, mut v_ref) = (k_before.clone(), v_before.clone());
                for t in 0..n {
                    if slots[t] == u32::MAX {
                        continue;
                    }
                    let (blk, off) = (slots[t] / bs, slots[t] % bs);
                    for h in 0..kv_heads {
                        let at = (blk * layout.block_stride + h as u32 * layout.head_stride
                            + off * layout.token_stride) as usize;
                        let r = (t * kv_heads + h) * hd;
                        let kr = rotate(&k[r..r + hd], pos[t], &f);
                        let (kr, vr) = if f16 {
                            (round_f16(&kr), round_f16(&v[r..r + hd]))
                        } else {
                            (kr, v[r..r + hd].to_vec())
                        };
                        k_ref[at..at + hd].copy_from_slice(&kr);
                        v_ref[at..at + hd].copy_from_slice(&vr);
                    }
                }
                let (k_got, v_got) = (c.read_f32(&k_pool).unwrap(), c.read_f32(&v_pool).unwrap());
                // Untouched elements keep their bits (NaN included); written ones are close.
                let written = |i: usize| k_ref[i].to_bits() != k_before[i].to_bits();
                for i in 0..pool_len {
                    if !written(i) {
                        prop_assert_eq!(k_got[i].to_bits(), k_before[i].to_bits(), "k pool {}", i);
                        prop_assert_eq!(v_got[i].to_bits(), v_before[i].to_bits(), "v pool {}", i);
                    }
                }
                let pick = |x: &[f32]| -> Vec<f32> { (0..pool_len).filter(|&i| written(i)).map(|i| x[i]).collect() };
                let tol = if f16 { 2e-3 } else { 1e-5 };
                assert_close("rope_append k", &pick(&k_got), &pick(&k_ref), tol);
                prop_assert_eq!(pick(&v_got), pick(&v_ref));
            }
        }
    }

    #[test]
    fn rope_append_refuses_bad_sources() {
        let c = crate::testing::ctx();
        let layout = PagedKvLayout::contiguous(2, 4, 1, 8);
        let k_pool = c.create_tensor(&[64], DType::F32, "k").unwrap();
        let v_pool = c.create_tensor(&[64], DType::F32, "v").unwrap();
        let pool = KvPool {
            k: &k_pool,
            v: &v_pool,
            k_base: 0,
            v_base: 0,
            layout,
        };
        let rows = c.create_tensor(&[1, 24], DType::F32, "rows").unwrap();
        let q_out = c.create_tensor(&[1, 1, 8], DType::F32, "q").unwrap();
        let tp = c.upload_u32(&[0], &[1]).unwrap();
        let tf = c.rope_inv_freq(8, 1e4).unwrap();
        let mut enc = c.encoder();
        let run = |enc: &mut wgpu::CommandEncoder, v_col: usize, out: &crate::GpuTensor| {
            let src = QkvRows {
                q: &rows,
                q_col: 0,
                kv: &rows,
                k_col: 8,
                v_col,
            };
            c.rope_append(enc, src, &tp, &tf, &tp, &pool, out)
        };
        // Values past the rows' width; q_out aliasing a source.
        assert!(matches!(
            run(&mut enc, 17, &q_out),
            Err(GpuError::InvalidArgument(_))
        ));
        let alias = crate::GpuTensor {
            shape: vec![1, 1, 8],
            ..rows.clone()
        };
        assert!(matches!(
            run(&mut enc, 16, &alias),
            Err(GpuError::InvalidArgument(_))
        ));
        assert!(run(&mut enc, 16, &q_out).is_ok());
    }
}
