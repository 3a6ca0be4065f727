//! Linear layers: `y = x · wᵀ` with `w` in the `[out_features, in_features]` layout, f32 or f16.
//!
//! Kernels:
//! - a register-tiled matmul for prefill (`shaders/matmul_reg.wgsl`, [`MatmulTile::R64`]:
//!   64x64 tiles, 4x4 outputs per thread in vec4 registers, vec4 loads), portable;
//! - a cooperative-matrix (tensor core) matmul for f16 weights, with activations rounded to
//!   f16 and f32 accumulation, where the adapter offers 16x16x16 f16 -> f32 tiles
//!   ([`GpuContext::matmul_coopmat`]); several kernel designs ([`CoopVariant`], all from
//!   the template `shaders/matmul_coop.wgsl`) that the benchmark compares,
//!   [`CoopVariant::for_shape`] picking the one serving [`GpuContext::linear`];
//! - the older shared-memory tiled matmul (`shaders/matmul.wgsl`, [`MatmulTile::T4`] / `T8`);
//! - a matrix-vector product for decode (`shaders/matvec*.wgsl`, a few rows, bound by reading
//!   the weights once), whose wide form also runs the decoder's fused projections:
//!   [`GpuContext::linear_from`] (RMSNorm of the input inside the projection, [`ProjInput`]),
//!   [`GpuContext::linear_add`] (a residual add in place) and [`GpuContext::linear_swiglu`]
//!   (gate and up projections and SwiGLU in one dispatch); they fall back to separate
//!   dispatches where the product does not take that kernel ([`GpuContext::linear_fuses`]).
//!
//! [`GpuContext::linear`] picks: matvec up to [`MATVEC_MAX_ROWS`] rows (up to
//! [`MATVEC_PORTABLE_MAX_ROWS`] where the weights would not go to the tensor cores), else the
//! cooperative-matrix kernel when available (f16 weights, `k` a multiple of 8), else R64.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, expect_float, u32_of};
use crate::pipeline::{Bind, PipelineKey, elem_buffer, render, whole, with_f16_header};
use crate::tensor::{DType, GpuTensor};

const MATMUL_SRC: &str = include_str!("../shaders/matmul.wgsl");
const MATMUL_REG_SRC: &str = include_str!("../shaders/matmul_reg.wgsl");
const MATMUL_COOP_SRC: &str = include_str!("../shaders/matmul_coop.wgsl");
/// Output tile edge of the register-tiled matmul ([`MatmulTile::R64`]).
const REG_BM: usize = 64;
/// f32 -> f16 conversion of activations for the cooperative-matrix matmul: 8 values per
/// invocation (two 16-byte loads, one 16-byte store).
const TO_F16_SRC: &str = "struct Params { chunks: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> o: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < p.chunks) {
        let a = x[2u * i];
        let b = x[2u * i + 1u];
        o[i] = vec4<u32>(pack2x16float(a.xy), pack2x16float(a.zw),
                         pack2x16float(b.xy), pack2x16float(b.zw));
    }
}
";
const MATVEC_SRC: &str = include_str!("../shaders/matvec.wgsl");
const MATVEC_VEC_SRC: &str = include_str!("../shaders/matvec_vec.wgsl");
/// Wide-load matvec: a team of lanes per weight row (consecutive lanes read consecutive 16-byte
/// chunks), [`MATVEC_VEC_WG`] threads per workgroup, 4 loads in flight per lane; see
/// [`matvec_tpr`] for the team size.
const MATVEC_VEC_WG: u32 = 256;
const MATVEC_VEC_UNROLL: u32 = 4;

/// Lanes per weight row of the wide matvec for rows of `chunks` 16-byte chunks: about 8
/// chunks per lane (two rounds of [`MATVEC_VEC_UNROLL`] loads), 32 to 128 lanes. Swept on the
/// H200 (the 1B-class preset's projections and larger, k = 2048-14336; 16, 32, 64 and 128
/// lanes; 8 loads in flight were 1.1-2.5x slower): for f32 weights the rule's choice is the
/// fastest or within 2% of it (up to 31% faster than the 32 lanes used before); for f16
/// weights it is within 4% of the fastest of 32, 64 and 128 lanes except at k = 4096, where
/// its 64 lanes are 8% (one row) and 11% (eight rows) slower than 32.
fn matvec_tpr(chunks: usize) -> u32 {
    let per_eight = (chunks / 8).max(1);
    // The largest power of two not above chunks / 8, within 32..=128.
    (1u32 << per_eight.ilog2()).clamp(32, 128)
}

/// Activation rows up to which [`GpuContext::linear`] uses the matrix-vector kernel: the
/// matvec applies each weight to `MATVEC_MB` rows per pass, so up to that many rows it reads
/// the weights exactly once.
pub const MATVEC_MAX_ROWS: usize = MATVEC_MB as usize;
/// Activation rows up to which [`GpuContext::linear`] uses the matrix-vector kernel when the
/// weights would not go to the tensor-core matmul (f32 weights, or no cooperative matrices).
/// The matvec rereads each weight row once per 8 activation rows (from cache); on the H200
/// (f32, k = 2048-5632, 16-64 rows) it was 1.3-7.4x faster than the register-tiled matmul,
/// whose 64-row tiles leave most of the GPU idle at these row counts. Against the tensor-core
/// f16 matmul it was faster only at 16 rows of a 2048 x 2048 matrix and 1.2-4.5x slower from
/// 32 rows, so with tensor cores the limit stays [`MATVEC_MAX_ROWS`].
pub const MATVEC_PORTABLE_MAX_ROWS: usize = 64;
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
    /// load).
    T8,
    /// Register-tiled: 4x4 per thread held in vec4 registers, 64x64 per workgroup, K slices
    /// of 16 loaded as vec4s (when `k` is a multiple of 4), 8.5 KiB of workgroup memory. The
    /// fastest portable kernel; [`GpuContext::linear`] uses it for prefill.
    R64,
}

impl MatmulTile {
    fn tm(self) -> u32 {
        match self {
            MatmulTile::T4 => 4,
            MatmulTile::T8 => 8,
            MatmulTile::R64 => 4,
        }
    }
    fn shared_bytes(self) -> u32 {
        match self {
            MatmulTile::R64 => 2 * 16 * (REG_BM as u32 + 4) * 4,
            _ => {
                let bm = 16 * self.tm();
                2 * 16 * (bm + 1) * 4
            }
        }
    }
}

/// Kernel design of the cooperative-matrix (tensor core) matmul
/// ([`GpuContext::matmul_coopmat_with`]). All of them compute `y = x · wᵀ` with f16 `w`, `x`
/// rounded to f16 and f32 accumulation, one workgroup per output tile of
/// [`CoopVariant::tile`], staging K slices of both operands through workgroup memory
/// (`shaders/matmul_coop.wgsl`, generated per design: subgroup grid, accumulators per subgroup,
/// K slice, one or two slice buffers, workgroup order, f16 or f32 activations). Any `m`, `n`;
/// `k` a multiple of 8. [`CoopVariant::ALL`] lists them for benchmarks and tests.
///
/// Designs that loaded the fragments straight from storage buffers, or staged them in
/// `vec4<f16>` workgroup arrays, were slower than [`CoopVariant::Staged`] at every measured
/// shape and were removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoopVariant {
    /// 128x128 tiles, 8 subgroups of 64x32 (4 x 2 accumulators), K slices of 64 in one
    /// buffer, the next slice fetched into registers meanwhile, two barriers per slice;
    /// workgroups in grid order (a whole tile row after another).
    Staged,
    /// [`Self::Staged`] with workgroups taken in bands of 8 tile rows, column by column.
    StagedBanded,
    /// [`Self::StagedBanded`] with K slices of 32 in two alternating buffers: one barrier per
    /// slice.
    StagedDouble,
    /// 128x128 tiles, 4 subgroups of 64x64 (4 x 4 accumulators: 8 fragment loads per 16
    /// multiply-adds), K slices of 32 in two buffers, banded order: the removed `vec4<f16>`
    /// staging design, with the scalar f16 workgroup arrays of [`Self::Staged`].
    Quad,
    /// 256x128 tiles (rows x columns of `y`), 8 subgroups of 64x64, K slices of 32 in one
    /// buffer, banded order.
    Wide,
    /// [`Self::Wide`] with K slices of 16 in two buffers: one barrier per slice.
    WideDouble,
    /// 128x256 tiles, 8 subgroups of 64x64, K slices of 32 in one buffer, banded order.
    Tall,
    /// [`Self::Tall`] reading the f32 activations itself (rounding them to f16 as it stages
    /// them): no conversion pass and no f16 copy of `x`, at the price of twice the bytes of
    /// `x` read per tile (the 256 rows of `w` per tile keep the bytes per multiply-add at
    /// those of [`Self::Staged`]).
    FusedF32,
}

