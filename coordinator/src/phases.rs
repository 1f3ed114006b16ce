//! What each phase of a round fans out to, and what it must produce. Pure functions over the
//! spec; the state machine calls them when a phase starts.

use std::collections::BTreeMap;

use distillery_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// The phases of a round, in order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Once per campaign, before round 0's scoring, with `[teacher_correction]`.
    Correct,
    Score,
    Prune,
    /// With `rounds[i].search`: the candidates' short distillations.
    Search,
    Distill,
    Evaluate,
    Judge,
    Gate,
    Done,
}

impl Phase {
    /// The name used on the wire and in `status --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Correct => "correct",
            Phase::Score => "score",
            Phase::Prune => "prune",
            Phase::Search => "search",
            Phase::Distill => "distill",
            Phase::Evaluate => "evaluate",
            Phase::Judge => "judge",
            Phase::Gate => "gate",
            Phase::Done => "done",
        }
    }

    /// The phase after this one.
    pub fn next(self) -> Phase {
        match self {
            Phase::Correct => Phase::Score,
            Phase::Score => Phase::Prune,
            Phase::Prune => Phase::Search,
            Phase::Search => Phase::Distill,
            Phase::Distill => Phase::Evaluate,
            Phase::Evaluate => Phase::Judge,
            Phase::Judge => Phase::Gate,
            Phase::Gate | Phase::Done => Phase::Done,
        }
    }
}

/// Task kinds and the outputs each must report on completion.
pub mod kind {
    pub const SCORE: &str = "score";
    pub const SCORE_DEPTH: &str = "score_depth";
    pub const PRUNE: &str = "prune";
    /// A candidate's short distillation in a search (a gang like `distill`).
    pub const SEARCH: &str = "search";
    /// Teacher correction: the teacher fine-tuned on the training mix (a gang).
    pub const CORRECT: &str = "correct";
    pub const DISTILL: &str = "distill";
    pub const PERPLEXITY: &str = "perplexity";
    pub const GENERATE: &str = "generate";
    pub const JUDGE: &str = "judge";

    /// Every kind the coordinator hands out.
    pub const ALL: &[&str] = &[
        SCORE,
        SCORE_DEPTH,
        PRUNE,
        SEARCH,
        CORRECT,
        DISTILL,
        PERPLEXITY,
        GENERATE,
        JUDGE,
    ];

    /// Outputs a completed task of `kind` must name (artifact digests).
    pub fn required_outputs(kind: &str) -> &'static [&'static str] {
        match kind {
            SCORE => &["scores"],
            SCORE_DEPTH => &["depth_scores"],
            PRUNE => &["pruned"],
            DISTILL => &["student"],
            SEARCH => &["student", "checkpoint"],
            CORRECT => &["teacher"],
            GENERATE => &["answers"],
            JUDGE => &["judgments"],
            _ => &[],
        }
    }

    /// Metrics a completed task of `kind` must report.
    pub fn required_metrics(kind: &str) -> &'static [&'static str] {
        match kind {
            PERPLEXITY => &["perplexity"],
            SEARCH => &["search.score", "distill.tokens"],
            _ => &[],
        }
    }

    /// Metrics a `prune` task of a candidate search must report: the shape it chose.
    pub const CANDIDATE_METRICS: &[&str] = &[
        "params",
        "shape.hidden_size",
        "shape.intermediate_size",
        "shape.num_attention_heads",
        "shape.num_layers",
    ];
}

/// One task a phase asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPlan {
    pub kind: &'static str,
    pub params: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, String>,
    pub world_size: u32,
}

/// What a phase's planner may look at.
pub struct PhaseContext<'a> {
    pub spec: &'a pb::CampaignSpec,
    pub round: u32,
    /// The model this round prunes: the teacher for round 0, else the previous round's student.
    pub source: &'a str,
    /// Artifacts the round's earlier phases produced, plus the campaign's cached teacher outputs.
    pub artifacts: &'a BTreeMap<String, String>,
    /// Metrics so far, including cached teacher metrics (`teacher_perplexity`).
    pub metrics: &'a BTreeMap<String, f64>,
    /// The previous round's artifacts (for `baseline = "previous"`).
    pub previous: Option<&'a BTreeMap<String, String>>,
    /// Every earlier round's artifacts, round 0 first (for `judge.ranking`).
    pub earlier: Vec<&'a BTreeMap<String, String>>,
    /// How many times the gate has extended this round's distillation.
    pub extensions: u32,
    /// Checkpoint the round's distillation continues from: the search winner's, or the last
    /// one of this round's distillation when the gate extends it.
    pub distill_checkpoint: Option<&'a str>,
    /// The KD teacher and evaluation baseline: the corrected teacher once teacher correction
    /// ran, else the spec's teacher.
    pub teacher: &'a str,
    /// The spec's own teacher when a corrected one replaced it (its perplexity is reported
    /// beside the corrected one's).
    pub original_teacher: Option<&'a str>,
    /// With a search: each candidate's pruned model, in candidate order.
    pub candidates: &'a [String],
}

