// Cooperative-matrix (tensor core) matrix multiply staged through workgroup memory:
// y[m, n] = sum_k x[m, k] * w[n, k] with w in f16 (8 halves per vec4<u32>), x in f16 (the same
// packing) or in f32 (rounded to f16 on its way to workgroup memory), f32 accumulation and f32
// output. Needs k a multiple of 8 and subgroups of 32 invocations; any m, n.
//
// A workgroup of SGM x SGN subgroups computes a BM x BN tile of y (BM = 16 FM SGM rows,
// BN = 16 FN SGN columns). Each subgroup owns a (16 FM) x (16 FN) block of it, held as FM x FN
// accumulators of 16x16, so every 16-deep step loads FM + FN fragments for FM FN
// multiply-adds. K is walked in slices of BK: each thread fetches its 8-half chunks of the
// slice of x and of w into registers (zero outside the matrices, so edge tiles need no other
// care) and writes them to workgroup memory as scalar halves, rows padded by 8 halves against
// bank conflicts (16-byte aligned rows).
//
// STAGES = 1: one slice buffer; the next slice is fetched into registers while the tensor
// cores work on the current one; two barriers per slice. STAGES = 2: two slice buffers; the
// next slice is fetched during the multiply-adds and written to the other buffer after them;
// one barrier per slice (the buffer written in iteration i was last read in iteration i - 1,
// before that iteration's barrier).
//
// Workgroup order: with GROUP = 0 the tile at grid (x, y) is tile column x, tile row y, so
// consecutive workgroups walk a whole tile row (every row of w). With GROUP > 0 workgroup ids
// are taken in bands of GROUP tile rows, column by column inside a band, so that the tiles in
// flight at one time share the rows of x and of w they read.
//
// Full tiles store their accumulators straight to y when n is a multiple of 4 (row-major
// cooperative stores need 16-byte aligned rows); edge tiles (a workgroup-uniform condition)
// go through a 16x16 f32 square per subgroup with per-element bounds checks.
//
// Placeholders (written in double braces below): SGM, SGN, FM, FN, BK (16, 32 or 64), STAGES
// (1 or 2), GROUP, THREADS (32 SGM SGN), X_DECL (binding 1: `x`, its chunk type `XChunk`,
// `x_chunk`, `x_zero` and `put_x`), and the unrolled accumulator code: ACC_DECL (declarations),
// STEP (one K slice of multiply-adds reading the stage at offsets `xo` and `wo`) and STORE.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const SGM: u32 = {{SGM}}u;
const SGN: u32 = {{SGN}}u;
const FM: u32 = {{FM}}u;
const FN: u32 = {{FN}}u;
const THREADS: u32 = 32u * SGM * SGN;
const BM: u32 = 16u * FM * SGM;
const BN: u32 = 16u * FN * SGN;
const BK: u32 = {{BK}}u;
const STAGES: u32 = {{STAGES}}u;
const GROUP: u32 = {{GROUP}}u;
// Halves per staged row: BK plus 8 of padding.
const LDS: u32 = BK + 8u;
// 8-half chunks per row of a slice, and per thread per slice of x and of w.
const CPR: u32 = BK / 8u;
const X_PER_THREAD: u32 = BM * CPR / THREADS;
const W_PER_THREAD: u32 = BN * CPR / THREADS;
// Halves of one stage of x and of w.
const XS_STAGE: u32 = BM * LDS;
const WS_STAGE: u32 = BN * LDS;

var<workgroup> xs: array<f16, STAGES * XS_STAGE>;
var<workgroup> ws: array<f16, STAGES * WS_STAGE>;
// Per-subgroup 16x16 f32 staging of edge tiles.
var<workgroup> cs: array<f32, SGM * SGN * 256u>;

alias FragA = coop_mat16x16<f16, A>;
alias FragB = coop_mat16x16<f16, B>;
alias Acc = coop_mat16x16<f32, C>;

// Writes 8 packed halves to xs (x in f16) or ws at element `at`.
fn put_x_packed(at: u32, v: vec4<u32>) {
    let h0 = vec2<f16>(unpack2x16float(v.x));
    let h1 = vec2<f16>(unpack2x16float(v.y));
    let h2 = vec2<f16>(unpack2x16float(v.z));
    let h3 = vec2<f16>(unpack2x16float(v.w));
    xs[at] = h0.x;
    xs[at + 1u] = h0.y;
    xs[at + 2u] = h1.x;
    xs[at + 3u] = h1.y;
    xs[at + 4u] = h2.x;
    xs[at + 5u] = h2.y;
    xs[at + 6u] = h3.x;
    xs[at + 7u] = h3.y;
}

fn put_w(at: u32, v: vec4<u32>) {
    let h0 = vec2<f16>(unpack2x16float(v.x));
    let h1 = vec2<f16>(unpack2x16float(v.y));
    let h2 = vec2<f16>(unpack2x16float(v.z));
    let h3 = vec2<f16>(unpack2x16float(v.w));
    ws[at] = h0.x;
    ws[at + 1u] = h0.y;
    ws[at + 2u] = h1.x;
    ws[at + 3u] = h1.y;
    ws[at + 4u] = h2.x;
    ws[at + 5u] = h2.y;
    ws[at + 6u] = h3.x;
    ws[at + 7u] = h3.y;
}

