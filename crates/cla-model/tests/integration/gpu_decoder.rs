//! The GPU decoder against the CPU reference on small random models: the same logits (f32,
//! max abs < 1e-4) for prefill and decode steps of batches of sequences of different
//! lengths, across sharing maps (CLA2, CLA3, CLA2-KeepEnds, dense, a YOCO-like tail) and
//! attention shapes (MQA, GQA, MHA); the same greedy tokens; and the cache operations
//! (fork with copy-on-write, truncate, errors that change nothing).
//!
//! Runs on any wgpu adapter, the software Vulkan device included (`CLA_DEVICE=cpu`).

use crate::common;

use cla_core::{KvSharing, ModelConfig, SharingPattern};
use cla_kv::{KvCacheConfig, KvDType, KvShape, PagedKvCache};
use cla_model::gpu::GpuKvStorage;
use cla_model::{
    CpuDecoder, Decoder, GenerationConfig, GpuDecoder, GpuDecoderOptions, GpuWeightDType,
    ModelError, ModelWeights, RandomWeightsOptions, SamplingConfig, SequenceStep, generate_ids,
};
use common::{gpu_ctx, max_abs_diff, small_config};
use ndarray::Array2;
use proptest::prelude::*;
use std::ops::ControlFlow;
use std::sync::Arc;

const TOL: f32 = 1e-4;

fn sharing(pattern: SharingPattern, layers: usize) -> Vec<usize> {
    pattern.build(layers).unwrap().sources().to_vec()
}

/// A small cache: blocks of 4 tokens, so that sequences span several blocks.
fn cache() -> KvCacheConfig {
    KvCacheConfig::new(64, KvDType::F32).with_block_size(4)
}

fn pair(w: &Arc<ModelWeights>, cache: KvCacheConfig) -> (CpuDecoder, GpuDecoder) {
    let cpu = CpuDecoder::new(Arc::clone(w), cache).unwrap();
    let gpu = GpuDecoder::new(gpu_ctx(), w, cache).unwrap();
    (cpu, gpu)
}

fn random(config: &ModelConfig, seed: u64, kv_input_norm: bool) -> Arc<ModelWeights> {
    Arc::new(ModelWeights::random_with(
        config,
        &RandomWeightsOptions {
            seed,
            kv_input_norm,
        },
    ))
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((seed as usize).wrapping_mul(31) + i * 17 + 5) as u32 % vocab as u32)
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn assert_close(what: &str, cpu: &[Array2<f32>], gpu: &[Array2<f32>]) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: steps");
    for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        assert_eq!(c.dim(), g.dim(), "{what}: step {i} shape");
        let diff = max_abs_diff(c.as_slice().unwrap(), g.as_slice().unwrap());
        assert!(diff < TOL, "{what}: step {i} differs by {diff}");
    }
}

fn steps<'a>(
    seqs: &[cla_model::SequenceId],
    toks: &'a [Vec<u32>],
    all: &[bool],
) -> Vec<SequenceStep<'a>> {
    seqs.iter()
        .zip(toks)
        .zip(all)
        .map(|((&s, t), &a)| {
            if a {
                SequenceStep::all(s, t)
            } else {
                SequenceStep::last(s, t)
            }
        })
        .collect()
}