/// Parameters of one [`CoopVariant`]'s kernel.
#[derive(Debug, Clone, Copy)]
struct CoopDesign {
    /// Subgroup grid: rows and columns of subgroups in the workgroup.
    sgm: u32,
    sgn: u32,
    /// 16x16 accumulators per subgroup: rows and columns.
    fm: u32,
    fn_: u32,
    /// K slice staged per step.
    bk: u32,
    /// Slice buffers in workgroup memory (1 or 2).
    stages: u32,
    /// Tile rows per band of the workgroup order; 0 for grid order.
    group: u32,
    /// Reads `x` as f32 (rounding it while staging) instead of a converted f16 copy.
    x_f32: bool,
}

impl CoopDesign {
    fn invocations(self) -> u32 {
        32 * self.sgm * self.sgn
    }
    fn tile(self) -> (u32, u32) {
        (16 * self.fm * self.sgm, 16 * self.fn_ * self.sgn)
    }
}

impl CoopVariant {
    /// Every variant, the baseline first.
    pub const ALL: [CoopVariant; 8] = [
        CoopVariant::Staged,
        CoopVariant::StagedBanded,
        CoopVariant::StagedDouble,
        CoopVariant::Quad,
        CoopVariant::Wide,
        CoopVariant::WideDouble,
        CoopVariant::Tall,
        CoopVariant::FusedF32,
    ];

    /// The baseline variant: the smallest footprint, and the fastest where the output has
    /// few tiles. [`CoopVariant::for_shape`] picks between it and [`CoopVariant::Wide`].
    pub const DEFAULT: CoopVariant = CoopVariant::Staged;

    /// Output tiles of [`CoopVariant::Wide`] from which it beats the baseline: with fewer,
    /// its 256-row tiles leave part of a large GPU idle.
    pub const WIDE_MIN_TILES: usize = 256;

    /// The variant behind [`GpuContext::matmul_coopmat`] and [`GpuContext::linear`] for an
    /// `m x n` output: [`CoopVariant::Wide`] (256x128 tiles) when it has at least
    /// [`CoopVariant::WIDE_MIN_TILES`] tiles and fits the device, else
    /// [`CoopVariant::DEFAULT`]. Measured on an H200 (Vulkan, `examples/gpu_bench.rs`, which
    /// times every variant on the same inputs): wide 207 / 215 / 196 TFLOP/s against 194 /
    /// 209 / 188 for the baseline at 4096^3, 8192x4096x4096 and 4000x3000x4096, and 64 us
    /// against 42 us at 1000x1002x1000 (32 wide tiles).
    pub fn for_shape(m: usize, n: usize, f: &crate::context::GpuFeatures) -> CoopVariant {
        let wide_tiles = m.div_ceil(256) * n.div_ceil(128);
        if wide_tiles >= Self::WIDE_MIN_TILES && CoopVariant::Wide.fits(f) {
            CoopVariant::Wide
        } else {
            CoopVariant::DEFAULT
        }
    }

    /// Short name (benchmark rows).
    pub fn name(self) -> &'static str {
        match self {
            CoopVariant::Staged => "staged",
            CoopVariant::StagedBanded => "staged_banded",
            CoopVariant::StagedDouble => "staged_double",
            CoopVariant::Quad => "quad",
            CoopVariant::Wide => "wide",
            CoopVariant::WideDouble => "wide_double",
            CoopVariant::Tall => "tall",
            CoopVariant::FusedF32 => "fused_f32",
        }
    }

    fn design(self) -> CoopDesign {
        let d = |sgm, sgn, fm, fn_, bk, stages, group, x_f32| CoopDesign {
            sgm,
            sgn,
            fm,
            fn_,
            bk,
            stages,
            group,
            x_f32,
        };
        match self {
            CoopVariant::Staged => d(2, 4, 4, 2, 64, 1, 0, false),
            CoopVariant::StagedBanded => d(2, 4, 4, 2, 64, 1, COOP_GROUP, false),
            CoopVariant::StagedDouble => d(2, 4, 4, 2, 32, 2, COOP_GROUP, false),
            CoopVariant::Quad => d(2, 2, 4, 4, 32, 2, COOP_GROUP, false),
            CoopVariant::Wide => d(4, 2, 4, 4, 32, 1, COOP_GROUP, false),
            CoopVariant::WideDouble => d(4, 2, 4, 4, 16, 2, COOP_GROUP, false),
            CoopVariant::Tall => d(2, 4, 4, 4, 32, 1, COOP_GROUP, false),
            CoopVariant::FusedF32 => d(2, 4, 4, 4, 32, 1, COOP_GROUP, true),
        }
    }

    /// Output tile of one workgroup: (rows, columns) of `y`.
    pub fn tile(self) -> (usize, usize) {
        let (bm, bn) = self.design().tile();
        (bm as usize, bn as usize)
    }

    /// Whether the kernel reads f32 activations itself. The others read an f16 copy: the one
    /// given, or one [`GpuContext::matmul_coopmat_with`] converts into a staging buffer.
    pub fn reads_f32(self) -> bool {
        self.design().x_f32
    }

    /// Invocations per workgroup.
    fn invocations(self) -> u32 {
        self.design().invocations()
    }

    /// Workgroup memory the kernel declares, in bytes: the slice buffers of x and w (rows of
    /// `bk + 8` halves) and a 16x16 f32 square per subgroup.
    fn shared_bytes(self) -> u32 {
        let d = self.design();
        let (bm, bn) = d.tile();
        d.stages * (bm + bn) * (d.bk + 8) * 2 + d.sgm * d.sgn * 256 * 4
    }

    /// Whether the device offers the workgroup size and memory this variant declares.
    fn fits(self, f: &crate::context::GpuFeatures) -> bool {
        f.max_invocations >= self.invocations() && f.max_workgroup_storage >= self.shared_bytes()
    }

    /// Pipeline key of the variant's kernel.
    fn key(self) -> PipelineKey {
        let d = self.design();
        PipelineKey {
            kernel: "matmul_coop",
            elems: vec![if d.x_f32 {
                crate::ElemStorage::F32
            } else {
                crate::ElemStorage::F16Packed
            }],
            params: vec![
                ("sgm", d.sgm),
                ("sgn", d.sgn),
                ("fm", d.fm),
                ("fn", d.fn_),
                ("bk", d.bk),
                ("st", d.stages),
                ("g", d.group),
            ],
        }
    }

    /// WGSL of the variant's kernel.
    fn source(self, name: &str) -> Result<String> {
        coop_source(name, self.design())
    }
}

/// Tile rows per band of the banded workgroup order.
const COOP_GROUP: u32 = 8;

