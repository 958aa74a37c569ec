//! Text generation on a session: prompt caching, sampling, streaming and stop
//! conditions.

use std::time::Instant;

use flexserve_tokenizer::{ParkedDecoder, StreamDecoder, Tokenizer};

use crate::model::{LayerHook, Logits, Session};
use crate::sampling::{Sampler, SamplingParams};
use crate::EngineError;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these (not emitted).
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 128, sampling: SamplingParams::default(), stop: Vec::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model emitted an end-of-generation token.
    EndOfGeneration,
    MaxTokens,
    StopString,
    /// The context has no room for another token.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct GenerationStats {
    /// Prompt tokens evaluated (after reusing the cached prefix).
    pub prompt_tokens: usize,
    /// Prompt tokens found already in the cache.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stop: StopReason,
    /// The generated ids, including a final end-of-generation token if any.
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed over the tokens after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// How many leading tokens of `prompt` a cache holding `history` already has
/// evaluated: their common prefix, leaving at least the last prompt token to
/// evaluate so that there are logits to sample from.
pub fn reusable_prefix(history: &[u32], prompt: &[u32]) -> usize {
    let common = history.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    common.min(prompt.len().saturating_sub(1))
}

/// A session plus the token history that its cache holds, so that a new
/// prompt sharing a prefix with the history (the next turn of a chat) only
/// evaluates what is new.
pub struct Generator<'m> {
    session: Session<'m>,
    tokenizer: &'m Tokenizer,
    history: Vec<u32>,
}

impl<'m> Generator<'m> {
    pub fn new(session: Session<'m>, tokenizer: &'m Tokenizer) -> Self {
        Self { session, tokenizer, history: Vec::new() }
    }

    /// Resumes a generator whose session state and history were saved by
    /// [`Generator::into_parts`].
    pub fn resume(session: Session<'m>, tokenizer: &'m Tokenizer, history: Vec<u32>) -> Self {
        let mut history = history;
        history.truncate(session.n_past());
        Self { session, tokenizer, history }
    }

    /// The session (to save its state) and the token history its cache holds.
    pub fn into_parts(self) -> (Session<'m>, Vec<u32>) {
        (self.session, self.history)
    }

    pub fn session(&self) -> &Session<'m> {
        &self.session
    }

    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece
    /// of text as soon as it is certain (complete UTF-8, not part of a stop string).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<GenerationStats, EngineError> {
        self.generate_with(prompt, opts, on_text, &mut |_| Ok(()))
    }

    /// [`Generator::generate`], calling `hook` before each layer of the
    /// prompt's evaluation (see [`Session::eval_with`]) and, as before layer
    /// 0, before each further token; an error from it ends the generation
    /// ([`EngineError::Cancelled`] to stop).
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
        hook: &mut LayerHook<'_>,
    ) -> Result<GenerationStats, EngineError> {
        let Prefilled { mut tokens, mut logits, prompt_tokens, cached_tokens, prefill_secs } =
            self.prefill_with(prompt, opts, hook)?;
        let mut first_token_at = None;
        let stop = loop {
            let room = self.session.n_past() < self.session.n_ctx();
            let next = tokens.step(&logits, room, &mut on_text);
            if first_token_at.is_none() && !tokens.generated().is_empty() {
                first_token_at = Some(Instant::now());
            }
            match next {
                Next::Done(stop) => break stop,
                Next::Evaluate(id) => {
                    hook(0)?;
                    logits = self.session.eval(&[id], Logits::Last)?;
                    self.history.push(id);
                }
            }
        };
        let generated = tokens.into_generated();
        // The decode clock starts at the first sampled token.
        let decode_secs = first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Ok(GenerationStats {
            prompt_tokens,
            cached_tokens,
            generated_tokens: generated.len(),
            prefill_secs,
            decode_secs,
            stop,
            tokens: generated,
        })
    }

    /// The first half of [`Generator::generate_with`]: evaluates what the
    /// cache does not hold of `prompt` and returns the token stream with the
    /// logits to sample its first token from. A caller that decodes several
    /// generations together (continuous batching) takes it from here.
    pub fn prefill_with(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        hook: &mut LayerHook<'_>,
    ) -> Result<Prefilled<'m>, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let reuse = reusable_prefix(&self.history, prompt);
        self.session.truncate(reuse);
        self.history.truncate(reuse);
        let todo = &prompt[reuse..];
        if prompt.len() + 1 > self.session.n_ctx() {
            return Err(EngineError::ContextFull { n_ctx: self.session.n_ctx(), needed: prompt.len() + 1 });
        }
        let tokens = TokenStream::new(self.tokenizer, opts, prompt);
        let t0 = Instant::now();
        let logits = self.session.eval_with(todo, Logits::Last, hook)?;
        self.history.extend_from_slice(todo);
        Ok(Prefilled {
            tokens,
            logits,
            prompt_tokens: todo.len(),
            cached_tokens: reuse,
            prefill_secs: t0.elapsed().as_secs_f64(),
        })
    }
}

/// A prompt evaluated: what [`Generator::prefill_with`] hands on.
pub struct Prefilled<'t> {
    pub tokens: TokenStream<'t>,
    /// The logits to sample the first token from.
    pub logits: Vec<f32>,
    /// Prompt tokens evaluated (after reusing the cached prefix).
    pub prompt_tokens: usize,
    /// Prompt tokens found already in the cache.
    pub cached_tokens: usize,
    pub prefill_secs: f64,
}

