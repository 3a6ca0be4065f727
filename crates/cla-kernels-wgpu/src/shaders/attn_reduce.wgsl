// Flash-decoding reduce: combines the per-split partial outputs of attention.wgsl (decode
// mode) into out[query row, head, :] = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s.
// One workgroup per (query head, sequence).
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
const WG: u32 = 64u;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qh = wid.x;
    let seq = wid.y;
    let qrow = seqs[seq * 4u] + seqs[seq * 4u + 1u] - 1u;
    let base = (seq * p.n_q_heads + qh) * p.n_splits;
    var mx = -1.0e30;
    for (var s = 0u; s < p.n_splits; s++) {
        mx = max(mx, ml[(base + s) * 2u]);
    }
    var den = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        den += exp(ml[(base + s) * 2u] - mx) * ml[(base + s) * 2u + 1u];
    }
    for (var d = lid; d < HD; d += WG) {
        var num = 0.0;
        for (var s = 0u; s < p.n_splits; s++) {
            num += exp(ml[(base + s) * 2u] - mx) * part[(base + s) * HD + d];
        }
        out[(qrow * p.n_q_heads + qh) * HD + d] = select(0.0, num / den, den > 0.0);
    }
}
