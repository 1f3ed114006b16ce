//! `worker serve` answers a real HTTP client as OpenAI's API does: chat and legacy completions,
//! server-sent event streams, stop strings, seeds, logprobs, model aliases, and OpenAI-shaped
//! errors for what it refuses.

use std::path::Path;

use distillery_tests::{bin, ServeProc};
use serde_json::{json, Value};

fn make_model(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("tiny");
    let out = std::process::Command::new(bin("worker"))
        .args(["make-test-model", "--seed", "5", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// A streamed response: its content type and the `data:` payloads in order.
async fn post_stream(base: &str, path: &str, body: &Value) -> (String, Vec<String>) {
    let r = reqwest::Client::new()
        .post(format!("{base}/{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("\n\n"), "{text:?}");
    let events = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect();
    (ct, events)
}

fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn hello(extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 24, "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_models_aliases_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let server = ServeProc::start(&model, &["--name", "tiny", "--served-model-name", "alias"]);
    let base = server.base();
    let http = reqwest::Client::new();

    let models: Value = http
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "alias"]);
    for (id, status) in [("tiny", 200), ("alias", 200), ("nope", 404)] {
        let r = http
            .get(format!("{base}/models/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{id}");
    }

    let (status, v) = post(&base, "chat/completions", &hello(json!({"max_tokens": 8}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert!(matches!(
        v["choices"][0]["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    let usage = &v["usage"];
    // The ChatML prompt of those two messages, one byte-level token per byte.
    let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n";
    let expected = prompt
        .replace("<|im_start|>", "S")
        .replace("<|im_end|>", "E")
        .len();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() as usize,
        expected,
        "{v}"
    );
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
    // Greedy decoding is deterministic; an alias is the same model, named as asked.
    let (_, again) = post(
        &base,
        "chat/completions",
        &hello(json!({"max_tokens": 8, "model": "alias"})),
    )
    .await;
    assert_eq!(again["choices"], v["choices"]);
    assert_eq!(again["model"], "alias");
    // Harmless fields are accepted.
    let (status, _) = post(
        &base,
        "chat/completions",
        &hello(json!({"max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": false, "n": 1, "frequency_penalty": 0})),
    )
    .await;
    assert_eq!(status, 200);

    // What it cannot do, or does not know, is a 4xx with an OpenAI-style error naming the field.
    let x = || json!([{"role": "user", "content": "x"}]);
    for (body, status, param) in [
        ("{not json".to_string(), 400, "body"),
        (json!({"model": "tiny", "messages": []}).to_string(), 400, "messages"),
        (json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).to_string(), 400, "messages[0].role"),
        (json!({"model": "tiny", "messages": x(), "temperature": 9}).to_string(), 400, "temperature"),
        (json!({"model": "gpt-9", "messages": x()}).to_string(), 404, "model"),
        (json!({"model": "tiny", "messages": x(), "n": 2}).to_string(), 400, "n"),
        (json!({"model": "tiny", "messages": x(), "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string(), 400, "tools"),
        (json!({"model": "tiny", "messages": x(), "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}}).to_string(), 400, "response_format"),
        (json!({"model": "tiny", "messages": x(), "logit_bias": {"50": 5}}).to_string(), 400, "logit_bias"),
        (json!({"model": "tiny", "messages": x(), "frequency_penalty": 0.5}).to_string(), 400, "frequency_penalty"),
        (json!({"model": "tiny", "messages": x(), "mirostat": 2}).to_string(), 400, "mirostat"),
        (json!({"model": "tiny", "messages": x(), "stop": ["a", "b", "c", "d", "e"]}).to_string(), 400, "stop"),
        (json!({"model": "tiny", "messages": x(), "max_tokens": 100000}).to_string(), 400, "max_tokens"),
        (json!({"model": "tiny", "messages": x(), "top_logprobs": 2}).to_string(), 400, "top_logprobs"),
    ] {
        let r = http
            .post(format!("{base}/chat/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let metrics = distillery_tests::http_get(&format!("127.0.0.1:{}", server.port), "/metrics")
        .unwrap_or_default();
    assert!(
        metrics.contains("distillery_serve_chat_requests_total "),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_openais_chunks_and_add_up_to_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let server = ServeProc::start(&model, &["--name", "tiny"]);
    let base = server.base();

    let (_, whole) = post(&base, "chat/completions", &hello(json!({}))).await;
    let text = chat_text(&whole);
    assert!(text.chars().count() >= 6, "{text:?}");
    let (ct, events) = post_stream(
        &base,
        "chat/completions",
        &hello(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let c = chunks(&events);
    let id = c[0]["id"].as_str().unwrap();
    for ch in &c {
        assert_eq!(ch["object"], "chat.completion.chunk", "{ch}");
        assert_eq!(ch["id"], id);
        assert_eq!(ch["model"], "tiny");
    }
    assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(c[0]["choices"][0]["delta"]["content"], "");
    let (usage_chunk, rest) = c.split_last().unwrap();
    let (finish, deltas) = rest.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(
        finish["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert_eq!(finish["usage"], Value::Null);
    let mut streamed = String::new();
    for d in &deltas[1..] {
        assert_eq!(d["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(d["usage"], Value::Null);
        streamed.push_str(d["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert!(deltas.len() > 2, "the answer came in pieces");
    assert_eq!(streamed, text, "temperature 0: the stream is the answer");

    // Without include_usage there is no usage chunk and no usage field.
    let (_, events) = post_stream(&base, "chat/completions", &hello(json!({"stream": true}))).await;
    let c = chunks(&events);
    assert!(c.iter().all(|ch| ch.get("usage").is_none()));
    assert!(c.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // A stop string from the middle of the answer, found across chunk boundaries: nothing of it
    // (or after it) is sent, in the stream or the whole answer.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[3..6].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    let (_, cut) = post(
        &base,
        "chat/completions",
        &hello(json!({"stop": [stop.clone(), "\u{1}never"]})),
    )
    .await;
    assert_eq!(chat_text(&cut), before);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    let (_, events) = post_stream(
        &base,
        "chat/completions",
        &hello(json!({"stream": true, "stop": stop})),
    )
    .await;
    let c = chunks(&events);
    let streamed: String = c
        .iter()
        .filter_map(|ch| ch["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, before);
    assert_eq!(c.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // Completions: the same text streamed or not; the prompt as a list of one.
    let body = json!({"model": "tiny", "prompt": ["Once upon a time"], "max_tokens": 12, "temperature": 0});
    let (status, v) = post(&base, "completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let ctext = v["choices"][0]["text"].as_str().unwrap().to_string();
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (_, events) = post_stream(&base, "completions", &sbody).await;
    let c = chunks(&events);
    assert!(c.iter().all(|ch| ch["object"] == "text_completion"));
    let streamed: String = c
        .iter()
        .filter_map(|ch| ch["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, ctext);
    assert_eq!(c.last().unwrap()["usage"], v["usage"]);
    // The completion prompt is plain text: no chat template.
    assert_eq!(v["usage"]["prompt_tokens"], "Once upon a time".len());
    // OpenAI's default of 16 tokens.
    let (_, d) = post(
        &base,
        "completions",
        &json!({"prompt": "abc", "temperature": 0}),
    )
    .await;
    assert!(d["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    let (status, e) = post(
        &base,
        "completions",
        &json!({"prompt": "abc", "echo": true}),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("echo")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_repeat_and_logprobs_have_openais_shape() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let server = ServeProc::start(&model, &["--name", "tiny"]);
    let base = server.base();

    let sampled = |seed: u64| hello(json!({"temperature": 1.0, "seed": seed, "max_tokens": 16}));
    let (_, a) = post(&base, "chat/completions", &sampled(42)).await;
    let (_, b) = post(&base, "chat/completions", &sampled(42)).await;
    assert_eq!(chat_text(&a), chat_text(&b), "same seed, same answer");
    let mut others = Vec::new();
    for s in 1..5 {
        others.push(chat_text(
            &post(&base, "chat/completions", &sampled(s)).await.1,
        ));
    }
    assert!(
        others.iter().any(|t| *t != chat_text(&a)),
        "other seeds sample otherwise"
    );

    let (status, v) = post(
        &base,
        "chat/completions",
        &hello(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 10})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let stop_token = usize::from(v["choices"][0]["finish_reason"] == "stop");
    assert_eq!(content.len(), completion - stop_token);
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        assert!(t["token"].is_string());
        assert!(t["bytes"].as_array().is_some_and(|b| !b.is_empty()));
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the likeliest.
        assert_eq!(top[0]["token"], t["token"]);
        assert_eq!(top[0]["logprob"].as_f64(), Some(lp));
        assert!(top
            .windows(2)
            .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
    }
    // Streamed, each chunk carries the logprobs of its tokens: together the same list.
    let (_, events) = post_stream(
        &base,
        "chat/completions",
        &hello(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 10, "stream": true})),
    )
    .await;
    let streamed: Vec<Value> = chunks(&events)
        .iter()
        .filter_map(|ch| ch["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, content);

    let (status, v) = post(
        &base,
        "completions",
        &json!({"prompt": "The", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), tokens.len());
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), tokens.len());
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.first(), Some(&0));
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()));
        assert!(top.contains_key(tokens[i].as_str().unwrap()));
    }
}

#[test]
fn a_model_without_a_chat_template_is_refused_until_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    let refused = |args: &[&str]| {
        let out = std::process::Command::new(bin("worker"))
            .args(["serve", "--listen", "127.0.0.1:1"])
            .args(args)
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.lines().last().unwrap_or_default().to_string()
    };
    // A named template that is not there names the ones that are.
    let line = refused(&["--chat-template-name", "rag"]);
    assert!(
        line.contains("no chat template named \"rag\"") && line.contains("\"default\""),
        "{line}"
    );
    let tc = model.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, v.to_string()).unwrap();
    let line = refused(&[]);
    assert!(
        line.contains("has no chat template")
            && line.contains("chat_template.jinja")
            && line.contains("tokenizer_config.json")
            && line.contains("--chat-template FILE"),
        "{line}"
    );
    let template = dir.path().join("plain.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    )
    .unwrap();
    let server = ServeProc::start(
        &model,
        &[
            "--name",
            "tiny",
            "--chat-template",
            template.to_str().unwrap(),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, v) = rt.block_on(post(
        &server.base(),
        "chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"],
        "[user] hi\n[assistant] ".len(),
        "the given template rendered the prompt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_config_defaults_apply_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let model = make_model(dir.path());
    // The authors decode greedily: requests without a temperature get greedy answers.
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"eos_token_id": 257, "do_sample": false, "max_new_tokens": 5}"#,
    )
    .unwrap();
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let answers = |base: String| {
        let body = body.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..4 {
                let (status, v) = post(&base, "chat/completions", &body).await;
                assert_eq!(status, 200, "{v}");
                out.push((
                    chat_text(&v),
                    v["usage"]["completion_tokens"].as_u64().unwrap(),
                ));
            }
            out
        }
    };
    let server = ServeProc::start(&model, &[]);
    let auto = answers(server.base()).await;
    assert!(
        auto.iter().all(|a| *a == auto[0]),
        "greedy by default: {auto:?}"
    );
    assert!(
        auto.iter().all(|a| a.1 <= 5),
        "max_new_tokens is the default budget"
    );
    drop(server);
    // --generation-config none: OpenAI's defaults (temperature 1, a fresh seed each request).
    let server = ServeProc::start(&model, &["--generation-config", "none"]);
    let none = answers(server.base()).await;
    assert!(none.iter().any(|a| *a != none[0]), "sampled: {none:?}");
    drop(server);
    // A field that would change the answer and is not implemented refuses the model, unless
    // the file's sampling fields are not used.
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"eos_token_id": 257, "no_repeat_ngram_size": 3}"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin("worker"))
        .args(["serve", "--listen", "127.0.0.1:1", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no_repeat_ngram_size") && err.contains("--generation-config none"),
        "{err}"
    );
    let server = ServeProc::start(&model, &["--generation-config", "none"]);
    let (status, _) = post(&server.base(), "chat/completions", &body).await;
    assert_eq!(status, 200);
}
