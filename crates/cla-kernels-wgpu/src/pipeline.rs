//! Pipeline variants: the small WGSL preprocessing step, the cache key, and dispatch helpers.
//!
//! Every kernel is a WGSL template (one file per op family under `shaders/`) with `{{NAME}}`
//! placeholders for compile-time constants (head dim, tile sizes, workgroup size) and for the
//! declarations of buffers whose element type varies. Element access goes through generated
//! functions (`w_ld(i)`, `k_st2(i, v)`) so one template serves f32, native f16 and packed f16
//! (`u32` words read with `unpack2x16float`, for adapters without `SHADER_F16`).
//!
//! Pipelines are built on first use and cached behind a [`PipelineKey`]; the key's
//! [`PipelineKey::name`] is deterministic (`attn_decode_f16_hd128_r8_bk16`) and is the label
//! wgpu reports in errors.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{GpuError, Result};
use crate::tensor::DType;

/// How a shader reads and writes one buffer's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemStorage {
    /// `array<f32>`.
    F32,
    /// `array<f16>` (needs `SHADER_F16`).
    F16,
    /// f16 pairs in `array<u32>`, read with `unpack2x16float`; writes are done in pairs.
    F16Packed,
}

impl ElemStorage {
    /// Short name used in variant names.
    pub fn name(self) -> &'static str {
        match self {
            ElemStorage::F32 => "f32",
            ElemStorage::F16 => "f16",
            ElemStorage::F16Packed => "f16p",
        }
    }

    /// Bytes per element in memory.
    pub fn elem_bytes(self) -> u64 {
        match self {
            ElemStorage::F32 => 4,
            ElemStorage::F16 | ElemStorage::F16Packed => 2,
        }
    }
}

impl GpuContext {
    /// The storage a kernel uses for a float tensor of `dtype` on this device.
    pub fn elem_storage(&self, dtype: DType) -> Result<ElemStorage> {
        match dtype {
            DType::F32 => Ok(ElemStorage::F32),
            DType::F16 if self.features().shader_f16 => Ok(ElemStorage::F16),
            DType::F16 => Ok(ElemStorage::F16Packed),
            DType::U32 => Err(GpuError::InvalidArgument(
                "expected a float tensor (f32 or f16), got u32".into(),
            )),
        }
    }
}

/// WGSL declaration of a float buffer plus its accessor functions:
/// `NAME_ld(i) -> f32`, `NAME_ld2(i) -> vec2<f32>` (i even) and, when writable,
/// `NAME_st2(i, v)` (i even) and `NAME_st(i, v)` (not for packed f16, where a lone half-word
/// write would race with its neighbour).
pub(crate) fn elem_buffer(
    name: &str,
    binding: u32,
    storage: ElemStorage,
    writable: bool,
) -> String {
    let access = if writable { "read_write" } else { "read" };
    let mut s = String::new();
    match storage {
        ElemStorage::F32 | ElemStorage::F16 => {
            let t = if storage == ElemStorage::F32 {
                "f32"
            } else {
                "f16"
            };
            s += &format!(
                "@group(0) @binding({binding}) var<storage, {access}> {name}: array<{t}>;\n\
                 fn {name}_ld(i: u32) -> f32 {{ return f32({name}[i]); }}\n\
                 fn {name}_ld2(i: u32) -> vec2<f32> {{ return vec2<f32>(f32({name}[i]), f32({name}[i + 1u])); }}\n"
            );
            if writable {
                s += &format!(
                    "fn {name}_st(i: u32, val: f32) {{ {name}[i] = {t}(val); }}\n\
                     fn {name}_st2(i: u32, val: vec2<f32>) {{ {name}[i] = {t}(val.x); {name}[i + 1u] = {t}(val.y); }}\n"
                );
            }
        }
        ElemStorage::F16Packed => {
            s += &format!(
                "@group(0) @binding({binding}) var<storage, {access}> {name}: array<u32>;\n\
                 fn {name}_ld(i: u32) -> f32 {{ let p = unpack2x16float({name}[i >> 1u]); return select(p.x, p.y, (i & 1u) == 1u); }}\n\
                 fn {name}_ld2(i: u32) -> vec2<f32> {{ return unpack2x16float({name}[i >> 1u]); }}\n"
            );
            if writable {
                s += &format!(
                    "fn {name}_st2(i: u32, val: vec2<f32>) {{ {name}[i >> 1u] = pack2x16float(val); }}\n"
                );
            }
        }
    }
    s
}