/// Runs both decoders through: a prefill of three prompts of different lengths (mixed
/// `Last`/`All`), decode steps of the whole batch, a step mixing a 3-token chunk with
/// single tokens, and a greedy step on the GPU; every logit compared.
fn check_against_cpu(config: &ModelConfig, seed: u64, kv_input_norm: bool) {
    let w = random(config, seed, kv_input_norm);
    let (mut cpu, mut gpu) = pair(&w, cache());
    let v = config.vocab_size;
    let prompts = [
        tokens(seed, 7, v),
        tokens(seed + 1, 13, v),
        tokens(seed + 2, 2, v),
    ];
    let cs: Vec<_> = prompts.iter().map(|_| cpu.add_sequence()).collect();
    let gs: Vec<_> = prompts.iter().map(|_| gpu.add_sequence()).collect();
    let kinds = [true, false, true];
    let c = cpu.forward(&steps(&cs, &prompts, &kinds)).unwrap();
    let g = gpu.forward(&steps(&gs, &prompts, &kinds)).unwrap();
    assert_close("prefill", &c, &g);

    // Decode: each sequence feeds back its own greedy token.
    let mut next: Vec<Vec<u32>> = c
        .iter()
        .map(|l| vec![argmax(l.row(l.nrows() - 1).as_slice().unwrap())])
        .collect();
    for step in 0..4 {
        let all = [step % 2 == 0, true, false];
        let c = cpu.forward(&steps(&cs, &next, &all)).unwrap();
        let g = gpu.forward(&steps(&gs, &next, &all)).unwrap();
        assert_close(&format!("decode step {step}"), &c, &g);
        next = c
            .iter()
            .map(|l| vec![argmax(l.row(0).as_slice().unwrap())])
            .collect();
    }

    // A chunk of three tokens next to single tokens (prefill kernel with kv already cached).
    next[1] = tokens(seed + 9, 3, v);
    let c = cpu
        .forward(&steps(&cs, &next, &[false, true, false]))
        .unwrap();
    let g = gpu
        .forward(&steps(&gs, &next, &[false, true, false]))
        .unwrap();
    assert_close("mixed chunk", &c, &g);
    next = c
        .iter()
        .map(|l| vec![argmax(l.row(l.nrows() - 1).as_slice().unwrap())])
        .collect();

    // Greedy on the GPU: ids only, the same as the CPU's argmax.
    let c = cpu.forward(&steps(&cs, &next, &[false; 3])).unwrap();
    let ids = gpu.forward_greedy(&steps(&gs, &next, &[false; 3])).unwrap();
    let want: Vec<u32> = c
        .iter()
        .map(|l| argmax(l.row(0).as_slice().unwrap()))
        .collect();
    assert_eq!(ids, want, "greedy ids");
    for (&cs, &gs) in cs.iter().zip(&gs) {
        assert_eq!(cpu.sequence_len(cs).unwrap(), gpu.sequence_len(gs).unwrap());
        assert_eq!(
            cpu.sequence_kv_bytes(cs).unwrap(),
            gpu.sequence_kv_bytes(gs).unwrap()
        );
    }
    assert_eq!(cpu.kv_bytes_in_use(), gpu.kv_bytes_in_use());
    assert_eq!(cpu.free_kv_tokens(), gpu.free_kv_tokens());
}

#[test]
fn cla2_mqa_matches_cpu() {
    // 4 layers, CLA2: layer 3 is a consumer after the last producer (tail skip).
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 1, 8, 61, true);
    check_against_cpu(&c, 1, true);
}

#[test]
fn cla3_gqa_matches_cpu() {
    let c = small_config(sharing(SharingPattern::Cla(3), 5), 48, 6, 2, 8, 50, false);
    check_against_cpu(&c, 2, false);
}

#[test]
fn cla2_keep_ends_mha_matches_cpu() {
    // The last layer is a producer: no tail to skip, rows reduced before the final norm.
    let c = small_config(
        sharing(SharingPattern::Cla2KeepEnds, 6),
        32,
        4,
        4,
        8,
        40,
        true,
    );
    check_against_cpu(&c, 3, true);
}

#[test]
fn dense_gqa_and_yoco_tail_match_cpu() {
    let c = small_config(vec![0, 1, 2], 24, 4, 2, 6, 33, false);
    check_against_cpu(&c, 4, false);
    // Layers 0 and 1 produce; 2..5 all read layer 1.
    let c = small_config(vec![0, 1, 1, 1, 1], 32, 2, 1, 16, 45, true);
    check_against_cpu(&c, 5, true);
}

#[test]
fn the_tail_skip_changes_nothing() {
    let c = small_config(vec![0, 1, 1, 1], 32, 4, 2, 8, 40, true);
    let w = random(&c, 6, false);
    let mut on = GpuDecoder::new(gpu_ctx(), &w, cache()).unwrap();
    let mut off = GpuDecoder::with_options(
        gpu_ctx(),
        &w,
        cache(),
        GpuDecoderOptions {
            skip_consumer_tail: false,
            ..GpuDecoderOptions::default()
        },
    )
    .unwrap();
    let p = tokens(6, 9, 40);
    let (a, b) = (on.add_sequence(), off.add_sequence());
    let x = on.forward(&[SequenceStep::last(a, &p)]).unwrap();
    let y = off.forward(&[SequenceStep::last(b, &p)]).unwrap();
    assert_close("tail skip", &x, &y);
}

