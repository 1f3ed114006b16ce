//! A campaign's life as the operator drives it: submit, cancel, pause, resume, retry, and the
//! end of a campaign (its open tasks cancelled, their leases revoked).

use std::collections::BTreeMap;

use distillery_proto::v1 as pb;

use super::leases::Ending;
use super::*;
use crate::phases::{self, Phase};

impl Tx<'_> {
    pub(super) fn submit(
        &mut self,
        spec: pb::CampaignSpec,
        now: Millis,
    ) -> Result<(), MachineError> {
        crate::spec::validate_wire(&spec)
            .map_err(|e| MachineError::InvalidArgument(format!("spec.{e}")))?;
        // A round no registered device can hold would wait forever: refuse it now.
        let devices: Vec<(String, u64)> = self
            .s
            .workers
            .values()
            .flat_map(|w| {
                w.devices
                    .iter()
                    .cloned()
                    .zip(w.device_memory.iter().copied().chain(std::iter::repeat(0)))
            })
            .collect();
        crate::plan::check_registered(&spec, &devices)
            .map_err(|e| MachineError::InvalidArgument(format!("spec.{e}")))?;
        check_fan_out(&spec, self.cfg.max_tasks_per_phase)?;
        self.s.meta.next_campaign += 1;
        self.t.dirty.meta = true;
        let id = format!("c{:06}", self.s.meta.next_campaign);
        let teacher = phases::teacher_ref(&spec);
        let rounds = (0..spec.rounds.len() as u32)
            .map(|i| Round {
                index: i,
                state: RoundState::Pending,
                phase: Phase::Score,
                source: if i == 0 {
                    teacher.clone()
                } else {
                    String::new()
                },
                phase_tasks: Vec::new(),
                artifacts: BTreeMap::new(),
                metrics: BTreeMap::new(),
                extensions: 0,
                candidates: Vec::new(),
                gate_log: Vec::new(),
            })
            .collect();
        let name = spec.name.clone();
        self.s.campaigns.insert(
            id.clone(),
            Campaign {
                id: id.clone(),
                spec,
                state: CampaignState::Pending,
                error: None,
                rounds,
                current_round: 0,
                created_ms: now,
                updated_ms: now,
                teacher_metrics: BTreeMap::new(),
                teacher_artifacts: BTreeMap::new(),
                tasks: Vec::new(),
                retries: 0,
            },
        );
        self.t.dirty.campaigns.insert(id.clone());
        self.emit(
            now,
            &id,
            "campaign_submitted",
            format!("campaign {id} ({name}) submitted"),
            |e| e.state = pb::CampaignState::Pending as i32,
        );
        self.start_round(&id, 0, now);
        self.dispatch(now);
        self.t.reply = Reply::CampaignId(id);
        Ok(())
    }

    /// Ends a campaign: its open tasks are cancelled and their leases revoked.
    pub(super) fn finish_campaign(
        &mut self,
        id: &str,
        to: CampaignState,
        error: Option<String>,
        now: Millis,
    ) {
        let Some(c) = self.s.campaigns.get_mut(id) else {
            return;
        };
        let task_ids = c.tasks.clone();
        let round_state = match to {
            CampaignState::Failed => RoundState::Failed,
            CampaignState::Cancelled => RoundState::Cancelled,
            _ => RoundState::Succeeded,
        };
        for r in &mut c.rounds {
            if r.state == RoundState::Running {
                r.state = round_state;
            }
        }
        self.t.dirty.campaigns.insert(id.to_string());
        for t in task_ids {
            let Some(task) = self.s.tasks.get_mut(&t) else {
                continue;
            };
            if !task.state.is_terminal() {
                task.state = TaskState::Cancelled;
                self.s.pending.remove(&t);
                if let Some(l) = self.s.leases.remove(&t) {
                    super::leases::end_attempt(task, l.lease_id, AttemptOutcome::Cancelled, now);
                    self.t.dirty.leases.insert(t.clone());
                }
                self.t.dirty.tasks.insert(t);
            }
        }
        self.set_campaign_state(id, to, error, now);
    }

    pub(super) fn campaign_state(&self, id: &str) -> Result<CampaignState, MachineError> {
        self.s
            .campaigns
            .get(id)
            .map(|c| c.state)
            .ok_or_else(|| MachineError::UnknownCampaign(id.to_string()))
    }

    pub(super) fn cancel(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
        let st = self.campaign_state(id)?;
        if st.is_terminal() {
            return Err(MachineError::InvalidState(format!(
                "campaign {id} is already {}",
                st.as_str()
            )));
        }
        self.finish_campaign(id, CampaignState::Cancelled, None, now);
        Ok(())
    }

    pub(super) fn pause(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
        let st = self.campaign_state(id)?;
        if !matches!(st, CampaignState::Pending | CampaignState::Running) {
            return Err(MachineError::InvalidState(format!(
                "campaign {id} is {} and cannot be paused",
                st.as_str()
            )));
        }
        // Running attempts are revoked, not failed: they count toward no budget and resume
        // from their last checkpoint after `resume`. Paused first, so nothing is re-leased.
        self.set_campaign_state(id, CampaignState::Paused, None, now);
        let task_ids = self.s.campaigns[id].tasks.clone();
        for t in task_ids {
            if self.s.leases.contains_key(&t) {
                self.attempt_ended(&t, format!("campaign {id} paused"), Ending::Revoked, now);
            }
        }
        Ok(())
    }

    pub(super) fn resume(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
        let st = self.campaign_state(id)?;
        if st != CampaignState::Paused {
            return Err(MachineError::InvalidState(format!(
                "campaign {id} is {}, not paused",
                st.as_str()
            )));
        }
        self.set_campaign_state(id, CampaignState::Running, None, now);
        self.dispatch(now);
        Ok(())
    }

    /// Continues a failed campaign from the phase that failed: the phase's tasks that did not
    /// succeed start over with cleared counters (their checkpoints are kept, so a distillation
    /// resumes), everything that finished (earlier phases, succeeded shards, artifacts, metrics)
    /// is kept. The error stays in the event log.
    pub(super) fn retry(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
        let st = self.campaign_state(id)?;
        if st != CampaignState::Failed {
            return Err(MachineError::InvalidState(format!(
                "campaign {id} is {}, not failed: only a failed campaign can be retried",
                st.as_str()
            )));
        }
        let c = &self.s.campaigns[id];
        let round = c.current_round;
        let r = c.rounds.get(round as usize).ok_or_else(|| {
            MachineError::InvalidState(format!("campaign {id} has no round {round}"))
        })?;
        let phase = r.phase;
        let reset: Vec<String> = r
            .phase_tasks
            .iter()
            .filter(|t| {
                self.s
                    .tasks
                    .get(*t)
                    .is_some_and(|t| t.state != TaskState::Succeeded)
            })
            .cloned()
            .collect();
        if reset.is_empty() {
            return Err(MachineError::InvalidState(format!(
                "campaign {id} failed at round {round} {} with no failed task (e.g. the gate \
                 stopped it): retrying would decide the same; submit a new campaign",
                phase.as_str()
            )));
        }
        let previous = c.error.clone().unwrap_or_default();
        for t in &reset {
            let task = self.s.tasks.get_mut(t).expect("filtered");
            task.state = TaskState::Pending;
            task.attempts = 0;
            task.failed = 0;
            task.lost = 0;
            task.revoked = 0;
            task.not_before_ms = 0;
            task.error = None;
            self.s.pending.insert(t.clone());
            self.t.dirty.tasks.insert(t.clone());
        }
        self.s.open_in_phase.insert(id.to_string(), reset.len());
        let c = self.s.campaigns.get_mut(id).expect("checked");
        c.rounds[round as usize].state = RoundState::Running;
        c.error = None;
        c.retries += 1;
        self.t.dirty.campaigns.insert(id.to_string());
        self.emit(
            now,
            id,
            "campaign_retry",
            format!(
                "campaign {id} retried from round {round} {}: {} task(s) start over; it had \
                 failed with: {previous}",
                phase.as_str(),
                reset.len()
            ),
            |e| {
                e.round = round;
                e.phase = phase.as_str().into();
            },
        );
        self.set_campaign_state(id, CampaignState::Running, None, now);
        self.dispatch(now);
        Ok(())
    }
}

