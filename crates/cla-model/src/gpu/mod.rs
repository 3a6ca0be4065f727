//! The GPU decoder: the model of [`crate::cpu`] run on the WGSL kernels of
//! `cla-kernels-wgpu`, behind the same [`Decoder`] trait, so generation, perplexity and
//! batching work unchanged on either backend and can be checked against each other.
//!
//! - Weights are uploaded once ([`GpuWeightDType`]: f32, or f16 matrices).
//! - The KV cache is `cla-kv`'s [`PagedKvCache`] over a [`GpuKvStorage`]: the allocator,
//!   block tables, reservations and accounting are the CPU decoder's; only the pool lives in
//!   GPU buffers, one per `(producer slot, K|V)` plane, laid out as [`cla_kv::KvLayout`]
//!   says. A producer layer appends its keys and values to its slot with `kv_append`; a
//!   consumer layer runs attention over its producer's slot (`KvSharing::slot_of`).
//! - A forward pass of the whole batch (every sequence, every layer, the LM head, and when
//!   the tokens are chosen on the GPU the repetition penalty and the argmax or sampling
//!   kernel, see `sampling.rs`) is recorded into one command encoder and submitted once,
//!   with the read-back of the logits (or token ids) in the same submission.
//! - Prompts go through `attention_prefill`; a step where every sequence brings one token
//!   uses `attention_decode`. A batch mixes sequences of any lengths.
//! - When every layer after the last producer is a consumer, those layers run only for the
//!   positions whose logits are wanted (as the CPU decoder does); before the final norm the
//!   rows are reduced the same way in any case.

mod sampling;
use sampling::SampleInputs;
mod storage;
mod weights;

pub use storage::GpuKvStorage;
pub use weights::GpuWeightDType;

use crate::decoder::{
    Decoder, LogitsWanted, PendingState, PendingStep, SequenceCache, SequenceId, SequenceStep,
    TokenChoice, check_chained_choices, default_submit_after, end_batch, reserve_batch,
    validate_batch,
};
use crate::error::{ModelError, Result};
use crate::weights::{ModelWeights, RandomWeightsOptions};
use cla_core::ModelConfig;
use cla_kernels_wgpu::ops::kv_append::QkvRows;
use cla_kernels_wgpu::ops::matmul::ProjInput;
use cla_kernels_wgpu::{
    DType, GpuContext, GpuError, GpuTensor, ReusableBuffer, SeqBatch, SeqBatchBuffers, SeqDesc,
};
use cla_kv::{KvCacheConfig, KvLayout, KvShape, PagedKvCache};
use ndarray::Array2;
use std::fmt;
use std::sync::Arc;
use weights::{GpuLayer, GpuWeights, Projection, RandomSource, WeightSource};

/// Switches of [`GpuDecoder`]. The defaults are exact f32 and the consumer-tail skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuDecoderOptions {
    /// Element type of the weight matrices on the GPU.
    pub weight_dtype: GpuWeightDType,
    /// Run the layers after the last producer only for the positions whose logits are
    /// wanted (see [`crate::cpu::CpuDecoderOptions::skip_consumer_tail`]).
    pub skip_consumer_tail: bool,
    /// Submit a step's recorded work every this many layers, so that the GPU starts on the
    /// first layers while the host records the rest; 0 (the default): the whole step is one
    /// command encoder and one submission. On the H200 (1B-class preset and the shipped small
    /// model, f32 weights, two runs each) every 4 layers against one submission: batch 1
    /// +3-24% (977M) and +16-120% (small model; batch 1 is noisy), batch 32 +10-15% and
    /// +31-33%; every 2 layers was no better than every 4.
    pub submit_every_layers: usize,
}

impl Default for GpuDecoderOptions {
    fn default() -> Self {
        Self {
            weight_dtype: GpuWeightDType::F32,
            skip_consumer_tail: true,
            submit_every_layers: 0,
        }
    }
}

/// A GPU error as this crate's error.
pub(crate) fn gpu_error(e: GpuError) -> ModelError {
    ModelError::Gpu(e)
}

/// The buffers a step's small inputs are written into (token ids, positions, the batch's
/// block tables; for the kept rows too), kept from step to step so that a decode step creates
/// no buffers and finds the bind groups of the step before (the uploads reach the buffers
/// after the running step is done with them: queue order).
#[derive(Default)]
struct StepInputs {
    ids: ReusableBuffer,
    pos: ReusableBuffer,
    batch: SeqBatchBuffers,
    kept_rows: ReusableBuffer,
    kept_pos: ReusableBuffer,
    kept_batch: SeqBatchBuffers,
    sampling: SampleInputs,
}