/// The teacher as a task input.
pub fn teacher_ref(spec: &pb::CampaignSpec) -> String {
    format!(
        "path:{}",
        spec.teacher
            .as_ref()
            .map(|t| t.model.as_str())
            .unwrap_or_default()
    )
}

fn params(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn single(
    kind: &'static str,
    params: BTreeMap<String, String>,
    inputs: BTreeMap<String, String>,
) -> TaskPlan {
    TaskPlan {
        kind,
        params,
        inputs,
        world_size: 1,
    }
}

/// The tasks `phase` fans out to; empty means the phase is skipped.
pub fn plan(ctx: &PhaseContext<'_>, phase: Phase) -> Vec<TaskPlan> {
    let spec = ctx.spec;
    let Some(round) = spec.rounds.get(ctx.round as usize) else {
        return Vec::new();
    };
    let sched = spec
        .scheduling
        .unwrap_or_else(crate::spec::default_scheduling);
    let mut base_inputs = ctx.artifacts.clone();
    base_inputs.insert("source".into(), ctx.source.to_string());
    base_inputs.insert("teacher".into(), ctx.teacher.to_string());
    match phase {
        Phase::Correct => {
            let Some(tc) = spec.teacher_correction.as_ref() else {
                return Vec::new();
            };
            if ctx.round != 0 || ctx.original_teacher.is_some() {
                return Vec::new();
            }
            vec![TaskPlan {
                kind: kind::CORRECT,
                params: params(&[("tokens", tc.tokens.to_string())]),
                inputs: base_inputs,
                world_size: tc.world_size.max(1),
            }]
        }
        Phase::Score => {
            let mut tasks: Vec<TaskPlan> = (0..sched.score_shards)
                .map(|i| {
                    single(
                        kind::SCORE,
                        params(&[
                            ("shard", i.to_string()),
                            ("shards", sched.score_shards.to_string()),
                        ]),
                        base_inputs.clone(),
                    )
                })
                .collect();
            if round.depth_importance == "perplexity" {
                let layers = spec
                    .teacher
                    .as_ref()
                    .and_then(|t| t.shape.as_ref())
                    .map(|s| s.num_layers)
                    .unwrap_or(0);
                let groups = if sched.depth_groups > 0 {
                    sched.depth_groups
                } else {
                    layers.clamp(1, 4)
                };
                tasks.extend((0..groups).map(|g| {
                    single(
                        kind::SCORE_DEPTH,
                        params(&[("group", g.to_string()), ("groups", groups.to_string())]),
                        base_inputs.clone(),
                    )
                }));
            }
            tasks
        }
        Phase::Prune => match &round.search {
            None => vec![single(
                kind::PRUNE,
                params(&[("round", ctx.round.to_string())]),
                base_inputs,
            )],
            // One pruned model per candidate shape; the worker's budget search numbers them.
            Some(s) => (0..s.candidates)
                .map(|i| {
                    single(
                        kind::PRUNE,
                        params(&[
                            ("round", ctx.round.to_string()),
                            ("candidate", i.to_string()),
                            ("candidates", s.candidates.to_string()),
                        ]),
                        base_inputs.clone(),
                    )
                })
                .collect(),
        },
        Phase::Search => {
            let Some(s) = &round.search else {
                return Vec::new();
            };
            let d = round.distill.clone().unwrap_or_default();
            // Each candidate trains on the round's full schedule (learning rate, data order)
            // and stops after the search's tokens, so the winner's continuation is exactly the
            // run it would have had without the search.
            ctx.candidates
                .iter()
                .enumerate()
                .map(|(i, pruned)| {
                    let mut inputs = base_inputs.clone();
                    inputs.insert("pruned".into(), pruned.clone());
                    TaskPlan {
                        kind: kind::SEARCH,
                        params: params(&[
                            ("tokens", d.tokens.to_string()),
                            ("stop_tokens", s.tokens.to_string()),
                            ("by", s.by.clone()),
                            ("candidate", i.to_string()),
                        ]),
                        inputs,
                        world_size: d.world_size.max(1),
                    }
                })
                .collect()
        }
        Phase::Distill => {
            let d = round.distill.clone().unwrap_or_default();
            let tokens = d.tokens.saturating_mul(1u64 << ctx.extensions.min(16));
            let mut inputs = base_inputs;
            if let Some(ck) = ctx.distill_checkpoint {
                inputs.insert("init_checkpoint".into(), ck.to_string());
            }
            vec![TaskPlan {
                kind: kind::DISTILL,
                params: params(&[
                    ("tokens", tokens.to_string()),
                    ("extension", ctx.extensions.to_string()),
                ]),
                inputs,
                world_size: d.world_size.max(1),
            }]
        }
        Phase::Evaluate => {
            let eval = spec.evaluation.clone().unwrap_or_default();
            let mut tasks = Vec::new();
            if eval.perplexity {
                tasks.push(single(
                    kind::PERPLEXITY,
                    params(&[("role", "student".into())]),
                    base_inputs.clone(),
                ));
                if !ctx.metrics.contains_key("teacher_perplexity") {
                    tasks.push(single(
                        kind::PERPLEXITY,
                        params(&[("role", "teacher".into())]),
                        base_inputs.clone(),
                    ));
                }
                if let Some(original) = ctx.original_teacher {
                    if !ctx.metrics.contains_key("original_teacher_perplexity") {
                        let mut inputs = base_inputs.clone();
                        inputs.insert("original_teacher".into(), original.to_string());
                        tasks.push(single(
                            kind::PERPLEXITY,
                            params(&[("role", "original_teacher".into())]),
                            inputs,
                        ));
                    }
                }
            }
            if let Some(j) = &eval.judge {
                tasks.push(single(
                    kind::GENERATE,
                    params(&[("role", "student".into())]),
                    base_inputs.clone(),
                ));
                // The teacher's answers: the baseline, a ranking's anchor, MT-Bench's
                // teacher_mtbench.
                let need_teacher = j.baseline == "teacher"
                    || ctx.previous.is_none()
                    || j.ranking
                    || j.mode == "mtbench";
                if need_teacher && !ctx.artifacts.contains_key("teacher_answers") {
                    tasks.push(single(
                        kind::GENERATE,
                        params(&[("role", "teacher".into())]),
                        base_inputs.clone(),
                    ));
                }
            }
            tasks
        }
        Phase::Judge => {
            let eval = spec.evaluation.clone().unwrap_or_default();
            let Some(j) = &eval.judge else {
                return Vec::new();
            };
            let mut inputs = base_inputs;
            let baseline = match (j.baseline.as_str(), ctx.previous) {
                ("previous", Some(prev)) => prev.get("answers").cloned(),
                _ => ctx.artifacts.get("teacher_answers").cloned(),
            };
            if let Some(b) = baseline {
                inputs.insert("baseline_answers".into(), b);
            }
            if j.ranking {
                // Every earlier model's answers, and every earlier judgment so a worker that did
                // not judge them does not ask the judge again.
                if let Some(t) = ctx.artifacts.get("teacher_answers") {
                    inputs.insert("ranking_answers.teacher".into(), t.clone());
                }
                for (r, arts) in ctx.earlier.iter().enumerate() {
                    if let Some(a) = arts.get("answers") {
                        inputs.insert(format!("ranking_answers.round{r}"), a.clone());
                    }
                    for (k, v) in arts.iter() {
                        if k == "judgments" || k.starts_with("judgments.") {
                            inputs.insert(format!("prior_judgments.round{r}.{k}"), v.clone());
                        }
                    }
                }
            }
            (0..sched.judge_shards)
                .map(|i| {
                    single(
                        kind::JUDGE,
                        params(&[
                            ("shard", i.to_string()),
                            ("shards", sched.judge_shards.to_string()),
                            ("mode", j.mode.clone()),
                        ]),
                        inputs.clone(),
                    )
                })
                .collect()
        }
        Phase::Gate | Phase::Done => Vec::new(),
    }
}

/// What the gate decided after a round's evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum GateDecision {
    Pass,
    Extend { reason: String },
    Stop { reason: String },
}

