//! Residual add and SwiGLU (`silu(gate) * up`), elementwise over f32 tensors
//! (`shaders/elementwise.wgsl`).

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::pipeline::{Bind, PipelineKey, render, whole};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/elementwise.wgsl");
const WG: u64 = 256;

#[derive(Clone, Copy)]
enum Op {
    Add,
    AddAssign,
    SwiGlu,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::AddAssign => "add_assign",
            Op::SwiGlu => "swiglu",
        }
    }
    fn binds(self) -> &'static [Bind] {
        match self {
            Op::Add | Op::SwiGlu => &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            Op::AddAssign => &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
        }
    }
}

impl GpuContext {
    fn elementwise(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        op: Op,
        inputs: &[&GpuTensor],
        out: &GpuTensor,
    ) -> Result<()> {
        let n = out.numel();
        expect(out, op.name(), DType::F32, n)?;
        for t in inputs {
            expect(t, op.name(), DType::F32, n)?;
            ensure_arg!(
                t.shape == out.shape,
                "{}: shapes differ ({:?} vs {:?})",
                op.name(),
                t.shape,
                out.shape
            );
        }
        let key = PipelineKey {
            kernel: op.name(),
            elems: vec![],
            params: vec![],
        };
        let kernel = self.kernel(key, op.binds(), |name| {
            let (decls, expr) = match op {
                Op::Add | Op::SwiGlu => (
                    "@group(0) @binding(1) var<storage, read> a: array<f32>;\n\
                     @group(0) @binding(2) var<storage, read> b: array<f32>;\n\
                     @group(0) @binding(3) var<storage, read_write> out: array<f32>;",
                    if matches!(op, Op::Add) {
                        "a[i] + b[i]"
                    } else {
                        "silu(a[i]) * b[i]"
                    },
                ),
                Op::AddAssign => (
                    "@group(0) @binding(1) var<storage, read> b: array<f32>;\n\
                     @group(0) @binding(2) var<storage, read_write> out: array<f32>;",
                    "out[i] + b[i]",
                ),
            };
            render(
                name,
                SRC,
                &[("DECLS", decls.to_owned()), ("EXPR", expr.to_owned())],
            )
        })?;
        let params = self.uniform(&[u32_of("elements", n)?]);
        let mut res = vec![params.as_entire_binding()];
        res.extend(inputs.iter().map(|t| whole(t)));
        res.push(whole(out));
        let (x, y) = self.grid((n as u64).div_ceil(WG))?;
        self.dispatch(encoder, &kernel, &res, (x, y, 1));
        Ok(())
    }

    /// `out = a + b` (f32, same shapes).
    pub fn add(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        a: &GpuTensor,
        b: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        self.elementwise(encoder, Op::Add, &[a, b], out)
    }

    /// `x += y` in place: the residual connection.
    pub fn add_assign(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        self.elementwise(encoder, Op::AddAssign, &[y], x)
    }

    /// SwiGLU: `out = silu(gate) * up` (f32, same shapes).
    pub fn swiglu(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        gate: &GpuTensor,
        up: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        self.elementwise(encoder, Op::SwiGlu, &[gate, up], out)
    }
}

#[cfg(test)]
// Reference implementations index like the math they follow.
#[allow(clippy::needless_range_loop)]
mod tests {
    use proptest::prelude::*;

    use crate::testing::{POISON, assert_close, cases, ctx, values};

    proptest! {
        #![proptest_config(cases(16))]
        #[test]
        fn add_swiglu_match_cpu(rows in 1usize..5, cols in 1usize..700, seed: u64) {
            let c = ctx();
            let n = rows * cols;
            let a = values(seed, n);
            let b: Vec<f32> = values(seed ^ 1, n).iter().map(|v| v * 8.0).collect();
            let ta = c.upload_f32(&a, &[rows, cols]).unwrap();
            let tb = c.upload_f32(&b, &[rows, cols]).unwrap();
            let sum = c.create_tensor(&[rows, cols], crate::DType::F32, "sum").unwrap();
            let sw = c.create_tensor(&[rows, cols], crate::DType::F32, "sw").unwrap();
            c.fill_u32_pattern(&sum, POISON);
            c.fill_u32_pattern(&sw, POISON);
            let mut enc = c.encoder();
            c.add(&mut enc, &ta, &tb, &sum).unwrap();
            c.swiglu(&mut enc, &tb, &ta, &sw).unwrap();
            c.add_assign(&mut enc, &ta, &tb).unwrap();
            c.submit_and_wait(enc).unwrap();
            let r_sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            let r_sw: Vec<f32> = b
                .iter()
                .zip(&a)
                .map(|(&g, &u)| {
                    let g = f64::from(g);
                    (g / (1.0 + (-g).exp()) * f64::from(u)) as f32
                })
                .collect();
            assert_close("add", &c.read_f32(&sum).unwrap(), &r_sum, 1e-6);
            assert_close("add_assign", &c.read_f32(&ta).unwrap(), &r_sum, 1e-6);
            assert_close("swiglu", &c.read_f32(&sw).unwrap(), &r_sw, 1e-5);
        }
    }

    #[test]
    fn shape_mismatch_is_invalid_argument() {
        let c = ctx();
        let a = c.upload_f32(&[1.0; 6], &[2, 3]).unwrap();
        let b = c.upload_f32(&[1.0; 6], &[3, 2]).unwrap();
        let mut enc = c.encoder();
        let err = c.add(&mut enc, &a, &b, &a.clone()).unwrap_err();
        assert!(matches!(err, crate::GpuError::InvalidArgument(_)), "{err}");
    }
}
