//! Tokenizers: any `tokenizer.json` through the `tokenizers` crate (pure Rust, no network), a
//! byte-level one for tiny test models, and chat templates rendered with minijinja the way
//! transformers renders them (`trim_blocks`, `lstrip_blocks`, `raise_exception`).

use std::path::Path;

use serde::Serialize;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Why tokenizing failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("chat template: {0}")]
    Template(String),
}

fn tk<E: std::fmt::Display>(e: E) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Special tokens of the byte-level test tokenizer, after the 256 byte tokens.
pub const TEST_SPECIALS: &[&str] = &["<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's reversible byte -> printable char map (what byte-level BPE vocabularies spell).
pub fn byte_to_char(b: u8) -> char {
    let printable = |x: u8| {
        (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x)
    };
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + offset).unwrap_or('?')
}

/// A byte-level tokenizer: ids 0..256 are the bytes, then [`TEST_SPECIALS`].
pub fn byte_level() -> Result<Tokenizer, TokenizerError> {
    let mut bpe = BPE::builder();
    let vocab: tokenizers::models::bpe::Vocab = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), u32::from(b)))
        .collect();
    bpe = bpe.vocab_and_merges(vocab, Vec::new());
    let bpe = bpe.build().map_err(tk)?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    let specials: Vec<AddedToken> = TEST_SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    t.add_special_tokens(specials).map_err(tk)?;
    Ok(t)
}

/// Loads `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path)
        .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", path.display())))
}

pub fn encode(
    t: &Tokenizer,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>, TokenizerError> {
    Ok(t.encode(text, add_special_tokens)
        .map_err(tk)?
        .get_ids()
        .to_vec())
}

pub fn decode(
    t: &Tokenizer,
    ids: &[u32],
    skip_special_tokens: bool,
) -> Result<String, TokenizerError> {
    t.decode(ids, skip_special_tokens).map_err(tk)
}

/// A vocabulary as GGUF's `tokenizer.ggml.*` keys hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE with byte fallback).
    pub model: String,
    pub tokens: Vec<String>,
    /// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte (llama.cpp's codes).
    pub types: Vec<i32>,
    /// SentencePiece scores (`llama`): a higher score merges first.
    pub scores: Vec<f32>,
    /// BPE merges `"a b"` in rank order (`gpt2`).
    pub merges: Vec<String>,
    /// Whether encoding prepends the BOS token (`tokenizer.ggml.add_bos_token`).
    pub add_bos: Option<u32>,
}

const SPM_SPACE: &str = "\u{2581}";

/// A byte-level BPE tokenizer (llama.cpp's `gpt2` model: SmolLM, Llama 3, Qwen2).
pub fn byte_level_bpe(v: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let merges: Vec<(String, String)> = v
        .merges
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_of(v), merges)
        .build()
        .map_err(tk)?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    finish(t, v)
}

