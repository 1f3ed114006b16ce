//! A campaign through every phase with the real coordinator binary and worker processes.

use std::time::Duration;

use distillery_tests::*;

pub const FAST: &[&str] = &[
    "--lease-timeout-ms",
    "2000",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "2000",
    "--backoff-base-ms",
    "100",
];

const JUDGED: &str = "[evaluation]\nperplexity = true\n\
    judge = { backend = \"openai\", base_url = \"http://127.0.0.1:9/v1\", model = \"judge\", questions = \"questions.jsonl\" }\n\
    [gate]\nmax_perplexity_ratio = 1.5\nmin_win_rate = 0.25\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_through_every_phase_with_real_processes() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), FAST);
    let _w1 = WorkerProc::scripted(&coord.url(), &fx.path().join("w1"), &[]);
    let _w2 = WorkerProc::scripted(&coord.url(), &fx.path().join("w2"), &[]);
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(2, 2, JUDGED));
    let id = submit(&coord, &spec);
    assert!(id.starts_with('c'), "submit prints the id alone: {id:?}");

    let c2 = coord.url();
    let id2 = id.clone();
    let watch = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("coordinator"))
            .args(["watch", &id2, "--addr", &c2])
            .output()
            .expect("watch")
    });
    let out = tokio::time::timeout(Duration::from_secs(120), watch)
        .await
        .expect("watch ends")
        .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "watch exits 0 on success: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("step 8/8"), "watch shows progress: {text}");

    let v = coord.status_json(Some(&id));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["name"], "e2e");
    assert!(v["error"].is_null());
    let rounds = v["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["state"], "succeeded");
        assert_eq!(r["phase"], "done");
        assert_eq!(r["params"], 1000 - 100 * i as u64);
        assert_eq!(r["target"]["num_layers"], [3, 2][i]);
        let m = &r["metrics"];
        assert_eq!(m["perplexity"], 12.0);
        assert_eq!(m["teacher_perplexity"], 10.0);
        assert_eq!(m["judge"]["wins"], 5.0);
        assert_eq!(m["judge"]["win_rate"], 0.6);
        assert_eq!(m["distill"]["world_size"], 2.0);
        assert_eq!(m["distill"]["steps"], 8.0);
        assert_eq!(m["distill"]["tokens"], 1000.0);
        assert!(m["distill"]["final_loss"].as_f64().is_some());
        assert!(r["artifacts"]["student"]
            .as_str()
            .is_some_and(|s| s.starts_with("sha256:")));
    }
    let all = coord.status_json(None);
    assert_eq!(all["campaigns"].as_array().map(Vec::len), Some(1));

    // The student comes back through `artifact get`, by campaign id, checked by digest.
    let out_dir = fx.path().join("student");
    let out = coord.cli(&["artifact", "get", &id, "--out", out_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = rounds[1]["artifacts"]["student"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join(&digest)).expect("student file"))
            .unwrap();
    assert!(body["task"].as_str().is_some());

    // The pruned model is a directory artifact: it comes back as the same files.
    let pruned = rounds[0]["artifacts"]["pruned"].as_str().unwrap();
    let pdir = fx.path().join("pruned");
    let out = coord.cli(&["artifact", "get", pruned, "--out", pdir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pdir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["kind"], "prune");
    assert_eq!(
        std::fs::read(pdir.join("sub/weights.bin")).unwrap(),
        vec![0u8; 3 << 20]
    );

    // Every event is in the log once, in order, and a watch resumes from any sequence number.
    let events = all_events(&coord, &id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let mut client = coord.campaigns(None).await;
    let from = seqs.len() as u64 - 5;
    let mut tail = client
        .watch(distillery_proto::v1::WatchRequest {
            campaign_id: id.clone(),
            from_seq: from,
        })
        .await
        .unwrap()
        .into_inner();
    let mut resumed = Vec::new();
    while let Some(e) = tail.message().await.unwrap() {
        resumed.push(e);
    }
    assert_eq!(resumed.as_slice(), &events[from as usize - 1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_attempt_is_retried_and_the_gate_extends_then_stops() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), FAST);
    // Every task kind's first attempt fails once for "prune"; the student misses the gate, and
    // one extension with more tokens is not enough either.
    let env = [
        ("SCRIPT_FAIL_ONCE", "prune".to_string()),
        ("SCRIPT_PPL", "30".into()),
        ("SCRIPT_PPL_EXTENDED", "20".into()),
    ];
    let _w = WorkerProc::scripted(&coord.url(), &fx.path().join("w1"), &env);
    let gate = "[gate]\nmax_perplexity_ratio = 1.5\non_fail = \"extend_distill\"\n";
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, gate));
    let id = submit(&coord, &spec);
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "failed");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("gate.max_perplexity_ratio") && err.contains("2.000x"),
        "{err}"
    );
    let r = &v["rounds"][0];
    assert_eq!(r["extensions"], 1);
    assert_eq!(
        r["metrics"]["perplexity"], 20.0,
        "the extended student was evaluated"
    );
    assert_eq!(
        r["metrics"]["distill"]["tokens"], 2000.0,
        "extension doubles the tokens"
    );
    let events = all_events(&coord, &id).await;
    assert!(events
        .iter()
        .any(|e| e.kind == "task_retry" && e.message.contains("scripted failure of prune")));
    // The extension resumed from the first distillation's last checkpoint.
    let resumed = events
        .iter()
        .rfind(|e| e.kind == "task_succeeded" && e.phase == "distill")
        .unwrap();
    assert_eq!(resumed.metrics.get("distill.resumed_from_step"), Some(&8.0));
}
