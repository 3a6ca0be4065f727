//! Tensor copy through a compute shader (`shaders/copy.wgsl`).
//!
//! `copy_buffer_to_buffer` is the obvious copy, but on some drivers it runs on a copy engine
//! well below what shaders reach; this kernel moves 16-byte words with every SM, the way the
//! memory-bound kernels do, so it is also the bandwidth ceiling the benchmark reports.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::u32_of;
use crate::pipeline::{Bind, PipelineKey, render, whole};
use crate::tensor::GpuTensor;

const SRC: &str = include_str!("../shaders/copy.wgsl");
/// Loads in flight per thread and step.
const UNROLL: u32 = 4;
/// Most workgroups of one copy: about 60 per SM of a 132-SM GPU, enough to saturate memory;
/// larger copies loop (grid-stride).
const MAX_WORKGROUPS: u64 = 8192;

impl GpuContext {
    /// Copies all bytes of `src` into `dst` (same dtype and element count).
    pub fn copy_tensor(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &GpuTensor,
        dst: &GpuTensor,
    ) -> Result<()> {
        ensure_arg!(
            src.dtype == dst.dtype && src.numel() == dst.numel(),
            "copy: src {:?} {} and dst {:?} {} differ",
            src.shape,
            src.dtype.name(),
            dst.shape,
            dst.dtype.name()
        );
        // Both buffers are padded to whole words; copy whole words.
        let words = (src.byte_len() as u64).div_ceil(4);
        if words == 0 {
            return Ok(());
        }
        self.check_binding("copy", words * 4)?;
        let vec4 = words.is_multiple_of(4);
        let n = if vec4 { words / 4 } else { words };
        let key = PipelineKey {
            kernel: "copy",
            elems: vec![],
            params: vec![("vec", if vec4 { 4 } else { 1 }), ("unroll", UNROLL)],
        };
        let kernel = self.kernel(key, &[Bind::Uniform, Bind::Read, Bind::ReadWrite], |name| {
            render(
                name,
                SRC,
                &[
                    ("T", if vec4 { "vec4<u32>" } else { "u32" }.to_owned()),
                    ("UNROLL", UNROLL.to_string()),
                ],
            )
        })?;
        let params = self.uniform(&[u32_of("copy words", n as usize)?]);
        let groups = n.div_ceil(256 * u64::from(UNROLL)).clamp(
            1,
            MAX_WORKGROUPS.min(u64::from(self.features().max_workgroups_per_dim)),
        );
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(src), whole(dst)],
            (groups as u32, 1, 1),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::DType;
    use crate::testing::{POISON, both_ctx, values};

    #[test]
    fn copy_matches_source_for_any_size() {
        for c in both_ctx() {
            // Whole vec4 words, a ragged word count, a grid-stride size, and odd f16 counts.
            for (n, dt) in [
                (1024usize, DType::F32),
                (37, DType::F32),
                (300_001, DType::F32),
                (7, DType::F16),
            ] {
                let v = values(n as u64, n);
                let src = if dt == DType::F32 {
                    c.upload_f32(&v, &[n]).unwrap()
                } else {
                    c.upload_f32_as_f16(&v, &[n]).unwrap()
                };
                let dst = c.create_tensor(&[n], dt, "dst").unwrap();
                c.fill_u32_pattern(&dst, POISON);
                let mut enc = c.encoder();
                c.copy_tensor(&mut enc, &src, &dst).unwrap();
                c.submit_and_wait(enc).unwrap();
                assert_eq!(
                    c.read_bytes(&src.buffer).unwrap(),
                    c.read_bytes(&dst.buffer).unwrap(),
                    "copy of {n} {}",
                    dt.name()
                );
            }
        }
    }

    /// Building a pipeline variant adds its time to `kernel_build_time`; running a built one
    /// adds nothing.
    #[test]
    fn kernel_build_time_counts_builds_only() {
        let c = crate::testing::fresh_ctx();
        assert_eq!(c.kernel_build_time(), std::time::Duration::ZERO);
        let n = 256;
        let src = c.upload_f32(&values(2, n), &[n]).unwrap();
        let dst = c.create_tensor(&[n], DType::F32, "dst").unwrap();
        let run = || {
            let mut enc = c.encoder();
            c.copy_tensor(&mut enc, &src, &dst).unwrap();
            c.submit_and_wait(enc).unwrap();
        };
        run();
        let first = c.kernel_build_time();
        assert!(first > std::time::Duration::ZERO);
        run();
        assert_eq!(c.kernel_build_time(), first);
    }

    #[test]
    fn built_kernels_report_the_source_they_were_built_from() {
        let c = crate::testing::ctx();
        let n = 64;
        let src = c.upload_f32(&values(1, n), &[n]).unwrap();
        let dst = c.create_tensor(&[n], DType::F32, "dst").unwrap();
        let mut enc = c.encoder();
        c.copy_tensor(&mut enc, &src, &dst).unwrap();
        c.submit_and_wait(enc).unwrap();
        let sources = c.kernel_sources();
        // (Other tests share the context and may add pipelines meanwhile; none are removed.)
        let built = c.pipeline_names();
        for (name, _) in &sources {
            assert!(built.contains(name), "{name}: a source without a pipeline");
        }
        let (name, wgsl) = sources
            .iter()
            .find(|(n, _)| n.starts_with("copy_"))
            .expect("the copy kernel is among the built ones");
        // What is reported is the generated WGSL itself: placeholders filled, valid as is.
        assert!(
            !wgsl.contains("{{"),
            "{name}: placeholders left in the source"
        );
        let module = wgpu::naga::front::wgsl::parse_str(wgsl)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(wgsl)));
        wgpu::naga::valid::Validator::new(
            wgpu::naga::valid::ValidationFlags::all(),
            wgpu::naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(wgsl)));
    }
}
