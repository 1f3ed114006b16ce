//! Memory benchmark (not a test): peak resident memory per rank of a 2-rank distillation (two
//! processes, a TCP ring on loopback) with SmolLM2-135M's shape as the teacher and the 70%
//! student the parameter-budget search picks (random weights), beside what the memory plan
//! (`distillery_proto::memplan`, the accounting `coordinator plan` prints) predicts for the same
//! setup, for f32 and bf16, with and without `shard_optimizer`.
//!
//! `cargo bench -p distillery-worker --bench memory` (env BENCH_SEQ = 256, BENCH_MICRO = 1,
//! BENCH_STEPS = 3, BENCH_CONFIGS = "f32,f32+shard,bf16,bf16+shard"; each config: teacher and
//! student in that precision, `+shard` sets `shard_optimizer`, `+recompute` sets `recompute`).
//! Each rank is this executable run again with `MEMBENCH_RANK` set; it reports VmHWM (the peak
//! resident set, `/proc/self/status`) after its steps, and VmHWM before it built any model (the
//! process baseline the plan's CPU runtime constant stands for). Linux only.

use std::alloc::{GlobalAlloc, Layout};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::Device;
use distillery_proto::memplan::{self, gib, DeviceKind, Setup};
use distillery_proto::v1::ModelShape;
use distillery_worker::collective::ring::{bind, Ring};
use distillery_worker::distill::data::Domain;
use distillery_worker::distill::train::{Precision, PrecisionDType, TrainConfig, Trainer};
use distillery_worker::model::{Llama, LlamaConfig};
use distillery_worker::prune::plan::{choose_shape, shape_of, Target};

mod common;
use common::env_usize;

/// mimalloc (as the worker uses it) counting the bytes live on the heap, so a rank can report
/// its peak heap beside its peak resident set (the difference is what the allocator keeps).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK_LIVE.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call forwards to mimalloc with the caller's layout; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { mimalloc::MiMalloc.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const WORLD: usize = 2;

/// One configuration of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Config {
    precision: Precision,
    shard: bool,
    recompute: bool,
}

impl Config {
    fn parse(s: &str) -> Result<Config, String> {
        let mut parts = s.trim().split('+');
        let precision = Precision::parse(parts.next().unwrap_or(""))?;
        let mut c = Config {
            precision,
            shard: false,
            recompute: false,
        };
        for p in parts {
            match p {
                "shard" => c.shard = true,
                "recompute" => c.recompute = true,
                other => return Err(format!("{other:?}: use +shard or +recompute")),
            }
        }
        Ok(c)
    }

    fn name(&self) -> String {
        let mut n = self.precision.name().to_string();
        if self.shard {
            n.push_str("+shard");
        }
        if self.recompute {
            n.push_str("+recompute");
        }
        n
    }
}

fn teacher_json() -> serde_json::Value {
    serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192,
    })
}

/// Teacher and student configs and shapes (the student as `benches/distill.rs` picks it).
fn models() -> (LlamaConfig, ModelShape, LlamaConfig, ModelShape) {
    let tj = teacher_json();
    let tc = LlamaConfig::from_json(&tj.to_string()).expect("teacher config");
    let src = shape_of(&tc);
    let s = choose_shape(
        &src,
        &Target {
            params: Some(0.7),
            ..Default::default()
        },
    )
    .expect("70% shape");
    let mut sj = tj.clone();
    sj["hidden_size"] = s.hidden_size.into();
    sj["intermediate_size"] = s.intermediate_size.into();
    sj["num_attention_heads"] = s.num_attention_heads.into();
    sj["num_hidden_layers"] = s.num_layers.into();
    let sc = LlamaConfig::from_json(&sj.to_string()).expect("student config");
    let ss = shape_of(&sc);
    (tc, src, sc, ss)
}

