//! `worker make-test-model` and `worker convert` through the real binary.

use candle_core::{DType, Device, Tensor};
use distillery_tests::bin;
use distillery_worker::model::io::load_dir;
use distillery_worker::model::max_abs_diff;

#[test]
fn a_gguf_test_model_converts_back_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let gguf = dir.path().join("m.gguf");
    let out = std::process::Command::new(bin("worker"))
        .args(["make-test-model", "--tied", "--seed", "5", "--out"])
        .arg(&hf)
        .arg("--gguf")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = dir.path().join("back");
    let out = std::process::Command::new(bin("worker"))
        .arg("convert")
        .arg(&gguf)
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = load_dir(&hf, DType::F32, &Device::Cpu).unwrap();
    let b = load_dir(&back, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 100, 200, 256, 7]], &Device::Cpu).unwrap();
    let d = max_abs_diff(&a.forward(&ids).unwrap(), &b.forward(&ids).unwrap()).unwrap();
    assert_eq!(d, 0.0);
    assert!(back.join("tokenizer.json").is_file());
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "</s>");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    // Bad input: one line, exit 2.
    let out = std::process::Command::new(bin("worker"))
        .args(["convert", "/nonexistent.gguf", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

/// `worker eval`: the same model as teacher gives KL 0 and the perplexity the library computes;
/// another model gives a positive KL; a GGUF file or a missing teacher is one line, exit 2.
#[test]
fn worker_eval_measures_perplexity_and_the_kl_to_a_teacher() {
    use distillery_worker::model::{perplexity, tokenizer};
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, seed: &str| {
        let p = dir.path().join(name);
        let out = std::process::Command::new(bin("worker"))
            .args(["make-test-model", "--seed", seed, "--out"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    };
    let (a, b) = (make("a", "1"), make("b", "2"));
    let data = dir.path().join("val.jsonl");
    let docs = [
        "The quick brown fox jumps over the lazy dog.",
        "A second document, longer than the first one by a little.",
    ];
    std::fs::write(
        &data,
        docs.iter()
            .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let eval = |model: &std::path::Path, teacher: &std::path::Path| {
        let out = std::process::Command::new(bin("worker"))
            .arg("eval")
            .arg("--model")
            .arg(model)
            .arg("--teacher")
            .arg(teacher)
            .arg("--data")
            .arg(&data)
            .args(["--seq-len", "16"])
            .output()
            .unwrap();
        (
            out.status.code(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, v, err) = eval(&a, &a);
    assert_eq!(code, Some(0), "{err}");
    let v = v.unwrap();
    assert!(v["kd_loss"].as_f64().unwrap().abs() < 1e-6, "{v}");
    // The perplexity is the library's over the same tokens (documents + EOS, half-window stride).
    let m = load_dir(&a, DType::F32, &Device::Cpu).unwrap();
    let tok = tokenizer::load(&a.join("tokenizer.json")).unwrap();
    let eos = distillery_worker::tasks::common::eos_id(&m);
    let mut ids = Vec::new();
    let mut bytes = 0;
    for d in docs {
        ids.extend(tokenizer::encode(&tok, d, false).unwrap());
        ids.extend(eos);
        bytes += d.len() + 1;
    }
    let p = perplexity::perplexity(&m, &ids, bytes, 16, 8).unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - p.perplexity()).abs() < 1e-9 * p.perplexity());
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, p.tokens);
    let (code, v, err) = eval(&a, &b);
    assert_eq!(code, Some(0), "{err}");
    assert!(v.unwrap()["kd_loss"].as_f64().unwrap() > 1e-3);
    let (code, _, err) = eval(&a, &dir.path().join("missing"));
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with("worker: eval: ") && err.contains("missing") && err.lines().count() == 1,
        "{err}"
    );
}
