//! Helpers shared by the integration tests: a deliberately naive reference forward pass,
//! small random configs, and a tiny word-level tokenizer.

#![allow(dead_code)]

pub mod naive;
pub mod stories260k;

use cla_core::{KvSharing, ModelConfig};
use cla_kernels_wgpu::{DeviceSelector, GpuContext};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// One wgpu device for the whole test binary (pipelines are built once): the adapter
/// `CLA_DEVICE` names, else the best one, the software one allowed.
pub fn gpu_ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(|| {
        let sel = DeviceSelector::from_env()
            .expect("CLA_DEVICE / CLA_GPU_DISABLE")
            .allow_cpu(true);
        Arc::new(GpuContext::new(&sel).unwrap_or_else(|e| {
            panic!(
                "the GPU tests need a wgpu adapter: {e}\n\
                 (apt-get install mesa-vulkan-drivers libvulkan1 gives a software one)"
            )
        }))
    }))
}

/// A small config with the given sharing map (`sources[i]` = the layer whose K/V layer `i`
/// reads).
pub fn small_config(
    sources: Vec<usize>,
    hidden: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tie: bool,
) -> ModelConfig {
    let config = ModelConfig {
        hidden_size: hidden,
        intermediate_size: hidden + 10,
        num_attention_heads: q_heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: tie,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        kv_sharing: KvSharing::from_sources("test", sources).expect("a valid map"),
    };
    config.validate().expect("a valid config");
    config
}

/// A fresh, empty directory under the system's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    // Unique per call: tests of one binary run in parallel and may ask for the same name.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("cla-model-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Writes a word-level `tokenizer.json` whose vocabulary is `<unk>`, `<s>`, `</s>` and then
/// `w3`, `w4`, ... up to `size` entries; words are split on whitespace; the post-processor
/// adds `<s>`.
pub fn write_word_tokenizer(path: &Path, size: usize) {
    let mut vocab = serde_json::Map::new();
    for (i, special) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(special.to_string(), i.into());
    }
    for i in 3..size {
        vocab.insert(format!("w{i}"), i.into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Maximum absolute difference of two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
