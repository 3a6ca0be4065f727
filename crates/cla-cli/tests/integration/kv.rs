//! `cla kv`, run as a real process: the paper's Table 1 through `--json`, `--compare`, the
//! planner, and a table of bad inputs that must each exit with code 1 and name the key.

use crate::common;

use common::{cla, json, stderr, stdout, temp_file, user_error};
use serde_json::{Value, json};

/// Runs `cla kv ARGS --json`, checks success, and parses the output.
fn kv_json(args: &[&str]) -> Value {
    let mut all = vec!["kv"];
    all.extend_from_slice(args);
    all.push("--json");
    json(&all)
}

/// Table 1 of the paper: name, KV layers, KV bytes per token (16-bit), val PPL.
const TABLE_1: [(&str, u64, u64, f64); 20] = [
    ("H128-MHA", 20, 163840, 13.15),
    ("H128-GQA4", 20, 40960, 13.36),
    ("H128-GQA2", 20, 20480, 13.52),
    ("H128-MQA", 20, 10240, 13.54),
    ("H64-MQA", 20, 5120, 13.81),
    ("H46-MQA", 20, 3680, 13.96),
    ("H32-MQA", 20, 2560, 14.37),
    ("H512-MQA-CLA2", 10, 20480, 13.49),
    ("H256-MQA-CLA2", 10, 10240, 13.51),
    ("H128-MQA-CLA2", 10, 5120, 13.60),
    ("H90-MQA-CLA2", 10, 3600, 13.73),
    ("H64-MQA-CLA2", 10, 2560, 13.89),
    ("H256-GQA4-CLA2", 10, 40960, 13.38),
    ("H128-GQA4-CLA2", 10, 20480, 13.48),
    ("H128-GQA2-CLA2", 10, 10240, 13.59),
    ("H128-MQA-CLA3", 7, 3584, 13.77),
    ("H128-MQA-CLA4", 5, 2560, 13.95),
    ("H128-MQA-CLA2-KeepEnds", 11, 5632, 13.62),
    ("H128-MQA-CLA2-DenseFront", 11, 5632, 13.75),
    ("H128-MQA-CLA2-DenseBack", 11, 5632, 14.03),
];

#[test]
fn paper_1b_json_has_every_row_of_table_1() {
    let out = kv_json(&["--preset", "paper-1b"]);
    assert_eq!(out["command"], "kv");
    assert_eq!(out["dtype"], "bf16");
    let models = out["models"].as_array().unwrap();
    assert_eq!(models.len(), 20);
    for (m, &(name, kv_layers, bytes, ppl)) in models.iter().zip(&TABLE_1) {
        assert_eq!(m["name"], name);
        assert_eq!(m["kv_layers"], kv_layers, "{name}");
        assert_eq!(m["kv_bytes_per_token"], bytes, "{name}");
        assert_eq!(m["paper"]["kv_bytes_per_token"], bytes, "{name}");
        assert_eq!(m["paper"]["val_ppl"], ppl, "{name}");
        assert_eq!(m["num_layers"], 20);
        assert_eq!(m["kv_map"].as_array().unwrap().len(), 20);
    }
    // f16 is 16-bit as well; f32 doubles every row.
    let f32_out = kv_json(&["--preset", "paper-1b", "--dtype", "f32"]);
    for (m, &(name, _, bytes, _)) in f32_out["models"].as_array().unwrap().iter().zip(&TABLE_1) {
        assert_eq!(m["kv_bytes_per_token"], 2 * bytes, "{name}");
    }
}

