//! GPU throughput of the decoder: prefill and decode tokens per second at batch 1 and 32, for
//! a 1B-class CLA2 model with random weights (the paper's `H128-MQA-CLA2`: d_model 2048, 20
//! layers, MQA with 128-dim heads, CLA2) and for the shipped `models/small-mqa-cla2`.
//!
//! ```text
//! cargo run --release -p cla-model --example gpu_decode_bench -- [OPTIONS] OUT.json
//!   --quick          tiny shapes and few steps (for the software Vulkan device)
//!   --weights f16    f16 weight matrices (default f32)
//!   --kv f32         f32 KV cache (default f16, what `cla` keeps on a GPU)
//!   --model DIR      the shipped model (default models/small-mqa-cla2)
//!   --skip-1b        only the shipped model
//!   --submit-every N submit each step's work every N layers (default 0: once per step)
//! ```
//!
//! Each run: `batch` prompts of `prompt` tokens in one prefill step, then `decode` batched
//! greedy steps (token ids picked on the GPU, one submission per step) and, interleaved with
//! them in rounds, a few steps that read back the full logits instead (timed apart). The adapter comes from `CLA_DEVICE` (see
//! `cla devices`); every number is wall-clock time on the host, after a warm-up that
//! builds the pipelines.

use cla_core::{ModelConfig, ParamCount, ParamOptions, SharingPattern};
use cla_kernels_wgpu::{DeviceSelector, GpuContext};
use cla_kv::{KvCacheConfig, KvDType};
use cla_model::{
    Decoder, GpuDecoder, GpuDecoderOptions, GpuWeightDType, ModelWeights, RandomWeightsOptions,
    SequenceId, SequenceStep, run_greedy_steps,
};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    quick: bool,
    weights: GpuWeightDType,
    /// Element type of the KV cache.
    kv: KvDType,
    model: Option<PathBuf>,
    skip_1b: bool,
    /// `GpuDecoderOptions::submit_every_layers`.
    submit_every: usize,
    out: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: gpu_decode_bench [--quick] [--weights f32|f16] [--kv f16|f32] [--model DIR] [--skip-1b] [--submit-every N] OUT.json"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        weights: GpuWeightDType::F32,
        kv: KvDType::F16,
        model: None,
        skip_1b: false,
        submit_every: 0,
        out: PathBuf::new(),
    };
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--skip-1b" => args.skip_1b = true,
            "--weights" => {
                args.weights = match it.next().as_deref() {
                    Some("f32") => GpuWeightDType::F32,
                    Some("f16") => GpuWeightDType::F16,
                    _ => usage(),
                }
            }
            "--kv" => {
                args.kv = match it.next().as_deref() {
                    Some("f32") => KvDType::F32,
                    Some("f16") => KvDType::F16,
                    _ => usage(),
                }
            }
            "--model" => args.model = Some(it.next().unwrap_or_else(|| usage()).into()),
            "--submit-every" => {
                args.submit_every = match it.next().map(|v| v.parse()) {
                    Some(Ok(n)) => n,
                    _ => usage(),
                }
            }
            "-h" | "--help" => usage(),
            _ if a.starts_with('-') => usage(),
            _ if out.is_none() => out = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    args.out = out.unwrap_or_else(|| usage());
    args
}

/// One benchmark shape.
struct Shape {
    batch: usize,
    prompt: usize,
    decode: usize,
    /// Extra steps that read back full logits.
    logits_steps: usize,
}

fn prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + seq * 104_729 + 3) % vocab) as u32)
        .collect()
}

/// The greedy token of each step's first logits row (lowest id on ties).
fn argmax_first_rows(logits: &[ndarray::Array2<f32>]) -> Vec<u32> {
    logits
        .iter()
        .map(|l| {
            let row = l.row(0);
            (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b }) as u32
        })
        .collect()
}

