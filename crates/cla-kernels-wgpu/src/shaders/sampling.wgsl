// Greedy next-token choice on the GPU: out[row] = argmax(logits[row, :]), the lowest index
// among equal maxima; NaNs are ignored (a row of only NaNs gives 0). One workgroup per row, so a
// decode step reads back one u32 per sequence instead of the logits.

struct Params {
    rows: u32,
    vocab: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

// True if candidate (v2, i2) beats (v1, i1).
fn beats(v1: f32, i1: u32, v2: f32, i2: u32) -> bool {
    if (i2 == NONE) {
        return false;
    }
    if (i1 == NONE) {
        return true;
    }
    return v2 > v1 || (v2 == v1 && i2 < i1);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.vocab;
    var bv = 0.0;
    var bi = NONE;
    for (var i = lid; i < p.vocab; i += WG) {
        let v = logits[base + i];
        // v == v is false for NaN.
        if (v == v && (bi == NONE || v > bv)) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s && beats(best_v[lid], best_i[lid], best_v[lid + s], best_i[lid + s])) {
            best_v[lid] = best_v[lid + s];
            best_i[lid] = best_i[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        out[row] = select(best_i[0], 0u, best_i[0] == NONE);
    }
}
