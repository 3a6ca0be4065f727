//! Adapter selection, device creation and feature detection.
//!
//! [`GpuContext`] owns one wgpu device and queue, the features detected on it (once, at
//! creation), and the lazily built pipelines. Which adapter it opens is decided by a
//! [`DeviceSelector`]: the best GPU by default, or one picked by index, backend or name
//! (`CLA_DEVICE`). CPU adapters (Mesa's lavapipe) are used only when asked for, because a
//! silent fall-back to a software device would hide a broken driver install behind a 1000x
//! slowdown. The backend of the opened adapter is checked, because wgpu itself falls back to
//! GL when no Vulkan driver is present.
//!
//! Fast paths can be switched off with `CLA_GPU_DISABLE=f16,subgroup,coopmat,timestamp,unchecked` (or
//! [`DeviceSelector::fast_paths`]) so that the portable fallbacks can be tested on any adapter.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{GpuError, Result};
use crate::pipeline::PipelineCache;

/// Environment variable holding the adapter selector (see [`DeviceSelector::parse`]).
pub const DEVICE_ENV: &str = "CLA_DEVICE";
/// Environment variable listing fast paths to switch off (see [`FastPaths::parse_disable`]).
pub const DISABLE_ENV: &str = "CLA_GPU_DISABLE";

const INSTALL_HINT: &str = "On Linux without a GPU, install a software Vulkan driver \
     (`apt-get install mesa-vulkan-drivers libvulkan1`) and select it with CLA_DEVICE=cpu.";

/// Which adapter to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterFilter {
    /// The best adapter: discrete before integrated before virtual GPUs; a CPU adapter only if
    /// [`DeviceSelector::allow_cpu`] is set and no GPU exists.
    Best,
    /// The adapter at this position in [`GpuContext::list_adapters`].
    Index(usize),
    /// The best adapter of this backend.
    Backend(wgpu::Backend),
    /// The first adapter whose name contains this text (case-insensitive).
    Name(String),
    /// A CPU (software) adapter, such as lavapipe.
    Cpu,
}

/// Fast paths that are used when the adapter has them. Each has a portable fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPaths {
    /// Native `f16` storage and arithmetic (`SHADER_F16`). Fallback: f16 pairs packed in
    /// `u32` words, unpacked with `unpack2x16float`.
    pub f16: bool,
    /// Subgroup reductions (`SUBGROUP`). Fallback: workgroup-memory tree reductions.
    pub subgroup: bool,
    /// Cooperative-matrix (tensor core) tiles. Fallback: the portable tiled matmul.
    pub coopmat: bool,
    /// GPU timestamp queries for benchmarks. Fallback: wall-clock timing.
    pub timestamp: bool,
    /// Shaders built without the per-access bounds checks that wgpu otherwise inserts
    /// (every kernel's host wrapper checks shapes and binding sizes before it dispatches).
    /// Fallback: bounds-checked shaders.
    pub unchecked: bool,
}

impl Default for FastPaths {
    fn default() -> Self {
        Self::ALL
    }
}

impl FastPaths {
    /// Every fast path allowed.
    pub const ALL: Self = Self {
        f16: true,
        subgroup: true,
        coopmat: true,
        timestamp: true,
        unchecked: true,
    };

    /// Parses a `CLA_GPU_DISABLE` list (`f16,subgroup,coopmat,timestamp,unchecked`, or `all`) and
    /// returns the fast paths left on; an unknown entry is [`GpuError::InvalidFastPaths`].
    pub fn parse_disable(list: &str) -> Result<Self> {
        let mut paths = Self::ALL;
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.to_ascii_lowercase().as_str() {
                "f16" | "shader_f16" => paths.f16 = false,
                "subgroup" | "subgroups" => paths.subgroup = false,
                "coopmat" | "cooperative_matrix" => paths.coopmat = false,
                "timestamp" | "timestamps" => paths.timestamp = false,
                "unchecked" => paths.unchecked = false,
                "all" => {
                    paths = Self {
                        f16: false,
                        subgroup: false,
                        coopmat: false,
                        timestamp: false,
                        unchecked: false,
                    }
                }
                other => {
                    return Err(GpuError::InvalidFastPaths(format!(
                        "{DISABLE_ENV}: unknown fast path `{other}` (known: f16, subgroup, coopmat, timestamp, unchecked, all)"
                    )));
                }
            }
        }
        Ok(paths)
    }
}

