//! Next-token choice on the GPU, so that a decode step reads back one u32 per sequence
//! instead of a vocabulary of floats:
//!
//! - [`GpuContext::argmax`] (`shaders/sampling.wgsl`): greedy decoding.
//! - [`GpuContext::repetition_penalty`] (`shaders/repetition_penalty.wgsl`): cla-model's
//!   repetition penalty on the logits in place, before either of the others.
//! - [`GpuContext::sample`] (`shaders/sample.wgsl`): temperature, top-k, top-p and a draw
//!   with a uniform number the host supplies per row ([`uniform_words`]), in the order and
//!   with the tie rule of cla-model's CPU sampler, so that the same logits and the same
//!   uniform number give the same token on either (see [`GpuContext::sample`] for where
//!   floating point can still tell them apart).

use crate::context::GpuContext;
use crate::error::{GpuError, Result, ensure_arg};
use crate::ops::{expect, u32_of};
use crate::pipeline::{Bind, Kernel, PipelineKey, render, whole};
use crate::tensor::{DType, GpuTensor};

const SRC: &str = include_str!("../shaders/sampling.wgsl");
const SAMPLE_SRC: &str = include_str!("../shaders/sample.wgsl");
const PENALTY_SRC: &str = include_str!("../shaders/repetition_penalty.wgsl");

/// The largest vocabulary [`GpuContext::sample`] takes: probabilities are summed as 64-bit
/// fixed point with 43 fractional bits, so a row of up to 2^20 ones cannot overflow.
pub const MAX_SAMPLE_VOCAB: usize = 1 << 20;

/// Tokens per workgroup of the sampler's top-k prefilter: a top-k of at most
/// [`PREFILTER_MAX_K`] over a row of 8 chunks or more is first cut chunk by chunk, in
/// parallel, and the draw then walks the candidates (at most a quarter of the row) instead of
/// the row.
const PREFILTER_CHUNK: usize = 1024;
/// The largest top-k the prefilter takes.
const PREFILTER_MAX_K: usize = 256;

/// How [`GpuContext::sample`] picks a token from a row of logits. The transformations are
/// cla-model's `SamplingConfig` without the repetition penalty, in the same order:
/// temperature, then top-k, then top-p, then the draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Softmax temperature: finite, > 0, with a finite reciprocal (greedy decoding is
    /// [`GpuContext::argmax`]).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` (or at least the vocabulary) keeps all.
    pub top_k: usize,
    /// Keep the smallest prefix of the most likely tokens whose probability reaches `top_p`,
    /// in (0, 1]; `1.0` keeps all.
    pub top_p: f32,
}

impl SampleParams {
    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        ensure_arg!(
            t.is_finite() && t > 0.0 && (1.0 / t).is_finite(),
            "sample: temperature must be finite and > 0 with a finite reciprocal, found {t}"
        );
        ensure_arg!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "sample: top_p must be in (0, 1], found {}",
            self.top_p
        );
        Ok(())
    }
}

/// The two words through which [`GpuContext::sample`] reads a uniform number `u` in [0, 1):
/// `u * 2^64` as a little-endian u64. Exact for the 53-bit floats of [0, 1) that a seeded
/// generator gives (`(bits >> 11) * 2^-53`); finer fractions are truncated.
pub fn uniform_words(u: f64) -> Result<[u32; 2]> {
    ensure_arg!(
        (0.0..1.0).contains(&u),
        "sample: a uniform number must be in [0, 1), found {u}"
    );
    let bits = (u * 18_446_744_073_709_551_616.0) as u64;
    Ok([bits as u32, (bits >> 32) as u32])
}

