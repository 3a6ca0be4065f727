//! Token choice on the GPU against the CPU sampler. One GPU decoder picks its tokens in the
//! step (`Decoder::forward_sample`: repetition penalty, then argmax or the sampling kernel,
//! with the uniform numbers of the sequences' own seeded streams); a twin with the same
//! weights reads its logits back and samples on the host (the trait's default). Both run
//! the same batches, so their logits are the same, and they must generate the same tokens
//! for every setting and seed.
//!
//! The kernels round `exp` within about an ulp of the CPU's, so a draw whose uniform number
//! falls within that rounding of the boundary between two tokens could differ; with these
//! seeds none does, and a change that moves a draw by more than rounding fails here.
//!
//! Runs on any wgpu adapter, the software Vulkan device included (`CLA_DEVICE=cpu`).

use crate::common;

use cla_core::ModelConfig;
use cla_kv::{KvCacheConfig, KvDType};
use cla_model::{
    Decoder, GenerationConfig, GpuDecoder, LoadedModel, ModelError, ModelWeights, Sampler,
    SamplingConfig, SequenceCache, SequenceId, SequenceStep, TokenChoice, generate_ids,
};
use common::{gpu_ctx, small_config};
use ndarray::Array2;
use std::ops::ControlFlow;
use std::sync::Arc;

/// A GPU decoder that reads its logits back and samples on the host: the default
/// `forward_greedy` and `forward_sample` of the trait.
struct HostSampled(GpuDecoder);

impl Decoder for HostSampled {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn sequences(&self) -> &dyn SequenceCache {
        self.0.sequences()
    }

    fn sequences_mut(&mut self) -> &mut dyn SequenceCache {
        self.0.sequences_mut()
    }

    fn forward(&mut self, batch: &[SequenceStep<'_>]) -> cla_model::Result<Vec<Array2<f32>>> {
        self.0.forward(batch)
    }
}

/// CLA2 over 4 layers, GQA, a vocabulary of 300 so that top-k and top-p cut something.
fn weights() -> Arc<ModelWeights> {
    let config = small_config(vec![0, 0, 2, 2], 32, 4, 2, 8, 300, false);
    Arc::new(ModelWeights::random(&config, 29))
}

fn cache() -> KvCacheConfig {
    KvCacheConfig::new(64, KvDType::F32).with_block_size(8)
}

fn twins(w: &Arc<ModelWeights>) -> (GpuDecoder, HostSampled) {
    (
        GpuDecoder::new(gpu_ctx(), w, cache()).unwrap(),
        HostSampled(GpuDecoder::new(gpu_ctx(), w, cache()).unwrap()),
    )
}

fn sampling(temperature: f32, top_k: usize, top_p: f32, penalty: f32, seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_k,
        top_p,
        repetition_penalty: penalty,
        seed,
    }
}

#[test]
fn gpu_sampled_tokens_equal_host_sampled_tokens() {
    let w = weights();
    let prompts = vec![
        vec![1, 17, 99, 250, 3],
        vec![1, 42],
        vec![1, 7, 7, 7, 160, 299, 12],
    ];
    let configs = [
        // Temperature alone, sharp and flat.
        sampling(1.0, 0, 1.0, 1.0, 1),
        sampling(0.4, 0, 1.0, 1.0, 2),
        sampling(2.5, 0, 1.0, 1.0, 3),
        // Top-k (a list in workgroup memory), top-p, both, k above the vocabulary.
        sampling(0.8, 20, 1.0, 1.0, 4),
        sampling(1.2, 0, 0.8, 1.0, 5),
        sampling(0.9, 40, 0.9, 1.0, 6),
        sampling(0.7, 5000, 0.5, 1.0, 7),
        // A tiny nucleus: the most likely token.
        sampling(1.0, 0, 1e-6, 1.0, 8),
        // With the repetition penalty (on the GPU too), sampled and greedy.
        sampling(0.8, 50, 0.95, 1.3, 9),
        sampling(1.1, 0, 1.0, 0.7, 10),
        sampling(0.0, 0, 1.0, 1.25, 11),
        // Greedy through top-k 1, and plain argmax.
        sampling(0.9, 1, 1.0, 1.0, 12),
        SamplingConfig::greedy(),
    ];
    let (mut gpu, mut host) = twins(&w);
    let go_on = &mut |_: cla_model::TokenEvent<'_>| ControlFlow::Continue(());
    for sampling in configs {
        let cfg = GenerationConfig {
            max_new_tokens: 20,
            stop_at_eos: false,
            sampling: sampling.clone(),
            ..GenerationConfig::default()
        };
        let on_gpu = generate_ids(&mut gpu, None, &prompts, &cfg, go_on).unwrap();
        let on_host = generate_ids(&mut host, None, &prompts, &cfg, go_on).unwrap();
        for (g, h) in on_gpu.iter().zip(&on_host) {
            assert_eq!(g.ids.len(), 20);
            assert_eq!(g.ids, h.ids, "{sampling:?}");
        }
    }
}

