//! The Hugging Face model a GGUF file holds: the `config.json` transformers 5.24 writes for
//! it, and for every tensor its HF name and the fix-up that undoes llama.cpp's converter.
//!
//! Architectures: `llama` (also Mistral and SmolLM checkpoints, which llama.cpp converts as
//! `llama`), `mistral`, `qwen2`, `qwen3` and `gemma3` (text). Metadata that changes the
//! math and is not implemented is refused with the key named, never ignored: every `{arch}.*`
//! key is either read here, known to be harmless, allowed only at its neutral value, or an
//! error. Keys outside `{arch}.*` are not read by llama.cpp when it runs the model
//! (`general.*`, `tokenizer.*` which the tokenizer code reads, `split.*`, `quantize.*`), except
//! the namespaces of files that are not models (`adapter.*`, `clip.*`), which are refused.

use serde_json::{json, Map, Value as Json};

use super::dequant;
use super::reader::{Array, GgufError, GgufFile, Value};

/// A model architecture GGUF import understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    /// The architecture of a `general.architecture` value.
    pub fn from_gguf(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }

    /// The `general.architecture` name (and prefix of the architecture's keys).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            a => a.gguf_name(),
        }
    }
}

/// What must be done to a dequantized GGUF tensor to get the Hugging Face tensor back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    None,
    /// llama.cpp's converter interleaves the rows of Q and K (weights and biases) per head for
    /// arch `llama` (`LlamaModel.permute`); undo it with this many heads.
    UnpermuteRotary {
        heads: usize,
    },
    /// Gemma's converter stores RMSNorm weights as `1 + w` (HF computes `x · (1 + w)`).
    SubtractOne,
}

/// One tensor of the import.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorImport {
    pub gguf_name: String,
    pub hf_name: String,
    pub fixup: Fixup,
}

/// A GGUF file seen as a Hugging Face model.
#[derive(Debug, Clone)]
pub struct HfImport {
    pub arch: Arch,
    /// `config.json` exactly as transformers 5.24 writes it for this model.
    pub config_json: String,
    /// Every weight tensor, in file order. Tensors folded into the config (llama.cpp's
    /// `rope_freqs.weight`) are not listed.
    pub tensors: Vec<TensorImport>,
}

/// The transformers version whose `config.json` layout [`import`] reproduces.
pub const TRANSFORMERS_VERSION: &str = "5.24.0";

/// The Hugging Face name of GGUF tensor `gguf` in a model of `arch`, `None` for a tensor that
/// architecture does not have.
pub fn hf_tensor_name(arch: Arch, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let gemma = arch == Arch::Gemma3;
    let norms_qk = matches!(arch, Arch::Qwen3 | Arch::Gemma3);
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "attn_q_norm" if norms_qk => "self_attn.q_norm",
        "attn_k_norm" if norms_qk => "self_attn.k_norm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A short rendering of a metadata value for messages.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("[{} × {}]", a.len(), a.element_type_name()),
        Value::F32(x) => format!("{x}"),
        Value::F64(x) => format!("{x}"),
        Value::Bool(b) => b.to_string(),
        v => v
            .as_u64()
            .map_or_else(|| format!("{v:?}"), |x| x.to_string()),
    }
}

/// Whether a numeric or bool value equals `target` (1/0 for bools).
fn equals(v: &Value, target: f64) -> bool {
    match v {
        Value::Bool(b) => f64::from(u8::from(*b)) == target,
        Value::I8(x) => f64::from(*x) == target,
        Value::I16(x) => f64::from(*x) == target,
        Value::I32(x) => f64::from(*x) == target,
        Value::I64(x) => *x as f64 == target,
        v => v
            .as_u64()
            .map(|x| x as f64)
            .or_else(|| v.as_f64())
            .is_some_and(|x| x == target),
    }
}

