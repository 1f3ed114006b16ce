//! Leases as fencing tokens: lost heartbeats, stale reports, cancel and pause.

use std::time::{Duration, Instant};

use distillery_proto::v1 as pb;
use distillery_tests::*;

const FAST: &[&str] = &[
    "--lease-timeout-ms",
    "1500",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "1000",
    "--backoff-base-ms",
    "100",
];

const ONE_SHARD: &str = "[scheduling]\nscore_shards = 1\n[evaluation]\nperplexity = false\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_heartbeating_loses_its_lease() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), FAST);
    let slow = WorkerProc::scripted(
        &coord.url(),
        &fx.path().join("slow"),
        &[("SCRIPT_TASK_MS", "6000".into())],
    );
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, ONE_SHARD)),
    );
    let first = wait_event(&coord, &id, Duration::from_secs(30), |e| {
        e.kind == "task_leased"
    })
    .await;
    slow.stop();
    let _fast = WorkerProc::scripted(&coord.url(), &fx.path().join("fast"), &[]);
    let retry = wait_event(&coord, &id, Duration::from_secs(30), |e| {
        e.kind == "task_lost"
    })
    .await;
    assert_eq!(retry.task_id, first.task_id);
    assert!(
        retry.message.contains("stopped heart-beating"),
        "{}",
        retry.message
    );
    let second = wait_event(&coord, &id, Duration::from_secs(30), |e| {
        e.kind == "task_leased" && e.lease_id != first.lease_id && e.task_id == first.task_id
    })
    .await;
    assert!(second.lease_id > first.lease_id);
    wait_event(&coord, &id, Duration::from_secs(30), |e| {
        e.kind == "task_succeeded" && e.task_id == first.task_id
    })
    .await;
    // The frozen worker wakes up: its lease is gone, and it learns so instead of reporting.
    slow.cont();
    let told = tokio::task::spawn_blocking(move || {
        let ok = slow.wait_log("lease revoked", Duration::from_secs(10))
            || slow.wait_log("report refused", Duration::from_secs(1));
        (ok, slow)
    });
    let (told, _slow) = told.await.unwrap();
    assert!(told, "the stale worker must stop its task");
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded");
    let events = all_events(&coord, &id).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "task_succeeded" && e.task_id == first.task_id)
            .count(),
        1
    );
}

async fn register(w: &mut distillery_proto::client::WorkerClient) -> String {
    w.register(pb::RegisterRequest {
        host: "raw".into(),
        devices: vec!["cpu".into()],
        task_kinds: vec!["score".into()],
        ..Default::default()
    })
    .await
    .expect("register")
    .into_inner()
    .worker_id
}

async fn poll_one(w: &mut distillery_proto::client::WorkerClient, id: &str) -> pb::TaskAssignment {
    for _ in 0..20 {
        let r = w
            .poll_task(pb::PollTaskRequest {
                worker_id: id.into(),
                free_devices: vec!["cpu".into()],
            })
            .await
            .expect("poll");
        if let Some(a) = r.into_inner().assignments.into_iter().next() {
            return a;
        }
    }
    panic!("no assignment");
}