/// What to do after a [`TokenStream::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Evaluate this token (the one just sampled) and step again with its logits.
    Evaluate(u32),
    /// The generation is over.
    Done(StopReason),
}

/// The decoding side of a generation, one token at a time: sampling, text
/// that is certain (complete UTF-8, not part of a stop string), stop
/// conditions. [`Generator`] drives one through a session; a batch of them
/// can share one evaluation per step (continuous batching).
pub struct TokenStream<'t> {
    tokenizer: &'t Tokenizer,
    sampler: Sampler,
    decoder: StreamDecoder<'t>,
    stop_strings: Vec<String>,
    max_tokens: usize,
    text: String,
    emitted: usize,
    generated: Vec<u32>,
}

impl<'t> TokenStream<'t> {
    /// A stream for a continuation of `prompt` (which the repetition penalty sees).
    pub fn new(tokenizer: &'t Tokenizer, opts: &GenerateOptions, prompt: &[u32]) -> Self {
        let mut sampler = Sampler::new(opts.sampling.clone());
        sampler.observe(prompt);
        TokenStream {
            tokenizer,
            sampler,
            decoder: StreamDecoder::new(tokenizer),
            stop_strings: opts.stop.clone(),
            max_tokens: opts.max_tokens,
            text: String::new(),
            emitted: 0,
            generated: Vec::new(),
        }
    }

    /// Samples the next token from `logits` and hands `on_text` what became
    /// certain. `room`: whether the cache has a position left for the token.
    pub fn step(&mut self, logits: &[f32], room: bool, on_text: &mut dyn FnMut(&str)) -> Next {
        if self.generated.len() >= self.max_tokens {
            return self.end(StopReason::MaxTokens, on_text);
        }
        let id = self.sampler.sample(logits);
        self.generated.push(id);
        if self.tokenizer.is_eog(id) {
            return self.end(StopReason::EndOfGeneration, on_text);
        }
        self.text.push_str(&self.decoder.push(id));
        if let Some(cut) = find_stop(&self.text, &self.stop_strings) {
            on_text(&self.text[self.emitted..cut]);
            self.emitted = cut;
            return Next::Done(StopReason::StopString);
        }
        let safe = safe_prefix_len(&self.text, &self.stop_strings).max(self.emitted);
        if safe > self.emitted {
            on_text(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        if self.generated.len() == self.max_tokens {
            return self.end(StopReason::MaxTokens, on_text);
        }
        if !room {
            return self.end(StopReason::ContextFull, on_text);
        }
        Next::Evaluate(id)
    }

    /// Ends the stream: what the decoder still holds is text now.
    fn end(&mut self, stop: StopReason, on_text: &mut dyn FnMut(&str)) -> Next {
        self.text.push_str(&self.decoder.finish());
        if self.emitted < self.text.len() {
            on_text(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
        Next::Done(stop)
    }

    /// The tokens sampled so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn into_generated(self) -> Vec<u32> {
        self.generated
    }

    /// The stream without the borrow of the tokenizer, to keep between
    /// decode steps (a generation of a batch that lives across requests).
    pub fn park(self) -> ParkedTokens {
        ParkedTokens {
            sampler: self.sampler,
            decoder: self.decoder.park(),
            stop_strings: self.stop_strings,
            max_tokens: self.max_tokens,
            text: self.text,
            emitted: self.emitted,
            generated: self.generated,
        }
    }
}

/// A [`TokenStream`] parked by [`TokenStream::park`]; [`ParkedTokens::resume`]
/// goes on exactly where it stopped (same sampler state, same pending text).
pub struct ParkedTokens {
    sampler: Sampler,
    decoder: ParkedDecoder,
    stop_strings: Vec<String>,
    max_tokens: usize,
    text: String,
    emitted: usize,
    generated: Vec<u32>,
}

impl ParkedTokens {
    /// The stream again, on the tokenizer it was made with.
    pub fn resume(self, tokenizer: &Tokenizer) -> TokenStream<'_> {
        TokenStream {
            tokenizer,
            sampler: self.sampler,
            decoder: self.decoder.resume(tokenizer),
            stop_strings: self.stop_strings,
            max_tokens: self.max_tokens,
            text: self.text,
            emitted: self.emitted,
            generated: self.generated,
        }
    }

    /// Tokens sampled so far.
    pub fn generated(&self) -> usize {
        self.generated.len()
    }

    /// Wipes the generated text and ids (user data) for a holder that must
    /// not leave them behind when it drops the stream.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        self.text.zeroize();
        self.generated.zeroize();
        self.decoder.pending_mut().zeroize();
    }
}

/// Byte index where the earliest stop string starts, if any occurs.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the prefix of `text` that cannot become part of a stop string.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        for k in (1..s.len()).rev() {
            if k <= text.len()
                && text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.ends_with(&s[..k])
            {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_hold_back_possible_prefixes() {
        let stops = vec!["<END>".to_string()];
        assert_eq!(safe_prefix_len("hello <EN", &stops), 6);
        assert_eq!(safe_prefix_len("hello", &stops), 5);
        assert_eq!(find_stop("ab<END>cd", &stops), Some(2));
        assert_eq!(find_stop("ab", &stops), None);
    }
}
