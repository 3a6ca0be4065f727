//! Causal attention over the paged K/V pool (`shaders/attention.wgsl` for prefill,
//! `shaders/attn_decode_coop.wgsl`, `shaders/attn_decode_lanes.wgsl` or
//! `shaders/attn_decode.wgsl`, then `shaders/attn_reduce.wgsl`, for decode).
//!
//! - [`GpuContext::attention_prefill`]: every query row of a batch of sequences (chunked
//!   prefill: the queries are the last `n_query` tokens of each sequence and may follow an
//!   earlier prefix in the cache). Tiled with online softmax; one workgroup per query tile and
//!   query head.
//! - [`GpuContext::attention_decode`]: one query per sequence, split along the sequence
//!   (flash-decoding) with a reduce pass (skipped when one split suffices). The query heads
//!   of a GQA group share a workgroup, so each K/V element is read once per group (or once
//!   per share of a large group, the repeats served by L2). Three kernels
//!   ([`DecodeKernel`]): tensor cores for groups of 16 or more query heads (MQA), lane groups
//!   that stream K/V rows through registers with subgroup reductions and no workgroup memory
//!   in the loop (the fast path for smaller groups), and a portable tiled kernel that stages
//!   K/V tiles in workgroup memory and register-tiles the scores and P.V (any device,
//!   head_dim, pool dtype and layout). See the shaders' headers.
//!
//! Query head `h` reads kv head `h / (n_q_heads / n_kv_heads)` (MHA, GQA and MQA alike); the
//! scale is `1/sqrt(head_dim)`; any even head_dim works. The K/V a layer reads is whatever
//! pool region the caller passes: a Cross-Layer Attention consumer passes its producer's.

use crate::context::GpuContext;
use crate::error::{GpuError, Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::paged::{KvPool, SeqBatch};
use crate::pipeline::{
    Bind, ElemStorage, PipelineKey, elem_buffer, render, whole, with_f16_header,
};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/attention.wgsl");
const COMMON_SRC: &str = include_str!("../shaders/attn_common.wgsl");
const REDUCE_SRC: &str = include_str!("../shaders/attn_reduce.wgsl");
/// Dims per workgroup of the reduce pass (`DW` in attn_reduce.wgsl).
const REDUCE_DIMS: u32 = 32;
const DECODE_SRC: &str = include_str!("../shaders/attn_decode.wgsl");
const LANES_SRC: &str = include_str!("../shaders/attn_decode_lanes.wgsl");
const COOP_SRC: &str = include_str!("../shaders/attn_decode_coop.wgsl");
/// Threads per attention workgroup: enough to load a K/V tile in a few coalesced steps,
/// few enough that one SM holds several workgroups.
const WG: u32 = 128;
/// Workgroups a decode dispatch aims for (about 8 per SM of a 132-SM GPU): below that, the
/// sequence is split further so that a batch of one long sequence still fills the GPU.
const DECODE_TARGET_WORKGROUPS: usize = 1024;
/// Fewest keys per decode split: each split pays a Q load and a partial-result write.
const DECODE_MIN_CHUNK: usize = 64;
/// Workgroups a tensor-core decode dispatch aims for. Swept on the H200 (MQA, head_dim 128,
/// batch 1-64, contexts 8k and 32k, 64-8192 keys per split): the fastest split gave 128-512
/// workgroups, most often 256; more splits cost more partial rows than they gain.
const COOP_TARGET_WORKGROUPS: usize = 256;
/// Fewest keys per split of the tensor-core kernel (two blocks; at batch 1 and 8k, 64 keys per
/// split beat 256 by 1.5x).
const COOP_MIN_CHUNK: usize = 64;
/// Most splits per sequence (bounds the scratch and the reduce loop).
const DECODE_MAX_SPLITS: usize = 256;

/// Tile sizes of one attention variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// Query rows per workgroup (query tokens in prefill, query heads in decode).
    r: u32,
    /// Keys per tile.
    bk: u32,
    /// Threads per dot product.
    split: u32,
    /// Output elements per thread.
    nacc: u32,
    /// Workgroups per GQA group (decode).
    row_groups: u32,
}

fn shared_bytes(hd: u32, r: u32, bk: u32) -> u32 {
    4 * (r * hd + bk * (hd + 1) + bk * hd + r * bk + WG + 3 * r + 6)
}

fn finish(hd: u32, r: u32, bk: u32, row_groups: u32) -> Plan {
    let mut split = 1;
    while split < 16 && r * bk * split * 2 <= WG {
        split *= 2;
    }
    Plan {
        r,
        bk,
        split,
        nacc: (r * hd).div_ceil(WG),
        row_groups,
    }
}

/// Picks tile sizes that fit `max_shared` bytes of workgroup memory. Larger R first: in
/// decode, R query heads share each K/V load; in prefill, R queries share it.
fn plan(hd: u32, group: u32, decode: bool, max_shared: u32) -> Result<Plan> {
    for rmax in [16u32, 8, 4, 2, 1] {
        let r = if decode { group.min(rmax) } else { rmax };
        for bk in [32u32, 16, 8, 4] {
            if shared_bytes(hd, r, bk) <= max_shared {
                if decode {
                    let row_groups = group.div_ceil(r);
                    return Ok(finish(hd, group.div_ceil(row_groups), bk, row_groups));
                }
                return Ok(finish(hd, r, bk, 1));
            }
        }
    }
    Err(GpuError::NotAvailable(format!(
        "attention with head_dim {hd} needs {} bytes of workgroup memory, the adapter has {max_shared}",
        shared_bytes(hd, 1, 4)
    )))
}

/// Threads per decode workgroup.
const DECODE_WG: u32 = 128;

/// Tiling of the decode kernel (`shaders/attn_decode.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DecodePlan {
    /// Query heads per workgroup, and that padded to a power of two.
    r: u32,
    rp: u32,
    /// Keys per tile.
    bk: u32,
    /// Lanes sharing one row's keys in the score tile, and row tiles.
    nkt: u32,
    nrt: u32,
    /// P.V tile: vec4 columns spread over `nc` lanes, rows over `nro` lanes.
    nc: u32,
    nro: u32,
    /// Workgroups per GQA group.
    row_groups: u32,
}

fn decode_shared_bytes(hd: u32, rp: u32, bk: u32, nkt: u32) -> u32 {
    let c4 = hd.div_ceil(4);
    16 * (rp * c4 + bk * (c4 + 1) + bk * c4) + 4 * (rp * bk + rp + rp * nkt + 6)
}

