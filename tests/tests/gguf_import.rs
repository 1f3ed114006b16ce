//! GGUF import against transformers: tiny random models made by transformers (Llama with linear
//! and with Llama 3 RoPE scaling, Qwen2, Qwen3, Gemma 3), converted to GGUF the way llama.cpp's
//! converter does (tests/python/gguf_reference.py: gguf-py's writer and tensor name map, Q/K
//! permuted for llama, Gemma's norms as 1 + w, Llama 3 RoPE as rope_freqs), load with
//! `load_gguf` to transformers' config text and logits. Needs the `.venv-parity` Python.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use distillery_tests::python::{hf_batch, max_abs_gap, python_json, python_or_skip};
use distillery_worker::model::gguf::load_gguf;

#[test]
fn converted_models_of_every_architecture_import_with_transformers_config_and_logits() {
    let Some(py) = python_or_skip(
        "converted_models_of_every_architecture_import_with_transformers_config_and_logits",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let archs = ["llama", "llama3", "qwen2", "qwen3", "gemma3"];
    let jobs: Vec<serde_json::Value> = archs
        .iter()
        .enumerate()
        .map(|(i, a)| serde_json::json!({"job": "convert", "arch": a, "out": dir.path().join(a), "seed": 40 + i}))
        .collect();
    python_json(&py, "gguf_reference.py", serde_json::json!(jobs));
    // Longer than Gemma's sliding window (3), so the window matters.
    let ids: Vec<Vec<u32>> = vec![
        (0..12).map(|i| (i * 37 + 5) % 300).collect(),
        (0..12).map(|i| (i * 101 + 17) % 300).collect(),
    ];
    let mut ours = Vec::new();
    let mut hf = Vec::new();
    for arch in archs {
        let d = dir.path().join(arch);
        let g = load_gguf(&d.join("model.gguf"), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        let expected = std::fs::read_to_string(d.join("config_expected.json")).unwrap();
        assert_eq!(
            g.config_json, expected,
            "{arch}: config.json differs from transformers' (left: ours)"
        );
        let x = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
        let logits: Vec<f32> = g
            .model
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        ours.push((arch, logits));
        hf.push((d.join("hf"), ids.clone(), 0));
    }
    let theirs = hf_batch(&py, &hf);
    for ((arch, logits), t) in ours.iter().zip(&theirs) {
        assert_eq!(t.shape, vec![2, 12, 300], "{arch}");
        let max = max_abs_gap(logits, &t.logits);
        eprintln!(
            "{arch}: GGUF import, max |ours - transformers| = {max:e} over {} logits",
            t.logits.len()
        );
        assert!(max <= 1e-4, "{arch}: max |ours - transformers| = {max}");
    }
}

/// The coordinator reads the same files at submit time: their shapes are the original models'.
#[test]
fn converted_models_give_the_same_shape_at_submit_time() {
    let Some(py) = python_or_skip("converted_models_give_the_same_shape_at_submit_time") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let archs = ["qwen3", "gemma3"];
    let jobs: Vec<serde_json::Value> = archs
        .iter()
        .map(|a| serde_json::json!({"job": "convert", "arch": a, "out": dir.path().join(a), "seed": 7}))
        .collect();
    python_json(&py, "gguf_reference.py", serde_json::json!(jobs));
    for arch in archs {
        let d: PathBuf = dir.path().join(arch);
        let from_gguf =
            distillery_coordinator::source_model::read_shape(&d.join("model.gguf")).unwrap();
        let from_hf = distillery_coordinator::source_model::read_shape(&d.join("hf")).unwrap();
        assert_eq!(from_gguf, from_hf, "{arch}");
        assert!(from_gguf.params > 0);
    }
}
