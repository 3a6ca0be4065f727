//! Linear layers: `y = x · wᵀ` with `w` in the `[out_features, in_features]` layout, f32 or f16.
//!
//! Kernels:
//! - a register-tiled matmul for prefill (`shaders/matmul_reg.wgsl`, [`MatmulTile::R64`]:
//!   64x64 tiles, 4x4 outputs per thread in vec4 registers, vec4 loads), portable;
//! - a cooperative-matrix (tensor core) matmul for f16 weights, with activations rounded to
//!   f16 and f32 accumulation, where the adapter offers 16x16x16 f16 -> f32 tiles
//!   ([`GpuContext::matmul_coopmat`]); several kernel designs ([`CoopVariant`]:
//!   `shaders/matmul_coop.wgsl`, `matmul_coop_packed.wgsl`, `matmul_coop_direct.wgsl`) that
//!   the benchmark compares, [`CoopVariant::DEFAULT`] serving [`GpuContext::linear`];
//! - the older shared-memory tiled matmul (`shaders/matmul.wgsl`, [`MatmulTile::T4`] / `T8`);
//! - a matrix-vector product for decode (`shaders/matvec*.wgsl`, a few rows, bound by reading
//!   the weights once).
//!
//! [`GpuContext::linear`] picks: matvec up to [`MATVEC_MAX_ROWS`] rows, else the
//! cooperative-matrix kernel when available (f16 weights, `k` a multiple of 8), else R64.

use crate::context::GpuContext;
use crate::error::{Result, ensure_arg};
use crate::ops::{expect, expect_float, u32_of};
use crate::pipeline::{Bind, PipelineKey, elem_buffer, render, whole, with_f16_header};
use crate::tensor::{DType, GpuTensor};

const MATMUL_SRC: &str = include_str!("../shaders/matmul.wgsl");
const MATMUL_REG_SRC: &str = include_str!("../shaders/matmul_reg.wgsl");
const MATMUL_COOP_SRC: &str = include_str!("../shaders/matmul_coop.wgsl");
const MATMUL_COOP_PACKED_SRC: &str = include_str!("../shaders/matmul_coop_packed.wgsl");
const MATMUL_COOP_DIRECT_SRC: &str = include_str!("../shaders/matmul_coop_direct.wgsl");
/// Output tile edge of the register-tiled matmul ([`MatmulTile::R64`]).
const REG_BM: usize = 64;
/// K slice of the staged cooperative-matrix matmul ([`CoopVariant::Staged`]).
const COOP_BK: u32 = 64;
/// f32 -> packed f16 conversion of activations for the cooperative-matrix matmul.
const TO_F16_SRC: &str = "struct Params { words: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> o: array<u32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i < p.words) {
        o[i] = pack2x16float(x[i]);
    }
}
";
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
/// ([`GpuContext::matmul_coopmat_with`]). All of them compute `y = x · wᵀ` from the f16 copy
/// of `x` and f16 `w` with f32 accumulation, one workgroup per output tile of
/// [`CoopVariant::tile`]; they differ in how the operands reach the tensor cores.
/// [`CoopVariant::ALL`] lists them for benchmarks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoopVariant {
    /// `shaders/matmul_coop.wgsl`: 128x128 tiles, 8 subgroups of 64x32 (4 x 2 accumulators),
    /// K slices of 64 staged in workgroup memory half by half, the next slice fetched into
    /// registers meanwhile; two barriers per slice. Any `m`, `n`; `k` a multiple of 8. The
    /// fallback of the direct variants.
    Staged,
    /// `shaders/matmul_coop_packed.wgsl`: 128x128 tiles, 4 subgroups of 64x64 (4 x 4
    /// accumulators: 8 fragment loads per 16 multiply-adds), K slices of 32 staged in groups
    /// of 4 halves (one 8-byte store each) in two alternating stages, one barrier per slice.
    /// Any `m`, `n`; `k` a multiple of 8.
    Packed,
    /// `shaders/matmul_coop_direct.wgsl`: 128x128 tiles, 4 subgroups of 64x64, fragments
    /// loaded straight from the storage buffers (no workgroup memory, no barrier; L1 and L2
    /// serve the reuse), the next step's fragments in flight during the multiply-adds. Needs
    /// `k` a multiple of 16 and `m`, `n` of at least 16; other shapes run [`Self::Staged`].
    Direct,
    /// As [`Self::Direct`] with 8 subgroups in a 4 x 2 grid: 256x128 tiles (rows x columns
    /// of `y`), so each fragment of `x` serves 2 subgroups and each of `w` serves 4.
    DirectWide,
}