/// Sampled generation without a repetition penalty is pipelined on the GPU (each step
/// submitted before the previous one's tokens are read back): a prompt that samples a stop
/// token gives back the step already submitted for it. Same tokens, stop reasons and cache
/// bytes (one position per block) as the twin that samples every step on the host, and a
/// chained step that would need the penalty is refused.
#[test]
fn pipelined_sampling_stops_like_the_host_sampler() {
    let w = weights();
    let one_per_block = KvCacheConfig::new(256, KvDType::F32).with_block_size(1);
    let mut gpu = GpuDecoder::new(gpu_ctx(), &w, one_per_block).unwrap();
    let mut host = HostSampled(GpuDecoder::new(gpu_ctx(), &w, one_per_block).unwrap());
    assert!(gpu.pipelines_steps() && !host.pipelines_steps());
    let prompts = vec![vec![1, 17, 99, 250, 3], vec![1, 42], vec![1, 7, 7, 160, 12]];
    let go_on = &mut |_: cla_model::TokenEvent<'_>| ControlFlow::Continue(());
    let free_run = GenerationConfig {
        max_new_tokens: 12,
        stop_at_eos: false,
        sampling: sampling(0.9, 40, 0.95, 1.0, 21),
        ..GenerationConfig::default()
    };
    let plain = generate_ids(&mut host, None, &prompts, &free_run, go_on).unwrap();
    let config = GenerationConfig {
        stop_token_ids: vec![plain[0].ids[3], plain[2].ids[7]],
        ..free_run
    };
    let a = generate_ids(&mut host, None, &prompts, &config, go_on).unwrap();
    let b = generate_ids(&mut gpu, None, &prompts, &config, go_on).unwrap();
    assert!(
        a.iter()
            .any(|g| matches!(g.stop_reason, cla_model::StopReason::StopToken(_))),
        "a stop token must end a prompt"
    );
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.ids, b.ids, "prompt {i}");
        assert_eq!(a.stop_reason, b.stop_reason, "prompt {i}");
        assert_eq!(a.kv_bytes, b.kv_bytes, "prompt {i}");
    }
    assert_eq!(gpu.kv_bytes_in_use(), 0);

    // A chained step with the repetition penalty: a typed error, nothing changes.
    let seq = gpu.add_sequence();
    let mut sampler = Sampler::new(sampling(0.9, 40, 0.95, 1.0, 3), 0);
    let history = vec![1u32, 5];
    let first = gpu
        .submit_sample(
            &[SequenceStep::last(seq, &history)],
            &mut [TokenChoice {
                sampler: &mut sampler,
                history: &history,
            }],
        )
        .unwrap();
    let len = gpu.sequence_len(seq).unwrap();
    let mut penalised = Sampler::new(sampling(0.9, 40, 0.95, 1.3, 3), 0);
    let err = gpu
        .submit_sample_after(
            &first,
            &[seq],
            &mut [TokenChoice {
                sampler: &mut penalised,
                history: &history,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidArgument { .. }), "{err}");
    assert_eq!(gpu.sequence_len(seq).unwrap(), len);
    gpu.wait_step(first).unwrap();
    gpu.free_sequence(seq).unwrap();
}

