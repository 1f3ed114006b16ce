//! `generation_config.json`: the stop tokens and decoding defaults a model's authors set.
//!
//! `eos_token_id` (an int or a list) always ends generation, together with the tokenizer's EOS
//! token; without the file, `config.json`'s `eos_token_id` does (as transformers derives a
//! generation config from the model config). The sampling fields (`do_sample`, `temperature`,
//! `top_p`, `top_k`, `min_p`, `repetition_penalty`, `max_new_tokens`) are *defaults*: `worker
//! serve` applies them to requests that leave a field out, as vLLM does; `do_sample: false`
//! makes greedy decoding the default. A field that would change the answer and that is not
//! implemented here (beam search, n-gram bans, forced or suppressed tokens, typical / epsilon /
//! eta sampling, minimum lengths, stop strings, ...) is an error when it is set to anything but
//! its no-op value, never silently ignored. Fields that only affect speed or output plumbing
//! (`use_cache`, `max_length`, `pad_token_id`, assistant settings, ...) are accepted.

use std::path::Path;

use serde_json::Value;

/// Why a generation config cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum GenerationConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {field} = {value}: {why} is not implemented here and would change the answers; remove the field, or serve with --generation-config none to use OpenAI's defaults instead of the file's")]
    Unsupported {
        path: String,
        field: String,
        value: String,
        why: &'static str,
    },
}

/// How much of a generation config is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Stop tokens and sampling defaults; what cannot be honoured is an error.
    Everything,
    /// Only the stop tokens (greedy campaign answers, `--generation-config none`): the sampling
    /// fields are not used, so none of them is refused.
    StopTokens,
}

/// What a model's generation config asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Generation ends at any of these (`eos_token_id`).
    pub eos_token_ids: Vec<u32>,
    /// `Some(false)`: the authors decode greedily.
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    /// Where it was read (for logs).
    pub source: String,
}

/// Fields that would change the answer, each with its no-op value(s) and what it is.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("num_beams", "beam search"),
    ("num_beam_groups", "diverse beam search"),
    ("diversity_penalty", "diverse beam search"),
    ("penalty_alpha", "contrastive search"),
    ("dola_layers", "DoLa decoding"),
    ("no_repeat_ngram_size", "an n-gram ban"),
    ("encoder_no_repeat_ngram_size", "an n-gram ban"),
    ("bad_words_ids", "banned token sequences"),
    ("force_words_ids", "forced words"),
    ("constraints", "constrained decoding"),
    ("suppress_tokens", "suppressed tokens"),
    ("begin_suppress_tokens", "suppressed tokens"),
    ("forced_bos_token_id", "a forced first token"),
    ("forced_eos_token_id", "a forced last token"),
    ("forced_decoder_ids", "forced tokens"),
    ("sequence_bias", "a sequence bias"),
    ("typical_p", "typical sampling"),
    ("epsilon_cutoff", "epsilon sampling"),
    ("eta_cutoff", "eta sampling"),
    ("top_h", "top-h sampling"),
    (
        "encoder_repetition_penalty",
        "an encoder repetition penalty",
    ),
    ("min_length", "a minimum length"),
    ("min_new_tokens", "a minimum length"),
    (
        "exponential_decay_length_penalty",
        "a length penalty on EOS",
    ),
    ("guidance_scale", "classifier-free guidance"),
    ("watermarking_config", "watermarking"),
    ("stop_strings", "stop strings in the model's config"),
    ("token_healing", "token healing"),
];

/// Fields that change how fast or in what form an answer comes, not which answer.
const HARMLESS: &[&str] = &[
    "bos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "transformers_version",
    "_from_model_config",
    "_commit_hash",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "return_legacy_cache",
    "max_length",
    "max_time",
    "early_stopping",
    "length_penalty",
    "renormalize_logits",
    "remove_invalid_values",
    "low_memory",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "is_assistant",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
    "assistant_early_exit",
    "assistant_lookbehind",
    "target_lookbehind",
    "assistant_ensemble_weight",
    "speculation_type",
    "use_mtp",
    "compile_config",
    "disable_compile",
    "continuous_batching_config",
    "prefill_chunk_size",
    "trust_remote_code",
];

/// Whether `v` is the value that leaves `field` without effect.
fn is_no_op(field: &str, v: &Value) -> bool {
    let num = v.as_f64();
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => match field {
            "num_beams"
            | "num_beam_groups"
            | "encoder_repetition_penalty"
            | "typical_p"
            | "guidance_scale" => num == Some(1.0),
            "penalty_alpha"
            | "diversity_penalty"
            | "no_repeat_ngram_size"
            | "encoder_no_repeat_ngram_size"
            | "epsilon_cutoff"
            | "eta_cutoff"
            | "min_length"
            | "min_new_tokens" => num == Some(0.0),
            _ => false,
        },
    }
}