/// How to choose the adapter and which fast paths to allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSelector {
    /// Which adapter.
    pub filter: AdapterFilter,
    /// Whether [`AdapterFilter::Best`] and [`AdapterFilter::Backend`] may settle on a CPU
    /// adapter. Explicit choices (index, name, `cpu`) always may.
    pub allow_cpu: bool,
    /// Fast paths allowed; each is used only if the adapter also has it.
    pub fast_paths: FastPaths,
}

impl Default for DeviceSelector {
    fn default() -> Self {
        Self {
            filter: AdapterFilter::Best,
            allow_cpu: false,
            fast_paths: FastPaths::ALL,
        }
    }
}

impl DeviceSelector {
    /// Parses a selector: `auto` (or empty), an index (`0`), a backend (`vulkan`, `metal`,
    /// `dx12`, `gl`), `cpu` (also `lavapipe`, `llvmpipe`, `software`), or any other text as a
    /// case-insensitive name substring (`name:` forces that reading, e.g. `name:vulkan`).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let lower = t.to_ascii_lowercase();
        let filter = if let Some(name) = t.strip_prefix("name:") {
            if name.is_empty() {
                return Err(GpuError::InvalidSelector(text.to_owned()));
            }
            AdapterFilter::Name(name.to_owned())
        } else {
            match lower.as_str() {
                "" | "auto" | "best" | "gpu" => AdapterFilter::Best,
                "vulkan" | "vk" => AdapterFilter::Backend(wgpu::Backend::Vulkan),
                "metal" => AdapterFilter::Backend(wgpu::Backend::Metal),
                "dx12" | "d3d12" => AdapterFilter::Backend(wgpu::Backend::Dx12),
                "gl" | "gles" | "opengl" => AdapterFilter::Backend(wgpu::Backend::Gl),
                "cpu" | "lavapipe" | "llvmpipe" | "software" => AdapterFilter::Cpu,
                _ if lower.bytes().all(|b| b.is_ascii_digit()) => AdapterFilter::Index(
                    lower
                        .parse()
                        .map_err(|_| GpuError::InvalidSelector(text.to_owned()))?,
                ),
                _ => AdapterFilter::Name(t.to_owned()),
            }
        };
        Ok(Self {
            filter,
            ..Self::default()
        })
    }

    /// The selector from `CLA_DEVICE` and `CLA_GPU_DISABLE` (both optional).
    pub fn from_env() -> Result<Self> {
        let mut sel = match std::env::var(DEVICE_ENV) {
            Ok(text) => Self::parse(&text)?,
            Err(_) => Self::default(),
        };
        if let Ok(list) = std::env::var(DISABLE_ENV) {
            sel.fast_paths = FastPaths::parse_disable(&list)?;
        }
        Ok(sel)
    }

    /// Allows (or forbids) settling on a CPU adapter.
    #[must_use]
    pub fn allow_cpu(mut self, allow: bool) -> Self {
        self.allow_cpu = allow;
        self
    }

    /// Replaces the allowed fast paths.
    #[must_use]
    pub fn fast_paths(mut self, paths: FastPaths) -> Self {
        self.fast_paths = paths;
        self
    }

    fn describe(&self) -> String {
        let f = match &self.filter {
            AdapterFilter::Best => "auto".to_owned(),
            AdapterFilter::Index(i) => format!("index {i}"),
            AdapterFilter::Backend(b) => format!("backend {b:?}"),
            AdapterFilter::Name(n) => format!("name contains \"{n}\""),
            AdapterFilter::Cpu => "cpu".to_owned(),
        };
        if self.allow_cpu {
            format!("{f} (cpu allowed)")
        } else {
            f
        }
    }
}

/// One adapter seen by [`GpuContext::list_adapters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Position in the enumeration (usable as [`AdapterFilter::Index`]).
    pub index: usize,
    /// Adapter name, e.g. "NVIDIA H100 80GB HBM3" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Backend.
    pub backend: wgpu::Backend,
    /// Device type.
    pub device_type: wgpu::DeviceType,
    /// Driver name and version.
    pub driver: String,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} ({:?}, {:?}, {})",
            self.index, self.name, self.backend, self.device_type, self.driver
        )
    }
}

