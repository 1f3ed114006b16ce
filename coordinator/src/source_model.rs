//! Reads a source model's shape without loading its weights: Hugging Face `config.json`, or the
//! metadata and tensor names of a GGUF file. Used at submit time to check targets, and that the
//! models whose answers a campaign generates have a chat template.

use std::path::Path;

use distillery_proto::gguf::{GgufError, GgufFile};
use distillery_proto::v1::ModelShape;

/// Why a model's shape could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// The GGUF reader's error, which names the file.
    #[error("{0}")]
    Gguf(#[from] GgufError),
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

/// Shape from the text of a Hugging Face `config.json`, read by the same code that loads the
/// model (so a config the worker would refuse is refused at submit time, with the same words).
pub fn from_hf_config(path: &Path, text: &str) -> Result<ModelShape, ShapeError> {
    let c = distillery_worker::model::LlamaConfig::from_json(text)
        .map_err(|e| invalid(path, e.to_string()))?;
    let s = distillery_worker::prune::plan::shape_of(&c);
    check_heads(path, &s)?;
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

/// Shape of a GGUF file: its metadata and tensor list turned into the `config.json` the worker's
/// import builds (the same code, `distillery_proto::gguf`), then read like any config. A file
/// the worker would refuse (truncated, a tensor type it cannot dequantize, metadata that changes
/// the math) is refused here with the same message.
fn from_gguf(path: &Path) -> Result<ModelShape, ShapeError> {
    let f = GgufFile::open(path)?;
    let import = distillery_proto::gguf::import(&f)?;
    from_hf_config(path, &import.config_json)
}
