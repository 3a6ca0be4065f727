//! Linear layers: `y = x · wᵀ` with `w` in the `[out_features, in_features]` layout, f32 or f16.
//!
//! Two kernels: a tiled matmul for prefill (`shaders/matmul.wgsl`, many activation rows,
//! compute bound) and a matrix-vector product for decode (`shaders/matvec.wgsl`, a few rows,
//! bound by reading the weights once). [`GpuContext::linear`] picks between them.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, expect_float, u32_of};
use crate::pipeline::{Bind, PipelineKey, elem_buffer, render, whole, with_f16_header};
use crate::tensor::{DType, GpuTensor};

const MATMUL_SRC: &str = include_str!("../shaders/matmul.wgsl");
const MATVEC_SRC: &str = include_str!("../shaders/matvec.wgsl");
const MATVEC_VEC_SRC: &str = include_str!("../shaders/matvec_vec.wgsl");
/// Wide-load matvec: one subgroup-sized team of lanes per weight row (32 lanes x 16 bytes =
/// 512 contiguous bytes per step), 8 rows per workgroup, 4 loads in flight per lane.
const MATVEC_VEC_TPR: u32 = 32;
const MATVEC_VEC_RPW: u32 = 8;
const MATVEC_VEC_UNROLL: u32 = 4;

/// Activation rows up to which [`GpuContext::linear`] uses the matrix-vector kernel: the
/// matvec applies each weight to `MATVEC_MB` rows per pass, so up to that many rows it reads
/// the weights exactly once.
pub const MATVEC_MAX_ROWS: usize = MATVEC_MB as usize;
/// Activation rows handled per pass of the matvec kernel.
const MATVEC_MB: u32 = 8;
/// Threads sharing one weight row: two warps' worth of coalesced pair loads per step.
const MATVEC_TPR: u32 = 64;
/// Weight rows per matvec workgroup (workgroup of 256 threads).
const MATVEC_RPW: u32 = 4;

/// Micro-tile of the tiled matmul: each thread computes `tm x tm` outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulTile {
    /// 4x4 per thread, 64x64 per workgroup, 8.3 KiB of workgroup memory.
    T4,
    /// 8x8 per thread, 128x128 per workgroup, 16.5 KiB of workgroup memory (more reuse per
    /// load; used when the adapter allows and the output is large).
    T8,
}

impl MatmulTile {
    fn tm(self) -> u32 {
        match self {
            MatmulTile::T4 => 4,
            MatmulTile::T8 => 8,
        }
    }
    fn shared_bytes(self) -> u32 {
        let bm = 16 * self.tm();
        2 * 16 * (bm + 1) * 4
    }
}

struct LinearShape {
    m: usize,
    n: usize,
    k: usize,
}

fn linear_shape(x: &GpuTensor, w: &GpuTensor, y: &GpuTensor) -> Result<LinearShape> {
    ensure_arg!(
        w.shape.len() == 2,
        "linear: weight must be [out_features, in_features], got {:?}",
        w.shape
    );
    let (n, k) = (w.shape[0], w.shape[1]);
    ensure_arg!(n > 0 && k > 0, "linear: empty weight {:?}", w.shape);
    ensure_arg!(
        x.shape.last() == Some(&k),
        "linear: x {:?} does not end in in_features {k}",
        x.shape
    );
    let m = x.numel() / k;
    expect(x, "linear x", DType::F32, m * k)?;
    expect_float(w, "linear weight", n * k)?;
    expect(y, "linear y", DType::F32, m * n)?;
    ensure_arg!(
        y.shape.last() == Some(&n),
        "linear: y {:?} does not end in out_features {n}",
        y.shape
    );
    Ok(LinearShape { m, n, k })
}

