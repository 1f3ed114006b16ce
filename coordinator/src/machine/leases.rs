//! Workers and attempts: registration, long polls, dispatch (gangs placed all at once), lease
//! checks (the fencing tokens), heartbeats, progress, completion, failure, rendezvous, expiry
//! and recovery after a restart. Every ended attempt goes through [`Tx::attempt_ended`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use distillery_proto::v1 as pb;

use super::*;
use crate::phases::kind;

/// How an attempt ended (see [`Tx::attempt_ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The task reported its own error.
    Failed { retryable: bool },
    /// The machine, the link or a gang peer was lost; the task itself did not fail.
    Lost,
    /// Taken back by the operator (pause).
    Revoked,
}

pub(super) fn backoff(cfg: &Config, attempts: u32) -> Millis {
    let exp = attempts.saturating_sub(1).min(20);
    cfg.backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(cfg.backoff_max_ms)
}

/// Normalizes an artifact reference reported by a worker.
pub(super) fn normalize_ref(r: &str) -> String {
    if r.starts_with("sha256:") || r.starts_with("path:") {
        r.to_string()
    } else {
        format!("sha256:{r}")
    }
}

impl Tx<'_> {
    pub(super) fn register(
        &mut self,
        mut w: Worker,
        nonce: u32,
        previous: Option<String>,
        now: Millis,
    ) -> Result<(), MachineError> {
        if w.devices.is_empty() {
            return Err(MachineError::InvalidArgument(
                "a worker must offer at least one device".into(),
            ));
        }
        let unique: BTreeSet<&String> = w.devices.iter().collect();
        if unique.len() != w.devices.len() {
            return Err(MachineError::InvalidArgument(format!(
                "devices {:?} name a device twice",
                w.devices
            )));
        }
        if w.device_memory.len() != w.devices.len() {
            return Err(MachineError::InvalidArgument(format!(
                "device_memory has {} entries for {} devices: give one per device (0 = unknown)",
                w.device_memory.len(),
                w.devices.len()
            )));
        }
        self.s.meta.next_worker += 1;
        self.t.dirty.meta = true;
        let id = format!("w{:06}-{nonce:08x}", self.s.meta.next_worker);
        w.id = id.clone();
        self.s.workers.insert(id.clone(), w);
        self.t.dirty.workers.insert(id.clone());
        // The previous process of this worker is gone: whatever it held is lost.
        if let Some(prev) = previous.filter(|p| self.s.workers.contains_key(p) && *p != id) {
            self.s.waiting.remove(&prev);
            let held: Vec<String> = self
                .s
                .leases
                .values()
                .filter(|l| l.ranks.iter().any(|r| r.worker == prev && !r.done))
                .map(|l| l.task_id.clone())
                .collect();
            for t in held {
                self.attempt_ended(
                    &t,
                    format!("worker {prev} restarted (registered again as {id})"),
                    Ending::Lost,
                    now,
                );
            }
        }
        self.t.reply = Reply::WorkerId(id);
        Ok(())
    }

    pub(super) fn poll(
        &mut self,
        worker: String,
        free: Vec<String>,
        now: Millis,
    ) -> Result<(), MachineError> {
        let w = self
            .s
            .workers
            .get(&worker)
            .ok_or_else(|| MachineError::UnknownWorker(worker.clone()))?;
        if let Some(d) = free.iter().find(|d| !w.devices.contains(d)) {
            return Err(MachineError::InvalidArgument(format!(
                "device {d:?} was not registered by worker {worker}"
            )));
        }
        // A device already held by one of this worker's live leases is not free, whatever the
        // worker believes (it may have lost track of a lease across a coordinator restart).
        let busy: BTreeSet<&str> = self
            .s
            .leases
            .values()
            .flat_map(|l| l.ranks.iter())
            .filter(|r| r.worker == worker && !r.done)
            .map(|r| r.device.as_str())
            .collect();
        let free: Vec<String> = free
            .into_iter()
            .filter(|d| !busy.contains(d.as_str()))
            .collect();
        self.s.waiting.insert(worker, free);
        self.dispatch(now);
        Ok(())
    }

    /// Leases pending tasks to waiting workers: single tasks to the first worker that can run
    /// them, gang tasks only when all ranks can be placed at once.
    pub(super) fn dispatch(&mut self, now: Millis) {
        if self.s.waiting.is_empty() || self.s.pending.is_empty() {
            return;
        }
        let mut free: BTreeMap<String, Vec<String>> = self.s.waiting.clone();
        let mut given: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        // Walk the pending set in creation order with a cursor (the set changes as we lease).
        let mut cursor: Option<String> = None;
        loop {
            if free.values().all(Vec::is_empty) {
                break;
            }
            let next = match &cursor {
                None => self.s.pending.iter().next().cloned(),
                Some(c) => self
                    .s
                    .pending
                    .range::<String, _>((Bound::Excluded(c), Bound::Unbounded))
                    .next()
                    .cloned(),
            };
            let Some(task_id) = next else { break };
            cursor = Some(task_id.clone());
            let Some(task) = self.s.tasks.get(&task_id) else {
                continue;
            };
            if task.not_before_ms > now {
                continue;
            }
            let Some(c) = self.s.campaigns.get(&task.campaign) else {
                continue;
            };
            if !matches!(c.state, CampaignState::Pending | CampaignState::Running) {
                continue;
            }
            let able: Vec<String> = free
                .iter()
                .filter(|(w, devs)| {
                    !devs.is_empty()
                        && self
                            .s
                            .workers
                            .get(*w)
                            .is_some_and(|wk| wk.task_kinds.iter().any(|k| k == &task.kind))
                })
                .map(|(w, _)| w.clone())
                .collect();
            let slots: usize = able.iter().map(|w| free[w].len()).sum();
            let world = task.world_size.max(1) as usize;
            if slots < world {
                continue;
            }
            let mut ranks = Vec::with_capacity(world);
            'fill: for w in &able {
                let devs = free.get_mut(w).map(std::mem::take).unwrap_or_default();
                let mut rest = Vec::new();
                for d in devs {
                    if ranks.len() < world {
                        ranks.push((w.clone(), d));
                    } else {
                        rest.push(d);
                    }
                }
                free.insert(w.clone(), rest);
                if ranks.len() == world {
                    break 'fill;
                }
            }
            self.s.meta.last_lease_id += 1;
            let lease_id = self.s.meta.last_lease_id;
            let deadline = now + self.cfg.lease_timeout_ms;
            let campaign = task.campaign.clone();
            let lease = Lease {
                task_id: task_id.clone(),
                lease_id,
                ranks: ranks
                    .iter()
                    .map(|(w, d)| RankLease {
                        worker: w.clone(),
                        device: d.clone(),
                        deadline_ms: deadline,
                        done: false,
                        outputs: BTreeMap::new(),
                        metrics: BTreeMap::new(),
                    })
                    .collect(),
                rendezvous: BTreeMap::new(),
            };
            for (rank, (w, d)) in ranks.iter().enumerate() {
                given.entry(w.clone()).or_default().push(Assignment {
                    task_id: task_id.clone(),
                    lease_id,
                    rank: rank as u32,
                    world_size: world as u32,
                    device: d.clone(),
                    campaign: campaign.clone(),
                });
            }
            let workers: Vec<&str> = ranks.iter().map(|(w, _)| w.as_str()).collect();
            let msg = format!(
                "task {task_id} leased to {} (lease {lease_id})",
                workers.join(", ")
            );
            let (round, phase, attempt);
            {
                let task = self.s.tasks.get_mut(&task_id).expect("candidate exists");
                task.state = TaskState::Leased;
                task.attempts += 1;
                round = task.round;
                phase = task.phase;
                attempt = task.attempts;
            }
            self.s.pending.remove(&task_id);
            self.s.leases.insert(task_id.clone(), lease);
            self.t.dirty.tasks.insert(task_id.clone());
            self.t.dirty.leases.insert(task_id.clone());
            self.t.dirty.meta = true;
            self.emit(now, &campaign, "task_leased", msg, |e| {
                e.task_id = task_id.clone();
                e.lease_id = lease_id;
                e.round = round;
                e.phase = phase.as_str().into();
                e.metrics.insert("attempt".into(), f64::from(attempt));
            });
            if self
                .s
                .campaigns
                .get(&campaign)
                .is_some_and(|c| c.state == CampaignState::Pending)
            {
                self.set_campaign_state(&campaign, CampaignState::Running, None, now);
            }
        }
        for (worker, assignments) in given {
            self.s.waiting.remove(&worker);
            self.t.effects.push(Effect::Assign {
                worker,
                assignments,
            });
        }
    }

    /// The live lease a report names, or why it is stale.
    pub(super) fn check_lease(&self, r: &LeaseRef) -> Result<(), MachineError> {
        let task = self
            .s
            .tasks
            .get(&r.task_id)
            .ok_or_else(|| MachineError::UnknownTask(r.task_id.clone()))?;
        let stale = |why: String| MachineError::StaleLease {
            task_id: r.task_id.clone(),
            lease_id: r.lease_id,
            why,
        };
        let Some(lease) = self.s.leases.get(&r.task_id) else {
            return Err(stale(
                format!("task is {:?} with no live lease", task.state).to_lowercase(),
            ));
        };
        if lease.lease_id != r.lease_id {
            return Err(stale(format!("the current lease is {}", lease.lease_id)));
        }
        match lease.ranks.get(r.rank as usize) {
            None => Err(stale(format!(
                "rank {} is not in a gang of {}",
                r.rank,
                lease.ranks.len()
            ))),
            Some(rank) if rank.done => Err(stale(format!("rank {} already completed", r.rank))),
            Some(_) => Ok(()),
        }
    }

    pub(super) fn heartbeat(
        &mut self,
        worker: &str,
        refs: Vec<LeaseRef>,
        now: Millis,
    ) -> Result<(), MachineError> {
        if !self.s.workers.contains_key(worker) {
            return Err(MachineError::UnknownWorker(worker.to_string()));
        }
        let mut renewed = Vec::new();
        let mut cancelled = Vec::new();
        for r in refs {
            let ok = self.check_lease(&r).is_ok()
                && self
                    .s
                    .leases
                    .get(&r.task_id)
                    .is_some_and(|l| l.ranks[r.rank as usize].worker == worker);
            if ok {
                if let Some(l) = self.s.leases.get_mut(&r.task_id) {
                    l.ranks[r.rank as usize].deadline_ms = now + self.cfg.lease_timeout_ms;
                    self.t.dirty.leases.insert(r.task_id.clone());
                }
                renewed.push(r);
            } else {
                cancelled.push(r);
            }
        }
        self.t.reply = Reply::Heartbeat { renewed, cancelled };
        Ok(())
    }

    pub(super) fn progress(
        &mut self,
        r: LeaseRef,
        metrics: BTreeMap<String, f64>,
        checkpoint: Option<String>,
        message: String,
        now: Millis,
    ) -> Result<(), MachineError> {
        self.check_lease(&r)?;
        if let Some(l) = self.s.leases.get_mut(&r.task_id) {
            l.ranks[r.rank as usize].deadline_ms = now + self.cfg.lease_timeout_ms;
        }
        let task = self.s.tasks.get_mut(&r.task_id).expect("checked");
        for (k, v) in &metrics {
            task.metrics.insert(k.clone(), *v);
        }
        if let Some(ck) = checkpoint.filter(|c| !c.is_empty()) {
            task.checkpoint = Some(normalize_ref(&ck));
        }
        let (campaign, round, phase) = (task.campaign.clone(), task.round, task.phase);
        self.t.dirty.tasks.insert(r.task_id.clone());
        self.t.dirty.leases.insert(r.task_id.clone());
        let msg = if message.is_empty() {
            format!("task {} progress", r.task_id)
        } else {
            message
        };
        self.emit(now, &campaign, "task_progress", msg, |e| {
            e.task_id = r.task_id.clone();
            e.lease_id = r.lease_id;
            e.round = round;
            e.phase = phase.as_str().into();
            e.metrics = metrics.into_iter().collect();
        });
        Ok(())
    }

    pub(super) fn complete(
        &mut self,
        r: LeaseRef,
        outputs: BTreeMap<String, String>,
        metrics: BTreeMap<String, f64>,
        now: Millis,
    ) -> Result<(), MachineError> {
        self.check_lease(&r)?;
        let kind = self.s.tasks[&r.task_id].kind.clone();
        if r.rank == 0 {
            if let Some(missing) = kind::required_outputs(&kind)
                .iter()
                .find(|o| !outputs.contains_key(**o))
            {
                return Err(MachineError::InvalidArgument(format!(
                    "task {} ({kind}) must report output {missing:?} on completion",
                    r.task_id
                )));
            }
            // A candidate's prune task must say which shape it chose.
            let candidate =
                kind == kind::PRUNE && self.s.tasks[&r.task_id].params.contains_key("candidate");
            let extra: &[&str] = if candidate {
                kind::CANDIDATE_METRICS
            } else {
                &[]
            };
            if let Some(missing) = kind::required_metrics(&kind)
                .iter()
                .chain(extra)
                .find(|m| !metrics.contains_key(**m))
            {
                return Err(MachineError::InvalidArgument(format!(
                    "task {} ({kind}) must report metric {missing:?} on completion",
                    r.task_id
                )));
            }
        }
        let lease = self.s.leases.get_mut(&r.task_id).expect("checked");
        {
            let rank = &mut lease.ranks[r.rank as usize];
            rank.done = true;
            rank.outputs = outputs
                .into_iter()
                .map(|(k, v)| (k, normalize_ref(&v)))
                .collect();
            rank.metrics = metrics;
        }
        self.t.dirty.leases.insert(r.task_id.clone());
        if !lease.ranks.iter().all(|k| k.done) {
            return Ok(());
        }
        let lease = self.s.leases.remove(&r.task_id).expect("checked");
        let rank0 = lease.ranks.into_iter().next().expect("a lease has a rank");
        let task = self.s.tasks.get_mut(&r.task_id).expect("checked");
        task.state = TaskState::Succeeded;
        if let Some(n) = self.s.open_in_phase.get_mut(&task.campaign) {
            *n = n.saturating_sub(1);
        }
        task.outputs = rank0.outputs;
        for (k, v) in rank0.metrics {
            task.metrics.insert(k, v);
        }
        let (campaign, round, phase) = (task.campaign.clone(), task.round, task.phase);
        let metrics = task.metrics.clone();
        self.t.dirty.tasks.insert(r.task_id.clone());
        self.emit(
            now,
            &campaign,
            "task_succeeded",
            format!("task {} ({kind}) succeeded", r.task_id),
            |e| {
                e.task_id = r.task_id.clone();
                e.lease_id = r.lease_id;
                e.round = round;
                e.phase = phase.as_str().into();
                e.metrics = metrics.into_iter().collect();
            },
        );
        self.maybe_advance(&campaign, round, now);
        self.dispatch(now);
        Ok(())
    }

    pub(super) fn fail(
        &mut self,
        r: LeaseRef,
        error: String,
        retryable: bool,
        lost: bool,
        now: Millis,
    ) -> Result<(), MachineError> {
        self.check_lease(&r)?;
        let worker = self.s.leases[&r.task_id].ranks[r.rank as usize]
            .worker
            .clone();
        let ending = if lost {
            Ending::Lost
        } else {
            Ending::Failed { retryable }
        };
        self.attempt_ended(
            &r.task_id,
            format!("rank {} on {worker}: {error}", r.rank),
            ending,
            now,
        );
        self.dispatch(now);
        Ok(())
    }

    /// Ends the task's live attempt (every rank of a gang: the others' leases are revoked with
    /// it). A *failed* attempt counts toward `max_attempts`; a *lost* one toward
    /// `scheduling.max_lost` when set; a *revoked* one toward nothing. The task goes back to
    /// pending (after a backoff for failed and lost attempts), or fails for good, and the
    /// campaign with it, when its budget is spent or the error is not retryable.
    pub(super) fn attempt_ended(
        &mut self,
        task_id: &str,
        reason: String,
        ending: Ending,
        now: Millis,
    ) {
        let Some(lease) = self.s.leases.remove(task_id) else {
            return;
        };
        self.t.dirty.leases.insert(task_id.to_string());
        self.t.dirty.tasks.insert(task_id.to_string());
        let task = self.s.tasks.get_mut(task_id).expect("a lease has a task");
        let (kind_name, give_up, delay) = match ending {
            Ending::Failed { retryable } => {
                task.failed += 1;
                task.error = Some(reason.clone());
                let give_up = !retryable || task.failed >= task.max_attempts;
                ("task_retry", give_up, backoff(self.cfg, task.failed))
            }
            Ending::Lost => {
                task.lost += 1;
                let charged = task.lost - task.revoked;
                let give_up = task.max_lost.is_some_and(|m| charged > m);
                task.error = Some(reason.clone());
                ("task_lost", give_up, backoff(self.cfg, charged))
            }
            Ending::Revoked => {
                task.lost += 1;
                task.revoked += 1;
                ("task_revoked", false, 0)
            }
        };
        let (campaign, round, phase, kind, attempts, failed, lost) = (
            task.campaign.clone(),
            task.round,
            task.phase,
            task.kind.clone(),
            task.attempts,
            task.failed,
            task.lost,
        );
        let fill = |e: &mut pb::Event| {
            e.task_id = task_id.to_string();
            e.lease_id = lease.lease_id;
            e.round = round;
            e.phase = phase.as_str().into();
            e.metrics.insert("attempt".into(), f64::from(attempts));
            e.metrics.insert("failed".into(), f64::from(failed));
            e.metrics.insert("lost".into(), f64::from(lost));
        };
        if !give_up {
            task.state = TaskState::Pending;
            task.not_before_ms = now + delay;
            self.s.pending.insert(task_id.to_string());
            let what = match ending {
                Ending::Failed { .. } => "failed",
                Ending::Lost => "was lost",
                Ending::Revoked => "was revoked",
            };
            self.emit(
                now,
                &campaign,
                kind_name,
                format!(
                    "task {task_id} ({kind}) attempt {attempts} {what}, retrying in {delay} ms: {reason}"
                ),
                fill,
            );
            return;
        }
        task.state = TaskState::Failed;
        let why = match ending {
            Ending::Lost => format!(
                "round {round} {}: task {task_id} ({kind}) was lost {} time(s), more than \
                 scheduling.max_lost = {} (raise or remove it to keep retrying): {reason}",
                phase.as_str(),
                lost - task.revoked,
                task.max_lost.unwrap_or_default()
            ),
            _ => format!(
                "round {round} {}: task {task_id} ({kind}) failed after {failed} attempt(s) \
                 ({lost} more lost): {reason}",
                phase.as_str()
            ),
        };
        self.emit(now, &campaign, "task_failed", why.clone(), fill);
        self.finish_campaign(&campaign, CampaignState::Failed, Some(why), now);
    }

    pub(super) fn rendezvous(
        &mut self,
        r: LeaseRef,
        key: String,
        payload: Vec<u8>,
        now: Millis,
    ) -> Result<(), MachineError> {
        self.check_lease(&r)?;
        let timeout = self.cfg.lease_timeout_ms;
        let lease = self.s.leases.get_mut(&r.task_id).expect("checked");
        let world = lease.ranks.len();
        lease.ranks[r.rank as usize].deadline_ms = now + timeout;
        let slots = lease
            .rendezvous
            .entry(key.clone())
            .or_insert_with(|| vec![None; world]);
        let was_complete = slots.iter().all(Option::is_some);
        slots[r.rank as usize] = Some(hex::encode(&payload));
        let complete = slots.iter().all(Option::is_some);
        let payloads: Option<Vec<Vec<u8>>> = if complete {
            slots
                .iter()
                .map(|p| p.as_ref().and_then(|h| hex::decode(h).ok()))
                .collect()
        } else {
            None
        };
        let lease_id = lease.lease_id;
        self.t.dirty.leases.insert(r.task_id.clone());
        if let Some(p) = &payloads {
            if !was_complete {
                let campaign = self.s.tasks[&r.task_id].campaign.clone();
                let round = self.s.tasks[&r.task_id].round;
                let phase = self.s.tasks[&r.task_id].phase;
                self.emit(
                    now,
                    &campaign,
                    "rendezvous_complete",
                    format!("task {} gang met at {key:?}", r.task_id),
                    |e| {
                        e.task_id = r.task_id.clone();
                        e.lease_id = lease_id;
                        e.round = round;
                        e.phase = phase.as_str().into();
                    },
                );
            }
            self.t.effects.push(Effect::RendezvousReady {
                task_id: r.task_id.clone(),
                lease_id,
                key,
                payloads: p.clone(),
            });
        }
        self.t.reply = Reply::Rendezvous(payloads);
        Ok(())
    }

    /// Expires every rank lease whose deadline is before `cutoff`.
    pub(super) fn expire(&mut self, cutoff: Millis, now: Millis) {
        let expired: Vec<(String, String)> = self
            .s
            .leases
            .values()
            .filter_map(|l| {
                l.ranks
                    .iter()
                    .enumerate()
                    .find(|(_, r)| !r.done && r.deadline_ms < cutoff)
                    .map(|(i, r)| {
                        (
                            l.task_id.clone(),
                            format!(
                                "lease {} expired: rank {i} on {} stopped heart-beating",
                                l.lease_id, r.worker
                            ),
                        )
                    })
            })
            .collect();
        for (task, why) in expired {
            self.attempt_ended(&task, why, Ending::Lost, now);
        }
    }

    pub(super) fn recover(&mut self, now: Millis) {
        // Leases already overdue when the coordinator stopped belong to dead workers; the rest
        // get a full timeout from now, so a restart slower than the timeout loses no work.
        let last = self.s.meta.last_now;
        self.expire(last, now);
        let fresh = now + self.cfg.lease_timeout_ms;
        for l in self.s.leases.values_mut() {
            for r in &mut l.ranks {
                if !r.done && r.deadline_ms < fresh {
                    r.deadline_ms = fresh;
                    self.t.dirty.leases.insert(l.task_id.clone());
                }
            }
        }
        self.s.waiting.clear();
    }
}
