//! RMSNorm with a learned scale (`shaders/rmsnorm.wgsl`): `y = x / sqrt(mean(x^2) + eps) * w`.
//! The paper's CLA models give the norm feeding the K/V projection its own scale; that is just
//! a second call with another weight.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, expect_float, u32_of};
use crate::pipeline::{Bind, PipelineKey, elem_buffer, render, whole, with_f16_header};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/rmsnorm.wgsl");
/// Threads per row: rows are 1k-8k wide, so 256 threads each sum a few dozen squares.
const WG: u32 = 256;

impl GpuContext {
    /// Normalises each row of `x` (`[.., n]` f32) into `out` (same shape) with weight `w`
    /// (`[n]`, f32 or f16).
    pub fn rms_norm(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        out: &GpuTensor,
        eps: f32,
    ) -> Result<()> {
        let n = *x
            .shape
            .last()
            .ok_or_else(|| crate::GpuError::InvalidArgument("rms_norm: x is a scalar".into()))?;
        ensure_arg!(n > 0, "rms_norm: rows are empty");
        ensure_arg!(
            eps.is_finite() && eps >= 0.0,
            "rms_norm: eps must be finite and >= 0, got {eps}"
        );
        let rows = x.numel() / n;
        expect(x, "rms_norm x", DType::F32, rows * n)?;
        expect_float(w, "rms_norm weight", n)?;
        expect(out, "rms_norm out", DType::F32, rows * n)?;
        let st = self.elem_storage(w.dtype)?;
        let key = PipelineKey {
            kernel: "rms_norm",
            elems: vec![st],
            params: vec![("wg", WG)],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                let body = render(
                    name,
                    SRC,
                    &[
                        ("W_DECL", elem_buffer("w", 2, st, false)),
                        ("WG", WG.to_string()),
                    ],
                )?;
                Ok(with_f16_header(&[st], body))
            },
        )?;
        let params = self.uniform(&[u32_of("rows", rows)?, u32_of("n", n)?, eps.to_bits()]);
        let (gx, gy) = self.grid(rows as u64)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(out)],
            (gx, gy, 1),
        );
        Ok(())
    }
}

#[cfg(test)]
// Reference implementations index like the math they follow.
#[allow(clippy::needless_range_loop)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{POISON, assert_close, both_ctx, cases, round_f16, values};

    proptest! {
        #![proptest_config(cases(16))]
        #[test]
        fn rms_norm_matches_cpu(rows in 1usize..6, n in 1usize..1100, f16 in any::<bool>(), seed: u64) {
            for c in both_ctx() {
                let x: Vec<f32> = values(seed, rows * n).iter().map(|v| v * 3.0).collect();
                let mut w = values(seed ^ 9, n);
                if f16 {
                    w = round_f16(&w);
                }
                let eps = 1e-6f32;
                let tx = c.upload_f32(&x, &[rows, n]).unwrap();
                let tw = if f16 { c.upload_f32_as_f16(&w, &[n]).unwrap() } else { c.upload_f32(&w, &[n]).unwrap() };
                let out = c.create_tensor(&[rows, n], crate::DType::F32, "out").unwrap();
                c.fill_u32_pattern(&out, POISON);
                let mut enc = c.encoder();
                c.rms_norm(&mut enc, &tx, &tw, &out, eps).unwrap();
                c.submit_and_wait(enc).unwrap();
                let mut reference = vec![0.0f32; rows * n];
                for r in 0..rows {
                    let row = &x[r * n..(r + 1) * n];
                    let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    for i in 0..n {
                        reference[r * n + i] = (f64::from(row[i]) * inv * f64::from(w[i])) as f32;
                    }
                }
                assert_close("rms_norm", &c.read_f32(&out).unwrap(), &reference, 1e-5);
            }
        }
    }
}
