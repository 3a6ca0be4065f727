//! `cla bench`: prefill and decode speed of a model over a grid of batch sizes and
//! contexts, with the KV-cache bytes each cell used. Works on a model directory, or on a
//! config or preset with random weights of the right shapes.

use super::model;
use crate::failure::{self, CliError, CliResult};
use crate::interrupt;
use cla_core::memory::{kv_bytes_for_batch, kv_bytes_per_token};
use cla_core::{ByteSize, ConfigError, DType, ModelConfig, ParamCount, ParamOptions, presets};
use cla_model::{Decoder, ModelWeights, SequenceStep, SplitMix64, run_greedy_steps};
use clap::{ArgGroup, Args};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

const EXAMPLES: &str = "\
Examples:
  cla bench
  cla bench --model models/small-mqa --batch 1,8 --context 64,256
  cla bench --config tiny.json --json
  cla bench --preset H128-MQA-CLA2 --max-weight-bytes 8GiB --batch 1 --context 128";

const LONG_HELP: &str = "\
Examples:
  cla bench
  cla bench --model models/small-mqa --batch 1,8 --context 64,256
  cla bench --config tiny.json --json
  cla bench --preset H128-MQA-CLA2 --max-weight-bytes 8GiB --batch 1 --context 128

Each cell of the grid runs BATCH sequences: a batched prefill of CONTEXT - DECODE random token
ids each, then DECODE batched greedy decode steps, each feeding back the token the model chose
(as `cla generate` does: on a GPU each step is submitted before the previous one's tokens are
read back), so every sequence ends at CONTEXT tokens. Prefill tokens/s counts the prompt tokens of the whole
batch; decode tokens/s counts one token per sequence per step. Peak KV bytes is what the
cache held at the end. A short warm-up runs first. Contexts default to 128 and 512, capped at
the model's max_position_embeddings; an explicit context above it is an error.

With --config or --preset the weights are random (seeded by --seed), which is as fast as real
ones. They are held in memory as f32; a model whose weights would exceed --max-weight-bytes
is refused.

JSON output (--json) is one object with the keys
  command (\"bench\"), model {name, source (\"model\"|\"config\"|\"preset\"), params,
  weight_bytes_f32, kv_bytes_per_token, max_position_embeddings}, device, kv_dtype,
  rows: [{batch, context, prompt_tokens, decode_steps, prefill_seconds,
  prefill_tokens_per_second, decode_seconds, decode_tokens_per_second,
  decode_ms_per_step, peak_kv_bytes}].";

/// Arguments of `cla bench`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES, after_long_help = LONG_HELP)]
#[command(group(ArgGroup::new("source").args(["model", "config", "preset"])))]
pub struct BenchArgs {
    /// Model directory (its real weights); the default when neither --config nor --preset is
    /// given: $CLA_MODEL, else models/small-mqa-cla2.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// A config.json: random weights of its shapes.
    #[arg(long, value_name = "CONFIG_JSON")]
    pub config: Option<PathBuf>,

    /// A model of the paper (see `cla kv --help`): random weights of its shapes.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// Batch sizes, comma-separated.
    #[arg(long, value_name = "LIST", default_value = "1,4", value_parser = model::parse_list)]
    pub batch: model::NumberList,

    /// Contexts (tokens per sequence at the end), comma-separated; default 128,512 capped at
    /// the model's context.
    #[arg(long, value_name = "LIST", value_parser = model::parse_list)]
    pub context: Option<model::NumberList>,

    /// Decode steps per cell (at most context - 1).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..100_000))]
    pub decode: u64,

    /// Seed of the random weights and token ids.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,

    /// Refuse random weights larger than this in memory (f32), e.g. 4GiB, 512MiB.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub max_weight_bytes: u64,

    /// Where to run, and in what precision.
    #[command(flatten)]
    pub run_on: model::RunOn,