/// Fills `{{NAME}}` placeholders. Fails (as a pipeline error) if any is left unfilled.
pub(crate) fn render(name: &str, template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(pos) = out.find("{{") {
        let end = out[pos..].find("}}").map_or(out.len(), |e| pos + e + 2);
        return Err(GpuError::Pipeline {
            name: name.to_owned(),
            message: format!("unfilled placeholder {}", &out[pos..end]),
        });
    }
    Ok(out)
}

/// Prefixes `enable f16;` when any storage is native f16.
pub(crate) fn with_f16_header(storages: &[ElemStorage], body: String) -> String {
    if storages.contains(&ElemStorage::F16) {
        format!("enable f16;\n{body}")
    } else {
        body
    }
}

/// The caches below are looked up several times per dispatch (pipeline, parameter block,
/// bind group) with keys that only this crate makes, so they need speed, not the standard
/// hasher's resistance to chosen keys: a multiply-rotate hash over 64-bit words.
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits depending on the low bits only; the table picks
        // buckets by the low bits, so fold the high half in.
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // An odd constant with well-spread bits (the golden ratio's fraction): each word is
        // mixed into the state by a rotate, a xor and a multiply.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A hash map with [`WordHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// Identifies one pipeline variant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// Kernel family and entry, e.g. `attn_decode`.
    pub kernel: &'static str,
    /// Element storage of the buffers whose type varies, in binding order.
    pub elems: Vec<ElemStorage>,
    /// Compile-time constants, in a fixed order, e.g. `[("hd", 128), ("r", 8)]`.
    pub params: Vec<(&'static str, u32)>,
}

impl PipelineKey {
    /// Deterministic variant name: kernel, element types, then `{param}{value}` parts.
    pub fn name(&self) -> String {
        let mut s = self.kernel.to_owned();
        for e in &self.elems {
            s.push('_');
            s.push_str(e.name());
        }
        for (k, v) in &self.params {
            s.push_str(&format!("_{k}{v}"));
        }
        s
    }
}

/// Kinds of bindings, in binding order (binding `i` is `bindings[i]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

/// A built pipeline with the bind-group layout its wrapper declared.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// The WGSL the pipeline was built from (for [`GpuContext::kernel_sources`]).
    pub source: String,
}

/// Lazily filled map from key to pipeline.
#[derive(Default)]
pub(crate) struct PipelineCache {
    map: Mutex<FastMap<PipelineKey, Arc<Kernel>>>,
    /// Uniform buffers by (padded) content; see [`GpuContext::uniform`].
    uniforms: Mutex<FastMap<Vec<u32>, wgpu::Buffer>>,
    /// Nanoseconds spent building pipelines (source, naga, driver), for
    /// [`GpuContext::kernel_build_time`].
    build_nanos: std::sync::atomic::AtomicU64,
}

/// Distinct parameter blocks kept alive by the uniform cache.
const UNIFORM_CACHE_MAX: usize = 4096;
/// Bind groups kept by a [`BindGroupCache`] (each keeps its buffers alive).
const BIND_GROUP_CACHE_MAX: usize = 4096;

