//! `cla generate`: continue one prompt (or a batch of prompts) with a model, streaming the
//! text as it is produced.

use super::model;
use crate::failure::{CliError, CliResult};
use crate::interrupt;
use cla_core::ByteSize;
use cla_model::{
    Generation, GenerationConfig, ModelError, SamplingConfig, StopReason, TokenEvent, Tokenizer,
    generate_ids,
};
use clap::{ArgGroup, Args};
use serde::Serialize;
use std::io::{IsTerminal, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const EXAMPLES: &str = "\
Examples:
  cla generate \"Once upon a time\"
  cla generate --greedy --max-tokens 32 \"The people of the United States\"
  cla generate --temperature 0.7 --top-p 0.9 --seed 42 --stop \".\" \"It was\"
  echo \"Call me Ishmael.\" | cla generate --max-tokens 64
  cla generate --batch-file prompts.txt --json
  cla generate --prompt-ids \"0 76 1720\" --ids --greedy
  cla generate --model models/small-mqa --device cpu --json \"In the beginning\"";

const LONG_HELP: &str = "\
Examples:
  cla generate \"Once upon a time\"
  cla generate --greedy --max-tokens 32 \"The people of the United States\"
  cla generate --temperature 0.7 --top-p 0.9 --seed 42 --stop \".\" \"It was\"
  echo \"Call me Ishmael.\" | cla generate --max-tokens 64
  cla generate --batch-file prompts.txt --json
  cla generate --prompt-ids \"0 76 1720\" --ids --greedy
  cla generate --model models/small-mqa --device cpu --json \"In the beginning\"

The prompt comes from PROMPT, --prompt-file, --prompt-ids, --batch-file (one prompt a line,
blank lines skipped, all generated in one batch) or, when none is given and stdin is not a
terminal, from stdin. One trailing newline of a file or stdin is dropped. Text prompts start
with the model's BOS token unless --no-bos.

Output: the generated text is streamed to stdout (one prompt) or printed per prompt under a
`==> prompt N <==` header (a batch). --ids prints the generated token ids instead, one line
per prompt; --json prints one JSON object per prompt (JSON lines) with the keys
  index, line (of --batch-file, else null), prompt (text or null), prompt_ids,
  truncated_tokens, text, ids (a final EOS/stop token included), stop_reason
  (max_tokens | eos | stop_string | context_full | interrupted), stop_token, stop_string,
  prompt_tokens, generated_tokens, timings {prefill_seconds, prefill_tokens,
  decode_seconds, decode_tokens, prefill_tokens_per_second, decode_tokens_per_second},
  kv_bytes, seed, device, model.
A summary line goes to stderr (not with --quiet).

Ctrl-C stops generation: what was produced is written, and cla exits with code 130.";

/// Arguments of `cla generate`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES, after_long_help = LONG_HELP)]
#[command(group(
    ArgGroup::new("source").args(["prompt", "prompt_file", "prompt_ids", "batch_file"])
))]
pub struct GenerateArgs {
    /// The prompt text (or use --prompt-file, --prompt-ids, --batch-file, or stdin).
    #[arg(value_name = "PROMPT")]
    pub prompt: Option<String>,

    /// Read the prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,

    /// The prompt as token ids, separated by spaces or commas ("0 76 1720"); no BOS is
    /// added.
    #[arg(long, value_name = "IDS")]
    pub prompt_ids: Option<String>,

    /// Generate for every line of FILE, all in one batch.
    #[arg(long, value_name = "FILE")]
    pub batch_file: Option<PathBuf>,

    /// Model directory (config.json, model.safetensors, tokenizer.json); default $CLA_MODEL,
    /// else models/small-mqa-cla2.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// Where to run, and in what precision.
    #[command(flatten)]
    pub run_on: model::RunOn,

