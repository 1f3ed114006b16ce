//! Statistics of an evaluation, from the student's point of view: wins/ties/losses against the
//! baseline (pairwise: both orders, a disagreement is a tie), win rate with a bootstrap 95%
//! interval, position consistency, unparsed count, mean answer length of winners and losers, and
//! per-category counts. Everything is also reported as summable counts (`sum.judge.*`) so shards
//! merge; the coordinator derives the same rates from the sums.

use std::collections::BTreeMap;

pub use distillery_proto::judge_stats::{bootstrap_ci, derive};

use super::{Answers, Judgment, Mode, Verdict};

/// Per-question outcome for the student.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Win,
    Tie,
    Loss,
    Unparsed,
}

/// Slots of the student-versus-baseline comparison (not the ranking's, not the teacher's grades).
fn is_main(slot: &str) -> bool {
    matches!(
        slot,
        "student_first" | "baseline_first" | "student" | "baseline"
    )
}

/// One comparison of the student with the baseline: a question (or one turn of it in the
/// MT-Bench modes), its outcome and, pairwise, whether both orders agreed.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub question_id: String,
    pub turn: u32,
    pub category: String,
    pub outcome: Outcome,
    pub consistent: Option<bool>,
}

/// Pairwise: combine the two orders. Graded: compare the two scores. Per question and turn.
pub fn outcomes(mode: Mode, judgments: &[Judgment]) -> Vec<Compared> {
    type Pair<'a> = (String, Option<&'a Verdict>, Option<&'a Verdict>);
    let mut by_q: BTreeMap<(&str, u32), Pair<'_>> = BTreeMap::new();
    for j in judgments.iter().filter(|j| is_main(&j.slot)) {
        let e = by_q
            .entry((&j.question_id, j.turn))
            .or_insert((j.category.clone(), None, None));
        match j.slot.as_str() {
            "student_first" | "student" => e.1 = Some(&j.verdict),
            _ => e.2 = Some(&j.verdict),
        }
    }
    by_q.into_iter()
        .map(|((q, turn), (cat, first, second))| {
            let (o, consistent) = match (mode.is_pairwise(), first, second) {
                (true, Some(Verdict::Pairwise(a)), Some(Verdict::Pairwise(b))) => {
                    // Student-first: A = student. Baseline-first: B = student.
                    let s1 = if a.favours_a() {
                        Outcome::Win
                    } else if a.favours_b() {
                        Outcome::Loss
                    } else {
                        Outcome::Tie
                    };
                    let s2 = if b.favours_b() {
                        Outcome::Win
                    } else if b.favours_a() {
                        Outcome::Loss
                    } else {
                        Outcome::Tie
                    };
                    if s1 == s2 {
                        (s1, Some(true))
                    } else {
                        (Outcome::Tie, Some(false))
                    }
                }
                (false, Some(Verdict::Score(s)), Some(Verdict::Score(b))) => {
                    let o = if s > b {
                        Outcome::Win
                    } else if s < b {
                        Outcome::Loss
                    } else {
                        Outcome::Tie
                    };
                    (o, None)
                }
                _ => (Outcome::Unparsed, None),
            };
            Compared {
                question_id: q.to_string(),
                turn,
                category: cat,
                outcome: o,
                consistent,
            }
        })
        .collect()
}

/// Characters of a model's answer to a question: one turn (MT-Bench), or all turns (turn 0).
fn answer_chars(a: &Answers, q: &str, turn: u32) -> f64 {
    a.answers.get(q).map_or(0, |v| {
        if turn == 0 {
            v.iter().map(|s| s.chars().count()).sum::<usize>()
        } else {
            v.get(turn as usize - 1).map_or(0, |s| s.chars().count())
        }
    }) as f64
}

/// The metrics of a set of judgments against the teacher as baseline (see [`metrics_for`]).
pub fn metrics(
    mode: Mode,
    judgments: &[Judgment],
    student: &Answers,
    baseline: &Answers,
) -> BTreeMap<String, f64> {
    metrics_for(mode, judgments, student, baseline, true)
}

