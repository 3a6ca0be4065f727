//! Picking tokens on the GPU ([`Decoder::forward_sample`]): after the LM head the step
//! records the repetition penalty (on the logits, in place), then the argmax or the sampling
//! kernel, and reads back one id per sequence.
//!
//! The tokens are those the CPU sampler picks from the same logits: the kernels follow its
//! order (largest logit first, lowest id among equals), its cuts and its f32 arithmetic, and
//! the uniform number of each draw comes from the sequence's own [`crate::Sampler`] stream
//! ([`crate::Sampler::upcoming_uniform`]), which then moves on exactly as a CPU draw would.
//! The one difference left is rounding: the kernel's `exp` is within about an ulp of the
//! CPU's, so a draw whose uniform number falls within such a rounding of the boundary
//! between two tokens' cumulative probabilities may pick the neighbour (see
//! `cla_kernels_wgpu::GpuContext::sample`).
//!
//! A batch whose sequences sample with different settings, or settings the kernels refuse
//! (a temperature whose reciprocal overflows), is sampled on the host from read-back logits.

use super::{Feed, GpuDecoder, Output, Readback};
use crate::decoder::{
    PendingState, PendingStep, SequenceStep, TokenChoice, check_choices, sample_on_host,
};
use crate::error::Result;
use cla_kernels_wgpu::ops::sampling::{MAX_SAMPLE_VOCAB, SampleParams, uniform_words};
use cla_kernels_wgpu::{GpuContext, GpuError, GpuTensor, ReusableBuffer};

/// What a step records after the LM head to pick its tokens (one logits row per step).
#[derive(Debug)]
pub(super) struct GpuSampling {
    /// The repetition penalty and the distinct `(row, token)` pairs it applies to.
    penalty: Option<(f32, Vec<u32>)>,
    /// Temperature, top-k and top-p, and each row's uniform number (two words per row);
    /// `None` picks the argmax.
    draw: Option<(SampleParams, Vec<u32>)>,
}

impl GpuSampling {
    /// The kernels' version of `choices`, or `None` where the host must sample.
    fn plan(choices: &[TokenChoice<'_>], vocab: usize) -> Option<Self> {
        let config = choices.first()?.sampler.config();
        if choices.iter().any(|c| c.sampler.config() != config) {
            return None;
        }
        let penalty = if config.repetition_penalty == 1.0 {
            None
        } else {
            let pen = config.repetition_penalty;
            if !(pen.is_finite() && pen > 0.0) {
                return None;
            }
            // Each token of a sequence once, as the CPU sampler penalises it (ids outside the
            // vocabulary are ignored there too).
            let mut pairs = Vec::new();
            let mut tokens = Vec::new();
            for (row, c) in choices.iter().enumerate() {
                tokens.clear();
                tokens.extend(c.history.iter().filter(|&&t| (t as usize) < vocab));
                tokens.sort_unstable();
                tokens.dedup();
                pairs.extend(tokens.iter().flat_map(|&t| [row as u32, t]));
            }
            Some((pen, pairs))
        };
        let draw = if config.is_greedy() {
            None
        } else {
            let params = SampleParams {
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
            };
            params.validate().ok()?;
            if vocab > MAX_SAMPLE_VOCAB {
                return None;
            }
            let mut words = Vec::with_capacity(2 * choices.len());
            for c in choices {
                words.extend(uniform_words(c.sampler.upcoming_uniform()?).ok()?);
            }
            Some((params, words))
        };
        Some(Self { penalty, draw })
    }

    /// Records the token choice of each row of `logits` into `out` (`[rows]` u32), its
    /// inputs written into `bufs`.
    pub(super) fn record(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        out: &GpuTensor,
        bufs: &mut SampleInputs,
    ) -> std::result::Result<(), GpuError> {
        if let Some((penalty, pairs)) = &self.penalty
            && !pairs.is_empty()
        {
            let shape = [pairs.len() / 2, 2];
            let pairs = ctx.upload_u32_reusing(&mut bufs.pairs, pairs, &shape, "cla penalty")?;
            ctx.repetition_penalty(enc, logits, &pairs, *penalty)?;
        }
        match &self.draw {
            Some((params, words)) => {
                let shape = [words.len() / 2, 2];
                let uniforms =
                    ctx.upload_u32_reusing(&mut bufs.uniforms, words, &shape, "cla uniforms")?;
                ctx.sample(enc, logits, &uniforms, params, out)
            }
            None => ctx.argmax(enc, logits, out),
        }
    }
}

/// The buffers a step's token choice writes its inputs into (the repetition penalty's
/// token pairs, the draws' uniform numbers), kept from step to step like the decoder's other
/// step inputs.
#[derive(Default)]
pub(super) struct SampleInputs {
    pairs: ReusableBuffer,
    uniforms: ReusableBuffer,
}

impl GpuDecoder {
    /// [`Decoder::forward_sample`] with the token choice recorded in the step's encoder.
    pub(super) fn forward_sample_on_gpu(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
    ) -> Result<Vec<u32>> {
        self.sample_fed(batch, choices, None, false)?.into_ids()
    }

