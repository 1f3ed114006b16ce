//! The two Minitron steps around a round's distillation: teacher correction (once, before round
//! 0: the corrected teacher replaces the spec's as KD teacher, pruning source and evaluation
//! baseline) and the architecture-candidate search (the prune phase yields one model per
//! candidate shape, the search phase distills each briefly, the lowest validation score wins and
//! the round's distillation continues the winner's checkpoint).

use std::collections::BTreeMap;

use super::*;
use crate::phases::{self, Phase};

/// Artifact name, among the campaign's teacher artifacts, of the corrected teacher.
pub const CORRECTED_TEACHER: &str = "corrected_teacher";

/// The teacher every phase uses (the corrected one once correction ran) and, when it replaced
/// the spec's, the spec's own teacher.
pub(super) fn teachers(c: &Campaign) -> (String, Option<String>) {
    let original = phases::teacher_ref(&c.spec);
    match c.teacher_artifacts.get(CORRECTED_TEACHER) {
        Some(corrected) => (corrected.clone(), Some(original)),
        None => (original, None),
    }
}

/// Of two scores, whether `a` beats `b` (lower wins; `None`, a score that was not finite,
/// never wins over a finite one).
fn better(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The winning candidate: the lowest finite score, the lowest index among equals. `None` when
/// no candidate has a finite score.
pub fn winner(candidates: &[Candidate]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, c) in candidates.iter().enumerate() {
        if c.score.is_some() && best.is_none_or(|b| better(c.score, candidates[b].score)) {
            best = Some(i);
        }
    }
    best
}

