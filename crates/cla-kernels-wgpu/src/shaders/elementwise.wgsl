// Elementwise ops on f32 vectors: residual add (out = a + b, or out += b) and SwiGLU
// (out = silu(gate) * up). One invocation per element; the 2-D grid is linearised.
//
// Placeholders (written in double braces below): DECLS (bindings 1.. for the operands), EXPR (the value of out[i]).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
{{DECLS}}

const WG: u32 = 256u;

fn silu(x: f32) -> f32 {
    // x * sigmoid(x); exp(-x) overflows to inf for x < -88, giving x / inf = -0 as wanted.
    return x / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) {
        return;
    }
    out[i] = {{EXPR}};
}
