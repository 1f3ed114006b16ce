//! A ranking of the teacher and every round's student: every pair of models judged on every
//! question in both orders (the cache makes a new round pay only for its new pairs), each verdict
//! one battle (Arena-Hard's strong verdicts three), counted per pair of models so shards add up;
//! the coordinator fits the Bradley–Terry ratings from the sums
//! (`distillery_proto::bradley_terry`).

use std::collections::BTreeMap;

use distillery_proto::judge_stats::model_order;

use super::{pair_jobs, Answers, Job, Judgment, PairPrompts, Question, Verdict};

/// Slot prefix of ranking jobs.
pub const SLOT_PREFIX: &str = "rank:";

/// Both orders of every question for every pair of `models` (named `teacher`, `round<N>`).
pub fn ranking_jobs(
    prompts: &PairPrompts<'_>,
    questions: &[Question],
    models: &[(String, Answers)],
) -> Result<Vec<Job>, String> {
    let mut out = Vec::new();
    for (i, (a, aa)) in models.iter().enumerate() {
        for (b, ba) in &models[i + 1..] {
            out.extend(pair_jobs(
                prompts,
                questions,
                (a.as_str(), aa),
                (b.as_str(), ba),
                SLOT_PREFIX,
            )?);
        }
    }
    Ok(out)
}

/// Battle counts `sum.judge.battles.<a>.<b>.{a_wins, ties, b_wins}` from the ranking judgments,
/// `a` before `b` in ranking order; unparsed verdicts are no battle.
pub fn battle_metrics(judgments: &[Judgment]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for j in judgments.iter().filter(|j| j.slot.starts_with(SLOT_PREFIX)) {
        let Verdict::Pairwise(p) = &j.verdict else {
            continue;
        };
        let first_is_a = model_order(&j.first) <= model_order(&j.second);
        let (a, b) = if first_is_a {
            (&j.first, &j.second)
        } else {
            (&j.second, &j.first)
        };
        let outcome = if p.favours_a() == first_is_a && (p.favours_a() || p.favours_b()) {
            "a_wins"
        } else if p.favours_a() || p.favours_b() {
            "b_wins"
        } else {
            "ties"
        };
        // All three counts of a pair exist, so the field names are stable.
        for o in ["a_wins", "ties", "b_wins"] {
            m.entry(format!("sum.judge.battles.{a}.{b}.{o}"))
                .or_insert(0.0);
        }
        *m.entry(format!("sum.judge.battles.{a}.{b}.{outcome}"))
            .or_insert(0.0) += p.weight();
    }
    m
}
