// Split-K decode attention built to stream K/V at memory speed: no workgroup memory and no
// barriers in the main loop.
//
// Grid: (splits, kv heads * row groups, sequences); a workgroup of WG threads takes one chunk
// of one sequence's keys for G query heads of one K/V head: the whole group (MHA, GQA up to 8
// query heads per K/V head), or one of `row_groups` equal shares of a larger group (MQA), whose
// workgroups read the same K/V rows at about the same time, so the repeats come from L2. The threads form lane groups of L
// lanes (inside one subgroup); each lane owns DPL consecutive dims of every row, so a lane
// group reads a K or V row with L coalesced vector loads, and consecutive lane groups read
// consecutive rows. Per iteration each lane group takes T keys, and the loads of the next
// iteration's T keys are issued before this iteration's math:
//
// 1. scores: each lane multiplies its dims of the T keys with its dims of the G queries
//    (held in registers), then the L lanes sum by subgroup xor-shuffles;
// 2. online softmax per lane group, one rescale per T keys;
// 3. P.V into the lane's G x DPL accumulator (registers).
//
// At the end the lane groups' (m, l, acc) states are merged: inside a subgroup by shuffles,
// then across subgroups through workgroup memory. The result is the unnormalised partial row
// with its (m, l) for attn_reduce.wgsl, or the normalised row when the sequence is not split.
//
// Placeholders (written in double braces below): ATTN_COMMON (attn_common.wgsl: the
// parameter block and bindings 0-3), KV_DECL (bindings 4 and 5 with `KRaw`,
// `k_ld(elem)`, `v_ld(elem)` and `cv(raw, h) -> vec4<f32>` giving the h-th of VQ vec4s of a
// raw load), HD, G, L, NV (vector loads per lane and row), VW (elements per vector load), VQ,
// T, BS (tokens per block), WG, MAXSG (most subgroups a workgroup can have).

{{ATTN_COMMON}}
{{KV_DECL}}
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> ml: array<f32>;

const HD: u32 = {{HD}}u;
const G: u32 = {{G}}u;
const L: u32 = {{L}}u;
const NV: u32 = {{NV}}u;
const VW: u32 = {{VW}}u;
const VQ: u32 = {{VQ}}u;
// vec4s of one row a lane holds.
const DV: u32 = NV * VQ;
const DPL: u32 = NV * VW;
const T: u32 = {{T}}u;
const BS: u32 = {{BS}}u;
const WG: u32 = {{WG}}u;
const NG: u32 = WG / L;
const MAXSG: u32 = {{MAXSG}}u;
// "Minus infinity" that stays finite: exp(NEG - NEG) = 1 instead of NaN.
const NEG: f32 = -1.0e30;

// Cross-subgroup merge: one subgroup's state at a time.
var<workgroup> x_acc: array<vec4<f32>, G * L * DV>;
var<workgroup> x_m: array<f32, G>;
var<workgroup> x_l: array<f32, G>;

// Element offset (relative to the K or V base) of logical token `pos`, dim 0.
fn row_offset(pos: u32, bt0: u32, kvh: u32) -> u32 {
    let blk = block_table[bt0 + pos / BS];
    return blk * p.block_stride + kvh * p.head_stride + (pos % BS) * p.token_stride;
}

// A lane's dims of the K and V rows of T keys.
alias Rows = array<KRaw, T * NV>;

// Loads this lane's dims of the K and V rows of keys `first + t NG` (t < T) of lane group
// `grp`; rows at or past `hi` keep what they held (finite, and masked by the caller).
fn load_rows(
    kr: ptr<function, Rows>,
    vr: ptr<function, Rows>,
    first: u32,
    hi: u32,
    bt0: u32,
    kvh: u32,
    grp: u32,
    d0: u32,
    in_head: bool,
) {
    for (var t = 0u; t < T; t++) {
        let key = first + t * NG + grp;
        if (key < hi && in_head) {
            let off = row_offset(key, bt0, kvh) + d0;
            for (var n = 0u; n < NV; n++) {
                if (d0 + n * VW < HD) {
                    (*kr)[t * NV + n] = k_ld(p.k_base + off + n * VW);
                    (*vr)[t * NV + n] = v_ld(p.v_base + off + n * VW);
                }
            }
        }
    }
}

