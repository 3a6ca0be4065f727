// Causal attention over a paged K/V pool, with online softmax (the score matrix is never
// materialised beyond one R x BK tile). One template, two modes:
//
// - prefill (DECODE = false): a workgroup takes R consecutive query tokens of one query head
//   of one sequence (grid: query tiles x query heads x sequences) and walks the keys
//   0..=position of its last query, masking each row causally. Output is normalised.
// - decode (DECODE = true, flash-decoding): a workgroup takes up to R query heads of one GQA
//   group (they share every K/V element, so each is read once per group) and one chunk of
//   the sequence (grid: splits x kv heads * row groups x sequences). It writes the
//   unnormalised partial output with its running max and sum; attn_reduce.wgsl combines the
//   splits.
//
// Work split inside a tile: R*BK dot products, SPLIT threads per dot (more threads per dot when
// the tile has fewer dots than threads, e.g. MHA decode with R = 1); the R x HD output
// accumulator is spread over the threads, NACC elements each.
//
// Placeholders (written in double braces below): ATTN_COMMON (attn_common.wgsl: the
// parameter block and bindings 0-3), K_DECL (binding 4, k_ld), V_DECL (binding 5,
// v_ld), ML_DECL (binding 7 in decode mode), HD, R, BK, WG, SPLIT, NACC, DECODE.

{{ATTN_COMMON}}
{{K_DECL}}
{{V_DECL}}
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
{{ML_DECL}}

const HD: u32 = {{HD}}u;
const R: u32 = {{R}}u;
const BK: u32 = {{BK}}u;
const WG: u32 = {{WG}}u;
const SPLIT: u32 = {{SPLIT}}u;
const NACC: u32 = {{NACC}}u;
const DECODE: bool = {{DECODE}};
// K rows are padded to an odd stride so the threads of a dot product hit different banks.
const KS: u32 = HD + 1u;
// "Minus infinity" that stays finite: exp(NEG - NEG) = 1 instead of NaN for empty rows.
const NEG: f32 = -1.0e30;

var<workgroup> qs: array<f32, R * HD>;
var<workgroup> ks: array<f32, BK * KS>;
var<workgroup> vs: array<f32, BK * HD>;
var<workgroup> ss: array<f32, R * BK>;
var<workgroup> part: array<f32, WG>;
var<workgroup> m_s: array<f32, R>;
var<workgroup> l_s: array<f32, R>;
var<workgroup> alpha_s: array<f32, R>;
var<workgroup> w_q0: u32;
var<workgroup> w_nq: u32;
var<workgroup> w_kvl: u32;
var<workgroup> w_bt0: u32;
var<workgroup> w_lo: u32;
var<workgroup> w_hi: u32;

struct Row {
    valid: bool,
    qrow: u32,
    qh: u32,
    qpos: u32,
}

