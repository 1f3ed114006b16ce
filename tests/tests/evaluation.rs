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

/// An OpenAI-compatible judge whose reply is `rule(system, user)`, counting requests. Returns its
/// base URL.
fn scripted_judge(
    rule: impl Fn(&str, &str) -> String + Send + Sync + 'static,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let rule = std::sync::Arc::new(rule);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let (count, rule) = (count.clone(), rule.clone());
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
                    let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let system = req["messages"][0]["content"].as_str().unwrap_or("");
                    let user = req["messages"][1]["content"].as_str().unwrap_or("");
                    let reply = serde_json::json!({"choices": [{"message": {"role": "assistant",
                        "content": rule(system, user)}}]})
                    .to_string();
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

fn fastchat_fixture(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures/fastchat").join(name)
}

/// The campaign of the judge tests: a small teacher, one or two rounds, the given judge table.
fn judge_campaign(
    d: &std::path::Path,
    name: &str,
    rounds: usize,
    judge: &str,
    gate: &str,
) -> std::path::PathBuf {
    let teacher = d.join("teacher");
    if !teacher.join("config.json").exists() {
        write_test_model(
            &teacher,
            &TestModelSpec {
                num_layers: 2,
                seed: 21,
                ..Default::default()
            },
        )
        .unwrap();
        write_corpus(
            d,
            &["calib.jsonl", "web.jsonl"],
            (0..40)
                .map(|i| format!("Line {i}: the tide comes in and the boats lift off the sand.")),
        );
    }
    // Each round narrower than the last, so every student answers differently.
    let rounds: String = (0..rounds)
        .map(|i| {
            format!(
                "[[rounds]]\ntarget = {{ intermediate_size = {} }}\n\
                 distill = {{ tokens = 128, seq_len = 32, micro_batch = 2, world_size = 1 }}\n",
                192 - 32 * i
            )
        })
        .collect();
    let toml = format!(
        "name = \"{name}\"\nseed = 4\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 2, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         {}\
         [evaluation]\nperplexity = false\njudge = {judge}\n{gate}",
        teacher.display(),
        rounds,
    );
    write_spec(d, &format!("{name}.toml"), &toml)
}

#[test]
fn mtbench_mode_grades_each_turn_with_fastchat_prompts_and_averages_them() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    // FastChat-format files; only the two-turn questions, so every question grades 7 and 5.
    let two_turn: String = std::fs::read_to_string(fastchat_fixture("question.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["turns"]
                .as_array()
                .unwrap()
                .len()
                == 2
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.join("question.jsonl"), two_turn).unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    // Multi-turn prompts quote the conversation ("### User:"): those get 5, turn 1 gets 7.
    let url = scripted_judge(
        |_, user| {
            if user.contains("### User:") {
                "Weaker follow-up. Rating: [[5]]".into()
            } else {
                "Good start. Rating: [[7]]".into()
            }
        },
        count.clone(),
    );
    // A second judge that agrees on turn 1 and gives turn 2 a 6.
    let count2 = std::sync::Arc::new(AtomicUsize::new(0));
    let url2 = scripted_judge(
        |_, user| {
            if user.contains("### User:") {
                "[[6]]".into()
            } else {
                "[[7]]".into()
            }
        },
        count2.clone(),
    );
    let judge = format!(
        "{{ backend = \"openai\", base_url = \"{url}\", model = \"judge\", mode = \"mtbench\", questions = \"question.jsonl\", prompts = \"{}\", reference_answers = \"{}\", max_tokens = 64, second = {{ backend = \"openai\", base_url = \"{url2}\", model = \"judge-2\" }} }}",
        fastchat_fixture("judge_prompts.jsonl").display(),
        fastchat_fixture("reference_answer/reference.jsonl").display(),
    );
    let spec = judge_campaign(d, "mtbench", 1, &judge, "[gate]\nmin_mtbench = 5.5\n");
    let coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");
    let id = submit(&coord, &spec);
    let v = wait_terminal(&coord, &id, Duration::from_secs(600));
    assert_eq!(v["state"], "succeeded", "{v}");
    let j = &v["rounds"][0]["metrics"]["judge"];
    for who in ["mtbench", "teacher_mtbench"] {
        let m = &j[who];
        assert_eq!(m["turn1"], 7.0, "{who}: {j}");
        assert_eq!(m["turn2"], 5.0, "{who}: {j}");
        assert_eq!(m["overall"], 6.0, "{who}: {j}");
        assert_eq!(m["invalid"], 0.0, "{who}: {j}");
    }
    assert_eq!(j["mode"], "mtbench");
    assert_eq!(j["mtbench_comparable"], true);
    // 3 questions × 2 turns × (student, teacher), each judge.
    assert_eq!(count.load(Ordering::SeqCst), 12);
    assert_eq!(count2.load(Ordering::SeqCst), 12);
    // Agreement on the 6 turn-1 grades, not on the 6 turn-2 ones: p_o = 1/2, p_e = 1/4, κ = 1/3.
    let second = &j["second"];
    assert_eq!(second["n"], 12.0, "{j}");
    assert_eq!(second["agreement"], 0.5, "{j}");
    assert!(
        (second["kappa"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12,
        "{j}"
    );
    assert_eq!(second["confusion"]["5"]["6"], 6.0, "{j}");
    // The plain status shows the scores and the label.
    let out = coord.cli(&["status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("MT-Bench student: 6.00 (turn 1 7.00, turn 2 5.00; 0 invalid grades)"),
        "{text}"
    ); // `watch` replays the judge phase's result line.
    let out = coord.cli(&["watch", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("round 0 judge (mtbench)")
            && text.contains("MT-Bench 6.00 (turn 1 7.00, turn 2 5.00, 0 invalid), teacher 6.00")
            && !text.contains("not comparable"),
        "{text}"
    );
}

#[test]
fn a_ranking_of_two_rounds_asks_the_judge_only_for_new_pairs_and_the_gate_reads_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    let questions: String = (0..6)
        .map(|i| format!("{{\"question_id\": {i}, \"category\": \"writing\", \"turns\": [\"Tell me about boats, {i}.\"]}}\n"))
        .collect();
    std::fs::write(d.join("questions.jsonl"), questions).unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let prompts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = prompts.clone();
    // A judge that always prefers position A: every pair ties overall.
    let url = scripted_judge(
        move |system, user| {
            seen.lock().unwrap().push(format!("{system}\n{user}"));
            "A reads better. [[A]]".into()
        },
        count.clone(),
    );
    let judge = format!(
        "{{ backend = \"openai\", base_url = \"{url}\", model = \"judge\", mode = \"pairwise\", questions = \"questions.jsonl\", ranking = true, max_tokens = 8 }}"
    );
    let spec = judge_campaign(d, "ranked", 2, &judge, "[gate]\nmax_elo_drop = 100.0\n");
    let coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");
    let id = submit(&coord, &spec);
    // Round 0: teacher vs round0 (the student-vs-teacher prompts are the same ones): 6 × 2.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut after_round0 = None;
    loop {
        let v = coord.status_json(Some(&id));
        if after_round0.is_none() && v["rounds"][0]["metrics"]["judge"]["ranking"].is_object() {
            after_round0 = Some(count.load(Ordering::SeqCst));
        }
        if matches!(
            v["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = coord.status_json(Some(&id));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(
        after_round0,
        Some(12),
        "round 0: one pair, 6 questions, both orders"
    );
    // Round 1: (teacher, round1) — also the student-vs-baseline prompts — and (round0, round1);
    // (teacher, round0) comes from the cache.
    let asked = prompts.lock().unwrap().clone();
    let distinct: std::collections::BTreeSet<&String> = asked.iter().collect();
    assert_eq!(distinct.len(), asked.len(), "a prompt was asked twice");
    assert_eq!(count.load(Ordering::SeqCst), 12 + 24);
    let r = &v["rounds"][1]["metrics"]["judge"];
    let rank = &r["ranking"];
    assert_eq!(rank["teacher"]["elo"], 1000.0, "{r}");
    for m in ["round0", "round1"] {
        let e = rank[m]["elo"].as_f64().unwrap();
        // Position-biased judge: every pair splits evenly, so every rating is the teacher's.
        assert!((e - 1000.0).abs() < 1.0, "{m}: {r}");
        assert!(
            rank[m]["ci_low"].as_f64().unwrap() <= e && e <= rank[m]["ci_high"].as_f64().unwrap()
        );
    }
    assert_eq!(r["battles"]["round0"]["round1"]["ties"], 0.0, "{r}");
    assert_eq!(r["battles"]["round0"]["round1"]["a_wins"], 6.0, "{r}");
    assert_eq!(r["battles"]["round0"]["round1"]["b_wins"], 6.0, "{r}");
    assert_eq!(r["battles"]["teacher"]["round0"]["a_wins"], 6.0, "{r}");
    assert!(r["elo_drop"].as_f64().unwrap().abs() < 1.0, "{r}");
    assert_eq!(r["mode"], "pairwise");
    assert_eq!(r["mtbench_comparable"], false);
    assert_eq!(r["comparability"], "not comparable with published MT-Bench");
    // The ranking, battles and labels are durable: a restarted coordinator shows the same.
    let before = coord.status_json(Some(&id));
    let mut coord = coord;
    coord.restart();
    coord.wait_serving();
    let after = coord.status_json(Some(&id));
    assert_eq!(after["rounds"], before["rounds"]);
    let out = coord.cli(&["watch", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("round 1 judge (pairwise)")
            && text.contains("rating 1000")
            && text.contains("not comparable with published MT-Bench"),
        "{text}"
    );
}