/// Picks the decode tiling. Up to 32 query heads share a workgroup (a GQA group, or a third
/// of an MQA group of 96...), so K/V is read once per group. The score tile gives each thread
/// TR rows x TK keys with TR + TK small (workgroup-memory reads per FMA fall as 1/TR + 1/TK)
/// while keeping all threads busy; `nkt_cap` bounds the lanes that share a row (the
/// subgroup size when the row max is a subgroup shuffle).
fn decode_plan(hd: u32, group: u32, max_shared: u32, nkt_cap: u32) -> Result<DecodePlan> {
    let row_groups = group.div_ceil(32);
    let r = group.div_ceil(row_groups);
    let rp = r.next_power_of_two();
    let c4 = hd.div_ceil(4);
    for bk in [64u32, 32, 16, 8, 4] {
        // Larger tiles only while they stay small next to the workgroup-memory budget.
        if bk == 64 && hd > 64 {
            continue;
        }
        let mut best: Option<(u32, u32, u32, u32)> = None; // (threads, tr+tk, nkt, nrt)
        let mut nkt = 1;
        while nkt <= bk.min(nkt_cap).min(DECODE_WG) {
            let nrt = rp.min(DECODE_WG / nkt);
            let cost = rp / nrt + bk / nkt;
            let cand = (nrt * nkt, cost, nkt, nrt);
            let better = match best {
                None => true,
                Some(b) => cand.0 > b.0 || (cand.0 == b.0 && cand.1 <= b.1),
            };
            if better {
                best = Some(cand);
            }
            nkt *= 2;
        }
        let Some((_, _, nkt, nrt)) = best else {
            continue;
        };
        if decode_shared_bytes(hd, rp, bk, nkt) > max_shared {
            continue;
        }
        let nc = c4.min(DECODE_WG);
        let nro = rp.min((DECODE_WG / nc).max(1));
        return Ok(DecodePlan {
            r,
            rp,
            bk,
            nkt,
            nrt,
            nc,
            nro,
            row_groups,
        });
    }
    Err(GpuError::NotAvailable(format!(
        "decode attention with head_dim {hd} needs {} bytes of workgroup memory, the adapter has {max_shared}",
        decode_shared_bytes(hd, rp, 4, 1)
    )))
}

/// WGSL of one decode variant (see `shaders/attn_decode.wgsl`).
fn decode_source(
    name: &str,
    hd: u32,
    sk: ElemStorage,
    sv: ElemStorage,
    p: &DecodePlan,
    ch: u32,
    sub: bool,
) -> Result<String> {
    let c4 = hd.div_ceil(4);
    let cpk = hd / ch;
    render_attention(
        name,
        DECODE_SRC,
        &[
            ("K_DECL", kv_chunk_decl("k", "ks", "KS4", "KRaw", 4, sk, ch)),
            ("V_DECL", kv_chunk_decl("v", "vs", "C4", "VRaw", 5, sv, ch)),
            ("HD", hd.to_string()),
            ("C4", c4.to_string()),
            ("RP", p.rp.to_string()),
            ("BK", p.bk.to_string()),
            ("WG", DECODE_WG.to_string()),
            ("NKT", p.nkt.to_string()),
            ("TK", (p.bk / p.nkt).to_string()),
            ("NRT", p.nrt.to_string()),
            ("TR", (p.rp / p.nrt).to_string()),
            ("NC", p.nc.to_string()),
            ("NRO", p.nro.to_string()),
            ("TRO", p.rp.div_ceil(p.nro).to_string()),
            ("TC", c4.div_ceil(p.nc).to_string()),
            ("CH", ch.to_string()),
            ("CPK", cpk.to_string()),
            ("NLD", (p.bk * cpk).div_ceil(DECODE_WG).to_string()),
            ("SUBGROUP", sub.to_string()),
            (
                "LANE_XOR",
                if sub {
                    "fn lane_xor(v: f32, o: u32) -> f32 { return subgroupShuffleXor(v, o); }"
                } else {
                    "fn lane_xor(v: f32, o: u32) -> f32 { return v; }"
                }
                .to_owned(),
            ),
        ],
    )
}

/// [`render`] for the attention shaders, which share their parameter block and first
/// bindings (`shaders/attn_common.wgsl`, written by [`GpuContext::attention_params`]).
fn render_attention(name: &str, src: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut all = vec![("ATTN_COMMON", COMMON_SRC.to_owned())];
    all.extend(vars.iter().cloned());
    render(name, src, &all)
}

/// Declaration of a K or V pool binding read in chunks of `ch` elements: the loader
/// `NAME_load(elem) -> RAW` (elem a multiple of `ch`) and `NAME_put(key, chunk, raw)`, which
/// converts a chunk to f32 into the workgroup tile `tile` (row stride `stride` vec4s).
/// f16 pools are always read as packed `u32` words, so no `SHADER_F16` is needed.
fn kv_chunk_decl(
    name: &str,
    tile: &str,
    stride: &str,
    raw: &str,
    binding: u32,
    storage: ElemStorage,
    ch: u32,
) -> String {
    let f32s = storage == ElemStorage::F32;
    let (ty, load) = match (f32s, ch) {
        (true, 4) => ("vec4<f32>", format!("{name}[i >> 2u]")),
        (true, 2) => ("vec2<f32>", format!("{name}[i >> 1u]")),
        (true, _) => ("f32", format!("{name}[i]")),
        (false, 8) => ("vec4<u32>", format!("{name}[i >> 3u]")),
        (false, 4) => ("vec2<u32>", format!("{name}[i >> 2u]")),
        (false, 2) => ("u32", format!("{name}[i >> 1u]")),
        (false, _) => (
            "u32",
            format!("select({name}[i >> 1u] & 0xffffu, {name}[i >> 1u] >> 16u, (i & 1u) == 1u)"),
        ),
    };
    let arr = if !f32s && ch <= 2 { "u32" } else { ty };
    let put = match (f32s, ch) {
        (true, 4) => format!("{tile}[kk * {stride} + c] = r;"),
        (false, 8) => format!(
            "{tile}[kk * {stride} + 2u * c] = vec4<f32>(unpack2x16float(r.x), unpack2x16float(r.y));\n    \
             {tile}[kk * {stride} + 2u * c + 1u] = vec4<f32>(unpack2x16float(r.z), unpack2x16float(r.w));"
        ),
        (false, 4) => format!(
            "{tile}[kk * {stride} + c] = vec4<f32>(unpack2x16float(r.x), unpack2x16float(r.y));"
        ),
        (_, 2) => {
            let v = if f32s { "r" } else { "unpack2x16float(r)" };
            format!(
                "let d = 2u * c;\n    let b = kk * {stride} + (d >> 2u);\n    let v = {v};\n    \
                 {tile}[b][d & 3u] = v.x;\n    {tile}[b][(d & 3u) + 1u] = v.y;"
            )
        }
        _ => {
            let v = if f32s { "r" } else { "unpack2x16float(r).x" };
            format!("{tile}[kk * {stride} + (c >> 2u)][c & 3u] = {v};")
        }
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read> {name}: array<{arr}>;\n\
         alias {raw} = {ty};\n\
         fn {name}_load(i: u32) -> {raw} {{ return {load}; }}\n\
         fn {name}_put(kk: u32, c: u32, r: {raw}) {{\n    {put}\n}}\n"
    )
}