{{X_DECL}}

// Chunk i of this thread's share of the slice at k0 (row i / CPR of the tile).
fn fetch_x(i: u32, k0: u32, m0: u32) -> XChunk {
    let r = m0 + i / CPR;
    let kk = k0 + (i % CPR) * 8u;
    if (r < p.m && kk < p.k) {
        return x_chunk((r * p.k + kk) / 8u);
    }
    return x_zero();
}

fn fetch_w(i: u32, k0: u32, n0: u32) -> vec4<u32> {
    let r = n0 + i / CPR;
    let kk = k0 + (i % CPR) * 8u;
    if (r < p.n && kk < p.k) {
        return w[(r * p.k + kk) / 8u];
    }
    return vec4<u32>(0u);
}

// Element of chunk i in a stage of xs or ws.
fn staged_at(i: u32) -> u32 {
    return (i / CPR) * LDS + (i % CPR) * 8u;
}

// Origin (row, column) in y of this workgroup's tile. The grid is (tiles along n, tiles
// along m).
fn tile_origin(wid: vec3<u32>, nwg: vec3<u32>) -> vec2<u32> {
    if (GROUP == 0u) {
        return vec2<u32>(wid.y * BM, wid.x * BN);
    }
    let id = wid.x + wid.y * nwg.x;
    let per_band = GROUP * nwg.x;
    let first = (id / per_band) * GROUP;
    let rows = min(nwg.y - first, GROUP);
    let i = id % per_band;
    return vec2<u32>((first + i % rows) * BM, (i / rows) * BN);
}

// Writes one 16x16 accumulator at (r0, c0) of y: straight from the tensor cores inside the
// matrix, through the subgroup's staging square at the edges (`full` is workgroup-uniform).
fn store_tile(acc: Acc, r0: u32, c0: u32, full: bool, sg: u32, lane: u32) {
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

@compute @workgroup_size({{THREADS}})
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
    // This subgroup's block of the tile.
    let sm = (sg / SGN) * (16u * FM);
    let sn = (sg % SGN) * (16u * FN);

{{ACC_DECL}}

    var rx: array<XChunk, X_PER_THREAD>;
    var rw: array<vec4<u32>, W_PER_THREAD>;
    for (var j = 0u; j < X_PER_THREAD; j++) {
        rx[j] = fetch_x(lid + j * THREADS, 0u, m0);
    }
    for (var j = 0u; j < W_PER_THREAD; j++) {
        rw[j] = fetch_w(lid + j * THREADS, 0u, n0);
    }

    if (STAGES == 1u) {
        let xo = 0u;
        let wo = 0u;
        for (var k0 = 0u; k0 < p.k; k0 += BK) {
            for (var j = 0u; j < X_PER_THREAD; j++) {
                put_x(staged_at(lid + j * THREADS), rx[j]);
            }
            for (var j = 0u; j < W_PER_THREAD; j++) {
                put_w(staged_at(lid + j * THREADS), rw[j]);
            }
            workgroupBarrier();
            if (k0 + BK < p.k) {
                for (var j = 0u; j < X_PER_THREAD; j++) {
                    rx[j] = fetch_x(lid + j * THREADS, k0 + BK, m0);
                }
                for (var j = 0u; j < W_PER_THREAD; j++) {
                    rw[j] = fetch_w(lid + j * THREADS, k0 + BK, n0);
                }
            }
{{STEP}}
            workgroupBarrier();
        }
    } else {
        for (var j = 0u; j < X_PER_THREAD; j++) {
            put_x(staged_at(lid + j * THREADS), rx[j]);
        }
        for (var j = 0u; j < W_PER_THREAD; j++) {
            put_w(staged_at(lid + j * THREADS), rw[j]);
        }
        workgroupBarrier();
        var stage = 0u;
        for (var k0 = 0u; k0 < p.k; k0 += BK) {
            let more = k0 + BK < p.k;
            if (more) {
                for (var j = 0u; j < X_PER_THREAD; j++) {
                    rx[j] = fetch_x(lid + j * THREADS, k0 + BK, m0);
                }
                for (var j = 0u; j < W_PER_THREAD; j++) {
                    rw[j] = fetch_w(lid + j * THREADS, k0 + BK, n0);
                }
            }
            let xo = stage * XS_STAGE;
            let wo = stage * WS_STAGE;
{{STEP}}
            if (more) {
                let xn = (1u - stage) * XS_STAGE;
                let wn = (1u - stage) * WS_STAGE;
                for (var j = 0u; j < X_PER_THREAD; j++) {
                    put_x(xn + staged_at(lid + j * THREADS), rx[j]);
                }
                for (var j = 0u; j < W_PER_THREAD; j++) {
                    put_w(wn + staged_at(lid + j * THREADS), rw[j]);
                }
            }
            workgroupBarrier();
            stage = 1u - stage;
        }
    }

    // Row-major cooperative stores need 16-byte aligned rows: n a multiple of 4.
    let full = m0 + BM <= p.m && n0 + BN <= p.n && p.n % 4u == 0u;
    let r = m0 + sm;
    let c = n0 + sn;
{{STORE}}
}
