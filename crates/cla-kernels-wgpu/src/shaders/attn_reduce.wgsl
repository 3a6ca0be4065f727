// Flash-decoding reduce: combines the per-split partial outputs of the decode kernels into
// out[query row, head, :] = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s.
//
// Grid: (query heads, sequences, dim slices of DW). Every load of a workgroup is independent
// of the others, so the pass costs about one memory latency instead of one per split:
// 1. (M, sum_s exp(m_s - M) l_s) over all splits: each thread folds a strided share of the
//    (m, l) pairs, then a tree over the workgroup;
// 2. the WG / DW split lanes each sum a strided share of the splits for the slice's DW dims
//    (consecutive threads read consecutive dims), then the lanes' sums are added.
//
// Placeholders (written in double braces below): HD.

struct Params {
    n_q_heads: u32,
    n_splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> seqs: array<u32>;
@group(0) @binding(2) var<storage, read> part: array<f32>;
@group(0) @binding(3) var<storage, read> ml: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const HD: u32 = {{HD}}u;
const WG: u32 = 256u;
// Dims per workgroup, and split lanes per dim.
const DW: u32 = 32u;
const SL: u32 = WG / DW;
// "Minus infinity" that stays finite: exp(NEG - NEG) = 1 instead of NaN.
const NEG: f32 = -1.0e30;

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_l: array<f32, WG>;
var<workgroup> red_o: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qh = wid.x;
    let seq = wid.y;
    let base = (seq * p.n_q_heads + qh) * p.n_splits;

    // 1. The running max and denominator over all splits.
    var mx = NEG;
    var den = 0.0;
    for (var s = lid; s < p.n_splits; s += WG) {
        let ms = ml[(base + s) * 2u];
        let mn = max(mx, ms);
        den = den * exp(mx - mn) + ml[(base + s) * 2u + 1u] * exp(ms - mn);
        mx = mn;
    }
    red_m[lid] = mx;
    red_l[lid] = den;
    for (var w = WG / 2u; w > 0u; w >>= 1u) {
        workgroupBarrier();
        if (lid < w) {
            let mo = red_m[lid + w];
            let mn = max(red_m[lid], mo);
            red_l[lid] = red_l[lid] * exp(red_m[lid] - mn) + red_l[lid + w] * exp(mo - mn);
            red_m[lid] = mn;
        }
    }
    workgroupBarrier();
    let m_all = red_m[0];
    let den_all = red_l[0];

    // 2. This thread's dim and split lane.
    let d = wid.z * DW + lid % DW;
    let sl = lid / DW;
    var num = 0.0;
    if (d < HD) {
        for (var s = sl; s < p.n_splits; s += SL) {
            num += exp(ml[(base + s) * 2u] - m_all) * part[(base + s) * HD + d];
        }
    }
    red_o[lid] = num;
    workgroupBarrier();
    if (sl == 0u && d < HD) {
        for (var j = 1u; j < SL; j++) {
            num += red_o[j * DW + lid];
        }
        let qrow = seqs[seq * 4u] + seqs[seq * 4u + 1u] - 1u;
        out[(qrow * p.n_q_heads + qh) * HD + d] = select(0.0, num / den_all, den_all > 0.0);
    }
}
