//! Limits: each exceeded on the real coordinator gives one clear error (what, the limit, the
//! flag that raises it), and nothing that was stored is lost.

use std::time::Duration;

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

fn campaign_ids(c: &CoordinatorProc) -> Vec<String> {
    c.status_json(None)["campaigns"]
        .as_array()
        .expect("campaigns")
        .iter()
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_over_the_size_or_fan_out_limit_is_refused_and_nothing_is_lost() {
    let fx = fixture();
    let coord = CoordinatorProc::start(
        &fx.path().join("data"),
        &["--max-spec-bytes", "1000", "--max-tasks-per-phase", "8"],
    );
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, ""));
    let first = submit(&coord, &spec);

    // Spec size: TOML text over 1000 bytes.
    let mut c = coord.campaigns(None).await;
    let big = format!("{}# {}\n", spec_toml(1, 1, ""), "x".repeat(2000));
    let err = c
        .submit(pb::SubmitRequest {
            spec_toml: big.clone(),
            spec_dir: fx.path().display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("a spec over --max-spec-bytes is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains(&format!("is {} bytes", big.len()))
            && err.message().contains("limit of 1000 bytes")
            && err.message().contains("--max-spec-bytes"),
        "{}",
        err.message()
    );
    // The same through the CLI (which sends the parsed spec): one line, exit 2.
    let padded = write_spec(
        fx.path(),
        "big.toml",
        &spec_toml(1, 1, "").replace(
            "name = \"e2e\"",
            &format!("name = \"{}\"", "n".repeat(1500)),
        ),
    );
    let out = coord.cli(&["submit", padded.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--max-spec-bytes"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Tasks per phase: 16 score shards with a limit of 8.
    let wide = write_spec(
        fx.path(),
        "wide.toml",
        &spec_toml(1, 1, "[scheduling]\nscore_shards = 16\n"),
    );
    let out = coord.cli(&["submit", wide.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("spec.scheduling.score_shards")
            && stderr.contains("20 tasks")
            && stderr.contains("limit of 8 tasks per phase")
            && stderr.contains("--max-tasks-per-phase"),
        "{stderr}"
    );
    let err = c
        .submit(pb::SubmitRequest {
            spec_toml: spec_toml(1, 1, "[scheduling]\nscore_shards = 16\n"),
            spec_dir: fx.path().display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("refused over gRPC too");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);

    // Nothing was lost or added; the next submit takes the next id.
    assert_eq!(campaign_ids(&coord), vec![first.clone()]);
    assert_eq!(submit(&coord, &spec), "c000002");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_per_peer_are_limited_and_freed_when_a_stream_ends() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &["--max-streams-per-peer", "3"]);
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, ""));
    let id = submit(&coord, &spec);
    // No worker: the campaign never ends, so each watch holds its stream open.
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(watch_from(&coord, &id, 1).await);
    }
    let mut c = coord.campaigns(None).await;
    let get = pb::GetCampaignRequest {
        campaign_id: id.clone(),
    };
    let err = c
        .get(get.clone())
        .await
        .expect_err("a fourth call is refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(
        err.message().contains("127.0.0.1 has 3 calls in flight")
            && err.message().contains("--max-streams-per-peer"),
        "{}",
        err.message()
    );
    // Ending one stream frees its place.
    drop(watches.pop());
    let mut ok = None;
    for _ in 0..50 {
        match c.get(get.clone()).await {
            Ok(r) => {
                ok = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(ok.map(|c| c.id), Some(id));
}

#[test]
fn a_campaign_over_its_artifact_bytes_fails_clearly_and_retry_continues_it() {
    let fx = fixture();
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend(["--max-artifact-bytes-per-campaign", "16"]);
    let mut coord = CoordinatorProc::start(&fx.path().join("data"), &args);
    let _w = WorkerProc::scripted(&coord.url(), &fx.path().join("w"), &[]);
    let spec = write_spec(fx.path(), "spec.toml", &spec_toml(1, 1, ""));
    let id = submit(&coord, &spec);
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("campaign {id} would hold"))
            && error.contains("limit of 16 bytes per campaign")
            && error.contains("--max-artifact-bytes-per-campaign"),
        "{error}"
    );
    // Raise the limit (a restart on the same data dir) and continue: nothing was lost.
    coord.args = FAST.iter().map(|s| s.to_string()).collect();
    coord.restart();
    let out = coord.cli(&["retry", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded", "{v}");
    assert!(v["rounds"][0]["artifacts"]["student"].is_string(), "{v}");
}
