//! Entry points for the fuzzers (`fuzz/` with libFuzzer, and the seeded mutation run in
//! `tests/tests/fuzz.rs`): every file, model folder and request body the worker reads. Each takes
//! arbitrary bytes and must return without panicking, hanging or allocating in proportion to a
//! length the bytes claim; an error is a fine answer.

use std::path::Path;

use distillery_proto::fuzz_targets::{scratch_dir, scratch_file};
use distillery_proto::gguf::{self as format, GgufFile};

use crate::judge::{self, fastchat, parse};
use crate::model::chat::ModelTemplates;
use crate::model::config::LlamaConfig;
use crate::model::generation_config::{GenerationConfig, Reading};
use crate::model::{gguf, io, tokenizer};
use crate::prune::importance::{DepthScores, Importance};
use crate::serve::openai::{self, Endpoint};

/// Splits one input into two texts at the first NUL byte (a judge's output and its prompt, a
/// template and a field value).
fn two_texts(data: &[u8]) -> (String, String) {
    let (a, b) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    (
        String::from_utf8_lossy(a).into_owned(),
        String::from_utf8_lossy(b).into_owned(),
    )
}

/// `config.json`: parsed (every architecture, RoPE, layer types), validated, the derived
/// values a model is built from, and written back and read again.
pub fn config_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = LlamaConfig::from_json(text) else {
        return;
    };
    if c.validate().is_err() {
        return;
    }
    let _ = (c.num_kv_heads(), c.head_dim(), c.attention_scale());
    let _ = c.rope().inv_freq(c.head_dim());
    for i in 0..c.num_hidden_layers.min(64) {
        let _ = (c.layer_rope(i).inv_freq(c.head_dim()), c.layer_window(i));
    }
    let _ = LlamaConfig::from_json(&c.to_json());
}

/// A GGUF file as `worker` imports it, up to the weights: the container, the HF config it
/// implies parsed by the config parser, the tokenizer rebuilt from `tokenizer.ggml.*`, the chat
/// template and special tokens.
pub fn gguf_model(data: &[u8]) {
    let Some(p) = scratch_file("model.gguf", data) else {
        return;
    };
    let Ok(f) = GgufFile::open(&p) else {
        return;
    };
    if let Ok(import) = format::import(&f) {
        let _ = LlamaConfig::from_json(&import.config_json).map(|c| c.validate());
    }
    if let Ok(Some(t)) = gguf::tokenizer_from_meta(&f) {
        let _ = tokenizer::encode(&t, "Hello wörld ▁ <0x0A>", true);
        let _ = tokenizer::token_bytes(&t);
    }
    let _ = f.get_str("tokenizer.chat_template");
}

/// `tokenizer.json` (through `tokenizers`) and what we build from it: raw bytes per token, the
/// GGUF vocabulary export and the tokenizer rebuilt from that vocabulary.
pub fn tokenizer_json(data: &[u8]) {
    let Ok(t) = tokenizer::from_bytes(data, "tokenizer.json") else {
        return;
    };
    if t.get_vocab_size(true) > 1 << 16 {
        return;
    }
    let _ = tokenizer::token_bytes(&t);
    let _ = tokenizer::encode(&t, "Hello wörld", true);
    if let Ok(v) = tokenizer::to_gguf_vocab(&t) {
        let _ = if v.model == "llama" {
            tokenizer::sentencepiece_bpe(&v)
        } else {
            tokenizer::byte_level_bpe(&v)
        };
    }
}

/// `tokenizer_config.json` as the chat-template resolution reads it: templates (a string or a
/// list of named ones) and special tokens.
pub fn tokenizer_config(data: &[u8]) {
    let Some(p) = scratch_file("tokenizer-config/tokenizer_config.json", data) else {
        return;
    };
    if let Some(dir) = p.parent() {
        let _ = ModelTemplates::from_dir(dir);
    }
}

/// `generation_config.json`, read both ways (everything, and only the stop tokens).
pub fn generation_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let p = Path::new("generation_config.json");
    for r in [Reading::Everything, Reading::StopTokens] {
        if let Ok(g) = GenerationConfig::parse(text, p, r) {
            let _ = g.default_temperature();
        }
    }
}

