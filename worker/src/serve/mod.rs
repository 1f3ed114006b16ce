//! `worker serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/metrics`) for any model this code loads, to inspect a student or to use one as
//! another campaign's judge; and [`ServedModel`], the loaded model with its chat template and stop
//! tokens, which also writes the campaign's answers and is the local judge.
//!
//! `http.rs` is the axum shell (routes, server-sent events, a blocking generator feeding a
//! channel), `openai.rs` the request and response shapes, `text.rs` incremental decoding and
//! stop strings.

mod http;
pub mod openai;
pub mod text;

use std::path::Path;
use std::sync::atomic::AtomicU64;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

pub use http::{router, serve};

use crate::model::chat::{self, ChatTemplate, ChatTemplateError, Message, TemplateChoice};
use crate::model::generate::{generate_with, FinishReason, SamplingParams, Step};
use crate::model::generation_config::{GenerationConfig, GenerationConfigError, Reading};
use crate::model::io::{load_dir, ModelIoError};
use crate::model::tokenizer;
use crate::model::Llama;
use text::{StopMatcher, TextDecoder};

/// Why a model cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelIoError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error(transparent)]
    GenerationConfig(#[from] GenerationConfigError),
}

/// How to load a model for serving.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The model id clients name (default: the file or folder name).
    pub name: Option<String>,
    /// More ids it answers to (`--served-model-name`), each listed by `/v1/models`.
    pub aliases: Vec<String>,
    pub chat_template: TemplateChoice,
    /// Apply `generation_config.json`'s sampling fields to requests that leave them out (as
    /// vLLM does; `worker serve`), refusing a model whose file asks for what is not implemented.
    /// Off: only its stop tokens are used; requests get OpenAI's defaults, campaign answers are
    /// greedy.
    pub generation_defaults: bool,
}

/// A loaded model with what chatting with it needs.
pub struct ServedModel {
    pub name: String,
    pub aliases: Vec<String>,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    /// Generation ends at these: the tokenizer's EOS and generation_config's `eos_token_id`.
    pub stop_tokens: Vec<u32>,
    /// Sampling defaults for requests (when [`ServeOptions::generation_defaults`]).
    pub defaults: Option<GenerationConfig>,
    /// Raw bytes of every token (logprobs' `bytes`).
    token_bytes: Vec<Vec<u8>>,
    next_id: AtomicU64,
    metrics: http::Counters,
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelIoError {
    ModelIoError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Loads a Hugging Face directory (with `tokenizer.json`) or a `.gguf` file for serving, with
/// its chat template resolved ([`chat::resolve`]: a model without one is refused) and its stop
/// tokens.
pub fn load_served(path: &Path, opts: ServeOptions) -> Result<ServedModel, LoadError> {
    let name = opts.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let (model, tok, templates, generation) = if path.is_dir() {
        let model = load_dir(path, DType::F32, &Device::Cpu)?;
        let tok = tokenizer::load(&path.join("tokenizer.json"))
            .map_err(|e| invalid(path, format!("{e}; serving needs tokenizer.json")))?;
        let templates = chat::ModelTemplates::from_dir(path)?;
        let reading = if opts.generation_defaults {
            Reading::Everything
        } else {
            Reading::StopTokens
        };
        (
            model,
            tok,
            templates,
            GenerationConfig::from_dir(path, reading)?,
        )
    } else {
        let g = crate::model::gguf::load_gguf(path, DType::F32, &Device::Cpu)?;
        let tok = g.tokenizer.ok_or_else(|| {
            invalid(
                path,
                "its tokenizer could not be rebuilt from the GGUF metadata; convert it and add a tokenizer.json",
            )
        })?;
        let templates =
            chat::ModelTemplates::from_gguf(path, g.chat_template, g.bos_token, g.eos_token);
        (g.model, tok, templates, GenerationConfig::default())
    };
    let chat = chat::resolve(&templates, &opts.chat_template)?;
    let mut stop_tokens: Vec<u32> = chat
        .eos_token()
        .and_then(|e| tok.token_to_id(e))
        .into_iter()
        .collect();
    for id in &generation.eos_token_ids {
        if !stop_tokens.contains(id) {
            stop_tokens.push(*id);
        }
    }
    if stop_tokens.is_empty() {
        tracing::warn!(model = %path.display(), "the model names no EOS token: answers end only at max_tokens or a stop string");
    }
    tracing::info!(model = %path.display(), chat_template = %chat.source, stop_tokens = ?stop_tokens, "loaded for serving");
    let mut aliases = Vec::new();
    for a in opts.aliases {
        if a != name && !aliases.contains(&a) {
            aliases.push(a);
        }
    }
    Ok(ServedModel {
        name,
        aliases,
        token_bytes: tokenizer::token_bytes(&tok),
        model,
        tokenizer: tok,
        chat,
        stop_tokens,
        defaults: opts.generation_defaults.then_some(generation),
        next_id: AtomicU64::new(1),
        metrics: http::Counters::default(),
    })
}

/// One generated token for logprobs: its text, raw bytes, log-probability and the most likely
/// alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string (`finish_reason: "stop"`).
    Stop,
    /// The token budget (`"length"`).
    Length,
    /// The receiver went away; nothing more is wanted.
    Cancelled,
}

impl Finish {
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length | Finish::Cancelled => "length",
        }
    }
}

