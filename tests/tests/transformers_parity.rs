//! Our logits against Hugging Face transformers (CPU, f32) on tiny models, for the directory we
//! load and for the directory we save. Needs a Python with torch + transformers: `.ci/run`
//! creates `.venv-parity`; elsewhere set DISTILLERY_PYTHON or the test says why it skipped.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use distillery_tests::python::{hf_batch, max_abs_gap, python_json, python_or_skip};
use distillery_worker::model::io::{load_dir, save_dir};
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

fn hf_logits(py: &PathBuf, dir: &std::path::Path, ids: &[Vec<u32>]) -> (Vec<f32>, Vec<usize>) {
    let r = hf_batch(py, &[(dir.to_path_buf(), ids.to_vec(), 0)]).remove(0);
    (r.logits, r.shape)
}

/// Tiny random models made and saved by transformers itself (hf_make_model.py), each
/// `(arch, dir, dtype, shard_bytes)`.
fn hf_make(py: &PathBuf, models: &[(&str, PathBuf, &str, usize)]) {
    let jobs: Vec<serde_json::Value> = models
        .iter()
        .map(|(arch, out, dtype, shard)| {
            serde_json::json!({"arch": arch, "out": out, "dtype": dtype, "shard_bytes": shard})
        })
        .collect();
    python_json(py, "hf_make_model.py", serde_json::json!(jobs));
}

