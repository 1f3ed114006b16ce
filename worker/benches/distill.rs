//! Distillation benchmark (not a test): tokens/s and GFLOP/s of one KD step (teacher forward
//! without gradients, student forward and backward of T²·KL + ce_weight·CE, all-reduce,
//! global-norm clipping, AdamW) with SmolLM2-135M's shape as the teacher and the 70% student the
//! parameter-budget search picks (random weights), against PyTorch doing the same step
//! (`tests/python/bench_distill.py`) on the same machine and threads, in one run, at 4x256:
//! - f32: ours vs PyTorch f32 with SDPA (transformers' default) and with eager attention;
//! - bf16: ours with the teacher in bf16 and `precision = Bf16` vs PyTorch with teacher and
//!   student forward under `torch.autocast("cpu", bfloat16)` (f32 master weights and loss on
//!   both sides);
//! - what each change bought: ours with `DISTILLERY_FUSED=0` against the default (and one
//!   fused kernel at a time for the kernels in BENCH_KERNELS), and in bf16 with
//!   `DISTILLERY_BF16_GEMM=0` against the default and against `DISTILLERY_BF16_GEMM=avx512bf16`
//!   (the bf16 GEMM without AMX, where the CPU has AMX), and with `DISTILLERY_CPU_AUTOCAST=0`
//!   (an all-bf16 student instead of autocast's f32 student with bf16 matrix multiplies).
//!
//! Every row runs in its own process (see `common/harness.rs`), alternating rounds, warm-up step
//! excluded, median of rounds. GFLOP/s counts the matmul FLOPs: the teacher's forward plus 3x
//! the student's forward (forward + backward).
//!
//! `cargo bench -p distillery-worker --bench distill [-- --quick]`. Env: BENCH_THREADS (2),
//! BENCH_BATCH (4), BENCH_SEQ (256), BENCH_ROUNDS (3; 2 quick), BENCH_REPS (1), BENCH_MAX_ALIVE
//! (2 processes at once; at 4x256 ours peaks at ~10 GB before the fused loss, PyTorch ~5 GB),
//! BENCH_KERNELS (one-kernel rows, e.g. "norm,rope,glu,attention,loss" as `DISTILLERY_FUSED`
//! names them; none by default: each adds ~1 min), BENCH_TEMPERATURE (1.0), BENCH_CE_WEIGHT
//! (1.0), BENCH_FILTER (run only the sets whose title contains one of these comma-separated
//! parts, e.g. "vs PyTorch"), DISTILLERY_PYTHON. OMP_WAIT_POLICY passes through to PyTorch.

mod common;
use common::harness::{self, Compare, Precision as Peak, Set, Variant};
use common::{env_list, env_usize, machine, python, quick, script, shapes};

use candle_core::{DType, Device};
use distillery_worker::collective::Solo;
use distillery_worker::distill::data::Domain;
use distillery_worker::distill::train::{Precision, PrecisionDType, TrainConfig, Trainer};
use distillery_worker::model::Llama;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The step's hyper-parameters, the same on both sides.
const LR: f64 = 1e-4;
const MAX_GRAD_NORM: f64 = 1.0;
const WEIGHT_DECAY: f64 = 0.01;

