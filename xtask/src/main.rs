//! Developer workflow for the cla workspace.
//!
//! * `cargo xtask test`: formatting check, clippy with warnings denied, every test of the
//!   workspace (property tests included), and a run of each GPU benchmark program with tiny
//!   shapes on the software device. Exits non-zero on the first failure.
//! * `cargo xtask conformance`: the tests that read the shared reference models and data
//!   (see DEVELOPERS.md). They are `#[ignore]`d in the plain suite because a fresh clone
//!   does not have those files; this command runs exactly those tests.

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test          cargo fmt --check, cargo clippy -D warnings, cargo test --workspace, and the
                GPU benchmark programs with tiny shapes on the software device
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

/// The cargo that runs xtask (or the one on the path).
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Runs cargo at the workspace root with `env` added, its stderr shown and its stdout
/// captured; the caller judges the exit status.
fn cargo_captured(args: &[&str], env: &[(&str, &Path)]) -> Result<std::process::Output> {
    Command::new(cargo_bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start cargo")
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = cargo_bin();
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
    // One build for the tests and the benchmark programs: `cargo test` builds every example
    // too (to check that it compiles), so the smoke runs below use those binaries instead of
    // building the examples a second time under another profile.
    let examples = build_tests()?;
    cargo(&["test", "--workspace"])?;
    bench_smoke(&examples)?;
    eprintln!("xtask: all checks passed");
    Ok(())
}

/// Builds what `cargo test --workspace` runs and returns the example binaries that build
/// produced, by name (from cargo's JSON messages).
fn build_tests() -> Result<HashMap<String, PathBuf>> {
    let args = [
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ];
    eprintln!("xtask: running cargo {}", args.join(" "));
    let output = cargo_captured(&args, &[])?;
    if !output.status.success() {
        bail!("`cargo {}` failed ({})", args.join(" "), output.status);
    }
    let mut examples = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_example = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "example"));
        if let (true, Some(name), Some(exe)) = (
            msg["reason"] == "compiler-artifact" && is_example,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            examples.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(examples)
}

/// Runs each GPU benchmark program end to end with tiny shapes on the software device (its
/// figures mean nothing there): a benchmark that no longer runs, or no longer writes its
/// report, fails here instead of on a GPU machine. `examples`: the binaries by name, as
/// [`build_tests`] gives them.
fn bench_smoke(examples: &HashMap<String, PathBuf>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cla-xtask-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Example, arguments, an entry its JSON report must hold, and whether it also writes the
    // generated kernel sources (`--dump-kernels`), which must not come back empty.
    let runs: [(&str, &[&str], &str, bool); 2] = [
        (
            "gpu_bench",
            &[
                "--quick",
                "--only",
                "attn,sample",
                "--contexts",
                "64",
                "--batches",
                "1",
            ],
            "\"attn_decode\"",
            true,
        ),
        (
            "gpu_decode_bench",
            &["--quick", "--skip-1b"],
            "\"decode_tokens_per_s\"",
            false,
        ),
    ];
    let result = runs
        .iter()
        .try_for_each(|&(example, args, expect, dumps_kernels)| {
            let exe = examples.get(example).with_context(|| {
                format!("`cargo test --workspace --no-run` built no example named {example}")
            })?;
            let out = dir.join(format!("{example}.json"));
            let kernels = dir.join("kernels");
            let mut cmd = Command::new(exe);
            cmd.args(args)
                .env("CLA_DEVICE", "cpu")
                .current_dir(workspace_root());
            if dumps_kernels {
                cmd.arg("--dump-kernels").arg(&kernels);
            }
            cmd.arg(&out);
            eprintln!("xtask: running {example} {}", args.join(" "));
            let status = cmd
                .status()
                .with_context(|| format!("could not start {}", exe.display()))?;
            if !status.success() {
                bail!("{example} failed ({status})");
            }
            if dumps_kernels {
                let dumped = std::fs::read_dir(&kernels)
                    .map(|d| d.filter_map(|e| e.ok()).count())
                    .unwrap_or(0);
                if dumped == 0 {
                    bail!(
                        "{example} --dump-kernels wrote no kernel sources to {}",
                        kernels.display()
                    );
                }
            }
            let report = std::fs::read_to_string(&out)
                .with_context(|| format!("{example} wrote no report at {}", out.display()))?;
            if !report.contains(expect) {
                bail!(
                    "{example}: the report at {} has no {expect} entry",
                    out.display()
                );
            }
            Ok(())
        });
    let _ = std::fs::remove_dir_all(&dir);
    result
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
    let output = cargo_captured(
        &["test", "--workspace", "--", "--ignored", "conformance"],
        &[("CLA_SHARED_DIR", &shared)],
    )?;
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
