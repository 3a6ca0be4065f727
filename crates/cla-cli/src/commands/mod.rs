//! The subcommands of `cla`, one module each, and the top-level parser.
//!
//! To add a command: write `commands/<name>.rs` with an `Args` struct (clap derive) and a
//! `run(args) -> CliResult` function, add a variant to [`Command`] and a line to [`run`].

pub mod bench;
pub mod devices;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod kv;
pub mod model;

use crate::failure::{self, CliResult};
use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  cla generate \"Once upon a time\"                continue a prompt with the shipped model
  cla generate --greedy --max-tokens 32 --json \"The people\"
  cla eval --context 256 --stride 256 val.txt    perplexity of a text file
  cla bench --batch 1,4 --context 64,256         speed of the shipped model
  cla inspect --model models/small-mqa-cla2      config, parameters, layer map, weights
  cla devices                                    GPU adapters wgpu can use
  cla kv --preset H128-MQA-CLA2                  K/V map and cache bytes of a paper model
  cla kv --preset paper-1b                       the paper's Table 1
  cla kv --config config.json --kv-map cla2 --compare none
  cla kv --preset H128-MQA-CLA2 --budget 80GiB --context 32768 --batch 8 --json

Model: commands that run a model take --model DIR; the default is $CLA_MODEL, else
models/small-mqa-cla2 (the model shipped in the repository).

Exit codes: 0 success, 1 user error (bad flag, file or config), 2 internal failure,
130 interrupted by Ctrl-C.";

/// Cross-Layer Attention (CLA) engine: run, evaluate, benchmark and inspect CLA models, and
/// see what their K/V sharing costs and saves.
#[derive(Debug, Parser)]
#[command(name = "cla", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,

    /// More log output on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show which layer reads which layer's K/V, the KV-cache bytes per token, and what fits
    /// in a memory budget.
    Kv(kv::KvArgs),
    /// Generate text from a prompt, streaming tokens as they are produced.
    Generate(generate::GenerateArgs),
    /// Perplexity of a text file under a model (sliding windows).
    Eval(eval::EvalArgs),
    /// Prefill and decode speed over a grid of batch sizes and contexts.
    Bench(bench::BenchArgs),
    /// A model directory: config, parameters, layer map, KV bytes, weight dtypes.
    Inspect(inspect::InspectArgs),
    /// The GPU adapters wgpu sees, with their features and limits.
    Devices(devices::DevicesArgs),
}

/// Parses the command line; on failure (or `--help`/`--version`) returns the exit code.
pub fn parse_args() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        // Name the subcommand in the pointer to its help, when it is a known one.
        let sub = std::env::args().nth(1).filter(|a| {
            Cli::command()
                .get_subcommands()
                .any(|c| c.get_name() == a.as_str())
        });
        failure::clap_failure(e, sub.as_deref())
    })
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Kv(args) => kv::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Devices(args) => devices::run(&args),
    }
}