    /// Most tokens to generate per prompt.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 128,
        visible_alias = "max-new-tokens"
    )]
    pub max_tokens: usize,

    /// Always pick the most likely token (same as --temperature 0).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,

    /// Softmax temperature; 0 is greedy.
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.8,
        allow_negative_numbers = true
    )]
    pub temperature: f32,

    /// Sample from the K most likely tokens only (0: no limit).
    #[arg(long, value_name = "K", default_value_t = 40)]
    pub top_k: usize,

    /// Sample from the smallest set of tokens whose probability reaches P (1: no limit).
    #[arg(
        long,
        value_name = "P",
        default_value_t = 0.95,
        allow_negative_numbers = true
    )]
    pub top_p: f32,

    /// Divide the logits of tokens already in the text by this (1: off; 1.1 is typical).
    #[arg(
        long,
        value_name = "X",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub repeat_penalty: f32,

    /// Seed of the sampler: the same seed gives the same text (default: a new one each run,
    /// shown in --json and -v).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Stop when the text contains this (cut from the output); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,

    /// Keep going after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,

    /// Do not start text prompts with the BOS token.
    #[arg(long)]
    pub no_bos: bool,

    /// When a prompt is longer than the context, keep its last tokens (default: an error).
    #[arg(long)]
    pub truncate_prompt: bool,

    /// Print the generated token ids (space-separated, a line per prompt) instead of text.
    #[arg(long, conflicts_with = "json")]
    pub ids: bool,

    /// Print one JSON object per prompt (JSON lines; keys: see --help).
    #[arg(long)]
    pub json: bool,

    /// Print the prompt before the generated text.
    #[arg(long, conflicts_with_all = ["ids", "json"])]
    pub echo: bool,

    /// No summary line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// One prompt to run.
#[derive(Debug, Clone)]
struct Prompt {
    /// The text, for text prompts.
    text: Option<String>,
    /// Line number in --batch-file.
    line: Option<usize>,
    /// Token ids (BOS included for text prompts unless --no-bos).
    ids: Vec<u32>,
}

/// Where the prompts came from, before tokenisation.
enum Source {
    Texts(Vec<(Option<usize>, String)>),
    Ids(Vec<u32>),
}

