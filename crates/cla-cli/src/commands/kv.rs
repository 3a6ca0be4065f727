//! `cla kv`: which layer reads which layer's keys and values, how many bytes of KV cache a
//! token costs, and what fits in a memory budget (paper section 2 and Table 1).

use crate::failure::{self, CliError, CliResult};
use cla_core::memory::kv_bytes_per_token;
use cla_core::presets::{self, PaperFigures};
use cla_core::{
    ByteSize, ConfigError, DType, KvSharing, MemoryPlanner, ModelConfig, ParamCount, ParamOptions,
};
use clap::{ArgGroup, Args};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;

const KV_EXAMPLES: &str = "\
Examples:
  cla kv --preset H128-MQA-CLA2
  cla kv --preset paper-1b
  cla kv --config config.json --kv-map 0_0_2_2_4_4 --compare none
  cla kv --preset H128-MQA-CLA2-3B --budget 80GiB --context 32768 --batch 8
  cla kv --preset paper-1b --dtype f16 --json";

const KV_LONG_HELP: &str = "\
Examples:
  cla kv --preset H128-MQA-CLA2
  cla kv --preset paper-1b
  cla kv --config config.json --kv-map 0_0_2_2_4_4 --compare none
  cla kv --preset H128-MQA-CLA2-3B --budget 80GiB --context 32768 --batch 8
  cla kv --preset paper-1b --dtype f16 --json

Presets: the paper's Table 1 models (H128-MHA ... H128-MQA-CLA2-DenseBack), the 3B models
(H128-MQA-3B, H128-MQA-CLA2-3B), and the groups paper-1b and paper-3b. Their vocabulary
size (32000) is an assumption: it changes the parameter count, never the KV bytes.

Planner: KV budget = budget - weights (parameters x dtype size). Activations, workspace and
fragmentation are NOT counted: leave headroom. The largest batch is
floor(KV budget / (KV bytes per token x context)); the longest context is
floor(KV budget / (KV bytes per token x batch)), not capped at max_position_embeddings.

