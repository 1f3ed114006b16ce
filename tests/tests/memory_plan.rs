//! The memory plan end to end: `coordinator plan` on the example campaigns (exit codes, the
//! suggestion), and `submit` refusing a round that fits no registered worker's device.

use std::collections::HashMap;

use distillery_proto::v1 as pb;
use distillery_tests::*;

fn plan(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("coordinator"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run coordinator plan")
}

fn campaign(name: &str) -> String {
    repo_root()
        .join("deploy/campaigns")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn plan_of_the_example_campaigns() {
    let llama = campaign("llama-3.1-8b-to-4b.toml");
    let teacher = campaign("teachers/llama-3.1-8b");
    let out = plan(&[&llama, "--device-memory", "80GiB", "--teacher", &teacher]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "teacher weights",
        "student weights",
        "gradients",
        "master + moments",
        "activations",
        "total",
        "fits yes",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(text.contains("8030261248 params x 2 B (bf16)"), "{text}");
    // On 40 GB it does not fit: exit 3 and a change that would make it.
    let out = plan(&[
        &llama,
        "--device-memory",
        "40GiB",
        "--teacher",
        &teacher,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan --json");
    assert_eq!(v["fits"], false);
    let r0 = &v["rounds"][0];
    assert_eq!(r0["fits"], false);
    assert_eq!(r0["bytes"]["teacher_weights"], 8_030_261_248u64 * 2);
    assert!(
        r0["suggestion"].is_object() || r0["floor"].as_u64() > Some(40 << 30),
        "{r0}"
    );
    // Every example spec parses and has a plan for its teacher's published config.
    for (spec, teacher) in [
        ("smollm2-135m-to-90m.toml", "teachers/smollm2-135m-instruct"),
        (
            "mistral-nemo-12b-to-8b.toml",
            "teachers/mistral-nemo-base-2407",
        ),
    ] {
        let out = plan(&[
            &campaign(spec),
            "--device-memory",
            "141GB",
            "--teacher",
            &campaign(teacher),
        ]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "{spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("round 0:"),
            "{spec}"
        );
    }
    // Bad input: exit 2 and one line.
    let out = plan(&[&llama, "--device-memory", "lots", "--teacher", &teacher]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--device-memory"), "{err}");
    // Without --teacher the spec's /models path is looked for, and the error says what to do.
    let out = plan(&[&llama, "--device-memory", "80GiB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--teacher"));
}

async fn register(c: &CoordinatorProc, memory: u64) {
    let mut w = c.workers(None).await;
    w.register(pb::RegisterRequest {
        host: "small".into(),
        devices: vec!["cpu".into()],
        device_memory: vec![memory],
        labels: HashMap::new(),
        version: "test".into(),
        task_kinds: vec!["distill".into()],
        previous_worker_id: String::new(),
    })
    .await
    .expect("register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_a_round_no_registered_device_fits() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    coord.wait_serving();
    // The fixture's teacher is tiny; a long sequence makes the round need ~1 GiB per rank.
    let text = spec_toml(1, 1, "").replace(
        "distill = { tokens = 1000,",
        "distill = { tokens = 1000, seq_len = 1024, micro_batch = 1,",
    );
    let spec = write_spec(fx.path(), "big.toml", &text);
    let spec_arg = spec.to_str().expect("utf-8");
    // No worker registered: accepted.
    let first = coord.cli(&["submit", spec_arg]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    coord.cli(&["cancel", String::from_utf8_lossy(&first.stdout).trim()]);
    // A worker with 64 MiB: refused, one line naming the round, the need and a change.
    register(&coord, 64 << 20).await;
    let out = coord.cli(&["submit", spec_arg]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("rounds[0]: a rank needs"), "{err}");
    assert!(
        err.contains("largest registered device (cpu) has 0.06 GiB"),
        "{err}"
    );
    // A worker with 64 GiB joins: accepted, and status --json carries the plan.
    register(&coord, 64 << 30).await;
    let ok = coord.cli(&["submit", spec_arg]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let id = String::from_utf8_lossy(&ok.stdout).trim().to_string();
    let v = coord.status_json(Some(&id));
    let p = &v["rounds"][0]["memory_plan"];
    assert!(p["bytes"]["total"].as_u64().unwrap_or(0) > 64 << 20, "{p}");
    assert_eq!(p["seq_len"], 1024);
}
