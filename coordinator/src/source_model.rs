//! Reads a source model's shape without loading its weights: Hugging Face `config.json`, or the
//! metadata and tensor names of a GGUF file. Used at submit time to check targets, and that the
//! models whose answers a campaign generates have a chat template.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use distillery_proto::shape::param_count;
use distillery_proto::v1::ModelShape;

/// Why a model's shape could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: &Path, message: impl Into<String>) -> ShapeError {
    ShapeError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Whether answers can be generated from `model` with a chat template: `file` when given, else
/// the model's own, resolved exactly as the workers will (`distillery_worker::model::chat`).
/// The error says what was looked at and how to give a template.
pub fn check_chat_template(model: &Path, file: Option<&Path>) -> Result<(), String> {
    use distillery_worker::model::chat;
    let templates = if model.is_dir() {
        chat::ModelTemplates::from_dir(model).map_err(|e| e.to_string())?
    } else {
        let template = if file.is_some() {
            None
        } else {
            gguf_chat_template(model)?
        };
        chat::ModelTemplates::from_gguf(model, template, None, None)
    };
    let choice = chat::TemplateChoice {
        file: file.map(Path::to_path_buf),
        name: None,
    };
    chat::resolve(&templates, &choice)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A GGUF file's `tokenizer.chat_template` (metadata only).
fn gguf_chat_template(path: &Path) -> Result<Option<String>, String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    let c = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| format!("{}: is not a readable GGUF file: {e}", path.display()))?;
    Ok(c.metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned())
}

/// The shape of a Hugging Face model directory (its `config.json`) or a `.gguf` file.
pub fn read_shape(path: &Path) -> Result<ModelShape, ShapeError> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        let text = std::fs::read_to_string(&cfg).map_err(|e| {
            invalid(
                &cfg,
                format!("cannot read ({e}); a model directory needs config.json"),
            )
        })?;
        from_hf_config(&cfg, &text)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        from_gguf(path)
    } else {
        Err(invalid(
            path,
            "is neither a Hugging Face model directory nor a .gguf file",
        ))
    }
}

/// Shape from the text of a Hugging Face `config.json`.
pub fn from_hf_config(path: &Path, text: &str) -> Result<ModelShape, ShapeError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(path, format!("is not valid JSON: {e}")))?;
    let get = |k: &str| -> Result<u32, ShapeError> {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    format!("has no integer `{k}`; is this a Llama-family config?"),
                )
            })
    };
    let heads = get("num_attention_heads")?;
    let mut s = ModelShape {
        hidden_size: get("hidden_size")?,
        intermediate_size: get("intermediate_size")?,
        num_attention_heads: heads,
        num_key_value_heads: get("num_key_value_heads").unwrap_or(heads),
        num_layers: get("num_hidden_layers")?,
        vocab_size: get("vocab_size")?,
        tie_word_embeddings: v
            .get("tie_word_embeddings")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        params: 0,
        head_dim: get("head_dim").unwrap_or(0),
        attention_bias: v
            .get("attention_bias")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
            || v.get("model_type").and_then(serde_json::Value::as_str) == Some("qwen2"),
    };
    check_heads(path, &s)?;
    s.params = param_count(&s);
    Ok(s)
}

fn check_heads(path: &Path, s: &ModelShape) -> Result<(), ShapeError> {
    if s.num_attention_heads == 0
        || s.num_key_value_heads == 0
        || !s.num_attention_heads.is_multiple_of(s.num_key_value_heads)
    {
        return Err(invalid(
            path,
            format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                s.num_attention_heads, s.num_key_value_heads
            ),
        ));
    }
    Ok(())
}

/// GGUF metadata value, as far as shapes need it.
enum Meta {
    Int(u64),
    Str(String),
    ArrayLen(u64),
    Other,
}

struct GgufReader<R: Read> {
    r: R,
}

