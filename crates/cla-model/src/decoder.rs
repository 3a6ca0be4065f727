//! The backend-neutral interface of a CLA decoder: sequences that live in a paged KV cache
//! and a batched forward step over them.
//!
//! [`crate::cpu::CpuDecoder`] is the reference implementation; a GPU backend implements the
//! same trait, so generation ([`crate::generate`](mod@crate::generate)) and evaluation
//! ([`crate::perplexity`](mod@crate::perplexity)) run unchanged on either and can be checked
//! against each other.
//!
//! What the two backends share lives here too, so that each keeps only what differs (the
//! forward pass): the sequence methods come from [`SequenceCache`], which every `cla-kv`
//! [`PagedKvCache`] implements whatever its storage, and a forward step checks its batch,
//! reserves the new positions, and commits them all or drops them all with the same helpers.

use crate::error::{ModelError, Result};
use crate::sampling::Sampler;
use cla_core::ModelConfig;
use cla_kv::{KvStorage, PagedKvCache};
use ndarray::Array2;
use std::collections::HashSet;
use std::ops::Range;

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

/// How [`Decoder::forward_sample`] picks one step's token: the sequence's sampler (its
/// settings and its random stream) and the tokens so far, prompt and generated (for the
/// repetition penalty).
#[derive(Debug)]
pub struct TokenChoice<'a> {
    /// The sampler; its stream advances by the number the token was drawn with.
    pub sampler: &'a mut Sampler,
    /// Prompt and generated tokens of the sequence.
    pub history: &'a [u32],
}

/// Where a decoder's sequences live: adding, forking, truncating and freeing them, and what
/// they hold. Implemented for every `cla-kv` [`PagedKvCache`], whatever its storage, so a
/// backend whose sequences live there hands its cache to [`Decoder::sequences`] and gets the
/// sequence methods of [`Decoder`] from it.
///
/// An id the cache does not know is [`ModelError::UnknownSequence`]; every other refusal is
/// the cache's own ([`ModelError::Cache`]), and leaves it unchanged.
pub trait SequenceCache {
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
}

impl<S: KvStorage> SequenceCache for PagedKvCache<S> {
    fn add_sequence(&mut self) -> SequenceId {
        PagedKvCache::add_sequence(self)
    }

    fn free_sequence(&mut self, seq: SequenceId) -> Result<()> {
        check_known(self, seq)?;
        Ok(self.free(seq)?)
    }

    fn fork_sequence(&mut self, seq: SequenceId) -> Result<SequenceId> {
        check_known(self, seq)?;
        Ok(self.fork(seq)?)
    }

    fn truncate_sequence(&mut self, seq: SequenceId, n: usize) -> Result<()> {
        check_known(self, seq)?;
        Ok(self.truncate(seq, n)?)
    }

    fn sequence_len(&self, seq: SequenceId) -> Result<usize> {
        check_known(self, seq)?;
        Ok(self.seq_len(seq)?)
    }

    fn sequence_kv_bytes(&self, seq: SequenceId) -> Result<u64> {
        check_known(self, seq)?;
        Ok(self.sequence_reserved_bytes(seq)?)
    }

    fn kv_bytes_in_use(&self) -> u64 {
        self.memory().reserved_bytes
    }

    fn free_kv_tokens(&self) -> usize {
        self.free_tokens()
    }
}

fn check_known<S: KvStorage>(cache: &PagedKvCache<S>, seq: SequenceId) -> Result<()> {
    if cache.contains(seq) {
        Ok(())
    } else {
        Err(ModelError::UnknownSequence(seq))
    }
}

/// A decoder over a paged KV cache. Every method that changes state either succeeds or
/// leaves the decoder as it was.
///
/// A backend provides [`Self::config`], its [`SequenceCache`] and the forward pass; the
/// sequence methods default to the cache's.
pub trait Decoder {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// The sequences and their KV cache.
    fn sequences(&self) -> &dyn SequenceCache;

    /// The sequences and their KV cache, to change them.
    fn sequences_mut(&mut self) -> &mut dyn SequenceCache;

    /// Starts an empty sequence.
    fn add_sequence(&mut self) -> SequenceId {
        self.sequences_mut().add_sequence()
    }

    /// Releases a sequence and its cache blocks.
    fn free_sequence(&mut self, seq: SequenceId) -> Result<()> {
        self.sequences_mut().free_sequence(seq)
    }