fn main() {
    distillery_worker::tune_allocator();
    if harness::child_main(child) {
        return;
    }
    let quick = quick();
    let threads = env_usize("BENCH_THREADS", 2);
    let batch = env_usize("BENCH_BATCH", 4);
    let seq = env_usize("BENCH_SEQ", 256);
    let rounds = env_usize("BENCH_ROUNDS", if quick { 2 } else { 3 });
    let reps = env_usize("BENCH_REPS", 1);
    let max_alive = env_usize("BENCH_MAX_ALIVE", 2);
    let kernels = env_list("BENCH_KERNELS", &[]);
    let temperature = env_f64("BENCH_TEMPERATURE", 1.0);
    let ce_weight = env_f64("BENCH_CE_WEIGHT", 1.0);

    let teacher = shapes::smollm2_135m();
    let student = shapes::student_70(&teacher).unwrap_or_else(|e| fail(&e));
    let (tc, sc) = (
        shapes::config(&teacher).unwrap_or_else(|e| fail(&e)),
        shapes::config(&student).unwrap_or_else(|e| fail(&e)),
    );
    let peak = machine::peak(threads);
    machine::print_header(threads, &peak);
    let (tp, sp) = (shapes::params(&tc), shapes::params(&sc));
    println!(
        "distill: teacher SmolLM2-135M shape ({tp} params); student hidden {}, MLP {}, {} heads, \
         {} layers ({sp} params, {:.2}x)",
        sc.hidden_size,
        sc.intermediate_size,
        sc.num_attention_heads,
        sc.num_hidden_layers,
        sp as f64 / tp as f64
    );
    println!(
        "step: batch {batch} x {seq}, T = {temperature}, ce_weight = {ce_weight}, AdamW lr {LR} \
         wd {WEIGHT_DECAY}, clip {MAX_GRAD_NORM}; {threads} threads on both sides (ours: \
         RAYON_NUM_THREADS = CANDLE_NUM_THREADS = {threads}; PyTorch: torch.set_num_threads, \
         OMP/MKL_NUM_THREADS); each row its own process, rounds alternate, warm-up step excluded"
    );
    let py = python();
    if py.is_none() {
        println!(
            "PyTorch rows: skipped (no Python with torch; set DISTILLERY_PYTHON or run .ci/run)"
        );
    }
    let script = script("bench_distill.py");

    let shape = format!("{batch}x{seq}");
    let tokens = (batch * seq) as f64;
    let flops = tokens
        * (shapes::forward_flops_per_token(&tc, seq, true)
            + 3.0 * shapes::forward_flops_per_token(&sc, seq, true));
    let spec = |precision: &str| {
        json!({"batch": batch, "seq": seq, "precision": precision, "teacher": teacher,
               "student": student, "temperature": temperature, "ce_weight": ce_weight})
    };
    let ours = |label: &str, precision: &str, switches: &[(&str, &str)]| {
        let p = if precision == "bf16" {
            Peak::Bf16
        } else {
            Peak::F32
        };
        Variant::ours(label, spec(precision), threads, switches).work(tokens, flops, p)
    };
    let torch = |dtype: &str, attn: &str| {
        let (p, label) = if dtype == "bf16" {
            (Peak::Bf16, format!("PyTorch bf16 autocast, {attn}"))
        } else {
            (Peak::F32, format!("PyTorch f32, {attn}"))
        };
        py.as_ref().map(|py| {
            let args = vec![
                teacher.to_string(),
                student.to_string(),
                batch.to_string(),
                seq.to_string(),
                threads.to_string(),
                attn.to_string(),
                dtype.to_string(),
                temperature.to_string(),
                ce_weight.to_string(),
                MAX_GRAD_NORM.to_string(),
                WEIGHT_DECAY.to_string(),
                LR.to_string(),
            ];
            Variant::pytorch(&label, py, &script, args, threads)
                .work(tokens, flops, p)
                .compare(Compare::PyTorch(format!("distill {dtype} {attn} {shape}")))
        })
    };

    let mut kernel_rows = vec![
        ours("distillery f32, default (fused on)", "f32", &[]).compare(Compare::Gain(format!(
            "distill f32 {shape} fused kernels (all)"
        ))),
    ];
    for k in &kernels {
        kernel_rows.push(
            ours(
                &format!("distillery f32, DISTILLERY_FUSED={k}"),
                "f32",
                &[("DISTILLERY_FUSED", k)],
            )
            .compare(Compare::Gain(format!(
                "distill f32 {shape} fused {k} alone"
            ))),
        );
    }
    let sets = vec![
        Set {
            title: format!("KD step f32 {shape} vs PyTorch"),
            anchor: ours("distillery f32", "f32", &[]),
            others: [torch("f32", "sdpa"), torch("f32", "eager")]
                .into_iter()
                .flatten()
                .collect(),
        },
        Set {
            title: format!("KD step bf16 {shape} vs PyTorch"),
            anchor: ours("distillery bf16 teacher + precision=bf16", "bf16", &[]),
            others: torch("bf16", "sdpa").into_iter().collect(),
        },
        Set {
            title: format!("KD step f32 {shape}: what the fused kernels bought"),
            anchor: ours(
                "distillery f32, DISTILLERY_FUSED=0",
                "f32",
                &[("DISTILLERY_FUSED", "0")],
            ),
            others: kernel_rows,
        },
        Set {
            title: format!("KD step bf16 {shape}: what the bf16 GEMM bought"),
            anchor: ours(
                "distillery bf16, DISTILLERY_BF16_GEMM=0",
                "bf16",
                &[("DISTILLERY_BF16_GEMM", "0")],
            ),
            others: vec![
                ours("distillery bf16, default", "bf16", &[])
                    .compare(Compare::Gain(format!("distill bf16 {shape} bf16 GEMM"))),
                ours(
                    "distillery bf16, DISTILLERY_BF16_GEMM=avx512bf16",
                    "bf16",
                    &[("DISTILLERY_BF16_GEMM", "avx512bf16")],
                )
                .compare(Compare::Gain(format!(
                    "distill bf16 {shape} bf16 GEMM without AMX"
                ))),
                ours(
                    "distillery bf16, DISTILLERY_CPU_AUTOCAST=0 (all-bf16 student)",
                    "bf16",
                    &[("DISTILLERY_CPU_AUTOCAST", "0")],
                )
                .compare(Compare::Gain(format!(
                    "distill bf16 {shape} all-bf16 student instead of autocast"
                ))),
            ],
        },
    ];
    let mut results = Vec::new();
    for set in &harness::selected(sets) {
        let (anchor, others) = harness::run_set(set, rounds, reps, max_alive);
        harness::print_set(set, &anchor, &others, rounds, reps, &peak);
        results.push((anchor, others));
    }
    harness::print_ratios(&results);
}

