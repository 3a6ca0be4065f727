//! Appends new K/V rows into a paged pool (`shaders/kv_append.wgsl`), converting to the
//! pool's element type (f32 or f16).

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::paged::KvPool;
use crate::pipeline::{
    Bind, ElemStorage, PipelineKey, elem_buffer, render, whole, with_f16_header,
};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/kv_append.wgsl");
const WG: u64 = 256;

impl GpuContext {
    /// Writes `k_new` and `v_new` (`[n_tokens, n_kv_heads, head_dim]` f32) into `pool` at the
    /// per-token `slots` (`[n_tokens]` u32, `block * block_size + offset`, or `u32::MAX` to
    /// skip; [`crate::SeqBatch::slots`] gives them for a batch).
    pub fn kv_append(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        k_new: &GpuTensor,
        v_new: &GpuTensor,
        slots: &GpuTensor,
        pool: &KvPool<'_>,
    ) -> Result<()> {
        pool.validate()?;
        let l = pool.layout;
        let n_tokens = slots.numel();
        let row = (l.n_kv_heads * l.head_dim) as usize;
        expect(slots, "kv_append slots", DType::U32, n_tokens)?;
        expect(k_new, "kv_append k_new", DType::F32, n_tokens * row)?;
        expect(v_new, "kv_append v_new", DType::F32, n_tokens * row)?;
        let sk = self.elem_storage(pool.k.dtype)?;
        let sv = self.elem_storage(pool.v.dtype)?;
        let ((kb, k_off), (vb, v_off)) = self.kv_windows("kv_append", pool, sk, sv)?;
        if sk == ElemStorage::F16Packed || sv == ElemStorage::F16Packed {
            // Packed f16 is written a u32 word (two dims) at a time.
            ensure_arg!(
                k_off.is_multiple_of(2)
                    && v_off.is_multiple_of(2)
                    && l.block_stride.is_multiple_of(2)
                    && l.head_stride.is_multiple_of(2)
                    && l.token_stride.is_multiple_of(2),
                "kv_append: f16 pools need even bases and strides on adapters without SHADER_F16"
            );
        }
        let key = PipelineKey {
            kernel: "kv_append",
            elems: vec![sk, sv],
            params: vec![],
        };
        let kernel = self.kernel(
            key,
            &[
                Bind::Uniform,
                Bind::Read,
                Bind::Read,
                Bind::Read,
                Bind::ReadWrite,
                Bind::ReadWrite,
            ],
            |name| {
                let body = render(
                    name,
                    SRC,
                    &[
                        ("K_DECL", elem_buffer("k", 4, sk, true)),
                        ("V_DECL", elem_buffer("v", 5, sv, true)),
                    ],
                )?;
                Ok(with_f16_header(&[sk, sv], body))
            },
        )?;
        let params = self.uniform(&[
            u32_of("n_tokens", n_tokens)?,
            l.n_kv_heads,
            l.head_dim,
            l.block_size,
            l.num_blocks,
            u32_of("k base", k_off as usize)?,
            u32_of("v base", v_off as usize)?,
            l.block_stride,
            l.head_stride,
            l.token_stride,
        ]);
        let pairs = (n_tokens * row / 2) as u64;
        let (gx, gy) = self.grid(pairs.div_ceil(WG))?;
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                whole(k_new),
                whole(v_new),
                whole(slots),
                kb,
                vb,
            ],
            (gx, gy, 1),
        );
        Ok(())
    }
}
