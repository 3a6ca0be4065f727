// Draws one token per row of logits the way the CPU sampler of cla-model does: temperature,
// then top-k, then top-p (nucleus), then an inverse-CDF draw with a uniform number the host
// supplies per row, all over the CPU sampler's order: value descending (f32 total order, so
// +0.0 before -0.0), index ascending among equal values. NaNs are never drawn.
//
// Nothing is sorted. Every cut is a selection in that order: "the first position whose
// cumulative weight reaches a goal", found by a radix select over the four bytes of the
// order-preserving u32 key of each logit (a 256-bin histogram of weights per byte, built with
// workgroup atomics), then among the tokens of the selected key (equal logits, so equal
// weights) by index. Weights are counts (top-k) or probabilities as 64-bit fixed point (top-p
// and the draw): p = exp((logit - max) / T), 1 for the max, scaled by 2^43 and truncated. Sums
// of integers are exact and independent of the order of addition, so every pass agrees with
// every other; a token below 2^-43 of the max weighs 0 and is never drawn.
//
// The kept set after a cut is "key > cut_key, or key == cut_key and index <= cut_idx". When a
// top-k cut keeps at most LIST_CAP tokens they are copied to workgroup memory and the later
// passes read that list instead of the row. One workgroup per row; a 64-bit value is a
// vec2<u32> (low word, high word).
//
// MODE (a placeholder, written in double braces below) picks what a dispatch does:
// 0 draws from each row of `logits`. 1 is the prefilter for a top-k of at most a few hundred
// over a long row: workgroup (c, r) keeps the top_k first tokens of the order among positions
// c * CHUNK .. (c + 1) * CHUNK of row r and writes them in index order to slots
// (r * chunks + c) * top_k .. of `aux` (the logit bits) and `out` (the row index), NaN bits
// where the chunk has fewer. The row's top_k first tokens are among the union of its chunks',
// so 2 then draws from that candidate row (`logits` bound to 1's `aux`, `aux` to 1's `out`):
// the candidates are in index order, so positions break ties as indices do, and the token
// drawn is mapped back through `aux`. AUX_DECL declares `aux` (a private dummy in mode 0).

struct Params {
    rows: u32,
    vocab: u32,
    // Keep the top_k first tokens of the order (0: no limit).
    top_k: u32,
    // 1 / temperature, rounded to f32 as the CPU sampler computes it.
    inv_t: f32,
    // top_p * 2^64 (low, high words), used when use_p != 0.
    p_lo: u32,
    p_hi: u32,
    use_p: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
// Per row, the uniform number u in [0, 1) as u * 2^64 (low word, high word).
@group(0) @binding(2) var<storage, read> uniforms: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

const MODE: u32 = {{MODE}}u;
const CHUNK: u32 = {{CHUNK}}u;
{{AUX_DECL}}

const WG: u32 = 256u;
const LIST_CAP: u32 = 1024u;
const NONE: u32 = 0xffffffffu;
// 2^43, the weight of the max.
const ONE: vec2<u32> = vec2<u32>(0u, 2048u);

const COUNT: u32 = 0u;
const MASS: u32 = 1u;
// What a selection's goal is: the fixed `k`, ceil(top_p * total) or floor(u * total) + 1.
const TARGET_K: u32 = 0u;
const TARGET_P: u32 = 1u;
const TARGET_DRAW: u32 = 2u;

var<workgroup> h_lo: array<atomic<u32>, 256>;
var<workgroup> h_hi: array<atomic<u32>, 256>;
var<workgroup> h_n: array<atomic<u32>, 256>;
var<workgroup> h_min: array<atomic<u32>, 256>;
var<workgroup> a_max: atomic<u32>;
var<workgroup> a_valid: atomic<u32>;
var<workgroup> a_len: atomic<u32>;
var<workgroup> list_key: array<u32, LIST_CAP>;
var<workgroup> list_idx: array<u32, LIST_CAP>;
var<workgroup> red: array<u32, WG>;
// Values thread 0 hands to the workgroup: [max key, valid count, prefix, tie rank, tie count,
// lowest tied index, tie owner, rank inside the owner's chunk, selected index].
var<workgroup> s_u: array<u32, 12>;
var<workgroup> s_above: vec2<u32>;
var<workgroup> s_target: vec2<u32>;

// ----- 64-bit integers as (low, high) ------------------------------------------------------

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
}