    /// Print one JSON object (keys: see --help).
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    cla_core::ByteSize::parse("--max-weight-bytes", s)
        .map(cla_core::ByteSize::bytes)
        .map_err(|e| match e {
            ConfigError::BadQuantity { reason, .. } => reason,
            other => other.to_string(),
        })
}

#[derive(Serialize)]
struct Output {
    command: &'static str,
    model: ModelInfo,
    device: String,
    kv_dtype: String,
    rows: Vec<Row>,
}

#[derive(Serialize)]
struct ModelInfo {
    name: String,
    source: &'static str,
    params: u64,
    weight_bytes_f32: u64,
    kv_bytes_per_token: u64,
    max_position_embeddings: usize,
}

#[derive(Serialize)]
struct Row {
    batch: usize,
    context: usize,
    prompt_tokens: usize,
    decode_steps: usize,
    prefill_seconds: f64,
    prefill_tokens_per_second: f64,
    decode_seconds: f64,
    decode_tokens_per_second: f64,
    decode_ms_per_step: f64,
    peak_kv_bytes: u64,
}

/// The model to run and where it came from.
struct Subject {
    name: String,
    source: &'static str,
    config: ModelConfig,
    options: ParamOptions,
    /// Loaded weights (a model directory); `None` for random weights.
    weights: Option<ModelWeights>,
}

