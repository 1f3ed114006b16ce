//! Statistics of an evaluation, from the student's point of view: wins/ties/losses against the
//! baseline (pairwise: both orders, a disagreement is a tie), win rate with a bootstrap 95%
//! interval, position consistency, unparsed count, mean answer length of winners and losers, and
//! per-category counts. Everything is also reported as summable counts (`sum.judge.*`) so shards
//! merge; the coordinator derives the same rates from the sums.

use std::collections::BTreeMap;

pub use distillery_proto::judge_stats::{bootstrap_ci, derive};

use super::parse::Pairwise;
use super::{Answers, Judgment, Mode, Verdict};

/// Per-question outcome for the student.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Win,
    Tie,
    Loss,
    Unparsed,
}

/// Pairwise: combine the two orders. Graded: compare the two scores.
pub fn outcomes(
    mode: Mode,
    judgments: &[Judgment],
) -> Vec<(String, String, Outcome, Option<bool>)> {
    let mut by_q: BTreeMap<&str, (String, Option<&Verdict>, Option<&Verdict>)> = BTreeMap::new();
    for j in judgments {
        let e = by_q
            .entry(&j.question_id)
            .or_insert((j.category.clone(), None, None));
        match j.slot.as_str() {
            "student_first" | "student" => e.1 = Some(&j.verdict),
            _ => e.2 = Some(&j.verdict),
        }
    }
    by_q.into_iter()
        .map(|(q, (cat, first, second))| {
            let (o, consistent) = match (mode, first, second) {
                (Mode::Pairwise, Some(Verdict::Pairwise(a)), Some(Verdict::Pairwise(b))) => {
                    // Student-first: A = student. Baseline-first: B = student.
                    let s1 = match a {
                        Pairwise::A => Outcome::Win,
                        Pairwise::B => Outcome::Loss,
                        Pairwise::Tie => Outcome::Tie,
                    };
                    let s2 = match b {
                        Pairwise::B => Outcome::Win,
                        Pairwise::A => Outcome::Loss,
                        Pairwise::Tie => Outcome::Tie,
                    };
                    if s1 == s2 {
                        (s1, Some(true))
                    } else {
                        (Outcome::Tie, Some(false))
                    }
                }
                (Mode::Single | Mode::Rubric, Some(Verdict::Score(s)), Some(Verdict::Score(b))) => {
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
            (q.to_string(), cat, o, consistent)
        })
        .collect()
}

/// The metrics of a set of judgments (`sum.judge.*` counts plus derived `judge.*` figures).
pub fn metrics(
    mode: Mode,
    judgments: &[Judgment],
    student: &Answers,
    baseline: &Answers,
) -> BTreeMap<String, f64> {
    let outs = outcomes(mode, judgments);
    let mut m = BTreeMap::new();
    let mut count = |k: String, v: f64| *m.entry(k).or_insert(0.0) += v;
    let len = |a: &Answers, q: &str| -> f64 {
        a.answers
            .get(q)
            .map_or(0, |v| v.iter().map(|s| s.chars().count()).sum::<usize>()) as f64
    };
    for (q, cat, o, consistent) in &outs {
        let name = match o {
            Outcome::Win => "wins",
            Outcome::Tie => "ties",
            Outcome::Loss => "losses",
            Outcome::Unparsed => "unparsed",
        };
        count(format!("sum.judge.{name}"), 1.0);
        let cat = if cat.is_empty() { "uncategorized" } else { cat };
        count(format!("sum.judge.category.{cat}.{name}"), 1.0);
        if let Some(c) = consistent {
            count("sum.judge.pairs".into(), 1.0);
            if *c {
                count("sum.judge.consistent".into(), 1.0);
            }
        }
        let (sl, bl) = (len(student, q), len(baseline, q));
        match o {
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
    if mode != Mode::Pairwise {
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
    m
}
