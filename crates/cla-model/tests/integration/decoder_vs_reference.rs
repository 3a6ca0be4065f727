//! The paged, batched CPU decoder agrees with the naive reference forward on random small
//! models: random sharing maps (CLA2/CLA3, keep-ends, dense-front/back, Hunyuan, arbitrary),
//! MHA/GQA/MQA with odd head counts, head sizes such as 46 and 90, random block sizes.

use crate::common;

use cla_core::{KvSharing, SharingPattern};
use cla_kv::{KvCacheConfig, KvDType};
use cla_model::{
    CpuDecoder, CpuDecoderOptions, Decoder, ModelWeights, RandomWeightsOptions, SequenceStep,
};
use common::{max_abs_diff, naive, small_config};
use proptest::prelude::*;
use std::sync::Arc;

const TOLERANCE: f32 = 1e-4;

/// A sharing map for `layers` layers: one of the named patterns, or an arbitrary valid map.
fn sharing_strategy(layers: usize) -> impl Strategy<Value = Vec<usize>> {
    let named = prop_oneof![
        Just(SharingPattern::None),
        Just(SharingPattern::Cla(2)),
        Just(SharingPattern::Cla(3)),
        Just(SharingPattern::Hunyuan(2)),
        Just(SharingPattern::Cla2KeepEnds),
        Just(SharingPattern::Cla2DenseFront),
        Just(SharingPattern::Cla2DenseBack),
    ]
    .prop_filter_map("pattern needs more layers", move |p| {
        p.build(layers).ok().map(|m| m.sources().to_vec())
    });
    let arbitrary = proptest::collection::vec(any::<u64>(), layers).prop_map(|r| {
        let mut sources: Vec<usize> = Vec::with_capacity(r.len());
        for (i, x) in r.iter().enumerate() {
            let producers: Vec<usize> = (0..i).filter(|&j| sources[j] == j).collect();
            if i == 0 || x % 2 == 0 {
                sources.push(i);
            } else {
                sources.push(producers[(x / 2) as usize % producers.len()]);
            }
        }
        sources
    });
    prop_oneof![named, arbitrary]
}

#[derive(Debug, Clone)]
struct Case {
    sources: Vec<usize>,
    hidden: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tie: bool,
    kv_norm: bool,
    seed: u64,
    block_size: usize,
    kv_f16: bool,
    prompt: Vec<u32>,
    decode: Vec<u32>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=6,
        1usize..=3,
        1usize..=5,
        prop::sample::select(vec![2usize, 4, 6, 8, 46, 90]),
    )
        .prop_flat_map(|(layers, kv_heads, group, head_dim)| {
            // Keep the widest products small: few heads when heads are large.
            let group = if head_dim >= 46 { group.min(2) } else { group };
            let kv_heads = if head_dim >= 46 { 1 } else { kv_heads };
            (
                sharing_strategy(layers),
                Just(kv_heads * group),
                Just(kv_heads),
                Just(head_dim),
                8usize..=40,
                16usize..=48,
                any::<bool>(),
                any::<bool>(),
                any::<u64>(),
                1usize..=8,
                prop::bool::weighted(0.2),
                (1usize..=20, 0usize..=8),
            )
        })
        .prop_flat_map(
            |(
                sources,
                q_heads,
                kv_heads,
                head_dim,
                hidden,
                vocab,
                tie,
                kv_norm,
                seed,
                block_size,
                kv_f16,
                (np, nd),
            )| {
                let v = vocab as u32;
                (
                    proptest::collection::vec(0..v, np),
                    proptest::collection::vec(0..v, nd),
                )
                    .prop_map(move |(prompt, decode)| Case {
                        sources: sources.clone(),
                        hidden,
                        q_heads,
                        kv_heads,
                        head_dim,
                        vocab,
                        tie,
                        kv_norm,
                        seed,
                        block_size,
                        kv_f16,
                        prompt,
                        decode,
                    })
            },
        )
}

fn build(case: &Case) -> Arc<ModelWeights> {
    let config = small_config(
        case.sources.clone(),
        case.hidden,
        case.q_heads,
        case.kv_heads,
        case.head_dim,
        case.vocab,
        case.tie,
    );
    Arc::new(ModelWeights::random_with(
        &config,
        &RandomWeightsOptions {
            seed: case.seed,
            kv_input_norm: case.kv_norm,
        },
    ))
}

