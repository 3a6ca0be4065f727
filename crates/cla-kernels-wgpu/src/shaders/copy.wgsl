// Buffer copy through a compute shader: dst[i] = src[i] over VEC-word elements
// (vec4<u32> = 16 bytes when the size allows). A grid-stride loop lets a bounded number of
// workgroups cover any size; each thread keeps UNROLL loads in flight per step. Used as the
// bandwidth ceiling of memory-bound kernels (it moves bytes the way they do) and as a copy.
//
// Placeholders (written in double braces below): T (u32 or vec4<u32>), UNROLL.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<{{T}}>;
@group(0) @binding(2) var<storage, read_write> dst: array<{{T}}>;

const WG: u32 = 256u;
const UNROLL: u32 = {{UNROLL}}u;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let stride = nwg.x * WG;
    var i = wid.x * WG + lid;
    loop {
        if (i >= p.n) {
            break;
        }
        var v: array<{{T}}, UNROLL>;
        for (var u = 0u; u < UNROLL; u++) {
            let j = i + u * stride;
            if (j < p.n) {
                v[u] = src[j];
            }
        }
        for (var u = 0u; u < UNROLL; u++) {
            let j = i + u * stride;
            if (j < p.n) {
                dst[j] = v[u];
            }
        }
        i += UNROLL * stride;
    }
}
