//! Lost is not failed, end to end with the real binaries:
//! - a gang rank SIGKILLed four times in one distillation (more than `max_attempts = 3`): each
//!   time a new worker joins, the campaign succeeds, `status --json` records the attempts as
//!   lost (none failed), and the student is bit-identical to an uninterrupted run's;
//! - a distillation whose training file is corrupt fails by itself after `max_attempts`;
//!   `coordinator retry` after the file is fixed continues from the failed phase and finishes
//!   without leasing any task of the earlier phases again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distillery_tests::*;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

fn corpus_line(i: usize) -> String {
    format!("Line {i}: a small model learns from a larger one, step by step, token by token.")
}

fn spec(dir: &Path, name: &str, world: u32, tokens: u32) -> PathBuf {
    let teacher = dir.join("teacher");
    if !teacher.exists() {
        write_test_model(
            &teacher,
            &TestModelSpec {
                num_layers: 3,
                seed: 8,
                ..Default::default()
            },
        )
        .unwrap();
        write_corpus(
            dir,
            &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
            (0..200).map(corpus_line),
        );
    }
    let toml = format!(
        "name = \"{name}\"\nseed = 11\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 8, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
         [evaluation]\nperplexity = false\n\
         [scheduling]\nmax_attempts = 3\nscore_shards = 1\n\
         [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192, num_layers = 2 }}\n\
         distill = {{ tokens = {tokens}, seq_len = 32, micro_batch = 2, world_size = {world}, lr = 0.003, warmup_steps = 2, checkpoint_every = 4 }}\n",
        teacher.display()
    );
    write_spec(dir, &format!("{name}.toml"), &toml)
}

fn student_of(v: &serde_json::Value) -> String {
    v["rounds"][0]["artifacts"]["student"]
        .as_str()
        .unwrap_or_else(|| panic!("no student: {v}"))
        .to_string()
}

/// The campaign's tasks of `kind` from `status --json` (`rounds[].tasks[]`).
fn tasks_of(v: &serde_json::Value, kind: &str) -> Vec<serde_json::Value> {
    v["rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no rounds: {v}"))
        .iter()
        .flat_map(|r| r["tasks"].as_array().cloned().unwrap_or_default())
        .filter(|t| t["kind"] == kind)
        .collect()
}

