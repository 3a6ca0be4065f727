// Split-K decode attention (flash-decoding), built for memory bandwidth.
//
// Grid: (splits, kv heads * row groups, sequences). A workgroup takes the query heads of one
// GQA group (up to RP of them, zero-padded to a power of two) and one chunk of one sequence's
// keys, so each K/V element is read from memory once per group. The chunk is walked in tiles
// of BK keys:
//
// 1. Load: the next tile's K and V are fetched into registers as wide chunks (CH elements per
//    load: vec4<u32> = 8 halves when the layout is aligned) while the current tile is being
//    computed, then converted to f32 into workgroup memory. One block-table lookup per chunk.
// 2. Scores: a register tile of TR query rows x TK keys per thread (rows are broadcast reads,
//    keys are vec4 reads of padded rows, so workgroup-memory traffic is ~1/4 of the FMAs).
//    The NKT threads that share rows hold the tile's keys between them: the row max is an
//    all-reduce over those NKT lanes, by subgroup shuffles (SUBGROUP) or workgroup memory.
// 3. Online softmax: the running max m and the (per-thread partial) sum l stay in registers;
//    l is reduced over the NKT lanes once, at the end.
// 4. P.V: a register tile of TRO rows x TC vec4 columns per thread.
//
// Output: the unnormalised partial row with its (m, l) for attn_reduce.wgsl, or, when the
// sequence is not split (n_splits == 1), the normalised row.
//
// Placeholders (written in double braces below): ATTN_COMMON (attn_common.wgsl: the
// parameter block and bindings 0-3), K_DECL / V_DECL (bindings 4 and 5 with the
// loaders k_load / v_load and the converters k_put / v_put), HD, C4 (HD rounded up to a
// multiple of 4, in vec4s), RP, BK, WG, NKT, TK, NRT, TR, NC, NRO, TRO, TC, CH, CPK, NLD,
// SUBGROUP, LANE_XOR (subgroupShuffleXor, or a stub never called without subgroups:
// the validator rejects subgroup built-ins on devices without SUBGROUP even in dead code).

{{ATTN_COMMON}}
{{K_DECL}}
{{V_DECL}}
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<f32>;

const HD: u32 = {{HD}}u;
const C4: u32 = {{C4}}u;
const RP: u32 = {{RP}}u;
const BK: u32 = {{BK}}u;
const WG: u32 = {{WG}}u;
const NKT: u32 = {{NKT}}u;
const TK: u32 = {{TK}}u;
const NRT: u32 = {{NRT}}u;
const TR: u32 = {{TR}}u;
const NC: u32 = {{NC}}u;
const NRO: u32 = {{NRO}}u;
const TRO: u32 = {{TRO}}u;
const TC: u32 = {{TC}}u;
const CH: u32 = {{CH}}u;
const CPK: u32 = {{CPK}}u;
const NLD: u32 = {{NLD}}u;
const SUBGROUP: bool = {{SUBGROUP}};
// K rows are padded by one vec4 so that the NKT lanes reading different keys hit different
// banks.
const KS4: u32 = C4 + 1u;
// "Minus infinity" that stays finite: exp(NEG - NEG) = 1 instead of NaN.
const NEG: f32 = -1.0e30;

var<workgroup> qs: array<vec4<f32>, RP * C4>;
var<workgroup> ks: array<vec4<f32>, BK * KS4>;
var<workgroup> vs: array<vec4<f32>, BK * C4>;
var<workgroup> ps: array<f32, RP * BK>;
var<workgroup> alpha_s: array<f32, RP>;
var<workgroup> red: array<f32, RP * NKT>;
var<workgroup> w_meta: array<u32, 6>;

{{LANE_XOR}}

// Element offset (relative to the K or V base) of logical token `pos`, dim 0.
fn row_offset(pos: u32, bt0: u32, kvh: u32) -> u32 {
    let blk = block_table[bt0 + pos / p.block_size];
    return blk * p.block_stride + kvh * p.head_stride + (pos % p.block_size) * p.token_stride;
}

// Max (or sum) over the NKT lanes that hold one row's keys. Every thread calls these, in
// uniform control flow; `owner` gates the workgroup-memory writes of the fallback.
fn lanes_max(vals: ptr<function, array<f32, TR>>, rbase: u32, kt_i: u32, owner: bool) {
    if (NKT == 1u) {
        return;
    }
    if (SUBGROUP) {
        for (var i = 0u; i < TR; i++) {
            var v = (*vals)[i];
            for (var o = 1u; o < NKT; o <<= 1u) {
                v = max(v, lane_xor(v, o));
            }
            (*vals)[i] = v;
        }
    } else {
        workgroupBarrier();
        if (owner) {
            for (var i = 0u; i < TR; i++) {
                red[(rbase + i) * NKT + kt_i] = (*vals)[i];
            }
        }
        workgroupBarrier();
        for (var i = 0u; i < TR; i++) {
            var v = NEG;
            for (var j = 0u; j < NKT; j++) {
                v = max(v, red[(rbase + i) * NKT + j]);
            }
            (*vals)[i] = v;
        }
    }
}

