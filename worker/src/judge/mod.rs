//! LLM-as-a-judge evaluation (FastChat's llm_judge method, DESIGN.md §6): questions in MT-Bench
//! `question.jsonl` form, prompt templates as data files (`worker/judge-templates/`), pairwise
//! judging in both orders (a disagreement is a tie), single-answer 1–10 and Prometheus-style 1–5
//! rubric grading, reference-guided prompts, parsing that never turns an unparseable verdict into a
//! score, a cache keyed by (judge, template, prompt) so nothing is asked twice, and statistics.

pub mod backend;
pub mod parse;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use backend::Backend;
use parse::Pairwise;

/// One MT-Bench question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub question_id: serde_json::Value,
    #[serde(default)]
    pub category: String,
    pub turns: Vec<String>,
    #[serde(default)]
    pub reference: Option<Vec<String>>,
}

impl Question {
    pub fn id(&self) -> String {
        match &self.question_id {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        }
    }
}

/// Reads a `question.jsonl` file; a bad line is named.
pub fn load_questions(path: &Path) -> Result<Vec<Question>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line).map_err(|e| {
            format!(
                "{}:{}: not an MT-Bench question: {e}",
                path.display(),
                i + 1
            )
        })?;
        if q.turns.is_empty() {
            return Err(format!(
                "{}:{}: the question has no turns",
                path.display(),
                i + 1
            ));
        }
        out.push(q);
    }
    Ok(out)
}

/// One model's answers: per question id, one answer per turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answers {
    pub model: String,
    pub answers: BTreeMap<String, Vec<String>>,
}

impl Answers {
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Answers, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not an answers file: {e}", path.display()))
    }
}

/// How answers are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pairwise,
    Single,
    Rubric,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "pairwise" => Ok(Mode::Pairwise),
            "single" => Ok(Mode::Single),
            "rubric" => Ok(Mode::Rubric),
            other => Err(format!(
                "judge mode {other:?} is not pairwise, single or rubric"
            )),
        }
    }
}

/// A prompt template (a data file under `worker/judge-templates/`).
#[derive(Debug, Clone, Deserialize)]
pub struct Template {
    pub name: String,
    pub system: String,
    pub user: String,
    pub user_with_reference: String,
}

/// The template of a mode.
pub fn template(mode: Mode) -> Result<Template, String> {
    let text = match mode {
        Mode::Pairwise => include_str!("../../judge-templates/pairwise.toml"),
        Mode::Single => include_str!("../../judge-templates/single.toml"),
        Mode::Rubric => include_str!("../../judge-templates/rubric.toml"),
    };
    toml::from_str(text).map_err(|e| format!("judge template: {e}"))
}

/// The conversation as the judge sees it: every turn, with one or two assistants' answers.
pub fn conversation(q: &Question, first: &[String], second: Option<&[String]>) -> String {
    let mut s = String::new();
    for (i, turn) in q.turns.iter().enumerate() {
        s.push_str(&format!("### User (turn {}):\n{turn}\n\n", i + 1));
        let a = first.get(i).map(String::as_str).unwrap_or("");
        match second {
            None => s.push_str(&format!("### Assistant:\n{a}\n\n")),
            Some(b) => {
                let b = b.get(i).map(String::as_str).unwrap_or("");
                s.push_str(&format!(
                    "### Assistant A:\n{a}\n\n### Assistant B:\n{b}\n\n"
                ));
            }
        }
    }
    s.trim_end().to_string()
}

/// The (system, user) prompt for a question.
pub fn render(
    t: &Template,
    q: &Question,
    first: &[String],
    second: Option<&[String]>,
) -> Result<(String, String), String> {
    let conv = conversation(q, first, second);
    let reference = q
        .reference
        .as_ref()
        .filter(|r| !r.is_empty())
        .map(|r| r.join("\n\n"));
    let src = if reference.is_some() {
        &t.user_with_reference
    } else {
        &t.user
    };
    let env = minijinja::Environment::new();
    let user = env
        .render_str(src, minijinja::context! { conversation => conv, reference => reference.unwrap_or_default() })
        .map_err(|e| format!("judge template {}: {e}", t.name))?;
    Ok((t.system.trim().to_string(), user.trim().to_string()))
}

/// What a judgment concluded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pairwise(Pairwise),
    Score(f64),
    Unparsed,
}

/// One question put to the judge, with everything it saw and said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    pub question_id: String,
    pub category: String,
    /// Pairwise: "student_first" or "baseline_first"; graded: "student" or "baseline".
    pub slot: String,
    pub key: String,
    pub system: String,
    pub user: String,
    pub raw: String,
    pub verdict: Verdict,
    pub attempts: u32,
}

