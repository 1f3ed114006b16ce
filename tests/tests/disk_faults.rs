//! Disk faults at the coordinator: a state store that cannot write poisons the coordinator (every
//! call UNAVAILABLE naming the cause, health NOT_SERVING) and a restart on the same data dir has
//! exactly what was acknowledged; a stored artifact whose bytes changed is never served.

use std::time::Duration;

use distillery_coordinator::faults::{Fault, FaultInjection};
use distillery_coordinator::server::{self, ServeOptions};
use distillery_proto::client::Target;
use distillery_proto::v1 as pb;
use distillery_tests::*;

const FAST: &[&str] = &[
    "--lease-timeout-ms",
    "2000",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "2000",
    "--backoff-base-ms",
    "100",
];

fn submit_request(dir: &std::path::Path) -> pb::SubmitRequest {
    pb::SubmitRequest {
        spec_toml: spec_toml(1, 1, ""),
        spec_dir: dir.display().to_string(),
        ..Default::default()
    }
}

/// Runs the in-process coordinator with `fault` armed after one acknowledged submit and one
/// acknowledged registration; returns the acknowledged campaign as `Get` showed it before.
fn poisoned_run(fx: &std::path::Path, data: &std::path::Path, fault: Fault) -> pb::Campaign {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let faults = FaultInjection::new();
    let out = rt.block_on(async {
        let mut opts = ServeOptions::new("127.0.0.1:0".parse().unwrap(), data.to_path_buf());
        opts.faults = Some(faults.clone());
        let running = server::start(opts).await.expect("start");
        let target = Target {
            url: format!("http://{}", running.addr),
            ..Default::default()
        };
        let ch = target.channel().await.expect("connect");
        let mut c = target.campaigns(ch.clone()).expect("client");
        let mut w = target.workers(ch.clone()).expect("client");
        let id = c
            .submit(submit_request(fx))
            .await
            .expect("submit before the fault")
            .into_inner()
            .campaign_id;
        w.register(pb::RegisterRequest {
            host: "h".into(),
            devices: vec!["cpu".into()],
            ..Default::default()
        })
        .await
        .expect("register before the fault");
        let before = c
            .get(pb::GetCampaignRequest {
                campaign_id: id.clone(),
            })
            .await
            .expect("get")
            .into_inner();

        faults.set(fault);
        let refused = c
            .submit(submit_request(fx))
            .await
            .expect_err("a submit that cannot be written is refused");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let cause = match fault {
            Fault::CommitNoSpace => "No space left on device",
            _ => "Input/output error",
        };
        assert!(refused.message().contains(cause), "{}", refused.message());
        assert!(
            refused
                .message()
                .contains("restarted on the same --data-dir"),
            "{}",
            refused.message()
        );
        // The disk works again, but memory may be ahead of it: still nothing is served, reads
        // included, each answer naming the first failure.
        faults.set(Fault::None);
        let get = c
            .get(pb::GetCampaignRequest {
                campaign_id: id.clone(),
            })
            .await
            .expect_err("reads are refused once poisoned");
        assert_eq!(get.code(), tonic::Code::Unavailable);
        assert!(get.message().contains(cause), "{}", get.message());
        let again = c
            .submit(submit_request(fx))
            .await
            .expect_err("still refused");
        assert_eq!(again.code(), tonic::Code::Unavailable);
        let reg = w
            .register(pb::RegisterRequest {
                host: "h2".into(),
                devices: vec!["cpu".into()],
                ..Default::default()
            })
            .await
            .expect_err("workers are refused too");
        assert_eq!(reg.code(), tonic::Code::Unavailable);
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let mut status = -1;
        for _ in 0..50 {
            status = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health answers")
                .into_inner()
                .status;
            if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        );
        running.handle.abort();
        before
    });
    // Dropping the runtime stops the server and closes the store.
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

fn restart_has_exactly_what_was_acknowledged(fault: Fault) {
    let fx = fixture();
    let data = fx.path().join("data");
    let before = poisoned_run(fx.path(), &data, fault);
    let acked = before.id.clone();

    let coord = CoordinatorProc::start(&data, &[]);
    let all = coord.status_json(None);
    let ids: Vec<&str> = all["campaigns"]
        .as_array()
        .expect("campaigns")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, vec![acked.as_str()], "{all}");
    // The acknowledged campaign, record for record as it was acknowledged.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let after = rt.block_on(async {
        let mut c = coord.campaigns(None).await;
        c.get(pb::GetCampaignRequest {
            campaign_id: acked.clone(),
        })
        .await
        .expect("get after restart")
        .into_inner()
    });
    assert_eq!(after, before);
    // The refused submit took no id: the next one gets the id after the acknowledged one.
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, ""));
    let next = submit(&coord, &spec);
    assert_eq!(next, "c000002");
}

#[test]
fn a_full_disk_at_commit_poisons_and_a_restart_has_what_was_acknowledged() {
    restart_has_exactly_what_was_acknowledged(Fault::CommitNoSpace);
}

#[test]
fn a_failed_flush_poisons_and_a_restart_has_what_was_acknowledged() {
    restart_has_exactly_what_was_acknowledged(Fault::FlushIo);
}

fn blob_path(data: &std::path::Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("artifacts")
        .join("blobs")
        .join(&hex[..2])
        .join(hex)
}

fn flip_a_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("read blob");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).expect("write blob");
}