fn decoder(weights: &Arc<ModelWeights>, block_size: usize, f16: bool) -> CpuDecoder {
    let dtype = if f16 { KvDType::F16 } else { KvDType::F32 };
    CpuDecoder::new(
        Arc::clone(weights),
        KvCacheConfig::new(256, dtype).with_block_size(block_size),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Prefill (all positions' logits) then token-by-token decode through the paged cache
    /// equals the naive full recomputation at every position.
    #[test]
    fn prefill_and_decode_match_the_naive_reference(case in case_strategy()) {
        let weights = build(&case);
        let mut all = case.prompt.clone();
        all.extend(&case.decode);
        let want = naive::forward(&weights, &all);
        // f16 cache entries carry ~1e-3 relative rounding; f32 must be exact to 1e-4.
        let tol = if case.kv_f16 { 5e-2 } else { TOLERANCE };

        let mut dec = decoder(&weights, case.block_size, case.kv_f16);
        let seq = dec.add_sequence();
        let prefill = dec.forward(&[SequenceStep::all(seq, &case.prompt)]).unwrap();
        prop_assert_eq!(prefill[0].nrows(), case.prompt.len());
        for (p, row) in prefill[0].outer_iter().enumerate() {
            let d = max_abs_diff(row.as_slice().unwrap(), &want[p]);
            prop_assert!(d < tol, "prefill position {} differs by {}", p, d);
        }
        for (i, &t) in case.decode.iter().enumerate() {
            let out = dec.forward(&[SequenceStep::last(seq, &[t])]).unwrap();
            let p = case.prompt.len() + i;
            let d = max_abs_diff(out[0].row(0).as_slice().unwrap(), &want[p]);
            prop_assert!(d < tol, "decode position {} differs by {}", p, d);
        }
        prop_assert_eq!(dec.sequence_len(seq).unwrap(), all.len());
    }

    /// Several sequences of different lengths in one batched step give the same logits as
    /// each sequence alone; the consumer-tail shortcut changes nothing.
    #[test]
    fn batched_equals_single_and_tail_skip_is_exact(
        case in case_strategy(),
        extra in proptest::collection::vec(proptest::collection::vec(0u32..16, 1..12), 1..4),
    ) {
        let weights = build(&case);
        let mut prompts = vec![case.prompt.clone()];
        prompts.extend(extra);
        let next: Vec<u32> = (0..prompts.len() as u32).map(|i| (i * 5 + 3) % 16).collect();

        // Each prompt alone, tail shortcut off: last-position logits after prefill, then one
        // decode step.
        let mut alone = Vec::new();
        for (p, &t) in prompts.iter().zip(&next) {
            let mut dec = decoder(&weights, case.block_size, false);
            dec.set_options(CpuDecoderOptions { skip_consumer_tail: false });
            let seq = dec.add_sequence();
            let a = dec.forward(&[SequenceStep::last(seq, p)]).unwrap().remove(0);
            let b = dec.forward(&[SequenceStep::last(seq, &[t])]).unwrap().remove(0);
            alone.push((a, b));
        }

        // All together, shortcut on.
        let mut dec = decoder(&weights, case.block_size, false);
        let seqs: Vec<_> = prompts.iter().map(|_| dec.add_sequence()).collect();
        let steps: Vec<_> = seqs.iter().zip(&prompts).map(|(&s, p)| SequenceStep::last(s, p)).collect();
        let first = dec.forward(&steps).unwrap();
        let steps: Vec<_> = seqs.iter().zip(&next).map(|(&s, t)| SequenceStep::last(s, std::slice::from_ref(t))).collect();
        let second = dec.forward(&steps).unwrap();
        for (i, (a, b)) in alone.iter().enumerate() {
            let d1 = max_abs_diff(first[i].as_slice().unwrap(), a.as_slice().unwrap());
            let d2 = max_abs_diff(second[i].as_slice().unwrap(), b.as_slice().unwrap());
            // Batching changes the row count of every matrix product, and with it the
            // blocking (summation order) of the matmul: agreement is to f32 rounding, the
            // same 1e-4 bound the decoder is held to against the naive reference.
            prop_assert!(d1 < 1e-4 && d2 < 1e-4, "sequence {}: {} {}", i, d1, d2);
        }
    }
}

/// A YOCO-like map (every layer after layer 2 consumes it): the shortcut applies, and the
/// paged cache stores only the producers.
#[test]
fn yoco_tail_matches_reference_and_caches_only_producers() {
    let sources = vec![0, 1, 2, 2, 2, 2];
    let config = small_config(sources.clone(), 24, 4, 2, 6, 32, false);
    assert_eq!(config.kv_sharing.last_producer(), 2);
    let weights = Arc::new(ModelWeights::random(&config, 5));
    let prompt: Vec<u32> = (0..23).map(|i| (i * 7 % 32) as u32).collect();
    let want = naive::forward(&weights, &prompt);
    let mut dec = decoder(&weights, 4, false);
    let seq = dec.add_sequence();
    let out = dec.forward(&[SequenceStep::last(seq, &prompt)]).unwrap();
    assert!(max_abs_diff(out[0].row(0).as_slice().unwrap(), &want[22]) < TOLERANCE);
    let sharing = KvSharing::from_sources("t", sources).unwrap();
    let memory = dec.cache().memory();
    assert_eq!(memory.num_slots, sharing.num_producers());
    assert_eq!(memory.stored_tokens, prompt.len());
}

/// Fork shares the prefix; the two branches continue independently and match the
/// reference.
#[test]
fn forked_sequences_continue_independently() {
    let config = small_config(vec![0, 0, 2, 2], 16, 2, 1, 8, 20, true);
    let weights = Arc::new(ModelWeights::random(&config, 11));
    let mut dec = decoder(&weights, 4, false);
    let a = dec.add_sequence();
    dec.forward(&[SequenceStep::last(a, &[1, 2, 3, 4, 5, 6])])
        .unwrap();
    let b = dec.fork_sequence(a).unwrap();
    let out = dec
        .forward(&[SequenceStep::last(a, &[7]), SequenceStep::last(b, &[9])])
        .unwrap();
    let ra = naive::forward(&weights, &[1, 2, 3, 4, 5, 6, 7]);
    let rb = naive::forward(&weights, &[1, 2, 3, 4, 5, 6, 9]);
    assert!(max_abs_diff(out[0].as_slice().unwrap(), &ra[6]) < TOLERANCE);
    assert!(max_abs_diff(out[1].as_slice().unwrap(), &rb[6]) < TOLERANCE);
    dec.truncate_sequence(b, 2).unwrap();
    assert_eq!(dec.sequence_len(b).unwrap(), 5);
    let out = dec.forward(&[SequenceStep::last(b, &[3])]).unwrap();
    let rc = naive::forward(&weights, &[1, 2, 3, 4, 5, 3]);
    assert!(max_abs_diff(out[0].as_slice().unwrap(), &rc[5]) < TOLERANCE);
}