/// Runs `cla bench`.
pub fn run(args: &BenchArgs) -> CliResult {
    let subject = subject(args)?;
    let config = subject.config.clone();
    let max = config.max_position_embeddings;
    let contexts = contexts(args, max)?;
    let batches = &args.batch.0;
    let params = ParamCount::of(&config, subject.options);
    let weight_bytes = params.bytes(DType::F32);
    let longest = contexts.iter().copied().max().unwrap_or(0) as u64;
    let largest = batches.iter().copied().max().unwrap_or(0) as u64;
    // Before the device is known, `auto` counts as the larger f32.
    let biggest_kv = kv_bytes_for_batch(
        &config,
        args.run_on.kv_dtype.resolve(false).to_dtype(),
        largest,
        longest,
    );
    if let Some(available) = available_memory()
        && weight_bytes.saturating_add(biggest_kv) > available
    {
        eprintln!(
            "warning: {} needs {} of f32 weights and up to {} of KV cache, more than the {} of \
             memory available; it may swap or be killed",
            subject.name,
            ByteSize(weight_bytes),
            ByteSize(biggest_kv),
            ByteSize(available)
        );
    }
    let weights = match subject.weights {
        Some(w) => w,
        None => {
            if weight_bytes > args.max_weight_bytes {
                return Err(CliError::user(format!(
                    "{}: random weights would take {} in memory (f32, {} parameters), above \
                     --max-weight-bytes {}; pick a smaller model or raise --max-weight-bytes",
                    subject.name,
                    ByteSize(weight_bytes),
                    params.total(),
                    ByteSize(args.max_weight_bytes)
                )));
            }
            let started = Instant::now();
            let w = ModelWeights::random_with(
                &config,
                &cla_model::RandomWeightsOptions {
                    seed: args.seed,
                    kv_input_norm: subject.options.kv_input_layernorm,
                },
            );
            log::info!(
                "random weights for {} ({} parameters) in {:.2}s",
                subject.name,
                params.total(),
                started.elapsed().as_secs_f64()
            );
            w
        }
    };
    let weights = Arc::new(weights);

    interrupt::install();
    let mut rows = Vec::new();
    let mut device = String::new();
    let mut kv_dtype = args.run_on.kv_dtype.resolve(false);
    let mut rng = SplitMix64::new(args.seed ^ 0x0062_656E_6368);
    let mut warmed_up = false;
    for &batch in batches {
        for &context in &contexts {
            let decode = (args.decode as usize).min(context - 1);
            let prompt = context - decode;
            if interrupt::requested() {
                return Err(CliError::Interrupted);
            }
            let mut chosen =
                model::make_decoder(&args.run_on, Arc::clone(&weights), context, batch)?;
            device = chosen.device.clone();
            kv_dtype = chosen.kv_dtype;
            let decoder = chosen.decoder.as_mut();
            if !warmed_up {
                warm_up(decoder, &mut rng)?;
                warmed_up = true;
            }
            log::info!("batch {batch}, context {context}: prefill {prompt}, decode {decode}");
            let Some(row) = cell(decoder, &mut rng, batch, prompt, decode)? else {
                return Err(CliError::Interrupted);
            };
            rows.push(Row {
                batch,
                context,
                ..row
            });
        }
    }
    let out = Output {
        command: "bench",
        model: ModelInfo {
            name: subject.name,
            source: subject.source,
            params: params.total(),
            weight_bytes_f32: weight_bytes,
            kv_bytes_per_token: kv_bytes_per_token(&config, kv_dtype.to_dtype()),
            max_position_embeddings: max,
        },
        device,
        kv_dtype: kv_dtype.to_string(),
        rows,
    };
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&out)
            .map_err(|e| CliError::Internal(format!("cannot write JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        render(&out)
    };
    failure::print(&text)
}

/// The model named by the flags.
fn subject(args: &BenchArgs) -> CliResult<Subject> {
    if let Some(name) = &args.preset {
        let mut found =
            presets::find(name).map_err(|e| CliError::user(format!("--preset: {e}")))?;
        if found.len() != 1 {
            let names: Vec<&str> = found.iter().map(|p| p.name).collect();
            return Err(CliError::user(format!(
                "--preset {name} is a group; bench one of its models: {}",
                names.join(", ")
            )));
        }
        let p = found.remove(0);
        return Ok(Subject {
            name: p.name.to_string(),
            source: "preset",
            config: p.config,
            options: p.param_options,
            weights: None,
        });
    }
    if let Some(path) = &args.config {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::user(format!("--config {shown}: cannot read it: {e}")))?;
        let config = ModelConfig::from_json_str(&text, &shown).map_err(|e| match e {
            ConfigError::Json { .. } => CliError::from(e),
            other => CliError::user(format!("{shown}: {other}")),
        })?;
        let kv_input_layernorm = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("kv_input_layernorm").and_then(|b| b.as_bool()))
            .unwrap_or(false);
        return Ok(Subject {
            name: shown,
            source: "config",
            config,
            options: ParamOptions { kv_input_layernorm },
            weights: None,
        });
    }
    let dir = model::resolve_model_dir(args.model.as_deref())?;
    let weights = model::load_weights(&dir)?;
    let kv_input_layernorm = weights
        .layers
        .iter()
        .any(|l| l.kv.as_ref().is_some_and(|kv| kv.kv_norm.is_some()));
    Ok(Subject {
        name: dir.display().to_string(),
        source: "model",
        config: weights.config.clone(),
        options: ParamOptions { kv_input_layernorm },
        weights: Some(weights),
    })
}

/// The contexts of the grid.
fn contexts(args: &BenchArgs, max: usize) -> CliResult<Vec<usize>> {
    let list = match &args.context {
        Some(model::NumberList(list)) => {
            if let Some(&c) = list.iter().find(|&&c| c > max) {
                return Err(CliError::user(format!(
                    "--context {c} exceeds the model's max_position_embeddings ({max}); use at \
                     most {max}"
                )));
            }
            if let Some(&c) = list.iter().find(|&&c| c < 2) {
                return Err(CliError::user(format!(
                    "--context {c}: a cell needs at least 2 tokens (a prompt and a decode step)"
                )));
            }
            list.clone()
        }
        None => {
            let mut v: Vec<usize> = [128, 512].iter().map(|&c: &usize| c.min(max)).collect();
            v.dedup();
            v.retain(|&c| c >= 2);
            if v.is_empty() {
                return Err(CliError::user(format!(
                    "the model's context ({max}) is too short to benchmark"
                )));
            }
            v
        }
    };
    Ok(list)
}

