//! Forward benchmark (not a test): tokens/s and GFLOP/s of our Llama for SmolLM2-135M's shape
//! (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152, random
//! weights, f32) against transformers + PyTorch on the same machine and threads, in one run;
//! and the Minitron scoring pass (forward + importance accumulation) against the plain forward.
//!
//! `cargo bench -p distillery-worker --bench forward` (env: BENCH_SEQ = 256, BENCH_REPS = 3, BENCH_ROUNDS = 3;
//! the PyTorch side needs DISTILLERY_PYTHON or the `.venv-parity` that `.ci/run` creates).

use std::path::PathBuf;

mod common;
use common::{env_usize, python, script};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use distillery_worker::model::{Llama, LlamaConfig};
use distillery_worker::prune::importance::Importance;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    let seq = env_usize("BENCH_SEQ", 256);
    let reps = env_usize("BENCH_REPS", 3);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let batch = 1;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cfg = serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 8192,
    });
    let config = LlamaConfig::from_json(&cfg.to_string()).expect("config");
    let model = Llama::new(config, DType::F32, &Device::Cpu).expect("model");
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i as u32 * 7919) % 49152)
        .collect();
    let x = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).expect("ids");
    model.forward(&x).expect("warm-up");

    // Matmul FLOPs: 2 per weight per token (embedding lookup excluded, tied head included), plus
    // attention scores and mixing, 4 * T * head_dim per head per token (neither side exploits the
    // causal mask, so the full T is counted).
    let (h, l, nh, nkv, inter, v) = (576.0, 30.0, 9.0, 3.0, 1536.0, 49152.0);
    let hd = h / nh;
    let per_layer = h * nh * hd + 2.0 * h * nkv * hd + nh * hd * h + 3.0 * h * inter;
    let flops_per_token = 2.0 * (l * per_layer + v * h) + l * 4.0 * seq as f64 * nh * hd;

    let py = python();
    let script = script("bench_forward.py");
    let ours_round = || {
        let start = Instant::now();
        for _ in 0..reps {
            model.forward(&x).expect("forward");
        }
        start.elapsed().as_secs_f64() / reps as f64
    };
    let torch_round = |py: &PathBuf| -> Option<f64> {
        let out = std::process::Command::new(py)
            .arg(&script)
            .arg(cfg.to_string())
            .args([
                batch.to_string(),
                seq.to_string(),
                reps.to_string(),
                threads.to_string(),
            ])
            .output()
            .ok()?;
        if !out.status.success() {
            println!(
                "  PyTorch baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["seconds"].as_f64()
    };
    let score_round = || {
        let start = Instant::now();
        for _ in 0..reps {
            let mut imp = Importance::new(&model.config);
            imp.accumulate(&model, &x).expect("score");
        }
        start.elapsed().as_secs_f64() / reps as f64
    };
    // Timings on this machine are noisy: both sides run in alternating rounds and each reports
    // its best round (the mean of `reps` forwards).
    let mut best_ours = f64::INFINITY;
    let mut best_torch = f64::INFINITY;
    let mut best_score = f64::INFINITY;
    for _ in 0..rounds {
        best_ours = best_ours.min(ours_round());
        best_score = best_score.min(score_round());
        if let Some(t) = py.as_ref().and_then(&torch_round) {
            best_torch = best_torch.min(t);
        }
    }
    // Scoring stops after the last layer: no final norm, no lm_head.
    let score_flops_per_token = flops_per_token - 2.0 * v * h;
    let report_with = |label: &str, secs: f64, flops_per_token: f64| {
        let tps = (batch * seq) as f64 / secs;
        println!(
            "  {label:<24}{tps:>7.0} tokens/s   {:>6.1} GFLOP/s   {secs:.3} s/forward",
            flops_per_token * tps / 1e9
        );
        tps
    };
    let report = |label: &str, secs: f64| report_with(label, secs, flops_per_token);
    println!("machine: {threads} threads; SmolLM2-135M shape, batch {batch} x {seq} tokens, f32; best of {rounds} rounds of {reps}");
    let ours = report("distillery (candle)", best_ours);
    if best_torch.is_finite() {
        let theirs = report("PyTorch (transformers)", best_torch);
        println!("  ratio distillery / PyTorch: {:.2}x", ours / theirs);
    }
    let scoring = report_with("Minitron scoring pass", best_score, score_flops_per_token);
    println!(
        "  ratio scoring / plain forward: {:.2}x (activations of every layer reduced to importance sums)",
        scoring / ours
    );
    if !best_torch.is_finite() {
        println!("  PyTorch baseline: skipped (no Python with torch; set DISTILLERY_PYTHON or run .ci/run)");
    }
}