/// A step submitted every two layers (five layers: three submissions) gives the logits of a
/// step submitted once, through a prefill and decode steps.
#[test]
fn submitting_a_step_in_parts_changes_nothing() {
    let c = small_config(sharing(SharingPattern::Cla(2), 5), 32, 4, 2, 8, 40, true);
    let w = random(&c, 9, false);
    let mut once = GpuDecoder::new(gpu_ctx(), &w, cache()).unwrap();
    let mut parts = GpuDecoder::with_options(
        gpu_ctx(),
        &w,
        cache(),
        GpuDecoderOptions {
            submit_every_layers: 2,
            ..GpuDecoderOptions::default()
        },
    )
    .unwrap();
    let p = tokens(9, 7, 40);
    let (a, b) = (once.add_sequence(), parts.add_sequence());
    let x = once.forward(&[SequenceStep::all(a, &p)]).unwrap();
    let y = parts.forward(&[SequenceStep::all(b, &p)]).unwrap();
    assert_close("prefill in parts", &x, &y);
    for t in [3u32, 17, 29] {
        let x = once.forward(&[SequenceStep::last(a, &[t])]).unwrap();
        let y = parts.forward(&[SequenceStep::last(b, &[t])]).unwrap();
        assert_close("decode in parts", &x, &y);
    }
}

#[test]
fn greedy_generation_gives_the_cpu_tokens() {
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 1, 8, 64, true);
    let w = random(&c, 7, true);
    let (mut cpu, mut gpu) = pair(&w, cache());
    let prompts = vec![tokens(1, 5, 64), tokens(2, 12, 64), tokens(3, 1, 64)];
    let config = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingConfig::greedy(),
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let a = generate_ids(&mut cpu, None, &prompts, &config, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let b = generate_ids(&mut gpu, None, &prompts, &config, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.ids, b.ids, "prompt {i}");
        assert_eq!(a.kv_bytes, b.kv_bytes);
    }
    // Everything was freed again.
    assert_eq!(gpu.kv_bytes_in_use(), 0);

    // The same continuation through forward_greedy, one batched step per token.
    let seqs: Vec<_> = prompts.iter().map(|_| gpu.add_sequence()).collect();
    let mut feed = prompts.clone();
    let mut got = vec![Vec::new(); prompts.len()];
    for _ in 0..12 {
        let steps: Vec<_> = seqs
            .iter()
            .zip(&feed)
            .map(|(&s, t)| SequenceStep::last(s, t))
            .collect();
        let ids = gpu.forward_greedy(&steps).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            got[i].push(id);
            feed[i] = vec![id];
        }
    }
    for (i, g) in a.iter().enumerate() {
        assert_eq!(got[i], g.ids, "forward_greedy, prompt {i}");
    }
}

