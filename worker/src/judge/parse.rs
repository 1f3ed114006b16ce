//! Verdicts from a judge's text, anchored at the end of the output and tolerant of the usual
//! variations (bold, spaces, `Rating:` prefixes, trailing punctuation). A judge that echoes its
//! prompt is not fooled: every line of the prompt found in the output is removed first, and only
//! the last verdict in the final part of what remains counts. No verdict = `None` (the caller
//! retries, then counts it as unparsed, never as a score).

use std::sync::OnceLock;

use regex::Regex;

/// A pairwise verdict for the first (A) or second (B) position; the strong ones are Arena-Hard's
/// `[[A>>B]]` and `[[B>>A]]` (a ranking counts them three times).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pairwise {
    A,
    B,
    Tie,
    StrongA,
    StrongB,
}

impl Pairwise {
    /// A as the better one, whether strongly or not.
    pub fn favours_a(self) -> bool {
        matches!(self, Pairwise::A | Pairwise::StrongA)
    }

    /// B as the better one, whether strongly or not.
    pub fn favours_b(self) -> bool {
        matches!(self, Pairwise::B | Pairwise::StrongB)
    }

    /// The weight of the verdict in a ranking (Arena-Hard: strong verdicts count 3×).
    pub fn weight(self) -> f64 {
        match self {
            Pairwise::StrongA | Pairwise::StrongB => 3.0,
            _ => 1.0,
        }
    }

    /// A stable short name (agreement tables, metric keys).
    pub fn label(self) -> &'static str {
        match self {
            Pairwise::A => "A",
            Pairwise::B => "B",
            Pairwise::Tie => "tie",
            Pairwise::StrongA => "A_strong",
            Pairwise::StrongB => "B_strong",
        }
    }
}

/// How far from the end a verdict may be (characters).
const TAIL: usize = 400;

/// Removes echoed prompt text: every prompt line (of some length) that appears in the output.
pub fn strip_echo(output: &str, prompt: &str) -> String {
    let mut out = output.to_string();
    let mut lines: Vec<&str> = prompt
        .lines()
        .map(str::trim)
        .filter(|l| l.len() >= 12)
        .collect();
    lines.sort_by_key(|l| std::cmp::Reverse(l.len()));
    for l in lines {
        if out.contains(l) {
            out = out.replace(l, " ");
        }
    }
    out
}

fn tail(s: &str) -> &str {
    let t = s.trim_end();
    let mut start = t.len().saturating_sub(TAIL);
    while !t.is_char_boundary(start) {
        start += 1;
    }
    &t[start..]
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| {
        Regex::new(pattern).unwrap_or_else(|_| Regex::new("$^").expect("empty regex"))
    })
}

/// `[[A]]`, `[[B]]`, `[[C]]` (or `[[tie]]`), last one in the tail; single brackets as a fallback.
pub fn pairwise(output: &str, prompt: &str) -> Option<Pairwise> {
    static DOUBLE: OnceLock<Regex> = OnceLock::new();
    static SINGLE: OnceLock<Regex> = OnceLock::new();
    let cleaned = strip_echo(output, prompt);
    let t = tail(&cleaned);
    let pick = |m: &str| match m.to_ascii_uppercase().as_str() {
        "A" => Some(Pairwise::A),
        "B" => Some(Pairwise::B),
        "C" | "TIE" => Some(Pairwise::Tie),
        _ => None,
    };
    let double = re(&DOUBLE, r"(?i)\[\[\s*(A|B|C|tie)\s*\]\]");
    if let Some(c) = double.captures_iter(t).last() {
        return pick(&c[1]);
    }
    let single = re(
        &SINGLE,
        r"(?i)(?:verdict|winner|answer)?\s*[:\-]?\s*\[\s*(A|B|C|tie)\s*\]",
    );
    single.captures_iter(t).last().and_then(|c| pick(&c[1]))
}

/// Arena-Hard's five levels, `[[A>>B]]`, `[[A>B]]`, `[[A=B]]` (also `[[B=A]]`), `[[B>A]]`,
/// `[[B>>A]]`, the last one in the tail; also accepted with `<` written the other way round.
pub fn five_level(output: &str, prompt: &str) -> Option<Pairwise> {
    static R: OnceLock<Regex> = OnceLock::new();
    let cleaned = strip_echo(output, prompt);
    let r = re(&R, r"\[\[\s*([AB])\s*(>>|>|=|<<|<)\s*([AB])\s*\]\]");
    let c = r.captures_iter(tail(&cleaned)).last()?;
    let (x, op, y) = (&c[1], &c[2], &c[3]);
    if x == y {
        return None;
    }
    // Normalise to "A op B".
    let op = match (x, op) {
        ("A", o) => o.to_string(),
        (_, ">>") => "<<".into(),
        (_, ">") => "<".into(),
        (_, "<<") => ">>".into(),
        (_, "<") => ">".into(),
        (_, o) => o.to_string(),
    };
    Some(match op.as_str() {
        ">>" => Pairwise::StrongA,
        ">" => Pairwise::A,
        "=" => Pairwise::Tie,
        "<" => Pairwise::B,
        _ => Pairwise::StrongB,
    })
}

/// `[[n]]` with n in 1..=10 (decimals allowed), last one in the tail.
pub fn rating(output: &str, prompt: &str) -> Option<f64> {
    static R: OnceLock<Regex> = OnceLock::new();
    let cleaned = strip_echo(output, prompt);
    let r = re(&R, r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]");
    let v: f64 = r.captures_iter(tail(&cleaned)).last()?[1].parse().ok()?;
    (1.0..=10.0).contains(&v).then_some(v)
}

