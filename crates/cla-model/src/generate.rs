//! Text generation: batched prefill of the prompts, then token-by-token decode of every
//! unfinished sequence in one batched step, with sampling, stop conditions and streaming.
//!
//! Works on any [`Decoder`]. The KV cache of the decoder must have room for every prompt
//! plus its new tokens; the sequences are freed when generation ends.
//!
//! The streaming callback steers as well as watches: returning [`ControlFlow::Break`] ends
//! generation cleanly (e.g. on Ctrl-C, or when the reader of the output went away), with
//! every token the callback was shown and no other.

use crate::decoder::{Decoder, SequenceId, SequenceStep, TokenChoice};
use crate::error::{ModelError, Result};
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{TextStream, Tokenizer};
use std::ops::ControlFlow;
use std::time::Instant;

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingConfig,
    /// Stop when the model emits one of `config.json`'s `eos_token_id`s.
    pub stop_at_eos: bool,
    /// More token ids that end generation (like EOS).
    pub stop_token_ids: Vec<u32>,
    /// Generation ends when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Start each text prompt with the BOS token (see [`Tokenizer::encode`]).
    pub add_bos: bool,
    /// A prompt longer than the context is an error unless this is set; then its first
    /// tokens are dropped, keeping the last `context - max_new_tokens` (at least 1).
    pub truncate_prompt: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingConfig::default(),
            stop_at_eos: true,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            add_bos: true,
            truncate_prompt: false,
        }
    }
}

/// Why generation of a prompt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// An end-of-sequence (or stop) token was generated; it is the last id, not in the text.
    StopToken(u32),
    /// The text reached a stop string (cut from the text).
    StopString(String),
    /// The sequence filled the model's context.
    ContextFull,
    /// The streaming callback returned [`ControlFlow::Break`] before this prompt ended.
    Stopped,
}

/// Wall-clock times of one prompt's generation. In a batch, the prefill and each decode step
/// run for all prompts together, so these are shared wall-clock times.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GenerationTimings {
    /// Seconds of the (batched) prefill.
    pub prefill_seconds: f64,
    /// Prompt tokens of this prompt.
    pub prefill_tokens: usize,
    /// Seconds of the decode steps this prompt took part in.
    pub decode_seconds: f64,
    /// Tokens fed back through decode steps (generated tokens after the first).
    pub decode_tokens: usize,
}

impl GenerationTimings {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_seconds)
    }

    /// Tokens per second of decode.
    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.decode_tokens, self.decode_seconds)
    }
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// The result for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The prompt's token ids as run (after BOS and any truncation).
    pub prompt_ids: Vec<u32>,
    /// Prompt tokens dropped by truncation.
    pub truncated_tokens: usize,
    /// Generated ids (a final stop token included).
    pub ids: Vec<u32>,
    /// Generated text (empty without a tokenizer), stop strings cut.
    pub text: String,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Timings.
    pub timings: GenerationTimings,
    /// KV-cache bytes the sequence held at the end.
    pub kv_bytes: u64,
}

/// A generated token, reported as soon as it is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent<'a> {
    /// Index of the prompt in the batch.
    pub prompt: usize,
    /// The token, or `None` for the last piece of text released when generation ends.
    pub token: Option<u32>,
    /// Text that became final with this token (may be empty: a character still being spelt
    /// in byte pieces, or text that could be the start of a stop string).
    pub text: &'a str,
}

/// The streaming callback of [`generate`] and [`generate_ids`]: called with every generated
/// token as soon as it is chosen; [`ControlFlow::Break`] stops generation.
///
/// After a `Break` no further token is generated or reported: tokens of the same batched
/// step that were not yet reported are dropped, every prompt still running ends with
/// [`StopReason::Stopped`], and the result holds exactly the tokens the callback was shown.
/// Text held back until then (a character spelt in byte pieces, or what could begin a stop
/// string) is still released, in one last event per prompt with `token: None`, so that the
/// streamed text equals [`Generation::text`]; what those last events return is ignored.
pub type OnToken<'a> = dyn FnMut(TokenEvent<'_>) -> ControlFlow<()> + 'a;

