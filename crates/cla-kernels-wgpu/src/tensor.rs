//! Typed GPU buffers ([`GpuTensor`]) and the upload / download helpers.
//!
//! A tensor is a whole `wgpu::Buffer` plus a row-major shape and an element type. f16 data is
//! stored as IEEE half floats, two per 32-bit word, whichever way the shaders read it (native
//! `f16` or `unpack2x16float`), so the bytes are the same on every adapter. Buffers are padded
//! to a multiple of 4 bytes.

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{GpuError, Result, ensure_arg};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 32-bit unsigned integer (token ids, block tables).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// Short lower-case name used in pipeline variant names.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }
}

/// A buffer with a row-major shape and an element type.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    /// The buffer (usage STORAGE | COPY_SRC | COPY_DST when made by this crate).
    pub buffer: wgpu::Buffer,
    /// Row-major shape; the last dimension is contiguous.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
}

impl GpuTensor {
    /// Wraps an existing buffer; checks that it is large enough for the shape.
    pub fn from_buffer(buffer: wgpu::Buffer, shape: &[usize], dtype: DType) -> Result<Self> {
        let numel = checked_numel(shape)?;
        ensure_arg!(
            (numel * dtype.size()) as u64 <= buffer.size(),
            "buffer of {} bytes is too small for shape {shape:?} of {}",
            buffer.size(),
            dtype.name()
        );
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the elements take (before padding).
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A buffer kept from call to call for small inputs that change every call (token ids,
/// positions, block tables): [`GpuContext::upload_u32_reusing`] writes the new values into it
/// through the queue instead of creating a buffer, so bind groups made with it stay valid
/// and a decode step allocates nothing. It grows (to the next power of two) when the values
/// do not fit, and then holds a new buffer.
///
/// The values reach the buffer when the queue next submits, after all work submitted
/// before: a step that is still running keeps reading the old values. Use what one write
/// returns in commands submitted after it, and write a buffer at most once per submission
/// (a second write before the submit replaces the first for both readers).
#[derive(Debug, Default)]
pub struct ReusableBuffer {
    buffer: Option<wgpu::Buffer>,
}

impl ReusableBuffer {
    /// An empty slot; the first write creates its buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the current buffer holds (0 before the first write).
    pub fn capacity(&self) -> u64 {
        self.buffer.as_ref().map_or(0, wgpu::Buffer::size)
    }
}

fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| GpuError::InvalidArgument(format!("shape {shape:?} overflows")))
}

/// Rounds up to a multiple of 4 bytes, at least 4 (wgpu rejects empty bindings).
fn padded(bytes: usize) -> u64 {
    (bytes.max(4).div_ceil(4) * 4) as u64
}

impl GpuContext {
    fn check_size(&self, bytes: u64) -> Result<()> {
        let max = self.features().max_buffer_size;
        if bytes > max {
            return Err(GpuError::NotAvailable(format!(
                "a buffer of {bytes} bytes exceeds the adapter's maximum of {max}"
            )));
        }
        Ok(())
    }

    /// Creates an uninitialised (zeroed by wgpu) tensor.
    pub fn create_tensor(&self, shape: &[usize], dtype: DType, label: &str) -> Result<GpuTensor> {
        let bytes = padded(checked_numel(shape)? * dtype.size());
        self.check_size(bytes)?;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn upload_bytes(&self, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        let numel = checked_numel(shape)?;
        ensure_arg!(
            numel * dtype.size() == bytes.len(),
            "{} values given for shape {shape:?} ({numel} elements)",
            bytes.len() / dtype.size()
        );
        let size = padded(bytes.len());
        self.check_size(size)?;
        let mut contents = bytes.to_vec();
        contents.resize(size as usize, 0);
        let buffer = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("cla upload"),
                contents: &contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Uploads f32 values.
    pub fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::F32)
    }

    /// Uploads f16 values.
    pub fn upload_f16(&self, data: &[half::f16], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::F16)
    }

    /// Converts f32 values to f16 (round to nearest) and uploads them.
    pub fn upload_f32_as_f16(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        self.upload_f16(&h, shape)
    }

