//! What every ML task driver needs: its device, models and data from inputs, parameters, and
//! errors mapped to retryable or fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use distillery_proto::v1 as pb;
use sha2::Digest;
use tokenizers::Tokenizer;

use crate::model::{io, tokenizer, Llama};
use crate::runner::{TaskContext, TaskError};

/// Bad input (a model, a corpus, a parameter): retrying cannot help.
pub fn fatal(what: impl std::fmt::Display) -> TaskError {
    TaskError::fatal(what.to_string())
}

/// The candle device of an assignment (`cpu`, `cpu:N`, `cuda:N`).
pub fn device(task: &pb::TaskAssignment) -> Result<Device, TaskError> {
    let d = task.device.as_str();
    if d.is_empty() || d == "cpu" || d.starts_with("cpu:") {
        return Ok(Device::Cpu);
    }
    if let Some(i) = d.strip_prefix("cuda:") {
        let i: usize = i
            .parse()
            .map_err(|_| fatal(format!("device {d:?} is not cuda:N")))?;
        #[cfg(feature = "cuda")]
        {
            return Device::new_cuda(i).map_err(|e| fatal(format!("device {d}: {e}")));
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = i;
            return Err(fatal(format!(
                "device {d}: this worker was built without the cuda feature (scripts/build-cuda.sh)"
            )));
        }
    }
    Err(fatal(format!("unknown device {d:?}")))
}

/// A required input reference.
pub fn input<'a>(task: &'a pb::TaskAssignment, name: &str) -> Result<&'a str, TaskError> {
    task.inputs
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| fatal(format!("{} task has no input {name:?}", task.kind)))
}

/// A required numeric parameter.
pub fn param_usize(task: &pb::TaskAssignment, name: &str) -> Result<usize, TaskError> {
    let v = task
        .params
        .get(name)
        .ok_or_else(|| fatal(format!("{} task has no parameter {name:?}", task.kind)))?;
    v.parse().map_err(|_| {
        fatal(format!(
            "{} task parameter {name}={v:?} is not a number",
            task.kind
        ))
    })
}

/// The model an input names, as a local Hugging Face directory: a GGUF file is converted once
/// into the worker's work dir (keyed by its path and size).
pub fn model_dir(ctx: &TaskContext, reference: &str) -> Result<PathBuf, TaskError> {
    let p = ctx.fetch(reference)?;
    if p.is_dir() {
        return Ok(p);
    }
    if !p.exists() {
        return Err(fatal(format!("model {} does not exist", p.display())));
    }
    let meta = std::fs::metadata(&p).map_err(|e| fatal(format!("{}: {e}", p.display())))?;
    let key = hex::encode(sha2::Sha256::digest(
        format!("{}:{}", p.display(), meta.len()).as_bytes(),
    ));
    let root = ctx
        .work_dir()
        .parent()
        .unwrap_or(ctx.work_dir())
        .join("converted");
    let out = root.join(&key[..16]);
    if !out.join(".complete").exists() {
        let tmp = root.join(format!("{}.tmp", &key[..16]));
        let _ = std::fs::remove_dir_all(&tmp);
        io::convert(&p, &tmp).map_err(fatal)?;
        let _ = std::fs::remove_dir_all(&out);
        std::fs::rename(&tmp, &out)
            .map_err(|e| TaskError::retryable(format!("{}: {e}", out.display())))?;
        std::fs::write(out.join(".complete"), b"")
            .map_err(|e| TaskError::retryable(format!("{}: {e}", out.display())))?;
    }
    Ok(out)
}

/// Loads a model directory in f32 on `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<Llama, TaskError> {
    io::load_dir(dir, DType::F32, device).map_err(fatal)
}

/// The tokenizer of a model directory.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, TaskError> {
    tokenizer::load(&dir.join("tokenizer.json")).map_err(|e| {
        fatal(format!(
            "{e}; the model needs a tokenizer.json (convert GGUF files with `worker convert`)"
        ))
    })
}

/// The end-of-sequence id of a model, used between packed documents.
pub fn eos_id(model: &Llama) -> Option<u32> {
    let v = model.config.eos_token_id.as_ref()?;
    v.as_u64()
        .or_else(|| v.as_array()?.first()?.as_u64())
        .map(|x| x as u32)
}

/// The campaign's calibration sequences for this model's tokenizer.
pub fn calibration(
    task: &pb::TaskAssignment,
    model: &Llama,
    tok: &Tokenizer,
) -> Result<Vec<Vec<u32>>, TaskError> {
    let c = task
        .spec
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.calibration.as_ref())
        .ok_or_else(|| fatal("the campaign spec has no data.calibration"))?;
    crate::data::load_sequences(
        Path::new(&c.path),
        tok,
        eos_id(model),
        c.seq_len as usize,
        c.samples as usize,
    )
    .map_err(|e| fatal(format!("data.calibration: {e}")))
}

/// Progress metrics as reported: under `progress.`, so the latest progress the coordinator keeps
/// in a round's metrics never overwrites a result (`perplexity`, `judge.*`, ...).
pub fn progress_metrics(metrics: &[(&str, f64)]) -> BTreeMap<String, f64> {
    metrics
        .iter()
        .map(|(k, v)| (format!("progress.{k}"), *v))
        .collect()
}

/// Reports progress, mapping a lost lease to cancellation; returns whether to go on.
pub fn report(ctx: &TaskContext, metrics: &[(&str, f64)], message: &str) -> bool {
    ctx.progress(progress_metrics(metrics), None, message)
        .is_ok()
        && !ctx.cancelled()
}

/// Inputs named `name` or `name.N`, in N order.
pub fn numbered_inputs<'a>(task: &'a pb::TaskAssignment, name: &str) -> Vec<(&'a str, &'a str)> {
    let mut v: Vec<(Option<usize>, &str, &str)> = task
        .inputs
        .iter()
        .filter_map(|(k, r)| {
            if k == name {
                return Some((None, k.as_str(), r.as_str()));
            }
            let n = k.strip_prefix(name)?.strip_prefix('.')?.parse().ok()?;
            Some((Some(n), k.as_str(), r.as_str()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, k, r)| (k, r)).collect()
}