/// Runs `cla generate`.
pub fn run(args: &GenerateArgs) -> CliResult {
    let sampling = sampling_config(args)?;
    let source = read_source(args)?;
    let dir = model::resolve_model_dir(args.model.as_deref())?;
    let loaded = model::load_model(&dir)?;
    let tokenizer = loaded.tokenizer;
    let weights = loaded.weights;
    let config = weights.config.clone();
    let context = config.max_position_embeddings;
    let prompts = tokenize(args, source, &tokenizer, config.vocab_size)?;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.len() > context && !args.truncate_prompt {
            let which = match (prompts.len(), p.line) {
                (1, _) => "the prompt".to_string(),
                (_, Some(line)) => format!("the prompt on line {line}"),
                (_, None) => format!("prompt {i}"),
            };
            return Err(CliError::user(format!(
                "{which} has {} tokens but the model's context holds {context}; shorten it, \
                 or pass --truncate-prompt to keep its last tokens",
                p.ids.len()
            )));
        }
    }
    let gen_config = GenerationConfig {
        max_new_tokens: args.max_tokens,
        sampling: sampling.clone(),
        stop_at_eos: !args.ignore_eos,
        stop_token_ids: Vec::new(),
        stop_strings: args.stop.clone(),
        add_bos: !args.no_bos,
        truncate_prompt: args.truncate_prompt,
    };

    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(1);
    let per_sequence = (longest.min(context) + args.max_tokens).min(context);
    let mut chosen = model::make_decoder(
        &args.run_on,
        Arc::clone(&weights),
        per_sequence,
        prompts.len(),
    )?;
    log::info!(
        "generating for {} prompt(s), at most {} tokens each, {}",
        prompts.len(),
        args.max_tokens,
        describe_sampling(&sampling)
    );

    interrupt::install();
    let mode = if args.json {
        Mode::Json
    } else if args.ids {
        Mode::Ids
    } else {
        Mode::Text
    };
    let single = prompts.len() == 1;
    let mut out = Output::new();
    if args.echo
        && single
        && let Some(text) = &prompts[0].text
    {
        out.write(text);
    }
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let started = Instant::now();
    let built_before = chosen.gpu.as_ref().map(|c| c.kernel_build_time());
    let result = {
        let mut streamed_ids = 0;
        // Streams a single prompt; stops generation on Ctrl-C or when stdout is closed.
        let mut on_token = |ev: TokenEvent<'_>| {
            if single {
                match (mode, ev.token) {
                    (Mode::Text, _) => out.write(ev.text),
                    (Mode::Ids, Some(t)) => {
                        let sep = if streamed_ids > 0 { " " } else { "" };
                        out.write(&format!("{sep}{t}"));
                        streamed_ids += 1;
                    }
                    _ => {}
                }
                if out.closed {
                    return ControlFlow::Break(());
                }
            }
            interrupt::control()
        };
        generate_ids(
            chosen.decoder.as_mut(),
            Some(&tokenizer),
            &ids,
            &gen_config,
            &mut on_token,
        )
    };
    let wall = started.elapsed().as_secs_f64();
    // GPU kernels built on their first use during this generation (mostly in its first step).
    let built = match (&chosen.gpu, built_before) {
        (Some(c), Some(before)) => (c.kernel_build_time() - before).as_secs_f64(),
        _ => 0.0,
    };
    let model_name = dir.display().to_string();
    let seed = sampling.seed;
    match result {
        Ok(generations)
            if generations
                .iter()
                .any(|g| g.stop_reason == StopReason::Stopped) =>
        {
            if !interrupt::requested() {
                // The reader of stdout went away (`| head`): nothing more to say.
                return Ok(());
            }
            finish_output(
                &mut out,
                mode,
                single,
                &prompts,
                &generations,
                &chosen.device,
                seed,
                &model_name,
            )?;
            let generated: usize = generations.iter().map(|g| g.ids.len()).sum();
            if !args.quiet {
                let _ = writeln!(
                    std::io::stderr(),
                    "interrupted after {generated} generated tokens ({wall:.2}s)"
                );
            }
            out.check()?;
            Err(CliError::Interrupted)
        }
        Ok(generations) => {
            finish_output(
                &mut out,
                mode,
                single,
                &prompts,
                &generations,
                &chosen.device,
                seed,
                &model_name,
            )?;
            if !args.quiet {
                summary(&generations, wall, built, &chosen.device, &sampling);
            }
            out.check()
        }
        Err(e) => Err(generation_error(e)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Text,
    Ids,
    Json,
}

/// stdout, flushed after every write; a closed pipe stops output without an error.
struct Output {
    out: std::io::Stdout,
    closed: bool,
    error: Option<std::io::Error>,
    /// Whether the last byte written was a newline (or nothing was written).
    at_line_start: bool,
}

impl Output {
    fn new() -> Self {
        Self {
            out: std::io::stdout(),
            closed: false,
            error: None,
            at_line_start: true,
        }
    }

    fn write(&mut self, text: &str) {
        if self.closed || text.is_empty() {
            return;
        }
        let mut lock = self.out.lock();
        match lock.write_all(text.as_bytes()).and_then(|()| lock.flush()) {
            Ok(()) => self.at_line_start = text.ends_with('\n'),
            Err(e) => {
                self.closed = true;
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    self.error = Some(e);
                }
            }
        }
    }

    /// Ends the current line, if one is open.
    fn end_line(&mut self) {
        if !self.at_line_start {
            self.write("\n");
        }
    }

    fn check(&mut self) -> CliResult {
        match self.error.take() {
            Some(e) => Err(CliError::Internal(format!("cannot write the output: {e}"))),
            None => Ok(()),
        }
    }
}

/// The sampling settings from the flags, checked with the flags' names.
fn sampling_config(args: &GenerateArgs) -> CliResult<SamplingConfig> {
    let seed = args.seed.unwrap_or_else(fresh_seed);
    let config = if args.greedy {
        SamplingConfig {
            seed,
            repetition_penalty: args.repeat_penalty,
            ..SamplingConfig::greedy()
        }
    } else {
        SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repeat_penalty,
            seed,
        }
    };
    config.validate().map_err(|e| match e {
        ModelError::InvalidArgument { name, message } => {
            let flag = match name.as_str() {
                "temperature" => "--temperature",
                "top_p" => "--top-p",
                "top_k" => "--top-k",
                "repetition_penalty" => "--repeat-penalty",
                other => other,
            };
            CliError::user(format!("{flag}: {message}"))
        }
        other => CliError::from(other),
    })?;
    if args.stop.iter().any(String::is_empty) {
        return Err(CliError::user("--stop: a stop string must not be empty"));
    }
    Ok(config)
}

