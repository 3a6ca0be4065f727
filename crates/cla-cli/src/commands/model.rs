//! What the commands that run a model share: finding the model directory, choosing the
//! device, building a decoder, and the KV-cache element type.

use crate::failure::{CliError, CliResult};
use cla_kernels_wgpu::context::{DEVICE_ENV, DISABLE_ENV};
use cla_kernels_wgpu::{AdapterFilter, DeviceSelector, GpuContext};
use cla_kv::{KvCacheConfig, KvDType};
use cla_model::{
    CpuDecoder, Decoder, GpuDecoder, GpuDecoderOptions, GpuWeightDType, LoadedModel, ModelError,
    ModelWeights, cache_config_for,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Environment variable naming the default model directory.
pub const MODEL_ENV: &str = "CLA_MODEL";

/// The model shipped in the repository, relative to its root.
pub const SHIPPED_MODEL: &str = "models/small-mqa-cla2";

/// The model directory to use: `--model` if given; else `$CLA_MODEL`; else the shipped
/// model relative to the current directory; else relative to the repository this binary
/// was built from.
pub fn resolve_model_dir(given: Option<&Path>) -> CliResult<PathBuf> {
    if let Some(dir) = given {
        return check_model_dir(dir, "--model");
    }
    if let Some(dir) = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()) {
        return check_model_dir(Path::new(&dir), MODEL_ENV);
    }
    let here = PathBuf::from(SHIPPED_MODEL);
    if here.is_dir() {
        return Ok(here);
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(SHIPPED_MODEL);
    if built_from.is_dir() {
        return Ok(built_from);
    }
    Err(CliError::user(format!(
        "no model given and the default model ({SHIPPED_MODEL}) was not found; pass \
         --model DIR (a directory with config.json, model.safetensors and tokenizer.json) \
         or set {MODEL_ENV}"
    )))
}

fn check_model_dir(dir: &Path, from: &str) -> CliResult<PathBuf> {
    if dir.is_dir() {
        Ok(dir.to_path_buf())
    } else if dir.exists() {
        Err(CliError::user(format!(
            "{from} {}: not a directory; pass the model directory (with config.json, \
             model.safetensors and tokenizer.json)",
            dir.display()
        )))
    } else {
        Err(CliError::user(format!(
            "{from} {}: no such directory; pass a model directory (with config.json, \
             model.safetensors and tokenizer.json), e.g. --model {SHIPPED_MODEL}",
            dir.display()
        )))
    }
}

/// Loads a model directory (config, weights, tokenizer), naming the directory in errors.
pub fn load_model(dir: &Path) -> CliResult<LoadedModel> {
    let started = std::time::Instant::now();
    let model = LoadedModel::load(dir).map_err(|e| in_model(dir, e))?;
    log::info!(
        "loaded {} ({} parameters) in {:.2}s",
        dir.display(),
        model.weights.num_parameters(),
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// Loads only the config and weights of a model directory (no tokenizer needed).
pub fn load_weights(dir: &Path) -> CliResult<ModelWeights> {
    ModelWeights::load(dir).map_err(|e| in_model(dir, e))
}

/// A model error, prefixed with the model directory when the message does not name a path.
pub fn in_model(dir: &Path, e: cla_model::ModelError) -> CliError {
    use cla_model::ModelError as M;
    let names_path = matches!(
        e,
        M::MissingFile { .. } | M::Io { .. } | M::Safetensors { .. }
    );
    match CliError::from(e) {
        CliError::User(m) if !names_path => CliError::User(format!("model {}: {m}", dir.display())),
        other => other,
    }
}

/// Where a model runs (`--device`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The default: a hardware GPU when there is one (the adapter `Gpu(None)` would open),
    /// else the CPU reference decoder.
    #[default]
    Auto,
    /// The CPU reference decoder.
    Cpu,
    /// A GPU through wgpu; the text selects the adapter as `CLA_DEVICE` does (an index, a
    /// backend, `cpu` for a software driver, or a name substring; `cla devices` lists them).
    Gpu(Option<String>),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu(None)),
            _ => match lower.strip_prefix("gpu:") {
                Some(name) if !name.trim().is_empty() => {
                    Ok(DeviceChoice::Gpu(Some(t[4..].trim().to_string())))
                }
                Some(_) => Err("`gpu:` needs an adapter name or index, e.g. gpu:0".into()),
                None => Err(format!(
                    "unknown device `{t}`: use auto, cpu, gpu or gpu:NAME (`cla devices` lists \
                     the GPU adapters)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Gpu(None) => f.write_str("gpu"),
            DeviceChoice::Gpu(Some(name)) => write!(f, "gpu:{name}"),
        }
    }
}

/// A decoder on the chosen device, and a short description of where it runs.
pub struct ChosenDecoder {
    /// The decoder.
    pub decoder: Box<dyn Decoder>,
    /// Where it runs, for summaries and JSON (`"cpu"`).
    pub device: String,
    /// The element type of its KV cache (`--kv-dtype auto` settled).
    pub kv_dtype: KvDType,
    /// The GPU context of a GPU decoder (for its kernel build time).
    pub gpu: Option<Arc<GpuContext>>,
}

/// Where a model runs and in what precision: the `--device`, `--kv-dtype` and `--gpu-weights`
/// options of `generate`, `eval` and `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOn {
    /// Where to run: auto (the best hardware GPU, else the CPU), cpu, gpu (the best GPU
    /// adapter) or gpu:NAME (an adapter by index, backend, name substring, or `cpu` for a
    /// software Vulkan driver).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// Element type of the KV cache: f32, f16, or auto (f16 on a GPU, where the fastest
    /// attention kernels need it; f32 on the CPU).
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = parse_kv_dtype)]
    pub kv_dtype: KvDTypeChoice,

    /// Element type of the weight matrices on a GPU: f32 (the CPU decoder's values) or f16
    /// (half the memory; tensor cores where the GPU has them). Ignored on the CPU.
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = parse_gpu_weights)]
    pub gpu_weights: GpuWeightDType,
}

