//! Matrix-multiply benchmark (not a test): the machine's peak (register-only FMA and
//! `vdpbf16ps` loops), then `y = x · Wᵀ` on SmolLM2-135M's shapes for candle f32 (with
//! `gemm`'s x86-v4 kernels as built, and without when a second binary is given), candle bf16,
//! our bf16 kernel on every path this CPU has, and PyTorch f32 / bf16 (`F.linear`), in
//! alternating rounds, in GFLOP/s and % of the measured peak.
//!
//! `cargo bench -p distillery-worker --bench gemm` (env: BENCH_ROUNDS = 3, BENCH_TARGET_MS = 300
//! per measurement, BENCH_M = "256,1024", BENCH_SCALAR = 0 (1: the scalar path on every shape);
//! PyTorch needs DISTILLERY_PYTHON or the `.venv-parity`; BENCH_NO_X86V4_BIN = a copy of this
//! bench built with `--no-default-features`, for candle f32 without `gemm`'s AVX-512 kernels).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use common::{env_usize, python};
use distillery_worker::model::ops::gemm::{self, Isa};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// SmolLM2-135M's (K, N): q/o, k/v, gate/up, down, lm_head.
const KN: [(usize, usize); 5] = [
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (576, 49152),
];

const TORCH: &str = r#"
import sys, time, json, torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
shapes = json.loads(sys.argv[2]); target = float(sys.argv[3])
torch.manual_seed(0)
for m, k, n in shapes:
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(m, k).to(dt); w = torch.randn(n, k).to(dt)
        with torch.inference_mode():
            F.linear(x, w)
            t0 = time.perf_counter(); F.linear(x, w); one = time.perf_counter() - t0
            reps = max(1, min(1000, int(target / max(one, 1e-9))))
            t0 = time.perf_counter()
            for _ in range(reps):
                F.linear(x, w)
            t = (time.perf_counter() - t0) / reps
        print(f"{m} {k} {n} {name} {t}", flush=True)
"#;

