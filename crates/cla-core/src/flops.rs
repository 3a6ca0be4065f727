//! Forward-pass FLOPs of a CLA model.
//!
//! One token's forward pass at context `c` (the token attends to `c` positions, itself
//! included) costs, counting a multiply-add as 2 FLOPs:
//!
//! ```text
//! matmul    = 2 * (q, o, k, v, gate, up, down projection weights + vocab_size * hidden_size)
//! attention = num_layers * 4 * num_attention_heads * head_dim * c
//! ```
//!
//! The matmul term is "2 x parameters" without the embedding lookup and the norms, but with
//! the LM head even when it is tied ([`ParamCount::matmul`]). The attention term is
//! `QK^T` (`2 * head_dim * c` per query head) plus `AV` (the same) in **every** layer:
//! a consumer layer reuses an earlier layer's keys and values but still attends with its
//! own queries, so CLA removes the K/V projections' FLOPs, not attention's (paper
//! section 2). Softmax, norms, RoPE and activations are not counted.

use crate::config::ModelConfig;
use crate::params::{ParamCount, ParamOptions};

/// FLOPs of a forward pass, split into weight matmuls and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlopCount {
    /// `2 * weights` of every projection and the LM head, per token.
    pub matmul: u128,
    /// `QK^T` and `AV`, which grow with the context.
    pub attention: u128,
}

impl FlopCount {
    /// `matmul + attention`.
    pub fn total(&self) -> u128 {
        self.matmul + self.attention
    }
}

/// FLOPs of one token attending to `context` positions (a decode step at that length).
pub fn forward_flops_per_token(config: &ModelConfig, context: u64) -> FlopCount {
    FlopCount {
        matmul: matmul_flops_per_token(config),
        attention: attention_flops_per_position(config) * u128::from(context),
    }
}

/// FLOPs of a prefill of `prompt_len` tokens with causal attention: token `p` (0-based)
/// attends to `p + 1` positions, so the attention term sums to `n (n + 1) / 2` positions.
pub fn prefill_flops(config: &ModelConfig, prompt_len: u64) -> FlopCount {
    let n = u128::from(prompt_len);
    FlopCount {
        matmul: matmul_flops_per_token(config) * n,
        attention: attention_flops_per_position(config) * (n * (n + 1) / 2),
    }
}

fn matmul_flops_per_token(config: &ModelConfig) -> u128 {
    // The optional K/V input norm adds no matmul weights.
    2 * u128::from(ParamCount::of(config, ParamOptions::default()).matmul())
}

/// FLOPs of attending to one more position, summed over layers.
fn attention_flops_per_position(config: &ModelConfig) -> u128 {
    4 * config.num_layers() as u128 * config.q_width() as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::KvSharing;

    #[test]
    fn small_model_by_hand() {
        // hidden 8, q width 16, kv width 8, intermediate 16, vocab 10, 3 layers, 2 producers.
        // matmul weights: q+o 768, k+v 256, mlp 1152, head 80 = 2256 -> 4512 FLOPs.
        // attention per position: 3 layers * 4 * 16 = 192.
        let c = ModelConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            vocab_size: 10,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            kv_sharing: KvSharing::from_sources("test", vec![0, 0, 2]).unwrap(),
        };
        let f = forward_flops_per_token(&c, 10);
        assert_eq!(f.matmul, 4512);
        assert_eq!(f.attention, 1920);
        assert_eq!(f.total(), 6432);
        // Prefill of 4: 4 * 4512 matmul; attention over 1+2+3+4 = 10 positions.
        let p = prefill_flops(&c, 4);
        assert_eq!(p.matmul, 4 * 4512);
        assert_eq!(p.attention, 1920);
        // Consumers still attend: sharing changes only the K/V projection FLOPs.
        let mut dense = c.clone();
        dense.kv_sharing = KvSharing::all_producers(3);
        let d = forward_flops_per_token(&dense, 10);
        assert_eq!(d.attention, f.attention);
        assert_eq!(d.matmul - f.matmul, 2 * 128);
    }
}
