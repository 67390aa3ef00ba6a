//! The generation loop: prefill, then one decode step per token, with stop conditions and timings.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::forward::{KvCache, Transformer};
use crate::linear::LinearOps;
use crate::sampling::{Sampler, SamplingParams};

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt, already tokenized.
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Tokens that end the generation (included in the output).
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token was generated.
    Eos,
    /// `max_tokens` were generated.
    Length,
    /// The model's context is full.
    Context,
    /// The caller stopped it (e.g. the text reached a stop sequence).
    Stopped,
}

/// The generated tokens with timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, the stop token included.
    pub ids: Vec<u32>,
    pub stop_reason: StopReason,
    /// Time to run the prompt and pick the first token.
    pub prefill_ms: f64,
    /// Time of all later steps.
    pub decode_ms: f64,
    /// Decode steps per second (tokens after the first).
    pub decode_tok_per_s: f64,
    /// Prompt tokens run per second (the reused ones not counted).
    pub prefill_tok_per_s: f64,
    /// Leading prompt tokens whose keys and values came from a cache instead of being run.
    pub cached_tokens: usize,
}

impl Generation {
    /// The generated ids the text shows: without the stop token that ended it, if one did.
    pub fn shown_ids(&self) -> &[u32] {
        match self.stop_reason {
            StopReason::Eos => &self.ids[..self.ids.len().saturating_sub(1)],
            _ => &self.ids,
        }
    }

    /// The generation's text: its shown ids, ending before the first of `stops` it contains.
    pub fn text(
        &self,
        tokenizer: &crate::Tokenizer,
        stops: &[String],
    ) -> Result<String, EngineError> {
        let mut text = tokenizer.decode(self.shown_ids())?;
        if let Some(cut) = first_stop(stops, &text) {
            text.truncate(cut);
        }
        Ok(text)
    }
}

/// Where the first of `stops` (empty ones ignored) begins in `text`, if any: where a
/// generation's text ends.
pub fn first_stop(stops: &[String], text: &str) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Sees the logits each token was picked from.
pub type LogitsHook<'a> = &'a mut dyn FnMut(&[f32]);

/// Generates from `req`, calling `on_token` with each new id as soon as it is chosen.
/// `on_logits`, if given, sees the logits each token was picked from.
pub fn generate(
    model: &Transformer,
    linear: &mut dyn LinearOps,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32) -> Result<(), EngineError>,
    on_logits: Option<LogitsHook<'_>>,
) -> Result<Generation, EngineError> {
    generate_until(
        model,
        linear,
        req,
        |id| on_token(id).map(|()| ControlFlow::Continue(())),
        on_logits,
    )
}

/// As [`generate`], where `on_token` may also end the generation after a token
/// ([`StopReason::Stopped`]) by answering `ControlFlow::Break`.
pub fn generate_until(
    model: &Transformer,
    linear: &mut dyn LinearOps,
    req: &GenerateRequest,
    on_token: impl FnMut(u32) -> Result<ControlFlow<()>, EngineError>,
    on_logits: Option<LogitsHook<'_>>,
) -> Result<Generation, EngineError> {
    let mut cache = model.new_cache();
    generate_cached(model, linear, req, &mut cache, on_token, on_logits)
}

/// As [`generate_until`], continuing `cache`, which holds the keys and values of the prompt's
/// first `cache.len()` tokens (fewer than the whole prompt): only the rest of the prompt runs.
///
/// Afterwards `cache` holds the positions that ran, in order: the prompt, then every generated
/// id but the last (which was never run). [`cached_ids`] names them.
pub fn generate_cached(
    model: &Transformer,
    linear: &mut dyn LinearOps,
    req: &GenerateRequest,
    cache: &mut KvCache,
    mut on_token: impl FnMut(u32) -> Result<ControlFlow<()>, EngineError>,
    mut on_logits: Option<LogitsHook<'_>>,
) -> Result<Generation, EngineError> {
    if req.prompt_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    // A prompt the context cannot hold is the tenant's error, not an empty success.
    if req.prompt_ids.len() > cache.capacity() {
        return Err(EngineError::ContextLengthExceeded {
            prompt: req.prompt_ids.len(),
            max: cache.capacity(),
        });
    }
    let cached = cache.len();
    if cached >= req.prompt_ids.len() {
        return Err(EngineError::BadOp {
            op: "generate".into(),
            reason: format!(
                "a cache of {cached} positions for a prompt of {} tokens: the last must run",
                req.prompt_ids.len()
            ),
        });
    }
    let mut ids = Vec::new();
    let mut stop_reason = StopReason::Length;

    let t0 = Instant::now();
    let mut prefill_ms = 0.0;
    let mut t_decode = t0;
    let mut input = req.prompt_ids[cached..].to_vec();
    // The prefill's passes but the last: their logits are not needed.
    let mut parts = linear.prefill_parts(input.len());
    if parts.iter().sum::<usize>() != input.len() || parts.contains(&0) {
        return Err(EngineError::BadOp {
            op: "prefill".into(),
            reason: format!("passes {parts:?} for {} tokens", input.len()),
        });
    }
    parts.pop();
    for part in parts {
        model.forward(linear, cache, &input[..part])?;
        input.drain(..part);
    }
    while ids.len() < req.max_tokens {
        if cache.len() + input.len() > cache.capacity() {
            stop_reason = StopReason::Context;
            break;
        }
        let logits = model.forward(linear, cache, &input)?;
        if let Some(f) = on_logits.as_mut() {
            f(&logits);
        }
        let next = sampler.sample(&logits);
        if ids.is_empty() {
            prefill_ms = ms(t0);
            t_decode = Instant::now();
        }
        ids.push(next);
        let flow = on_token(next)?;
        if req.stop_ids.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        if flow.is_break() {
            stop_reason = StopReason::Stopped;
            break;
        }
        input = vec![next];
    }
    let decode_ms = if ids.len() > 1 { ms(t_decode) } else { 0.0 };
    let steps = ids.len().saturating_sub(1) as f64;
    Ok(Generation {
        prompt_ids: req.prompt_ids.clone(),
        stop_reason,
        prefill_ms,
        decode_ms,
        decode_tok_per_s: if decode_ms > 0.0 {
            steps / (decode_ms / 1e3)
        } else {
            0.0
        },
        prefill_tok_per_s: if prefill_ms > 0.0 {
            (req.prompt_ids.len() - cached) as f64 / (prefill_ms / 1e3)
        } else {
            0.0
        },
        cached_tokens: cached,
        ids,
    })
}

/// The tokens of the first `len` positions a generation ran: its prompt, then its ids.
pub fn cached_ids(prompt: &[u32], ids: &[u32], len: usize) -> Vec<u32> {
    prompt.iter().chain(ids).take(len).copied().collect()
}
