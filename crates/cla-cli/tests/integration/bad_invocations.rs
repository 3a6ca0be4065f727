//! Bad invocations of the commands that run or read models: each must exit with code 1 and
//! a one-line `error: ...` that says what is wrong, never a panic.

use crate::common;

use common::*;

/// What the test passes where a case needs a path or a long text.
enum Arg {
    Text(&'static str),
    TinyModel,
    File(&'static str, &'static str),
    EmptyDir,
    LongPrompt,
}

use Arg::{EmptyDir, File, LongPrompt, Text, TinyModel};

/// (arguments, what stderr must contain)
fn cases() -> Vec<(Vec<Arg>, &'static str)> {
    vec![
        // generate
        (
            vec![
                Text("generate"),
                Text("--model"),
                Text("/no/such/model"),
                Text("hi"),
            ],
            "no such directory",
        ),
        (
            vec![Text("generate"), Text("--model"), EmptyDir, Text("hi")],
            "config.json",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                File("config.json", "{ not json"),
                Text("hi"),
            ],
            "not a directory",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--device"),
                Text("tpu"),
                Text("hi"),
            ],
            "unknown device `tpu`",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--device"),
                Text("gpu:no-such-adapter"),
                Text("hi"),
            ],
            "no GPU adapter matches",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--gpu-weights"),
                Text("int8"),
                Text("hi"),
            ],
            "as f32 or f16, not `int8`",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--kv-dtype"),
                Text("bf16"),
                Text("hi"),
            ],
            "f16 on a GPU, f32 on the CPU), not `bf16`",
        ),
        (
            vec![
                Text("eval"),
                Text("--model"),
                TinyModel,
                Text("--device"),
                Text("gpu:no-such-adapter"),
                File("t.txt", "some text here"),
            ],
            "use --device cpu",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--device"),
                Text("gpu:"),
                Text("hi"),
            ],
            "`gpu:` needs an adapter name",
        ),
        (
            vec![Text("generate"), Text("--model"), TinyModel, Text("")],
            "the prompt is empty",
        ),
        (
            vec![Text("generate"), Text("--model"), TinyModel],
            "no prompt",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--prompt-ids"),
                Text("0 x 5"),
            ],
            "`x` is not a token id",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--prompt-ids"),
                Text("0 99999"),
            ],
            "token id 99999 is out of range",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--prompt-ids"),
                Text(" "),
            ],
            "no ids given",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--prompt-file"),
                Text("/no/such/prompt.txt"),
            ],
            "--prompt-file /no/such/prompt.txt: cannot read it: no such file",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--batch-file"),
                File("blank.txt", "\n  \n"),
            ],
            "no prompts",
        ),
        (
            vec![Text("generate"), Text("--model"), TinyModel, LongPrompt],
            "pass --truncate-prompt",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--temperature"),
                Text("-1"),
                Text("hi"),
            ],
            "--temperature: must be a finite number >= 0",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--top-p"),
                Text("1.5"),
                Text("hi"),
            ],
            "--top-p",
        ),
        (
            vec![
                Text("generate"),
                Text("--model"),
                TinyModel,
                Text("--stop"),
                Text(""),
                Text("hi"),
            ],
            "stop string must not be empty",
        ),
        (
            vec![
                Text("generate"),
                Text("--max-tokens"),
                Text("lots"),
                Text("hi"),
            ],
            "invalid value 'lots'",
        ),
        (
            vec![
                Text("generate"),
                Text("--greedy"),
                Text("--temperature"),
                Text("0.5"),
                Text("hi"),
            ],
            "cannot be used with",
        ),
        (
            vec![
                Text("generate"),
                Text("--prompt-ids"),
                Text("1"),
                Text("hi"),
            ],
            "cannot be used with",
        ),
        // eval
        (
            vec![
                Text("eval"),
                Text("--model"),
                TinyModel,
                Text("/no/such/text.txt"),
            ],
            "no such file",
        ),
        (
            vec![
                Text("eval"),
                Text("--model"),
                TinyModel,
                Text("--context"),
                Text("100000"),
                File("t.txt", "some text here"),
            ],
            "exceeds the model's max_position_embeddings (64)",
        ),
        (
            vec![
                Text("eval"),
                Text("--model"),
                TinyModel,
                Text("--context"),
                Text("16"),
                Text("--stride"),
                Text("32"),
                File("t.txt", "some text here"),
            ],
            "--stride 32 is larger than the context",
        ),
        (
            vec![
                Text("eval"),
                Text("--model"),
                TinyModel,
                File("empty.txt", ""),
            ],
            "at least 2 tokens",
        ),
        (vec![Text("eval")], "required"),
        // bench
        (
            vec![Text("bench"), Text("--preset"), Text("H999-NOPE")],
            "--preset",
        ),
        (
            vec![
                Text("bench"),
                Text("--preset"),
                Text("H128-MQA-CLA2"),
                Text("--max-weight-bytes"),
                Text("64MiB"),
            ],
            "raise --max-weight-bytes",
        ),
        (
            vec![Text("bench"), Text("--preset"), Text("paper-1b")],
            "is a group",
        ),
        (
            vec![
                Text("bench"),
                Text("--model"),
                TinyModel,
                Text("--batch"),
                Text("0"),
            ],
            "at least 1",
        ),
        (
            vec![
                Text("bench"),
                Text("--model"),
                TinyModel,
                Text("--batch"),
                Text("1,,2"),
            ],
            "empty item",
        ),
        (
            vec![
                Text("bench"),
                Text("--model"),
                TinyModel,
                Text("--context"),
                Text("1000"),
            ],
            "--context 1000 exceeds",
        ),
        (
            vec![
                Text("bench"),
                Text("--model"),
                TinyModel,
                Text("--preset"),
                Text("H128-MQA"),
            ],
            "cannot be used with",
        ),
        (
            vec![
                Text("bench"),
                Text("--config"),
                Text("/no/such/config.json"),
            ],
            "cannot read it",
        ),
        // inspect, devices
        (
            vec![Text("inspect"), Text("--model"), Text("/no/such/model")],
            "no such directory",
        ),
        (
            vec![Text("inspect"), Text("--model"), EmptyDir],
            "config.json",
        ),
        (
            vec![Text("devices"), Text("--bogus")],
            "unexpected argument",
        ),
    ]
}

