//! Model weights in GPU buffers, uploaded once: from [`ModelWeights`], or filled from a fast
//! seeded generator without ever holding the whole model in host memory (benchmarks of
//! billion-parameter shapes).
//!
//! Matrices keep the `nn.Linear` layout `[out, in]`, which is what the linear kernel takes.
//! They are stored as f32, or as f16 when [`GpuWeightDType::F16`] is chosen (half the memory
//! and bandwidth; the kernels widen to f32 and accumulate in f32). Norm scales stay f32.

use crate::rng::SplitMix64;
use crate::weights::{ModelWeights, RandomWeightsOptions};
use cla_core::ModelConfig;
use cla_kernels_wgpu::{GpuContext, GpuError, GpuTensor};
use ndarray::{Array1, Array2};
use rayon::prelude::*;
use std::borrow::Cow;

/// Element type of the weight matrices on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuWeightDType {
    /// 32-bit floats: the same values as the CPU decoder (exact comparisons).
    #[default]
    F32,
    /// 16-bit floats, rounded to nearest on upload (embedding and LM head included).
    F16,
}

/// Which tensor a [`WeightSource`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tensor {
    Embed,
    FinalNorm,
    LmHead,
    InputNorm(usize),
    Q(usize),
    KvNorm(usize),
    K(usize),
    V(usize),
    O(usize),
    PostNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Tensor {
    /// A small number naming the tensor, for seeding.
    fn ordinal(self) -> u64 {
        let (layer, part) = match self {
            Tensor::Embed => return 0,
            Tensor::FinalNorm => return 1,
            Tensor::LmHead => return 2,
            Tensor::InputNorm(l) => (l, 0),
            Tensor::Q(l) => (l, 1),
            Tensor::KvNorm(l) => (l, 2),
            Tensor::K(l) => (l, 3),
            Tensor::V(l) => (l, 4),
            Tensor::O(l) => (l, 5),
            Tensor::PostNorm(l) => (l, 6),
            Tensor::Gate(l) => (l, 7),
            Tensor::Up(l) => (l, 8),
            Tensor::Down(l) => (l, 9),
        };
        16 + layer as u64 * 16 + part
    }
}

/// Where tensor values come from. `None` means the model has no such tensor (a tied LM head,
/// a missing `kv_input_layernorm`).
pub(crate) trait WeightSource {
    fn tensor(&mut self, t: Tensor, len: usize) -> Option<Cow<'_, [f32]>>;
}

fn matrix(a: &Array2<f32>) -> Cow<'_, [f32]> {
    a.as_slice()
        .map_or_else(|| Cow::Owned(a.iter().copied().collect()), Cow::Borrowed)
}

fn vector(a: &Array1<f32>) -> Cow<'_, [f32]> {
    a.as_slice()
        .map_or_else(|| Cow::Owned(a.iter().copied().collect()), Cow::Borrowed)
}

impl WeightSource for &ModelWeights {
    fn tensor(&mut self, t: Tensor, _len: usize) -> Option<Cow<'_, [f32]>> {
        let w: &ModelWeights = self;
        Some(match t {
            Tensor::Embed => matrix(&w.embed_tokens),
            Tensor::FinalNorm => vector(&w.final_norm),
            Tensor::LmHead => matrix(w.lm_head.as_ref()?),
            Tensor::InputNorm(l) => vector(&w.layers[l].input_norm),
            Tensor::Q(l) => matrix(&w.layers[l].q_proj),
            Tensor::KvNorm(l) => vector(w.layers[l].kv.as_ref()?.kv_norm.as_ref()?),
            Tensor::K(l) => matrix(&w.layers[l].kv.as_ref()?.k_proj),
            Tensor::V(l) => matrix(&w.layers[l].kv.as_ref()?.v_proj),
            Tensor::O(l) => matrix(&w.layers[l].o_proj),
            Tensor::PostNorm(l) => vector(&w.layers[l].post_attention_norm),
            Tensor::Gate(l) => matrix(&w.layers[l].gate_proj),
            Tensor::Up(l) => matrix(&w.layers[l].up_proj),
            Tensor::Down(l) => matrix(&w.layers[l].down_proj),
        })
    }
}

/// Seeded random values with the scales of [`ModelWeights::random_with`] (not the same
/// values): each tensor is filled in parallel chunks, each chunk from its own generator.
pub(crate) struct RandomSource {
    pub(crate) config: ModelConfig,
    pub(crate) options: RandomWeightsOptions,
}

/// Elements per generator chunk.
const CHUNK: usize = 1 << 16;

impl WeightSource for RandomSource {
    fn tensor(&mut self, t: Tensor, len: usize) -> Option<Cow<'_, [f32]>> {
        let c = &self.config;
        let fan = |n: usize| (3.0 / n as f32).sqrt();
        let (scale, offset) = match t {
            Tensor::Embed => (1.0, 0.0),
            Tensor::LmHead if c.tie_word_embeddings => return None,
            Tensor::KvNorm(_) if !self.options.kv_input_norm => return None,
            Tensor::FinalNorm | Tensor::InputNorm(_) | Tensor::PostNorm(_) | Tensor::KvNorm(_) => {
                (0.2, 1.0)
            }
            Tensor::LmHead | Tensor::Q(_) | Tensor::K(_) | Tensor::V(_) => {
                (fan(c.hidden_size), 0.0)
            }
            Tensor::Gate(_) | Tensor::Up(_) => (fan(c.hidden_size), 0.0),
            Tensor::O(_) => (fan(c.q_width()), 0.0),
            Tensor::Down(_) => (fan(c.intermediate_size), 0.0),
        };
        let seed = self
            .options
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(t.ordinal() << 32);
        let mut v = vec![0.0f32; len];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
            let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for x in chunk {
                *x = offset + scale * rng.next_symmetric_f32();
            }
        });
        Some(Cow::Owned(v))
    }
}

