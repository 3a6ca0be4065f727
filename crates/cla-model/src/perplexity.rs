//! Perplexity of a text under the model (the metric of the paper's Table 1), evaluated in
//! windows of the context with Hugging Face's sliding-window bookkeeping.
//!
//! The text is tokenised WITHOUT a BOS token (as Hugging Face's perplexity recipe does:
//! `tokenizer(text)` on the concatenated corpus, whose BOS, if any, appears once at the
//! start); callers who want a BOS can prepend it to the ids and use
//! [`perplexity_of_ids`].
//!
//! Windows: for `begin = 0, stride, 2*stride, ...` the window is `ids[begin..end]` with
//! `end = min(begin + context, len)`. A window scores the tokens `max(prev_end, begin+1)..end`
//! (each predicted from the positions before it inside the window), where `prev_end` is the
//! previous window's end; the loop stops at the window that reaches the end. So with
//! `stride < context` every token but the first is scored exactly once, with the most
//! left context the window gives; with `stride == context` the windows do not overlap and
//! the first token of each window is not scored.

use crate::decoder::{Decoder, SequenceStep};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;

/// Window settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerplexityConfig {
    /// Tokens per window; default (and maximum) the model's `max_position_embeddings`.
    pub context: Option<usize>,
    /// Tokens between window starts, `1..=context`; default `context` (no overlap).
    pub stride: Option<usize>,
}

/// One evaluation window: tokens `begin..end` are fed, targets `score_from..end` scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First token fed.
    pub begin: usize,
    /// One past the last token fed.
    pub end: usize,
    /// First token scored (`> begin`).
    pub score_from: usize,
}

impl Window {
    /// Tokens scored by this window.
    pub fn scored(&self) -> usize {
        self.end - self.score_from
    }
}

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerplexityReport {
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Tokens scored.
    pub tokens_scored: usize,
    /// Tokens in the text.
    pub total_tokens: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Window size used.
    pub context: usize,
    /// Stride used.
    pub stride: usize,
    /// Whether the progress callback stopped the evaluation before its last window; the
    /// figures then cover the windows evaluated until then.
    pub stopped: bool,
}

/// The windows for `len` tokens (see the module docs). Windows that would score nothing
/// are left out.
pub fn plan_windows(len: usize, context: usize, stride: usize) -> Result<Vec<Window>> {
    if context < 2 {
        return Err(ModelError::invalid(
            "context",
            format!("a window needs at least 2 tokens, found {context}"),
        ));
    }
    if stride == 0 || stride > context {
        return Err(ModelError::invalid(
            "stride",
            format!("must be between 1 and the context ({context}), found {stride}"),
        ));
    }
    let mut windows = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < len {
        let end = (begin + context).min(len);
        let score_from = prev_end.max(begin + 1);
        if score_from < end {
            windows.push(Window {
                begin,
                end,
                score_from,
            });
        }
        prev_end = end;
        if end == len {
            break;
        }
        begin += stride;
    }
    Ok(windows)
}

/// Perplexity of `text` (tokenised without BOS, see the module docs).
pub fn perplexity(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    text: &str,
    config: PerplexityConfig,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<PerplexityReport> {
    let ids = tokenizer.encode(text, false)?;
    perplexity_of_ids(decoder, &ids, config, progress)
}

/// Perplexity of a token sequence. `progress(scored, total)` is called after each window
/// with the tokens scored so far and the tokens that will be scored in all; returning
/// [`ControlFlow::Break`] stops the evaluation there, with a report of the windows
/// evaluated so far ([`PerplexityReport::stopped`]). The decoder's cache must hold one
/// window (`context` positions).
pub fn perplexity_of_ids(
    decoder: &mut dyn Decoder,
    ids: &[u32],
    config: PerplexityConfig,
    progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<PerplexityReport> {
    let model = decoder.config();
    let max = model.max_position_embeddings;
    let vocab = model.vocab_size;
    let context = config.context.unwrap_or(max);
    if context > max {
        return Err(ModelError::invalid(
            "context",
            format!("{context} exceeds the model's max_position_embeddings ({max})"),
        ));
    }
    let stride = config.stride.unwrap_or(context);
    if ids.len() < 2 {
        return Err(ModelError::invalid(
            "text",
            format!(
                "perplexity needs at least 2 tokens, the text has {}",
                ids.len()
            ),
        ));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::TokenOutOfRange { token: bad, vocab });
    }
    let windows = plan_windows(ids.len(), context, stride)?;
    let total: usize = windows.iter().map(Window::scored).sum();
    let mut nll_sum = 0.0f64;
    let mut scored = 0;
    let mut evaluated = 0;
    for w in &windows {
        let seq = decoder.add_sequence();
        let result = decoder.forward(&[SequenceStep::all(seq, &ids[w.begin..w.end])]);
        decoder.free_sequence(seq)?;
        let logits = result?.pop().expect("one step, one result");
        // Row `i` of the window's logits predicts token `begin + i + 1`.
        let targets = &ids[w.score_from..w.end];
        let rows = logits.outer_iter().skip(w.score_from - 1 - w.begin);
        for (row, &target) in rows.zip(targets) {
            nll_sum +=
                negative_log_likelihood(row.as_slice().expect("contiguous"), target as usize);
        }
        scored += w.scored();
        evaluated += 1;
        if progress(scored, total).is_break() {
            break;
        }
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(PerplexityReport {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens_scored: scored,
        total_tokens: ids.len(),
        windows: evaluated,
        context,
        stride,
        stopped: evaluated < windows.len(),
    })
}

/// `-log softmax(logits)[target]`, computed in f64.
pub fn negative_log_likelihood(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn every_token_is_scored_at_most_once_and_with_overlap_exactly_once() {
        let mut rng = SplitMix64::new(42);
        for _ in 0..2000 {
            let len = 1 + (rng.next_u64() % 200) as usize;
            let context = 2 + (rng.next_u64() % 40) as usize;
            let stride = 1 + (rng.next_u64() % context as u64) as usize;
            let windows = plan_windows(len, context, stride).unwrap();
            let mut count = vec![0; len];
            for w in &windows {
                assert!(w.begin < w.score_from && w.score_from < w.end && w.end <= len);
                assert!(w.end - w.begin <= context);
                for c in &mut count[w.score_from..w.end] {
                    *c += 1;
                }
            }
            assert_eq!(count.first().copied().unwrap_or(0), 0);
            assert!(count.iter().all(|&c| c <= 1), "{len} {context} {stride}");
            if stride < context {
                assert!(
                    count[1..].iter().all(|&c| c == 1),
                    "{len} {context} {stride}"
                );
            } else {
                // No overlap: everything but each window's first token.
                for (i, &c) in count.iter().enumerate() {
                    assert_eq!(c == 0, i % context == 0, "{len} {context} {i}");
                }
            }
        }
    }

    #[test]
    fn hugging_face_example_windows() {
        // len 10, context 4, stride 2: windows [0,4) scoring 1..4, [2,6) scoring 4..6, ...
        let w = plan_windows(10, 4, 2).unwrap();
        let got: Vec<_> = w.iter().map(|w| (w.begin, w.end, w.score_from)).collect();
        assert_eq!(got, vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]);
    }

    #[test]
    fn bad_window_settings_are_rejected() {
        assert!(plan_windows(10, 1, 1).is_err());
        assert!(plan_windows(10, 4, 0).is_err());
        assert!(plan_windows(10, 4, 5).is_err());
    }

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let v = negative_log_likelihood(&[0.5; 8], 3);
        assert!((v - (8f64).ln()).abs() < 1e-12);
    }
}