/// Generates a continuation of each text prompt, streaming through `on_token` (which can
/// stop it, see [`OnToken`]).
pub fn generate(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    config: &GenerationConfig,
    on_token: &mut OnToken<'_>,
) -> Result<Vec<Generation>> {
    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p, config.add_bos))
        .collect::<Result<Vec<_>>>()?;
    generate_ids(decoder, Some(tokenizer), &ids, config, on_token)
}

/// Generates a continuation of each prompt given as token ids. Without a tokenizer the
/// texts are empty and stop strings are not available. `on_token` streams and can stop
/// generation (see [`OnToken`]).
pub fn generate_ids(
    decoder: &mut dyn Decoder,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_token: &mut OnToken<'_>,
) -> Result<Vec<Generation>> {
    config.sampling.validate()?;
    if tokenizer.is_none() && !config.stop_strings.is_empty() {
        return Err(ModelError::invalid(
            "stop_strings",
            "stop strings need a tokenizer to decode the text",
        ));
    }
    if config.stop_strings.iter().any(String::is_empty) {
        return Err(ModelError::invalid(
            "stop_strings",
            "a stop string must not be empty",
        ));
    }
    let model = decoder.config().clone();
    let context = model.max_position_embeddings;
    let mut states = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let (prompt_ids, truncated_tokens) = prepare_prompt(prompt, &model, config)?;
        states.push(PromptState {
            stream: TextStream::new(&prompt_ids),
            sampler: Sampler::new(config.sampling.clone(), i as u64),
            history: prompt_ids.clone(),
            generation: Generation {
                prompt_ids,
                truncated_tokens,
                ids: Vec::new(),
                text: String::new(),
                stop_reason: StopReason::MaxNewTokens,
                timings: GenerationTimings::default(),
                kv_bytes: 0,
            },
            emitted: 0,
            seq: None,
            done: config.max_new_tokens == 0,
        });
    }
    let stop_tokens: Vec<u32> = config
        .stop_token_ids
        .iter()
        .chain(if config.stop_at_eos {
            model.eos_token_ids.iter()
        } else {
            [].iter()
        })
        .copied()
        .collect();
    let rules = StopRules {
        stop_tokens,
        stop_strings: &config.stop_strings,
        max_new_tokens: config.max_new_tokens,
        context,
    };

    let mut stream = Stream {
        on_token,
        stop: false,
    };
    let result = run(decoder, tokenizer, &mut states, &rules, &mut stream);
    // Free every sequence, whatever happened.
    let mut free_error = None;
    for s in &mut states {
        if let Some(seq) = s.seq.take() {
            match decoder.sequence_kv_bytes(seq) {
                Ok(b) => s.generation.kv_bytes = b,
                Err(e) => free_error = free_error.or(Some(e)),
            }
            if let Err(e) = decoder.free_sequence(seq) {
                free_error = free_error.or(Some(e));
            }
        }
    }
    result?;
    if let Some(e) = free_error {
        return Err(e);
    }
    Ok(states.into_iter().map(|s| s.generation).collect())
}

/// Checks a prompt and applies truncation.
fn prepare_prompt(
    prompt: &[u32],
    model: &cla_core::ModelConfig,
    config: &GenerationConfig,
) -> Result<(Vec<u32>, usize)> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= model.vocab_size) {
        return Err(ModelError::TokenOutOfRange {
            token: bad,
            vocab: model.vocab_size,
        });
    }
    let context = model.max_position_embeddings;
    if prompt.len() <= context {
        return Ok((prompt.to_vec(), 0));
    }
    if !config.truncate_prompt {
        return Err(ModelError::PromptTooLong {
            len: prompt.len(),
            context,
            reserved: 0,
        });
    }
    let keep = context.saturating_sub(config.max_new_tokens).max(1);
    let dropped = prompt.len() - keep;
    Ok((prompt[dropped..].to_vec(), dropped))
}

