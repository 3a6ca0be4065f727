//! How many sequences, and how long, fit in a memory budget: the gain CLA is for (paper
//! section 1: a smaller cache serves larger batches or longer contexts in the same memory).
//!
//! The model is deliberately simple and explicit:
//!
//! ```text
//! KV budget   = budget - weight bytes               (0 if the weights do not fit)
//! max batch   = floor(KV budget / (KV bytes per token * context))
//! max context = floor(KV budget / (KV bytes per token * batch))
//! ```
//!
//! Activations, workspace buffers, allocator fragmentation and a paged cache's partly
//! filled last block are **not** counted; leave headroom in the budget for them. The
//! context is the total number of cached tokens of one sequence (prompt plus generated)
//! and is not capped at the model's `max_position_embeddings`.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{ConfigError, Result};
use crate::memory::{kv_bytes_per_token, weight_bytes};
use crate::params::ParamOptions;

/// A memory budget split into weights and KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryPlanner {
    /// The whole budget, in bytes.
    pub budget_bytes: u64,
    /// Bytes taken by the weights.
    pub weight_bytes: u64,
    /// KV-cache bytes per token of the model.
    pub kv_bytes_per_token: u64,
}

impl MemoryPlanner {
    /// A planner for `config` with weights and cache both stored as `dtype`.
    pub fn for_model(
        config: &ModelConfig,
        dtype: DType,
        options: ParamOptions,
        budget_bytes: u64,
    ) -> Self {
        MemoryPlanner {
            budget_bytes,
            weight_bytes: weight_bytes(config, dtype, options),
            kv_bytes_per_token: kv_bytes_per_token(config, dtype),
        }
    }

    /// Whether the weights alone fit in the budget.
    pub fn weights_fit(&self) -> bool {
        self.weight_bytes <= self.budget_bytes
    }

    /// Bytes left for the KV cache: `budget - weights`, or 0 if the weights do not fit.
    pub fn kv_budget_bytes(&self) -> u64 {
        self.budget_bytes.saturating_sub(self.weight_bytes)
    }

    /// Whether `batch` sequences of `context` tokens fit.
    pub fn fits(&self, batch: u64, context: u64) -> bool {
        match self
            .kv_bytes_per_token
            .checked_mul(batch)
            .and_then(|b| b.checked_mul(context))
        {
            Some(bytes) => self.weights_fit() && bytes <= self.kv_budget_bytes(),
            None => false,
        }
    }

    /// The largest number of sequences of `context` tokens whose cache fits (0 if not one).
    /// `context` must be at least 1 (error [`ConfigError::Zero`] naming `context`).
    pub fn max_batch(&self, context: u64) -> Result<u64> {
        self.max_other("context", context)
    }

    /// The longest context (tokens per sequence) at which `batch` sequences fit (0 if not
    /// one token). `batch` must be at least 1 (error [`ConfigError::Zero`] naming `batch`).
    pub fn max_context(&self, batch: u64) -> Result<u64> {
        self.max_other("batch", batch)
    }

    /// `floor(kv budget / (per token * given))`, the same formula for both questions.
    fn max_other(&self, key: &str, given: u64) -> Result<u64> {
        if given == 0 {
            return Err(ConfigError::Zero { key: key.into() });
        }
        if !self.weights_fit() {
            return Ok(0);
        }
        let per_unit = u128::from(self.kv_bytes_per_token) * u128::from(given);
        if per_unit == 0 {
            return Ok(u64::MAX);
        }
        let n = u128::from(self.kv_budget_bytes()) / per_unit;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(budget: u64, weights: u64, per_token: u64) -> MemoryPlanner {
        MemoryPlanner {
            budget_bytes: budget,
            weight_bytes: weights,
            kv_bytes_per_token: per_token,
        }
    }

    #[test]
    fn by_hand() {
        // 1000 bytes, 100 of weights: 900 for the cache at 10 bytes per token.
        let p = planner(1000, 100, 10);
        assert_eq!(p.kv_budget_bytes(), 900);
        // 900 / (10 * 7) = 12.86 -> 12 sequences of 7 tokens.
        assert_eq!(p.max_batch(7), Ok(12));
        assert!(p.fits(12, 7) && !p.fits(13, 7));
        // 900 / (10 * 4) = 22.5 -> 22 tokens for 4 sequences.
        assert_eq!(p.max_context(4), Ok(22));
        assert!(p.fits(4, 22) && !p.fits(4, 23));
        assert_eq!(p.max_batch(91), Ok(0));
        assert_eq!(
            p.max_batch(0),
            Err(ConfigError::Zero {
                key: "context".into()
            })
        );
        assert_eq!(
            p.max_context(0),
            Err(ConfigError::Zero {
                key: "batch".into()
            })
        );
    }

    #[test]
    fn weights_do_not_fit() {
        let p = planner(100, 101, 1);
        assert_eq!(p.kv_budget_bytes(), 0);
        assert_eq!(p.max_batch(1), Ok(0));
        assert!(!p.fits(0, 0));
    }

    #[test]
    fn plugging_back() {
        for (budget, weights, per_token) in [(80u64 << 30, 2_600_000_000, 5120), (7, 0, 3)] {
            let p = planner(budget, weights, per_token);
            for given in [1u64, 2, 3, 1000, 32768] {
                let b = p.max_batch(given).unwrap();
                assert!(p.fits(b, given));
                assert!(!p.fits(b + 1, given));
                let c = p.max_context(given).unwrap();
                assert!(p.fits(given, c));
                assert!(!p.fits(given, c + 1));
            }
        }
    }
}
