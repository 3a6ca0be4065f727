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

/// A layer's projections of its input to queries (and, for a producer, keys and values).
/// A producer's are stacked into as few matrices as its norms allow, so that one
/// matrix-vector dispatch computes them and `rope_append` reads them in place.
#[derive(Debug)]
pub(crate) enum Projection {
    /// A consumer: `[q_width, h]`.
    Q(GpuTensor),
    /// A producer whose K/V read the input norm's output, like its queries: Q, K and V
    /// stacked, `[q_width + 2 kv_width, h]`.
    Qkv(GpuTensor),
    /// A producer with its own K/V input norm: `q` `[q_width, h]`, and K over V in `kv`
    /// `[2 kv_width, h]`.
    QAndKv {
        q: GpuTensor,
        kv_norm: GpuTensor,
        kv: GpuTensor,
    },
}

impl Projection {
    /// The matrix that reads the input norm's output (whose shape decides fusing).
    pub(crate) fn first(&self) -> &GpuTensor {
        match self {
            Projection::Q(w) | Projection::Qkv(w) | Projection::QAndKv { q: w, .. } => w,
        }
    }
}

/// One decoder layer on the GPU.
#[derive(Debug)]
pub(crate) struct GpuLayer {
    pub(crate) input_norm: GpuTensor,
    pub(crate) proj: Projection,
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
        let bytes = std::cell::Cell::new(0u64);
        // Vectors (norm scales) stay f32; matrices take the chosen dtype.
        let upload = |values: &[f32], shape: &[usize]| -> Result<GpuTensor, GpuError> {
            let tensor = if shape.len() == 2 && dtype == GpuWeightDType::F16 {
                ctx.upload_f32_as_f16(values, shape)?
            } else {
                ctx.upload_f32(values, shape)?
            };
            bytes.set(bytes.get() + tensor.byte_len() as u64);
            Ok(tensor)
        };
        let checked = |t: Tensor, values: &[f32], shape: &[usize]| -> Result<(), GpuError> {
            if values.len() != shape.iter().product::<usize>() {
                return Err(GpuError::InvalidArgument(format!(
                    "weight {t:?}: {} values for shape {shape:?}",
                    values.len()
                )));
            }
            Ok(())
        };
        let put = |source: &mut dyn WeightSource,
                   t: Tensor,
                   shape: &[usize]|
         -> Result<Option<GpuTensor>, GpuError> {
            let Some(values) = source.tensor(t, shape.iter().product()) else {
                return Ok(None);
            };
            checked(t, &values, shape)?;
            upload(&values, shape).map(Some)
        };
        // Matrices of `width` columns and the given rows, stacked in order into one.
        let put_stacked = |source: &mut dyn WeightSource,
                           parts: &[(Tensor, usize)],
                           width: usize|
         -> Result<GpuTensor, GpuError> {
            let rows: usize = parts.iter().map(|p| p.1).sum();
            let mut stacked = Vec::with_capacity(rows * width);
            for &(t, part_rows) in parts {
                let shape = [part_rows, width];
                let values = source
                    .tensor(t, part_rows * width)
                    .ok_or_else(|| GpuError::InvalidArgument(format!("weight {t:?} is missing")))?;
                checked(t, &values, &shape)?;
                stacked.extend_from_slice(&values);
            }
            upload(&stacked, &[rows, width])
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
            let (qw, kvw) = (config.q_width(), config.kv_width());
            let proj = match (producer, kv_norm) {
                (false, _) => {
                    Projection::Q(need(Tensor::Q(l), put(source, Tensor::Q(l), &[qw, h])?)?)
                }
                (true, None) => {
                    let parts = [(Tensor::Q(l), qw), (Tensor::K(l), kvw), (Tensor::V(l), kvw)];
                    Projection::Qkv(put_stacked(source, &parts, h)?)
                }
                (true, Some(kv_norm)) => Projection::QAndKv {
                    q: need(Tensor::Q(l), put(source, Tensor::Q(l), &[qw, h])?)?,
                    kv_norm,
                    kv: put_stacked(source, &[(Tensor::K(l), kvw), (Tensor::V(l), kvw)], h)?,
                },
            };
            let req = |source: &mut dyn WeightSource, t: Tensor, shape: &[usize]| {
                need(t, put(source, t, shape)?)
            };
            layers.push(GpuLayer {
                input_norm: req(source, Tensor::InputNorm(l), &[h])?,
                proj,
                o_proj: req(source, Tensor::O(l), &[h, config.q_width()])?,
                post_attention_norm: req(source, Tensor::PostNorm(l), &[h])?,
                gate_proj: req(source, Tensor::Gate(l), &[config.intermediate_size, h])?,
                up_proj: req(source, Tensor::Up(l), &[config.intermediate_size, h])?,
                down_proj: req(source, Tensor::Down(l), &[h, config.intermediate_size])?,
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
            bytes: bytes.get(),
        })
    }
}