/// Refuses metadata that would change the model's math and that is not implemented.
fn check_keys(f: &GgufFile, arch: Arch) -> Result<(), GgufError> {
    let prefix = format!("{}.", arch.gguf_name());
    for (key, v) in f.metadata() {
        if key.starts_with("adapter.") {
            return Err(f.unsupported(format!(
                "is a LoRA adapter ({key}), not a model; merge it into its base model first"
            )));
        }
        if key.starts_with("clip.") {
            return Err(f.unsupported(format!(
                "is a multimodal projector ({key}), not a language model; import the text model's GGUF"
            )));
        }
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        // (neutral value, what a different value would mean)
        let neutral: Option<(f64, &str)> = match rest {
            // Read by `import`.
            "context_length"
            | "embedding_length"
            | "block_count"
            | "feed_forward_length"
            | "vocab_size"
            | "attention.head_count"
            | "attention.head_count_kv"
            | "attention.key_length"
            | "attention.value_length"
            | "attention.layer_norm_rms_epsilon"
            | "rope.dimension_count"
            | "rope.freq_base"
            | "rope.scaling.type"
            | "rope.scaling.factor"
            | "rope.scale_linear"
            | "rope.scaling.original_context_length" => None,
            // Whether the model was fine-tuned at its scaled context: no effect on the math.
            "rope.scaling.finetuned" => None,
            "attention.sliding_window"
            | "attention.sliding_window_pattern"
            | "rope.freq_base_swa"
                if arch == Arch::Gemma3 =>
            {
                None
            }
            "attention.sliding_window" => Some((0.0, "sliding-window attention")),
            "expert_count" | "expert_used_count" | "expert_shared_count" => {
                Some((0.0, "a mixture of experts"))
            }
            "attn_logit_softcapping" | "final_logit_softcapping" => {
                Some((0.0, "logit soft-capping"))
            }
            "attention.max_alibi_bias" => Some((0.0, "ALiBi position biases")),
            "attention.clamp_kqv" => Some((0.0, "clamped Q/K/V activations")),
            "rope.scaling.attn_factor" => Some((1.0, "a RoPE attention factor")),
            "logit_scale" => Some((1.0, "scaled logits")),
            "residual_scale" => Some((1.0, "scaled residuals")),
            "embedding_scale" => Some((1.0, "scaled embeddings")),
            "attention.scale" => Some((1.0, "a custom attention scale")),
            "attention.causal" => Some((1.0, "non-causal attention")),
            "use_parallel_residual" => Some((0.0, "parallel attention and MLP residuals")),
            "pooling_type" => Some((0.0, "an embedding model's pooling")),
            _ => {
                return Err(f.unsupported(format!(
                    "has metadata {key} = {}, which Distillery does not know for architecture {}; \
                     it could change the model's math, so the file is refused rather than imported wrongly",
                    show(v),
                    arch.gguf_name()
                )))
            }
        };
        if let Some((value, what)) = neutral {
            if !equals(v, value) {
                return Err(f.unsupported(format!(
                    "has {key} = {}: {what}, which Distillery does not implement, so the model cannot be imported faithfully",
                    show(v)
                )));
            }
        }
    }
    Ok(())
}

/// The keys of one architecture.
struct Keys<'a> {
    f: &'a GgufFile,
    arch: Arch,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch.gguf_name())
    }

    fn required(&self, k: &str) -> Result<u64, GgufError> {
        self.uniform(k)?
            .ok_or_else(|| self.f.malformed(format!("has no {}", self.key(k))))
    }

    /// An integer that may also be written per layer (llama.cpp's `get_key_or_arr`); per-layer
    /// values must all be equal.
    fn uniform(&self, k: &str) -> Result<Option<u64>, GgufError> {
        let key = self.key(k);
        match self.f.get(&key) {
            Some(Value::Array(a)) => {
                let vals = a
                    .to_i64s()
                    .filter(|v| !v.is_empty() && v.iter().all(|&x| x >= 0))
                    .ok_or_else(|| {
                        self.f.malformed(format!(
                            "{key} is an array of {}, expected non-negative integers",
                            a.element_type_name()
                        ))
                    })?;
                if vals.iter().any(|&x| x != vals[0]) {
                    return Err(self.f.unsupported(format!(
                        "{key} differs between layers ({vals:?}); only models whose layers all have one shape are supported"
                    )));
                }
                Ok(Some(vals[0] as u64))
            }
            _ => self.f.get_u64(&key),
        }
    }

    fn float(&self, k: &str) -> Result<Option<f64>, GgufError> {
        self.f.get_f64_decimal(&self.key(k))
    }
}

/// Llama 3 RoPE scaling recovered from `rope_freqs.weight`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Llama3Rope {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: u64,
}