/// Refuses a spec whose largest phase would have more tasks than `limit` (the score phase's
/// shards and depth groups, a search's candidates, the judge's shards), naming the field.
fn check_fan_out(spec: &pb::CampaignSpec, limit: u32) -> Result<(), MachineError> {
    let sched = spec.scheduling.unwrap_or_default();
    let mut phases = vec![
        (
            "scheduling.score_shards + scheduling.depth_groups".to_string(),
            // Depth groups default to at most 4 (one per layer up to 4).
            u64::from(sched.score_shards)
                + u64::from(if sched.depth_groups > 0 {
                    sched.depth_groups
                } else {
                    4
                }),
        ),
        (
            "scheduling.judge_shards".to_string(),
            u64::from(sched.judge_shards),
        ),
    ];
    for (i, r) in spec.rounds.iter().enumerate() {
        if let Some(s) = &r.search {
            phases.push((
                format!("rounds[{i}].search.candidates"),
                u64::from(s.candidates),
            ));
        }
    }
    match phases.into_iter().find(|(_, n)| *n > u64::from(limit)) {
        Some((field, n)) => Err(MachineError::ResourceExhausted(format!(
            "spec.{field}: a phase would have {n} tasks, over this coordinator's limit of {limit} tasks per phase (lower it, or raise the limit with `coordinator serve --max-tasks-per-phase`)"
        ))),
        None => Ok(()),
    }
}
