//! `worker serve`: an OpenAI-compatible `/v1/chat/completions` and `/v1/models` server for any
//! model this code loads, to inspect a student or use one as another campaign's judge. Errors
//! are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::{DType, Device};
use serde::Deserialize;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::model::generate::{generate, FinishReason, SamplingParams};
use crate::model::io::{load_dir, ModelIoError};
use crate::model::tokenizer::{self, Message, CHATML_TEMPLATE};
use crate::model::Llama;

/// A loaded model with what chatting with it needs.
pub struct ServedModel {
    pub name: String,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: String,
    pub bos_token: String,
    pub eos_token: String,
    next_id: AtomicU64,
    /// Chat completion requests received (`/metrics`).
    requests: AtomicU64,
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelIoError {
    ModelIoError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Loads a Hugging Face directory (with `tokenizer.json`) or a `.gguf` file for serving.
pub fn load_served(path: &Path, name: Option<String>) -> Result<ServedModel, ModelIoError> {
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let (model, tok, template, bos, eos) = if path.is_dir() {
        let model = load_dir(path, DType::F32, &Device::Cpu)?;
        let tok = tokenizer::load(&path.join("tokenizer.json"))
            .map_err(|e| invalid(path, format!("{e}; serving needs tokenizer.json")))?;
        let tc: serde_json::Value = std::fs::read_to_string(path.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let text = |k: &str| {
            tc.get(k).and_then(|v| {
                v.as_str().map(str::to_string).or_else(|| {
                    v.get("content")
                        .and_then(|c| c.as_str())
                        .map(str::to_string)
                })
            })
        };
        (
            model,
            tok,
            text("chat_template"),
            text("bos_token"),
            text("eos_token"),
        )
    } else {
        let g = crate::model::gguf::load_gguf(path, DType::F32, &Device::Cpu)?;
        let tok = g.tokenizer.ok_or_else(|| {
            invalid(
                path,
                "its tokenizer could not be rebuilt from the GGUF metadata; convert it and add a tokenizer.json",
            )
        })?;
        (g.model, tok, g.chat_template, g.bos_token, g.eos_token)
    };
    Ok(ServedModel {
        name,
        model,
        tokenizer: tok,
        chat_template: template.unwrap_or_else(|| CHATML_TEMPLATE.to_string()),
        bos_token: bos.unwrap_or_default(),
        eos_token: eos.unwrap_or_default(),
        next_id: AtomicU64::new(1),
        requests: AtomicU64::new(0),
    })
}

/// An OpenAI-style error response.
fn error(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": null}});
    (status, Json(body)).into_response()
}

fn bad(param: &str, message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some(param),
        message,
    )
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    messages: Vec<RawMessage>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: serde_json::Value,
}

/// The routes, over a loaded model.
pub fn router(model: Arc<ServedModel>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "no such route: use /v1/chat/completions or /v1/models",
            )
        })
        .with_state(model)
}

/// Serves until the process ends.
pub async fn serve(model: ServedModel, listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, model = %model.name, "serving OpenAI-compatible API");
    axum::serve(listener, router(Arc::new(model))).await
}

async fn models(State(m): State<Arc<ServedModel>>) -> Response {
    Json(json!({"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "distillery"}]})).into_response()
}

/// Prometheus text: how many chat completions this server has been asked for.
async fn metrics(State(m): State<Arc<ServedModel>>) -> Response {
    format!(
        "# TYPE distillery_serve_chat_requests_total counter\ndistillery_serve_chat_requests_total {}\n",
        m.requests.load(Ordering::SeqCst)
    )
    .into_response()
}

async fn chat(State(m): State<Arc<ServedModel>>, body: Bytes) -> Response {
    m.requests.fetch_add(1, Ordering::SeqCst);
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad(
                "body",
                format!("the request is not a valid chat completion request: {e}"),
            )
        }
    };
    if !req.model.is_empty() && req.model != m.name {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model"),
            format!(
                "the model {:?} does not exist; this server serves {:?}",
                req.model, m.name
            ),
        );
    }
    if req.stream {
        return bad("stream", "streaming is not supported; send stream: false");
    }
    if req.messages.is_empty() {
        return bad("messages", "messages must not be empty");
    }
    let mut messages = Vec::new();
    for (i, msg) in req.messages.iter().enumerate() {
        if !matches!(msg.role.as_str(), "system" | "user" | "assistant") {
            return bad(
                &format!("messages[{i}].role"),
                format!("role {:?} must be system, user or assistant", msg.role),
            );
        }
        let Some(content) = msg.content.as_str() else {
            return bad(
                &format!("messages[{i}].content"),
                "content must be a string",
            );
        };
        messages.push(Message {
            role: msg.role.clone(),
            content: content.to_string(),
        });
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256);
    if max_tokens == 0 || max_tokens > 8192 {
        return bad(
            "max_tokens",
            format!("{max_tokens} must be between 1 and 8192"),
        );
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return bad(
            "temperature",
            format!("{temperature} must be between 0 and 2"),
        );
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return bad("top_p", format!("{top_p} must be in (0, 1]"));
    }
    let stops = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let seed = req.seed.unwrap_or(0);
    let id = m.next_id.fetch_add(1, Ordering::Relaxed);
    let mm = m.clone();
    let result = tokio::task::spawn_blocking(move || {
        let params = SamplingParams {
            max_tokens,
            temperature,
            top_p,
            seed,
            stop: Vec::new(),
        };
        mm.complete(&messages, params, &stops)
    })
    .await;
    match result {
        Ok(Ok((text, finish, prompt_tokens, completion_tokens))) => {
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Json(json!({
                "id": format!("chatcmpl-{id}"),
                "object": "chat.completion",
                "created": created,
                "model": m.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
            }))
            .into_response()
        }
        Ok(Err(e)) => bad("messages", e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            format!("generation failed: {e}"),
        ),
    }
}

/// Renders the chat, generates, and cuts at the first stop string.
impl ServedModel {
    /// The assistant's reply to `messages`, rendered with the model's chat template and generated
    /// with `p` (its stop tokens become the model's EOS); generation also ends at any of
    /// `stops`. Returns the text, the finish reason (`stop` or `length`), and the prompt and
    /// completion token counts. Used by the HTTP API, answer generation and the local judge.
    pub fn complete(
        &self,
        messages: &[Message],
        mut p: SamplingParams,
        stops: &[String],
    ) -> Result<(String, &'static str, usize, usize), String> {
        let m = self;
        let max_tokens = p.max_tokens;
        let prompt =
            tokenizer::render_chat(&m.chat_template, messages, true, &m.bos_token, &m.eos_token)
                .map_err(|e| e.to_string())?;
        let ids = tokenizer::encode(&m.tokenizer, &prompt, false).map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Err("the rendered prompt is empty".into());
        }
        let limit = m.model.config.max_position_embeddings;
        if ids.len() + max_tokens > limit {
            return Err(format!(
                "prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context of {limit}",
                ids.len()
            ));
        }
        p.stop = m.tokenizer.token_to_id(&m.eos_token).into_iter().collect();
        let g = generate(&m.model, &ids, &p).map_err(|e| e.to_string())?;
        let mut tokens = g.tokens.clone();
        let mut finish = if g.finish == FinishReason::Stop {
            "stop"
        } else {
            "length"
        };
        if finish == "stop" {
            tokens.pop();
        }
        let mut text = tokenizer::decode(&m.tokenizer, &tokens, true).map_err(|e| e.to_string())?;
        if let Some(cut) = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            finish = "stop";
        }
        Ok((text, finish, ids.len(), g.tokens.len()))
    }
}
