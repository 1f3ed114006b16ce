//! LLM-as-a-judge evaluation (FastChat's llm_judge method, DESIGN.md §6): questions in MT-Bench
//! `question.jsonl` form, prompt templates as data files (`worker/judge-templates/`), pairwise
//! judging in both orders (a disagreement is a tie), single-answer 1–10 and Prometheus-style 1–5
//! rubric grading, reference-guided prompts, parsing that never turns an unparseable verdict into a
//! score, a cache keyed by (judge, template, prompt) so nothing is asked twice, and statistics.
//! `mtbench` modes follow FastChat exactly with its own files as data (`fastchat.rs`); a ranking
//! judges every pair of models (`ranking.rs`); repeated samples and a second judge measure how
//! reliable the verdicts are.

pub mod backend;
pub mod fastchat;
pub mod parse;
pub mod ranking;
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
    /// FastChat's single-answer grading per turn (`single-v1` …): MT-Bench scores.
    MtBench,
    /// FastChat's pairwise comparison per turn (`pair-v2` …), both orders.
    MtBenchPairwise,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "pairwise" => Ok(Mode::Pairwise),
            "single" => Ok(Mode::Single),
            "rubric" => Ok(Mode::Rubric),
            "mtbench" => Ok(Mode::MtBench),
            "mtbench-pairwise" => Ok(Mode::MtBenchPairwise),
            other => Err(format!(
                "judge mode {other:?} is not pairwise, single, rubric, mtbench or mtbench-pairwise"
            )),
        }
    }

    /// Whether the mode compares two answers in one prompt.
    pub fn is_pairwise(self) -> bool {
        matches!(self, Mode::Pairwise | Mode::MtBenchPairwise)
    }

    /// Whether the mode follows FastChat's MT-Bench (prompts from `judge.prompts`, per turn).
    pub fn is_mtbench(self) -> bool {
        matches!(self, Mode::MtBench | Mode::MtBenchPairwise)
    }
}

/// How a judge's reply is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `[[A]]`, `[[B]]`, `[[C]]`, echo-proof, last in the tail.
    Pairwise,
    /// Arena-Hard's five levels `[[A>>B]]` … `[[B>>A]]`, echo-proof, last in the tail.
    FiveLevel,
    /// `[[n]]`, 1–10, echo-proof.
    Rating,
    /// `[RESULT] n`, 1–5, echo-proof.
    Rubric,
    /// FastChat's `[[rating]]` rule.
    FastChatRating,
    /// FastChat's `[[A]]` rule.
    FastChatPair,
    /// FastChat's `[[rating_a,rating_b]]` rule.
    FastChatTwoScores,
}

impl Format {
    /// The format of a FastChat prompt's `output_format`.
    pub fn of_fastchat(output_format: &str) -> Result<Format, String> {
        match output_format {
            "[[rating]]" => Ok(Format::FastChatRating),
            "[[A]]" => Ok(Format::FastChatPair),
            "[[rating_a,rating_b]]" => Ok(Format::FastChatTwoScores),
            other => Err(format!("FastChat output_format {other:?} is not supported")),
        }
    }

