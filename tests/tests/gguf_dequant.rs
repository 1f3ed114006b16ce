//! Our GGUF reader and dequantization against llama.cpp's own Python package (gguf-py): files
//! written by its `GGUFWriter`, values from its `gguf.quants.dequantize`
//! (tests/python/gguf_reference.py). Needs the `.venv-parity` Python (`.ci/run` makes it); the
//! tests say why they skip without it, and fail on CI.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use distillery_proto::gguf::dequant::{dequantize, SUPPORTED};
use distillery_proto::gguf::{Array, GgmlType, GgufFile, Value};
use distillery_tests::python::{python_json, python_or_skip};
use distillery_worker::model::gguf::{load_gguf, write_gguf};
use distillery_worker::model::max_abs_diff;
use distillery_worker::model::test_model::{test_model, TestModelSpec};
use distillery_worker::model::tokenizer;

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Every supported type, on random raw blocks, dequantizes to exactly gguf-py's values. Exact
/// (bit for bit), not merely close: each value is computed with the same f32 operations in the
/// same order as gguf-py's numpy code (e.g. `(d * sc) * q - (dmin * m)`, no fused multiply-add),
/// and f16/bf16 widen exactly, so there is no rounding difference to allow for.
#[test]
fn every_type_dequantizes_bit_for_bit_like_gguf_py() {
    let Some(py) = python_or_skip("every_type_dequantizes_bit_for_bit_like_gguf_py") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    python_json(
        &py,
        "gguf_reference.py",
        serde_json::json!([{"job": "blocks", "out": dir.path()}]),
    );
    let f = GgufFile::open(&dir.path().join("blocks.gguf")).unwrap();
    // Metadata of every value type, as the reference writer writes it.
    for (key, want) in [
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-5)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-300)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-7)),
        ("t.u64", Value::U64(1 << 40)),
        ("t.i64", Value::I64(-9)),
        ("t.f32", Value::F32(0.5)),
        ("t.f64", Value::F64(0.25)),
        ("t.bool", Value::Bool(true)),
        ("t.str", Value::String("grüße".into())),
        ("t.ints", Value::Array(Array::I32(vec![1, 2, 3]))),
        (
            "t.strs",
            Value::Array(Array::String(vec!["a".into(), "bc".into()])),
        ),
        (
            "t.nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::I32(vec![3, 4, 5]),
            ])),
        ),
    ] {
        assert_eq!(f.get(key), Some(&want), "{key}");
    }
    let names: BTreeSet<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    let types: BTreeSet<String> = SUPPORTED.iter().map(|t| t.to_string()).collect();
    assert_eq!(names, types, "one tensor per supported type");
    for ty in SUPPORTED {
        let name = ty.to_string();
        let t = f.tensor(&name).unwrap();
        assert_eq!(t.ggml_type, *ty);
        let shape = t.shape();
        let block = ty.layout().unwrap().elements as usize;
        assert!(
            shape[0] >= 2 && shape[1] >= 2 * block,
            "{name}: {shape:?} has too few rows or blocks"
        );
        let ours = dequantize(t.ggml_type, &f.tensor_data(t).unwrap(), t.n_elements()).unwrap();
        let theirs = read_f32(&dir.path().join(format!("{name}.f32")));
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let differing = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let largest = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!(
            "{name}: {} values in {shape:?} (|x| up to {largest:e}), {differing} differ bitwise from gguf-py",
            ours.len()
        );
        assert!(ours.iter().all(|x| x.is_finite()), "{name}");
        assert_eq!(differing, 0, "{name}: values differ from gguf-py");
    }
}