/// Applies the spec's `[gate]` rules to a round's metrics.
pub fn gate(
    spec: &pb::CampaignSpec,
    metrics: &BTreeMap<String, f64>,
    extensions: u32,
) -> GateDecision {
    let Some(g) = &spec.gate else {
        return GateDecision::Pass;
    };
    let mut failed = None;
    if let Some(max) = g.max_perplexity_ratio {
        if let (Some(s), Some(t)) = (metrics.get("perplexity"), metrics.get("teacher_perplexity")) {
            let ratio = s / t;
            // NaN fails the rule too.
            if ratio
                .partial_cmp(&max)
                .is_none_or(|o| o == std::cmp::Ordering::Greater)
            {
                failed = Some(format!(
                    "gate.max_perplexity_ratio: student perplexity {s:.3} is {ratio:.3}x the teacher's {t:.3} (limit {max})"
                ));
            }
        } else {
            failed = Some(
                "gate.max_perplexity_ratio: the round reported no perplexity to compare"
                    .to_string(),
            );
        }
    }
    if failed.is_none() {
        if let Some(min) = g.min_mtbench {
            match metrics.get("judge.mtbench.overall") {
                Some(v) if *v >= min => {}
                Some(v) => {
                    failed = Some(format!(
                        "gate.min_mtbench: MT-Bench score {v:.2} is below {min}"
                    ))
                }
                None => {
                    failed =
                        Some("gate.min_mtbench: the round has no valid MT-Bench grade".to_string())
                }
            }
        }
    }
    if failed.is_none() {
        if let Some(max) = g.max_elo_drop {
            match metrics.get("judge.elo_drop") {
                Some(d) if *d <= max => {}
                Some(d) => {
                    failed = Some(format!(
                        "gate.max_elo_drop: the student rates {d:.0} points below the teacher (limit {max})"
                    ))
                }
                None => {
                    failed =
                        Some("gate.max_elo_drop: the round has no ranking".to_string())
                }
            }
        }
    }
    if failed.is_none() {
        if let Some(min) = g.min_win_rate {
            match metrics.get("judge.win_rate") {
                Some(w) if *w >= min => {}
                Some(w) => {
                    failed = Some(format!("gate.min_win_rate: win rate {w:.3} is below {min}"))
                }
                None => {
                    failed =
                        Some("gate.min_win_rate: the round reported no judge win rate".to_string())
                }
            }
        }
    }
    match failed {
        None => GateDecision::Pass,
        Some(reason) if g.on_fail == "extend_distill" && extensions == 0 => {
            GateDecision::Extend { reason }
        }
        Some(reason) => GateDecision::Stop { reason },
    }
}