fn distill_task(v: &serde_json::Value) -> serde_json::Value {
    let t = tasks_of(v, "distill");
    assert_eq!(t.len(), 1, "one distill task: {v}");
    t[0].clone()
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn a_rank_killed_more_often_than_max_attempts_is_lost_not_failed_and_the_student_is_identical() {
    const KILLS: usize = 4;
    let fx = tempfile::tempdir().unwrap();
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let mut workers: Vec<WorkerProc> = (0..2)
        .map(|i| WorkerProc::real(&coord.url(), &fx.path().join(format!("w{i}")), "cpu"))
        .collect();
    let id = submit(&coord, &spec(fx.path(), "interrupted", 2, 16384));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_checkpoint = String::new();
    let mut attempts_at_kill = 0;
    for k in 0..KILLS {
        // Wait until the k-th attempt of the gang runs and has reported a new checkpoint.
        loop {
            let v = coord.status_json(Some(&id));
            assert_eq!(v["state"], "running", "{v}");
            if let Some(t) = tasks_of(&v, "distill").first() {
                let ck = t["checkpoint"].as_str().unwrap_or_default().to_string();
                if n(&t["attempts"]) > attempts_at_kill
                    && t["state"] == "leased"
                    && !ck.is_empty()
                    && ck != seen_checkpoint
                {
                    seen_checkpoint = ck;
                    attempts_at_kill = n(&t["attempts"]);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kill {k}: no new checkpoint: {v}\n{}",
                coord.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // SIGKILL the oldest rank's worker (alternating between the gang's two places) and
        // start one in its place: every other time a new worker in a new work dir (the dead
        // one's lease expires or its peer reports the broken ring), else the same worker
        // restarted in its work dir (registering again ends its attempt at once).
        let mut dead = workers.remove(0);
        dead.kill();
        let dir = if k % 2 == 0 {
            fx.path().join(format!("w{}", k + 2))
        } else {
            dead.log.parent().unwrap().to_path_buf()
        };
        eprintln!(
            "kill {}: {} killed after checkpoint {seen_checkpoint}; starting {}",
            k + 1,
            dead.log.display(),
            dir.display()
        );
        workers.push(WorkerProc::real(&coord.url(), &dir, "cpu"));
    }
    let v = wait_terminal(&coord, &id, Duration::from_secs(120));
    assert_eq!(v["state"], "succeeded", "{v}");
    let t = distill_task(&v);
    eprintln!("distill task after {KILLS} kills: {t}");
    assert_eq!(t["state"], "succeeded");
    assert_eq!(n(&t["failed"]), 0, "a lost rank is not a failure: {t}");
    assert!(
        n(&t["lost"]) >= KILLS as u64,
        "every kill is a lost attempt: {t}"
    );
    assert!(
        n(&t["lost"]) > 3,
        "more lost attempts than max_attempts = 3: {t}"
    );
    assert_eq!(n(&t["attempts"]), n(&t["lost"]) + 1, "{t}");
    assert_eq!(n(&t["revoked"]), 0);
    // Every other task ran once.
    for k in ["score", "prune"] {
        for t in tasks_of(&v, k) {
            assert_eq!((n(&t["attempts"]), n(&t["lost"])), (1, 0), "{t}");
        }
    }
    let d = &v["rounds"][0]["metrics"]["distill"];
    assert_eq!(d["steps"], 128.0, "{d}");
    let resumed = d["resumed_from_step"].as_f64().unwrap();
    assert!(resumed >= 4.0 * KILLS as f64, "resumed from {resumed}");
    let interrupted = student_of(&v);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(all_events(&coord, &id));
    let lost: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "task_lost")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(lost.len() as u64, n(&t["lost"]), "{lost:#?}");
    assert!(
        lost.iter()
            .any(|m| m.contains("restarted (registered again as")),
        "a restarted worker's attempt is lost at registration: {lost:#?}"
    );
    assert!(!events
        .iter()
        .any(|e| e.kind == "task_retry" || e.kind == "task_failed"));

    // The same campaign, uninterrupted, on the two live workers.
    let id2 = submit(&coord, &spec(fx.path(), "straight", 2, 16384));
    let v2 = wait_terminal(&coord, &id2, Duration::from_secs(120));
    assert_eq!(v2["state"], "succeeded", "{v2}");
    let t2 = distill_task(&v2);
    assert_eq!((n(&t2["attempts"]), n(&t2["lost"])), (1, 0), "{t2}");
    assert_eq!(
        student_of(&v2),
        interrupted,
        "the student of the run with {KILLS} lost ranks differs from the uninterrupted one"
    );
}

#[test]
fn a_task_that_fails_by_itself_fails_after_max_attempts_and_retry_continues_from_its_phase() {
    let fx = tempfile::tempdir().unwrap();
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &fx.path().join("w"), "cpu");
    let spec_path = spec(fx.path(), "corrupt", 1, 2048);
    let id = submit(&coord, &spec_path);
    // After submit (which checked the files), the training file goes bad: it is not JSONL.
    let train = fx.path().join("web.jsonl");
    let good = std::fs::read(&train).unwrap();
    std::fs::write(&train, "this is not JSON\n").unwrap();
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "failed", "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("distill")
            && err.contains("failed after 3 attempt(s)")
            && err.contains("data.train[0]"),
        "{err}"
    );
    let t = distill_task(&v);
    assert_eq!(t["state"], "failed");
    assert_eq!(
        (n(&t["attempts"]), n(&t["failed"]), n(&t["lost"])),
        (3, 3, 0),
        "{t}"
    );
    let text = coord.cli(&["status", &id]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("(distill) failed: 3 attempt(s), 0 lost, 3 failed; last: rank 0"),
        "{text}"
    );
    let earlier: Vec<serde_json::Value> = ["score", "prune"]
        .iter()
        .flat_map(|k| tasks_of(&v, k))
        .collect();
    assert!(!earlier.is_empty());
    for t in &earlier {
        assert_eq!(
            (&t["state"], n(&t["attempts"])),
            (&"succeeded".into(), 1),
            "{t}"
        );
    }

    // Retry refuses a campaign that has not failed, with exit 2 (bad input).
    let other = submit(&coord, &spec(fx.path(), "other", 1, 2048));
    let out = coord.cli(&["retry", &other]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not failed") && stderr.contains(&other),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    coord.cli(&["cancel", &other]);
    let out = coord.cli(&["retry", "c999999"]);
    assert_eq!(out.status.code(), Some(2));

    // Fix the file and continue.
    std::fs::write(&train, &good).unwrap();
    let out = coord.cli(&["retry", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{id} running")
    );
    // `watch` follows the campaign past the failure that retry continued, to its success.
    let w = coord.cli(&["watch", &id]);
    let text = String::from_utf8_lossy(&w.stdout);
    assert!(w.status.success(), "{text}");
    assert!(text.contains("retried from round 0 distill"), "{text}");
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(v["retries"], 1);
    let t = distill_task(&v);
    assert_eq!(
        (&t["state"], n(&t["attempts"]), n(&t["failed"])),
        (&"succeeded".into(), 1, 0),
        "{t}"
    );
    // Earlier phases were not redone: the same records, each leased once.
    let after: Vec<serde_json::Value> = ["score", "prune"]
        .iter()
        .flat_map(|k| tasks_of(&v, k))
        .collect();
    assert_eq!(after, earlier);
    // And the event log agrees: after the retry, only the failed phase's task was leased; the
    // failure's reason stays in the log.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(all_events(&coord, &id));
    let retry_at = events
        .iter()
        .position(|e| e.kind == "campaign_retry")
        .unwrap_or_else(|| panic!("no campaign_retry event: {events:?}"));
    assert!(
        events[retry_at]
            .message
            .contains("failed after 3 attempt(s)"),
        "{}",
        events[retry_at].message
    );
    assert!(events[..retry_at]
        .iter()
        .any(|e| e.kind == "task_failed" && e.message.contains("data.train[0]")));
    let leased_after: Vec<&str> = events[retry_at..]
        .iter()
        .filter(|e| e.kind == "task_leased")
        .map(|e| e.task_id.as_str())
        .collect();
    let distill_id = t["id"].as_str().unwrap();
    assert_eq!(leased_after, vec![distill_id], "{events:?}");
    assert_eq!(events.last().map(|e| e.state), Some(4), "ends succeeded");
    // A succeeded campaign cannot be retried.
    assert_eq!(coord.cli(&["retry", &id]).status.code(), Some(2));
}