#[test]
fn a_corrupt_artifact_is_never_served_and_the_campaign_that_needs_it_fails_clearly() {
    let fx = fixture();
    let data = fx.path().join("data");
    let coord = CoordinatorProc::start(&data, FAST);

    // A finished campaign's student, corrupted on disk, is refused to a client.
    let w = WorkerProc::scripted(&coord.url(), &fx.path().join("w0"), &[]);
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, ""));
    let done = submit(&coord, &spec);
    let v = wait_terminal(&coord, &done, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded", "{v}");
    drop(w);
    let student = v["rounds"][0]["artifacts"]["student"]
        .as_str()
        .expect("student")
        .to_string();
    // A directory artifact: corrupt one of its files.
    let manifest = std::fs::read(blob_path(&data, &student)).expect("manifest");
    let file = distillery_proto::artifact::DirManifest::parse(&manifest)
        .and_then(|m| m.files.first().map(|f| f.digest.clone()))
        .unwrap_or_else(|| student.clone());
    let blob = blob_path(&data, &file);
    flip_a_byte(&blob);
    let out_dir = fx.path().join("got");
    let got = coord.cli(&[
        "artifact",
        "get",
        &student,
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(!got.status.success(), "a corrupt artifact was served");
    assert!(err.contains("is corrupt on the coordinator"), "{err}");
    assert!(!blob.exists(), "the corrupt blob left the store");
    let hex = file.trim_start_matches("sha256:");
    assert!(data.join("artifacts").join("corrupt").join(hex).is_file());
    // Nothing of the corrupt file was written where the client asked.
    let corrupt_bytes = std::fs::read(data.join("artifacts").join("corrupt").join(hex)).unwrap();
    for e in walk(&out_dir) {
        assert_ne!(std::fs::read(&e).unwrap(), corrupt_bytes, "{}", e.display());
    }
    // A finished campaign stays what it was.
    assert_eq!(coord.status_json(Some(&done))["state"], "succeeded");

    // A running campaign whose next phase needs a corrupt output fails with a clear error.
    let slow = WorkerProc::scripted(
        &coord.url(),
        &fx.path().join("w1"),
        &[("SCRIPT_TASK_MS", "4000".to_string())],
    );
    let id = submit(&coord, &spec);
    assert!(eventually(Duration::from_secs(60), || {
        coord.status_json(Some(&id))["rounds"][0]["artifacts"]["pruned"].is_string()
    }));
    let out = coord.cli(&["pause", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(slow);
    let v = coord.status_json(Some(&id));
    let pruned = v["rounds"][0]["artifacts"]["pruned"]
        .as_str()
        .expect("pruned")
        .to_string();
    let manifest = std::fs::read(blob_path(&data, &pruned)).expect("manifest");
    let file = distillery_proto::artifact::DirManifest::parse(&manifest)
        .and_then(|m| m.files.first().map(|f| f.digest.clone()))
        .unwrap_or_else(|| pruned.clone());
    flip_a_byte(&blob_path(&data, &file));
    // A fresh worker (empty cache) must fetch it from the coordinator.
    let _fresh = WorkerProc::scripted(&coord.url(), &fx.path().join("w2"), &[]);
    let out = coord.cli(&["resume", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is corrupt on the coordinator") && error.contains(&pruned),
        "{error}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A real write error from the kernel, no wrapper: the coordinator runs under `ulimit -f`
/// (RLIMIT_FSIZE, SIGXFSZ ignored), so once the store's file reaches the limit its writes fail
/// with EFBIG, as they would with ENOSPC on a full disk. Submits are acknowledged until then;
/// the first that cannot be written is refused as UNAVAILABLE naming the error, and a restart
/// without the limit has exactly the acknowledged campaigns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_write_error_poisons_the_coordinator_and_a_restart_has_what_was_acknowledged() {
    // redb's file starts at 1 MiB, sled's files far smaller: each gets a limit above its start.
    for (engine, limit_kib) in [("redb", 4096), ("sled", 256)] {
        real_write_error(engine, limit_kib).await;
    }
}

async fn real_write_error(engine: &str, limit_kib: u32) {
    let fx = fixture();
    let data = fx.path().join("data");
    let port = free_port();
    let log = std::fs::File::create(fx.path().join("limited.log")).unwrap();
    // Room to start and to take some campaigns (the log file stays far below it).
    let mut child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!("trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" \"$@\""),
        ])
        .arg(bin("coordinator"))
        .args(["serve", "--store", engine])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("bash");
    let target = Target {
        url: format!("http://127.0.0.1:{port}"),
        ..Default::default()
    };
    let mut c = None;
    for _ in 0..200 {
        if let Ok(ch) = target.channel().await {
            c = Some(target.campaigns(ch).expect("client"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = c.expect("the limited coordinator serves");
    let mut acked = Vec::new();
    let mut refused = None;
    // Each campaign record carries its spec: a long name makes each submit write more.
    let text = spec_toml(1, 1, "").replace(
        "name = \"e2e\"",
        &format!("name = \"{}\"", "n".repeat(4000)),
    );
    for _ in 0..2000 {
        match c
            .submit(pb::SubmitRequest {
                spec_toml: text.clone(),
                spec_dir: fx.path().display().to_string(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => acked.push(r.into_inner().campaign_id),
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.expect("the file size limit was reached");
    eprintln!(
        "{engine}: {} submits acknowledged, then: {}",
        acked.len(),
        refused.message()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("File too large"),
        "{}",
        refused.message()
    );
    assert!(!acked.is_empty());
    let again = c
        .list(pb::ListCampaignsRequest::default())
        .await
        .expect_err("poisoned: reads are refused");
    assert_eq!(again.code(), tonic::Code::Unavailable);
    let _ = child.kill();
    let _ = child.wait();

    let coord = CoordinatorProc::start(&data, &[]);
    let all = coord.status_json(None);
    let ids: Vec<String> = all["campaigns"]
        .as_array()
        .expect("campaigns")
        .iter()
        .filter_map(|c| c["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids, acked);
}
