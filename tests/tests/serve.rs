//! `worker serve` answers a real HTTP client with OpenAI-shaped completions and errors.

use std::time::Duration;

use distillery_tests::{bin, eventually, free_port};

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_serve_answers_chat_completions_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let out = std::process::Command::new(bin("worker"))
        .args(["make-test-model", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let _server = Server(
        std::process::Command::new(bin("worker"))
            .args([
                "serve",
                "--name",
                "tiny",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--model",
            ])
            .arg(&model)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}/v1");
    let http = reqwest::Client::new();
    let up = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(20), || {
                std::net::TcpStream::connect(
                    base.trim_start_matches("http://").trim_end_matches("/v1"),
                )
                .is_ok()
            })
        })
        .await
        .unwrap()
    };
    assert!(up, "worker serve did not start");

    let models: serde_json::Value = http
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let req = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 8, "temperature": 0
    });
    let r = http
        .post(format!("{base}/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
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
    // Greedy decoding is deterministic.
    let again: serde_json::Value = http
        .post(format!("{base}/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["choices"], v["choices"]);

    // Malformed requests get a 4xx with an OpenAI-style error naming the problem.
    for (body, status, param) in [
        ("{not json".to_string(), 400, "body"),
        (serde_json::json!({"model": "tiny", "messages": []}).to_string(), 400, "messages"),
        (serde_json::json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).to_string(), 400, "messages[0].role"),
        (serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).to_string(), 400, "temperature"),
        (serde_json::json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, "model"),
    ] {
        let r = http
            .post(format!("{base}/chat/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
