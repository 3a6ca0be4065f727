// Register-tiled matrix multiply for prefill: y[m, n] = sum_k x[m, k] * w[n, k].
//
// A workgroup of 256 threads computes a 64x64 tile of y; thread (tx, ty) of the 16x16 grid
// owns the 4x4 block at rows 4*ty.., columns 4*tx.. and keeps it in four vec4 registers.
// K is walked in slices of 16. Each slice of x and w (64 rows x 16 k) is one vec4 load per
// thread (4 consecutive k of one row), transposed into workgroup memory k-major, so the
// inner loop reads one vec4 of x and one vec4 of w per k and issues 16 FMAs.
//
// Placeholders (written in double braces below): DECLS (bindings 1 and 2 and the functions
// `load_x(row, k) -> vec4<f32>` and `load_w(row, k) -> vec4<f32>`, which read k..k+3 of a
// row, give 0 past the edges of the matrix, and are only called with k a multiple of 4).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
{{DECLS}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BM: u32 = 64u;
const BK: u32 = 16u;
// One row of the transposed tile: 64 values of one k as 16 vec4s, plus one of padding so
// the transposing stores of consecutive k land in different banks.
const RS: u32 = BM / 4u + 1u;

var<workgroup> xs: array<vec4<f32>, BK * RS>;
var<workgroup> ws: array<vec4<f32>, BK * RS>;

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
    // Loader role: row lr of the 64-row slice, k chunk lc (4 values).
    let lr = lid >> 2u;
    let lc = (lid & 3u) * 4u;
    let st = lc * RS + (lr >> 2u);
    let comp = lr & 3u;

    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let a = load_x(m0 + lr, k0 + lc);
        let b = load_w(n0 + lr, k0 + lc);
        xs[st][comp] = a.x;
        xs[st + RS][comp] = a.y;
        xs[st + 2u * RS][comp] = a.z;
        xs[st + 3u * RS][comp] = a.w;
        ws[st][comp] = b.x;
        ws[st + RS][comp] = b.y;
        ws[st + 2u * RS][comp] = b.z;
        ws[st + 3u * RS][comp] = b.w;
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let av = xs[kk * RS + ty];
            let bv = ws[kk * RS + tx];
            c0 = fma(vec4<f32>(av.x), bv, c0);
            c1 = fma(vec4<f32>(av.y), bv, c1);
            c2 = fma(vec4<f32>(av.z), bv, c2);
            c3 = fma(vec4<f32>(av.w), bv, c3);
        }
        workgroupBarrier();
    }

    let gm = m0 + 4u * ty;
    let gn = n0 + 4u * tx;
    store_row(gm, gn, c0);
    store_row(gm + 1u, gn, c1);
    store_row(gm + 2u, gn, c2);
    store_row(gm + 3u, gn, c3);
}

fn store_row(r: u32, c: u32, v: vec4<f32>) {
    if (r >= p.m) {
        return;
    }
    let base = r * p.n + c;
    if (c < p.n) {
        y[base] = v.x;
    }
    if (c + 1u < p.n) {
        y[base + 1u] = v.y;
    }
    if (c + 2u < p.n) {
        y[base + 2u] = v.z;
    }
    if (c + 3u < p.n) {
        y[base + 3u] = v.w;
    }
}
