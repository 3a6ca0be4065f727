//! The subcommands of `cla`, one module each, and the top-level parser.
//!
//! To add a command: write `commands/<name>.rs` with an `Args` struct (clap derive) and a
//! `run(args) -> CliResult` function, add a variant to [`Command`] and a line to [`run`].

pub mod kv;

use crate::failure::{self, CliResult};
use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  cla kv --preset H128-MQA-CLA2                  K/V map and cache bytes of a paper model
  cla kv --preset paper-1b                       the paper's Table 1
  cla kv --config config.json --kv-map cla2 --compare none
  cla kv --preset H128-MQA-CLA2 --budget 80GiB --context 32768 --batch 8 --json

Exit codes: 0 success, 1 user error (bad flag, file or config), 2 internal failure.";

/// Cross-Layer Attention (CLA) engine: what a model's K/V sharing costs and saves.
#[derive(Debug, Parser)]
#[command(name = "cla", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show which layer reads which layer's K/V, the KV-cache bytes per token, and what fits
    /// in a memory budget.
    Kv(kv::KvArgs),
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
    }
}