/// Why a round passed the gate: the rules checked and the figures that met them.
pub fn gate_pass_reason(spec: &pb::CampaignSpec, metrics: &BTreeMap<String, f64>) -> String {
    let Some(g) = &spec.gate else {
        return "no [gate] rules".into();
    };
    let mut parts = Vec::new();
    if let (Some(max), Some(s), Some(t)) = (
        g.max_perplexity_ratio,
        metrics.get("perplexity"),
        metrics.get("teacher_perplexity"),
    ) {
        parts.push(format!(
            "perplexity {s:.3} is {:.3}x the teacher's {t:.3} (limit {max})",
            s / t
        ));
    }
    if let (Some(min), Some(w)) = (g.min_win_rate, metrics.get("judge.win_rate")) {
        parts.push(format!("win rate {w:.3} (at least {min})"));
    }
    if parts.is_empty() {
        "no [gate] rules".into()
    } else {
        parts.join("; ")
    }
}

/// Merges a phase's task metrics into the round's: `sum.`-prefixed keys add up (across shards)
/// under the name without the prefix; others are copied. Judge counts yield `judge.win_rate`
/// when no task reported one.
pub fn merge_metrics(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (k, v) in from {
        if let Some(name) = k.strip_prefix("sum.") {
            *into.entry(name.to_string()).or_insert(0.0) += v;
        } else {
            into.insert(k.clone(), *v);
        }
    }
}

