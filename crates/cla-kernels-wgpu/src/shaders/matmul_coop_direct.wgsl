// Cooperative-matrix (tensor core) matrix multiply with the fragments loaded straight from
// storage: y[m, n] = sum_k x[m, k] * w[n, k] with x and w in f16, f32 accumulation and f32
// output. Needs k a multiple of 16, m and n of at least 16, and subgroups of 32 invocations.
//
// A workgroup of SGM x SGN subgroups computes a (64 SGM) x (64 SGN) tile of y; each subgroup
// owns 64x64 of it, held as 4 x 4 accumulators of 16x16. Every 16-deep step a subgroup loads
// its 4 A fragments from x (row-major, stride k) and its 4 B fragments from w (w is [n][k]
// row-major, so as the k x n operand it is column-major with stride k) and issues 16
// multiply-adds: 8 fragment loads per 16 MMAs. Nothing goes through workgroup memory and
// there is no barrier in the K loop: subgroups of one workgroup that share fragment rows or
// columns hit in L1, neighbouring workgroups in L2. The fragments of the next step are loaded
// before the multiply-adds of the current one (two register sets, the loop unrolled twice),
// so that the loads are in flight while the tensor cores work.
//
// Edges: fragment origins are clamped to m - 16 (rows) and n - 16 (columns), so every load
// stays inside x and w whatever the tile. A clamped fragment computes some rows (or columns)
// that belong to its neighbour, and only its own rows and columns are written. Workgroups
// whose tile lies inside y store their accumulators straight to y when n is a multiple of 4
// (row-major cooperative stores need 16-byte aligned rows); the others (a workgroup-uniform
// condition) go through a 16x16 f32 square per subgroup with per-element bounds checks.
//
// Workgroups are ordered in bands of GROUP tile rows: the tiles in flight at one time share
// the columns of w they read, which then stay in L2.
//
// Placeholders (written in double braces below): SGM, SGN (subgroup rows and columns) and
// THREADS (32 SGM SGN).

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f16>;
@group(0) @binding(2) var<storage, read> w: array<f16>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const SGM: u32 = {{SGM}}u;
const SGN: u32 = {{SGN}}u;
const BM: u32 = 64u * SGM;
const BN: u32 = 64u * SGN;
// Tile rows per band of the workgroup order.
const GROUP: u32 = 8u;

// Per-subgroup 16x16 f32 staging of edge tiles.
var<workgroup> cs: array<f32, SGM * SGN * 256u>;

alias FragA = coop_mat16x16<f16, A>;
alias FragB = coop_mat16x16<f16, B>;
alias Acc = coop_mat16x16<f32, C>;

// Origin (row, column) in y of this workgroup's tile: workgroup ids are taken in bands of
// GROUP tile rows, column by column inside a band. The grid is (tiles along n, tiles along m).
fn tile_origin(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    let id = wid.x + wid.y * nwg.x;
    let per_band = GROUP * nwg.x;
    let first = (id / per_band) * GROUP;
    let rows = min(nwg.y - first, GROUP);
    let i = id % per_band;
    return vec2<u32>((first + i % rows) * BM, (i / rows) * BN);
}