fn main() {
    distillery_worker::tune_allocator();
    let threads = candle_core::utils::get_num_threads();
    let target = env_usize("BENCH_TARGET_MS", 300) as f64 / 1000.0;
    let ms: Vec<usize> = std::env::var("BENCH_M")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let shapes: Vec<(usize, usize, usize)> = ms
        .iter()
        .flat_map(|&m| KN.iter().map(move |&(k, n)| (m, k, n)))
        .collect();

    // The other binary's mode: candle f32 only, one line per shape.
    if std::env::var("BENCH_F32_ONLY").is_ok_and(|v| v == "1") {
        for &(m, k, n) in &shapes {
            let (x, w) = operands(m, k, n, DType::F32);
            let t = time(target, || {
                x.broadcast_matmul(&w.t().expect("t")).expect("matmul");
            });
            println!("{m} {k} {n} f32 {t}");
        }
        return;
    }

    let rounds = env_usize("BENCH_ROUNDS", 3);
    let scalar_all = env_usize("BENCH_SCALAR", 0) == 1;
    println!("cpu: {}", cpu_model());
    println!("flags: {}", cpu_flags());
    println!(
        "threads: {threads}; gemm x86-v4 (AVX-512) for candle f32: {}; our best path: {:?}",
        if cfg!(feature = "gemm-avx512") {
            "on"
        } else {
            "off"
        },
        Isa::best()
    );
    let peak = Peak::measure(threads);
    println!(
        "peak ({threads} threads, register-only loops): f32 FMA {:.1} GFLOP/s ({}), bf16 {:.1} GFLOP/s ({})",
        peak.f32,
        peak.f32_what,
        peak.bf16,
        peak.bf16_what
    );

    let py = python();
    let no_v4 = std::env::var("BENCH_NO_X86V4_BIN").ok().map(PathBuf::from);
    if py.is_none() {
        println!("PyTorch baseline skipped: set DISTILLERY_PYTHON to a python with torch");
    }

    // Rows: (label, per-shape best seconds).
    let paths: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    for isa in Isa::ALL.into_iter().filter(|i| !i.available()) {
        println!("ours bf16 {isa:?}: not available on this CPU");
    }
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        ("candle f32".into(), vec![f64::INFINITY; shapes.len()]),
        ("candle bf16".into(), vec![f64::INFINITY; shapes.len()]),
    ];
    for isa in &paths {
        rows.push((
            format!("ours bf16 {isa:?}"),
            vec![f64::INFINITY; shapes.len()],
        ));
    }
    let r_no_v4 = rows.len();
    if no_v4.is_some() {
        rows.push((
            "candle f32, no x86-v4".into(),
            vec![f64::INFINITY; shapes.len()],
        ));
    }
    let r_torch = rows.len();
    if py.is_some() {
        rows.push(("PyTorch f32".into(), vec![f64::INFINITY; shapes.len()]));
        rows.push(("PyTorch bf16".into(), vec![f64::INFINITY; shapes.len()]));
    }

    for round in 0..rounds {
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            let (x, w) = operands(m, k, n, DType::F32);
            let t = time(target, || {
                x.broadcast_matmul(&w.t().expect("t")).expect("matmul");
            });
            best(&mut rows[0].1[s], t);
            let (x, w) = (
                x.to_dtype(DType::BF16).expect("bf16"),
                w.to_dtype(DType::BF16).expect("bf16"),
            );
            gemm::set_enabled(false);
            let t = time(target, || {
                gemm::linear(&x, &w).expect("candle bf16");
            });
            gemm::set_enabled(true);
            best(&mut rows[1].1[s], t);
            for (p, isa) in paths.iter().enumerate() {
                if *isa == Isa::Scalar && !scalar_all && m * k * n > 1 << 28 {
                    continue;
                }
                let t = time(target, || {
                    gemm::matmul_wt(&x, &w, DType::BF16, *isa).expect("ours");
                });
                best(&mut rows[2 + p].1[s], t);
            }
        }
        if let Some(bin) = &no_v4 {
            for (s, _, t) in external(bin, &shapes, |c| {
                c.env("BENCH_F32_ONLY", "1")
                    .env("BENCH_TARGET_MS", format!("{}", (target * 1000.0) as usize))
                    .env("BENCH_M", ms_arg(&ms))
            }) {
                best(&mut rows[r_no_v4].1[s], t);
            }
        }
        if let Some(py) = &py {
            let js = serde_json::to_string(&shapes).expect("json");
            for (s, bf16, t) in external(py, &shapes, |c| {
                c.arg("-c")
                    .arg(TORCH)
                    .arg(threads.to_string())
                    .arg(&js)
                    .arg(target.to_string())
            }) {
                best(&mut rows[r_torch + usize::from(bf16)].1[s], t);
            }
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!(
        "\nGFLOP/s (2·M·K·N / best-of-{rounds} time; % of the f32 peak for f32 rows, of the bf16 peak for bf16 rows)"
    );
    print!("{:<26}", "path");
    for &(m, k, n) in &shapes {
        print!(" {:>17}", format!("{m}x{k}->{n}"));
    }
    println!();
    for (label, ts) in &rows {
        let pk = if label.contains("f32") {
            peak.f32
        } else {
            peak.bf16
        };
        print!("{label:<26}");
        for (&(m, k, n), &t) in shapes.iter().zip(ts) {
            if t.is_finite() {
                let g = 2.0 * (m * k * n) as f64 / t / 1e9;
                print!(" {:>17}", format!("{g:.0} ({:.0}%)", 100.0 * g / pk));
            } else {
                print!(" {:>17}", "skipped");
            }
        }
        println!();
    }
    if no_v4.is_some() {
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            println!(
                "ratio candle f32 with / without gemm x86-v4 {m}x{k}->{n}: {:.2}x",
                rows[r_no_v4].1[s] / rows[0].1[s]
            );
        }
    }
    let ours = 2 + paths.iter().position(|i| *i == Isa::best()).unwrap_or(0);
    for (s, &(m, k, n)) in shapes.iter().enumerate() {
        println!(
            "ratio distillery / candle bf16 matmul {m}x{k}->{n}: {:.2}x",
            rows[1].1[s] / rows[ours].1[s]
        );
    }
    if py.is_some() {
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            println!(
                "ratio distillery / PyTorch bf16 matmul {m}x{k}->{n}: {:.2}x",
                rows[r_torch + 1].1[s] / rows[ours].1[s]
            );
        }
    }
}

