//! Conformance of the GPU decoder against a real pretrained Llama model with golden
//! outputs: stories260K (llama2.c, converted to Hugging Face format), the reference the CPU
//! decoder is checked against in `conformance_stories260k.rs`.
//!
//! They read the shared reference directory named by `CLA_SHARED_DIR` (set by
//! `cargo xtask conformance`) and fail, rather than pass silently, when it is missing.

use crate::common;

use cla_kv::KvDType;
use cla_model::{
    Decoder, GenerationConfig, GpuDecoder, LoadedModel, SamplingConfig, SequenceStep, StopReason,
    cache_config_for, generate,
};
use common::max_abs_diff;
use common::stories260k::{check_teacher_forced, golden, golden_logits, ids, model_dir};
use serde_json::Value;
use std::ops::ControlFlow;

fn load() -> (LoadedModel, GpuDecoder) {
    let model = LoadedModel::load(model_dir()).unwrap();
    let context = model.weights.config.max_position_embeddings;
    let decoder = GpuDecoder::new(
        common::gpu_ctx(),
        &model.weights,
        cache_config_for(context, 4, KvDType::F32),
    )
    .unwrap();
    (model, decoder)
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn gpu_conformance_stories260k_golden_logits() {
    let (_, mut decoder) = load();
    let (input, want) = golden_logits();
    let seq = decoder.add_sequence();
    let all = decoder.forward(&[SequenceStep::all(seq, &input)]).unwrap();
    let diff = max_abs_diff(all[0].as_slice().unwrap(), &want);
    assert!(diff < 1e-4, "prefill logits differ from golden by {diff}");

    let seq = decoder.add_sequence();
    for (p, &t) in input.iter().enumerate() {
        let out = decoder.forward(&[SequenceStep::last(seq, &[t])]).unwrap();
        let diff = max_abs_diff(out[0].as_slice().unwrap(), &want[p * 512..(p + 1) * 512]);
        assert!(
            diff < 1e-4,
            "decode position {p} differs from golden by {diff}"
        );
    }
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn gpu_conformance_stories260k_greedy_continuations() {
    let (model, mut decoder) = load();
    let g = golden();
    let prompts: Vec<&Value> = g["prompts"].as_array().unwrap().iter().collect();
    let texts: Vec<&str> = prompts
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    let config = GenerationConfig {
        max_new_tokens: 64,
        sampling: SamplingConfig::greedy(),
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    // All prompts in one batch.
    let out = generate(&mut decoder, &model.tokenizer, &texts, &config, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    for (i, (p, generation)) in prompts.iter().zip(&out).enumerate() {
        let new_ids = ids(&p["new_ids"]);
        let robust = p["robust_prefix_len"].as_u64().unwrap() as usize;
        assert_eq!(generation.prompt_ids, ids(&p["prompt_ids"]));
        assert_eq!(generation.stop_reason, StopReason::MaxNewTokens);
        assert_eq!(
            generation.ids[..robust],
            new_ids[..robust],
            "prompt {i}: free-running ids differ within the robust prefix"
        );
        if robust == new_ids.len() {
            assert_eq!(generation.text, p["completion_text"].as_str().unwrap());
        }

        // The same prompts through GPU-side greedy choice, one batched step per token.
        let seq = decoder.add_sequence();
        let mut feed = ids(&p["prompt_ids"]);
        let mut got = Vec::new();
        for _ in 0..robust {
            let id = decoder
                .forward_greedy(&[SequenceStep::last(seq, &feed)])
                .unwrap()[0];
            got.push(id);
            feed = vec![id];
        }
        decoder.free_sequence(seq).unwrap();
        assert_eq!(got, new_ids[..robust], "prompt {i}: forward_greedy");

        // Teacher forcing on full_ids: the argmax at each step must be the golden token;
        // top-5 logits.
        check_teacher_forced(&mut decoder, p, &new_ids, i);
    }
}
