// Appends new K and V rows ([n_tokens, n_kv_heads, head_dim] f32) into paged pools at
// per-token slots (slot = block * block_size + offset; 0xffffffff skips the token, e.g. for
// padding). One invocation per pair of dims, so packed-f16 pools are written a whole word at
// a time. Slots pointing past num_blocks are skipped: the GPU cannot report them.
//
// Placeholders (written in double braces below): K_DECL (binding 4), V_DECL (binding 5).

struct Params {
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    block_size: u32,
    num_blocks: u32,
    k_base: u32,
    v_base: u32,
    block_stride: u32,
    head_stride: u32,
    token_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k_new: array<f32>;
@group(0) @binding(2) var<storage, read> v_new: array<f32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
{{K_DECL}}
{{V_DECL}}

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let half_dim = p.head_dim / 2u;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n_tokens * p.n_kv_heads * half_dim) {
        return;
    }
    let d = (i % half_dim) * 2u;
    let th = i / half_dim; // token * n_kv_heads + head
    let h = th % p.n_kv_heads;
    let t = th / p.n_kv_heads;
    let slot = slots[t];
    let blk = slot / p.block_size;
    if (slot == 0xffffffffu || blk >= p.num_blocks) {
        return;
    }
    let off = slot % p.block_size;
    let dst = blk * p.block_stride + h * p.head_stride + off * p.token_stride + d;
    let src = th * p.head_dim + d;
    k_st2(p.k_base + dst, vec2<f32>(k_new[src], k_new[src + 1u]));
    v_st2(p.v_base + dst, vec2<f32>(v_new[src], v_new[src + 1u]));
}
