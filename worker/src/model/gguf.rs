//! GGUF (llama.cpp) models: import through our own reader (`distillery_proto::gguf`, shared
//! with the coordinator's shape check): every tensor dequantized to the compute dtype, names
//! mapped to Hugging Face's, llama.cpp's converter undone (Q/K rotary permutation for arch
//! `llama`, Gemma's `1 + w` norms), the config rebuilt exactly as transformers writes it and
//! the tokenizer from metadata; and export the way llama.cpp's converter writes (used for test
//! models, so import can be checked against the original).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use distillery_proto::gguf::{self as format, dequant, Fixup, GgufFile};
use tokenizers::Tokenizer;

use super::config::{Arch, LayerType, LlamaConfig, RopeScaling};
use super::io::{from_tensors, ModelIoError};
use super::llama::Llama;
use super::tokenizer::{self, GgufVocab};

/// An imported GGUF model.
pub struct GgufModel {
    pub model: Llama,
    /// `config.json` of the model exactly as transformers writes it (what `model.config` was
    /// parsed from).
    pub config_json: String,
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

/// GGUF name of an HF tensor name in an arch `llama` file (what [`write_gguf`] writes).
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

/// One tensor of `f`, dequantized to f32 on the CPU in its row-major shape.
fn dequantized(f: &GgufFile, name: &str) -> Result<Tensor, ModelIoError> {
    let info = f
        .tensor(name)
        .ok_or_else(|| invalid(f.path(), format!("has no tensor {name:?}")))?;
    let data = f.tensor_data(info)?;
    let values = dequant::dequantize(info.ggml_type, &data, info.n_elements())
        .map_err(|e| invalid(f.path(), format!("tensor {name:?}: {e}")))?;
    Ok(Tensor::from_vec(values, info.shape(), &Device::Cpu)?)
}

/// Imports a `.gguf` file.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel, ModelIoError> {
    let f = GgufFile::open(path)?;
    let import = format::import(&f)?;
    let config = LlamaConfig::from_json(&import.config_json)
        .map_err(|e| invalid(path, format!("its {e}")))?;
    let mut tensors = HashMap::new();
    for t in &import.tensors {
        let mut w = dequantized(&f, &t.gguf_name)?;
        match t.fixup {
            Fixup::None => {}
            Fixup::UnpermuteRotary { heads } => {
                let rows = w.dims()[0];
                if heads == 0 || !rows.is_multiple_of(2 * heads) {
                    return Err(invalid(
                        path,
                        format!(
                            "tensor {:?} has {rows} rows, which do not split into {heads} heads of even size",
                            t.gguf_name
                        ),
                    ));
                }
                w = rotary_permute(&w, heads, true)?;
            }
            Fixup::SubtractOne => w = w.affine(1.0, -1.0)?,
        }
        tensors.insert(t.hf_name.clone(), w.to_dtype(dtype)?.to_device(device)?);
    }
    let model = from_tensors(config, tensors, dtype, device, path)?;
    let text =
        |k: &str| -> Result<Option<String>, ModelIoError> { Ok(f.get_str(k)?.map(str::to_string)) };
    let tokens = f
        .get_array("tokenizer.ggml.tokens")?
        .and_then(|a| a.as_strings());
    let token_text = |key: &str| -> Result<Option<String>, ModelIoError> {
        let id = f.get_u64(key)?;
        Ok(id.and_then(|id| tokens?.get(usize::try_from(id).ok()?).cloned()))
    };
    Ok(GgufModel {
        tokenizer: tokenizer_from_meta(&f)?,
        chat_template: text("tokenizer.chat_template")?,
        bos_token: token_text("tokenizer.ggml.bos_token_id")?,
        eos_token: token_text("tokenizer.ggml.eos_token_id")?,
        config_json: import.config_json,
        model,
    })
}

/// The tokenizer from `tokenizer.ggml.*`: byte-level BPE (`gpt2`) or SentencePiece BPE
/// (`llama`); `None` when the file has no vocabulary or another kind (said on stderr).
pub(crate) fn tokenizer_from_meta(f: &GgufFile) -> Result<Option<Tokenizer>, ModelIoError> {
    let path = f.path();
    let Some(model) = f.get_str("tokenizer.ggml.model")?.map(str::to_string) else {
        return Ok(None);
    };
    if model != "gpt2" && model != "llama" {
        eprintln!(
            "note: {}: tokenizer model {model:?} is not rebuilt (gpt2 and llama are); the model loads without a tokenizer",
            path.display()
        );
        return Ok(None);
    }
    let wrong = |key: &str, a: &format::Array, want: &str| {
        invalid(
            path,
            format!(
                "{key} is an array of {}, expected {want}",
                a.element_type_name()
            ),
        )
    };
    let strings = |key: &str| -> Result<Option<Vec<String>>, ModelIoError> {
        f.get_array(key)?
            .map(|a| {
                a.as_strings()
                    .map(<[String]>::to_vec)
                    .ok_or_else(|| wrong(key, a, "strings"))
            })
            .transpose()
    };
    let tokens = strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| invalid(path, "has no tokenizer.ggml.tokens"))?;
    let types = match f.get_array("tokenizer.ggml.token_type")? {
        Some(a) => a
            .to_i64s()
            .and_then(|v| v.into_iter().map(|t| i32::try_from(t).ok()).collect())
            .ok_or_else(|| wrong("tokenizer.ggml.token_type", a, "int32 values"))?,
        None => vec![1; tokens.len()],
    };
    let scores = match f.get_array("tokenizer.ggml.scores")? {
        Some(a) => a
            .to_f32s()
            .ok_or_else(|| wrong("tokenizer.ggml.scores", a, "floats"))?,
        None => Vec::new(),
    };
    let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let add_bos = f
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let bos = f.get_u64("tokenizer.ggml.bos_token_id")?;
    let vocab = GgufVocab {
        add_bos: bos.filter(|_| add_bos).and_then(|b| u32::try_from(b).ok()),
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
/// `quant(hf_name, dims)` chooses, with a byte-level tokenizer's vocabulary when given. Only
/// plain Llama models (what the test models are): other architectures, RoPE scaling or sliding
/// windows would need metadata this writer does not produce, so they are refused.
pub fn write_gguf(
    model: &Llama,
    path: &Path,
    quant: &dyn Fn(&str, &[usize]) -> GgmlDType,
    tokenizer: Option<&Tokenizer>,
    chat_template: Option<&str>,
) -> Result<(), ModelIoError> {
    let c = &model.config;
    if c.arch() != Arch::Llama
        || c.rope_scaling != RopeScaling::Default
        || c.layer_types.iter().any(|t| *t != LayerType::Full)
    {
        return Err(invalid(
            path,
            format!(
                "write_gguf writes plain Llama models only, not this {} model (RoPE {:?})",
                c.model_type, c.rope_scaling
            ),
        ));
    }
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
