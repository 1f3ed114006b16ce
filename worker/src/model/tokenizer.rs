//! Tokenizers: any `tokenizer.json` through the `tokenizers` crate (pure Rust, no network), a
//! byte-level one for tiny test models, and chat templates rendered with minijinja the way
//! transformers renders them (`trim_blocks`, `lstrip_blocks`, `raise_exception`).

use std::path::Path;

use serde::Serialize;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
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

#[cfg(test)]
mod tests {
    use super::*;

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