fn ms_arg(ms: &[usize]) -> String {
    ms.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn best(slot: &mut f64, t: f64) {
    *slot = slot.min(t);
}

/// `x [m, k]` and `w [n, k]` of N(0, 1) values in `dtype`.
fn operands(m: usize, k: usize, n: usize, dtype: DType) -> (Tensor, Tensor) {
    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).expect("x");
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("w");
    (
        x.to_dtype(dtype).expect("dtype"),
        w.to_dtype(dtype).expect("dtype"),
    )
}

/// Mean seconds per call over about `target` seconds, after one warm-up call.
fn time(target: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let one = t0.elapsed().as_secs_f64();
    let reps = ((target / one.max(1e-9)) as usize).clamp(1, 1000);
    let t0 = Instant::now();
    for _ in 0..reps {
        f();
    }
    t0.elapsed().as_secs_f64() / reps as f64
}

/// Runs another process that prints `m k n dtype seconds` lines; returns (shape index, whether
/// bf16, seconds).
fn external(
    prog: &Path,
    shapes: &[(usize, usize, usize)],
    args: impl FnOnce(&mut Command) -> &mut Command,
) -> Vec<(usize, bool, f64)> {
    let mut c = Command::new(prog);
    let out = match args(&mut c).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "{} failed: {}",
                prog.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            return Vec::new();
        }
        Err(e) => {
            eprintln!("{} did not start: {e}", prog.display());
            return Vec::new();
        }
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [m, k, n, d, t] = f[..] else { return None };
            let key = (m.parse().ok()?, k.parse().ok()?, n.parse().ok()?);
            let s = shapes.iter().position(|x| *x == key)?;
            Some((s, d == "bf16", t.parse().ok()?))
        })
        .collect()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_flags() -> String {
    let s = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = s
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("");
    let mut v: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| f.starts_with("avx") || f.starts_with("amx") || *f == "fma" || *f == "f16c")
        .collect();
    v.sort_unstable();
    v.join(" ")
}

/// The machine's peak in GFLOP/s from register-only loops on `threads` threads.
struct Peak {
    f32: f64,
    f32_what: &'static str,
    bf16: f64,
    bf16_what: &'static str,
}