/// The pipelined steps (`submit_greedy`, `submit_greedy_after`: each step's tokens read from
/// the previous step's ids on the GPU, the next step submitted before the ids are read back)
/// against `forward_greedy` one step at a time with the tokens fed from the host, on twin
/// decoders. Midway one sequence leaves the batch and the others change order, so the fed
/// ids are gathered from rows other than their own.
#[test]
fn pipelined_greedy_steps_equal_host_fed_steps() {
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 2, 8, 50, false);
    let w = random(&c, 11, false);
    let mut piped = GpuDecoder::new(gpu_ctx(), &w, cache()).unwrap();
    let mut fed = GpuDecoder::new(gpu_ctx(), &w, cache()).unwrap();
    assert!(piped.pipelines_steps());
    let prompts = [tokens(4, 6, 50), tokens(5, 3, 50), tokens(6, 9, 50)];
    let sp: Vec<_> = prompts.iter().map(|_| piped.add_sequence()).collect();
    let sf: Vec<_> = prompts.iter().map(|_| fed.add_sequence()).collect();
    let steps = |seqs: &[cla_model::SequenceId]| -> Vec<SequenceStep<'_>> {
        seqs.iter()
            .zip(&prompts)
            .map(|(&s, p)| SequenceStep::last(s, p))
            .collect()
    };
    let mut pending = piped.submit_greedy(&steps(&sp)).unwrap();
    let mut want = fed.forward_greedy(&steps(&sf)).unwrap();
    // Batch order per step, as indices into the three sequences.
    let orders: [&[usize]; 6] = [&[0, 1, 2], &[0, 1, 2], &[2, 0], &[0, 2], &[2, 0], &[2]];
    let mut prev_order: &[usize] = &[0, 1, 2];
    for (step, order) in orders.iter().enumerate() {
        let next = piped
            .submit_greedy_after(&pending, &order.iter().map(|&i| sp[i]).collect::<Vec<_>>())
            .unwrap();
        let got = piped.wait_step(pending).unwrap();
        assert_eq!(got, want, "step {step}");
        // The host-fed twin: each sequence's token from the previous step's row for it.
        let feed: Vec<[u32; 1]> = order
            .iter()
            .map(|i| [want[prev_order.iter().position(|p| p == i).unwrap()]])
            .collect();
        let host_steps: Vec<_> = order
            .iter()
            .zip(&feed)
            .map(|(&i, t)| SequenceStep::last(sf[i], t))
            .collect();
        want = fed.forward_greedy(&host_steps).unwrap();
        pending = next;
        prev_order = order;
    }
    assert_eq!(piped.wait_step(pending).unwrap(), want, "last step");
    for (a, b) in sp.iter().zip(&sf) {
        assert_eq!(
            piped.sequence_len(*a).unwrap(),
            fed.sequence_len(*b).unwrap()
        );
    }
    // A sequence the earlier step did not run is a typed error, and changes nothing.
    let lone = piped
        .submit_greedy(&[SequenceStep::last(sp[1], &[7])])
        .unwrap();
    let len = piped.sequence_len(sp[0]).unwrap();
    let err = piped.submit_greedy_after(&lone, &[sp[0]]).unwrap_err();
    assert!(matches!(err, ModelError::InvalidArgument { .. }), "{err}");
    assert_eq!(piped.sequence_len(sp[0]).unwrap(), len);
    piped.wait_step(lone).unwrap();
}

/// Generation on the GPU submits each step ahead of reading the previous one's tokens, so a
/// prompt that hits a stop token, or a callback that stops everything, leaves one step in
/// flight that must be given back. Same tokens, stop reasons and cache bytes as the CPU,
/// which runs one step at a time.
#[test]
fn pipelined_generation_stops_like_the_cpu() {
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 1, 8, 64, true);
    let w = random(&c, 13, true);
    // One position per block, so that the cache bytes count every position held.
    let (mut cpu, mut gpu) = pair(&w, KvCacheConfig::new(256, KvDType::F32).with_block_size(1));
    let prompts = vec![tokens(7, 4, 64), tokens(8, 10, 64), tokens(9, 2, 64)];
    let go_on = &mut |_: cla_model::TokenEvent<'_>| ControlFlow::Continue(());
    let free_run = GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingConfig::greedy(),
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let plain = generate_ids(&mut cpu, None, &prompts, &free_run, go_on).unwrap();
    // Stop tokens: the third token of the first prompt's continuation and the sixth of the
    // second's, so prompts end at different steps while others run on.
    let stops = vec![plain[0].ids[2], plain[1].ids[5]];
    let config = GenerationConfig {
        stop_token_ids: stops.clone(),
        ..free_run.clone()
    };
    let a = generate_ids(&mut cpu, None, &prompts, &config, go_on).unwrap();
    let b = generate_ids(&mut gpu, None, &prompts, &config, go_on).unwrap();
    assert!(
        a.iter()
            .any(|g| matches!(g.stop_reason, cla_model::StopReason::StopToken(_))),
        "the stop tokens must end a prompt: {stops:?}"
    );
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.ids, b.ids, "prompt {i}");
        assert_eq!(a.stop_reason, b.stop_reason, "prompt {i}");
        assert_eq!(a.kv_bytes, b.kv_bytes, "prompt {i}");
    }
    // The callback stops everything after the seventh token.
    let stop_after = |n: usize| {
        let mut seen = 0;
        move |_: cla_model::TokenEvent<'_>| {
            seen += 1;
            if seen >= n {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    };
    let a = generate_ids(&mut cpu, None, &prompts, &free_run, &mut stop_after(7)).unwrap();
    let b = generate_ids(&mut gpu, None, &prompts, &free_run, &mut stop_after(7)).unwrap();
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.ids, b.ids, "stopped, prompt {i}");
        assert_eq!(a.stop_reason, b.stop_reason, "stopped, prompt {i}");
        assert_eq!(a.kv_bytes, b.kv_bytes, "stopped, prompt {i}");
    }
    assert_eq!(gpu.kv_bytes_in_use(), 0);
}