// Folds state (mo, lo, acc_o) into (m, l, acc) for query row g.
fn merge_scale(m: f32, mo: f32) -> vec3<f32> {
    let mn = max(m, mo);
    return vec3<f32>(mn, exp(m - mn), exp(mo - mn));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let seq = wid.z;
    let kvh = wid.y / p.row_groups;
    // First query head of this workgroup.
    let h0 = kvh * p.group + (wid.y % p.row_groups) * G;
    let qrow = seqs[seq * 4u] + seqs[seq * 4u + 1u] - 1u;
    let kvl = seqs[seq * 4u + 2u];
    let bt0 = seqs[seq * 4u + 3u];
    let lo = wid.x * p.chunk;
    let hi = max(lo, min(kvl, lo + p.chunk));
    let DIRECT = p.n_splits == 1u;

    // Lane roles: lane li of lane group grp (groups never straddle subgroups).
    let li = sg_lane % L;
    let grp = sg_id * (sg_size / L) + sg_lane / L;
    let d0 = li * DPL;
    // Lanes past the head's dims (when HD / DPL is not a power of two) hold zeros.
    let in_head = d0 < HD;

    // This lane's dims of the G queries, pre-scaled.
    var qv: array<vec4<f32>, G * DV>;
    for (var g = 0u; g < G; g++) {
        let qb = (qrow * p.n_q_heads + h0 + g) * HD;
        for (var c = 0u; c < DV; c++) {
            var v = vec4<f32>(0.0);
            let d = d0 + c * 4u;
            if (d < HD) {
                v = vec4<f32>(q[qb + d], q[qb + d + 1u], q[qb + d + 2u], q[qb + d + 3u]) * p.scale;
            }
            qv[g * DV + c] = v;
        }
    }

    var m: array<f32, G>;
    var l: array<f32, G>;
    var acc: array<vec4<f32>, G * DV>;
    for (var g = 0u; g < G; g++) {
        m[g] = NEG;
        l[g] = 0.0;
    }

    // Loads of T keys' K and V rows (this lane's dims): the first iteration's here, each next
    // one's at the top of the loop, before the math on the current one.
    var kr: Rows;
    var vr: Rows;
    load_rows(&kr, &vr, lo, hi, bt0, kvh, grp, d0, in_head);

    for (var base = lo; base < hi; base += NG * T) {
        // 1. This iteration's rows; the next iteration's loads in flight. (Rows past the end
        // keep stale values from earlier keys: finite, and masked below.)
        let kc = kr;
        let vc = vr;
        load_rows(&kr, &vr, base + NG * T, hi, bt0, kvh, grp, d0, in_head);
        // 2. Scores: partial dots over this lane's dims, then summed over the lane group.
        var s: array<f32, T * G>;
        for (var t = 0u; t < T; t++) {
            for (var n = 0u; n < NV; n++) {
                for (var h = 0u; h < VQ; h++) {
                    let kv = cv(kc[t * NV + n], h);
                    for (var g = 0u; g < G; g++) {
                        s[t * G + g] += dot(qv[g * DV + n * VQ + h], kv);
                    }
                }
            }
        }
        for (var o = 1u; o < L; o <<= 1u) {
            for (var i = 0u; i < T * G; i++) {
                s[i] += subgroupShuffleXor(s[i], o);
            }
        }
        // 3. Online softmax over the T keys and P.V.
        for (var g = 0u; g < G; g++) {
            var mx = m[g];
            for (var t = 0u; t < T; t++) {
                if (base + t * NG + grp < hi) {
                    mx = max(mx, s[t * G + g]);
                }
            }
            let a = exp(m[g] - mx);
            m[g] = mx;
            var lsum = l[g] * a;
            for (var c = 0u; c < DV; c++) {
                acc[g * DV + c] *= a;
            }
            for (var t = 0u; t < T; t++) {
                if (base + t * NG + grp < hi) {
                    let pv = exp(s[t * G + g] - mx);
                    lsum += pv;
                    for (var n = 0u; n < NV; n++) {
                        for (var h = 0u; h < VQ; h++) {
                            let c = n * VQ + h;
                            acc[g * DV + c] = fma(vec4<f32>(pv), cv(vc[t * NV + n], h), acc[g * DV + c]);
                        }
                    }
                }
            }
            l[g] = lsum;
        }
    }

    // Merge the lane groups of one subgroup (same li, different groups).
    for (var o = L; o < sg_size; o <<= 1u) {
        for (var g = 0u; g < G; g++) {
            let mo = subgroupShuffleXor(m[g], o);
            let lo_ = subgroupShuffleXor(l[g], o);
            let f = merge_scale(m[g], mo);
            m[g] = f.x;
            l[g] = l[g] * f.y + lo_ * f.z;
            for (var c = 0u; c < DV; c++) {
                let ao = subgroupShuffleXor(acc[g * DV + c], o);
                acc[g * DV + c] = acc[g * DV + c] * f.y + ao * f.z;
            }
        }
    }
    // Merge the subgroups into subgroup 0, one at a time (lane group 0 of each holds its
    // subgroup's state). The loop bound is a constant so the barriers stay uniform.
    let lead = sg_lane < L;
    for (var sgi = 1u; sgi < MAXSG; sgi++) {
        workgroupBarrier();
        if (sg_id == sgi && lead) {
            for (var g = 0u; g < G; g++) {
                if (li == 0u) {
                    x_m[g] = m[g];
                    x_l[g] = l[g];
                }
                for (var c = 0u; c < DV; c++) {
                    x_acc[(g * L + li) * DV + c] = acc[g * DV + c];
                }
            }
        }
        workgroupBarrier();
        if (sg_id == 0u && lead && sgi < n_sg) {
            for (var g = 0u; g < G; g++) {
                let f = merge_scale(m[g], x_m[g]);
                m[g] = f.x;
                l[g] = l[g] * f.y + x_l[g] * f.z;
                for (var c = 0u; c < DV; c++) {
                    acc[g * DV + c] = acc[g * DV + c] * f.y + x_acc[(g * L + li) * DV + c] * f.z;
                }
            }
        }
    }

    if (sg_id != 0u || !lead) {
        return;
    }
    for (var g = 0u; g < G; g++) {
        let qh = h0 + g;
        var obase: u32;
        var scale = 1.0;
        if (DIRECT) {
            obase = (qrow * p.n_q_heads + qh) * HD;
            scale = select(0.0, 1.0 / l[g], l[g] > 0.0);
        } else {
            obase = ((seq * p.n_q_heads + qh) * p.n_splits + wid.x) * HD;
            if (li == 0u) {
                let slot = (seq * p.n_q_heads + qh) * p.n_splits + wid.x;
                ml[slot * 2u] = m[g];
                ml[slot * 2u + 1u] = l[g];
            }
        }
        for (var c = 0u; c < DV; c++) {
            let d = d0 + c * 4u;
            if (d < HD) {
                let v = acc[g * DV + c] * scale;
                out[obase + d] = v.x;
                out[obase + d + 1u] = v.y;
                out[obase + d + 2u] = v.z;
                out[obase + d + 3u] = v.w;
            }
        }
    }
}