#[test]
fn paper_1b_text_table_lists_every_row() {
    let o = cla(&["kv", "--preset", "paper-1b"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for &(name, kv_layers, bytes, ppl) in &TABLE_1 {
        let row = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[4], kv_layers.to_string(), "{row}");
        assert_eq!(cells[5], bytes.to_string(), "{row}");
        assert_eq!(cells[6], format!("{ppl:.2}"), "{row}");
    }
}

#[test]
fn paper_3b_pair() {
    let out = kv_json(&["--preset", "PAPER-3B", "--compare", "none"]);
    let models = out["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["name"], "H128-MQA-3B");
    assert_eq!(models[0]["kv_bytes_per_token"], 16384);
    assert_eq!(models[1]["name"], "H128-MQA-CLA2-3B");
    assert_eq!(models[1]["kv_bytes_per_token"], 8192);
    assert_eq!(models[1]["compare"]["kv_bytes_per_token"], 16384);
}

#[test]
fn compare_none_halves_cla2() {
    let out = kv_json(&["--preset", "paper-1b", "--compare", "none"]);
    for m in out["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let cmp = &m["compare"];
        assert_eq!(cmp["pattern"], "none");
        assert_eq!(cmp["kv_layers"], 20);
        let ours = m["kv_bytes_per_token"].as_u64().unwrap();
        let theirs = cmp["kv_bytes_per_token"].as_u64().unwrap();
        if name.ends_with("-CLA2") {
            assert_eq!(2 * ours, theirs, "{name}");
            assert_eq!(cmp["kv_bytes_ratio"], 0.5, "{name}");
        }
        if !name.contains("CLA") {
            assert_eq!(ours, theirs, "{name}");
        }
        // Without sharing the model has K/V projections in every layer: more parameters.
        assert!(cmp["params"].as_u64() >= m["params"].as_u64(), "{name}");
    }
    let o = cla(&["kv", "--preset", "H128-MQA-CLA2", "--compare", "none"]);
    assert!(stdout(&o).contains("0.500x"), "{}", stdout(&o));
}

#[test]
fn planner_answers_plug_back() {
    let out = kv_json(&[
        "--preset",
        "H128-MQA-CLA2",
        "--budget",
        "80GiB",
        "--context",
        "32768",
        "--batch",
        "8",
        "--compare",
        "none",
    ]);
    let m = &out["models"][0];
    let plan = &m["plan"];
    let get = |v: &Value| v.as_u64().unwrap();
    let budget = get(&plan["budget_bytes"]);
    let weights = get(&plan["weight_bytes"]);
    let kv_budget = get(&plan["kv_budget_bytes"]);
    let per_token = get(&plan["kv_bytes_per_token"]);
    assert_eq!(budget, 80 << 30);
    assert_eq!(weights, get(&m["params"]) * 2, "bf16 weights");
    assert_eq!(weights, get(&m["weight_bytes"]));
    assert_eq!(kv_budget, budget - weights);
    assert_eq!(per_token, 5120);
    assert_eq!(plan["context"], 32768);
    assert_eq!(plan["batch"], 8);
    let batch = get(&plan["max_batch"]);
    assert!(batch * 32768 * per_token <= kv_budget);
    assert!((batch + 1) * 32768 * per_token > kv_budget);
    let context = get(&plan["max_context"]);
    assert!(8 * context * per_token <= kv_budget);
    assert!(8 * (context + 1) * per_token > kv_budget);
    // The unshared model serves about half as many sequences.
    let dense = get(&m["compare"]["plan"]["max_batch"]);
    assert!(
        dense <= batch / 2 + 1 && dense * 2 >= batch - 2,
        "{dense} vs {batch}"
    );
    // Without --batch, the context question is not answered.
    let only_ctx = kv_json(&[
        "--preset",
        "H128-MQA",
        "--budget",
        "24GB",
        "--context",
        "2048",
    ]);
    assert_eq!(only_ctx["models"][0]["plan"]["max_context"], Value::Null);
    assert!(only_ctx["models"][0]["plan"]["max_batch"].as_u64().unwrap() > 0);
    // Weights that do not fit leave no room for any sequence.
    let tiny = kv_json(&["--preset", "H128-MQA", "--budget", "1MiB", "--context", "1"]);
    assert_eq!(tiny["models"][0]["plan"]["max_batch"], 0);
    assert_eq!(tiny["models"][0]["plan"]["kv_budget_bytes"], 0);
}

fn good_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16"
    })
}