/// Derived judge figures from summed counts (win rate, bootstrap interval, position
/// consistency, mean lengths of winners and losers, MT-Bench scores, the length-controlled win
/// rate, the ranking and the round's `elo_drop`, agreement).
pub fn finish_judge_metrics(m: &mut BTreeMap<String, f64>, round: u32) {
    distillery_proto::judge_stats::derive(m);
    distillery_proto::judge_stats::elo_drop(m, round);
}

/// One line on a round's judge results (the `judge_result` event that `watch` prints).
pub fn judge_summary(spec: &pb::CampaignSpec, round: u32, m: &BTreeMap<String, f64>) -> String {
    let mode = spec
        .evaluation
        .as_ref()
        .and_then(|e| e.judge.as_ref())
        .map(|j| j.mode.clone())
        .unwrap_or_default();
    let g = |k: &str| m.get(&format!("judge.{k}")).copied();
    let mut s = format!("round {round} judge ({mode})");
    if let Some(w) = g("win_rate") {
        s.push_str(&format!(
            ": win rate {w:.3} [{:.3}, {:.3}] ({:.0}/{:.0}/{:.0} W/T/L, {:.0} unparsed)",
            g("ci_low").unwrap_or(f64::NAN),
            g("ci_high").unwrap_or(f64::NAN),
            g("wins").unwrap_or(0.0),
            g("ties").unwrap_or(0.0),
            g("losses").unwrap_or(0.0),
            g("unparsed").unwrap_or(0.0),
        ));
    }
    if let Some(lc) = g("lc_win_rate") {
        s.push_str(&format!(", length-controlled {lc:.3}"));
    }
    if let Some(o) = g("mtbench.overall") {
        s.push_str(&format!(
            ", MT-Bench {o:.2} (turn 1 {}, turn 2 {}, {:.0} invalid)",
            g("mtbench.turn1").map_or("-".into(), |v| format!("{v:.2}")),
            g("mtbench.turn2").map_or("-".into(), |v| format!("{v:.2}")),
            g("mtbench.invalid").unwrap_or(0.0)
        ));
        if let Some(t) = g("teacher_mtbench.overall") {
            s.push_str(&format!(", teacher {t:.2}"));
        }
    }
    if let Some(e) = g(&format!("ranking.round{round}.elo")) {
        s.push_str(&format!(
            ", rating {e:.0} [{:.0}, {:.0}] (teacher 1000)",
            g(&format!("ranking.round{round}.ci_low")).unwrap_or(f64::NAN),
            g(&format!("ranking.round{round}.ci_high")).unwrap_or(f64::NAN),
        ));
    }
    if let Some(a) = g("samples.alpha") {
        s.push_str(&format!(", self-agreement alpha {a:.2}"));
    }
    if let Some(k) = g("second.kappa") {
        s.push_str(&format!(", second-judge kappa {k:.2}"));
    }
    if !crate::spec::mtbench_comparable(&mode) {
        s.push_str(" — not comparable with published MT-Bench");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_gate(gate: pb::GateSpec) -> pb::CampaignSpec {
        pb::CampaignSpec {
            gate: Some(gate),
            ..Default::default()
        }
    }

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn the_mtbench_and_elo_rules_pass_fail_and_refuse_a_round_without_the_figure() {
        let s = spec_with_gate(pb::GateSpec {
            min_mtbench: Some(6.0),
            max_elo_drop: Some(50.0),
            on_fail: "stop".into(),
            ..Default::default()
        });
        let good = m(&[("judge.mtbench.overall", 6.0), ("judge.elo_drop", 49.0)]);
        assert_eq!(gate(&s, &good, 0), GateDecision::Pass);
        let low = m(&[("judge.mtbench.overall", 5.9), ("judge.elo_drop", 0.0)]);
        assert!(
            matches!(gate(&s, &low, 0), GateDecision::Stop { reason } if reason.contains("gate.min_mtbench") && reason.contains("5.90"))
        );
        let drop = m(&[("judge.mtbench.overall", 7.0), ("judge.elo_drop", 80.0)]);
        assert!(
            matches!(gate(&s, &drop, 0), GateDecision::Stop { reason } if reason.contains("gate.max_elo_drop") && reason.contains("80"))
        );
        let none = m(&[("judge.elo_drop", 0.0)]);
        assert!(
            matches!(gate(&s, &none, 0), GateDecision::Stop { reason } if reason.contains("no valid MT-Bench grade"))
        );
    }
}