impl GpuContext {
    /// `out[r] = argmax(logits[r, :])` (lowest index on ties, NaNs ignored). `logits` is
    /// `[rows, vocab]` f32, `out` is `[rows]` u32.
    pub fn argmax(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<()> {
        let vocab = *logits.shape.last().unwrap_or(&0);
        ensure_arg!(
            vocab > 0,
            "argmax: empty vocabulary in shape {:?}",
            logits.shape
        );
        let rows = logits.numel() / vocab;
        expect(logits, "argmax logits", DType::F32, rows * vocab)?;
        expect(out, "argmax out", DType::U32, rows)?;
        let key = PipelineKey {
            kernel: "argmax",
            elems: vec![],
            params: vec![],
        };
        let kernel = self.kernel(key, &[Bind::Uniform, Bind::Read, Bind::ReadWrite], |_| {
            Ok(SRC.to_owned())
        })?;
        let params = self.uniform(&[u32_of("rows", rows)?, u32_of("vocab", vocab)?]);
        let (gx, gy) = self.grid(rows as u64)?;
        self.dispatch(
            encoder,
            &kernel,
            &[params.as_entire_binding(), whole(logits), whole(out)],
            (gx, gy, 1),
        );
        Ok(())
    }

    /// Draws one token per row: `out[r]` from `logits[r, :]` (`[rows, vocab]` f32, vocab up
    /// to [`MAX_SAMPLE_VOCAB`]) with the uniform number `uniforms[r]` (`[rows, 2]` u32, see
    /// [`uniform_words`]); `out` is `[rows]` u32.
    ///
    /// The row's tokens are ordered by logit, largest first (f32 total order: `+0.0` before
    /// `-0.0`), lowest index first among equal logits; NaNs are left out. Then, as the CPU
    /// sampler of cla-model does: `p = exp((logit - max) / temperature)` (1 for the max; a
    /// row whose max is infinite gives its max tokens 1 and the others 0); the first `top_k`
    /// tokens of the order are kept; of those, the shortest prefix whose probability reaches
    /// `top_p` of theirs; and the token drawn is the first of the kept prefix whose cumulative
    /// probability exceeds `u` times the kept total. A row of only NaNs gives 0.
    ///
    /// The order, the cuts by count and the tie rule are exact. Probabilities are f32 within
    /// about an ulp of the correctly rounded `exp` and are summed exactly (64-bit fixed point,
    /// 43 fractional bits, so a token below 2^-43 of the max weighs 0): the token differs
    /// from an exact computation's only where `u` (or `top_p`) falls within such a rounding
    /// of a boundary between two tokens' cumulative probabilities.
    ///
    /// One workgroup per row, no sort: each cut is a radix select over the logits' bits (see
    /// the shader). A top-k cut of at most 1024 tokens moves the kept tokens into workgroup
    /// memory for the later passes. A top-k of at most 256 over a row of 8 or more chunks of
    /// 1024 tokens is first cut chunk by chunk, a workgroup each (the row's top-k is among the
    /// chunks'), and the row's workgroup then walks only those candidates: the same tokens,
    /// in less time where rows are long.
    pub fn sample(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        uniforms: &GpuTensor,
        params: &SampleParams,
        out: &GpuTensor,
    ) -> Result<()> {
        self.sample_with(encoder, logits, uniforms, params, out, None)
    }

    /// [`GpuContext::sample`] with the prefilter's chunk length (tests make it short).
    pub(crate) fn sample_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        uniforms: &GpuTensor,
        params: &SampleParams,
        out: &GpuTensor,
        chunk: Option<usize>,
    ) -> Result<()> {
        params.validate()?;
        let vocab = *logits.shape.last().unwrap_or(&0);
        ensure_arg!(
            vocab > 0,
            "sample: empty vocabulary in shape {:?}",
            logits.shape
        );
        ensure_arg!(
            vocab <= MAX_SAMPLE_VOCAB,
            "sample: a vocabulary of {vocab} exceeds the {MAX_SAMPLE_VOCAB} the kernel sums exactly"
        );
        let rows = logits.numel() / vocab;
        expect(logits, "sample logits", DType::F32, rows * vocab)?;
        expect(uniforms, "sample uniforms", DType::U32, rows * 2)?;
        expect(out, "sample out", DType::U32, rows)?;
        self.check_binding("sample logits", (rows * vocab * 4) as u64)?;
        let top_k = if params.top_k >= vocab {
            0
        } else {
            params.top_k
        };
        let (p_words, use_p) = if params.top_p < 1.0 {
            // top_p * 2^64: exact for top_p >= 2^-40 (24-bit mantissa); a smaller top_p
            // keeps the first token either way.
            let f = (f64::from(params.top_p) * 18_446_744_073_709_551_616.0) as u64;
            ([f as u32, (f >> 32) as u32], 1)
        } else {
            ([0, 0], 0)
        };
        let words = [
            u32_of("rows", rows)?,
            u32_of("vocab", vocab)?,
            u32_of("top_k", top_k)?,
            (1.0 / params.temperature).to_bits(),
            p_words[0],
            p_words[1],
            use_p,
            0,
        ];
        let chunk = chunk.unwrap_or(PREFILTER_CHUNK);
        let chunks = vocab.div_ceil(chunk);
        // The prefilter pays where the row is long and the candidates a small part of it: its
        // selections cost a few barriers' latency per pass however few tokens they walk, so
        // at 4 chunks (vocab 4096) it was slower on the H200 (65 -> 83 us for top-k 50),
        // from 32 chunks faster (169 -> 107 us at 32 000, 1.16 ms -> 148 us at 256 000).
        // (Its grid is chunks x rows, so rows beyond one grid dimension take the plain path.)
        let max_dim = self.features().max_workgroups_per_dim as usize;
        if top_k == 0
            || top_k > PREFILTER_MAX_K
            || chunks < 8
            || chunks * top_k * 4 > vocab
            || rows > max_dim
        {
            let kernel = self.sample_kernel(0, chunk)?;
            let uniform = self.uniform(&words);
            let (gx, gy) = self.grid(rows as u64)?;
            let b = [
                uniform.as_entire_binding(),
                whole(logits),
                whole(uniforms),
                whole(out),
            ];
            self.dispatch(encoder, &kernel, &b, (gx, gy, 1));
            return Ok(());
        }
        // At most a quarter of the row per row: within the binding the logits passed.
        let n_cand = chunks * top_k;
        let (bits, idx) = {
            let mut bufs = self
                .sample_candidates
                .lock()
                .map_err(|_| GpuError::Device("sample candidate buffers poisoned".into()))?;
            let (b, i) = &mut *bufs;
            let shape = [rows, n_cand];
            (
                self.tensor_reusing(b, &shape, DType::U32, "cla sample candidates")?,
                self.tensor_reusing(i, &shape, DType::U32, "cla sample candidate ids")?,
            )
        };
        // 1. Each chunk's top_k first tokens.
        let kernel = self.sample_kernel(1, chunk)?;
        let uniform = self.uniform(&words);
        let b = [
            uniform.as_entire_binding(),
            whole(logits),
            whole(uniforms),
            whole(&idx),
            whole(&bits),
        ];
        self.dispatch(
            encoder,
            &kernel,
            &b,
            (chunks as u32, u32_of("rows", rows)?, 1),
        );
        // 2. The draw over each row's candidates.
        let mut cand_words = words;
        cand_words[1] = u32_of("candidates", n_cand)?;
        let kernel = self.sample_kernel(2, chunk)?;
        let uniform = self.uniform(&cand_words);
        let (gx, gy) = self.grid(rows as u64)?;
        let b = [
            uniform.as_entire_binding(),
            whole(&bits),
            whole(uniforms),
            whole(out),
            whole(&idx),
        ];
        self.dispatch(encoder, &kernel, &b, (gx, gy, 1));
        Ok(())
    }