/// Builds a decoder for `weights` where `run_on` says, with a KV cache for `sequences`
/// sequences of up to `tokens` positions each, its element type settled for the device.
///
/// `gpu[:NAME]` opens a wgpu adapter (chosen as `CLA_DEVICE` would choose it;
/// `CLA_GPU_DISABLE` applies) and uploads the weights; `cpu` is the CPU reference decoder;
/// `auto` is the GPU `gpu` would open when that is a hardware GPU, else the CPU decoder (a
/// software adapter such as lavapipe is slower than the CPU decoder, so `auto` never picks
/// one; `--device gpu` with `CLA_DEVICE=cpu` does).
pub fn make_decoder(
    run_on: &RunOn,
    weights: Arc<ModelWeights>,
    tokens: usize,
    sequences: usize,
) -> CliResult<ChosenDecoder> {
    let gpu_weights = run_on.gpu_weights;
    let on = |gpu: bool| cache_config_for(tokens, sequences, run_on.kv_dtype.resolve(gpu));
    match &run_on.device {
        DeviceChoice::Cpu => cpu_decoder(weights, on(false), gpu_weights),
        DeviceChoice::Gpu(name) => {
            let started = std::time::Instant::now();
            // Errors pass as `ModelError::Gpu`: `failure` tells what the user can fix (no
            // adapter, a bad selector, a missing feature: exit 1, with how to fix it) from a
            // failing device (exit 2).
            let ctx = GpuContext::new(&selector(name.as_deref())?).map_err(ModelError::Gpu)?;
            gpu_decoder(ctx, started, &weights, on(true), gpu_weights)
        }
        DeviceChoice::Auto => {
            let started = std::time::Instant::now();
            let selector = selector(None)?;
            if selector.filter == AdapterFilter::Cpu {
                log::info!("device auto: {DEVICE_ENV} selects a software adapter; using the CPU");
                return cpu_decoder(weights, on(false), gpu_weights);
            }
            match GpuContext::new(&selector) {
                Ok(ctx) if ctx.is_software() => {
                    let name = &ctx.info().name;
                    log::info!("device auto: {name} is a software adapter; using the CPU");
                }
                Ok(ctx) => match gpu_decoder(ctx, started, &weights, on(true), gpu_weights) {
                    Ok(chosen) => return Ok(chosen),
                    Err(e) => {
                        log::warn!("device auto: the GPU decoder failed ({e}); using the CPU")
                    }
                },
                Err(e) => {
                    log::info!("device auto: no hardware GPU; using the CPU");
                    log::debug!("device auto: {e}");
                }
            }
            cpu_decoder(weights, on(false), gpu_weights)
        }
    }
}

/// The adapter selector from the environment, narrowed to `name` when given.
fn selector(name: Option<&str>) -> CliResult<DeviceSelector> {
    let mut selector = DeviceSelector::from_env().map_err(|e| {
        // A typo in an environment variable is the user's, whatever the variant.
        CliError::user(format!(
            "{}; fix or unset {DEVICE_ENV} / {DISABLE_ENV}",
            e.to_string().trim_end().trim_end_matches('.')
        ))
    })?;
    if let Some(name) = name {
        selector.filter = DeviceSelector::parse(name).map_err(ModelError::Gpu)?.filter;
    }
    Ok(selector)
}

/// The CPU decoder; `gpu_weights` other than f32 were asked for a GPU and are ignored here.
fn cpu_decoder(
    weights: Arc<ModelWeights>,
    cache: KvCacheConfig,
    gpu_weights: GpuWeightDType,
) -> CliResult<ChosenDecoder> {
    if gpu_weights != GpuWeightDType::F32 {
        log::warn!("--gpu-weights applies to a GPU; the CPU decoder computes in f32");
    }
    let decoder = CpuDecoder::new(weights, cache)?;
    log::info!(
        "device: cpu ({} threads), KV cache {} blocks of {} tokens ({})",
        cpu_threads(),
        cache.num_blocks,
        cache.block_size,
        cache.dtype
    );
    Ok(ChosenDecoder {
        decoder: Box::new(decoder),
        device: "cpu".into(),
        kv_dtype: cache.dtype,
        gpu: None,
    })
}

