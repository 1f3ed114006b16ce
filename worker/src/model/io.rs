//! Hugging Face model directories: `config.json` plus one or sharded safetensors (bf16, f16 or
//! f32 on disk, converted to the compute dtype) in; `config.json`, `model.safetensors` and the
//! source's tokenizer files out.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::config::LlamaConfig;
use super::llama::Llama;

/// Why a model directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelIoError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Gguf(#[from] distillery_proto::gguf::GgufError),
}

fn invalid(path: &Path, message: impl Into<String>) -> ModelIoError {
    ModelIoError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Files a saved model carries over from its source, when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
];

/// The safetensors files of a model directory (sharded ones through their index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelIoError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelIoError::Io {
            path: index.display().to_string(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid(&index, "has no weight_map"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(f);
                if p.is_file() && !f.contains("..") {
                    Ok(p)
                } else {
                    Err(invalid(
                        &index,
                        format!("names shard {f:?}, which is missing"),
                    ))
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(invalid(
        dir,
        "has neither model.safetensors nor model.safetensors.index.json",
    ))
}

/// Loads a Hugging Face model directory into a trainable model of `dtype`.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Llama, ModelIoError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelIoError::Io {
        path: cfg_path.display().to_string(),
        source,
    })?;
    let config = LlamaConfig::from_json(&text).map_err(|e| invalid(&cfg_path, e.to_string()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in weight_files(dir)? {
        for (name, t) in candle_core::safetensors::load(&f, device)? {
            tensors.insert(name, t);
        }
    }
    from_tensors(config, tensors, dtype, device, dir)
}

/// Builds a model from named tensors (any float dtype), refusing missing or misshapen ones.
pub fn from_tensors(
    config: LlamaConfig,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    source: &Path,
) -> Result<Llama, ModelIoError> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        for (name, t) in tensors {
            // Rotary tables some old checkpoints carry are recomputed, not loaded.
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if config.tie_word_embeddings && name == "lm_head.weight" {
                continue;
            }
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    let loaded: BTreeSet<String> = varmap
        .data()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    let model = Llama::from_varmap(config, varmap, dtype, device)
        .map_err(|e| invalid(source, format!("weights do not match config.json: {e}")))?;
    let used: BTreeSet<String> = model.named_vars().into_iter().map(|(n, _)| n).collect();
    if let Some(missing) = used.difference(&loaded).next() {
        return Err(invalid(
            source,
            format!("has no tensor {missing:?}; is it a complete Llama-family checkpoint?"),
        ));
    }
    if let Some(extra) = loaded.difference(&used).next() {
        return Err(invalid(
            source,
            format!("has tensor {extra:?}, which a Llama-family model of this config does not use"),
        ));
    }
    Ok(model)
}

/// Writes `model` as a Hugging Face directory; tokenizer files are copied from `source` when
/// given.
pub fn save_dir(model: &Llama, dir: &Path, source: Option<&Path>) -> Result<(), ModelIoError> {
    let tensors: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .contiguous()
                    .unwrap_or_else(|_| v.as_tensor().clone()),
            )
        })
        .collect();
    save_dir_with(&model.config, &tensors, dir, source)
}

/// Writes a model of `config` with the parameters `tensors` (Hugging Face names) as a Hugging
/// Face directory, as [`save_dir`] does.
pub fn save_dir_with(
    config: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    dir: &Path,
    source: Option<&Path>,
) -> Result<(), ModelIoError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelIoError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_json()).map_err(|source| ModelIoError::Io {
        path: cfg.display().to_string(),
        source,
    })?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    // Copying a file onto itself would truncate it: saving into the source folder keeps its files.
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if let Some(src) = source.filter(|s| !same(s, dir)) {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, dir.join(f)).map_err(|source| ModelIoError::Io {
                    path: from.display().to_string(),
                    source,
                })?;
            }
        }
    }
    Ok(())
}