/// Events so far: follows the log until it has been quiet for a moment.
async fn events_so_far(c: &CoordinatorProc, id: &str) -> Vec<pb::Event> {
    use futures::StreamExt;
    let mut client = c.campaigns(None).await;
    let mut s = client
        .watch(pb::WatchRequest {
            campaign_id: id.into(),
            from_seq: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), s.next()).await {
        out.push(e.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_with_a_stale_lease_is_refused_and_changes_nothing() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), FAST);
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, ONE_SHARD)),
    );
    let mut wc = coord.workers(None).await;
    let a_id = register(&mut wc).await;
    let a = poll_one(&mut wc, &a_id).await;
    let old = a.lease.clone().unwrap();
    // A never heart-beats: its lease expires and B gets the task under a new lease.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let b_id = register(&mut wc).await;
    let b = poll_one(&mut wc, &b_id).await;
    let new = b.lease.clone().unwrap();
    assert_eq!(new.task_id, old.task_id);
    assert!(new.lease_id > old.lease_id);

    // A real artifact to report, so only the lease can be wrong.
    let digest = upload_artifact(&mut wc, &fx.path().join("scores.bin"), b"scores").await;

    let status_before = coord.status_json(Some(&id));
    let events_before = events_so_far(&coord, &id).await;
    let outputs: std::collections::HashMap<String, String> =
        [("scores".to_string(), digest.clone())].into();
    let e = wc
        .complete_task(pb::CompleteTaskRequest {
            lease: Some(old.clone()),
            outputs: outputs.clone(),
            metrics: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = wc
        .fail_task(pb::FailTaskRequest {
            lease: Some(old.clone()),
            error: "x".into(),
            retryable: false,
            lost: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = wc
        .report_progress(pb::ReportProgressRequest {
            lease: Some(old.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let hb = wc
        .heartbeat(pb::HeartbeatRequest {
            worker_id: a_id.clone(),
            leases: vec![old.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancelled, vec![old.clone()]);
    assert!(hb.renewed.is_empty());
    assert_eq!(
        coord.status_json(Some(&id)),
        status_before,
        "stale reports changed the campaign"
    );
    assert_eq!(
        events_so_far(&coord, &id).await,
        events_before,
        "stale reports wrote events"
    );

    // An output that was never uploaded is refused too.
    let bogus: std::collections::HashMap<String, String> =
        [("scores".to_string(), "ab".repeat(32))].into();
    let e = wc
        .complete_task(pb::CompleteTaskRequest {
            lease: Some(new.clone()),
            outputs: bogus,
            metrics: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The current lease completes.
    wc.complete_task(pb::CompleteTaskRequest {
        lease: Some(new.clone()),
        outputs,
        metrics: Default::default(),
    })
    .await
    .expect("complete");
    let after = events_so_far(&coord, &id).await;
    assert!(after
        .iter()
        .any(|e| e.kind == "task_succeeded" && e.lease_id == new.lease_id));
}

fn wait_count(w: &WorkerProc, needle: &str, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if w.log_text().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_cancel_stop_running_tasks_within_a_heartbeat() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), FAST);
    let w = WorkerProc::scripted(
        &coord.url(),
        &fx.path().join("w"),
        &[("SCRIPT_TASK_MS", "60000".into())],
    );
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, ONE_SHARD)),
    );
    wait_event(&coord, &id, Duration::from_secs(30), |e| {
        e.kind == "task_leased"
    })
    .await;
    assert!(w.wait_log("task started", Duration::from_secs(10)));

    let out = coord.cli(&["pause", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{id} paused")
    );
    // Heartbeats every 300 ms: the worker hears of it well within a few intervals.
    assert!(
        wait_count(&w, "lease revoked", 1, Duration::from_secs(3)),
        "pause did not reach the worker"
    );
    let v = coord.status_json(Some(&id));
    assert_eq!(v["state"], "paused");
    assert_eq!(v["tasks"]["leased"], 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        coord.status_json(Some(&id))["tasks"]["leased"],
        0,
        "a paused campaign hands out nothing"
    );

    let out = coord.cli(&["resume", &id]);
    assert!(out.status.success());
    assert!(
        wait_count(&w, "task started", 2, Duration::from_secs(10)),
        "resume re-leases the task"
    );
    let out = coord.cli(&["cancel", &id]);
    assert!(out.status.success());
    assert!(
        wait_count(&w, "lease revoked", 2, Duration::from_secs(3)),
        "cancel did not reach the worker"
    );
    let out = coord.cli(&["watch", &id]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "watch exits 1 for a cancelled campaign"
    );
    assert_eq!(coord.status_json(Some(&id))["state"], "cancelled");
    let out = coord.cli(&["resume", &id]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cancelled") && err.lines().count() == 1,
        "{err}"
    );
}