fn gpu_decoder(
    ctx: GpuContext,
    started: std::time::Instant,
    weights: &ModelWeights,
    cache: KvCacheConfig,
    weight_dtype: GpuWeightDType,
) -> CliResult<ChosenDecoder> {
    let info = ctx.info();
    let mut description = format!("gpu: {} ({:?})", info.name, info.backend);
    if weight_dtype == GpuWeightDType::F16 {
        description += ", f16 weights";
    }
    let options = GpuDecoderOptions {
        weight_dtype,
        ..GpuDecoderOptions::default()
    };
    let ctx = Arc::new(ctx);
    let decoder = GpuDecoder::with_options(Arc::clone(&ctx), weights, cache, options)?;
    log::info!(
        "device: {description}, weights uploaded in {:.2}s, KV cache {} blocks of {} tokens ({})",
        started.elapsed().as_secs_f64(),
        cache.num_blocks,
        cache.block_size,
        cache.dtype
    );
    Ok(ChosenDecoder {
        decoder: Box::new(decoder),
        device: description,
        kv_dtype: cache.dtype,
        gpu: Some(ctx),
    })
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--kv-dtype`: a fixed element type for the KV cache, or `auto`: f16 on a GPU (half the
/// cache, and the tensor-core and wide lane attention kernels need it), f32 on the CPU (the
/// reference decoder's exact values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDTypeChoice {
    /// f16 on a GPU, f32 on the CPU.
    Auto,
    /// This type on any device.
    Fixed(KvDType),
}

impl KvDTypeChoice {
    /// The element type for a decoder on a GPU (`gpu`) or on the CPU.
    pub fn resolve(self, gpu: bool) -> KvDType {
        match self {
            KvDTypeChoice::Auto if gpu => KvDType::F16,
            KvDTypeChoice::Auto => KvDType::F32,
            KvDTypeChoice::Fixed(d) => d,
        }
    }
}

impl fmt::Display for KvDTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvDTypeChoice::Auto => f.write_str("auto"),
            KvDTypeChoice::Fixed(d) => write!(f, "{d}"),
        }
    }
}

/// Parses `--kv-dtype`.
pub fn parse_kv_dtype(s: &str) -> Result<KvDTypeChoice, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(KvDTypeChoice::Auto),
        "f32" | "float32" => Ok(KvDTypeChoice::Fixed(KvDType::F32)),
        "f16" | "float16" | "half" => Ok(KvDTypeChoice::Fixed(KvDType::F16)),
        other => Err(format!(
            "the KV cache stores f32 or f16 (or auto: f16 on a GPU, f32 on the CPU), not `{other}`"
        )),
    }
}

/// Parses `--gpu-weights`.
pub fn parse_gpu_weights(s: &str) -> Result<GpuWeightDType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(GpuWeightDType::F32),
        "f16" | "float16" | "half" => Ok(GpuWeightDType::F16),
        other => Err(format!(
            "the GPU keeps weight matrices as f32 or f16, not `{other}`"
        )),
    }
}

/// A comma-separated list of positive integers on the command line (`1,4,16`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberList(pub Vec<usize>);

/// Parses a comma-separated list of positive integers (`1,4,16`).
pub fn parse_list(s: &str) -> Result<NumberList, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("`{s}` has an empty item; write e.g. 1,4,16"));
        }
        let n: usize = part
            .parse()
            .map_err(|_| format!("`{part}` is not a positive whole number; write e.g. 1,4,16"))?;
        if n == 0 {
            return Err("values must be at least 1".into());
        }
        out.push(n);
    }
    Ok(NumberList(out))
}

/// Whether stderr is a terminal (progress bars and colours only then).
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_dtype_auto_is_f16_on_a_gpu_and_f32_on_the_cpu() {
        let auto = parse_kv_dtype(" AUTO ").unwrap();
        assert_eq!(auto, KvDTypeChoice::Auto);
        assert_eq!(
            (auto.resolve(true), auto.resolve(false)),
            (KvDType::F16, KvDType::F32)
        );
        for (text, d) in [("f32", KvDType::F32), ("half", KvDType::F16)] {
            let fixed = parse_kv_dtype(text).unwrap();
            assert_eq!(
                (fixed.resolve(true), fixed.resolve(false)),
                (d, d),
                "{text}"
            );
            assert_eq!(fixed.to_string(), d.to_string());
        }
        assert_eq!(auto.to_string(), "auto");
        assert!(parse_kv_dtype("int8").unwrap_err().contains("not `int8`"));
    }
}
