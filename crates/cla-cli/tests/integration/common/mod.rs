//! Shared by the CLI tests: running the real `cla` binary and a tiny model with random
//! weights, saved once per test binary into a temporary directory.

#![allow(dead_code)]

use cla_core::{DType, ModelConfig};
use cla_model::ModelWeights;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `cla ARGS` with stdin closed.
pub fn cla(args: &[&str]) -> Output {
    cla_with(args, None, &[])
}

/// Runs `cla ARGS`, feeding `stdin` if given, with extra environment variables.
pub fn cla_with(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cla"));
    cmd.args(args)
        .env_remove("CLA_MODEL")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the cla binary runs");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("cla finishes")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = cla(args);
    assert!(
        o.status.success(),
        "cla {args:?} failed ({:?}): {}",
        o.status.code(),
        stderr(&o)
    );
    stdout(&o)
}

/// Checks that `o` is a user error: exit code 1, one `error: ...` line on stderr, nothing
/// on stdout, no panic or backtrace, not an internal failure. `shown` describes the run in
/// failure messages. Returns stderr.
pub fn user_error(o: &Output, shown: &str) -> String {
    let err = stderr(o);
    let shown = format!("{shown}\nstderr: {err}\nstdout: {}", stdout(o));
    assert_eq!(o.status.code(), Some(1), "{shown}");
    assert!(!err.contains("panicked"), "{shown}");
    assert!(!err.contains("RUST_BACKTRACE"), "{shown}");
    assert!(!err.contains("internal failure"), "{shown}");
    assert!(o.stdout.is_empty(), "printed to stdout: {shown}");
    // Mesa's GL probe prints its own `error: XDG_RUNTIME_DIR ...` lines on machines without
    // a display; they are not cla's.
    let errors = err
        .lines()
        .filter(|l| l.starts_with("error: ") && !l.contains("XDG_RUNTIME_DIR"))
        .count();
    assert_eq!(errors, 1, "one error line: {shown}");
    err
}

/// Runs `cla ARGS`, checks success, and parses stdout as one JSON value.
pub fn json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cla {args:?}: not JSON ({e}): {out}"))
}

/// Runs `cla ARGS`, checks success, and parses stdout as JSON lines.
pub fn json_lines(args: &[&str]) -> Vec<serde_json::Value> {
    ok(args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "cla-cli-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file with `contents` in a fresh directory.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = temp_dir("file").join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shipped tokenizer (4096-token byte-level BPE).
pub fn shipped_tokenizer() -> PathBuf {
    repo_root().join("models/small-mqa-cla2/tokenizer.json")
}

/// Context (max_position_embeddings) of the tiny model.
pub const TINY_CONTEXT: usize = 64;

/// A tiny CLA2 model's config.json: 4 layers of width 16, MQA, vocabulary 4096 (the
/// shipped tokenizer's), context 64.
pub fn tiny_config_json() -> String {
    format!(
        r#"{{
  "hidden_size": 16,
  "intermediate_size": 32,
  "num_hidden_layers": 4,
  "num_attention_heads": 2,
  "num_key_value_heads": 1,
  "head_dim": 8,
  "vocab_size": 4096,
  "max_position_embeddings": {TINY_CONTEXT},
  "rms_norm_eps": 1e-5,
  "rope_theta": 10000.0,
  "tie_word_embeddings": true,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "kv_source_layers": [0, 0, 2, 2]
}}"#
    )
}

/// The tiny model's config.
pub fn tiny_config() -> ModelConfig {
    ModelConfig::from_json_str(&tiny_config_json(), "tiny config").unwrap()
}

fn save_tiny(dtype: DType, tag: &str) -> PathBuf {
    let dir = temp_dir(tag).join("model");
    ModelWeights::random(&tiny_config(), 7)
        .save(&dir, dtype, Some(&shipped_tokenizer()))
        .expect("save the tiny model");
    dir
}

/// The tiny model with f32 weights, saved once per test binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| save_tiny(DType::F32, "tiny-f32"))
}

/// The tiny model with bf16 weights, saved once per test binary.
pub fn tiny_model_bf16() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| save_tiny(DType::BF16, "tiny-bf16"))
}

/// The tiny model's directory as a string.
pub fn tiny() -> &'static str {
    tiny_model().to_str().expect("a UTF-8 temp path")
}
