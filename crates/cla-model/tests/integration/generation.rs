//! Generation and perplexity on small random CLA models: determinism, stop conditions,
//! streaming, batching, and perplexity against the naive reference.

use crate::common;

use cla_kv::KvDType;
use cla_model::perplexity::negative_log_likelihood;
use cla_model::{
    CpuDecoder, Decoder, GenerationConfig, ModelWeights, PerplexityConfig, SamplingConfig,
    StopReason, Tokenizer, cache_config_for, generate, generate_ids, perplexity, perplexity_of_ids,
};
use common::{naive, small_config, temp_dir, write_word_tokenizer};
use std::ops::ControlFlow;
use std::sync::Arc;

/// What a callback returns to let generation or evaluation go on.
const GO_ON: ControlFlow<()> = ControlFlow::Continue(());

fn model() -> (Arc<ModelWeights>, Tokenizer) {
    // CLA3 on 5 layers (groups {0,1}, {2,3,4}), MQA, tied.
    let config = small_config(vec![0, 0, 2, 2, 2], 24, 3, 1, 8, 40, true);
    let w = Arc::new(ModelWeights::random(&config, 17));
    let dir = temp_dir("generation-tokenizer");
    write_word_tokenizer(&dir.join("tokenizer.json"), 40);
    let tok = Tokenizer::from_model_dir(&dir, &config).unwrap();
    (w, tok)
}

fn decoder(w: &Arc<ModelWeights>, sequences: usize) -> CpuDecoder {
    CpuDecoder::new(Arc::clone(w), cache_config_for(64, sequences, KvDType::F32)).unwrap()
}

fn sampled(seed: u64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 20,
        stop_at_eos: false,
        sampling: SamplingConfig {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed,
        },
        ..GenerationConfig::default()
    }
}

#[test]
fn same_seed_same_text_and_streaming_equals_the_result() {
    let (w, tok) = model();
    let prompts = ["w5 w6 w7", "w9"];
    let run = |seed| {
        let mut dec = decoder(&w, 2);
        let mut streamed = vec![String::new(); 2];
        let out = generate(&mut dec, &tok, &prompts, &sampled(seed), &mut |ev| {
            streamed[ev.prompt].push_str(ev.text);
            GO_ON
        })
        .unwrap();
        for (o, s) in out.iter().zip(&streamed) {
            assert_eq!(&o.text, s);
            let full: Vec<u32> = o.prompt_ids.iter().chain(&o.ids).copied().collect();
            let prompt_text = tok.decode(&o.prompt_ids).unwrap();
            assert_eq!(o.text, tok.decode(&full).unwrap()[prompt_text.len()..]);
            assert_eq!(o.stop_reason, StopReason::MaxNewTokens);
            assert_eq!(o.ids.len(), 20);
            assert!(o.timings.prefill_seconds > 0.0 && o.timings.decode_tokens == 19);
            assert!(o.kv_bytes > 0);
        }
        assert_eq!(dec.kv_bytes_in_use(), 0);
        out
    };
    let a = run(7);
    let b = run(7);
    let c = run(8);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.ids, &x.text), (&y.ids, &y.text));
    }
    assert_ne!(a[0].ids, c[0].ids);
}