/// Runs `f` on a decode step that feeds token `next[i]` to sequence `seqs[i]`.
fn one_token_steps<R>(
    dec: &mut GpuDecoder,
    seqs: &[SequenceId],
    next: &[u32],
    f: impl FnOnce(&mut GpuDecoder, &[SequenceStep<'_>]) -> R,
) -> R {
    let feed: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
    let steps: Vec<_> = seqs
        .iter()
        .zip(&feed)
        .map(|(&q, t)| SequenceStep::last(q, t))
        .collect();
    f(dec, &steps)
}

/// Runs one shape on `dec` and returns its figures.
fn run(dec: &mut GpuDecoder, s: &Shape) -> Value {
    let vocab = dec.config().vocab_size;
    let context = dec.config().max_position_embeddings;
    assert!(
        s.prompt + 2 * s.decode + s.logits_steps <= context,
        "{} prompt tokens, {} greedy and {} pipelined steps and {} logits steps exceed the \
         model's {context} positions",
        s.prompt,
        s.decode,
        s.decode,
        s.logits_steps
    );
    // Warm-up: the same batch size, so every pipeline variant the timed run uses is built.
    let seqs: Vec<_> = (0..s.batch).map(|_| dec.add_sequence()).collect();
    let warm: Vec<Vec<u32>> = (0..s.batch)
        .map(|i| prompt(i, 8.min(s.prompt), vocab))
        .collect();
    let steps: Vec<_> = seqs
        .iter()
        .zip(&warm)
        .map(|(&q, p)| SequenceStep::last(q, p))
        .collect();
    let mut next = dec.forward_greedy(&steps).expect("warm-up prefill");
    for _ in 0..2 {
        next = one_token_steps(dec, &seqs, &next, |dec, steps| {
            let next = dec.forward_greedy(steps).expect("warm-up decode");
            dec.forward(&steps[..1]).ok();
            next
        });
    }
    for q in seqs {
        dec.free_sequence(q).expect("free");
    }

    let seqs: Vec<_> = (0..s.batch).map(|_| dec.add_sequence()).collect();
    let prompts: Vec<Vec<u32>> = (0..s.batch).map(|i| prompt(i, s.prompt, vocab)).collect();
    let steps: Vec<_> = seqs
        .iter()
        .zip(&prompts)
        .map(|(&q, p)| SequenceStep::last(q, p))
        .collect();
    let t = Instant::now();
    let first = dec.forward(&steps).expect("prefill");
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next = argmax_first_rows(&first);

    // Greedy and logits steps alternate in rounds, so that both see the same context lengths
    // and the same clock state of the card (which lowers its clocks while the host keeps it
    // waiting).
    let (mut decode_s, mut logits_s) = (0.0, 0.0);
    // Host time of the greedy steps: recording each step, and waiting for its read-back.
    let (mut record_s, mut wait_s) = (0.0, 0.0);
    let (mut greedy_left, mut logits_left) = (s.decode, s.logits_steps);
    let per_round = s.decode.div_ceil(s.logits_steps.max(1));
    while greedy_left + logits_left > 0 {
        let t = Instant::now();
        for _ in 0..per_round.min(greedy_left) {
            next = one_token_steps(dec, &seqs, &next, |dec, steps| {
                dec.forward_greedy(steps).expect("decode")
            });
            let timing = dec.last_step_timing();
            record_s += timing.record_s;
            wait_s += timing.wait_s;
        }
        decode_s += t.elapsed().as_secs_f64();
        greedy_left -= per_round.min(greedy_left);
        if logits_left > 0 {
            let t = Instant::now();
            let logits = one_token_steps(dec, &seqs, &next, |dec, steps| {
                dec.forward(steps).expect("decode with logits")
            });
            logits_s += t.elapsed().as_secs_f64();
            logits_left -= 1;
            next = argmax_first_rows(&logits);
        }
    }
    // Then as many greedy steps pipelined (`submit_greedy_after`: each step submitted before
    // the previous one's ids are read back, its tokens taken from the GPU), as `cla generate`
    // runs them.
    let t = Instant::now();
    let pipelined_steps =
        run_greedy_steps(dec, &seqs, &next, s.decode, || true).expect("pipelined decode");
    let pipelined_s = t.elapsed().as_secs_f64();
    let kv_bytes = dec.kv_bytes_in_use();
    for q in seqs {
        dec.free_sequence(q).expect("free");
    }

    let rate = |tokens: usize, secs: f64| {
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    };
    let per_step = |secs: f64| {
        if s.decode > 0 {
            1e3 * secs / s.decode as f64
        } else {
            0.0
        }
    };
    let r = json!({
        "batch": s.batch,
        "prompt_tokens": s.prompt,
        "decode_steps": s.decode,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": rate(s.batch * s.prompt, prefill_s),
        "decode_seconds": decode_s,
        "decode_tokens_per_s": rate(s.batch * s.decode, decode_s),
        "decode_ms_per_step": per_step(decode_s),
        "decode_record_ms_per_step": per_step(record_s),
        "decode_wait_ms_per_step": per_step(wait_s),
        "decode_pipelined_tokens_per_s": rate(s.batch * pipelined_steps, pipelined_s),
        "decode_logits_steps": s.logits_steps,
        "decode_logits_tokens_per_s": rate(s.batch * s.logits_steps, logits_s),
        "kv_bytes_in_use": kv_bytes,
    });
    println!(
        "  batch {:>3}: prefill {:>10.1} tok/s ({} x {} tokens in {:.3} s) | decode {:>9.1} tok/s \
         ({:.2} ms/step greedy: {:.2} recording, {:.2} waiting; {:.1} tok/s with logits \
         read-back; {:.1} tok/s pipelined)",
        s.batch,
        r["prefill_tokens_per_s"].as_f64().unwrap(),
        s.batch,
        s.prompt,
        prefill_s,
        r["decode_tokens_per_s"].as_f64().unwrap(),
        r["decode_ms_per_step"].as_f64().unwrap(),
        r["decode_record_ms_per_step"].as_f64().unwrap(),
        r["decode_wait_ms_per_step"].as_f64().unwrap(),
        r["decode_logits_tokens_per_s"].as_f64().unwrap(),
        r["decode_pipelined_tokens_per_s"].as_f64().unwrap(),
    );
    r
}

fn cache_for(shapes: &[Shape], block: usize, kv: KvDType) -> KvCacheConfig {
    let blocks = shapes
        .iter()
        .map(|s| s.batch * (s.prompt + 2 * s.decode + s.logits_steps + 8).div_ceil(block))
        .max()
        .unwrap_or(1);
    KvCacheConfig::new(blocks + 4, kv).with_block_size(block)
}

fn bench_model(
    name: &str,
    dec: &mut GpuDecoder,
    params: u64,
    setup_s: f64,
    shapes: &[Shape],
) -> Value {
    let c = dec.config().clone();
    println!(
        "{name}: {params} parameters, {} layers ({} producers), d_model {}, {}q/{}kv heads of {}, \
         vocab {}; weights {:.1} MiB on the device, set up in {setup_s:.1} s",
        c.num_layers(),
        c.kv_sharing.num_producers(),
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        dec.weight_bytes() as f64 / (1 << 20) as f64,
    );
    let runs: Vec<Value> = shapes.iter().map(|s| run(dec, s)).collect();
    json!({
        "model": name,
        "parameters": params,
        "layers": c.num_layers(),
        "kv_producers": c.kv_sharing.num_producers(),
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "weight_bytes": dec.weight_bytes(),
        "setup_seconds": setup_s,
        "runs": runs,
    })
}

fn tiny_cla2() -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        intermediate_size: 352,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 32,
        vocab_size: 512,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        kv_sharing: SharingPattern::Cla(2).build(4).expect("cla2 of 4 layers"),
    }
}

