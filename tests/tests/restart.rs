//! SIGKILL of the coordinator at several points: the campaign finishes after a restart on the
//! same data dir, with no event lost or duplicated. With each store engine: redb (the default,
//! which every other end-to-end test runs on too) and sled.

use std::collections::BTreeMap;
use std::time::Duration;

use distillery_tests::*;

const FAST: &[&str] = &[
    "--lease-timeout-ms",
    "3000",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "2000",
    "--backoff-base-ms",
    "100",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_coordinator_at_any_point_loses_no_event() {
    sigkill_at_any_point("redb").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_coordinator_at_any_point_loses_no_event_with_sled() {
    sigkill_at_any_point("sled").await
}

async fn sigkill_at_any_point(store: &str) {
    let fx = fixture();
    let args: Vec<&str> = FAST.iter().copied().chain(["--store", store]).collect();
    let mut coord = CoordinatorProc::start(&fx.path().join("data"), &args);
    let env = [
        ("SCRIPT_TASK_MS", "800".to_string()),
        ("SCRIPT_RANK_DELAY_MS", "2500".to_string()),
        ("SCRIPT_DISTILL_STEPS", "8".to_string()),
    ];
    let w1 = WorkerProc::scripted(&coord.url(), &fx.path().join("w1"), &env);
    let w2 = WorkerProc::scripted(&coord.url(), &fx.path().join("w2"), &env);
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 2, ""));
    let id = submit(&coord, &spec);
    let t = Duration::from_secs(60);

    // 1. Mid-lease: a scoring task is running on a worker.
    wait_event(&coord, &id, t, |e| {
        e.kind == "task_leased" && e.phase == "score"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    coord.restart();

    // 2. Between phases: scoring is done and pruning was just planned.
    wait_event(&coord, &id, t, |e| {
        e.kind == "phase_started" && e.phase == "prune"
    })
    .await;
    coord.restart();

    // 3. Mid-rendezvous: rank 0 waits at the barrier while rank 1 is still on its way.
    wait_event(&coord, &id, t, |e| {
        e.kind == "task_leased" && e.phase == "distill"
    })
    .await;
    let at_barrier = tokio::task::spawn_blocking(move || {
        let seen = |w: &WorkerProc| w.log_text().contains("rendezvous: waiting for the gang");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !(seen(&w1) || seen(&w2)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let complete =
            w1.log_text().contains("gang complete") || w2.log_text().contains("gang complete");
        (seen(&w1) || seen(&w2), complete, w1, w2)
    });
    let (seen, complete, w1, w2) = at_barrier.await.unwrap();
    assert!(seen && !complete, "a rank must be waiting at the barrier");
    coord.restart();

    // 4. Mid-distillation, after a checkpoint.
    wait_event(&coord, &id, t, |e| {
        e.kind == "task_progress" && e.metrics.get("step").is_some_and(|s| *s >= 4.0)
    })
    .await;
    coord.restart();

    let v = wait_terminal(&coord, &id, Duration::from_secs(90));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(w1.log_text().contains("gang complete") || w2.log_text().contains("gang complete"));

    let events = all_events(&coord, &id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    let mut succeeded: BTreeMap<&str, usize> = BTreeMap::new();
    let mut phases: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for e in &events {
        match e.kind.as_str() {
            "task_succeeded" => *succeeded.entry(e.task_id.as_str()).or_default() += 1,
            "phase_started" => *phases.entry((e.round, e.phase.as_str())).or_default() += 1,
            _ => {}
        }
    }
    assert!(
        succeeded.values().all(|n| *n == 1),
        "a task succeeded twice: {succeeded:?}"
    );
    assert_eq!(
        succeeded.len() as u64,
        v["tasks"]["succeeded"].as_u64().unwrap()
    );
    assert!(
        phases.values().all(|n| *n == 1),
        "a phase started twice: {phases:?}"
    );
    assert_eq!(
        phases.len(),
        4,
        "score, prune, distill, evaluate: {phases:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "campaign_state" && e.message.contains("succeeded"))
            .count(),
        1
    );
    assert_eq!(
        coord.log_text().matches("coordinator serving").count(),
        5,
        "four restarts"
    );
    assert_eq!(
        strip_ansi(&coord.log_text())
            .matches(&format!("store={store}"))
            .count(),
        5,
        "every start on the {store} engine"
    );
    assert_eq!(
        std::fs::read_to_string(coord.data_dir.join("store-engine")).unwrap(),
        format!("{store}\n")
    );
    // Leases outlive a coordinator restart: the gang was never re-leased.
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "task_leased" && e.phase == "distill")
            .count(),
        1
    );
    assert_eq!(v["rounds"][0]["metrics"]["distill"]["steps"], 8.0);
}

#[test]
fn workers_register_again_when_the_coordinator_lost_its_state_and_real_workers_join() {
    let fx = fixture();
    let metrics = format!("127.0.0.1:{}", free_port());
    let args: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["--metrics-listen", metrics.as_str()])
        .collect();
    let mut coord = CoordinatorProc::start(&fx.path().join("data"), &args);
    // The production worker binary joins and so does a scripted one.
    let real = WorkerProc::real(&coord.url(), &fx.path().join("real"), "cpu:2");
    let scripted = WorkerProc::scripted(&coord.url(), &fx.path().join("w"), &[]);
    assert!(
        eventually(Duration::from_secs(20), || scrape(&metrics)
            .contains("distillery_workers 2")),
        "{}",
        scrape(&metrics)
    );
    // The coordinator comes back with an empty data dir: the workers' ids are unknown now.
    coord.kill();
    std::fs::remove_dir_all(&coord.data_dir).unwrap();
    coord.restart();
    assert!(
        eventually(Duration::from_secs(20), || scrape(&metrics)
            .contains("distillery_workers 2")),
        "workers did not register again: {}",
        scrape(&metrics)
    );
    assert!(scripted.wait_log("registering again", Duration::from_secs(1)));
    // The campaign's teacher here is a config without weights, which only the scripted worker
    // can "run"; the real one has shown it registers and leaves.
    let mut real = real;
    real.kill();
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, "")),
    );
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded");
    let m = scrape(&metrics);
    assert!(
        m.contains("distillery_campaigns{state=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(m.contains("distillery_tasks{state=\"failed\"} 0"), "{m}");
    assert!(real.log_text().contains("registered"));
}

/// The text of a log without its ANSI colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
