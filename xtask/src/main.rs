//! Developer workflow for the cla workspace.
//!
//! * `cargo xtask test`: formatting check, clippy with warnings denied, and every test of
//!   the workspace (property tests included). Exits non-zero on the first failure.
//! * `cargo xtask conformance`: the tests that read the shared reference models and data
//!   (see DEVELOPERS.md). They are `#[ignore]`d in the plain suite because a fresh clone
//!   does not have those files; this command runs exactly those tests.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test          cargo fmt --check, cargo clippy -D warnings, cargo test --workspace
  conformance   the tests that need the shared reference models (CLA_SHARED_DIR, default ../shared)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("conformance") => conformance(),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("xtask: running cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("could not start `{cargo}`"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    eprintln!("xtask: all checks passed");
    Ok(())
}

/// Directory with the shared reference material (models with golden outputs, corpus).
fn shared_dir() -> PathBuf {
    match std::env::var_os("CLA_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("..").join("shared"),
    }
}

fn conformance() -> Result<()> {
    let shared = shared_dir();
    if !shared.join("models").is_dir() {
        bail!(
            "the shared reference directory {} has no models/ folder; set CLA_SHARED_DIR to \
             the directory that holds models/stories260K",
            shared.display()
        );
    }
    let shared = shared
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", shared.display()))?;
    eprintln!("xtask: conformance tests against {}", shared.display());
    // Conformance tests are `#[ignore]`d (a fresh clone has no shared directory) and carry
    // `conformance` in their name; run exactly those, with the same profile as
    // `cargo xtask test` so the build is reused.
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(&cargo_bin)
        .args(["test", "--workspace", "--", "--ignored", "conformance"])
        .env("CLA_SHARED_DIR", &shared)
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start cargo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        bail!("conformance tests failed ({})", output.status);
    }
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|rest| rest.split(' ').next()?.parse::<usize>().ok())
        .sum();
    if passed == 0 {
        eprintln!("xtask: there are no conformance tests yet; nothing to run");
    } else {
        eprintln!("xtask: {passed} conformance tests passed");
    }
    Ok(())
}