/// A SentencePiece BPE tokenizer (llama.cpp's `llama` model: Llama 2, Mistral), built the way
/// transformers converts one: merges are every split of a piece into two pieces of the
/// vocabulary, ranked by the merged piece's score; unknown bytes fall back to `<0xNN>`
/// tokens; a space is `▁` and one is prepended.
pub fn sentencepiece_bpe(v: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let vocab = vocab_of(v);
    let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (i, piece) in v.tokens.iter().enumerate() {
        if v.types.get(i).copied().unwrap_or(1) != 1 {
            continue;
        }
        let score = v.scores.get(i).copied().unwrap_or(0.0);
        for (k, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(k);
            if let (Some(ia), Some(ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((score, *ia, *ib, a.to_string(), b.to_string()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = v.types.iter().position(|t| *t == 2) {
        builder = builder.unk_token(v.tokens[unk].clone());
    }
    let mut t = Tokenizer::new(builder.build().map_err(tk)?);
    let normalizer = Sequence::new(vec![
        Prepend::new(SPM_SPACE.into()).into(),
        Replace::new(" ", SPM_SPACE).map_err(tk)?.into(),
    ]);
    t.with_normalizer(Some(normalizer)).map_err(tk)?;
    t.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new(SPM_SPACE, " ").map_err(tk)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    finish(t, v)
}

fn vocab_of(v: &GgufVocab) -> tokenizers::models::bpe::Vocab {
    v.tokens
        .iter()
        .enumerate()
        .map(|(i, s)| (s.clone(), i as u32))
        .collect()
}

/// Control and user-defined tokens are matched whole; BOS is prepended when asked.
fn finish(mut t: Tokenizer, v: &GgufVocab) -> Result<Tokenizer, TokenizerError> {
    let specials: Vec<AddedToken> = v
        .tokens
        .iter()
        .zip(&v.types)
        .filter(|(_, ty)| matches!(ty, 3 | 4))
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(specials).map_err(tk)?;
    if let Some(bos) = v.add_bos {
        let name = v
            .tokens
            .get(bos as usize)
            .ok_or_else(|| {
                TokenizerError::Tokenizers(format!("BOS id {bos} is not in the vocabulary"))
            })?
            .clone();
        let post = TemplateProcessing::builder()
            .try_single(format!("{name} $A"))
            .map_err(tk)?
            .try_pair(format!("{name} $A {name} $B"))
            .map_err(tk)?
            .special_tokens(vec![(name, bos)])
            .build()
            .map_err(tk)?;
        t.with_post_processor(Some(post));
    }
    Ok(t)
}

/// The GGUF form of a BPE tokenizer (byte-level or SentencePiece-style with byte fallback).
/// SentencePiece scores are written so that [`sentencepiece_bpe`] ranks the merges as `t` does.
pub fn to_gguf_vocab(t: &Tokenizer) -> Result<GgufVocab, TokenizerError> {
    let json: serde_json::Value =
        serde_json::from_str(&t.to_string(false).map_err(tk)?).map_err(tk)?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(TokenizerError::Tokenizers(format!(
            "only BPE tokenizers can be written to GGUF, not {}",
            model["type"]
        )));
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => {
                        Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut by_id: Vec<(u32, String)> =
        t.get_vocab(true).into_iter().map(|(s, i)| (i, s)).collect();
    by_id.sort();
    let tokens: Vec<String> = by_id.into_iter().map(|(_, s)| s).collect();
    let added = t.get_added_tokens_decoder();
    let spm = model["byte_fallback"].as_bool() == Some(true);
    let unk = model["unk_token"].as_str();
    let is_byte = |s: &str| s.len() == 6 && s.starts_with("<0x") && s.ends_with('>');
    let types = tokens
        .iter()
        .enumerate()
        .map(|(i, s)| match added.get(&(i as u32)) {
            Some(a) if a.special => 3,
            Some(_) => 4,
            None if Some(s.as_str()) == unk => 2,
            None if spm && is_byte(s) => 6,
            None => 1,
        })
        .collect();
    let mut scores = Vec::new();
    if spm {
        // A piece scores minus the rank of the first merge that makes it.
        let mut rank: std::collections::HashMap<String, usize> = Default::default();
        for (r, m) in merges.iter().enumerate() {
            if let Some((a, b)) = m.split_once(' ') {
                rank.entry(format!("{a}{b}")).or_insert(r);
            }
        }
        scores = tokens
            .iter()
            .map(|s| rank.get(s).map_or(-1e9, |r| -(*r as f32)))
            .collect();
    }
    let add_bos = json["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|first| first["SpecialToken"]["id"].as_str())
        .and_then(|name| t.token_to_id(name));
    Ok(GgufVocab {
        model: if spm { "llama" } else { "gpt2" }.into(),
        tokens,
        types,
        scores,
        merges: if spm { Vec::new() } else { merges },
        add_bos,
    })
}

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A ChatML template, used by the test models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Renders a Hugging Face chat template as transformers does.
pub fn render_chat(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, TokenizerError> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| TokenizerError::Template(e.to_string()))
}

/// A small SentencePiece-style vocabulary: `<unk> <s> </s>`, the 256 byte tokens, then pieces
/// scored so that "th" merges first and "▁the" before "en".
#[cfg(test)]
pub(crate) fn spm_test_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "\u{2581}",
        "t",
        "h",
        "e",
        "n",
        "a",
        "th",
        "\u{2581}t",
        "he",
        "\u{2581}th",
        "the",
        "\u{2581}the",
        "en",
        "an",
    ];
    let mut scores = vec![0.0; tokens.len()];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(-(i as f32) - 1.0);
    }
    GgufVocab {
        model: "llama".into(),
        tokens,
        types,
        scores,
        merges: Vec::new(),
        add_bos: Some(1),
    }
}

/// A byte-level vocabulary with merges: the 256 bytes, then "he", "ll", "hell", "hello".
#[cfg(test)]
pub(crate) fn bpe_test_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    tokens.extend(["he", "ll", "hell", "hello", "<|endoftext|>"].map(String::from));
    let mut types = vec![1; tokens.len()];
    types[260] = 3;
    GgufVocab {
        model: "gpt2".into(),
        tokens,
        types,
        scores: Vec::new(),
        merges: ["h e", "l l", "he ll", "hell o"].map(String::from).to_vec(),
        add_bos: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_vocabularies_encode_like_sentencepiece() {
        let t = sentencepiece_bpe(&spm_test_vocab()).unwrap();
        let pieces = |text: &str, special: bool| -> Vec<String> {
            encode(&t, text, special)
                .unwrap()
                .iter()
                .map(|i| t.id_to_token(*i).unwrap())
                .collect()
        };
        // "▁the▁then": "th" merges first everywhere, then "▁th", then "▁the" (score -12) beats
        // "en" (-13), leaving "n" alone.
        assert_eq!(pieces("the then", false), ["▁the", "▁the", "n"]);
        // Unknown characters fall back to their UTF-8 bytes; BOS comes first when asked.
        assert_eq!(pieces("é", true), ["<s>", "▁", "<0xC3>", "<0xA9>"]);
        // Special tokens match whole; the text after one gets its own "▁" (as transformers'
        // legacy Llama tokenizer does).
        assert_eq!(pieces("<s>the</s>", false), ["<s>", "▁the", "</s>"]);
        for text in ["the then", "é and the ant", "  two  spaces"] {
            let ids = encode(&t, text, false).unwrap();
            assert_eq!(decode(&t, &ids, false).unwrap(), text, "{text:?}");
        }
        // Written back to GGUF form it is the same vocabulary, scores ranking the same merges.
        let v = to_gguf_vocab(&t).unwrap();
        assert_eq!(v.model, "llama");
        assert_eq!(v.tokens, spm_test_vocab().tokens);
        assert_eq!(v.types, spm_test_vocab().types);
        assert_eq!(v.add_bos, Some(1));
        let again = sentencepiece_bpe(&v).unwrap();
        for text in ["the then", "é and the ant", "athena then"] {
            assert_eq!(
                encode(&again, text, true).unwrap(),
                encode(&t, text, true).unwrap()
            );
        }
    }

    #[test]
    fn byte_level_vocabularies_keep_their_merges() {
        let t = byte_level_bpe(&bpe_test_vocab()).unwrap();
        let ids = encode(&t, "hello hell<|endoftext|>", false).unwrap();
        assert_eq!(ids, [259, u32::from(b' '), 258, 260]);
        let v = to_gguf_vocab(&t).unwrap();
        assert_eq!(v, bpe_test_vocab());
    }

    #[test]
    fn the_byte_level_tokenizer_round_trips_any_text() {
        let t = byte_level().unwrap();
        assert_eq!(t.get_vocab_size(true), 256 + TEST_SPECIALS.len());
        for text in [
            "hello world",
            "Grüße, 世界! \n\ttabs",
            "<|im_start|>user\nhi<|im_end|>",
            "",
        ] {
            let ids = encode(&t, text, false).unwrap();
            assert_eq!(decode(&t, &ids, false).unwrap(), text);
        }
        // Plain text is one id per byte; special tokens are single ids.
        assert_eq!(encode(&t, "hé", false).unwrap(), vec![104, 0xC3, 0xA9]);
        assert_eq!(encode(&t, "<|im_end|>", false).unwrap(), vec![256 + 3]);
        // Saved and reloaded as tokenizer.json it encodes the same.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        t.save(&p, false).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(
            encode(&back, "Grüße <|im_start|>", false).unwrap(),
            encode(&t, "Grüße <|im_start|>", false).unwrap()
        );
    }

    #[test]
    fn chat_templates_render_like_transformers() {
        let msgs = vec![
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Hello".into(),
            },
        ];
        let s = render_chat(CHATML_TEMPLATE, &msgs, true, "<s>", "</s>").unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n");
        // Llama-2 style: bos_token, raise_exception, whitespace control with trim/lstrip blocks.
        let llama2 = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}\n{% for m in messages %}\n  {% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}\n{% endfor %}";
        let s = render_chat(llama2, &msgs, false, "<s>", "</s>").unwrap();
        assert_eq!(s, "<s>[INST] Hi [/INST] Hello </s>");
        let e = render_chat(llama2, &msgs[1..], false, "<s>", "</s>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("first message must be the user"), "{e}");
    }
}
