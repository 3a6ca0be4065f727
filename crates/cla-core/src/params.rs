//! Parameter counts of a CLA model (paper section 2: a consumer layer has no K and V
//! projections, so CLA also removes parameters, though few compared with the MLPs).
//!
//! The model is a Llama-style decoder without biases. Per layer:
//!
//! | weight | shape | layers |
//! |---|---|---|
//! | `q_proj` | `hidden_size x (num_attention_heads * head_dim)` | all |
//! | `o_proj` | `(num_attention_heads * head_dim) x hidden_size` | all |
//! | `k_proj`, `v_proj` | `hidden_size x (num_key_value_heads * head_dim)` | producers |
//! | `gate_proj`, `up_proj`, `down_proj` | `hidden_size x intermediate_size` | all |
//! | `input_layernorm`, `post_attention_layernorm` | `hidden_size` | all |
//! | `kv_input_layernorm` (optional) | `hidden_size` | producers |
//!
//! plus the token embedding (`vocab_size x hidden_size`), the final norm (`hidden_size`)
//! and the LM head (`vocab_size x hidden_size`, absent when tied to the embedding).
//! The paper's CLA models give the norm that feeds K/V its own scale in producer layers
//! (`kv_input_layernorm`); whether a checkpoint has it is not recorded in `config.json`,
//! so it is an option here.

use crate::config::ModelConfig;
use crate::dtype::DType;

/// Choices that change the parameter count but that `config.json` does not record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ParamOptions {
    /// Each producer layer has a separate RMSNorm scale (`hidden_size` parameters) on the
    /// input of its K/V projections, as in the paper's CLA models.
    pub kv_input_layernorm: bool,
}

/// Parameter counts of a model, by part. All counts are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamCount {
    /// Token embedding: `vocab_size * hidden_size`.
    pub embedding: u64,
    /// LM head: `vocab_size * hidden_size`, or 0 when tied to the embedding.
    pub lm_head: u64,
    /// Q and O projections of every layer.
    pub attention_qo: u64,
    /// K and V projections of the producer layers (consumers have none).
    pub attention_kv: u64,
    /// Gate, up and down projections of every layer.
    pub mlp: u64,
    /// RMSNorm scales: two per layer, the final norm, and the optional K/V input norms.
    pub norms: u64,
}

impl ParamCount {
    /// Counts the parameters of `config`.
    ///
    /// Exact for every config that passes [`ModelConfig::validate`]: its bounds keep every
    /// term far inside `u64`.
    pub fn of(config: &ModelConfig, options: ParamOptions) -> Self {
        let hidden = config.hidden_size as u64;
        let layers = config.num_layers() as u64;
        let producers = config.kv_sharing.num_producers() as u64;
        let vocab = config.vocab_size as u64;
        let embedding = vocab * hidden;
        let kv_norms = if options.kv_input_layernorm {
            producers * hidden
        } else {
            0
        };
        ParamCount {
            embedding,
            lm_head: if config.tie_word_embeddings {
                0
            } else {
                embedding
            },
            attention_qo: layers * 2 * hidden * config.q_width() as u64,
            attention_kv: producers * 2 * hidden * config.kv_width() as u64,
            mlp: layers * 3 * hidden * config.intermediate_size as u64,
            norms: layers * 2 * hidden + hidden + kv_norms,
        }
    }

    /// All parameters.
    pub fn total(&self) -> u64 {
        self.embedding + self.lm_head + self.non_embedding()
    }

    /// Parameters outside the embedding and the LM head.
    pub fn non_embedding(&self) -> u64 {
        self.attention_qo + self.attention_kv + self.mlp + self.norms
    }

    /// Weights of the matrix multiplications of one token's forward pass: every projection
    /// and the LM head (which multiplies even when tied); not the embedding lookup nor the
    /// norms.
    pub fn matmul(&self) -> u64 {
        self.attention_qo + self.attention_kv + self.mlp + self.embedding
    }

    /// Bytes of all parameters stored as `dtype` (scales of quantised types not counted).
    pub fn bytes(&self, dtype: DType) -> u64 {
        self.total() * dtype.size_bytes() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::KvSharing;

    /// hidden 8, intermediate 16, 4 query heads of 4 (q width 16), 2 K/V heads (kv width 8),
    /// vocab 10, 3 layers with layer 1 reading layer 0 (producers 0 and 2).
    fn small(tied: bool) -> ModelConfig {
        ModelConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            vocab_size: 10,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: tied,
            bos_token_id: None,
            eos_token_ids: vec![],
            kv_sharing: KvSharing::from_sources("test", vec![0, 0, 2]).unwrap(),
        }
    }

    #[test]
    fn small_model_by_hand() {
        // embedding 10*8 = 80; head 80 (untied)
        // q+o: 3 layers * 2 * 8*16 = 768
        // k+v: 2 producers * 2 * 8*8 = 256
        // mlp: 3 layers * 3 * 8*16 = 1152
        // norms: 3 layers * 2 * 8 + final 8 = 56
        // total 80 + 80 + 768 + 256 + 1152 + 56 = 2392
        let c = small(false);
        let p = ParamCount::of(&c, ParamOptions::default());
        assert_eq!(
            p,
            ParamCount {
                embedding: 80,
                lm_head: 80,
                attention_qo: 768,
                attention_kv: 256,
                mlp: 1152,
                norms: 56,
            }
        );
        assert_eq!(p.total(), 2392);
        assert_eq!(p.non_embedding(), 2232);
        assert_eq!(p.bytes(DType::BF16), 4784);
        // Tied: no head (2312); the K/V input norms add 2 producers * 8 = 16.
        let tied = ParamCount::of(&small(true), ParamOptions::default());
        assert_eq!(tied.total(), 2312);
        assert_eq!(tied.matmul(), 80 + 768 + 256 + 1152);
        let kv_norm = ParamCount::of(
            &small(true),
            ParamOptions {
                kv_input_layernorm: true,
            },
        );
        assert_eq!(kv_norm.total(), 2328);
        // Without sharing all three layers have K/V: + 1 * 2 * 8*8 = 128.
        let mut dense = small(false);
        dense.kv_sharing = KvSharing::all_producers(3);
        assert_eq!(
            ParamCount::of(&dense, ParamOptions::default()).total(),
            2392 + 128
        );
    }
}
