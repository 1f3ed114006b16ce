//! Tokenizers: any `tokenizer.json` through the `tokenizers` crate (pure Rust, no network), a
//! byte-level one for tiny test models, and GGUF vocabularies both ways. Chat templates are in
//! [`super::chat`].

use std::path::Path;

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
    let bytes = std::fs::read(path)
        .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", path.display())))?;
    from_bytes(&bytes, &path.display().to_string())
}

/// A template post-processor (`TemplateProcessing`, alone or in a `Sequence`) may name only
/// special tokens it defines: `tokenizers` loads one that names others, then panics on every encode
/// (found by fuzzing).
fn check_templates(p: &serde_json::Value) -> Result<(), String> {
    // By shape, not by `type`: `tokenizers` reads an object with a mistyped or missing `type`
    // as whichever processor its fields fit.
    for q in p["processors"].as_array().into_iter().flatten() {
        check_templates(q)?;
    }
    let defined = &p["special_tokens"];
    for part in ["single", "pair"] {
        for piece in p[part].as_array().into_iter().flatten() {
            if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                if defined.get(id).is_none() {
                    return Err(format!(
                        "the {part} template uses special token {id:?}, which its special_tokens do not define"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Parses the bytes of a `tokenizer.json` (`shown` names it in errors). `tokenizers` panics on
/// some malformed files instead of returning an error (an `expect` in its decoder and
/// `Precompiled` normalizer deserializers, found by fuzzing): the bytes must be JSON before it
/// sees them, and a panic it still raises becomes this error.
pub fn from_bytes(bytes: &[u8], shown: &str) -> Result<Tokenizer, TokenizerError> {
    let json: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| TokenizerError::Tokenizers(format!("{shown}: not valid JSON: {e}")))?;
    check_templates(&json["post_processor"])
        .map_err(|e| TokenizerError::Tokenizers(format!("{shown}: post_processor: {e}")))?;
    match std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes)) {
        Ok(t) => t.map_err(|e| TokenizerError::Tokenizers(format!("{shown}: {e}"))),
        Err(_) => Err(TokenizerError::Tokenizers(format!(
            "{shown}: not a tokenizer.json the tokenizers library can read (it failed on a malformed component)"
        ))),
    }
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

/// Every token's raw bytes, by id (what OpenAI's `logprobs[].bytes` report, so that a character
/// split over tokens can be put back together): byte-level BPE pieces through GPT-2's byte map,
/// SentencePiece byte tokens (`<0xNN>`) as that byte and `▁` as a space, added tokens as their
/// text, and anything else as the token decoded on its own.
pub fn token_bytes(t: &Tokenizer) -> Vec<Vec<u8>> {
    let json: serde_json::Value = t
        .to_string(false)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let decoder = &json["decoder"];
    let mut kinds: Vec<&str> = decoder["type"].as_str().into_iter().collect();
    if let Some(list) = decoder["decoders"].as_array() {
        kinds.extend(list.iter().filter_map(|d| d["type"].as_str()));
    }
    let byte_level = kinds.contains(&"ByteLevel");
    let spm = kinds.contains(&"ByteFallback")
        || kinds.contains(&"Metaspace")
        || json["model"]["byte_fallback"].as_bool() == Some(true);
    let inverse: std::collections::HashMap<char, u8> =
        (0..=255u8).map(|b| (byte_to_char(b), b)).collect();
    let added = t.get_added_tokens_decoder();
    let n = t
        .get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    (0..n as u32)
        .map(|id| {
            if let Some(a) = added.get(&id) {
                return a.content.as_bytes().to_vec();
            }
            let Some(piece) = t.id_to_token(id) else {
                return Vec::new();
            };
            if byte_level {
                let mut out = Vec::new();
                for c in piece.chars() {
                    match inverse.get(&c) {
                        Some(b) => out.push(*b),
                        None => out.extend(c.to_string().as_bytes()),
                    }
                }
                out
            } else if spm {
                match piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => vec![b],
                    None => piece.replace(SPM_SPACE, " ").into_bytes(),
                }
            } else {
                t.decode(&[id], false).unwrap_or_default().into_bytes()
            }
        })
        .collect()
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
    let bpe = build_bpe(BPE::builder().vocab_and_merges(vocab_of(v), merges))?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    finish(t, v)
}

/// Builds a BPE model from a GGUF vocabulary. `tokenizers` panics on some vocabularies instead of
/// returning an error (a slice out of range in its merge builder for a merge whose pieces do not
/// fit the vocabulary, found by fuzzing): that panic becomes this error.
fn build_bpe(builder: tokenizers::models::bpe::BpeBuilder) -> Result<BPE, TokenizerError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build())) {
        Ok(bpe) => bpe.map_err(tk),
        Err(_) => Err(TokenizerError::Tokenizers(
            "the vocabulary's merges are not a BPE model the tokenizers library can build (a merge \
             names pieces the vocabulary does not hold consistently)"
                .into(),
        )),
    }
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
    let mut t = Tokenizer::new(build_bpe(builder)?);
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

/// Chat templates live in [`super::chat`]; this name stays for the GGUF tests that embed it.
pub use super::chat::CHATML_TEMPLATE;

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
    fn token_bytes_are_the_raw_bytes_of_each_token() {
        let t = byte_level().unwrap();
        let b = token_bytes(&t);
        assert_eq!(b.len(), 256 + TEST_SPECIALS.len());
        for i in 0..=255u8 {
            assert_eq!(b[i as usize], [i]);
        }
        assert_eq!(b[256 + 3], b"<|im_end|>");
        let t = byte_level_bpe(&bpe_test_vocab()).unwrap();
        assert_eq!(token_bytes(&t)[259], b"hello");
        let t = sentencepiece_bpe(&spm_test_vocab()).unwrap();
        let b = token_bytes(&t);
        let id = |s: &str| t.token_to_id(s).unwrap() as usize;
        assert_eq!(b[id("<0xC3>")], [0xC3]);
        assert_eq!(b[id("\u{2581}the")], b" the");
        assert_eq!(b[id("<s>")], b"<s>");
    }

    /// Found by fuzzing (`fuzz/regressions/tokenizer_json/`): `tokenizers` panics (`expect`)
    /// on a decoder cut short and on a `Precompiled` normalizer whose charsmap is not base64, and
    /// loads a template post-processor naming an undefined special token, then panics on every
    /// encode.
    #[test]
    fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/tokenizer_json");
        for (file, want) in [
            ("truncated-decoder.json", "not valid JSON"),
            (
                "precompiled-not-base64.json",
                "not a tokenizer.json the tokenizers library can read",
            ),
            (
                "template-mistyped-undefined-special-token.json",
                "post_processor: the single template uses special token \"<s>)\", which its special_tokens do not define",
            ),
            (
                "template-undefined-special-token.json",
                "post_processor: the single template uses special token \"<s>)\", which its special_tokens do not define",
            ),
        ] {
            let e = load(&dir.join(file))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(file) && e.contains(want), "{file}: {e}");
        }
        // A well-formed file still loads.
        let good = byte_level().unwrap().to_string(false).unwrap();
        assert_eq!(
            from_bytes(good.as_bytes(), "t")
                .unwrap()
                .get_vocab_size(true),
            256 + TEST_SPECIALS.len()
        );
    }
}