/// Which decode-attention kernel runs (see [`GpuContext::attention_decode_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DecodeKernel {
    /// The fastest kernel that the device, the pool and the group size allow: the
    /// tensor-core kernel where it applies, else the wide lane-group kernel, else the
    /// lane-group kernel, else the tiled kernel.
    #[default]
    Auto,
    /// The portable tiled kernel (`shaders/attn_decode.wgsl`): any adapter, head_dim, pool
    /// dtype and layout.
    Tiled,
    /// Lane groups streaming K/V through registers (`shaders/attn_decode_lanes.wgsl`): needs
    /// subgroups, a group of at most [`LANES_MAX_HEADS`] query heads per K/V head or one
    /// that splits into equal shares of [`LANES_MIN_SHARE`]..=[`LANES_MAX_HEADS`] (one
    /// workgroup each), K and V of one dtype, and head_dim, strides and bases that are
    /// multiples of one 16-byte load.
    Lanes,
    /// The lane-group kernel with half the lanes per key row, each loading twice the dims,
    /// and half the keys per lane group per iteration: a quarter of the shuffles per key, more
    /// registers (one fewer resident workgroup per SM), and longer splits (the dispatch aims
    /// for [`LANES_WIDE_TARGET_WORKGROUPS`], one wave of two per SM on a 132-SM GPU). Needs
    /// what `Lanes` needs plus an f16 pool and at most 4 query heads per workgroup. Measured
    /// on the H200 (GQA4, head_dim 128, batch 1-64, 1k-32k keys, one run): faster than
    /// `Lanes` by up to 29% (38% -> 63% of the copy ceiling at batch 4 / 8k, 53% -> 63% at
    /// batch 1 / 32k, 55% -> 71% at batch 64 / 1k), equal or 2% slower below 4k keys at
    /// batch 1-4.
    LanesWide,
    /// Tensor cores (`shaders/attn_decode_coop.wgsl`): needs 16x16x16 f16 -> f32 cooperative
    /// matrices in subgroups of 32 ([`GpuContext::coopmat_f16_available`]) and subgroup
    /// operations, an f16 pool, a group that is a multiple of 16 query heads per K/V head,
    /// and head_dim, strides and bases that are multiples of 16, 8, 8 elements.
    Coop,
}

/// Options of [`GpuContext::attention_decode_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Keys per split (None: chosen from the batch so that the GPU is full). Any value
    /// `>= 1` is correct.
    pub chunk: Option<usize>,
    /// Kernel to run; a kernel the device or the pool cannot run is a
    /// [`GpuError::NotAvailable`] error.
    pub kernel: DecodeKernel,
}

/// Most query heads per workgroup of [`DecodeKernel::Lanes`]: each lane keeps its dims of
/// every query row and of every output row in registers.
pub const LANES_MAX_HEADS: u32 = 8;
/// Fewest query heads per workgroup when [`DecodeKernel::Lanes`] splits a larger group:
/// below that, re-reading the K/V rows for every share costs more than it saves.
pub const LANES_MIN_SHARE: u32 = 4;
/// Fewest keys per split of [`DecodeKernel::Lanes`], halved when splits that long would leave
/// the dispatch with fewer than [`LANES_FEW_WORKGROUPS`] workgroups. Swept on the H200 (GQA4,
/// head_dim 128, batch 1 and 4, 1k-32k keys, 128 against 256 keys per split): 256 was
/// 4-11% faster wherever it still gave 256 workgroups or more, 18-27% slower where it did not.
const LANES_MIN_CHUNK: usize = 256;
const LANES_FEW_WORKGROUPS: usize = 256;
/// Workgroups a [`DecodeKernel::LanesWide`] dispatch aims for (at least
/// [`LANES_MIN_CHUNK`] keys per split). Measured on the H200 (GQA4, head_dim 128, batch 1-64,
/// 4k-32k keys): 256 against 512 faster by up to 11% (batch 1 / 32k: 63% against 57% of the
/// copy ceiling), never slower; against the lane kernel's 1 024, see
/// [`DecodeKernel::LanesWide`].
pub const LANES_WIDE_TARGET_WORKGROUPS: usize = 256;
/// Threads per lane-group workgroup (at least).
const LANES_WG: u32 = 128;

/// Tiling of the lane-group kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LanesPlan {
    /// Query heads per workgroup, and workgroups per group.
    heads: u32,
    row_groups: u32,
    /// Elements per vector load (8 halves or 4 floats) and vec4<f32>s per load.
    vw: u32,
    vq: u32,
    /// Lanes per key row, and vector loads per lane and row.
    l: u32,
    nv: u32,
    /// Keys per lane group per iteration.
    t: u32,
    wg: u32,
    /// Most subgroups per workgroup (smallest subgroup size).
    max_sg: u32,
    /// The [`DecodeKernel::LanesWide`] form (see [`LanesPlan::widened`]).
    wide: bool,
}

impl LanesPlan {
    /// Keys a workgroup takes per iteration.
    fn keys_per_iter(&self) -> u32 {
        self.wg / self.l * self.t
    }

    /// The [`DecodeKernel::LanesWide`] form of this plan: half the lanes per row with twice
    /// the loads each, two keys per lane group per iteration.
    fn widened(&self) -> std::result::Result<LanesPlan, String> {
        if self.vw != 8 {
            return Err("the wide lane-group kernel needs an f16 pool".into());
        }
        if self.heads > 4 {
            return Err(format!(
                "the wide lane-group kernel takes at most 4 query heads per workgroup, this group \
                 needs {}",
                self.heads
            ));
        }
        if self.l < 4 {
            return Err(format!(
                "head_dim too small for the wide lane-group kernel ({} lanes per row)",
                self.l
            ));
        }
        Ok(LanesPlan {
            l: self.l / 2,
            nv: self.nv * 2,
            t: 2,
            wide: true,
            ..*self
        })
    }
}

