//! Our logits against Hugging Face transformers (CPU, f32) on tiny models, for the directory we
//! load and for the directory we save. Needs a Python with torch + transformers: `.ci/run`
//! creates `.venv-parity`; elsewhere set DISTILLERY_PYTHON or the test says why it skipped.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use distillery_tests::python_or_skip;
use distillery_worker::model::io::{load_dir, save_dir};
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

/// Largest |a - b| over two logit vectors.
fn max_abs_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn hf_logits(py: &PathBuf, dir: &std::path::Path, ids: &[Vec<u32>]) -> (Vec<f32>, Vec<usize>) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/hf_logits.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(dir)
        .arg(serde_json::to_string(ids).unwrap())
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "transformers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from hf_logits.py");
    assert_eq!(
        v["missing"],
        serde_json::json!([]),
        "transformers found weights missing in {}",
        dir.display()
    );
    assert_eq!(
        v["unexpected"],
        serde_json::json!([]),
        "transformers found unexpected weights in {}",
        dir.display()
    );
    let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap();
    let relevant: Vec<&String> = warnings
        .iter()
        .filter(|w| {
            w.contains("not initialized")
                || w.contains("not used")
                || w.contains("newly initialized")
        })
        .collect();
    assert!(relevant.is_empty(), "loading warned: {relevant:?}");
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let shape = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    (logits, shape)
}

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
        let x = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
        let mine: Vec<f32> = ours
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
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
        let x = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
        let mine: Vec<f32> = back
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (theirs, shape) = hf_logits(&py, &out, &ids);
        assert_eq!(shape, vec![1, 12, 260], "{label}");
        let max = max_abs_gap(&mine, &theirs);
        eprintln!("{label}: max |ours - transformers| = {max:e}");
        assert!(max <= 1e-4, "{label}: max |ours - transformers| = {max}");
    }
}