/// The staged cooperative-matrix kernel for one design: fills the template's constants and
/// writes out its unrolled accumulator code.
fn coop_source(name: &str, d: CoopDesign) -> Result<String> {
    use std::fmt::Write as _;
    let (fm, fn_) = (d.fm, d.fn_);
    let mut acc = String::new();
    let mut step = String::from("            for (var kk = 0u; kk < BK; kk += 16u) {\n");
    let mut store = String::new();
    for i in 0..fm {
        let _ = writeln!(
            step,
            "                let a{i} = coopLoadT<FragA>(&xs[xo + (sm + {}u) * LDS + kk], LDS);",
            16 * i
        );
    }
    for j in 0..fn_ {
        let _ = writeln!(
            step,
            "                let b{j} = coopLoad<FragB>(&ws[wo + (sn + {}u) * LDS + kk], LDS);",
            16 * j
        );
    }
    for i in 0..fm {
        for j in 0..fn_ {
            let _ = writeln!(acc, "    var c{i}{j} = Acc();");
            let _ = writeln!(
                step,
                "                c{i}{j} = coopMultiplyAdd(a{i}, b{j}, c{i}{j});"
            );
            let _ = writeln!(
                store,
                "    store_tile(c{i}{j}, r + {}u, c + {}u, full, sg, lane);",
                16 * i,
                16 * j
            );
        }
    }
    step.push_str("            }");
    let x_decl = if d.x_f32 {
        "@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;\n\
         struct XChunk { lo: vec4<f32>, hi: vec4<f32> }\n\
         fn x_chunk(c: u32) -> XChunk { return XChunk(x[2u * c], x[2u * c + 1u]); }\n\
         fn x_zero() -> XChunk { return XChunk(vec4<f32>(0.0), vec4<f32>(0.0)); }\n\
         fn put_x(at: u32, v: XChunk) {\n\
         \x20   let lo = vec4<f16>(v.lo);\n\
         \x20   let hi = vec4<f16>(v.hi);\n\
         \x20   xs[at] = lo.x;\n\
         \x20   xs[at + 1u] = lo.y;\n\
         \x20   xs[at + 2u] = lo.z;\n\
         \x20   xs[at + 3u] = lo.w;\n\
         \x20   xs[at + 4u] = hi.x;\n\
         \x20   xs[at + 5u] = hi.y;\n\
         \x20   xs[at + 6u] = hi.z;\n\
         \x20   xs[at + 7u] = hi.w;\n\
         }"
    } else {
        "@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;\n\
         alias XChunk = vec4<u32>;\n\
         fn x_chunk(c: u32) -> XChunk { return x[c]; }\n\
         fn x_zero() -> XChunk { return vec4<u32>(0u); }\n\
         fn put_x(at: u32, v: XChunk) { put_x_packed(at, v); }"
    };
    render(
        name,
        MATMUL_COOP_SRC,
        &[
            ("SGM", d.sgm.to_string()),
            ("SGN", d.sgn.to_string()),
            ("FM", fm.to_string()),
            ("FN", fn_.to_string()),
            ("BK", d.bk.to_string()),
            ("STAGES", d.stages.to_string()),
            ("GROUP", d.group.to_string()),
            ("THREADS", d.invocations().to_string()),
            ("X_DECL", x_decl.to_owned()),
            ("ACC_DECL", acc),
            ("STEP", step),
            ("STORE", store),
        ],
    )
}

struct LinearShape {
    m: usize,
    n: usize,
    k: usize,
}

fn linear_shape(x: &GpuTensor, w: &GpuTensor, y: &GpuTensor) -> Result<LinearShape> {
    linear_shape_x(x, w, y, DType::F32)
}

