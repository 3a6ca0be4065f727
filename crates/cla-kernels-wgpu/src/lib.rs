//! `cla-kernels-wgpu`: decoder operations (attention, matrix multiply, RMSNorm, RoPE,
//! SwiGLU, ...) as WGSL compute shaders run through `wgpu`, so they work on Vulkan, Metal
//! and DX12 GPUs of any vendor. The crate knows shapes and buffers, never a model.
//!
//! # Layout
//! - [`context`]: adapter selection (`CLA_DEVICE`), device creation, feature detection and
//!   the switches for fast paths (`CLA_GPU_DISABLE`).
//! - [`tensor`]: [`GpuTensor`] (buffer + shape + dtype) and upload / download helpers.
//! - [`pipeline`]: WGSL preprocessing, deterministic variant names, the lazy pipeline cache.
//! - [`ops`]: one module and one WGSL file per op family. Every op records into a
//!   caller-provided `wgpu::CommandEncoder`, so a whole decode step is one submit.
//!
//! # Invariants
//! - No model knowledge: attention reads K/V through a paged-pool view (base, strides, block
//!   tables) given by the caller. Cross-Layer Attention is expressed by the caller passing the
//!   producer layer's pool base to a consumer layer; the kernels never know.
//! - No panics on bad input: shapes and sizes are checked on the CPU and reported as
//!   [`GpuError::InvalidArgument`]; missing adapter capabilities as [`GpuError::NotAvailable`].
//! - Every fast path (native f16, subgroups, tensor cores, the lane-group decode attention,
//!   shaders without runtime bounds checks) has a portable fallback that the tests exercise.
//! - Activations are f32; weights and K/V pools may be f32 or f16.
//!
//! # Example
//! ```no_run
//! use cla_kernels_wgpu::{DeviceSelector, GpuContext};
//! # fn main() -> Result<(), cla_kernels_wgpu::GpuError> {
//! let ctx = GpuContext::new(&DeviceSelector::from_env()?)?;
//! let x = ctx.upload_f32(&[1.0, 2.0, 3.0, 4.0], &[1, 4])?;
//! let w = ctx.upload_f32(&[1.0; 4], &[4])?;
//! let y = ctx.create_tensor(&[1, 4], cla_kernels_wgpu::DType::F32, "y")?;
//! let mut enc = ctx.encoder();
//! ctx.rms_norm(&mut enc, &x, &w, &y, 1e-6)?;
//! ctx.submit_and_wait(enc)?;
//! println!("{:?}", ctx.read_f32(&y)?);
//! # Ok(()) }
//! ```

pub mod context;
pub mod error;
pub mod ops;
pub mod paged;
pub mod pipeline;
pub mod tensor;

#[cfg(test)]
mod testing;

pub use context::{
    AdapterFilter, AdapterSummary, CoopMatShape, DeviceSelector, FastPaths, GpuContext, GpuFeatures,
};
pub use error::{GpuError, Result};
pub use paged::{KvPool, PagedKvLayout, SeqBatch, SeqBatchBuffers, SeqDesc};
pub use pipeline::{BindGroupCache, ElemStorage, PassBatch, PipelineKey};
pub use tensor::{DType, GpuTensor, ReusableBuffer};