/// The K/V side of a producer layer.
#[derive(Debug)]
pub(crate) struct GpuKvProjection {
    pub(crate) kv_norm: Option<GpuTensor>,
    pub(crate) k_proj: GpuTensor,
    pub(crate) v_proj: GpuTensor,
}

/// One decoder layer on the GPU.
#[derive(Debug)]
pub(crate) struct GpuLayer {
    pub(crate) input_norm: GpuTensor,
    pub(crate) q_proj: GpuTensor,
    pub(crate) kv: Option<GpuKvProjection>,
    pub(crate) o_proj: GpuTensor,
    pub(crate) post_attention_norm: GpuTensor,
    pub(crate) gate_proj: GpuTensor,
    pub(crate) up_proj: GpuTensor,
    pub(crate) down_proj: GpuTensor,
}

/// Every weight of a model on the GPU.
#[derive(Debug)]
pub(crate) struct GpuWeights {
    pub(crate) embed_tokens: GpuTensor,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) final_norm: GpuTensor,
    /// `None` when tied to the embedding.
    pub(crate) lm_head: Option<GpuTensor>,
    /// Bytes of all weight buffers.
    pub(crate) bytes: u64,
}

impl GpuWeights {
    pub(crate) fn lm_head(&self) -> &GpuTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Uploads every tensor of `config` from `source`, one at a time.
    pub(crate) fn upload(
        ctx: &GpuContext,
        config: &ModelConfig,
        dtype: GpuWeightDType,
        source: &mut dyn WeightSource,
    ) -> Result<Self, GpuError> {
        let h = config.hidden_size;
        let mut bytes = 0u64;
        let mut put = |source: &mut dyn WeightSource,
                       t: Tensor,
                       shape: &[usize]|
         -> Result<Option<GpuTensor>, GpuError> {
            let len = shape.iter().product();
            let Some(values) = source.tensor(t, len) else {
                return Ok(None);
            };
            if values.len() != len {
                return Err(GpuError::InvalidArgument(format!(
                    "weight {t:?}: {} values for shape {shape:?}",
                    values.len()
                )));
            }
            let tensor = if shape.len() == 2 && dtype == GpuWeightDType::F16 {
                ctx.upload_f32_as_f16(&values, shape)?
            } else {
                ctx.upload_f32(&values, shape)?
            };
            bytes += tensor.byte_len() as u64;
            Ok(Some(tensor))
        };
        let need = |t: Tensor, found: Option<GpuTensor>| {
            found.ok_or_else(|| GpuError::InvalidArgument(format!("weight {t:?} is missing")))
        };
        let embed_tokens = need(
            Tensor::Embed,
            put(source, Tensor::Embed, &[config.vocab_size, h])?,
        )?;
        let final_norm = need(Tensor::FinalNorm, put(source, Tensor::FinalNorm, &[h])?)?;
        let mut layers = Vec::with_capacity(config.num_layers());
        for l in 0..config.num_layers() {
            let producer = config.kv_sharing.is_producer(l);
            let kv_norm = if producer {
                put(source, Tensor::KvNorm(l), &[h])?
            } else {
                None
            };
            let mut req = |t: Tensor, shape: &[usize]| need(t, put(source, t, shape)?);
            let kv = if producer {
                Some(GpuKvProjection {
                    kv_norm,
                    k_proj: req(Tensor::K(l), &[config.kv_width(), h])?,
                    v_proj: req(Tensor::V(l), &[config.kv_width(), h])?,
                })
            } else {
                None
            };
            layers.push(GpuLayer {
                input_norm: req(Tensor::InputNorm(l), &[h])?,
                q_proj: req(Tensor::Q(l), &[config.q_width(), h])?,
                kv,
                o_proj: req(Tensor::O(l), &[h, config.q_width()])?,
                post_attention_norm: req(Tensor::PostNorm(l), &[h])?,
                gate_proj: req(Tensor::Gate(l), &[config.intermediate_size, h])?,
                up_proj: req(Tensor::Up(l), &[config.intermediate_size, h])?,
                down_proj: req(Tensor::Down(l), &[h, config.intermediate_size])?,
            });
        }
        // A tensor present despite `tie_word_embeddings` wins, as on the CPU.
        let lm_head = put(source, Tensor::LmHead, &[config.vocab_size, h])?;
        if lm_head.is_none() && !config.tie_word_embeddings {
            return Err(GpuError::InvalidArgument("weight LmHead is missing".into()));
        }
        Ok(Self {
            embed_tokens,
            layers,
            final_norm,
            lm_head,
            bytes,
        })
    }
}