/// A tiny Llama whose tensors use every supported type at once loads to the same weights and
/// logits as the file with each tensor replaced by gguf-py's dequantization.
#[test]
fn a_model_mixing_every_type_loads_like_the_reference_dequantization() {
    let Some(py) =
        python_or_skip("a_model_mixing_every_type_loads_like_the_reference_dequantization")
    else {
        return;
    };
    // Rows of 256 or 512 everywhere, so the 256-element K-quant and IQ4_XS blocks fit.
    let spec = TestModelSpec {
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        tie_word_embeddings: false,
        seed: 5,
        ..Default::default()
    };
    // (HF name part, type); candle writes its types, gguf-py requantizes the IQ4 ones.
    let plan: &[(&str, &str)] = &[
        ("layers.0.self_attn.q_proj", "Q2_K"),
        ("layers.0.self_attn.k_proj", "Q3_K"),
        ("layers.0.self_attn.v_proj", "Q4_K"),
        ("layers.0.self_attn.o_proj", "Q5_K"),
        ("layers.0.mlp.gate_proj", "Q6_K"),
        ("layers.0.mlp.up_proj", "IQ4_NL"),
        ("layers.0.mlp.down_proj", "IQ4_XS"),
        ("layers.1.self_attn.q_proj", "Q4_0"),
        ("layers.1.self_attn.k_proj", "Q4_1"),
        ("layers.1.self_attn.v_proj", "Q5_0"),
        ("layers.1.self_attn.o_proj", "Q5_1"),
        ("layers.1.mlp.gate_proj", "Q8_0"),
        ("layers.1.mlp.up_proj", "BF16"),
        ("layers.1.mlp.down_proj", "F16"),
        ("embed_tokens", "Q6_K"),
        ("lm_head", "IQ4_XS"),
    ];
    let type_of = |hf: &str| -> &str {
        plan.iter()
            .find(|(part, _)| hf.contains(part))
            .map_or("F32", |(_, t)| t)
    };
    let candle_type = |t: &str| match t {
        "Q2_K" => GgmlDType::Q2K,
        "Q3_K" => GgmlDType::Q3K,
        "Q4_K" => GgmlDType::Q4K,
        "Q5_K" => GgmlDType::Q5K,
        "Q6_K" => GgmlDType::Q6K,
        "Q4_0" => GgmlDType::Q4_0,
        "Q4_1" => GgmlDType::Q4_1,
        "Q5_0" => GgmlDType::Q5_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q8_0" => GgmlDType::Q8_0,
        "BF16" => GgmlDType::BF16,
        "F16" => GgmlDType::F16,
        _ => GgmlDType::F32, // the IQ4 tensors: quantized by gguf_reference.py from these values
    };
    let m = test_model(&spec, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let candle_file = dir.path().join("candle.gguf");
    let tok = tokenizer::byte_level().unwrap();
    write_gguf(
        &m,
        &candle_file,
        &|name, _| candle_type(type_of(name)),
        Some(&tok),
        None,
    )
    .unwrap();
    let requant: serde_json::Map<String, serde_json::Value> = GgufFile::open(&candle_file)
        .unwrap()
        .tensors()
        .iter()
        .filter_map(|t| {
            let hf = distillery_proto::gguf::hf::hf_tensor_name(
                distillery_proto::gguf::Arch::Llama,
                &t.name,
            )?;
            let ty = type_of(&hf);
            ty.starts_with("IQ4")
                .then(|| (t.name.clone(), serde_json::json!(ty)))
        })
        .collect();
    assert_eq!(requant.len(), 3);
    let (mixed, reference) = (dir.path().join("mixed.gguf"), dir.path().join("ref.gguf"));
    python_json(
        &py,
        "gguf_reference.py",
        serde_json::json!([{"job": "requant", "in": candle_file, "out": mixed, "ref": reference, "plan": requant}]),
    );
    let used: BTreeSet<GgmlType> = GgufFile::open(&mixed)
        .unwrap()
        .tensors()
        .iter()
        .map(|t| t.ggml_type)
        .collect();
    assert_eq!(
        used,
        SUPPORTED.iter().copied().collect(),
        "every type is in the file"
    );
    assert!(GgufFile::open(&reference)
        .unwrap()
        .tensors()
        .iter()
        .all(|t| t.ggml_type == GgmlType::F32));

    let ours = load_gguf(&mixed, DType::F32, &Device::Cpu).unwrap();
    let theirs = load_gguf(&reference, DType::F32, &Device::Cpu).unwrap();
    let weights = theirs.model.varmap.data().lock().unwrap().clone();
    for (name, var) in ours.model.named_vars() {
        let d = max_abs_diff(var.as_tensor(), weights[&name].as_tensor()).unwrap();
        assert_eq!(d, 0.0, "{name} ({}) differs by {d}", type_of(&name));
    }
    let ids = Tensor::new(
        &[[72u32, 101, 108, 108, 111, 44, 32, 119, 258, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let gap = max_abs_diff(
        &ours.model.forward(&ids).unwrap(),
        &theirs.model.forward(&ids).unwrap(),
    )
    .unwrap();
    eprintln!("mixed-type model: max |ours - reference| over the logits = {gap:e}");
    assert_eq!(gap, 0.0);
    // And each tensor is still the original's, within its type's quantization error (a
    // permutation left in place or a broken quantizer would show as an error near 1).
    for (name, var) in m.named_vars() {
        let a = var.as_tensor();
        let b = weights[&name].as_tensor();
        let rel = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
            / a.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
        let bound = match type_of(&name) {
            "F32" => 0.0,
            "F16" | "BF16" => 0.01,
            "Q8_0" => 0.02,
            "Q2_K" => 0.35,
            "Q3_K" => 0.2,
            _ => 0.1,
        };
        eprintln!("{name} ({}): relative error {rel:.4}", type_of(&name));
        assert!(
            rel <= bound,
            "{name} ({}): relative error {rel} over {bound}",
            type_of(&name)
        );
    }
}
