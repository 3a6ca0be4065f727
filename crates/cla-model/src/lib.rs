//! `cla-model`: a Llama-style decoder with Cross-Layer Attention (Brandon et al. 2024,
//! "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention"), composed from
//! `cla-core` (configuration and the layer -> K/V-source map) and `cla-kv` (the paged KV
//! cache that stores keys and values for producer layers only).
//!
//! Code map:
//! - [`weights`]: the model directory format (config.json, safetensors, tokenizer.json),
//!   loading with shape/name checks, saving, and seeded random weights.
//! - [`tokenizer`]: text <-> ids with the model's BOS convention; streaming detokenisation.
//! - [`cpu`]: the CPU reference decoder, the whole model's math in one file (paper
//!   section 2: producers cache K/V, consumers attend over their producer's cache).
//! - [`ops`]: RMSNorm, RoPE, the linear layer, SiLU, softmax.
//! - [`decoder`]: the [`Decoder`] trait every backend implements: sequences in a paged
//!   cache and a batched forward step.
//! - [`sampling`], [`generate`](mod@generate): choosing tokens and batched generation with
//!   streaming (the streaming callback can stop it).
//! - [`perplexity`](mod@perplexity): sliding-window perplexity (the metric of the paper's
//!   Table 1).
//!
//! ```no_run
//! use cla_model::{CpuDecoder, GenerationConfig, LoadedModel, cache_config_for, generate};
//! use cla_kv::KvDType;
//! use std::ops::ControlFlow;
//!
//! let model = LoadedModel::load("models/stories260K")?;
//! let context = model.weights.config.max_position_embeddings;
//! let mut decoder = CpuDecoder::new(model.weights, cache_config_for(context, 1, KvDType::F32))?;
//! let out = generate(&mut decoder, &model.tokenizer, &["Once upon a time"],
//!                    &GenerationConfig::default(), &mut |ev| {
//!                        print!("{}", ev.text);
//!                        ControlFlow::Continue(()) // Break(()) would stop here
//!                    })?;
//! println!("\n{:?}", out[0].stop_reason);
//! # Ok::<(), cla_model::ModelError>(())
//! ```

pub mod cpu;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod ops;
pub mod perplexity;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use cpu::{CpuDecoder, CpuDecoderOptions, cache_config_for};
pub use decoder::{
    Decoder, LogitsWanted, PendingStep, SequenceCache, SequenceId, SequenceStep, TokenChoice,
    run_greedy_steps,
};
pub use error::{ModelError, Result};
pub use generate::{
    Generation, GenerationConfig, GenerationTimings, OnToken, StopReason, TokenEvent, generate,
    generate_ids,
};
pub use gpu::{GpuDecoder, GpuDecoderOptions, GpuKvStorage, GpuWeightDType, StepTiming};
pub use perplexity::{
    PerplexityConfig, PerplexityReport, Window, perplexity, perplexity_of_ids, plan_windows,
};
pub use rng::SplitMix64;
pub use sampling::{Sampler, SamplingConfig};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::{ModelWeights, RandomWeightsOptions, load_config};

use std::path::Path;
use std::sync::Arc;

/// A model directory loaded for inference: its weights (with the config) and tokenizer.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Config and f32 weights, shareable between decoders.
    pub weights: Arc<ModelWeights>,
    /// The tokenizer, checked against the embedding size.
    pub tokenizer: Tokenizer,
}

impl LoadedModel {
    /// Loads `config.json`, the safetensors weights and `tokenizer.json` of `dir`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let weights = ModelWeights::load(dir)?;
        let tokenizer = Tokenizer::from_model_dir(dir, &weights.config)?;
        Ok(Self {
            weights: Arc::new(weights),
            tokenizer,
        })
    }
}