/// A cooperative-matrix configuration the adapter reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoopMatShape {
    /// Rows of A and C.
    pub m: u32,
    /// Columns of B and C.
    pub n: u32,
    /// Columns of A, rows of B.
    pub k: u32,
    /// Input element type, e.g. "F16".
    pub ab: String,
    /// Accumulator element type.
    pub cr: String,
}

/// What the opened device can do, after `CLA_GPU_DISABLE` is applied. Detected once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFeatures {
    /// Native `f16` in shaders (`SHADER_F16`) is on.
    pub shader_f16: bool,
    /// Subgroup operations are on.
    pub subgroup: bool,
    /// Smallest and largest subgroup size the adapter reports.
    pub subgroup_size: (u32, u32),
    /// Cooperative-matrix shapes the adapter reports (empty if none or switched off).
    /// A 16x16x16 f16 -> f32 shape enables [`GpuContext::matmul_coopmat`].
    pub cooperative_matrix: Vec<CoopMatShape>,
    /// Timestamp queries at pass boundaries are on.
    pub timestamp_query: bool,
    /// Timestamps inside compute passes are on.
    pub timestamp_inside_passes: bool,
    /// Shaders are built without wgpu's runtime bounds checks ([`FastPaths::unchecked`]).
    pub unchecked_shaders: bool,
    /// Workgroup memory in bytes.
    pub max_workgroup_storage: u32,
    /// Invocations per workgroup.
    pub max_invocations: u32,
    /// Largest storage binding in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer in bytes.
    pub max_buffer_size: u64,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers: u32,
    /// Alignment of storage-binding offsets in bytes.
    pub storage_offset_alignment: u32,
}

/// An open device with its queue, features and pipeline cache. Cheap to share behind an
/// `Arc`; every method takes `&self`.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: GpuFeatures,
    pub(crate) pipelines: PipelineCache,
    errors: Arc<Mutex<Vec<String>>>,
    pub(crate) scratch: Mutex<Option<wgpu::Buffer>>,
    /// f16 copy of the activations for the cooperative-matrix matmul (grown on demand).
    pub(crate) coop_staging: Mutex<Option<wgpu::Buffer>>,
    /// The sampler's prefilter candidates (logit bits, indices), grown on demand; only the
    /// GPU writes and reads them, in queue order, so calls can share them.
    pub(crate) sample_candidates: Mutex<(crate::ReusableBuffer, crate::ReusableBuffer)>,
    /// The compute passes of the open [`GpuContext::batch_passes`] scopes, by encoder.
    pub(crate) open_pass: Mutex<std::collections::HashMap<u64, crate::pipeline::OpenPass>>,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY | wgpu::Backends::GL;
    wgpu::Instance::new(desc)
}

fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        index,
        name: info.name,
        backend: info.backend,
        device_type: info.device_type,
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_owned(),
    }
}

/// Lower is better: discrete, integrated, virtual, other, CPU.
fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Picks an adapter index from summaries; pure so that selection logic is unit-testable.
pub(crate) fn choose(sel: &DeviceSelector, adapters: &[AdapterSummary]) -> Option<usize> {
    let is_cpu = |a: &AdapterSummary| a.device_type == wgpu::DeviceType::Cpu;
    // GL lacks f16 and subgroups and is what wgpu falls back to silently: only on request.
    let not_gl = |a: &AdapterSummary| a.backend != wgpu::Backend::Gl;
    let best = |it: &mut dyn Iterator<Item = &AdapterSummary>| {
        it.min_by_key(|a| (type_rank(a.device_type), a.index))
            .map(|a| a.index)
    };
    match &sel.filter {
        AdapterFilter::Best => best(
            &mut adapters
                .iter()
                .filter(|a| not_gl(a) && (sel.allow_cpu || !is_cpu(a))),
        ),
        AdapterFilter::Backend(b) => best(
            &mut adapters
                .iter()
                .filter(|a| a.backend == *b && (sel.allow_cpu || !is_cpu(a))),
        ),
        AdapterFilter::Index(i) => adapters.iter().find(|a| a.index == *i).map(|a| a.index),
        AdapterFilter::Name(n) => {
            let n = n.to_lowercase();
            adapters
                .iter()
                .filter(|a| a.name.to_lowercase().contains(&n))
                .min_by_key(|a| (!not_gl(a), a.index))
                .map(|a| a.index)
        }
        AdapterFilter::Cpu => best(&mut adapters.iter().filter(|a| is_cpu(a) && not_gl(a))),
    }
}