/// The lane-group plan, or why it does not apply. `ch` is the widest aligned load (in
/// elements) that every row start allows.
fn lanes_plan(
    hd: u32,
    group: u32,
    sk: ElemStorage,
    sv: ElemStorage,
    ch: u32,
    subgroup: Option<(u32, u32)>,
) -> std::result::Result<LanesPlan, String> {
    let Some((sg_min, sg_max)) = subgroup else {
        return Err("the lane-group kernel needs subgroup operations".into());
    };
    // Query heads per workgroup: the group, or its largest divisor that fits.
    let heads = (1..=group.min(LANES_MAX_HEADS))
        .rev()
        .find(|d| group.is_multiple_of(*d))
        .unwrap_or(1);
    if heads != group && heads < LANES_MIN_SHARE {
        return Err(format!(
            "the lane-group kernel takes up to {LANES_MAX_HEADS} query heads per workgroup; a group \
             of {group} has no share of {LANES_MIN_SHARE} to {LANES_MAX_HEADS}"
        ));
    }
    let f32s = sk == ElemStorage::F32;
    if f32s != (sv == ElemStorage::F32) {
        return Err("the lane-group kernel needs K and V of one dtype".into());
    }
    let (vw, vq) = if f32s { (4, 1) } else { (8, 2) };
    if ch < vw || !hd.is_multiple_of(vw) {
        return Err(format!(
            "the lane-group kernel needs head_dim, strides and bases that are multiples of {vw} elements"
        ));
    }
    let vecs = hd / vw;
    let mut nv = 1;
    while vecs.div_ceil(nv).next_power_of_two() > sg_min.clamp(1, 32) {
        nv += 1;
    }
    let l = vecs.div_ceil(nv).next_power_of_two();
    let t = if heads * nv * vw <= 32 { 4 } else { 2 };
    let wg = LANES_WG.max(sg_max);
    Ok(LanesPlan {
        heads,
        row_groups: group / heads,
        vw,
        vq,
        l,
        nv,
        t,
        wg,
        max_sg: wg / sg_min.max(1),
        wide: false,
    })
}

fn lanes_source(name: &str, hd: u32, block_size: u32, f32s: bool, p: &LanesPlan) -> Result<String> {
    let decl = if f32s {
        "@group(0) @binding(4) var<storage, read> k: array<vec4<f32>>;\n\
         @group(0) @binding(5) var<storage, read> v: array<vec4<f32>>;\n\
         alias KRaw = vec4<f32>;\n\
         fn k_ld(i: u32) -> KRaw { return k[i >> 2u]; }\n\
         fn v_ld(i: u32) -> KRaw { return v[i >> 2u]; }\n\
         fn cv(r: KRaw, h: u32) -> vec4<f32> { return r; }\n"
    } else {
        "@group(0) @binding(4) var<storage, read> k: array<vec4<u32>>;\n\
         @group(0) @binding(5) var<storage, read> v: array<vec4<u32>>;\n\
         alias KRaw = vec4<u32>;\n\
         fn k_ld(i: u32) -> KRaw { return k[i >> 3u]; }\n\
         fn v_ld(i: u32) -> KRaw { return v[i >> 3u]; }\n\
         fn cv(r: KRaw, h: u32) -> vec4<f32> {\n\
             if (h == 0u) { return vec4<f32>(unpack2x16float(r.x), unpack2x16float(r.y)); }\n\
             return vec4<f32>(unpack2x16float(r.z), unpack2x16float(r.w));\n\
         }\n"
    };
    render_attention(
        name,
        LANES_SRC,
        &[
            ("KV_DECL", decl.to_owned()),
            ("HD", hd.to_string()),
            ("G", p.heads.to_string()),
            ("L", p.l.to_string()),
            ("NV", p.nv.to_string()),
            ("VW", p.vw.to_string()),
            ("VQ", p.vq.to_string()),
            ("T", p.t.to_string()),
            ("BS", block_size.to_string()),
            ("WG", p.wg.to_string()),
            ("MAXSG", p.max_sg.to_string()),
        ],
    )
}

/// Tiling of the tensor-core kernel (`shaders/attn_decode_coop.wgsl`): row tiles of 16 query
/// heads per workgroup (1 or 2), workgroups per group, and how a block's work is split among
/// the workgroup's subgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CoopPlan {
    nr: u32,
    row_groups: u32,
    split: CoopSplit,
}

/// A subgroup's share of a block of the tensor-core kernel (`w` subgroups). Scores: `qr` row
/// tiles x `kpw` key tiles over one of `ndg` equal groups of the head's dim tiles (the groups'
/// partial scores are summed by the softmax). P.V: `rpw` row tiles x `dpw` dim tiles of O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CoopSplit {
    w: u32,
    qr: u32,
    kpw: u32,
    ndg: u32,
    rpw: u32,
    dpw: u32,
}

impl CoopSplit {
    /// Fragments a subgroup moves through workgroup memory per block: K and V fragments
    /// loaded, S stored, P loaded.
    fn traffic(&self, nd: u32) -> u32 {
        let kt = COOP_BLOCK / 16;
        self.kpw * (nd / self.ndg) + self.qr * self.kpw + kt * (self.rpw + self.dpw)
    }

    /// Registers per thread for the fragments a subgroup holds (Q, S, O).
    fn registers(&self, nd: u32) -> u32 {
        4 * self.qr * (nd / self.ndg) + 8 * self.qr * self.kpw + 8 * self.rpw * self.dpw
    }

    /// The split of a block of `nd` dim tiles and `nr` row tiles over at most `max_w`
    /// subgroups. Measured on the H200 (MQA, head_dim 128, blocks of 32 keys): four subgroups
    /// beat two by 1.3-2.8x (with 16 query heads, one row tile, four subgroups need the
    /// scores' dims split in two: 2.6x faster than two subgroups without); with 32 heads,
    /// splitting the dims anyway costs ~5%, and which rows and dims of O a subgroup takes makes
    /// no difference. Hence: the most subgroups, then the fewest dim groups, then the least
    /// traffic, then the fewest registers.
    fn choose(nd: u32, nr: u32, max_w: u32) -> Option<CoopSplit> {
        let kt = COOP_BLOCK / 16;
        let divisors = |n: u32| (1..=n).filter(move |d| n.is_multiple_of(*d));
        let rank = |s: &CoopSplit| {
            (
                std::cmp::Reverse(s.w),
                s.ndg,
                s.traffic(nd),
                s.registers(nd),
            )
        };
        // (Runs on every decode call: keeps the best candidate instead of collecting them.)
        let mut best: Option<CoopSplit> = None;
        for qr in divisors(nr) {
            for kpw in divisors(kt) {
                for ndg in divisors(nd) {
                    let w = nr / qr * (kt / kpw) * ndg;
                    for rpw in divisors(nr) {
                        for dpw in divisors(nd) {
                            if w <= max_w && nr / rpw * (nd / dpw) == w {
                                let s = CoopSplit {
                                    w,
                                    qr,
                                    kpw,
                                    ndg,
                                    rpw,
                                    dpw,
                                };
                                if best.is_none_or(|b| rank(&s) < rank(&b)) {
                                    best = Some(s);
                                }
                            }
                        }
                    }
                }
            }
        }
        best
    }
}

