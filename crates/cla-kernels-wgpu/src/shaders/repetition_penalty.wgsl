// The repetition penalty of cla-model's sampler, in place on a [rows, vocab] logits buffer:
// for each (row, token) pair a positive logit is divided by the penalty and any other one is
// multiplied by it. The pairs must be distinct (each token once per row, as the CPU sampler
// penalises it); pairs outside the buffer are skipped.
//
// The division is rounded as the CPU's f32 division is (to nearest, ties to even) by long
// division of the mantissas in integers: WGSL lets a device's f32 division be 2.5 ulp off.
// Only a result outside the normal range (or a subnormal or infinite logit) takes the
// device's division.

struct Params {
    pairs: u32,
    rows: u32,
    vocab: u32,
    penalty: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pairs: array<u32>;
@group(0) @binding(2) var<storage, read_write> logits: array<f32>;

const WG: u32 = 64u;

// a / b rounded to nearest even, for a, b > 0.
fn div_rn(a: f32, b: f32) -> f32 {
    let ab = bitcast<u32>(a);
    let bb = bitcast<u32>(b);
    let ea = i32(ab >> 23u);
    let eb = i32(bb >> 23u);
    if (ea == 0 || eb == 0 || ea == 255 || eb == 255) {
        return a / b;
    }
    let mb = (bb & 0x7fffffu) | 0x800000u;
    var rem = (ab & 0x7fffffu) | 0x800000u;
    var e = ea - eb + 127;
    if (rem < mb) {
        rem = rem << 1u;
        e -= 1;
    }
    // 24 quotient bits of rem / mb in [1, 2), then the guard bit and the sticky remainder.
    var q = 0u;
    for (var i = 0; i < 24; i++) {
        q = q << 1u;
        if (rem >= mb) {
            rem -= mb;
            q |= 1u;
        }
        rem = rem << 1u;
    }
    let guard = rem >= mb;
    let sticky = rem != mb && rem != 0u;
    if (guard && (sticky || (q & 1u) == 1u)) {
        q += 1u;
    }
    if (q == 0x1000000u) {
        q = 0x800000u;
        e += 1;
    }
    if (e <= 0 || e >= 255) {
        return a / b;
    }
    return bitcast<f32>((u32(e) << 23u) | (q & 0x7fffffu));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.pairs) {
        return;
    }
    let row = pairs[2u * i];
    let token = pairs[2u * i + 1u];
    if (row >= p.rows || token >= p.vocab) {
        return;
    }
    let at = row * p.vocab + token;
    let v = logits[at];
    if (v > 0.0) {
        logits[at] = div_rn(v, p.penalty);
    } else {
        logits[at] = v * p.penalty;
    }
}
