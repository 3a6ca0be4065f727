// One dispatch for what a producer layer does between its projections and attention: RoPE
// (Hugging Face "rotate_half") on the step's queries and keys, and the rotated keys with the
// values into the paged pools at per-token slots (as kv_append.wgsl: 0xffffffff or a block
// past num_blocks skips the token).
//
// Sources are the projections' output rows, read in place: the queries of token t, head h
// at qsrc[t * q_stride + q_col + h * head_dim ..], its keys and values at kvsrc[t * kv_stride
// + k_col (v_col) + h * head_dim ..]. When Q, K and V come from one matrix, qsrc and kvsrc
// are the same buffer.
//
// Invocations: first one per query dim pair (i, i + head_dim/2), written to q_out
// [n_tokens, n_heads, head_dim]; then one per pair of neighbouring dims (d, d + 1) of a K/V
// head, so that packed-f16 pools are written a whole word at a time (each of the two key dims
// forms its rotation from its own partner dim).
//
// Placeholders (written in double braces below): ROPE_COMMON (rope_common.wgsl), K_DECL
// (binding 7), V_DECL (binding 8).

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    q_stride: u32,
    q_col: u32,
    kv_stride: u32,
    k_col: u32,
    v_col: u32,
    block_size: u32,
    num_blocks: u32,
    k_base: u32,
    v_base: u32,
    block_stride: u32,
    head_stride: u32,
    token_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qsrc: array<f32>;
@group(0) @binding(2) var<storage, read> kvsrc: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(5) var<storage, read> slots: array<u32>;
@group(0) @binding(6) var<storage, read_write> q_out: array<f32>;
{{K_DECL}}
{{V_DECL}}

{{ROPE_COMMON}}

const WG: u32 = 256u;

// Dim `e` of the rotated key row that starts at kvsrc[base].
fn rotated_key(base: u32, e: u32, half_dim: u32, position: u32) -> f32 {
    if (e < half_dim) {
        let cs = rope_cos_sin(position, inv_freq[e]);
        return kvsrc[base + e] * cs.x - kvsrc[base + e + half_dim] * cs.y;
    }
    let j = e - half_dim;
    let cs = rope_cos_sin(position, inv_freq[j]);
    return kvsrc[base + e] * cs.x + kvsrc[base + j] * cs.y;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let half_dim = p.head_dim / 2u;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let n_q = p.n_tokens * p.n_heads * half_dim;
    if (i < n_q) {
        let j = i % half_dim;
        let row = i / half_dim; // token * n_heads + head
        let t = row / p.n_heads;
        let cs = rope_cos_sin(positions[t], inv_freq[j]);
        let src = t * p.q_stride + p.q_col + (row % p.n_heads) * p.head_dim;
        let x1 = qsrc[src + j];
        let x2 = qsrc[src + j + half_dim];
        let dst = row * p.head_dim;
        q_out[dst + j] = x1 * cs.x - x2 * cs.y;
        q_out[dst + j + half_dim] = x2 * cs.x + x1 * cs.y;
        return;
    }
    let w = i - n_q;
    if (w >= p.n_tokens * p.n_kv_heads * half_dim) {
        return;
    }
    let d = (w % half_dim) * 2u;
    let th = w / half_dim; // token * n_kv_heads + head
    let h = th % p.n_kv_heads;
    let t = th / p.n_kv_heads;
    let slot = slots[t];
    let blk = slot / p.block_size;
    if (slot == 0xffffffffu || blk >= p.num_blocks) {
        return;
    }
    let position = positions[t];
    let ks = t * p.kv_stride + p.k_col + h * p.head_dim;
    let vs = t * p.kv_stride + p.v_col + h * p.head_dim;
    let dst = blk * p.block_stride + h * p.head_stride + (slot % p.block_size) * p.token_stride + d;
    k_st2(p.k_base + dst, vec2<f32>(
        rotated_key(ks, d, half_dim, position),
        rotated_key(ks, d + 1u, half_dim, position),
    ));
    v_st2(p.v_base + dst, vec2<f32>(kvsrc[vs + d], kvsrc[vs + d + 1u]));
}
