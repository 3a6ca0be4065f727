//! Property tests of kv_append, prefill attention and decode attention against a naive CPU
//! reference, on random paged layouts (shuffled block ids, padded strides, non-zero bases).

// The references index like the math they follow.
#![allow(clippy::needless_range_loop)]

use proptest::prelude::*;

use super::{DecodeKernel, DecodeOptions};
use crate::context::GpuContext;
use crate::paged::{KvPool, PagedKvLayout, SeqBatch, SeqDesc};
use crate::testing::{POISON, assert_close, both_ctx, cases, ctx, round_f16, values};
use crate::{DType, GpuTensor};

/// A random batch: per-sequence K/V for every cached token, in a shuffled paged pool.
#[derive(Debug, Clone)]
struct Scenario {
    n_kv_heads: usize,
    group: usize,
    hd: usize,
    block_size: usize,
    /// (kv_len, n_query) per sequence.
    seqs: Vec<(usize, usize)>,
    f16: bool,
    /// Decode keys per split (None: the heuristic).
    chunk: Option<usize>,
    /// Extra elements between tokens (strided layout) and a non-zero pool base.
    pad: usize,
    seed: u64,
    /// Scale the K row of token t by 8 t / kv_len, so that later keys score far above the
    /// first ones (the online softmax's running max moves many times).
    k_ramp: bool,
}

fn scenario(decode: bool) -> impl Strategy<Value = Scenario> {
    (
        1usize..4,
        prop::sample::select(vec![1usize, 2, 3, 5, 8, 16, 32]),
        prop::sample::select(vec![2usize, 8, 16, 46, 64, 90]),
        prop::sample::select(vec![1usize, 3, 4, 16]),
        prop::collection::vec((1usize..70, 1usize..24), 1..4),
        any::<bool>(),
        prop::sample::select(vec![None, Some(1usize), Some(7), Some(32)]),
        prop::sample::select(vec![0usize, 2]),
        any::<u64>(),
    )
        .prop_map(
            move |(n_kv_heads, group, hd, block_size, seqs, f16, chunk, pad, seed)| {
                let seqs = seqs
                    .into_iter()
                    .map(|(kv, nq)| (kv, if decode { 1 } else { nq.min(kv) }))
                    .collect();
                Scenario {
                    n_kv_heads,
                    group,
                    hd,
                    block_size,
                    seqs,
                    f16,
                    chunk,
                    pad,
                    seed,
                    k_ramp: false,
                }
            },
        )
}

struct Built {
    layout: PagedKvLayout,
    tables: Vec<Vec<u32>>,
    /// Per sequence: K and V as [kv_len, n_kv_heads, hd] (rounded through f16 if the pool is).
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    k_pool: GpuTensor,
    v_pool: GpuTensor,
    base: u64,
}

impl Scenario {
    fn n_q_heads(&self) -> usize {
        self.n_kv_heads * self.group
    }