JSON output (--json) is one object with stable keys; sizes are integers in bytes at --dtype:
  command: \"kv\"      dtype: \"bf16\"|\"f16\"|\"f32\"|\"int8\"
  models: a list (one entry per model; a group gives several), each with
    name, source (\"preset\"|\"config\"), group (preset group or null),
    num_layers, hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, head_dim, vocab_size, max_position_embeddings,
    kv_map (entry i = the layer whose K/V layer i reads), kv_map_lckv (\"0_0_2_2\"),
    pattern (pattern name or null), kv_map_overridden (bool),
    kv_layers, kv_bytes_per_token, params, weight_bytes,
    paper: {kv_layers, kv_bytes_per_token, val_ppl} or null (16-bit figures; null once
      --kv-map changes a preset's map),
    compare: {kv_map, kv_map_lckv, pattern, kv_layers, kv_bytes_per_token, params,
      kv_bytes_ratio (this model / compared), plan} or null,
    plan: {budget_bytes, weight_bytes, kv_budget_bytes, kv_bytes_per_token, context,
      max_batch, batch, max_context} or null (context/batch and their answers are null
      when not asked)";

/// Arguments of `cla kv`.
#[derive(Debug, Args)]
#[command(after_help = KV_EXAMPLES, after_long_help = KV_LONG_HELP)]
#[command(group(ArgGroup::new("model").required(true).args(["preset", "config"])))]
#[command(group(ArgGroup::new("question").multiple(true).args(["context", "batch"])))]
pub struct KvArgs {
    /// A model of the paper (e.g. H128-MQA-CLA2; case ignored) or a group: paper-1b
    /// (Table 1), paper-3b.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,

    /// A Hugging Face-style config.json.
    #[arg(long, value_name = "CONFIG_JSON")]
    pub config: Option<PathBuf>,

    /// Element type of the weights and the KV cache: f16, bf16, f32, int8.
    #[arg(long, value_name = "DTYPE", default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,

    /// Replace the model's K/V map: a pattern (none, cla<N>, hunyuan<N>, cla2-keep-ends,
    /// cla2-dense-front, cla2-dense-back) or the source layer of every layer
    /// (0_0_2_2, 0,0,2,2, [0,0,2,2], "0 0 2 2").
    #[arg(long, value_name = "PATTERN_OR_LIST")]
    pub kv_map: Option<String>,

    /// Memory for weights and KV cache, e.g. 80GiB, 80GB, 512MiB, 1.5TiB or bytes; needs
    /// --context and/or --batch.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_budget,
        allow_hyphen_values = true,
        requires = "question"
    )]
    pub budget: Option<u64>,

    /// Tokens per sequence: with --budget, the largest batch that fits.
    #[arg(
        long,
        value_name = "TOKENS",
        requires = "budget",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub context: Option<u64>,

    /// Sequences: with --budget, the longest context at which they fit.
    #[arg(
        long,
        value_name = "N",
        requires = "budget",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub batch: Option<u64>,

    /// Also show the same model with this K/V map (a pattern such as `none`, or a list),
    /// and the ratio of KV bytes.
    #[arg(long, value_name = "PATTERN_OR_LIST")]
    pub compare: Option<String>,

    /// Count a separate norm scale on the K/V input of every producer layer (as the
    /// paper's CLA models have; presets with sharing count it already).
    #[arg(long)]
    pub kv_input_layernorm: bool,

    /// Print one JSON object (keys: see --help).
    #[arg(long)]
    pub json: bool,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    s.parse::<DType>().map_err(|e| match e {
        ConfigError::BadQuantity { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_budget(s: &str) -> Result<u64, String> {
    ByteSize::parse("--budget", s)
        .map(ByteSize::bytes)
        .map_err(|e| match e {
            ConfigError::BadQuantity { reason, .. } => reason,
            other => other.to_string(),
        })
}

/// A model to report on.
struct Model {
    name: String,
    source: &'static str,
    group: Option<&'static str>,
    config: ModelConfig,
    options: ParamOptions,
    paper: Option<PaperFigures>,
    map_overridden: bool,
}

/// Runs `cla kv`.
pub fn run(args: &KvArgs) -> CliResult {
    let (models, table) = load_models(args)?;
    let mut reports = Vec::with_capacity(models.len());
    for model in &models {
        reports.push(report(args, model)?);
    }
    let text = if args.json {
        let out = Output {
            command: "kv",
            dtype: args.dtype.name(),
            models: reports,
        };
        let mut s = serde_json::to_string_pretty(&out)
            .map_err(|e| CliError::Internal(format!("cannot write JSON: {e}")))?;
        s.push('\n');
        s
    } else if table {
        render_table(args, &models, &reports)
    } else {
        reports
            .iter()
            .zip(&models)
            .map(|(r, m)| render_model(args, m, r))
            .collect::<Vec<_>>()
            .join("\n")
    };
    failure::print(&text)
}

/// The models named by --preset or --config, with --kv-map applied; and whether they form
/// a group (shown as a table).
fn load_models(args: &KvArgs) -> CliResult<(Vec<Model>, bool)> {
    let (mut models, table) = match (&args.preset, &args.config) {
        (Some(name), _) => {
            let found =
                presets::find(name).map_err(|e| CliError::user(format!("--preset: {e}")))?;
            let models = found
                .into_iter()
                .map(|p| Model {
                    name: p.name.to_string(),
                    source: "preset",
                    group: Some(p.group),
                    config: p.config,
                    options: p.param_options,
                    paper: Some(p.paper),
                    map_overridden: false,
                })
                .collect();
            (models, presets::is_group(name))
        }
        (None, Some(path)) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::user(format!("--config {shown}: cannot read it: {e}")))?;
            let config = ModelConfig::from_json_str(&text, &shown).map_err(|e| match e {
                ConfigError::Json { .. } => CliError::from(e),
                other => CliError::user(format!("{shown}: {other}")),
            })?;
            let model = Model {
                name: shown,
                source: "config",
                group: None,
                config,
                options: ParamOptions::default(),
                paper: None,
                map_overridden: false,
            };
            (vec![model], false)
        }
        (None, None) => {
            return Err(CliError::user(
                "give a model with --preset NAME or --config CONFIG_JSON",
            ));
        }
    };
    for model in &mut models {
        model.options.kv_input_layernorm |= args.kv_input_layernorm;
        if let Some(map) = &args.kv_map {
            let sharing = KvSharing::parse("--kv-map", map, model.config.num_layers())?;
            if sharing != model.config.kv_sharing {
                model.config.kv_sharing = sharing;
                model.map_overridden = true;
                model.paper = None;
            }
        }
    }
    Ok((models, table))
}

/// The whole output of `--json`.
#[derive(Serialize)]
struct Output {
    command: &'static str,
    dtype: &'static str,
    models: Vec<ModelReport>,
}

#[derive(Serialize)]
struct ModelReport {
    name: String,
    source: &'static str,
    group: Option<&'static str>,
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
    kv_map_overridden: bool,
    kv_layers: usize,
    kv_bytes_per_token: u64,
    params: u64,
    weight_bytes: u64,
    paper: Option<PaperReport>,
    compare: Option<CompareReport>,
    plan: Option<PlanReport>,
}

#[derive(Serialize)]
struct PaperReport {
    kv_layers: usize,
    kv_bytes_per_token: u64,
    val_ppl: f64,
}

#[derive(Serialize)]
struct CompareReport {
    kv_map: Vec<usize>,
    kv_map_lckv: String,
    pattern: Option<String>,
    kv_layers: usize,
    kv_bytes_per_token: u64,
    params: u64,
    kv_bytes_ratio: f64,
    plan: Option<PlanReport>,
}

#[derive(Serialize)]
struct PlanReport {
    budget_bytes: u64,
    weight_bytes: u64,
    kv_budget_bytes: u64,
    kv_bytes_per_token: u64,
    context: Option<u64>,
    max_batch: Option<u64>,
    batch: Option<u64>,
    max_context: Option<u64>,
}

fn plan(
    args: &KvArgs,
    config: &ModelConfig,
    options: ParamOptions,
) -> CliResult<Option<PlanReport>> {
    let Some(budget) = args.budget else {
        return Ok(None);
    };
    let planner = MemoryPlanner::for_model(config, args.dtype, options, budget);
    let max_batch = args.context.map(|c| planner.max_batch(c)).transpose()?;
    let max_context = args.batch.map(|b| planner.max_context(b)).transpose()?;
    Ok(Some(PlanReport {
        budget_bytes: planner.budget_bytes,
        weight_bytes: planner.weight_bytes,
        kv_budget_bytes: planner.kv_budget_bytes(),
        kv_bytes_per_token: planner.kv_bytes_per_token,
        context: args.context,
        max_batch,
        batch: args.batch,
        max_context,
    }))
}

fn report(args: &KvArgs, model: &Model) -> CliResult<ModelReport> {
    let c = &model.config;
    let params = ParamCount::of(c, model.options);
    let kv_bytes = kv_bytes_per_token(c, args.dtype);
    let compare = match &args.compare {
        None => None,
        Some(text) => {
            let mut other = c.clone();
            other.kv_sharing = KvSharing::parse("--compare", text, c.num_layers())?;
            let other_bytes = kv_bytes_per_token(&other, args.dtype);
            Some(CompareReport {
                kv_map: other.kv_sharing.sources().to_vec(),
                kv_map_lckv: other.kv_sharing.to_lckv_string(),
                pattern: other.kv_sharing.pattern_name().map(|p| p.to_string()),
                kv_layers: other.kv_sharing.num_producers(),
                kv_bytes_per_token: other_bytes,
                params: ParamCount::of(&other, model.options).total(),
                kv_bytes_ratio: kv_bytes as f64 / other_bytes as f64,
                plan: plan(args, &other, model.options)?,
            })
        }
    };
    Ok(ModelReport {
        name: model.name.clone(),
        source: model.source,
        group: model.group,
        num_layers: c.num_layers(),
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        kv_map: c.kv_sharing.sources().to_vec(),
        kv_map_lckv: c.kv_sharing.to_lckv_string(),
        pattern: c.kv_sharing.pattern_name().map(|p| p.to_string()),
        kv_map_overridden: model.map_overridden,
        kv_layers: c.kv_sharing.num_producers(),
        kv_bytes_per_token: kv_bytes,
        params: params.total(),
        weight_bytes: params.bytes(args.dtype),
        paper: model.paper.map(|p| PaperReport {
            kv_layers: p.kv_layers,
            kv_bytes_per_token: p.kv_bytes_per_token,
            val_ppl: p.val_ppl,
        }),
        compare,
        plan: plan(args, c, model.options)?,
    })
}

/// `1.23 B`, `45.6 M`, `7.8 K` or the plain number.
fn human_count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} K", f / 1e3)
    } else {
        n.to_string()
    }
}

