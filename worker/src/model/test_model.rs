//! Tiny random models of any implemented architecture (Llama by default) with a byte-level
//! tokenizer and a ChatML template, written as Hugging Face directories: what tests, benchmarks
//! and `worker make-test-model` run on (nothing is ever downloaded).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::chat::CHATML_TEMPLATE;
use super::config::{Arch, LlamaConfig};
use super::io::{save_dir, ModelIoError};
use super::llama::Llama;
use super::tokenizer::{self, TEST_SPECIALS};

/// The shape of a test model.
#[derive(Debug, Clone, PartialEq)]
pub struct TestModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub tie_word_embeddings: bool,
    pub seed: u64,
    /// Llama, or another architecture with its distinguishing features on (Qwen3: q/k norms;
    /// Gemma 3: alternating sliding-window (16) and global layers with their own RoPE bases).
    pub arch: Arch,
}

impl Default for TestModelSpec {
    fn default() -> Self {
        TestModelSpec {
            hidden_size: 64,
            intermediate_size: 256,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            tie_word_embeddings: false,
            seed: 0,
            arch: Arch::Llama,
        }
    }
}

/// Vocabulary of the byte-level tokenizer: 256 bytes then the specials.
pub fn test_vocab_size() -> usize {
    256 + TEST_SPECIALS.len()
}

/// The config of a test model.
pub fn test_config(s: &TestModelSpec) -> Result<LlamaConfig, ModelIoError> {
    let mut json = serde_json::json!({
        "model_type": s.arch.model_type(),
        "architectures": [s.arch.class()],
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "vocab_size": test_vocab_size(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": s.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": 256,
        "eos_token_id": 257,
    });
    let extra = match s.arch {
        Arch::Gemma3 => serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": s.hidden_size / s.num_heads.max(1),
            "sliding_window": 16,
            "layer_types": (0..s.num_layers)
                .map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>(),
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        }),
        _ => serde_json::json!({"hidden_act": "silu"}),
    };
    if let (Some(j), Some(e)) = (json.as_object_mut(), extra.as_object()) {
        j.extend(e.clone());
    }
    LlamaConfig::from_json(&json.to_string()).map_err(|e| ModelIoError::Invalid {
        path: "test model spec".into(),
        message: e.to_string(),
    })
}

/// A random test model, the same for the same spec (weights from a seeded generator).
pub fn test_model(s: &TestModelSpec, dtype: DType, device: &Device) -> Result<Llama, ModelIoError> {
    let config = test_config(s)?;
    let std = config.initializer_range * 10.0; // big enough that logits are far from uniform
    let model = Llama::new(config, dtype, device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    for (name, var) in model.named_vars() {
        let shape = var.as_tensor().shape().clone();
        let n = shape.elem_count();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            // Gemma's norms scale by (1 + w).
            let center = if s.arch.gemma() { 0.0 } else { 1.0 };
            (0..n)
                .map(|_| center + 0.1 * normal(&mut rng) as f32)
                .collect()
        } else {
            (0..n).map(|_| (std * normal(&mut rng)) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
    }
    Ok(model)
}

fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Writes a test model as a Hugging Face directory with its tokenizer files.
pub fn write_test_model(dir: &Path, s: &TestModelSpec) -> Result<Llama, ModelIoError> {
    let model = test_model(s, DType::F32, &Device::Cpu)?;
    save_dir(&model, dir, None)?;
    let io = |source| ModelIoError::Io {
        path: dir.display().to_string(),
        source,
    };
    let tok = tokenizer::byte_level().map_err(|e| ModelIoError::Invalid {
        path: "tokenizer".into(),
        message: e.to_string(),
    })?;
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(|e| ModelIoError::Invalid {
            path: dir.join("tokenizer.json").display().to_string(),
            message: e.to_string(),
        })?;
    let tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::json!({"bos_token_id": 256, "eos_token_id": 257}).to_string(),
    )
    .map_err(io)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::io::load_dir;
    use crate::model::max_abs_diff;

    #[test]
    fn a_test_model_is_deterministic_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = TestModelSpec {
            tie_word_embeddings: true,
            ..Default::default()
        };
        let m = write_test_model(dir.path(), &s).unwrap();
        let again = test_model(&s, DType::F32, &Device::Cpu).unwrap();
        let back = load_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let tok = tokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
        let ids = tokenizer::encode(&tok, "hello", false).unwrap();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let a = m.forward(&x).unwrap();
        for other in [again, back] {
            let d = max_abs_diff(&a, &other.forward(&x).unwrap()).unwrap();
            assert_eq!(d, 0.0);
        }
        assert_eq!(a.dims(), &[1, 5, 260]);
        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(tc["chat_template"].as_str().unwrap().contains("im_start"));
    }
}
