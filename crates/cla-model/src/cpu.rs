//! The CPU reference decoder: the whole model's math in one file, to be read against the
//! paper.
//!
//! A Llama-style pre-norm decoder (RMSNorm, rotary embeddings, grouped-query attention,
//! SwiGLU MLP) with Cross-Layer Attention (Brandon et al. 2024, section 2): every layer
//! computes its own queries; a *producer* layer also computes keys and values and appends
//! them to its slot of the paged KV cache (`cla-kv`); a *consumer* layer computes no keys
//! or values and attends over its producer's slot, which the cache resolves from the
//! layer index. One decoder layer, for hidden states `x`:
//!
//! ```text
//! h  = RMSNorm(x; input_layernorm)
//! q  = RoPE(h Wq)
//! producer only:  hk = RMSNorm(x; kv_input_layernorm) if present, else h
//!                 cache[slot(layer)] += (RoPE(hk Wk), hk Wv)
//! a  = softmax(q K^T / sqrt(d) + causal mask) V    with K, V = cache[slot(producer(layer))]
//! x  = x + a Wo
//! x  = x + (silu(g Wgate) * (g Wup)) Wdown         with g = RMSNorm(x; post_attention_layernorm)
//! ```
//!
//! then `logits = RMSNorm(x; norm) Wlm`. Query head `h` reads K/V head
//! `h / (q_heads / kv_heads)` (GQA; MQA when there is one K/V head).
//!
//! When every layer after the last producer is a consumer (a YOCO-like tail), the tail's
//! output at a position is only needed for the logits there, and the tail writes nothing
//! to the cache. A step that wants the last position's logits therefore runs the tail for
//! that position only (the result is identical; see [`CpuDecoderOptions`]).

use crate::decoder::{
    Decoder, LogitsWanted, SequenceCache, SequenceStep, end_batch, reserve_batch, validate_batch,
};
use crate::error::Result;
use crate::ops::{RopeTable, linear, rms_norm, silu, softmax_in_place};
use crate::weights::{LayerWeights, ModelWeights};
use cla_core::ModelConfig;
use cla_kv::{KvBlock, KvCacheConfig, KvDType, KvShape, KvSlice, PagedKvCache};
use half::slice::HalfFloatSliceExt;
use ndarray::{Array2, Axis, Zip, s};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// Tuning switches of [`CpuDecoder`]. The defaults are the fast, exact path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuDecoderOptions {
    /// Run the layers after the last producer only for the positions whose logits are
    /// wanted (see the module docs). Off only to measure what it saves.
    pub skip_consumer_tail: bool,
}

impl Default for CpuDecoderOptions {
    fn default() -> Self {
        Self {
            skip_consumer_tail: true,
        }
    }
}

/// A KV-cache configuration for `sequences` sequences of up to `tokens` positions each
/// (blocks of the default size).
pub fn cache_config_for(tokens: usize, sequences: usize, dtype: KvDType) -> KvCacheConfig {
    let per_seq = tokens.div_ceil(KvCacheConfig::DEFAULT_BLOCK_SIZE).max(1);
    KvCacheConfig::new(per_seq * sequences.max(1), dtype)
}

/// The CPU reference implementation of [`Decoder`].
#[derive(Debug, Clone)]
pub struct CpuDecoder {
    weights: Arc<ModelWeights>,
    rope: RopeTable,
    cache: PagedKvCache,
    options: CpuDecoderOptions,
}

impl CpuDecoder {
    /// A decoder for `weights` with a KV cache sized by `cache`.
    pub fn new(weights: impl Into<Arc<ModelWeights>>, cache: KvCacheConfig) -> Result<Self> {
        Self::with_options(weights, cache, CpuDecoderOptions::default())
    }

    /// A decoder with explicit [`CpuDecoderOptions`].
    pub fn with_options(
        weights: impl Into<Arc<ModelWeights>>,
        cache: KvCacheConfig,
        options: CpuDecoderOptions,
    ) -> Result<Self> {
        let weights = weights.into();
        let c = &weights.config;
        let shape = KvShape::from_model(c)?;
        let cache = PagedKvCache::new(shape, cache)?;
        let rope = RopeTable::new(c.head_dim, c.max_position_embeddings, c.rope_theta);
        Ok(Self {
            weights,
            rope,
            cache,
            options,
        })
    }