/// Keys per block of the tensor-core kernel (a multiple of 16). Measured on the H200 for MQA
/// (32 query heads per K/V head, head_dim 128), blocks of 32 keys with four subgroups (one
/// key tile each for the scores) against: 16 keys with two subgroups 1.3-1.5x slower, 32 with
/// two 2.8x slower, 64 with four 2.8x slower, 64 with eight 10% slower.
const COOP_BLOCK: u32 = 32;

/// Workgroup memory of the tensor-core kernel: one block of K or V (or the query rows) as
/// 16-wide tiles of 24-half rows (f16, tiles padded by 8 halves), S for the block per dim group
/// and P (f32 and f16 rows padded by 16 bytes), and eight words of bounds and flag.
fn coop_shared_bytes(hd: u32, nr: u32, ndg: u32) -> u32 {
    let (rt, kb) = (16 * nr, COOP_BLOCK);
    2 * (hd / 16) * (kb.max(rt) * 24 + 8) + 4 * ndg * rt * (kb + 4) + 2 * rt * (kb + 8) + 32
}

/// Most subgroups per tensor-core workgroup (eight were 5-10% slower than four at batch 16-64
/// for 32-head MQA on the H200).
const COOP_MAX_SUBGROUPS: u32 = 4;

/// The tensor-core plan, or why it does not apply. `ch` as in [`lanes_plan`]; `available`:
/// [`GpuContext::coopmat_f16_available`]; `subgroup`: subgroup operations (the softmax's row
/// maxima are shuffles).
#[allow(clippy::too_many_arguments)]
fn coop_plan(
    hd: u32,
    group: u32,
    sk: ElemStorage,
    sv: ElemStorage,
    ch: u32,
    available: bool,
    subgroup: bool,
    max_shared: u32,
) -> std::result::Result<CoopPlan, String> {
    if !available {
        return Err(
            "the tensor-core kernel needs 16x16x16 f16 cooperative matrices in subgroups of 32 \
             (or was switched off with CLA_GPU_DISABLE=coopmat)"
                .into(),
        );
    }
    if !subgroup {
        return Err(
            "the tensor-core kernel needs subgroup operations (or they were switched off with \
             CLA_GPU_DISABLE=subgroup)"
                .into(),
        );
    }
    let f16 = |s: ElemStorage| matches!(s, ElemStorage::F16 | ElemStorage::F16Packed);
    if !f16(sk) || !f16(sv) {
        return Err("the tensor-core kernel needs an f16 K/V pool".into());
    }
    if !group.is_multiple_of(16) {
        return Err(format!(
            "the tensor-core kernel needs a multiple of 16 query heads per K/V head, got {group}"
        ));
    }
    if !hd.is_multiple_of(16) || ch < 8 {
        return Err(format!(
            "the tensor-core kernel needs head_dim ({hd}) a multiple of 16 and strides and bases \
             that are multiples of 8 elements"
        ));
    }
    // Two row tiles (32 query heads) per workgroup where they fit, else one.
    let mut need = 0;
    for nr in [2, 1] {
        if !group.is_multiple_of(16 * nr) {
            continue;
        }
        let split =
            CoopSplit::choose(hd / 16, nr, COOP_MAX_SUBGROUPS).expect("one subgroup always splits");
        need = coop_shared_bytes(hd, nr, split.ndg);
        if need <= max_shared {
            return Ok(CoopPlan {
                nr,
                row_groups: group / (16 * nr),
                split,
            });
        }
    }
    Err(format!(
        "the tensor-core kernel with head_dim {hd} needs {need} bytes of workgroup memory, \
         the adapter has {max_shared}"
    ))
}

/// The tensor-core kernel's source: the template with its per-fragment statements unrolled.
fn coop_source(name: &str, hd: u32, block_size: u32, p: &CoopPlan) -> Result<String> {
    use std::fmt::Write;
    let nd = hd / 16;
    let [
        mut q_load,
        mut qk,
        mut s_store,
        mut decl,
        mut pv,
        mut spill,
        mut fill,
    ] = [(); 7].map(|()| String::new());
    let sp = &p.split;
    let ndd = nd / sp.ndg;
    for i in 0..sp.qr {
        for j in 0..ndd {
            let _ = writeln!(
                &mut q_load,
                "    let q{i}_{j} = coopLoadT<FragA>(&kv[(qr0 + {i}u) * 16u * TS + (dq0 + {j}u) * DT], TS);"
            );
        }
    }
    for i in 0..sp.qr {
        for c in 0..sp.kpw {
            let _ = writeln!(&mut qk, "        var s{i}_{c}: Acc;");
        }
    }
    for c in 0..sp.kpw {
        for j in 0..ndd {
            let _ = writeln!(
                &mut qk,
                "        {{\n            let b = coopLoad<FragB>(&kv[(dq0 + {j}u) * DT + (kt0 + {c}u) * 16u * TS], TS);"
            );
            for i in 0..sp.qr {
                let acc = if j == 0 {
                    "zc".to_string()
                } else {
                    format!("s{i}_{c}")
                };
                let _ = writeln!(
                    &mut qk,
                    "            s{i}_{c} = coopMultiplyAdd(q{i}_{j}, b, {acc});"
                );
            }
            qk += "        }\n";
        }
        for i in 0..sp.qr {
            let _ = writeln!(
                &mut s_store,
                "        {{\n            let sv = s{i}_{c};\n            let at = sb + (qr0 + {i}u) * 16u * SS + (kt0 + {c}u) * 16u;\n            coopStoreT(sv, &ss[at], SS);\n        }}"
            );
        }
    }
    for c in 0..COOP_BLOCK / 16 {
        pv += "        {\n";
        for i in 0..sp.rpw {
            let _ = writeln!(
                &mut pv,
                "            let pa{i} = coopLoadT<FragA>(&ps[(pr0 + {i}u) * 16u * PS + {}u], PS);",
                c * 16
            );
        }
        for j in 0..sp.dpw {
            let _ = writeln!(
                &mut pv,
                "            let vb{j} = coopLoadT<FragB>(&kv[(pd0 + {j}u) * DT + {}u * TS], TS);",
                c * 16
            );
            for i in 0..sp.rpw {
                let _ = writeln!(
                    &mut pv,
                    "            o{i}_{j} = coopMultiplyAdd(pa{i}, vb{j}, o{i}_{j});"
                );
            }
        }
        pv += "        }\n";
    }
    for i in 0..sp.rpw {
        for j in 0..sp.dpw {
            let at = format!("obase + (pr0 + {i}u) * 16u * ostride + (pd0 + {j}u) * 16u");
            let _ = writeln!(&mut decl, "    var o{i}_{j} = Acc();");
            let _ = writeln!(
                &mut spill,
                "    {{\n        let v = o{i}_{j};\n        let at = {at};\n        coopStoreT(v, &out[at], ostride);\n    }}"
            );
            let _ = writeln!(
                &mut fill,
                "    o{i}_{j} = coopLoadT<Acc>(&out[{at}], ostride);"
            );
        }
    }
    render_attention(
        name,
        COOP_SRC,
        &[
            ("HD", hd.to_string()),
            ("KB", COOP_BLOCK.to_string()),
            ("NR", p.nr.to_string()),
            ("W", sp.w.to_string()),
            ("QR", sp.qr.to_string()),
            ("KPW", sp.kpw.to_string()),
            ("NDD", ndd.to_string()),
            ("RPW", sp.rpw.to_string()),
            ("DPW", sp.dpw.to_string()),
            ("BS", block_size.to_string()),
            ("Q_LOAD", q_load),
            ("QK", qk),
            ("S_STORE", s_store),
            ("O_DECL", decl),
            ("PV", pv),
            ("O_SPILL", spill),
            ("O_FILL", fill),
        ],
    )
}