fn row_info(r: u32, wid: vec3<u32>, q0: u32, nq: u32, kvl: u32) -> Row {
    var row: Row;
    if (DECODE) {
        let kvh = wid.y / p.row_groups;
        let gi = (wid.y % p.row_groups) * R + r;
        row.valid = gi < p.group;
        row.qh = kvh * p.group + gi;
        row.qrow = q0 + nq - 1u;
        row.qpos = kvl - 1u;
    } else {
        let qi = wid.x * R + r;
        row.valid = qi < nq;
        row.qh = wid.y;
        row.qrow = q0 + qi;
        row.qpos = kvl - nq + qi;
    }
    return row;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let seq = wid.z;
    if (lid == 0u) {
        let q0 = seqs[seq * 4u];
        let nq = seqs[seq * 4u + 1u];
        let kvl = seqs[seq * 4u + 2u];
        w_q0 = q0;
        w_nq = nq;
        w_kvl = kvl;
        w_bt0 = seqs[seq * 4u + 3u];
        if (DECODE) {
            let lo = wid.x * p.chunk;
            w_lo = lo;
            w_hi = max(lo, min(kvl, lo + p.chunk));
        } else {
            let first = wid.x * R;
            w_lo = 0u;
            if (first < nq) {
                let last = min(first + R, nq) - 1u;
                w_hi = min(kvl, kvl - nq + last + 1u);
            } else {
                w_hi = 0u;
            }
        }
    }
    let q0 = workgroupUniformLoad(&w_q0);
    let nq = workgroupUniformLoad(&w_nq);
    let kvl = workgroupUniformLoad(&w_kvl);
    let bt0 = workgroupUniformLoad(&w_bt0);
    let lo = workgroupUniformLoad(&w_lo);
    let hi = workgroupUniformLoad(&w_hi);
    if (!DECODE && wid.x * R >= nq) {
        return;
    }
    var kvh: u32;
    if (DECODE) {
        kvh = wid.y / p.row_groups;
    } else {
        kvh = wid.y / p.group;
    }

    for (var e = lid; e < R * HD; e += WG) {
        let row = row_info(e / HD, wid, q0, nq, kvl);
        var v = 0.0;
        if (row.valid) {
            v = q[(row.qrow * p.n_q_heads + row.qh) * HD + e % HD] * p.scale;
        }
        qs[e] = v;
    }
    if (lid < R) {
        m_s[lid] = NEG;
        l_s[lid] = 0.0;
    }
    var acc: array<f32, NACC>;

    for (var kt = lo; kt < hi; kt += BK) {
        workgroupBarrier();
        for (var e = lid; e < BK * HD; e += WG) {
            let kk = e / HD;
            let d = e % HD;
            let pos = kt + kk;
            var kx = 0.0;
            var vx = 0.0;
            if (pos < hi) {
                let blk = block_table[bt0 + pos / p.block_size];
                let idx = blk * p.block_stride + kvh * p.head_stride
                    + (pos % p.block_size) * p.token_stride + d;
                kx = k_ld(p.k_base + idx);
                vx = v_ld(p.v_base + idx);
            }
            ks[kk * KS + d] = kx;
            vs[kk * HD + d] = vx;
        }
        workgroupBarrier();

        for (var e0 = 0u; e0 < R * BK * SPLIT; e0 += WG) {
            let e = e0 + lid;
            let dot_id = e / SPLIT;
            let r = dot_id / BK;
            let kk = dot_id % BK;
            var s = 0.0;
            if (dot_id < R * BK) {
                for (var d = e % SPLIT; d < HD; d += SPLIT) {
                    s = fma(qs[r * HD + d], ks[kk * KS + d], s);
                }
            }
            if (SPLIT > 1u) {
                part[lid] = s;
                workgroupBarrier();
                s = 0.0;
                for (var j = 0u; j < SPLIT; j++) {
                    s += part[lid - lid % SPLIT + j];
                }
            }
            if (dot_id < R * BK && e % SPLIT == 0u) {
                let row = row_info(r, wid, q0, nq, kvl);
                let pos = kt + kk;
                let ok = row.valid && pos < hi && (DECODE || pos <= row.qpos);
                ss[dot_id] = select(NEG, s, ok);
            }
            if (SPLIT > 1u) {
                workgroupBarrier();
            }
        }
        workgroupBarrier();

        if (lid < R) {
            let m_old = m_s[lid];
            var mx = m_old;
            for (var kk = 0u; kk < BK; kk++) {
                mx = max(mx, ss[lid * BK + kk]);
            }
            var sum = 0.0;
            for (var kk = 0u; kk < BK; kk++) {
                let sv = ss[lid * BK + kk];
                let pv = select(exp(sv - mx), 0.0, sv <= NEG);
                ss[lid * BK + kk] = pv;
                sum += pv;
            }
            let a = exp(m_old - mx);
            alpha_s[lid] = a;
            l_s[lid] = l_s[lid] * a + sum;
            m_s[lid] = mx;
        }
        workgroupBarrier();

        for (var j = 0u; j < NACC; j++) {
            let e = lid + j * WG;
            if (e < R * HD) {
                let r = e / HD;
                let d = e % HD;
                var a = acc[j] * alpha_s[r];
                for (var kk = 0u; kk < BK; kk++) {
                    a = fma(ss[r * BK + kk], vs[kk * HD + d], a);
                }
                acc[j] = a;
            }
        }
    }
    workgroupBarrier();

    for (var j = 0u; j < NACC; j++) {
        let e = lid + j * WG;
        if (e < R * HD) {
            let r = e / HD;
            let d = e % HD;
            let row = row_info(r, wid, q0, nq, kvl);
            if (row.valid) {
                if (DECODE) {
                    let slot = (seq * p.n_q_heads + row.qh) * p.n_splits + wid.x;
                    out[slot * HD + d] = acc[j];
                } else {
                    let l = l_s[r];
                    out[(row.qrow * p.n_q_heads + row.qh) * HD + d] = select(0.0, acc[j] / l, l > 0.0);
                }
            }
        }
    }
    {{ML_WRITE}}
}
