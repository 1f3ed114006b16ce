//! Corpora: documents from JSONL (a `text` field per line) or `.txt` (blank-line-separated
//! blocks), tokenized and packed into fixed-length sequences.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::model::tokenizer;

/// Why a corpus cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Token ids of `docs` for measuring a model: whole documents, each followed by `eos` when
/// given, until at least `max_tokens` ids; with the UTF-8 bytes they encode (one per `eos`), for
/// bits per byte. The Evaluate phase and `worker eval` measure exactly these tokens.
pub fn encode_for_eval(
    tok: &Tokenizer,
    docs: &[String],
    eos: Option<u32>,
    max_tokens: usize,
) -> Result<(Vec<u32>, usize), String> {
    let (mut ids, mut bytes) = (Vec::new(), 0usize);
    for d in docs {
        if ids.len() >= max_tokens {
            break;
        }
        ids.extend(tokenizer::encode(tok, d, false).map_err(|e| e.to_string())?);
        ids.extend(eos);
        bytes += d.len() + 1;
    }
    Ok((ids, bytes))
}

/// The documents of a corpus file, in file order.
pub fn read_documents(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if !jsonl {
        return Ok(text
            .split("\n\n")
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_string)
            .collect());
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| DataError::Line {
            path: path.display().to_string(),
            line: i + 1,
            message,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("has no string field \"text\"".into()))?;
        docs.push(t.to_string());
    }
    Ok(docs)
}

/// Tokenizes `docs` (each followed by `separator` when given), concatenates them and cuts the
/// stream into sequences of exactly `seq_len` tokens, at most `max_sequences` of them (a
/// shorter tail is dropped).
pub fn pack(
    tok: &Tokenizer,
    docs: &[String],
    separator: Option<u32>,
    seq_len: usize,
    max_sequences: usize,
) -> Result<Vec<Vec<u32>>, tokenizer::TokenizerError> {
    let mut out = Vec::new();
    let mut cur: Vec<u32> = Vec::with_capacity(seq_len);
    for d in docs {
        let mut ids = tokenizer::encode(tok, d, false)?;
        ids.extend(separator);
        for id in ids {
            cur.push(id);
            if cur.len() == seq_len {
                out.push(std::mem::replace(&mut cur, Vec::with_capacity(seq_len)));
                if out.len() == max_sequences {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// Reads and packs a corpus, failing with the file named when it yields no full sequence.
pub fn load_sequences(
    path: &Path,
    tok: &Tokenizer,
    separator: Option<u32>,
    seq_len: usize,
    max_sequences: usize,
) -> Result<Vec<Vec<u32>>, DataError> {
    let docs = read_documents(path)?;
    let seqs =
        pack(tok, &docs, separator, seq_len, max_sequences).map_err(|e| DataError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if seqs.is_empty() {
        return Err(DataError::Invalid {
            path: path.display().to_string(),
            message: format!(
                "holds fewer than {seq_len} tokens ({} documents): add text or lower seq_len",
                docs.len()
            ),
        });
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_come_from_jsonl_and_txt_and_pack_into_full_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("c.jsonl");
        std::fs::write(
            &j,
            "{\"text\": \"abcd\"}\n\n{\"text\": \"efg\", \"id\": 2}\n",
        )
        .unwrap();
        let t = dir.path().join("c.txt");
        std::fs::write(&t, "abcd\n\n\n  efg \n\n").unwrap();
        assert_eq!(read_documents(&j).unwrap(), ["abcd", "efg"]);
        assert_eq!(read_documents(&t).unwrap(), ["abcd", "efg"]);
        let tok = tokenizer::byte_level().unwrap();
        let docs = read_documents(&j).unwrap();
        // "abcd|efg|" with separator 257 -> 9 tokens -> two sequences of 4, tail dropped.
        let seqs = pack(&tok, &docs, Some(257), 4, 10).unwrap();
        assert_eq!(seqs, vec![vec![97, 98, 99, 100], vec![257, 101, 102, 103]]);
        assert_eq!(pack(&tok, &docs, Some(257), 4, 1).unwrap().len(), 1);
        let e = load_sequences(&j, &tok, None, 100, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.jsonl") && e.contains("fewer than 100 tokens"),
            "{e}"
        );
        std::fs::write(&j, "{\"text\": \"ok\"}\n{\"body\": 1}\n").unwrap();
        let e = read_documents(&j).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:2") && e.contains("\"text\""), "{e}");
    }
}
