//! The shapes the benches run: SmolLM2-135M and the 70% student the parameter-budget search
//! picks from it, and the matrix-multiply FLOPs of a forward pass over them.

use distillery_worker::model::LlamaConfig;
use distillery_worker::prune::plan::{choose_shape, shape_of, Target};
use serde_json::Value;

/// SmolLM2-135M's config (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152,
/// tied embeddings), as transformers reads it.
pub fn smollm2_135m() -> Value {
    serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 8192,
    })
}

/// The student of the distillation bench: the shape `choose_shape` picks for 70% of the
/// teacher's parameters (hidden 480, MLP 1216, 6 heads, 30 layers today), as a config.
pub fn student_70(teacher: &Value) -> Result<Value, String> {
    let tc = config(teacher)?;
    let s = choose_shape(
        &shape_of(&tc),
        &Target {
            params: Some(0.7),
            ..Default::default()
        },
    )
    .map_err(|e| format!("70% student shape: {e}"))?;
    let mut j = teacher.clone();
    j["hidden_size"] = s.hidden_size.into();
    j["intermediate_size"] = s.intermediate_size.into();
    j["num_attention_heads"] = s.num_attention_heads.into();
    j["num_hidden_layers"] = s.num_layers.into();
    Ok(j)
}

/// The config as our loader reads it.
pub fn config(j: &Value) -> Result<LlamaConfig, String> {
    LlamaConfig::from_json(&j.to_string()).map_err(|e| format!("config {j}: {e}"))
}

/// Matrix-multiply FLOPs per token of one forward pass at sequence length `seq`: 2 per weight
/// of every projection and the LM head (the embedding lookup is no multiply), plus attention's
/// scores and mixing, 2·2·seq·head_dim per head per layer (the full `seq`: neither side's CPU
/// path skips the masked half). `lm_head = false` for passes that stop after the last layer.
pub fn forward_flops_per_token(c: &LlamaConfig, seq: usize, lm_head: bool) -> f64 {
    let h = c.hidden_size as f64;
    let nh = c.num_attention_heads as f64;
    let nkv = c.num_kv_heads() as f64;
    let hd = c.head_dim() as f64;
    let inter = c.intermediate_size as f64;
    let per_layer_weights = h * nh * hd + 2.0 * h * nkv * hd + nh * hd * h + 3.0 * h * inter;
    let layers = c.num_hidden_layers as f64;
    let head = if lm_head {
        c.vocab_size as f64 * h
    } else {
        0.0
    };
    2.0 * (layers * per_layer_weights + head) + layers * 4.0 * seq as f64 * nh * hd
}

/// Parameters of a config, for the header lines.
pub fn params(c: &LlamaConfig) -> u64 {
    shape_of(c).params
}
