// Rotary position embedding, Hugging Face "rotate_half" convention, in place on
// x[token, head, 0..head_dim]: dims i and i + head_dim/2 form a pair rotated by
// angle = position[token] * inv_freq[i] (ROPE_COMMON: rope_common.wgsl).

{{ROPE_COMMON}}

struct Params {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let half_dim = p.head_dim / 2u;
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n_tokens * p.n_heads * half_dim) {
        return;
    }
    let j = i % half_dim;
    let row = i / half_dim; // token * n_heads + head
    let t = row / p.n_heads;
    let cs = rope_cos_sin(positions[t], inv_freq[j]);
    let base = row * p.head_dim;
    let x1 = x[base + j];
    let x2 = x[base + j + half_dim];
    x[base + j] = x1 * cs.x - x2 * cs.y;
    x[base + j + half_dim] = x2 * cs.x + x1 * cs.y;
}