/// Activation buffers, grown to the largest number of rows a step has needed; each step
/// takes views of the exact shapes it uses.
struct Workspace {
    rows: usize,
    x: GpuTensor,
    x_kept: GpuTensor,
    h: GpuTensor,
    hk: GpuTensor,
    q: GpuTensor,
    /// A producer's projection rows: [Q | K | V], or Q alone when K/V have their own norm.
    qkv: GpuTensor,
    /// K and V rows of a producer with its own K/V norm.
    kv: GpuTensor,
    attn: GpuTensor,
    tmp: GpuTensor,
    gate: GpuTensor,
    up: GpuTensor,
    act: GpuTensor,
}

impl Workspace {
    fn new(ctx: &GpuContext, c: &ModelConfig, rows: usize) -> Result<Self, GpuError> {
        let t = |width: usize, label: &str| ctx.create_tensor(&[rows, width], DType::F32, label);
        let (hid, inter) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            rows,
            x: t(hid, "x")?,
            x_kept: t(hid, "x kept")?,
            h: t(hid, "normed")?,
            hk: t(hid, "kv normed")?,
            q: t(c.q_width(), "q")?,
            qkv: t(c.q_width() + 2 * c.kv_width(), "qkv")?,
            kv: t(2 * c.kv_width(), "kv")?,
            attn: t(c.q_width(), "attention")?,
            tmp: t(hid, "projection")?,
            gate: t(inter, "gate")?,
            up: t(inter, "up")?,
            act: t(inter, "swiglu")?,
        })
    }
}

/// `t`'s buffer seen with another shape (no copy; the buffer may be larger).
fn view(t: &GpuTensor, shape: &[usize]) -> GpuTensor {
    GpuTensor {
        buffer: t.buffer.clone(),
        shape: shape.to_vec(),
        dtype: t.dtype,
    }
}

/// What a forward pass reads back.
#[derive(Clone, Copy)]
enum Readback<'a> {
    /// The logits of the wanted positions.
    Logits,
    /// The argmax of each step's last position only.
    Greedy,
    /// The token each step's last position samples (see `sampling.rs`).
    Sample(&'a sampling::GpuSampling),
}

enum Output {
    Logits(Vec<Array2<f32>>),
    Ids(Vec<u32>),
    /// Greedy ids still on their way (a pipelined step).
    Pending(InFlight),
}

/// Where a step's input tokens come from when they are the ids an earlier step chose on the
/// GPU: that step's ids buffer, and the row of it each step of the batch takes.
struct Feed {
    ids: GpuTensor,
    rows: Vec<u32>,
}

impl Feed {
    /// The feed of a step that gives each of `seqs` the token `prev` chose for it, or `None`
    /// when `prev`'s ids are not on the GPU (known on the host, or an empty step).
    fn after(prev: &PendingStep, seqs: &[SequenceId]) -> Result<Option<Feed>> {
        let PendingState::Gpu(InFlight { ids: Some(ids), .. }) = prev.state() else {
            return Ok(None);
        };
        let rows = seqs
            .iter()
            .map(|&s| prev.row_of(s).map(|r| r as u32))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Feed {
            ids: ids.clone(),
            rows,
        }))
    }
}

/// One-token steps for `seqs` whose tokens come from a [`Feed`] (the steps only say how many).
fn fed_steps(seqs: &[SequenceId]) -> Vec<SequenceStep<'static>> {
    const PLACEHOLDER: [u32; 1] = [0];
    seqs.iter()
        .map(|&s| SequenceStep::last(s, &PLACEHOLDER))
        .collect()
}

/// A submitted step whose read-back has not arrived yet: the mappable copy of its result,
/// and (for greedy steps) the GPU buffer of the chosen ids, which a next step can read
/// without waiting.
pub(crate) struct InFlight {
    ctx: Arc<GpuContext>,
    staging: wgpu::Buffer,
    index: wgpu::SubmissionIndex,
    done: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    bytes: u64,
    ids: Option<GpuTensor>,
    started: std::time::Instant,
    submitted: std::time::Instant,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    /// Waits for the read-back; returns its bytes and where the host's time went.
    fn wait_bytes(self) -> Result<(Vec<u8>, StepTiming), GpuError> {
        self.ctx
            .device()
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.index),
                timeout: None,
            })
            .map_err(|e| GpuError::Device(e.to_string()))?;
        self.ctx.take_errors()?;
        self.done
            .recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let data = self
            .staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .to_vec();
        self.staging.unmap();
        let timing = StepTiming {
            record_s: (self.submitted - self.started).as_secs_f64(),
            wait_s: self.submitted.elapsed().as_secs_f64(),
        };
        Ok((data[..self.bytes as usize].to_vec(), timing))
    }

    /// The token ids of a greedy step.
    pub(crate) fn wait(self) -> Result<Vec<u32>> {
        Ok(self.wait_timed()?.0)
    }

    /// The token ids of a greedy step, and where the host's time went.
    fn wait_timed(self) -> Result<(Vec<u32>, StepTiming)> {
        let (bytes, timing) = self.wait_bytes().map_err(gpu_error)?;
        Ok((bytemuck::pod_collect_to_vec(&bytes), timing))
    }
}