#[test]
fn a_trained_model_samples_the_same_text_on_the_gpu() {
    // The shipped CLA2 model: peaked distributions over 4096 tokens, as in real use.
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/small-mqa-cla2");
    let model = LoadedModel::load(&dir).unwrap();
    let cache = KvCacheConfig::new(32, KvDType::F32).with_block_size(16);
    let mut gpu = GpuDecoder::new(gpu_ctx(), &model.weights, cache).unwrap();
    let mut host = HostSampled(GpuDecoder::new(gpu_ctx(), &model.weights, cache).unwrap());
    let prompts = ["Once upon a time", "The little dog"];
    let sampling = sampling(0.8, 40, 0.95, 1.1, 3);
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        stop_at_eos: false,
        sampling: sampling.clone(),
        ..GenerationConfig::default()
    };
    let go_on = &mut |_: cla_model::TokenEvent<'_>| ControlFlow::Continue(());
    let a = cla_model::generate(&mut gpu, &model.tokenizer, &prompts, &cfg, go_on).unwrap();
    let b = cla_model::generate(&mut host, &model.tokenizer, &prompts, &cfg, go_on).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.ids, &x.text), (&y.ids, &y.text), "{sampling:?}");
    }
}

fn step<'a>(seqs: &[SequenceId; 2], tokens: &'a [Vec<u32>; 2]) -> Vec<SequenceStep<'a>> {
    (0..2)
        .map(|i| SequenceStep::last(seqs[i], &tokens[i]))
        .collect()
}

fn choices<'a>(
    samplers: &'a mut [Sampler; 2],
    histories: &'a [Vec<u32>; 2],
) -> Vec<TokenChoice<'a>> {
    samplers
        .iter_mut()
        .zip(histories)
        .map(|(sampler, history)| TokenChoice { sampler, history })
        .collect()
}

#[test]
fn forward_sample_draws_like_the_cpu_sampler_and_changes_nothing_on_error() {
    let w = weights();
    let (mut gpu, mut host) = twins(&w);
    let config = sampling(0.9, 30, 0.9, 1.0, 77);
    let mut gpu_samplers = [Sampler::new(config.clone(), 0), Sampler::new(config, 1)];
    let mut host_samplers = gpu_samplers.clone();
    let prompts = [vec![1, 5, 9], vec![1, 200]];
    let seqs_g = [gpu.add_sequence(), gpu.add_sequence()];
    let seqs_h = [host.add_sequence(), host.add_sequence()];
    let mut tokens = prompts.clone();
    for _ in 0..8 {
        let g = gpu
            .forward_sample(
                &step(&seqs_g, &tokens),
                &mut choices(&mut gpu_samplers, &prompts),
            )
            .unwrap();
        let h = host
            .forward_sample(
                &step(&seqs_h, &tokens),
                &mut choices(&mut host_samplers, &prompts),
            )
            .unwrap();
        assert_eq!(g, h);
        tokens = [vec![g[0]], vec![g[1]]];
    }

    // A refused batch draws nothing: the streams are where they were.
    let before: Vec<_> = gpu_samplers.iter().map(Sampler::upcoming_uniform).collect();
    let len = gpu.sequence_len(seqs_g[0]).unwrap();
    gpu.free_sequence(seqs_g[1]).unwrap();
    let err = gpu.forward_sample(
        &step(&seqs_g, &tokens),
        &mut choices(&mut gpu_samplers, &prompts),
    );
    assert!(matches!(err, Err(ModelError::UnknownSequence(_))));
    let after: Vec<_> = gpu_samplers.iter().map(Sampler::upcoming_uniform).collect();
    assert_eq!(before, after);
    assert_eq!(gpu.sequence_len(seqs_g[0]).unwrap(), len);

    // Choices that do not pair up with the batch are refused.
    let one = [SequenceStep::last(seqs_g[0], &tokens[0])];
    let err = gpu.forward_sample(&one, &mut choices(&mut gpu_samplers, &prompts));
    assert!(matches!(err, Err(ModelError::InvalidArgument { .. })));
    assert_eq!(gpu.sequence_len(seqs_g[0]).unwrap(), len);
}

