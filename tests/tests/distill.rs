//! Distillation end to end: a campaign round whose Distill phase runs with world_size = 2 on two
//! `worker join` processes; one is SIGKILLed mid-distillation and a new one started; the round
//! finishes from the last checkpoint, and the student is bit-identical (same artifact digest) to
//! that of the same campaign run without interruption — once with the plain f32 step, once with
//! bf16 compute, a bf16 teacher, a sharded optimizer (each rank's shard its own artifact) and
//! activation recomputation, and once with reverse KL over the teacher's top-k logits plus
//! intermediate-state distillation through a learned projection (`pairs = "auto"`), whose
//! weights the checkpoints carry and the exported student does not.

use std::time::{Duration, Instant};

use distillery_tests::*;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

fn spec(dir: &std::path::Path, name: &str, extra: &str) -> std::path::PathBuf {
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
            &["calib.jsonl", "web.jsonl", "code.jsonl", "web-val.jsonl", "code-val.jsonl"],
            (0..200).map(|i| {
                format!("Line {i}: a small model learns from a larger one, step by step, token by token.")
            }),
        );
    }
    let toml = format!(
        "name = \"{name}\"\nseed = 11\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 8, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\", weight = 0.7 }}, {{ name = \"code\", path = \"code.jsonl\", weight = 0.3 }} ]\n\
         validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }}, {{ name = \"code\", path = \"code-val.jsonl\" }} ]\n\
         dynamic_batch_loading = {{ reference_loss = {{ web = 2.0, code = 1.0 }}, update_every = 5 }}\n\
         [evaluation]\nperplexity = false\n\
         [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192, num_layers = 2 }}\n\
         distill = {{ tokens = 8192, seq_len = 32, micro_batch = 2, world_size = 2, lr = 0.003, warmup_steps = 2, checkpoint_every = 4{extra} }}\n",
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

#[test]
fn a_gang_survives_sigkill_of_a_rank_and_ends_bit_identical_to_an_uninterrupted_run() {
    sigkill_and_compare("", |_, _, _| {});
}

#[test]
fn a_sharded_bf16_gang_with_recomputation_survives_sigkill_bit_identically() {
    sigkill_and_compare(
        ", precision = \"bf16\", teacher_precision = \"bf16\", shard_optimizer = true, recompute = true",
        |_, _, _| {},
    );
}

#[test]
fn hidden_state_distillation_through_a_projection_resumes_bit_identically_and_exports_a_plain_student(
) {
    // The student is 48 wide and 2 layers deep, the teacher 64 and 3: a projection, and "auto"
    // pairs from the prune record. Sharded optimizer: the projection lives in the shards too.
    sigkill_and_compare(
        ", loss = \"reverse_kl\", top_k = 16, shard_optimizer = true, hidden = { pairs = \"auto\" }",
        |coord, dir, v| {
            let d = &v["rounds"][0]["metrics"]["progress"]["distill"];
            let hidden = d["hidden_loss"].as_f64().unwrap_or(f64::NAN);
            assert!(hidden.is_finite() && hidden > 0.0, "no hidden loss reported: {v}");
            let out = dir.join("student-out");
            coord.artifact_get(&student_of(v), &out);
            let names: Vec<String> =
                candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
                    .unwrap()
                    .into_keys()
                    .collect();
            assert!(
                names.iter().all(|n| n.starts_with("model.") || n == "lm_head.weight"),
                "the exported student holds a non-HF tensor: {names:?}"
            );
            assert!(!dir.join("student-out").join("distill_aux.safetensors").exists());
            // It loads as a standard Hugging Face model of the pruned shape (our loader refuses
            // unknown tensors), and carries the record later rounds compose with.
            let m = distillery_worker::model::io::load_dir(&out, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
            assert_eq!((m.config.hidden_size, m.config.num_hidden_layers), (48, 2));
            let record: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("distillery_prune.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(record["teacher_layers"].as_array().unwrap().len(), 2);
            assert_eq!(record["teacher_channels"].as_array().unwrap().len(), 48);
            if let Some(py) = python_or_skip("transformers loads the exported student") {
                let code = format!(
                    "import transformers, sys; m = transformers.AutoModelForCausalLM.from_pretrained({:?}); print(sum(p.numel() for p in m.parameters()))",
                    out.display().to_string()
                );
                let o = std::process::Command::new(py).args(["-c", &code]).output().unwrap();
                assert!(o.status.success(), "transformers refused the student: {}", String::from_utf8_lossy(&o.stderr));
                eprintln!("transformers loads the student: {} parameters", String::from_utf8_lossy(&o.stdout).trim());
            }
        },
    );
}

fn sigkill_and_compare(
    extra: &str,
    check: impl Fn(&CoordinatorProc, &std::path::Path, &serde_json::Value),
) {
    let fx = tempfile::tempdir().unwrap();
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let mut w1 = WorkerProc::real(&coord.url(), &fx.path().join("w1"), "cpu");
    let mut w2 = WorkerProc::real(&coord.url(), &fx.path().join("w2"), "cpu");

    // Interrupted run: SIGKILL a worker right after the first checkpoint.
    let id = submit(&coord, &spec(fx.path(), "interrupted", extra));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ck = |w: &WorkerProc| w.log_text().contains("distill: checkpoint uploaded");
        if ck(&w1) || ck(&w2) {
            break;
        }
        let v = coord.status_json(Some(&id));
        assert_eq!(v["state"], "running", "{v}");
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {v}\n{}",
            w1.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Kill the rank that is not uploading checkpoints if we can tell, else either.
    if w1.log_text().contains("distill: checkpoint uploaded") {
        w2.kill();
    } else {
        w1.kill();
    }
    let _w3 = WorkerProc::real(&coord.url(), &fx.path().join("w3"), "cpu");
    let v = wait_terminal(&coord, &id, Duration::from_secs(240));
    assert_eq!(v["state"], "succeeded", "{v}");
    let d = &v["rounds"][0]["metrics"]["distill"];
    assert_eq!(d["world_size"], 2.0);
    assert_eq!(d["steps"], 64.0, "{d}");
    assert_eq!(d["tokens"], 8192.0);
    assert!(d["final_loss"].as_f64().unwrap().is_finite());
    let resumed = d["resumed_from_step"].as_f64().unwrap();
    assert!((4.0..64.0).contains(&resumed), "resumed from {resumed}");
    let interrupted = student_of(&v);
    eprintln!(
        "interrupted run resumed from step {resumed}; student {interrupted}; distill metrics {d}"
    );

    // The same campaign again, uninterrupted, on whichever workers are alive.
    let id2 = submit(&coord, &spec(fx.path(), "straight", extra));
    let v2 = wait_terminal(&coord, &id2, Duration::from_secs(240));
    assert_eq!(v2["state"], "succeeded", "{v2}");
    assert_eq!(
        v2["rounds"][0]["metrics"]["distill"]["resumed_from_step"],
        0.0
    );
    assert_eq!(
        student_of(&v2),
        interrupted,
        "the resumed student differs from the uninterrupted one"
    );
    // `watch` replays the distillation's progress: steps, loss, learning rate, tokens/s.
    let w = coord.cli(&["watch", &id2]);
    let text = String::from_utf8_lossy(&w.stdout);
    assert!(w.status.success(), "{text}");
    assert!(
        text.contains("step 64/64 loss ") && text.contains(" lr ") && text.contains("tok/s"),
        "{text}"
    );
    check(&coord, fx.path(), &v2);
    w1.kill();
}
