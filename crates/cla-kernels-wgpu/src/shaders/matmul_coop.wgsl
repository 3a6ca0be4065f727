// Cooperative-matrix (tensor core) matrix multiply: y[m, n] = sum_k x[m, k] * w[n, k] with
// x and w in f16 (8 halves per vec4<u32> word group), f32 accumulation and f32 output.
// Needs k to be a multiple of 8 and subgroups of 32 invocations.
//
// A workgroup of 8 subgroups computes a 128x128 tile of y. The subgroups form a 2 x 4 grid;
// each owns a 64x32 sub-tile held as 4 x 2 accumulators of 16x16. K is walked in slices of
// BK: every slice of x and w (128 rows x BK halves each) is staged in workgroup memory, and
// the next slice is fetched into registers while the tensor cores work on the current one.
//
// Placeholders (written in double braces below): BK (32 or 64).

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BM: u32 = 128u;
const BK: u32 = {{BK}}u;
// Halves per staged row: BK plus 8 of padding against bank conflicts (keeps 16-byte rows).
const LDS: u32 = BK + 8u;
// vec4<u32> groups (8 halves) per row of a slice, and per thread per slice and matrix.
const CPR: u32 = BK / 8u;
const PER_THREAD: u32 = BM * CPR / 256u;

var<workgroup> xs: array<f16, BM * LDS>;
var<workgroup> ws: array<f16, BM * LDS>;
// Per-subgroup 16x16 f32 staging of edge tiles.
var<workgroup> cs: array<f32, 8u * 256u>;

fn fetch_x(i: u32, k0: u32, m0: u32) -> vec4<u32> {
    let r = i / CPR;
    let kk = k0 + (i % CPR) * 8u;
    let gr = m0 + r;
    if (gr < p.m && kk < p.k) {
        return x[(gr * p.k + kk) / 8u];
    }
    return vec4<u32>(0u);
}

fn fetch_w(i: u32, k0: u32, n0: u32) -> vec4<u32> {
    let r = i / CPR;
    let kk = k0 + (i % CPR) * 8u;
    let gr = n0 + r;
    if (gr < p.n && kk < p.k) {
        return w[(gr * p.k + kk) / 8u];
    }
    return vec4<u32>(0u);
}

fn put_x(i: u32, v: vec4<u32>) {
    let base = (i / CPR) * LDS + (i % CPR) * 8u;
    let h0 = vec2<f16>(unpack2x16float(v.x));
    let h1 = vec2<f16>(unpack2x16float(v.y));
    let h2 = vec2<f16>(unpack2x16float(v.z));
    let h3 = vec2<f16>(unpack2x16float(v.w));
    xs[base] = h0.x;
    xs[base + 1u] = h0.y;
    xs[base + 2u] = h1.x;
    xs[base + 3u] = h1.y;
    xs[base + 4u] = h2.x;
    xs[base + 5u] = h2.y;
    xs[base + 6u] = h3.x;
    xs[base + 7u] = h3.y;
}

fn put_w(i: u32, v: vec4<u32>) {
    let base = (i / CPR) * LDS + (i % CPR) * 8u;
    let h0 = vec2<f16>(unpack2x16float(v.x));
    let h1 = vec2<f16>(unpack2x16float(v.y));
    let h2 = vec2<f16>(unpack2x16float(v.z));
    let h3 = vec2<f16>(unpack2x16float(v.w));
    ws[base] = h0.x;
    ws[base + 1u] = h0.y;
    ws[base + 2u] = h1.x;
    ws[base + 3u] = h1.y;
    ws[base + 4u] = h2.x;
    ws[base + 5u] = h2.y;
    ws[base + 6u] = h3.x;
    ws[base + 7u] = h3.y;
}

// Writes one 16x16 accumulator at (r0, c0) of y: straight from the tensor cores inside the
// matrix, through the subgroup's staging square at the edges (`full` is workgroup-uniform).
fn store_tile(acc: coop_mat16x16<f32, C>, r0: u32, c0: u32, full: bool, sg: u32, lane: u32) {
    if (full) {
        // Stride and offset go through `let`s so that they are evaluated before the store.
        let stride = p.n;
        let off = r0 * stride + c0;
        coopStoreT(acc, &y[off], stride);
        return;
    }
    let base = sg * 256u;
    coopStoreT(acc, &cs[base], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += 32u) {
        let r = r0 + e / 16u;
        let c = c0 + e % 16u;
        if (r < p.m && c < p.n) {
            y[r * p.n + c] = cs[sg * 256u + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BM;
    let sg = lid / 32u;
    let lane = lid % 32u;
    let sm = (sg / 4u) * 64u;
    let sn = (sg % 4u) * 32u;

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c20 = coop_mat16x16<f32, C>();
    var c21 = coop_mat16x16<f32, C>();
    var c30 = coop_mat16x16<f32, C>();
    var c31 = coop_mat16x16<f32, C>();

    var rx: array<vec4<u32>, PER_THREAD>;
    var rw: array<vec4<u32>, PER_THREAD>;
    for (var j = 0u; j < PER_THREAD; j++) {
        rx[j] = fetch_x(lid + j * 256u, 0u, m0);
        rw[j] = fetch_w(lid + j * 256u, 0u, n0);
    }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        for (var j = 0u; j < PER_THREAD; j++) {
            put_x(lid + j * 256u, rx[j]);
            put_w(lid + j * 256u, rw[j]);
        }
        workgroupBarrier();
        if (k0 + BK < p.k) {
            for (var j = 0u; j < PER_THREAD; j++) {
                rx[j] = fetch_x(lid + j * 256u, k0 + BK, m0);
                rw[j] = fetch_w(lid + j * 256u, k0 + BK, n0);
            }
        }
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&xs[sm * LDS + kk], LDS);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(sm + 16u) * LDS + kk], LDS);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(sm + 32u) * LDS + kk], LDS);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&xs[(sm + 48u) * LDS + kk], LDS);
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&ws[sn * LDS + kk], LDS);
            let b1 = coopLoad<coop_mat16x16<f16, B>>(&ws[(sn + 16u) * LDS + kk], LDS);
            c00 = coopMultiplyAdd(a0, b0, c00);
            c01 = coopMultiplyAdd(a0, b1, c01);
            c10 = coopMultiplyAdd(a1, b0, c10);
            c11 = coopMultiplyAdd(a1, b1, c11);
            c20 = coopMultiplyAdd(a2, b0, c20);
            c21 = coopMultiplyAdd(a2, b1, c21);
            c30 = coopMultiplyAdd(a3, b0, c30);
            c31 = coopMultiplyAdd(a3, b1, c31);
        }
        workgroupBarrier();
    }

    // Row-major cooperative stores need 16-byte aligned rows: n a multiple of 4.
    let full = m0 + BM <= p.m && n0 + BM <= p.n && p.n % 4u == 0u;
    let r = m0 + sm;
    let c = n0 + sn;
    store_tile(c00, r, c, full, sg, lane);
    store_tile(c01, r, c + 16u, full, sg, lane);
    store_tile(c10, r + 16u, c, full, sg, lane);
    store_tile(c11, r + 16u, c + 16u, full, sg, lane);
    store_tile(c20, r + 32u, c, full, sg, lane);
    store_tile(c21, r + 32u, c + 16u, full, sg, lane);
    store_tile(c30, r + 48u, c, full, sg, lane);
    store_tile(c31, r + 48u, c + 16u, full, sg, lane);
}
