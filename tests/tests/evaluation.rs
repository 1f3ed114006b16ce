//! Evaluation end to end: a whole campaign round (score, prune, distill, evaluate, judge, gate)
//! through the real coordinator and `worker join`, judged by the project's own `worker serve` on
//! loopback as an OpenAI-compatible judge. The same campaign again asks the judge nothing new
//! (counted at the server's /metrics).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distillery_tests::*;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn judge_requests(addr: &str) -> u64 {
    let text = scrape(addr);
    text.lines()
        .find_map(|l| l.strip_prefix("distillery_serve_chat_requests_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request counter in {text:?}"))
}

#[test]
fn a_full_round_is_judged_over_http_and_a_repeat_asks_the_judge_nothing() {
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    let teacher = d.join("teacher");
    write_test_model(
        &teacher,
        &TestModelSpec {
            num_layers: 2,
            seed: 12,
            ..Default::default()
        },
    )
    .unwrap();
    let judge_dir = d.join("judge");
    write_test_model(
        &judge_dir,
        &TestModelSpec {
            seed: 99,
            ..Default::default()
        },
    )
    .unwrap();
    write_corpus(
        d,
        &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
        (0..60)
            .map(|i| format!("Note {i}: rain falls on the hills and the river runs to the sea.")),
    );
    std::fs::write(
        d.join("questions.jsonl"),
        "{\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"Say hi.\", \"Say bye.\"]}\n\
         {\"question_id\": 2, \"category\": \"math\", \"turns\": [\"2+2?\"], \"reference\": [\"4\"]}\n",
    )
    .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _judge = Server(
        Command::new(bin("worker"))
            .args([
                "serve",
                "--model",
                judge_dir.to_str().unwrap(),
                "--listen",
                &addr,
                "--name",
                "judge",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&addr, "/v1/models").is_none() {
        assert!(Instant::now() < deadline, "worker serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec = |name: &str| {
        let toml = format!(
            "name = \"{name}\"\nseed = 5\n[teacher]\nmodel = \"{}\"\n[data]\n\
             calibration = {{ path = \"calib.jsonl\", samples = 4, seq_len = 32 }}\n\
             train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
             validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
             [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192 }}\n\
             distill = {{ tokens = 512, seq_len = 32, micro_batch = 2, world_size = 1, lr = 0.003, checkpoint_every = 4 }}\n\
             [evaluation]\nperplexity = true\n\
             judge = {{ backend = \"openai\", base_url = \"http://{addr}/v1\", model = \"judge\", mode = \"pairwise\", questions = \"questions.jsonl\", baseline = \"teacher\", max_tokens = 12 }}\n\
             [gate]\nmax_perplexity_ratio = 1000.0\n",
            teacher.display()
        );
        write_spec(d, &format!("{name}.toml"), &toml)
    };
    let coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");

    let id = submit(&coord, &spec("first"));
    let v = wait_terminal(&coord, &id, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v}");
    let r = &v["rounds"][0];
    let m = &r["metrics"];
    assert!(m["perplexity"].as_f64().unwrap() > 1.0, "{m}");
    assert!(m["teacher_perplexity"].as_f64().unwrap() > 1.0, "{m}");
    let j = &m["judge"];
    let counted: f64 = ["wins", "ties", "losses", "unparsed"]
        .iter()
        .map(|k| j[*k].as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(counted, 2.0, "every question is accounted for: {j}");
    assert!(r["artifacts"]["judgments"].is_string(), "{r}");
    assert!(r["artifacts"]["answers"].is_string(), "{r}");
    let asked = judge_requests(&addr);
    // Two questions, both orders, at most 1 + 2 retries each.
    assert!((4..=12).contains(&asked), "asked {asked}");

    // The judgments artifact holds every prompt, raw output and verdict.
    let out = d.join("judgments");
    coord.artifact_get(r["artifacts"]["judgments"].as_str().unwrap(), &out);
    let file = if out.is_dir() {
        std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    } else {
        out.clone()
    };
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(lines
        .iter()
        .all(|l| l["user"].is_string() && l["raw"].is_string() && !l["verdict"].is_null()));

    // The same campaign again: same student, same answers, same prompts: the judge is not asked.
    let id2 = submit(&coord, &spec("second"));
    let v2 = wait_terminal(&coord, &id2, Duration::from_secs(300));
    assert_eq!(v2["state"], "succeeded", "{v2}");
    assert_eq!(
        judge_requests(&addr),
        asked,
        "the repeated evaluation asked the judge again"
    );
    assert_eq!(
        v2["rounds"][0]["metrics"]["judge"],
        v["rounds"][0]["metrics"]["judge"]
    );
}

/// A minimal OpenAI-compatible judge: answers every chat completion with "[[A]]" after `delay`,
/// counting requests. Returns its base URL.
fn slow_judge(delay: Duration, count: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(delay);
                    let reply = r#"{"choices": [{"message": {"role": "assistant", "content": "A reads better. [[A]]"}}]}"#;
                    let mut w = &conn;
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                }
            });
        }
    });
    format!("http://{addr}/v1")
}