/// Bind groups by kernel and bound buffer ranges, for [`GpuContext::batch_passes_cached`]: a
/// decode step binds mostly the same weights, activations, pools and parameter blocks every
/// time, and creating a bind group costs host time. Every cached bind group keeps its
/// buffers alive, so the cache belongs to whoever knows when those buffers go away (a
/// decoder: it clears the cache before it replaces its work buffers, and drops it with
/// itself). Holds at most a few thousand entries: buffers made for one step only are let go
/// a few dozen steps later.
#[derive(Default)]
pub struct BindGroupCache {
    map: Mutex<FastMap<BindKey, wgpu::BindGroup>>,
}

impl BindGroupCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every cached bind group (and with them the cache's hold on their buffers).
    pub fn clear(&self) {
        if let Ok(mut m) = self.map.lock() {
            m.clear();
        }
    }

    /// Cached bind groups.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A kernel (its address in the never-emptied pipeline cache) and the buffer ranges bound to
/// it, in binding order. The key holds clones of the buffer handles, so a buffer in the
/// cache is never freed and its identity never reused by another buffer.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    kernel: usize,
    buffers: Vec<(wgpu::Buffer, u64, Option<wgpu::BufferSize>)>,
}

impl PipelineCache {
    /// `f` of every built pipeline, sorted (by name when `f` starts with it).
    fn sorted<T: Ord>(&self, f: impl Fn(&PipelineKey, &Kernel) -> T) -> Vec<T> {
        let mut v: Vec<T> = self
            .map
            .lock()
            .map(|m| m.iter().map(|(k, kernel)| f(k, kernel)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    pub(crate) fn sources(&self) -> Vec<(String, String)> {
        self.sorted(|k, kernel| (k.name(), kernel.source.clone()))
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.sorted(|k, _| k.name())
    }

    pub(crate) fn build_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.build_nanos.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl GpuContext {
    /// Returns the cached pipeline for `key`, building it from `source()` on first use.
    pub(crate) fn kernel(
        &self,
        key: PipelineKey,
        bindings: &[Bind],
        source: impl FnOnce(&str) -> Result<String>,
    ) -> Result<Arc<Kernel>> {
        let lock_err = || GpuError::Device("pipeline cache poisoned".into());
        if let Some(k) = self.pipelines.map.lock().map_err(|_| lock_err())?.get(&key) {
            return Ok(Arc::clone(k));
        }
        let started = std::time::Instant::now();
        let name = key.name();
        let src = source(&name)?;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Bind::Uniform => wgpu::BufferBindingType::Uniform,
                        Bind::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Bind::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&name),
                entries: &entries,
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(&name),
            source: wgpu::ShaderSource::Wgsl(src.as_str().into()),
        };
        let module = if self.features().unchecked_shaders {
            // SAFETY: every dispatch of a kernel goes through its wrapper in `ops`, which
            // checks the shapes against the bound buffers' sizes and the binding limits
            // first; the shaders index only inside those shapes (each kernel's property
            // test runs it with poisoned, exactly sized outputs). Dropping wgpu's
            // per-access bounds checks saves an index clamp on every load and store.
            unsafe {
                self.device
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            self.device.create_shader_module(desc)
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&name),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Pipeline {
                name,
                message: err.to_string(),
            });
        }
        let k = Arc::new(Kernel {
            pipeline,
            layout,
            source: src,
        });
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.pipelines
            .build_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        self.pipelines
            .map
            .lock()
            .map_err(|_| lock_err())?
            .insert(key, Arc::clone(&k));
        Ok(k)
    }

    /// A uniform buffer holding `words` (padded to 16 bytes). Parameter blocks never change
    /// once written, so buffers are shared by content: a decode step that records the same
    /// shapes every step allocates no new uniform buffers after the first.
    pub(crate) fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let mut w = words.to_vec();
        w.resize(words.len().div_ceil(4).max(1) * 4, 0);
        if let Ok(mut cache) = self.pipelines.uniforms.lock() {
            if let Some(b) = cache.get(&w) {
                return b.clone();
            }
            // Bounded: shapes that change every call (growing lengths) must not pile up.
            if cache.len() >= UNIFORM_CACHE_MAX {
                cache.clear();
            }
            let b = self.create_uniform(&w);
            cache.insert(w, b.clone());
            return b;
        }
        self.create_uniform(&w)
    }

