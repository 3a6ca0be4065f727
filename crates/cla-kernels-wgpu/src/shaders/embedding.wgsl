// Embedding gather: out[t, c] = table[ids[t], c]. Ids outside the vocabulary give zeros
// (the GPU cannot report an error; callers validate ids on the CPU when they come from it).
//
// Placeholders (written in double braces below): TABLE_DECL (binding 2, accessor table_ld).

struct Params {
    n_tokens: u32,
    hidden: u32,
    vocab: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
{{TABLE_DECL}}
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n_tokens * p.hidden) {
        return;
    }
    let t = i / p.hidden;
    let c = i % p.hidden;
    let id = ids[t];
    var v = 0.0;
    if (id < p.vocab) {
        v = table_ld(id * p.hidden + c);
    }
    out[i] = v;
}
