//! The backend-neutral interface of a CLA decoder: sequences that live in a paged KV cache
//! and a batched forward step over them.
//!
//! [`crate::cpu::CpuDecoder`] is the reference implementation; a GPU backend implements the
//! same trait, so generation ([`crate::generate`]) and evaluation ([`crate::perplexity`])
//! run unchanged on either and can be checked against each other.

use crate::error::Result;
use cla_core::ModelConfig;
use ndarray::Array2;

pub use cla_kv::SequenceId;

/// Which positions of a step need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsWanted {
    /// Only the last new position (generation). Lets the decoder skip work: when every
    /// layer after the last producer is a consumer, those layers run for this position only.
    #[default]
    Last,
    /// Every new position (teacher forcing, perplexity).
    All,
}

/// One sequence's part of a batched step: `tokens` are appended after what the sequence
/// already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceStep<'a> {
    /// The sequence.
    pub seq: SequenceId,
    /// New tokens (a whole prompt for prefill, one token for decode). Must not be empty.
    pub tokens: &'a [u32],
    /// Which of the new positions need logits.
    pub logits: LogitsWanted,
}

impl<'a> SequenceStep<'a> {
    /// A step that returns the logits of the last new position.
    pub fn last(seq: SequenceId, tokens: &'a [u32]) -> Self {
        Self {
            seq,
            tokens,
            logits: LogitsWanted::Last,
        }
    }

    /// A step that returns the logits of every new position.
    pub fn all(seq: SequenceId, tokens: &'a [u32]) -> Self {
        Self {
            seq,
            tokens,
            logits: LogitsWanted::All,
        }
    }
}

/// A decoder over a paged KV cache. Every method that changes state either succeeds or
/// leaves the decoder as it was.
pub trait Decoder {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Starts an empty sequence.
    fn add_sequence(&mut self) -> SequenceId;

    /// Releases a sequence and its cache blocks.
    fn free_sequence(&mut self, seq: SequenceId) -> Result<()>;

    /// A copy of `seq` sharing its cached prefix (copy-on-write blocks).
    fn fork_sequence(&mut self, seq: SequenceId) -> Result<SequenceId>;

    /// Drops the last `n` positions of `seq`.
    fn truncate_sequence(&mut self, seq: SequenceId, n: usize) -> Result<()>;

    /// Positions `seq` holds.
    fn sequence_len(&self, seq: SequenceId) -> Result<usize>;

    /// KV-cache bytes of the blocks `seq` holds (`blocks * block_size * bytes per token`).
    fn sequence_kv_bytes(&self, seq: SequenceId) -> Result<u64>;

    /// KV-cache bytes held by all sequences together (shared blocks once).
    fn kv_bytes_in_use(&self) -> u64;

    /// Positions that still fit in the cache as new blocks.
    fn free_kv_tokens(&self) -> usize;

    /// Runs the new tokens of every step through the model in one batch, appending their
    /// keys and values to the cache. Returns, per step in order, the logits
    /// `[positions, vocab]`: one row for [`LogitsWanted::Last`], one per new token for
    /// [`LogitsWanted::All`]. On error no sequence has changed.
    fn forward(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<Array2<f32>>>;

    /// Runs the batch and returns, per step, the greedy token (argmax, lowest id on ties)
    /// of its last new position. Backends that can choose the token where the logits are
    /// (the GPU) override this so that only token ids travel back.
    fn forward_greedy(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<u32>> {
        let logits = self.forward(batch)?;
        Ok(logits
            .iter()
            .map(|l| argmax_lowest(l.row(l.nrows() - 1).iter().copied()))
            .collect())
    }
}

/// Index of the largest value, the lowest index on ties; NaNs never win.
pub(crate) fn argmax_lowest(values: impl Iterator<Item = f32>) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in values.enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}