impl Llama3Rope {
    /// The divisor of each inverse frequency, as transformers' `_compute_llama3_parameters`
    /// and llama.cpp's converter compute it.
    fn factors(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let orig = self.original_max_position_embeddings as f64;
        let (low, high) = (self.low_freq_factor, self.high_freq_factor);
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < orig / high {
                    1.0
                } else if wavelen > orig / low {
                    self.factor
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }

    /// The parameters that give `factors` (llama.cpp's `rope_freqs`). Any (low, high, orig)
    /// with the same `orig / (high - low)` and `low / (high - low)` gives the same
    /// frequencies, so `orig` is taken from the file (or the converter's 8192) and low/high are
    /// fitted, rounded to 1/1000 and checked against every factor.
    fn fit(factors: &[f32], theta: f64, head_dim: usize, orig: u64) -> Option<Llama3Rope> {
        let factor = f64::from(factors.iter().copied().fold(f32::MIN, f32::max));
        if factors.len() != head_dim / 2 || factor.is_nan() || factor <= 1.0 {
            return None;
        }
        let pts: Vec<(f64, f64)> = factors
            .iter()
            .enumerate()
            .filter(|(_, &f)| {
                (f64::from(f) - 1.0).abs() > 1e-6 && (f64::from(f) - factor).abs() > 1e-6 * factor
            })
            .map(|(i, &f)| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let x = orig as f64 * freq / (2.0 * std::f64::consts::PI);
                let smooth = (1.0 / f64::from(f) - 1.0 / factor) / (1.0 - 1.0 / factor);
                (smooth, x)
            })
            .collect();
        let (low, high) = match pts.as_slice() {
            [] => (1.0, 4.0),
            [(s, x)] => (1.0, 1.0 + (x - 1.0) / s),
            [(s1, x1), .., (s2, x2)] => {
                let span = (x2 - x1) / (s2 - s1);
                let low = x1 - s1 * span;
                (low, low + span)
            }
        };
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        let r = Llama3Rope {
            factor,
            low_freq_factor: round(low),
            high_freq_factor: round(high),
            original_max_position_embeddings: orig,
        };
        if !(r.low_freq_factor > 0.0 && r.high_freq_factor > r.low_freq_factor) {
            return None;
        }
        let ok = r
            .factors(theta, head_dim)
            .iter()
            .zip(factors)
            .all(|(a, &b)| (a - f64::from(b)).abs() <= 1e-5 * a.abs());
        ok.then_some(r)
    }
}

enum RopeScaling {
    None,
    Linear(f64),
    Llama3(Llama3Rope),
}