    /// The sampling kernel in `mode` (see `sample.wgsl`).
    fn sample_kernel(&self, mode: u32, chunk: usize) -> Result<std::sync::Arc<Kernel>> {
        let chunk = u32_of("chunk", chunk)?;
        let key = PipelineKey {
            kernel: "sample",
            elems: vec![],
            params: vec![("mode", mode), ("chunk", chunk)],
        };
        // Modes 1 and 2 bind `aux` read-write: mode 1 writes it, and mode 2, which only reads
        // it, is built from the same source.
        let (binds, aux): (&[Bind], &str) = if mode == 0 {
            (
                &[Bind::Uniform, Bind::Read, Bind::Read, Bind::ReadWrite],
                "var<private> aux: array<u32, 1>;",
            )
        } else {
            (
                &[
                    Bind::Uniform,
                    Bind::Read,
                    Bind::Read,
                    Bind::ReadWrite,
                    Bind::ReadWrite,
                ],
                "@group(0) @binding(4) var<storage, read_write> aux: array<u32>;",
            )
        };
        self.kernel(key, binds, |name| {
            render(
                name,
                SAMPLE_SRC,
                &[
                    ("MODE", mode.to_string()),
                    ("CHUNK", chunk.to_string()),
                    ("AUX_DECL", aux.to_owned()),
                ],
            )
        })
    }

