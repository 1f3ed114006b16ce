//! Decoder configuration for the architectures Distillery implements — Llama 2/3 (and SmolLM),
//! Mistral, Qwen2, Qwen3 and Gemma 3 (text) — read from a Hugging Face `config.json` exactly
//! as transformers 5 reads it (`rope_parameters`, `layer_types`) or as older versions wrote it
//! (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`), and written
//! back in the current format so transformers loads it with the same logits.
//!
//! No key is ignored by accident: every key of `config.json` is either read into a field that
//! changes the computation, or on [`INERT_KEYS`] (keys known not to change the logits, kept as
//! they are), or the config is refused with an error naming the key. Values that would change
//! the math in a way this code does not implement (`rope_type = "yarn"`, logit soft-capping,
//! `partial_rotary_factor` < 1, …) are refused the same way.

use serde_json::{json, Map, Value};

/// The architectures implemented (`model_type` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 3, text only (`gemma3_text`): embeddings scaled by √hidden, RMSNorm with (1 + w),
    /// GeGLU with tanh-GELU, q/k norms, norms before and after attention and MLP, sliding-window
    /// layers with their own RoPE base, attention scaled by `query_pre_attn_scalar`.
    Gemma3,
}

impl Arch {
    /// The `model_type` transformers writes.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3_text",
        }
    }

    /// The transformers class that loads it (`architectures`).
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// The architecture of a `model_type`.
    pub fn from_model_type(t: &str) -> Option<Arch> {
        Some(match t {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3,
            _ => return None,
        })
    }

    /// Per-head RMSNorms on queries and keys (over `head_dim`, before RoPE).
    pub fn qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's layout: RMSNorm scales by (1 + w), extra norms after attention and MLP, scaled
    /// embeddings.
    pub fn gemma(self) -> bool {
        self == Arch::Gemma3
    }
}

/// How RoPE frequencies are scaled (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// One RoPE: base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Attention kind of a layer (`layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    /// Attends to the last `sliding_window` positions only (itself included).
    Sliding,
}

impl LayerType {
    fn name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// Keys that do not change the logits (training-only, bookkeeping, generation defaults that
/// `generation_config.json` governs, token ids the tokenizer side reads). They are kept
/// verbatim in [`LlamaConfig::extra`] and written back.
pub const INERT_KEYS: &[&str] = &[
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "name_or_path",
    "initializer_range",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "pretraining_tp",
    "cache_implementation",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "torchscript",
    "tf_legacy_loss",
    "use_bfloat16",
    "pruned_heads",
    // Generation defaults older transformers wrote into config.json; generation reads
    // generation_config.json (and the request) instead.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    // SmolLM2's own markers, with no effect in transformers.
    "is_llama_config",
    "transformers.js_config",
    // Gemma 3: what transformers writes beside layer_types and never reads back.
    "_sliding_window_pattern",
    // Qwen2/3: the layer count from which sliding windows apply, read only to derive
    // `layer_types` when it is absent (then it is read, see `max_window_layers` below).
    "max_window_layers",
];

/// Keys this code reads (besides [`INERT_KEYS`]); anything else is refused.
const READ_KEYS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_local_base_freq",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "hidden_activation",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "sliding_window_pattern",
    "query_pre_attn_scalar",
    "attention_dropout",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
    "rope_interleaved",
    "partial_rotary_factor",
];

