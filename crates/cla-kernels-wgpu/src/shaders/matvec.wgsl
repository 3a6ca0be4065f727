// Matrix-vector product for decode: y[b, n] = sum_k x[b, k] * w[n, k] for a few rows b.
//
// Decode is bound by reading w once: TPR threads share one weight row (consecutive threads
// read consecutive pairs, so loads coalesce) and every weight pair is applied to up to MB
// activation rows before moving on. RPW rows share a workgroup; the partial sums of each row
// are reduced in workgroup memory.
//
// Placeholders (written in double braces below): W_DECL (binding 2, accessors w_ld / w_ld2),
// TPR, RPW, MB, PAIRS (true when k is even, so pairs never straddle two rows).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
{{W_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const TPR: u32 = {{TPR}}u;
const RPW: u32 = {{RPW}}u;
const MB: u32 = {{MB}}u;
const PAIRS: bool = {{PAIRS}};
const WG: u32 = TPR * RPW;

var<workgroup> red: array<f32, WG * MB>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = lid % TPR;
    let row = (wid.x + wid.y * nwg.x) * RPW + lid / TPR;
    let valid = row < p.n;
    let wrow = row * p.k;
    for (var b0 = 0u; b0 < p.m; b0 += MB) {
        var acc: array<f32, MB>;
        if (valid) {
            if (PAIRS) {
                for (var k = 2u * t; k < p.k; k += 2u * TPR) {
                    let w2 = w_ld2(wrow + k);
                    for (var b = 0u; b < MB; b++) {
                        if (b0 + b < p.m) {
                            let xi = (b0 + b) * p.k + k;
                            acc[b] = fma(w2.x, x[xi], fma(w2.y, x[xi + 1u], acc[b]));
                        }
                    }
                }
            } else {
                for (var k = t; k < p.k; k += TPR) {
                    let w1 = w_ld(wrow + k);
                    for (var b = 0u; b < MB; b++) {
                        if (b0 + b < p.m) {
                            acc[b] = fma(w1, x[(b0 + b) * p.k + k], acc[b]);
                        }
                    }
                }
            }
        }
        for (var b = 0u; b < MB; b++) {
            red[b * WG + lid] = acc[b];
        }
        workgroupBarrier();
        for (var s = TPR / 2u; s > 0u; s >>= 1u) {
            if (t < s) {
                for (var b = 0u; b < MB; b++) {
                    red[b * WG + lid] += red[b * WG + lid + s];
                }
            }
            workgroupBarrier();
        }
        if (t == 0u && valid) {
            for (var b = 0u; b < MB; b++) {
                if (b0 + b < p.m) {
                    y[(b0 + b) * p.n + row] = red[b * WG + lid];
                }
            }
        }
        workgroupBarrier();
    }
}
