//! Conformance against a real pretrained Llama model with golden outputs: stories260K
//! (llama2.c, converted to Hugging Face format). With every layer a producer, a CLA decoder
//! is a plain Llama decoder, so these tests check the CPU decoder end to end: tokenizer,
//! weights, RoPE convention, GQA, paged cache, greedy generation, perplexity.
//!
//! They read the shared reference directory named by `CLA_SHARED_DIR` (set by
//! `cargo xtask conformance`) and fail, rather than pass silently, when it is missing.

use crate::common;

use cla_kv::KvDType;
use cla_model::perplexity::negative_log_likelihood;
use cla_model::{
    CpuDecoder, Decoder, GenerationConfig, LoadedModel, PerplexityConfig, SamplingConfig,
    SequenceStep, StopReason, cache_config_for, generate, perplexity_of_ids,
};
use common::stories260k::{check_teacher_forced, golden, golden_logits, ids, model_dir};
use serde_json::Value;
use std::ops::ControlFlow;

fn load() -> (LoadedModel, CpuDecoder) {
    let model = LoadedModel::load(model_dir()).unwrap();
    let context = model.weights.config.max_position_embeddings;
    let decoder = CpuDecoder::new(
        model.weights.clone(),
        cache_config_for(context, 4, KvDType::F32),
    )
    .unwrap();
    (model, decoder)
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn conformance_stories260k_tokenizer_encodes_golden_prompts() {
    let (model, _) = load();
    for p in golden()["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode(text, true).unwrap(),
            ids(&p["prompt_ids"]),
            "prompt {text:?}"
        );
        assert_eq!(
            model.tokenizer.decode(&ids(&p["full_ids"])).unwrap(),
            p["text"].as_str().unwrap()
        );
    }
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn conformance_stories260k_golden_logits() {
    let (_, mut decoder) = load();
    let (input, want) = golden_logits();
    // Prefill of all 16 positions at once, and the same positions decoded one at a time.
    let seq = decoder.add_sequence();
    let all = decoder.forward(&[SequenceStep::all(seq, &input)]).unwrap();
    let got = all[0].as_slice().unwrap();
    let diff = common::max_abs_diff(got, &want);
    assert!(diff < 1e-4, "prefill logits differ from golden by {diff}");

    let seq = decoder.add_sequence();
    for (p, &t) in input.iter().enumerate() {
        let out = decoder.forward(&[SequenceStep::last(seq, &[t])]).unwrap();
        let diff = common::max_abs_diff(out[0].as_slice().unwrap(), &want[p * 512..(p + 1) * 512]);
        assert!(
            diff < 1e-4,
            "decode position {p} differs from golden by {diff}"
        );
    }
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn conformance_stories260k_greedy_continuations() {
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
    let mut streamed = vec![String::new(); prompts.len()];
    // All three prompts in one batch.
    let out = generate(&mut decoder, &model.tokenizer, &texts, &config, &mut |ev| {
        streamed[ev.prompt].push_str(ev.text);
        ControlFlow::Continue(())
    })
    .unwrap();
    for (i, (p, generation)) in prompts.iter().zip(&out).enumerate() {
        let new_ids = ids(&p["new_ids"]);
        let robust = p["robust_prefix_len"].as_u64().unwrap() as usize;
        assert_eq!(generation.prompt_ids, ids(&p["prompt_ids"]));
        assert_eq!(generation.stop_reason, StopReason::MaxNewTokens);
        // Free-running greedy ids must agree up to the robust prefix.
        assert_eq!(
            generation.ids[..robust],
            new_ids[..robust],
            "prompt {i}: free-running ids differ within the robust prefix"
        );
        if robust == new_ids.len() {
            assert_eq!(generation.text, p["completion_text"].as_str().unwrap());
            assert_eq!(
                streamed[i], generation.text,
                "streamed text differs from the result"
            );
        }
        assert!(generation.kv_bytes > 0);

        // Beyond the robust prefix (and everywhere, as a check): teacher forcing on
        // full_ids, the argmax at each step must be the golden token; top-5 logits.
        check_teacher_forced(&mut decoder, p, &new_ids, i);
    }
}

#[test]
#[ignore = "needs the shared reference models: cargo xtask conformance"]
fn conformance_stories260k_perplexity_matches_golden_logits() {
    let (_, mut decoder) = load();
    let (input, logits) = golden_logits();
    // Independent computation: NLL of the 15 teacher-forced next tokens straight from the
    // golden logits (row p predicts token p + 1).
    let want: f64 = (1..input.len())
        .map(|t| negative_log_likelihood(&logits[(t - 1) * 512..t * 512], input[t] as usize))
        .sum::<f64>()
        / (input.len() - 1) as f64;
    let mut calls = 0;
    let report = perplexity_of_ids(
        &mut decoder,
        &input,
        PerplexityConfig::default(),
        &mut |done, total| {
            calls += 1;
            assert!(done <= total);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(report.tokens_scored, 15);
    assert!(calls >= 1);
    let rel = ((report.mean_nll - want) / want).abs();
    assert!(
        rel < 1e-4,
        "mean NLL {} vs golden {want} (relative {rel})",
        report.mean_nll
    );
    assert!((report.perplexity - want.exp()).abs() / want.exp() < 1e-4);

    // Sliding windows with overlap score every token once, each with less left context.
    let report = perplexity_of_ids(
        &mut decoder,
        &input,
        PerplexityConfig {
            context: Some(8),
            stride: Some(3),
        },
        &mut |_, _| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(report.tokens_scored, 15);
    assert!(report.windows > 1);
}