fn lanes_sum(vals: ptr<function, array<f32, TR>>, rbase: u32, kt_i: u32, owner: bool) {
    if (NKT == 1u) {
        return;
    }
    if (SUBGROUP) {
        for (var i = 0u; i < TR; i++) {
            var v = (*vals)[i];
            for (var o = 1u; o < NKT; o <<= 1u) {
                v += lane_xor(v, o);
            }
            (*vals)[i] = v;
        }
    } else {
        workgroupBarrier();
        if (owner) {
            for (var i = 0u; i < TR; i++) {
                red[(rbase + i) * NKT + kt_i] = (*vals)[i];
            }
        }
        workgroupBarrier();
        for (var i = 0u; i < TR; i++) {
            var v = 0.0;
            for (var j = 0u; j < NKT; j++) {
                v += red[(rbase + i) * NKT + j];
            }
            (*vals)[i] = v;
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let seq = wid.z;
    let kvh = wid.y / p.row_groups;
    let rg = wid.y % p.row_groups;
    if (lid == 0u) {
        let kvl = seqs[seq * 4u + 2u];
        let lo = wid.x * p.chunk;
        w_meta[0] = seqs[seq * 4u] + seqs[seq * 4u + 1u] - 1u;
        w_meta[1] = seqs[seq * 4u + 3u];
        w_meta[2] = lo;
        w_meta[3] = max(lo, min(kvl, lo + p.chunk));
    }
    // Query heads of this workgroup (the group split evenly over row_groups workgroups).
    let R = (p.group + p.row_groups - 1u) / p.row_groups;
    // One split: normalise and write the final rows here (no reduce pass).
    let DIRECT = p.n_splits == 1u;
    let qrow = workgroupUniformLoad(&w_meta[0]);
    let bt0 = workgroupUniformLoad(&w_meta[1]);
    let lo = workgroupUniformLoad(&w_meta[2]);
    let hi = workgroupUniformLoad(&w_meta[3]);

    // Queries of the group, pre-scaled; padded rows and dims are zero.
    for (var e = lid; e < RP * C4; e += WG) {
        let r = e / C4;
        let d0 = (e % C4) * 4u;
        let gi = rg * R + r;
        var v = vec4<f32>(0.0);
        if (r < R && gi < p.group) {
            let qb = (qrow * p.n_q_heads + kvh * p.group + gi) * HD;
            for (var j = 0u; j < 4u; j++) {
                if (d0 + j < HD) {
                    v[j] = q[qb + d0 + j] * p.scale;
                }
            }
        }
        qs[e] = v;
    }
    // The pad dims of K rows are never written by the tile loads: zero them once.
    if (C4 * 4u != HD) {
        for (var kk = lid; kk < BK; kk += WG) {
            ks[kk * KS4 + C4 - 1u] = vec4<f32>(0.0);
        }
    }

    // Thread roles. Scores: rows rbase..rbase+TR, keys kt_i + j*NKT.
    let kt_i = lid % NKT;
    let owner = lid < NRT * NKT;
    let rbase = min(lid / NKT, NRT - 1u) * TR;
    // P.V: rows ro + i*NRO, vec4 columns c + t*NC.
    let c = lid % NC;
    let ro = lid / NC;

    var m: array<f32, TR>;
    var l: array<f32, TR>;
    for (var i = 0u; i < TR; i++) {
        m[i] = NEG;
        l[i] = 0.0;
    }
    var acc: array<vec4<f32>, TRO * TC>;
    var kr: array<KRaw, NLD>;
    var vr: array<VRaw, NLD>;

    // Prefetch of the first tile.
    for (var i = 0u; i < NLD; i++) {
        let e = i * WG + lid;
        let kk = e / CPK;
        if (e < BK * CPK && lo + kk < hi) {
            let off = row_offset(lo + kk, bt0, kvh) + (e % CPK) * CH;
            kr[i] = k_load(p.k_base + off);
            vr[i] = v_load(p.v_base + off);
        } else {
            kr[i] = KRaw();
            vr[i] = VRaw();
        }
    }

    for (var kt = lo; kt < hi; kt += BK) {
        workgroupBarrier();
        for (var i = 0u; i < NLD; i++) {
            let e = i * WG + lid;
            if (e < BK * CPK) {
                k_put(e / CPK, e % CPK, kr[i]);
                v_put(e / CPK, e % CPK, vr[i]);
            }
        }
        workgroupBarrier();
        // Next tile's loads are in flight while this one is computed.
        let nk = kt + BK;
        if (nk < hi) {
            for (var i = 0u; i < NLD; i++) {
                let e = i * WG + lid;
                let kk = e / CPK;
                if (e < BK * CPK && nk + kk < hi) {
                    let off = row_offset(nk + kk, bt0, kvh) + (e % CPK) * CH;
                    kr[i] = k_load(p.k_base + off);
                    vr[i] = v_load(p.v_base + off);
                } else {
                    kr[i] = KRaw();
                    vr[i] = VRaw();
                }
            }
        }

        // Scores for TR rows x TK keys.
        var s: array<f32, TR * TK>;
        for (var cc = 0u; cc < C4; cc++) {
            var kv: array<vec4<f32>, TK>;
            for (var j = 0u; j < TK; j++) {
                kv[j] = ks[(kt_i + j * NKT) * KS4 + cc];
            }
            for (var i = 0u; i < TR; i++) {
                let qv = qs[(rbase + i) * C4 + cc];
                for (var j = 0u; j < TK; j++) {
                    s[i * TK + j] += dot(qv, kv[j]);
                }
            }
        }
        // Online softmax.
        var mx: array<f32, TR>;
        for (var i = 0u; i < TR; i++) {
            var v = NEG;
            for (var j = 0u; j < TK; j++) {
                let valid = kt + kt_i + j * NKT < hi;
                let sv = select(NEG, s[i * TK + j], valid);
                s[i * TK + j] = sv;
                v = max(v, sv);
            }
            mx[i] = v;
        }
        lanes_max(&mx, rbase, kt_i, owner);
        for (var i = 0u; i < TR; i++) {
            let m_new = max(m[i], mx[i]);
            let a = exp(m[i] - m_new);
            var sum = 0.0;
            for (var j = 0u; j < TK; j++) {
                let sv = s[i * TK + j];
                let pv = select(exp(sv - m_new), 0.0, sv <= NEG);
                sum += pv;
                if (owner) {
                    ps[(rbase + i) * BK + kt_i + j * NKT] = pv;
                }
            }
            l[i] = l[i] * a + sum;
            m[i] = m_new;
            if (owner && kt_i == 0u) {
                alpha_s[rbase + i] = a;
            }
        }
        workgroupBarrier();

        // acc = acc * alpha + P.V
        for (var i = 0u; i < TRO; i++) {
            let a = alpha_s[min(ro + i * NRO, RP - 1u)];
            for (var t = 0u; t < TC; t++) {
                acc[i * TC + t] *= a;
            }
        }
        for (var kk = 0u; kk < BK; kk++) {
            var vv: array<vec4<f32>, TC>;
            for (var t = 0u; t < TC; t++) {
                vv[t] = vs[kk * C4 + min(c + t * NC, C4 - 1u)];
            }
            for (var i = 0u; i < TRO; i++) {
                let pv = ps[min(ro + i * NRO, RP - 1u) * BK + kk];
                for (var t = 0u; t < TC; t++) {
                    acc[i * TC + t] = fma(vec4<f32>(pv), vv[t], acc[i * TC + t]);
                }
            }
        }
    }

    // Row sums over the lanes; (m, l) for the reduce, or l for the direct normalisation.
    lanes_sum(&l, rbase, kt_i, owner);
    workgroupBarrier();
    if (owner && kt_i == 0u) {
        for (var i = 0u; i < TR; i++) {
            alpha_s[rbase + i] = l[i];
            let r = rbase + i;
            let gi = rg * R + r;
            if (!DIRECT && r < R && gi < p.group) {
                let slot = (seq * p.n_q_heads + kvh * p.group + gi) * p.n_splits + wid.x;
                ml[slot * 2u] = m[i];
                ml[slot * 2u + 1u] = l[i];
            }
        }
    }
    workgroupBarrier();
    if (ro < NRO) {
        for (var i = 0u; i < TRO; i++) {
            let r = ro + i * NRO;
            let gi = rg * R + r;
            if (r < R && gi < p.group) {
                let qh = kvh * p.group + gi;
                var base: u32;
                var scale = 1.0;
                if (DIRECT) {
                    base = (qrow * p.n_q_heads + qh) * HD;
                    let lt = alpha_s[r];
                    scale = select(0.0, 1.0 / lt, lt > 0.0);
                } else {
                    base = ((seq * p.n_q_heads + qh) * p.n_splits + wid.x) * HD;
                }
                for (var t = 0u; t < TC; t++) {
                    let col = c + t * NC;
                    if (col < C4) {
                        let v = acc[i * TC + t] * scale;
                        for (var j = 0u; j < 4u; j++) {
                            if (col * 4u + j < HD) {
                                out[base + col * 4u + j] = v[j];
                            }
                        }
                    }
                }
            }
        }
    }
}