#[test]
fn fork_copy_on_write_and_truncate_match_cpu() {
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 2, 8, 50, false);
    let w = random(&c, 8, false);
    let (mut cpu, mut gpu) = pair(&w, cache());
    let p = tokens(8, 6, 50); // 6 tokens: the second block of 4 is half full
    let (c0, g0) = (cpu.add_sequence(), gpu.add_sequence());
    cpu.forward(&[SequenceStep::last(c0, &p)]).unwrap();
    gpu.forward(&[SequenceStep::last(g0, &p)]).unwrap();
    let (c1, g1) = (
        cpu.fork_sequence(c0).unwrap(),
        gpu.fork_sequence(g0).unwrap(),
    );
    // Both append into the shared, partly filled block: the fork copies it first.
    let (ta, tb) = ([3u32, 4], [9u32]);
    let c = cpu
        .forward(&[SequenceStep::all(c0, &ta), SequenceStep::all(c1, &tb)])
        .unwrap();
    let g = gpu
        .forward(&[SequenceStep::all(g0, &ta), SequenceStep::all(g1, &tb)])
        .unwrap();
    assert_close("after fork", &c, &g);
    cpu.truncate_sequence(c0, 3).unwrap();
    gpu.truncate_sequence(g0, 3).unwrap();
    let c = cpu.forward(&[SequenceStep::all(c0, &[7, 8, 9])]).unwrap();
    let g = gpu.forward(&[SequenceStep::all(g0, &[7, 8, 9])]).unwrap();
    assert_close("after truncate", &c, &g);
    assert_eq!(cpu.kv_bytes_in_use(), gpu.kv_bytes_in_use());
}

#[test]
fn refused_steps_change_nothing() {
    let c = small_config(vec![0, 0, 2], 16, 2, 1, 8, 20, true);
    let w = random(&c, 9, false);
    let (mut cpu, mut gpu) = pair(&w, KvCacheConfig::new(5, KvDType::F32).with_block_size(4));
    let (cs, gs) = (cpu.add_sequence(), gpu.add_sequence());
    let p = tokens(9, 5, 20);
    cpu.forward(&[SequenceStep::last(cs, &p)]).unwrap();
    gpu.forward(&[SequenceStep::last(gs, &p)]).unwrap();
    let other = gpu.add_sequence();
    let errors = [
        gpu.forward(&[SequenceStep::last(gs, &[20])]).unwrap_err(),
        gpu.forward(&[SequenceStep::last(gs, &[])]).unwrap_err(),
        gpu.forward(&[SequenceStep::last(gs, &[1]), SequenceStep::last(gs, &[1])])
            .unwrap_err(),
        // 5 blocks of 4: 13 more positions do not fit (the first step's blocks are released).
        gpu.forward(&[
            SequenceStep::last(gs, &[1]),
            SequenceStep::last(other, &[1; 13]),
        ])
        .unwrap_err(),
        gpu.forward(&[SequenceStep::last(gs, &[1; 60])])
            .unwrap_err(),
    ];
    assert!(
        matches!(errors[0], ModelError::TokenOutOfRange { .. }),
        "{}",
        errors[0]
    );
    assert!(
        matches!(errors[2], ModelError::DuplicateSequence(_)),
        "{}",
        errors[2]
    );
    assert!(matches!(errors[3], ModelError::Cache(_)), "{}", errors[3]);
    assert!(
        matches!(errors[4], ModelError::ContextExceeded { .. }),
        "{}",
        errors[4]
    );
    gpu.free_sequence(other).unwrap();
    assert!(matches!(
        gpu.sequence_len(other),
        Err(ModelError::UnknownSequence(_))
    ));
    assert_eq!(gpu.sequence_len(gs).unwrap(), 5);
    assert_eq!(gpu.kv_bytes_in_use(), cpu.kv_bytes_in_use());
    let c = cpu.forward(&[SequenceStep::all(cs, &[3, 4])]).unwrap();
    let g = gpu.forward(&[SequenceStep::all(gs, &[3, 4])]).unwrap();
    assert_close("after errors", &c, &g);
}