/// The kernel a decode call runs, with its plan.
#[derive(Debug, Clone, Copy)]
enum DecodeChoice {
    Tiled(DecodePlan),
    Lanes(LanesPlan),
    Coop(CoopPlan),
}

struct Checked {
    n_q_heads: u32,
    group: u32,
    hd: u32,
    sk: ElemStorage,
    sv: ElemStorage,
}

impl GpuContext {
    fn check_attention(
        &self,
        q: &GpuTensor,
        batch: &SeqBatch,
        pool: &KvPool<'_>,
        out: &GpuTensor,
    ) -> Result<Checked> {
        pool.validate()?;
        let l = pool.layout;
        ensure_arg!(
            q.shape.len() == 3,
            "attention: q must be [query rows, n_q_heads, head_dim], got {:?}",
            q.shape
        );
        let (rows, n_q_heads, hd) = (q.shape[0], q.shape[1], q.shape[2]);
        ensure_arg!(
            hd == l.head_dim as usize,
            "attention: q head_dim {hd} != pool head_dim {}",
            l.head_dim
        );
        ensure_arg!(
            n_q_heads > 0 && n_q_heads % l.n_kv_heads as usize == 0,
            "attention: n_q_heads ({n_q_heads}) is not a multiple of n_kv_heads ({})",
            l.n_kv_heads
        );
        ensure_arg!(
            rows == batch.total_query,
            "attention: q has {rows} rows, the batch has {} query tokens",
            batch.total_query
        );
        expect(q, "attention q", DType::F32, rows * n_q_heads * hd)?;
        expect(out, "attention out", DType::F32, rows * n_q_heads * hd)?;
        expect(
            &batch.meta,
            "attention seq meta",
            DType::U32,
            batch.n_seqs * 4,
        )?;
        ensure_arg!(
            batch.n_seqs as u64 <= u64::from(self.features().max_workgroups_per_dim),
            "attention: {} sequences exceed one dispatch",
            batch.n_seqs
        );
        Ok(Checked {
            n_q_heads: u32_of("n_q_heads", n_q_heads)?,
            group: u32_of("group", n_q_heads / l.n_kv_heads as usize)?,
            hd: l.head_dim,
            sk: self.elem_storage(pool.k.dtype)?,
            sv: self.elem_storage(pool.v.dtype)?,
        })
    }

    fn attention_kernel(
        &self,
        decode: bool,
        c: &Checked,
        p: Plan,
    ) -> Result<std::sync::Arc<crate::pipeline::Kernel>> {
        let key = PipelineKey {
            kernel: if decode {
                "attn_decode_split"
            } else {
                "attn_prefill"
            },
            elems: vec![c.sk, c.sv],
            params: vec![("hd", c.hd), ("r", p.r), ("bk", p.bk), ("s", p.split)],
        };
        let mut binds = vec![
            Bind::Uniform,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::ReadWrite,
        ];
        if decode {
            binds.push(Bind::ReadWrite);
        }
        let (sk, sv) = (c.sk, c.sv);
        let hd = c.hd;
        self.kernel(key, &binds, |name| {
            let (ml_decl, ml_write) = if decode {
                (
                    "@group(0) @binding(7) var<storage, read_write> ml: array<f32>;",
                    "if (lid < R) {
        let row = row_info(lid, wid, q0, nq, kvl);
        if (row.valid) {
            let slot = (seq * p.n_q_heads + row.qh) * p.n_splits + wid.x;
            ml[slot * 2u] = m_s[lid];
            ml[slot * 2u + 1u] = l_s[lid];
        }
    }",
                )
            } else {
                ("", "")
            };
            let body = render_attention(
                name,
                SRC,
                &[
                    ("K_DECL", elem_buffer("k", 4, sk, false)),
                    ("V_DECL", elem_buffer("v", 5, sv, false)),
                    ("ML_DECL", ml_decl.to_owned()),
                    ("ML_WRITE", ml_write.to_owned()),
                    ("HD", hd.to_string()),
                    ("R", p.r.to_string()),
                    ("BK", p.bk.to_string()),
                    ("WG", WG.to_string()),
                    ("SPLIT", p.split.to_string()),
                    ("NACC", p.nacc.to_string()),
                    ("DECODE", decode.to_string()),
                ],
            )?;
            Ok(with_f16_header(&[sk, sv], body))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_params(
        &self,
        c: &Checked,
        pool: &KvPool<'_>,
        k_off: u64,
        v_off: u64,
        chunk: u32,
        n_splits: u32,
        row_groups: u32,
    ) -> Result<wgpu::Buffer> {
        let l = pool.layout;
        Ok(self.uniform(&[
            c.n_q_heads,
            l.n_kv_heads,
            c.group,
            (1.0 / (c.hd as f32).sqrt()).to_bits(),
            l.block_size,
            u32_of("k base", k_off as usize)?,
            u32_of("v base", v_off as usize)?,
            l.block_stride,
            l.head_stride,
            l.token_stride,
            chunk,
            n_splits,
            row_groups,
        ]))
    }

    /// Causal attention for every query row of `batch`: `q` and `out` are
    /// `[total_query, n_q_heads, head_dim]` f32 (rows of each sequence consecutive, in batch
    /// order); the K/V of all `kv_len` tokens of each sequence must already be in `pool`
    /// (append first, with [`GpuContext::kv_append`]).
    pub fn attention_prefill(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &GpuTensor,
        batch: &SeqBatch,
        pool: &KvPool<'_>,
        out: &GpuTensor,
    ) -> Result<()> {
        let c = self.check_attention(q, batch, pool, out)?;
        let p = plan(c.hd, c.group, false, self.features().max_workgroup_storage)?;
        let kernel = self.attention_kernel(false, &c, p)?;
        let ((kb, k_off), (vb, v_off)) = self.kv_windows("attention", pool, c.sk, c.sv)?;
        let params = self.attention_params(&c, pool, k_off, v_off, 0, 1, 1)?;
        let tiles = u32_of("query tiles", batch.max_query.div_ceil(p.r as usize))?;
        ensure_arg!(
            tiles <= self.features().max_workgroups_per_dim,
            "attention_prefill: {} query rows per sequence exceed one dispatch",
            batch.max_query
        );
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(q),
                whole(&batch.meta),
                whole(&batch.block_tables),
                kb,
                vb,
                whole(out),
            ],
            (tiles, c.n_q_heads, batch.n_seqs as u32),
        );
        Ok(())
    }

