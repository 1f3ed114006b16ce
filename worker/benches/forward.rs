//! Forward benchmark (not a test): tokens/s, GFLOP/s and % of the FMA-loop peak of our Llama
//! with SmolLM2-135M's shape (random weights) against transformers + PyTorch on the same
//! machine and threads, in one run, at 1x256 and 4x256 tokens:
//! - f32: ours vs PyTorch f32 with SDPA attention (transformers' default) and with eager;
//! - bf16: ours with the model in bf16 vs PyTorch under `torch.autocast("cpu", bfloat16)`,
//!   SDPA and eager;
//! - what each kernel bought: ours with `DISTILLERY_FUSED=0` (composed ops) against the
//!   default and against one fused kernel at a time (`DISTILLERY_FUSED=<kernel>`), and in bf16
//!   with both `DISTILLERY_FUSED=0 DISTILLERY_BF16_GEMM=0` against the default, each alone, and
//!   the default without AMX (`DISTILLERY_BF16_GEMM=avx512bf16`, where the CPU has AMX);
//! - the Minitron scoring pass (forward + importance accumulation) against the plain forward.
//!
//! Every row runs in its own process (see `common/harness.rs`), alternating rounds, warm-up
//! excluded, median of rounds; PyTorch under `torch.inference_mode()`.
//!
//! `cargo bench -p distillery-worker --bench forward [-- --quick]`. Env: BENCH_THREADS (2),
//! BENCH_SEQ (256), BENCH_BATCHES ("1,4"), BENCH_ROUNDS (5; 3 quick), BENCH_REPS (1),
//! BENCH_MAX_ALIVE (4 processes at once), BENCH_KERNELS (fused kernels for one-at-a-time rows,
//! "norm,rope,glu,attention", the names `DISTILLERY_FUSED` takes; none quick), BENCH_FILTER
//! (run only the sets whose title contains one of these comma-separated parts, e.g.
//! "vs PyTorch"), DISTILLERY_PYTHON (else `.venv-parity`). OMP_WAIT_POLICY passes through to
//! PyTorch (PASSIVE on a busy machine: OpenMP's default spinning collapses when oversubscribed).

mod common;
use common::harness::{self, Compare, Precision, Set, Variant};
use common::{env_list, env_usize, machine, python, quick, script, shapes};