impl Tx<'_> {
    /// Teacher correction finished: its model becomes the campaign's teacher (round 0 prunes
    /// it) and its training figures are kept with the teacher's (`teacher_correction.*`).
    pub(super) fn fold_correction(&mut self, id: &str, tasks: &[Task]) {
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        for t in tasks {
            if let Some(teacher) = t.outputs.get("teacher") {
                c.teacher_artifacts
                    .insert(CORRECTED_TEACHER.to_string(), teacher.clone());
                if let Some(r0) = c.rounds.first_mut() {
                    r0.source = teacher.clone();
                }
            }
            for (k, v) in &t.metrics {
                if let Some(rest) = k.strip_prefix("correct.") {
                    c.teacher_metrics
                        .insert(format!("teacher_correction.{rest}"), *v);
                }
            }
        }
        self.t.dirty.campaigns.insert(id.to_string());
    }

    /// The prune phase of a searching round ended: one candidate per prune task, in candidate
    /// order, with the shape it chose (`phases::kind::CANDIDATE_METRICS`, checked at
    /// completion) and its pruned model. The merged importance scores are the round's.
    pub(super) fn fold_candidates(&mut self, id: &str, round: u32, tasks: &[Task]) {
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        let r = &mut c.rounds[round as usize];
        let metric = |t: &Task, k: &str| t.metrics.get(k).copied().unwrap_or(0.0);
        let mut candidates: Vec<Candidate> = tasks
            .iter()
            .map(|t| Candidate {
                index: t
                    .params
                    .get("candidate")
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0),
                hidden_size: metric(t, "shape.hidden_size") as u32,
                intermediate_size: metric(t, "shape.intermediate_size") as u32,
                num_attention_heads: metric(t, "shape.num_attention_heads") as u32,
                num_layers: metric(t, "shape.num_layers") as u32,
                params: metric(t, "params") as u64,
                pruned: t.outputs.get("pruned").cloned().unwrap_or_default(),
                ..Candidate::default()
            })
            .collect();
        candidates.sort_by_key(|x| x.index);
        if let Some(scores) = tasks.iter().find_map(|t| t.outputs.get("scores")) {
            r.artifacts.insert("scores".into(), scores.clone());
        }
        r.candidates = candidates;
        self.t.dirty.campaigns.insert(id.to_string());
    }

    /// The search phase ended: records each candidate's tokens, score and checkpoint, marks the
    /// winner and makes its pruned model, shape and checkpoint the round's. Returns false (the
    /// campaign failed) when no candidate has a finite score.
    pub(super) fn fold_search(
        &mut self,
        id: &str,
        round: u32,
        tasks: &[Task],
        now: Millis,
    ) -> bool {
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        let r = &mut c.rounds[round as usize];
        for t in tasks {
            let Some(x) = r
                .candidates
                .iter_mut()
                .find(|x| x.task.as_deref() == Some(t.id.as_str()))
            else {
                continue;
            };
            x.tokens = t.metrics.get("distill.tokens").copied().unwrap_or(0.0) as u64;
            x.score = t
                .metrics
                .get("search.score")
                .copied()
                .filter(|s| s.is_finite());
            x.checkpoint = t.outputs.get("checkpoint").cloned();
            x.student = t.outputs.get("student").cloned();
            x.winner = false;
        }
        self.t.dirty.campaigns.insert(id.to_string());
        let by = c
            .spec
            .rounds
            .get(round as usize)
            .and_then(|s| s.search.as_ref())
            .map(|s| s.by.clone())
            .unwrap_or_default();
        let summary: Vec<String> = r
            .candidates
            .iter()
            .map(|x| {
                format!(
                    "#{} {}/{}/{}/{} ({} params): {}",
                    x.index,
                    x.hidden_size,
                    x.intermediate_size,
                    x.num_attention_heads,
                    x.num_layers,
                    x.params,
                    x.score
                        .map_or("no score".to_string(), |s| format!("{s:.4}"))
                )
            })
            .collect();
        let Some(w) = winner(&r.candidates) else {
            let why = format!(
                "round {round} search: no candidate has a finite validation {by} ({}); lower \
                 the learning rate or raise search.tokens, then submit again",
                summary.join("; ")
            );
            self.finish_campaign(id, CampaignState::Failed, Some(why), now);
            return false;
        };
        r.candidates[w].winner = true;
        let x = r.candidates[w].clone();
        r.artifacts.insert("pruned".into(), x.pruned.clone());
        if let Some(ck) = &x.checkpoint {
            r.artifacts.insert("search_checkpoint".into(), ck.clone());
        }
        for (k, v) in [
            ("params", x.params as f64),
            ("shape.hidden_size", f64::from(x.hidden_size)),
            ("shape.intermediate_size", f64::from(x.intermediate_size)),
            (
                "shape.num_attention_heads",
                f64::from(x.num_attention_heads),
            ),
            ("shape.num_layers", f64::from(x.num_layers)),
            ("search.winner", f64::from(x.index)),
            ("search.score", x.score.unwrap_or(f64::NAN)),
            ("search.tokens", x.tokens as f64),
        ] {
            r.metrics.insert(k.to_string(), v);
        }
        self.emit(
            now,
            id,
            "search_decided",
            format!(
                "round {round} search by {by}: candidate #{} wins ({}); its distillation continues",
                x.index,
                summary.join("; ")
            ),
            |e| {
                e.round = round;
                e.phase = Phase::Search.as_str().into();
                e.metrics.insert("search.winner".into(), f64::from(x.index));
                if let Some(s) = x.score {
                    e.metrics.insert("search.score".into(), s);
                }
            },
        );
        true
    }
}

/// Candidates as clients see them: live tokens and scores from the search tasks until the
/// search ends.
pub(super) fn candidate_view(state: &State, x: &Candidate) -> distillery_proto::v1::Candidate {
    let task = x.task.as_ref().and_then(|t| state.tasks.get(t));
    let live = |k: &str| -> Option<f64> {
        let m: &BTreeMap<String, f64> = &task?.metrics;
        m.get(k)
            .or_else(|| m.get(&format!("progress.{k}")))
            .copied()
    };
    let tokens = if x.tokens > 0 {
        x.tokens
    } else {
        live("distill.tokens").unwrap_or(0.0) as u64
    };
    let score = x
        .score
        .or_else(|| live("search.score").filter(|s| s.is_finite()));
    distillery_proto::v1::Candidate {
        index: x.index,
        hidden_size: x.hidden_size,
        intermediate_size: x.intermediate_size,
        num_attention_heads: x.num_attention_heads,
        num_layers: x.num_layers,
        params: x.params,
        tokens,
        score,
        winner: x.winner,
        pruned: x.pruned.clone(),
        checkpoint: x
            .checkpoint
            .clone()
            .or_else(|| task.and_then(|t| t.checkpoint.clone()))
            .unwrap_or_default(),
        task_id: x.task.clone().unwrap_or_default(),
    }
}