struct PromptState {
    stream: TextStream,
    sampler: Sampler,
    /// Prompt and generated ids (for the repetition penalty).
    history: Vec<u32>,
    generation: Generation,
    /// Bytes of `generation.text` already streamed.
    emitted: usize,
    seq: Option<SequenceId>,
    done: bool,
}

/// The callback, and whether it has asked to stop.
struct Stream<'a, 'b> {
    on_token: &'a mut OnToken<'b>,
    stop: bool,
}

impl Stream<'_, '_> {
    fn emit(&mut self, event: TokenEvent<'_>) {
        if (self.on_token)(event).is_break() {
            self.stop = true;
        }
    }
}

struct StopRules<'a> {
    stop_tokens: Vec<u32>,
    stop_strings: &'a [String],
    max_new_tokens: usize,
    context: usize,
}

fn run(
    decoder: &mut dyn Decoder,
    tokenizer: Option<&Tokenizer>,
    states: &mut [PromptState],
    rules: &StopRules<'_>,
    stream: &mut Stream<'_, '_>,
) -> Result<()> {
    // Prefill: every prompt in one batch.
    let active: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
    if active.is_empty() {
        return Ok(());
    }
    for &i in &active {
        states[i].seq = Some(decoder.add_sequence());
    }
    let started = Instant::now();
    let sampled = sample_step(decoder, states, false)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    for (&i, token) in active.iter().zip(sampled) {
        let s = &mut states[i];
        s.generation.timings.prefill_seconds = prefill_seconds;
        s.generation.timings.prefill_tokens = s.generation.prompt_ids.len();
        accept(i, s, token, tokenizer, rules, stream)?;
        if stream.stop {
            return stop_all(states, tokenizer, stream);
        }
    }

    // Decode: one batched step per new token, over the prompts still running.
    if decoder.pipelines_steps()
        && states
            .iter()
            .all(|s| s.sampler.config().repetition_penalty == 1.0)
    {
        return decode_pipelined(decoder, tokenizer, states, rules, stream);
    }
    loop {
        let active: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
        if active.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let sampled = sample_step(decoder, states, true)?;
        let seconds = started.elapsed().as_secs_f64();
        for (&i, token) in active.iter().zip(sampled) {
            let s = &mut states[i];
            s.generation.timings.decode_seconds += seconds;
            s.generation.timings.decode_tokens += 1;
            accept(i, s, token, tokenizer, rules, stream)?;
            if stream.stop {
                return stop_all(states, tokenizer, stream);
            }
        }
    }
}