/// A seed that differs from run to run.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = cla_model::SplitMix64::new(nanos ^ u64::from(std::process::id()) << 32);
    // Keep it short enough to retype.
    rng.next_u64() % 1_000_000_000
}

fn describe_sampling(s: &SamplingConfig) -> String {
    if s.is_greedy() {
        "greedy".into()
    } else {
        format!(
            "temperature {}, top-k {}, top-p {}, repeat penalty {}, seed {}",
            s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.seed
        )
    }
}

/// Reads the prompt text(s) or ids from wherever the flags say.
fn read_source(args: &GenerateArgs) -> CliResult<Source> {
    if let Some(text) = &args.prompt {
        if text.is_empty() {
            return Err(empty_prompt("the prompt"));
        }
        return Ok(Source::Texts(vec![(None, text.clone())]));
    }
    if let Some(path) = &args.prompt_file {
        let text = read_text(path, "--prompt-file")?;
        let text = drop_trailing_newline(&text);
        if text.is_empty() {
            return Err(empty_prompt(&format!("--prompt-file {}", path.display())));
        }
        return Ok(Source::Texts(vec![(None, text.to_string())]));
    }
    if let Some(list) = &args.prompt_ids {
        return parse_ids(list).map(Source::Ids);
    }
    if let Some(path) = &args.batch_file {
        let text = read_text(path, "--batch-file")?;
        let prompts: Vec<(Option<usize>, String)> = text
            .split('\n')
            .enumerate()
            .map(|(i, l)| (Some(i + 1), l.strip_suffix('\r').unwrap_or(l).to_string()))
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        if prompts.is_empty() {
            return Err(CliError::user(format!(
                "--batch-file {}: no prompts (the file has no non-blank line); write one \
                 prompt per line",
                path.display()
            )));
        }
        return Ok(Source::Texts(prompts));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(CliError::user(
            "no prompt: give one as an argument (cla generate \"Once upon a time\"), with \
             --prompt-file FILE, --prompt-ids \"0 76 1720\" or --batch-file FILE, or pipe it on \
             stdin",
        ));
    }
    let mut bytes = Vec::new();
    stdin
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::user(format!("cannot read the prompt from stdin: {e}")))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CliError::user("the prompt on stdin is not UTF-8 text"))?;
    let text = drop_trailing_newline(&text);
    if text.is_empty() {
        return Err(CliError::user(
            "no prompt: stdin was empty; give a prompt as an argument (cla generate \"Once \
             upon a time\"), with --prompt-file, --prompt-ids or --batch-file, or pipe text on \
             stdin",
        ));
    }
    Ok(Source::Texts(vec![(None, text.to_string())]))
}

fn empty_prompt(what: &str) -> CliError {
    CliError::user(format!(
        "{what} is empty: give some text to continue (or --prompt-ids with the BOS id to \
         start from nothing)"
    ))
}

/// Reads a UTF-8 text file, with a user error that names the flag.
pub(crate) fn read_text(path: &Path, flag: &str) -> CliResult<String> {
    let bytes = std::fs::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::IsADirectory => "it is a directory".to_string(),
            _ => e.to_string(),
        };
        CliError::user(format!("{flag} {}: cannot read it: {why}", path.display()))
    })?;
    String::from_utf8(bytes)
        .map_err(|_| CliError::user(format!("{flag} {}: not UTF-8 text", path.display())))
}

fn drop_trailing_newline(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}