/// Judgments already made, on disk, keyed by a hash of (judge, template, prompt).
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn key(judge: &str, template: &str, system: &str, user: &str) -> String {
        let mut h = sha2::Sha256::new();
        for part in [judge, template, system, user] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    pub fn get(&self, key: &str) -> Option<Judgment> {
        let bytes = std::fs::read(self.dir.join(format!("{key}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put(&self, j: &Judgment) -> Result<(), String> {
        let p = self.dir.join(format!("{}.json", j.key));
        let tmp = self.dir.join(format!("{}.tmp", j.key));
        let bytes = serde_json::to_vec(j).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &p).map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// One prompt to judge.
#[derive(Debug, Clone)]
pub struct Job {
    pub question_id: String,
    pub category: String,
    pub slot: String,
    pub system: String,
    pub user: String,
}

/// A slot name, the first answer and the second (pairwise).
type Side<'a> = (&'a str, &'a [String], Option<&'a [String]>);

/// The prompts of an evaluation: per question, both orders (pairwise) or both answers (graded).
pub fn jobs(
    mode: Mode,
    questions: &[Question],
    student: &Answers,
    baseline: &Answers,
) -> Result<Vec<Job>, String> {
    let t = template(mode)?;
    let mut out = Vec::new();
    for q in questions {
        let id = q.id();
        let s = student
            .answers
            .get(&id)
            .ok_or_else(|| format!("the student has no answer to question {id}"))?;
        let b = baseline
            .answers
            .get(&id)
            .ok_or_else(|| format!("the baseline has no answer to question {id}"))?;
        let pairs: Vec<Side<'_>> = match mode {
            Mode::Pairwise => vec![
                ("student_first", s, Some(b)),
                ("baseline_first", b, Some(s)),
            ],
            Mode::Single | Mode::Rubric => vec![("student", s, None), ("baseline", b, None)],
        };
        for (slot, first, second) in pairs {
            let (system, user) = render(&t, q, first, second)?;
            out.push(Job {
                question_id: id.clone(),
                category: q.category.clone(),
                slot: slot.into(),
                system,
                user,
            });
        }
    }
    Ok(out)
}

fn verdict_of(mode: Mode, raw: &str, prompt: &str) -> Option<Verdict> {
    match mode {
        Mode::Pairwise => parse::pairwise(raw, prompt).map(Verdict::Pairwise),
        Mode::Single => parse::rating(raw, prompt).map(Verdict::Score),
        Mode::Rubric => parse::rubric(raw, prompt).map(|v| Verdict::Score(f64::from(v))),
    }
}

/// How [`judge_all`] runs.
pub struct JudgeOptions<'a> {
    /// The template's name (part of the cache key).
    pub template: &'a str,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Extra asks for a verdict that did not parse.
    pub retries: u32,
}

/// Judges every job: cached judgments are reused (the judge is not asked), the rest go to the
/// backend from `concurrency` threads; an unparseable answer is asked again up to `retries`
/// times, then recorded as unparsed. `progress(done, total, asked)` after each judgment.
pub fn judge_all(
    mode: Mode,
    jobs: &[Job],
    backend: &dyn Backend,
    cache: &Cache,
    opts: &JudgeOptions<'_>,
    progress: &(dyn Fn(usize, usize, usize) + Sync),
) -> Result<Vec<Judgment>, String> {
    let (template_name, concurrency, retries) = (opts.template, opts.concurrency, opts.retries);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let asked = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Judgment>>> = Mutex::new(vec![None; jobs.len()]);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let judge_id = backend.id();
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, 64) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= jobs.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let job = &jobs[i];
                let key = Cache::key(&judge_id, template_name, &job.system, &job.user);
                let j = match cache.get(&key) {
                    Some(j) => j,
                    None => {
                        let prompt = format!("{}\n{}", job.system, job.user);
                        let mut attempts = 0;
                        let mut raw = String::new();
                        let mut verdict = Verdict::Unparsed;
                        while attempts <= retries {
                            attempts += 1;
                            asked.fetch_add(1, Ordering::SeqCst);
                            let answer = if mode == Mode::Pairwise {
                                backend.pairwise(&job.system, &job.user)
                            } else {
                                None
                            };
                            let got = match answer {
                                Some(r) => r.map(|(text, v)| (text, Some(Verdict::Pairwise(v)))),
                                None => backend.chat(&job.system, &job.user).map(|text| {
                                    let v = verdict_of(mode, &text, &prompt);
                                    (text, v)
                                }),
                            };
                            match got {
                                Ok((text, v)) => {
                                    raw = text;
                                    if let Some(v) = v {
                                        verdict = v;
                                        break;
                                    }
                                }
                                Err(e) => {
                                    if let Ok(mut f) = failure.lock() {
                                        *f = Some(e.to_string());
                                    }
                                    return;
                                }
                            }
                        }
                        let j = Judgment {
                            question_id: job.question_id.clone(),
                            category: job.category.clone(),
                            slot: job.slot.clone(),
                            key: key.clone(),
                            system: job.system.clone(),
                            user: job.user.clone(),
                            raw,
                            verdict,
                            attempts,
                        };
                        if let Err(e) = cache.put(&j) {
                            if let Ok(mut f) = failure.lock() {
                                *f = Some(e);
                            }
                            return;
                        }
                        j
                    }
                };
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(j);
                }
                let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                progress(d, jobs.len(), asked.load(Ordering::SeqCst));
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or(None) {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| "judge worker panicked".to_string())?;
    results
        .into_iter()
        .map(|j| j.ok_or_else(|| "a judgment is missing".to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