/// Token ids from an int or a list of ints.
fn token_ids(v: &Value) -> Option<Vec<u32>> {
    match v {
        Value::Null => Some(Vec::new()),
        Value::Number(n) => Some(vec![u32::try_from(n.as_u64()?).ok()?]),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect(),
        _ => None,
    }
}

/// Fields of the generation config this code reads.
const READ: &[&str] = &[
    "eos_token_id",
    "do_sample",
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "top_k",
    "max_new_tokens",
];

/// Whether a `config.json` key is a generation field (one transformers copies into the
/// generation config when the model has no `generation_config.json`).
fn is_generation_field(k: &str) -> bool {
    READ.contains(&k) || HARMLESS.contains(&k) || UNSUPPORTED.iter().any(|(n, _)| *n == k)
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json` read from `path`.
    pub fn parse(
        text: &str,
        path: &Path,
        reading: Reading,
    ) -> Result<GenerationConfig, GenerationConfigError> {
        let shown = path.display().to_string();
        let invalid = |message: String| GenerationConfigError::Invalid {
            path: shown.clone(),
            message,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| invalid(format!("is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("must be a JSON object".into()))?;
        let mut g = GenerationConfig {
            source: shown.clone(),
            ..Default::default()
        };
        let number =
            |field: &str, x: &Value, ok: &dyn Fn(f64) -> bool, range: &str| match x.as_f64() {
                Some(f) if ok(f) => Ok(Some(f)),
                _ if x.is_null() => Ok(None),
                _ => Err(invalid(format!("{field} = {x}: must be {range}"))),
            };
        let count = |field: &str, x: &Value| match x {
            Value::Null => Ok(None),
            _ => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| invalid(format!("{field} = {x}: must be a whole number"))),
        };
        for (field, x) in obj {
            if reading == Reading::StopTokens && field != "eos_token_id" {
                continue;
            }
            match field.as_str() {
                "eos_token_id" => {
                    g.eos_token_ids = token_ids(x).ok_or_else(|| {
                        invalid(format!(
                            "eos_token_id = {x}: must be a token id or a list of token ids"
                        ))
                    })?;
                }
                "do_sample" => {
                    g.do_sample = match x {
                        Value::Null => None,
                        Value::Bool(b) => Some(*b),
                        _ => {
                            return Err(invalid(format!("do_sample = {x}: must be true or false")))
                        }
                    }
                }
                "temperature" => {
                    g.temperature = number(field, x, &|f| f >= 0.0, "0 or more")?;
                }
                "top_p" => g.top_p = number(field, x, &|f| f > 0.0 && f <= 1.0, "in (0, 1]")?,
                "min_p" => g.min_p = number(field, x, &|f| (0.0..=1.0).contains(&f), "in [0, 1]")?,
                "repetition_penalty" => {
                    g.repetition_penalty = number(field, x, &|f| f > 0.0, "more than 0")?;
                }
                "top_k" => g.top_k = count(field, x)?,
                "max_new_tokens" => g.max_new_tokens = count(field, x)?,
                f if HARMLESS.contains(&f) => {}
                f => match UNSUPPORTED.iter().find(|(name, _)| *name == f) {
                    Some((_, why)) if !is_no_op(f, x) => {
                        return Err(GenerationConfigError::Unsupported {
                            path: shown,
                            field: f.to_string(),
                            value: x.to_string(),
                            why,
                        })
                    }
                    Some(_) => {}
                    None => {
                        return Err(GenerationConfigError::Unsupported {
                            path: shown,
                            field: f.to_string(),
                            value: x.to_string(),
                            why: "a generation field Distillery does not know",
                        })
                    }
                },
            }
        }
        Ok(g)
    }

    /// A Hugging Face directory's generation config: `generation_config.json`, or only the
    /// `eos_token_id` of `config.json` when there is no such file.
    pub fn from_dir(
        dir: &Path,
        reading: Reading,
    ) -> Result<GenerationConfig, GenerationConfigError> {
        let read = |p: &Path| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(GenerationConfigError::Invalid {
                path: p.display().to_string(),
                message: e.to_string(),
            }),
        };
        let gc = dir.join("generation_config.json");
        if let Some(text) = read(&gc)? {
            return GenerationConfig::parse(&text, &gc, reading);
        }
        // Without the file, transformers builds the generation config from the generation
        // fields of config.json (`GenerationConfig.from_model_config`): so do we, with the
        // same refusals.
        let cfg = dir.join("config.json");
        let Some(text) = read(&cfg)? else {
            return Ok(GenerationConfig {
                source: cfg.display().to_string(),
                ..Default::default()
            });
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| GenerationConfigError::Invalid {
            path: cfg.display().to_string(),
            message: format!("is not valid JSON: {e}"),
        })?;
        let fields: serde_json::Map<String, Value> = v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| is_generation_field(k))
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect();
        GenerationConfig::parse(&Value::Object(fields).to_string(), &cfg, reading)
    }

    /// The temperature a request that names none gets (greedy when the authors decode greedily).
    pub fn default_temperature(&self) -> Option<f64> {
        if self.do_sample == Some(false) {
            Some(0.0)
        } else {
            self.temperature
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<GenerationConfig, GenerationConfigError> {
        GenerationConfig::parse(
            json,
            Path::new("generation_config.json"),
            Reading::Everything,
        )
    }

    #[test]
    fn stop_tokens_and_sampling_defaults_are_read() {
        let g = parse(r#"{"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 100, "max_length": 4096, "transformers_version": "5.24.0", "num_beams": 1, "typical_p": 1.0, "bad_words_ids": null}"#).unwrap();
        assert_eq!(g.eos_token_ids, [2, 7]);
        assert_eq!(g.default_temperature(), Some(0.6));
        assert_eq!(
            (
                g.top_p,
                g.top_k,
                g.min_p,
                g.repetition_penalty,
                g.max_new_tokens
            ),
            (Some(0.9), Some(20), Some(0.05), Some(1.1), Some(100))
        );
        assert_eq!(parse(r#"{"eos_token_id": 5}"#).unwrap().eos_token_ids, [5]);
        // The authors' greedy decoding is the default, whatever temperature the file also has.
        let greedy = parse(r#"{"do_sample": false, "temperature": 0.7}"#).unwrap();
        assert_eq!(greedy.default_temperature(), Some(0.0));
        assert_eq!(parse("{}").unwrap().default_temperature(), None);
    }

    #[test]
    fn fields_that_would_change_the_answer_are_refused_with_the_fix() {
        for (json, field) in [
            (r#"{"num_beams": 4}"#, "num_beams"),
            (r#"{"no_repeat_ngram_size": 3}"#, "no_repeat_ngram_size"),
            (r#"{"suppress_tokens": [1, 2]}"#, "suppress_tokens"),
            (r#"{"typical_p": 0.9}"#, "typical_p"),
            (r#"{"min_new_tokens": 5}"#, "min_new_tokens"),
            (r#"{"stop_strings": ["END"]}"#, "stop_strings"),
            (r#"{"forced_eos_token_id": 2}"#, "forced_eos_token_id"),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
            assert!(e.contains("--generation-config none"), "{e}");
            assert!(e.contains("generation_config.json"), "{e}");
            // Read for its stop tokens only, the sampling fields are not looked at.
            let p = Path::new("generation_config.json");
            let g = GenerationConfig::parse(json, p, Reading::StopTokens).unwrap();
            assert_eq!(g.temperature, None);
        }
        for (json, what) in [
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"eos_token_id": "x"}"#, "eos_token_id"),
            (r#"{"top_k": 2.5}"#, "top_k"),
            ("[1]", "JSON object"),
            ("{", "not valid JSON"),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn without_the_file_config_json_gives_the_stop_tokens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [3, 4], "bos_token_id": 1}"#,
        )
        .unwrap();
        let g = GenerationConfig::from_dir(dir.path(), Reading::Everything).unwrap();
        assert_eq!(g.eos_token_ids, [3, 4]);
        assert_eq!(g.temperature, None);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 9}"#,
        )
        .unwrap();
        assert_eq!(
            GenerationConfig::from_dir(dir.path(), Reading::StopTokens)
                .unwrap()
                .eos_token_ids,
            [9]
        );
    }

    #[test]
    fn an_unknown_field_is_refused_by_name() {
        let e = parse(r#"{"eos_token_id": 2, "speculative_magic": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("speculative_magic"), "{e}");
        // Reading only the stop tokens uses (and so refuses) nothing else.
        let g = GenerationConfig::parse(
            r#"{"eos_token_id": 2, "speculative_magic": 3}"#,
            Path::new("generation_config.json"),
            Reading::StopTokens,
        )
        .unwrap();
        assert_eq!(g.eos_token_ids, [2]);
    }

    #[test]
    fn without_the_file_config_json_generation_fields_are_used_as_transformers_does() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |extra: &str| {
            std::fs::write(
                dir.path().join("config.json"),
                format!(
                    r#"{{"model_type": "llama", "hidden_size": 8, "eos_token_id": [2, 3]{extra}}}"#
                ),
            )
            .unwrap();
        };
        cfg(r#", "repetition_penalty": 1.5, "temperature": 0.3"#);
        let g = GenerationConfig::from_dir(dir.path(), Reading::Everything).unwrap();
        assert_eq!(g.eos_token_ids, [2, 3]);
        assert_eq!(
            (g.repetition_penalty, g.temperature),
            (Some(1.5), Some(0.3))
        );
        cfg(r#", "no_repeat_ngram_size": 2"#);
        let e = GenerationConfig::from_dir(dir.path(), Reading::Everything)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no_repeat_ngram_size") && e.contains("config.json"),
            "{e}"
        );
        // Model keys of config.json are not generation fields.
        cfg("");
        assert!(GenerationConfig::from_dir(dir.path(), Reading::Everything).is_ok());
    }
}