    /// The weights.
    pub fn weights(&self) -> &Arc<ModelWeights> {
        &self.weights
    }

    /// The KV cache (for inspection: memory, block tables).
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// The options.
    pub fn options(&self) -> CpuDecoderOptions {
        self.options
    }

    /// Changes the options (e.g. to measure the consumer-tail saving).
    pub fn set_options(&mut self, options: CpuDecoderOptions) {
        self.options = options;
    }

    /// The forward pass proper; the caller has reserved the new positions in the cache.
    fn run(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<Array2<f32>>> {
        let weights = Arc::clone(&self.weights);
        let c = &weights.config;
        // Row r of the hidden states is a token of step `owner` at absolute position `pos`;
        // each step's rows are contiguous (`spans`).
        let mut rows = Rows::default();
        for (i, step) in batch.iter().enumerate() {
            let start = self.cache.seq_len(step.seq)?;
            rows.push_span(i, start..start + step.tokens.len());
        }
        let mut x = Array2::<f32>::zeros((rows.len(), c.hidden_size));
        for (mut row, &token) in x.outer_iter_mut().zip(batch.iter().flat_map(|s| s.tokens)) {
            row.assign(&weights.embed_tokens.row(token as usize));
        }
        let num_layers = c.num_layers();
        // Rows are reduced to those whose logits are wanted before the first layer that
        // is not needed for the cache: after the last producer (or before the final norm).
        let keep_from = if self.options.skip_consumer_tail {
            c.kv_sharing.last_producer() + 1
        } else {
            num_layers
        };
        for layer in 0..num_layers {
            if layer == keep_from {
                (x, rows) = keep_wanted_rows(x, rows, batch);
            }
            x = self.layer(layer, &weights.layers[layer], x, &rows, batch)?;
        }
        if keep_from >= num_layers {
            (x, rows) = keep_wanted_rows(x, rows, batch);
        }
        let h = rms_norm(
            x.view(),
            weights.final_norm.as_slice().expect("contiguous"),
            c.rms_norm_eps as f32,
        );
        let logits = linear(h.view(), weights.lm_head().view());
        Ok(rows
            .spans
            .iter()
            .map(|span| logits.slice(s![span.clone(), ..]).to_owned())
            .collect())
    }

    /// One decoder layer (see the module docs for the equations).
    fn layer(
        &mut self,
        layer: usize,
        w: &LayerWeights,
        x: Array2<f32>,
        rows: &Rows,
        batch: &[SequenceStep<'_>],
    ) -> Result<Array2<f32>> {
        let c = &self.weights.config;
        let eps = c.rms_norm_eps as f32;
        let h = rms_norm(x.view(), w.input_norm.as_slice().expect("contiguous"), eps);
        let mut q = linear(h.view(), w.q_proj.view());
        self.rotate(&mut q, &rows.pos);

        if let Some(kv) = &w.kv {
            // CLA producer: compute this layer's keys and values and cache them. The paper's
            // CLA models give the K/V input its own norm scale.
            let hk_own;
            let hk = match &kv.kv_norm {
                Some(scale) => {
                    hk_own = rms_norm(x.view(), scale.as_slice().expect("contiguous"), eps);
                    &hk_own
                }
                None => &h,
            };
            let mut k = linear(hk.view(), kv.k_proj.view());
            self.rotate(&mut k, &rows.pos);
            let v = linear(hk.view(), kv.v_proj.view());
            let (k, v) = (
                k.as_slice().expect("contiguous"),
                v.as_slice().expect("contiguous"),
            );
            let width = c.kv_width();
            for (step, span) in batch.iter().zip(&rows.spans) {
                // Producers come before the row reduction, so every new token is here.
                debug_assert_eq!(span.len(), step.tokens.len());
                let r = span.start * width..span.end * width;
                self.cache.write(step.seq, layer, &k[r.clone()], &v[r])?;
            }
        }

        let a = attention(c, &self.cache, layer, &q, rows, batch)?;
        let x = x + linear(a.view(), w.o_proj.view());

        let g = rms_norm(
            x.view(),
            w.post_attention_norm.as_slice().expect("contiguous"),
            eps,
        );
        let mut gate = linear(g.view(), w.gate_proj.view());
        let up = linear(g.view(), w.up_proj.view());
        Zip::from(&mut gate)
            .and(&up)
            .for_each(|g, &u| *g = silu(*g) * u);
        Ok(x + linear(gate.view(), w.down_proj.view()))
    }

    /// Applies RoPE to every head of every row, row `r` at position `pos[r]`.
    fn rotate(&self, x: &mut Array2<f32>, pos: &[usize]) {
        let d = self.weights.config.head_dim;
        for (mut row, &p) in x.outer_iter_mut().zip(pos) {
            let row = row
                .as_slice_mut()
                .expect("rows of an owned array are contiguous");
            for head in row.chunks_exact_mut(d) {
                self.rope.apply(head, p);
            }
        }
    }
}

/// Which sequence and position each hidden-state row belongs to.
#[derive(Debug, Default, Clone)]
struct Rows {
    /// Absolute position of each row.
    pos: Vec<usize>,
    /// Rows of each step of the batch, in batch order.
    spans: Vec<Range<usize>>,
}

impl Rows {
    fn len(&self) -> usize {
        self.pos.len()
    }

    fn push_span(&mut self, step: usize, positions: Range<usize>) {
        debug_assert_eq!(step, self.spans.len());
        let start = self.pos.len();
        self.pos.extend(positions);
        self.spans.push(start..self.pos.len());
    }
}

/// Keeps, per step, the rows whose logits are wanted: the last, or all.
fn keep_wanted_rows(x: Array2<f32>, rows: Rows, batch: &[SequenceStep<'_>]) -> (Array2<f32>, Rows) {
    let mut keep = Vec::with_capacity(rows.len());
    let mut out = Rows::default();
    for (i, (step, span)) in batch.iter().zip(&rows.spans).enumerate() {
        let kept = match step.logits {
            LogitsWanted::All => span.clone(),
            LogitsWanted::Last => span.end - 1..span.end,
        };
        keep.extend(kept.clone());
        out.push_span(i, rows.pos[kept.start]..rows.pos[kept.start] + kept.len());
    }
    if keep.len() == rows.len() {
        return (x, rows);
    }
    (x.select(Axis(0), &keep), out)
}

/// Causal multi-head attention of `layer` for every row, over the keys and values that the
/// cache holds for the layer's producer. Query head `h` uses K/V head `h / group_size`.
/// Runs one task per (step, query head) on the rayon pool.
fn attention(
    c: &ModelConfig,
    cache: &PagedKvCache,
    layer: usize,
    q: &Array2<f32>,
    rows: &Rows,
    batch: &[SequenceStep<'_>],
) -> Result<Array2<f32>> {
    let d = c.head_dim;
    let heads = c.num_attention_heads;
    let group = c.group_size();
    let scale = 1.0 / (d as f32).sqrt();
    let q_width = c.q_width();
    // The cache resolves a consumer layer to its producer's slot.
    let blocks: Vec<Vec<KvBlock<'_>>> = batch
        .iter()
        .map(|s| cache.blocks(s.seq, layer).map(Iterator::collect))
        .collect::<std::result::Result<_, _>>()?;
    let q = q.as_slice().expect("contiguous");
    let tasks: Vec<(usize, usize)> = (0..batch.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    let outputs: Vec<Vec<f32>> = tasks
        .par_iter()
        // Each worker reuses one pair of buffers for widened f16 runs.
        .map_init(
            || (Vec::new(), Vec::new()),
            |widened, &(s, head)| {
                let kv_head = head / group;
                let span = rows.spans[s].clone();
                let mut out = vec![0.0f32; span.len() * d];
                // The head's K/V runs as f32, f16 runs widened once for all the span's rows.
                let last = rows.pos[span.end - 1];
                widen_f16_runs(&blocks[s], kv_head, last, widened);
                let widened = &*widened;
                let runs = || head_runs(&blocks[s], kv_head, last, widened);
                let mut scores = Vec::new();
                for (i, r) in span.enumerate() {
                    let pos = rows.pos[r];
                    let qv = &q[r * q_width + head * d..r * q_width + (head + 1) * d];
                    // Scores over positions 0..=pos (the causal mask), run by run.
                    scores.clear();
                    for run in runs().take_while(|run| run.start <= pos) {
                        let n = run.len.min(pos + 1 - run.start);
                        let keys = &run.keys[..n * d];
                        scores.extend(keys.chunks_exact(d).map(|k| dot(k, qv) * scale));
                    }
                    softmax_in_place(&mut scores);
                    let o = &mut out[i * d..(i + 1) * d];
                    let mut p = scores.as_slice();
                    for run in runs().take_while(|run| run.start <= pos) {
                        let n = run.len.min(pos + 1 - run.start);
                        for (v, &w) in run.values.chunks_exact(d).zip(&p[..n]) {
                            o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                        }
                        p = &p[n..];
                    }
                }
                out
            },
        )
        .collect();
    let mut a = Array2::<f32>::zeros((rows.len(), q_width));
    for (&(s, head), out) in tasks.iter().zip(&outputs) {
        for (i, r) in rows.spans[s].clone().enumerate() {
            a.slice_mut(s![r, head * d..(head + 1) * d])
                .as_slice_mut()
                .expect("contiguous")
                .copy_from_slice(&out[i * d..(i + 1) * d]);
        }
    }
    Ok(a)
}

/// One block's valid keys and values of one K/V head as f32 `[token][dim]` runs.
struct HeadRun<'a> {
    /// Position of the run's first token.
    start: usize,
    len: usize,
    keys: &'a [f32],
    values: &'a [f32],
}

/// A block's valid keys and values of `kv_head`, as stored.
fn head_slices<'a>(b: &KvBlock<'a>, kv_head: usize) -> (KvSlice<'a>, KvSlice<'a>) {
    let k = b.keys_of_head(kv_head).expect("head in range");
    let v = b.values_of_head(kv_head).expect("head in range");
    (k, v)
}

/// Widens the f16 runs of `kv_head` in the blocks that hold positions `0..=last` into the
/// front of `widened` (keys, values; grown when too short, never cleared, so that a reused
/// buffer is not zeroed again), in block order, so that the query rows of a step share one
/// conversion. Does nothing for an f32 cache.
fn widen_f16_runs(
    blocks: &[KvBlock<'_>],
    kv_head: usize,
    last: usize,
    widened: &mut (Vec<f32>, Vec<f32>),
) {
    let mut at = 0;
    for b in blocks.iter().take_while(|b| b.start <= last) {
        if let (KvSlice::F16(k), KvSlice::F16(v)) = head_slices(b, kv_head) {
            let end = at + k.len();
            if widened.0.len() < end {
                widened.0.resize(end, 0.0);
                widened.1.resize(end, 0.0);
            }
            k.convert_to_f32_slice(&mut widened.0[at..end]);
            v.convert_to_f32_slice(&mut widened.1[at..end]);
            at = end;
        }
    }
}

/// The runs of `kv_head` in the blocks that hold positions `0..=last`, block by block:
/// borrowed from an f32 cache, or the blocks' parts of `widened` (filled by
/// [`widen_f16_runs`] with the same `last`) for an f16 cache.
fn head_runs<'b>(
    blocks: &'b [KvBlock<'b>],
    kv_head: usize,
    last: usize,
    widened: &'b (Vec<f32>, Vec<f32>),
) -> impl Iterator<Item = HeadRun<'b>> + 'b {
    let visible = blocks.iter().take_while(move |b| b.start <= last);
    visible.scan(0usize, move |at, b| {
        let (keys, values) = match head_slices(b, kv_head) {
            (KvSlice::F32(k), KvSlice::F32(v)) => (k, v),
            (KvSlice::F16(k), KvSlice::F16(_)) => {
                let range = *at..*at + k.len();
                *at = range.end;
                (&widened.0[range.clone()], &widened.1[range])
            }
            _ => unreachable!("a cache stores its keys and values in one dtype"),
        };
        Some(HeadRun {
            start: b.start,
            len: b.len,
            keys,
            values,
        })
    })
}

/// `a . b` with eight independent partial sums, so that the compiler can use SIMD lanes
/// (a single running sum would force one addition after another).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Decoder for CpuDecoder {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn sequences(&self) -> &dyn SequenceCache {
        &self.cache
    }

    fn sequences_mut(&mut self) -> &mut dyn SequenceCache {
        &mut self.cache
    }

    fn forward(&mut self, batch: &[SequenceStep<'_>]) -> Result<Vec<Array2<f32>>> {
        validate_batch(&self.weights.config, &self.cache, batch)?;
        reserve_batch(&mut self.cache, batch)?;
        let outcome = self.run(batch);
        end_batch(&mut self.cache, batch, outcome)
    }
}