impl GpuContext {
    /// Lists every adapter wgpu can see (Vulkan, Metal, DX12 and GL backends).
    pub fn list_adapters() -> Vec<AdapterSummary> {
        let adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
        adapters
            .iter()
            .enumerate()
            .map(|(i, a)| summarize(i, a))
            .collect()
    }

    /// Opens the adapter chosen by `selector`, with every feature it offers that a kernel can
    /// use (minus the switched-off fast paths) and the adapter's full limits.
    pub fn new(selector: &DeviceSelector) -> Result<Self> {
        let inst = instance();
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        let summaries: Vec<AdapterSummary> = adapters
            .iter()
            .enumerate()
            .map(|(i, a)| summarize(i, a))
            .collect();
        let no_match = || GpuError::NoAdapter {
            selector: selector.describe(),
            found: summaries.iter().map(ToString::to_string).collect(),
            hint: INSTALL_HINT,
        };
        let idx = choose(selector, &summaries).ok_or_else(no_match)?;
        let adapter = &adapters[idx];
        let info = adapter.get_info();
        if let AdapterFilter::Backend(b) = selector.filter
            && info.backend != b
        {
            return Err(no_match());
        }

        let have = adapter.features();
        let fp = selector.fast_paths;
        let mut wanted = wgpu::Features::empty();
        if fp.f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        if fp.subgroup {
            wanted |= wgpu::Features::SUBGROUP;
        }
        if fp.timestamp {
            wanted |= wgpu::Features::TIMESTAMP_QUERY
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
        if fp.coopmat {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let required = have & wanted;
        let experimental = if required.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: only the cooperative-matrix feature is requested among the experimental
            // ones; its kernel stays inside the documented operand shapes and memory bounds.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("cla-kernels-wgpu"),
            required_features: required,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;

        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&errors);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));

        let cooperative_matrix = if device
            .features()
            .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        {
            adapter
                .cooperative_matrix_properties()
                .into_iter()
                .map(|p| CoopMatShape {
                    m: p.m_size,
                    n: p.n_size,
                    k: p.k_size,
                    ab: format!("{:?}", p.ab_type),
                    cr: format!("{:?}", p.cr_type),
                })
                .collect()
        } else {
            Vec::new()
        };
        let dev_features = device.features();
        let features = GpuFeatures {
            shader_f16: dev_features.contains(wgpu::Features::SHADER_F16),
            subgroup: dev_features.contains(wgpu::Features::SUBGROUP),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            cooperative_matrix,
            timestamp_query: dev_features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamp_inside_passes: dev_features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            unchecked_shaders: fp.unchecked,
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment,
        };
        Ok(Self {
            device,
            queue,
            info,
            features,
            pipelines: PipelineCache::default(),
            errors,
            scratch: Mutex::new(None),
            coop_staging: Mutex::new(None),
            sample_candidates: Mutex::default(),
            open_pass: Mutex::default(),
        })
    }

    /// The adapter's description (name, backend, device type, driver).
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether the adapter is a software one running on the CPU (lavapipe, llvmpipe).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Features and limits detected at creation.
    pub fn features(&self) -> &GpuFeatures {
        &self.features
    }

    /// The wgpu device, for callers that create their own buffers or encoders.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// A fresh command encoder to record kernels into.
    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("cla") })
    }

    /// Submits `encoder`, waits for the device to finish, and reports any error the device
    /// raised meanwhile.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        let idx = self.queue.submit([encoder.finish()]);
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: None,
            })
            .map_err(|e| GpuError::Device(e.to_string()))?;
        self.take_errors()
    }

    /// Returns (and clears) the errors the device raised outside any error scope.
    pub fn take_errors(&self) -> Result<()> {
        let mut errs = self
            .errors
            .lock()
            .map_err(|_| GpuError::Device("error log poisoned".into()))?;
        if errs.is_empty() {
            Ok(())
        } else {
            let msg = errs.join("\n");
            errs.clear();
            Err(GpuError::Device(msg))
        }
    }

    /// Names of the pipeline variants built so far, sorted.
    pub fn pipeline_names(&self) -> Vec<String> {
        self.pipelines.names()
    }

    /// Time spent so far building pipeline variants (generating their WGSL, naga's
    /// translation and the driver's compilation), all on the first use of each variant. A
    /// decoder's first step includes it; drivers that cache compiled shaders on disk make it
    /// small in later processes.
    pub fn kernel_build_time(&self) -> std::time::Duration {
        self.pipelines.build_time()
    }

    /// The name and generated WGSL source of each pipeline variant built so far, sorted by
    /// name: what the driver compiled, for offline study (the `kernel_stats` example reads
    /// the driver's register counts for them).
    pub fn kernel_sources(&self) -> Vec<(String, String)> {
        self.pipelines.sources()
    }
}

