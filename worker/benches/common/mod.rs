//! What the worker benchmarks share: knobs from the environment, the PyTorch baseline's Python,
//! the machine (CPU model, flags, FMA-loop peak), the model shapes and their FLOP counts, and
//! the harness that runs each side in its own process in alternating rounds.

#![allow(dead_code)] // each bench uses what it needs

pub mod harness;
pub mod machine;
pub mod shapes;

use std::path::PathBuf;

/// A numeric knob from the environment, or its default; a value that does not parse stops
/// the bench with a message naming the knob (a silently ignored knob would mislabel a run).
pub fn env_usize(k: &str, d: usize) -> usize {
    match std::env::var(k) {
        Err(_) => d,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("{k}={v:?}: must be a whole number (default {d})");
            std::process::exit(2)
        }),
    }
}

/// A comma-separated list from the environment, or `d` when unset (set but empty = none).
pub fn env_list(k: &str, d: &[&str]) -> Vec<String> {
    match std::env::var(k) {
        Err(_) => d.iter().map(|s| s.to_string()).collect(),
        Ok(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    }
}

/// `--quick` on the command line (`cargo bench ... -- --quick`) or `BENCH_QUICK=1`.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
        || std::env::var("BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// The Python with torch + transformers: `DISTILLERY_PYTHON`, else the `.venv-parity` that
/// `.ci/run` creates; `None` skips the PyTorch baseline.
pub fn python() -> Option<PathBuf> {
    std::env::var("DISTILLERY_PYTHON")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-parity/bin/python");
            p.exists().then_some(p)
        })
}

/// A script under `tests/python/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(name)
}
