//! MT-Bench as FastChat's llm_judge runs it, with FastChat's own files as data: judge prompts from
//! a `judge_prompts.jsonl` (selected by `name`), reference answers from a
//! `reference_answer/*.jsonl`, prompt templates filled in the way Python's `str.format` fills them,
//! FastChat's verdict parsing (the first `[[rating]]`, else the first `[rating]`; `[[A]]` before
//! `[[B]]` before `[[C]]`), its per-category answer temperatures and the categories that are
//! graded against a reference.
//!
//! Nothing here guesses: an unknown prompt name, a prompt of the wrong type or output format, a
//! math question without a reference, a malformed line, a template field we do not supply — each
//! is an error that names it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::parse::Pairwise;
use super::Question;

/// Categories graded against a reference answer (FastChat's `NEED_REF_CATS`, MT-Bench part).
pub const NEED_REFERENCE: &[&str] = &["math", "reasoning", "coding"];

/// New tokens per answer when generating MT-Bench answers (FastChat's `--max-new-token`).
pub const ANSWER_MAX_TOKENS: usize = 1024;

/// FastChat's answer temperature per MT-Bench category; a category it does not list is answered
/// at 0.7, as FastChat's `gen_model_answer.py` does.
pub fn answer_temperature(category: &str) -> f64 {
    match category {
        "writing" | "roleplay" => 0.7,
        "stem" | "humanities" => 0.1,
        "extraction" | "math" | "coding" | "reasoning" => 0.0,
        _ => 0.7,
    }
}

/// Whether a question is graded against a reference.
pub fn needs_reference(category: &str) -> bool {
    NEED_REFERENCE.contains(&category)
}

/// One line of `judge_prompts.jsonl`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JudgePrompt {
    pub name: String,
    /// "single" or "pairwise".
    #[serde(rename = "type")]
    pub kind: String,
    pub system_prompt: String,
    pub prompt_template: String,
    /// "[[rating]]", "[[A]]" or "[[rating_a,rating_b]]".
    pub output_format: String,
}

/// The prompts of a `judge_prompts.jsonl`, by name.
#[derive(Debug, Clone)]
pub struct PromptSet {
    pub file: String,
    pub prompts: BTreeMap<String, JudgePrompt>,
}

/// Reads a FastChat `judge_prompts.jsonl`. Extra fields (`description`, `category`) are
/// allowed; a missing one or a line that is not JSON is an error naming the line.
pub fn load_prompts(path: &Path) -> Result<PromptSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "judge.prompts {}: {e} (give the path of FastChat's judge_prompts.jsonl)",
            path.display()
        )
    })?;
    let mut prompts = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: JudgePrompt = serde_json::from_str(line).map_err(|e| {
            format!(
                "judge.prompts {}:{}: not a FastChat judge prompt: {e} (each line needs name, type, system_prompt, prompt_template and output_format)",
                path.display(),
                i + 1
            )
        })?;
        prompts.insert(p.name.clone(), p);
    }
    Ok(PromptSet {
        file: path.display().to_string(),
        prompts,
    })
}

impl PromptSet {
    /// The prompt named `name`, which must be of `kind` with one of `formats`.
    pub fn get(&self, name: &str, kind: &str, formats: &[&str]) -> Result<&JudgePrompt, String> {
        let p = self.prompts.get(name).ok_or_else(|| {
            format!(
                "judge.prompts {}: no prompt named {name:?} (it has {}); use FastChat's judge_prompts.jsonl or add the prompt",
                self.file,
                self.prompts.keys().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
            )
        })?;
        if p.kind != kind {
            return Err(format!(
                "judge.prompts {}: prompt {name:?} has type {:?}, MT-Bench needs {kind:?} here",
                self.file, p.kind
            ));
        }
        if !formats.contains(&p.output_format.as_str()) {
            return Err(format!(
                "judge.prompts {}: prompt {name:?} has output_format {:?}; expected one of {formats:?}",
                self.file, p.output_format
            ));
        }
        Ok(p)
    }

    /// The four prompts a mode uses, checked up front: (turn 1, turn 1 with reference,
    /// turn 2, turn 2 with reference).
    pub fn for_mode(&self, pairwise: bool) -> Result<[&JudgePrompt; 4], String> {
        if pairwise {
            let f = &["[[A]]", "[[rating_a,rating_b]]"];
            Ok([
                self.get("pair-v2", "pairwise", f)?,
                self.get("pair-math-v1", "pairwise", f)?,
                self.get("pair-v2-multi-turn", "pairwise", f)?,
                self.get("pair-math-v1-multi-turn", "pairwise", f)?,
            ])
        } else {
            let f = &["[[rating]]"];
            Ok([
                self.get("single-v1", "single", f)?,
                self.get("single-math-v1", "single", f)?,
                self.get("single-v1-multi-turn", "single", f)?,
                self.get("single-math-v1-multi-turn", "single", f)?,
            ])
        }
    }
}