    fn create_uniform(&self, padded_words: &[u32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("cla params"),
                contents: bytemuck::cast_slice(padded_words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// Records one dispatch of `kernel` with `resources` bound in order.
    pub(crate) fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        kernel: &Kernel,
        resources: &[wgpu::BindingResource<'_>],
        groups: (u32, u32, u32),
    ) {
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        let record = |pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup| {
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        };
        // Inside a `batch_passes` scope on this encoder: the scope's pass (and bind groups).
        if let Ok(mut open_passes) = self.open_pass.lock()
            && let Some(open) = open_passes.get_mut(&encoder_key(encoder))
        {
            let bg = self.bind_group(kernel, resources, open.bind_groups.as_deref());
            record(&mut open.pass, &bg);
            return;
        }
        let bg = self.bind_group(kernel, resources, None);
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        record(&mut pass, &bg);
    }

    /// The bind group of `kernel` with `resources`, from `cache` when the same buffer ranges
    /// were bound to it before.
    fn bind_group(
        &self,
        kernel: &Kernel,
        resources: &[wgpu::BindingResource<'_>],
        cache: Option<&BindGroupCache>,
    ) -> wgpu::BindGroup {
        let create = || {
            let entries: Vec<wgpu::BindGroupEntry> = resources
                .iter()
                .enumerate()
                .map(|(i, r)| wgpu::BindGroupEntry {
                    binding: i as u32,
                    resource: r.clone(),
                })
                .collect();
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &kernel.layout,
                entries: &entries,
            })
        };
        let Some(cache) = cache else {
            return create();
        };
        let buffers: Option<Vec<_>> = resources
            .iter()
            .map(|r| match r {
                wgpu::BindingResource::Buffer(b) => Some((b.buffer.clone(), b.offset, b.size)),
                _ => None,
            })
            .collect();
        let (Some(buffers), Ok(mut map)) = (buffers, cache.map.lock()) else {
            return create();
        };
        let key = BindKey {
            kernel: std::ptr::from_ref(kernel) as usize,
            buffers,
        };
        if let Some(bg) = map.get(&key) {
            return bg.clone();
        }
        if map.len() >= BIND_GROUP_CACHE_MAX {
            map.clear();
        }
        let bg = create();
        map.insert(key, bg.clone());
        bg
    }

    /// Records every later dispatch on `encoder` into one compute pass until the returned
    /// guard is dropped (wgpu orders the dispatches of a pass and inserts the barriers
    /// between them), instead of one pass per dispatch: a decode step records hundreds of
    /// dispatches, and each pass costs host time. Until the guard is dropped `encoder` must
    /// not be used for anything but dispatches of this crate (no copies, no `finish`; or call
    /// [`GpuContext::end_batch`] first). Scopes on different encoders (threads) are
    /// independent; a new scope on the same encoder ends the old one's pass.
    pub fn batch_passes(&self, encoder: &mut wgpu::CommandEncoder) -> PassBatch<'_> {
        self.open_batch(encoder, None)
    }

    /// [`GpuContext::batch_passes`] that also takes the scope's bind groups from `cache` (and
    /// adds the ones it creates), see [`BindGroupCache`].
    pub fn batch_passes_cached(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        cache: Arc<BindGroupCache>,
    ) -> PassBatch<'_> {
        self.open_batch(encoder, Some(cache))
    }