    /// Uploads u32 values.
    pub fn upload_u32(&self, data: &[u32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_bytes(bytemuck::cast_slice(data), shape, DType::U32)
    }

    /// A tensor of `shape` in `slot`'s buffer (grown when too small); its contents are what
    /// was last written there (zeros in a new buffer). For a destination that every call
    /// fills on the GPU (e.g. by a copy), without a buffer per call.
    pub fn tensor_reusing(
        &self,
        slot: &mut ReusableBuffer,
        shape: &[usize],
        dtype: DType,
        label: &str,
    ) -> Result<GpuTensor> {
        let bytes = padded(checked_numel(shape)? * dtype.size());
        self.check_size(bytes)?;
        let buffer = match &slot.buffer {
            Some(b) if b.size() >= bytes => b.clone(),
            _ => {
                // Powers of two from 256 bytes: a growing input is reallocated a few times
                // only. (Capped at the adapter's maximum, which `bytes` is within.)
                let max = self.features().max_buffer_size;
                let size = bytes.max(256).next_power_of_two().min(max).max(bytes);
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                slot.buffer = Some(b.clone());
                b
            }
        };
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Writes u32 values into `slot`'s buffer through the queue (see [`ReusableBuffer`] for
    /// when they arrive) and returns them as a tensor of `shape`.
    pub fn upload_u32_reusing(
        &self,
        slot: &mut ReusableBuffer,
        data: &[u32],
        shape: &[usize],
        label: &str,
    ) -> Result<GpuTensor> {
        let numel = checked_numel(shape)?;
        ensure_arg!(
            numel == data.len(),
            "{} values given for shape {shape:?} ({numel} elements)",
            data.len()
        );
        let t = self.tensor_reusing(slot, shape, DType::U32, label)?;
        if !data.is_empty() {
            self.queue
                .write_buffer(&t.buffer, 0, bytemuck::cast_slice(data));
        }
        Ok(t)
    }

    /// Overwrites a tensor's contents through the queue (ordered before later submits).
    pub fn write_tensor<T: bytemuck::Pod>(&self, t: &GpuTensor, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        ensure_arg!(
            bytes.len() == t.byte_len(),
            "{} bytes given for a tensor of {} bytes",
            bytes.len(),
            t.byte_len()
        );
        let mut padded_bytes = bytes.to_vec();
        padded_bytes.resize(padded(bytes.len()) as usize, 0);
        self.queue.write_buffer(&t.buffer, 0, &padded_bytes);
        Ok(())
    }

    /// Fills the whole buffer of `t` with a 32-bit pattern (e.g. NaN bits `0x7fc0_0000`, to
    /// catch elements a kernel failed to write).
    pub fn fill_u32_pattern(&self, t: &GpuTensor, pattern: u32) {
        let words = vec![pattern; (t.buffer.size() / 4) as usize];
        self.queue
            .write_buffer(&t.buffer, 0, bytemuck::cast_slice(&words));
    }

    /// Copies a buffer back to the CPU (waits for all submitted work).
    pub fn read_bytes(&self, buffer: &wgpu::Buffer) -> Result<Vec<u8>> {
        let size = buffer.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("cla readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.encoder();
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.submit_and_wait(enc)?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Reads a tensor as f32 (f16 tensors are widened).
    pub fn read_f32(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(&t.buffer)?;
        let n = t.numel();
        match t.dtype {
            DType::F32 => Ok(bytemuck::cast_slice::<u8, f32>(&bytes[..n * 4]).to_vec()),
            DType::F16 => Ok(bytemuck::cast_slice::<u8, half::f16>(&bytes[..n * 2])
                .iter()
                .map(|h| h.to_f32())
                .collect()),
            DType::U32 => Err(GpuError::InvalidArgument(
                "read_f32 on a u32 tensor; use read_u32".into(),
            )),
        }
    }

    /// Reads a u32 tensor.
    pub fn read_u32(&self, t: &GpuTensor) -> Result<Vec<u32>> {
        ensure_arg!(
            t.dtype == DType::U32,
            "read_u32 on a {} tensor",
            t.dtype.name()
        );
        let bytes = self.read_bytes(&t.buffer)?;
        Ok(bytemuck::cast_slice::<u8, u32>(&bytes[..t.numel() * 4]).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{POISON, ctx};

    /// Each use of a reusable buffer reads the values written for it, also when the next
    /// values are written (and the buffer grown) before the earlier work has run.
    #[test]
    fn reused_input_buffers_keep_each_submission_its_values() {
        let c = ctx();
        let mut slot = ReusableBuffer::new();
        let inputs: [Vec<u32>; 4] = [
            (1..=10).collect(),
            (100..106).collect(),
            (1000..1300).collect(),
            vec![7],
        ];
        let mut outs = Vec::new();
        let mut capacities = Vec::new();
        for data in &inputs {
            let t = c
                .upload_u32_reusing(&mut slot, data, &[data.len()], "test input")
                .unwrap();
            capacities.push(slot.capacity());
            let out = c.create_tensor(&[data.len()], DType::U32, "out").unwrap();
            c.fill_u32_pattern(&out, POISON);
            let mut enc = c.encoder();
            c.copy_tensor(&mut enc, &t, &out).unwrap();
            // Submitted, not waited for: the next write is queued behind it.
            c.queue().submit([enc.finish()]);
            outs.push(out);
        }
        for (data, out) in inputs.iter().zip(&outs) {
            assert_eq!(&c.read_u32(out).unwrap(), data);
        }
        // 40 bytes -> 256; 24 fit; 1200 -> 2048; 4 fit.
        assert_eq!(capacities, [256, 256, 2048, 2048]);
        // A wrong count is a typed error, not a write.
        assert!(matches!(
            c.upload_u32_reusing(&mut slot, &[1, 2, 3], &[2], "test input"),
            Err(GpuError::InvalidArgument(_))
        ));
    }
}