/// The metrics of a set of judgments (`sum.judge.*` counts plus derived `judge.*` figures):
/// win/tie/loss counts, position consistency, lengths of winners and losers, outcome counts per
/// length difference (the length-controlled win rate), MT-Bench turn sums per graded model
/// (`mtbench` for the student, `teacher_mtbench`, and `baseline_mtbench` when the baseline is
/// not the teacher) and the ranking's battle counts.
pub fn metrics_for(
    mode: Mode,
    judgments: &[Judgment],
    student: &Answers,
    baseline: &Answers,
    baseline_is_teacher: bool,
) -> BTreeMap<String, f64> {
    let outs = outcomes(mode, judgments);
    let mut m = BTreeMap::new();
    let mut count = |k: String, v: f64| *m.entry(k).or_insert(0.0) += v;
    for c in &outs {
        let name = match c.outcome {
            Outcome::Win => "wins",
            Outcome::Tie => "ties",
            Outcome::Loss => "losses",
            Outcome::Unparsed => "unparsed",
        };
        count(format!("sum.judge.{name}"), 1.0);
        let cat = if c.category.is_empty() {
            "uncategorized"
        } else {
            &c.category
        };
        count(format!("sum.judge.category.{cat}.{name}"), 1.0);
        if let Some(ok) = c.consistent {
            count("sum.judge.pairs".into(), 1.0);
            if ok {
                count("sum.judge.consistent".into(), 1.0);
            }
        }
        let (sl, bl) = (
            answer_chars(student, &c.question_id, c.turn),
            answer_chars(baseline, &c.question_id, c.turn),
        );
        match c.outcome {
            Outcome::Win => {
                count("sum.judge.decided".into(), 1.0);
                count("sum.judge.winner_chars".into(), sl);
                count("sum.judge.loser_chars".into(), bl);
            }
            Outcome::Loss => {
                count("sum.judge.decided".into(), 1.0);
                count("sum.judge.winner_chars".into(), bl);
                count("sum.judge.loser_chars".into(), sl);
            }
            _ => {}
        }
        if c.outcome != Outcome::Unparsed {
            // The length difference as an integer key: shards' counts add up per difference.
            count(format!("sum.judge.lc.{}.{name}", (sl - bl) as i64), 1.0);
        }
    }
    for k in [
        "wins",
        "ties",
        "losses",
        "unparsed",
        "pairs",
        "consistent",
        "decided",
    ] {
        m.entry(format!("sum.judge.{k}")).or_insert(0.0);
    }
    if !mode.is_pairwise() && mode != Mode::MtBench {
        let mean = |slot: &str| {
            let v: Vec<f64> = judgments
                .iter()
                .filter(|j| j.slot == slot)
                .filter_map(|j| match j.verdict {
                    Verdict::Score(s) => Some(s),
                    _ => None,
                })
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        m.insert("judge.student_score".into(), mean("student"));
        m.insert("judge.baseline_score".into(), mean("baseline"));
    }
    if mode == Mode::MtBench {
        for j in judgments {
            let who = match j.slot.as_str() {
                "student" => "mtbench",
                "teacher" => "teacher_mtbench",
                "baseline" if baseline_is_teacher => "teacher_mtbench",
                "baseline" => "baseline_mtbench",
                _ => continue,
            };
            m.entry(format!("sum.judge.{who}.invalid")).or_insert(0.0);
            match j.verdict {
                Verdict::Score(s) => {
                    *m.entry(format!("sum.judge.{who}.turn{}_sum", j.turn))
                        .or_insert(0.0) += s;
                    *m.entry(format!("sum.judge.{who}.turn{}_n", j.turn))
                        .or_insert(0.0) += 1.0;
                }
                _ => *m.entry(format!("sum.judge.{who}.invalid")).or_insert(0.0) += 1.0,
            }
        }
    }
    m.extend(super::ranking::battle_metrics(judgments));
    m
}

/// Self-agreement over `judge.samples`: the coincidence table of the samples' verdicts per
/// prompt (`sum.judge.samples.coincidence.<a>.<b>`) and `judge.samples.k`.
pub fn sample_metrics(judgments: &[Judgment], k: u32) -> BTreeMap<String, f64> {
    let mut o = distillery_proto::judge_agreement::Coincidence::new();
    for j in judgments.iter().filter(|j| j.samples.len() > 1) {
        let values: Vec<String> = j.samples.iter().filter_map(super::label).collect();
        distillery_proto::judge_agreement::add_unit(&mut o, &values);
    }
    let mut m: BTreeMap<String, f64> = o
        .into_iter()
        .map(|((a, b), v)| (format!("sum.judge.samples.coincidence.{a}.{b}"), v))
        .collect();
    m.insert("judge.samples.k".into(), f64::from(k));
    m
}

/// Slot prefix of the second judge's judgments (`judge.second`) in the judgments artifact.
pub const SECOND_PREFIX: &str = "second:";

/// Agreement with a second judge on the same prompts: the confusion table of the two verdicts
/// (`sum.judge.second.confusion.<first>.<second>`) and prompts either left unparsed.
pub fn second_metrics(first: &[Judgment], second: &[Judgment]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    m.insert("sum.judge.second.unparsed".to_string(), 0.0);
    for (a, b) in first.iter().zip(second) {
        match (super::label(&a.verdict), super::label(&b.verdict)) {
            (Some(x), Some(y)) => {
                *m.entry(format!("sum.judge.second.confusion.{x}.{y}"))
                    .or_insert(0.0) += 1.0
            }
            _ => {
                *m.entry("sum.judge.second.unparsed".to_string())
                    .or_insert(0.0) += 1.0
            }
        }
    }
    m
}
