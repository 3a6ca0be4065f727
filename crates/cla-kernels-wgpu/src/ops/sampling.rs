//! Next-token choice on the GPU (`shaders/sampling.wgsl`): greedy argmax over each logits row,
//! so a decode step reads back one u32 per sequence instead of a vocabulary of floats.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::pipeline::{Bind, PipelineKey, whole};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/sampling.wgsl");

impl GpuContext {
    /// `out[r] = argmax(logits[r, :])` (lowest index on ties, NaNs ignored). `logits` is
    /// `[rows, vocab]` f32, `out` is `[rows]` u32.
    pub fn argmax(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        let vocab = *logits.shape.last().unwrap_or(&0);
        ensure_arg!(
            vocab > 0,
            "argmax: empty vocabulary in shape {:?}",
            logits.shape
        );
        let rows = logits.numel() / vocab;
        expect(logits, "argmax logits", DType::F32, rows * vocab)?;
        expect(out, "argmax out", DType::U32, rows)?;
        let key = PipelineKey {
            kernel: "argmax",
            elems: vec![],
            params: vec![],
        };
        let kernel = self.kernel(key, &[Bind::Uniform, Bind::Read, Bind::ReadWrite], |_| {
            Ok(SRC.to_owned())
        })?;
        let params = self.uniform(&[u32_of("rows", rows)?, u32_of("vocab", vocab)?]);
        let (gx, gy) = self.grid(rows as u64)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(logits), whole(out)],
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

    use crate::testing::{POISON, cases, ctx, values};

    proptest! {
        #![proptest_config(cases(24))]
        #[test]
        fn argmax_matches_cpu(rows in 1usize..6, vocab in 1usize..3000, ties in any::<bool>(), seed: u64) {
            let c = ctx();
            let mut x = values(seed, rows * vocab);
            if ties {
                // Coarse values make equal maxima likely: the lowest index must win.
                for v in &mut x {
                    *v = (*v * 4.0).round();
                }
            }
            if vocab > 3 {
                x[1] = f32::NAN;
            }
            let tl = c.upload_f32(&x, &[rows, vocab]).unwrap();
            let out = c.create_tensor(&[rows], crate::DType::U32, "ids").unwrap();
            c.fill_u32_pattern(&out, POISON);
            let mut enc = c.encoder();
            c.argmax(&mut enc, &tl, &out).unwrap();
            c.submit_and_wait(enc).unwrap();
            let got = c.read_u32(&out).unwrap();
            for r in 0..rows {
                let row = &x[r * vocab..(r + 1) * vocab];
                let mut best = None::<(usize, f32)>;
                for (i, &v) in row.iter().enumerate() {
                    if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                        best = Some((i, v));
                    }
                }
                prop_assert_eq!(got[r] as usize, best.map_or(0, |b| b.0), "row {}", r);
            }
        }
    }
}