    /// Whether the verdict is a pairwise one (position A or B).
    pub fn is_pairwise(self) -> bool {
        matches!(
            self,
            Format::Pairwise | Format::FiveLevel | Format::FastChatPair | Format::FastChatTwoScores
        )
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

/// The built-in template of a mode (the MT-Bench modes have none: their prompts are FastChat's).
pub fn template(mode: Mode) -> Result<Template, String> {
    let text = match mode {
        Mode::Pairwise => include_str!("../../judge-templates/pairwise.toml"),
        Mode::Single => include_str!("../../judge-templates/single.toml"),
        Mode::Rubric => include_str!("../../judge-templates/rubric.toml"),
        Mode::MtBench | Mode::MtBenchPairwise => {
            return Err("the mtbench modes take their prompts from judge.prompts".into())
        }
    };
    toml::from_str(text).map_err(|e| format!("judge template: {e}"))
}

/// The built-in pairwise template asking for Arena-Hard's five-level verdicts.
pub fn five_level_template() -> Result<Template, String> {
    toml::from_str(include_str!("../../judge-templates/pairwise-five.toml"))
        .map_err(|e| format!("judge template: {e}"))
}

/// The format of a built-in mode's replies.
pub fn builtin_format(mode: Mode) -> Format {
    match mode {
        Mode::Pairwise => Format::Pairwise,
        Mode::Single => Format::Rating,
        Mode::Rubric => Format::Rubric,
        Mode::MtBench => Format::FastChatRating,
        Mode::MtBenchPairwise => Format::FastChatPair,
    }
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
    /// Pairwise: "student_first" or "baseline_first"; graded: "student", "baseline" or
    /// "teacher"; ranking battles: "rank:<model>_first".
    pub slot: String,
    pub key: String,
    pub system: String,
    pub user: String,
    pub raw: String,
    pub verdict: Verdict,
    pub attempts: u32,
    /// MT-Bench turn (1 or 2); 0: the whole conversation in one prompt.
    #[serde(default)]
    pub turn: u32,
    /// The model in position A (graded: the model graded).
    #[serde(default)]
    pub first: String,
    /// The model in position B (graded: empty).
    #[serde(default)]
    pub second: String,
    /// Which of `judge.samples` repeated verdicts this is (0-based).
    #[serde(default)]
    pub sample: u32,
    /// With `judge.samples > 1`: every sample's verdict; `verdict` is their majority (pairwise)
    /// or mean (scores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Verdict>,
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
    /// The prompt's name (part of the cache key).
    pub template: String,
    pub format: Format,
    pub turn: u32,
    pub first: String,
    pub second: String,
}

/// A slot name, the first answer and the second (pairwise).
type Side<'a> = (&'a str, &'a [String], Option<&'a [String]>);

/// The prompts of a built-in mode's evaluation: per question, both orders (pairwise) or both
/// answers (graded). `five_level`: the pairwise prompt asks for Arena-Hard's verdicts.
pub fn jobs(
    mode: Mode,
    questions: &[Question],
    student: &Answers,
    baseline: &Answers,
) -> Result<Vec<Job>, String> {
    builtin_jobs(mode, false, questions, student, baseline)
}

/// [`jobs`] with the choice of three- or five-level pairwise verdicts.
pub fn builtin_jobs(
    mode: Mode,
    five_level: bool,
    questions: &[Question],
    student: &Answers,
    baseline: &Answers,
) -> Result<Vec<Job>, String> {
    let (t, format) = if mode == Mode::Pairwise && five_level {
        (five_level_template()?, Format::FiveLevel)
    } else {
        (template(mode)?, builtin_format(mode))
    };
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
        let pairs: Vec<(Side<'_>, &str, &str)> = match mode {
            Mode::Pairwise => vec![
                (("student_first", s, Some(b)), "student", "baseline"),
                (("baseline_first", b, Some(s)), "baseline", "student"),
            ],
            _ => vec![
                (("student", s, None), "student", ""),
                (("baseline", b, None), "baseline", ""),
            ],
        };
        for ((slot, first, second), a, b) in pairs {
            let (system, user) = render(&t, q, first, second)?;
            out.push(Job {
                question_id: id.clone(),
                category: q.category.clone(),
                slot: slot.into(),
                system,
                user,
                template: t.name.clone(),
                format,
                turn: 0,
                first: a.into(),
                second: b.into(),
            });
        }
    }
    Ok(out)
}

/// FastChat's prompts for a mode, with the reference answers, checked up front.
pub struct MtBenchPrompts<'a> {
    /// Turn 1, turn 1 with reference, turn 2, turn 2 with reference.
    pub prompts: [&'a fastchat::JudgePrompt; 4],
    /// The reference file's answers by question id (`None`: the questions' own `reference`).
    pub references: Option<&'a BTreeMap<String, Vec<String>>>,
}