/// Parses `--prompt-ids`: whole numbers separated by spaces and/or commas, brackets allowed.
fn parse_ids(list: &str) -> CliResult<Vec<u32>> {
    let cleaned = list.trim().trim_start_matches('[').trim_end_matches(']');
    let mut ids = Vec::new();
    for part in cleaned
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
    {
        let id: u32 = part.parse().map_err(|_| {
            CliError::user(format!(
                "--prompt-ids: `{part}` is not a token id; give whole numbers separated by \
                 spaces or commas, e.g. \"0 76 1720\""
            ))
        })?;
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(CliError::user(
            "--prompt-ids: no ids given; give whole numbers separated by spaces or commas, \
             e.g. \"0 76 1720\"",
        ));
    }
    Ok(ids)
}

/// Token ids of every prompt.
fn tokenize(
    args: &GenerateArgs,
    source: Source,
    tokenizer: &Tokenizer,
    vocab: usize,
) -> CliResult<Vec<Prompt>> {
    match source {
        Source::Ids(ids) => {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(CliError::user(format!(
                    "--prompt-ids: token id {bad} is out of range: the model's vocabulary has \
                     {vocab} tokens (0..{vocab})"
                )));
            }
            Ok(vec![Prompt {
                text: None,
                line: None,
                ids,
            }])
        }
        Source::Texts(texts) => texts
            .into_iter()
            .map(|(line, text)| {
                let ids = tokenizer.encode(&text, !args.no_bos)?;
                if ids.is_empty() {
                    return Err(CliError::user(
                        "the prompt has no tokens (and --no-bos drops the BOS token); give \
                         some text",
                    ));
                }
                Ok(Prompt {
                    text: Some(text),
                    line,
                    ids,
                })
            })
            .collect(),
    }
}

/// A generation error in the command's words.
fn generation_error(e: ModelError) -> CliError {
    match e {
        ModelError::PromptTooLong { len, context, .. } => CliError::user(format!(
            "the prompt has {len} tokens but the model's context holds {context}; shorten it, \
             or pass --truncate-prompt to keep its last tokens"
        )),
        ModelError::EmptyPrompt => {
            CliError::user("the prompt is empty: give some text to continue")
        }
        other => CliError::from(other),
    }
}

/// One line of `--json`.
#[derive(Serialize)]
struct JsonGeneration<'a> {
    index: usize,
    line: Option<usize>,
    prompt: Option<&'a str>,
    prompt_ids: &'a [u32],
    truncated_tokens: usize,
    text: &'a str,
    ids: &'a [u32],
    stop_reason: &'static str,
    stop_token: Option<u32>,
    stop_string: Option<&'a str>,
    prompt_tokens: usize,
    generated_tokens: usize,
    timings: Option<JsonTimings>,
    kv_bytes: Option<u64>,
    seed: u64,
    device: &'a str,
    model: &'a str,
}