#[derive(Deserialize)]
struct RefLine {
    question_id: serde_json::Value,
    choices: Vec<RefChoice>,
}

#[derive(Deserialize)]
struct RefChoice {
    turns: Vec<String>,
}

/// Reference answers from a FastChat `reference_answer/<judge>.jsonl` (answer format:
/// `question_id`, `choices[0].turns`), by question id.
pub fn load_references(path: &Path) -> Result<BTreeMap<String, Vec<String>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "judge.reference_answers {}: {e} (give the path of a FastChat reference_answer/*.jsonl)",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: RefLine = serde_json::from_str(line).map_err(|e| {
            format!(
                "judge.reference_answers {}:{}: not a FastChat answer line: {e} (needs question_id and choices[0].turns)",
                path.display(),
                i + 1
            )
        })?;
        let id = match &r.question_id {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let turns = r
            .choices
            .into_iter()
            .next()
            .map(|c| c.turns)
            .ok_or_else(|| {
                format!(
                    "judge.reference_answers {}:{}: question {id} has no choices",
                    path.display(),
                    i + 1
                )
            })?;
        out.insert(id, turns);
    }
    Ok(out)
}

/// Where a question's reference comes from: the reference file when the spec names one, else the
/// question's own `reference` field.
pub fn reference_for<'a>(
    q: &'a Question,
    refs: Option<&'a BTreeMap<String, Vec<String>>>,
) -> Result<&'a [String], String> {
    let id = q.id();
    let found = match refs {
        Some(r) => r.get(&id).map(Vec::as_slice),
        None => q.reference.as_deref(),
    };
    match found {
        Some(r) if !r.is_empty() => Ok(r),
        _ => Err(format!(
            "question {id} ({}) is graded against a reference but has none: {}",
            q.category,
            if refs.is_some() {
                "add it to judge.reference_answers"
            } else {
                "set judge.reference_answers to FastChat's reference_answer/gpt-4.jsonl, or give the question a \"reference\""
            }
        )),
    }
}

