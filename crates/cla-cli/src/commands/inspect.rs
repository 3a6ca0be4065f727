//! `cla inspect`: what a model directory holds: its config, parameter count, layer map, KV
//! bytes per token, and the element types and sizes of its weight files (read from the
//! safetensors headers, without loading the tensors).

use super::kv::draw_layer_map;
use super::model;
use crate::failure::{self, CliError, CliResult};
use cla_core::memory::kv_bytes_per_token;
use cla_core::{ByteSize, DType, ModelConfig, ParamCount, ParamOptions};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

const EXAMPLES: &str = "\
Examples:
  cla inspect
  cla inspect --model models/small-mqa
  cla inspect --model models/small-mqa-cla2 --json";

const LONG_HELP: &str = "\
Examples:
  cla inspect
  cla inspect --model models/small-mqa
  cla inspect --model models/small-mqa-cla2 --json

Parameters are counted from config.json with cla-core's formula; whether the producer
layers carry a kv_input_layernorm scale is read from the weight file. The weights are not
loaded: only the safetensors headers are read.

JSON output (--json) is one object with the keys
  command (\"inspect\"), model, config (config.json as cla reads it), num_layers,
  hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
  vocab_size, max_position_embeddings, kv_map, kv_map_lckv, pattern, kv_layers,
  kv_input_layernorm, params {total, non_embedding, embedding, lm_head, attention_qo,
  attention_kv, mlp, norms}, kv_bytes_per_token {f32, f16, bf16},
  weights {files, tensors, elements, bytes, params_match_config, by_dtype: [{dtype, tensors,
  elements, bytes}]}, tokenizer {vocab_size} or null,
  layers: [{layer, kv_source, produces, cache_slot, read_by}].";

/// Arguments of `cla inspect`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES, after_long_help = LONG_HELP)]
pub struct InspectArgs {
    /// Model directory; default $CLA_MODEL, else models/small-mqa-cla2.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Print one JSON object (keys: see --help).
    #[arg(long)]
    pub json: bool,
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct TensorInfo {
    name: String,
    dtype: String,
    elements: u64,
    bytes: u64,
}

/// Largest safetensors header read (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Serialize)]
struct Report {
    command: &'static str,
    model: String,
    config: serde_json::Value,
    num_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    kv_map: Vec<usize>,
    kv_map_lckv: String,
    pattern: Option<String>,
    kv_layers: usize,
    kv_input_layernorm: bool,
    params: Params,
    kv_bytes_per_token: KvBytes,
    weights: Weights,
    tokenizer: Option<TokenizerInfo>,
    layers: Vec<Layer>,
}

#[derive(Serialize)]
struct Params {
    total: u64,
    non_embedding: u64,
    embedding: u64,
    lm_head: u64,
    attention_qo: u64,
    attention_kv: u64,
    mlp: u64,
    norms: u64,
}

#[derive(Serialize)]
struct KvBytes {
    f32: u64,
    f16: u64,
    bf16: u64,
}

#[derive(Serialize)]
struct Weights {
    files: Vec<String>,
    tensors: usize,
    elements: u64,
    bytes: u64,
    params_match_config: bool,
    by_dtype: Vec<DTypeGroup>,
}

#[derive(Serialize)]
struct DTypeGroup {
    dtype: String,
    tensors: usize,
    elements: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct TokenizerInfo {
    vocab_size: usize,
}

#[derive(Serialize)]
struct Layer {
    layer: usize,
    kv_source: usize,
    produces: bool,
    cache_slot: usize,
    read_by: Vec<usize>,
}

/// Runs `cla inspect`.
pub fn run(args: &InspectArgs) -> CliResult {
    let dir = model::resolve_model_dir(args.model.as_deref())?;
    let config = cla_model::load_config(&dir).map_err(|e| model::in_model(&dir, e))?;
    let files = weight_files(&dir)?;
    let mut tensors = Vec::new();
    for file in &files {
        tensors.extend(read_header(file)?);
    }
    let kv_input_layernorm = tensors
        .iter()
        .any(|t| t.name.ends_with(".kv_input_layernorm.weight"));
    let params = ParamCount::of(&config, ParamOptions { kv_input_layernorm });
    let tokenizer = cla_model::Tokenizer::from_model_dir(&dir, &config)
        .map(|t| TokenizerInfo {
            vocab_size: t.vocab_size(),
        })
        .map_err(|e| log::warn!("tokenizer: {e}"))
        .ok();
    let report = build_report(
        &dir,
        &config,
        params,
        kv_input_layernorm,
        &files,
        &tensors,
        tokenizer,
    );
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Internal(format!("cannot write JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        render(&report, &config)
    };
    failure::print(&text)
}

fn build_report(
    dir: &Path,
    c: &ModelConfig,
    params: ParamCount,
    kv_input_layernorm: bool,
    files: &[PathBuf],
    tensors: &[TensorInfo],
    tokenizer: Option<TokenizerInfo>,
) -> Report {
    let mut groups: BTreeMap<String, DTypeGroup> = BTreeMap::new();
    for t in tensors {
        let g = groups.entry(t.dtype.clone()).or_insert_with(|| DTypeGroup {
            dtype: t.dtype.clone(),
            tensors: 0,
            elements: 0,
            bytes: 0,
        });
        g.tensors += 1;
        g.elements += t.elements;
        g.bytes += t.bytes;
    }
    let elements: u64 = tensors.iter().map(|t| t.elements).sum();
    let sharing = &c.kv_sharing;
    let layers = (0..c.num_layers())
        .map(|l| Layer {
            layer: l,
            kv_source: sharing.producer_of(l),
            produces: sharing.is_producer(l),
            cache_slot: sharing.slot_of(l),
            read_by: if sharing.is_producer(l) {
                sharing.consumers_of(l).collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    Report {
        command: "inspect",
        model: dir.display().to_string(),
        config: c.to_json_value(),
        num_layers: c.num_layers(),
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        kv_map: sharing.sources().to_vec(),
        kv_map_lckv: sharing.to_lckv_string(),
        pattern: sharing.pattern_name().map(|p| p.to_string()),
        kv_layers: sharing.num_producers(),
        kv_input_layernorm,
        params: Params {
            total: params.total(),
            non_embedding: params.non_embedding(),
            embedding: params.embedding,
            lm_head: params.lm_head,
            attention_qo: params.attention_qo,
            attention_kv: params.attention_kv,
            mlp: params.mlp,
            norms: params.norms,
        },
        kv_bytes_per_token: KvBytes {
            f32: kv_bytes_per_token(c, DType::F32),
            f16: kv_bytes_per_token(c, DType::F16),
            bf16: kv_bytes_per_token(c, DType::BF16),
        },
        weights: Weights {
            files: files
                .iter()
                .map(|f| {
                    f.file_name()
                        .map_or_else(|| f.display().to_string(), |n| n.to_string_lossy().into())
                })
                .collect(),
            tensors: tensors.len(),
            elements,
            bytes: tensors.iter().map(|t| t.bytes).sum(),
            params_match_config: elements == params.total(),
            by_dtype: groups.into_values().collect(),
        },
        tokenizer,
        layers,
    }
}

fn render(r: &Report, c: &ModelConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", r.model);
    let attention = match c.num_key_value_heads {
        1 if c.num_attention_heads > 1 => "MQA".to_string(),
        kv if kv == c.num_attention_heads => "MHA".to_string(),
        _ => format!("GQA, {} Q heads per KV head", c.group_size()),
    };
    let _ = writeln!(
        s,
        "  shape       {} layers, d_model {}, FFN {}, d_head {}, {} Q heads, {} KV head{} ({})",
        r.num_layers,
        r.hidden_size,
        r.intermediate_size,
        r.head_dim,
        r.num_attention_heads,
        r.num_key_value_heads,
        if r.num_key_value_heads == 1 { "" } else { "s" },
        attention
    );
    let eos: Vec<String> = c.eos_token_ids.iter().map(u32::to_string).collect();
    let _ = writeln!(
        s,
        "  tokens      vocab {}, context {}, BOS {}, EOS {}{}",
        r.vocab_size,
        r.max_position_embeddings,
        c.bos_token_id.map_or("none".to_string(), |b| b.to_string()),
        if eos.is_empty() {
            "none".to_string()
        } else {
            eos.join(" ")
        },
        match &r.tokenizer {
            Some(t) => format!("; tokenizer.json has {} tokens", t.vocab_size),
            None => "; no usable tokenizer.json".to_string(),
        }
    );
    let _ = writeln!(
        s,
        "  numerics    rope_theta {}, rms_norm_eps {}, {} embeddings",
        c.rope_theta,
        c.rms_norm_eps,
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    let map: Vec<String> = r.kv_map.iter().map(usize::to_string).collect();
    let pattern = r
        .pattern
        .as_ref()
        .map_or(String::new(), |p| format!(" (pattern {p})"));
    let _ = writeln!(s, "  K/V map     {}{pattern}", map.join(" "));
    let _ = writeln!(s, "  KV layers   {} of {}", r.kv_layers, r.num_layers);
    let kv = &r.kv_bytes_per_token;
    let _ = writeln!(
        s,
        "  KV bytes    {} per token at f32 ({}), {} at f16/bf16",
        kv.f32,
        ByteSize(kv.f32),
        kv.f16
    );
    let p = &r.params;
    let _ = writeln!(
        s,
        "  params      {} ({:.2} M; non-embedding {}; K/V input norms: {})",
        p.total,
        p.total as f64 / 1e6,
        p.non_embedding,
        if r.kv_input_layernorm { "yes" } else { "no" }
    );
    let w = &r.weights;
    let _ = writeln!(
        s,
        "  weights     {} ({} tensors, {} elements, {})",
        w.files.join(", "),
        w.tensors,
        w.elements,
        ByteSize(w.bytes)
    );
    for g in &w.by_dtype {
        let _ = writeln!(
            s,
            "              {:<5} {:>4} tensors  {:>12} elements  {:>12} bytes",
            g.dtype, g.tensors, g.elements, g.bytes
        );
    }
    if !w.params_match_config {
        let _ = writeln!(
            s,
            "  note        the files hold {} elements but config.json implies {} parameters",
            w.elements, p.total
        );
    }
    let _ = writeln!(s, "  layers (who reads whose K/V)");
    s.push_str(&draw_layer_map(&c.kv_sharing, "    "));
    s
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists.
fn weight_files(dir: &Path) -> CliResult<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(CliError::user(format!(
            "{}: no model.safetensors (nor model.safetensors.index.json); is this a model \
             directory?",
            dir.display()
        )));
    }
    let bad = |why: String| CliError::user(format!("{}: {why}", index.display()));
    let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut files = Vec::new();
    for name in names {
        if name.contains('/') || name.contains('\\') {
            return Err(bad(format!("shard `{name}` must be a file name")));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(bad(format!("lists `{name}`, which is missing")));
        }
        files.push(path);
    }
    Ok(files)
}

/// Reads the tensor list of a safetensors file from its header.
fn read_header(path: &Path) -> CliResult<Vec<TensorInfo>> {
    let bad = |why: String| {
        CliError::user(format!(
            "{}: not a valid safetensors file: {why}",
            path.display()
        ))
    };
    let mut file = std::fs::File::open(path)
        .map_err(|e| CliError::user(format!("{}: {e}", path.display())))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n.saturating_add(8) > file_len {
        return Err(bad(format!("header length {n} is out of range")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let map = value
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = Vec::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad(format!("tensor `{name}` has no dtype")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("tensor `{name}` has no shape")))?;
        let mut elements: u64 = 1;
        for d in shape {
            let d = d
                .as_u64()
                .ok_or_else(|| bad(format!("tensor `{name}` has a bad shape")))?;
            elements = elements.saturating_mul(d);
        }
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        if offsets.1 < offsets.0 {
            return Err(bad(format!("tensor `{name}` has reversed data_offsets")));
        }
        out.push(TensorInfo {
            name: name.clone(),
            dtype: dtype.to_string(),
            elements,
            bytes: offsets.1 - offsets.0,
        });
    }
    Ok(out)
}
