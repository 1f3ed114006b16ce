//! Generated tokens to text as it grows: deltas that never split a UTF-8 character, and stop
//! strings found across delta boundaries (a possible start of one is held back until it is
//! decided). Streaming and non-streaming answers are both built from these deltas, so their
//! texts are the same.

use tokenizers::Tokenizer;

/// Incremental detokenization: [`TextDecoder::step`] returns the text a token completes, or
/// nothing while its bytes are an unfinished character.
pub struct TextDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// The tokens since the last decoded prefix (the `tokenizers` decode-stream window).
    window: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Every token and the text handed out so far (for the fallback and the last flush).
    all: Vec<u32>,
    text: String,
    /// The decode stream lost its prefix (a decoder that rewrites earlier text): decode all.
    whole: bool,
}

impl<'t> TextDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TextDecoder {
            tokenizer,
            window: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
            all: Vec::new(),
            text: String::new(),
            whole: false,
        }
    }

    /// The new text `id` completes ("" while a character is unfinished).
    pub fn step(&mut self, id: u32) -> String {
        self.all.push(id);
        if !self.whole {
            match tokenizers::step_decode_stream(
                self.tokenizer,
                vec![id],
                true,
                &mut self.window,
                &mut self.prefix,
                &mut self.prefix_index,
            ) {
                Ok(Some(piece)) => {
                    self.text.push_str(&piece);
                    return piece;
                }
                Ok(None) => return String::new(),
                Err(_) => self.whole = true,
            }
        }
        self.catch_up(false)
    }

    /// What is left at the end (an unfinished character becomes U+FFFD, as a full decode
    /// writes it).
    pub fn finish(&mut self) -> String {
        self.catch_up(true)
    }

    fn catch_up(&mut self, last: bool) -> String {
        let Ok(full) = self.tokenizer.decode(&self.all, true) else {
            return String::new();
        };
        if (!last && full.ends_with('\u{FFFD}')) || !full.starts_with(&self.text) {
            return String::new();
        }
        let new = full[self.text.len()..].to_string();
        self.text = full;
        new
    }
}

/// Finds the first of some stop strings in text that arrives in pieces.
pub struct StopMatcher<'s> {
    stops: &'s [String],
    held: String,
}

impl<'s> StopMatcher<'s> {
    /// `stops` must not contain empty strings.
    pub fn new(stops: &'s [String]) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds text; returns what can be handed out now and whether a stop string ended the text
    /// (it and everything after it are dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that a stop string starts with: the next piece may finish it.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                s.char_indices()
                    .map(|(i, _)| i)
                    .skip(1)
                    .filter(|&k| self.held.ends_with(&s[..k]))
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The held-back text once no more comes.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::{byte_level, encode, sentencepiece_bpe, spm_test_vocab};

    #[test]
    fn deltas_never_split_a_character_and_add_up_to_the_full_decode() {
        let t = byte_level().unwrap();
        let text = "Grüße, 世界! 😀 <|im_end|> ok";
        let ids = encode(&t, text, false).unwrap();
        let mut d = TextDecoder::new(&t);
        let mut deltas = Vec::new();
        for &id in &ids {
            deltas.push(d.step(id));
        }
        deltas.push(d.finish());
        // Every byte of a multi-byte character but the last gives nothing.
        assert!(deltas.iter().any(|x| x.is_empty()));
        assert!(deltas.iter().all(|x| !x.contains('\u{FFFD}')));
        assert_eq!(deltas.concat(), t.decode(&ids, true).unwrap());
        assert!(deltas.contains(&"世".to_string()) && deltas.contains(&"😀".to_string()));
        // Cut inside a character, the end is what a full decode gives.
        let cut = &ids[..ids.len() - 20];
        let mut d = TextDecoder::new(&t);
        let mut s: String = cut[..cut.len() - 1].iter().map(|&i| d.step(i)).collect();
        s.push_str(&d.step(0xF0)); // the first byte of a four-byte character
        assert!(!s.ends_with('\u{FFFD}'));
        s.push_str(&d.finish());
        let mut want = cut[..cut.len() - 1].to_vec();
        want.push(0xF0);
        assert_eq!(s, t.decode(&want, true).unwrap());
        // A SentencePiece decoder (strips the first space, byte fallback) adds up the same.
        let t = sentencepiece_bpe(&spm_test_vocab()).unwrap();
        let ids = encode(&t, "the é then", false).unwrap();
        let mut d = TextDecoder::new(&t);
        let mut s: String = ids.iter().map(|&i| d.step(i)).collect();
        s.push_str(&d.finish());
        assert_eq!(s, t.decode(&ids, true).unwrap());
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            let (o, stopped) = m.push(p);
            out.push(o);
            if stopped {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_nothing_after_them_is_sent() {
        // "END" split over three pieces: "E" and "N" are held back, never sent.
        let (out, stopped) = run(&["END"], &["hello E", "N", "D and more"]);
        assert!(stopped);
        assert_eq!(out, ["hello ", "", ""]);
        // A false start is released once it cannot be a stop string any more.
        let (out, stopped) = run(&["END"], &["an E", "Nx", " done"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "an ENx done");
        assert_eq!(out[0], "an ");
        // The earliest of several stop strings wins; overlapping starts are kept.
        let (out, stopped) = run(&["bcd", "aab"], &["xa", "a", "ab"]);
        assert_eq!((out.concat().as_str(), stopped), ("xa", true));
        let (out, stopped) = run(&["\n\n", "世界"], &["Grüße ", "世", "界!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Grüße ");
        // Without stop strings everything goes out at once.
        let (out, stopped) = run(&[], &["a", "b"]);
        assert_eq!((out.concat().as_str(), stopped), ("ab", false));
    }
}
