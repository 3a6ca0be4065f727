//! CPU throughput of the reference decoder: prefill and decode tokens per second, and the
//! prefill saving of running a consumer-only tail for the last position only.
//!
//! ```text
//! cargo run --release -p cla-model --example cpu_bench            # the built-in suite
//! cargo run --release -p cla-model --example cpu_bench -- MODEL_DIR  # a model directory
//! cargo run --release -p cla-model --example cpu_bench -- --kv f16 [MODEL_DIR]  # f16 cache
//! ```
//!
//! Models of the suite (random weights, seeded):
//! - `stories260K-like`: the shape of llama2.c's stories260K (5 layers, 64 wide, GQA 8/4).
//! - `cla2-38M`: 8 layers, 512 wide, 8 query heads / 2 K/V heads of 64, CLA2, vocab 32000.
//! - `yoco-38M`: the same, layers 0-3 produce and layers 4-7 all read layer 3's K/V.
//!
//! Release build, f32 weights, f32 cache unless `--kv f16`, best of 3 for prefill, decode
//! after a 128- or 256-token prompt. Figures, with the machine and date, are in `BENCHMARKS.md`.

use cla_core::{KvSharing, ModelConfig, SharingPattern};
use cla_kv::KvDType;
use cla_model::{
    CpuDecoder, CpuDecoderOptions, Decoder, ModelWeights, SequenceStep, cache_config_for,
};
use std::sync::Arc;
use std::time::Instant;

fn config(
    hidden: usize,
    inter: usize,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    vocab: usize,
    context: usize,
    sharing: KvSharing,
) -> ModelConfig {
    ModelConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        max_position_embeddings: context,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        kv_sharing: sharing,
    }
}

/// Seconds of the fastest of `reps` runs of `f`.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn prompt(len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 3) % vocab) as u32).collect()
}

/// Prefill seconds of a `len`-token prompt (last-position logits).
fn prefill_seconds(
    w: &Arc<ModelWeights>,
    kv: KvDType,
    len: usize,
    options: CpuDecoderOptions,
) -> f64 {
    let p = prompt(len, w.config.vocab_size);
    let mut dec =
        CpuDecoder::with_options(Arc::clone(w), cache_config_for(len, 1, kv), options).unwrap();
    best_of(3, || {
        let seq = dec.add_sequence();
        dec.forward(&[SequenceStep::last(seq, &p)]).unwrap();
        dec.free_sequence(seq).unwrap();
    })
}

/// Decode tokens per second: `batch` sequences with a `context`-token prompt each, then
/// `steps` batched single-token steps.
fn decode_rate(
    w: &Arc<ModelWeights>,
    kv: KvDType,
    batch: usize,
    context: usize,
    steps: usize,
) -> f64 {
    let p = prompt(context, w.config.vocab_size);
    let mut dec =
        CpuDecoder::new(Arc::clone(w), cache_config_for(context + steps, batch, kv)).unwrap();
    let seqs: Vec<_> = (0..batch).map(|_| dec.add_sequence()).collect();
    let steps_in: Vec<_> = seqs.iter().map(|&s| SequenceStep::last(s, &p)).collect();
    dec.forward(&steps_in).unwrap();
    let t = Instant::now();
    for i in 0..steps {
        let token = [(i % w.config.vocab_size) as u32];
        let step: Vec<_> = seqs
            .iter()
            .map(|&s| SequenceStep::last(s, &token))
            .collect();
        dec.forward(&step).unwrap();
    }
    (batch * steps) as f64 / t.elapsed().as_secs_f64()
}

/// Prefill and decode figures of one model, with the cache in `kv`.
fn report(
    name: &str,
    w: &Arc<ModelWeights>,
    kv: KvDType,
    prefill_lens: &[usize],
    decode_context: usize,
) {
    let params = w.num_parameters();
    println!(
        "\n{name}: {:.2}M parameters, {} layers, map {}, {:?} cache, {} rayon threads",
        params as f64 / 1e6,
        w.config.num_layers(),
        w.config.kv_sharing,
        kv,
        rayon::current_num_threads()
    );
    let max = w.config.max_position_embeddings;
    for &len in prefill_lens {
        if len > max {
            println!("  prefill {len:>4} tokens: skipped (the model's context is {max})");
            continue;
        }
        let s = prefill_seconds(w, kv, len, CpuDecoderOptions::default());
        println!(
            "  prefill {len:>4} tokens: {:>9.0} tokens/s ({:.1} ms)",
            len as f64 / s,
            s * 1e3
        );
    }
    let decode_context = decode_context.min(max.saturating_sub(32));
    for batch in [1, 8] {
        let r = decode_rate(w, kv, batch, decode_context, 32);
        println!("  decode batch {batch} (context {decode_context}): {r:>9.1} tokens/s");
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut kv = KvDType::F32;
    if let Some(i) = args.iter().position(|a| a == "--kv") {
        kv = match args.get(i + 1).map(String::as_str) {
            Some("f16") => KvDType::F16,
            Some("f32") => KvDType::F32,
            other => {
                eprintln!("cpu_bench: --kv takes f16 or f32, got {other:?}");
                std::process::exit(2);
            }
        };
        args.drain(i..i + 2);
    }
    if let Some(dir) = args.first() {
        let w = match ModelWeights::load(dir) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                eprintln!("cpu_bench: cannot load {dir}: {e}");
                std::process::exit(1);
            }
        };
        report(dir, &w, kv, &[128, 512], 128);
        return;
    }

    let stories = config(64, 172, (8, 4, 8), 512, 512, KvSharing::all_producers(5));
    report(
        "stories260K-like",
        &Arc::new(ModelWeights::random(&stories, 1)),
        kv,
        &[128, 512],
        128,
    );

    let cla2 = config(
        512,
        1376,
        (8, 2, 64),
        32000,
        2048,
        SharingPattern::Cla(2).build(8).unwrap(),
    );
    report(
        "cla2-38M",
        &Arc::new(ModelWeights::random(&cla2, 2)),
        kv,
        &[128, 512],
        256,
    );

    // YOCO-like: the second half of the stack only consumes layer 3's K/V.
    let yoco_map = KvSharing::from_sources("yoco", vec![0, 1, 2, 3, 3, 3, 3, 3]).unwrap();
    let yoco = Arc::new(ModelWeights::random(
        &config(512, 1376, (8, 2, 64), 32000, 2048, yoco_map),
        3,
    ));
    println!("\nyoco-38M prefill, consumer tail for the last position only vs for every position:");
    for len in [128, 512] {
        let on = prefill_seconds(&yoco, kv, len, CpuDecoderOptions::default());
        let off = prefill_seconds(
            &yoco,
            kv,
            len,
            CpuDecoderOptions {
                skip_consumer_tail: false,
            },
        );
        println!(
            "  {len:>4} tokens: {:.1} ms vs {:.1} ms ({:.0}% less time, {:.2}x)",
            on * 1e3,
            off * 1e3,
            100.0 * (1.0 - on / off),
            off / on
        );
    }
}