impl Peak {
    fn measure(threads: usize) -> Peak {
        // Best of many short trials: on a shared machine a long loop measures the scheduler.
        let iters = env_usize("BENCH_PEAK_ITERS", 4_000_000);
        let trials = env_usize("BENCH_PEAK_TRIALS", 30);
        let run = |f: fn(usize) -> f64| -> f64 {
            f(iters); // warm-up (clock ramp)
            (0..trials)
                .map(|_| {
                    let t0 = Instant::now();
                    let flops: f64 = std::thread::scope(|s| {
                        let hs: Vec<_> = (0..threads).map(|_| s.spawn(move || f(iters))).collect();
                        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
                    });
                    flops / t0.elapsed().as_secs_f64() / 1e9
                })
                .fold(0.0, f64::max)
        };
        let mut p = Peak {
            f32: f64::NAN,
            f32_what: "none",
            bf16: f64::NAN,
            bf16_what: "none",
        };
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                p.f32 = run(peak::fma512);
                p.f32_what = "vfmadd231ps zmm";
            } else if std::arch::is_x86_feature_detected!("fma") {
                p.f32 = run(peak::fma256);
                p.f32_what = "vfmadd231ps ymm";
            }
            if Isa::Amx.available() {
                // The fastest bf16 unit: AMX tiles, 4 tdpbf16ps a round on registers only.
                p.bf16 = run(|n| gemm::amx_peak_loop(n as u64 / 16).unwrap_or(0.0));
                p.bf16_what = "AMX tdpbf16ps tiles";
            } else if std::arch::is_x86_feature_detected!("avx512bf16") {
                p.bf16 = run(peak::dpbf16);
                p.bf16_what = "vdpbf16ps zmm";
            } else {
                p.bf16 = p.f32;
                p.bf16_what = "no bf16 instructions: the f32 peak";
            }
        }
        p
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::asm;

    /// `iters` rounds of 16 independent `$op zmm/ymm i, 16, 17` on registers only (16 chains:
    /// more than latency × issue width on any current x86 core). Zeros in, zeros out: x86 FP
    /// units take the same time for any operand.
    macro_rules! reg_loop {
        ($feat:literal, $op:literal, $r:literal, $iters:expr) => {{
            #[target_feature(enable = $feat)]
            fn inner(iters: usize) {
                // SAFETY: registers only, every one written is declared clobbered; the caller
                // checked the CPU features.
                unsafe {
                    asm!(
                        concat!("vxorps ", $r, "16, ", $r, "16, ", $r, "16"),
                        concat!("vxorps ", $r, "17, ", $r, "17, ", $r, "17"),
                        "2:",
                        concat!($op, " ", $r, "0, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "1, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "2, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "3, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "4, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "5, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "6, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "7, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "8, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "9, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "10, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "11, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "12, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "13, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "14, ", $r, "16, ", $r, "17"),
                        concat!($op, " ", $r, "15, ", $r, "16, ", $r, "17"),
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) iters.max(1) => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                        out("zmm16") _, out("zmm17") _,
                        options(nostack, nomem),
                    );
                }
            }
            // SAFETY: the caller checked the features.
            unsafe { inner($iters) }
        }};
    }

    pub fn fma512(iters: usize) -> f64 {
        reg_loop!("avx512f", "vfmadd231ps", "zmm", iters);
        (iters.max(1) * 16 * 32) as f64
    }

    pub fn fma256(iters: usize) -> f64 {
        // ymm16/17 need AVX-512VL; AVX2-only CPUs have ymm0..15, so use 14 chains there.
        #[target_feature(enable = "avx2,fma")]
        fn inner(iters: usize) {
            // SAFETY: registers only, all clobbered; the caller checked AVX2 + FMA.
            unsafe {
                asm!(
                    "vxorps ymm14, ymm14, ymm14",
                    "vxorps ymm15, ymm15, ymm15",
                    "2:",
                    "vfmadd231ps ymm0, ymm14, ymm15", "vfmadd231ps ymm1, ymm14, ymm15",
                    "vfmadd231ps ymm2, ymm14, ymm15", "vfmadd231ps ymm3, ymm14, ymm15",
                    "vfmadd231ps ymm4, ymm14, ymm15", "vfmadd231ps ymm5, ymm14, ymm15",
                    "vfmadd231ps ymm6, ymm14, ymm15", "vfmadd231ps ymm7, ymm14, ymm15",
                    "vfmadd231ps ymm8, ymm14, ymm15", "vfmadd231ps ymm9, ymm14, ymm15",
                    "vfmadd231ps ymm10, ymm14, ymm15", "vfmadd231ps ymm11, ymm14, ymm15",
                    "vfmadd231ps ymm12, ymm14, ymm15", "vfmadd231ps ymm13, ymm14, ymm15",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) iters.max(1) => _,
                    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                    out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                    options(nostack, nomem),
                );
            }
        }
        // SAFETY: the caller checked the features.
        unsafe { inner(iters) };
        (iters.max(1) * 14 * 16) as f64
    }

    pub fn dpbf16(iters: usize) -> f64 {
        reg_loop!("avx512f,avx512bf16", "vdpbf16ps", "zmm", iters);
        // 16 lanes × 2 products × (multiply + add).
        (iters.max(1) * 16 * 64) as f64
    }
}