/// The rows a layer runs on: hidden states, their positions, and the batch description
/// (query rows per sequence, block tables, append slots).
struct Rows<'a> {
    x: GpuTensor,
    n: usize,
    pos: &'a GpuTensor,
    batch: &'a SeqBatch,
}

/// Where the host's time went in the last forward pass: recording it (from the call until its
/// one submission) and waiting for it (from the submission until the read-back is in host
/// memory: the GPU's work, the fence and the copy). With `submit_every_layers` the GPU starts
/// before `record_s` ends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTiming {
    /// Seconds from the call to the submission of the step's last commands.
    pub record_s: f64,
    /// Seconds from that submission until the read-back arrived.
    pub wait_s: f64,
}

/// The GPU implementation of [`Decoder`].
pub struct GpuDecoder {
    ctx: Arc<GpuContext>,
    config: ModelConfig,
    weights: GpuWeights,
    inv_freq: GpuTensor,
    cache: PagedKvCache<GpuKvStorage>,
    options: GpuDecoderOptions,
    work: Option<Workspace>,
    /// Logits buffer of the last step, reused while the row count stays the same.
    logits: Option<GpuTensor>,
    /// Token ids chosen on the GPU in the last step, reused like `logits`.
    next_ids: Option<GpuTensor>,
    /// Bind groups of the steps' dispatches. They keep their buffers alive, so the cache is
    /// cleared before `work` or `logits` is replaced.
    bind_groups: Arc<cla_kernels_wgpu::BindGroupCache>,
    /// Buffers of each step's small inputs, written anew every step.
    inputs: StepInputs,
    /// Host time of the last forward pass.
    timing: StepTiming,
}

impl fmt::Debug for GpuDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuDecoder")
            .field("adapter", &self.ctx.info().name)
            .field("options", &self.options)
            .field("weight_bytes", &self.weights.bytes)
            .field("cache", self.cache.storage())
            .finish_non_exhaustive()
    }
}

impl GpuDecoder {
    /// Uploads `weights` to the device of `ctx`, with a KV pool sized by `cache`.
    pub fn new(ctx: Arc<GpuContext>, weights: &ModelWeights, cache: KvCacheConfig) -> Result<Self> {
        Self::with_options(ctx, weights, cache, GpuDecoderOptions::default())
    }

    /// [`GpuDecoder::new`] with explicit [`GpuDecoderOptions`].
    pub fn with_options(
        ctx: Arc<GpuContext>,
        weights: &ModelWeights,
        cache: KvCacheConfig,
        options: GpuDecoderOptions,
    ) -> Result<Self> {
        let mut source = weights;
        Self::build(ctx, &weights.config, &mut source, cache, options)
    }

    /// A decoder with seeded random weights generated straight into GPU buffers, one tensor
    /// at a time (a billion-parameter model never sits in host memory whole). The scales are
    /// those of [`ModelWeights::random_with`], the values are not: for benchmarks, not for
    /// comparisons with a CPU decoder.
    pub fn with_random_weights(
        ctx: Arc<GpuContext>,
        config: &ModelConfig,
        random: &RandomWeightsOptions,
        cache: KvCacheConfig,
        options: GpuDecoderOptions,
    ) -> Result<Self> {
        config.validate()?;
        let mut source = RandomSource {
            config: config.clone(),
            options: random.clone(),
        };
        Self::build(ctx, config, &mut source, cache, options)
    }

