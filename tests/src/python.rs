//! The Python side of the tests: finding the interpreter (`.venv-parity`, made by `.ci/run`,
//! or `DISTILLERY_PYTHON`), running the scripts in `tests/python/` with JSON in and out, and
//! transformers' logits.

use std::path::PathBuf;

pub use crate::{python, python_or_skip};

/// A script under `tests/python/`.
pub fn python_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Largest |a - b| over two logit vectors.
pub fn max_abs_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// What transformers computed for one model directory.
pub struct HfResult {
    pub logits: Vec<f32>,
    pub shape: Vec<usize>,
    /// Each row's greedy continuation, when asked for.
    pub generated: Vec<Vec<u32>>,
}

/// Runs a python script with a JSON document on stdin and returns its JSON stdout.
pub fn python_json(py: &PathBuf, script: &str, input: serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let mut child = std::process::Command::new(py)
        .arg(&script)
        .arg("--batch")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

/// transformers' logits (and, with `new_tokens` > 0, greedy continuations) for each
/// `(dir, ids, new_tokens)`, in one python process; asserts each loaded without missing or
/// unexpected weights and without warnings about them.
pub fn hf_batch(py: &PathBuf, jobs: &[(PathBuf, Vec<Vec<u32>>, usize)]) -> Vec<HfResult> {
    let input: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(d, ids, n)| serde_json::json!({"dir": d, "ids": ids, "new_tokens": n}))
        .collect();
    let out = python_json(py, "hf_logits.py", serde_json::json!(input));
    let results = out.as_array().expect("a list of results").clone();
    assert_eq!(results.len(), jobs.len());
    results
        .into_iter()
        .zip(jobs)
        .map(|(v, (dir, _, _))| {
            assert_eq!(
                v["missing"],
                serde_json::json!([]),
                "transformers found weights missing in {}",
                dir.display()
            );
            assert_eq!(
                v["unexpected"],
                serde_json::json!([]),
                "transformers found unexpected weights in {}",
                dir.display()
            );
            let warnings: Vec<String> = serde_json::from_value(v["warnings"].clone()).unwrap();
            let relevant: Vec<&String> = warnings
                .iter()
                .filter(|w| {
                    w.contains("not initialized")
                        || w.contains("not used")
                        || w.contains("newly initialized")
                })
                .collect();
            assert!(
                relevant.is_empty(),
                "{}: loading warned: {relevant:?}",
                dir.display()
            );
            HfResult {
                logits: serde_json::from_value(v["logits"].clone()).unwrap(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                generated: serde_json::from_value(v["generated"].clone()).unwrap(),
            }
        })
        .collect()
}