/// Imports `f`'s metadata and tensor list; reads no tensor data except llama.cpp's small
/// `rope_freqs.weight`.
pub fn import(f: &GgufFile) -> Result<HfImport, GgufError> {
    let arch_name = f
        .get_str("general.architecture")?
        .ok_or_else(|| f.malformed("has no general.architecture"))?;
    let arch = Arch::from_gguf(arch_name).ok_or_else(|| {
        f.unsupported(format!(
            "has architecture {arch_name:?}, which Distillery does not import (llama, mistral, qwen2, qwen3, gemma3)"
        ))
    })?;
    if f.get_u64("split.count")?.is_some_and(|n| n > 1) {
        return Err(f.unsupported(
            "is one part of a split GGUF; merge the parts with `llama-gguf-split --merge` first",
        ));
    }
    check_keys(f, arch)?;
    let k = Keys { f, arch };
    let hidden = k.required("embedding_length")?;
    let layers = k.required("block_count")?;
    // Per-layer lists are built from it: a lying count is refused before they are.
    if layers > crate::shape::MAX_LAYERS {
        return Err(f.malformed(format!(
            "has {} = {layers}, more than the {} layers any model has",
            k.key("block_count"),
            crate::shape::MAX_LAYERS
        )));
    }
    let intermediate = k.required("feed_forward_length")?;
    let heads = k.required("attention.head_count")?;
    let kv_heads = k.uniform("attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(f.malformed(format!(
            "has {heads} attention heads, not a positive multiple of its {kv_heads} KV heads"
        )));
    }
    let head_dim = k.uniform("attention.key_length")?.unwrap_or(hidden / heads);
    let value_dim = k
        .uniform("attention.value_length")?
        .unwrap_or(hidden / heads);
    if value_dim != head_dim {
        return Err(f.unsupported(format!(
            "has {} = {head_dim} but {} = {value_dim}; only equal key and value head sizes are supported",
            k.key("attention.key_length"),
            k.key("attention.value_length")
        )));
    }
    if let Some(rot) = k.uniform("rope.dimension_count")? {
        if rot != head_dim {
            return Err(f.unsupported(format!(
                "has {} = {rot}: RoPE on part of the {head_dim} head channels is not supported",
                k.key("rope.dimension_count")
            )));
        }
    }
    let eps = k
        .float("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| {
            f.malformed(format!(
                "has no {}",
                k.key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    // llama.cpp's default when the key is absent.
    let theta = k.float("rope.freq_base")?.unwrap_or(10_000.0);
    let vocab = match (
        k.uniform("vocab_size")?,
        f.get_array("tokenizer.ggml.tokens")?,
    ) {
        (Some(v), _) => v,
        (None, Some(tokens)) => tokens.len() as u64,
        (None, None) => f
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| {
                f.malformed("has no vocabulary size (no vocab_size, tokens or token_embd.weight)")
            })?,
    };
    let head_dim_usize =
        usize::try_from(head_dim).map_err(|_| f.malformed("head_dim is too large"))?;

    let mut scaling = rope_scaling(&k)?;
    let mut tensors = Vec::new();
    for t in f.tensors() {
        if t.name == "rope_freqs.weight" && arch == Arch::Llama {
            let data = f.tensor_data(t)?;
            let factors = dequant::dequantize(t.ggml_type, &data, t.n_elements())
                .map_err(|e| f.unsupported(format!("tensor rope_freqs.weight: {e}")))?;
            let orig = k
                .uniform("rope.scaling.original_context_length")?
                .unwrap_or(8192);
            let fitted = Llama3Rope::fit(&factors, theta, head_dim_usize, orig).ok_or_else(|| {
                f.unsupported(
                    "has per-frequency RoPE factors (rope_freqs.weight) that are not Llama 3 scaling; they are not supported",
                )
            })?;
            if !matches!(scaling, RopeScaling::None) {
                return Err(f.unsupported(
                    "has both rope_freqs.weight and a RoPE scaling type; they cannot be combined",
                ));
            }
            scaling = RopeScaling::Llama3(fitted);
            continue;
        }
        let hf = hf_tensor_name(arch, &t.name).ok_or_else(|| {
            f.unsupported(format!(
                "has tensor {:?}, which a {} model does not have",
                t.name,
                arch.gguf_name()
            ))
        })?;
        if let Some(layer) = hf
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<u64>().ok())
        {
            if layer >= layers {
                return Err(
                    f.malformed(format!("has tensor {:?} but only {layers} layers", t.name))
                );
            }
        }
        if !dequant::is_supported(t.ggml_type) {
            return Err(f.unsupported(format!(
                "tensor {:?}: {}",
                t.name,
                dequant::DequantError::Unsupported(t.ggml_type)
            )));
        }
        let fixup = match arch {
            Arch::Llama if hf.contains(".self_attn.q_proj.") => Fixup::UnpermuteRotary {
                heads: heads as usize,
            },
            Arch::Llama if hf.contains(".self_attn.k_proj.") => Fixup::UnpermuteRotary {
                heads: kv_heads as usize,
            },
            Arch::Gemma3 if t.name.ends_with("norm.weight") => Fixup::SubtractOne,
            _ => Fixup::None,
        };
        tensors.push(TensorImport {
            gguf_name: t.name.clone(),
            hf_name: hf,
            fixup,
        });
    }
    let has = |suffix: &str| f.tensors().iter().any(|t| t.name.ends_with(suffix));
    let tied = f.tensor("output.weight").is_none();
    let token = |key: &str| -> Result<Option<u64>, GgufError> { f.get_u64(key) };

    let mut c = Map::new();
    // Keys and defaults of `<Model>Config(...).save_pretrained()` in transformers 5.24.
    put(&mut c, "attention_dropout", json!(0.0));
    put(&mut c, "initializer_range", json!(0.02));
    put(&mut c, "pad_token_id", Json::Null);
    put(&mut c, "transformers_version", json!(TRANSFORMERS_VERSION));
    put(&mut c, "use_cache", json!(true));
    put(&mut c, "model_type", json!(arch.model_type()));
    put(&mut c, "hidden_size", json!(hidden));
    put(&mut c, "intermediate_size", json!(intermediate));
    put(&mut c, "num_attention_heads", json!(heads));
    put(&mut c, "num_key_value_heads", json!(kv_heads));
    put(&mut c, "num_hidden_layers", json!(layers));
    put(&mut c, "vocab_size", json!(vocab));
    put(&mut c, "rms_norm_eps", json!(eps));
    put(&mut c, "tie_word_embeddings", json!(tied));
    let attention_bias = has(".attn_q.bias") || has(".attn_k.bias") || has(".attn_v.bias");
    let (bos, eos, max_pos) = match arch {
        Arch::Llama => {
            let o_bias = has(".attn_output.bias");
            put(&mut c, "attention_bias", json!(attention_bias || o_bias));
            put(
                &mut c,
                "mlp_bias",
                json!(has(".ffn_up.bias") || has(".ffn_down.bias")),
            );
            put(&mut c, "pretraining_tp", json!(1));
            put(&mut c, "head_dim", json!(head_dim));
            (json!(1), json!(2), 2048)
        }
        Arch::Mistral => {
            put(&mut c, "head_dim", json!(head_dim));
            // llama.cpp runs these files without a sliding window.
            put(&mut c, "sliding_window", Json::Null);
            (json!(1), json!(2), 131072)
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            put(
                &mut c,
                "layer_types",
                json!(vec!["full_attention"; layers as usize]),
            );
            put(&mut c, "max_window_layers", json!(28));
            put(&mut c, "sliding_window", Json::Null);
            put(&mut c, "use_sliding_window", json!(false));
            if arch == Arch::Qwen3 {
                put(&mut c, "attention_bias", json!(attention_bias));
                put(&mut c, "head_dim", json!(head_dim));
            } else if head_dim != hidden / heads {
                // Qwen2Config has no head_dim of its own; transformers keeps and uses one given.
                put(&mut c, "head_dim", json!(head_dim));
            }
            (Json::Null, Json::Null, 32768)
        }
        Arch::Gemma3 => {
            let shape = (theta, head_dim, hidden, heads, layers);
            gemma3(&k, &mut c, &scaling, shape)?;
            put(&mut c, "attention_bias", json!(attention_bias));
            (json!(2), json!(1), 131072)
        }
    };
    if arch != Arch::Gemma3 {
        put(&mut c, "hidden_act", json!("silu"));
        put(&mut c, "rope_parameters", rope_parameters(&scaling, theta));
    }
    let max_pos = k.uniform("context_length")?.unwrap_or(max_pos);
    put(&mut c, "max_position_embeddings", json!(max_pos));
    let bos = token("tokenizer.ggml.bos_token_id")?.map_or(bos, |v| json!(v));
    put(&mut c, "bos_token_id", bos);
    let eos = token("tokenizer.ggml.eos_token_id")?.map_or(eos, |v| json!(v));
    put(&mut c, "eos_token_id", eos);
    if let Some(pad) = token("tokenizer.ggml.padding_token_id")? {
        put(&mut c, "pad_token_id", json!(pad));
    }
    Ok(HfImport {
        arch,
        config_json: crate::py_json::to_config_text(&Json::Object(c)),
        tensors,
    })
}

