//! `cla`: the command-line front end of the cla engine.
//!
//! This file only parses the command line, sets up logging, runs the chosen command and
//! turns its outcome into an exit code (see [`failure`]); each command lives in
//! `commands/<name>.rs`.

mod commands;
mod failure;
mod interrupt;

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    headless_runtime_dir();
    failure::install_panic_hook();
    let cli = match commands::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_logging(cli.verbose);
    failure::exit_code(std::panic::catch_unwind(|| commands::run(cli)))
}

/// Mesa's Vulkan and GL drivers look for the per-user runtime directory (display-server
/// sockets) when wgpu enumerates adapters, and print an error line for every adapter when
/// `XDG_RUNTIME_DIR` is unset or invalid, as on headless servers and in containers. Compute
/// needs no display: point them at the temporary directory instead of printing noise.
fn headless_runtime_dir() {
    let valid =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if !valid {
        // SAFETY: first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
}

/// `-v`: cla's own messages (info); `-vv`: debug, and other crates' info; `-vvv`: trace
/// everything. `RUST_LOG` overrides all of it.
fn init_logging(verbose: u8) {
    use log::LevelFilter;
    let (ours, others) = match verbose {
        0 => (LevelFilter::Warn, LevelFilter::Warn),
        1 => (LevelFilter::Info, LevelFilter::Warn),
        2 => (LevelFilter::Debug, LevelFilter::Info),
        _ => (LevelFilter::Trace, LevelFilter::Trace),
    };
    // wgpu's backends log probing failures (a GL adapter without a display, ...) as errors;
    // they are noise unless asked for.
    let backends = if verbose == 0 {
        LevelFilter::Off
    } else {
        others
    };
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(others)
        .filter_module("wgpu_hal", backends)
        .filter_module("wgpu_core", backends)
        .filter_module("cla", ours)
        .filter_module("cla_model", ours)
        .filter_module("cla_kv", ours)
        .filter_module("cla_kernels_wgpu", ours)
        .format(|buf, record| {
            writeln!(
                buf,
                "[{} {}] {}",
                record.level().as_str().to_ascii_lowercase(),
                record.target(),
                record.args()
            )
        });
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    let _ = builder.try_init();
}
