//! Test support: the shared test devices, error norms and value generators.

use std::sync::OnceLock;

use proptest::prelude::*;

use crate::context::{DeviceSelector, FastPaths, GpuContext};

/// NaN bits written into output buffers before a dispatch, so that any element the kernel
/// fails to write shows up as an error.
pub const POISON: u32 = 0x7fc0_0000;

fn open(fast: Option<FastPaths>) -> GpuContext {
    let mut sel = DeviceSelector::from_env()
        .unwrap_or_else(|e| panic!("bad CLA_DEVICE / CLA_GPU_DISABLE: {e}"))
        .allow_cpu(true);
    if let Some(f) = fast {
        sel = sel.fast_paths(f);
    }
    GpuContext::new(&sel).unwrap_or_else(|e| {
        panic!(
            "kernel tests need a wgpu adapter; none could be opened: {e}\n\
             Install the software Vulkan driver: apt-get install mesa-vulkan-drivers libvulkan1"
        )
    })
}

/// The device every kernel test runs on (CLA_DEVICE, else the best adapter, CPU allowed).
pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| open(None))
}

/// A context of its own (nothing built yet), for tests that watch what a context builds.
pub fn fresh_ctx() -> GpuContext {
    open(None)
}

/// The same adapter with every fast path switched off (packed f16, no subgroups), to test the
/// portable fallbacks.
pub fn portable_ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        open(Some(
            FastPaths::parse_disable("all").expect("static disable list"),
        ))
    })
}

/// Both test devices, fast and portable.
pub fn both_ctx() -> [&'static GpuContext; 2] {
    [ctx(), portable_ctx()]
}

/// ||gpu - reference|| / ||reference|| (NaN if any value is NaN).
pub fn rel_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len(), "length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &r) in gpu.iter().zip(reference) {
        let d = f64::from(g) - f64::from(r);
        num += d * d;
        den += f64::from(r) * f64::from(r);
    }
    if num.is_nan() {
        return f64::NAN;
    }
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// Asserts the relative error is below `tol` (and not NaN).
pub fn assert_close(what: &str, gpu: &[f32], reference: &[f32], tol: f64) {
    let e = rel_err(gpu, reference);
    assert!(
        e < tol,
        "{what}: relative error {e:e} >= {tol:e}\n gpu[..8] = {:?}\n ref[..8] = {:?}",
        &gpu[..gpu.len().min(8)],
        &reference[..reference.len().min(8)]
    );
}

/// Rounds through f16, as stored f16 weights are.
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Proptest settings: few cases (every case runs GPU kernels on a software device) and no
/// regression files.
pub fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `n` values in [-1, 1) from a seed (cheap: proptest shrinks seeds, not long vectors).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Parses, validates with every capability an H100 offers and translates to SPIR-V (the
/// Vulkan path). Also checks the operands of every multiply-add, which naga's validator
/// leaves alone: a cooperative load takes its scalar type from the pointer, so a load
/// through a `u32` array would silently make an integer matrix; and that every workgroup
/// variable is a whole number of 16-byte units.
pub fn validate_coop(what: &str, src: &str) -> wgpu::naga::Module {
    use wgpu::naga;
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
        .unwrap_or_else(|e| panic!("{what}: SPIR-V: {e:?}"));
    let functions = module.functions.iter().map(|(h, f)| (f, &info[h])).chain(
        (module.entry_points.iter().enumerate())
            .map(|(i, ep)| (&ep.function, info.get_entry_point(i))),
    );
    let (f16, f32) = (naga::Scalar::F16, naga::Scalar::F32);
    for (fun, fi) in functions {
        for (_, e) in fun.expressions.iter() {
            let naga::Expression::CooperativeMultiplyAdd { a, b, c } = *e else {
                continue;
            };
            use naga::CooperativeRole as R;
            for (op, want_scalar, want_role) in [(a, f16, R::A), (b, f16, R::B), (c, f32, R::C)] {
                let ty = fi[op].ty.inner_with(&module.types);
                assert!(
                    matches!(*ty, naga::TypeInner::CooperativeMatrix { scalar, role, .. }
                        if scalar == want_scalar && role == want_role),
                    "{what}: multiply-add operand {want_role:?} is {ty:?}"
                );
            }
        }
    }
    // Workgroup variables of whole 16-byte units: with a 4-byte one among them, cooperative
    // loads from the others read 4 bytes early on the NVIDIA driver.
    for (_, g) in module.global_variables.iter() {
        if g.space == naga::AddressSpace::WorkGroup {
            let size = module.types[g.ty].inner.size(module.to_ctx());
            assert!(
                size.is_multiple_of(16),
                "{what}: workgroup variable {:?} is {size} bytes, not a multiple of 16",
                g.name
            );
        }
    }
    module
}

/// Bytes of workgroup memory a shader module declares.
pub fn workgroup_bytes(module: &wgpu::naga::Module) -> u32 {
    module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == wgpu::naga::AddressSpace::WorkGroup)
        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
        .sum()
}