#[test]
fn mixed_settings_in_one_batch_are_sampled_on_the_host_alike() {
    let w = weights();
    let (mut gpu, mut host) = twins(&w);
    let configs = [
        sampling(0.8, 10, 1.0, 1.0, 5),
        sampling(1.3, 0, 0.7, 1.2, 5),
    ];
    let mut gs: Vec<Sampler> = configs.iter().map(|c| Sampler::new(c.clone(), 0)).collect();
    let mut hs = gs.clone();
    let prompt = vec![1, 2, 3];
    let run = |d: &mut dyn Decoder, samplers: &mut [Sampler]| {
        let seqs = [d.add_sequence(), d.add_sequence()];
        let steps = [
            SequenceStep::last(seqs[0], &prompt),
            SequenceStep::last(seqs[1], &prompt),
        ];
        let mut choices: Vec<TokenChoice<'_>> = samplers
            .iter_mut()
            .map(|sampler| TokenChoice {
                sampler,
                history: &prompt,
            })
            .collect();
        d.forward_sample(&steps, &mut choices).unwrap()
    };
    assert_eq!(run(&mut gpu, &mut gs), run(&mut host, &mut hs));
    let next = |s: &[Sampler]| s.iter().map(Sampler::upcoming_uniform).collect::<Vec<_>>();
    assert_eq!(next(&gs), next(&hs));
}

/// A chained step whose settings the kernels do not sample in one batch (two settings):
/// its tokens still come from the running step's ids on the GPU, its logits are read back and
/// sampled on the host. Against the host-sampling twin fed the same tokens from the host.
#[test]
fn a_chained_step_with_mixed_settings_is_fed_from_the_gpu_and_sampled_on_the_host() {
    let w = weights();
    let (mut gpu, mut host) = twins(&w);
    let same = sampling(0.9, 20, 1.0, 1.0, 7);
    // The first step samples both sequences with one setting (on the GPU for `gpu`), the
    // chained one with two.
    let mut g0 = [Sampler::new(same.clone(), 1), Sampler::new(same.clone(), 2)];
    let mut h0 = g0.clone();
    let mut gs = [
        Sampler::new(same.clone(), 3),
        Sampler::new(sampling(1.2, 0, 0.8, 1.0, 8), 4),
    ];
    let mut hs = gs.clone();
    let prompt = vec![1u32, 9, 4];
    let histories = [prompt.clone(), prompt.clone()];
    let (sg, sh) = (
        [gpu.add_sequence(), gpu.add_sequence()],
        [host.add_sequence(), host.add_sequence()],
    );
    let pending = gpu
        .submit_sample(&step(&sg, &histories), &mut choices(&mut g0, &histories))
        .unwrap();
    let host_first = host
        .forward_sample(&step(&sh, &histories), &mut choices(&mut h0, &histories))
        .unwrap();
    // Chained, in reversed order, with two settings.
    let chained = gpu
        .submit_sample_after(&pending, &[sg[1], sg[0]], &mut choices(&mut gs, &histories))
        .unwrap();
    assert_eq!(gpu.wait_step(pending).unwrap(), host_first);
    let fed = [vec![host_first[1]], vec![host_first[0]]];
    let host_next = host
        .forward_sample(
            &step(&[sh[1], sh[0]], &fed),
            &mut choices(&mut hs, &histories),
        )
        .unwrap();
    assert_eq!(gpu.wait_step(chained).unwrap(), host_next);
    let next = |s: &[Sampler]| s.iter().map(Sampler::upcoming_uniform).collect::<Vec<_>>();
    assert_eq!(next(&gs), next(&hs));
}
