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

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::paged::KvPool;
use crate::pipeline::ElemStorage;
use crate::tensor::{DType, GpuTensor};

/// A storage binding over part of a buffer, and the element offset of the wanted data
/// inside it.
pub(crate) type Window<'a> = (wgpu::BindingResource<'a>, u64);

impl GpuContext {
    /// Bindings over this layer's K and V regions of `pool` (stored as `sk` / `sv`), so a
    /// pool larger than the binding limit can be read one region at a time.
    pub(crate) fn kv_windows<'a>(
        &self,
        what: &str,
        pool: &KvPool<'a>,
        sk: ElemStorage,
        sv: ElemStorage,
    ) -> Result<(Window<'a>, Window<'a>)> {
        let extent = pool.layout.extent();
        let k = self.window(
            &format!("{what} k pool"),
            &pool.k.buffer,
            pool.k_base,
            extent,
            sk.elem_bytes(),
        )?;
        let v = self.window(
            &format!("{what} v pool"),
            &pool.v.buffer,
            pool.v_base,
            extent,
            sv.elem_bytes(),
        )?;
        Ok((k, v))
    }
}

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