fn attention_kind(c: &ModelConfig) -> String {
    match c.num_key_value_heads {
        1 if c.num_attention_heads > 1 => "MQA".into(),
        kv if kv == c.num_attention_heads => "MHA".into(),
        _ => format!("GQA, {} Q heads per KV head", c.group_size()),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The text of one model.
fn render_model(args: &KvArgs, model: &Model, r: &ModelReport) -> String {
    let c = &model.config;
    let dtype = args.dtype;
    let mut s = String::new();
    let origin = match (model.source, model.group) {
        ("preset", Some(g)) => format!("preset, {g}"),
        (src, _) => src.to_string(),
    };
    let _ = writeln!(s, "{} ({origin})", r.name);
    let _ = writeln!(
        s,
        "  shape       {} layers, d_model {}, FFN {}, d_head {}, {} Q heads, {} ({})",
        r.num_layers,
        r.hidden_size,
        r.intermediate_size,
        r.head_dim,
        r.num_attention_heads,
        plural(r.num_key_value_heads as u64, "KV head", "KV heads"),
        attention_kind(c),
    );
    let compact: Vec<String> = r.kv_map.iter().map(|x| x.to_string()).collect();
    let pattern = match (&r.pattern, r.kv_map_overridden) {
        (Some(p), true) => format!("   (pattern {p}, from --kv-map)"),
        (Some(p), false) => format!("   (pattern {p})"),
        (None, true) => "   (from --kv-map)".into(),
        (None, false) => String::new(),
    };
    let _ = writeln!(s, "  K/V map     {}{pattern}", compact.join(" "));
    let _ = writeln!(s, "  KV layers   {} of {}", r.kv_layers, r.num_layers);
    let _ = writeln!(
        s,
        "  KV bytes    {} per token at {dtype} ({})",
        r.kv_bytes_per_token,
        ByteSize(r.kv_bytes_per_token)
    );
    let _ = writeln!(
        s,
        "  params      {} ({}, weights {} at {dtype})",
        r.params,
        human_count(r.params),
        ByteSize(r.weight_bytes)
    );
    if let Some(p) = &r.paper {
        let _ = writeln!(
            s,
            "  paper       {} KV layers, {} KV bytes per token at 16 bits, val ppl {:.2}",
            p.kv_layers, p.kv_bytes_per_token, p.val_ppl
        );
    }
    if let Some(cmp) = &r.compare {
        let name = cmp
            .pattern
            .clone()
            .unwrap_or_else(|| cmp.kv_map_lckv.clone());
        let _ = writeln!(
            s,
            "  vs {name:<8} {} KV layers, {} KV bytes per token: this model needs {:.3}x the \
             KV cache",
            cmp.kv_layers, cmp.kv_bytes_per_token, cmp.kv_bytes_ratio
        );
    }
    if let Some(plan) = &r.plan {
        let _ = writeln!(
            s,
            "  budget      {}: weights {}, KV cache {} (activations and overheads not counted)",
            ByteSize(plan.budget_bytes),
            ByteSize(plan.weight_bytes),
            ByteSize(plan.kv_budget_bytes)
        );
        let other_plan = r.compare.as_ref().and_then(|c| {
            let name = c.pattern.clone().unwrap_or_else(|| c.kv_map_lckv.clone());
            c.plan.as_ref().map(|p| (name, p))
        });
        if let (Some(ctx), Some(b)) = (plan.context, plan.max_batch) {
            let vs = other_plan
                .as_ref()
                .and_then(|(n, p)| p.max_batch.map(|x| format!("   ({n}: {x})")))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  max batch   {} at context {ctx}{vs}",
                plural(b, "sequence", "sequences")
            );
        }
        if let (Some(batch), Some(ctx)) = (plan.batch, plan.max_context) {
            let vs = other_plan
                .as_ref()
                .and_then(|(n, p)| p.max_context.map(|x| format!("   ({n}: {x})")))
                .unwrap_or_default();
            let beyond = if ctx > r.max_position_embeddings as u64 {
                format!(
                    "; beyond the model's max_position_embeddings ({})",
                    r.max_position_embeddings
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  max context {} at batch {batch}{vs}{beyond}",
                plural(ctx, "token", "tokens")
            );
        }
        if plan.weight_bytes > plan.budget_bytes {
            let _ = writeln!(s, "  note        the weights alone exceed the budget");
        }
    }
    let _ = writeln!(s, "  layers (who reads whose K/V)");
    s.push_str(&draw_layer_map(&c.kv_sharing, "    "));
    s
}

/// The layer map as text, one line per layer, each starting with `indent`: a producer
/// names its cache slot and the layers that read it, a consumer points at its producer
/// (`L1  -> L0`).
pub fn draw_layer_map(sharing: &KvSharing, indent: &str) -> String {
    let mut s = String::new();
    let width = format!("L{}", sharing.num_layers().saturating_sub(1)).len();
    for layer in 0..sharing.num_layers() {
        let name = format!("L{layer}");
        let line = match sharing.slot_of_producer(layer) {
            Some(slot) => {
                let readers: Vec<String> = sharing
                    .consumers_of(layer)
                    .map(|l| format!("L{l}"))
                    .collect();
                if readers.is_empty() {
                    format!("produces (cache slot {slot})")
                } else {
                    format!(
                        "produces (cache slot {slot}), read by {}",
                        readers.join(" ")
                    )
                }
            }
            None => format!("-> L{}", sharing.producer_of(layer)),
        };
        let _ = writeln!(s, "{indent}{name:<width$}  {line}");
    }
    s
}

/// The text of a group: one row per model.
fn render_table(args: &KvArgs, models: &[Model], reports: &[ModelReport]) -> String {
    let dtype = args.dtype;
    let mut header = vec![
        "model".to_string(),
        "d_head".into(),
        "Q heads".into(),
        "KV heads".into(),
        "KV layers".into(),
        format!("KV bytes/token ({dtype})"),
        "paper val ppl".into(),
    ];
    let compare_name = reports
        .first()
        .and_then(|r| r.compare.as_ref())
        .map(|c| c.pattern.clone().unwrap_or_else(|| c.kv_map_lckv.clone()));
    if let Some(n) = &compare_name {
        header.push(format!("x vs {n}"));
    }
    if let Some(ctx) = args.context.filter(|_| args.budget.is_some()) {
        header.push(format!("max batch @ {ctx}"));
    }
    if let Some(b) = args.batch.filter(|_| args.budget.is_some()) {
        header.push(format!("max context @ {b}"));
    }
    let mut rows = vec![header];
    for r in reports {
        let mut row = vec![
            r.name.clone(),
            r.head_dim.to_string(),
            r.num_attention_heads.to_string(),
            r.num_key_value_heads.to_string(),
            r.kv_layers.to_string(),
            r.kv_bytes_per_token.to_string(),
            r.paper
                .as_ref()
                .map_or("-".into(), |p| format!("{:.2}", p.val_ppl)),
        ];
        if let Some(c) = &r.compare {
            row.push(format!("{:.3}", c.kv_bytes_ratio));
        }
        if let Some(p) = &r.plan {
            if let Some(b) = p.max_batch {
                row.push(b.to_string());
            }
            if let Some(c) = p.max_context {
                row.push(c.to_string());
            }
        }
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    if let Some(first) = models.first() {
        let c = &first.config;
        let _ = writeln!(
            s,
            "{} models: d_model {}, {} layers, FFN {}",
            first.group.unwrap_or("preset"),
            c.hidden_size,
            c.num_layers(),
            c.intermediate_size
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(j, cell)| {
                if j == 0 {
                    format!("{cell:<w$}", w = widths[j])
                } else {
                    format!("{cell:>w$}", w = widths[j])
                }
            })
            .collect();
        let _ = writeln!(s, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (columns - 1);
            let _ = writeln!(s, "{}", "-".repeat(total));
        }
    }
    if reports.iter().any(|r| r.kv_map_overridden) {
        let _ = writeln!(s, "(K/V maps replaced by --kv-map; paper figures hidden)");
    }
    s
}