    fn open_batch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        bind_groups: Option<Arc<BindGroupCache>>,
    ) -> PassBatch<'_> {
        let pass = encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("cla batched dispatches"),
                timestamp_writes: None,
            })
            .forget_lifetime();
        static NEXT_SCOPE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let scope = NEXT_SCOPE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let open = OpenPass {
            encoder: encoder_key(encoder),
            scope,
            pass,
            bind_groups,
        };
        match self.open_pass.lock() {
            Ok(mut open_passes) => {
                // A scope still open on this encoder ends here.
                open_passes.insert(open.encoder, open);
            }
            // A poisoned lock: end the pass now; dispatches fall back to a pass each.
            Err(_) => drop(open),
        }
        PassBatch { ctx: self, scope }
    }

    /// Ends the [`GpuContext::batch_passes`] pass open on `encoder`, if any, so that the
    /// encoder can record copies or be finished; the scope's guard then has nothing to end.
    pub fn end_batch(&self, encoder: &wgpu::CommandEncoder) {
        if let Ok(mut open_passes) = self.open_pass.lock() {
            open_passes.remove(&encoder_key(encoder));
        }
    }

    /// Splits `n` workgroups into an `(x, y)` grid within the per-dimension limit; shaders
    /// linearise it as `wid.x + wid.y * nwg.x` and skip ids `>= n`.
    pub(crate) fn grid(&self, n: u64) -> Result<(u32, u32)> {
        let max = u64::from(self.features().max_workgroups_per_dim.max(1));
        if n <= max {
            return Ok((n as u32, 1));
        }
        let y = n.div_ceil(max);
        if y > max {
            return Err(GpuError::NotAvailable(format!(
                "{n} workgroups exceed the adapter's {max}x{max} grid"
            )));
        }
        Ok((max as u32, y as u32))
    }

    /// Checks a binding size against the adapter's limit.
    pub(crate) fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let max = self.features().max_storage_binding;
        if bytes > max {
            return Err(GpuError::NotAvailable(format!(
                "{what}: a binding of {bytes} bytes exceeds the adapter's storage binding limit of {max}"
            )));
        }
        Ok(())
    }

    /// Binds `elems` elements of `elem_bytes` starting at element `first` of `buffer`, through
    /// a window whose offset respects the adapter's alignment. Returns the binding and the
    /// element offset of `first` inside the window. Lets one large buffer (e.g. a KV pool of
    /// many layers) be read in per-layer windows below the binding limit.
    pub(crate) fn window<'a>(
        &self,
        what: &str,
        buffer: &'a wgpu::Buffer,
        first: u64,
        elems: u64,
        elem_bytes: u64,
    ) -> Result<(wgpu::BindingResource<'a>, u64)> {
        let align = u64::from(self.features().storage_offset_alignment.max(4));
        let start = first * elem_bytes;
        let offset = start / align * align;
        let end = (start + elems * elem_bytes).div_ceil(4) * 4;
        if end > buffer.size() {
            return Err(GpuError::InvalidArgument(format!(
                "{what}: elements up to byte {end} are addressed but the buffer has {} bytes",
                buffer.size()
            )));
        }
        let size = end - offset;
        self.check_binding(what, size)?;
        Ok((
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: wgpu::BufferSize::new(size.max(4)),
            }),
            (start - offset) / elem_bytes,
        ))
    }
}

/// Whole-buffer binding of a tensor.
pub(crate) fn whole(t: &crate::tensor::GpuTensor) -> wgpu::BindingResource<'_> {
    t.buffer.as_entire_binding()
}

/// The open pass of a [`GpuContext::batch_passes`] scope and the encoder it belongs to.
pub(crate) struct OpenPass {
    /// Identity of the encoder ([`encoder_key`]).
    encoder: u64,
    /// Which `batch_passes` call opened it (a guard ends only its own pass).
    scope: u64,
    pass: wgpu::ComputePass<'static>,
    /// Where the scope's bind groups come from, if anywhere.
    bind_groups: Option<Arc<BindGroupCache>>,
}

/// Identity of an encoder that survives moves: wgpu compares and hashes encoders by their
/// shared inner object.
fn encoder_key(encoder: &wgpu::CommandEncoder) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encoder.hash(&mut h);
    h.finish()
}

