// Tiled matrix multiply for prefill: y[m, n] = sum_k x[m, k] * w[n, k]
// (x: f32 activations, w: f32 or f16 weights in the [out_features, in_features] layout).
//
// A 16x16 workgroup computes a BM x BM tile of y (BM = 16 * TM); each thread owns TM x TM
// outputs strided by 16 so that its shared-memory reads are broadcasts or consecutive.
// K is walked in slices of BK; the shared tiles are stored k-major with a row stride of
// BM + 1 so the cooperative stores do not all land in one bank.
//
// Placeholders (written in double braces below): W_DECL (binding 2, accessor w_ld), TM.

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

const TM: u32 = {{TM}}u;
const BM: u32 = 16u * TM;
const BK: u32 = 16u;
const AS: u32 = BM + 1u;

var<workgroup> a_tile: array<f32, BK * AS>;
var<workgroup> b_tile: array<f32, BK * AS>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BM;
    let tx = lid3.x;
    let ty = lid3.y;
    var acc: array<f32, TM * TM>;
    var av: array<f32, TM>;
    var bv: array<f32, TM>;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var e = lid; e < BK * BM; e += 256u) {
            let r = e / BK;
            let kk = e % BK;
            let gk = k0 + kk;
            let gm = m0 + r;
            var a = 0.0;
            if (gm < p.m && gk < p.k) {
                a = x[gm * p.k + gk];
            }
            a_tile[kk * AS + r] = a;
            let gn = n0 + r;
            var b = 0.0;
            if (gn < p.n && gk < p.k) {
                b = w_ld(gn * p.k + gk);
            }
            b_tile[kk * AS + r] = b;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            for (var i = 0u; i < TM; i++) {
                av[i] = a_tile[kk * AS + ty + 16u * i];
                bv[i] = b_tile[kk * AS + tx + 16u * i];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TM; j++) {
                    acc[i * TM + j] = fma(av[i], bv[j], acc[i * TM + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let gm = m0 + ty + 16u * i;
        for (var j = 0u; j < TM; j++) {
            let gn = n0 + tx + 16u * j;
            if (gm < p.m && gn < p.n) {
                y[gm * p.n + gn] = acc[i * TM + j];
            }
        }
    }
}