    /// Makes the pool and appends every cached token of every sequence with kv_append.
    fn build(&self, c: &GpuContext) -> Built {
        let bs = self.block_size;
        let needed: usize = self.seqs.iter().map(|s| s.0.div_ceil(bs)).sum();
        let num_blocks = needed + 3;
        // Shuffled block ids: tables are non-contiguous and interleaved across sequences.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        let mut s = self.seed | 1;
        for i in (1..ids.len()).rev() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ids.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut next = 0;
        let tables: Vec<Vec<u32>> = self
            .seqs
            .iter()
            .map(|&(kv, _)| {
                let t = ids[next..next + kv.div_ceil(bs)].to_vec();
                next += t.len();
                t
            })
            .collect();
        let (h, hd) = (self.n_kv_heads as u32, self.hd as u32);
        let layout = if self.pad == 0 {
            PagedKvLayout::contiguous(num_blocks as u32, bs as u32, h, hd)
        } else {
            // Token-major inside a block, heads interleaved, padded rows.
            let token_stride = h * (hd + self.pad as u32);
            PagedKvLayout {
                block_size: bs as u32,
                num_blocks: num_blocks as u32,
                n_kv_heads: h,
                head_dim: hd,
                block_stride: token_stride * bs as u32 + 4,
                head_stride: hd + self.pad as u32,
                token_stride,
            }
        };
        let base = if self.pad == 0 { 0 } else { 6 };
        let pool_len = base as usize + layout.extent() as usize + 2;
        let dt = if self.f16 { DType::F16 } else { DType::F32 };
        let k_pool = c.create_tensor(&[pool_len], dt, "k pool").unwrap();
        let v_pool = c.create_tensor(&[pool_len], dt, "v pool").unwrap();
        let row = self.n_kv_heads * self.hd;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for (i, &(kv, _)) in self.seqs.iter().enumerate() {
            let mut ks = values(self.seed ^ (100 + i as u64), kv * row);
            let mut vs = values(self.seed ^ (200 + i as u64), kv * row);
            if self.k_ramp {
                for (t, r) in ks.chunks_mut(row).enumerate() {
                    let f = 8.0 * t as f32 / kv as f32;
                    r.iter_mut().for_each(|x| *x *= f);
                }
            }
            if self.f16 {
                ks = round_f16(&ks);
                vs = round_f16(&vs);
            }
            k.push(ks);
            v.push(vs);
        }
        // Append every cached token (n_query = kv_len gives the slots of all of them).
        let all: Vec<SeqDesc> = self
            .seqs
            .iter()
            .zip(&tables)
            .map(|(&(kv, _), t)| SeqDesc {
                n_query: kv,
                kv_len: kv,
                block_table: t,
            })
            .collect();
        let batch = SeqBatch::upload(c, &all, &layout).unwrap();
        let total = batch.total_query;
        let kn = c
            .upload_f32(&k.concat(), &[total, self.n_kv_heads, self.hd])
            .unwrap();
        let vn = c
            .upload_f32(&v.concat(), &[total, self.n_kv_heads, self.hd])
            .unwrap();
        let mut enc = c.encoder();
        let pool = KvPool {
            k: &k_pool,
            v: &v_pool,
            k_base: base,
            v_base: base,
            layout,
        };
        c.kv_append(&mut enc, &kn, &vn, &batch.slots, &pool)
            .unwrap();
        c.submit_and_wait(enc).unwrap();
        Built {
            layout,
            tables,
            k,
            v,
            k_pool,
            v_pool,
            base,
        }
    }