impl CoopVariant {
    /// Every variant, the baseline first.
    pub const ALL: [CoopVariant; 4] = [
        CoopVariant::Staged,
        CoopVariant::Packed,
        CoopVariant::Direct,
        CoopVariant::DirectWide,
    ];

    /// The variant behind [`GpuContext::matmul_coopmat`] and [`GpuContext::linear`].
    /// `examples/gpu_bench.rs` times every variant on the same inputs and names the fastest
    /// correct one per shape, so that this choice follows the measurements. The packed
    /// kernel keeps the staged design's coalesced global reads and stages them with a
    /// quarter of its workgroup stores, 8 fragment loads per 16 multiply-adds (instead of 6
    /// per 8) and one barrier per slice.
    pub const DEFAULT: CoopVariant = CoopVariant::Packed;

    /// Short name (benchmark rows, pipeline names).
    pub fn name(self) -> &'static str {
        match self {
            CoopVariant::Staged => "staged",
            CoopVariant::Packed => "packed",
            CoopVariant::Direct => "direct",
            CoopVariant::DirectWide => "direct_wide",
        }
    }

    /// Output tile of one workgroup: (rows, columns) of `y`.
    pub fn tile(self) -> (usize, usize) {
        match self {
            CoopVariant::DirectWide => (256, 128),
            _ => (128, 128),
        }
    }

    /// Subgroup grid (rows, columns) of the direct variants.
    fn subgroup_grid(self) -> (u32, u32) {
        match self {
            CoopVariant::DirectWide => (4, 2),
            _ => (2, 2),
        }
    }

    /// Invocations per workgroup.
    fn invocations(self) -> u32 {
        match self {
            CoopVariant::Staged | CoopVariant::DirectWide => 256,
            CoopVariant::Packed | CoopVariant::Direct => 128,
        }
    }

    /// Workgroup memory the kernel declares, in bytes.
    fn shared_bytes(self) -> u32 {
        match self {
            // Two slices of 128 rows of `bk + 8` halves, a 16x16 f32 square per subgroup.
            CoopVariant::Staged => 2 * 128 * (COOP_BK + 8) * 2 + 8 * 256 * 4,
            // Two stages of x and of w, 128 rows of 32 + 8 halves each; 4 squares.
            CoopVariant::Packed => 2 * 2 * 128 * (32 + 8) * 2 + 4 * 256 * 4,
            // Only the edge squares.
            CoopVariant::Direct | CoopVariant::DirectWide => self.invocations() / 32 * 256 * 4,
        }
    }

    /// The variant that runs a call of this shape: the direct kernels need `k` a multiple of
    /// 16 (16-deep fragment steps, 32-byte aligned rows) and at least one whole fragment in
    /// each output dimension (their edge fragments are clamped inside the matrices).
    fn for_shape(self, m: usize, n: usize, k: usize) -> CoopVariant {
        match self {
            CoopVariant::Direct | CoopVariant::DirectWide
                if !k.is_multiple_of(16) || m < 16 || n < 16 =>
            {
                CoopVariant::Staged
            }
            v => v,
        }
    }

    /// Pipeline key of the variant's kernel.
    fn key(self) -> PipelineKey {
        let params = match self {
            CoopVariant::Staged => vec![("bk", COOP_BK)],
            CoopVariant::Packed => vec![("bk", 32)],
            CoopVariant::Direct | CoopVariant::DirectWide => {
                let (sgm, sgn) = self.subgroup_grid();
                vec![("sgm", sgm), ("sgn", sgn)]
            }
        };
        PipelineKey {
            kernel: match self {
                CoopVariant::Staged => "matmul_coop",
                CoopVariant::Packed => "matmul_coop_packed",
                CoopVariant::Direct | CoopVariant::DirectWide => "matmul_coop_direct",
            },
            elems: vec![crate::ElemStorage::F16],
            params,
        }
    }

    /// WGSL of the variant's kernel.
    fn source(self, name: &str) -> Result<String> {
        match self {
            CoopVariant::Staged => coop_source(name, COOP_BK),
            CoopVariant::Packed => render(name, MATMUL_COOP_PACKED_SRC, &[]),
            CoopVariant::Direct | CoopVariant::DirectWide => {
                let (sgm, sgn) = self.subgroup_grid();
                render(
                    name,
                    MATMUL_COOP_DIRECT_SRC,
                    &[
                        ("SGM", sgm.to_string()),
                        ("SGN", sgn.to_string()),
                        ("THREADS", self.invocations().to_string()),
                    ],
                )
            }
        }
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
    /// `y = x · wᵀ`, choosing the matvec kernel for at most [`MATVEC_MAX_ROWS`] rows, the
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
        if s.m <= MATVEC_MAX_ROWS {
            self.matvec(encoder, x, w, y)
        } else if self.coopmat_fits(w, &s) {
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

    /// Whether the device can run [`GpuContext::matmul_coopmat`] (every [`CoopVariant`]): a
    /// 16x16x16 f16 -> f32 cooperative-matrix shape, native f16, subgroups of exactly 32
    /// invocations and enough invocations and workgroup memory for each variant.
    /// `CLA_GPU_DISABLE=coopmat` switches it off.
    pub fn coopmat_f16_available(&self) -> bool {
        let f = self.features();
        f.shader_f16
            && f.subgroup_size == (32, 32)
            && CoopVariant::ALL.iter().all(|v| {
                f.max_invocations >= v.invocations() && f.max_workgroup_storage >= v.shared_bytes()
            })
            && f.cooperative_matrix
                .iter()
                .any(|c| (c.m, c.n, c.k) == (16, 16, 16) && c.ab == "F16" && c.cr == "F32")
    }

    fn coopmat_fits(&self, w: &GpuTensor, s: &LinearShape) -> bool {
        w.dtype == DType::F16 && s.k.is_multiple_of(8) && self.coopmat_f16_available()
    }

    /// `y = x · wᵀ` on the tensor cores with [`CoopVariant::DEFAULT`]: `x` is rounded to f16
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
        self.matmul_coopmat_with(encoder, x, w, y, CoopVariant::DEFAULT)
    }

    /// [`GpuContext::matmul_coopmat`] with a chosen kernel design. Same shapes for every
    /// variant: a direct variant hands the shapes it cannot take (`k` not a multiple of 16,
    /// fewer than 16 rows or columns) to [`CoopVariant::Staged`].
    pub fn matmul_coopmat_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        w: &GpuTensor,
        y: &GpuTensor,
        variant: CoopVariant,
    ) -> Result<()> {
        let s = linear_shape(x, w, y)?;
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
        if !self.coopmat_f16_available() {
            return Err(crate::GpuError::NotAvailable(
                "matmul_coopmat: no 16x16x16 f16 -> f32 cooperative matrix with subgroups of 32 \
                 (or switched off with CLA_GPU_DISABLE=coopmat)"
                    .into(),
            ));
        }
        self.check_binding("linear weight", w.byte_len() as u64)?;
        let half_bytes = (s.m * s.k * 2) as u64;
        self.check_binding("matmul_coopmat f16 activations", half_bytes)?;
        let variant = variant.for_shape(s.m, s.n, s.k);
        let (bm, bn) = variant.tile();
        let (gx, gy) = self.output_tile_grid("matmul_coopmat", &s, bm, bn)?;
        let staging = self.coop_staging(half_bytes)?;

        // 1. Activations to f16 (two per word).
        let words = s.m * s.k / 2;
        let conv = self.kernel(
            PipelineKey {
                kernel: "to_f16",
                elems: vec![],
                params: vec![],
            },
            &[Bind::Uniform, Bind::Read, Bind::ReadWrite],
            |_| Ok(TO_F16_SRC.to_owned()),
        )?;
        let params = self.uniform(&[u32_of("to_f16 words", words)?]);
        let (cx, cy) = self.grid((words as u64).div_ceil(256))?;
        self.dispatch(
            encoder,
            &conv,
            &[
                params.as_entire_binding(),
                whole(x),
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &staging,
                    offset: 0,
                    size: wgpu::BufferSize::new(half_bytes),
                }),
            ],
            (cx, cy, 1),
        );

        // 2. The tensor-core tiles.
        let kernel = self.kernel(
            variant.key(),
            &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
            |name| variant.source(name),
        )?;
        let params = self.uniform(&[u32_of("m", s.m)?, u32_of("n", s.n)?, u32_of("k", s.k)?]);
        self.dispatch(
            encoder,
            &kernel,
            &[
                params.as_entire_binding(),
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &staging,
                    offset: 0,
                    size: wgpu::BufferSize::new(half_bytes),
                }),
                whole(w),
                whole(y),
            ],
            (gx, gy, 1),
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