/// [`linear_shape`] with activations of `x_dtype`.
fn linear_shape_x(
    x: &GpuTensor,
    w: &GpuTensor,
    y: &GpuTensor,
    x_dtype: DType,
) -> Result<LinearShape> {
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
    expect(x, "linear x", x_dtype, m * k)?;
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
    /// `y = x · wᵀ`, choosing the matvec kernel for at most [`MATVEC_MAX_ROWS`] rows (at most
    /// [`MATVEC_PORTABLE_MAX_ROWS`] where the weights would not go to the tensor cores), the
    /// cooperative-matrix matmul for f16 weights where available (activations rounded to
    /// f16), and the register-tiled matmul otherwise. `x` is `[.., k]` f32, `w` is `[n, k]`
    /// f32/f16, `y` is `[.., n]`.
    pub fn linear(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        if self.takes_matvec(s.m, w) {
            self.matvec(encoder, x, w, y)
        } else if self.coopmat_fits(w, s.k) {
            self.matmul_coopmat(encoder, x, w, y)
        } else {
            let tile = if self.tile_fits(MatmulTile::R64) {
                MatmulTile::R64
            } else {
                MatmulTile::T4
            };
            self.matmul(encoder, x, w, y, tile)
        }
    }

    /// Whether the device can run [`GpuContext::matmul_coopmat`]: a 16x16x16 f16 -> f32
    /// cooperative-matrix shape, native f16, subgroups of exactly 32 invocations and enough
    /// invocations and workgroup memory for [`CoopVariant::DEFAULT`] (other variants may need
    /// more; [`GpuContext::matmul_coopmat_with`] says so). `CLA_GPU_DISABLE=coopmat` switches
    /// it off.
    pub fn coopmat_f16_available(&self) -> bool {
        let f = self.features();
        f.shader_f16
            && f.subgroup_size == (32, 32)
            && CoopVariant::DEFAULT.fits(f)
            && f.cooperative_matrix
                .iter()
                .any(|c| (c.m, c.n, c.k) == (16, 16, 16) && c.ab == "F16" && c.cr == "F32")
    }

    fn coopmat_fits(&self, w: &GpuTensor, k: usize) -> bool {
        w.dtype == DType::F16 && k.is_multiple_of(8) && self.coopmat_f16_available()
    }

    /// Whether [`GpuContext::linear`] runs a product of `m` rows through `w` (`[n, k]`) as a
    /// matrix-vector product.
    fn takes_matvec(&self, m: usize, w: &GpuTensor) -> bool {
        let k = w.shape.get(1).copied().unwrap_or(0);
        m <= MATVEC_MAX_ROWS || (m <= MATVEC_PORTABLE_MAX_ROWS && !self.coopmat_fits(w, k))
    }

    /// `y = x · wᵀ` on the tensor cores with [`CoopVariant::for_shape`]: `x` is rounded to f16
    /// (into a staging buffer kept by the context), `w` must be f16, products are
    /// accumulated in f32. Needs `k` a multiple of 8 and
    /// [`GpuContext::coopmat_f16_available`]; any `m`, `n`.
    pub fn matmul_coopmat(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        let variant = CoopVariant::for_shape(s.m, s.n, self.features());
        self.matmul_coopmat_with(encoder, x, w, y, variant)
    }

    /// [`GpuContext::matmul_coopmat`] with a chosen kernel design, `x` f32 or already f16.
    /// An f32 `x` is converted to f16 first ([`GpuContext::to_f16`], into the context's
    /// staging buffer) unless the variant [reads f32](CoopVariant::reads_f32) itself; an f16
    /// `x` goes straight to the tile kernel (not accepted by the variants that read f32).
    /// `NotAvailable` when the device lacks the variant's workgroup size or memory.
    pub fn matmul_coopmat_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        variant: CoopVariant,
    ) -> Result<()> {
        let x_f16 = x.dtype == DType::F16;
        let s = linear_shape_x(x, w, y, if x_f16 { DType::F16 } else { DType::F32 })?;
        ensure_arg!(
            w.dtype == DType::F16,
            "matmul_coopmat: weights must be f16, got {:?}",
            w.dtype
        );
        ensure_arg!(
            s.k.is_multiple_of(8),
            "matmul_coopmat: in_features {} is not a multiple of 8",
            s.k
        );
        ensure_arg!(
            !(x_f16 && variant.reads_f32()),
            "matmul_coopmat: variant {} reads f32 activations, got f16",
            variant.name()
        );
        if !self.coopmat_f16_available() {
            return Err(crate::GpuError::NotAvailable(
                "matmul_coopmat: no 16x16x16 f16 -> f32 cooperative matrix with subgroups of 32 \
                 (or switched off with CLA_GPU_DISABLE=coopmat)"
                    .into(),
            ));
        }
        if !variant.fits(self.features()) {
            return Err(crate::GpuError::NotAvailable(format!(
                "matmul_coopmat {}: needs {} invocations and {} bytes of workgroup memory, the \
                 adapter has {} and {}",
                variant.name(),
                variant.invocations(),
                variant.shared_bytes(),
                self.features().max_invocations,
                self.features().max_workgroup_storage
            )));
        }
        self.check_binding("linear weight", w.byte_len() as u64)?;
        self.check_binding("matmul_coopmat activations", x.byte_len() as u64)?;
        let (bm, bn) = variant.tile();
        let (gx, gy) = self.output_tile_grid("matmul_coopmat", &s, bm, bn)?;
        let kernel = self.kernel(
            variant.key(),
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| variant.source(name),
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        if x_f16 || variant.reads_f32() {
            self.dispatch(
                encoder,
                &kernel,
                &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
                (gx, gy, 1),
            );
            return Ok(());
        }
        // Activations to f16 in the staging buffer, then the tiles.
        let half_bytes = (s.m * s.k * 2) as u64;
        self.check_binding("matmul_coopmat f16 activations", half_bytes)?;
        let staging = self.coop_staging(half_bytes)?;
        let staged = || {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &staging,
                offset: 0,
                size: wgpu::BufferSize::new(half_bytes),
            })
        };
        self.to_f16_into(encoder, x, staged(), s.m * s.k)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), staged(), whole(w), whole(y)],
            (gx, gy, 1),
        );
        Ok(())
    }

    /// Rounds f32 `x` to f16 `out` (same element count, a multiple of 8), as
    /// [`GpuContext::matmul_coopmat`] does with its activations; with `out` as its `x`,
    /// [`GpuContext::matmul_coopmat_with`] then runs the tile kernel alone.
    pub fn to_f16(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        let numel = x.numel();
        expect(x, "to_f16 x", DType::F32, numel)?;
        expect(out, "to_f16 out", DType::F16, numel)?;
        ensure_arg!(
            numel.is_multiple_of(8),
            "to_f16: {numel} elements is not a multiple of 8"
        );
        self.check_binding("to_f16 x", x.byte_len() as u64)?;
        self.to_f16_into(encoder, x, whole(out), numel)
    }

    /// Records the f32 -> f16 conversion of the `numel` (a multiple of 8) values of `x` into
    /// `out`.
    fn to_f16_into(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        out: wgpu::BindingResource<'_>,
        numel: usize,
    ) -> Result<()> {
        let chunks = numel / 8;
        let conv = self.kernel(
            PipelineKey {
                kernel: "to_f16",
                elems: vec![],
                params: vec![("per", 8)],
            },
            &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
            |_| Ok(TO_F16_SRC.to_owned()),
        )?;
        let params = self.uniform(&[u32_of("to_f16 chunks", chunks)?]);
        let (cx, cy) = self.grid((chunks as u64).div_ceil(256))?;
        self.dispatch(
            encoder,
            &conv,
            &[params.as_entire_binding(), whole(x), out],
            (cx, cy, 1),
        );
        Ok(())
    }

    /// The f16 activation staging buffer, grown to at least `bytes`. Reusing one buffer
    /// across calls recorded in one encoder is safe: every dispatch is its own pass.
    fn coop_staging(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let mut slot = self
            .coop_staging
            .lock()
            .map_err(|_| crate::GpuError::Device("staging buffer lock poisoned".into()))?;
        if let Some(b) = slot.as_ref()
            && b.size() >= bytes
        {
            return Ok(b.clone());
        }
        let b = self.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("cla coopmat f16 activations"),
            size: bytes.div_ceil(16) * 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        *slot = Some(b.clone());
        Ok(b)
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
        if tile == MatmulTile::R64 {
            return self.matmul_reg(encoder, x, w, y, &s, st);
        }
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
        let block = 16 * tm as usize;
        let (gx, gy) = self.output_tile_grid("matmul", &s, block, block)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
            (gx, gy, 1),
        );
        Ok(())
    }

    /// Workgroups over the `m x n` output for output tiles of `bm` rows and `bn` columns
    /// (x along `n`, y along `m`), checked against the adapter's per-dimension limit.
    fn output_tile_grid(
        &self,
        kernel: &str,
        s: &LinearShape,
        bm: usize,
        bn: usize,
    ) -> Result<(u32, u32)> {
        let gx = u32_of(&format!("{kernel} grid x"), s.n.div_ceil(bn))?;
        let gy = u32_of(&format!("{kernel} grid y"), s.m.div_ceil(bm))?;
        let max = self.features().max_workgroups_per_dim;
        if gx > max || gy > max {
            return Err(crate::GpuError::NotAvailable(format!(
                "{kernel} grid {gx}x{gy} exceeds {max} workgroups per dimension"
            )));
        }
        Ok((gx, gy))
    }

    fn matmul_reg(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        s: &LinearShape,
        st: crate::ElemStorage,
    ) -> Result<()> {
        let vec4 = s.k.is_multiple_of(4);
        let key = PipelineKey {
            kernel: "matmul_reg",
            elems: vec![st],
            params: vec![("vec", u32::from(vec4))],
        };
        let kernel = self.kernel(
            key,
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| {
                let body = render(name, MATMUL_REG_SRC, &[("DECLS", reg_decls(st, vec4))])?;
                Ok(with_f16_header(&[st], body))
            },
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        let (gx, gy) = self.output_tile_grid("matmul", s, REG_BM, REG_BM)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(x), whole(w), whole(y)],
            (gx, gy, 1),
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn matvec_wide(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        norm: Option<(&GpuTensor, f32)>,
        w: &GpuTensor,
        y: &GpuTensor,
        s: &LinearShape,
        epilogue: Epilogue<'_>,
    ) -> Result<()> {
        let f16 = w.dtype == DType::F16;
        let ch = wide_chunk(w.dtype);
        let tpr = matvec_tpr(s.k / ch as usize);
        let rpw = MATVEC_VEC_WG / tpr;
        let (acc, dual) = match epilogue {
            Epilogue::Store => (false, None),
            Epilogue::Add => (true, None),
            Epilogue::SwiGlu(up) => (false, Some(up)),
        };
        for w in std::iter::once(w).chain(dual) {
            self.check_binding("linear weight", w.byte_len() as u64)?;
        }
        let key = PipelineKey {
            kernel: "matvec_wide",
            elems: vec![if f16 {
                crate::ElemStorage::F16Packed
            } else {
                crate::ElemStorage::F32
            }],
            params: vec![
                ("tpr", tpr),
                ("rpw", rpw),
                ("mb", MATVEC_MB),
                ("u", MATVEC_VEC_UNROLL),
                ("acc", u32::from(acc)),
                ("dual", u32::from(dual.is_some())),
                ("norm", u32::from(norm.is_some())),
            ],
        };
        // Bindings 4 (w2) and 5 (the norm's scale) only where used.
        let mut binds = vec![Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite];
        if dual.is_some() || norm.is_some() {
            binds.push(Bind::Read);
        }
        if norm.is_some() {
            binds.push(Bind::Read);
        }
        let kernel = self.kernel(key, &binds, |name| {
            // f16 weights are read as packed words whatever SHADER_F16 says: same bytes.
            let (ty, unpack) = if f16 {
                (
                    "vec4<u32>",
                    "fn w_unpack(r: WRaw) -> array<vec4<f32>, 2> {\n\
                         return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(r.x), unpack2x16float(r.y)),\n\
                                                   vec4<f32>(unpack2x16float(r.z), unpack2x16float(r.w)));\n\
                     }",
                )
            } else {
                (
                    "vec4<f32>",
                    "fn w_unpack(r: WRaw) -> array<vec4<f32>, 2> { return array<vec4<f32>, 2>(r, vec4<f32>(0.0)); }",
                )
            };
            // Without DUAL, a NORM kernel still has a binding 4 (`w` again) so that the
            // scale is always binding 5.
            let w2 = if dual.is_some() || norm.is_some() {
                format!(
                    "@group(0) @binding(4) var<storage, read> w2: array<{ty}>;\n\
                     fn w2_load(i: u32) -> WRaw {{ return w2[i]; }}"
                )
            } else {
                "fn w2_load(i: u32) -> WRaw { return WRaw(); }".to_owned()
            };
            let g = if norm.is_some() {
                "@group(0) @binding(5) var<storage, read> g: array<vec4<f32>>;\n\
                 fn g_load(i: u32) -> vec4<f32> { return g[i]; }"
            } else {
                "fn g_load(i: u32) -> vec4<f32> { return vec4<f32>(1.0); }"
            };
            let decl = format!(
                "@group(0) @binding(2) var<storage, read> w: array<{ty}>;\n\
                 alias WRaw = {ty};\n\
                 fn w_load(i: u32) -> WRaw {{ return w[i]; }}\n\
                 {unpack}\n{w2}\n{g}"
            );
            render(
                name,
                MATVEC_VEC_SRC,
                &[
                    ("W_DECL", decl),
                    ("CH", ch.to_string()),
                    ("TPR", tpr.to_string()),
                    ("RPW", rpw.to_string()),
                    ("MB", MATVEC_MB.to_string()),
                    ("UNROLL", MATVEC_VEC_UNROLL.to_string()),
                    ("ACC", acc.to_string()),
                    ("DUAL", dual.is_some().to_string()),
                    ("NORM", norm.is_some().to_string()),
                ],
            )
        })?;
        let eps = norm.map_or(0.0, |(_, eps)| eps);
        let params = self.uniform(&[
            u32_of("m", s.m)?,
            u32_of("n", s.n)?,
            u32_of("k", s.k)?,
            eps.to_bits(),
        ]);
        let (gx, gy) = self.grid((s.n as u64).div_ceil(u64::from(rpw)))?;
        let mut entries = vec![params.as_entire_binding(), whole(x), whole(w), whole(y)];
        if dual.is_some() || norm.is_some() {
            entries.push(whole(dual.unwrap_or(w)));
        }
        entries.extend(norm.map(|(g, _)| whole(g)));
        self.dispatch(encoder, &kernel, &entries, (gx, gy, 1));
        Ok(())
    }

    /// Whether [`GpuContext::linear_from`], [`GpuContext::linear_add`] and
    /// [`GpuContext::linear_swiglu`] fuse their extra work into a projection of `rows`
    /// activation rows through `w` (`[n, k]`): at most [`MATVEC_MAX_ROWS`] rows (one pass of
    /// the wide matrix-vector kernel) and `k` a multiple of 8 (f16 weights) or 4 (f32). (At
    /// 32 rows of the 1B-class preset, f32, the fused kernels made a decode step 1.5x slower
    /// on the H200 than separate dispatches through the same matrix-vector kernel.)
    pub fn linear_fuses(&self, rows: usize, w: &GpuTensor) -> bool {
        rows <= MATVEC_MAX_ROWS
            && w.shape.len() == 2
            && w.shape[1].is_multiple_of(wide_chunk(w.dtype) as usize)
    }

    /// The activations and, when the norm runs inside the kernel (`fuses` says whether the
    /// projection fuses, given the rows), its scale and eps; a norm that does not is
    /// recorded here (into the input's `tmp`).
    fn resolve<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: ProjInput<'a>,
        fuses: impl Fn(usize) -> bool,
    ) -> Result<(&'a GpuTensor, Option<(&'a GpuTensor, f32)>)> {
        match input {
            ProjInput::Plain(x) => Ok((x, None)),
            ProjInput::Normed {
                x,
                weight,
                eps,
                tmp,
            } => {
                let k = x.shape.last().copied().unwrap_or(0);
                let rows = x.numel().checked_div(k).unwrap_or(0);
                if fuses(rows) && weight.dtype == DType::F32 {
                    ensure_arg!(
                        eps.is_finite() && eps >= 0.0,
                        "rms_norm: eps must be finite and >= 0, got {eps}"
                    );
                    expect(weight, "rms_norm weight", DType::F32, k)?;
                    Ok((x, Some((weight, eps))))
                } else {
                    self.rms_norm(encoder, x, weight, tmp, eps)?;
                    Ok((tmp, None))
                }
            }
        }
    }

    /// `y = input · wᵀ`, shapes as in [`GpuContext::linear`], where the input may be
    /// RMSNorm of `x` ([`ProjInput::Normed`]): computed inside the projection where it fuses
    /// (see [`GpuContext::linear_fuses`]), else by [`GpuContext::rms_norm`] first.
    pub fn linear_from(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: ProjInput<'_>,
        w: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        let (x, norm) = self.resolve(encoder, input, |rows| self.linear_fuses(rows, w))?;
        let s = linear_shape(x, w, y)?;
        if norm.is_some() {
            return self.matvec_wide(encoder, x, norm, w, y, &s, Epilogue::Store);
        }
        self.linear(encoder, x, w, y)
    }

    /// `y += x · wᵀ`: a projection followed by a residual add, shapes as in
    /// [`GpuContext::linear`]. Where the product fuses ([`GpuContext::linear_fuses`]) it is
    /// one matrix-vector dispatch that adds in place; otherwise [`GpuContext::linear`] into
    /// `tmp` (the shape of `y`) and [`GpuContext::add_assign`]. Same values either way.
    pub fn linear_add(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        tmp: &GpuTensor,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
        if self.linear_fuses(s.m, w) {
            return self.matvec_wide(encoder, x, None, w, y, &s, Epilogue::Add);
        }
        self.linear(encoder, x, w, tmp)?;
        self.add_assign(encoder, y, tmp)
    }

    /// `out = silu(input · w_gateᵀ) * (input · w_upᵀ)`: SwiGLU with its two projections,
    /// shapes as in [`GpuContext::linear`] (both weights `[inter, k]`), the input as in
    /// [`GpuContext::linear_from`]. Where the projection fuses ([`GpuContext::linear_fuses`])
    /// and the two weights have one dtype, this is one matrix-vector dispatch that reads both
    /// (and computes the norm); otherwise two [`GpuContext::linear`]s into `gate` and `up`
    /// (the shape of `out`) and [`GpuContext::swiglu`].
    #[allow(clippy::too_many_arguments)]
    pub fn linear_swiglu(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: ProjInput<'_>,
        w_gate: &GpuTensor,
        w_up: &GpuTensor,
        out: &GpuTensor,
        gate: &GpuTensor,
        up: &GpuTensor,
    ) -> Result<()> {
        let fuses = |rows| self.linear_fuses(rows, w_gate) && w_up.dtype == w_gate.dtype;
        let (x, norm) = self.resolve(encoder, input, fuses)?;
        let s = linear_shape(x, w_gate, out)?;
        linear_shape(x, w_up, out)?;
        if fuses(s.m) {
            let epilogue = Epilogue::SwiGlu(w_up);
            return self.matvec_wide(encoder, x, norm, w_gate, out, &s, epilogue);
        }
        self.linear(encoder, x, w_gate, gate)?;
        self.linear(encoder, x, w_up, up)?;
        self.swiglu(encoder, gate, up, out)
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
        // Wide loads when every weight row starts on a 16-byte boundary.
        if s.k.is_multiple_of(wide_chunk(w.dtype) as usize) {
            return self.matvec_wide(encoder, x, None, w, y, &s, Epilogue::Store);
        }
        self.check_binding("linear weight", w.byte_len() as u64)?;
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

/// Weights per 16-byte chunk of the wide matrix-vector kernel.
fn wide_chunk(dtype: DType) -> u32 {
    if dtype == DType::F16 { 8 } else { 4 }
}

/// The activations a projection reads ([`GpuContext::linear_from`],
/// [`GpuContext::linear_swiglu`]).
#[derive(Debug, Clone, Copy)]
pub enum ProjInput<'a> {
    /// `x` (`[m, k]`, f32) as is.
    Plain(&'a GpuTensor),
    /// RMSNorm of `x` with scale `weight` (`[k]`) and `eps`, as [`GpuContext::rms_norm`]
    /// computes it. Where the projection fuses ([`GpuContext::linear_fuses`]) and the scale
    /// is f32, the norm runs inside the projection; otherwise it is written to `tmp` (the
    /// shape of `x`) first.
    Normed {
        x: &'a GpuTensor,
        weight: &'a GpuTensor,
        eps: f32,
        tmp: &'a GpuTensor,
    },
}

/// What the wide matrix-vector kernel does with each result (`shaders/matvec_vec.wgsl`):
/// store it, add it to `y`, or, given the up projection's weights, store silu(it) * up.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    Store,
    Add,
    SwiGlu(&'a GpuTensor),
}

/// Bindings 1 (x) and 2 (w) of the register-tiled matmul with their vec4 loaders. With
/// `vec4`, `k` is a multiple of 4, so a group of 4 is either wholly inside a row or outside.
fn reg_decls(w: crate::ElemStorage, vec4: bool) -> String {
    use crate::ElemStorage as E;
    if !vec4 {
        let mut s = String::from(
            "@group(0) @binding(1) var<storage, read> x: array<f32>;\n\
             fn load_x(r: u32, k: u32) -> vec4<f32> {\n\
                 var v = vec4<f32>(0.0);\n\
                 if (r < p.m) {\n\
                     let b = r * p.k;\n\
                     for (var i = 0u; i < 4u; i++) { if (k + i < p.k) { v[i] = x[b + k + i]; } }\n\
                 }\n\
                 return v;\n\
             }\n\
             fn load_w(r: u32, k: u32) -> vec4<f32> {\n\
                 var v = vec4<f32>(0.0);\n\
                 if (r < p.n) {\n\
                     let b = r * p.k;\n\
                     for (var i = 0u; i < 4u; i++) { if (k + i < p.k) { v[i] = w_ld(b + k + i); } }\n\
                 }\n\
                 return v;\n\
             }\n",
        );
        s += &elem_buffer("w", 2, w, false);
        return s;
    }
    let (w_ty, w_get) = match w {
        E::F32 => ("vec4<f32>", "w[i]"),
        E::F16 => ("vec4<f16>", "vec4<f32>(w[i])"),
        E::F16Packed => (
            "vec2<u32>",
            "vec4<f32>(unpack2x16float(w[i].x), unpack2x16float(w[i].y))",
        ),
    };
    format!(
        "@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;\n\
         @group(0) @binding(2) var<storage, read> w: array<{w_ty}>;\n\
         fn load_x(r: u32, k: u32) -> vec4<f32> {{\n\
             if (r < p.m && k < p.k) {{ return x[(r * p.k + k) / 4u]; }}\n\
             return vec4<f32>(0.0);\n\
         }}\n\
         fn load_w(r: u32, k: u32) -> vec4<f32> {{\n\
             if (r < p.n && k < p.k) {{ let i = (r * p.k + k) / 4u; return {w_get}; }}\n\
             return vec4<f32>(0.0);\n\
         }}\n"
    )
}

#[cfg(test)]
// Reference implementations index like the math they follow.
#[allow(clippy::needless_range_loop)]
mod tests {
    use proptest::prelude::*;

    use super::{CoopVariant, MatmulTile};
    use crate::testing::{POISON, assert_close, both_ctx, cases, round_f16, validate_coop, values};

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
                // All kernels on the same shapes: matvec (any m), every matmul tile.
                for which in 0..4 {
                    let y = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                    c.fill_u32_pattern(&y, POISON);
                    let mut enc = c.encoder();
                    match which {
                        0 => c.matvec(&mut enc, &tx, &tw, &y).unwrap(),
                        1 => c.matmul(&mut enc, &tx, &tw, &y, MatmulTile::T4).unwrap(),
                        2 => c.matmul(&mut enc, &tx, &tw, &y, MatmulTile::T8).unwrap(),
                        _ => c.matmul(&mut enc, &tx, &tw, &y, MatmulTile::R64).unwrap(),
                    }
                    c.submit_and_wait(enc).unwrap();
                    assert_close(&format!("linear kernel {which} f16={f16}"), &c.read_f32(&y).unwrap(), &reference, 1e-5);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(cases(16))]
        /// The fused projections (RMSNorm of the input; a residual add; SwiGLU over two
        /// projections) against the CPU arithmetic, on both sides of the matrix-vector row
        /// limit (fused below it, separate dispatches above), for `k` that does and does not
        /// allow the wide kernel, and with an f16 norm scale (never fused); the outputs start
        /// poisoned, the residual from values.
        #[test]
        fn fused_projections_match_cpu(m in prop_oneof![1usize..12, 60usize..70], n in 1usize..90,
                                       k in prop_oneof![1usize..60, (1usize..24).prop_map(|k| 8 * k)],
                                       f16 in any::<bool>(), f16_scale in any::<bool>(), seed: u64) {
            for c in both_ctx() {
                let x: Vec<f32> = values(seed, m * k).iter().map(|v| v * 3.0).collect();
                let (mut wg, mut wu) = (values(seed ^ 7, n * k), values(seed ^ 9, n * k));
                let mut scale: Vec<f32> = values(seed ^ 13, k).iter().map(|v| 1.0 + v).collect();
                if f16 {
                    wg = round_f16(&wg);
                    wu = round_f16(&wu);
                }
                if f16_scale {
                    scale = round_f16(&scale);
                }
                let eps = 1e-5f32;
                let up = |w: &[f32], shape: &[usize], half: bool| if half { c.upload_f32_as_f16(w, shape).unwrap() } else { c.upload_f32(w, shape).unwrap() };
                let (twg, twu) = (up(&wg, &[n, k], f16), up(&wu, &[n, k], f16));
                let tscale = up(&scale, &[k], f16_scale);
                let tx = c.upload_f32(&x, &[m, k]).unwrap();
                let y0 = values(seed ^ 11, m * n);
                let ty = c.upload_f32(&y0, &[m, n]).unwrap();
                let out = |name| {
                    let t = c.create_tensor(&[m, n], crate::DType::F32, name).unwrap();
                    c.fill_u32_pattern(&t, POISON);
                    t
                };
                let (act, act_n, proj_n) = (out("act"), out("act normed"), out("proj normed"));
                let [t1, t2, t3] = [(); 3].map(|()| c.create_tensor(&[m, n], crate::DType::F32, "tmp").unwrap());
                let xt = c.create_tensor(&[m, k], crate::DType::F32, "normed x").unwrap();
                let normed = super::ProjInput::Normed { x: &tx, weight: &tscale, eps, tmp: &xt };
                let mut enc = c.encoder();
                c.linear_add(&mut enc, &tx, &twg, &ty, &t1).unwrap();
                c.linear_swiglu(&mut enc, super::ProjInput::Plain(&tx), &twg, &twu, &act, &t2, &t3).unwrap();
                c.linear_swiglu(&mut enc, normed, &twg, &twu, &act_n, &t2, &t3).unwrap();
                c.linear_from(&mut enc, normed, &twg, &proj_n).unwrap();
                c.submit_and_wait(enc).unwrap();

                // RMSNorm as the CPU decoder computes it, in f64.
                let xn: Vec<f32> = x.chunks(k).flat_map(|r| {
                    let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / k as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    r.iter().zip(&scale).map(move |(&v, &g)| (f64::from(v) * inv * f64::from(g)) as f32)
                }).collect();
                let swiglu = |g: &[f32], u: &[f32]| -> Vec<f32> { g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect() };
                let (g, u) = (reference(&x, &wg, m, n, k), reference(&x, &wu, m, n, k));
                let (gn, un) = (reference(&xn, &wg, m, n, k), reference(&xn, &wu, m, n, k));
                let added: Vec<f32> = y0.iter().zip(&g).map(|(a, b)| a + b).collect();
                let what = format!("{m}x{n}x{k} f16={f16} f16_scale={f16_scale}");
                // Above the matrix-vector rows, f16 weights may take the tensor-core matmul,
                // which rounds the activations to f16.
                let tol = if m > super::MATVEC_MAX_ROWS && f16 && k % 8 == 0 && c.coopmat_f16_available() { 2e-3 } else { 1e-5 };
                assert_close(&format!("linear_add {what}"), &c.read_f32(&ty).unwrap(), &added, tol);
                assert_close(&format!("linear_swiglu {what}"), &c.read_f32(&act).unwrap(), &swiglu(&g, &u), tol);
                assert_close(&format!("linear_swiglu normed {what}"), &c.read_f32(&act_n).unwrap(), &swiglu(&gn, &un), tol);
                assert_close(&format!("linear_from normed {what}"), &c.read_f32(&proj_n).unwrap(), &gn, tol);
            }
        }
    }

    /// The wide matrix-vector kernel with every lane count it picks (32, 64 and 128 lanes per
    /// weight row, from the row length), plain and fused, against the CPU arithmetic.
    #[test]
    fn wide_matvec_lane_counts_match_cpu() {
        let (n, eps) = (37, 1e-5f32);
        // (k, f16): f32 rows of 8 KiB (64 lanes) and 16 KiB (128), f16 rows of 4 KiB (32),
        // 8 KiB (64) and 16 KiB (128).
        for (k, f16) in [
            (2048, false),
            (4104, false),
            (2048, true),
            (4096, true),
            (8200, true),
        ] {
            let ch = if f16 { 8 } else { 4 };
            let lanes = super::matvec_tpr(k / ch);
            for c in both_ctx() {
                for m in [1usize, 3] {
                    let x = values(k as u64 + m as u64, m * k);
                    let mut w = values(5, n * k);
                    let mut w2 = values(6, n * k);
                    if f16 {
                        w = round_f16(&w);
                        w2 = round_f16(&w2);
                    }
                    let scale: Vec<f32> = values(7, k).iter().map(|v| 1.0 + v).collect();
                    let up = |v: &[f32]| {
                        if f16 {
                            c.upload_f32_as_f16(v, &[n, k]).unwrap()
                        } else {
                            c.upload_f32(v, &[n, k]).unwrap()
                        }
                    };
                    let (tw, tw2) = (up(&w), up(&w2));
                    let tx = c.upload_f32(&x, &[m, k]).unwrap();
                    let tscale = c.upload_f32(&scale, &[k]).unwrap();
                    let xt = c
                        .create_tensor(&[m, k], crate::DType::F32, "normed x")
                        .unwrap();
                    let outs = [(); 3].map(|()| {
                        let t = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                        c.fill_u32_pattern(&t, POISON);
                        t
                    });
                    let [t1, t2] = [(); 2]
                        .map(|()| c.create_tensor(&[m, n], crate::DType::F32, "tmp").unwrap());
                    let normed = super::ProjInput::Normed {
                        x: &tx,
                        weight: &tscale,
                        eps,
                        tmp: &xt,
                    };
                    let mut enc = c.encoder();
                    c.linear(&mut enc, &tx, &tw, &outs[0]).unwrap();
                    c.linear_from(&mut enc, normed, &tw, &outs[1]).unwrap();
                    c.linear_swiglu(&mut enc, normed, &tw, &tw2, &outs[2], &t1, &t2)
                        .unwrap();
                    c.submit_and_wait(enc).unwrap();
                    let xn: Vec<f32> = x
                        .chunks(k)
                        .flat_map(|r| {
                            let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()
                                / k as f64;
                            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                            r.iter()
                                .zip(&scale)
                                .map(move |(&v, &g)| (f64::from(v) * inv * f64::from(g)) as f32)
                        })
                        .collect();
                    let (g, u) = (reference(&xn, &w, m, n, k), reference(&xn, &w2, m, n, k));
                    let swiglu: Vec<f32> = g
                        .iter()
                        .zip(&u)
                        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                        .collect();
                    let what = format!("{m}x{n}x{k} f16={f16} ({lanes} lanes)");
                    assert_close(
                        &format!("matvec {what}"),
                        &c.read_f32(&outs[0]).unwrap(),
                        &reference(&x, &w, m, n, k),
                        1e-5,
                    );
                    assert_close(
                        &format!("normed {what}"),
                        &c.read_f32(&outs[1]).unwrap(),
                        &g,
                        1e-5,
                    );
                    assert_close(
                        &format!("swiglu {what}"),
                        &c.read_f32(&outs[2]).unwrap(),
                        &swiglu,
                        1e-5,
                    );
                }
            }
        }
        assert_eq!(
            [512, 1026, 256, 512, 1025].map(super::matvec_tpr),
            [64, 128, 32, 64, 128],
            "the lane counts this test means to cover"
        );
    }

    proptest! {
        #![proptest_config(cases(12))]
        /// The register-tiled kernel across several 64x64 tiles and K slices, with edges
        /// that are not multiples of the tile, of 4 or of 16; through `linear` (prefill rows,
        /// above the rows it gives the matrix-vector kernel).
        #[test]
        fn register_tiled_matmul_matches_cpu(m in 65usize..200, n in 1usize..160,
                                             k in prop_oneof![1usize..90, (1usize..24).prop_map(|k| 4 * k)],
                                             f16 in any::<bool>(), seed: u64) {
            for c in both_ctx() {
                let x = values(seed, m * k);
                let mut w = values(seed ^ 5, n * k);
                if f16 {
                    w = round_f16(&w);
                }
                let tx = c.upload_f32(&x, &[m, k]).unwrap();
                let tw = if f16 { c.upload_f32_as_f16(&w, &[n, k]).unwrap() } else { c.upload_f32(&w, &[n, k]).unwrap() };
                let y = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                c.fill_u32_pattern(&y, POISON);
                let mut enc = c.encoder();
                c.linear(&mut enc, &tx, &tw, &y).unwrap();
                c.submit_and_wait(enc).unwrap();
                let tol = if c.coopmat_f16_available() && f16 && k % 8 == 0 { 2e-3 } else { 1e-5 };
                assert_close(&format!("register-tiled matmul {m}x{n}x{k} f16={f16}"),
                             &c.read_f32(&y).unwrap(), &reference(&x, &w, m, n, k), tol);
            }
        }
    }

    /// The software device has no cooperative matrices: check that naga accepts every
    /// tensor-core kernel (each variant) and the conversion kernel, and that the workgroup
    /// size and workgroup memory the wrapper budgets for are what the WGSL declares.
    #[test]
    fn coopmat_kernel_passes_naga_validation() {
        for v in CoopVariant::ALL {
            let name = v.key().name();
            let module = validate_coop(&name, &v.source(&name).unwrap());
            assert_eq!(
                module.entry_points[0].workgroup_size,
                [v.invocations(), 1, 1],
                "{name}: workgroup size"
            );
            assert_eq!(
                crate::testing::workgroup_bytes(&module),
                v.shared_bytes(),
                "{name}: workgroup memory"
            );
            // Every invocation stages whole chunks of 8 halves of both operands, and the
            // fragments of a K slice are whole 16-deep steps.
            let d = v.design();
            let (bm, bn) = d.tile();
            let per_slice = d.bk / 8;
            assert!(d.bk % 16 == 0, "{name}: slice {}", d.bk);
            assert!(
                (bm * per_slice) % d.invocations() == 0 && (bn * per_slice) % d.invocations() == 0,
                "{name}: {bm}x{bn} tile, slice {} over {} invocations",
                d.bk,
                d.invocations()
            );
            assert!(d.stages == 1 || d.stages == 2, "{name}: stages");
            // Fits the 48 KiB of workgroup memory Vulkan drivers commonly offer.
            assert!(
                v.shared_bytes() <= 48 << 10,
                "{name}: {} bytes",
                v.shared_bytes()
            );
        }
        let names: std::collections::HashSet<_> =
            CoopVariant::ALL.iter().map(|v| v.key()).collect();
        assert_eq!(
            names.len(),
            CoopVariant::ALL.len(),
            "pipeline keys must differ"
        );
        validate_coop("to_f16", super::TO_F16_SRC);
    }

    /// Every variant against the CPU on the tensor-core device, with f32 activations and with
    /// an f16 copy made by `to_f16` (the tile kernel alone): full tiles, edge tiles (`m`, `n`
    /// not multiples of the tile, `n` not a multiple of 4 so that in-bounds tiles take the
    /// staged store), a single K step, `k` not a multiple of the K slices, fewer than 16 rows
    /// or columns, and more tile rows than one band of the banded order. Without cooperative
    /// matrices every variant must report `NotAvailable`.
    #[test]
    fn coopmat_variants_match_cpu() {
        let shapes: [(usize, usize, usize); 11] = [
            (256, 256, 64),
            (384, 256, 80),
            (200, 136, 48),
            (128, 130, 32),
            (17, 19, 16),
            (130, 300, 40),
            (260, 140, 24),
            (9, 20, 24),
            (20, 9, 16),
            (520, 264, 104),
            (2100, 136, 16),
        ];
        for c in both_ctx() {
            for (i, &(m, n, k)) in shapes.iter().enumerate() {
                let x = round_f16(&values(i as u64 + 11, m * k));
                let w = round_f16(&values(i as u64 + 101, n * k));
                let tx = c.upload_f32(&x, &[m, k]).unwrap();
                let tx16 = c.upload_f32_as_f16(&x, &[m, k]).unwrap();
                let tw = c.upload_f32_as_f16(&w, &[n, k]).unwrap();
                let want = reference(&x, &w, m, n, k);
                for v in CoopVariant::ALL {
                    for x_in in [&tx, &tx16] {
                        if x_in.dtype == crate::DType::F16 && v.reads_f32() {
                            continue;
                        }
                        let y = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                        c.fill_u32_pattern(&y, POISON);
                        let mut enc = c.encoder();
                        let r = c.matmul_coopmat_with(&mut enc, x_in, &tw, &y, v);
                        if !c.coopmat_f16_available() {
                            assert!(
                                matches!(r, Err(crate::GpuError::NotAvailable(_))),
                                "{v:?} without cooperative matrices: {r:?}"
                            );
                            continue;
                        }
                        r.unwrap();
                        c.submit_and_wait(enc).unwrap();
                        assert_close(
                            &format!("coopmat {v:?} x {:?} {m}x{n}x{k}", x_in.dtype),
                            &c.read_f32(&y).unwrap(),
                            &want,
                            1e-4,
                        );
                    }
                }
            }
        }
    }

    /// The conversion kernel on every device (it needs no f16 support): rounding, sizes that leave a partial last workgroup, and the f16 output `matmul_coopmat_with`
    /// accepts.
    #[test]
    fn to_f16_rounds_like_the_cpu() {
        for c in both_ctx() {
            for len in [8usize, 2056, 40_000] {
                let x: Vec<f32> = values(len as u64, len).iter().map(|v| v * 300.0).collect();
                let tx = c.upload_f32(&x, &[len / 8, 8]).unwrap();
                let out = c
                    .create_tensor(&[len / 8, 8], crate::DType::F16, "h")
                    .unwrap();
                let mut enc = c.encoder();
                c.to_f16(&mut enc, &tx, &out).unwrap();
                c.submit_and_wait(enc).unwrap();
                let bytes = c.read_bytes(&out.buffer).unwrap();
                let got: &[half::f16] = bytemuck::cast_slice(&bytes[..len * 2]);
                // Nearest or, on a tie, either neighbour: at most one unit in the last place.
                for (i, (g, v)) in got.iter().zip(&x).enumerate() {
                    let want = half::f16::from_f32(*v);
                    let ulps = (i32::from(g.to_bits()) - i32::from(want.to_bits())).abs();
                    assert!(ulps <= 1, "{len}: element {i}: {g} for {v} ({want})");
                }
            }
            let x = c.upload_f32(&[0.0; 12], &[3, 4]).unwrap();
            let out = c.create_tensor(&[3, 4], crate::DType::F16, "h").unwrap();
            let mut enc = c.encoder();
            assert!(matches!(
                c.to_f16(&mut enc, &x, &out),
                Err(crate::GpuError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn coopmat_reports_unavailable_without_the_feature() {
        for c in both_ctx() {
            if c.coopmat_f16_available() {
                continue;
            }
            let x = c.upload_f32(&[0.0; 16], &[2, 8]).unwrap();
            let w = c.upload_f32_as_f16(&[0.0; 16], &[2, 8]).unwrap();
            let y = c.create_tensor(&[2, 2], crate::DType::F32, "y").unwrap();
            let mut enc = c.encoder();
            assert!(matches!(
                c.matmul_coopmat(&mut enc, &x, &w, &y),
                Err(crate::GpuError::NotAvailable(_))
            ));
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

    /// `linear` takes the wide tiles only where there are enough of them and the device has
    /// the workgroup memory and invocations for them.
    #[test]
    fn the_wide_variant_is_chosen_for_large_outputs_on_devices_it_fits() {
        let mut f = crate::testing::ctx().features().clone();
        f.max_workgroup_storage = 48 * 1024;
        f.max_invocations = 1024;
        assert!(CoopVariant::Wide.fits(&f));
        assert_eq!(CoopVariant::for_shape(4096, 4096, &f), CoopVariant::Wide);
        assert_eq!(CoopVariant::for_shape(4000, 3000, &f), CoopVariant::Wide);
        // 4 x 8 = 32 wide tiles.
        assert_eq!(CoopVariant::for_shape(1000, 1002, &f), CoopVariant::DEFAULT);
        // Exactly the threshold, and one tile short of it.
        assert_eq!(
            CoopVariant::for_shape(256 * 16, 128 * 16, &f),
            CoopVariant::Wide
        );
        assert_eq!(
            CoopVariant::for_shape(256 * 15, 128 * 17, &f),
            CoopVariant::DEFAULT
        );
        f.max_workgroup_storage = 16 * 1024;
        assert!(!CoopVariant::Wide.fits(&f));
        assert_eq!(CoopVariant::for_shape(4096, 4096, &f), CoopVariant::DEFAULT);
    }
}