    /// Reference attention for the last n_query tokens of each sequence:
    /// [total_query, n_q_heads, hd].
    fn reference(&self, b: &Built, q: &[f32]) -> Vec<f32> {
        let (hq, hd, hk) = (self.n_q_heads(), self.hd, self.n_kv_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = Vec::new();
        let mut row0 = 0;
        for (si, &(kv, nq)) in self.seqs.iter().enumerate() {
            for i in 0..nq {
                let pos = kv - nq + i;
                for h in 0..hq {
                    let kvh = h / self.group;
                    let qv = &q[((row0 + i) * hq + h) * hd..][..hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| {
                            let kr = &b.k[si][(t * hk + kvh) * hd..][..hd];
                            qv.iter()
                                .zip(kr)
                                .map(|(&a, &bb)| f64::from(a) * f64::from(bb))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for d in 0..hd {
                        let o: f64 = (0..=pos)
                            .map(|t| w[t] * f64::from(b.v[si][(t * hk + kvh) * hd + d]))
                            .sum();
                        out.push((o / sum) as f32);
                    }
                }
            }
            row0 += nq;
        }
        out
    }

    fn run(&self, c: &GpuContext, decode: bool) {
        if decode {
            // Every decode kernel the device can run for this scenario (Auto picks one of
            // them).
            for kernel in [
                DecodeKernel::Tiled,
                DecodeKernel::Lanes,
                DecodeKernel::LanesWide,
                DecodeKernel::Coop,
            ] {
                self.run_with(c, Some(kernel));
            }
        } else {
            self.run_with(c, None);
        }
    }

    /// Runs prefill (`kernel` None) or decode with `kernel`; a decode kernel that reports
    /// itself unavailable for the scenario is skipped (`decode_kernels_are_available_where_expected`
    /// checks that each kernel does run where it should).
    fn run_with(&self, c: &GpuContext, kernel: Option<DecodeKernel>) -> bool {
        let b = self.build(c);
        let descs: Vec<SeqDesc> = self
            .seqs
            .iter()
            .zip(&b.tables)
            .map(|(&(kv, nq), t)| SeqDesc {
                n_query: nq,
                kv_len: kv,
                block_table: t,
            })
            .collect();
        let batch = SeqBatch::upload(c, &descs, &b.layout).unwrap();
        let rows = batch.total_query;
        // Queries of magnitude up to 3 so the softmax is far from uniform.
        let q: Vec<f32> = values(self.seed ^ 7, rows * self.n_q_heads() * self.hd)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        let tq = c
            .upload_f32(&q, &[rows, self.n_q_heads(), self.hd])
            .unwrap();
        let out = c
            .create_tensor(&[rows, self.n_q_heads(), self.hd], DType::F32, "attn out")
            .unwrap();
        c.fill_u32_pattern(&out, POISON);
        let pool = KvPool {
            k: &b.k_pool,
            v: &b.v_pool,
            k_base: b.base,
            v_base: b.base,
            layout: b.layout,
        };
        let mut enc = c.encoder();
        if let Some(kernel) = kernel {
            let opts = DecodeOptions {
                chunk: self.chunk,
                kernel,
            };
            match c.attention_decode_with(&mut enc, &tq, &batch, &pool, &out, opts) {
                Ok(()) => {}
                Err(crate::GpuError::NotAvailable(_)) if kernel != DecodeKernel::Tiled => {
                    return false;
                }
                Err(e) => panic!("decode {kernel:?} {self:?}: {e}"),
            }
        } else {
            c.attention_prefill(&mut enc, &tq, &batch, &pool, &out)
                .unwrap();
        }
        c.submit_and_wait(enc).unwrap();
        let got = c.read_f32(&out).unwrap();
        let tol = if self.f16 { 1e-2 } else { 1e-5 };
        assert_close(
            &format!("attention {kernel:?} {self:?}"),
            &got,
            &self.reference(&b, &q),
            tol,
        );
        true
    }
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    fn prefill_attention_matches_cpu(s in scenario(false)) {
        s.run(ctx(), false);
    }

    #[test]
    fn decode_attention_matches_cpu(s in scenario(true)) {
        // Fast (subgroup shuffles) and portable (workgroup-memory reductions) paths.
        for c in both_ctx() {
            s.run(c, true);
        }
    }

    #[test]
    fn kv_append_places_every_element(s in scenario(false)) {
        for c in both_ctx() {
            let b = s.build(c);
            let kp = c.read_f32(&b.k_pool).unwrap();
            let vp = c.read_f32(&b.v_pool).unwrap();
            let l = b.layout;
            let (hk, hd) = (s.n_kv_heads, s.hd);
            for (si, &(kv, _)) in s.seqs.iter().enumerate() {
                for t in 0..kv {
                    let blk = b.tables[si][t / s.block_size] as u64;
                    for h in 0..hk {
                        for d in 0..hd {
                            let idx = b.base + blk * u64::from(l.block_stride)
                                + h as u64 * u64::from(l.head_stride)
                                + (t % s.block_size) as u64 * u64::from(l.token_stride)
                                + d as u64;
                            let src = (t * hk + h) * hd + d;
                            prop_assert_eq!(kp[idx as usize], b.k[si][src]);
                            prop_assert_eq!(vp[idx as usize], b.v[si][src]);
                        }
                    }
                }
            }
        }
    }
}

/// Long-ish sequences in decode so that the split/reduce path runs with many splits, head_dim
/// 128, and the portable (packed f16) path.
#[test]
fn decode_with_many_splits_and_portable_f16() {
    for (i, c) in both_ctx().into_iter().enumerate() {
        let s = Scenario {
            n_kv_heads: 2,
            group: 4,
            hd: 128,
            block_size: 16,
            seqs: vec![(700, 1), (300, 1), (1, 1)],
            f16: true,
            chunk: None,
            pad: if i == 0 { 0 } else { 2 },
            seed: 42,
            k_ramp: false,
        };
        s.run(c, true);
        let prefill = Scenario {
            seqs: vec![(200, 37), (5, 5)],
            ..s.clone()
        };
        prefill.run(c, false);
    }
}

/// More splits than the reduce pass has threads (each thread folds several splits' (m, l)),
/// and a head_dim that is not a multiple of the reduce pass's 32-dim slices.
#[test]
fn decode_reduce_folds_more_splits_than_threads() {
    let s = Scenario {
        n_kv_heads: 1,
        group: 2,
        hd: 46,
        block_size: 4,
        seqs: vec![(601, 1), (3, 1)],
        f16: false,
        chunk: Some(1),
        pad: 0,
        seed: 7,
        k_ramp: true,
    };
    s.run(ctx(), true);
}

#[test]
fn attention_rejects_bad_shapes() {
    let c = ctx();
    let layout = PagedKvLayout::contiguous(4, 4, 2, 8);
    let k = c
        .create_tensor(&[layout.extent() as usize], DType::F32, "k")
        .unwrap();
    let table = [0u32, 1];
    let batch = SeqBatch::upload(
        c,
        &[SeqDesc {
            n_query: 1,
            kv_len: 5,
            block_table: &table,
        }],
        &layout,
    )
    .unwrap();
    let pool = KvPool {
        k: &k,
        v: &k,
        k_base: 0,
        v_base: 0,
        layout,
    };
    // 3 query heads over 2 kv heads.
    let q = c.create_tensor(&[1, 3, 8], DType::F32, "q").unwrap();
    let mut enc = c.encoder();
    let err = c
        .attention_decode(&mut enc, &q, &batch, &pool, &q.clone())
        .unwrap_err();
    assert!(matches!(err, crate::GpuError::InvalidArgument(_)), "{err}");
    // Block id past the pool.
    let bad = [0u32, 9];
    let err = SeqBatch::upload(
        c,
        &[SeqDesc {
            n_query: 1,
            kv_len: 5,
            block_table: &bad,
        }],
        &layout,
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_blocks"), "{err}");
}

/// Variants a real GPU picks (subgroups of 32, 48 KiB of workgroup memory, 8-half loads)
/// cannot be built on the software device (subgroups of 8, 32 KiB): check that naga accepts
/// them, with every capability the H100 offers.
#[test]
fn gpu_only_decode_variants_pass_naga_validation() {
    use wgpu::naga;
    for (hd, group) in [
        (128u32, 32u32),
        (128, 4),
        (128, 1),
        (64, 8),
        (256, 8),
        (90, 96),
    ] {
        for nkt_cap in [32u32, 16] {
            let p = super::decode_plan(hd, group, 48 * 1024, nkt_cap).unwrap();
            for (sk, ch) in [
                (
                    crate::ElemStorage::F16Packed,
                    if hd % 8 == 0 { 8 } else { 2 },
                ),
                (crate::ElemStorage::F32, if hd % 4 == 0 { 4 } else { 2 }),
            ] {
                let src = super::decode_source("v", hd, sk, sk, &p, ch, true).unwrap();
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("hd {hd} group {group} {p:?}: {e:?}"));
            }
        }
    }
}

/// The lane-group kernel runs wherever the device has subgroups (f16 and f32 pools), and says
/// why where it does not; both kernels agree with the reference when later keys score far
/// above earlier ones. Shapes of a real model: head_dim 64/128, block 16.
#[test]
fn decode_kernels_are_available_where_expected() {
    let c = ctx();
    let f = c.features();
    for (group, hd, f16) in [(4usize, 64usize, true), (1, 128, false), (8, 128, true)] {
        for k_ramp in [false, true] {
            let s = Scenario {
                n_kv_heads: 2,
                group,
                hd,
                block_size: 16,
                seqs: vec![(300, 1), (45, 1)],
                f16,
                chunk: None,
                pad: 0,
                seed: 5,
                k_ramp,
            };
            let ran = s.run_with(c, Some(DecodeKernel::Lanes));
            assert_eq!(ran, f.subgroup, "lane-group kernel, {s:?}");
            // The wide form: f16 pools and groups of up to 4 query heads.
            let ran = s.run_with(c, Some(DecodeKernel::LanesWide));
            assert_eq!(
                ran,
                f.subgroup && f16 && group <= 4,
                "wide lane-group kernel, {s:?}"
            );
            assert!(s.run_with(c, Some(DecodeKernel::Tiled)));
        }
    }
    // MQA with 32 query heads: four workgroups of 8 heads; 13 heads: no share of 4 to 8, the
    // tiled kernel.
    let mqa = Scenario {
        n_kv_heads: 1,
        group: 32,
        hd: 64,
        block_size: 16,
        seqs: vec![(200, 1)],
        f16: true,
        chunk: None,
        pad: 0,
        seed: 9,
        k_ramp: false,
    };
    assert_eq!(mqa.run_with(c, Some(DecodeKernel::Lanes)), f.subgroup);
    let odd = Scenario {
        group: 13,
        ..mqa.clone()
    };
    assert!(!odd.run_with(c, Some(DecodeKernel::Lanes)));
    assert!(odd.run_with(c, Some(DecodeKernel::Auto)));
}

/// The lane-group variants a real GPU builds (subgroups of 32, 48 KiB) pass
/// naga's validation with every capability, whatever the test device.
#[test]
fn fast_decode_kernels_pass_naga_validation() {
    use wgpu::naga;
    let validate = |what: String, src: String| {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    };
    let f16 = crate::ElemStorage::F16;
    let f32s = crate::ElemStorage::F32;
    for (hd, group) in [
        (128u32, 1u32),
        (128, 4),
        (128, 8),
        (64, 16),
        (96, 2),
        (256, 8),
    ] {
        for (sg, st) in [
            ((32u32, 32u32), f16),
            ((8, 8), f16),
            ((32, 32), f32s),
            ((16, 64), f16),
        ] {
            let p = super::lanes_plan(hd, group, st, st, 8, Some(sg)).unwrap();
            assert!(p.l <= sg.0 && p.l.is_power_of_two(), "{p:?}");
            assert_eq!(p.heads * p.row_groups, group, "{p:?}");
            let src = super::lanes_source("v", hd, 16, st == f32s, &p).unwrap();
            validate(format!("lanes hd {hd} group {group} {p:?}"), src);
            match p.widened() {
                Ok(w) => {
                    assert!(st == f16 && p.heads <= 4, "{p:?}");
                    assert_eq!((w.l * 2, w.nv, w.t), (p.l, p.nv * 2, 2), "{w:?}");
                    let src = super::lanes_source("v", hd, 16, false, &w).unwrap();
                    validate(format!("wide lanes hd {hd} group {group} {w:?}"), src);
                }
                Err(why) => assert!(
                    st == f32s || p.heads > 4 || p.l < 4,
                    "{p:?}: no wide form ({why})"
                ),
            }
        }
    }
    // What the plan refuses, and says so.
    assert!(super::lanes_plan(128, 13, f16, f16, 8, Some((32, 32))).is_err());
    assert!(super::lanes_plan(128, 18, f16, f16, 8, Some((32, 32))).is_ok());
    assert!(super::lanes_plan(128, 4, f16, f16, 8, None).is_err());
    assert!(super::lanes_plan(90, 4, f16, f16, 2, Some((32, 32))).is_err());
}

/// The tensor-core kernel against the reference on shapes it takes (MQA and wide GQA, head_dim
/// 16 to 128, block sizes that do and do not hold whole steps of 16 keys, one split and many,
/// steps cut by the sequence end, and keys whose scores climb so that the lazy max moves and
/// O is rescaled); on a device without cooperative matrices it must say it is not available.
#[test]
fn coop_decode_matches_cpu() {
    let c = ctx();
    let cases = [
        (
            1usize,
            32usize,
            128usize,
            16usize,
            vec![(700usize, 1usize), (33, 1)],
            None,
        ),
        (2, 16, 64, 3, vec![(300, 1), (1, 1), (17, 1)], Some(48)),
        (1, 64, 16, 1, vec![(129, 1)], Some(7)),
        (2, 48, 32, 16, vec![(250, 1), (64, 1)], Some(100_000)),
        (1, 32, 128, 16, vec![(2000, 1)], Some(16)),
    ];
    for (i, (n_kv_heads, group, hd, block_size, seqs, chunk)) in cases.into_iter().enumerate() {
        for k_ramp in [false, true] {
            let s = Scenario {
                n_kv_heads,
                group,
                hd,
                block_size,
                seqs: seqs.clone(),
                f16: true,
                chunk,
                pad: 0,
                seed: 31 + i as u64,
                k_ramp,
            };
            let ran = s.run_with(c, Some(DecodeKernel::Coop));
            let can = c.coopmat_f16_available() && c.features().subgroup;
            assert_eq!(ran, can, "tensor-core decode, {s:?}");
        }
    }
    // What the plan refuses: an f32 pool, a group that is not a multiple of 16, a head_dim
    // that is not, unaligned strides, no cooperative matrices, no subgroups, too little
    // workgroup memory; head_dim 256 fits.
    let f16 = crate::ElemStorage::F16;
    let f32s = crate::ElemStorage::F32;
    assert!(super::coop_plan(128, 32, f16, f16, 8, true, true, 48 << 10).is_ok());
    assert!(super::coop_plan(128, 32, f32s, f32s, 4, true, true, 48 << 10).is_err());
    assert!(super::coop_plan(128, 24, f16, f16, 8, true, true, 48 << 10).is_err());
    assert!(super::coop_plan(72, 32, f16, f16, 8, true, true, 48 << 10).is_err());
    assert!(super::coop_plan(128, 32, f16, f16, 4, true, true, 48 << 10).is_err());
    assert!(super::coop_plan(128, 32, f16, f16, 8, false, true, 48 << 10).is_err());
    assert!(super::coop_plan(128, 32, f16, f16, 8, true, false, 48 << 10).is_err());
    assert!(super::coop_plan(128, 32, f16, f16, 8, true, true, 8 << 10).is_err());
    assert!(super::coop_plan(256, 32, f16, f16, 8, true, true, 48 << 10).is_ok());
}

/// Every tensor-core decode variant passes naga's validation (and translation to SPIR-V)
/// with every capability, whatever the test device, and declares the workgroup memory the
/// plan budgets for.
#[test]
fn coop_decode_kernels_pass_naga_validation() {
    let f16 = crate::ElemStorage::F16;
    for (hd, group) in [
        (128u32, 32u32),
        (128, 16),
        (64, 64),
        (16, 48),
        (16, 32),
        (48, 16),
        (192, 32),
    ] {
        let p = super::coop_plan(hd, group, f16, f16, 8, true, true, 48 << 10).unwrap();
        assert_eq!(16 * p.nr * p.row_groups, group, "{p:?}");
        // The chosen split and those for fewer or more subgroups.
        for max_w in [1, 2, 4, 8] {
            let split = super::CoopSplit::choose(hd / 16, p.nr, max_w).unwrap();
            let p = super::CoopPlan { split, ..p };
            let (nd, kt) = (hd / 16, super::COOP_BLOCK / 16);
            assert!(split.w <= max_w, "{p:?}");
            assert_eq!(
                split.w * split.qr * split.kpw * (nd / split.ndg),
                p.nr * kt * nd,
                "{p:?}: score multiply-adds of a block"
            );
            assert_eq!(
                split.w * split.rpw * split.dpw,
                p.nr * nd,
                "{p:?}: output tiles"
            );
            let what = format!("coop decode hd {hd} group {group} split {split:?}");
            let module =
                crate::testing::validate_coop(&what, &super::coop_source("v", hd, 16, &p).unwrap());
            assert_eq!(
                crate::testing::workgroup_bytes(&module),
                super::coop_shared_bytes(hd, p.nr, split.ndg),
                "{what}: workgroup memory"
            );
            assert_eq!(
                module.entry_points[0].workgroup_size,
                [32 * split.w, 1, 1],
                "{what}: workgroup size"
            );
        }
    }
}

/// For every head_dim the tensor-core kernel takes (up to 256) and either row-tile count,
/// the chosen split covers a block's score and output tiles exactly once between the
/// subgroups, stays within the subgroup limit, and uses the most subgroups any exact split
/// allows (checked against a brute-force search over all tile counts).
#[test]
fn coop_splits_cover_a_block_exactly() {
    let kt = super::COOP_BLOCK / 16;
    for nd in 1..=16u32 {
        for nr in [1u32, 2] {
            for max_w in [1u32, 2, 4, 8] {
                let s = super::CoopSplit::choose(nd, nr, max_w).unwrap();
                let what = format!("nd {nd} nr {nr} max_w {max_w}: {s:?}");
                assert!(s.w >= 1 && s.w <= max_w, "{what}");
                assert!(
                    nd.is_multiple_of(s.ndg) && nd.is_multiple_of(s.dpw),
                    "{what}"
                );
                assert!(
                    nr.is_multiple_of(s.qr) && nr.is_multiple_of(s.rpw),
                    "{what}"
                );
                assert!(kt.is_multiple_of(s.kpw), "{what}");
                assert_eq!(s.w * s.qr * s.kpw * (nd / s.ndg), nr * kt * nd, "{what}");
                assert_eq!(s.w * s.rpw * s.dpw, nr * nd, "{what}");
                // Brute force: the largest subgroup count for which both the scores and O
                // split evenly.
                let best = (1..=max_w)
                    .filter(|&w| {
                        let scores = (1..=nr).any(|qr| {
                            (1..=kt).any(|kpw| {
                                (1..=nd).any(|ndg| {
                                    nr.is_multiple_of(qr)
                                        && kt.is_multiple_of(kpw)
                                        && nd.is_multiple_of(ndg)
                                        && nr / qr * (kt / kpw) * ndg == w
                                })
                            })
                        });
                        let outputs = (1..=nr).any(|rpw| {
                            (1..=nd).any(|dpw| {
                                nr.is_multiple_of(rpw)
                                    && nd.is_multiple_of(dpw)
                                    && nr / rpw * (nd / dpw) == w
                            })
                        });
                        scores && outputs
                    })
                    .max()
                    .unwrap();
                assert_eq!(s.w, best, "{what}");
            }
        }
    }
}

/// `Auto` runs the first kernel that applies in the order `decode_choices` lists them:
/// tensor cores, the wide lane kernel, the lane kernel, the tiled kernel; each refusal says
/// why.
#[test]
fn auto_prefers_tensor_cores_then_the_wide_lane_kernel() {
    let c = ctx();
    let f = c.features();
    let packed = crate::ElemStorage::F16Packed;
    let checked = |group: u32, st| super::Checked {
        n_q_heads: 2 * group,
        group,
        hd: 128,
        sk: st,
        sv: st,
    };
    let order = |ch: &[(DecodeKernel, Result<super::DecodeChoice, String>); 4]| {
        ch.iter().map(|(k, _)| *k).collect::<Vec<_>>()
    };
    let gqa4 = c.decode_choices(&checked(4, packed), 8).unwrap();
    assert_eq!(
        order(&gqa4),
        [
            DecodeKernel::Coop,
            DecodeKernel::LanesWide,
            DecodeKernel::Lanes,
            DecodeKernel::Tiled
        ]
    );
    // Four query heads per K/V head: no tensor cores (groups of 16 or more), the wide lane
    // kernel wherever there are subgroups.
    assert!(gqa4[0].1.is_err());
    assert_eq!(gqa4[1].1.is_ok(), f.subgroup, "{:?}", gqa4[1].1);
    // An f32 pool or a group of 8: the lane kernel, not its wide form (which says why).
    let f32pool = c
        .decode_choices(&checked(4, crate::ElemStorage::F32), 4)
        .unwrap();
    let why = f32pool[1].1.as_ref().map(|_| ()).unwrap_err();
    assert!(why.contains("f16"), "{why}");
    assert_eq!(f32pool[2].1.is_ok(), f.subgroup);
    let gqa8 = c.decode_choices(&checked(8, packed), 8).unwrap();
    if f.subgroup {
        let why = gqa8[1].1.as_ref().map(|_| ()).unwrap_err();
        assert!(why.contains("at most 4"), "{why}");
        assert!(gqa8[2].1.is_ok());
    }
    // The tiled kernel always applies.
    assert!(gqa4[3].1.is_ok() && f32pool[3].1.is_ok() && gqa8[3].1.is_ok());
}