#[derive(Serialize)]
struct JsonTimings {
    prefill_seconds: f64,
    prefill_tokens: usize,
    decode_seconds: f64,
    decode_tokens: usize,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

fn stop_fields(reason: &StopReason) -> (&'static str, Option<u32>, Option<&str>) {
    match reason {
        StopReason::MaxNewTokens => ("max_tokens", None, None),
        StopReason::StopToken(t) => ("eos", Some(*t), None),
        StopReason::StopString(s) => ("stop_string", None, Some(s.as_str())),
        StopReason::ContextFull => ("context_full", None, None),
        StopReason::Stopped => ("interrupted", None, None),
    }
}

fn json_line(value: &impl Serialize) -> String {
    let mut s = serde_json::to_string(value).expect("plain data serialises");
    s.push('\n');
    s
}

fn header(index: usize, prompt: &Prompt) -> String {
    match prompt.line {
        Some(line) => format!("==> prompt {index} (line {line}) <==\n"),
        None => format!("==> prompt {index} <==\n"),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish_output(
    out: &mut Output,
    mode: Mode,
    single: bool,
    prompts: &[Prompt],
    generations: &[Generation],
    device: &str,
    seed: u64,
    model_name: &str,
) -> CliResult {
    for (i, (p, g)) in prompts.iter().zip(generations).enumerate() {
        match mode {
            Mode::Json => {
                let (stop_reason, stop_token, stop_string) = stop_fields(&g.stop_reason);
                let t = &g.timings;
                out.write(&json_line(&JsonGeneration {
                    index: i,
                    line: p.line,
                    prompt: p.text.as_deref(),
                    prompt_ids: &g.prompt_ids,
                    truncated_tokens: g.truncated_tokens,
                    text: &g.text,
                    ids: &g.ids,
                    stop_reason,
                    stop_token,
                    stop_string,
                    prompt_tokens: g.prompt_ids.len(),
                    generated_tokens: g.ids.len(),
                    timings: Some(JsonTimings {
                        prefill_seconds: t.prefill_seconds,
                        prefill_tokens: t.prefill_tokens,
                        decode_seconds: t.decode_seconds,
                        decode_tokens: t.decode_tokens,
                        prefill_tokens_per_second: t.prefill_tokens_per_second(),
                        decode_tokens_per_second: t.decode_tokens_per_second(),
                    }),
                    kv_bytes: Some(g.kv_bytes),
                    seed,
                    device,
                    model: model_name,
                }));
            }
            Mode::Ids if single => out.end_line(),
            Mode::Ids => {
                let line: Vec<String> = g.ids.iter().map(u32::to_string).collect();
                out.write(&format!("{}\n", line.join(" ")));
            }
            Mode::Text if single => out.end_line(),
            Mode::Text => {
                out.write(&header(i, p));
                out.write(&g.text);
                out.end_line();
            }
        }
    }
    if single && mode != Mode::Json && generations.is_empty() {
        out.end_line();
    }
    Ok(())
}

/// Kernel build time below which the summary does not mention it.
const BUILD_NOTE_SECONDS: f64 = 0.1;

/// The summary line on stderr; `built`: seconds of it spent building GPU kernels.
fn summary(
    generations: &[Generation],
    wall: f64,
    built: f64,
    device: &str,
    sampling: &SamplingConfig,
) {
    let prompt_tokens: usize = generations.iter().map(|g| g.prompt_ids.len()).sum();
    let generated: usize = generations.iter().map(|g| g.ids.len()).sum();
    let prefill_seconds = generations
        .iter()
        .map(|g| g.timings.prefill_seconds)
        .fold(0.0, f64::max);
    let decode_seconds = generations
        .iter()
        .map(|g| g.timings.decode_seconds)
        .fold(0.0, f64::max);
    let decode_tokens: usize = generations.iter().map(|g| g.timings.decode_tokens).sum();
    let kv: u64 = generations.iter().map(|g| g.kv_bytes).sum();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let truncated: usize = generations.iter().map(|g| g.truncated_tokens).sum();
    let truncated = if truncated > 0 {
        format!(" ({truncated} dropped by --truncate-prompt)")
    } else {
        String::new()
    };
    let seed = if sampling.is_greedy() {
        "greedy".to_string()
    } else {
        format!("seed {}", sampling.seed)
    };
    // Worth a word when it visibly lowers the rates (first use on a machine, before the
    // driver has cached the compiled kernels).
    let built = if built >= BUILD_NOTE_SECONDS {
        format!(" ({built:.2}s of it building GPU kernels on first use)")
    } else {
        String::new()
    };
    let _ = writeln!(
        std::io::stderr(),
        "{} prompt tokens{truncated}, {} generated tokens; prefill {:.1} tok/s, decode {:.1} \
         tok/s; KV cache {} ({} bytes); {device}, {seed}, {wall:.2}s{built}",
        prompt_tokens,
        generated,
        rate(prompt_tokens, prefill_seconds),
        rate(decode_tokens, decode_seconds),
        ByteSize(kv),
        kv,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_in_several_spellings() {
        assert_eq!(parse_ids("0 76 1720").unwrap(), vec![0, 76, 1720]);
        assert_eq!(parse_ids("[0, 76,1720]").unwrap(), vec![0, 76, 1720]);
        assert!(parse_ids("").is_err());
        assert!(parse_ids("1 x 2").is_err());
        assert!(parse_ids("-1").is_err());
    }

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(drop_trailing_newline("a\n"), "a");
        assert_eq!(drop_trailing_newline("a\r\n"), "a");
        assert_eq!(drop_trailing_newline("a\n\n"), "a\n");
        assert_eq!(drop_trailing_newline("a"), "a");
    }
}