/// The model configuration. Fields are what the computation uses; `extra` holds the inert keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as written (one of [`Arch::model_type`]).
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of the full-attention layers.
    pub rope_theta: f64,
    /// RoPE scaling of the full-attention layers.
    pub rope_scaling: RopeScaling,
    /// RoPE of the sliding-window layers when it differs (Gemma 3's local base).
    pub rope_local: Option<Rope>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// `silu` (SwiGLU) or `gelu_pytorch_tanh` (Gemma's GeGLU).
    pub hidden_act: String,
    /// Window of the sliding layers (positions attended, the query's own included).
    pub sliding_window: Option<usize>,
    /// Qwen2/3: whether `sliding_window` is in force at all.
    pub use_sliding_window: bool,
    /// One per layer.
    pub layer_types: Vec<LayerType>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5` (else `head_dim^-0.5`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Random initialization only.
    pub initializer_range: f64,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    /// The inert keys, verbatim.
    pub extra: Map<String, Value>,
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
}

fn bad<T>(m: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(m.into()))
}

/// Reads keys off a JSON object, remembering which were read.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn present(&self, k: &str) -> Option<&Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn usize(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) => Ok(Some(x as usize)),
                None => bad(format!("{k} = {v} must be a non-negative integer")),
            },
        }
    }

    fn need(&self, k: &str) -> Result<usize, ConfigError> {
        self.usize(k)?
            .ok_or_else(|| ConfigError::Invalid(format!("has no integer {k}")))
    }

    fn f64(&self, k: &str) -> Result<Option<f64>, ConfigError> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) => Ok(Some(x)),
                None => bad(format!("{k} = {v} must be a number")),
            },
        }
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ConfigError> {
        match self.present(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => bad(format!("{k} = {v} must be true or false")),
        }
    }

    fn str(&self, k: &str) -> Result<Option<String>, ConfigError> {
        match self.present(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => bad(format!("{k} = {v} must be a string")),
        }
    }
}

/// Parses one RoPE parameter set (`{rope_type, rope_theta, factor, …}`), the theta defaulting to
/// `theta` when the set has none, llama3's `original_max_position_embeddings` to `max_pos` (as
/// transformers' `standardize_rope_params` fills it). `what` names it in errors.
fn parse_rope(
    v: &Value,
    theta: Option<f64>,
    max_pos: usize,
    what: &str,
) -> Result<Rope, ConfigError> {
    let Some(obj) = v.as_object() else {
        return bad(format!("{what} = {v} must be an object"));
    };
    let r = Reader { obj };
    let kind = r
        .str("rope_type")?
        .or(r.str("type")?)
        .unwrap_or_else(|| "default".into());
    let allowed: &[&str] = match kind.as_str() {
        "default" => &["rope_type", "type", "rope_theta"],
        "linear" => &["rope_type", "type", "rope_theta", "factor"],
        "llama3" => &[
            "rope_type",
            "type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        other => {
            return bad(format!(
                "{what}.rope_type = {other:?} is not implemented (default, linear, llama3 are); \
                 a model with this RoPE would give different logits here than in transformers"
            ))
        }
    };
    for (k, val) in obj {
        if k == "partial_rotary_factor" && val.as_f64() == Some(1.0) {
            continue;
        }
        if !allowed.contains(&k.as_str()) && !val.is_null() {
            return bad(format!(
                "{what}.{k} = {val} is not implemented for rope_type {kind:?}"
            ));
        }
    }
    let theta = match r.f64("rope_theta")?.or(theta) {
        Some(t) if t > 0.0 => t,
        Some(t) => return bad(format!("{what}.rope_theta = {t} must be positive")),
        None => return bad(format!("{what} has no rope_theta")),
    };
    let factor = |r: &Reader| -> Result<f64, ConfigError> {
        match r.f64("factor")? {
            Some(f) if f >= 1.0 => Ok(f),
            Some(f) => bad(format!("{what}.factor = {f} must be at least 1")),
            None => bad(format!("{what} ({kind}) has no factor")),
        }
    };
    let scaling = match kind.as_str() {
        "linear" => RopeScaling::Linear {
            factor: factor(&r)?,
        },
        "llama3" => {
            // transformers requires both factors (a KeyError otherwise): no default here either.
            let need = |k: &str| -> Result<f64, ConfigError> {
                r.f64(k)?
                    .ok_or_else(|| ConfigError::Invalid(format!("{what} (llama3) has no {k}")))
            };
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if !(low > 0.0 && high > low) {
                return bad(format!(
                    "{what}: llama3 needs 0 < low_freq_factor < high_freq_factor (got {low}, {high})"
                ));
            }
            RopeScaling::Llama3 {
                factor: factor(&r)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: r
                    .f64("original_max_position_embeddings")?
                    .unwrap_or(max_pos as f64),
            }
        }
        _ => RopeScaling::Default,
    };
    Ok(Rope { theta, scaling })
}

fn rope_json(r: &Rope) -> Value {
    let mut m = Map::new();
    m.insert("rope_theta".into(), json!(r.theta));
    match &r.scaling {
        RopeScaling::Default => {
            m.insert("rope_type".into(), json!("default"));
        }
        RopeScaling::Linear { factor } => {
            m.insert("rope_type".into(), json!("linear"));
            m.insert("factor".into(), json!(factor));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            m.insert("rope_type".into(), json!("llama3"));
            m.insert("factor".into(), json!(factor));
            m.insert("low_freq_factor".into(), json!(low_freq_factor));
            m.insert("high_freq_factor".into(), json!(high_freq_factor));
            m.insert(
                "original_max_position_embeddings".into(),
                json!(*original_max_position_embeddings as u64),
            );
        }
    }
    Value::Object(m)
}

impl LlamaConfig {
    /// Parses and checks a `config.json` text.
    pub fn from_json(text: &str) -> Result<LlamaConfig, ConfigError> {
        let v: Value = serde_json::from_str(text)?;
        let Some(obj) = v.as_object() else {
            return bad("must be a JSON object");
        };
        Self::from_map(obj)
    }

    fn from_map(obj: &Map<String, Value>) -> Result<LlamaConfig, ConfigError> {
        let r = Reader { obj };
        let model_type = r.str("model_type")?.unwrap_or_else(|| "llama".into());
        let Some(arch) = Arch::from_model_type(&model_type) else {
            let hint = if model_type == "gemma3" {
                " (this is Gemma 3's multimodal config; the text model is the one with model_type \
                 \"gemma3_text\", e.g. google/gemma-3-1b-it)"
            } else {
                ""
            };
            return bad(format!(
                "model_type {model_type:?} is not implemented (llama, mistral, qwen2, qwen3, \
                 gemma3_text are){hint}"
            ));
        };
        for k in obj.keys() {
            if !READ_KEYS.contains(&k.as_str()) && !INERT_KEYS.contains(&k.as_str()) {
                return bad(format!(
                    "key {k:?} is not one Distillery implements or knows to leave the logits \
                     unchanged, so the model is refused rather than run differently from \
                     transformers (remove the key if you know it does not matter)"
                ));
            }
        }
        // Values that change the math and are not implemented.
        for k in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if let Some(v) = r.present(k) {
                return bad(format!("{k} = {v}: logit soft-capping is not implemented"));
            }
        }
        if r.bool("use_bidirectional_attention")? == Some(true) {
            return bad("use_bidirectional_attention = true is not implemented (causal only)");
        }
        if r.bool("rope_interleaved")? == Some(true) {
            return bad("rope_interleaved = true is not implemented (rotate-half RoPE only)");
        }
        if let Some(p) = r.f64("partial_rotary_factor")? {
            if p != 1.0 {
                return bad(format!(
                    "partial_rotary_factor = {p} is not implemented (RoPE over the whole head only)"
                ));
            }
        }
        if let Some(d) = r.f64("attention_dropout")? {
            if d != 0.0 {
                return bad(format!(
                    "attention_dropout = {d}: distillation trains without dropout; set it to 0.0"
                ));
            }
        }

        let hidden_act = match arch {
            Arch::Gemma3 => {
                // transformers' Gemma 3 reads hidden_activation only; a hidden_act that says
                // something else is ambiguous and refused.
                let act = r
                    .str("hidden_activation")?
                    .unwrap_or_else(|| "gelu_pytorch_tanh".into());
                if let Some(other) = r.str("hidden_act")?.filter(|a| *a != act) {
                    return bad(format!(
                        "hidden_act = {other:?} but hidden_activation = {act:?}: transformers' \
                         Gemma 3 uses hidden_activation only; remove hidden_act"
                    ));
                }
                act
            }
            _ => r.str("hidden_act")?.unwrap_or_else(|| "silu".into()),
        };
        let num_hidden_layers = r.need("num_hidden_layers")?;
        // Before any per-layer vector is allocated from it.
        if num_hidden_layers as u64 > distillery_proto::shape::MAX_LAYERS {
            return bad(format!(
                "num_hidden_layers = {num_hidden_layers}: more than {} layers, which no model has (a corrupt config?)",
                distillery_proto::shape::MAX_LAYERS
            ));
        }
        let max_position_embeddings = r.usize("max_position_embeddings")?.unwrap_or(match arch {
            Arch::Llama => 2048,
            Arch::Mistral | Arch::Gemma3 => 131_072,
            Arch::Qwen2 | Arch::Qwen3 => 32_768,
        });

        // RoPE: `rope_parameters` (transformers 5; per layer type for Gemma 3) or the legacy keys.
        let legacy_theta = r.f64("rope_theta")?;
        let (rope, rope_local) = if arch == Arch::Gemma3 {
            let local_theta = r.f64("rope_local_base_freq")?.unwrap_or(10_000.0);
            let global_theta = legacy_theta.unwrap_or(1_000_000.0);
            let default = |theta| Rope {
                theta,
                scaling: RopeScaling::Default,
            };
            let mp = max_position_embeddings;
            match (r.present("rope_parameters"), r.present("rope_scaling")) {
                (Some(_), Some(_)) => return bad(
                    "has both rope_parameters and the legacy rope_scaling; transformers merges \
                         rope_scaling into rope_parameters.full_attention: write that one only",
                ),
                (Some(p), None) => {
                    let Some(po) = p.as_object() else {
                        return bad("rope_parameters must be an object");
                    };
                    // transformers reads only the per-layer-type form for Gemma 3 and silently
                    // replaces anything else with the defaults: refuse it instead.
                    if let Some(k) = po
                        .keys()
                        .find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
                    {
                        return bad(format!(
                            "rope_parameters.{k}: Gemma 3's rope_parameters must be per layer type \
                             ({{\"full_attention\": {{…}}, \"sliding_attention\": {{…}}}})"
                        ));
                    }
                    let get = |k: &str, theta: f64| match po.get(k).filter(|v| !v.is_null()) {
                        Some(v) => parse_rope(v, Some(theta), mp, &format!("rope_parameters.{k}")),
                        None => Ok(default(theta)),
                    };
                    (
                        get("full_attention", global_theta)?,
                        Some(get("sliding_attention", local_theta)?),
                    )
                }
                // Legacy: `rope_scaling` applies to the global layers only.
                (None, Some(sc)) => (
                    parse_rope(sc, Some(global_theta), mp, "rope_scaling")?,
                    Some(default(local_theta)),
                ),
                (None, None) => (default(global_theta), Some(default(local_theta))),
            }
        } else {
            if r.present("rope_local_base_freq").is_some() {
                return bad("rope_local_base_freq is a Gemma key; this is not a Gemma model");
            }
            let theta = legacy_theta.unwrap_or(10_000.0);
            let mp = max_position_embeddings;
            let rope = match (r.present("rope_parameters"), r.present("rope_scaling")) {
                (Some(p), Some(sc)) => {
                    // transformers takes rope_scaling over rope_parameters; accept the pair only
                    // when they say the same.
                    let (a, b) = (
                        parse_rope(p, Some(theta), mp, "rope_parameters")?,
                        parse_rope(sc, Some(theta), mp, "rope_scaling")?,
                    );
                    if a != b {
                        return bad(
                            "has both rope_parameters and the legacy rope_scaling, and they \
                             differ (transformers would use rope_scaling): keep one",
                        );
                    }
                    a
                }
                (Some(p), None) => parse_rope(p, Some(theta), mp, "rope_parameters")?,
                (None, Some(sc)) => parse_rope(sc, Some(theta), mp, "rope_scaling")?,
                (None, None) => Rope {
                    theta,
                    scaling: RopeScaling::Default,
                },
            };
            (rope, None)
        };

        // Attention kinds per layer.
        // Absent, transformers' default window applies (4096 for Mistral, Qwen2/3 and Gemma 3);
        // an explicit null is no window.
        let sliding_window = match obj.get("sliding_window") {
            None if arch != Arch::Llama => Some(4096),
            _ => r.usize("sliding_window")?,
        };
        let use_sliding_window = match arch {
            Arch::Qwen2 | Arch::Qwen3 => r.bool("use_sliding_window")?.unwrap_or(false),
            _ => {
                if r.present("use_sliding_window").is_some() {
                    return bad(format!("use_sliding_window is not a {model_type} key"));
                }
                sliding_window.is_some()
            }
        };
        let effective_window = sliding_window.filter(|_| use_sliding_window);
        let layer_types: Vec<LayerType> = match r.present("layer_types") {
            Some(Value::Array(a)) => {
                if a.len() != num_hidden_layers {
                    return bad(format!(
                        "layer_types has {} entries for {num_hidden_layers} layers",
                        a.len()
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        Some("full_attention") => Ok(LayerType::Full),
                        Some("sliding_attention") => Ok(LayerType::Sliding),
                        _ => bad(format!(
                            "layer_types[{i}] = {t} is not implemented (full_attention, sliding_attention are)"
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(v) => return bad(format!("layer_types = {v} must be a list")),
            None => match arch {
                Arch::Gemma3 => {
                    // transformers derives it from `sliding_window_pattern` only (the
                    // `_sliding_window_pattern` it writes is never read back).
                    let pattern = r.usize("sliding_window_pattern")?.unwrap_or(6).max(1);
                    (0..num_hidden_layers)
                        .map(|i| {
                            if (i + 1) % pattern != 0 {
                                LayerType::Sliding
                            } else {
                                LayerType::Full
                            }
                        })
                        .collect()
                }
                Arch::Qwen2 | Arch::Qwen3 => {
                    let from = r.usize("max_window_layers")?.unwrap_or(28);
                    (0..num_hidden_layers)
                        .map(|i| {
                            if effective_window.is_some() && i >= from {
                                LayerType::Sliding
                            } else {
                                LayerType::Full
                            }
                        })
                        .collect()
                }
                Arch::Mistral if effective_window.is_some() => {
                    vec![LayerType::Sliding; num_hidden_layers]
                }
                _ => vec![LayerType::Full; num_hidden_layers],
            },
        };
        if arch == Arch::Llama && sliding_window.is_some() {
            return bad("sliding_window is not a llama key (use model_type \"mistral\")");
        }
        // transformers' Mistral applies `sliding_window` to every layer whatever layer_types
        // says: a layer_types that says otherwise is refused, not followed.
        if arch == Arch::Mistral {
            let every = if effective_window.is_some() {
                LayerType::Sliding
            } else {
                LayerType::Full
            };
            if layer_types.iter().any(|t| *t != every) {
                return bad(format!(
                    "layer_types disagrees with sliding_window = {effective_window:?}: \
                     transformers' Mistral applies sliding_window to every layer; remove \
                     layer_types (or use a model type with per-layer attention kinds)"
                ));
            }
        }

        let mut extra = Map::new();
        for k in INERT_KEYS {
            if let Some(v) = obj.get(*k) {
                extra.insert((*k).to_string(), v.clone());
            }
        }
        let c = LlamaConfig {
            model_type: arch.model_type().to_string(),
            hidden_size: r.need("hidden_size")?,
            intermediate_size: r.need("intermediate_size")?,
            num_attention_heads: r.need("num_attention_heads")?,
            // Absent keys take transformers' per-class defaults.
            num_key_value_heads: r.usize("num_key_value_heads")?.or(match arch {
                Arch::Llama => None,
                Arch::Mistral => Some(8),
                Arch::Qwen2 | Arch::Qwen3 => Some(32),
                Arch::Gemma3 => Some(4),
            }),
            head_dim: r.usize("head_dim")?.or(match arch {
                Arch::Qwen3 => Some(128),
                Arch::Gemma3 => Some(256),
                _ => None,
            }),
            num_hidden_layers,
            vocab_size: r.need("vocab_size")?,
            rms_norm_eps: r.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            rope_local,
            max_position_embeddings,
            tie_word_embeddings: r
                .bool("tie_word_embeddings")?
                .unwrap_or(arch == Arch::Gemma3),
            // Qwen2 always has q/k/v biases; transformers does not write the flag for it.
            attention_bias: arch == Arch::Qwen2 || r.bool("attention_bias")?.unwrap_or(false),
            mlp_bias: r.bool("mlp_bias")?.unwrap_or(false),
            hidden_act,
            sliding_window,
            use_sliding_window,
            layer_types,
            query_pre_attn_scalar: match arch {
                Arch::Gemma3 => Some(r.f64("query_pre_attn_scalar")?.unwrap_or(256.0)),
                _ => {
                    if r.present("query_pre_attn_scalar").is_some() {
                        return bad(format!("query_pre_attn_scalar is not a {model_type} key"));
                    }
                    None
                }
            },
            initializer_range: r.f64("initializer_range")?.unwrap_or(0.02),
            bos_token_id: r.present("bos_token_id").cloned(),
            eos_token_id: r.present("eos_token_id").cloned(),
            extra,
        };
        c.validate()?;
        Ok(c)
    }

    /// The architecture (`model_type` is always one of [`Arch::model_type`]).
    pub fn arch(&self) -> Arch {
        Arch::from_model_type(&self.model_type).unwrap_or(Arch::Llama)
    }

    /// Checks the shape is one this implementation runs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(arch) = Arch::from_model_type(&self.model_type) else {
            return bad(format!(
                "model_type {:?} is not implemented (llama, mistral, qwen2, qwen3, gemma3_text are)",
                self.model_type
            ));
        };
        let act_ok = match arch {
            Arch::Gemma3 => self.hidden_act == "gelu_pytorch_tanh",
            _ => self.hidden_act == "silu",
        };
        if !act_ok {
            return bad(format!(
                "hidden_act {:?} is not implemented for {} (SwiGLU with silu; Gemma: GeGLU with gelu_pytorch_tanh)",
                self.hidden_act, self.model_type
            ));
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if self.num_hidden_layers as u64 > distillery_proto::shape::MAX_LAYERS {
            return bad(format!(
                "num_hidden_layers = {}: more than {} layers, which no model has (a corrupt config?)",
                self.num_hidden_layers,
                distillery_proto::shape::MAX_LAYERS
            ));
        }
        // Widths are allocated and multiplied: bounded before either (and they fit the u32s of
        // a `ModelShape`).
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("vocab_size", self.vocab_size),
        ] {
            if v as u64 > distillery_proto::shape::MAX_WIDTH {
                return bad(format!(
                    "{name} = {v}: larger than {}, which no model has (a corrupt config?)",
                    distillery_proto::shape::MAX_WIDTH
                ));
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive for RoPE",
                self.head_dim()
            ));
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "{} layer types for {} layers",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window is 0");
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE of the full-attention layers.
    pub fn rope(&self) -> Rope {
        Rope {
            theta: self.rope_theta,
            scaling: self.rope_scaling.clone(),
        }
    }

    /// The RoPE layer `i` uses.
    pub fn layer_rope(&self, i: usize) -> Rope {
        match (self.layer_types.get(i), &self.rope_local) {
            (Some(LayerType::Sliding), Some(local)) => local.clone(),
            _ => self.rope(),
        }
    }

    /// The attention window of layer `i` (`None`: all previous positions).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match self.layer_types.get(i) {
            Some(LayerType::Sliding) if self.use_sliding_window => self.sliding_window,
            _ => None,
        }
    }

    /// The factor attention scores are multiplied by.
    pub fn attention_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => s.powf(-0.5),
            None => (self.head_dim() as f64).powf(-0.5),
        }
    }

    /// As JSON for `config.json`, the way transformers 5 writes this architecture, with
    /// `head_dim` and `num_key_value_heads` explicit (a pruned model's head_dim is no longer
    /// hidden / heads) and the inert keys kept.
    pub fn to_json(&self) -> String {
        let arch = self.arch();
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_type", json!(self.model_type));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_kv_heads()));
        put("head_dim", json!(self.head_dim()));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("vocab_size", json!(self.vocab_size));
        put("rms_norm_eps", json!(self.rms_norm_eps));
        put(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        put("tie_word_embeddings", json!(self.tie_word_embeddings));
        put("attention_dropout", json!(0.0));
        match arch {
            Arch::Gemma3 => {
                let local = self.rope_local.clone().unwrap_or(Rope {
                    theta: 10_000.0,
                    scaling: RopeScaling::Default,
                });
                put(
                    "rope_parameters",
                    json!({"full_attention": rope_json(&self.rope()), "sliding_attention": rope_json(&local)}),
                );
                put("hidden_activation", json!(self.hidden_act));
                // transformers' config is strictly typed: an integer stays an integer.
                let q = self.query_pre_attn_scalar.unwrap_or(256.0);
                let q = if q.fract() == 0.0 && q.abs() < 1e15 {
                    json!(q as i64)
                } else {
                    json!(q)
                };
                put("query_pre_attn_scalar", q);
                put("final_logit_softcapping", Value::Null);
                put("attn_logit_softcapping", Value::Null);
                put("use_bidirectional_attention", json!(false));
                put("attention_bias", json!(self.attention_bias));
            }
            _ => {
                put("rope_parameters", rope_json(&self.rope()));
                put("hidden_act", json!(self.hidden_act));
            }
        }
        match arch {
            Arch::Llama => {
                put("attention_bias", json!(self.attention_bias));
                put("mlp_bias", json!(self.mlp_bias));
            }
            Arch::Qwen3 => put("attention_bias", json!(self.attention_bias)),
            _ => {}
        }
        match arch {
            Arch::Llama => {}
            Arch::Mistral => put("sliding_window", json!(self.sliding_window)),
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => {
                if matches!(arch, Arch::Qwen2 | Arch::Qwen3) {
                    put("use_sliding_window", json!(self.use_sliding_window));
                    // Unused once layer_types is explicit; kept consistent with it.
                    let first_sliding = self
                        .layer_types
                        .iter()
                        .position(|t| *t == LayerType::Sliding)
                        .unwrap_or(self.num_hidden_layers);
                    put("max_window_layers", json!(first_sliding));
                }
                put("sliding_window", json!(self.sliding_window));
                put(
                    "layer_types",
                    json!(self
                        .layer_types
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()),
                );
            }
        }
        if let Some(b) = &self.bos_token_id {
            put("bos_token_id", b.clone());
        }
        if let Some(e) = &self.eos_token_id {
            put("eos_token_id", e.clone());
        }
        m.entry("architectures")
            .or_insert_with(|| json!([arch.class()]));
        if !m.contains_key("dtype") && !m.contains_key("torch_dtype") {
            m.insert("dtype".into(), json!("float32"));
        }
        serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default()
    }

    /// Inverse RoPE frequencies of the full-attention layers, one per pair of channels.
    pub fn inv_freq(&self) -> Vec<f64> {
        self.rope().inv_freq(self.head_dim())
    }
}

impl Rope {
    /// Inverse frequencies for `head_dim`, scaled as transformers scales them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let hd = head_dim;
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        match &self.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: orig,
            } => {
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests;
