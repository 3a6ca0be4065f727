//! `cla`: the command-line front end of the cla engine.
//!
//! This file only parses the command line, runs the chosen command and turns its outcome
//! into an exit code (see [`failure`]); each command lives in `commands/<name>.rs`.

mod commands;
mod failure;

use std::process::ExitCode;

fn main() -> ExitCode {
    failure::install_panic_hook();
    let cli = match commands::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    failure::exit_code(std::panic::catch_unwind(|| commands::run(cli)))
}