fn coop_source(name: &str, bk: u32) -> Result<String> {
    render(name, MATMUL_COOP_SRC, &[("BK", bk.to_string())])
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
        #![proptest_config(cases(12))]
        /// The register-tiled kernel across several 64x64 tiles and K slices, with edges
        /// that are not multiples of the tile, of 4 or of 16; through `linear` (prefill rows).
        #[test]
        fn register_tiled_matmul_matches_cpu(m in 9usize..160, n in 1usize..160,
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

    /// Parses, validates with every capability an H100 offers and translates to SPIR-V (the
    /// Vulkan path). Also checks the operands of every multiply-add, which naga's validator
    /// leaves alone: a cooperative load takes its scalar type from the pointer, so a load
    /// through a `u32` array would silently make an integer matrix.
    fn validate_coop(what: &str, src: &str) -> wgpu::naga::Module {
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
                for (op, want_scalar, want_role) in [(a, f16, R::A), (b, f16, R::B), (c, f32, R::C)]
                {
                    let ty = fi[op].ty.inner_with(&module.types);
                    assert!(
                        matches!(*ty, naga::TypeInner::CooperativeMatrix { scalar, role, .. }
                            if scalar == want_scalar && role == want_role),
                        "{what}: multiply-add operand {want_role:?} is {ty:?}"
                    );
                }
            }
        }
        module
    }

    /// The software device has no cooperative matrices: check that naga accepts every
    /// tensor-core kernel (each variant, and the staged kernel's other K slice), and that the
    /// workgroup size and workgroup memory the wrapper budgets for are what the WGSL declares.
    #[test]
    fn coopmat_kernel_passes_naga_validation() {
        use wgpu::naga;
        for bk in [32u32, 64] {
            let src = super::coop_source("matmul_coop", bk).unwrap();
            validate_coop(&format!("staged bk {bk}"), &src);
        }
        for v in CoopVariant::ALL {
            let name = v.key().name();
            let module = validate_coop(&name, &v.source(&name).unwrap());
            assert_eq!(
                module.entry_points[0].workgroup_size,
                [v.invocations(), 1, 1],
                "{name}: workgroup size"
            );
            let shared: u32 = module
                .global_variables
                .iter()
                .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
                .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
                .sum();
            assert_eq!(shared, v.shared_bytes(), "{name}: workgroup memory");
            let (bm, bn) = v.tile();
            assert!(bm % 128 == 0 && bn % 128 == 0, "{name}: tile {bm}x{bn}");
        }
        validate_coop("to_f16", super::TO_F16_SRC);
    }

    /// Every variant against the CPU on the tensor-core device: full tiles, edge tiles (`m`,
    /// `n` not multiples of the tile, `n` not a multiple of 4 so that in-bounds tiles take the
    /// staged store), a single K step, `k` not a multiple of 16 and fewer than 16 rows or
    /// columns (the direct variants' fallback). Without cooperative matrices every variant
    /// must report `NotAvailable`.
    #[test]
    fn coopmat_variants_match_cpu() {
        let shapes: [(usize, usize, usize); 9] = [
            (256, 256, 64),
            (384, 256, 80),
            (200, 136, 48),
            (128, 130, 32),
            (17, 19, 16),
            (130, 300, 40),
            (260, 140, 24),
            (9, 20, 24),
            (20, 9, 16),
        ];
        for c in both_ctx() {
            for (i, &(m, n, k)) in shapes.iter().enumerate() {
                let x = round_f16(&values(i as u64 + 11, m * k));
                let w = round_f16(&values(i as u64 + 101, n * k));
                let tx = c.upload_f32(&x, &[m, k]).unwrap();
                let tw = c.upload_f32_as_f16(&w, &[n, k]).unwrap();
                let want = reference(&x, &w, m, n, k);
                for v in CoopVariant::ALL {
                    let y = c.create_tensor(&[m, n], crate::DType::F32, "y").unwrap();
                    c.fill_u32_pattern(&y, POISON);
                    let mut enc = c.encoder();
                    let r = c.matmul_coopmat_with(&mut enc, &tx, &tw, &y, v);
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
                        &format!("coopmat {v:?} {m}x{n}x{k}"),
                        &c.read_f32(&y).unwrap(),
                        &want,
                        1e-4,
                    );
                }
            }
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
}
