//! Chaos: random SIGKILLs of the coordinator and the workers during a two-round campaign, and a
//! network partition between a gang rank and the coordinator. Losing machines must never lose
//! the campaign nor change its result.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use distillery_proto::v1 as pb;
use distillery_tests::chaos::{self, ChaosConfig};
use distillery_tests::proxy::LinkProxy;
use distillery_tests::*;

/// The tests here each run a cluster of real ML workers; on a small CI machine they must not
/// compete for the cores, or heartbeats starve and leases expire for no fault of the test.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// CI's seed. A seed that ever fails is a regression test: add it here.
const CI_SEED: u64 = 20261201;

#[test]
fn a_two_round_campaign_survives_seeded_random_kills_with_the_same_student() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = ChaosConfig::from_env(CI_SEED, 16);
    let report = chaos::run(&cfg, ML_TIMING);
    assert!(
        report.kills.len() >= 10.min(cfg.kills),
        "only {} of {} kills happened before the campaign ended\n{}",
        report.kills.len(),
        cfg.kills,
        report.summary()
    );
    assert_eq!(
        report.state(),
        "succeeded",
        "seed {}: the campaign did not survive\n{}\nstatus {}",
        cfg.seed,
        report.summary(),
        report.status
    );
    let a = report.attempts();
    assert!(a.records > 0, "status --json lists no task records");
    assert_eq!(
        a.failed,
        0,
        "seed {}: killing processes must never be charged as a failed attempt\n{}",
        cfg.seed,
        report.summary()
    );
    assert!(
        report.passed(),
        "seed {}: the student differs from the uninterrupted run's\n{}",
        cfg.seed,
        report.summary()
    );
}

/// `key=value` of a log line, ANSI colours removed.
fn field(line: &str, key: &str) -> Option<String> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// The lease of the first `distill` rank the worker started, from its log.
fn distill_lease(w: &WorkerProc) -> Option<pb::LeaseRef> {
    let log = w.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("task started") && field(l, "kind").as_deref() == Some("distill"))?;
    Some(pb::LeaseRef {
        task_id: field(line, "task")?,
        lease_id: field(line, "lease")?.parse().ok()?,
        rank: field(line, "rank")?.parse().ok()?,
    })
}

/// Events that end a task's attempt (`task_lost` / `task_revoked` once lost attempts are told
/// apart from failed ones).
fn ends_attempt(e: &pb::Event) -> bool {
    matches!(
        e.kind.as_str(),
        "task_retry" | "task_lost" | "task_revoked" | "task_failed" | "task_succeeded"
    )
}

