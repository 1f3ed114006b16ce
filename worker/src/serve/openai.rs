//! OpenAI's chat completions and legacy completions as shapes: a request body checked field by
//! field into what to generate, and the response, stream-chunk and logprobs objects OpenAI's
//! clients parse.
//!
//! A field that would change the answer and that is not implemented (`tools`, `logit_bias`,
//! `response_format` other than text, `frequency_penalty` other than 0, `n` other than 1, ...) is
//! a 400 naming it, never silently ignored; fields that do not change the answer (`user`,
//! `metadata`, `store`, ...) are accepted; an unknown field is a 400, as OpenAI answers it.
//! Sampling fields a request leaves out come from the model's generation config when the server
//! applies it, else from OpenAI's defaults (temperature 1, top_p 1).

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::TokenInfo;
use crate::model::chat::Message;
use crate::model::generate::SamplingParams;
use crate::model::generation_config::GenerationConfig;

/// An OpenAI-style error: status, `param` and a message that says what to change.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub param: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

/// Which API a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What to continue: a conversation (rendered with the chat template) or plain text.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// How many alternatives to report per token, when logprobs are asked for.
    pub logprobs: Option<usize>,
}

/// Fields accepted and not used: they do not change the answer.
const HARMLESS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "parallel_tool_calls",
];

/// OpenAI's limit on stop sequences.
const MAX_STOPS: usize = 4;
/// OpenAI's limit on `top_logprobs`.
const MAX_TOP_LOGPROBS: usize = 20;

fn is_null(v: &Value) -> bool {
    v.is_null()
}

fn number(key: &str, v: &Value) -> Result<Option<f64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        _ => Err(ApiError::bad(key, format!("{key} = {v}: must be a number"))),
    }
}

fn in_range(
    key: &str,
    v: &Value,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> Result<Option<f64>, ApiError> {
    match number(key, v)? {
        Some(x) if !ok(x) => Err(ApiError::bad(key, format!("{key} = {x}: must be {range}"))),
        x => Ok(x),
    }
}

fn integer(key: &str, v: &Value) -> Result<Option<i64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| u as i64))
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("{key} = {v}: must be a whole number"))),
        _ => Err(ApiError::bad(
            key,
            format!("{key} = {v}: must be a whole number"),
        )),
    }
}

fn boolean(key: &str, v: &Value) -> Result<Option<bool>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(ApiError::bad(
            key,
            format!("{key} = {v}: must be true or false"),
        )),
    }
}

fn refuse(key: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad(key, message)
}

/// `stop`: a string or up to four, none empty.
fn stops(v: &Value) -> Result<Vec<String>, ApiError> {
    let list: Vec<&Value> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::String(_) => vec![v],
        Value::Array(a) => a.iter().collect(),
        _ => {
            return Err(ApiError::bad(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::bad(
            "stop",
            format!(
                "{} stop sequences: at most {MAX_STOPS} are allowed",
                list.len()
            ),
        ));
    }
    list.into_iter()
        .map(|s| match s.as_str() {
            Some("") => Err(ApiError::bad("stop", "a stop sequence must not be empty")),
            Some(s) => Ok(s.to_string()),
            None => Err(ApiError::bad(
                "stop",
                "stop must be a string or a list of strings",
            )),
        })
        .collect()
}

/// A chat message's text: a string, or text parts joined with newlines (as vLLM joins them).
fn content(i: usize, v: &Value) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => texts.push(t),
                    (kind, _) => {
                        return Err(ApiError::bad(
                            &format!("{param}[{j}]"),
                            format!(
                                "content part of type {}: this model reads text only; send {{\"type\": \"text\", \"text\": ...}} parts or a string",
                                kind.unwrap_or("(none)")
                            ),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(ApiError::bad(
            &param,
            "content must be a string or a list of text parts",
        )),
    }
}

fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let Some(list) = v.as_array() else {
        return Err(ApiError::bad(
            "messages",
            "messages must be a list of {role, content}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::bad(
                &format!("messages[{i}]"),
                "a message must be an object {role, content}",
            ));
        };
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => "system",
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(other @ ("tool" | "function")) => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    format!("role {other:?}: tool calling is not supported by this server; send system, user and assistant messages"),
                ))
            }
            other => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].role"),
                    format!(
                        "role {}: must be system, developer, user or assistant",
                        other.map_or("(missing)".to_string(), |r| format!("{r:?}"))
                    ),
                ))
            }
        };
        for (k, v) in obj {
            match k.as_str() {
                "role" | "content" => {}
                "refusal" | "audio" | "tool_calls" | "function_call" if v.is_null() => {}
                "tool_calls" if v.as_array().is_some_and(|a| a.is_empty()) => {}
                "tool_calls" | "function_call" => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].{k}"),
                        "tool calls are not supported by this server",
                    ))
                }
                "name" => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].name"),
                        "message names are not passed to the chat template here; put the name in the content or drop it",
                    ))
                }
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].{other}"),
                        format!("unknown message field {other:?}; messages have role and content"),
                    ))
                }
            }
        }
        let text = match obj.get("content") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad(
                    &format!("messages[{i}].content"),
                    "content is missing",
                ))
            }
            Some(c) => content(i, c)?,
        };
        out.push(Message::new(role, text));
    }
    Ok(out)
}