/// A model's logits for `ids`, flattened (the layout transformers' side returns).
fn flat_logits(m: &distillery_worker::model::Llama, ids: &[Vec<u32>]) -> Vec<f32> {
    let x = Tensor::new(ids.to_vec(), &Device::Cpu).unwrap();
    m.forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const ARCHS: &[&str] = &["llama3", "mistral", "qwen2", "qwen3", "gemma3"];

#[test]
fn logits_equal_transformers_for_loaded_and_saved_models() {
    let Some(py) = python_or_skip("logits_equal_transformers_for_loaded_and_saved_models") else {
        return;
    };
    let ids = vec![
        vec![
            256u32, 72, 101, 108, 108, 111, 44, 32, 258, 119, 111, 114, 108, 100,
        ],
        vec![1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    ];
    for spec in [
        TestModelSpec {
            tie_word_embeddings: true,
            num_kv_heads: 2,
            seed: 11,
            ..Default::default()
        },
        TestModelSpec {
            tie_word_embeddings: false,
            num_kv_heads: 4,
            seed: 12,
            ..Default::default()
        },
        TestModelSpec {
            tie_word_embeddings: false,
            num_kv_heads: 1,
            hidden_size: 128,
            num_heads: 8,
            seed: 13,
            ..Default::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        write_test_model(&src, &spec).unwrap();
        let ours = load_dir(&src, DType::F32, &Device::Cpu).unwrap();
        let saved = dir.path().join("saved");
        save_dir(&ours, &saved, Some(&src)).unwrap();
        let mine = flat_logits(&ours, &ids);
        for d in [&src, &saved] {
            let (theirs, shape) = hf_logits(&py, d, &ids);
            assert_eq!(shape, vec![2, 14, 260]);
            let max = max_abs_gap(&mine, &theirs);
            eprintln!(
                "{}: max |ours - transformers| = {max:e} over {} logits",
                d.display(),
                theirs.len()
            );
            assert!(
                max <= 1e-4,
                "{spec:?} {}: max |ours - transformers| = {max}",
                d.display()
            );
        }
    }
}

#[test]
fn every_architecture_saved_by_transformers_loads_saves_and_generates_like_transformers() {
    use distillery_worker::model::generate::{generate, SamplingParams};
    let Some(py) = python_or_skip(
        "every_architecture_saved_by_transformers_loads_saves_and_generates_like_transformers",
    ) else {
        return;
    };
    // Longer than every sliding window (5) in the models, so windows matter.
    let ids: Vec<Vec<u32>> = vec![
        (0..14).map(|i| (i * 37 + 5) % 300).collect(),
        (0..14).map(|i| (i * 101 + 17) % 300).collect(),
    ];
    let dir = tempfile::tempdir().unwrap();
    // Each architecture in both dtypes; sharding alternates so every combination is seen.
    let models: Vec<(&str, PathBuf, &str, usize)> = ARCHS
        .iter()
        .enumerate()
        .flat_map(|(k, arch)| {
            [("float32", k % 2 == 0), ("bfloat16", k % 2 == 1)].map(|(dtype, sharded)| {
                let d = dir.path().join(format!("{arch}-{dtype}"));
                (*arch, d, dtype, if sharded { 150_000 } else { 0 })
            })
        })
        .collect();
    hf_make(&py, &models);
    let prompts: Vec<Vec<u32>> = ids.iter().map(|r| r[..6].to_vec()).collect();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (arch, src, dtype, shard) in &models {
        let label = format!(
            "{arch} {dtype} {}",
            if *shard > 0 { "sharded" } else { "single file" }
        );
        assert_eq!(
            src.join("model.safetensors.index.json").is_file(),
            *shard > 0,
            "{label}"
        );
        let m = load_dir(src, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{label}: {e}"));
        let saved = src.with_extension("saved");
        save_dir(&m, &saved, Some(src)).unwrap();
        let logits = flat_logits(&m, &ids);
        let greedy: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let params = SamplingParams {
                    max_tokens: 10,
                    ..Default::default()
                };
                generate(&m, p, &params).unwrap().tokens
            })
            .collect();
        for d in [src.clone(), saved] {
            jobs.push((d.clone(), ids.clone(), 0));
            jobs.push((d.clone(), prompts.clone(), 10));
            ours.push((
                format!("{label} {}", d.display()),
                logits.clone(),
                greedy.clone(),
            ));
        }
    }
    let theirs = hf_batch(&py, &jobs);
    for (k, (label, logits, greedy)) in ours.iter().enumerate() {
        let (full, gen) = (&theirs[2 * k], &theirs[2 * k + 1]);
        assert_eq!(full.shape, vec![2, 14, 300], "{label}");
        let max = max_abs_gap(logits, &full.logits);
        eprintln!("{label}: max |ours - transformers| = {max:e}");
        assert!(max <= 1e-4, "{label}: max |ours - transformers| = {max}");
        assert_eq!(greedy, &gen.generated, "{label}: greedy generation differs");
    }
}

#[test]
fn pruned_directories_load_in_transformers_with_our_logits() {
    use distillery_worker::prune::{apply::apply, importance::score, plan, scores};
    let Some(py) = python_or_skip("pruned_directories_load_in_transformers_with_our_logits") else {
        return;
    };
    let ids: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 37 + 5) % 256).collect()];
    let calib: Vec<Vec<u32>> = (0..6)
        .map(|s| (0..16).map(|i| (i * 13 + s * 29 + 3) % 256).collect())
        .collect();
    // (tied, kv heads, hidden, intermediate, heads, layers) of the target; the source is 4 heads
    // in 2 KV groups (or 4), 3 layers, hidden 64, intermediate 256.
    let cases = [
        ("width-only GQA tied", true, 2, (48, 160, 2, 3)),
        ("depth-only untied", false, 4, (64, 256, 4, 2)),
        ("combined GQA untied", false, 2, (40, 96, 2, 2)),
        ("combined MHA tied", true, 4, (56, 128, 4, 1)),
    ];
    for (label, tied, kv, (h, i, nh, l)) in cases {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let spec = TestModelSpec {
            tie_word_embeddings: tied,
            num_kv_heads: kv,
            num_layers: 3,
            seed: 21,
            ..Default::default()
        };
        write_test_model(&src, &spec).unwrap();
        let m = load_dir(&src, DType::F32, &Device::Cpu).unwrap();
        let imp = score(&m, &calib, 3, |_, _| true).unwrap();
        let s = plan::shape_of(&m.config);
        let target = plan::choose_shape(
            &s,
            &plan::Target {
                hidden_size: Some(h),
                intermediate_size: Some(i),
                num_attention_heads: Some(nh),
                num_layers: Some(l),
                ..Default::default()
            },
        )
        .unwrap();
        let keep = plan::plan(&s, &scores(&imp, &[]).unwrap(), &target).unwrap();
        let pruned = apply(&m, &keep).unwrap();
        let out = dir.path().join("pruned");
        save_dir(&pruned, &out, Some(&src)).unwrap();
        let back = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.num_params() as u64, target.params, "{label}");
        let mine = flat_logits(&back, &ids);
        let (theirs, shape) = hf_logits(&py, &out, &ids);
        assert_eq!(shape, vec![1, 12, 260], "{label}");
        let max = max_abs_gap(&mine, &theirs);
        eprintln!("{label}: max |ours - transformers| = {max:e}");
        assert!(max <= 1e-4, "{label}: max |ours - transformers| = {max}");
    }
}