#[test]
fn f16_cache_and_f16_weights_stay_close() {
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 2, 8, 40, true);
    let w = random(&c, 10, true);
    let p = tokens(10, 11, 40);
    let f16_cache = KvCacheConfig::new(16, KvDType::F16).with_block_size(4);
    let mut cpu = CpuDecoder::new(Arc::clone(&w), f16_cache).unwrap();
    let mut gpu = GpuDecoder::new(gpu_ctx(), &w, f16_cache).unwrap();
    let mut gpu16 = GpuDecoder::with_options(
        gpu_ctx(),
        &w,
        cache(),
        GpuDecoderOptions {
            weight_dtype: GpuWeightDType::F16,
            ..GpuDecoderOptions::default()
        },
    )
    .unwrap();
    let (a, b, d) = (cpu.add_sequence(), gpu.add_sequence(), gpu16.add_sequence());
    let want = cpu.forward(&[SequenceStep::all(a, &p)]).unwrap().remove(0);
    let got = gpu.forward(&[SequenceStep::all(b, &p)]).unwrap().remove(0);
    let half = gpu16
        .forward(&[SequenceStep::all(d, &p)])
        .unwrap()
        .remove(0);
    // The same f16 cache on both sides: equal up to rounding of nearly equal keys.
    assert_within("f16 cache", &want, &got, 1e-2);
    assert_within("f16 weights", &want, &half, 5e-2);
}

/// Asserts that `got` is within `rel` of the largest `want` logit, element by element.
fn assert_within(what: &str, want: &Array2<f32>, got: &Array2<f32>, rel: f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(want.as_slice().unwrap(), got.as_slice().unwrap());
    assert!(diff < rel * scale, "{what}: {diff} (logits up to {scale})");
}

/// A wide MQA group (32 query heads on one K/V head, head_dim 16) over an f16 cache, decoded
/// token by token: on a device with cooperative matrices this is the tensor-core decode
/// kernel's path, elsewhere the lane-group or tiled one; the logits follow the CPU's.
#[test]
fn wide_mqa_decode_over_an_f16_cache_stays_close() {
    let c = small_config(sharing(SharingPattern::Cla(2), 2), 64, 32, 1, 16, 37, true);
    let w = random(&c, 12, true);
    let f16_cache = KvCacheConfig::new(48, KvDType::F16).with_block_size(4);
    let mut cpu = CpuDecoder::new(Arc::clone(&w), f16_cache).unwrap();
    let mut gpu = GpuDecoder::new(gpu_ctx(), &w, f16_cache).unwrap();
    let (a, b) = (cpu.add_sequence(), gpu.add_sequence());
    let toks = tokens(12, 40, 37);
    for (i, t) in toks.iter().enumerate() {
        let one = [*t];
        let want = cpu
            .forward(&[SequenceStep::all(a, &one)])
            .unwrap()
            .remove(0);
        let got = gpu
            .forward(&[SequenceStep::all(b, &one)])
            .unwrap()
            .remove(0);
        assert_within(&format!("token {i}"), &want, &got, 1e-2);
    }
}