/// Decoding on a backend that pipelines ([`Decoder::pipelines_steps`]), without a
/// repetition penalty (which needs each token before the next step): each step is submitted
/// before the previous one's tokens are read back, taking them where the device left them
/// ([`Decoder::submit_greedy_after`], [`Decoder::submit_sample_after`]), so that the host
/// prepares step n + 1 while the device runs step n. The tokens are the same as one step at
/// a time (a sampler's stream moves on by one draw per step either way). A prompt whose token
/// turns out to end it (a stop token or string, or the callback) was already in the next
/// step: that step's position is given back and its token ignored. Prompts that the length
/// limits end are left out of the next step in advance.
fn decode_pipelined(
    decoder: &mut dyn Decoder,
    tokenizer: Option<&Tokenizer>,
    states: &mut [PromptState],
    rules: &StopRules<'_>,
    stream: &mut Stream<'_, '_>,
) -> Result<()> {
    let seq = |s: &PromptState| s.seq.expect("added before the prefill");
    // The prompts of the step in flight, in its order.
    let mut rows: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let greedy = states.iter().all(|s| s.sampler.config().is_plain_argmax());
    let feed: Vec<[u32; 1]> = rows
        .iter()
        .map(|&i| {
            [*states[i]
                .generation
                .ids
                .last()
                .expect("the prefill chose a token")]
        })
        .collect();
    let steps: Vec<_> = rows
        .iter()
        .zip(&feed)
        .map(|(&i, t)| SequenceStep::last(seq(&states[i]), t))
        .collect();
    let mut pending = if greedy {
        decoder.submit_greedy(&steps)?
    } else {
        decoder.submit_sample(&steps, &mut choices_of(states, &rows))?
    };
    let mut last = Instant::now();
    loop {
        // The prompts that will feed back the token `pending` chooses for them, whatever it
        // is: those still running that the length limits do not end with it.
        let next_rows: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|&i| {
                let g = &states[i].generation;
                !states[i].done
                    && g.ids.len() + 1 < rules.max_new_tokens
                    && g.prompt_ids.len() + g.ids.len() + 1 < rules.context
            })
            .collect();
        let next = if next_rows.is_empty() {
            None
        } else {
            let seqs: Vec<_> = next_rows.iter().map(|&i| seq(&states[i])).collect();
            Some(if greedy {
                decoder.submit_greedy_after(&pending, &seqs)?
            } else {
                let mut choices = choices_of(states, &next_rows);
                decoder.submit_sample_after(&pending, &seqs, &mut choices)?
            })
        };
        let ids = decoder.wait_step(pending)?;
        let now = Instant::now();
        let seconds = (now - last).as_secs_f64();
        last = now;
        for (&i, token) in rows.iter().zip(ids) {
            let s = &mut states[i];
            if s.done {
                // Ended by the previous step's token; this one was ahead of knowing it.
                continue;
            }
            s.generation.timings.decode_seconds += seconds;
            s.generation.timings.decode_tokens += 1;
            accept(i, s, token, tokenizer, rules, stream)?;
            if stream.stop {
                // Every prompt of the next step gives its position back.
                for &j in &next_rows {
                    decoder.truncate_sequence(seq(&states[j]), 1)?;
                }
                return stop_all(states, tokenizer, stream);
            }
        }
        let Some(next) = next else {
            return Ok(());
        };
        for &i in &next_rows {
            if states[i].done {
                decoder.truncate_sequence(seq(&states[i]), 1)?;
            }
        }
        pending = next;
        rows = next_rows;
    }
}

/// The token choices of the prompts `rows` (ascending indices), in that order.
fn choices_of<'a>(states: &'a mut [PromptState], rows: &[usize]) -> Vec<TokenChoice<'a>> {
    let mut wanted = vec![false; states.len()];
    for &i in rows {
        wanted[i] = true;
    }
    states
        .iter_mut()
        .zip(wanted)
        .filter(|(_, w)| *w)
        .map(|(s, _)| TokenChoice {
            sampler: &mut s.sampler,
            history: s.history.as_slice(),
        })
        .collect()
}

/// Runs one batched step over the prompts still running (their whole prompts for the
/// prefill, their last token when `decode`) and returns each one's next token. The backend
/// picks the tokens where the logits are ([`Decoder::forward_sample`], and for plain argmax
/// decoding [`Decoder::forward_greedy`]), so a GPU step reads back token ids, not logits.
fn sample_step(
    decoder: &mut dyn Decoder,
    states: &mut [PromptState],
    decode: bool,
) -> Result<Vec<u32>> {
    let mut steps = Vec::new();
    let mut choices = Vec::new();
    for s in states.iter_mut().filter(|s| !s.done) {
        let PromptState {
            sampler,
            history,
            generation,
            seq,
            ..
        } = s;
        let seq = seq.expect("added");
        steps.push(if decode {
            SequenceStep::last(seq, &generation.ids[generation.ids.len() - 1..])
        } else {
            SequenceStep::last(seq, &generation.prompt_ids)
        });
        choices.push(TokenChoice {
            sampler,
            history: history.as_slice(),
        });
    }
    if decode && choices[0].sampler.config().is_plain_argmax() {
        decoder.forward_greedy(&steps)
    } else {
        decoder.forward_sample(&steps, &mut choices)
    }
}

