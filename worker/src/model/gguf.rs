//! GGUF (llama.cpp) models: import with every tensor dequantized to the compute dtype, names
//! mapped to Hugging Face's, llama.cpp's Q/K rotary permutation undone for arch `llama`, the
//! config and tokenizer rebuilt from metadata; and export the way llama.cpp's converter writes
//! (used for test models, so import can be checked against the original).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use super::config::LlamaConfig;
use super::io::{from_tensors, ModelIoError};
use super::llama::Llama;
use super::tokenizer::{self, GgufVocab};

/// An imported GGUF model.
pub struct GgufModel {
    pub model: Llama,
    /// Rebuilt from `tokenizer.ggml.*`: byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`).
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelIoError {
    ModelIoError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// HF name of a GGUF tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// GGUF name of an HF tensor name (inverse of [`hf_name`]).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let g = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp stores Q and K rows interleaved per head (`permute` in convert_hf_to_gguf.py):
/// `w.reshape(H, 2, hd/2, ..).swapaxes(1, 2)`. `undo` inverts it.
fn rotary_permute(w: &Tensor, heads: usize, undo: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let hd = out / heads;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut shape = if undo {
        vec![heads, hd / 2, 2]
    } else {
        vec![heads, 2, hd / 2]
    };
    shape.extend(&rest);
    w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn meta_usize(c: &gguf_file::Content, key: &str) -> Option<usize> {
    let v = meta(c, key)?;
    v.to_u64()
        .ok()
        .map(|x| x as usize)
        .or_else(|| v.to_u32().ok().map(|x| x as usize))
        .or_else(|| v.to_i32().ok().map(|x| x as usize))
}

fn meta_f64(c: &gguf_file::Content, key: &str) -> Option<f64> {
    let v = meta(c, key)?;
    v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
}

/// Imports a `.gguf` file.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel, ModelIoError> {
    let mut f = std::fs::File::open(path).map_err(|source| ModelIoError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| invalid(path, format!("is not a readable GGUF file: {e}")))?;
    let arch = meta(&content, "general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| invalid(path, "has no general.architecture"))?;
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(invalid(
            path,
            format!("architecture {arch:?} is not a Llama-family model"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| {
        meta_usize(&content, &key(k)).ok_or_else(|| invalid(path, format!("has no {}", key(k))))
    };
    let heads = need("attention.head_count")?;
    let kv_heads = meta_usize(&content, &key("attention.head_count_kv")).unwrap_or(heads);
    let hidden = need("embedding_length")?;
    let tokens = meta(&content, "tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok());
    let vocab = match (meta_usize(&content, &key("vocab_size")), tokens) {
        (Some(v), _) => v,
        (None, Some(t)) => t.len(),
        _ => content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| invalid(path, "has no vocabulary size"))?,
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let head_dim =
        meta_usize(&content, &key("attention.key_length")).unwrap_or(hidden / heads.max(1));
    let cfg = serde_json::json!({
        "model_type": if arch == "qwen2" { "qwen2" } else if arch == "mistral" { "mistral" } else { "llama" },
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": need("block_count")?,
        "vocab_size": vocab,
        "rms_norm_eps": meta_f64(&content, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": meta_f64(&content, &key("rope.freq_base")).unwrap_or(10_000.0),
        "max_position_embeddings": meta_usize(&content, &key("context_length")).unwrap_or(2048),
        "tie_word_embeddings": tied,
        "attention_bias": content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        "bos_token_id": meta_usize(&content, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta_usize(&content, "tokenizer.ggml.eos_token_id"),
    });
    let config =
        LlamaConfig::from_json(&cfg.to_string()).map_err(|e| invalid(path, e.to_string()))?;

    let mut tensors = HashMap::new();
    let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(&name) else {
            // llama.cpp writes precomputed rope tables for some models; they are recomputed here.
            if name.starts_with("rope_") {
                continue;
            }
            return Err(invalid(
                path,
                format!("has tensor {name:?} that a Llama-family model does not use"),
            ));
        };
        let q = content
            .tensor(&mut f, &name, device)
            .map_err(|e| invalid(path, format!("tensor {name}: {e}")))?;
        let mut t = q.dequantize(device)?;
        if arch == "llama" && (name.contains("attn_q.") || name.contains("attn_k.")) {
            let h = if name.contains("attn_q.") {
                heads
            } else {
                kv_heads
            };
            t = rotary_permute(&t, h, true)?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let model = from_tensors(config, tensors, dtype, device, path)?;
    let text = |k: &str| meta(&content, k).and_then(|v| v.to_string().ok()).cloned();
    let token_text = |id: Option<usize>| -> Option<String> {
        let toks = meta(&content, "tokenizer.ggml.tokens")?.to_vec().ok()?;
        toks.get(id?)?.to_string().ok().cloned()
    };
    Ok(GgufModel {
        tokenizer: tokenizer_from_meta(&content, path)?,
        chat_template: text("tokenizer.chat_template"),
        bos_token: token_text(meta_usize(&content, "tokenizer.ggml.bos_token_id")),
        eos_token: token_text(meta_usize(&content, "tokenizer.ggml.eos_token_id")),
        model,
    })
}

/// The tokenizer from `tokenizer.ggml.*`: byte-level BPE (`gpt2`) or SentencePiece BPE
/// (`llama`); `None` when the file has no vocabulary or another kind (said on stderr).
fn tokenizer_from_meta(
    c: &gguf_file::Content,
    path: &Path,
) -> Result<Option<Tokenizer>, ModelIoError> {
    let Some(model) = meta(c, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
    else {
        return Ok(None);
    };
    if model != "gpt2" && model != "llama" {
        eprintln!(
            "note: {}: tokenizer model {model:?} is not rebuilt (gpt2 and llama are); the model loads without a tokenizer",
            path.display()
        );
        return Ok(None);
    }
    let array = |key: &str| meta(c, key).and_then(|v| v.to_vec().ok());
    let tokens = array("tokenizer.ggml.tokens")
        .ok_or_else(|| invalid(path, "has no tokenizer.ggml.tokens"))?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.to_string()
                .cloned()
                .map_err(|e| invalid(path, format!("token {i}: {e}")))
        })
        .collect::<Result<Vec<String>, _>>()?;
    let types = array("tokenizer.ggml.token_type")
        .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let scores = array("tokenizer.ggml.scores")
        .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    let merges = array("tokenizer.ggml.merges")
        .map(|v| {
            v.iter()
                .filter_map(|m| m.to_string().ok().cloned())
                .collect()
        })
        .unwrap_or_default();
    let add_bos = meta(c, "tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(model == "llama");
    let vocab = GgufVocab {
        add_bos: meta_usize(c, "tokenizer.ggml.bos_token_id")
            .filter(|_| add_bos)
            .map(|b| b as u32),
        model,
        tokens,
        types,
        scores,
        merges,
    };
    let built = if vocab.model == "llama" {
        tokenizer::sentencepiece_bpe(&vocab)
    } else {
        tokenizer::byte_level_bpe(&vocab)
    };
    built.map(Some).map_err(|e| invalid(path, e.to_string()))
}

/// Writes `model` as llama.cpp does (arch `llama`, Q/K permuted), each tensor in the type
/// `quant(hf_name, dims)` chooses, with a byte-level tokenizer's vocabulary when given.
pub fn write_gguf(
    model: &Llama,
    path: &Path,
    quant: &dyn Fn(&str, &[usize]) -> GgmlDType,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
) -> Result<(), ModelIoError> {
    let c = &model.config;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("distillery".into())),
        (
            "llama.context_length".into(),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            "llama.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "llama.block_count".into(),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(c.num_kv_heads() as u32),
        ),
        (
            "llama.attention.key_length".into(),
            Value::U32(c.head_dim() as u32),
        ),
        (
            "llama.attention.value_length".into(),
            Value::U32(c.head_dim() as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(c.head_dim() as u32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(c.vocab_size as u32)),
    ];
    if let Some(t) = tokenizer {
        let v = tokenizer::to_gguf_vocab(t).map_err(|e| invalid(path, e.to_string()))?;
        let strings =
            |xs: &[String]| Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect());
        meta.push(("tokenizer.ggml.model".into(), Value::String(v.model)));
        meta.push(("tokenizer.ggml.tokens".into(), strings(&v.tokens)));
        meta.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(v.types.into_iter().map(Value::I32).collect()),
        ));
        if !v.scores.is_empty() {
            meta.push((
                "tokenizer.ggml.scores".into(),
                Value::Array(v.scores.into_iter().map(Value::F32).collect()),
            ));
        }
        meta.push(("tokenizer.ggml.merges".into(), strings(&v.merges)));
        meta.push((
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(v.add_bos.is_some()),
        ));
        let id = |v: &Option<serde_json::Value>| v.as_ref().and_then(|v| v.as_u64());
        // The BOS the tokenizer prepends is the one llama.cpp must prepend.
        let bos = v.add_bos.map(u64::from).or(id(&c.bos_token_id));
        for (k, v) in [
            ("tokenizer.ggml.bos_token_id", bos),
            ("tokenizer.ggml.eos_token_id", id(&c.eos_token_id)),
        ] {
            if let Some(id) = v {
                meta.push((k.into(), Value::U32(id as u32)));
            }
        }
    }
    if let Some(t) = chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    for (name, var) in model.named_vars() {
        let g =
            gguf_name(&name).ok_or_else(|| invalid(path, format!("no GGUF name for {name}")))?;
        let mut t = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        if name.contains("q_proj") {
            t = rotary_permute(&t, c.num_attention_heads, false)?;
        } else if name.contains("k_proj") {
            t = rotary_permute(&t, c.num_kv_heads(), false)?;
        }
        let q = QTensor::quantize(&t, quant(&name, t.dims()))?;
        qtensors.push((g, q));
    }
    let mut f = std::fs::File::create(path).map_err(|source| ModelIoError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

#[cfg(test)]
mod tests;