/// Loads any model this code reads: a Hugging Face directory or a `.gguf` file, and writes it
/// as a Hugging Face directory (tokenizer and chat template carried over).
pub fn convert(input: &Path, out: &Path) -> Result<Llama, ModelIoError> {
    if input.is_dir() {
        let m = load_dir(input, DType::F32, &Device::Cpu)?;
        save_dir(&m, out, Some(input))?;
        return Ok(m);
    }
    if input.extension().is_some_and(|e| e == "gguf") {
        let g = super::gguf::load_gguf(input, DType::F32, &Device::Cpu)?;
        save_dir(&g.model, out, None)?;
        let io = |source| ModelIoError::Io {
            path: out.display().to_string(),
            source,
        };
        if let Some(t) = &g.tokenizer {
            t.save(out.join("tokenizer.json"), true)
                .map_err(|e| invalid(out, e.to_string()))?;
        }
        let mut tc = serde_json::Map::new();
        tc.insert(
            "tokenizer_class".into(),
            serde_json::json!("PreTrainedTokenizerFast"),
        );
        for (k, v) in [
            ("bos_token", &g.bos_token),
            ("eos_token", &g.eos_token),
            ("chat_template", &g.chat_template),
        ] {
            if let Some(v) = v {
                tc.insert(k.into(), serde_json::json!(v));
            }
        }
        std::fs::write(
            out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc).unwrap_or_default(),
        )
        .map_err(io)?;
        return Ok(g.model);
    }
    Err(invalid(
        input,
        "is neither a Hugging Face model directory nor a .gguf file",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;

    fn tiny(tied: bool) -> LlamaConfig {
        LlamaConfig::from_json(&format!(
            r#"{{"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "vocab_size": 40, "tie_word_embeddings": {tied}, "initializer_range": 0.2,
                "bos_token_id": 1, "_name_or_path": "kept"}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_saved_directory_loads_to_the_same_logits() {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 5, 9, 33, 2]], &dev).unwrap();
        for tied in [false, true] {
            let m = Llama::new(tiny(tied), DType::F32, &dev).unwrap();
            let src = tempfile::tempdir().unwrap();
            std::fs::write(src.path().join("tokenizer.json"), "{}").unwrap();
            let out = tempfile::tempdir().unwrap();
            save_dir(&m, out.path(), Some(src.path())).unwrap();
            assert!(out.path().join("tokenizer.json").is_file());
            let names: Vec<String> =
                candle_core::safetensors::load(out.path().join("model.safetensors"), &dev)
                    .unwrap()
                    .into_keys()
                    .collect();
            assert_eq!(names.contains(&"lm_head.weight".to_string()), !tied);
            let back = load_dir(out.path(), DType::F32, &dev).unwrap();
            assert_eq!(
                back.config.extra.get("_name_or_path"),
                Some(&serde_json::json!("kept"))
            );
            assert_eq!(
                max_abs_diff(&m.forward(&ids).unwrap(), &back.forward(&ids).unwrap()).unwrap(),
                0.0
            );
            // Saving over the folder it came from keeps its tokenizer files intact.
            save_dir(&back, out.path(), Some(out.path())).unwrap();
            assert_eq!(
                std::fs::read_to_string(out.path().join("tokenizer.json")).unwrap(),
                "{}"
            );
        }
    }

    #[test]
    fn half_precision_and_sharded_checkpoints_load() {
        let dev = Device::Cpu;
        let m = Llama::new(tiny(false), DType::F32, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), m.config.to_json()).unwrap();
        // Two bf16/f16 shards with an index, as transformers writes large models.
        let vars = m.named_vars();
        let (a, b) = vars.split_at(vars.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part, dt) in [
            ("model-00001-of-00002.safetensors", a, DType::BF16),
            ("model-00002-of-00002.safetensors", b, DType::F16),
        ] {
            let t: HashMap<String, Tensor> = part
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().to_dtype(dt).unwrap()))
                .collect();
            candle_core::safetensors::save(&t, dir.path().join(file)).unwrap();
            for (n, _) in part {
                weight_map.insert(n.clone(), serde_json::json!(file));
            }
        }
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            serde_json::json!({"weight_map": weight_map}).to_string(),
        )
        .unwrap();
        let back = load_dir(dir.path(), DType::F32, &dev).unwrap();
        let mut rounded = 0;
        for (name, var) in back.named_vars() {
            let orig = m.varmap.data().lock().unwrap()[&name].as_tensor().clone();
            let d = max_abs_diff(&orig, var.as_tensor()).unwrap();
            assert!(d < 2e-2, "{name}: {d} is more than half-precision rounding");
            rounded += usize::from(d > 0.0);
        }
        assert!(rounded > 0, "weights went through half precision");
        // A missing tensor is named.
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = load_dir(dir.path(), DType::F32, &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
