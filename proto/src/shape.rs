//! Parameter counts of decoder shapes (Llama family, Qwen3, Gemma 3): the one place where a
//! model's size is computed.

use crate::v1::ModelShape;

/// Parameters of a decoder with this shape (embeddings, attention with optional biases and q/k
/// norms, gated MLP, 2 or 4 RMSNorms per layer, the final norm, and an untied `lm_head` unless
/// `tie_word_embeddings`).
pub fn param_count(s: &ModelShape) -> u64 {
    let h = u64::from(s.hidden_size);
    let hd = u64::from(head_dim(s));
    let q = u64::from(s.num_attention_heads) * hd;
    let kv = u64::from(s.num_key_value_heads) * hd;
    let inter = u64::from(s.intermediate_size);
    let vocab = u64::from(s.vocab_size);
    let mut attn = h * q + 2 * h * kv + q * h;
    if s.attention_bias {
        attn += q + 2 * kv;
    }
    let mlp = 3 * h * inter;
    if s.qk_norm {
        attn += 2 * hd;
    }
    let norms = u64::from(s.norms_per_layer.max(2)) * h;
    let per_layer = attn + mlp + norms;
    let embed = vocab * h;
    let head = if s.tie_word_embeddings { 0 } else { vocab * h };
    u64::from(s.num_layers) * per_layer + embed + head + h
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
}
