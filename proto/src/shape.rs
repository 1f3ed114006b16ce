//! Parameter counts of decoder shapes (Llama family, Qwen3, Gemma 3): the one place where a
//! model's size is computed.

use crate::v1::ModelShape;

/// The most layers a model file (`config.json`, GGUF `block_count`) may claim. The largest open
/// models have 126: a larger count is a corrupt or hostile file, refused before anything is
/// allocated per layer (fuzzing found a 1 KB GGUF whose layer count alone asked for gigabytes).
pub const MAX_LAYERS: u64 = 4096;

/// The largest width (hidden size, intermediate size, attention heads, head dimension,
/// vocabulary) a model file may claim: 2^24, where the largest real ones are a 262,144-token
/// vocabulary and a 53,248 intermediate size. Anything larger is refused before it is allocated
/// or multiplied (fuzzing found a `head_dim` of 2^60 that aborted on allocation).
pub const MAX_WIDTH: u64 = 1 << 24;

/// Parameters of a decoder with this shape (embeddings, attention with optional biases and q/k
/// norms, gated MLP, 2 or 4 RMSNorms per layer, the final norm, and an untied `lm_head` unless
/// `tie_word_embeddings`).
pub fn param_count(s: &ModelShape) -> u64 {
    // Saturating: a shape from a spec or a file may be any u32s, and a count past u64 is
    // larger than every budget (never an overflow panic).
    let mul = |a: u64, b: u64| a.saturating_mul(b);
    let h = u64::from(s.hidden_size);
    let hd = u64::from(head_dim(s));
    let q = mul(u64::from(s.num_attention_heads), hd);
    let kv = mul(u64::from(s.num_key_value_heads), hd);
    let inter = u64::from(s.intermediate_size);
    let vocab = u64::from(s.vocab_size);
    let mut attn = mul(h, q)
        .saturating_add(mul(2, mul(h, kv)))
        .saturating_add(mul(q, h));
    if s.attention_bias {
        attn = attn.saturating_add(q.saturating_add(mul(2, kv)));
    }
    let mlp = mul(3, mul(h, inter));
    if s.qk_norm {
        attn = attn.saturating_add(mul(2, hd));
    }
    let norms = mul(u64::from(s.norms_per_layer.max(2)), h);
    let per_layer = attn.saturating_add(mlp).saturating_add(norms);
    let embed = mul(vocab, h);
    let head = if s.tie_word_embeddings { 0 } else { embed };
    mul(u64::from(s.num_layers), per_layer)
        .saturating_add(embed)
        .saturating_add(head)
        .saturating_add(h)
}

/// The head dimension: explicit when the config gives one, else hidden / heads.
pub fn head_dim(s: &ModelShape) -> u32 {
    if s.head_dim > 0 {
        s.head_dim
    } else {
        s.hidden_size
            .checked_div(s.num_attention_heads)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_135m_has_its_published_size() {
        // SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536,
        // vocab 49152, tied embeddings: 134,515,008 parameters.
        let s = ModelShape {
            hidden_size: 576,
            intermediate_size: 1536,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            num_layers: 30,
            vocab_size: 49152,
            tie_word_embeddings: true,
            ..Default::default()
        };
        assert_eq!(param_count(&s), 134_515_008);
    }

    /// Found by fuzzing: a shape of the largest u32s is counted (saturated), not an overflow.
    #[test]
    fn an_absurd_shape_saturates_instead_of_overflowing() {
        let s = ModelShape {
            hidden_size: u32::MAX,
            intermediate_size: u32::MAX,
            num_attention_heads: u32::MAX,
            num_key_value_heads: u32::MAX,
            num_layers: u32::MAX,
            vocab_size: u32::MAX,
            head_dim: u32::MAX,
            attention_bias: true,
            qk_norm: true,
            ..Default::default()
        };
        assert_eq!(param_count(&s), u64::MAX);
    }
}
