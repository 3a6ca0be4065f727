// The parameter block and the first four bindings shared by the attention kernels
// (attention.wgsl, attn_decode.wgsl, attn_decode_lanes.wgsl), pasted into each as
// ATTN_COMMON. `GpuContext::attention_params` (ops/attention.rs) writes the fields in this
// order.

struct Params {
    n_q_heads: u32,
    n_kv_heads: u32,
    group: u32,
    scale: f32,
    block_size: u32,
    k_base: u32,
    v_base: u32,
    block_stride: u32,
    head_stride: u32,
    token_stride: u32,
    chunk: u32,
    n_splits: u32,
    row_groups: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> seqs: array<u32>;
@group(0) @binding(3) var<storage, read> block_table: array<u32>;