#[test]
fn pruned_models_of_every_architecture_load_in_transformers_with_our_logits() {
    use distillery_worker::prune::{apply::apply, importance::score, plan, scores};
    let Some(py) =
        python_or_skip("pruned_models_of_every_architecture_load_in_transformers_with_our_logits")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let models: Vec<(&str, PathBuf, &str, usize)> = ARCHS
        .iter()
        .map(|a| (*a, dir.path().join(a), "float32", 0))
        .collect();
    hf_make(&py, &models);
    let ids: Vec<Vec<u32>> = vec![(0..12).map(|i| (i * 37 + 5) % 300).collect()];
    let calib: Vec<Vec<u32>> = (0..6)
        .map(|s| (0..16).map(|i| (i * 13 + s * 29 + 3) % 300).collect())
        .collect();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (arch, src, _, _) in &models {
        let m = load_dir(src, DType::F32, &Device::Cpu).unwrap();
        let imp = score(&m, &calib, 3, |_, _| true).unwrap();
        let s = plan::shape_of(&m.config);
        // Narrower everywhere and one layer fewer (for Gemma 3 and Qwen2 that mixes the kinds
        // of the kept layers).
        let target = plan::choose_shape(
            &s,
            &plan::Target {
                hidden_size: Some(48),
                intermediate_size: Some(64),
                num_attention_heads: Some(2),
                num_layers: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        let keep = plan::plan(&s, &scores(&imp, &[]).unwrap(), &target).unwrap();
        let pruned = apply(&m, &keep).unwrap();
        let kept_types: Vec<_> = keep
            .layers
            .iter()
            .map(|&l| m.config.layer_types[l])
            .collect();
        assert_eq!(pruned.config.layer_types, kept_types, "{arch}");
        let out = src.with_extension("pruned");
        save_dir(&pruned, &out, Some(src)).unwrap();
        let back = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            back.num_params() as u64,
            target.params,
            "{arch}: parameter count"
        );
        assert_eq!(back.config.layer_types, kept_types, "{arch}");
        let mine = flat_logits(&back, &ids);
        jobs.push((out, ids.clone(), 0));
        ours.push((arch.to_string(), mine));
    }
    for ((arch, mine), theirs) in ours.iter().zip(hf_batch(&py, &jobs)) {
        assert_eq!(theirs.shape, vec![1, 12, 300], "{arch}");
        let max = max_abs_gap(mine, &theirs.logits);
        eprintln!("pruned {arch}: max |ours - transformers| = {max:e}");
        assert!(
            max <= 1e-4,
            "pruned {arch}: max |ours - transformers| = {max}"
        );
    }
}

/// Config texts where a reader can silently disagree with transformers: absent keys (per-class
/// defaults), legacy forms, key combinations; plus every committed fixture.
fn config_variants() -> Vec<(String, serde_json::Value)> {
    use serde_json::json;
    let base = |mt: &str| {
        json!({"model_type": mt, "hidden_size": 64, "intermediate_size": 96,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 7,
               "vocab_size": 300})
    };
    let with = |mt: &str, extra: serde_json::Value| {
        let mut v = base(mt);
        for (k, x) in extra.as_object().unwrap() {
            if x == &json!("__absent__") {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    };
    let llama3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "rope_theta": 500000.0});
    let mut v: Vec<(String, serde_json::Value)> = vec![
        (
            "llama minimal, no kv heads".into(),
            with("llama", json!({"num_key_value_heads": "__absent__"})),
        ),
        (
            "llama3 rope without original_max".into(),
            with(
                "llama",
                json!({"rope_parameters": llama3, "max_position_embeddings": 4096}),
            ),
        ),
        (
            "llama legacy rope_scaling linear".into(),
            with(
                "llama",
                json!({"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 5e5}),
            ),
        ),
        (
            "llama rope_parameters and rope_scaling differing".into(),
            with(
                "llama",
                json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
            ),
        ),
        (
            "llama3 without low_freq_factor".into(),
            with(
                "llama",
                json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "rope_theta": 5e5}}),
            ),
        ),
        (
            "mistral minimal (no window key, no kv heads)".into(),
            with(
                "mistral",
                json!({"num_key_value_heads": "__absent__", "num_attention_heads": 8}),
            ),
        ),
        (
            "mistral window null".into(),
            with("mistral", json!({"sliding_window": null})),
        ),
        (
            "mistral layer_types disagreeing".into(),
            with(
                "mistral",
                json!({"sliding_window": 16, "layer_types": vec!["full_attention"; 7]}),
            ),
        ),
        ("qwen2 minimal".into(), with("qwen2", json!({}))),
        (
            "qwen2 sliding, no window key".into(),
            with(
                "qwen2",
                json!({"use_sliding_window": true, "max_window_layers": 3}),
            ),
        ),
        (
            "qwen3 minimal (head_dim, kv heads absent)".into(),
            with(
                "qwen3",
                json!({"head_dim": "__absent__", "num_key_value_heads": "__absent__", "num_attention_heads": 32, "hidden_size": 256}),
            ),
        ),
        ("gemma3 minimal".into(), with("gemma3_text", json!({}))),
        (
            "gemma3 legacy pattern and bases".into(),
            with(
                "gemma3_text",
                json!({"sliding_window_pattern": 2, "rope_local_base_freq": 20000.0, "rope_theta": 2e6, "sliding_window": 8, "head_dim": 16}),
            ),
        ),
        (
            "gemma3 _sliding_window_pattern only".into(),
            with(
                "gemma3_text",
                json!({"_sliding_window_pattern": 1, "head_dim": 16}),
            ),
        ),
        (
            "gemma3 legacy rope_scaling".into(),
            with(
                "gemma3_text",
                json!({"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "head_dim": 16}),
            ),
        ),
        (
            "gemma3 flat rope_parameters".into(),
            with(
                "gemma3_text",
                json!({"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5000.0}}),
            ),
        ),
        (
            "gemma3 hidden_act only".into(),
            with(
                "gemma3_text",
                json!({"hidden_act": "gelu_pytorch_tanh", "head_dim": 16}),
            ),
        ),
    ];
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/src/model/config");
    for sub in ["transformers", "hub"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            v.push((
                format!("fixture {sub}/{}", f.file_name().unwrap().to_string_lossy()),
                serde_json::from_str(&text).unwrap(),
            ));
        }
    }
    v
}

#[test]
fn configs_mean_what_they_mean_to_transformers() {
    use distillery_worker::model::LlamaConfig;
    let Some(py) = python_or_skip("configs_mean_what_they_mean_to_transformers") else {
        return;
    };
    let variants = config_variants();
    let input: Vec<serde_json::Value> = variants.iter().map(|(_, v)| v.clone()).collect();
    let theirs = python_json(&py, "hf_effective_config.py", serde_json::json!(input));
    let theirs = theirs.as_array().unwrap();
    let mut compared = 0;
    for ((label, v), t) in variants.iter().zip(theirs) {
        let ours = LlamaConfig::from_json(&v.to_string());
        match (&ours, t["ok"].as_bool().unwrap()) {
            (Err(e), _) => {
                // Refusing is never silent; but every published or transformers-written
                // fixture must load.
                assert!(!label.starts_with("fixture"), "{label}: refused: {e}");
                eprintln!(
                    "{label}: refused ({e}); transformers: {}",
                    if t["ok"] == true {
                        "loads".to_string()
                    } else {
                        t["error"].to_string()
                    }
                );
                continue;
            }
            (Ok(_), false) => panic!("{label}: we load what transformers refuses: {}", t["error"]),
            (Ok(c), true) => {
                let hd = c.head_dim();
                assert_eq!(t["head_dim"], serde_json::json!(hd), "{label}: head_dim");
                assert_eq!(
                    t["num_key_value_heads"],
                    serde_json::json!(c.num_kv_heads()),
                    "{label}: kv heads"
                );
                assert_eq!(
                    t["rms_norm_eps"].as_f64().unwrap(),
                    c.rms_norm_eps,
                    "{label}: eps"
                );
                assert_eq!(
                    t["tie_word_embeddings"],
                    serde_json::json!(c.tie_word_embeddings),
                    "{label}: tie"
                );
                assert_eq!(
                    t["max_position_embeddings"],
                    serde_json::json!(c.max_position_embeddings),
                    "{label}: max pos"
                );
                let layers = t["layers"].as_array().unwrap();
                assert_eq!(layers.len(), c.num_hidden_layers, "{label}");
                for (i, l) in layers.iter().enumerate() {
                    assert_eq!(
                        l["window"],
                        serde_json::json!(c.layer_window(i)),
                        "{label}: layer {i} window"
                    );
                    let scale = l["scale"].as_f64().unwrap();
                    assert!(
                        (scale - c.attention_scale()).abs() <= 1e-12 * scale,
                        "{label}: layer {i} scale {scale} vs {}",
                        c.attention_scale()
                    );
                    assert_eq!(l["rope_attention_scaling"].as_f64(), Some(1.0), "{label}");
                    let inv: Vec<f64> = serde_json::from_value(l["inv_freq"].clone()).unwrap();
                    let mine = c.layer_rope(i).inv_freq(hd);
                    assert_eq!(inv.len(), mine.len(), "{label}: layer {i}");
                    for (k, (a, b)) in inv.iter().zip(&mine).enumerate() {
                        // transformers computes them in f32 (a few ulps apart from our f64).
                        assert!(
                            (a - b).abs() <= 1e-6 * a.abs().max(b.abs()),
                            "{label}: layer {i} inv_freq[{k}] {a} vs ours {b}"
                        );
                    }
                }
                compared += 1;
            }
        }
    }
    eprintln!(
        "{compared} of {} configs compared layer by layer with transformers",
        variants.len()
    );
    assert!(compared >= variants.len() - 6, "too many refused");
}
