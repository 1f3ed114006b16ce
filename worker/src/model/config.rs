//! Llama-family configuration (Llama 2/3, Mistral, Qwen2, SmolLM) read from a Hugging Face
//! `config.json` the way transformers reads it, and written back so transformers loads it.

use serde::{Deserialize, Serialize};

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// "linear" or "llama3" (also accepted as `type`).
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_init() -> f64 {
    0.02
}
fn default_act() -> String {
    "silu".into()
}
fn default_model_type() -> String {
    "llama".into()
}

/// The fields of `config.json` the model needs; unknown fields are kept in `extra` so a saved
/// config loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
}

impl LlamaConfig {
    /// Parses and checks a `config.json` text.
    pub fn from_json(text: &str) -> Result<LlamaConfig, ConfigError> {
        let mut c: LlamaConfig = serde_json::from_str(text)?;
        // Qwen2 always has q/k/v biases; transformers does not write the flag for it.
        if c.model_type == "qwen2" {
            c.attention_bias = true;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the shape is one this implementation runs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !matches!(self.model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return bad(format!(
                "model_type {:?} is not a Llama-family model (llama, mistral, qwen2)",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act {:?}: only SwiGLU with silu is supported",
                self.hidden_act
            ));
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if let Some(s) = &self.rope_scaling {
            if !matches!(s.rope_type.as_str(), "linear" | "llama3" | "default") {
                return bad(format!(
                    "rope_scaling type {:?} is not supported (linear, llama3)",
                    s.rope_type
                ));
            }
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// As JSON for `config.json`, with `head_dim` and `num_key_value_heads` explicit (a pruned
    /// model's head_dim is no longer hidden / heads).
    pub fn to_json(&self) -> String {
        let mut c = self.clone();
        c.head_dim = Some(self.head_dim());
        c.num_key_value_heads = Some(self.num_kv_heads());
        if c.model_type != "qwen2" {
            c.extra.remove("use_sliding_window");
        }
        c.extra.entry("architectures").or_insert_with(|| {
            let arch = match c.model_type.as_str() {
                "mistral" => "MistralForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                _ => "LlamaForCausalLM",
            };
            serde_json::json!([arch])
        });
        c.extra
            .entry("torch_dtype")
            .or_insert_with(|| serde_json::json!("float32"));
        serde_json::to_string_pretty(&c).unwrap_or_default()
    }

    /// Inverse RoPE frequencies, one per pair of channels, scaled as `rope_scaling` says.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        match &self.rope_scaling {
            Some(s) if s.rope_type == "linear" => base.into_iter().map(|f| f / s.factor).collect(),
            Some(s) if s.rope_type == "llama3" => {
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let orig = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_config_reads_like_transformers() {
        let c = LlamaConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000,
                "tie_word_embeddings": true, "max_position_embeddings": 8192, "bos_token_id": 1}"#,
        )
        .unwrap();
        assert_eq!((c.head_dim(), c.num_kv_heads()), (64, 3));
        assert!(c.tie_word_embeddings);
        // Unknown fields survive a round trip.
        let back = LlamaConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(
            back.extra.get("architectures"),
            c.extra.get("architectures")
        );
        assert_eq!(back.head_dim, Some(64));
    }

    #[test]
    fn bad_configs_are_refused() {
        let base = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 10"#;
        for extra in [
            r#""num_attention_heads": 4, "num_key_value_heads": 3"#,
            r#""num_attention_heads": 4, "model_type": "gpt2""#,
            r#""num_attention_heads": 4, "hidden_act": "gelu""#,
            r#""num_attention_heads": 4, "rope_scaling": {"type": "yarn", "factor": 2.0}"#,
        ] {
            assert!(
                LlamaConfig::from_json(&format!("{{{base}, {extra}}}")).is_err(),
                "{extra}"
            );
        }
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_scales_low_ones() {
        let c = LlamaConfig::from_json(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 1,
                "vocab_size": 10, "rope_theta": 500000,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        )
        .unwrap();
        let plain = LlamaConfig {
            rope_scaling: None,
            ..c.clone()
        }
        .inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }
}