#[test]
fn a_judge_task_resumed_on_another_worker_does_not_ask_again_what_was_checkpointed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    let teacher = d.join("teacher");
    write_test_model(
        &teacher,
        &TestModelSpec {
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    write_corpus(
        d,
        &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
        (0..40).map(|i| format!("Entry {i}: the wind moves over the field in long waves.")),
    );
    let questions: String = (0..12)
        .map(|i| {
            format!(
                "{{\"question_id\": {i}, \"category\": \"c{}\", \"turns\": [\"Q{i}?\"]}}\n",
                i % 3
            )
        })
        .collect();
    std::fs::write(d.join("questions.jsonl"), questions).unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let url = slow_judge(Duration::from_millis(250), count.clone());
    let toml = format!(
        "name = \"judge-resume\"\nseed = 2\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 2, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
         [[rounds]]\ntarget = {{ intermediate_size = 192 }}\n\
         distill = {{ tokens = 128, seq_len = 32, micro_batch = 2, world_size = 1 }}\n\
         [evaluation]\nperplexity = false\n\
         judge = {{ backend = \"openai\", base_url = \"{url}\", model = \"judge\", mode = \"pairwise\", questions = \"questions.jsonl\", baseline = \"teacher\", max_tokens = 4 }}\n",
        teacher.display()
    );
    let coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let mut w1 = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");
    let id = submit(&coord, &write_spec(d, "c.toml", &toml));
    // Kill the worker once the judge task has checkpointed at least 8 of its 24 judgments.
    let deadline = Instant::now() + Duration::from_secs(180);
    while count.load(Ordering::SeqCst) < 14 {
        assert!(
            Instant::now() < deadline,
            "the judge was not asked: {}",
            coord.status_json(Some(&id))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w1.kill();
    let asked_before = count.load(Ordering::SeqCst);
    let _w2 = WorkerProc::real(&coord.url(), &d.join("w2"), "cpu");
    let v = wait_terminal(&coord, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v}");
    let j = &v["rounds"][0]["metrics"]["judge"];
    // A judge that always says "[[A]]": every question is a tie, consistency 0.
    assert_eq!(j["ties"], 12.0, "{j}");
    assert_eq!(j["position_consistency"], 0.0, "{j}");
    let total = count.load(Ordering::SeqCst);
    eprintln!("judge asked {total} times for 24 prompts, {asked_before} before the kill");
    // 24 prompts; at most the ones judged after the last checkpoint (< 8) plus those in flight
    // at the kill (4) are asked twice. Without the checkpoint the new worker would re-ask all
    // of the first worker's 14+.
    assert!(
        total < 24 + 12,
        "asked {total} times for 24 prompts ({asked_before} before the kill)\n{}\n{}",
        w1.log_text(),
        _w2.log_text()
    );
}