fn lt64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

// a * b as 64 bits.
fn mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = p01 + p10;
    let mid_carry = select(0u, 0x10000u, mid < p01);
    let lo = p00 + (mid << 16u);
    let lo_carry = select(0u, 1u, lo < p00);
    return vec2<u32>(lo, a1 * b1 + (mid >> 16u) + mid_carry + lo_carry);
}

// a * m (the product must fit 64 bits).
fn mul64_32(a: vec2<u32>, m: u32) -> vec2<u32> {
    let l = mul32(a.x, m);
    return vec2<u32>(l.x, l.y + a.y * m);
}

// (floor(a * f / 2^64) low, high, 1 if the division left a remainder): f is a binary fraction.
fn mul_frac(a: vec2<u32>, f: vec2<u32>) -> vec3<u32> {
    let t00 = mul32(a.x, f.x);
    let t01 = mul32(a.x, f.y);
    let t10 = mul32(a.y, f.x);
    let t11 = mul32(a.y, f.y);
    // Word 1 of the product, and its carries into word 2.
    let w1a = t00.y + t01.x;
    let c1a = select(0u, 1u, w1a < t00.y);
    let w1 = w1a + t10.x;
    let c1 = c1a + select(0u, 1u, w1 < w1a);
    // Word 2, and its carries into word 3.
    let w2a = t01.y + t10.y;
    let c2a = select(0u, 1u, w2a < t01.y);
    let w2b = w2a + t11.x;
    let c2b = select(0u, 1u, w2b < w2a);
    let w2 = w2b + c1;
    let c2 = c2a + c2b + select(0u, 1u, w2 < w2b);
    let w3 = t11.y + c2;
    return vec3<u32>(w2, w3, select(0u, 1u, (t00.x | w1) != 0u));
}

// ----- keys and weights ---------------------------------------------------------------------

fn is_nan_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) > 0x7f800000u;
}