/// A safetensors file (the container candle reads: header length, JSON header, offsets) and
/// our scores files (`scores`, `depth_scores` artifacts) read from it.
pub fn safetensors(data: &[u8]) {
    let Some(p) = scratch_file("tensors.safetensors", data) else {
        return;
    };
    let _ = candle_core::safetensors::load(&p, &candle_core::Device::Cpu);
    let _ = Importance::load(&p);
    let _ = DepthScores::load(&p);
}

/// `model.safetensors.index.json`: the shard list of a sharded model folder.
pub fn safetensors_index(data: &[u8]) {
    let dir = scratch_dir().join("sharded-model");
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join("model.safetensors.index.json"), data).is_err()
    {
        return;
    }
    let _ = io::weight_files(&dir);
}

/// The verdict parsers over a judge's output and the prompt it was given (split at the first
/// NUL): end-anchored pairwise, five-level, rating and rubric verdicts, and FastChat's rules.
pub fn judge_verdict(data: &[u8]) {
    let (output, prompt) = two_texts(data);
    let _ = parse::strip_echo(&output, &prompt);
    let _ = parse::pairwise(&output, &prompt);
    let _ = parse::five_level(&output, &prompt);
    let _ = parse::rating(&output, &prompt);
    let _ = parse::rubric(&output, &prompt);
    let _ = fastchat::rating(&output);
    let _ = fastchat::pairwise(&output);
    let _ = fastchat::pairwise_two_scores(&output);
}

/// The judge's input files: MT-Bench `question.jsonl`, FastChat `judge_prompts.jsonl` (and its
/// `str.format` templates), reference answers, an answers artifact and a judgments artifact.
pub fn judge_files(data: &[u8]) {
    let Some(p) = scratch_file("judge/input.jsonl", data) else {
        return;
    };
    let _ = judge::load_questions(&p);
    let _ = fastchat::load_references(&p);
    let _ = judge::Answers::load(&p);
    if let Ok(set) = fastchat::load_prompts(&p) {
        for pairwise in [false, true] {
            if let Ok(prompts) = set.for_mode(pairwise) {
                for jp in prompts {
                    let fields = [("question", "q"), ("answer", "a"), ("ref_answer_1", "r")];
                    let _ = fastchat::format(&jp.prompt_template, &fields, "fuzz");
                }
            }
        }
    }
    // A judgments artifact, line by line as `preload` reads it.
    for line in String::from_utf8_lossy(data).lines() {
        let _ = serde_json::from_str::<judge::Judgment>(line);
    }
    let (template, value) = two_texts(data);
    let _ = fastchat::format(&template, &[("question", &value), ("answer_a", "")], "fuzz");
}

/// A training corpus: JSONL (`text` per line) and blank-line-separated text.
pub fn corpus(data: &[u8]) {
    for name in ["corpus/train.jsonl", "corpus/train.txt"] {
        if let Some(p) = scratch_file(name, data) {
            let _ = crate::data::read_documents(&p);
        }
    }
}

/// A request body of the OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`).
pub fn openai_request(data: &[u8]) {
    for e in [Endpoint::Chat, Endpoint::Completions] {
        let _ = openai::parse(e, data);
    }
}

/// The prune record a pruned model carries (`distillery_prune.json`).
pub fn prune_record(data: &[u8]) {
    let dir = scratch_dir().join("pruned-model");
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join(crate::tasks::prune::PRUNE_RECORD), data).is_err()
    {
        return;
    }
    let Some(record) = crate::tasks::prune::read_prune_record(&dir) else {
        return;
    };
    // As intermediate-state distillation reads it: the channel map initializes the projection.
    let channels: Option<Vec<usize>> = record
        .get("teacher_channels")
        .and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect());
    if let Some(c) = channels.filter(|c| c.len() <= 256) {
        let _ = crate::distill::hidden::initial_projection(
            64,
            &c,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
    }
}