// Writes the accumulator whose own rows start at r and columns at c (it was computed at the
// clamped origin). `full` is workgroup-uniform.
fn store_acc(acc: Acc, r: u32, c: u32, full: bool, sg: u32, lane: u32) {
    if (full) {
        // Stride and offset go through `let`s so that they are evaluated before the store.
        let stride = p.n;
        let off = r * stride + c;
        coopStoreT(acc, &y[off], stride);
        return;
    }
    let base = sg * 256u;
    coopStoreT(acc, &cs[base], 16u);
    workgroupBarrier();
    let r0 = min(r, p.m - 16u);
    let c0 = min(c, p.n - 16u);
    for (var e = lane; e < 256u; e += 32u) {
        let gr = r0 + e / 16u;
        let gc = c0 + e % 16u;
        if (gr >= r && gr < p.m && gc >= c && gc < p.n) {
            y[gr * p.n + gc] = cs[base + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size({{THREADS}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = tile_origin(wid, nwg);
    let sg = lid / 32u;
    let lane = lid % 32u;
    // This subgroup's 64x64 block of y.
    let r = t.x + (sg / SGN) * 64u;
    let c = t.y + (sg % SGN) * 64u;
    let kk = p.k;
    let rmax = p.m - 16u;
    let cmax = p.n - 16u;
    // Element offsets of the fragments' first rows (x) and columns (w), clamped.
    let xa0 = min(r, rmax) * kk;
    let xa1 = min(r + 16u, rmax) * kk;
    let xa2 = min(r + 32u, rmax) * kk;
    let xa3 = min(r + 48u, rmax) * kk;
    let wb0 = min(c, cmax) * kk;
    let wb1 = min(c + 16u, cmax) * kk;
    let wb2 = min(c + 32u, cmax) * kk;
    let wb3 = min(c + 48u, cmax) * kk;

    var c00 = Acc();
    var c01 = Acc();
    var c02 = Acc();
    var c03 = Acc();
    var c10 = Acc();
    var c11 = Acc();
    var c12 = Acc();
    var c13 = Acc();
    var c20 = Acc();
    var c21 = Acc();
    var c22 = Acc();
    var c23 = Acc();
    var c30 = Acc();
    var c31 = Acc();
    var c32 = Acc();
    var c33 = Acc();

    // Register set P: the fragments of step k0.
    var a0 = coopLoadT<FragA>(&x[xa0], kk);
    var a1 = coopLoadT<FragA>(&x[xa1], kk);
    var a2 = coopLoadT<FragA>(&x[xa2], kk);
    var a3 = coopLoadT<FragA>(&x[xa3], kk);
    var b0 = coopLoad<FragB>(&w[wb0], kk);
    var b1 = coopLoad<FragB>(&w[wb1], kk);
    var b2 = coopLoad<FragB>(&w[wb2], kk);
    var b3 = coopLoad<FragB>(&w[wb3], kk);

    // Loads past the last step re-read the last step (a clamp rather than a branch); their
    // fragments are never multiplied.
    let klast = kk - 16u;
    var k0 = 0u;
    loop {
        // Register set Q: step k0 + 16.
        let k1 = min(k0 + 16u, klast);
        let e0 = coopLoadT<FragA>(&x[xa0 + k1], kk);
        let e1 = coopLoadT<FragA>(&x[xa1 + k1], kk);
        let e2 = coopLoadT<FragA>(&x[xa2 + k1], kk);
        let e3 = coopLoadT<FragA>(&x[xa3 + k1], kk);
        let f0 = coopLoad<FragB>(&w[wb0 + k1], kk);
        let f1 = coopLoad<FragB>(&w[wb1 + k1], kk);
        let f2 = coopLoad<FragB>(&w[wb2 + k1], kk);
        let f3 = coopLoad<FragB>(&w[wb3 + k1], kk);

        c00 = coopMultiplyAdd(a0, b0, c00);
        c01 = coopMultiplyAdd(a0, b1, c01);
        c02 = coopMultiplyAdd(a0, b2, c02);
        c03 = coopMultiplyAdd(a0, b3, c03);
        c10 = coopMultiplyAdd(a1, b0, c10);
        c11 = coopMultiplyAdd(a1, b1, c11);
        c12 = coopMultiplyAdd(a1, b2, c12);
        c13 = coopMultiplyAdd(a1, b3, c13);
        c20 = coopMultiplyAdd(a2, b0, c20);
        c21 = coopMultiplyAdd(a2, b1, c21);
        c22 = coopMultiplyAdd(a2, b2, c22);
        c23 = coopMultiplyAdd(a2, b3, c23);
        c30 = coopMultiplyAdd(a3, b0, c30);
        c31 = coopMultiplyAdd(a3, b1, c31);
        c32 = coopMultiplyAdd(a3, b2, c32);
        c33 = coopMultiplyAdd(a3, b3, c33);
        if (k0 + 16u >= kk) {
            break;
        }

        // Register set P again: step k0 + 32.
        let k2 = min(k0 + 32u, klast);
        a0 = coopLoadT<FragA>(&x[xa0 + k2], kk);
        a1 = coopLoadT<FragA>(&x[xa1 + k2], kk);
        a2 = coopLoadT<FragA>(&x[xa2 + k2], kk);
        a3 = coopLoadT<FragA>(&x[xa3 + k2], kk);
        b0 = coopLoad<FragB>(&w[wb0 + k2], kk);
        b1 = coopLoad<FragB>(&w[wb1 + k2], kk);
        b2 = coopLoad<FragB>(&w[wb2 + k2], kk);
        b3 = coopLoad<FragB>(&w[wb3 + k2], kk);

        c00 = coopMultiplyAdd(e0, f0, c00);
        c01 = coopMultiplyAdd(e0, f1, c01);
        c02 = coopMultiplyAdd(e0, f2, c02);
        c03 = coopMultiplyAdd(e0, f3, c03);
        c10 = coopMultiplyAdd(e1, f0, c10);
        c11 = coopMultiplyAdd(e1, f1, c11);
        c12 = coopMultiplyAdd(e1, f2, c12);
        c13 = coopMultiplyAdd(e1, f3, c13);
        c20 = coopMultiplyAdd(e2, f0, c20);
        c21 = coopMultiplyAdd(e2, f1, c21);
        c22 = coopMultiplyAdd(e2, f2, c22);
        c23 = coopMultiplyAdd(e2, f3, c23);
        c30 = coopMultiplyAdd(e3, f0, c30);
        c31 = coopMultiplyAdd(e3, f1, c31);
        c32 = coopMultiplyAdd(e3, f2, c32);
        c33 = coopMultiplyAdd(e3, f3, c33);
        k0 += 32u;
        if (k0 >= kk) {
            break;
        }
    }

    let full = t.x + BM <= p.m && t.y + BN <= p.n && p.n % 4u == 0u;
    store_acc(c00, r, c, full, sg, lane);
    store_acc(c01, r, c + 16u, full, sg, lane);
    store_acc(c02, r, c + 32u, full, sg, lane);
    store_acc(c03, r, c + 48u, full, sg, lane);
    store_acc(c10, r + 16u, c, full, sg, lane);
    store_acc(c11, r + 16u, c + 16u, full, sg, lane);
    store_acc(c12, r + 16u, c + 32u, full, sg, lane);
    store_acc(c13, r + 16u, c + 48u, full, sg, lane);
    store_acc(c20, r + 32u, c, full, sg, lane);
    store_acc(c21, r + 32u, c + 16u, full, sg, lane);
    store_acc(c22, r + 32u, c + 32u, full, sg, lane);
    store_acc(c23, r + 32u, c + 48u, full, sg, lane);
    store_acc(c30, r + 48u, c, full, sg, lane);
    store_acc(c31, r + 48u, c + 16u, full, sg, lane);
    store_acc(c32, r + 48u, c + 32u, full, sg, lane);
    store_acc(c33, r + 48u, c + 48u, full, sg, lane);
}