    fn build(
        ctx: Arc<GpuContext>,
        config: &ModelConfig,
        source: &mut dyn WeightSource,
        cache: KvCacheConfig,
        options: GpuDecoderOptions,
    ) -> Result<Self> {
        let shape = KvShape::from_model(config)?;
        let layout = KvLayout::new(&shape, &cache)?;
        let storage = GpuKvStorage::new(Arc::clone(&ctx), layout).map_err(gpu_error)?;
        let cache = PagedKvCache::with_storage(shape, cache, storage)?;
        let weights =
            GpuWeights::upload(&ctx, config, options.weight_dtype, source).map_err(gpu_error)?;
        let inv_freq = ctx
            .rope_inv_freq(config.head_dim, config.rope_theta)
            .map_err(gpu_error)?;
        ctx.take_errors().map_err(gpu_error)?;
        Ok(Self {
            ctx,
            config: config.clone(),
            weights,
            inv_freq,
            cache,
            options,
            work: None,
            logits: None,
            next_ids: None,
            inputs: StepInputs::default(),
            bind_groups: Arc::default(),
            timing: StepTiming::default(),
        })
    }

    /// The device.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// The KV cache (block tables, memory; the pool's buffers through `storage()`).
    pub fn cache(&self) -> &PagedKvCache<GpuKvStorage> {
        &self.cache
    }

    /// The options.
    pub fn options(&self) -> GpuDecoderOptions {
        self.options
    }

    /// Changes the consumer-tail switch. The weight type is fixed at construction; a
    /// different `weight_dtype` here is refused.
    pub fn set_options(&mut self, options: GpuDecoderOptions) -> Result<()> {
        if options.weight_dtype != self.options.weight_dtype {
            return Err(ModelError::invalid(
                "weight_dtype",
                "the weights are uploaded once; build a new decoder for another weight type",
            ));
        }
        self.options = options;
        Ok(())
    }

    /// Where the host's time went in the last forward pass (see [`StepTiming`]).
    pub fn last_step_timing(&self) -> StepTiming {
        self.timing
    }