// The f32 total order as u32 order.
fn key_of(b: u32) -> u32 {
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn value_of(key: u32) -> f32 {
    return bitcast<f32>(select(~key, key & 0x7fffffffu, (key & 0x80000000u) != 0u));
}

// floor(exp(d) * 2^43) for d <= 0. exp is 2^n * exp(r) with r = d - n ln2 (Cody-Waite, exact
// first step) and exp(r) - 1 a degree-8 Taylor polynomial (|r| <= 0.35, truncation < 3e-9), so
// p is within about an ulp of the correctly rounded f32 the CPU sampler uses.
fn fixed_exp(d: f32) -> vec2<u32> {
    // exp(-29.9) * 2^43 < 1; also catches -inf.
    if (!(d > -30.0)) {
        return vec2<u32>(0u, 0u);
    }
    let n = round(d * 1.442695041);
    let r = (d - n * 0.693359375) + n * 2.12194440e-4;
    var s = 1.0 / 40320.0;
    s = s * r + 1.0 / 5040.0;
    s = s * r + 1.0 / 720.0;
    s = s * r + 1.0 / 120.0;
    s = s * r + 1.0 / 24.0;
    s = s * r + 1.0 / 6.0;
    s = s * r + 0.5;
    s = s * r + 1.0;
    s = s * r;
    // p * 2^11 <= 2048: the high word of p * 2^43, then the fraction as the low word.
    let x = ldexp(1.0 + s, i32(n) + 11);
    let hi = floor(x);
    return vec2<u32>(u32((x - hi) * 4294967296.0), u32(hi));
}

fn weight(key: u32, max_key: u32, mode: u32) -> vec2<u32> {
    if (mode == COUNT) {
        return vec2<u32>(1u, 0u);
    }
    if (key == max_key) {
        return ONE;
    }
    return fixed_exp((value_of(key) - value_of(max_key)) * p.inv_t);
}

fn kept(key: u32, idx: u32, cut_key: u32, cut_idx: u32) -> bool {
    return key > cut_key || (key == cut_key && idx <= cut_idx);
}

// ----- the selection ------------------------------------------------------------------------

fn hist_add(b: u32, w: vec2<u32>, n: u32, lowest: u32) {
    if (w.x != 0u) {
        let old = atomicAdd(&h_lo[b], w.x);
        if (old > 0xffffffffu - w.x) {
            atomicAdd(&h_hi[b], 1u);
        }
    }
    if (w.y != 0u) {
        atomicAdd(&h_hi[b], w.y);
    }
    atomicAdd(&h_n[b], n);
    atomicMin(&h_min[b], lowest);
}

fn bin(b: u32) -> vec2<u32> {
    return vec2<u32>(atomicLoad(&h_lo[b]), atomicLoad(&h_hi[b]));
}

// The token at the first position of the order, among the kept tokens, whose cumulative weight
// (itself included) reaches the goal of `kind`. `compact`: the kept tokens are the first
// `len` entries of the list. Called by the whole workgroup.
fn select_pos(
    lid: u32,
    row: u32,
    base: u32,
    n: u32,
    compact: bool,
    len: u32,
    cut_key: u32,
    cut_idx: u32,
    max_key: u32,
    mode: u32,
    kind: u32,
) -> u32 {
    workgroupBarrier();
    if (lid == 0u) {
        s_u[2] = 0u;
        s_above = vec2<u32>(0u, 0u);
    }
    for (var byte = 3i; byte >= 0; byte--) {
        let shift = u32(byte) * 8u;
        for (var b = lid; b < 256u; b += WG) {
            atomicStore(&h_lo[b], 0u);
            atomicStore(&h_hi[b], 0u);
            atomicStore(&h_n[b], 0u);
            atomicStore(&h_min[b], NONE);
        }
        let prefix = workgroupUniformLoad(&s_u[2]);
        // Runs of equal bins are added once (logits share their high bytes).
        var cur = NONE;
        var acc = vec2<u32>(0u, 0u);
        var cnt = 0u;
        var lowest = NONE;
        let m = select(n, len, compact);
        for (var j = lid; j < m; j += WG) {
            var key: u32;
            var idx: u32;
            if (compact) {
                key = list_key[j];
                idx = list_idx[j];
            } else {
                let bits = bitcast<u32>(logits[base + j]);
                if (is_nan_bits(bits)) {
                    continue;
                }
                key = key_of(bits);
                idx = j;
            }
            if (!kept(key, idx, cut_key, cut_idx)) {
                continue;
            }
            if (byte < 3 && (key >> (shift + 8u)) != prefix) {
                continue;
            }
            let b = (key >> shift) & 255u;
            let w = weight(key, max_key, mode);
            if (b != cur) {
                if (cur != NONE) {
                    hist_add(cur, acc, cnt, lowest);
                }
                cur = b;
                acc = w;
                cnt = 1u;
                lowest = idx;
            } else {
                acc = add64(acc, w);
                cnt += 1u;
                lowest = min(lowest, idx);
            }
        }
        if (cur != NONE) {
            hist_add(cur, acc, cnt, lowest);
        }
        workgroupBarrier();
        if (lid == 0u) {
            if (byte == 3) {
                var total = vec2<u32>(0u, 0u);
                for (var b = 0u; b < 256u; b++) {
                    total = add64(total, bin(b));
                }
                var goal = vec2<u32>(p.top_k, 0u);
                if (kind == TARGET_P) {
                    let t = mul_frac(total, vec2<u32>(p.p_lo, p.p_hi));
                    goal = add64(t.xy, vec2<u32>(t.z, 0u));
                    if (goal.x == 0u && goal.y == 0u) {
                        goal = vec2<u32>(1u, 0u);
                    }
                } else if (kind == TARGET_DRAW) {
                    let u = vec2<u32>(uniforms[2u * row], uniforms[2u * row + 1u]);
                    goal = add64(mul_frac(total, u).xy, vec2<u32>(1u, 0u));
                }
                s_target = goal;
            }
            let goal = s_target;
            var above = s_above;
            // Walk the bins from the largest key down until the goal is reached; should it
            // not be (it always is), the last non-empty bin.
            var chosen = NONE;
            var last = 0u;
            var last_above = above;
            for (var bi = 255i; bi >= 0; bi--) {
                let b = u32(bi);
                if (atomicLoad(&h_n[b]) == 0u) {
                    continue;
                }
                last = b;
                last_above = above;
                let next = add64(above, bin(b));
                if (!lt64(next, goal)) {
                    chosen = b;
                    break;
                }
                above = next;
            }
            if (chosen == NONE) {
                chosen = last;
                above = last_above;
            }
            s_u[2] = (prefix << 8u) | chosen;
            s_above = above;
            if (byte == 0) {
                s_u[4] = atomicLoad(&h_n[chosen]);
                s_u[5] = atomicLoad(&h_min[chosen]);
            }
        }
        workgroupBarrier();
    }

    // The key is found; among its tokens (all of one weight) the rank c is the smallest with
    // above + (c + 1) * w >= goal.
    if (lid == 0u) {
        let key = s_u[2];
        let w = weight(key, max_key, mode);
        let need = sub64(s_target, s_above);
        var lo = 1u;
        var hi = max(s_u[4], 1u);
        while (lo < hi) {
            let mid = lo + (hi - lo) / 2u;
            if (lt64(mul64_32(w, mid), need)) {
                lo = mid + 1u;
            } else {
                hi = mid;
            }
        }
        s_u[3] = lo - 1u;
        s_u[8] = s_u[5];
    }
    let key = workgroupUniformLoad(&s_u[2]);
    let rank = workgroupUniformLoad(&s_u[3]);
    if (rank == 0u) {
        return workgroupUniformLoad(&s_u[8]);
    }

    // Ties: the rank-th lowest index among the kept tokens of this key.
    if (compact) {
        for (var j = lid; j < len; j += WG) {
            let idx = list_idx[j];
            if (list_key[j] != key || !kept(key, idx, cut_key, cut_idx)) {
                continue;
            }
            var below = 0u;
            for (var i = 0u; i < len; i++) {
                let other = list_idx[i];
                if (list_key[i] == key && other < idx && kept(key, other, cut_key, cut_idx)) {
                    below += 1u;
                }
            }
            if (below == rank) {
                s_u[8] = idx;
            }
        }
        return workgroupUniformLoad(&s_u[8]);
    }
    // In the row: each thread counts the tokens of the key in its chunk of indices, a scan
    // finds the chunk holding the rank-th one, and its thread looks it up.
    let chunk = (n + WG - 1u) / WG;
    let first = lid * chunk;
    let end = min(first + chunk, n);
    var count = 0u;
    for (var i = first; i < end; i++) {
        let bits = bitcast<u32>(logits[base + i]);
        if (!is_nan_bits(bits) && key_of(bits) == key && kept(key, i, cut_key, cut_idx)) {
            count += 1u;
        }
    }
    red[lid] = count;
    workgroupBarrier();
    if (lid == 0u) {
        var before = 0u;
        s_u[6] = NONE;
        for (var t = 0u; t < WG; t++) {
            if (rank < before + red[t]) {
                s_u[6] = t;
                s_u[7] = rank - before;
                break;
            }
            before += red[t];
        }
    }
    workgroupBarrier();
    if (lid == s_u[6]) {
        var left = s_u[7];
        for (var i = first; i < end; i++) {
            let bits = bitcast<u32>(logits[base + i]);
            if (!is_nan_bits(bits) && key_of(bits) == key && kept(key, i, cut_key, cut_idx)) {
                if (left == 0u) {
                    s_u[8] = i;
                    break;
                }
                left -= 1u;
            }
        }
    }
    return workgroupUniformLoad(&s_u[8]);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var row = wid.x + wid.y * nwg.x;
    var n = p.vocab;
    var base = row * n;
    if (MODE == 1u) {
        // (Grid: chunks x rows.)
        row = wid.y;
        base = row * p.vocab + wid.x * CHUNK;
        n = min(CHUNK, p.vocab - wid.x * CHUNK);
    }
    if (row >= p.rows) {
        return;
    }

    // The max key (the first position of the order) and the number of non-NaN tokens.
    if (lid == 0u) {
        atomicStore(&a_max, 0u);
        atomicStore(&a_valid, 0u);
        atomicStore(&a_len, 0u);
    }
    workgroupBarrier();
    var mk = 0u;
    var valid = 0u;
    for (var i = lid; i < n; i += WG) {
        let bits = bitcast<u32>(logits[base + i]);
        if (!is_nan_bits(bits)) {
            mk = max(mk, key_of(bits));
            valid += 1u;
        }
    }
    atomicMax(&a_max, mk);
    atomicAdd(&a_valid, valid);
    workgroupBarrier();
    if (lid == 0u) {
        s_u[0] = atomicLoad(&a_max);
        s_u[1] = atomicLoad(&a_valid);
    }
    let max_key = workgroupUniformLoad(&s_u[0]);
    let n_valid = workgroupUniformLoad(&s_u[1]);
    if (MODE == 1u) {
        prefilter(lid, row, base, n, wid.x, nwg.x, max_key, n_valid);
        return;
    }
    if (n_valid == 0u) {
        if (lid == 0u) {
            out[row] = 0u;
        }
        return;
    }

    var cut_key = 0u;
    var cut_idx = NONE;
    var compact = false;
    var len = 0u;
    if (p.top_k > 0u && p.top_k < n_valid) {
        cut_idx = select_pos(lid, row, base, n, false, 0u, 0u, NONE, max_key, COUNT, TARGET_K);
        cut_key = workgroupUniformLoad(&s_u[2]);
        if (p.top_k <= LIST_CAP) {
            // Exactly top_k tokens are kept: copy them to the list.
            for (var i = lid; i < n; i += WG) {
                let b = bitcast<u32>(logits[base + i]);
                if (!is_nan_bits(b) && kept(key_of(b), i, cut_key, cut_idx)) {
                    let at = atomicAdd(&a_len, 1u);
                    if (at < LIST_CAP) {
                        list_key[at] = key_of(b);
                        list_idx[at] = i;
                    }
                }
            }
            workgroupBarrier();
            compact = true;
            len = p.top_k;
        }
    }
    if (p.use_p != 0u) {
        cut_idx = select_pos(lid, row, base, n, compact, len, cut_key, cut_idx, max_key, MASS, TARGET_P);
        cut_key = workgroupUniformLoad(&s_u[2]);
    }
    let idx = select_pos(lid, row, base, n, compact, len, cut_key, cut_idx, max_key, MASS, TARGET_DRAW);
    if (lid == 0u) {
        var token = select(0u, idx, idx < n);
        if (MODE == 2u) {
            // The candidate's index in the original row.
            token = select(0u, aux[base + idx], idx < n);
        }
        out[row] = token;
    }
}

// MODE 1: this chunk's top_k first tokens (all its valid ones if fewer), in index order, to
// slots chunk * top_k .. of the row's candidates; NaN bits pad the rest.
fn prefilter(lid: u32, row: u32, base: u32, n: u32, chunk: u32, chunks: u32, max_key: u32, n_valid: u32) {
    var cut_key = 0u;
    var cut_idx = NONE;
    if (p.top_k < n_valid) {
        cut_idx = select_pos(lid, row, base, n, false, 0u, 0u, NONE, max_key, COUNT, TARGET_K);
        cut_key = workgroupUniformLoad(&s_u[2]);
    }
    // Each thread takes a run of consecutive positions; a scan of the runs' counts places
    // the kept tokens in index order.
    let per = (n + WG - 1u) / WG;
    let lo = min(lid * per, n);
    let hi = min(lo + per, n);
    var count = 0u;
    for (var i = lo; i < hi; i++) {
        let b = bitcast<u32>(logits[base + i]);
        if (!is_nan_bits(b) && kept(key_of(b), i, cut_key, cut_idx)) {
            count += 1u;
        }
    }
    workgroupBarrier();
    red[lid] = count;
    workgroupBarrier();
    if (lid == 0u) {
        var sum = 0u;
        for (var t = 0u; t < WG; t++) {
            let c = red[t];
            red[t] = sum;
            sum += c;
        }
    }
    workgroupBarrier();
    let slots = (row * chunks + chunk) * p.top_k;
    var at = red[lid];
    for (var i = lo; i < hi; i++) {
        let b = bitcast<u32>(logits[base + i]);
        if (!is_nan_bits(b) && kept(key_of(b), i, cut_key, cut_idx) && at < p.top_k) {
            aux[slots + at] = b;
            out[slots + at] = chunk * CHUNK + i;
            at += 1u;
        }
    }
    let kept_n = min(p.top_k, n_valid);
    for (var j = kept_n + lid; j < p.top_k; j += WG) {
        aux[slots + j] = 0x7fc00000u;
        out[slots + j] = 0u;
    }
}
