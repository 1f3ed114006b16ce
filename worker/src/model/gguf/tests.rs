use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::test_model::{test_model, TestModelSpec};
use crate::model::tokenizer::{self, CHATML_TEMPLATE};

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    num / den.max(1e-12)
}

fn logits(m: &Llama) -> Tensor {
    let ids = Tensor::new(
        &[[72u32, 101, 108, 108, 111, 256, 44, 32, 119]],
        &Device::Cpu,
    )
    .unwrap();
    m.forward(&ids).unwrap()
}

fn write_and_load(
    spec: &TestModelSpec,
    quant: &dyn Fn(&str, &[usize]) -> GgmlDType,
) -> (Llama, GgufModel, tempfile::TempDir) {
    let m = test_model(spec, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let tok = tokenizer::byte_level().unwrap();
    write_gguf(&m, &p, quant, Some(&tok), Some(CHATML_TEMPLATE)).unwrap();
    let g = load_gguf(&p, DType::F32, &Device::Cpu).unwrap();
    (m, g, dir)
}

#[test]
fn f32_gguf_imports_to_identical_logits_with_its_tokenizer() {
    for tied in [false, true] {
        let spec = TestModelSpec {
            tie_word_embeddings: tied,
            seed: 3,
            ..Default::default()
        };
        let (m, g, dir) = write_and_load(&spec, &|_, _| GgmlDType::F32);
        assert_eq!(g.model.config.tie_word_embeddings, tied);
        assert_eq!(g.model.config.num_kv_heads(), 2);
        assert_eq!(rel(&logits(&m), &logits(&g.model)), 0.0, "tied={tied}");
        // The tokenizer rebuilt from tokenizer.ggml.* encodes and decodes like the original.
        let orig = tokenizer::byte_level().unwrap();
        let back = g.tokenizer.as_ref().expect("a gpt2 tokenizer");
        for text in [
            "Hello, world",
            "Grüße <|im_start|>user\nhi<|im_end|>",
            "tabs\tand\nnewlines ",
        ] {
            let a = tokenizer::encode(&orig, text, false).unwrap();
            assert_eq!(tokenizer::encode(back, text, false).unwrap(), a, "{text:?}");
            assert_eq!(tokenizer::decode(back, &a, false).unwrap(), text);
        }
        assert_eq!(g.chat_template.as_deref(), Some(CHATML_TEMPLATE));
        drop(dir);
    }
}

#[test]
fn f16_gguf_imports_within_half_precision() {
    let (m, g, _d) = write_and_load(&TestModelSpec::default(), &|name, _| {
        if name.ends_with("norm.weight") {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        }
    });
    let r = rel(&logits(&m), &logits(&g.model));
    assert!(r > 0.0 && r < 2e-3, "relative logit error {r}");
}

#[test]
fn quantized_tensors_import_within_their_quantization_error() {
    // Every supported block type somewhere; K-quants need rows of 256 (down_proj's input).
    let pick = |name: &str, _dims: &[usize]| -> GgmlDType {
        if name.ends_with("norm.weight") {
            GgmlDType::F32
        } else if name.contains("down_proj") {
            if name.contains("layers.0.") {
                GgmlDType::Q4K
            } else {
                GgmlDType::Q6K
            }
        } else if name.contains("q_proj") || name.contains("embed") || name.contains("lm_head") {
            GgmlDType::Q8_0
        } else if name.contains("k_proj") || name.contains("gate_proj") {
            GgmlDType::Q4_0
        } else {
            GgmlDType::Q4_1
        }
    };
    let (m, g, _d) = write_and_load(&TestModelSpec::default(), &pick);
    let imported = g.model.varmap.data().lock().unwrap().clone();
    for (name, var) in m.named_vars() {
        let bound = match pick(&name, &[]) {
            GgmlDType::F32 => 0.0,
            GgmlDType::Q8_0 => 0.01,
            GgmlDType::Q6K => 0.04,
            _ => 0.2,
        };
        let r = rel(var.as_tensor(), imported[&name].as_tensor());
        // A Q/K permutation left in place would show as an error near sqrt(2).
        assert!(r <= bound, "{name}: relative error {r} over {bound}");
    }
    // Quantization blocks run along rows and the rotary permutation only reorders rows, so the
    // import must equal the original with each tensor quantized in place: nothing else changed.
    for (name, var) in m.named_vars() {
        let t = var.as_tensor();
        let q = candle_core::quantized::QTensor::quantize(t, pick(&name, t.dims())).unwrap();
        var.set(&q.dequantize(&Device::Cpu).unwrap()).unwrap();
    }
    let r = rel(&logits(&m), &logits(&g.model));
    assert!(
        r < 1e-6,
        "the import differs from the quantized original by {r}"
    );
}

#[test]
fn names_map_both_ways() {
    for hf in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.11.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
    ] {
        let g = gguf_name(hf).unwrap();
        assert_eq!(
            format::hf::hf_tensor_name(format::Arch::Llama, &g).as_deref(),
            Some(hf)
        );
    }
    assert_eq!(
        gguf_name("model.layers.2.self_attn.o_proj.weight").as_deref(),
        Some("blk.2.attn_output.weight")
    );
    assert!(format::hf::hf_tensor_name(format::Arch::Llama, "blk.0.ssm_in.weight").is_none());
}

#[test]
fn sentencepiece_and_merged_bpe_vocabularies_survive_a_gguf_round_trip() {
    let m = test_model(&TestModelSpec::default(), DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (vocab, texts) in [
        (
            tokenizer::spm_test_vocab(),
            ["the then", "é and the ant", "<s>athena</s>"],
        ),
        (
            tokenizer::bpe_test_vocab(),
            ["hello hell", "shell<|endoftext|>", "Grüße"],
        ),
    ] {
        let orig = if vocab.model == "llama" {
            tokenizer::sentencepiece_bpe(&vocab).unwrap()
        } else {
            tokenizer::byte_level_bpe(&vocab).unwrap()
        };
        let p = dir.path().join(format!("{}.gguf", vocab.model));
        write_gguf(&m, &p, &|_, _| GgmlDType::F32, Some(&orig), None).unwrap();
        let g = load_gguf(&p, DType::F32, &Device::Cpu).unwrap();
        let back = g.tokenizer.as_ref().expect("a rebuilt tokenizer");
        for text in texts {
            for special in [false, true] {
                let a = tokenizer::encode(&orig, text, special).unwrap();
                assert_eq!(
                    tokenizer::encode(back, text, special).unwrap(),
                    a,
                    "{}: {text:?}",
                    vocab.model
                );
                assert_eq!(
                    tokenizer::decode(back, &a, false).unwrap(),
                    tokenizer::decode(&orig, &a, false).unwrap()
                );
            }
        }
    }
}
