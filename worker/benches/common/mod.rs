//! What the worker benchmarks share: knobs from the environment, the PyTorch baseline's Python.

#![allow(dead_code)] // each bench uses what it needs

use std::path::PathBuf;

/// A numeric knob from the environment, or its default.
pub fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
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