#[test]
fn config_file_with_kv_map_override() {
    let path = temp_file("config.json", &good_config().to_string());
    let p = path.to_str().unwrap();
    let out = kv_json(&["--config", p]);
    let m = &out["models"][0];
    assert_eq!(m["source"], "config");
    assert_eq!(m["kv_layers"], 6);
    // 2 * 2 heads * 32 dims * 6 layers * 2 bytes.
    assert_eq!(m["kv_bytes_per_token"], 1536);
    assert_eq!(m["pattern"], "none");
    for map in ["0_0_2_2_4_4", "cla2", "[0, 0, 2, 2, 4, 4]", "0,0,2,2,4,4"] {
        let out = kv_json(&["--config", p, "--kv-map", map, "--compare", "none"]);
        let m = &out["models"][0];
        assert_eq!(m["kv_map_lckv"], "0_0_2_2_4_4", "{map}");
        assert_eq!(m["kv_map_overridden"], true);
        assert_eq!(m["pattern"], "cla2");
        assert_eq!(m["kv_bytes_per_token"], 768);
        assert_eq!(m["compare"]["kv_bytes_ratio"], 0.5);
    }
    // Text output: the compact line and the per-layer drawing.
    let o = cla(&["kv", "--config", p, "--kv-map", "cla3"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.contains("0 0 0 3 3 3"), "{text}");
    assert!(
        text.contains("L0  produces (cache slot 0), read by L1 L2"),
        "{text}"
    );
    assert!(text.contains("L4  -> L3"), "{text}");
    assert!(text.contains("KV layers   2 of 6"), "{text}");
}

#[test]
fn help_and_version() {
    for args in [&["--help"][..], &["kv", "--help"], &["help", "kv"]] {
        let o = cla(args);
        assert!(o.status.success(), "{args:?}");
        let text = stdout(&o);
        assert!(text.contains("Examples:"), "{args:?}: {text}");
    }
    let kv_help = stdout(&cla(&["kv", "--help"]));
    assert!(
        kv_help.contains("kv_bytes_per_token"),
        "--help documents the JSON keys"
    );
    let o = cla(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("cla "));
}

/// A bad input: `cla kv` must exit with 1, print one `error:` line naming `key`, and never
/// panic.
struct Bad {
    what: &'static str,
    args: Vec<String>,
    key: &'static str,
}

fn bad_config(what: &'static str, key: &'static str, edit: &dyn Fn(&mut Value)) -> Bad {
    let mut config = good_config();
    edit(&mut config);
    let path = temp_file("config.json", &config.to_string());
    Bad {
        what,
        args: vec!["--config".into(), path.to_str().unwrap().into()],
        key,
    }
}

fn set(key: &'static str, value: Value) -> impl Fn(&mut Value) {
    move |c: &mut Value| {
        c[key] = value.clone();
    }
}

fn remove(key: &'static str) -> impl Fn(&mut Value) {
    move |c: &mut Value| {
        c.as_object_mut().unwrap().remove(key);
    }
}

fn flags(what: &'static str, key: &'static str, args: &[&str]) -> Bad {
    Bad {
        what,
        args: args.iter().map(|s| s.to_string()).collect(),
        key,
    }
}

#[test]
fn bad_inputs_exit_1_and_name_the_key() {
    let invalid_json = temp_file("config.json", "{\"hidden_size\": 256,");
    let not_object = temp_file("config.json", "[1, 2, 3]");
    let cases = vec![
        bad_config("missing key", "hidden_size", &remove("hidden_size")),
        bad_config(
            "missing layers",
            "num_hidden_layers",
            &remove("num_hidden_layers"),
        ),
        bad_config(
            "zero hidden_size",
            "hidden_size",
            &set("hidden_size", json!(0)),
        ),
        bad_config(
            "heads not a multiple",
            "num_key_value_heads",
            &set("num_key_value_heads", json!(3)),
        ),
        bad_config("odd head_dim", "head_dim", &set("head_dim", json!(33))),
        bad_config(
            "head_dim underivable",
            "head_dim",
            &set("num_attention_heads", json!(6)),
        ),
        bad_config(
            "map too short",
            "kv_source_layers",
            &set("kv_source_layers", json!([0, 0, 2, 2, 4])),
        ),
        bad_config(
            "map too long",
            "kv_source_layers",
            &set("kv_source_layers", json!([0, 0, 2, 2, 4, 4, 6])),
        ),
        bad_config(
            "source later",
            "kv_source_layers",
            &set("kv_source_layers", json!([0, 0, 2, 5, 4, 5])),
        ),
        bad_config(
            "source is a consumer",
            "kv_source_layers",
            &set("kv_source_layers", json!([0, 0, 1, 3, 4, 5])),
        ),
        bad_config(
            "layer 0 not a producer",
            "kv_source_layers",
            &set("kv_source_layers", json!([1, 1, 2, 3, 4, 5])),
        ),
        bad_config(
            "map not a list",
            "kv_source_layers",
            &set("kv_source_layers", json!("0_0_2_2_4_4")),
        ),
        bad_config("conflicting use_cla", "use_cla", &|c: &mut Value| {
            c["use_cla"] = json!(true);
            c["cla_share_factor"] = json!(3);
            c["kv_source_layers"] = json!([0, 0, 2, 2, 4, 4]);
        }),
        bad_config(
            "use_cla without factor",
            "cla_share_factor",
            &set("use_cla", json!(true)),
        ),
        bad_config(
            "non-numeric value",
            "num_attention_heads",
            &set("num_attention_heads", json!("eight")),
        ),
        bad_config(
            "negative number",
            "intermediate_size",
            &set("intermediate_size", json!(-512)),
        ),
        bad_config(
            "eos id >= vocab",
            "eos_token_id",
            &set("eos_token_id", json!(1000)),
        ),
        bad_config(
            "bos id >= vocab",
            "bos_token_id",
            &set("bos_token_id", json!(5000)),
        ),
        bad_config(
            "bad rms_norm_eps",
            "rms_norm_eps",
            &set("rms_norm_eps", json!("small")),
        ),
        bad_config(
            "absurd layer count",
            "num_hidden_layers",
            &set("num_hidden_layers", json!(1u64 << 50)),
        ),
        Bad {
            what: "invalid JSON",
            args: vec!["--config".into(), invalid_json.to_str().unwrap().into()],
            key: "not a valid JSON config",
        },
        Bad {
            what: "top level not an object",
            args: vec!["--config".into(), not_object.to_str().unwrap().into()],
            key: "not a JSON object",
        },
        flags(
            "missing file",
            "--config",
            &["--config", "/nonexistent/cla/config.json"],
        ),
        flags("unknown preset", "preset", &["--preset", "H999-MQA"]),
        flags("no model", "--preset", &[]),
        flags(
            "preset and config",
            "--config",
            &["--preset", "H128-MQA", "--config", "x.json"],
        ),
        flags(
            "bad --dtype",
            "--dtype",
            &["--preset", "H128-MQA", "--dtype", "f64"],
        ),
        flags(
            "bad --budget",
            "--budget",
            &["--preset", "H128-MQA", "--budget", "80XB", "--context", "1"],
        ),
        flags(
            "negative --budget",
            "--budget",
            &[
                "--preset",
                "H128-MQA",
                "--budget",
                "-1GiB",
                "--context",
                "1",
            ],
        ),
        flags(
            "--budget without a question",
            "--context",
            &["--preset", "H128-MQA", "--budget", "80GiB"],
        ),
        flags(
            "--context without --budget",
            "--budget",
            &["--preset", "H128-MQA", "--context", "10"],
        ),
        flags(
            "zero --context",
            "--context",
            &["--preset", "H128-MQA", "--budget", "1GiB", "--context", "0"],
        ),
        flags(
            "negative --batch",
            "--batch",
            &["--preset", "H128-MQA", "--budget", "1GiB", "--batch", "-3"],
        ),
        flags(
            "non-numeric --batch",
            "--batch",
            &[
                "--preset", "H128-MQA", "--budget", "1GiB", "--batch", "many",
            ],
        ),
        flags(
            "bad --kv-map pattern",
            "--kv-map",
            &["--preset", "H128-MQA", "--kv-map", "cla2-sideways"],
        ),
        flags(
            "--kv-map too short",
            "--kv-map",
            &["--preset", "H128-MQA", "--kv-map", "0_0_2_2"],
        ),
        flags(
            "--kv-map source later",
            "--kv-map",
            &[
                "--preset",
                "paper-1b",
                "--kv-map",
                "0_2_2_2_4_4_6_6_8_8_10_10_12_12_14_14_16_16_18_18",
            ],
        ),
        flags(
            "--kv-map junk",
            "--kv-map",
            &["--preset", "H128-MQA", "--kv-map", "0_x_2"],
        ),
        flags(
            "bad --compare",
            "--compare",
            &["--preset", "H128-MQA", "--compare", "cla0"],
        ),
        flags(
            "unknown flag",
            "--frobnicate",
            &["--preset", "H128-MQA", "--frobnicate"],
        ),
    ];
    assert!(cases.len() >= 15);
    for case in cases {
        let mut args = vec!["kv".to_string()];
        args.extend(case.args.iter().cloned());
        for json_flag in [false, true] {
            let mut args = args.clone();
            if json_flag {
                args.push("--json".into());
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let err = user_error(&cla(&argv), &format!("{}: {argv:?}", case.what));
            // `cla kv` opens no GPU: its stderr is that one line and nothing else.
            assert_eq!(err.trim_end().lines().count(), 1, "{}: {err}", case.what);
            assert!(
                err.contains(case.key),
                "{}: `{err}` does not name {}",
                case.what,
                case.key
            );
        }
    }
}

#[test]
fn no_subcommand_is_a_user_error() {
    let o = cla(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Usage:"));
}
