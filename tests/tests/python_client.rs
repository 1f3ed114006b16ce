//! The Python side of the gRPC API against the real binaries: grpcio's reflection client (v1alpha)
//! and a raw v1 reflection call, and `clients/python` (`distillery_client`) driving a campaign
//! end to end with tokens, and over TLS. Needs `.venv-parity` with the client installed
//! (`.ci/run` does it); elsewhere the tests say why they skip.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use distillery_tests::*;
use distillery_worker::model::io::load_dir;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};
use serde_json::{json, Value};

const CLIENT: &str = "client-token-0123456789abcdef";
const WORKER: &str = "worker-token-0123456789abcdef";

fn tokens_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tokens");
    std::fs::write(&p, format!("client {CLIENT}\nworker {WORKER}\n")).expect("tokens");
    p
}

#[test]
fn grpcio_reflection_lists_and_describes_every_service_in_v1alpha_and_v1() {
    let Some(py) = python_client_or_skip("grpcio_reflection_lists_and_describes_every_service")
    else {
        return;
    };
    let fx = tempfile::tempdir().unwrap();
    let tokens = tokens_file(fx.path());
    let coord = CoordinatorProc::start(
        &fx.path().join("data"),
        &["--tokens", tokens.to_str().unwrap()],
    );
    let addr = format!("127.0.0.1:{}", coord.port);
    let v = run_python(&py, "reflection_check.py", &[&addr, CLIENT]);
    let services = json!([
        "distillery.v1.CampaignService",
        "distillery.v1.WorkerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    for who in ["no_token", "with_token"] {
        for version in ["v1alpha", "v1"] {
            let r = &v[who][version];
            assert_eq!(r["services"], services, "{who} {version}: {r}");
            let m = &r["methods"];
            let submit = &m["distillery.v1.CampaignService.Submit"];
            assert_eq!(submit["input"], "distillery.v1.SubmitRequest", "{version}");
            assert_eq!(submit["output"], "distillery.v1.SubmitResponse");
            assert_eq!(
                submit["input_fields"],
                json!(["spec", "spec_toml", "spec_dir"])
            );
            let watch = &m["distillery.v1.CampaignService.Watch"];
            assert_eq!(watch["output"], "distillery.v1.Event");
            assert_eq!(watch["server_streaming"], true);
            assert_eq!(
                m["distillery.v1.WorkerService.PollTask"]["input"],
                "distillery.v1.PollTaskRequest"
            );
            assert_eq!(
                m["grpc.health.v1.Health.Check"]["input_fields"],
                json!(["service"])
            );
        }
    }
    // Reflection answers anyone; the service it describes wants the token.
    assert_eq!(v["no_token"]["list"], "UNAUTHENTICATED");
    assert_eq!(v["with_token"]["list"], "OK");
}

#[test]
fn the_python_client_checks_digests_manifests_and_urls_offline() {
    let Some(py) = python_client_or_skip("the_python_client_checks_offline") else {
        return;
    };
    let out = std::process::Command::new(&py)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(repo_root().join("clients/python/tests"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // unittest reports on stderr; make sure it ran the tests rather than finding none.
    let ran = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran >= 7, "ran {ran} tests:\n{err}");
}

/// A tiny real campaign (one round, score + prune + 8 distillation steps, no evaluation) over a
/// 2-layer test teacher; its paths are relative, resolved against the spec's folder.
fn tiny_campaign(dir: &Path) -> std::path::PathBuf {
    write_test_model(
        &dir.join("teacher"),
        &TestModelSpec {
            num_layers: 2,
            seed: 21,
            ..Default::default()
        },
    )
    .unwrap();
    write_corpus(
        dir,
        &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
        (0..40).map(|i| format!("Entry {i}: the client asks, the coordinator answers.")),
    );
    write_spec(
        dir,
        "py-client.toml",
        "name = \"py-client\"\nseed = 5\n[teacher]\nmodel = \"teacher\"\n[data]\n\
         calibration = { path = \"calib.jsonl\", samples = 4, seq_len = 32 }\n\
         train = [ { name = \"web\", path = \"web.jsonl\" } ]\n\
         validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]\n\
         [[rounds]]\ntarget = { hidden_size = 48, intermediate_size = 192 }\n\
         distill = { tokens = 512, seq_len = 32, micro_batch = 2, world_size = 1, lr = 0.003, checkpoint_every = 4 }\n\
         [evaluation]\nperplexity = false\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_runs_a_campaign_against_the_real_coordinator() {
    let Some(py) = python_client_or_skip("the_python_client_runs_a_campaign") else {
        return;
    };
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    let spec = tiny_campaign(&d.join("spec"));
    let tokens = tokens_file(d);
    let mut args: Vec<&str> = ML_TIMING.to_vec();
    args.extend(["--tokens", tokens.to_str().unwrap()]);
    let mut coord = CoordinatorProc::start(&d.join("data"), &args);
    coord.token = Some(CLIENT.to_string());
    let _w = WorkerProc::real_with_token(&coord.url(), &d.join("w1"), "cpu", WORKER);

    let out = d.join("out");
    let cfg = json!({
        "addr": coord.url(), "client_token": CLIENT, "worker_token": WORKER,
        "spec": spec, "out": out,
    })
    .to_string();
    let started = Instant::now();
    let py2 = py.clone();
    let v =
        tokio::task::spawn_blocking(move || run_python(&py2, "client_e2e.py", &["campaign", &cfg]))
            .await
            .expect("python");
    eprintln!(
        "python client run: {:.1} s (watch {:.1} s)",
        started.elapsed().as_secs_f64(),
        v["watch_seconds"].as_f64().unwrap_or(0.0)
    );

    // Tokens, through the client.
    let auth = &v["auth"];
    assert_eq!(auth["none"]["code"], "UNAUTHENTICATED", "{auth}");
    assert_eq!(auth["wrong"]["code"], "UNAUTHENTICATED", "{auth}");
    assert_eq!(auth["wrong"]["details"], "unknown token");
    assert_eq!(auth["wrong_submit"]["code"], "UNAUTHENTICATED");
    assert_eq!(auth["worker"]["code"], "PERMISSION_DENIED");
    assert_eq!(auth["client"]["code"], "OK");

    // TOML specs are validated by the coordinator with the CLI's rules.
    let bad = &v["bad_specs"];
    for (case, field) in [
        ("unknown_key", "colour"),
        ("missing_file", "data.calibration.path"),
        ("relative_to_cwd", "teacher.model"),
    ] {
        assert_eq!(bad[case]["code"], "INVALID_ARGUMENT", "{case}: {bad}");
        let details = bad[case]["details"].as_str().unwrap();
        assert!(details.contains(field), "{case}: {details}");
    }
    assert!(bad["relative_to_cwd"]["details"]
        .as_str()
        .unwrap()
        .contains("/teacher"));

    let id = v["id"].as_str().unwrap();
    assert_eq!(v["paused"], "paused");
    assert_eq!(v["resumed"], "running");

    // The watch saw the whole log of the campaign, in order, ending on success, with the pause.
    let events: Vec<(u64, String)> = all_events(&coord, id)
        .await
        .iter()
        .map(|e| (e.seq, e.kind.clone()))
        .collect();
    let watched: Vec<(u64, String)> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(watched, events);
    let states: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "campaign_state")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert!(
        states.ends_with(&["paused", "running", "succeeded"]),
        "{states:?}"
    );
    assert!(events.iter().any(|(_, k)| k == "task_progress"));
    assert_eq!(v["resume_matches"], true);
    assert_eq!(v["resume_past_end"], 0);

    // The client's status is `coordinator status ID --json`, field for field — except each
    // round's `memory_plan`, which the CLI computes from the spec on the client's machine
    // (it needs the teacher's config there), not a field the coordinator serves.
    let cli = coord.status_json(Some(id));
    let mut served = cli.clone();
    for r in served["rounds"].as_array_mut().into_iter().flatten() {
        assert!(
            r["memory_plan"]["bytes"]["total"].as_u64().unwrap_or(0) > 0,
            "{r}"
        );
        r.as_object_mut().map(|o| o.remove("memory_plan"));
    }
    assert_eq!(v["status"], served);
    assert_eq!(cli["state"], "succeeded", "{cli}");
    assert!(cli["error"].is_null());
    let r = &cli["rounds"][0];
    assert_eq!(r["phase"], "done");
    assert_eq!(r["target"]["hidden_size"], 48);
    assert!(r["params"].as_u64().unwrap() > 0);
    assert!(r["metrics"]["distill"]["steps"].as_f64().unwrap() > 0.0);
    assert_eq!(v["listed"], v["both"]);

    // The student came down as its files, each matching its manifest digest, and loads.
    let student = r["artifacts"]["student"].as_str().unwrap();
    let dl = &v["download"];
    assert_eq!(
        dl["digest"].as_str().unwrap(),
        student.trim_start_matches("sha256:")
    );
    assert_eq!(dl["directory"], true);
    let names: Vec<&str> = dl["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(names.contains(&"config.json"), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with(".safetensors")),
        "{names:?}"
    );
    let on_disk: BTreeMap<String, Value> = serde_json::from_value(dl["on_disk"].clone()).unwrap();
    assert_eq!(
        on_disk.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "nothing but the manifest's files is left in the output folder"
    );
    let manifest = manifest_digests(&coord, student, d).await;
    for (name, f) in &on_disk {
        assert_eq!(
            f["sha256"].as_str(),
            manifest.get(name).map(String::as_str),
            "{name}"
        );
    }
    // The same bytes as the Rust CLI's `artifact get`.
    let cli_dir = d.join("cli-student");
    coord.artifact_get(id, &cli_dir);
    for name in &names {
        assert_eq!(
            std::fs::read(out.join("student").join(name)).unwrap(),
            std::fs::read(cli_dir.join(name)).unwrap(),
            "{name}"
        );
    }
    let m = load_dir(
        &out.join("student"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("the student loads");
    assert_eq!(m.config.hidden_size, 48);
    assert_eq!(v["download_by_digest_same"], true);
    assert!(v["pruned_files"]
        .as_array()
        .unwrap()
        .contains(&json!("config.json")));

    // The example script does the same in a dozen lines.
    let example = std::process::Command::new(&py)
        .arg(repo_root().join("clients/python/examples/run_campaign.py"))
        .arg(&spec)
        .arg("--out")
        .arg(d.join("example-student"))
        .args(["--addr", &coord.url(), "--token", CLIENT])
        .env("GRPC_VERBOSITY", "ERROR")
        .output()
        .expect("run the example");
    let said = String::from_utf8_lossy(&example.stderr);
    assert!(example.status.success(), "{said}");
    let example_id = String::from_utf8_lossy(&example.stdout).trim().to_string();
    assert_eq!(coord.status_json(Some(&example_id))["state"], "succeeded");
    assert!(said.contains("step 8/8"), "{said}");
    assert!(d.join("example-student/model.safetensors").is_file());

    // Cancel, and the errors a user meets.
    assert_eq!(v["cancelled"], "cancelled");
    assert_eq!(
        v["cancelled_watch_last"],
        json!({"kind": "campaign_state", "state": "cancelled"})
    );
    assert_eq!(v["cancelled_name"], "py-client-cancelled");
    assert!(v["no_student"]
        .as_str()
        .unwrap()
        .contains("has no student yet"));
    assert_eq!(v["unknown_campaign"]["code"], "NOT_FOUND");
    assert_eq!(v["unknown_watch"]["code"], "NOT_FOUND");
    assert_eq!(v["unknown_digest"]["code"], "NOT_FOUND");
}

#[test]
fn the_python_clients_watch_resumes_across_a_coordinator_restart() {
    let Some(py) = python_client_or_skip("the_python_clients_watch_resumes_across_a_restart")
    else {
        return;
    };
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    let spec = tiny_campaign(&d.join("spec"));
    let mut coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");
    let id = submit(&coord, &spec);
    let paused = coord.cli(&["pause", &id]);
    assert!(paused.status.success());

    // A watch is open on the paused campaign when the coordinator is SIGKILLed and restarted.
    let marker = d.join("watching");
    let watcher = std::process::Command::new(&py)
        .arg(repo_root().join("tests/python/client_e2e.py"))
        .args(["watch", &coord.url(), "", &id, marker.to_str().unwrap()])
        .env("GRPC_VERBOSITY", "ERROR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the watcher");
    assert!(
        eventually(std::time::Duration::from_secs(20), || marker.exists()),
        "the watch never started"
    );
    coord.restart();
    let resumed = coord.cli(&["resume", &id]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let out = watcher.wait_with_output().expect("the watcher ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let events = v["events"].as_array().unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "every event once, in order, across the restart"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["state"].as_str()),
        (Some("campaign_state"), Some("succeeded"))
    );
    // The pause was before the restart and the resume after it: what follows the pause is
    // what the watch got from the restarted coordinator.
    let pause = events
        .iter()
        .position(|e| e["kind"] == "campaign_state" && e["state"] == "paused")
        .expect("the pause is in the log");
    // (The pause revoked the running attempt: its `task_revoked` event follows the pause.)
    let after: Vec<&str> = events[pause + 1..]
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .filter(|k| *k != "task_revoked")
        .collect();
    assert_eq!(after.first(), Some(&"campaign_state"), "{after:?}");
    assert!(after.contains(&"task_succeeded"), "{after:?}");
}

/// `path -> sha256` of a directory artifact's manifest, read with the Rust client.
async fn manifest_digests(
    coord: &CoordinatorProc,
    digest: &str,
    dir: &Path,
) -> BTreeMap<String, String> {
    let digest = distillery_proto::artifact::parse_digest(digest).unwrap();
    let mut c = coord.campaigns(Some(CLIENT)).await;
    let stream = c
        .get_artifact(distillery_proto::v1::GetArtifactRequest {
            digest: digest.clone(),
        })
        .await
        .expect("the manifest")
        .into_inner();
    let blob = dir.join("manifest.json");
    distillery_proto::artifact::receive_to_file(stream, &blob, Some(&digest))
        .await
        .unwrap();
    let m = distillery_proto::artifact::DirManifest::parse(&std::fs::read(&blob).unwrap())
        .expect("the student is a directory manifest");
    m.files.into_iter().map(|f| (f.path, f.digest)).collect()
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_python_client_reaches_a_tls_coordinator_only_with_its_ca() {
    let Some(py) = python_client_or_skip("the_python_client_reaches_a_tls_coordinator") else {
        return;
    };
    let fx = tempfile::tempdir().unwrap();
    let dir = fx.path();
    write_tls_files(dir);
    let port = free_port();
    let _coordinator = KillOnDrop(
        std::process::Command::new(bin("coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let v = run_python(
        &py,
        "client_e2e.py",
        &[
            "tls",
            &format!("https://localhost:{port}"),
            &format!("http://127.0.0.1:{port}"),
            dir.join("ca.pem").to_str().unwrap(),
        ],
    );
    assert_eq!(v["with_ca"]["code"], "OK", "{v}");
    assert_eq!(v["with_ca_bytes"]["code"], "OK", "{v}");
    assert_eq!(v["campaigns"], 0);
    // Without the CA the certificate is not trusted; plaintext does not speak TLS.
    assert_eq!(v["without_ca"]["code"], "UNAVAILABLE", "{v}");
    assert_eq!(v["plaintext"]["code"], "UNAVAILABLE", "{v}");
}