    /// A copy of `seq` sharing its cached prefix (copy-on-write blocks).
    fn fork_sequence(&mut self, seq: SequenceId) -> Result<SequenceId> {
        self.sequences_mut().fork_sequence(seq)
    }

    /// Drops the last `n` positions of `seq`.
    fn truncate_sequence(&mut self, seq: SequenceId, n: usize) -> Result<()> {
        self.sequences_mut().truncate_sequence(seq, n)
    }

    /// Positions `seq` holds.
    fn sequence_len(&self, seq: SequenceId) -> Result<usize> {
        self.sequences().sequence_len(seq)
    }

    /// KV-cache bytes of the blocks `seq` holds (`blocks * block_size * bytes per token`).
    fn sequence_kv_bytes(&self, seq: SequenceId) -> Result<u64> {
        self.sequences().sequence_kv_bytes(seq)
    }

    /// KV-cache bytes held by all sequences together (shared blocks once).
    fn kv_bytes_in_use(&self) -> u64 {
        self.sequences().kv_bytes_in_use()
    }

    /// Positions that still fit in the cache as new blocks.
    fn free_kv_tokens(&self) -> usize {
        self.sequences().free_kv_tokens()
    }

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

    /// Starts [`Self::forward_greedy`] on `batch`; [`Self::wait_step`] returns its ids. A
    /// backend that reports [`Self::pipelines_steps`] returns before the step has run, so
    /// that the host can prepare the next step (see [`Self::submit_greedy_after`]) while the
    /// device works. The cache changes as with `forward_greedy`, at once.
    fn submit_greedy(&mut self, batch: &[SequenceStep<'_>]) -> Result<PendingStep> {
        let ids = self.forward_greedy(batch)?;
        Ok(PendingStep::new(batch, PendingState::Ready(ids)))
    }

    /// Starts a one-token greedy step for each of `seqs` (each one a sequence of `prev`, in
    /// any order) whose token is the one `prev` chose for it, without waiting for `prev`'s ids
    /// where the backend pipelines. The generation loop uses it to keep the device busy: if a
    /// sequence turns out to have stopped at `prev`'s token, it drops the step's position with
    /// [`Self::truncate_sequence`].
    fn submit_greedy_after(
        &mut self,
        prev: &PendingStep,
        seqs: &[SequenceId],
    ) -> Result<PendingStep> {
        default_submit_after(self, prev, seqs, |d, steps| d.submit_greedy(steps))
    }

    /// [`Self::submit_greedy`] for any token choice: starts [`Self::forward_sample`] on
    /// `batch`, each sequence's sampler moving past its draw at once.
    fn submit_sample(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<PendingStep> {
        let ids = self.forward_sample(batch, choices)?;
        Ok(PendingStep::new(batch, PendingState::Ready(ids)))
    }

    /// [`Self::submit_greedy_after`] for any token choice: `choices[i]` picks the token of
    /// `seqs[i]`. Its repetition penalty must be 1 (off): the history the penalty needs would
    /// have to hold `prev`'s token, which is not known yet.
    fn submit_sample_after(
        &mut self,
        prev: &PendingStep,
        seqs: &[SequenceId],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<PendingStep> {
        check_chained_choices(seqs, choices)?;
        default_submit_after(self, prev, seqs, |d, steps| d.submit_sample(steps, choices))
    }

    /// The ids of a step from the `submit_*` methods, per sequence in its order
    /// ([`PendingStep::sequences`]); waits for the device if needed. The step's positions
    /// were committed at submission: after an error here (a device failure) free or truncate
    /// its sequences.
    fn wait_step(&mut self, step: PendingStep) -> Result<Vec<u32>> {
        step.into_ids()
    }

    /// Whether the `submit_*` methods return before the step has run. Where they do not,
    /// a step submitted ahead of knowing whether it is needed costs its full time, so the
    /// generation loop submits ahead only when this is true.
    fn pipelines_steps(&self) -> bool {
        false
    }

    /// Runs the batch and returns, per step, the token `choices[i]` picks from the logits of
    /// step `i`'s last new position: exactly [`Sampler::sample`] on those logits, its stream
    /// advanced the same way. This default reads the logits back and samples on the host;
    /// the GPU backend overrides it to pick the tokens where the logits are. `step.logits`
    /// is ignored. On error no sequence has changed.
    fn forward_sample(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<Vec<u32>> {
        check_choices(batch, choices)?;
        let logits = self.forward(batch)?;
        Ok(sample_on_host(&logits, choices))
    }
}

/// Runs `steps` greedy decode steps for `seqs`, starting from one token per sequence
/// (`first`, in the order of `seqs`) and feeding each step the tokens the one before chose,
/// as `generate` does: where the backend pipelines, each step is submitted before the
/// previous one's tokens are read back ([`Decoder::submit_greedy_after`]). Before every step
/// after the first, `keep_going` may stop the run. Returns the number of steps run, and
/// leaves every one of them in the cache. For benchmarks: the tokens are not kept.
pub fn run_greedy_steps(
    decoder: &mut dyn Decoder,
    seqs: &[SequenceId],
    first: &[u32],
    steps: usize,
    mut keep_going: impl FnMut() -> bool,
) -> Result<usize> {
    if seqs.len() != first.len() {
        return Err(ModelError::invalid(
            "first tokens",
            format!("{} given for {} sequences", first.len(), seqs.len()),
        ));
    }
    if steps == 0 {
        return Ok(0);
    }
    let batch: Vec<SequenceStep<'_>> = seqs
        .iter()
        .zip(first)
        .map(|(&s, t)| SequenceStep::last(s, std::slice::from_ref(t)))
        .collect();
    let mut pending = decoder.submit_greedy(&batch)?;
    let mut ran = 1;
    while ran < steps && keep_going() {
        let ahead = decoder.submit_greedy_after(&pending, seqs)?;
        decoder.wait_step(pending)?;
        pending = ahead;
        ran += 1;
    }
    decoder.wait_step(pending)?;
    Ok(ran)
}

/// A step handed to a backend whose token ids may not be known yet (see
/// [`Decoder::submit_greedy`] and [`Decoder::submit_sample`]): [`Decoder::wait_step`] gives
/// them, and the `submit_*_after` methods can feed them to the next step without waiting.
#[derive(Debug)]
pub struct PendingStep {
    /// The sequences of the step, in batch order (the order of the ids).
    seqs: Vec<SequenceId>,
    state: PendingState,
}

#[derive(Debug)]
pub(crate) enum PendingState {
    /// The ids are known (a backend that runs each step before returning).
    Ready(Vec<u32>),
    /// Submitted to the GPU; the ids arrive with the read-back.
    Gpu(crate::gpu::InFlight),
}

impl PendingStep {
    /// The pending step of `batch` (its sequences, in order) in `state`.
    pub(crate) fn new(batch: &[SequenceStep<'_>], state: PendingState) -> Self {
        Self {
            seqs: batch.iter().map(|s| s.seq).collect(),
            state,
        }
    }

    /// The sequences of the step, in the order of its ids.
    pub fn sequences(&self) -> &[SequenceId] {
        &self.seqs
    }

    pub(crate) fn state(&self) -> &PendingState {
        &self.state
    }

    /// The row of `seq` in the step, or a typed error when the step did not run it.
    pub(crate) fn row_of(&self, seq: SequenceId) -> Result<usize> {
        self.seqs.iter().position(|&s| s == seq).ok_or_else(|| {
            ModelError::invalid(
                "seqs",
                format!("sequence {seq:?} was not part of the step whose tokens it should take"),
            )
        })
    }

    /// The ids, waiting for the GPU where the step is still running.
    pub(crate) fn into_ids(self) -> Result<Vec<u32>> {
        match self.state {
            PendingState::Ready(ids) => Ok(ids),
            PendingState::Gpu(f) => f.wait(),
        }
    }

    pub(crate) fn into_state(self) -> PendingState {
        self.state
    }
}

/// The chained `submit_*_after` methods for a step whose ids are known on the host: feeds
/// them as ordinary tokens to `submit`.
pub(crate) fn default_submit_after<D: Decoder + ?Sized>(
    decoder: &mut D,
    prev: &PendingStep,
    seqs: &[SequenceId],
    submit: impl FnOnce(&mut D, &[SequenceStep<'_>]) -> Result<PendingStep>,
) -> Result<PendingStep> {
    let PendingState::Ready(ids) = prev.state() else {
        return Err(ModelError::invalid(
            "prev",
            "the step is still running on a device this decoder cannot read from",
        ));
    };
    let tokens = seqs
        .iter()
        .map(|&s| Ok([ids[prev.row_of(s)?]]))
        .collect::<Result<Vec<[u32; 1]>>>()?;
    let steps: Vec<_> = seqs
        .iter()
        .zip(&tokens)
        .map(|(&s, t)| SequenceStep::last(s, t))
        .collect();
    submit(decoder, &steps)
}

/// Checks the choices of a chained sampled step: one per sequence, no repetition penalty.
pub(crate) fn check_chained_choices(
    seqs: &[SequenceId],
    choices: &[TokenChoice<'_>],
) -> Result<()> {
    if seqs.len() != choices.len() {
        return Err(ModelError::invalid(
            "choices",
            format!(
                "{} token choices for {} sequences; give one per sequence",
                choices.len(),
                seqs.len()
            ),
        ));
    }
    if choices
        .iter()
        .any(|c| c.sampler.config().repetition_penalty != 1.0)
    {
        return Err(ModelError::invalid(
            "choices",
            "a step chained to one still running cannot apply a repetition penalty (its \
             history would need the token that step chooses); submit it after waiting",
        ));
    }
    Ok(())
}

/// Checks that a batch and its token choices pair up.
pub(crate) fn check_choices(batch: &[SequenceStep<'_>], choices: &[TokenChoice<'_>]) -> Result<()> {
    if batch.len() == choices.len() {
        Ok(())
    } else {
        Err(ModelError::invalid(
            "choices",
            format!(
                "{} token choices for a batch of {} steps",
                choices.len(),
                batch.len()
            ),
        ))
    }
}

/// [`Sampler::sample`] on the last row of each step's logits.
pub(crate) fn sample_on_host(logits: &[Array2<f32>], choices: &mut [TokenChoice<'_>]) -> Vec<u32> {
    logits
        .iter()
        .zip(choices)
        .map(|(l, c)| {
            let row = l.row(l.nrows() - 1);
            match row.as_slice() {
                Some(values) => c.sampler.sample(values, c.history),
                None => c.sampler.sample(&row.to_vec(), c.history),
            }
        })
        .collect()
}

// ----- the forward protocol every backend over a PagedKvCache follows -----------------------

/// Checks a batch before anything is changed: known, distinct sequences, non-empty steps,
/// token ids inside the vocabulary, and room in the model's context.
pub(crate) fn validate_batch(
    config: &ModelConfig,
    sequences: &dyn SequenceCache,
    batch: &[SequenceStep<'_>],
) -> Result<()> {
    let mut seen = HashSet::new();
    for step in batch {
        let len = sequences.sequence_len(step.seq)?;
        if !seen.insert(step.seq) {
            return Err(ModelError::DuplicateSequence(step.seq));
        }
        if step.tokens.is_empty() {
            return Err(ModelError::invalid(
                "tokens",
                format!("the step of sequence {} has no tokens", step.seq),
            ));
        }
        if let Some(&bad) = step
            .tokens
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(ModelError::TokenOutOfRange {
                token: bad,
                vocab: config.vocab_size,
            });
        }
        let needed = len + step.tokens.len();
        if needed > config.max_position_embeddings {
            return Err(ModelError::ContextExceeded {
                seq: step.seq,
                needed,
                context: config.max_position_embeddings,
            });
        }
    }
    Ok(())
}

/// Reserves the new positions of every step of a validated batch and returns them, in batch
/// order. If one does not fit, the reservations already made are dropped: nothing changed.
pub(crate) fn reserve_batch<S: KvStorage>(
    cache: &mut PagedKvCache<S>,
    batch: &[SequenceStep<'_>],
) -> Result<Vec<Range<usize>>> {
    let mut reserved = Vec::with_capacity(batch.len());
    for (i, step) in batch.iter().enumerate() {
        match cache.reserve(step.seq, step.tokens.len()) {
            Ok(r) => reserved.push(r),
            Err(e) => {
                for earlier in &batch[..i] {
                    cache.abort(earlier.seq)?;
                }
                return Err(e.into());
            }
        }
    }
    Ok(reserved)
}

/// Ends the reservations of [`reserve_batch`]: commits every step when the forward pass
/// succeeded, drops them all when it failed (so that no sequence has changed). Returns the
/// pass's outcome, or the cache's refusal to commit.
pub(crate) fn end_batch<S: KvStorage, T>(
    cache: &mut PagedKvCache<S>,
    batch: &[SequenceStep<'_>],
    outcome: Result<T>,
) -> Result<T> {
    // Every sequence is ended even if one of them fails (a reservation left open would make
    // the sequence's next step fail); the first failure is returned.
    match outcome {
        Ok(out) => {
            let mut failed = None;
            for step in batch {
                if let Err(e) = cache.commit(step.seq) {
                    failed.get_or_insert(e);
                }
            }
            match failed {
                Some(e) => Err(e.into()),
                None => Ok(out),
            }
        }
        Err(e) => {
            for step in batch {
                // The step's own error says more than a failed abort would.
                let _ = cache.abort(step.seq);
            }
            Err(e)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use cla_core::SharingPattern;
    use cla_kv::{KvCacheConfig, KvDType, KvError, KvShape};

    /// Two producer slots (CLA2 over 4 layers), one kv head of 2 dims, blocks of 2 tokens.
    fn cache(num_blocks: usize) -> PagedKvCache {
        let sharing = SharingPattern::Cla(2).build(4).unwrap();
        let shape = KvShape::new(1, 2, sharing).unwrap();
        PagedKvCache::new(
            shape,
            KvCacheConfig::new(num_blocks, KvDType::F32).with_block_size(2),
        )
        .unwrap()
    }

    /// Appends `n` tokens to `seq` directly through the cache.
    fn append(cache: &mut PagedKvCache, seq: SequenceId, n: usize) {
        cache.reserve(seq, n).unwrap();
        write_all(cache, seq, n);
        cache.commit(seq).unwrap();
    }

    fn write_all(cache: &mut PagedKvCache, seq: SequenceId, n: usize) {
        for layer in [0, 2] {
            cache
                .write(seq, layer, &vec![1.0; 2 * n], &vec![2.0; 2 * n])
                .unwrap();
        }
    }

    fn config(context: usize) -> ModelConfig {
        let json = format!(
            r#"{{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 10,
                "max_position_embeddings": {context}, "kv_source_layers": [0, 0, 2, 2]}}"#
        );
        ModelConfig::from_json_str(&json, "test config").unwrap()
    }

    #[test]
    fn a_paged_cache_answers_the_sequence_methods() {
        let mut cache = cache(8);
        let s: &mut dyn SequenceCache = &mut cache;
        let a = s.add_sequence();
        assert_eq!(s.sequence_len(a).unwrap(), 0);
        assert_eq!(s.kv_bytes_in_use(), 0);
        assert_eq!(s.free_kv_tokens(), 16);
        append(&mut cache, a, 3);
        let s: &mut dyn SequenceCache = &mut cache;
        // 2 blocks x 2 tokens x (2 slots x K and V x 2 dims x 4 bytes).
        assert_eq!(s.sequence_kv_bytes(a).unwrap(), 2 * 2 * 32);
        assert_eq!(s.kv_bytes_in_use(), 128);
        assert_eq!(s.free_kv_tokens(), 12);
        let b = s.fork_sequence(a).unwrap();
        assert_eq!(s.sequence_len(b).unwrap(), 3);
        assert_eq!(s.kv_bytes_in_use(), 128, "a fork shares the blocks");
        s.truncate_sequence(b, 2).unwrap();
        assert_eq!(s.sequence_len(b).unwrap(), 1);
        assert!(matches!(
            s.truncate_sequence(b, 2),
            Err(ModelError::Cache(KvError::TruncateTooLong { .. }))
        ));
        s.free_sequence(b).unwrap();
        // An id the cache does not know is the decoder's error, not the cache's.
        let unknown = |r: Result<()>| matches!(r, Err(ModelError::UnknownSequence(x)) if x == b);
        assert!(unknown(s.free_sequence(b)));
        assert!(unknown(s.fork_sequence(b).map(drop)));
        assert!(unknown(s.truncate_sequence(b, 0)));
        assert!(unknown(s.sequence_len(b).map(drop)));
        assert!(unknown(s.sequence_kv_bytes(b).map(drop)));
        assert_eq!(s.sequence_len(a).unwrap(), 3);
        assert_eq!(s.kv_bytes_in_use(), 128);
    }

    #[test]
    fn a_batch_that_does_not_fit_reserves_nothing() {
        let mut cache = cache(2);
        let (a, b) = (cache.add_sequence(), cache.add_sequence());
        let before = cache.clone();
        let tokens = [1, 2, 3];
        let batch = [
            SequenceStep::last(a, &tokens[..2]),
            SequenceStep::last(b, &tokens),
        ];
        assert!(matches!(
            reserve_batch(&mut cache, &batch),
            Err(ModelError::Cache(KvError::CacheFull { .. }))
        ));
        assert!(cache == before, "the first step's reservation was dropped");
    }

    #[test]
    fn a_batch_is_committed_whole_or_dropped_whole() {
        let mut cache = cache(4);
        let (a, b) = (cache.add_sequence(), cache.add_sequence());
        append(&mut cache, a, 1);
        let before = cache.clone();
        let batch = [SequenceStep::last(a, &[1, 2]), SequenceStep::last(b, &[3])];
        assert_eq!(reserve_batch(&mut cache, &batch).unwrap(), vec![1..3, 0..1]);
        let failed: Result<()> = Err(ModelError::EmptyPrompt);
        assert!(matches!(
            end_batch(&mut cache, &batch, failed),
            Err(ModelError::EmptyPrompt)
        ));
        // As before, but for the order of the free list.
        for seq in [a, b] {
            assert_eq!(cache.seq_len(seq), before.seq_len(seq));
            assert_eq!(cache.pending_len(seq).unwrap(), 0);
            assert_eq!(cache.block_table(seq), before.block_table(seq));
        }
        assert_eq!(cache.memory(), before.memory());

        reserve_batch(&mut cache, &batch).unwrap();
        write_all(&mut cache, a, 2);
        write_all(&mut cache, b, 1);
        assert_eq!(end_batch(&mut cache, &batch, Ok(7)).unwrap(), 7);
        assert_eq!(
            (cache.seq_len(a).unwrap(), cache.seq_len(b).unwrap()),
            (3, 1)
        );
        assert_eq!(cache.pending_len(a).unwrap(), 0);
    }

    #[test]
    fn bad_batches_are_refused_before_anything_changes() {
        let mut cache = cache(8);
        let (a, b) = (cache.add_sequence(), cache.add_sequence());
        append(&mut cache, a, 3);
        cache.free(b).unwrap();
        let c = config(4);
        let check = |batch: &[SequenceStep<'_>]| validate_batch(&c, &cache, batch);
        assert!(check(&[SequenceStep::last(a, &[1])]).is_ok());
        assert!(matches!(
            check(&[SequenceStep::last(b, &[1])]),
            Err(ModelError::UnknownSequence(x)) if x == b
        ));
        assert!(matches!(
            check(&[SequenceStep::last(a, &[1]), SequenceStep::last(a, &[1])]),
            Err(ModelError::DuplicateSequence(x)) if x == a
        ));
        assert!(matches!(
            check(&[SequenceStep::last(a, &[])]),
            Err(ModelError::InvalidArgument { .. })
        ));
        assert!(matches!(
            check(&[SequenceStep::last(a, &[10])]),
            Err(ModelError::TokenOutOfRange {
                token: 10,
                vocab: 10
            })
        ));
        assert!(matches!(
            check(&[SequenceStep::last(a, &[1, 2])]),
            Err(ModelError::ContextExceeded {
                needed: 5,
                context: 4,
                ..
            })
        ));
    }

    /// A commit that fails for one step still ends the others' reservations, and the
    /// failure is returned.
    #[test]
    fn a_failed_commit_leaves_no_other_reservation_open() {
        let mut cache = cache(8);
        let (a, b) = (cache.add_sequence(), cache.add_sequence());
        for seq in [a, b] {
            cache.reserve(seq, 1).unwrap();
            write_all(&mut cache, seq, 1);
        }
        // `a`'s reservation ends early, so committing it again fails.
        cache.commit(a).unwrap();
        let tokens = [7u32];
        let batch = [
            SequenceStep::last(a, &tokens),
            SequenceStep::last(b, &tokens),
        ];
        let r = end_batch(&mut cache, &batch, Ok(()));
        assert!(matches!(r, Err(ModelError::Cache(_))), "{r:?}");
        assert_eq!(cache.sequence_len(b).unwrap(), 1, "b was committed");
        // No reservation is left open: `b` takes a new step.
        append(&mut cache, b, 1);
        assert_eq!(cache.sequence_len(b).unwrap(), 2);
    }
}
