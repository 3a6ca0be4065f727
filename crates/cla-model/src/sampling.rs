//! Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus) and a
//! repetition penalty, driven by a seeded [`SplitMix64`] so that the same seed gives the
//! same text.
//!
//! The order of the transformations is Hugging Face `generate`'s: repetition penalty,
//! then temperature, then top-k, then top-p, then a draw. A temperature of 0 means greedy
//! (argmax after the repetition penalty; ties go to the lowest id).
//!
//! The draw walks the kept tokens from the most likely down (equal logits by lowest id
//! first) and takes the first whose cumulative probability exceeds `u` times the kept total,
//! `u` one uniform number of the stream per non-greedy token. A backend that picks tokens
//! where the logits are (the GPU, see [`crate::Decoder::forward_sample`]) takes that number
//! from the sampler ([`Sampler::upcoming_uniform`], then [`Sampler::skip_draw`]) and follows
//! the same order, so that both pick the same token from the same logits.

use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0.0` selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`0` = no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (`1.0` = no limit).
    pub top_p: f32,
    /// CTRL-style repetition penalty (Keskar et al. 2019) on every token already in the
    /// sequence, prompt included: positive logits are divided by it, negative ones
    /// multiplied (`1.0` = off).
    pub repetition_penalty: f32,
    /// Seed of the random generator (each prompt of a batch derives its own stream).
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// Greedy decoding.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding (argmax).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether this config always picks the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether the next token is exactly the argmax of the logits: greedy with no
    /// repetition penalty, so a backend may pick it where the logits are (on the GPU).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0
    }

    /// Checks every setting's domain.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::invalid(
                "temperature",
                format!("must be a finite number >= 0, found {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::invalid(
                "top_p",
                format!("must be in (0, 1], found {}", self.top_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(ModelError::invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, found {}",
                    self.repetition_penalty
                ),
            ));
        }
        Ok(())
    }
}

/// A token picker with its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
    /// Scratch: candidate (id, value) pairs.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// The settings this sampler follows.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// A sampler for `config`, its stream seeded by `config.seed` and `stream` (e.g. the
    /// prompt's index in a batch).
    pub fn new(config: SamplingConfig, stream: u64) -> Self {
        let seed = config.seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self {
            config,
            rng: SplitMix64::new(seed),
            candidates: Vec::new(),
        }
    }

    /// The uniform number in [0, 1) the next [`Sampler::sample`] will draw with, without
    /// drawing it; `None` for a greedy config, which draws none.
    pub fn upcoming_uniform(&self) -> Option<f64> {
        (!self.config.is_greedy()).then(|| self.rng.clone().next_f64())
    }

    /// Moves the stream past the number [`Sampler::upcoming_uniform`] shows, as a
    /// [`Sampler::sample`] call would: for a token picked elsewhere with that number.
    pub fn skip_draw(&mut self) {
        if !self.config.is_greedy() {
            self.rng.next_f64();
        }
    }

    /// Picks the next token from `logits` (one per vocabulary entry); `history` holds the
    /// tokens so far (prompt and generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.config;
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if c.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let v = &mut self.candidates[t as usize].1;
                    *v = if *v > 0.0 {
                        *v / c.repetition_penalty
                    } else {
                        *v * c.repetition_penalty
                    };
                }
            }
        }
        if c.is_greedy() {
            return argmax(&self.candidates);
        }
        // Most likely first; ties by id so that the order (and the draw) is deterministic.
        self.candidates
            .sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            self.candidates.truncate(c.top_k);
        }
        let max = self.candidates[0].1;
        let inv_t = 1.0 / c.temperature;
        let mut total = 0.0f64;
        for cand in &mut self.candidates {
            let p = (((cand.1 - max) * inv_t) as f64).exp();
            cand.1 = p as f32;
            total += p;
        }
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = self.candidates.len();
            for (i, cand) in self.candidates.iter().enumerate() {
                cumulative += cand.1 as f64 / total;
                if cumulative >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = self.candidates.iter().map(|c| c.1 as f64).sum();
        }
        let mut u = self.rng.next_f64() * total;
        for cand in &self.candidates {
            u -= cand.1 as f64;
            if u < 0.0 {
                return cand.0;
            }
        }
        self.candidates.last().expect("at least one candidate").0
    }
}

/// The id of the largest value; the lowest id among equals.
fn argmax(candidates: &[(u32, f32)]) -> u32 {
    let mut best = candidates[0];
    for &c in &candidates[1..] {
        if c.1 > best.1 {
            best = c;
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_the_first_of_ties() {
        let mut s = Sampler::new(SamplingConfig::greedy(), 0);
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_moves_greedy_off_a_repeated_token() {
        let c = SamplingConfig {
            repetition_penalty: 2.0,
            ..SamplingConfig::greedy()
        };
        let mut s = Sampler::new(c, 0);
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1, 1]), 2);
        // Negative logits are pushed further down.
        assert_eq!(s.sample(&[-1.0, -0.6, -3.0], &[1]), 0);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0, 1.9, 0.0, -1.0, 1.8];
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 3), 0);
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits, &[]), 0 | 1));
        }
        // p(0) ~ 0.37, p(1) ~ 0.33: top_p 0.5 keeps exactly those two.
        let mut s = Sampler::new(cfg(1.0, 0, 0.5, 3), 0);
        let mut seen = [0; 5];
        for _ in 0..400 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] + seen[3] + seen[4] == 0);
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_follow_the_softmax() {
        let logits = [0.0, (2.0f32).ln(), (3.0f32).ln()];
        let draw = |seed| {
            let mut s = Sampler::new(cfg(1.0, 0, 1.0, seed), 0);
            (0..3000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
        let d = draw(9);
        let frac = |t| d.iter().filter(|&&x| x == t).count() as f64 / d.len() as f64;
        for (t, want) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            assert!((frac(t) - want).abs() < 0.03, "token {t}: {}", frac(t));
        }
    }

    #[test]
    fn the_upcoming_uniform_is_the_one_sample_draws() {
        let logits = [0.3, -1.0, 2.0, 0.5, 0.0];
        let mut a = Sampler::new(cfg(0.8, 3, 0.9, 5), 2);
        let mut b = a.clone();
        for _ in 0..50 {
            let u = a.upcoming_uniform().expect("not greedy");
            assert_eq!(a.upcoming_uniform(), Some(u), "peeking draws nothing");
            let direct = a.sample(&logits, &[]);
            // The same number, taken through the peek and the skip.
            b.skip_draw();
            assert_eq!(b.upcoming_uniform(), a.upcoming_uniform());
            assert!(u < 1.0 && direct < 5);
        }
        let mut g = Sampler::new(SamplingConfig::greedy(), 0);
        assert_eq!(g.upcoming_uniform(), None);
        g.skip_draw();
        assert_eq!(g.sample(&logits, &[]), 2);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(cfg(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(cfg(1.0, 0, 0.0, 0).validate().is_err());
        assert!(cfg(1.0, 0, 1.5, 0).validate().is_err());
        assert!(cfg(0.7, 40, 0.9, 0).validate().is_ok());
    }
}