#[test]
fn rows_the_kernel_appends_are_what_the_cache_reads() {
    // `kv_append` writes the pool and the cache is only told (`mark_written`): reading
    // every layer back through the cache gives the CPU decoder's keys and values.
    let c = small_config(sharing(SharingPattern::Cla(2), 4), 32, 4, 2, 8, 50, false);
    let w = random(&c, 11, false);
    let (mut cpu, mut gpu) = pair(&w, cache());
    let (c0, g0) = (cpu.add_sequence(), gpu.add_sequence());
    let (c1, g1) = (cpu.add_sequence(), gpu.add_sequence());
    let (p0, p1) = (tokens(11, 6, 50), tokens(12, 3, 50));
    for (c_steps, g_steps) in [
        (
            [SequenceStep::last(c0, &p0), SequenceStep::last(c1, &p1)],
            [SequenceStep::last(g0, &p0), SequenceStep::last(g1, &p1)],
        ),
        (
            [SequenceStep::last(c0, &[7]), SequenceStep::last(c1, &[8])],
            [SequenceStep::last(g0, &[7]), SequenceStep::last(g1, &[8])],
        ),
    ] {
        cpu.forward(&c_steps).unwrap();
        gpu.forward(&g_steps).unwrap();
    }
    for (cs, gs, len) in [(c0, g0, 7), (c1, g1, 4)] {
        assert_eq!(gpu.cache().seq_len(gs).unwrap(), len);
        assert_eq!(gpu.cache().pending_len(gs).unwrap(), 0);
        for layer in 0..4 {
            let (ck, cv) = cpu.cache().read(cs, layer).unwrap();
            let (gk, gv) = gpu.cache().read(gs, layer).unwrap();
            assert_eq!(gk.len(), len * c.kv_width(), "layer {layer}");
            let diff = max_abs_diff(&ck, &gk).max(max_abs_diff(&cv, &gv));
            assert!(diff < TOL, "{cs} layer {layer}: K/V differ by {diff}");
        }
    }
}

#[test]
fn gpu_storage_round_trips_host_writes_like_the_cpu_storage() {
    // The storage under the cache's host API: write, fork + copy-on-write, read back.
    let sharing = KvSharing::from_sources("t", vec![0, 0, 2]).unwrap();
    let shape = KvShape::new(2, 4, sharing).unwrap();
    for dtype in KvDType::ALL {
        let config = KvCacheConfig::new(6, dtype).with_block_size(4);
        let layout = cla_kv::KvLayout::new(&shape, &config).unwrap();
        let storage = GpuKvStorage::new(gpu_ctx(), layout).unwrap();
        let mut gpu = PagedKvCache::with_storage(shape.clone(), config, storage).unwrap();
        let mut cpu = PagedKvCache::new(shape.clone(), config).unwrap();
        let fill = |n: usize, base: f32| -> Vec<f32> {
            (0..n * 8).map(|i| base + i as f32 * 0.25).collect()
        };
        let (a, b) = (gpu.add_sequence(), cpu.add_sequence());
        for (layer, base) in [(0, 1.0), (2, -3.0)] {
            if layer == 0 {
                gpu.reserve(a, 6).unwrap();
                cpu.reserve(b, 6).unwrap();
            }
            gpu.write(a, layer, &fill(6, base), &fill(6, -base))
                .unwrap();
            cpu.write(b, layer, &fill(6, base), &fill(6, -base))
                .unwrap();
        }
        gpu.commit(a).unwrap();
        cpu.commit(b).unwrap();
        let (fa, fb) = (gpu.fork(a).unwrap(), cpu.fork(b).unwrap());
        gpu.reserve(fa, 1).unwrap();
        cpu.reserve(fb, 1).unwrap();
        for layer in [0, 2] {
            gpu.write(fa, layer, &fill(1, 100.0), &fill(1, 200.0))
                .unwrap();
            cpu.write(fb, layer, &fill(1, 100.0), &fill(1, 200.0))
                .unwrap();
        }
        gpu.commit(fa).unwrap();
        cpu.commit(fb).unwrap();
        for (ga, cb) in [(a, b), (fa, fb)] {
            for layer in 0..3 {
                assert_eq!(
                    gpu.read(ga, layer).unwrap(),
                    cpu.read(cb, layer).unwrap(),
                    "{dtype:?} layer {layer}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]
    #[test]
    fn random_small_configs_match_cpu(
        pattern in prop::sample::select(vec![
            SharingPattern::None,
            SharingPattern::Cla(2),
            SharingPattern::Cla(3),
            SharingPattern::Cla2KeepEnds,
            SharingPattern::Cla2DenseFront,
        ]),
        layers in 3usize..6,
        (q_heads, kv_heads) in prop::sample::select(vec![(1usize, 1usize), (4, 1), (4, 2), (3, 3), (6, 2)]),
        half_dim in 2usize..6,
        tie: bool,
        kv_norm: bool,
        seed in 0u64..1000,
    ) {
        let d = 2 * half_dim;
        let c = small_config(sharing(pattern, layers), 4 * d, q_heads, kv_heads, d, 37, tie);
        check_against_cpu(&c, seed, kv_norm);
    }
}
