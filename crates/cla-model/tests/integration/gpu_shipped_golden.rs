//! The models shipped in the repository (`models/small-mqa-cla2`, `models/small-mqa`) against
//! the golden outputs PyTorch computed for them (`golden.safetensors`: `input_ids` and f32
//! `logits`; `golden.json`: a greedy continuation), on both backends: the CPU decoder and the
//! GPU decoder must each reproduce the PyTorch logits within 1e-3 (max abs) and the greedy
//! tokens exactly (all of them teacher-forced, the first few free-running).

use crate::common;

use cla_kv::KvDType;
use cla_model::{
    CpuDecoder, Decoder, GenerationConfig, GpuDecoder, LoadedModel, SamplingConfig, SequenceStep,
    cache_config_for, generate_ids,
};
use common::gpu_ctx;
use serde_json::Value;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

const TOL: f32 = 1e-3;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
}

struct Golden {
    input_ids: Vec<u32>,
    /// `[positions, vocab]`, row-major.
    logits: Vec<f32>,
    vocab: usize,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn golden(name: &str) -> Golden {
    let dir = model_dir(name);
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let input = st.tensor("input_ids").expect("input_ids");
    assert_eq!(input.dtype(), safetensors::Dtype::I64);
    let input_ids = input
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect::<Vec<_>>();
    let logits = st.tensor("logits").expect("logits");
    assert_eq!(logits.dtype(), safetensors::Dtype::F32);
    let shape = logits.shape().to_vec();
    assert_eq!(shape[0], input_ids.len());
    let values = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    assert_eq!(ids(&json["input_ids"]), input_ids);
    Golden {
        input_ids,
        logits: values,
        vocab: shape[1],
        prompt_ids: ids(&json["greedy_prompt_ids"]),
        new_ids: ids(&json["greedy_new_ids"]),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Steps of the decode-path check and of free-running greedy generation (the software
/// Vulkan device takes seconds per step of these models).
const DECODE_STEPS: usize = 4;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of every position in one prefill; the last positions again through decode steps;
/// the greedy continuation teacher-forced in one step (every argmax must be the golden
/// token) and its first tokens free-running through `generate_ids`.
fn check(name: &str, decoder: &mut dyn Decoder, backend: &str) {
    let g = golden(name);
    let v = g.vocab;
    let seq = decoder.add_sequence();
    let all = decoder
        .forward(&[SequenceStep::all(seq, &g.input_ids)])
        .unwrap()
        .remove(0);
    let diff = max_abs_diff(all.as_slice().unwrap(), &g.logits);
    assert!(
        diff < TOL,
        "{name} on {backend}: prefill logits differ from PyTorch by {diff}"
    );
    decoder.free_sequence(seq).unwrap();

    let seq = decoder.add_sequence();
    let split = g.input_ids.len() - DECODE_STEPS;
    let head = decoder
        .forward(&[SequenceStep::all(seq, &g.input_ids[..split])])
        .unwrap()
        .remove(0);
    let diff = max_abs_diff(head.as_slice().unwrap(), &g.logits[..split * v]);
    assert!(
        diff < TOL,
        "{name} on {backend}: partial prefill differs by {diff}"
    );
    for p in split..g.input_ids.len() {
        let t = g.input_ids[p];
        let row = decoder
            .forward(&[SequenceStep::last(seq, &[t])])
            .unwrap()
            .remove(0);
        let diff = max_abs_diff(row.as_slice().unwrap(), &g.logits[p * v..(p + 1) * v]);
        assert!(
            diff < TOL,
            "{name} on {backend}: decode position {p} differs by {diff}"
        );
    }
    decoder.free_sequence(seq).unwrap();

    let mut full = g.prompt_ids.clone();
    full.extend_from_slice(&g.new_ids[..g.new_ids.len() - 1]);
    let seq = decoder.add_sequence();
    let logits = decoder
        .forward(&[SequenceStep::all(seq, &full)])
        .unwrap()
        .remove(0);
    decoder.free_sequence(seq).unwrap();
    let start = g.prompt_ids.len() - 1;
    for (k, &want) in g.new_ids.iter().enumerate() {
        let got = argmax(logits.row(start + k).as_slice().unwrap());
        assert_eq!(
            got, want,
            "{name} on {backend}: teacher-forced greedy step {k}"
        );
    }

    let config = GenerationConfig {
        max_new_tokens: DECODE_STEPS,
        sampling: SamplingConfig::greedy(),
        stop_at_eos: false,
        ..GenerationConfig::default()
    };
    let out = generate_ids(
        decoder,
        None,
        std::slice::from_ref(&g.prompt_ids),
        &config,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(
        out[0].ids,
        g.new_ids[..DECODE_STEPS],
        "{name} on {backend}: greedy continuation"
    );
}

fn run_both(name: &str) {
    let model = LoadedModel::load(model_dir(name)).unwrap();
    let context = model.weights.config.max_position_embeddings;
    let cache = cache_config_for(context, 2, KvDType::F32);
    let mut cpu = CpuDecoder::new(Arc::clone(&model.weights), cache).unwrap();
    check(name, &mut cpu, "cpu");
    let mut gpu = GpuDecoder::new(gpu_ctx(), &model.weights, cache).unwrap();
    check(name, &mut gpu, "gpu");

    // Greedy ids picked on the GPU, one batched step per token.
    let g = golden(name);
    let seq = gpu.add_sequence();
    let mut feed = g.prompt_ids.clone();
    let mut got = Vec::new();
    for _ in 0..DECODE_STEPS {
        let id = gpu
            .forward_greedy(&[SequenceStep::last(seq, &feed)])
            .unwrap()[0];
        got.push(id);
        feed = vec![id];
    }
    assert_eq!(
        got,
        g.new_ids[..DECODE_STEPS],
        "{name}: forward_greedy continuation"
    );
}

#[test]
fn small_mqa_cla2_matches_pytorch_on_cpu_and_gpu() {
    run_both("small-mqa-cla2");
}

#[test]
fn small_mqa_matches_pytorch_on_cpu_and_gpu() {
    run_both("small-mqa");
}
