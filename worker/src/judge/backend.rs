//! Judge backends: any OpenAI-compatible `/v1/chat/completions` (vLLM, llama.cpp server, Ollama,
//! OpenAI, `worker serve`), with timeouts and retries with backoff on 429/5xx and connection
//! errors; and a model loaded in this worker, whose pairwise verdicts are read from the
//! probabilities of the verdict labels, so they always parse.

use std::time::Duration;

use candle_core::{Tensor, D};

use super::parse::Pairwise;
use crate::model::chat::Message;
use crate::model::generate::SamplingParams;
use crate::model::tokenizer;
use crate::serve::ServedModel;

/// Why the judge could not be asked (not: why its answer did not parse).
#[derive(Debug, thiserror::Error)]
#[error("judge: {0}")]
pub struct BackendError(pub String);

/// A judge.
pub trait Backend: Sync {
    /// Identifies the judge in cache keys (backend, endpoint, model, decoding).
    fn id(&self) -> String;
    /// The judge's reply to a system + user prompt.
    fn chat(&self, system: &str, user: &str) -> Result<String, BackendError>;
    /// Reply number `sample` of several to the same prompt (`judge.samples`): a judge that
    /// samples at a temperature draws it with the sample number as its seed. A greedy judge
    /// gives the same reply every time.
    fn sample(&self, system: &str, user: &str, _sample: u32) -> Result<String, BackendError> {
        self.chat(system, user)
    }
    /// A pairwise verdict without parsing, where the backend can give one.
    fn pairwise(
        &self,
        _system: &str,
        _user: &str,
    ) -> Option<Result<(String, Pairwise), BackendError>> {
        None
    }
}

/// An OpenAI-compatible HTTP judge.
pub struct OpenAi {
    pub base_url: String,
    pub model: String,
    pub max_tokens: u32,
    pub api_key: Option<String>,
    pub max_retries: u32,
    pub backoff: Duration,
    /// Sampling temperature (0: greedy); with `judge.samples > 1` the sample number is sent as
    /// the seed.
    pub temperature: f64,
    client: reqwest::blocking::Client,
}

impl OpenAi {
    pub fn new(
        base_url: &str,
        model: &str,
        max_tokens: u32,
        timeout: Duration,
    ) -> Result<OpenAi, BackendError> {
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| BackendError(e.to_string()))?;
        Ok(OpenAi {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            max_tokens,
            api_key: std::env::var("DISTILLERY_JUDGE_API_KEY").ok(),
            max_retries: 5,
            backoff: Duration::from_millis(500),
            temperature: 0.0,
            client,
        })
    }
}

impl Backend for OpenAi {
    fn id(&self) -> String {
        format!(
            "openai|{}|{}|{}|{}",
            self.base_url,
            self.model,
            decoding(self.temperature),
            self.max_tokens
        )
    }

    fn chat(&self, system: &str, user: &str) -> Result<String, BackendError> {
        self.sample(system, user, 0)
    }

    fn sample(&self, system: &str, user: &str, sample: u32) -> Result<String, BackendError> {
        let url = format!("{}/chat/completions", self.base_url);
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        if self.temperature > 0.0 {
            body["seed"] = serde_json::json!(sample);
        }
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 0..=self.max_retries {
            if attempt > 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            let mut req = self.client.post(&url).json(&body);
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().unwrap_or_default();
                    if status.is_success() {
                        let v: serde_json::Value = serde_json::from_str(&text)
                            .map_err(|e| BackendError(format!("{url}: reply is not JSON: {e}")))?;
                        return v["choices"][0]["message"]["content"]
                            .as_str()
                            .map(str::to_string)
                            .ok_or_else(|| {
                                BackendError(format!(
                                    "{url}: reply has no choices[0].message.content"
                                ))
                            });
                    }
                    last = format!(
                        "{url}: HTTP {status}: {}",
                        text.chars().take(200).collect::<String>()
                    );
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        return Err(BackendError(last));
                    }
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(BackendError(format!(
            "{last} (after {} retries)",
            self.max_retries
        )))
    }
}

/// How a judge decodes, in its cache identity: greedy, or the temperature it samples at.
fn decoding(temperature: f64) -> String {
    if temperature > 0.0 {
        format!("t={temperature}")
    } else {
        "greedy".into()
    }
}

/// A model loaded in this worker.
pub struct Local {
    pub served: ServedModel,
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
}

/// A system + user conversation.
fn messages(system: &str, user: &str) -> [Message; 2] {
    [Message::new("system", system), Message::new("user", user)]
}

impl Local {
    fn prompt(&self, system: &str, user: &str) -> Result<String, BackendError> {
        self.served
            .chat
            .render(&messages(system, user), true)
            .map_err(|e| BackendError(e.to_string()))
    }

    fn first_token(&self, text: &str) -> Result<u32, BackendError> {
        tokenizer::encode(&self.served.tokenizer, text, false)
            .map_err(|e| BackendError(e.to_string()))?
            .first()
            .copied()
            .ok_or_else(|| BackendError(format!("{text:?} encodes to no token")))
    }
}

impl Backend for Local {
    fn id(&self) -> String {
        format!(
            "local|{}|{}|{}",
            self.served.name,
            decoding(self.temperature),
            self.max_tokens
        )
    }

    fn chat(&self, system: &str, user: &str) -> Result<String, BackendError> {
        self.sample(system, user, 0)
    }

    fn sample(&self, system: &str, user: &str, sample: u32) -> Result<String, BackendError> {
        let params = SamplingParams {
            max_tokens: self.max_tokens as usize,
            temperature: self.temperature,
            seed: u64::from(sample),
            ..Default::default()
        };
        self.served
            .complete(&messages(system, user), params, &[])
            .map(|(text, ..)| text)
            .map_err(BackendError)
    }

    /// The verdict whose label ("A", "B" or "C" after the prompt and "[[") is most probable.
    fn pairwise(
        &self,
        system: &str,
        user: &str,
    ) -> Option<Result<(String, Pairwise), BackendError>> {
        let run = || -> Result<(String, Pairwise), BackendError> {
            let prompt = format!("{}[[", self.prompt(system, user)?);
            let ids = tokenizer::encode(&self.served.tokenizer, &prompt, false)
                .map_err(|e| BackendError(e.to_string()))?;
            let m = &self.served.model;
            let x = Tensor::new(ids.as_slice(), m.device())
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| BackendError(e.to_string()))?;
            let logits = m
                .forward(&x)
                .and_then(|l| l.squeeze(0))
                .and_then(|l| l.get(ids.len() - 1))
                .and_then(|l| candle_nn::ops::log_softmax(&l, D::Minus1))
                .and_then(|l| l.to_dtype(candle_core::DType::F32))
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| BackendError(e.to_string()))?;
            let mut best = (f32::NEG_INFINITY, Pairwise::Tie, "C");
            for (label, v) in [("A", Pairwise::A), ("B", Pairwise::B), ("C", Pairwise::Tie)] {
                let lp = logits
                    .get(self.first_token(label)? as usize)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY);
                if lp > best.0 {
                    best = (lp, v, label);
                }
            }
            Ok((format!("[[{}]] (log p = {:.3})", best.2, best.0), best.1))
        };
        Some(run())
    }
}
