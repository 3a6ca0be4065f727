//! `cla generate`, `eval`, `bench`, `inspect` and `devices`, run as real processes on a tiny
//! model with random weights (and the shipped tokenizer), their JSON parsed and checked.

use crate::common;

use cla_core::memory::kv_bytes_per_token;
use cla_core::{DType, ParamCount, ParamOptions};
use common::*;
use serde_json::Value;

fn ids_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// generate

#[test]
fn generate_greedy_json_is_deterministic_and_complete() {
    let args = [
        "generate",
        "--model",
        tiny(),
        "--device",
        "cpu",
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "12",
        "--json",
        "Once upon a time",
    ];
    let a = json_lines(&args);
    let b = json_lines(&args);
    assert_eq!(a.len(), 1);
    let g = &a[0];
    assert_eq!(ids_of(&g["ids"]), ids_of(&b[0]["ids"]));
    assert_eq!(g["text"], b[0]["text"]);
    assert_eq!(g["ids"].as_array().unwrap().len(), 12);
    assert_eq!(g["generated_tokens"], 12);
    assert_eq!(g["stop_reason"], "max_tokens");
    assert_eq!(g["index"], 0);
    assert_eq!(g["prompt"], "Once upon a time");
    let prompt_ids = ids_of(&g["prompt_ids"]);
    assert_eq!(prompt_ids[0], 0, "text prompts start with BOS");
    assert_eq!(g["prompt_tokens"], prompt_ids.len());
    assert!(g["text"].is_string());
    assert!(g["kv_bytes"].as_u64().unwrap() > 0);
    let t = &g["timings"];
    assert_eq!(t["prefill_tokens"], prompt_ids.len());
    assert_eq!(t["decode_tokens"], 11);
    assert!(t["prefill_seconds"].as_f64().unwrap() > 0.0);
    assert!(t["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(g["device"], "cpu");
}

/// `--device auto` (the default) never settles on a software adapter: with `CLA_DEVICE`
/// selecting one it runs on the CPU, and so it does with the default selector on a machine
/// whose adapters are all software ones.
#[test]
fn auto_device_is_the_cpu_without_a_hardware_gpu() {
    let args = [
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--max-tokens",
        "2",
        "--json",
        "hi",
    ];
    let device = |o: &std::process::Output| {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
        let v: Value = serde_json::from_str(stdout(o).lines().next().unwrap()).unwrap();
        v["device"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        device(&cla_with(&args, None, &[("CLA_DEVICE", "cpu")])),
        "cpu"
    );
    let listed = json(&["devices", "--json", "--no-open"]);
    let hardware = listed["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["device_type"] != "Cpu");
    if !hardware {
        // `CLA_DEVICE=auto` is the selector of an unset `CLA_DEVICE`.
        assert_eq!(
            device(&cla_with(&args, None, &[("CLA_DEVICE", "auto")])),
            "cpu"
        );
    }
}

#[test]
fn generate_ids_match_json_ids_and_text_streams() {
    let common = [
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "10",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = common.to_vec();
        v.extend_from_slice(extra);
        v.push("The people");
        v
    };
    let j = json_lines(&with(&["--json"]));
    let ids_out = ok(&with(&["--ids"]));
    let printed: Vec<u64> = ids_out
        .split_whitespace()
        .map(|s| s.parse().expect("--ids prints token ids"))
        .collect();
    assert_eq!(printed, ids_of(&j[0]["ids"]));
    assert_eq!(ids_out.lines().count(), 1);

    // Plain text: stdout is the generated text and a newline; the summary is on stderr.
    let o = cla(&with(&[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        j[0]["text"].as_str().unwrap()
    );
    let summary = stderr(&o);
    for word in [
        "prompt tokens",
        "generated tokens",
        "prefill",
        "decode",
        "tok/s",
        "KV cache",
    ] {
        assert!(summary.contains(word), "summary lacks {word:?}: {summary}");
    }
    // --quiet drops it.
    let q = cla(&with(&["--quiet"]));
    assert!(stderr(&q).is_empty(), "{}", stderr(&q));
}

#[test]
fn generate_same_seed_same_text() {
    let run = |seed: &str| {
        json_lines(&[
            "generate",
            "--model",
            tiny(),
            "--temperature",
            "1.0",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--ignore-eos",
            "--max-tokens",
            "16",
            "--seed",
            seed,
            "--json",
            "It was",
        ])
        .remove(0)
    };
    let a = run("42");
    let b = run("42");
    let c = run("43");
    assert_eq!(a["text"], b["text"]);
    assert_eq!(ids_of(&a["ids"]), ids_of(&b["ids"]));
    assert_eq!(a["seed"], 42);
    // 16 draws from a near-uniform distribution over 4096 tokens.
    assert_ne!(ids_of(&a["ids"]), ids_of(&c["ids"]));
}

#[test]
fn generate_batch_file_gives_one_object_per_line() {
    let file = temp_file("prompts.txt", "Once upon a time\nThe people\n\nIt was\n");
    let lines = json_lines(&[
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "5",
        "--batch-file",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(lines.len(), 3, "blank lines are skipped");
    let prompts: Vec<&str> = lines
        .iter()
        .map(|l| l["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["Once upon a time", "The people", "It was"]);
    let line_numbers: Vec<u64> = lines.iter().map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(line_numbers, [1, 2, 4]);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert_eq!(l["ids"].as_array().unwrap().len(), 5);
    }
    // A batch gives each prompt the same continuation as running it alone (greedy).
    let alone = json_lines(&[
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "5",
        "--json",
        "The people",
    ]);
    assert_eq!(ids_of(&alone[0]["ids"]), ids_of(&lines[1]["ids"]));

    // Text output: one header per prompt.
    let text = ok(&[
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--max-tokens",
        "3",
        "--batch-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(text.matches("==> prompt ").count(), 3, "{text}");
}

#[test]
fn generate_reads_stdin_prompt_ids_and_the_model_env_var() {
    let from_stdin = cla_with(
        &[
            "generate",
            "--greedy",
            "--max-tokens",
            "4",
            "--json",
            "--model",
            tiny(),
        ],
        Some("Once upon a time\n"),
        &[],
    );
    assert!(from_stdin.status.success(), "{}", stderr(&from_stdin));
    let s: Value = serde_json::from_str(stdout(&from_stdin).trim()).unwrap();
    assert_eq!(
        s["prompt"], "Once upon a time",
        "one trailing newline is dropped"
    );

    let by_ids = json_lines(&[
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--max-tokens",
        "4",
        "--json",
        "--prompt-ids",
        "0, 76 1720",
    ]);
    assert_eq!(ids_of(&by_ids[0]["prompt_ids"]), [0, 76, 1720]);
    assert!(by_ids[0]["prompt"].is_null());

    // The default model comes from CLA_MODEL.
    let env = cla_with(
        &["generate", "--greedy", "--max-tokens", "2", "--json", "Hi"],
        None,
        &[("CLA_MODEL", tiny())],
    );
    assert!(env.status.success(), "{}", stderr(&env));
    let e: Value = serde_json::from_str(stdout(&env).trim()).unwrap();
    assert_eq!(e["model"], tiny());
}

#[test]
fn generate_stop_string_cuts_the_text() {
    let base = [
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "24",
        "--json",
        "Once upon a time",
    ];
    let full = json_lines(&base).remove(0);
    let text = full["text"].as_str().unwrap().to_string();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(
        chars.len() >= 8,
        "the random model wrote too little: {text:?}"
    );
    let (start, _) = chars[chars.len() / 2];
    let end = chars.get(chars.len() / 2 + 2).map_or(text.len(), |c| c.0);
    let stop = &text[start..end];
    let expected = &text[..text.find(stop).unwrap()];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--stop", stop]);
    let cut = json_lines(&args).remove(0);
    assert_eq!(cut["text"], expected, "stop {stop:?}");
    assert_eq!(cut["stop_reason"], "stop_string");
    assert_eq!(cut["stop_string"], stop);
}

#[test]
fn generate_truncates_long_prompts_only_when_asked() {
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let args = [
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--max-tokens",
        "8",
        "--json",
        long.as_str(),
    ];
    let refused = cla(&args);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("--truncate-prompt"),
        "{}",
        stderr(&refused)
    );
    let mut with = args.to_vec();
    with.push("--truncate-prompt");
    let g = json_lines(&with).remove(0);
    assert!(g["truncated_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        g["prompt_ids"].as_array().unwrap().len(),
        TINY_CONTEXT - 8,
        "keeps context - max_tokens prompt tokens"
    );

    // A prompt that fits but leaves too little room stops at the context.
    let full = json_lines(&[
        "generate",
        "--model",
        tiny(),
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "100",
        "--json",
        "Once upon a time",
    ])
    .remove(0);
    assert_eq!(full["stop_reason"], "context_full");
    let total =
        full["prompt_ids"].as_array().unwrap().len() + full["ids"].as_array().unwrap().len();
    assert_eq!(total, TINY_CONTEXT);
}

// ---------------------------------------------------------------------------------------
// eval

/// Scored tokens and windows of non-overlapping windows of `context` over `n` tokens.
fn expected_disjoint(n: usize, context: usize) -> (usize, usize) {
    let full = n / context;
    let rest = n % context;
    let mut scored = full * (context - 1);
    let mut windows = full;
    if rest >= 2 {
        scored += rest - 1;
        windows += 1;
    }
    (scored, windows)
}

#[test]
fn eval_json_counts_the_scored_tokens() {
    let text = "It is a truth universally acknowledged, that a single man in possession of a \
                good fortune, must be in want of a wife.\n"
        .repeat(6);
    let file = temp_file("text.txt", &text);
    let tokenizer = cla_model::Tokenizer::from_file(shipped_tokenizer(), &tiny_config()).unwrap();
    let n = tokenizer.encode(&text, false).unwrap().len();
    assert!(n > 2 * 16, "{n}");

    let r = json(&[
        "eval",
        "--model",
        tiny(),
        "--context",
        "16",
        "--stride",
        "16",
        "--json",
        file.to_str().unwrap(),
    ]);
    let (scored, windows) = expected_disjoint(n, 16);
    assert_eq!(r["command"], "eval");
    assert_eq!(r["total_tokens"], n);
    assert_eq!(r["tokens_scored"], scored);
    assert_eq!(r["windows"], windows);
    assert_eq!(r["context"], 16);
    assert_eq!(r["stride"], 16);
    let ppl = r["ppl"].as_f64().unwrap();
    let nll = r["mean_nll"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
    assert!((nll.exp() - ppl).abs() < 1e-9 * ppl);
    assert!(r["seconds"].as_f64().unwrap() > 0.0);

    // Overlapping windows score every token but the first.
    let o = json(&[
        "eval",
        "--model",
        tiny(),
        "--context",
        "16",
        "--stride",
        "8",
        "--json",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o["tokens_scored"], n - 1);

    // Defaults: the model's whole context, no overlap; text output; no progress bar when
    // stderr is not a terminal.
    let out = cla(&["eval", "--model", tiny(), file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("perplexity "), "{}", stdout(&out));
    let (scored, _) = expected_disjoint(n, TINY_CONTEXT);
    assert!(
        stdout(&out).contains(&format!("{scored} of {n} tokens")),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------
// bench

#[test]
fn bench_config_with_random_weights_reports_positive_rates() {
    let config = temp_file("tiny.json", &tiny_config_json());
    let r = json(&[
        "bench",
        "--config",
        config.to_str().unwrap(),
        "--batch",
        "1,2",
        "--context",
        "16,40",
        "--decode",
        "4",
        "--json",
    ]);
    assert_eq!(r["command"], "bench");
    assert_eq!(r["model"]["source"], "config");
    let c = tiny_config();
    // `--kv-dtype auto`: f32 on the CPU, f16 on a GPU; the report says which it used.
    let kv = match r["kv_dtype"].as_str() {
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        other => panic!("bench reports kv_dtype {other:?}"),
    };
    assert_eq!(
        r["kv_dtype"] == "f16",
        r["device"].as_str().is_some_and(|d| d != "cpu"),
        "auto means f16 exactly on a GPU: {r}"
    );
    let per_token = kv_bytes_per_token(&c, kv);
    assert_eq!(r["model"]["kv_bytes_per_token"], per_token);
    assert_eq!(
        r["model"]["params"],
        ParamCount::of(&c, ParamOptions::default()).total()
    );
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let cells: Vec<(u64, u64)> = rows
        .iter()
        .map(|x| (x["batch"].as_u64().unwrap(), x["context"].as_u64().unwrap()))
        .collect();
    assert_eq!(cells, [(1, 16), (1, 40), (2, 16), (2, 40)]);
    for row in rows {
        let (batch, context) = (
            row["batch"].as_u64().unwrap(),
            row["context"].as_u64().unwrap(),
        );
        assert!(
            row["prefill_tokens_per_second"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        assert!(
            row["decode_tokens_per_second"].as_f64().unwrap() > 0.0,
            "{row}"
        );
        assert_eq!(row["decode_steps"], 4);
        assert_eq!(row["prompt_tokens"], context - 4);
        // The paged cache holds whole blocks of 16 tokens.
        assert_eq!(
            row["peak_kv_bytes"],
            batch * context.div_ceil(16) * 16 * per_token,
            "{row}"
        );
    }
}

#[test]
fn bench_model_dir_and_table() {
    let text = ok(&[
        "bench",
        "--model",
        tiny(),
        "--batch",
        "1",
        "--context",
        "32",
        "--decode",
        "2",
    ]);
    assert!(text.contains("prefill tok/s"), "{text}");
    assert_eq!(
        text.lines().count(),
        4,
        "title, header, rule, one row: {text}"
    );
    // Default contexts are capped at the model's context (64).
    let r = json(&[
        "bench",
        "--model",
        tiny(),
        "--batch",
        "1",
        "--decode",
        "2",
        "--json",
    ]);
    let contexts: Vec<u64> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["context"].as_u64().unwrap())
        .collect();
    assert_eq!(contexts, [TINY_CONTEXT as u64]);
}

// ---------------------------------------------------------------------------------------
// inspect

#[test]
fn inspect_json_matches_cla_core() {
    let c = tiny_config();
    let params = ParamCount::of(&c, ParamOptions::default()).total();
    for (dir, dtype, size) in [
        (tiny_model(), "F32", 4u64),
        (tiny_model_bf16(), "BF16", 2u64),
    ] {
        let r = json(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
        assert_eq!(r["command"], "inspect");
        assert_eq!(r["params"]["total"], params);
        assert_eq!(
            r["kv_bytes_per_token"]["f32"],
            kv_bytes_per_token(&c, DType::F32)
        );
        assert_eq!(
            r["kv_bytes_per_token"]["bf16"],
            kv_bytes_per_token(&c, DType::BF16)
        );
        assert_eq!(r["kv_map"], serde_json::json!([0, 0, 2, 2]));
        assert_eq!(r["kv_layers"], 2);
        assert_eq!(r["kv_input_layernorm"], false);
        let w = &r["weights"];
        assert_eq!(w["params_match_config"], true);
        assert_eq!(w["elements"], params);
        assert_eq!(w["bytes"], params * size);
        let groups = w["by_dtype"].as_array().unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0]["dtype"], dtype);
        assert_eq!(groups[0]["bytes"], params * size);
        assert_eq!(r["tokenizer"]["vocab_size"], 4096);
        let layers = r["layers"].as_array().unwrap();
        assert_eq!(layers[0]["read_by"], serde_json::json!([1]));
        assert_eq!(layers[1]["produces"], false);
        assert_eq!(layers[1]["kv_source"], 0);
        assert_eq!(layers[3]["cache_slot"], 1);
    }
    let text = ok(&["inspect", "--model", tiny()]);
    assert!(text.contains("L1  -> L0"), "{text}");
    assert!(
        text.contains("produces (cache slot 1), read by L3"),
        "{text}"
    );
    assert!(text.contains(&params.to_string()), "{text}");
}

// ---------------------------------------------------------------------------------------
// devices

#[test]
fn devices_json_parses() {
    for extra in [&["--no-open"][..], &[][..]] {
        let mut args = vec!["devices", "--json"];
        args.extend_from_slice(extra);
        let r = json(&args);
        assert_eq!(r["command"], "devices");
        let adapters = r["adapters"].as_array().expect("a list, maybe empty");
        for (i, a) in adapters.iter().enumerate() {
            assert_eq!(a["index"], i);
            assert!(a["name"].is_string());
            assert!(a["backend"].is_string());
            assert!(a["device_type"].is_string());
            if extra.is_empty() {
                assert!(
                    a["features"].is_object() || a["error"].is_string(),
                    "opened adapters report features or why not: {a}"
                );
            } else {
                assert!(a["features"].is_null());
            }
        }
    }
    let text = cla(&["devices", "--no-open"]);
    assert_eq!(text.status.code(), Some(0));
    assert!(!stdout(&text).is_empty());
}

/// On a headless machine (no runtime directory) the drivers' complaints about it stay out of
/// the output.
#[test]
fn devices_without_a_runtime_dir_print_no_driver_noise() {
    for dir in [None, Some("/nonexistent-runtime-dir")] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cla"));
        cmd.args(["devices"]).env_remove("RUST_LOG");
        match dir {
            Some(d) => cmd.env("XDG_RUNTIME_DIR", d),
            None => cmd.env_remove("XDG_RUNTIME_DIR"),
        };
        let out = cmd.output().expect("the cla binary runs");
        assert_eq!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("XDG_RUNTIME_DIR"), "{dir:?}: {err}");
    }
}

#[test]
fn gpu_device_agrees_with_the_cpu_or_fails_cleanly() {
    let text = "It is a truth universally acknowledged, that a single man in possession of a \
                good fortune, must be in want of a wife.\n"
        .repeat(3);
    let file = temp_file("text.txt", &text);
    let file = file.to_str().unwrap();
    let listed = json(&["devices", "--json", "--no-open"]);
    // A Vulkan, Metal or DX12 adapter, software ones included (lavapipe on CI).
    let adapter = listed["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["backend"] != "Gl")
        .map(|a| a["index"].to_string());
    let Some(index) = adapter else {
        let o = cla(&["eval", "--model", tiny(), "--device", "gpu:cpu", file]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("--device cpu"), "{}", stderr(&o));
        return;
    };
    let device = format!("gpu:{index}");
    let eval = |device: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            tiny(),
            "--context",
            "32",
            "--device",
            device,
            "--json",
            file,
        ];
        args.extend_from_slice(extra);
        json(&args)
    };
    // The same values on both (an f32 cache on the GPU too).
    let (cpu, gpu) = (eval("cpu", &[]), eval(&device, &["--kv-dtype", "f32"]));
    assert!(
        gpu["device"].as_str().unwrap().starts_with("gpu: "),
        "{gpu}"
    );
    assert_eq!(cpu["tokens_scored"], gpu["tokens_scored"]);
    assert_eq!(
        (cpu["kv_dtype"].as_str(), gpu["kv_dtype"].as_str()),
        (Some("f32"), Some("f32"))
    );
    let (a, b) = (cpu["ppl"].as_f64().unwrap(), gpu["ppl"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-3 * a, "cpu ppl {a}, gpu ppl {b}");
    // `--kv-dtype auto` (the default) keeps an f16 cache on a GPU: close, not equal.
    let auto = eval(&device, &[]);
    assert_eq!(auto["kv_dtype"].as_str(), Some("f16"), "{auto}");
    let h = auto["ppl"].as_f64().unwrap();
    assert!(
        (a - h).abs() < 2e-2 * a,
        "cpu ppl {a}, gpu ppl with an f16 cache {h}"
    );
    // The weight matrices rounded to f16 on the GPU as well.
    let half = eval(&device, &["--gpu-weights", "f16"]);
    assert!(
        half["device"].as_str().unwrap().ends_with("f16 weights"),
        "{half}"
    );
    let h = half["ppl"].as_f64().unwrap();
    assert!(
        (a - h).abs() < 2e-2 * a,
        "cpu ppl {a}, gpu ppl with f16 weights {h}"
    );
    let g = json_lines(&[
        "generate",
        "--model",
        tiny(),
        "--device",
        &device,
        "--greedy",
        "--ignore-eos",
        "--max-tokens",
        "6",
        "--json",
        "Once upon a time",
    ]);
    assert_eq!(g[0]["ids"].as_array().unwrap().len(), 6);
}

/// Starts `cla generate` of 240 tokens with the shipped model and waits for the first
/// streamed byte (the Ctrl-C handler is installed by then). Returns the process, its stdout
/// and that byte.
#[cfg(unix)]
fn streaming_generation() -> (std::process::Child, std::process::ChildStdout, u8) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let model = repo_root().join("models/small-mqa-cla2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cla"))
        .args(["generate", "--model", model.to_str().unwrap()])
        .args([
            "--ignore-eos",
            "--max-tokens",
            "240",
            "--seed",
            "3",
            "Once upon a time",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    (child, out, first[0])
}

/// Waits for `child`: its exit code and stderr.
#[cfg(unix)]
fn exit_and_stderr(mut child: std::process::Child) -> (Option<i32>, String) {
    use std::io::Read;
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

/// Ctrl-C in the middle of generation: the text so far is written, the line ended, and
/// cla exits with 130.
#[cfg(unix)]
#[test]
fn ctrl_c_ends_generation_cleanly() {
    use std::io::Read;
    let (child, mut out, first) = streaming_generation();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut text = vec![first];
    out.read_to_end(&mut text).unwrap();
    let (code, err) = exit_and_stderr(child);
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let generated: usize = err
        .split("interrupted after ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no interruption note: {err}"));
    assert!(generated < 240, "{err}");
    let text = String::from_utf8_lossy(&text);
    assert!(text.len() > 1 && text.ends_with('\n'), "{text:?}");
}

/// The reader of stdout goes away mid-generation (`cla generate ... | head -c 1`): cla stops
/// generating and exits with 0, without the summary of a finished run.
#[cfg(unix)]
#[test]
fn a_closed_output_stops_generation_quietly() {
    let (child, out, _) = streaming_generation();
    drop(out);
    let (code, err) = exit_and_stderr(child);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("generated tokens"), "{err}");
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn every_command_has_help_with_examples_and_version() {
    for cmd in ["generate", "eval", "bench", "inspect", "devices", "kv"] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Examples:"), "{cmd}: {out}");
        assert!(out.contains(&format!("cla {cmd}")), "{cmd}: {out}");
    }
    let v = ok(&["--version"]);
    assert!(v.starts_with("cla "), "{v}");
    let top = ok(&["--help"]);
    for cmd in [
        "generate",
        "eval",
        "bench",
        "inspect",
        "devices",
        "kv",
        "--verbose",
    ] {
        assert!(top.contains(cmd), "{top}");
    }
}