impl<R: Read> GgufReader<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>()?))
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(std::io::Error::other("string longer than 16 MiB"));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
        Ok(())
    }
    fn value(&mut self, ty: u32) -> std::io::Result<Meta> {
        Ok(match ty {
            0 | 1 => Meta::Int(u64::from(self.bytes::<1>()?[0])),
            2 | 3 => Meta::Int(u64::from(u16::from_le_bytes(self.bytes::<2>()?))),
            4 | 5 => Meta::Int(u64::from(self.u32()?)),
            6 => {
                self.skip(4)?;
                Meta::Other
            }
            7 => {
                self.skip(1)?;
                Meta::Other
            }
            8 => Meta::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                match elem {
                    0 | 1 | 7 => self.skip(n)?,
                    2 | 3 => self.skip(n * 2)?,
                    4..=6 => self.skip(n * 4)?,
                    10..=12 => self.skip(n * 8)?,
                    _ => {
                        for _ in 0..n {
                            self.value(elem)?;
                        }
                    }
                }
                Meta::ArrayLen(n)
            }
            10 | 11 => Meta::Int(self.u64()?),
            12 => {
                self.skip(8)?;
                Meta::Other
            }
            t => return Err(std::io::Error::other(format!("unknown metadata type {t}"))),
        })
    }
}

fn from_gguf(path: &Path) -> Result<ModelShape, ShapeError> {
    let f = std::fs::File::open(path).map_err(|e| invalid(path, format!("cannot open: {e}")))?;
    let mut g = GgufReader {
        r: BufReader::new(f),
    };
    let io = |e: std::io::Error| invalid(path, format!("is not a readable GGUF file: {e}"));
    if &g.bytes::<4>().map_err(io)? != b"GGUF" {
        return Err(invalid(
            path,
            "has no GGUF magic: is it a llama.cpp model file?",
        ));
    }
    let version = g.u32().map_err(io)?;
    if version < 2 {
        return Err(invalid(
            path,
            format!("is GGUF version {version}; convert it with a current llama.cpp"),
        ));
    }
    let n_tensors = g.u64().map_err(io)?;
    let n_kv = g.u64().map_err(io)?;
    let mut meta = HashMap::new();
    for _ in 0..n_kv {
        let key = g.string().map_err(io)?;
        let ty = g.u32().map_err(io)?;
        meta.insert(key, g.value(ty).map_err(io)?);
    }
    let mut has_output = false;
    for _ in 0..n_tensors {
        let name = g.string().map_err(io)?;
        let dims = g.u32().map_err(io)?;
        g.skip(u64::from(dims) * 8 + 4 + 8).map_err(io)?;
        has_output |= name == "output.weight";
    }
    let arch = match meta.get("general.architecture") {
        Some(Meta::Str(s)) => s.clone(),
        _ => return Err(invalid(path, "has no general.architecture")),
    };
    let int = |k: &str| -> Result<u32, ShapeError> {
        match meta.get(&format!("{arch}.{k}")) {
            Some(Meta::Int(v)) => {
                u32::try_from(*v).map_err(|_| invalid(path, format!("{arch}.{k} is too large")))
            }
            _ => Err(invalid(
                path,
                format!("has no {arch}.{k}; is this a Llama-family model?"),
            )),
        }
    };
    let heads = int("attention.head_count")?;
    let vocab = match (meta.get("tokenizer.ggml.tokens"), int("vocab_size")) {
        (_, Ok(v)) => v,
        (Some(Meta::ArrayLen(n)), _) => u32::try_from(*n).unwrap_or(u32::MAX),
        _ => {
            return Err(invalid(
                path,
                "has neither a vocab_size nor tokenizer.ggml.tokens",
            ))
        }
    };
    let mut s = ModelShape {
        hidden_size: int("embedding_length")?,
        intermediate_size: int("feed_forward_length")?,
        num_attention_heads: heads,
        num_key_value_heads: int("attention.head_count_kv").unwrap_or(heads),
        num_layers: int("block_count")?,
        vocab_size: vocab,
        tie_word_embeddings: !has_output,
        params: 0,
        head_dim: int("attention.key_length").unwrap_or(0),
        attention_bias: arch == "qwen2",
    };
    check_heads(path, &s)?;
    s.params = param_count(&s);
    Ok(s)
}
