//! The kernels, one module (and one WGSL file) per op family. Each wrapper validates shapes,
//! picks (and lazily builds) its pipeline variant, and records its dispatches into a
//! caller-provided `wgpu::CommandEncoder`, so a whole decode step can be one submit.

pub mod attention;
pub mod copy;
pub mod elementwise;
pub mod embedding;
pub mod kv_append;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;

use crate::error::{Result, ensure_arg};
use crate::tensor::{DType, GpuTensor};

/// Checks a tensor's dtype and element count.
pub(crate) fn expect(t: &GpuTensor, what: &str, dtype: DType, numel: usize) -> Result<()> {
    ensure_arg!(
        t.dtype == dtype,
        "{what}: expected {}, got {}",
        dtype.name(),
        t.dtype.name()
    );
    ensure_arg!(
        t.numel() == numel,
        "{what}: expected {numel} elements, got shape {:?}",
        t.shape
    );
    Ok(())
}

/// Checks that a tensor is a float tensor with `numel` elements.
pub(crate) fn expect_float(t: &GpuTensor, what: &str, numel: usize) -> Result<()> {
    ensure_arg!(
        matches!(t.dtype, DType::F32 | DType::F16),
        "{what}: expected f32 or f16, got {}",
        t.dtype.name()
    );
    ensure_arg!(
        t.numel() == numel,
        "{what}: expected {numel} elements, got shape {:?}",
        t.shape
    );
    Ok(())
}

/// Converts a size to u32 for a uniform, or fails with InvalidArgument.
pub(crate) fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        crate::error::GpuError::InvalidArgument(format!("{what} = {v} does not fit in u32"))
    })
}