    /// Applies a CTRL-style repetition penalty in place: for every `(row, token)` pair of
    /// `pairs` (`[n, 2]` u32), `logits[row, token]` (`[rows, vocab]` f32) is divided by
    /// `penalty` if positive and multiplied by it otherwise, rounded as the f32 arithmetic
    /// of the CPU sampler. The pairs must be distinct (the CPU sampler penalises each token
    /// of a sequence once); a pair outside `logits` is skipped.
    pub fn repetition_penalty(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        pairs: &GpuTensor,
        penalty: f32,
    ) -> Result<()> {
        ensure_arg!(
            penalty.is_finite() && penalty > 0.0,
            "repetition_penalty: the penalty must be finite and > 0, found {penalty}"
        );
        let vocab = *logits.shape.last().unwrap_or(&0);
        ensure_arg!(
            vocab > 0,
            "repetition_penalty: empty vocabulary in shape {:?}",
            logits.shape
        );
        let rows = logits.numel() / vocab;
        expect(
            logits,
            "repetition_penalty logits",
            DType::F32,
            rows * vocab,
        )?;
        ensure_arg!(
            pairs.dtype == DType::U32 && pairs.shape.len() == 2 && pairs.shape[1] == 2,
            "repetition_penalty: pairs must be [n, 2] u32, got {:?} {}",
            pairs.shape,
            pairs.dtype.name()
        );
        let n = pairs.shape[0];
        let key = PipelineKey {
            kernel: "repetition_penalty",
            elems: vec![],
            params: vec![],
        };
        let kernel = self.kernel(key, &[Bind::Uniform, Bind::Read, Bind::ReadWrite], |_| {
            Ok(PENALTY_SRC.to_owned())
        })?;
        let uniform = self.uniform(&[
            u32_of("pairs", n)?,
            u32_of("rows", rows)?,
            u32_of("vocab", vocab)?,
            penalty.to_bits(),
        ]);
        let (gx, gy) = self.grid(n.div_ceil(64) as u64)?;
        self.dispatch(
            encoder,
            &kernel,
            &[uniform.as_entire_binding(), whole(pairs), whole(logits)],
            (gx, gy, 1),
        );
        Ok(())
    }
}

#[cfg(test)]
// Reference implementations index like the math they follow.
#[allow(clippy::needless_range_loop)]
mod tests {
    use proptest::prelude::*;

    use super::{MAX_SAMPLE_VOCAB, SampleParams, uniform_words};
    use crate::context::GpuContext;
    use crate::error::GpuError;
    use crate::testing::{POISON, both_ctx, cases, ctx, values};