/// Fills `template` as Python's `str.format(**fields)` does for plain named fields: `{name}` is
/// replaced, `{{` and `}}` are literal braces. A field we do not supply, a positional field or a
/// format spec is an error naming it (FastChat would raise too, or format differently).
pub fn format(template: &str, fields: &[(&str, &str)], what: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|p| p.1) == Some('{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek().map(|p| p.1) == Some('}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let rest = &template[i + 1..];
                let end = rest.find('}').ok_or_else(|| {
                    format!("{what}: unmatched '{{' at byte {i} of the prompt template")
                })?;
                let name = &rest[..end];
                let value = fields
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| {
                        format!(
                            "{what}: the prompt template asks for {{{name}}}, which this prompt does not have (it has {})",
                            fields.iter().map(|(k, _)| format!("{{{k}}}")).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                out.push_str(value);
                for _ in 0..=end {
                    chars.next();
                }
            }
            '}' => {
                return Err(format!(
                    "{what}: single '}}' at byte {i} of the prompt template"
                ))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// FastChat's `[[rating]]` rule: the first `[[n]]` in the judgment, else the first `[n]`; any
/// number counts (FastChat does not check the range). `None` is FastChat's −1 (invalid).
pub fn rating(judgment: &str) -> Option<f64> {
    first_number(judgment, "[[", "]]").or_else(|| first_number(judgment, "[", "]"))
}

/// The first `open` + `\d+\.?\d*` + `close` in `s` (Python's `re.search` with FastChat's
/// pattern), as a number.
fn first_number(s: &str, open: &str, close: &str) -> Option<f64> {
    let mut from = 0;
    while let Some(p) = s[from..].find(open) {
        let start = from + p + open.len();
        let rest = &s[start..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            let mut len = digits;
            if rest[len..].starts_with('.') {
                len += 1;
                len += rest[len..].bytes().take_while(u8::is_ascii_digit).count();
            }
            if rest[len..].starts_with(close) {
                if let Ok(v) = rest[..len].trim_end_matches('.').parse::<f64>() {
                    return Some(v);
                }
            }
        }
        // Next position, one byte on: openings may overlap ("[[[9]]]").
        from += p + 1;
    }
    None
}

/// FastChat's `[[A]]` rule: "[[A]]" anywhere wins, then "[[B]]", then "[[C]]" (a tie).
pub fn pairwise(judgment: &str) -> Option<Pairwise> {
    if judgment.contains("[[A]]") {
        Some(Pairwise::A)
    } else if judgment.contains("[[B]]") {
        Some(Pairwise::B)
    } else if judgment.contains("[[C]]") {
        Some(Pairwise::Tie)
    } else {
        None
    }
}

/// FastChat's `[[rating_a,rating_b]]` rule: the first `[[x, y]]` (else `[x, y]`); scores within
/// 0.1 of each other are a tie.
pub fn pairwise_two_scores(judgment: &str) -> Option<Pairwise> {
    let two = |open: &str, close: &str| -> Option<(f64, f64)> {
        let mut from = 0;
        while let Some(p) = judgment[from..].find(open) {
            let start = from + p + open.len();
            if let Some(end) = judgment[start..].find(close) {
                let inner = &judgment[start..start + end];
                if let Some((a, b)) = inner.split_once(',') {
                    let ok = |x: &str| {
                        !x.is_empty()
                            && x.bytes().all(|c| c.is_ascii_digit() || c == b'.')
                            && x.as_bytes()[0].is_ascii_digit()
                    };
                    let b = b.strip_prefix(' ').unwrap_or(b);
                    if ok(a) && ok(b) {
                        if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
                            return Some((x, y));
                        }
                    }
                }
            }
            from = start;
        }
        None
    };
    let (a, b) = two("[[", "]]").or_else(|| two("[", "]"))?;
    Some(if (a - b).abs() <= 0.1 {
        Pairwise::Tie
    } else if a > b {
        Pairwise::A
    } else {
        Pairwise::B
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format_fills_named_fields_and_refuses_unknown_ones() {
        let t = "Q: {question}\n{{literal}} A: {answer}";
        let s = format(t, &[("question", "2+2?"), ("answer", "4")], "p").unwrap();
        assert_eq!(s, "Q: 2+2?\n{literal} A: 4");
        let e = format(
            "{question} {ref_answer_1}",
            &[("question", "q")],
            "single-math-v1",
        )
        .unwrap_err();
        assert!(
            e.contains("single-math-v1") && e.contains("{ref_answer_1}"),
            "{e}"
        );
        assert!(format("a } b", &[], "p").is_err());
        assert!(format("a { b", &[], "p").is_err());
    }

    #[test]
    fn fastchat_rating_rule_takes_the_first_match_and_falls_back_to_single_brackets() {
        assert_eq!(rating("Good. Rating: [[7]]"), Some(7.0));
        assert_eq!(rating("[[8]] then later [[3]]"), Some(8.0));
        assert_eq!(rating("Rating: [[7.5]]"), Some(7.5));
        assert_eq!(rating("Rating: [6]"), Some(6.0));
        assert_eq!(rating("list [a] then [[x]] then [4]"), Some(4.0));
        assert_eq!(rating("[[[9]]]"), Some(9.0));
        // FastChat does not check the range.
        assert_eq!(rating("[[11]]"), Some(11.0));
        assert_eq!(rating("no verdict"), None);
        assert_eq!(rating("Rating: 8/10"), None);
    }

    #[test]
    fn fastchat_pairwise_rules() {
        assert_eq!(pairwise("B is better... [[B]]"), Some(Pairwise::B));
        // FastChat looks for [[A]] first, wherever it is.
        assert_eq!(pairwise("[[B]] but [[A]]"), Some(Pairwise::A));
        assert_eq!(pairwise("[[C]]"), Some(Pairwise::Tie));
        assert_eq!(pairwise("[A]"), None);
        assert_eq!(pairwise_two_scores("[[7, 5]]"), Some(Pairwise::A));
        assert_eq!(pairwise_two_scores("[[5,5.05]]"), Some(Pairwise::Tie));
        assert_eq!(pairwise_two_scores("scores [3, 9]"), Some(Pairwise::B));
        assert_eq!(pairwise_two_scores("[[x, 9]]"), None);
    }

    #[test]
    fn temperatures_and_reference_categories_follow_fastchat() {
        assert_eq!(answer_temperature("writing"), 0.7);
        assert_eq!(answer_temperature("roleplay"), 0.7);
        assert_eq!(answer_temperature("stem"), 0.1);
        assert_eq!(answer_temperature("humanities"), 0.1);
        for c in ["extraction", "math", "coding", "reasoning"] {
            assert_eq!(answer_temperature(c), 0.0, "{c}");
        }
        assert!(needs_reference("math") && needs_reference("coding"));
        assert!(!needs_reference("writing"));
    }
}
