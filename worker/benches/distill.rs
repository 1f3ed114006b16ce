//! Distillation benchmark (not a test): tokens/s of one KD step (teacher forward, student forward
//! and backward, all-reduce, clipping, AdamW) with SmolLM2-135M's shape as the teacher and the 70%
//! student the parameter-budget search picks, random weights, f32, against PyTorch doing the same
//! step (tests/python/bench_distill.py) on the same machine and threads, in one run.
//!
//! `cargo bench -p distillery-worker --bench distill` (env BENCH_SEQ = 256, BENCH_REPS = 2,
//! BENCH_ROUNDS = 2; PyTorch via DISTILLERY_PYTHON or the `.venv-parity` that `.ci/run` creates).

mod common;
use common::{env_usize, python, script};
use std::time::Instant;

use candle_core::{DType, Device};
use distillery_worker::collective::Solo;
use distillery_worker::distill::data::Domain;
use distillery_worker::distill::train::{TrainConfig, Trainer};
use distillery_worker::model::{Llama, LlamaConfig};
use distillery_worker::prune::plan::{choose_shape, shape_of, Target};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    let seq = env_usize("BENCH_SEQ", 256);
    let reps = env_usize("BENCH_REPS", 2);
    let rounds = env_usize("BENCH_ROUNDS", 2);
    let batch = 1;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let teacher_json = serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192,
    });
    let tc = LlamaConfig::from_json(&teacher_json.to_string()).expect("teacher config");
    let src = shape_of(&tc);
    let s = choose_shape(
        &src,
        &Target {
            params: Some(0.7),
            ..Default::default()
        },
    )
    .expect("70% shape");
    let mut student_json = teacher_json.clone();
    student_json["hidden_size"] = s.hidden_size.into();
    student_json["intermediate_size"] = s.intermediate_size.into();
    student_json["num_attention_heads"] = s.num_attention_heads.into();
    student_json["num_hidden_layers"] = s.num_layers.into();
    let sc = LlamaConfig::from_json(&student_json.to_string()).expect("student config");
    let teacher = Llama::new(tc, DType::F32, &Device::Cpu).expect("teacher");
    let student = Llama::new(sc, DType::F32, &Device::Cpu).expect("student");
    println!(
        "teacher {} params; student hidden {}, MLP {}, {} heads, {} layers: {} params ({:.2}x)",
        src.params,
        s.hidden_size,
        s.intermediate_size,
        s.num_attention_heads,
        s.num_layers,
        s.params,
        s.params as f64 / src.params as f64
    );
    let domains = vec![Domain {
        name: "synthetic".into(),
        sequences: (0..64u32)
            .map(|i| {
                (0..=seq as u32)
                    .map(|j| (i * 7919 + j * 104_729) % 49152)
                    .collect()
            })
            .collect(),
    }];
    let cfg = TrainConfig {
        seq_len: seq,
        micro_batch: batch,
        global_batch: batch,
        total_steps: 1000,
        lr: 1e-4,
        warmup_steps: 0,
        temperature: 1.0,
        ce_weight: 0.0,
        seed: 1,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: Default::default(),
        shard_optimizer: false,
        recompute: false,
    };
    let mut solo = Solo;
    let mut t = Trainer::new(
        student,
        Some(&teacher),
        cfg,
        &mut solo,
        domains,
        &[1.0],
        vec![],
    )
    .expect("trainer");
    t.train_step().expect("warm-up step");
    let py = python();
    let script = script("bench_distill.py");
    let mut best_ours = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..reps {
            t.train_step().expect("step");
        }
        best_ours = best_ours.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    let torch = py.as_ref().and_then(|py| {
        let out = std::process::Command::new(py)
            .arg(&script)
            .arg(teacher_json.to_string())
            .arg(student_json.to_string())
            .args([batch, seq, reps, rounds, threads].map(|x| x.to_string()))
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
    });
    println!("machine: {threads} threads; batch {batch} x {seq} tokens, f32; best of {rounds} rounds of {reps} steps");
    let ours = (batch * seq) as f64 / best_ours;
    println!("  distillery (candle)      {ours:>7.1} tokens/s   {best_ours:.2} s/step");
    match torch {
        Some(secs) => {
            let theirs = (batch * seq) as f64 / secs;
            println!("  PyTorch (transformers)   {theirs:>7.1} tokens/s   {secs:.2} s/step");
            println!("  ratio distillery / PyTorch: {:.2}x", ours / theirs);
        }
        None => println!("  PyTorch baseline: skipped (set DISTILLERY_PYTHON or run .ci/run)"),
    }
}
