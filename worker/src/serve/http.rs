//! The HTTP shell: routes, OpenAI-style errors, and generation on blocking threads. A streamed
//! answer is a blocking generator feeding a channel that the response body drains as
//! server-sent events; when the client goes away the channel closes and generation stops. A
//! non-streamed answer stops too when its request is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use super::openai::{self, ApiError, Endpoint, GenRequest, Prompt, Shapes};
use super::{Answer, Finish, ServedModel};

/// What `/metrics` counts.
#[derive(Debug, Default)]
pub struct Counters {
    chat: AtomicU64,
    completions: AtomicU64,
    generated_tokens: AtomicU64,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn server_error(message: impl Into<String>) -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        message,
    )
}

/// The routes, over a loaded model.
pub fn router(model: Arc<ServedModel>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(one_model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "no such route: use /v1/chat/completions, /v1/completions or /v1/models",
            )
        })
        .with_state(model)
}

/// Serves until the process ends.
pub async fn serve(model: ServedModel, listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, model = %model.name, aliases = ?model.aliases, "serving OpenAI-compatible API");
    axum::serve(listener, router(Arc::new(model))).await
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "distillery"})
}

async fn models(State(m): State<Arc<ServedModel>>) -> Response {
    let data: Vec<Value> = m.ids().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn one_model(State(m): State<Arc<ServedModel>>, Path(id): Path<String>) -> Response {
    if m.ids().any(|i| i == id) {
        Json(model_object(&id)).into_response()
    } else {
        no_such_model(&m, &id)
    }
}

fn no_such_model(m: &ServedModel, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("model"),
        format!(
            "the model {id:?} does not exist; this server serves {}",
            m.ids()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// Prometheus text.
async fn metrics(State(m): State<Arc<ServedModel>>) -> Response {
    let c = &m.metrics;
    format!(
        "# TYPE distillery_serve_chat_requests_total counter\ndistillery_serve_chat_requests_total {}\n\
         # TYPE distillery_serve_completion_requests_total counter\ndistillery_serve_completion_requests_total {}\n\
         # TYPE distillery_serve_generated_tokens_total counter\ndistillery_serve_generated_tokens_total {}\n",
        c.chat.load(Ordering::Relaxed),
        c.completions.load(Ordering::Relaxed),
        c.generated_tokens.load(Ordering::Relaxed),
    )
    .into_response()
}

async fn chat(State(m): State<Arc<ServedModel>>, body: Bytes) -> Response {
    m.metrics.chat.fetch_add(1, Ordering::Relaxed);
    handle(m, Endpoint::Chat, body).await
}

async fn completions(State(m): State<Arc<ServedModel>>, body: Bytes) -> Response {
    m.metrics.completions.fetch_add(1, Ordering::Relaxed);
    handle(m, Endpoint::Completions, body).await
}

/// Sets its flag when dropped: a request whose handler is dropped (the client left) stops its
/// generation at the next token.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn handle(m: Arc<ServedModel>, endpoint: Endpoint, body: Bytes) -> Response {
    let req = match openai::parse(endpoint, &body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Some(name) = &req.model {
        if !m.ids().any(|i| i == name) {
            return no_such_model(&m, name);
        }
    }
    let shapes = Shapes::new(
        endpoint,
        m.next_id.fetch_add(1, Ordering::Relaxed),
        req.model.clone().unwrap_or_else(|| m.name.clone()),
        &req,
    );
    // Rendering the template and tokenizing are CPU work too.
    let mm = m.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let ids = match &req.prompt {
            Prompt::Chat(msgs) => mm
                .chat_prompt(msgs)
                .map_err(|e| ApiError::bad("messages", e))?,
            Prompt::Text(t) => mm
                .tokenize(t, true)
                .map_err(|e| ApiError::bad("prompt", e))?,
        };
        let p = req.sampling(mm.defaults.as_ref(), ids.len(), mm.context_length())?;
        Ok::<_, ApiError>((ids, p, req))
    })
    .await;
    let (ids, p, req) = match prepared {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return server_error(format!("preparing the prompt failed: {e}")),
    };
    if req.stream {
        return stream(m, req, ids, p, shapes);
    }
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = cancel.0.clone();
    let mm = m.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let outcome = mm.generate_text(&ids, p, &req.stop, |piece, tokens| {
            text.push_str(piece);
            logprobs.extend(tokens);
            !flag.load(Ordering::Relaxed)
        })?;
        Ok::<_, String>(Answer {
            text,
            finish: outcome.finish,
            prompt_tokens: ids.len(),
            completion_tokens: outcome.completion_tokens,
            logprobs,
        })
    })
    .await;
    drop(cancel);
    match result {
        Ok(Ok(a)) => {
            m.metrics
                .generated_tokens
                .fetch_add(a.completion_tokens as u64, Ordering::Relaxed);
            Json(shapes.response(&a)).into_response()
        }
        Ok(Err(e)) => server_error(e),
        Err(e) => server_error(format!("generation failed: {e}")),
    }
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Server-sent events as OpenAI sends them: (chat) a first chunk with the role, content deltas,
/// a chunk with the finish reason, the usage chunk when `stream_options.include_usage`, then
/// `data: [DONE]`. An error after the stream began is an `{"error": ...}` event before `[DONE]`.
fn stream(
    m: Arc<ServedModel>,
    req: GenRequest,
    ids: Vec<u32>,
    p: crate::model::generate::SamplingParams,
    shapes: Shapes,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::task::spawn_blocking(move || {
        let send = |v: Value| tx.blocking_send(event(&v)).is_ok();
        if shapes.endpoint == Endpoint::Chat && !send(shapes.role_chunk()) {
            return;
        }
        let mut offset = 0;
        let result = m.generate_text(&ids, p, &req.stop, |piece, tokens| {
            if piece.is_empty() && tokens.is_empty() {
                return true;
            }
            send(shapes.delta_chunk(piece, &tokens, &mut offset))
        });
        match result {
            Ok(o) if o.finish == Finish::Cancelled => return,
            Ok(o) => {
                m.metrics
                    .generated_tokens
                    .fetch_add(o.completion_tokens as u64, Ordering::Relaxed);
                if !send(shapes.finish_chunk(o.finish.reason())) {
                    return;
                }
                if shapes.include_usage && !send(shapes.usage_chunk(ids.len(), o.completion_tokens))
                {
                    return;
                }
            }
            Err(e) => {
                let err = ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "server_error",
                    param: None,
                    message: e,
                };
                if !send(err.body()) {
                    return;
                }
            }
        }
        let _ = tx.blocking_send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>),
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|e| server_error(format!("cannot build the stream: {e}")))
}
