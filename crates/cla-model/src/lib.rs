//! `cla-model`: a Llama-style decoder with Cross-Layer Attention, composed from `cla-core`
//! (configuration and the layer -> K/V-source map), `cla-kv` (the cache) and
//! `cla-kernels-wgpu` (GPU kernels), with a CPU reference backend.