use candle_core::{DType, Device, Tensor};
use distillery_worker::model::Llama;
use distillery_worker::prune::importance::Importance;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    if harness::child_main(child) {
        return;
    }
    let quick = quick();
    let threads = env_usize("BENCH_THREADS", 2);
    let seq = env_usize("BENCH_SEQ", 256);
    let rounds = env_usize("BENCH_ROUNDS", if quick { 3 } else { 5 });
    let reps = env_usize("BENCH_REPS", 1);
    let max_alive = env_usize("BENCH_MAX_ALIVE", 4);
    let batches: Vec<usize> = env_list("BENCH_BATCHES", &["1", "4"])
        .iter()
        .map(|b| match b.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("BENCH_BATCHES: {b:?} is not a batch size");
                std::process::exit(2)
            }
        })
        .collect();
    let default_kernels: &[&str] = if quick {
        &[]
    } else {
        &["norm", "rope", "glu", "attention"]
    };
    let kernels = env_list("BENCH_KERNELS", default_kernels);
    let cfg = shapes::smollm2_135m();
    let config = shapes::config(&cfg).unwrap_or_else(|e| fail(&e));

    let peak = machine::peak(threads);
    machine::print_header(threads, &peak);
    println!(
        "forward: SmolLM2-135M shape ({} params, random weights), {threads} threads on both sides \
         (ours: RAYON_NUM_THREADS = CANDLE_NUM_THREADS = {threads}; PyTorch: torch.set_num_threads, \
         OMP/MKL_NUM_THREADS); each row its own process, rounds alternate, warm-up excluded",
        shapes::params(&config)
    );
    let py = python();
    if py.is_none() {
        println!(
            "PyTorch rows: skipped (no Python with torch; set DISTILLERY_PYTHON or run .ci/run)"
        );
    }
    let script = script("bench_forward.py");

    let mut sets = Vec::new();
    for &batch in &batches {
        let shape = format!("{batch}x{seq}");
        let tokens = (batch * seq) as f64;
        let flops = tokens * shapes::forward_flops_per_token(&config, seq, true);
        let spec = |dtype: &str, pass: &str| {
            json!({
                "batch": batch, "seq": seq, "dtype": dtype, "pass": pass, "config": cfg
            })
        };
        let ours = |label: &str, dtype: &str, switches: &[(&str, &str)]| {
            let p = if dtype == "bf16" {
                Precision::Bf16
            } else {
                Precision::F32
            };
            Variant::ours(label, spec(dtype, "plain"), threads, switches).work(tokens, flops, p)
        };
        let torch = |dtype: &str, attn: &str| {
            let p = if dtype == "bf16" {
                Precision::Bf16
            } else {
                Precision::F32
            };
            let label = if dtype == "bf16" {
                format!("PyTorch bf16 autocast, {attn}")
            } else {
                format!("PyTorch f32, {attn}")
            };
            py.as_ref().map(|py| {
                let args = vec![
                    cfg.to_string(),
                    batch.to_string(),
                    seq.to_string(),
                    threads.to_string(),
                    attn.to_string(),
                    dtype.to_string(),
                ];
                Variant::pytorch(&label, py, &script, args, threads)
                    .work(tokens, flops, p)
                    .compare(Compare::PyTorch(format!("forward {dtype} {attn} {shape}")))
            })
        };

        let mut f32_others: Vec<Variant> = [torch("f32", "sdpa"), torch("f32", "eager")]
            .into_iter()
            .flatten()
            .collect();
        if batch == 1 {
            // Scoring stops after the last layer: no final norm, no lm_head.
            let score_flops = tokens * shapes::forward_flops_per_token(&config, seq, false);
            f32_others.push(
                Variant::ours(
                    "distillery Minitron scoring pass",
                    spec("f32", "scoring"),
                    threads,
                    &[],
                )
                .work(tokens, score_flops, Precision::F32),
            );
        }
        sets.push(Set {
            title: format!("forward f32 {shape} vs PyTorch"),
            anchor: ours("distillery f32", "f32", &[]),
            others: f32_others,
        });
        sets.push(Set {
            title: format!("forward bf16 {shape} vs PyTorch"),
            anchor: ours("distillery bf16 (model in bf16)", "bf16", &[]),
            others: [torch("bf16", "sdpa"), torch("bf16", "eager")]
                .into_iter()
                .flatten()
                .collect(),
        });
        let mut kernel_rows = vec![
            ours("distillery f32, default (fused on)", "f32", &[]).compare(Compare::Gain(format!(
                "forward f32 {shape} fused kernels (all)"
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
                    "forward f32 {shape} fused {k} alone"
                ))),
            );
        }
        sets.push(Set {
            title: format!("forward f32 {shape}: what the fused kernels bought"),
            anchor: ours(
                "distillery f32, DISTILLERY_FUSED=0",
                "f32",
                &[("DISTILLERY_FUSED", "0")],
            ),
            others: kernel_rows,
        });
        sets.push(Set {
            title: format!("forward bf16 {shape}: what the bf16 GEMM and the fused kernels bought"),
            anchor: ours(
                "distillery bf16, FUSED=0 BF16_GEMM=0",
                "bf16",
                &[("DISTILLERY_FUSED", "0"), ("DISTILLERY_BF16_GEMM", "0")],
            ),
            others: vec![
                ours("distillery bf16, default", "bf16", &[]).compare(Compare::Gain(format!(
                    "forward bf16 {shape} bf16 GEMM + fused"
                ))),
                ours(
                    "distillery bf16, DISTILLERY_FUSED=0",
                    "bf16",
                    &[("DISTILLERY_FUSED", "0")],
                )
                .compare(Compare::Gain(format!(
                    "forward bf16 {shape} bf16 GEMM alone"
                ))),
                ours(
                    "distillery bf16, DISTILLERY_BF16_GEMM=0",
                    "bf16",
                    &[("DISTILLERY_BF16_GEMM", "0")],
                )
                .compare(Compare::Gain(format!("forward bf16 {shape} fused alone"))),
                ours(
                    "distillery bf16, DISTILLERY_BF16_GEMM=avx512bf16",
                    "bf16",
                    &[("DISTILLERY_BF16_GEMM", "avx512bf16")],
                )
                .compare(Compare::Gain(format!(
                    "forward bf16 {shape} bf16 GEMM without AMX + fused"
                ))),
            ],
        });
    }

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

/// One of our rows: builds the model in the spec's dtype, warms up, serves forwards.
fn child(spec: Value) -> Result<(), String> {
    let get = |k: &str| {
        spec[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("spec.{k} missing"))
    };
    let (batch, seq) = (get("batch")?, get("seq")?);
    let dtype = match spec["dtype"].as_str() {
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        other => return Err(format!("spec.dtype {other:?}: use \"f32\" or \"bf16\"")),
    };
    let config = shapes::config(&spec["config"])?;
    let vocab = config.vocab_size as u32;
    let model = Llama::new(config, dtype, &Device::Cpu).map_err(|e| format!("model: {e}"))?;
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i as u32 * 7919) % vocab)
        .collect();
    let x = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).map_err(|e| e.to_string())?;
    let scoring = match spec["pass"].as_str() {
        Some("plain") => false,
        Some("scoring") => true,
        other => return Err(format!("spec.pass {other:?}: use \"plain\" or \"scoring\"")),
    };
    let step = || -> Result<(), String> {
        if scoring {
            let mut imp = Importance::new(&model.config);
            imp.accumulate(&model, &x)
                .map_err(|e| format!("scoring pass: {e}"))?;
        } else {
            let logits = model.forward(&x).map_err(|e| format!("forward: {e}"))?;
            if logits.dims() != [batch, seq, model.config.vocab_size] {
                return Err(format!("logits {:?}", logits.dims()));
            }
        }
        Ok(())
    };
    step()?; // warm-up
    let info = json!({
        "threads": candle_core::utils::get_num_threads(),
        "dtype": spec["dtype"],
        "DISTILLERY_FUSED": std::env::var("DISTILLERY_FUSED").ok(),
        "DISTILLERY_BF16_GEMM": std::env::var("DISTILLERY_BF16_GEMM").ok(),
    });
    harness::serve(info, step)
}
