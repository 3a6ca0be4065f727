//! `cla-kernels-wgpu`: decoder operations (attention, matrix multiply, RMSNorm, RoPE,
//! SwiGLU, ...) as WGSL compute shaders run through `wgpu`, so they work on Vulkan, Metal
//! and DX12 GPUs of any vendor. The crate knows shapes and buffers, never a model.