#[cfg(test)]
// Reference implementations index like the math they follow.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    fn adapters() -> Vec<AdapterSummary> {
        let mk = |index, name: &str, backend, device_type| AdapterSummary {
            index,
            name: name.into(),
            backend,
            device_type,
            driver: String::new(),
        };
        vec![
            mk(
                0,
                "llvmpipe (LLVM 15)",
                wgpu::Backend::Vulkan,
                wgpu::DeviceType::Cpu,
            ),
            mk(
                1,
                "Intel UHD",
                wgpu::Backend::Vulkan,
                wgpu::DeviceType::IntegratedGpu,
            ),
            mk(
                2,
                "NVIDIA H100",
                wgpu::Backend::Vulkan,
                wgpu::DeviceType::DiscreteGpu,
            ),
            mk(
                3,
                "NVIDIA H100",
                wgpu::Backend::Gl,
                wgpu::DeviceType::DiscreteGpu,
            ),
        ]
    }

    #[test]
    fn selection_prefers_discrete_and_never_cpu_or_gl_by_default() {
        let a = adapters();
        assert_eq!(choose(&DeviceSelector::default(), &a), Some(2));
        assert_eq!(choose(&DeviceSelector::parse("cpu").unwrap(), &a), Some(0));
        assert_eq!(choose(&DeviceSelector::parse("gl").unwrap(), &a), Some(3));
        assert_eq!(choose(&DeviceSelector::parse("1").unwrap(), &a), Some(1));
        assert_eq!(choose(&DeviceSelector::parse("h100").unwrap(), &a), Some(2));
        assert_eq!(choose(&DeviceSelector::parse("7").unwrap(), &a), None);
        assert_eq!(choose(&DeviceSelector::parse("amd").unwrap(), &a), None);
        // Only a CPU adapter: used only when allowed.
        let cpu_only = &a[..1];
        assert_eq!(choose(&DeviceSelector::default(), cpu_only), None);
        assert_eq!(
            choose(&DeviceSelector::default().allow_cpu(true), cpu_only),
            Some(0)
        );
        assert_eq!(
            choose(&DeviceSelector::parse("vulkan").unwrap(), cpu_only),
            None
        );
    }

    #[test]
    fn selector_and_disable_parsing() {
        assert_eq!(
            DeviceSelector::parse("name:vulkan").unwrap().filter,
            AdapterFilter::Name("vulkan".into())
        );
        assert_eq!(
            DeviceSelector::parse("Lavapipe").unwrap().filter,
            AdapterFilter::Cpu
        );
        assert!(DeviceSelector::parse("name:").is_err());
        let fp = FastPaths::parse_disable("f16, subgroup").unwrap();
        assert!(!fp.f16 && !fp.subgroup && fp.coopmat && fp.timestamp && fp.unchecked);
        assert!(!FastPaths::parse_disable("unchecked").unwrap().unchecked);
        assert!(matches!(
            FastPaths::parse_disable("warp"),
            Err(GpuError::InvalidFastPaths(_))
        ));
    }

    #[test]
    fn no_match_is_a_typed_error_listing_adapters() {
        let err = GpuContext::new(&DeviceSelector::parse("name:no-such-adapter-xyz").unwrap())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, GpuError::NoAdapter { .. }), "{msg}");
        assert!(msg.contains("adapters found"), "{msg}");
    }
}