fn put(c: &mut Map<String, Json>, key: &str, v: Json) {
    c.insert(key.to_string(), v);
}

/// transformers' `rope_parameters` for one kind of attention layer.
fn rope_parameters(scaling: &RopeScaling, theta: f64) -> Json {
    match scaling {
        RopeScaling::None => json!({"rope_theta": theta, "rope_type": "default"}),
        RopeScaling::Linear(factor) => {
            json!({"factor": factor, "rope_theta": theta, "rope_type": "linear"})
        }
        RopeScaling::Llama3(r) => json!({
            "factor": r.factor,
            "high_freq_factor": r.high_freq_factor,
            "low_freq_factor": r.low_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
            "rope_theta": theta,
            "rope_type": "llama3",
        }),
    }
}

/// `{arch}.rope.scaling.*`: none or linear (llama.cpp's default type is linear, and a factor
/// of 0 or 1 means no scaling).
fn rope_scaling(k: &Keys) -> Result<RopeScaling, GgufError> {
    let key = k.key("rope.scaling.type");
    let ty = k.f.get_str(&key)?;
    let factor = match k.float("rope.scaling.factor")? {
        Some(v) => Some(v),
        None => k.float("rope.scale_linear")?,
    };
    let scaled = factor.filter(|&v| v != 0.0 && v != 1.0);
    match (ty.unwrap_or("linear"), scaled) {
        ("none" | "linear", None) => Ok(RopeScaling::None),
        ("linear", Some(v)) => Ok(RopeScaling::Linear(v)),
        ("none", Some(v)) => Err(k.f.unsupported(format!(
            "has {key} = \"none\" but a RoPE scaling factor {v}; the file contradicts itself"
        ))),
        (other, _) => Err(k.f.unsupported(format!(
            "has {key} = {other:?}: only linear RoPE scaling (and Llama 3's) is implemented"
        ))),
    }
}

