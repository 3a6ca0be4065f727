// Cooperative-matrix (tensor core) matrix multiply with K slices staged in workgroup memory in
// groups of 4 halves: y[m, n] = sum_k x[m, k] * w[n, k] with x and w in f16, f32 accumulation
// and f32 output. Needs k a multiple of 8 (of 4 would do) and subgroups of 32 invocations;
// any m, n.
//
// A workgroup of 4 subgroups computes a 128x128 tile of y. The subgroups form a 2 x 2 grid;
// each owns a 64x64 sub-tile held as 4 x 4 accumulators of 16x16, so every 16-deep step loads
// 8 fragments for 16 multiply-adds. K is walked in slices of BK = 32: per slice each thread
// fetches 8 groups of 4 halves of x and 8 of w (zero outside the matrices, so edge tiles
// need no other care) and writes each group to workgroup memory with one 8-byte store,
// against 8 scalar half stores per 16 bytes in the staged kernel. The fragments are loaded
// from those vec4<f16> arrays: a cooperative load reads the bytes of each row whatever the
// array's element type (the matrix takes its f16 scalar type from it), with offsets and
// strides counted in array elements.
//
// Two stages: while the tensor cores work on slice i (stage i % 2), the next slice is fetched
// into registers and then written to the other stage, so one barrier per slice suffices (the
// stage written in iteration i was last read in iteration i - 1, before its barrier).
//
// Full tiles store accumulators straight to y when n is a multiple of 4 (row-major
// cooperative stores need 16-byte aligned rows); edge tiles go through a 16x16 f32 square per
// subgroup. Workgroups are ordered in bands of GROUP tile rows so that the tiles in flight
// share the columns of w they read in L2.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f16>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BM: u32 = 128u;
const BK: u32 = 32u;
// Groups of 4 halves per staged row: BK halves plus 8 of padding (80 bytes), which puts the
// 8 rows read by one fragment load phase into distinct 16-byte bank groups.
const LDV: u32 = BK / 4u + 2u;
// Groups per matrix per stage.
const STAGE: u32 = BM * LDV;
// Groups per row of a slice, and per thread per slice and matrix.
const CPR: u32 = BK / 4u;
const PER_THREAD: u32 = BM * CPR / 128u;
const GROUP: u32 = 8u;

var<workgroup> xs: array<vec4<f16>, 2u * STAGE>;
var<workgroup> ws: array<vec4<f16>, 2u * STAGE>;
// Per-subgroup 16x16 f32 staging of edge tiles.
var<workgroup> cs: array<f32, 4u * 256u>;

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
    return vec2<u32>((first + i % rows) * BM, (i / rows) * BM);
}

// Group `i` of a slice: row i / CPR, halves (i % CPR) * 4 .. + 4 from k0 (k is a multiple
// of 4, so a group is wholly inside a row or wholly past its end).
fn fetch_x(i: u32, k0: u32, m0: u32) -> vec4<f16> {
    let gr = m0 + i / CPR;
    let kk = k0 + (i % CPR) * 4u;
    if (gr < p.m && kk < p.k) {
        return x[(gr * p.k + kk) / 4u];
    }
    return vec4<f16>();
}

fn fetch_w(i: u32, k0: u32, n0: u32) -> vec4<f16> {
    let gr = n0 + i / CPR;
    let kk = k0 + (i % CPR) * 4u;
    if (gr < p.n && kk < p.k) {
        return w[(gr * p.k + kk) / 4u];
    }
    return vec4<f16>();
}

// Offset of group `i` in a stage.
fn slot(i: u32) -> u32 {
    return (i / CPR) * LDV + i % CPR;
}

// Writes one 16x16 accumulator at (r0, c0) of y: straight from the tensor cores inside the
// matrix, through the subgroup's staging square at the edges (`full` is workgroup-uniform).
fn store_acc(acc: Acc, r0: u32, c0: u32, full: bool, sg: u32, lane: u32) {
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
            y[r * p.n + c] = cs[base + e];
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = tile_origin(wid, nwg);
    let m0 = t.x;
    let n0 = t.y;
    let sg = lid / 32u;
    let lane = lid % 32u;
    let sm = (sg / 2u) * 64u;
    let sn = (sg % 2u) * 64u;

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

    var rx: array<vec4<f16>, PER_THREAD>;
    var rw: array<vec4<f16>, PER_THREAD>;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = lid + j * 128u;
        xs[slot(i)] = fetch_x(i, 0u, m0);
        ws[slot(i)] = fetch_w(i, 0u, n0);
    }
    workgroupBarrier();

    var stage = 0u;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let more = k0 + BK < p.k;
        if (more) {
            for (var j = 0u; j < PER_THREAD; j++) {
                rx[j] = fetch_x(lid + j * 128u, k0 + BK, m0);
                rw[j] = fetch_w(lid + j * 128u, k0 + BK, n0);
            }
        }
        let sa = stage + sm * LDV;
        let sb = stage + sn * LDV;
        // Two 16-deep steps of 4 groups each.
        for (var h = 0u; h < CPR; h += 4u) {
            let a0 = coopLoadT<FragA>(&xs[sa + h], LDV);
            let a1 = coopLoadT<FragA>(&xs[sa + 16u * LDV + h], LDV);
            let a2 = coopLoadT<FragA>(&xs[sa + 32u * LDV + h], LDV);
            let a3 = coopLoadT<FragA>(&xs[sa + 48u * LDV + h], LDV);
            let b0 = coopLoad<FragB>(&ws[sb + h], LDV);
            let b1 = coopLoad<FragB>(&ws[sb + 16u * LDV + h], LDV);
            let b2 = coopLoad<FragB>(&ws[sb + 32u * LDV + h], LDV);
            let b3 = coopLoad<FragB>(&ws[sb + 48u * LDV + h], LDV);
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
        }
        stage = STAGE - stage;
        if (more) {
            for (var j = 0u; j < PER_THREAD; j++) {
                let i = lid + j * 128u;
                xs[stage + slot(i)] = rx[j];
                ws[stage + slot(i)] = rw[j];
            }
        }
        workgroupBarrier();
    }

    let full = m0 + BM <= p.m && n0 + BM <= p.n && p.n % 4u == 0u;
    let r = m0 + sm;
    let c = n0 + sn;
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
