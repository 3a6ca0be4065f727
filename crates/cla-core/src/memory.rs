//! Memory arithmetic: KV-cache bytes (paper section 2: 2 * n_kv_heads * d_head *
//! n_kv_layers * bytes per element, per token).

use crate::config::ModelConfig;
use crate::dtype::DType;

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
