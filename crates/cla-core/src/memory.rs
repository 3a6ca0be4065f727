//! Memory arithmetic: KV-cache bytes (paper section 2: 2 * n_kv_heads * d_head *
//! n_kv_layers * bytes per element, per token) and weight bytes.
//!
//! CLA shrinks the cache *footprint*: only producer layers store K/V. It does not shrink the
//! bytes read per decode step, because every consumer layer reads its producer's K/V again
//! ([`kv_bytes_read_per_decode_step`]).
//!
//! Totals over many tokens saturate at `u64::MAX` instead of overflowing: no real memory
//! comes near it, and a planner comparing against a budget stays correct.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::params::{ParamCount, ParamOptions};

/// KV-cache bytes per token for a model with `num_kv_heads` key/value heads of
/// `head_dim` in each of `num_producers` producer layers, stored as `dtype`.
pub const fn kv_bytes_per_token_for(
    num_kv_heads: usize,
    head_dim: usize,
    num_producers: usize,
    dtype: DType,
) -> u64 {
    2 * num_kv_heads as u64 * head_dim as u64 * num_producers as u64 * dtype.size_bytes() as u64
}

/// KV-cache bytes per token of `config` with the cache stored as `dtype`. Consumer layers
/// cost nothing.
pub fn kv_bytes_per_token(config: &ModelConfig, dtype: DType) -> u64 {
    kv_bytes_per_token_for(
        config.num_key_value_heads,
        config.head_dim,
        config.kv_sharing.num_producers(),
        dtype,
    )
}

/// KV-cache bytes of one producer layer per token (K and V).
pub fn kv_bytes_per_token_per_producer(config: &ModelConfig, dtype: DType) -> u64 {
    kv_bytes_per_token_for(config.num_key_value_heads, config.head_dim, 1, dtype)
}

/// KV-cache bytes of a batch of sequences of the given lengths (in tokens), the cache
/// stored as `dtype`. Saturates at `u64::MAX`.
pub fn kv_bytes_for_sequences(config: &ModelConfig, dtype: DType, lengths: &[u64]) -> u64 {
    let tokens = lengths.iter().fold(0u64, |acc, &l| acc.saturating_add(l));
    kv_bytes_per_token(config, dtype).saturating_mul(tokens)
}

/// KV-cache bytes of `batch` sequences of `context` tokens each. Saturates at `u64::MAX`.
pub fn kv_bytes_for_batch(config: &ModelConfig, dtype: DType, batch: u64, context: u64) -> u64 {
    kv_bytes_per_token(config, dtype)
        .saturating_mul(batch)
        .saturating_mul(context)
}

/// K/V bytes that one decode step of one sequence reads at `context` cached tokens: every
/// layer, producer or consumer, reads its producer's K/V once. Sharing does not lower it.
/// Saturates at `u64::MAX`.
pub fn kv_bytes_read_per_decode_step(config: &ModelConfig, dtype: DType, context: u64) -> u64 {
    kv_bytes_per_token_per_producer(config, dtype)
        .saturating_mul(config.num_layers() as u64)
        .saturating_mul(context)
}

/// Bytes of the weights of `config` stored as `dtype` (see [`ParamCount`]).
pub fn weight_bytes(config: &ModelConfig, dtype: DType, options: ParamOptions) -> u64 {
    ParamCount::of(config, options).bytes(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::KvSharing;

    /// 2 K/V heads of 4 dims, 3 layers, layers 0 and 2 produce.
    fn small() -> ModelConfig {
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
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            kv_sharing: KvSharing::from_sources("test", vec![0, 0, 2]).unwrap(),
        }
    }

    #[test]
    fn by_hand() {
        let c = small();
        // K and V: 2 * 2 heads * 4 dims = 16 elements per producer; 2 producers.
        assert_eq!(kv_bytes_per_token_per_producer(&c, DType::F16), 32);
        assert_eq!(kv_bytes_per_token(&c, DType::F16), 64);
        assert_eq!(kv_bytes_per_token(&c, DType::F32), 128);
        assert_eq!(kv_bytes_per_token(&c, DType::Int8), 32);
        assert_eq!(kv_bytes_for_sequences(&c, DType::F16, &[3, 5, 0]), 64 * 8);
        assert_eq!(kv_bytes_for_sequences(&c, DType::F16, &[]), 0);
        assert_eq!(kv_bytes_for_batch(&c, DType::F16, 4, 10), 64 * 40);
        // Three layers each read 32 bytes per cached token.
        assert_eq!(kv_bytes_read_per_decode_step(&c, DType::F16, 10), 960);
        // 2392 parameters (see params.rs) at 4 bytes.
        assert_eq!(weight_bytes(&c, DType::F32, ParamOptions::default()), 9568);
    }

    #[test]
    fn saturates() {
        let c = small();
        assert_eq!(
            kv_bytes_for_sequences(&c, DType::F32, &[u64::MAX, 1]),
            u64::MAX
        );
        assert_eq!(kv_bytes_for_batch(&c, DType::F32, u64::MAX, 2), u64::MAX);
    }
}