fn main() {
    let args = parse_args();
    let selector = DeviceSelector::from_env()
        .unwrap_or_else(|e| panic!("CLA_DEVICE / CLA_GPU_DISABLE: {e}"))
        .allow_cpu(true);
    let ctx = Arc::new(GpuContext::new(&selector).unwrap_or_else(|e| panic!("{e}")));
    let info = ctx.info().clone();
    println!(
        "device: {} ({:?}, {:?}, {} {}); weights {:?}; KV cache {}; submit every {} layers (0: once per step){}",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        args.weights,
        args.kv,
        args.submit_every,
        if args.quick { "; quick" } else { "" }
    );
    let options = GpuDecoderOptions {
        weight_dtype: args.weights,
        submit_every_layers: args.submit_every,
        ..GpuDecoderOptions::default()
    };
    let shapes = |prompt: usize, decode: usize, logits_steps: usize, batches: &[usize]| {
        batches
            .iter()
            .map(|&batch| Shape {
                batch,
                prompt,
                decode,
                logits_steps,
            })
            .collect::<Vec<_>>()
    };
    let mut models = Vec::new();

    if !args.skip_1b {
        let (name, config, kv_norm, shapes) = if args.quick {
            (
                "tiny-cla2 (quick)",
                tiny_cla2(),
                true,
                shapes(32, 8, 2, &[1, 4]),
            )
        } else {
            let preset = cla_core::presets::get("H128-MQA-CLA2").expect("a paper preset");
            (
                "H128-MQA-CLA2 (random weights)",
                preset.config,
                preset.param_options.kv_input_layernorm,
                shapes(512, 64, 8, &[1, 32]),
            )
        };
        let params = ParamCount::of(
            &config,
            ParamOptions {
                kv_input_layernorm: kv_norm,
            },
        )
        .total();
        let t = Instant::now();
        let mut dec = GpuDecoder::with_random_weights(
            Arc::clone(&ctx),
            &config,
            &RandomWeightsOptions {
                seed: 1,
                kv_input_norm: kv_norm,
            },
            cache_for(&shapes, 16, args.kv),
            options,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let setup = t.elapsed().as_secs_f64();
        models.push(bench_model(name, &mut dec, params, setup, &shapes));
    }

    let dir = args.model.clone().unwrap_or_else(|| {
        let local = PathBuf::from("models/small-mqa-cla2");
        if local.is_dir() {
            local
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/small-mqa-cla2")
        }
    });
    let t = Instant::now();
    let weights = ModelWeights::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let shapes = if args.quick {
        shapes(16, 4, 2, &[1, 4])
    } else {
        // (Prompt, greedy, logits and pipelined steps within its 256 positions.)
        shapes(128, 48, 16, &[1, 32])
    };
    let mut dec = GpuDecoder::with_options(
        Arc::clone(&ctx),
        &weights,
        cache_for(&shapes, 16, args.kv),
        options,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let setup = t.elapsed().as_secs_f64();
    let params = weights.num_parameters() as u64;
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    models.push(bench_model(&name, &mut dec, params, setup, &shapes));

    let report = json!({
        "benchmark": "gpu_decode_bench",
        "device": {
            "name": info.name,
            "backend": format!("{:?}", info.backend),
            "device_type": format!("{:?}", info.device_type),
            "driver": format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        },
        "quick": args.quick,
        "weight_dtype": format!("{:?}", args.weights).to_lowercase(),
        "kv_dtype": args.kv.to_string(),
        "submit_every_layers": args.submit_every,
        "models": models,
    });
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", args.out.display()));
    println!("wrote {}", args.out.display());
}