/// `VmHWM` (peak resident set) of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A rank: builds the models, joins the ring, runs the steps, prints one JSON line.
fn rank_main(rank: usize) {
    let baseline = peak_rss();
    let heap_before = LIVE.load(Ordering::Relaxed);
    let cfg = Config::parse(&std::env::var("MEMBENCH_CONFIG").unwrap_or_default())
        .expect("MEMBENCH_CONFIG");
    let addrs: Vec<SocketAddr> = std::env::var("MEMBENCH_ADDRS")
        .unwrap_or_default()
        .split(',')
        .map(|a| a.parse().expect("MEMBENCH_ADDRS"))
        .collect();
    let seq = env_usize("BENCH_SEQ", 256);
    let micro = env_usize("BENCH_MICRO", 1);
    let steps = env_usize("BENCH_STEPS", 3);
    let listener = TcpListener::bind(addrs[rank]).expect("bind the rank's address");
    let (tc, _, sc, _) = models();
    let dtype = cfg.precision.dtype();
    let teacher = Llama::new(tc, dtype, &Device::Cpu).expect("teacher");
    let student = Llama::new(sc, dtype, &Device::Cpu).expect("student");
    let mut ring = Ring::connect(
        rank,
        listener,
        &addrs,
        Duration::from_secs(60),
        Duration::from_secs(600),
    )
    .expect("ring");
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
    let tcfg = TrainConfig {
        seq_len: seq,
        micro_batch: micro,
        global_batch: micro * WORLD,
        total_steps: 1000,
        lr: 1e-4,
        warmup_steps: 0,
        temperature: 1.0,
        ce_weight: 0.0,
        seed: 1,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: cfg.precision,
        shard_optimizer: cfg.shard,
        recompute: cfg.recompute,
        objective: Default::default(),
    };
    let mut t = Trainer::new(
        student,
        Some(&teacher),
        tcfg,
        &mut ring,
        domains,
        &[1.0],
        vec![],
    )
    .expect("trainer");
    let mut loss = f64::NAN;
    let after_models = LIVE.load(Ordering::Relaxed);
    for _ in 0..steps {
        loss = t.train_step().expect("step").loss;
    }
    println!(
        "{}",
        serde_json::json!({
            "rank": rank, "baseline": baseline, "peak": peak_rss(), "loss": loss,
            "heap_before": heap_before, "heap_models": after_models,
            "heap_peak": PEAK_LIVE.load(Ordering::Relaxed),
        })
    );
}

fn plan_for(cfg: Config, teacher: ModelShape, student: ModelShape) -> memplan::MemoryPlan {
    let p = cfg.precision;
    memplan::plan(&Setup {
        teacher,
        student,
        world_size: WORLD as u32,
        micro_batch: env_usize("BENCH_MICRO", 1) as u32,
        seq_len: env_usize("BENCH_SEQ", 256) as u32,
        precision: p,
        teacher_precision: p,
        shard_optimizer: cfg.shard,
        recompute: cfg.recompute,
        temperature_is_one: true,
        device: DeviceKind::Cpu,
        kd: Default::default(),
    })
}

/// `BENCH_PHASES=1`: one process, one micro-batch by hand (the trainer's step without the
/// optimizer), printing the heap that each phase adds beside the plan's line for it, so the
/// plan's tensor counts can be checked one by one.
fn phases(cfg: Config) {
    use candle_core::Tensor;
    use distillery_worker::distill::loss::kd_loss;
    let (tc, ts, sc, ss) = models();
    let plan = plan_for(cfg, ts, ss);
    let dtype = cfg.precision.dtype();
    let teacher = Llama::new(tc, dtype, &Device::Cpu).expect("teacher");
    let student = Llama::new(sc, dtype, &Device::Cpu).expect("student");
    let (seq, micro) = (env_usize("BENCH_SEQ", 256), env_usize("BENCH_MICRO", 1));
    let rows: Vec<Vec<u32>> = (0..micro as u32)
        .map(|i| {
            (0..seq as u32)
                .map(|j| (i * 7919 + j * 104_729) % 49152)
                .collect()
        })
        .collect();
    let ids = Tensor::new(rows.clone(), &Device::Cpu).expect("ids");
    let targets = Tensor::new(rows, &Device::Cpu).expect("targets");
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mark = || {
        let now = LIVE.load(Ordering::Relaxed);
        PEAK_LIVE.store(now, Ordering::Relaxed);
        now
    };
    let peak = || PEAK_LIVE.load(Ordering::Relaxed);
    let m0 = mark();
    let logits = student.forward_train(&ids).expect("student forward");
    let after_fwd = LIVE.load(Ordering::Relaxed);
    let m1 = mark();
    let tl = teacher.forward(&ids).expect("teacher forward");
    let teacher_peak = peak();
    let l = kd_loss(&logits, &tl, &targets, 1.0, 0.0).expect("loss");
    let loss_peak = peak();
    drop(tl);
    let after_loss = LIVE.load(Ordering::Relaxed);
    let m2 = mark();
    let g = l.total.backward().expect("backward");
    let bw_peak = peak();
    let after_bw = LIVE.load(Ordering::Relaxed);
    println!("{}: phases of one micro-batch (heap MiB above what was live before the phase; plan line in brackets)", cfg.name());
    println!(
        "  student forward (activations + logits)  {:>8.1}  [activations {:.1} + logits {:.1}]",
        mib(after_fwd - m0),
        mib(plan.activations as usize),
        mib((micro * seq * 49152) * cfg.precision.dtype().size_in_bytes())
    );
    println!(
        "  teacher forward + loss, peak            {:>8.1}  [teacher fwd {:.1}; loss {:.1} minus logits]",
        mib(teacher_peak.max(loss_peak) - m1),
        mib(plan.teacher_forward as usize),
        mib(plan.loss as usize)
    );
    println!(
        "  loss tensors held for the backward      {:>8.1}",
        mib(after_loss - m1)
    );
    println!(
        "  backward, peak above forward + loss     {:>8.1}  [backward {:.1}]",
        mib(bw_peak - m2),
        mib(plan.backward as usize)
    );
    println!(
        "  gradient store after the backward       {:>8.1}  [student weights {:.1}]",
        mib(after_bw - m2),
        mib(plan.student_weights as usize)
    );
    drop(g);
}

