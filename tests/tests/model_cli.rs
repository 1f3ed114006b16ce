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