    /// A sampled step; `feed` and `defer` as in `GpuDecoder::run` (a step the kernels cannot
    /// sample reads back its logits and is sampled on the host, never deferred).
    pub(super) fn sample_fed(
        &mut self,
        batch: &[SequenceStep<'_>],
        choices: &mut [TokenChoice<'_>],
        feed: Option<&Feed>,
        defer: bool,
    ) -> Result<PendingStep> {
        check_choices(batch, choices)?;
        if batch.is_empty() {
            return Ok(PendingStep::new(batch, PendingState::Ready(Vec::new())));
        }
        let Some(plan) = GpuSampling::plan(choices, self.config.vocab_size) else {
            let logits = match self.forward_fed(batch, Readback::Logits, feed, false)? {
                Output::Logits(l) => l,
                Output::Ids(_) | Output::Pending(_) => {
                    unreachable!("a logits read-back returns logits")
                }
            };
            let ids = sample_on_host(&logits, choices);
            return Ok(PendingStep::new(batch, PendingState::Ready(ids)));
        };
        let state = match self.forward_fed(batch, Readback::Sample(&plan), feed, defer)? {
            Output::Ids(ids) => PendingState::Ready(ids),
            Output::Pending(f) => PendingState::Gpu(f),
            Output::Logits(_) => unreachable!("a sampling read-back returns ids"),
        };
        // The draws used the streams' next numbers: move past them, as the CPU would have.
        for c in choices.iter_mut() {
            c.sampler.skip_draw();
        }
        Ok(PendingStep::new(batch, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{Sampler, SamplingConfig};

    fn config(temperature: f32, top_k: usize, top_p: f32, penalty: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: penalty,
            seed: 3,
        }
    }

    fn plan(configs: &[SamplingConfig], histories: &[&[u32]]) -> Option<GpuSampling> {
        let mut samplers: Vec<Sampler> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Sampler::new(c.clone(), i as u64))
            .collect();
        let choices: Vec<TokenChoice<'_>> = samplers
            .iter_mut()
            .zip(histories)
            .map(|(sampler, &history)| TokenChoice { sampler, history })
            .collect();
        GpuSampling::plan(&choices, 10)
    }

    #[test]
    fn the_kernels_take_every_valid_config_shared_by_the_batch() {
        let c = config(0.8, 5, 0.9, 1.0);
        let p = plan(&[c.clone(), c.clone()], &[&[1], &[2]]).expect("on the GPU");
        assert!(p.penalty.is_none());
        let (params, words) = p.draw.expect("a draw");
        assert_eq!(
            (params.temperature, params.top_k, params.top_p),
            (0.8, 5, 0.9)
        );
        // The streams' next numbers, one per row.
        let u = Sampler::new(c.clone(), 1).upcoming_uniform().unwrap();
        assert_eq!(&words[2..], &uniform_words(u).unwrap());

        // The penalty: each distinct in-vocabulary token of each row once.
        let c = config(0.0, 0, 1.0, 1.3);
        let p = plan(&[c.clone(), c], &[&[4, 4, 2, 99], &[7]]).expect("on the GPU");
        assert!(p.draw.is_none(), "greedy: the argmax");
        assert_eq!(p.penalty, Some((1.3, vec![0, 2, 0, 4, 1, 7])));
    }

    #[test]
    fn the_host_samples_mixed_or_refused_configs() {
        let a = config(0.8, 5, 0.9, 1.0);
        let b = config(0.8, 6, 0.9, 1.0);
        assert!(plan(&[a, b], &[&[1], &[1]]).is_none());
        // A temperature whose reciprocal overflows f32.
        assert!(plan(&[config(1e-39, 0, 1.0, 1.0)], &[&[1]]).is_none());
    }
}