/// Ends every prompt still running after the callback asked to stop.
fn stop_all(
    states: &mut [PromptState],
    tokenizer: Option<&Tokenizer>,
    stream: &mut Stream<'_, '_>,
) -> Result<()> {
    for (i, s) in states.iter_mut().enumerate() {
        if !s.done {
            finish(i, s, StopReason::Stopped, tokenizer, stream)?;
        }
    }
    Ok(())
}

/// Records a sampled token, streams its text and decides whether the prompt is done.
fn accept(
    index: usize,
    s: &mut PromptState,
    token: u32,
    tokenizer: Option<&Tokenizer>,
    rules: &StopRules<'_>,
    stream: &mut Stream<'_, '_>,
) -> Result<()> {
    s.generation.ids.push(token);
    s.history.push(token);
    if rules.stop_tokens.contains(&token) {
        stream.emit(TokenEvent {
            prompt: index,
            token: Some(token),
            text: "",
        });
        return finish(index, s, StopReason::StopToken(token), tokenizer, stream);
    }
    if let Some(tok) = tokenizer {
        let piece = s.stream.push(tok, token)?;
        s.generation.text.push_str(&piece);
    }
    if let Some(stop) = cut_at_stop_string(&mut s.generation.text, rules.stop_strings) {
        let released = &s.generation.text[s.emitted..];
        stream.emit(TokenEvent {
            prompt: index,
            token: Some(token),
            text: released,
        });
        s.emitted = s.generation.text.len();
        s.done = true;
        s.generation.stop_reason = StopReason::StopString(stop);
        return Ok(());
    }
    let safe = safe_to_release(&s.generation.text, rules.stop_strings).max(s.emitted);
    stream.emit(TokenEvent {
        prompt: index,
        token: Some(token),
        text: &s.generation.text[s.emitted..safe],
    });
    s.emitted = safe;
    let held = s.generation.prompt_ids.len() + s.generation.ids.len();
    if s.generation.ids.len() >= rules.max_new_tokens {
        finish(index, s, StopReason::MaxNewTokens, tokenizer, stream)
    } else if held >= rules.context {
        // The new token would need position `context` to be fed back.
        finish(index, s, StopReason::ContextFull, tokenizer, stream)
    } else {
        Ok(())
    }
}

/// Ends a prompt: releases any held-back text.
fn finish(
    index: usize,
    s: &mut PromptState,
    reason: StopReason,
    tokenizer: Option<&Tokenizer>,
    stream: &mut Stream<'_, '_>,
) -> Result<()> {
    if let Some(tok) = tokenizer {
        let rest = s.stream.finish(tok)?;
        s.generation.text.push_str(&rest);
    }
    if s.emitted < s.generation.text.len() {
        stream.emit(TokenEvent {
            prompt: index,
            token: None,
            text: &s.generation.text[s.emitted..],
        });
        s.emitted = s.generation.text.len();
    }
    s.generation.stop_reason = reason;
    s.done = true;
    Ok(())
}

/// Cuts `text` before the earliest stop string it contains; returns that string.
fn cut_at_stop_string(text: &mut String, stops: &[String]) -> Option<String> {
    let (at, stop) = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, _)| *at)?;
    text.truncate(at);
    Some(stop.clone())
}

/// The length of the prefix of `text` that cannot become part of a stop string: a suffix
/// that is the beginning of a stop string is held back until the next token decides.
fn safe_to_release(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest);
    text.char_indices()
        .map(|(i, _)| i)
        .skip_while(|&i| i < from)
        .find(|&i| {
            let tail = &text[i..];
            stops.iter().any(|s| s.starts_with(tail))
        })
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_and_hold_back() {
        let stops = vec!["\n\n".to_string(), "THE END".to_string()];
        let mut t = "once\n\nupon".to_string();
        assert_eq!(cut_at_stop_string(&mut t, &stops), Some("\n\n".into()));
        assert_eq!(t, "once");
        assert_eq!(safe_to_release("abc THE E", &stops), 4);
        assert_eq!(safe_to_release("abc\n", &stops), 3);
        assert_eq!(safe_to_release("abc", &stops), 3);
        assert_eq!(safe_to_release("é", &[]), "é".len());
    }
}
