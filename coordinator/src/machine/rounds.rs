//! How a round moves: phases start with the tasks `crate::phases::plan` asks for, a phase's
//! results are folded into the round when its last task succeeds, and the gate decides what
//! comes next.

use std::collections::BTreeMap;

use super::*;
use crate::phases::{self, kind, GateDecision, Phase, PhaseContext};

impl Tx<'_> {
    pub(super) fn phase_context_parts(
        &self,
        id: &str,
        round: u32,
    ) -> (BTreeMap<String, String>, BTreeMap<String, f64>) {
        let c = &self.s.campaigns[id];
        let r = &c.rounds[round as usize];
        let mut artifacts = c.teacher_artifacts.clone();
        artifacts.extend(r.artifacts.clone());
        let mut metrics = c.teacher_metrics.clone();
        metrics.extend(r.metrics.clone());
        (artifacts, metrics)
    }

    pub(super) fn start_round(&mut self, id: &str, round: u32, now: Millis) {
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        c.current_round = round;
        let r = &mut c.rounds[round as usize];
        r.state = RoundState::Running;
        // Teacher correction (round 0 only, when asked for) comes before scoring; the planner
        // skips it everywhere else.
        r.phase = Phase::Correct;
        self.t.dirty.campaigns.insert(id.to_string());
        self.emit(
            now,
            id,
            "round_started",
            format!("round {round} started"),
            |e| e.round = round,
        );
        self.start_phase(id, round, Phase::Correct, now);
    }

    /// Starts `phase` (or the first later phase that has work) of a round.
    pub(super) fn start_phase(&mut self, id: &str, round: u32, mut phase: Phase, now: Millis) {
        loop {
            if phase == Phase::Gate {
                self.run_gate(id, round, now);
                return;
            }
            let (artifacts, metrics) = self.phase_context_parts(id, round);
            let c = &self.s.campaigns[id];
            let r = &c.rounds[round as usize];
            let previous = round
                .checked_sub(1)
                .map(|p| &c.rounds[p as usize].artifacts);
            let earlier: Vec<&BTreeMap<String, String>> = c.rounds[..round as usize]
                .iter()
                .map(|r| &r.artifacts)
                .collect();
            let distill_checkpoint = match phase {
                Phase::Distill if r.extensions > 0 => c
                    .tasks
                    .iter()
                    .rev()
                    .filter_map(|t| self.s.tasks.get(t))
                    .find(|t| t.round == round && t.kind == kind::DISTILL)
                    .and_then(|t| t.checkpoint.clone()),
                // After a search the round's distillation continues the winner's.
                Phase::Distill => r
                    .candidates
                    .iter()
                    .find(|x| x.winner)
                    .and_then(|x| x.checkpoint.clone()),
                _ => None,
            };
            let (teacher, original_teacher) = super::search::teachers(c);
            let candidates: Vec<String> = r.candidates.iter().map(|x| x.pruned.clone()).collect();
            let ctx = PhaseContext {
                spec: &c.spec,
                round,
                source: &r.source,
                artifacts: &artifacts,
                metrics: &metrics,
                previous,
                earlier,
                extensions: r.extensions,
                distill_checkpoint: distill_checkpoint.as_deref(),
                teacher: &teacher,
                original_teacher: original_teacher.as_deref(),
                candidates: &candidates,
            };
            let plans = phases::plan(&ctx, phase);
            let max_attempts = c
                .spec
                .scheduling
                .as_ref()
                .map(|s| s.max_attempts)
                .unwrap_or(3)
                .max(1);
            let max_lost = c.spec.scheduling.as_ref().and_then(|s| s.max_lost);
            let c = self.s.campaigns.get_mut(id).expect("caller checked");
            c.rounds[round as usize].phase = phase;
            c.rounds[round as usize].phase_tasks.clear();
            self.s.open_in_phase.insert(id.to_string(), plans.len());
            self.t.dirty.campaigns.insert(id.to_string());
            if plans.is_empty() {
                phase = phase.next();
                continue;
            }
            let n = plans.len();
            for p in plans {
                self.s.meta.next_task += 1;
                let tid = format!("t{:08}", self.s.meta.next_task);
                self.s.tasks.insert(
                    tid.clone(),
                    Task {
                        id: tid.clone(),
                        campaign: id.to_string(),
                        round,
                        phase,
                        kind: p.kind.to_string(),
                        params: p.params,
                        inputs: p.inputs,
                        world_size: p.world_size,
                        state: TaskState::Pending,
                        attempts: 0,
                        max_attempts,
                        failed: 0,
                        lost: 0,
                        revoked: 0,
                        max_lost,
                        not_before_ms: 0,
                        outputs: BTreeMap::new(),
                        metrics: BTreeMap::new(),
                        checkpoint: None,
                        error: None,
                        progress: ProgressSeries::default(),
                        attempt_log: Vec::new(),
                    },
                );
                self.s.pending.insert(tid.clone());
                self.t.dirty.tasks.insert(tid.clone());
                let c = self.s.campaigns.get_mut(id).expect("caller checked");
                c.tasks.push(tid.clone());
                let r = &mut c.rounds[round as usize];
                if phase == Phase::Search {
                    // Plans come in candidate order.
                    let i = r.phase_tasks.len();
                    if let Some(x) = r.candidates.get_mut(i) {
                        x.task = Some(tid.clone());
                    }
                }
                r.phase_tasks.push(tid);
            }
            self.t.dirty.meta = true;
            self.emit(
                now,
                id,
                "phase_started",
                format!("round {round} {} started with {n} task(s)", phase.as_str()),
                |e| {
                    e.round = round;
                    e.phase = phase.as_str().into();
                },
            );
            return;
        }
    }

    /// When every task of the round's current phase succeeded, folds their outputs into the round
    /// and starts the next phase.
    pub(super) fn maybe_advance(&mut self, id: &str, round: u32, now: Millis) {
        let Some(c) = self.s.campaigns.get(id) else {
            return;
        };
        if c.state.is_terminal() {
            return;
        }
        let r = &c.rounds[round as usize];
        if self.s.open_in_phase.get(id).copied().unwrap_or(0) > 0 {
            return;
        }
        let phase = r.phase;
        let tasks: Vec<Task> = r
            .phase_tasks
            .iter()
            .filter_map(|t| self.s.tasks.get(t).cloned())
            .collect();
        let searching = c
            .spec
            .rounds
            .get(round as usize)
            .is_some_and(|s| s.search.is_some());
        match phase {
            Phase::Correct => {
                self.fold_correction(id, &tasks);
                self.start_phase(id, round, phase.next(), now);
                return;
            }
            Phase::Prune if searching => {
                self.fold_candidates(id, round, &tasks);
                self.start_phase(id, round, phase.next(), now);
                return;
            }
            Phase::Search => {
                if self.fold_search(id, round, &tasks, now) {
                    self.start_phase(id, round, phase.next(), now);
                }
                return;
            }
            _ => {}
        }
        let many = tasks.len() > 1;
        let c = self.s.campaigns.get_mut(id).expect("checked");
        if phase == Phase::Judge {
            // A judge phase that runs again (the gate extended distillation) replaces the
            // round's judge figures instead of adding its counts to the old ones.
            c.rounds[round as usize]
                .metrics
                .retain(|k, _| !k.starts_with("judge."));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &tasks {
            // Teacher figures are cached for the campaign under `<role>_` names.
            let teacher = t
                .params
                .get("role")
                .filter(|r| *r == "teacher" || *r == "original_teacher")
                .map(|r| format!("{r}_"));
            let idx = counts.entry(t.kind.as_str()).or_default();
            for (name, digest) in &t.outputs {
                if let Some(prefix) = &teacher {
                    c.teacher_artifacts
                        .insert(format!("{prefix}{name}"), digest.clone());
                } else {
                    let key = if many
                        && kind::required_outputs(&t.kind).contains(&name.as_str())
                        && t.kind != kind::GENERATE
                    {
                        format!("{name}.{idx}")
                    } else {
                        name.clone()
                    };
                    c.rounds[round as usize]
                        .artifacts
                        .insert(key, digest.clone());
                }
            }
            *idx += 1;
            if let Some(prefix) = &teacher {
                let prefixed: BTreeMap<String, f64> = t
                    .metrics
                    .iter()
                    .map(|(k, v)| (format!("{prefix}{k}"), *v))
                    .collect();
                phases::merge_metrics(&mut c.teacher_metrics, &prefixed);
            } else {
                phases::merge_metrics(&mut c.rounds[round as usize].metrics, &t.metrics);
            }
        }
        if phase == Phase::Judge {
            phases::finish_judge_metrics(&mut c.rounds[round as usize].metrics, round);
            let summary = phases::judge_summary(&c.spec, round, &c.rounds[round as usize].metrics);
            let judge: Vec<(String, f64)> = c.rounds[round as usize]
                .metrics
                .iter()
                .filter(|(k, _)| k.starts_with("judge."))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            self.emit(now, id, "judge_result", summary, |e| {
                e.round = round;
                e.phase = Phase::Judge.as_str().into();
                e.metrics = judge.into_iter().collect();
            });
        }
        self.t.dirty.campaigns.insert(id.to_string());
        self.start_phase(id, round, phase.next(), now);
    }

    pub(super) fn run_gate(&mut self, id: &str, round: u32, now: Millis) {
        let (_, metrics) = self.phase_context_parts(id, round);
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        // The round's table shows the teacher figures next to the student's.
        for (k, v) in &c.teacher_metrics {
            c.rounds[round as usize].metrics.insert(k.clone(), *v);
        }
        let extensions = c.rounds[round as usize].extensions;
        let decision = phases::gate(&c.spec, &metrics, extensions);
        let last = round as usize + 1 == c.rounds.len();
        let (name, reason) = match &decision {
            GateDecision::Pass => ("pass", phases::gate_pass_reason(&c.spec, &metrics)),
            GateDecision::Extend { reason } => ("extend", reason.clone()),
            GateDecision::Stop { reason } => ("stop", reason.clone()),
        };
        c.rounds[round as usize].gate_log.push(GateRecord {
            time_ms: now,
            decision: name.into(),
            reason,
            metrics: ["perplexity", "teacher_perplexity", "judge.win_rate"]
                .iter()
                .filter_map(|k| metrics.get(*k).map(|v| (k.to_string(), *v)))
                .collect(),
        });
        self.t.dirty.campaigns.insert(id.to_string());
        match decision {
            GateDecision::Pass => {
                let c = self.s.campaigns.get_mut(id).expect("checked");
                let r = &mut c.rounds[round as usize];
                r.state = RoundState::Succeeded;
                r.phase = Phase::Done;
                let student = r.artifacts.get("student").cloned().unwrap_or_default();
                self.emit(
                    now,
                    id,
                    "gate_decision",
                    format!("round {round} passed the gate"),
                    |e| {
                        e.round = round;
                        e.phase = Phase::Gate.as_str().into();
                    },
                );
                if last {
                    self.finish_campaign(id, CampaignState::Succeeded, None, now);
                } else {
                    let c = self.s.campaigns.get_mut(id).expect("checked");
                    c.rounds[round as usize + 1].source = student;
                    self.start_round(id, round + 1, now);
                }
            }
            GateDecision::Extend { reason } => {
                let c = self.s.campaigns.get_mut(id).expect("checked");
                c.rounds[round as usize].extensions += 1;
                self.emit(
                    now,
                    id,
                    "gate_decision",
                    format!("round {round} extends distillation: {reason}"),
                    |e| {
                        e.round = round;
                        e.phase = Phase::Gate.as_str().into();
                    },
                );
                self.start_phase(id, round, Phase::Distill, now);
            }
            GateDecision::Stop { reason } => {
                self.emit(
                    now,
                    id,
                    "gate_decision",
                    format!("round {round} stopped the campaign: {reason}"),
                    |e| {
                        e.round = round;
                        e.phase = Phase::Gate.as_str().into();
                    },
                );
                self.finish_campaign(
                    id,
                    CampaignState::Failed,
                    Some(format!("round {round} gate: {reason}")),
                    now,
                );
            }
        }
    }
}
