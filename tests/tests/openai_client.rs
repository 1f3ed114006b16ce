//! The official `openai` Python client against a real `worker serve` on a loopback port: chat
//! (plain and streamed, which add up to the same answer at temperature 0), completions, logprobs,
//! stop, seeds, the models list with an alias, and the client's own exceptions for refusals.
//! Needs the tests' Python (`.ci/run` installs `openai` into `.venv-parity`); skipped with a
//! reason where there is none, never on CI.

use distillery_tests::python::{python_or_skip, python_script};
use distillery_tests::{bin, ServeProc};

#[test]
fn the_official_openai_client_works_against_worker_serve() {
    let Some(py) = python_or_skip("the_official_openai_client_works_against_worker_serve") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let out = std::process::Command::new(bin("worker"))
        .args(["make-test-model", "--seed", "11", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = ServeProc::start(&model, &["--name", "tiny", "--served-model-name", "alias"]);
    let run = std::process::Command::new(py)
        .arg(python_script("openai_client.py"))
        .args([server.base().as_str(), "tiny", "alias"])
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "openai_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let n: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("openai client: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 30, "only {n} checks ran: {stdout}");
}
