//! `cla eval`: the perplexity of a text file under a model, in windows of the context (the
//! metric of the paper's Table 1).

use super::model;
use crate::failure::{self, CliError, CliResult};
use crate::interrupt;
use cla_model::{ModelError, PerplexityConfig, perplexity_of_ids};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

const EXAMPLES: &str = "\
Examples:
  cla eval val.txt
  cla eval --model models/small-mqa-cla2 --context 256 --stride 256 val.txt
  cla eval --context 256 --stride 128 --json book.txt";

const LONG_HELP: &str = "\
Examples:
  cla eval val.txt
  cla eval --model models/small-mqa-cla2 --context 256 --stride 256 val.txt
  cla eval --context 256 --stride 128 --json book.txt

The file is tokenised as one string, without a BOS token. Windows of --context tokens start
every --stride tokens; each window is run on its own and scores the tokens that no earlier
window scored, each predicted from the tokens before it in the window. With --stride equal
to --context (the default) the windows do not overlap and the first token of each is not
scored; with a smaller stride every token but the first is scored, with more left context.
perplexity = exp(mean negative log-likelihood), the sum in float64.

JSON output (--json) is one object with the keys
  command (\"eval\"), model, file, device, kv_dtype, mean_nll (nats), ppl, tokens_scored,
  total_tokens, windows, context, stride, seconds, tokens_per_second.

A progress bar (tokens scored, ETA) is drawn on stderr when it is a terminal.";

/// Arguments of `cla eval`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES, after_long_help = LONG_HELP)]
pub struct EvalArgs {
    /// The text file to score (UTF-8).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Model directory; default $CLA_MODEL, else models/small-mqa-cla2.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Tokens per window (default and maximum: the model's max_position_embeddings).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(2..))]
    pub context: Option<u64>,

    /// Tokens between window starts, 1..=context (default: the context, no overlap).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub stride: Option<u64>,

    /// Where to run, and in what precision.
    #[command(flatten)]
    pub run_on: model::RunOn,

    /// Print one JSON object (keys: see --help).
    #[arg(long)]
    pub json: bool,
}

/// The output of `--json`.
#[derive(Serialize)]
struct EvalReport {
    command: &'static str,
    model: String,
    file: String,
    device: String,
    kv_dtype: String,
    mean_nll: f64,
    ppl: f64,
    tokens_scored: usize,
    total_tokens: usize,
    windows: usize,
    context: usize,
    stride: usize,
    seconds: f64,
    tokens_per_second: f64,
    /// Ctrl-C stopped the evaluation: the figures cover the windows scored before it.
    interrupted: bool,
}

/// Runs `cla eval`.
pub fn run(args: &EvalArgs) -> CliResult {
    let text = super::generate::read_text(&args.file, "FILE")?;
    let dir = model::resolve_model_dir(args.model.as_deref())?;
    let loaded = model::load_model(&dir)?;
    let config = &loaded.weights.config;
    let max = config.max_position_embeddings;
    let context = match args.context {
        Some(c) if c as usize > max || c > usize::MAX as u64 => {
            return Err(CliError::user(format!(
                "--context {c} exceeds the model's max_position_embeddings ({max}); use at \
                 most {max}"
            )));
        }
        Some(c) => c as usize,
        None => max,
    };
    let stride = match args.stride {
        Some(s) if s as usize > context => {
            return Err(CliError::user(format!(
                "--stride {s} is larger than the context ({context}); use 1..={context}"
            )));
        }
        Some(s) => s as usize,
        None => context,
    };
    let ids = loaded.tokenizer.encode(&text, false)?;
    if ids.len() < 2 {
        return Err(CliError::user(format!(
            "FILE {}: perplexity needs at least 2 tokens, the file has {}",
            args.file.display(),
            ids.len()
        )));
    }
    log::info!(
        "{}: {} bytes, {} tokens; windows of {context} every {stride}",
        args.file.display(),
        text.len(),
        ids.len()
    );
    let mut chosen = model::make_decoder(&args.run_on, Arc::clone(&loaded.weights), context, 1)?;

    interrupt::install();
    let bar = model::stderr_is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} scoring [{bar:30}] {human_pos}/{human_len} tokens, {per_sec}, ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let started = Instant::now();
    let result = {
        let mut progress = |scored: usize, total: usize| {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(scored as u64);
            }
            interrupt::control()
        };
        perplexity_of_ids(
            chosen.decoder.as_mut(),
            &ids,
            PerplexityConfig {
                context: Some(context),
                stride: Some(stride),
            },
            &mut progress,
        )
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = match result {
        // Interrupted before anything was scored: nothing to report.
        Ok(r) if r.stopped && r.tokens_scored == 0 => return Err(CliError::Interrupted),
        Ok(r) => r,
        Err(ModelError::InvalidArgument { name, message }) => {
            return Err(CliError::user(format!("--{name}: {message}")));
        }
        Err(e) => return Err(CliError::from(e)),
    };
    let out = EvalReport {
        command: "eval",
        model: dir.display().to_string(),
        file: args.file.display().to_string(),
        device: chosen.device.clone(),
        kv_dtype: chosen.kv_dtype.to_string(),
        mean_nll: report.mean_nll,
        ppl: report.perplexity,
        tokens_scored: report.tokens_scored,
        total_tokens: report.total_tokens,
        windows: report.windows,
        context: report.context,
        stride: report.stride,
        seconds,
        tokens_per_second: if seconds > 0.0 {
            report.tokens_scored as f64 / seconds
        } else {
            0.0
        },
        interrupted: report.stopped,
    };
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&out)
            .map_err(|e| CliError::Internal(format!("cannot write JSON: {e}")))?;
        s.push('\n');
        s
    } else {
        format!(
            "{}perplexity {:.4} (mean NLL {:.5} nats/token)\n  {} of {} tokens scored in {} \
             windows of {} (stride {})\n  {:.2}s, {:.0} tokens/s on {}\n",
            if out.interrupted {
                "interrupted, over the windows scored so far: "
            } else {
                ""
            },
            out.ppl,
            out.mean_nll,
            out.tokens_scored,
            out.total_tokens,
            out.windows,
            out.context,
            out.stride,
            out.seconds,
            out.tokens_per_second,
            out.device
        )
    };
    failure::print(&text)?;
    if out.interrupted {
        return Err(CliError::Interrupted);
    }
    Ok(())
}