/// Gemma 3's config. llama.cpp hard-codes much of it rather than reading metadata (see
/// `llama_model::load_hparams`, case `LLM_ARCH_GEMMA3`): every sixth layer is global and the
/// rest slide (`set_swa_pattern(6)`); sliding layers use RoPE base 10000 unscaled; the
/// attention scale is 1/sqrt(head_dim) except for the 27B model (62 layers), which uses
/// 1/sqrt(hidden / heads); embeddings are scaled by sqrt(hidden) and the MLP is GELU (tanh)
/// in the graph. Keys in the file that disagree with those fixed choices are refused.
fn gemma3(
    k: &Keys,
    c: &mut Map<String, Json>,
    scaling: &RopeScaling,
    (theta, head_dim, hidden, heads, layers): (f64, u64, u64, u64, u64),
) -> Result<(), GgufError> {
    const PATTERN: u64 = 6;
    const LOCAL_THETA: f64 = 10_000.0;
    let f = k.f;
    // Newer llama.cpp treats a missing or zero window as no sliding window at all.
    let window = k.uniform("attention.sliding_window")?.filter(|&w| w > 0);
    let sliding: Vec<bool> = (0..layers)
        .map(|i| window.is_some() && (i + 1) % PATTERN != 0)
        .collect();
    let pattern_key = k.key("attention.sliding_window_pattern");
    match f.get(&pattern_key) {
        None => {}
        Some(Value::Array(Array::Bool(p))) if *p == sliding => {}
        Some(v) if v.as_u64() == Some(PATTERN) => {}
        Some(v) => {
            return Err(f.unsupported(format!(
                "has {pattern_key} = {}; llama.cpp runs gemma3 with every {PATTERN}th layer global, and other patterns are not supported",
                show(v)
            )))
        }
    }
    if let Some(local) = k.float("rope.freq_base_swa")? {
        if local != LOCAL_THETA {
            return Err(f.unsupported(format!(
                "has {} = {local}; llama.cpp uses {LOCAL_THETA} for gemma3's sliding layers whatever the file says, so the file is ambiguous",
                k.key("rope.freq_base_swa")
            )));
        }
    }
    if let RopeScaling::Llama3(_) = scaling {
        return Err(f.unsupported("has Llama 3 RoPE scaling (rope_freqs.weight) on a gemma3 model"));
    }
    put(
        c,
        "rope_parameters",
        json!({
            "full_attention": rope_parameters(scaling, theta),
            "sliding_attention": rope_parameters(&RopeScaling::None, LOCAL_THETA),
        }),
    );
    let kinds = sliding.iter().map(|&s| {
        json!(if s {
            "sliding_attention"
        } else {
            "full_attention"
        })
    });
    put(c, "layer_types", Json::Array(kinds.collect()));
    put(c, "sliding_window", window.map_or(Json::Null, |w| json!(w)));
    put(c, "_sliding_window_pattern", json!(PATTERN));
    let scalar = if layers == 62 {
        hidden / heads
    } else {
        head_dim
    };
    put(c, "query_pre_attn_scalar", json!(scalar));
    put(c, "hidden_activation", json!("gelu_pytorch_tanh"));
    put(c, "head_dim", json!(head_dim));
    put(c, "attn_logit_softcapping", Json::Null);
    put(c, "final_logit_softcapping", Json::Null);
    put(c, "use_bidirectional_attention", json!(false));
    Ok(())
}

#[cfg(test)]
mod tests;