/// What a finished generation reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub finish: Finish,
    /// Generated tokens, a final stop token included.
    pub completion_tokens: usize,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// One per token of the text (when logprobs were asked for).
    pub logprobs: Vec<TokenInfo>,
}

impl ServedModel {
    /// The ids this server answers to: its name, then its aliases.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// A chat rendered with the model's template (with the generation prompt) and tokenized as
    /// transformers does (no extra special tokens).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, String> {
        let prompt = self
            .chat
            .render(messages, true)
            .map_err(|e| e.to_string())?;
        self.tokenize(&prompt, false)
    }

    /// Text tokenized, with the tokenizer's own special tokens (BOS) when `add_special`.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        let ids =
            tokenizer::encode(&self.tokenizer, text, add_special).map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Err("the prompt is empty".into());
        }
        Ok(ids)
    }

    /// The context length a prompt and its answer must fit in.
    pub fn context_length(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn token_info(&self, step: &Step) -> TokenInfo {
        let describe = |id: u32| {
            let bytes = self
                .token_bytes
                .get(id as usize)
                .cloned()
                .unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (text, bytes) = describe(step.token);
        TokenInfo {
            text,
            bytes,
            logprob: step.logprob.unwrap_or(f32::NAN),
            top: step
                .top
                .iter()
                .map(|t| {
                    let (s, b) = describe(t.token);
                    (s, b, t.logprob)
                })
                .collect(),
        }
    }

    /// Generates after `prompt`, handing out text as it is decided: `on_delta(text, tokens)`
    /// gets text that never splits a character or shows a stop string (or what follows one),
    /// with the logprobs of the tokens generated since the last call; it returns false to stop.
    /// `p.stop` is replaced by the model's stop tokens; `stops` are stop strings (non-empty).
    pub fn generate_text(
        &self,
        prompt: &[u32],
        mut p: SamplingParams,
        stops: &[String],
        mut on_delta: impl FnMut(&str, Vec<TokenInfo>) -> bool,
    ) -> Result<Outcome, String> {
        let limit = self.context_length();
        if prompt.len() + p.max_tokens > limit {
            return Err(format!(
                "this model's context is {limit} tokens: the prompt ({} tokens) plus max_tokens ({}) does not fit; shorten the prompt or lower max_tokens",
                prompt.len(),
                p.max_tokens
            ));
        }
        p.stop = self.stop_tokens.clone();
        let want_logprobs = p.logprobs.is_some();
        let mut decoder = TextDecoder::new(&self.tokenizer);
        let mut matcher = StopMatcher::new(stops);
        let mut pending: Vec<TokenInfo> = Vec::new();
        let mut stopped = false;
        let mut cancelled = false;
        let g = generate_with(&self.model, prompt, &p, |step| {
            if want_logprobs {
                pending.push(self.token_info(step));
            }
            let piece = decoder.step(step.token);
            if piece.is_empty() {
                return true;
            }
            let (out, stop) = matcher.push(&piece);
            if stop {
                stopped = true;
            }
            if (!out.is_empty() || stop) && !on_delta(&out, std::mem::take(&mut pending)) {
                cancelled = true;
                return false;
            }
            !stop
        })
        .map_err(|e| format!("generation failed: {e}"))?;
        let mut finish = if cancelled {
            Finish::Cancelled
        } else if stopped || g.finish == FinishReason::Stop {
            Finish::Stop
        } else {
            Finish::Length
        };
        if !stopped && !cancelled {
            // What the decoder and the matcher still hold.
            let (mut out, stop) = matcher.push(&decoder.finish());
            if stop {
                finish = Finish::Stop;
            } else {
                out.push_str(&matcher.finish());
            }
            if (!out.is_empty() || !pending.is_empty()) && !on_delta(&out, pending) {
                finish = Finish::Cancelled;
            }
        }
        Ok(Outcome {
            finish,
            completion_tokens: g.tokens.len(),
        })
    }

    /// The whole answer after `prompt` (see [`ServedModel::generate_text`]).
    pub fn answer(
        &self,
        prompt: &[u32],
        p: SamplingParams,
        stops: &[String],
    ) -> Result<Answer, String> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let outcome = self.generate_text(prompt, p, stops, |piece, tokens| {
            text.push_str(piece);
            logprobs.extend(tokens);
            true
        })?;
        Ok(Answer {
            text,
            finish: outcome.finish,
            prompt_tokens: prompt.len(),
            completion_tokens: outcome.completion_tokens,
            logprobs,
        })
    }

    /// The assistant's reply to `messages`, rendered with the model's chat template and
    /// generated with `p` until a stop token, a stop string of `stops` or `p.max_tokens`. Returns
    /// the text, the finish reason (`stop` or `length`), and the prompt and completion token
    /// counts. Used by answer generation and the local judge.
    pub fn complete(
        &self,
        messages: &[Message],
        p: SamplingParams,
        stops: &[String],
    ) -> Result<(String, &'static str, usize, usize), String> {
        let ids = self.chat_prompt(messages)?;
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let a = self.answer(&ids, p, &stops)?;
        Ok((
            a.text,
            a.finish.reason(),
            a.prompt_tokens,
            a.completion_tokens,
        ))
    }
}

#[cfg(test)]
mod tests;