fn fail(e: &str) -> ! {
    eprintln!("{e}");
    std::process::exit(2)
}

fn env_f64(k: &str, d: f64) -> f64 {
    match std::env::var(k) {
        Err(_) => d,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => x,
            _ => fail(&format!("{k}={v:?}: must be a number >= 0 (default {d})")),
        },
    }
}

/// One of our rows: teacher (bf16 when the precision is) and student, a warm-up step, then
/// steps on request.
fn child(spec: Value) -> Result<(), String> {
    let get = |k: &str| {
        spec[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("spec.{k} missing"))
    };
    let num = |k: &str| spec[k].as_f64().ok_or(format!("spec.{k} missing"));
    let (batch, seq) = (get("batch")?, get("seq")?);
    let precision = Precision::parse(spec["precision"].as_str().unwrap_or("?"))?;
    let teacher_dtype = precision.dtype();
    let tc = shapes::config(&spec["teacher"])?;
    let sc = shapes::config(&spec["student"])?;
    let vocab = tc.vocab_size as u32;
    let teacher =
        Llama::new(tc, teacher_dtype, &Device::Cpu).map_err(|e| format!("teacher: {e}"))?;
    // The student as a task loads it (f32); `precision` decides what the step computes in.
    let student = Llama::new(sc, DType::F32, &Device::Cpu).map_err(|e| format!("student: {e}"))?;
    let domains = vec![Domain {
        name: "synthetic".into(),
        sequences: (0..64u32)
            .map(|i| {
                (0..=seq as u32)
                    .map(|j| (i * 7919 + j * 104_729) % vocab)
                    .collect()
            })
            .collect(),
    }];
    let cfg = TrainConfig {
        seq_len: seq,
        micro_batch: batch,
        global_batch: batch,
        total_steps: 1000,
        lr: LR,
        warmup_steps: 0,
        temperature: num("temperature")?,
        ce_weight: num("ce_weight")?,
        seed: 1,
        max_grad_norm: MAX_GRAD_NORM,
        weight_decay: WEIGHT_DECAY,
        dynamic: None,
        precision,
        shard_optimizer: false,
        recompute: false,
        objective: Default::default(),
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
    .map_err(|e| format!("trainer: {e}"))?;
    let mut step = || -> Result<(), String> {
        let s = t.train_step().map_err(|e| format!("step: {e}"))?;
        if !s.loss.is_finite() {
            return Err(format!("step {}: loss {}", s.step, s.loss));
        }
        Ok(())
    };
    step()?; // warm-up
    let info = json!({
        "threads": candle_core::utils::get_num_threads(),
        "precision": spec["precision"],
        "teacher_dtype": format!("{teacher_dtype:?}"),
        "DISTILLERY_FUSED": std::env::var("DISTILLERY_FUSED").ok(),
        "DISTILLERY_BF16_GEMM": std::env::var("DISTILLERY_BF16_GEMM").ok(),
        "DISTILLERY_CPU_AUTOCAST": std::env::var("DISTILLERY_CPU_AUTOCAST").ok(),
    });
    harness::serve(info, step)
}
