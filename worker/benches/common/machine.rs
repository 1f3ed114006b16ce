//! The machine a bench runs on: CPU model, the SIMD flags that decide which kernels run, and the
//! arithmetic peak of its cores measured with a register-only FMA loop (f32 `vfmadd` and bf16
//! `vdpbf16ps`), so a GFLOP/s figure can be read as a fraction of what the cores can do.

use std::time::Instant;

/// The CPU model as `/proc/cpuinfo` names it (or "unknown").
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The SIMD features detected at run time that our kernels, candle's `gemm` and oneDNN choose
/// between.
pub fn simd_flags() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::is_x86_feature_detected!($f) {
                    out.push($f);
                }
            )*};
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
        // AMX detection is unstable in std; the kernel's flag list says it.
        let amx = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("flags") && l.contains(" amx_bf16"))
        });
        if amx {
            out.push("amx_bf16");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            out.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("bf16") {
            out.push("bf16");
        }
    }
    out
}

/// Logical CPUs visible to this process.
pub fn logical_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Peak GFLOP/s of `threads` cores, best of three 0.3 s runs of an FMA loop with enough
/// independent accumulators to cover the FMA latency; `None` where the kernel cannot run.
pub struct Peak {
    pub f32: Option<f64>,
    pub bf16: Option<f64>,
    /// Which instruction each figure used.
    pub f32_kernel: &'static str,
    pub bf16_kernel: &'static str,
    /// AMX `tdpbf16ps` on tile registers, where the CPU and the OS allow it.
    pub amx: Option<f64>,
}

/// Measures the f32 and bf16 peaks on `threads` threads.
pub fn peak(threads: usize) -> Peak {
    let (f32_kernel, f32_loop) = fma::f32_loop();
    let (bf16_kernel, bf16_loop) = fma::bf16_loop();
    Peak {
        f32: f32_loop.map(|f| gflops(threads, f)),
        bf16: bf16_loop.map(|f| gflops(threads, f)),
        f32_kernel,
        bf16_kernel,
        amx: distillery_worker::model::ops::gemm::amx_peak_loop(1)
            .map(|_| gflops(threads, amx_loop)),
    }
}

fn amx_loop(iters: u64) -> (f64, f32) {
    (
        distillery_worker::model::ops::gemm::amx_peak_loop(iters).unwrap_or(0.0),
        0.0,
    )
}

/// `kernel(iters)` returns the FLOPs it did (and a value that keeps the loop alive).
type Kernel = fn(u64) -> (f64, f32);

fn gflops(threads: usize, kernel: Kernel) -> f64 {
    // Calibrate to ~0.3 s per run on one thread, then run on all threads at once.
    let start = Instant::now();
    let (flops, _) = kernel(1 << 20);
    let per_iter = start.elapsed().as_secs_f64() / f64::from(1u32 << 20);
    let iters = ((0.3 / per_iter.max(1e-12)) as u64).max(1 << 20);
    let _ = flops;
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        let total: f64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(move || kernel(iters)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    let (f, sink) = h.join().unwrap_or((0.0, 0.0));
                    std::hint::black_box(sink);
                    f
                })
                .sum()
        });
        best = best.max(total / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use super::Kernel;
    use std::arch::x86_64::*;

    /// Independent accumulator chains: more than latency x issue width of every x86 FMA unit
    /// we know of (Zen 4: 4 cycles x 2 pipes).
    const CHAINS: usize = 12;

    pub fn f32_loop() -> (&'static str, Option<Kernel>) {
        if is_x86_feature_detected!("avx512f") {
            ("avx512 vfmadd231ps zmm", Some(|n| unsafe { f32_avx512(n) }))
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            ("avx2 vfmadd231ps ymm", Some(|n| unsafe { f32_avx2(n) }))
        } else {
            ("none", None)
        }
    }

    pub fn bf16_loop() -> (&'static str, Option<Kernel>) {
        if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f") {
            (
                "avx512_bf16 vdpbf16ps zmm",
                Some(|n| unsafe { bf16_avx512(n) }),
            )
        } else {
            ("none (no avx512_bf16)", None)
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_avx512(iters: u64) -> (f64, f32) {
        // x <- a*x + b with a < 1 converges, so no value overflows or goes subnormal.
        let a = _mm512_set1_ps(0.999_99);
        let b = _mm512_set1_ps(1e-3);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(a, *x, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        (
            iters as f64 * (CHAINS * 16 * 2) as f64,
            _mm512_reduce_add_ps(s),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_avx2(iters: u64) -> (f64, f32) {
        let a = _mm256_set1_ps(0.999_99);
        let b = _mm256_set1_ps(1e-3);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(a, *x, b);
            }
        }
        let mut out = [0f32; 8];
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        (iters as f64 * (CHAINS * 8 * 2) as f64, out.iter().sum())
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn bf16_avx512(iters: u64) -> (f64, f32) {
        // Each vdpbf16ps: 16 lanes x 2 bf16 products x (mul + add).
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-4), _mm512_set1_ps(-1e-4));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.5));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        (
            iters as f64 * (CHAINS * 16 * 4) as f64,
            _mm512_reduce_add_ps(s),
        )
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod fma {
    use super::Kernel;
    pub fn f32_loop() -> (&'static str, Option<Kernel>) {
        ("none (not x86_64)", None)
    }
    pub fn bf16_loop() -> (&'static str, Option<Kernel>) {
        ("none (not x86_64)", None)
    }
}

/// Prints the machine block every bench starts with.
pub fn print_header(threads: usize, peak: &Peak) {
    println!("cpu: {} ({} logical CPUs)", cpu_model(), logical_cpus());
    println!("simd (run-time detected): {}", simd_flags().join(" "));
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |g| format!("{g:.0} GFLOP/s"));
    println!(
        "peak on {threads} threads (FMA loop, best of 3): f32 {} [{}], bf16 {} [{}]",
        show(peak.f32),
        peak.f32_kernel,
        show(peak.bf16),
        peak.bf16_kernel
    );
    if let Some(amx) = peak.amx {
        println!(
            "peak on {threads} threads (AMX tdpbf16ps loop, best of 3): bf16 {amx:.0} GFLOP/s"
        );
    }
    if let Some(load) = load_average() {
        let cpus = logical_cpus() as f64;
        let note = if load > cpus {
            " -- more runnable work than CPUs: every figure below is slowed by other processes \
             (the ratios, paired per round, less so)"
        } else {
            ""
        };
        println!("load average (1 min) at start: {load:.2} on {cpus} CPUs{note}");
    }
    println!(
        "OMP_WAIT_POLICY for PyTorch: {} (on an oversubscribed machine OpenMP's default spinning can \
         make 2 threads slower than 1; PASSIVE avoids it)",
        std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "unset (OpenMP default)".into())
    );
}

/// The 1-minute load average (Linux).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
