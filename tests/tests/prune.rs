//! The Score and Prune phases end to end: the real `coordinator` and two `worker join`
//! processes score a real tiny teacher in 3 calibration shards plus 2 skip-layer perplexity
//! groups, then prune it; the pruned model is an artifact a client can fetch and load.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use distillery_tests::*;
use distillery_worker::model::io::load_dir;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

#[test]
fn score_and_prune_phases_produce_the_pruned_model_through_real_workers() {
    let fx = tempfile::tempdir().unwrap();
    let teacher = fx.path().join("teacher");
    let spec = TestModelSpec {
        num_layers: 4,
        seed: 5,
        ..Default::default()
    };
    write_test_model(&teacher, &spec).unwrap();
    write_corpus(
        fx.path(),
        &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
        (0..40).map(|i| {
            format!(
                "Document {i}: the quick brown fox jumps over the lazy dog, {} times.",
                i * 7
            )
        }),
    );
    let toml = format!(
        "name = \"prune-e2e\"\nseed = 3\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 12, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
         [scheduling]\nscore_shards = 3\ndepth_groups = 2\n\
         [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192, num_attention_heads = 2, num_layers = 3 }}\n\
         depth_importance = \"perplexity\"\n\
         distill = {{ tokens = 1000 }}\n",
        teacher.display()
    );
    let spec_path = write_spec(fx.path(), "c.toml", &toml);
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let _w1 = WorkerProc::real(&coord.url(), &fx.path().join("w1"), "cpu");
    let _w2 = WorkerProc::real(&coord.url(), &fx.path().join("w2"), "cpu");
    let id = submit(&coord, &spec_path);

    // The default evaluation needs perplexity tasks, which this build does not run yet, so the
    // campaign goes on to Distill and then waits in Evaluate.
    let deadline = Instant::now() + Duration::from_secs(120);
    let round = loop {
        let v = coord.status_json(Some(&id));
        assert_ne!(v["state"], "failed", "campaign failed: {v}");
        let r = v["rounds"][0].clone();
        if r["artifacts"]["pruned"].is_string() {
            break r;
        }
        assert!(Instant::now() < deadline, "no pruned model yet: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        matches!(round["phase"].as_str(), Some("distill" | "evaluate")),
        "{round}"
    );
    for k in [
        "scores.0",
        "scores.1",
        "scores.2",
        "depth_scores.0",
        "depth_scores.1",
        "scores",
    ] {
        assert!(round["artifacts"][k].is_string(), "no {k}: {round}");
    }
    let shape = &round["metrics"]["shape"];
    assert_eq!(shape["hidden_size"], 48.0);
    assert_eq!(shape["intermediate_size"], 192.0);
    assert_eq!(shape["num_attention_heads"], 2.0);
    assert_eq!(shape["num_layers"], 3.0);

    // The pruned model, fetched like a user would, has that shape and that parameter count.
    let out = fx.path().join("pruned");
    coord.artifact_get(round["artifacts"]["pruned"].as_str().unwrap(), &out);
    let m = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        (
            m.config.hidden_size,
            m.config.intermediate_size,
            m.config.num_attention_heads,
            m.config.num_hidden_layers,
            m.config.head_dim()
        ),
        (48, 192, 2, 3, 16)
    );
    assert_eq!(round["params"], serde_json::json!(m.num_params() as u64));
    assert!(out.join("tokenizer.json").is_file());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distillery_prune.json")).unwrap())
            .unwrap();
    assert_eq!(record["calibration_sequences"], 12);
    assert_eq!(record["kept"]["layers"].as_array().unwrap().len(), 3);
    let x = Tensor::new(&[[72u32, 101, 108, 108, 111]], &Device::Cpu).unwrap();
    let logits = m.forward(&x).unwrap();
    assert_eq!(logits.dims(), &[1, 5, 260]);

    let c = coord.cli(&["cancel", &id]);
    assert!(c.status.success());
    let v = wait_terminal(&coord, &id, Duration::from_secs(20));
    assert_eq!(v["state"], "cancelled");
}

#[test]
fn taylor_depth_scores_shards_through_real_workers_and_keeps_the_first_four_and_last_two() {
    let fx = tempfile::tempdir().unwrap();
    let teacher = fx.path().join("teacher");
    write_test_model(
        &teacher,
        &TestModelSpec {
            num_layers: 8,
            seed: 9,
            ..Default::default()
        },
    )
    .unwrap();
    write_corpus(
        fx.path(),
        &["calib.jsonl", "web.jsonl"],
        (0..40)
            .map(|i| format!("Document {i}: a tortoise and a hare race along a road, {i} laps.")),
    );
    let toml = format!(
        "name = \"taylor-e2e\"\nseed = 3\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 10, seq_len = 24 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         [evaluation]\nperplexity = false\n\
         [scheduling]\nscore_shards = 2\n\
         [[rounds]]\ntarget = {{ num_layers = 6 }}\n\
         depth_importance = \"taylor\"\n\
         distill = {{ tokens = 64, seq_len = 16, micro_batch = 1 }}\n",
        teacher.display()
    );
    let spec_path = write_spec(fx.path(), "c.toml", &toml);
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let _w1 = WorkerProc::real(&coord.url(), &fx.path().join("w1"), "cpu");
    let _w2 = WorkerProc::real(&coord.url(), &fx.path().join("w2"), "cpu");
    let id = submit(&coord, &spec_path);
    let deadline = Instant::now() + Duration::from_secs(120);
    let round = loop {
        let v = coord.status_json(Some(&id));
        assert_ne!(v["state"], "failed", "campaign failed: {v}");
        let r = v["rounds"][0].clone();
        if r["artifacts"]["pruned"].is_string() {
            break r;
        }
        assert!(Instant::now() < deadline, "no pruned model yet: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for k in ["scores.0", "scores.1", "scores"] {
        assert!(round["artifacts"][k].is_string(), "no {k}: {round}");
    }
    let out = fx.path().join("pruned");
    coord.artifact_get(round["artifacts"]["pruned"].as_str().unwrap(), &out);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distillery_prune.json")).unwrap())
            .unwrap();
    assert_eq!(record["depth_importance"], "taylor");
    let kept: Vec<u64> = record["kept"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(kept, vec![0, 1, 2, 3, 6, 7], "{record}");
    assert_eq!(record["teacher_layers"], record["kept"]["layers"]);
    // The merged scores hold the two shards' Taylor sums over all 10 sequences.
    let scores = fx.path().join("scores");
    coord.artifact_get(round["artifacts"]["scores"].as_str().unwrap(), &scores);
    let file = std::fs::read_dir(&scores)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file())
        .expect("the scores file");
    let imp = distillery_worker::prune::importance::Importance::load(&file).unwrap();
    assert_eq!(imp.sequences, 10);
    assert_eq!(imp.taylor.as_ref().unwrap().tokens, 10.0 * 23.0);
    // (The campaign goes on to distill; the coordinator and workers stop with the test.)
}