    /// Decode attention: one query per sequence (`batch.max_query == 1`); `q` and `out` are
    /// `[n_seqs, n_q_heads, head_dim]` f32. Records two dispatches (split, then reduce) that
    /// use a scratch buffer owned by the context.
    pub fn attention_decode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &GpuTensor,
        batch: &SeqBatch,
        pool: &KvPool<'_>,
        out: &GpuTensor,
    ) -> Result<()> {
        self.attention_decode_chunked(encoder, q, batch, pool, out, None)
    }

    /// [`GpuContext::attention_decode`] with the keys per split fixed to `chunk` instead of
    /// chosen by the occupancy heuristic (for tuning and tests; any `chunk >= 1` is correct).
    pub fn attention_decode_chunked(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &GpuTensor,
        batch: &SeqBatch,
        pool: &KvPool<'_>,
        out: &GpuTensor,
        chunk: Option<usize>,
    ) -> Result<()> {
        let opts = DecodeOptions {
            chunk,
            kernel: DecodeKernel::Auto,
        };
        self.attention_decode_with(encoder, q, batch, pool, out, opts)
    }

    /// The kernels [`GpuContext::attention_decode_with`] could run for this pool and group
    /// size on this device, each with the reason when it cannot.
    fn decode_choices(
        &self,
        c: &Checked,
        ch: u32,
    ) -> Result<[(DecodeKernel, std::result::Result<DecodeChoice, String>); 4]> {
        let f = self.features();
        // Subgroup shuffles reduce over NKT lanes: usable when NKT fits in the smallest
        // subgroup the adapter may run.
        let nkt_cap = if f.subgroup {
            f.subgroup_size.0.clamp(1, 32)
        } else {
            32
        };
        let tiled = decode_plan(c.hd, c.group, f.max_workgroup_storage, nkt_cap)?;
        let sub = f.subgroup.then_some(f.subgroup_size);
        let lanes = lanes_plan(c.hd, c.group, c.sk, c.sv, ch, sub);
        let wide = lanes
            .clone()
            .and_then(|p| p.widened())
            .map(DecodeChoice::Lanes);
        let lanes = lanes.map(DecodeChoice::Lanes);
        let coop = coop_plan(
            c.hd,
            c.group,
            c.sk,
            c.sv,
            ch,
            self.coopmat_f16_available(),
            f.subgroup,
            f.max_workgroup_storage,
        )
        .map(DecodeChoice::Coop);
        Ok([
            (DecodeKernel::Coop, coop),
            (DecodeKernel::LanesWide, wide),
            (DecodeKernel::Lanes, lanes),
            (DecodeKernel::Tiled, Ok(DecodeChoice::Tiled(tiled))),
        ])
    }

    /// Decode attention with a chosen kernel and split size (see [`DecodeOptions`]); the
    /// shapes are those of [`GpuContext::attention_decode`].
    pub fn attention_decode_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        q: &GpuTensor,
        batch: &SeqBatch,
        pool: &KvPool<'_>,
        out: &GpuTensor,
        opts: DecodeOptions,
    ) -> Result<()> {
        ensure_arg!(
            opts.chunk != Some(0),
            "attention_decode: chunk must be >= 1"
        );
        ensure_arg!(
            batch.max_query == 1,
            "attention_decode: every sequence must have exactly one query (max is {}); use attention_prefill",
            batch.max_query
        );
        let c = self.check_attention(q, batch, pool, out)?;
        let f = self.features();
        let l = pool.layout;
        let ((kb, k_off), (vb, v_off)) = self.kv_windows("attention", pool, c.sk, c.sv)?;
        // Widest load every row start allows (all offsets are multiples of CH elements).
        let ch = [8u32, 4, 2, 1]
            .into_iter()
            .find(|&ch| {
                let max_ch = |s: ElemStorage| if s == ElemStorage::F32 { 4 } else { 8 };
                ch <= max_ch(c.sk).min(max_ch(c.sv))
                    && [
                        u64::from(c.hd),
                        u64::from(l.block_stride),
                        u64::from(l.head_stride),
                        u64::from(l.token_stride),
                        k_off,
                        v_off,
                    ]
                    .iter()
                    .all(|x| x % u64::from(ch) == 0)
            })
            .unwrap_or(1);

        let max_kv = batch.max_kv_len.max(1);
        // Workgroups of one split of every sequence and K/V head.
        let per_split =
            |row_groups: u32| batch.n_seqs * l.n_kv_heads as usize * row_groups as usize;
        let choices = self.decode_choices(&c, ch)?;
        let choice = match opts.kernel {
            DecodeKernel::Auto => choices.into_iter().find_map(|(_, r)| r.ok()),
            want => match choices.into_iter().find(|(k, _)| *k == want) {
                Some((_, Ok(choice))) => Some(choice),
                Some((_, Err(why))) => {
                    return Err(GpuError::NotAvailable(format!("attention_decode: {why}")));
                }
                None => None,
            },
        }
        .ok_or_else(|| GpuError::NotAvailable("attention_decode: no kernel applies".into()))?;

        // Per kernel: workgroups per (sequence, K/V head) and split, the key granularity a
        // split should be a multiple of, the fewest keys per split (each split re-reads the
        // query rows and writes partial rows, which must stay small next to its K/V), and
        // the workgroups a dispatch aims for.
        let (row_groups, gran, min_chunk, target) = match choice {
            DecodeChoice::Tiled(p) => (
                p.row_groups,
                p.bk as usize,
                (2 * p.r as usize).max(DECODE_MIN_CHUNK),
                DECODE_TARGET_WORKGROUPS,
            ),
            DecodeChoice::Lanes(p) => {
                let wgs = max_kv.div_ceil(LANES_MIN_CHUNK) * per_split(p.row_groups);
                (
                    p.row_groups,
                    p.keys_per_iter() as usize,
                    if wgs < LANES_FEW_WORKGROUPS {
                        LANES_MIN_CHUNK / 2
                    } else {
                        LANES_MIN_CHUNK
                    },
                    if p.wide {
                        LANES_WIDE_TARGET_WORKGROUPS
                    } else {
                        DECODE_TARGET_WORKGROUPS
                    },
                )
            }
            DecodeChoice::Coop(p) => (
                p.row_groups,
                COOP_BLOCK as usize,
                COOP_MIN_CHUNK,
                COOP_TARGET_WORKGROUPS,
            ),
        };
        // Split heuristic: enough splits that the dispatch has about `target` workgroups
        // (several per SM even at batch 1).
        let want = target
            .div_ceil(per_split(row_groups))
            .clamp(1, DECODE_MAX_SPLITS);
        let mut chunk = opts
            .chunk
            .unwrap_or_else(|| max_kv.div_ceil(want).max(min_chunk).div_ceil(gran) * gran);
        let heads = batch.n_seqs * c.n_q_heads as usize;
        let max_bytes = f.max_storage_binding as usize;
        while max_kv.div_ceil(chunk) * heads * c.hd as usize * 4 > max_bytes {
            chunk *= 2;
        }
        let n_splits = max_kv.div_ceil(chunk);
        ensure_arg!(
            n_splits as u64 <= u64::from(f.max_workgroups_per_dim),
            "attention_decode: too many splits"
        );
        // One split: the kernel normalises and writes `out` itself, no reduce pass.
        let direct = n_splits == 1;

        let part_elems = if direct {
            1
        } else {
            (heads * n_splits * c.hd as usize) as u64
        };
        let ml_elems = (heads * n_splits * 2) as u64;
        let align = u64::from(f.storage_offset_alignment.max(4)) / 4;
        let ml_first = part_elems.div_ceil(align) * align;
        let scratch = self.scratch_buffer((ml_first + ml_elems) * 4)?;
        let (part_b, _) = self.window("decode partials", &scratch, 0, part_elems, 4)?;
        let (ml_b, _) = self.window("decode partial stats", &scratch, ml_first, ml_elems, 4)?;

        let kernel = self.decode_kernel(&c, &choice, l.block_size, ch)?;
        let params = self.attention_params(
            &c,
            pool,
            k_off,
            v_off,
            chunk as u32,
            n_splits as u32,
            row_groups,
        )?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(q),
                whole(&batch.meta),
                whole(&batch.block_tables),
                kb,
                vb,
                if direct { whole(out) } else { part_b.clone() },
                ml_b.clone(),
            ],
            (
                n_splits as u32,
                l.n_kv_heads * row_groups,
                batch.n_seqs as u32,
            ),
        );
        if direct {
            return Ok(());
        }

        let key = PipelineKey {
            kernel: "attn_decode_reduce",
            elems: vec![],
            params: vec![("hd", c.hd)],
        };
        let hd = c.hd;
        let reduce = self.kernel(
            key,
            &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
            ],
            |name| render(name, REDUCE_SRC, &[("HD", hd.to_string())]),
        )?;
        let rparams = self.uniform(&[c.n_q_heads, n_splits as u32]);
        self.dispatch(
            encoder,
            &reduce,
            &[
                rparams.as_entire_binding(),
                whole(&batch.meta),
                part_b,
                ml_b,
                whole(out),
            ],
            (c.n_q_heads, batch.n_seqs as u32, hd.div_ceil(REDUCE_DIMS)),
        );
        Ok(())
    }

    fn decode_kernel(
        &self,
        c: &Checked,
        choice: &DecodeChoice,
        block_size: u32,
        ch: u32,
    ) -> Result<std::sync::Arc<crate::pipeline::Kernel>> {
        let binds = [
            Bind::Uniform,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::ReadWrite,
            Bind::ReadWrite,
        ];
        let hd = c.hd;
        let (sk, sv) = (c.sk, c.sv);
        match *choice {
            DecodeChoice::Tiled(p) => {
                let sub = self.features().subgroup && p.nkt <= self.features().subgroup_size.0;
                let key = PipelineKey {
                    kernel: "attn_decode_split",
                    elems: vec![sk, sv],
                    params: vec![
                        ("hd", hd),
                        ("rp", p.rp),
                        ("bk", p.bk),
                        ("nkt", p.nkt),
                        ("ch", ch),
                        ("sg", u32::from(sub)),
                    ],
                };
                self.kernel(key, &binds, |name| {
                    decode_source(name, hd, sk, sv, &p, ch, sub)
                })
            }
            DecodeChoice::Lanes(p) => {
                let f32s = sk == ElemStorage::F32;
                let key = PipelineKey {
                    kernel: "attn_decode_lanes",
                    elems: vec![if f32s {
                        ElemStorage::F32
                    } else {
                        ElemStorage::F16Packed
                    }],
                    params: vec![
                        ("hd", hd),
                        ("g", p.heads),
                        ("l", p.l),
                        ("nv", p.nv),
                        ("t", p.t),
                        ("bs", block_size),
                        ("wg", p.wg),
                    ],
                };
                self.kernel(key, &binds, |name| {
                    lanes_source(name, hd, block_size, f32s, &p)
                })
            }
            DecodeChoice::Coop(p) => {
                let key = PipelineKey {
                    kernel: "attn_decode_coop",
                    elems: vec![ElemStorage::F16Packed],
                    params: vec![
                        ("hd", hd),
                        ("nr", p.nr),
                        ("w", p.split.w),
                        ("qr", p.split.qr),
                        ("kpw", p.split.kpw),
                        ("ndg", p.split.ndg),
                        ("rpw", p.split.rpw),
                        ("bs", block_size),
                    ],
                };
                self.kernel(key, &binds, |name| coop_source(name, hd, block_size, &p))
            }
        }
    }

    /// The context's scratch buffer, grown to at least `bytes`. Work already recorded keeps
    /// the old buffer alive, so growing between recorded dispatches is safe.
    fn scratch_buffer(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| GpuError::Device("scratch lock poisoned".into()))?;
        if let Some(b) = guard.as_ref()
            && b.size() >= bytes
        {
            return Ok(b.clone());
        }
        if bytes > self.features().max_buffer_size {
            return Err(GpuError::NotAvailable(format!(
                "decode attention needs {bytes} bytes of scratch, above the adapter's buffer limit"
            )));
        }
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("cla attention scratch"),
            size: bytes
                .next_power_of_two()
                .min(self.features().max_buffer_size)
                .max(bytes),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        *guard = Some(b.clone());
        Ok(b)
    }
}

#[cfg(test)]
mod tests;