#[test]
fn sampled_tokens_stay_what_they_were_for_a_seed() {
    // Recorded before `Decoder::forward_sample` existed: the CPU decoder samples exactly as
    // before (same tokens for the same seed), whichever method picks them.
    let config = small_config(vec![0, 0, 2, 2, 2], 24, 3, 1, 8, 40, true);
    let w = Arc::new(ModelWeights::random(&config, 17));
    let prompts = vec![vec![1, 5, 6, 7], vec![1, 3], vec![1, 20, 21]];
    type Ids = [[u32; 16]; 3];
    #[rustfmt::skip]
    let golden: [((f32, usize, f32, f32), Ids); 5] = [
        (
            (0.9, 0, 1.0, 1.0),
            [
                [16, 16, 16, 16, 16, 14, 14, 14, 14, 35, 35, 35, 35, 35, 35, 35],
                [30, 30, 37, 37, 37, 37, 37, 37, 37, 37, 37, 37, 20, 35, 33, 4],
                [0, 13, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 12],
            ],
        ),
        (
            (0.8, 5, 1.0, 1.0),
            [
                [16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 35, 35],
                [30, 30, 37, 37, 37, 37, 37, 37, 37, 37, 37, 37, 38, 4, 4, 4],
                [9, 30, 30, 30, 30, 30, 30, 30, 30, 30, 12, 27, 27, 27, 12, 12],
            ],
        ),
        (
            (1.3, 0, 0.7, 1.0),
            [
                [16, 16, 16, 16, 16, 14, 14, 14, 14, 35, 35, 35, 35, 35, 35, 35],
                [30, 30, 37, 37, 37, 37, 37, 37, 37, 37, 37, 37, 38, 37, 37, 37],
                [9, 6, 6, 6, 8, 8, 8, 8, 8, 8, 6, 6, 6, 6, 6, 6],
            ],
        ),
        (
            (0.7, 12, 0.9, 1.3),
            [
                [16, 16, 16, 16, 16, 35, 14, 14, 14, 14, 14, 14, 14, 35, 35, 35],
                [9, 9, 9, 2, 2, 2, 19, 17, 14, 37, 37, 37, 30, 7, 16, 16],
                [30, 30, 30, 30, 30, 30, 30, 30, 30, 39, 3, 3, 0, 37, 37, 37],
            ],
        ),
        (
            (0.0, 0, 1.0, 1.2),
            [
                [16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16],
                [9, 9, 9, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
                [30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 12, 12, 12],
            ],
        ),
    ];
    for ((temperature, top_k, top_p, repetition_penalty), want) in golden {
        let cfg = GenerationConfig {
            max_new_tokens: 16,
            stop_at_eos: false,
            sampling: SamplingConfig {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed: 42,
            },
            ..GenerationConfig::default()
        };
        let out = generate_ids(&mut decoder(&w, 3), None, &prompts, &cfg, &mut |_| GO_ON).unwrap();
        for (o, w) in out.iter().zip(&want) {
            assert_eq!(o.ids, w, "{:?}", cfg.sampling);
        }
    }
}

#[test]
fn batched_greedy_equals_one_prompt_at_a_time() {
    let (w, _) = model();
    let prompts = vec![vec![1, 5, 6, 7, 8, 9, 10], vec![1, 3], vec![1, 20, 21, 22]];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let together = generate_ids(&mut decoder(&w, 3), None, &prompts, &cfg, &mut |_| GO_ON).unwrap();
    for (p, t) in prompts.iter().zip(&together) {
        let alone = generate_ids(
            &mut decoder(&w, 1),
            None,
            std::slice::from_ref(p),
            &cfg,
            &mut |_| GO_ON,
        )
        .unwrap();
        assert_eq!(alone[0].ids, t.ids);
        // And greedy ids are the argmax of the naive reference, step by step.
        let mut ids = p.clone();
        for &next in &t.ids {
            let logits = naive::forward(&w, &ids);
            let last = logits.last().unwrap();
            let argmax = (0..last.len()).fold(0, |b, j| if last[j] > last[b] { j } else { b });
            assert_eq!(argmax as u32, next);
            ids.push(next);
        }
    }
}

#[test]
fn stop_tokens_stop_strings_and_context_end_generation() {
    let (w, tok) = model();
    let base = GenerationConfig {
        max_new_tokens: 30,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let free = generate(&mut decoder(&w, 1), &tok, &["w4 w8"], &base, &mut |_| GO_ON).unwrap();
    let ids = &free[0].ids;

    // Stop at the third generated token, treated as EOS.
    let cfg = GenerationConfig {
        stop_token_ids: vec![ids[2]],
        ..base.clone()
    };
    let out = generate(&mut decoder(&w, 1), &tok, &["w4 w8"], &cfg, &mut |_| GO_ON).unwrap();
    let first = ids.iter().position(|&t| t == ids[2]).unwrap();
    assert_eq!(out[0].stop_reason, StopReason::StopToken(ids[2]));
    assert_eq!(out[0].ids, ids[..=first]);

    // Stop string: the text of the 4th token (with its leading space). Nothing of it streams.
    let piece = format!(" {}", tok.decode(&ids[3..4]).unwrap());
    let cfg = GenerationConfig {
        stop_strings: vec![piece.clone()],
        ..base.clone()
    };
    let mut streamed = String::new();
    let out = generate(&mut decoder(&w, 1), &tok, &["w4 w8"], &cfg, &mut |ev| {
        streamed.push_str(ev.text);
        GO_ON
    })
    .unwrap();
    assert_eq!(out[0].stop_reason, StopReason::StopString(piece.clone()));
    assert!(!out[0].text.contains(&piece));
    assert_eq!(streamed, out[0].text);
    assert!(free[0].text.starts_with(&out[0].text));

    // The context (64) ends a long prompt's generation.
    let prompt: Vec<u32> = (0..60).map(|i| 3 + i % 30).collect();
    let out = generate_ids(&mut decoder(&w, 1), None, &[prompt], &base, &mut |_| GO_ON).unwrap();
    assert_eq!(out[0].stop_reason, StopReason::ContextFull);
    assert_eq!(out[0].ids.len(), 4);
}

#[test]
fn perplexity_matches_the_naive_reference_for_any_stride() {
    let (w, tok) = model();
    let text: String = (0..50).map(|i| format!("w{} ", 3 + (i * 7) % 37)).collect();
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.len(), 50, "no BOS for perplexity");
    for (context, stride) in [(16, 16), (16, 5), (64, 64), (9, 1)] {
        // Independent: windows by hand, logits from the naive forward.
        let mut nll = 0.0;
        let mut count = 0;
        let mut prev_end = 0;
        let mut begin = 0;
        loop {
            let end = (begin + context).min(ids.len());
            let logits = naive::forward(&w, &ids[begin..end]);
            for t in prev_end.max(begin + 1)..end {
                nll += negative_log_likelihood(&logits[t - 1 - begin], ids[t] as usize);
                count += 1;
            }
            prev_end = end;
            if end == ids.len() {
                break;
            }
            begin += stride;
        }
        let want = nll / count as f64;
        let mut last = (0, 0);
        let cfg = PerplexityConfig {
            context: Some(context),
            stride: Some(stride),
        };
        let r = perplexity(&mut decoder(&w, 1), &tok, &text, cfg, &mut |a, b| {
            last = (a, b);
            GO_ON
        })
        .unwrap();
        assert_eq!(r.tokens_scored, count);
        assert_eq!(last, (count, count));
        assert!(
            ((r.mean_nll - want) / want).abs() < 1e-5,
            "{context}/{stride}: {} vs {want}",
            r.mean_nll
        );
    }
    let mut dec = decoder(&w, 1);
    assert!(
        perplexity_of_ids(&mut dec, &[5], PerplexityConfig::default(), &mut |_, _| {
            GO_ON
        })
        .is_err()
    );
    let too_long = PerplexityConfig {
        context: Some(65),
        stride: None,
    };
    assert!(perplexity_of_ids(&mut dec, &ids, too_long, &mut |_, _| GO_ON).is_err());
}

#[test]
fn a_callback_that_stops_after_n_tokens_gets_exactly_n() {
    let (w, tok) = model();
    let greedy = GenerationConfig {
        max_new_tokens: 20,
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    for cfg in [greedy, sampled(3)] {
        let free = generate(&mut decoder(&w, 1), &tok, &["w4 w8"], &cfg, &mut |_| GO_ON).unwrap();
        for n in 1..=5 {
            let mut dec = decoder(&w, 1);
            let (mut shown, mut streamed) = (0, String::new());
            let out = generate(&mut dec, &tok, &["w4 w8"], &cfg, &mut |ev| {
                streamed.push_str(ev.text);
                if ev.token.is_some() {
                    assert!(shown < n, "a token after Break");
                    shown += 1;
                }
                if shown == n {
                    ControlFlow::Break(())
                } else {
                    GO_ON
                }
            })
            .unwrap();
            let g = &out[0];
            assert_eq!(g.ids, free[0].ids[..n], "n = {n}");
            assert_eq!(g.stop_reason, StopReason::Stopped);
            assert_eq!(g.timings.decode_tokens, n - 1);
            assert_eq!(streamed, g.text);
            assert!(free[0].text.starts_with(&g.text));
            assert_eq!(dec.kv_bytes_in_use(), 0, "the sequence is freed");
        }
    }

    // A batch: the callback counts the tokens of every prompt and stops at the n-th; the
    // prompts together hold exactly n, each a prefix of what it generates alone.
    let prompts = ["w5 w6 w7", "w9"];
    let free = generate(
        &mut decoder(&w, 2),
        &tok,
        &prompts,
        &sampled(7),
        &mut |_| GO_ON,
    )
    .unwrap();
    for n in [1, 2, 3, 8] {
        let mut shown = 0;
        let out = generate(
            &mut decoder(&w, 2),
            &tok,
            &prompts,
            &sampled(7),
            &mut |ev| {
                shown += usize::from(ev.token.is_some());
                if shown == n {
                    ControlFlow::Break(())
                } else {
                    GO_ON
                }
            },
        )
        .unwrap();
        assert_eq!(out.iter().map(|g| g.ids.len()).sum::<usize>(), n);
        for (g, f) in out.iter().zip(&free) {
            assert_eq!(g.ids, f.ids[..g.ids.len()]);
            assert_eq!(g.stop_reason, StopReason::Stopped);
        }
    }
}

#[test]
fn a_progress_callback_can_stop_perplexity_after_a_window() {
    let (w, tok) = model();
    let text: String = (0..50).map(|i| format!("w{} ", 3 + (i * 7) % 37)).collect();
    let ids = tok.encode(&text, false).unwrap();
    let cfg = PerplexityConfig {
        context: Some(16),
        stride: Some(16),
    };
    let mut calls = 0;
    let stopped = perplexity_of_ids(&mut decoder(&w, 1), &ids, cfg, &mut |_, _| {
        calls += 1;
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(calls, 1);
    assert!(stopped.stopped);
    assert_eq!((stopped.windows, stopped.tokens_scored), (1, 15));
    // The first window alone, evaluated whole.
    let first = perplexity_of_ids(&mut decoder(&w, 1), &ids[..16], cfg, &mut |_, _| GO_ON).unwrap();
    assert!(!first.stopped);
    assert_eq!(stopped.mean_nll, first.mean_nll);
    // Stopping at the last window stops nothing.
    let all = perplexity_of_ids(&mut decoder(&w, 1), &ids, cfg, &mut |done, total| {
        if done == total {
            ControlFlow::Break(())
        } else {
            GO_ON
        }
    })
    .unwrap();
    assert!(!all.stopped);
    assert_eq!((all.windows, all.tokens_scored), (4, 46));
}

/// The benchmarks' greedy loop (`run_greedy_steps`) leaves the cache a plain fed-back loop of
/// `forward_greedy` leaves: the next step's logits agree exactly. Stopping early and a
/// wrong number of first tokens behave as documented.
#[test]
fn run_greedy_steps_leaves_the_cache_a_fed_back_loop_leaves() {
    use cla_model::{SequenceStep, run_greedy_steps};
    let (w, _) = model();
    let prompts = [vec![5u32, 6, 7], vec![9]];
    let prefill = |d: &mut CpuDecoder| {
        let seqs: Vec<_> = prompts.iter().map(|_| d.add_sequence()).collect();
        let steps: Vec<_> = seqs
            .iter()
            .zip(&prompts)
            .map(|(&s, p)| SequenceStep::last(s, p))
            .collect();
        let first = d.forward_greedy(&steps).unwrap();
        (seqs, first)
    };
    let mut a = decoder(&w, 2);
    let (seqs_a, first_a) = prefill(&mut a);
    assert_eq!(
        run_greedy_steps(&mut a, &seqs_a, &first_a, 6, || true).unwrap(),
        6
    );

    let mut b = decoder(&w, 2);
    let (seqs_b, mut next) = prefill(&mut b);
    assert_eq!(first_a, next);
    for _ in 0..6 {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let steps: Vec<_> = seqs_b
            .iter()
            .zip(&toks)
            .map(|(&s, t)| SequenceStep::last(s, t))
            .collect();
        next = b.forward_greedy(&steps).unwrap();
    }
    // The same probe token on both: equal logits only if both caches hold the same tokens.
    let probe = |d: &mut CpuDecoder, seqs: &[cla_model::SequenceId]| {
        let steps: Vec<_> = seqs.iter().map(|&s| SequenceStep::last(s, &[3])).collect();
        d.forward(&steps).unwrap()
    };
    assert_eq!(probe(&mut a, &seqs_a), probe(&mut b, &seqs_b));

    // Stopped after the third step: three steps in the cache.
    let mut c = decoder(&w, 2);
    let (seqs_c, first_c) = prefill(&mut c);
    let mut asked = 0;
    let ran = run_greedy_steps(&mut c, &seqs_c, &first_c, 6, || {
        asked += 1;
        asked < 3
    })
    .unwrap();
    assert_eq!(ran, 3);
    assert_eq!(c.sequences().sequence_len(seqs_c[1]).unwrap(), 1 + 3);
    assert!(run_greedy_steps(&mut c, &seqs_c, &first_c[..1], 2, || true).is_err());
}