fn main() {
    distillery_worker::tune_allocator();
    if std::env::var("BENCH_PHASES").is_ok_and(|v| v == "1") {
        for c in std::env::var("BENCH_CONFIGS")
            .unwrap_or_else(|_| "f32".into())
            .split(',')
        {
            phases(Config::parse(c).unwrap_or_else(|e| panic!("BENCH_CONFIGS: {e}")));
        }
        return;
    }
    if let Ok(r) = std::env::var("MEMBENCH_RANK") {
        rank_main(r.parse().expect("MEMBENCH_RANK"));
        return;
    }
    let configs: Vec<Config> = std::env::var("BENCH_CONFIGS")
        .unwrap_or_else(|_| "f32,f32+shard,bf16,bf16+shard".into())
        .split(',')
        .map(|c| Config::parse(c).unwrap_or_else(|e| panic!("BENCH_CONFIGS: {e}")))
        .collect();
    let (_, ts, _, ss) = models();
    let (seq, micro) = (env_usize("BENCH_SEQ", 256), env_usize("BENCH_MICRO", 1));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    #[cfg(target_arch = "x86_64")]
    let flags = [
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| *n)
    .collect::<Vec<_>>()
    .join("+");
    #[cfg(not(target_arch = "x86_64"))]
    let flags = String::from("-");
    println!(
        "machine: {cpu} ({flags}), {} threads; {WORLD} rank processes (TCP ring on loopback); micro_batch x seq_len {micro} x {seq}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "teacher {} params (SmolLM2-135M shape), student {} params (hidden {}, MLP {}, {} heads, {} layers)",
        ts.params, ss.params, ss.hidden_size, ss.intermediate_size, ss.num_attention_heads, ss.num_layers
    );
    let exe = std::env::current_exe().expect("own path");
    for cfg in configs {
        let listeners: Vec<TcpListener> = (0..WORLD)
            .map(|_| bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("bind"))
            .collect();
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        drop(listeners);
        let children: Vec<_> = (0..WORLD)
            .map(|r| {
                Command::new(&exe)
                    .env("MEMBENCH_RANK", r.to_string())
                    .env("MEMBENCH_CONFIG", cfg.name())
                    .env("MEMBENCH_ADDRS", addrs.join(","))
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn a rank")
            })
            .collect();
        let plan = plan_for(cfg, ts, ss);
        println!(
            "{}: plan per rank: teacher {} + student {} + gradients {} + master/moments {} + activations {} + loss {} + max(teacher fwd {}, backward {}) + runtime {} = {}",
            cfg.name(),
            gib(plan.teacher_weights),
            gib(plan.student_weights),
            gib(plan.gradients),
            gib(plan.optimizer),
            gib(plan.activations),
            gib(plan.loss),
            gib(plan.teacher_forward),
            gib(plan.backward),
            gib(plan.runtime),
            gib(plan.total)
        );
        for child in children {
            let out = child.wait_with_output().expect("rank");
            if !out.status.success() {
                println!("  a rank failed: {}", out.status);
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rank JSON");
            let peak = v["peak"].as_u64().unwrap_or(0);
            let base = v["baseline"].as_u64().unwrap_or(0);
            let heap = v["heap_peak"].as_u64().unwrap_or(0);
            println!(
                "  rank {}: measured peak RSS {} (process baseline {} MiB), peak heap {} (models {}); plan {}, plan / RSS {:.3}, plan / heap {:.3}; loss after the steps {:.4}",
                v["rank"],
                gib(peak),
                base >> 20,
                gib(heap),
                gib(v["heap_models"].as_u64().unwrap_or(0)),
                gib(plan.total),
                plan.total as f64 / peak.max(1) as f64,
                plan.total as f64 / heap.max(1) as f64,
                v["loss"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}
