//! Embedding gather: token ids to rows of an f32 or f16 table (`shaders/embedding.wgsl`).

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, expect_float, u32_of};
use crate::pipeline::{Bind, PipelineKey, elem_buffer, render, whole, with_f16_header};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/embedding.wgsl");
const WG: u64 = 256;

impl GpuContext {
    /// `out[t, :] = table[ids[t], :]`. `table` is `[vocab, hidden]` (f32 or f16), `ids` is
    /// `[n_tokens]` u32, `out` is `[n_tokens, hidden]` f32. Ids `>= vocab` give zero rows.
    pub fn embedding(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        table: &GpuTensor,
        ids: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        ensure_arg!(
            table.shape.len() == 2,
            "embedding: table must be [vocab, hidden], got {:?}",
            table.shape
        );
        let (vocab, hidden) = (table.shape[0], table.shape[1]);
        let n_tokens = ids.numel();
        expect_float(table, "embedding table", vocab * hidden)?;
        expect(ids, "embedding ids", DType::U32, n_tokens)?;
        expect(out, "embedding out", DType::F32, n_tokens * hidden)?;
        self.check_binding("embedding table", table.byte_len() as u64)?;
        let st = self.elem_storage(table.dtype)?;
        let key = PipelineKey {
            kernel: "embedding",
            elems: vec![st],
            params: vec![],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                let body = render(
                    name,
                    SRC,
                    &[("TABLE_DECL", elem_buffer("table", 2, st, false))],
                )?;
                Ok(with_f16_header(&[st], body))
            },
        )?;
        let params = self.uniform(&[
            u32_of("n_tokens", n_tokens)?,
            u32_of("hidden", hidden)?,
            u32_of("vocab", vocab)?,
        ]);
        let (x, y) = self.grid(((n_tokens * hidden) as u64).div_ceil(WG))?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(ids),
                whole(table),
                whole(out),
            ],
            (x, y, 1),
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
        fn embedding_matches_cpu(vocab in 1usize..50, hidden in 1usize..90, n in 1usize..9,
                                 f16 in any::<bool>(), seed: u64) {
            for c in both_ctx() {
                let mut table = values(seed, vocab * hidden);
                if f16 {
                    table = round_f16(&table);
                }
                // One id past the vocabulary: must give a zero row.
                let ids: Vec<u32> = (0..n).map(|i| ((seed as usize + i * 7) % (vocab + 1)) as u32).collect();
                let tt = if f16 {
                    c.upload_f32_as_f16(&table, &[vocab, hidden]).unwrap()
                } else {
                    c.upload_f32(&table, &[vocab, hidden]).unwrap()
                };
                let ti = c.upload_u32(&ids, &[n]).unwrap();
                let out = c.create_tensor(&[n, hidden], crate::DType::F32, "out").unwrap();
                c.fill_u32_pattern(&out, POISON);
                let mut enc = c.encoder();
                c.embedding(&mut enc, &tt, &ti, &out).unwrap();
                c.submit_and_wait(enc).unwrap();
                let reference: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| {
                        let id = id as usize;
                        if id < vocab {
                            table[id * hidden..(id + 1) * hidden].to_vec()
                        } else {
                            vec![0.0; hidden]
                        }
                    })
                    .collect();
                assert_close("embedding", &c.read_f32(&out).unwrap(), &reference, 1e-6);
            }
        }
    }
}