impl GpuContext {
    /// `y = x · wᵀ`, choosing the matvec kernel for at most [`MATVEC_MAX_ROWS`] rows and the
    /// tiled matmul otherwise. `x` is `[.., k]` f32, `w` is `[n, k]` f32/f16, `y` is `[.., n]`.
    pub fn linear(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        if s.m <= MATVEC_MAX_ROWS {
            self.matvec(encoder, x, w, y)
        } else {
            let tile = if s.m >= 128 && s.n >= 128 && self.tile_fits(MatmulTile::T8) {
                MatmulTile::T8
            } else {
                MatmulTile::T4
            };
            self.matmul(encoder, x, w, y, tile)
        }
    }

    fn tile_fits(&self, tile: MatmulTile) -> bool {
        tile.shared_bytes() <= self.features().max_workgroup_storage
    }

    /// Tiled `y = x · wᵀ` for any `m`; see [`GpuContext::linear`] for shapes.
    pub fn matmul(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        tile: MatmulTile,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        if !self.tile_fits(tile) {
            return Err(crate::GpuError::NotAvailable(format!(
                "matmul tile {tile:?} needs {} bytes of workgroup memory, the adapter has {}",
                tile.shared_bytes(),
                self.features().max_workgroup_storage
            )));
        }
        self.check_binding("linear weight", w.byte_len() as u64)?;
        let st = self.elem_storage(w.dtype)?;
        let tm = tile.tm();
        let key = PipelineKey {
            kernel: "matmul",
            elems: vec![st],
            params: vec![("tm", tm)],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                let body = render(
                    name,
                    MATMUL_SRC,
                    &[
                        ("W_DECL", elem_buffer("w", 2, st, false)),
                        ("TM", tm.to_string()),
                    ],
                )?;
                Ok(with_f16_header(&[st], body))
            },
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        let bm = 16 * tm as usize;
        let gx = u32_of("matmul grid x", s.n.div_ceil(bm))?;
        let gy = u32_of("matmul grid y", s.m.div_ceil(bm))?;
        let max = self.features().max_workgroups_per_dim;
        if gx > max || gy > max {
            return Err(crate::GpuError::NotAvailable(format!(
                "matmul grid {gx}x{gy} exceeds {max} workgroups per dimension"
            )));
        }
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
            (gx, gy, 1),
        );
        Ok(())
    }

    fn matvec_wide(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        s: &LinearShape,
        ch: u32,
    ) -> Result<()> {
        let f16 = w.dtype == DType::F16;
        let key = PipelineKey {
            kernel: "matvec_wide",
            elems: vec![if f16 {
                crate::ElemStorage::F16Packed
            } else {
                crate::ElemStorage::F32
            }],
            params: vec![
                ("tpr", MATVEC_VEC_TPR),
                ("rpw", MATVEC_VEC_RPW),
                ("mb", MATVEC_MB),
                ("u", MATVEC_VEC_UNROLL),
            ],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                // f16 weights are read as packed words whatever SHADER_F16 says: same bytes.
                let decl = if f16 {
                    "@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;\n\
                     alias WRaw = vec4<u32>;\n\
                     fn w_load(i: u32) -> WRaw { return w[i]; }\n\
                     fn w_unpack(r: WRaw) -> array<vec4<f32>, 2> {\n\
                         return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(r.x), unpack2x16float(r.y)),\n\
                                                   vec4<f32>(unpack2x16float(r.z), unpack2x16float(r.w)));\n\
                     }"
                } else {
                    "@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;\n\
                     alias WRaw = vec4<f32>;\n\
                     fn w_load(i: u32) -> WRaw { return w[i]; }\n\
                     fn w_unpack(r: WRaw) -> array<vec4<f32>, 2> { return array<vec4<f32>, 2>(r, vec4<f32>(0.0)); }"
                };
                render(
                    name,
                    MATVEC_VEC_SRC,
                    &[
                        ("W_DECL", decl.to_owned()),
                        ("CH", ch.to_string()),
                        ("TPR", MATVEC_VEC_TPR.to_string()),
                        ("RPW", MATVEC_VEC_RPW.to_string()),
                        ("MB", MATVEC_MB.to_string()),
                        ("UNROLL", MATVEC_VEC_UNROLL.to_string()),
                    ],
                )
            },
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        let (gx, gy) = self.grid((s.n as u64).div_ceil(u64::from(MATVEC_VEC_RPW)))?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
            (gx, gy, 1),
        );
        Ok(())
    }

    /// Matrix-vector `y = x · wᵀ` for few rows (any `m` works; weights are re-read every
    /// [`MATVEC_MAX_ROWS`] rows). See [`GpuContext::linear`] for shapes.
    pub fn matvec(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        self.check_binding("linear weight", w.byte_len() as u64)?;
        // Wide loads when every weight row starts on a 16-byte boundary.
        let ch = if w.dtype == DType::F16 { 8 } else { 4 };
        if s.k.is_multiple_of(ch) {
            return self.matvec_wide(encoder, x, w, y, &s, ch as u32);
        }
        let st = self.elem_storage(w.dtype)?;
        let pairs = s.k.is_multiple_of(2);
        let key = PipelineKey {
            kernel: "matvec",
            elems: vec![st],
            params: vec![
                ("tpr", MATVEC_TPR),
                ("rpw", MATVEC_RPW),
                ("mb", MATVEC_MB),
                ("pairs", u32::from(pairs)),
            ],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                let body = render(
                    name,
                    MATVEC_SRC,
                    &[
                        ("W_DECL", elem_buffer("w", 2, st, false)),
                        ("TPR", MATVEC_TPR.to_string()),
                        ("RPW", MATVEC_RPW.to_string()),
                        ("MB", MATVEC_MB.to_string()),
                        ("PAIRS", pairs.to_string()),
                    ],
                )?;
                Ok(with_f16_header(&[st], body))
            },
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        let (gx, gy) = self.grid((s.n as u64).div_ceil(u64::from(MATVEC_RPW)))?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
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

    use super::MatmulTile;
    use crate::testing::{POISON, assert_close, both_ctx, cases, round_f16, values};

    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    s += f64::from(x[i * k + l]) * f64::from(w[j * k + l]);
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    proptest! {
        #![proptest_config(cases(16))]
        #[test]
        fn linear_matches_cpu(m in 1usize..40, n in 1usize..150, k in prop_oneof![1usize..200, (1usize..40).prop_map(|k| 8 * k)],
                              f16 in any::<bool>(), seed: u64) {
            for c in both_ctx() {
                let x = values(seed, m * k);
                let mut w = values(seed ^ 3, n * k);
                if f16 {
                    w = round_f16(&w);
                }
                let tx = c.upload_f32(&x, &[m, k]).unwrap();
                let tw = if f16 { c.upload_f32_as_f16(&w, &[n, k]).unwrap() } else { c.upload_f32(&w, &[n, k]).unwrap() };
                let reference = reference(&x, &w, m, n, k);
                // All three kernels on the same shapes: matvec (any m), both matmul tiles.
                for which in 0..3 {
                    let y = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                    c.fill_u32_pattern(&y, POISON);
                    let mut enc = c.encoder();
                    match which {
                        0 => c.matvec(&mut enc, &tx, &tw, &y).unwrap(),
                        1 => c.matmul(&mut enc, &tx, &tw, &y, MatmulTile::T4).unwrap(),
                        _ => c.matmul(&mut enc, &tx, &tw, &y, MatmulTile::T8).unwrap(),
                    }
                    c.submit_and_wait(enc).unwrap();
                    assert_close(&format!("linear kernel {which} f16={f16}"), &c.read_f32(&y).unwrap(), &reference, 1e-5);
                }
            }
        }
    }

    #[test]
    fn mismatched_inner_dim_is_invalid_argument() {
        let c = crate::testing::ctx();
        let x = c.upload_f32(&[0.0; 6], &[2, 3]).unwrap();
        let w = c.upload_f32(&[0.0; 8], &[2, 4]).unwrap();
        let y = c.create_tensor(&[2, 2], crate::DType::F32, "y").unwrap();
        let mut enc = c.encoder();
        assert!(matches!(
            c.linear(&mut enc, &x, &w, &y),
            Err(crate::GpuError::InvalidArgument(_))
        ));
    }
}