    /// Bytes of the weight buffers on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes
    }

    /// Runs the batch like [`Decoder::forward`] but returns, per step, the greedy next token:
    /// the argmax (lowest id on ties) of the logits at the step's last new position, chosen
    /// on the GPU so that only the ids are read back. `step.logits` is ignored (only the
    /// last position is computed past the last producer).
    pub fn forward_greedy(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<u32>> {
        match self.forward_with(batch, Readback::Greedy)? {
            Output::Ids(ids) => Ok(ids),
            Output::Logits(_) | Output::Pending(_) => unreachable!("greedy read-back returns ids"),
        }
    }

    /// A greedy step left in flight; `feed` as in [`Self::run`].
    fn submit_greedy_fed(
        &mut self,
        batch: &[SequenceStep<'_>],
        feed: Option<&Feed>,
    ) -> Result<PendingStep> {
        let state = match self.forward_fed(batch, Readback::Greedy, feed, true)? {
            Output::Pending(f) => PendingState::Gpu(f),
            // (An empty batch.)
            Output::Ids(ids) => PendingState::Ready(ids),
            Output::Logits(_) => unreachable!("greedy read-back returns ids"),
        };
        Ok(PendingStep::new(batch, state))
    }

    /// Validate, reserve, run, then commit (or abort on any error).
    fn forward_with(
        &mut self,
        batch: &[SequenceStep<'_>],
        readback: Readback<'_>,
    ) -> Result<Output> {
        self.forward_fed(batch, readback, None, false)
    }

    /// [`Self::forward_with`] with the input tokens from `feed` and the read-back deferred
    /// (see [`Self::run`]).
    fn forward_fed(
        &mut self,
        batch: &[SequenceStep<'_>],
        readback: Readback<'_>,
        feed: Option<&Feed>,
        defer: bool,
    ) -> Result<Output> {
        if batch.is_empty() {
            return Ok(match readback {
                Readback::Logits => Output::Logits(Vec::new()),
                Readback::Greedy | Readback::Sample(_) => Output::Ids(Vec::new()),
            });
        }
        validate_batch(&self.config, &self.cache, batch)?;
        let reserved = reserve_batch(&mut self.cache, batch)?;
        let outcome = self
            .run(batch, readback, feed, defer)
            .and_then(|out| self.mark_written(batch, &reserved).map(|()| out));
        end_batch(&mut self.cache, batch, outcome)
    }

    /// Tells the cache that `kv_append` wrote the `reserved` positions of every producer
    /// slot of every step.
    fn mark_written(
        &mut self,
        batch: &[SequenceStep<'_>],
        reserved: &[std::ops::Range<usize>],
    ) -> Result<()> {
        for (step, positions) in batch.iter().zip(reserved) {
            for &layer in self.config.kv_sharing.producers() {
                self.cache
                    .mark_written(step.seq, layer, positions.clone())?;
            }
        }
        Ok(())
    }

    fn workspace(&mut self, rows: usize) -> Result<()> {
        if self.work.as_ref().is_none_or(|w| w.rows < rows) {
            // Drop the old buffers first: at large batch sizes both would not fit.
            self.bind_groups.clear();
            self.work = None;
            self.work = Some(Workspace::new(&self.ctx, &self.config, rows).map_err(gpu_error)?);
        }
        Ok(())
    }

    fn logits_buffer(&mut self, rows: usize) -> Result<GpuTensor> {
        let shape = [rows, self.config.vocab_size];
        if let Some(t) = &self.logits
            && t.shape == shape
        {
            return Ok(t.clone());
        }
        self.bind_groups.clear();
        self.logits = None;
        let t = self
            .ctx
            .create_tensor(&shape, DType::F32, "logits")
            .map_err(gpu_error)?;
        self.logits = Some(t.clone());
        Ok(t)
    }

    fn ids_buffer(&mut self, rows: usize) -> Result<GpuTensor> {
        if let Some(t) = &self.next_ids
            && t.shape == [rows]
        {
            return Ok(t.clone());
        }
        self.bind_groups.clear();
        self.next_ids = None;
        let t = self
            .ctx
            .create_tensor(&[rows], DType::U32, "next ids")
            .map_err(gpu_error)?;
        self.next_ids = Some(t.clone());
        Ok(t)
    }

    /// The forward pass proper; the caller has reserved the new positions in the cache.
    /// `feed`: take the input tokens from an earlier step's ids buffer instead of the steps'
    /// `tokens` (one per step); `defer`: return the ids of a step that chooses its tokens on
    /// the GPU (greedy or sampled) still in flight.
    fn run(
        &mut self,
        batch: &[SequenceStep<'_>],
        readback: Readback<'_>,
        feed: Option<&Feed>,
        defer: bool,
    ) -> Result<Output> {
        let started = std::time::Instant::now();
        let ctx = Arc::clone(&self.ctx);
        let c = self.config.clone();
        let g = gpu_error;

        // Rows: every new token of every step, steps in batch order. Kept rows: those whose
        // logits are wanted (a suffix of each step's tokens).
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut kept_rows = Vec::new();
        let mut kept_pos = Vec::new();
        let mut kept_per_step = Vec::with_capacity(batch.len());
        let mut starts = Vec::with_capacity(batch.len());
        for step in batch {
            let start = self.cache.seq_len(step.seq)?;
            let n = step.tokens.len();
            let keep = match (readback, step.logits) {
                (Readback::Logits, LogitsWanted::All) => n,
                _ => 1,
            };
            let first_row = ids.len();
            ids.extend_from_slice(step.tokens);
            pos.extend((start..start + n).map(|p| p as u32));
            kept_rows.extend((first_row + n - keep..first_row + n).map(|r| r as u32));
            kept_pos.extend((start + n - keep..start + n).map(|p| p as u32));
            kept_per_step.push(keep);
            starts.push(start);
        }
        let (rows, kept) = (ids.len(), kept_rows.len());
        let reduce = kept < rows;

        let layout = self.cache.storage().paged_layout();
        let tables = batch
            .iter()
            .map(|s| self.cache.block_table(s.seq).map(|t| t.as_u32()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let descs = |kept: Option<&[usize]>| -> Vec<SeqDesc<'_>> {
            batch
                .iter()
                .enumerate()
                .map(|(i, s)| SeqDesc {
                    n_query: kept.map_or(s.tokens.len(), |k| k[i]),
                    kv_len: starts[i] + s.tokens.len(),
                    block_table: tables[i],
                })
                .collect()
        };
        let inp = &mut self.inputs;
        let all_batch =
            SeqBatch::upload_reusing(&ctx, &descs(None), &layout, &mut inp.batch).map_err(g)?;
        let kept_batch = if reduce {
            let d = descs(Some(&kept_per_step));
            Some(SeqBatch::upload_reusing(&ctx, &d, &layout, &mut inp.kept_batch).map_err(g)?)
        } else {
            None
        };
        let ids_t = match feed {
            None => ctx.upload_u32_reusing(&mut inp.ids, &ids, &[rows], "cla step ids"),
            Some(_) => ctx.tensor_reusing(&mut inp.ids, &[rows], DType::U32, "cla step ids"),
        }
        .map_err(g)?;
        let pos_t = ctx
            .upload_u32_reusing(&mut inp.pos, &pos, &[rows], "cla step positions")
            .map_err(g)?;
        let kept_t = if reduce {
            Some((
                ctx.upload_u32_reusing(&mut inp.kept_rows, &kept_rows, &[kept], "cla kept rows")
                    .map_err(g)?,
                ctx.upload_u32_reusing(&mut inp.kept_pos, &kept_pos, &[kept], "cla kept positions")
                    .map_err(g)?,
            ))
        } else {
            None
        };
        self.workspace(rows)?;
        let logits = self.logits_buffer(kept)?;
        let ids_out = match readback {
            Readback::Logits => None,
            Readback::Greedy | Readback::Sample(_) => Some(self.ids_buffer(kept)?),
        };
        let ws = self.work.as_ref().expect("made above");

        let num_layers = c.num_layers();
        let keep_from = if self.options.skip_consumer_tail {
            c.kv_sharing.last_producer() + 1
        } else {
            num_layers
        };
        let mut enc = ctx.encoder();
        if let Some(feed) = feed {
            // Runs of consecutive rows in one copy each (all of them when the batch is the
            // same as the earlier step's).
            let mut i = 0;
            while i < feed.rows.len() {
                let mut n = 1;
                while i + n < feed.rows.len() && feed.rows[i + n] == feed.rows[i] + n as u32 {
                    n += 1;
                }
                enc.copy_buffer_to_buffer(
                    &feed.ids.buffer,
                    4 * u64::from(feed.rows[i]),
                    &ids_t.buffer,
                    4 * i as u64,
                    4 * n as u64,
                );
                i += n;
            }
        }
        // The step's dispatches in one compute pass (one per `submit_every_layers` layers; the
        // last ended by `read_back`), with the bind groups of earlier steps.
        let mut passes = ctx.batch_passes_cached(&mut enc, Arc::clone(&self.bind_groups));
        let x = view(&ws.x, &[rows, c.hidden_size]);
        ctx.embedding(&mut enc, &self.weights.embed_tokens, &ids_t, &x)
            .map_err(g)?;
        let mut cur = Rows {
            x,
            n: rows,
            pos: &pos_t,
            batch: &all_batch,
        };
        let gather = |enc: &mut wgpu::CommandEncoder, cur: &Rows<'_>| -> Result<GpuTensor> {
            let (idx, _) = kept_t.as_ref().expect("reduce");
            let out = view(&ws.x_kept, &[kept, c.hidden_size]);
            // The embedding gather with the hidden states as the table picks rows.
            ctx.embedding(enc, &cur.x, idx, &out).map_err(g)?;
            Ok(out)
        };
        for layer in 0..num_layers {
            // With `submit_every_layers`, hand the GPU what is recorded so far every few
            // layers, so that it runs while the host records the rest.
            let every = self.options.submit_every_layers;
            if every > 0 && layer > 0 && layer.is_multiple_of(every) {
                drop(passes);
                ctx.end_batch(&enc);
                let done = std::mem::replace(&mut enc, ctx.encoder());
                ctx.queue().submit([done.finish()]);
                passes = ctx.batch_passes_cached(&mut enc, Arc::clone(&self.bind_groups));
            }
            if layer == keep_from && reduce {
                cur = Rows {
                    x: gather(&mut enc, &cur)?,
                    n: kept,
                    pos: &kept_t.as_ref().expect("reduce").1,
                    batch: kept_batch.as_ref().expect("reduce"),
                };
            }
            self.record_layer(&mut enc, layer, &cur, ws).map_err(g)?;
        }
        if reduce && keep_from >= num_layers {
            cur = Rows {
                x: gather(&mut enc, &cur)?,
                n: kept,
                pos: &kept_t.as_ref().expect("reduce").1,
                batch: kept_batch.as_ref().expect("reduce"),
            };
        }
        debug_assert_eq!(cur.n, kept);
        let h = view(&ws.h, &[kept, c.hidden_size]);
        let head = self.weights.lm_head();
        let input = norm_input(
            &ctx,
            &mut enc,
            ctx.linear_fuses(kept, head),
            &cur.x,
            &self.weights.final_norm,
            c.rms_norm_eps as f32,
            &h,
        )
        .map_err(g)?;
        ctx.linear_from(&mut enc, input, head, &logits).map_err(g)?;

        match readback {
            Readback::Logits => {
                let bytes = (kept * c.vocab_size * 4) as u64;
                let (bytes, timing) =
                    submit_read_back(&ctx, enc, &logits.buffer, bytes, None, started)
                        .wait_bytes()
                        .map_err(g)?;
                self.timing = timing;
                let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
                let mut out = Vec::with_capacity(batch.len());
                let mut at = 0;
                for &k in &kept_per_step {
                    let n = k * c.vocab_size;
                    out.push(
                        Array2::from_shape_vec((k, c.vocab_size), values[at..at + n].to_vec())
                            .expect("rows x vocab values"),
                    );
                    at += n;
                }
                Ok(Output::Logits(out))
            }
            Readback::Greedy | Readback::Sample(_) => {
                // One kept row per step here.
                let ids_out = ids_out.expect("made above for these read-backs");
                match readback {
                    Readback::Sample(s) => {
                        s.record(&ctx, &mut enc, &logits, &ids_out, &mut self.inputs.sampling)
                    }
                    _ => ctx.argmax(&mut enc, &logits, &ids_out),
                }
                .map_err(g)?;
                let buffer = ids_out.buffer.clone();
                let flight = submit_read_back(
                    &ctx,
                    enc,
                    &buffer,
                    (kept * 4) as u64,
                    Some(ids_out),
                    started,
                );
                if defer {
                    return Ok(Output::Pending(flight));
                }
                let (bytes, timing) = flight.wait_bytes().map_err(g)?;
                self.timing = timing;
                Ok(Output::Ids(bytemuck::pod_collect_to_vec(&bytes)))
            }
        }
    }

    /// Records one decoder layer (see [`crate::cpu`] for the equations) for the rows `cur`.
    fn record_layer(
        &self,
        enc: &mut wgpu::CommandEncoder,
        layer: usize,
        cur: &Rows<'_>,
        ws: &Workspace,
    ) -> Result<(), GpuError> {
        let ctx = &*self.ctx;
        let c = &self.config;
        let w: &GpuLayer = &self.weights.layers[layer];
        let eps = c.rms_norm_eps as f32;
        let (n, hid, d) = (cur.n, c.hidden_size, c.head_dim);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let x = &cur.x;

        // At decode sizes every RMSNorm runs inside the projections that read it.
        let fuse = ctx.linear_fuses(n, w.proj.first());
        let h = view(&ws.h, &[n, hid]);
        let input = norm_input(ctx, enc, fuse, x, &w.input_norm, eps, &h)?;
        // The queries, rotated, end in `q`; a producer's rotated keys and its values go into
        // its slot of the pool in the same dispatch (`rope_append`), read from the rows its
        // stacked projection wrote.
        let q = view(&ws.q, &[n, heads, d]);
        let pool = self.cache.storage().pool(c.kv_sharing.slot_of(layer));
        let (qw, kvw) = (heads * d, kv_heads * d);
        let append = |enc: &mut wgpu::CommandEncoder, src: QkvRows<'_>| {
            let (pos, slots) = (cur.pos, &cur.batch.slots);
            ctx.rope_append(enc, src, pos, &self.inv_freq, slots, &pool, &q)
        };
        match &w.proj {
            Projection::Q(wq) => {
                ctx.linear_from(enc, input, wq, &view(&q, &[n, qw]))?;
                ctx.rope(enc, &q, cur.pos, &self.inv_freq)?;
            }
            Projection::Qkv(wqkv) => {
                let rows = view(&ws.qkv, &[n, qw + 2 * kvw]);
                ctx.linear_from(enc, input, wqkv, &rows)?;
                let src = QkvRows {
                    q: &rows,
                    q_col: 0,
                    kv: &rows,
                    k_col: qw,
                    v_col: qw + kvw,
                };
                append(enc, src)?;
            }
            Projection::QAndKv { q: wq, kv_norm, kv } => {
                let q_rows = view(&ws.qkv, &[n, qw]);
                ctx.linear_from(enc, input, wq, &q_rows)?;
                let hk = view(&ws.hk, &[n, hid]);
                let kv_input = norm_input(ctx, enc, fuse, x, kv_norm, eps, &hk)?;
                let kv_rows = view(&ws.kv, &[n, 2 * kvw]);
                ctx.linear_from(enc, kv_input, kv, &kv_rows)?;
                let src = QkvRows {
                    q: &q_rows,
                    q_col: 0,
                    kv: &kv_rows,
                    k_col: 0,
                    v_col: kvw,
                };
                append(enc, src)?;
            }
        }

        // Attention over the producer's slot (this layer's own for a producer).
        let a = view(&ws.attn, &[n, heads, d]);
        if cur.batch.max_query == 1 {
            ctx.attention_decode(enc, &q, cur.batch, &pool, &a)?;
        } else {
            ctx.attention_prefill(enc, &q, cur.batch, &pool, &a)?;
        }
        // x += o_proj(a); at decode sizes one dispatch (see `linear_add`).
        let tmp = view(&ws.tmp, &[n, hid]);
        ctx.linear_add(enc, &view(&a, &[n, heads * d]), &w.o_proj, x, &tmp)?;

        let gn = view(&ws.h, &[n, hid]);
        let mlp_input = norm_input(ctx, enc, fuse, x, &w.post_attention_norm, eps, &gn)?;
        let inter = c.intermediate_size;
        let (gate, up, act) = (
            view(&ws.gate, &[n, inter]),
            view(&ws.up, &[n, inter]),
            view(&ws.act, &[n, inter]),
        );
        ctx.linear_swiglu(enc, mlp_input, &w.gate_proj, &w.up_proj, &act, &gate, &up)?;
        ctx.linear_add(enc, &act, &w.down_proj, x, &tmp)?;
        Ok(())
    }
}

/// The input of the projections that read RMSNorm(`x`) with `scale`: with `fuse` (decode
/// sizes, see `GpuContext::linear_fuses`) the norm runs inside each of them; otherwise it is
/// computed here, once, into `tmp`.
fn norm_input<'a>(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    fuse: bool,
    x: &'a GpuTensor,
    scale: &'a GpuTensor,
    eps: f32,
    tmp: &'a GpuTensor,
) -> Result<ProjInput<'a>, GpuError> {
    if fuse {
        return Ok(ProjInput::Normed {
            x,
            weight: scale,
            eps,
            tmp,
        });
    }
    ctx.rms_norm(enc, x, scale, tmp, eps)?;
    Ok(ProjInput::Plain(tmp))
}

/// Appends a copy of the first `bytes` of `src` to a mappable buffer to `enc` and submits it
/// (the one submission of a step), without waiting. `ids`: the greedy ids buffer, kept for a
/// next step to read; `started`: when the step's recording began.
fn submit_read_back(
    ctx: &Arc<GpuContext>,
    mut enc: wgpu::CommandEncoder,
    src: &wgpu::Buffer,
    bytes: u64,
    ids: Option<GpuTensor>,
    started: std::time::Instant,
) -> InFlight {
    let size = bytes.max(4).div_ceil(4) * 4;
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("cla step read-back"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.end_batch(&enc);
    enc.copy_buffer_to_buffer(src, 0, &staging, 0, size);
    let index = ctx.queue().submit([enc.finish()]);
    let submitted = std::time::Instant::now();
    let (tx, done) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    InFlight {
        ctx: Arc::clone(ctx),
        staging,
        index,
        done,
        bytes,
        ids,
        started,
        submitted,
    }
}

impl Decoder for GpuDecoder {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn sequences(&self) -> &dyn SequenceCache {
        &self.cache
    }

    fn sequences_mut(&mut self) -> &mut dyn SequenceCache {
        &mut self.cache
    }

    fn forward(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<Array2<f32>>> {
        match self.forward_with(batch, Readback::Logits)? {
            Output::Logits(l) => Ok(l),
            Output::Ids(_) | Output::Pending(_) => {
                unreachable!("logits read-back returns logits")
            }
        }
    }

    fn forward_greedy(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<u32>> {
        GpuDecoder::forward_greedy(self, batch)
    }

    fn submit_greedy(&mut self, batch: &[SequenceStep<'_>]) -> Result<PendingStep> {
        self.submit_greedy_fed(batch, None)
    }

    fn submit_greedy_after(
        &mut self,
        prev: &PendingStep,
        seqs: &[SequenceId],
    ) -> Result<PendingStep> {
        let Some(feed) = Feed::after(prev, seqs)? else {
            // Known ids (or an empty step): the trait's way, feeding them from the host.
            return default_submit_after(self, prev, seqs, |d, steps| d.submit_greedy(steps));
        };
        let steps = fed_steps(seqs);
        self.submit_greedy_fed(&steps, Some(&feed))
    }

    fn submit_sample(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<PendingStep> {
        self.sample_fed(batch, choices, None, true)
    }

    fn submit_sample_after(
        &mut self,
        prev: &PendingStep,
        seqs: &[SequenceId],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<PendingStep> {
        check_chained_choices(seqs, choices)?;
        let Some(feed) = Feed::after(prev, seqs)? else {
            return default_submit_after(self, prev, seqs, |d, steps| {
                d.submit_sample(steps, choices)
            });
        };
        let steps = fed_steps(seqs);
        self.sample_fed(&steps, choices, Some(&feed), true)
    }

    fn wait_step(&mut self, step: PendingStep) -> Result<Vec<u32>> {
        match step.into_state() {
            PendingState::Ready(ids) => Ok(ids),
            PendingState::Gpu(f) => {
                let (ids, timing) = f.wait_timed()?;
                self.timing = timing;
                Ok(ids)
            }
        }
    }

    fn pipelines_steps(&self) -> bool {
        true
    }

    fn forward_sample(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<Vec<u32>> {
        self.forward_sample_on_gpu(batch, choices)
    }
}
