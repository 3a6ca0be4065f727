// Matrix-vector product for decode with wide loads: y[b, n] = sum_k x[b, k] * w[n, k] for a
// few rows b, when k is a multiple of the chunk width CH (8 halves in a vec4<u32>, or 4 f32 in
// a vec4<f32>). Bound by reading w once, so every load is 16 bytes and each thread keeps
// UNROLL of them in flight before using any.
//
// TPR threads share one weight row (consecutive lanes read consecutive 16-byte chunks), RPW
// rows share a workgroup, and each weight chunk is applied to up to MB activation rows. The
// TPR partial sums of a row are added by one thread from workgroup memory (one barrier).
//
// Fused forms, each saving the decoder a dispatch:
// - NORM: x goes through RMSNorm with the f32 scale g (binding 5) and p.eps first. The TPR
//   threads of a weight row see every chunk of x once, so besides sum w * (x g) they add up
//   sum x^2, and the row's result is scaled by 1 / sqrt(sum x^2 / k + eps) at the end.
// - ACC: y[b, n] += the product (a residual add).
// - DUAL: a second weight matrix w2 of the same shape (binding 4) is applied to the same
//   chunks, and y[b, n] = silu(x . w[n]) * (x . w2[n]) (SwiGLU's gate and up projections).
// Without NORM the values are those of the plain product and the separate elementwise op
// (same order of additions); with it they differ from a separate RMSNorm by rounding only.
//
// Placeholders (written in double braces below): W_DECL (binding 2 with `WRaw`, w_load(i) and
// w_unpack(raw) giving the chunk as two vec4<f32>, the second zero for f32; w2_load(i) from
// binding 4 with DUAL, else never called; g_load(i), the i-th vec4 of the scale from binding
// 5 with NORM, else never called), CH, TPR, RPW, MB, UNROLL, ACC, DUAL, NORM.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
{{W_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const CH: u32 = {{CH}}u;
const TPR: u32 = {{TPR}}u;
const RPW: u32 = {{RPW}}u;
const MB: u32 = {{MB}}u;
const UNROLL: u32 = {{UNROLL}}u;
const ACC: bool = {{ACC}};
const DUAL: bool = {{DUAL}};
const NORM: bool = {{NORM}};
const WG: u32 = TPR * RPW;
// Sums per activation row and thread: the product, the second product (DUAL), the sum of
// squares (NORM); slots of `red`.
const S_W2: u32 = 1u;
const S_SQ: u32 = select(1u, 2u, DUAL);
const NS: u32 = S_SQ + select(0u, 1u, NORM);

var<workgroup> red: array<f32, NS * MB * WG>;

fn silu(v: f32) -> f32 {
    // As in elementwise.wgsl.
    return v / (1.0 + exp(-v));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = lid % TPR;
    let row0 = (wid.x + wid.y * nwg.x) * RPW;
    let row = row0 + lid / TPR;
    let valid = row < p.n;
    let nch = p.k / CH;
    let k4 = p.k / 4u;
    for (var b0 = 0u; b0 < p.m; b0 += MB) {
        var acc: array<f32, MB>;
        var acc2: array<f32, MB>;
        var sq: array<f32, MB>;
        if (valid) {
            for (var c0 = t; c0 < nch; c0 += TPR * UNROLL) {
                var wr: array<WRaw, UNROLL>;
                var wr2: array<WRaw, UNROLL>;
                for (var u = 0u; u < UNROLL; u++) {
                    let c = c0 + u * TPR;
                    if (c < nch) {
                        wr[u] = w_load(row * nch + c);
                        if (DUAL) {
                            wr2[u] = w2_load(row * nch + c);
                        }
                    }
                }
                for (var u = 0u; u < UNROLL; u++) {
                    let c = c0 + u * TPR;
                    if (c < nch) {
                        let wv = w_unpack(wr[u]);
                        let wv2 = w_unpack(wr2[u]);
                        let gi = c * (CH / 4u);
                        for (var b = 0u; b < MB; b++) {
                            if (b0 + b < p.m) {
                                let xi = (b0 + b) * k4 + gi;
                                var xa = x[xi];
                                var xb = vec4<f32>(0.0);
                                if (CH == 8u) {
                                    xb = x[xi + 1u];
                                }
                                if (NORM) {
                                    sq[b] += dot(xa, xa) + dot(xb, xb);
                                    xa *= g_load(gi);
                                    if (CH == 8u) {
                                        xb *= g_load(gi + 1u);
                                    }
                                }
                                var s = dot(wv[0], xa);
                                if (CH == 8u) {
                                    s += dot(wv[1], xb);
                                }
                                acc[b] += s;
                                if (DUAL) {
                                    var s2 = dot(wv2[0], xa);
                                    if (CH == 8u) {
                                        s2 += dot(wv2[1], xb);
                                    }
                                    acc2[b] += s2;
                                }
                            }
                        }
                    }
                }
            }
        }
        for (var b = 0u; b < MB; b++) {
            red[b * WG + lid] = acc[b];
            if (DUAL) {
                red[(S_W2 * MB + b) * WG + lid] = acc2[b];
            }
            if (NORM) {
                red[(S_SQ * MB + b) * WG + lid] = sq[b];
            }
        }
        workgroupBarrier();
        if (lid < RPW * MB) {
            let r = lid / MB;
            let b = lid % MB;
            var s = 0.0;
            var s2 = 0.0;
            var q = 0.0;
            for (var j = 0u; j < TPR; j++) {
                s += red[b * WG + r * TPR + j];
                if (DUAL) {
                    s2 += red[(S_W2 * MB + b) * WG + r * TPR + j];
                }
                if (NORM) {
                    q += red[(S_SQ * MB + b) * WG + r * TPR + j];
                }
            }
            if (row0 + r < p.n && b0 + b < p.m) {
                if (NORM) {
                    let inv = 1.0 / sqrt(q / f32(p.k) + p.eps);
                    s *= inv;
                    s2 *= inv;
                }
                let i = (b0 + b) * p.n + row0 + r;
                var v = s;
                if (DUAL) {
                    v = silu(s) * s2;
                }
                if (ACC) {
                    y[i] += v;
                } else {
                    y[i] = v;
                }
            }
        }
        workgroupBarrier();
    }
}