/// A few small steps so that thread pools and allocations are warm.
fn warm_up(decoder: &mut dyn Decoder, rng: &mut SplitMix64) -> cla_model::Result<()> {
    let vocab = decoder.config().vocab_size;
    let len = decoder.config().max_position_embeddings.min(8);
    let seq = decoder.add_sequence();
    let tokens = random_ids(rng, vocab, len);
    // The logits path and the greedy path (whose token choice is its own kernel on a GPU).
    let result = match tokens.split_last() {
        Some((last, rest)) if !rest.is_empty() => decoder
            .forward(&[SequenceStep::last(seq, rest)])
            .and_then(|_| {
                decoder.forward_greedy(&[SequenceStep::last(seq, std::slice::from_ref(last))])
            }),
        _ => decoder.forward_greedy(&[SequenceStep::last(seq, &tokens)]),
    };
    decoder.free_sequence(seq)?;
    result.map(|_| ())
}

fn random_ids(rng: &mut SplitMix64, vocab: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// One cell of the grid: prefill `prompt` tokens in each of `batch` sequences, then `decode`
/// batched steps; `None` when Ctrl-C stopped it between two steps.
fn cell(
    decoder: &mut dyn Decoder,
    rng: &mut SplitMix64,
    batch: usize,
    prompt: usize,
    decode: usize,
) -> cla_model::Result<Option<Row>> {
    let vocab = decoder.config().vocab_size;
    let seqs: Vec<_> = (0..batch).map(|_| decoder.add_sequence()).collect();
    let result = (|| {
        let prompts: Vec<Vec<u32>> = (0..batch).map(|_| random_ids(rng, vocab, prompt)).collect();
        let steps: Vec<SequenceStep<'_>> = seqs
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| SequenceStep::last(s, p))
            .collect();
        let started = Instant::now();
        let first = decoder.forward_greedy(&steps)?;
        let prefill_seconds = started.elapsed().as_secs_f64();
        // Greedy decoding as `cla generate` runs it: each step feeds back the tokens the
        // previous one chose, and where the backend pipelines (a GPU) it is submitted before
        // those tokens are read back.
        let started = Instant::now();
        let ran = run_greedy_steps(decoder, &seqs, &first, decode, || !interrupt::requested())?;
        if ran < decode {
            return Ok(None);
        }
        let decode_seconds = started.elapsed().as_secs_f64();
        let peak_kv_bytes = decoder.kv_bytes_in_use();
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        Ok(Some(Row {
            batch,
            context: prompt + decode,
            prompt_tokens: prompt,
            decode_steps: decode,
            prefill_seconds,
            prefill_tokens_per_second: rate(batch * prompt, prefill_seconds),
            decode_seconds,
            decode_tokens_per_second: rate(batch * decode, decode_seconds),
            decode_ms_per_step: if decode > 0 {
                1000.0 * decode_seconds / decode as f64
            } else {
                0.0
            },
            peak_kv_bytes,
        }))
    })();
    for s in seqs {
        decoder.free_sequence(s)?;
    }
    result
}

/// Memory the system can still give, from `/proc/meminfo` (Linux only).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn render(out: &Output) -> String {
    let m = &out.model;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}): {} parameters, {} KV bytes/token at {}, on {}",
        m.name, m.source, m.params, m.kv_bytes_per_token, out.kv_dtype, out.device
    );
    let header = [
        "batch",
        "context",
        "prompt",
        "decode",
        "prefill tok/s",
        "decode tok/s",
        "ms/step",
        "peak KV bytes",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in &out.rows {
        rows.push(vec![
            r.batch.to_string(),
            r.context.to_string(),
            r.prompt_tokens.to_string(),
            r.decode_steps.to_string(),
            format!("{:.1}", r.prefill_tokens_per_second),
            format!("{:.1}", r.decode_tokens_per_second),
            format!("{:.2}", r.decode_ms_per_step),
            format!("{} ({})", r.peak_kv_bytes, ByteSize(r.peak_kv_bytes)),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        let _ = writeln!(s, "{}", cells.join("  "));
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(s, "{}", "-".repeat(total));
        }
    }
    s
}