impl MtBenchPrompts<'_> {
    /// The (system, user) prompt and the prompt's name for one turn of a question, graded
    /// (`b = None`) or compared (A = `a`, B = `b`), as FastChat's gen_judgment fills it.
    pub fn render(
        &self,
        q: &Question,
        turn: u32,
        a: &[String],
        b: Option<&[String]>,
    ) -> Result<(String, String, &str, Format), String> {
        let id = q.id();
        let with_ref = fastchat::needs_reference(&q.category);
        let p = self.prompts[(turn as usize - 1) * 2 + usize::from(with_ref)];
        let what = format!("judge.prompts {:?} for question {id} turn {turn}", p.name);
        let reference = if with_ref {
            Some(fastchat::reference_for(q, self.references)?)
        } else {
            None
        };
        let turn_of = |v: &[String], i: usize, who: &str| -> Result<String, String> {
            v.get(i)
                .cloned()
                .ok_or_else(|| format!("question {id}: the {who} has no answer to turn {}", i + 1))
        };
        let mut fields: Vec<(&str, String)> = Vec::new();
        if turn == 1 {
            fields.push(("question", turn_of(&q.turns, 0, "question")?));
        } else {
            fields.push(("question_1", turn_of(&q.turns, 0, "question")?));
            fields.push(("question_2", turn_of(&q.turns, 1, "question")?));
        }
        if let Some(r) = reference {
            fields.push(("ref_answer_1", turn_of(r, 0, "reference")?));
            if turn == 2 {
                fields.push(("ref_answer_2", turn_of(r, 1, "reference")?));
            }
        }
        match (b, turn) {
            (None, 1) => fields.push(("answer", turn_of(a, 0, "model")?)),
            (None, _) => {
                fields.push(("answer_1", turn_of(a, 0, "model")?));
                fields.push(("answer_2", turn_of(a, 1, "model")?));
            }
            (Some(b), 1) => {
                fields.push(("answer_a", turn_of(a, 0, "model")?));
                fields.push(("answer_b", turn_of(b, 0, "model")?));
            }
            (Some(b), _) => {
                fields.push(("answer_a_1", turn_of(a, 0, "model")?));
                fields.push(("answer_b_1", turn_of(b, 0, "model")?));
                fields.push(("answer_a_2", turn_of(a, 1, "model")?));
                fields.push(("answer_b_2", turn_of(b, 1, "model")?));
            }
        }
        let borrowed: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let user = fastchat::format(&p.prompt_template, &borrowed, &what)?;
        Ok((
            p.system_prompt.clone(),
            user,
            &p.name,
            Format::of_fastchat(&p.output_format)?,
        ))
    }

    /// The turns FastChat judges for a question: turn 1, and turn 2 when it has exactly two.
    pub fn turns(q: &Question) -> Vec<u32> {
        if q.turns.len() == 2 {
            vec![1, 2]
        } else {
            vec![1]
        }
    }

    /// Single-answer grading of each named answer set, per turn (`mtbench` mode).
    pub fn single_jobs(
        &self,
        questions: &[Question],
        sides: &[(&str, &Answers)],
    ) -> Result<Vec<Job>, String> {
        let mut out = Vec::new();
        for (name, answers) in sides {
            for q in questions {
                let id = q.id();
                let a = answers
                    .answers
                    .get(&id)
                    .ok_or_else(|| format!("the {name} has no answer to question {id}"))?;
                for turn in Self::turns(q) {
                    let (system, user, tname, format) = self.render(q, turn, a, None)?;
                    out.push(Job {
                        question_id: id.clone(),
                        category: q.category.clone(),
                        slot: name.to_string(),
                        system,
                        user,
                        template: tname.to_string(),
                        format,
                        turn,
                        first: name.to_string(),
                        second: String::new(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// How a pair of models is compared: a built-in template or FastChat's pairwise prompts.
pub enum PairPrompts<'a> {
    Builtin { template: Template, format: Format },
    FastChat(&'a MtBenchPrompts<'a>),
}

/// Both orders of every question (per turn with FastChat's prompts) between models `a` and `b`.
/// Slots are `<prefix><first model>_first`.
pub fn pair_jobs(
    prompts: &PairPrompts<'_>,
    questions: &[Question],
    a: (&str, &Answers),
    b: (&str, &Answers),
    prefix: &str,
) -> Result<Vec<Job>, String> {
    let mut out = Vec::new();
    for q in questions {
        let id = q.id();
        let sa = answer_of(a, &id)?;
        let sb = answer_of(b, &id)?;
        for ((first, x), (second, y)) in [((a.0, sa), (b.0, sb)), ((b.0, sb), (a.0, sa))] {
            let rendered: Vec<(u32, String, String, String, Format)> = match prompts {
                PairPrompts::Builtin { template, format } => {
                    let (system, user) = render(template, q, x, Some(y))?;
                    vec![(0, system, user, template.name.clone(), *format)]
                }
                PairPrompts::FastChat(p) => MtBenchPrompts::turns(q)
                    .into_iter()
                    .map(|turn| {
                        p.render(q, turn, x, Some(y))
                            .map(|(s, u, n, f)| (turn, s, u, n.to_string(), f))
                    })
                    .collect::<Result<_, _>>()?,
            };
            for (turn, system, user, template, format) in rendered {
                out.push(Job {
                    question_id: id.clone(),
                    category: q.category.clone(),
                    slot: format!("{prefix}{first}_first"),
                    system,
                    user,
                    template,
                    format,
                    turn,
                    first: first.to_string(),
                    second: second.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// A named model's answer to a question.
fn answer_of<'a>((name, ans): (&str, &'a Answers), id: &str) -> Result<&'a [String], String> {
    ans.answers
        .get(id)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("the {name} has no answer to question {id}"))
}

/// Reads a reply in a format; `None` when it holds no verdict.
pub fn verdict_of(format: Format, raw: &str, prompt: &str) -> Option<Verdict> {
    match format {
        Format::Pairwise => parse::pairwise(raw, prompt).map(Verdict::Pairwise),
        Format::FiveLevel => parse::five_level(raw, prompt).map(Verdict::Pairwise),
        Format::Rating => parse::rating(raw, prompt).map(Verdict::Score),
        Format::Rubric => parse::rubric(raw, prompt).map(|v| Verdict::Score(f64::from(v))),
        Format::FastChatRating => fastchat::rating(raw).map(Verdict::Score),
        Format::FastChatPair => fastchat::pairwise(raw).map(Verdict::Pairwise),
        Format::FastChatTwoScores => fastchat::pairwise_two_scores(raw).map(Verdict::Pairwise),
    }
}

/// The verdict of several samples: the most frequent pairwise verdict (a draw between the most
/// frequent ones is a tie), the mean score; unparsed samples are left out.
pub fn aggregate(samples: &[Verdict]) -> Verdict {
    let scores: Vec<f64> = samples
        .iter()
        .filter_map(|v| match v {
            Verdict::Score(s) => Some(*s),
            _ => None,
        })
        .collect();
    if !scores.is_empty() {
        return Verdict::Score(scores.iter().sum::<f64>() / scores.len() as f64);
    }
    let mut counts: Vec<(Pairwise, usize)> = Vec::new();
    for v in samples {
        if let Verdict::Pairwise(p) = v {
            match counts.iter_mut().find(|(q, _)| q == p) {
                Some(c) => c.1 += 1,
                None => counts.push((*p, 1)),
            }
        }
    }
    let Some(best) = counts.iter().map(|c| c.1).max() else {
        return Verdict::Unparsed;
    };
    let top: Vec<Pairwise> = counts.iter().filter(|c| c.1 == best).map(|c| c.0).collect();
    Verdict::Pairwise(if top.len() == 1 {
        top[0]
    } else {
        Pairwise::Tie
    })
}

/// A verdict as a category label (agreement tables; no `.` in it).
pub fn label(v: &Verdict) -> Option<String> {
    match v {
        Verdict::Pairwise(p) => Some(p.label().to_string()),
        Verdict::Score(s) => Some(format!("{s}").replace('.', "_")),
        Verdict::Unparsed => None,
    }
}

/// How [`judge_all`] runs.
pub struct JudgeOptions {
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Extra asks for a verdict that did not parse.
    pub retries: u32,
    /// Verdicts per prompt (`judge.samples`); more than 1 needs a judge sampling at a
    /// temperature above 0.
    pub samples: u32,
}

/// The cache key of one sample of a job (sample 0 keeps the key of a single verdict).
pub fn job_key(judge_id: &str, job: &Job, sample: u32) -> String {
    let template = if sample == 0 {
        job.template.clone()
    } else {
        format!("{}#sample{sample}", job.template)
    };
    Cache::key(judge_id, &template, &job.system, &job.user)
}

/// Asks for one verdict (with retries when it does not parse).
fn ask(
    job: &Job,
    sample: u32,
    samples: u32,
    backend: &dyn Backend,
    retries: u32,
    asked: &AtomicUsize,
) -> Result<(String, Verdict, u32), String> {
    let prompt = format!("{}\n{}", job.system, job.user);
    let mut attempts = 0;
    let mut raw = String::new();
    while attempts <= retries {
        attempts += 1;
        asked.fetch_add(1, Ordering::SeqCst);
        // The local judge's label probabilities give one deterministic verdict: only for a
        // single sample of a three-level prompt.
        let direct =
            if samples <= 1 && matches!(job.format, Format::Pairwise | Format::FastChatPair) {
                backend.pairwise(&job.system, &job.user)
            } else {
                None
            };
        let got = match direct {
            Some(r) => r.map(|(text, v)| (text, Some(Verdict::Pairwise(v)))),
            None => backend.sample(&job.system, &job.user, sample).map(|text| {
                let v = verdict_of(job.format, &text, &prompt);
                (text, v)
            }),
        };
        let (text, v) = got.map_err(|e| e.to_string())?;
        raw = text;
        if let Some(v) = v {
            return Ok((raw, v, attempts));
        }
    }
    Ok((raw, Verdict::Unparsed, attempts))
}

/// Judges every job `opts.samples` times: cached judgments are reused (the judge is not asked),
/// identical prompts are asked once, the rest go to the backend from `concurrency` threads; an
/// unparseable answer is asked again up to `retries` times, then recorded as unparsed.
/// `progress(done, total, asked)` after each judgment.
pub fn judge_all(
    jobs: &[Job],
    backend: &dyn Backend,
    cache: &Cache,
    opts: &JudgeOptions,
    progress: &(dyn Fn(usize, usize, usize) + Sync),
) -> Result<Vec<Judgment>, String> {
    let samples = opts.samples.max(1);
    let judge_id = backend.id();
    // Unique (key → first job and sample) so a prompt shared by two jobs is asked once.
    let mut unique: Vec<(String, usize, u32)> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut slots: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let mut mine = Vec::new();
        for s in 0..samples {
            let key = job_key(&judge_id, job, s);
            let u = *seen.entry(key.clone()).or_insert_with(|| {
                unique.push((key, i, s));
                unique.len() - 1
            });
            mine.push(u);
        }
        slots.push(mine);
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let asked = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Judgment>>> = Mutex::new(vec![None; unique.len()]);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let retries = opts.retries;
    std::thread::scope(|s| {
        for _ in 0..opts.concurrency.clamp(1, 64) {
            s.spawn(|| loop {
                let u = next.fetch_add(1, Ordering::SeqCst);
                if u >= unique.len() || failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let (key, i, sample) = &unique[u];
                let job = &jobs[*i];
                let j = match cache.get(key) {
                    Some(j) => j,
                    None => {
                        let (raw, verdict, attempts) =
                            match ask(job, *sample, samples, backend, retries, &asked) {
                                Ok(r) => r,
                                Err(e) => {
                                    if let Ok(mut f) = failure.lock() {
                                        *f = Some(e);
                                    }
                                    return;
                                }
                            };
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
                            turn: job.turn,
                            first: job.first.clone(),
                            second: job.second.clone(),
                            sample: *sample,
                            samples: Vec::new(),
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
                    r[u] = Some(j);
                }
                let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                progress(d, unique.len(), asked.load(Ordering::SeqCst));
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or(None) {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| "judge worker panicked".to_string())?;
    let mut out = Vec::with_capacity(jobs.len());
    for (job, mine) in jobs.iter().zip(&slots) {
        let got: Vec<&Judgment> = mine
            .iter()
            .map(|&u| {
                results[u]
                    .as_ref()
                    .ok_or_else(|| "a judgment is missing".to_string())
            })
            .collect::<Result<_, _>>()?;
        // What the judge said comes from the (maybe cached) judgment; what it was about, from
        // this job (a cached judgment may have been made for another job with the same prompt).
        let mut j = got[0].clone();
        j.question_id = job.question_id.clone();
        j.category = job.category.clone();
        j.slot = job.slot.clone();
        j.turn = job.turn;
        j.first = job.first.clone();
        j.second = job.second.clone();
        j.sample = 0;
        if samples > 1 {
            j.samples = got.iter().map(|g| g.verdict.clone()).collect();
            j.verdict = aggregate(&j.samples);
        }
        out.push(j);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_mtbench;