    proptest! {
        #![proptest_config(cases(24))]
        #[test]
        fn argmax_matches_cpu(rows in 1usize..6, vocab in 1usize..3000, ties in any::<bool>(), seed: u64) {
            let c = ctx();
            let mut x = values(seed, rows * vocab);
            if ties {
                // Coarse values make equal maxima likely: the lowest index must win.
                for v in &mut x {
                    *v = (*v * 4.0).round();
                }
            }
            if vocab > 3 {
                x[1] = f32::NAN;
            }
            let tl = c.upload_f32(&x, &[rows, vocab]).unwrap();
            let out = c.create_tensor(&[rows], crate::DType::U32, "ids").unwrap();
            c.fill_u32_pattern(&out, POISON);
            let mut enc = c.encoder();
            c.argmax(&mut enc, &tl, &out).unwrap();
            c.submit_and_wait(enc).unwrap();
            let got = c.read_u32(&out).unwrap();
            for r in 0..rows {
                let row = &x[r * vocab..(r + 1) * vocab];
                let mut best = None::<(usize, f32)>;
                for (i, &v) in row.iter().enumerate() {
                    if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                        best = Some((i, v));
                    }
                }
                prop_assert_eq!(got[r] as usize, best.map_or(0, |b| b.0), "row {}", r);
            }
        }
    }

    /// Runs the sampler on `rows x vocab` logits with one uniform number per row, the output
    /// poisoned first.
    fn gpu_sample(
        c: &GpuContext,
        x: &[f32],
        rows: usize,
        vocab: usize,
        params: &SampleParams,
        us: &[f64],
    ) -> Vec<u32> {
        gpu_sample_chunked(c, x, rows, vocab, params, us, None)
    }

    /// `gpu_sample` with the prefilter's chunk length set.
    fn gpu_sample_chunked(
        c: &GpuContext,
        x: &[f32],
        rows: usize,
        vocab: usize,
        params: &SampleParams,
        us: &[f64],
        chunk: Option<usize>,
    ) -> Vec<u32> {
        let tl = c.upload_f32(x, &[rows, vocab]).unwrap();
        let words: Vec<u32> = us.iter().flat_map(|&u| uniform_words(u).unwrap()).collect();
        let tu = c.upload_u32(&words, &[rows, 2]).unwrap();
        let out = c.create_tensor(&[rows], crate::DType::U32, "ids").unwrap();
        c.fill_u32_pattern(&out, POISON);
        let mut enc = c.encoder();
        c.sample_with(&mut enc, &tl, &tu, params, &out, chunk)
            .unwrap();
        c.submit_and_wait(enc).unwrap();
        c.read_u32(&out).unwrap()
    }

    /// Uniform numbers in [0, 1) with 53 random bits, as the CPU sampler draws them.
    fn uniforms(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    /// The naive reference: sort (largest first, f32 total order, lowest index among
    /// equals, NaNs left out), keep `top_k`, weigh by `exp((l - max) / T)` in f64, keep the
    /// nucleus, draw by inverse CDF.
    struct Reference {
        /// Token ids in order, after top-k.
        order: Vec<u32>,
        /// Their weights.
        weights: Vec<f64>,
        /// The token drawn.
        pick: u32,
    }

    fn nucleus(weights: &[f64], top_p: f64) -> usize {
        if top_p >= 1.0 {
            return weights.len();
        }
        let total: f64 = weights.iter().sum();
        let mut cum = 0.0;
        for (j, w) in weights.iter().enumerate() {
            cum += w;
            if cum >= top_p * total {
                return j + 1;
            }
        }
        weights.len()
    }

    fn draw(weights: &[f64], u: f64) -> usize {
        let total: f64 = weights.iter().sum();
        let mut cum = 0.0;
        for (j, w) in weights.iter().enumerate() {
            cum += w;
            if cum > u * total {
                return j;
            }
        }
        weights.len() - 1
    }

    fn reference(row: &[f32], params: &SampleParams, u: f64) -> Option<Reference> {
        let mut c: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if c.is_empty() {
            return None;
        }
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if params.top_k > 0 {
            c.truncate(params.top_k);
        }
        let max = c[0].1;
        let inv_t = 1.0 / params.temperature;
        let weights: Vec<f64> = c
            .iter()
            .map(|&(_, l)| {
                if l.to_bits() == max.to_bits() {
                    1.0
                } else {
                    f64::from((l - max) * inv_t).exp()
                }
            })
            .collect();
        let nucleus = nucleus(&weights, f64::from(params.top_p));
        let pick = c[draw(&weights[..nucleus], u)].0;
        Some(Reference {
            order: c.iter().map(|x| x.0).collect(),
            weights,
            pick,
        })
    }

    /// Relative slack for float rounding: the kernel's probabilities are f32 within about an
    /// ulp of the reference's and are summed exactly, tokens under 2^-43 of the max dropped.
    const SLACK: f64 = 1e-6;

    /// Whether `got` is the reference's token, or one that moving `u` or `top_p` by a
    /// relative `SLACK` would give (a float tie at a boundary between two tokens).
    fn explained(r: &Reference, params: &SampleParams, u: f64, got: u32) -> bool {
        if got == r.pick {
            return true;
        }
        let Some(g) = r.order.iter().position(|&t| t == got) else {
            // Outside the top-k: the cut by count is exact.
            return false;
        };
        let p = f64::from(params.top_p);
        let lo = nucleus(&r.weights, p - SLACK);
        let hi = if p >= 1.0 {
            r.weights.len()
        } else {
            nucleus(&r.weights, p + SLACK)
        };
        (lo.max(g + 1)..=hi).any(|end| {
            let total: f64 = r.weights[..end].iter().sum();
            let before: f64 = r.weights[..g].iter().sum();
            let upto = before + r.weights[g];
            r.weights[g] > 0.0 && before <= (u + SLACK) * total && upto >= (u - SLACK) * total
        })
    }

    fn check_rows(
        x: &[f32],
        rows: usize,
        vocab: usize,
        params: &SampleParams,
        us: &[f64],
        got: &[u32],
    ) -> std::result::Result<usize, TestCaseError> {
        let mut ties = 0;
        for r in 0..rows {
            let row = &x[r * vocab..(r + 1) * vocab];
            prop_assert!((got[r] as usize) < vocab, "row {}: id {:#x}", r, got[r]);
            match reference(row, params, us[r]) {
                None => prop_assert_eq!(got[r], 0, "row {} of NaNs", r),
                Some(want) => {
                    prop_assert!(
                        explained(&want, params, us[r], got[r]),
                        "row {}: got {}, want {} ({:?}, u = {})",
                        r,
                        got[r],
                        want.pick,
                        params,
                        us[r]
                    );
                    if got[r] != want.pick {
                        ties += 1;
                    }
                }
            }
        }
        Ok(ties)
    }

    proptest! {
        #![proptest_config(cases(32))]
        #[test]
        fn sample_matches_the_naive_reference(
            rows in 1usize..5,
            vocab in 1usize..5000,
            scale in prop_oneof![Just(1.0f32), Just(8.0), Just(40.0)],
            temperature in prop_oneof![Just(1.0f32), 0.05f32..3.0],
            k_choice in 0usize..6,
            p_choice in 0usize..4,
            ties in any::<bool>(),
            special in any::<bool>(),
            // The prefilter's chunk length: the default, or short ones that cut even small
            // rows into many chunks (the prefilter runs where top_k fits, see `sample`).
            chunk in prop_oneof![Just(None), (1usize..300).prop_map(Some)],
            seed: u64,
        ) {
            let mut x: Vec<f32> = values(seed, rows * vocab).iter().map(|v| v * scale).collect();
            if ties {
                // Coarse values: equal logits straddle every cut.
                for v in &mut x {
                    *v = (*v * 2.0).round();
                }
            }
            if special {
                for (i, v) in x.iter_mut().enumerate() {
                    if i % 7 == 3 {
                        *v = f32::NEG_INFINITY;
                    } else if i % 11 == 5 {
                        *v = f32::NAN;
                    }
                }
            }
            let top_k = match k_choice {
                0 => 0,
                1 => 1 + (seed % 40) as usize,
                2 => 1024,
                3 => 1025 + (seed % 2000) as usize,
                4 => vocab,
                _ => 1 + (seed as usize >> 8) % vocab,
            };
            let top_p = match p_choice {
                0 => 1.0,
                1 => 1e-30,
                _ => 0.05 + (seed >> 20) as f32 / (1u64 << 44) as f32 * 0.94,
            };
            let params = SampleParams { temperature, top_k, top_p };
            let us = uniforms(seed, rows);
            for c in both_ctx() {
                let got = gpu_sample_chunked(c, &x, rows, vocab, &params, &us, chunk);
                check_rows(&x, rows, vocab, &params, &us, &got)?;
            }
        }
    }

    /// The prefilter runs (its pipeline is built) for a small top-k over a long row, and
    /// keeps every token the draw could pick: ties straddling chunk boundaries, NaNs and
    /// -inf inside chunks, a chunk of only NaNs, top-p after top-k.
    #[test]
    fn the_top_k_prefilter_keeps_what_the_draw_needs() {
        let c = crate::testing::fresh_ctx();
        let (rows, vocab) = (3, 5000);
        let mut x: Vec<f32> = values(3, rows * vocab)
            .iter()
            .map(|v| (v * 6.0).round())
            .collect();
        for (i, v) in x.iter_mut().enumerate() {
            let col = i % vocab;
            if (2048..3072).contains(&col) {
                *v = f32::NAN;
            } else if col % 13 == 4 {
                *v = f32::NEG_INFINITY;
            }
        }
        for (top_k, top_p) in [(1, 1.0), (7, 1.0), (40, 0.95), (250, 0.5)] {
            let params = SampleParams {
                temperature: 0.8,
                top_k,
                top_p,
            };
            for seed in 0..4 {
                let us = uniforms(seed, rows);
                // Chunks of 256: 20 per row, four of them all NaN.
                let got = gpu_sample_chunked(&c, &x, rows, vocab, &params, &us, Some(256));
                check_rows(&x, rows, vocab, &params, &us, &got).unwrap();
            }
        }
        assert!(
            c.pipeline_names()
                .iter()
                .any(|n| n.starts_with("sample_mode1")),
            "the prefilter did not run: {:?}",
            c.pipeline_names()
        );
    }

    #[test]
    fn large_vocabularies_match_the_reference() {
        let vocab = 150_000;
        let rows = 2;
        let x: Vec<f32> = values(11, rows * vocab).iter().map(|v| v * 12.0).collect();
        let us = uniforms(5, rows);
        for params in [
            SampleParams {
                temperature: 0.8,
                top_k: 0,
                top_p: 0.9,
            },
            SampleParams {
                temperature: 1.0,
                top_k: 40,
                top_p: 0.95,
            },
            SampleParams {
                temperature: 1.3,
                top_k: 3000,
                top_p: 1.0,
            },
        ] {
            for c in both_ctx() {
                let got = gpu_sample(c, &x, rows, vocab, &params, &us);
                check_rows(&x, rows, vocab, &params, &us, &got).unwrap();
            }
        }
    }

    #[test]
    fn top_k_1_and_a_tiny_top_p_are_the_argmax() {
        let (rows, vocab) = (4, 2500);
        // Coarse values tie often; `+ 0.0` turns -0.0 into +0.0 (argmax does not order them).
        let x: Vec<f32> = values(3, rows * vocab)
            .iter()
            .map(|v| (v * 6.0).round() + 0.0)
            .collect();
        for c in both_ctx() {
            let tl = c.upload_f32(&x, &[rows, vocab]).unwrap();
            let ids = c.create_tensor(&[rows], crate::DType::U32, "ids").unwrap();
            let mut enc = c.encoder();
            c.argmax(&mut enc, &tl, &ids).unwrap();
            c.submit_and_wait(enc).unwrap();
            let want = c.read_u32(&ids).unwrap();
            for (top_k, top_p) in [(1, 1.0), (1, 0.5), (0, 1e-30), (7, 1e-6)] {
                let params = SampleParams {
                    temperature: 0.7,
                    top_k,
                    top_p,
                };
                for seed in 0..3 {
                    let us = uniforms(seed, rows);
                    assert_eq!(gpu_sample(c, &x, rows, vocab, &params, &us), want);
                }
            }
        }
    }

    #[test]
    fn equal_logits_split_the_unit_interval_by_index() {
        let vocab = 1000;
        let x = vec![0.25f32; vocab];
        for c in both_ctx() {
            // top_p 0.3 is the f32 0.300000012: 300 tokens fall short of it, 301 reach it.
            for (top_k, top_p, kept) in [
                (0, 1.0, 1000),
                (10, 1.0, 10),
                (0, 0.5, 500),
                (2000, 0.3, 301),
            ] {
                let params = SampleParams {
                    temperature: 0.9,
                    top_k,
                    top_p,
                };
                for u in [0.0, 0.5, 0.25, 0.999_999_9, 0.123_456_789] {
                    let got = gpu_sample(c, &x, 1, vocab, &params, &[u]);
                    let want = (u * kept as f64).floor() as u32;
                    assert_eq!(got, [want], "top_k {top_k}, top_p {top_p}, u {u}");
                }
            }
        }
    }

    #[test]
    fn infinities_zeros_and_nans() {
        let inf = f32::INFINITY;
        let ninf = f32::NEG_INFINITY;
        let nan = f32::NAN;
        let all = |t| SampleParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
        };
        let cases: Vec<(Vec<f32>, SampleParams, f64, u32)> = vec![
            // -inf never wins against a finite logit.
            (vec![ninf, 1.0, ninf, 1.0, ninf], all(1.0), 0.99, 3),
            (vec![ninf, 1.0, ninf, 1.0, ninf], all(1.0), 0.0, 1),
            // All -inf: every token weighs the same.
            (vec![ninf; 4], all(1.0), 0.6, 2),
            // +inf takes everything; two of them split it.
            (vec![0.0, inf, 5.0, inf], all(2.0), 0.7, 3),
            (vec![0.0, inf, 5.0, inf], all(2.0), 0.2, 1),
            // +0.0 before -0.0 (total order); top-k 1 keeps +0.0.
            (
                vec![-0.0, 0.0, -1.0],
                SampleParams {
                    temperature: 1.0,
                    top_k: 1,
                    top_p: 1.0,
                },
                0.9,
                1,
            ),
            // With both zeros kept, +0.0 comes first in the order, then -0.0.
            (vec![-0.0, 0.0, ninf], all(1.0), 0.25, 1),
            (vec![-0.0, 0.0, ninf], all(1.0), 0.75, 0),
            // NaNs are never drawn; a row of NaNs gives 0.
            (vec![nan, 2.0, nan], all(1.0), 0.999, 1),
            (vec![nan, nan], all(1.0), 0.5, 0),
        ];
        for c in both_ctx() {
            for (x, params, u, want) in &cases {
                let got = gpu_sample(c, x, 1, x.len(), params, &[*u]);
                assert_eq!(got, [*want], "{x:?} {params:?} u = {u}");
            }
        }
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let c = ctx();
        let tl = c.upload_f32(&[0.0; 6], &[2, 3]).unwrap();
        let tu = c.upload_u32(&[0; 4], &[2, 2]).unwrap();
        let out = c.create_tensor(&[2], crate::DType::U32, "ids").unwrap();
        let ok = SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let run =
            |l: &crate::GpuTensor, u: &crate::GpuTensor, p: &SampleParams, o: &crate::GpuTensor| {
                let mut enc = c.encoder();
                c.sample(&mut enc, l, u, p, o)
            };
        let invalid = |r: crate::Result<()>| matches!(r, Err(GpuError::InvalidArgument(_)));
        assert!(run(&tl, &tu, &ok, &out).is_ok());
        for bad in [
            SampleParams {
                temperature: 0.0,
                ..ok
            },
            SampleParams {
                temperature: -1.0,
                ..ok
            },
            SampleParams {
                temperature: f32::NAN,
                ..ok
            },
            SampleParams {
                temperature: f32::INFINITY,
                ..ok
            },
            SampleParams {
                temperature: 1e-40,
                ..ok
            },
            SampleParams { top_p: 0.0, ..ok },
            SampleParams { top_p: 1.5, ..ok },
            SampleParams {
                top_p: f32::NAN,
                ..ok
            },
        ] {
            assert!(invalid(run(&tl, &tu, &bad, &out)), "{bad:?}");
        }
        let short_u = c.upload_u32(&[0; 2], &[1, 2]).unwrap();
        assert!(invalid(run(&tl, &short_u, &ok, &out)));
        let f32_u = c.upload_f32(&[0.0; 4], &[2, 2]).unwrap();
        assert!(invalid(run(&tl, &f32_u, &ok, &out)));
        let short_out = c.create_tensor(&[1], crate::DType::U32, "ids").unwrap();
        assert!(invalid(run(&tl, &tu, &ok, &short_out)));
        let wide = c
            .create_tensor(&[1, MAX_SAMPLE_VOCAB + 1], crate::DType::F32, "logits")
            .unwrap();
        let one_u = c.upload_u32(&[0; 2], &[1, 2]).unwrap();
        let one_out = c.create_tensor(&[1], crate::DType::U32, "ids").unwrap();
        assert!(invalid(run(&wide, &one_u, &ok, &one_out)));
        for u in [1.0, -0.5, f64::NAN, 2.0] {
            assert!(matches!(
                uniform_words(u),
                Err(GpuError::InvalidArgument(_))
            ));
        }
        assert_eq!(uniform_words(0.5).unwrap(), [0, 0x8000_0000]);
    }

    proptest! {
        #![proptest_config(cases(16))]
        #[test]
        fn repetition_penalty_matches_the_cpu_arithmetic(
            rows in 1usize..4,
            vocab in 1usize..3000,
            penalty in prop_oneof![Just(1.3f32), Just(1.0), Just(2.0), 0.2f32..5.0, 1e-3f32..1e3],
            seed: u64,
        ) {
            let x: Vec<f32> = values(seed, rows * vocab)
                .iter()
                .enumerate()
                .map(|(i, v)| v * [30.0, 1e-3, 1e6][i % 3])
                .collect();
            // Distinct pairs: every third token of each row, plus some outside the buffer.
            let mut pairs = Vec::new();
            for r in 0..rows {
                for t in (seed as usize % 3..vocab).step_by(3) {
                    pairs.extend([r as u32, t as u32]);
                }
            }
            pairs.extend([0, vocab as u32, rows as u32, 0]);
            let mut want = x.clone();
            for pair in pairs.chunks(2) {
                let (r, t) = (pair[0] as usize, pair[1] as usize);
                if r < rows && t < vocab {
                    let v = &mut want[r * vocab + t];
                    *v = if *v > 0.0 { *v / penalty } else { *v * penalty };
                }
            }
            for c in both_ctx() {
                let tl = c.upload_f32(&x, &[rows, vocab]).unwrap();
                let tp = c.upload_u32(&pairs, &[pairs.len() / 2, 2]).unwrap();
                let mut enc = c.encoder();
                c.repetition_penalty(&mut enc, &tl, &tp, penalty).unwrap();
                c.submit_and_wait(enc).unwrap();
                let got = c.read_f32(&tl).unwrap();
                for i in 0..got.len() {
                    prop_assert_eq!(got[i].to_bits(), want[i].to_bits(), "element {}: {} vs {}", i, got[i], want[i]);
                }
            }
        }
    }

    #[test]
    fn repetition_penalty_rejects_bad_arguments() {
        let c = ctx();
        let tl = c.upload_f32(&[1.0; 6], &[2, 3]).unwrap();
        let tp = c.upload_u32(&[0, 1], &[1, 2]).unwrap();
        let run = |l: &crate::GpuTensor, p: &crate::GpuTensor, pen: f32| {
            let mut enc = c.encoder();
            c.repetition_penalty(&mut enc, l, p, pen)
        };
        let invalid = |r: crate::Result<()>| matches!(r, Err(GpuError::InvalidArgument(_)));
        assert!(run(&tl, &tp, 1.2).is_ok());
        for pen in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(invalid(run(&tl, &tp, pen)), "{pen}");
        }
        let flat = c.upload_u32(&[0, 1], &[2]).unwrap();
        assert!(invalid(run(&tl, &flat, 1.2)));
        let f32_pairs = c.upload_f32(&[0.0, 1.0], &[1, 2]).unwrap();
        assert!(invalid(run(&tl, &f32_pairs, 1.2)));
    }
}