fn progress_step(e: &pb::Event) -> f64 {
    e.metrics
        .get("progress.distill.step")
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn a_gang_rank_cut_off_by_a_partition_loses_its_lease_and_its_late_reports_are_refused() {
    use futures::StreamExt;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let fx = chaos::CampaignFixture::new(1, false);
    let reference = chaos::run_reference(&fx, ML_TIMING, Duration::from_secs(300));
    let root = fx.path().join("partition");
    std::fs::create_dir_all(&root).unwrap();
    let coord = CoordinatorProc::start(&root.join("data"), ML_TIMING);
    let proxy = LinkProxy::start(([127, 0, 0, 1], coord.port).into());
    // Worker A reaches the coordinator only through the proxy; B directly.
    let a = WorkerProc::real(&proxy.url(), &root.join("worker-a"), "cpu");
    let b = WorkerProc::real(&coord.url(), &root.join("worker-b"), "cpu");
    let id = submit(&coord, &fx.spec("partition"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Wait until A holds a distill rank and the gang has reported a checkpoint (step 8) and
    // gone past it, so a restart has something to resume from.
    let deadline = Instant::now() + Duration::from_secs(120);
    let old = loop {
        assert!(
            Instant::now() < deadline,
            "A never held a distill rank: {}\n{}",
            coord.status_json(Some(&id)),
            a.log_text()
        );
        if let Some(l) = distill_lease(&a) {
            break l;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    rt.block_on(wait_event(&coord, &id, Duration::from_secs(60), |e| {
        e.kind == "task_progress" && e.lease_id == old.lease_id && progress_step(e) >= 9.0
    }));
    proxy.cut();
    let cut_at = Instant::now();
    eprintln!(
        "partition: cut worker A (task {} rank {} lease {}) after {} bytes",
        old.task_id,
        old.rank,
        old.lease_id,
        proxy.forwarded()
    );
    // A replacement, so the gang can form again while A is unreachable.
    let c = WorkerProc::real(&coord.url(), &root.join("worker-c"), "cpu");

    // A stops heart-beating through the dead link: its lease expires, which ends the gang's
    // attempt (every rank of it).
    let ended = rt.block_on(wait_event(&coord, &id, Duration::from_secs(60), |e| {
        e.lease_id == old.lease_id && ends_attempt(e)
    }));
    let ended_after = cut_at.elapsed();
    eprintln!(
        "partition: lease {} ended {:.1} s after the cut: {} {}",
        old.lease_id,
        ended_after.as_secs_f64(),
        ended.kind,
        ended.message
    );
    assert!(
        ended.message.contains("expired") && ended.message.contains(&format!("rank {}", old.rank)),
        "the cut rank's lease must expire: {ended:?}"
    );
    assert!(
        ended_after >= Duration::from_millis(4000),
        "a 5 s lease ended {ended_after:?} after the cut: not by expiry"
    );
    assert!(
        !matches!(ended.kind.as_str(), "task_succeeded" | "task_failed"),
        "{ended:?}"
    );
    assert!(
        !a.log_text().contains("report refused") && !a.log_text().contains("lease revoked"),
        "A cannot have heard anything while cut"
    );
    // Give the gang a moment to form again while A is still cut off (B and C, when B is free).
    let relet_in_cut = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(3),
                wait_event(&coord, &id, Duration::from_secs(60), |e| {
                    e.kind == "task_leased" && e.task_id == old.task_id && e.lease_id > old.lease_id
                }),
            )
            .await
        })
        .is_ok();

    // Heal: what A sent during the cut arrives now, and A sends more with its old lease.
    proxy.heal();
    let late = rt.block_on(async {
        let mut w = {
            let t = distillery_proto::client::Target {
                url: proxy.url(),
                ..Default::default()
            };
            let ch = t.channel().await.expect("connect through the proxy");
            t.workers(ch).expect("client")
        };
        // A real artifact, so that only the lease can be wrong.
        let digest =
            upload_artifact(&mut w, &root.join("not-a-student.bin"), b"not a student").await;
        let progress = w
            .report_progress(pb::ReportProgressRequest {
                lease: Some(old.clone()),
                metrics: [("progress.distill.step".to_string(), 1e6)].into(),
                checkpoint: digest.clone(),
                message: "late".into(),
            })
            .await;
        let complete = w
            .complete_task(pb::CompleteTaskRequest {
                lease: Some(pb::LeaseRef {
                    rank: 0,
                    ..old.clone()
                }),
                outputs: [("student".to_string(), digest.clone())].into(),
                metrics: [("distill.steps".to_string(), 1.0)].into(),
            })
            .await;
        let fail = w
            .fail_task(pb::FailTaskRequest {
                lease: Some(old.clone()),
                error: "late failure".into(),
                retryable: false,
                ..Default::default()
            })
            .await;
        [progress.err(), complete.err(), fail.err()].map(|e| e.map(|s| s.code()))
    });
    assert_eq!(
        late,
        [Some(tonic::Code::FailedPrecondition); 3],
        "late progress / complete / fail with lease {} must be fenced off",
        old.lease_id
    );
    assert!(
        a.wait_log("lease revoked", Duration::from_secs(20))
            || a.wait_log("report refused", Duration::from_secs(1)),
        "A must learn that its lease is gone once the link heals:\n{}",
        a.log_text()
    );
    assert!(proxy.held() > 0, "A sent nothing during the cut");
    let relet = rt.block_on(wait_event(&coord, &id, Duration::from_secs(60), |e| {
        e.kind == "task_leased" && e.task_id == old.task_id && e.lease_id > old.lease_id
    }));
    eprintln!(
        "partition: the gang was leased again as lease {} ({}): {}",
        relet.lease_id,
        if relet_in_cut {
            "during the cut"
        } else {
            "only after the link healed: the rank still connected to A was blocked in the ring"
        },
        relet.message
    );
    eprintln!(
        "partition: healed; {} bytes held during the cut were delivered late",
        proxy.held()
    );

    let v = wait_terminal(&coord, &id, Duration::from_secs(180));
    assert_eq!(v["state"], "succeeded", "{v}");
    let d = &v["rounds"][0]["metrics"]["distill"];
    let resumed = d["resumed_from_step"].as_f64().unwrap_or(0.0);
    assert!(
        resumed >= 8.0,
        "the gang restarts from its checkpoint, not from scratch: {d}"
    );
    assert_eq!(
        chaos::students(&v).last().cloned().flatten(),
        reference.student(),
        "the student differs from the uninterrupted run's"
    );

    // The event log: nothing was recorded for the old lease after it ended, and the task
    // succeeded once, under a newer lease.
    let events = rt.block_on(async {
        let mut s = watch_from(&coord, &id, 1).await;
        let mut out = Vec::new();
        while let Some(e) = s.next().await {
            out.push(e.expect("event"));
        }
        out
    });
    assert!(
        events
            .iter()
            .all(|e| e.seq <= ended.seq || e.lease_id != old.lease_id),
        "lease {} changed the campaign after it ended: {events:#?}",
        old.lease_id
    );
    let succeeded: Vec<&pb::Event> = events
        .iter()
        .filter(|e| e.kind == "task_succeeded" && e.task_id == old.task_id)
        .collect();
    assert_eq!(succeeded.len(), 1);
    assert!(succeeded[0].lease_id > old.lease_id);
    drop((b, c));
}

/// Found by `scripts/chaos.sh --kills 100 --seed 100`: a gang resumed from its final checkpoint
/// runs no step and reports `distill.final_loss = NaN`; the coordinator stores it, sled's JSON
/// record holds `null`, and the next restart refuses to load the state ("corrupt record ...:
/// invalid type: null, expected f64"). Here the same through the raw API: a report with a
/// non-finite metric must never make the coordinator unable to restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_finite_metric_never_keeps_the_coordinator_from_restarting() {
    let fx = fixture();
    let mut coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let spec = "[scheduling]\nscore_shards = 1\n[evaluation]\nperplexity = false\n";
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, spec)),
    );
    let mut w = coord.workers(None).await;
    let me = w
        .register(pb::RegisterRequest {
            host: "raw".into(),
            devices: vec!["cpu".into()],
            task_kinds: vec!["score".into()],
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .worker_id;
    let mut lease = None;
    for _ in 0..20 {
        let r = w
            .poll_task(pb::PollTaskRequest {
                worker_id: me.clone(),
                free_devices: vec!["cpu".into()],
            })
            .await
            .expect("poll")
            .into_inner();
        if let Some(a) = r.assignments.into_iter().next() {
            lease = a.lease;
            break;
        }
    }
    let lease = lease.expect("a score task");
    let digest = upload_artifact(&mut w, &fx.path().join("scores.bin"), b"scores").await;
    // Refusing it (InvalidArgument) or storing it safely are both fine; bricking is not.
    let _ = w
        .report_progress(pb::ReportProgressRequest {
            lease: Some(lease.clone()),
            metrics: [("progress.score.loss".to_string(), f64::NAN)].into(),
            ..Default::default()
        })
        .await;
    let _ = w
        .complete_task(pb::CompleteTaskRequest {
            lease: Some(lease),
            outputs: [("scores".to_string(), digest)].into(),
            metrics: [("score.loss".to_string(), f64::NAN)].into(),
        })
        .await;
    coord.kill();
    let log = coord.log.clone();
    let restarted = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            coord.restart();
            coord
        }))
    })
    .await
    .unwrap();
    let coord = restarted.unwrap_or_else(|_| {
        panic!(
            "the coordinator cannot restart after a NaN metric:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(coord.status_json(Some(&id))["state"], "running");
}