/// Checks a request body for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<GenRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::bad(
            "body",
            "the request body must be a JSON object",
        ));
    };
    let mut r = GenRequest {
        endpoint,
        model: None,
        prompt: Prompt::Text(String::new()),
        max_tokens: None,
        temperature: None,
        top_p: None,
        top_k: None,
        min_p: None,
        repetition_penalty: None,
        seed: None,
        stop: Vec::new(),
        stream: false,
        include_usage: false,
        logprobs: None,
    };
    let chat = endpoint == Endpoint::Chat;
    let mut have_prompt = false;
    let mut chat_logprobs = false;
    let mut top_logprobs: Option<usize> = None;
    let mut stream_options: Option<&Map<String, Value>> = None;
    let mut max_completion_tokens = None;
    for (key, v) in &obj {
        let k = key.as_str();
        match k {
            "model" => match v {
                Value::Null => {}
                Value::String(s) => r.model = Some(s.clone()),
                _ => return Err(ApiError::bad(k, "model must be a string")),
            },
            "messages" if chat => {
                r.prompt = Prompt::Chat(messages(v)?);
                have_prompt = true;
            }
            "prompt" if !chat => {
                r.prompt = Prompt::Text(match v {
                    Value::String(s) => s.clone(),
                    Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                        a[0].as_str().unwrap_or_default().to_string()
                    }
                    _ => return Err(ApiError::bad(
                        k,
                        "prompt must be a string or a list of one string (one prompt per request)",
                    )),
                });
                have_prompt = true;
            }
            "max_tokens" | "max_completion_tokens" => {
                let n = match integer(k, v)? {
                    None => None,
                    Some(n) if n >= 1 => Some(n as usize),
                    Some(n) => {
                        return Err(ApiError::bad(k, format!("{k} = {n}: must be at least 1")))
                    }
                };
                if k == "max_tokens" {
                    r.max_tokens = n;
                } else if chat {
                    max_completion_tokens = n;
                } else {
                    return Err(unknown(k));
                }
            }
            "temperature" => {
                r.temperature = in_range(k, v, |x| (0.0..=2.0).contains(&x), "between 0 and 2")?
            }
            "top_p" => r.top_p = in_range(k, v, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?,
            "min_p" => r.min_p = in_range(k, v, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
            "repetition_penalty" => {
                r.repetition_penalty = in_range(k, v, |x| x > 0.0 && x.is_finite(), "more than 0")?
            }
            "top_k" => {
                r.top_k = match integer(k, v)? {
                    None => None,
                    Some(-1) | Some(0) => Some(0),
                    Some(n) if n > 0 => Some(n as usize),
                    Some(n) => {
                        return Err(ApiError::bad(
                            k,
                            format!(
                            "top_k = {n}: must be a positive number of tokens, or 0 / -1 for all"
                        ),
                        ))
                    }
                }
            }
            "seed" => r.seed = integer(k, v)?.map(|s| s as u64),
            "stop" => r.stop = stops(v)?,
            "stream" => r.stream = boolean(k, v)?.unwrap_or(false),
            "stream_options" => match v {
                Value::Null => {}
                Value::Object(o) => stream_options = Some(o),
                _ => return Err(ApiError::bad(k, "stream_options must be an object")),
            },
            "logprobs" if chat => chat_logprobs = boolean(k, v)?.unwrap_or(false),
            "top_logprobs" if chat => {
                top_logprobs = match integer(k, v)? {
                    None => None,
                    Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
                    Some(n) => {
                        return Err(ApiError::bad(
                            k,
                            format!("top_logprobs = {n}: must be between 0 and {MAX_TOP_LOGPROBS}"),
                        ))
                    }
                }
            }
            "logprobs" => {
                r.logprobs = match integer(k, v)? {
                    None => None,
                    Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Some(n as usize),
                    Some(n) => {
                        return Err(ApiError::bad(
                            k,
                            format!("logprobs = {n}: must be between 0 and {MAX_TOP_LOGPROBS}"),
                        ))
                    }
                }
            }
            "n" | "best_of" if k == "n" || !chat => {
                if !matches!(integer(k, v)?, None | Some(1)) {
                    return Err(refuse(k, format!("{k} = {v}: this server generates one choice per request; send {k} = 1 (several requests with different seeds give several answers)")));
                }
            }
            "echo" if !chat => {
                if boolean(k, v)? == Some(true) {
                    return Err(refuse(k, "echo = true is not supported: the completion does not repeat the prompt; send echo = false"));
                }
            }
            "suffix" if !chat => {
                if !(is_null(v) || v.as_str() == Some("")) {
                    return Err(refuse(
                        k,
                        "suffix (insertion) is not supported by this model; leave it out",
                    ));
                }
            }
            "frequency_penalty" | "presence_penalty" => {
                if !matches!(number(k, v)?, None | Some(0.0)) {
                    return Err(refuse(k, format!("{k} = {v}: OpenAI's additive penalties are not implemented; leave it 0, or use repetition_penalty (transformers' multiplicative penalty, e.g. 1.1)")));
                }
            }
            "logit_bias" => {
                if !(is_null(v) || v.as_object().is_some_and(|o| o.is_empty())) {
                    return Err(refuse(
                        k,
                        "logit_bias is not supported by this server; leave it out",
                    ));
                }
            }
            "tools" | "functions" if chat => {
                if !(is_null(v) || v.as_array().is_some_and(|a| a.is_empty())) {
                    return Err(refuse(
                        k,
                        "tool calling is not supported by this server; leave tools out",
                    ));
                }
            }
            "tool_choice" | "function_call" if chat => {
                if !(is_null(v) || matches!(v.as_str(), Some("none" | "auto"))) {
                    return Err(refuse(
                        k,
                        format!(
                            "{k} = {v}: tool calling is not supported by this server; leave it out"
                        ),
                    ));
                }
            }
            "response_format" if chat => {
                let kind = v.get("type").and_then(Value::as_str);
                if !(is_null(v) || kind == Some("text")) {
                    return Err(refuse(k, format!("response_format {}: structured output is not supported; leave it out or send {{\"type\": \"text\"}}", kind.unwrap_or("?"))));
                }
            }
            "modalities" if chat => {
                if !(is_null(v) || v == &json!(["text"])) {
                    return Err(refuse(k, "this model answers in text only; send modalities = [\"text\"] or leave it out"));
                }
            }
            "audio" | "prediction" | "web_search_options" | "reasoning_effort" | "verbosity"
                if chat =>
            {
                if !is_null(v) {
                    return Err(refuse(
                        k,
                        format!("{k} is not supported by this model; leave it out"),
                    ));
                }
            }
            k if HARMLESS.contains(&k) => {}
            k => return Err(unknown(k)),
        }
    }
    if !have_prompt {
        return Err(if chat {
            ApiError::bad("messages", "messages is required")
        } else {
            ApiError::bad("prompt", "prompt is required")
        });
    }
    if chat {
        r.max_tokens = max_completion_tokens.or(r.max_tokens);
        r.logprobs = match (chat_logprobs, top_logprobs) {
            (true, n) => Some(n.unwrap_or(0)),
            (false, None | Some(0)) => None,
            (false, Some(_)) => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs logprobs = true",
                ))
            }
        };
    }
    if let Some(o) = stream_options {
        if !r.stream {
            return Err(ApiError::bad(
                "stream_options",
                "stream_options is only allowed with stream = true",
            ));
        }
        for (k, v) in o {
            match k.as_str() {
                "include_usage" => {
                    r.include_usage = boolean("stream_options.include_usage", v)?.unwrap_or(false)
                }
                "include_obfuscation" => {}
                other => {
                    return Err(ApiError::bad(
                        &format!("stream_options.{other}"),
                        format!("unknown stream option {other:?}; this server knows include_usage"),
                    ))
                }
            }
        }
    }
    Ok(r)
}