#[test]
fn bad_invocations_exit_1_with_a_one_line_message() {
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let cases = cases();
    assert!(cases.len() >= 12);
    for (args, expected) in &cases {
        let args: Vec<String> = args
            .iter()
            .map(|a| match a {
                Text(t) => t.to_string(),
                TinyModel => tiny().to_string(),
                File(name, contents) => temp_file(name, contents).display().to_string(),
                EmptyDir => temp_dir("empty").display().to_string(),
                LongPrompt => long.clone(),
            })
            .collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = user_error(&cla(&refs), &format!("cla {refs:?}"));
        assert!(
            err.contains(expected),
            "expected {expected:?} in cla {refs:?}: {err}"
        );
    }
}

/// GPU errors reach the user typed: what they can fix exits with 1 and one line that says
/// how (a Vulkan driver, or --device cpu), never as an internal failure.
#[test]
fn gpu_errors_say_how_to_fix_them() {
    let file = temp_file("t.txt", "some text here");
    let file = file.to_str().unwrap();
    // (arguments, environment, what stderr must contain)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 4] = [
        (
            &[
                "generate",
                "--model",
                tiny(),
                "--device",
                "gpu:no-such-adapter",
                "hi",
            ],
            &[],
            &[
                "no GPU adapter matches",
                "install a Vulkan driver",
                "--device cpu",
            ],
        ),
        (
            &["eval", "--model", tiny(), "--device", "gpu:name:", file],
            &[],
            &["invalid device selector `name:`", "--device cpu"],
        ),
        (
            &["generate", "--model", tiny(), "--device", "gpu", "hi"],
            &[("CLA_DEVICE", "name:")],
            &["invalid device selector", "CLA_DEVICE"],
        ),
        (
            &[
                "bench",
                "--model",
                tiny(),
                "--device",
                "gpu",
                "--context",
                "8",
            ],
            &[("CLA_GPU_DISABLE", "f16,warp-drive")],
            &["unknown fast path `warp-drive`", "CLA_GPU_DISABLE"],
        ),
    ];
    for (args, env, expected) in cases {
        let shown = format!("cla {args:?} {env:?}");
        let err = user_error(&cla_with(args, None, env), &shown);
        for text in expected {
            assert!(err.contains(text), "expected {text:?} in {shown}: {err}");
        }
    }
}

#[test]
fn missing_default_model_says_what_to_pass() {
    let o = cla_with(
        &["generate", "hi"],
        None,
        &[("CLA_MODEL", "/no/such/default/model")],
    );
    let err = user_error(&o, "cla generate hi, CLA_MODEL set");
    assert!(err.contains("CLA_MODEL /no/such/default/model"), "{err}");
    assert!(err.contains("--model"), "{err}");
}