/// `[RESULT] n` with n in 1..=5, last one in the tail.
pub fn rubric(output: &str, prompt: &str) -> Option<u8> {
    static R: OnceLock<Regex> = OnceLock::new();
    let cleaned = strip_echo(output, prompt);
    let r = re(
        &R,
        r"(?i)\[\s*RESULT\s*\]\s*[:=]?\s*\(?\s*([1-5])(?:\s*/\s*5)?\s*\)?(?:[^0-9]|$)",
    );
    let v: u8 = r.captures_iter(tail(&cleaned)).last()?[1].parse().ok()?;
    (1..=5).contains(&v).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIR_PROMPT: &str = "After your explanation, output exactly one verdict on its own final line: [[A]] when assistant A is better, [[B]] when assistant B is better, [[C]] for a tie.";
    const RUBRIC_PROMPT: &str = "Write feedback that assesses the response against the rubric, then finish with the line \"[RESULT] n\", where n is an integer between 1 and 5.\nScore 1: The response is irrelevant, wrong or missing.\nScore 5: The response is fully correct, complete and helpful.";
    const SINGLE_PROMPT: &str = "After your explanation, give the grade from 1 to 10 on its own final line, written in double square brackets like [[7]].";

    #[test]
    fn pairwise_verdicts_in_the_styles_judges_write_them() {
        let cases = [
            (
                "Assistant A is more detailed and correct.\n\n[[A]]",
                Some(Pairwise::A),
            ),
            (
                "Both are fine, but B cites the source.\nFinal verdict: **[[B]]**",
                Some(Pairwise::B),
            ),
            ("They are equally good. [[C]]", Some(Pairwise::Tie)),
            ("Equal quality.\n[[ tie ]]", Some(Pairwise::Tie)),
            (
                "At first [[A]] seemed better, but on reflection [[B]].",
                Some(Pairwise::B),
            ),
            ("Verdict: [B].", Some(Pairwise::B)),
            ("I cannot decide between the two answers.", None),
            ("", None),
        ];
        for (out, want) in cases {
            assert_eq!(pairwise(out, PAIR_PROMPT), want, "{out:?}");
        }
    }

    #[test]
    fn an_echoed_prompt_is_not_a_verdict() {
        // The judge repeats the instructions (which name every verdict) and then says nothing.
        let echo = format!("{PAIR_PROMPT}\nI will now compare them.");
        assert_eq!(pairwise(&echo, PAIR_PROMPT), None);
        // ... or repeats them and then decides.
        let decided = format!("{PAIR_PROMPT}\nA is clearer.\n[[A]]");
        assert_eq!(pairwise(&decided, PAIR_PROMPT), Some(Pairwise::A));
        let r = format!("{RUBRIC_PROMPT}\nThe response is okay.");
        assert_eq!(rubric(&r, RUBRIC_PROMPT), None);
        let s = format!("{SINGLE_PROMPT}\nHard to say.");
        assert_eq!(rating(&s, SINGLE_PROMPT), None);
        // A verdict far from the end (the judge rambled on afterwards) does not count.
        let far = format!("[[A]]\n{}", "and more text ".repeat(60));
        assert_eq!(pairwise(&far, PAIR_PROMPT), None);
    }

    #[test]
    fn five_level_verdicts_as_arena_hard_writes_them() {
        let p = "Output one of [[A>>B]], [[A>B]], [[A=B]], [[B>A]], [[B>>A]] on the last line.";
        let cases = [
            (
                "A is far better.\nMy final verdict is: [[A>>B]]",
                Some(Pairwise::StrongA),
            ),
            ("[[A>B]]", Some(Pairwise::A)),
            ("Equal. [[A=B]]", Some(Pairwise::Tie)),
            ("[[B=A]]", Some(Pairwise::Tie)),
            ("[[B>A]]", Some(Pairwise::B)),
            ("Clearly: [[B>>A]]", Some(Pairwise::StrongB)),
            ("[[A<<B]]", Some(Pairwise::StrongB)),
            ("[[A>A]]", None),
            ("[[A]]", None),
        ];
        for (out, want) in cases {
            assert_eq!(five_level(out, p), want, "{out:?}");
        }
        // The echoed instructions (which list every verdict) are not a verdict.
        assert_eq!(five_level(&format!("{p}\nHmm."), p), None);
    }

    #[test]
    fn rubric_results_between_1_and_5_echo_included() {
        let cases = [
            ("Feedback: accurate and complete. [RESULT] 5", Some(5)),
            ("The response has gaps.\n[RESULT]: 3", Some(3)),
            ("Mostly wrong. [RESULT] (2)", Some(2)),
            ("[RESULT] 4/5", Some(4)),
            ("Good answer.\n**[RESULT] 4**", Some(4)),
            ("It deserves a score between 1 and 5, I think 4.", None),
            ("[RESULT] 7", None),
            ("[RESULT] 12", None),
            ("no result given", None),
        ];
        for (out, want) in cases {
            assert_eq!(rubric(out, RUBRIC_PROMPT), want, "{out:?}");
        }
        // The rubric prompt's own text "between 1 and 5" and "[RESULT] n" echoed back.
        let echoed = format!("Sure. {RUBRIC_PROMPT}\nThe answer is fine. [RESULT] 4");
        assert_eq!(rubric(&echoed, RUBRIC_PROMPT), Some(4));
    }

    #[test]
    fn ratings_from_1_to_10() {
        let cases = [
            ("Clear and correct. Rating: [[8]]", Some(8.0)),
            ("Rating: [[7.5]]", Some(7.5)),
            ("[[ 10 ]]", Some(10.0)),
            ("[[9/10]]", Some(9.0)),
            ("Rating: [[0]]", None),
            ("Rating: 8/10", None),
        ];
        for (out, want) in cases {
            assert_eq!(rating(out, SINGLE_PROMPT), want, "{out:?}");
        }
    }
}