fn unknown(k: &str) -> ApiError {
    ApiError::bad(
        k,
        format!("Unrecognized request argument supplied: {k}. This server does not know it and will not guess what it would change; remove it"),
    )
}

impl GenRequest {
    /// The sampling parameters: the request's, else the model's generation config (when the
    /// server applies it), else OpenAI's defaults. A request without `seed` draws a random one.
    /// `max_tokens` defaults to the rest of the context for chat and to 16 for completions (as
    /// OpenAI); an explicit one that does not fit the context is an error.
    pub fn sampling(
        &self,
        defaults: Option<&GenerationConfig>,
        prompt_tokens: usize,
        context: usize,
    ) -> Result<SamplingParams, ApiError> {
        let prompt_param = match self.endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        };
        if prompt_tokens >= context {
            return Err(ApiError::bad(
                prompt_param,
                format!("the prompt is {prompt_tokens} tokens and this model's context is {context}: shorten it"),
            ));
        }
        let room = context - prompt_tokens;
        let max_tokens = match self.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError::bad(
                    "max_tokens",
                    format!("this model's context is {context} tokens; the prompt takes {prompt_tokens}, so max_tokens can be at most {room}, not {n}"),
                ))
            }
            Some(n) => n,
            None => defaults
                .and_then(|d| d.max_new_tokens)
                .unwrap_or(match self.endpoint {
                    Endpoint::Chat => room,
                    Endpoint::Completions => 16,
                })
                .min(room),
        };
        let d = defaults.cloned().unwrap_or_default();
        Ok(SamplingParams {
            max_tokens,
            temperature: self.temperature.or(d.default_temperature()).unwrap_or(1.0),
            top_p: self.top_p.or(d.top_p).unwrap_or(1.0),
            top_k: self.top_k.or(d.top_k).unwrap_or(0),
            min_p: self.min_p.or(d.min_p).unwrap_or(0.0),
            repetition_penalty: self
                .repetition_penalty
                .or(d.repetition_penalty)
                .unwrap_or(1.0),
            seed: self.seed.unwrap_or_else(rand::random),
            stop: Vec::new(),
            logprobs: self.logprobs,
        })
    }
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}`.
pub fn chat_logprobs(tokens: &[TokenInfo]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({
                "token": t.text,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|(s, b, lp)| json!({"token": s, "logprob": lp, "bytes": b})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completions `logprobs`: parallel lists, `text_offset` counting characters from the
/// start of the completion (`offset` carries it across stream chunks).
pub fn completion_logprobs(tokens: &[TokenInfo], offset: &mut usize) -> Value {
    let mut text_offset = Vec::new();
    for t in tokens {
        text_offset.push(*offset);
        *offset += t.text.chars().count();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            let mut m = Map::new();
            for (s, _, lp) in &t.top {
                // Two tokens can spell the same text (partial characters): keep the likelier.
                let better = m.get(s).and_then(Value::as_f64).is_none_or(|old| f64::from(*lp) > old);
                if better {
                    m.insert(s.clone(), json!(lp));
                }
            }
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// Builds a request's response objects (one id, one creation time, one model name).
#[derive(Debug, Clone)]
pub struct Shapes {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    pub include_usage: bool,
    pub logprobs: bool,
}

impl Shapes {
    pub fn new(endpoint: Endpoint, n: u64, model: String, r: &GenRequest) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Shapes {
            id: match endpoint {
                Endpoint::Chat => format!("chatcmpl-{n}"),
                Endpoint::Completions => format!("cmpl-{n}"),
            },
            created,
            model,
            endpoint,
            include_usage: r.include_usage,
            logprobs: r.logprobs.is_some(),
        }
    }

    /// The whole answer.
    pub fn response(&self, a: &super::Answer) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": a.text, "refusal": null},
                "logprobs": if self.logprobs { chat_logprobs(&a.logprobs) } else { Value::Null },
                "finish_reason": a.finish.reason(),
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": a.text,
                "logprobs": if self.logprobs { completion_logprobs(&a.logprobs, &mut 0) } else { Value::Null },
                "finish_reason": a.finish.reason(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(a.prompt_tokens, a.completion_tokens),
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The first chat chunk: the assistant's role and empty content.
    pub fn role_chunk(&self) -> Value {
        self.chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]))
    }

    /// New text (and the logprobs of the tokens that made it).
    pub fn delta_chunk(&self, text: &str, tokens: &[TokenInfo], offset: &mut usize) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let lp = if self.logprobs {
                    chat_logprobs(tokens)
                } else {
                    Value::Null
                };
                self.chunk(json!([{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]))
            }
            Endpoint::Completions => {
                let lp = if self.logprobs {
                    completion_logprobs(tokens, offset)
                } else {
                    Value::Null
                };
                self.chunk(
                    json!([{"index": 0, "text": text, "logprobs": lp, "finish_reason": null}]),
                )
            }
        }
    }

    /// The chunk that says why the answer ended.
    pub fn finish_chunk(&self, reason: &str) -> Value {
        match self.endpoint {
            Endpoint::Chat => self.chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}]),
            ),
            Endpoint::Completions => self.chunk(
                json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": reason}]),
            ),
        }
    }

    /// `stream_options.include_usage`'s last chunk: no choices, the usage.
    pub fn usage_chunk(&self, prompt_tokens: usize, completion_tokens: usize) -> Value {
        let mut c = self.chunk(json!([]));
        c["usage"] = usage(prompt_tokens, completion_tokens);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<GenRequest, ApiError> {
        parse(Endpoint::Chat, body.to_string().as_bytes())
    }

    fn completion(body: Value) -> Result<GenRequest, ApiError> {
        parse(Endpoint::Completions, body.to_string().as_bytes())
    }

    fn hi() -> Value {
        json!([{"role": "user", "content": "hi"}])
    }

    #[test]
    fn a_full_chat_request_is_read() {
        let r = chat(json!({
            "model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "x", "refusal": null, "tool_calls": []},
            ],
            "max_completion_tokens": 5, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": -1,
            "seed": -3, "stop": "END", "stream": true, "stream_options": {"include_usage": true},
            "logprobs": true, "top_logprobs": 2, "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0,
            "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "user": "u", "metadata": {"k": "v"}, "store": false,
        }))
        .unwrap();
        assert_eq!(
            r.prompt,
            Prompt::Chat(vec![
                Message::new("system", "be brief"),
                Message::new("user", "a\nb"),
                Message::new("assistant", "x")
            ])
        );
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(
            (r.temperature, r.top_p, r.top_k),
            (Some(0.5), Some(0.9), Some(0))
        );
        assert_eq!(r.seed, Some(-3i64 as u64));
        assert_eq!(r.stop, ["END"]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.logprobs, Some(2));
        let r = chat(json!({"messages": hi(), "logprobs": true})).unwrap();
        assert_eq!(r.logprobs, Some(0));
        assert_eq!(chat(json!({"messages": hi()})).unwrap().logprobs, None);
    }

    #[test]
    fn what_would_change_the_answer_is_refused_by_name() {
        for (extra, param, says) in [
            (json!({"n": 2}), "n", "one choice"),
            (
                json!({"frequency_penalty": 0.5}),
                "frequency_penalty",
                "repetition_penalty",
            ),
            (
                json!({"presence_penalty": 1}),
                "presence_penalty",
                "not implemented",
            ),
            (
                json!({"logit_bias": {"5": 10}}),
                "logit_bias",
                "not supported",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
                "tools",
                "tool calling",
            ),
            (
                json!({"tool_choice": "required"}),
                "tool_choice",
                "tool calling",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {}}}),
                "response_format",
                "json_schema",
            ),
            (
                json!({"modalities": ["text", "audio"]}),
                "modalities",
                "text only",
            ),
            (
                json!({"reasoning_effort": "high"}),
                "reasoning_effort",
                "not supported",
            ),
            (
                json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
                "at most 4",
            ),
            (json!({"stop": [""]}), "stop", "empty"),
            (
                json!({"top_logprobs": 3}),
                "top_logprobs",
                "logprobs = true",
            ),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
                "between 0 and 20",
            ),
            (json!({"temperature": 3}), "temperature", "between 0 and 2"),
            (json!({"top_p": 0}), "top_p", "(0, 1]"),
            (json!({"max_tokens": 0}), "max_tokens", "at least 1"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
                "stream = true",
            ),
            (json!({"best_of": 2}), "best_of", "Unrecognized"),
            (
                json!({"guided_json": {}}),
                "guided_json",
                "Unrecognized request argument supplied: guided_json",
            ),
            (json!({"seed": "x"}), "seed", "whole number"),
        ] {
            let mut body = json!({"model": "m", "messages": hi()});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
        for (messages, param) in [
            (json!([]), "messages"),
            (json!("hi"), "messages"),
            (
                json!([{"role": "robot", "content": "x"}]),
                "messages[0].role",
            ),
            (
                json!([{"role": "tool", "content": "x"}]),
                "messages[0].role",
            ),
            (json!([{"role": "user"}]), "messages[0].content"),
            (
                json!([{"role": "user", "content": 5}]),
                "messages[0].content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                "messages[0].content[0]",
            ),
            (
                json!([{"role": "user", "content": "x", "name": "bob"}]),
                "messages[0].name",
            ),
            (
                json!([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]),
                "messages[0].tool_calls",
            ),
        ] {
            let e = chat(json!({"messages": messages})).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{messages}: {e:?}");
        }
        assert_eq!(
            chat(json!({"model": "m"})).unwrap_err().param.as_deref(),
            Some("messages")
        );
        assert_eq!(
            parse(Endpoint::Chat, b"{oops")
                .unwrap_err()
                .param
                .as_deref(),
            Some("body")
        );
        assert_eq!(
            parse(Endpoint::Chat, b"[1]").unwrap_err().param.as_deref(),
            Some("body")
        );
    }

    #[test]
    fn completion_requests_take_one_prompt_and_legacy_fields() {
        let r = completion(json!({"model": "m", "prompt": ["once"], "logprobs": 3, "echo": false, "best_of": 1, "suffix": null, "max_tokens": 7})).unwrap();
        assert_eq!(r.prompt, Prompt::Text("once".into()));
        assert_eq!((r.logprobs, r.max_tokens), (Some(3), Some(7)));
        for (body, param) in [
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [1, 2, 3]}), "prompt"),
            (json!({"prompt": "a", "echo": true}), "echo"),
            (json!({"prompt": "a", "best_of": 3}), "best_of"),
            (json!({"prompt": "a", "suffix": "tail"}), "suffix"),
            (json!({"prompt": "a", "logprobs": 21}), "logprobs"),
            (json!({"prompt": "a", "logprobs": true}), "logprobs"),
            (json!({"prompt": "a", "messages": []}), "messages"),
            (
                json!({"prompt": "a", "max_completion_tokens": 3}),
                "max_completion_tokens",
            ),
            (json!({"max_tokens": 3}), "prompt"),
        ] {
            let e = completion(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    #[test]
    fn sampling_takes_the_request_then_the_models_defaults_then_openais() {
        let r = chat(json!({"messages": hi()})).unwrap();
        let p = r.sampling(None, 10, 100).unwrap();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k, p.max_tokens),
            (1.0, 1.0, 0, 90)
        );
        let d = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            repetition_penalty: Some(1.1),
            max_new_tokens: Some(50),
            ..Default::default()
        };
        let p = r.sampling(Some(&d), 10, 100).unwrap();
        assert_eq!(
            (
                p.temperature,
                p.top_p,
                p.top_k,
                p.repetition_penalty,
                p.max_tokens
            ),
            (0.6, 0.9, 20, 1.1, 50)
        );
        let greedy = GenerationConfig {
            do_sample: Some(false),
            ..Default::default()
        };
        assert_eq!(r.sampling(Some(&greedy), 10, 100).unwrap().temperature, 0.0);
        let r = chat(
            json!({"messages": hi(), "temperature": 0, "top_k": 5, "max_tokens": 3, "seed": 9}),
        )
        .unwrap();
        let p = r.sampling(Some(&d), 10, 100).unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.max_tokens, p.seed),
            (0.0, 5, 3, 9)
        );
        // Completions default to 16 tokens, as OpenAI.
        let c = completion(json!({"prompt": "x"})).unwrap();
        assert_eq!(c.sampling(None, 4, 100).unwrap().max_tokens, 16);
        // The context bounds max_tokens; the default is cut to fit, an explicit one is refused.
        assert_eq!(c.sampling(None, 90, 100).unwrap().max_tokens, 10);
        let big = chat(json!({"messages": hi(), "max_tokens": 95})).unwrap();
        let e = big.sampling(None, 10, 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("at most 90"), "{}", e.message);
        assert_eq!(
            r.sampling(None, 100, 100).unwrap_err().param.as_deref(),
            Some("messages")
        );
        // Without a seed every request draws its own.
        let s: std::collections::BTreeSet<u64> = (0..8)
            .map(|_| {
                chat(json!({"messages": hi()}))
                    .unwrap()
                    .sampling(None, 1, 10)
                    .unwrap()
                    .seed
            })
            .collect();
        assert!(s.len() > 1);
    }

    #[test]
    fn logprobs_have_openais_shapes() {
        let t = TokenInfo {
            text: "é".into(),
            bytes: vec![0xC3, 0xA9],
            logprob: -0.5,
            top: vec![
                ("é".into(), vec![0xC3, 0xA9], -0.5),
                ("e".into(), vec![b'e'], -1.5),
            ],
        };
        let c = chat_logprobs(std::slice::from_ref(&t));
        assert_eq!(c["content"][0]["token"], "é");
        assert_eq!(c["content"][0]["bytes"], json!([0xC3, 0xA9]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], "e");
        assert_eq!(c["content"][0]["top_logprobs"][1]["logprob"], -1.5);
        let mut offset = 3;
        let l = completion_logprobs(&[t.clone(), t], &mut offset);
        assert_eq!(l["tokens"], json!(["é", "é"]));
        assert_eq!(l["token_logprobs"], json!([-0.5, -0.5]));
        assert_eq!(l["text_offset"], json!([3, 4]));
        assert_eq!(l["top_logprobs"][0], json!({"é": -0.5, "e": -1.5}));
        assert_eq!(offset, 5);
    }
}