/// Ends the shared compute pass of [`GpuContext::batch_passes`] when dropped.
#[must_use = "the pass is ended when the guard is dropped"]
pub struct PassBatch<'a> {
    ctx: &'a GpuContext,
    scope: u64,
}

impl Drop for PassBatch<'_> {
    fn drop(&mut self) {
        if let Ok(mut open_passes) = self.ctx.open_pass.lock() {
            open_passes.retain(|_, open| open.scope != self.scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{both_ctx, values};

    /// Asserts `got == x + times * y` element by element (relative 1e-5, absolute near 0).
    fn assert_added(got: &[f32], x: &[f32], y: &[f32], times: f32) {
        assert_eq!(got.len(), x.len(), "length");
        for (i, ((g, x), y)) in got.iter().zip(x).zip(y).enumerate() {
            let want = x + times * y;
            assert!(
                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{i}: {g} vs {want}"
            );
        }
    }

    /// Dependent dispatches in one batched pass see each other's writes (x += y five times),
    /// scopes on two encoders are open at once, the first guard's drop leaves the second
    /// scope's pass alone, and a moved encoder stays in its scope.
    #[test]
    fn batched_passes_keep_dispatch_order_and_scopes_apart() {
        for c in both_ctx() {
            let n = 1000;
            let (xv, yv) = (values(1, n), values(2, n));
            let x = c.upload_f32(&xv, &[n]).unwrap();
            let y = c.upload_f32(&yv, &[n]).unwrap();
            let x2 = c.upload_f32(&xv, &[n]).unwrap();

            let mut enc = c.encoder();
            let first = c.batch_passes(&mut enc);
            for _ in 0..3 {
                c.add_assign(&mut enc, &x, &y).unwrap();
            }
            let mut enc2 = c.encoder();
            let second = c.batch_passes(&mut enc2);
            // Scopes on two encoders at once.
            for _ in 0..2 {
                c.add_assign(&mut enc, &x, &y).unwrap();
            }
            drop(first);
            // Moving the encoder keeps it in its scope (a dispatch outside the scope's pass
            // while the pass is open would fail validation).
            let mut enc2 = std::hint::black_box(enc2);
            for _ in 0..4 {
                c.add_assign(&mut enc2, &x2, &y).unwrap();
            }
            drop(second);
            c.submit_and_wait(enc).unwrap();
            c.submit_and_wait(enc2).unwrap();

            assert_added(&c.read_f32(&x).unwrap(), &xv, &yv, 5.0);
            assert_added(&c.read_f32(&x2).unwrap(), &xv, &yv, 4.0);
        }
    }

    /// A cached scope reuses the bind groups of an identical earlier one (the cache does not
    /// grow) and computes the same; new buffers get new entries; `clear` empties it.
    #[test]
    fn cached_bind_groups_are_reused_for_the_same_buffers() {
        for c in both_ctx() {
            let n = 300;
            let (xv, yv) = (values(3, n), values(4, n));
            let x = c.upload_f32(&xv, &[n]).unwrap();
            let y = c.upload_f32(&yv, &[n]).unwrap();
            let cache = std::sync::Arc::new(super::BindGroupCache::new());
            let step = |x: &crate::GpuTensor| {
                let mut enc = c.encoder();
                let passes = c.batch_passes_cached(&mut enc, std::sync::Arc::clone(&cache));
                c.add_assign(&mut enc, x, &y).unwrap();
                c.add_assign(&mut enc, x, &y).unwrap();
                drop(passes);
                c.submit_and_wait(enc).unwrap();
            };
            step(&x);
            let after_one = cache.len();
            assert!(after_one >= 1);
            step(&x);
            assert_eq!(cache.len(), after_one, "same buffers, same bind groups");
            assert_added(&c.read_f32(&x).unwrap(), &xv, &yv, 4.0);
            let other = c.upload_f32(&xv, &[n]).unwrap();
            step(&other);
            assert!(cache.len() > after_one, "a new buffer is a new entry");
            cache.clear();
            assert!(cache.is_empty());
        }
    }
}
