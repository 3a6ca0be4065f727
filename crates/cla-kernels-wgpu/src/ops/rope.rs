//! Rotary position embedding, Hugging Face `rotate_half` convention (`shaders/rope.wgsl`).
//!
//! Dims `i` and `i + head_dim/2` of each head are rotated by `position * inv_freq[i]`, with
//! `inv_freq[i] = theta^(-2i/head_dim)`. The frequency table is a small buffer made by
//! [`GpuContext::rope_inv_freq`] (computed in f64 on the CPU), so the GPU angle is one f32
//! multiply and scaled-RoPE variants only need another table.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::pipeline::{Bind, PipelineKey, render, whole};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/rope.wgsl");
/// The angle reduction and (cos, sin) of one dim pair, shared with `rope_append.wgsl`.
pub(crate) const COMMON_SRC: &str = include_str!("../shaders/rope_common.wgsl");
const WG: u64 = 256;

/// `theta^(-2i/head_dim)` for `i < head_dim/2`, rounded once to f32.
pub fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

impl GpuContext {
    /// Uploads the RoPE frequency table for `head_dim` (even) and base `theta`.
    pub fn rope_inv_freq(&self, head_dim: usize, theta: f64) -> Result<GpuTensor> {
        ensure_arg!(
            head_dim >= 2 && head_dim.is_multiple_of(2),
            "rope: head_dim must be even and >= 2, got {head_dim}"
        );
        ensure_arg!(
            theta.is_finite() && theta > 0.0,
            "rope: theta must be > 0, got {theta}"
        );
        self.upload_f32(&inv_freq(head_dim, theta), &[head_dim / 2])
    }

    /// Rotates `x` (`[n_tokens, n_heads, head_dim]` f32) in place; `positions` is
    /// `[n_tokens]` u32 (explicit per token, so batches of sequences at different offsets
    /// work); `inv_freq` is `[head_dim / 2]` f32.
    pub fn rope(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        positions: &GpuTensor,
        inv_freq: &GpuTensor,
    ) -> Result<()> {
        ensure_arg!(
            x.shape.len() == 3,
            "rope: x must be [n_tokens, n_heads, head_dim], got {:?}",
            x.shape
        );
        let (n_tokens, n_heads, head_dim) = (x.shape[0], x.shape[1], x.shape[2]);
        ensure_arg!(
            head_dim.is_multiple_of(2),
            "rope: head_dim must be even, got {head_dim}"
        );
        expect(x, "rope x", DType::F32, n_tokens * n_heads * head_dim)?;
        expect(positions, "rope positions", DType::U32, n_tokens)?;
        expect(inv_freq, "rope inv_freq", DType::F32, head_dim / 2)?;
        let key = PipelineKey {
            kernel: "rope",
            elems: vec![],
            params: vec![],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::ReadWrite, Bind::Read, Bind::Read],
            |name| render(name, SRC, &[("ROPE_COMMON", COMMON_SRC.to_owned())]),
        )?;
        let params = self.uniform(&[
            u32_of("n_tokens", n_tokens)?,
            u32_of("n_heads", n_heads)?,
            u32_of("head_dim", head_dim)?,
        ]);
        let pairs = (n_tokens * n_heads * head_dim / 2) as u64;
        let (gx, gy) = self.grid(pairs.div_ceil(WG))?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(x),
                whole(positions),
                whole(inv_freq),
            ],
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

    use super::inv_freq;
    use crate::testing::{assert_close, cases, ctx, values};

    proptest! {
        #![proptest_config(cases(16))]
        #[test]
        fn rope_matches_cpu(n_tokens in 1usize..6, n_heads in 1usize..6,
                            half in prop::sample::select(vec![1usize, 2, 23, 32, 45, 64]),
                            seed: u64) {
            let c = ctx();
            let hd = half * 2;
            let theta = 10000.0;
            let x = values(seed, n_tokens * n_heads * hd);
            // Positions up to 8k, in any order (tokens of different sequences).
            let pos: Vec<u32> = (0..n_tokens).map(|t| ((seed >> (t * 5)) % 8192) as u32).collect();
            let tx = c.upload_f32(&x, &[n_tokens, n_heads, hd]).unwrap();
            let tp = c.upload_u32(&pos, &[n_tokens]).unwrap();
            let tf = c.rope_inv_freq(hd, theta).unwrap();
            let mut enc = c.encoder();
            c.rope(&mut enc, &tx, &tp, &tf).unwrap();
            c.submit_and_wait(enc).unwrap();
            let f = inv_freq(hd, theta);
            let mut reference = x.clone();
            for t in 0..n_tokens {
                for h in 0..n_heads {
                    let b = (t * n_heads + h) * hd;
                    for i in 0..half {
                        // The angle as the GPU forms it (one f32 multiply), then exact cos/sin.
                        let ang = f64::from(pos[t] as f32 * f[i]);
                        let (s, co) = ang.sin_cos();
                        let (x1, x2) = (f64::from(x[b + i]), f64::from(x[b + i + half]));
                        reference[b + i] = (x1 * co - x2 * s) as f32;
                        reference[b + i + half] = (x2 * co + x1 * s) as f32;
                    }
                }
            }
            assert_close("rope", &c.read_f32(&tx).unwrap(), &reference, 1e-5);
        }
    }

    #[test]
    fn odd_head_dim_is_rejected() {
        let c = ctx();
        assert!(matches!(
            c.rope_inv_freq(45, 1e4),
            Err(crate::GpuError::InvalidArgument(_))
        ));
    }
}
