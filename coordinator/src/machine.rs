//! The campaign state machine: `apply(state, event) -> transition`. Pure: no I/O, no clock (time
//! comes in the events), deterministic. Every change it makes is listed in the transition's
//! [`Dirty`] set so the store can persist exactly that, and every observable step is an
//! [`pb::Event`] with the next sequence number. An `Err` leaves the state untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use distillery_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::phases::{self, kind, GateDecision, Phase, PhaseContext};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Timing knobs of the scheduler.
#[derive(Debug, Clone)]
pub struct Config {
    /// A lease not renewed for this long expires.
    pub lease_timeout_ms: Millis,
    /// First retry delay; doubles with each failed attempt.
    pub backoff_base_ms: Millis,
    /// Upper bound of the retry delay.
    pub backoff_max_ms: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_timeout_ms: 30_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    Pending,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl CampaignState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CampaignState::Succeeded | CampaignState::Failed | CampaignState::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Pending => "pending",
            CampaignState::Running => "running",
            CampaignState::Paused => "paused",
            CampaignState::Succeeded => "succeeded",
            CampaignState::Failed => "failed",
            CampaignState::Cancelled => "cancelled",
        }
    }
    pub fn to_pb(self) -> pb::CampaignState {
        match self {
            CampaignState::Pending => pb::CampaignState::Pending,
            CampaignState::Running => pb::CampaignState::Running,
            CampaignState::Paused => pb::CampaignState::Paused,
            CampaignState::Succeeded => pb::CampaignState::Succeeded,
            CampaignState::Failed => pb::CampaignState::Failed,
            CampaignState::Cancelled => pb::CampaignState::Cancelled,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoundState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RoundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundState::Pending => "pending",
            RoundState::Running => "running",
            RoundState::Succeeded => "succeeded",
            RoundState::Failed => "failed",
            RoundState::Cancelled => "cancelled",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Leased,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Leased => "leased",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// The proto spec, stored as hex of its protobuf encoding inside JSON records.
mod spec_bytes {
    use distillery_proto::v1::CampaignSpec;
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(spec: &CampaignSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(spec.encode_to_vec()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CampaignSpec, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        CampaignSpec::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Campaign {
    pub id: String,
    #[serde(with = "spec_bytes")]
    pub spec: pb::CampaignSpec,
    pub state: CampaignState,
    pub error: Option<String>,
    pub rounds: Vec<Round>,
    pub current_round: u32,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    /// Teacher outputs computed once and reused by every round (`teacher_perplexity`, ...).
    #[serde(with = "finite_metrics", default)]
    pub teacher_metrics: BTreeMap<String, f64>,
    pub teacher_artifacts: BTreeMap<String, String>,
    /// Every task of the campaign, in creation order.
    pub tasks: Vec<String>,
    /// Times `retry` continued it after a failure: of its `failed` state events, only the one
    /// after the last retry is final (watchers count them).
    #[serde(default)]
    pub retries: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Round {
    pub index: u32,
    pub state: RoundState,
    pub phase: Phase,
    /// The model this round prunes (a task input reference).
    pub source: String,
    /// Tasks of the current phase.
    pub phase_tasks: Vec<String>,
    pub artifacts: BTreeMap<String, String>,
    #[serde(with = "finite_metrics", default)]
    pub metrics: BTreeMap<String, f64>,
    pub extensions: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Task {
    pub id: String,
    pub campaign: String,
    pub round: u32,
    pub phase: Phase,
    pub kind: String,
    pub params: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, String>,
    pub world_size: u32,
    pub state: TaskState,
    /// Attempts leased so far (every lease handed out, however it ended).
    pub attempts: u32,
    /// Failed attempts allowed (the task's own errors); lost attempts do not count.
    pub max_attempts: u32,
    /// Attempts that ended because the task reported its own error (count toward `max_attempts`).
    #[serde(default)]
    pub failed: u32,
    /// Attempts that ended without the task failing: lease expired, worker gone, a gang peer's
    /// collective broke, revoked by pause. Includes `revoked`.
    #[serde(default)]
    pub lost: u32,
    /// Of `lost`: attempts revoked by the operator (pause); they count toward nothing.
    #[serde(default)]
    pub revoked: u32,
    /// `scheduling.max_lost`: lost attempts (other than revoked ones) retried at most this many
    /// times; `None` retries them without limit.
    #[serde(default)]
    pub max_lost: Option<u32>,
    /// Not leased again before this time (retry backoff).
    pub not_before_ms: Millis,
    pub outputs: BTreeMap<String, String>,
    #[serde(with = "finite_metrics", default)]
    pub metrics: BTreeMap<String, f64>,
    /// Latest checkpoint reported; a new attempt resumes from it.
    pub checkpoint: Option<String>,
    /// Why the last failed or lost attempt ended.
    pub error: Option<String>,
}

/// One attempt of a task: all ranks share the lease id (the fencing token).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lease {
    pub task_id: String,
    pub lease_id: u64,
    pub ranks: Vec<RankLease>,
    /// Rendezvous payloads (hex) per key, one slot per rank.
    pub rendezvous: BTreeMap<String, Vec<Option<String>>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RankLease {
    pub worker: String,
    pub device: String,
    pub deadline_ms: Millis,
    pub done: bool,
    pub outputs: BTreeMap<String, String>,
    #[serde(with = "finite_metrics", default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Worker {
    pub id: String,
    pub host: String,
    pub devices: Vec<String>,
    /// Bytes of memory of each of `devices` (same order; 0 = unknown), for submit's memory check.
    #[serde(default)]
    pub device_memory: Vec<u64>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub task_kinds: Vec<String>,
    pub registered_ms: Millis,
}

/// Counters, persisted in the `meta` tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Meta {
    pub next_campaign: u64,
    pub next_task: u64,
    pub next_worker: u64,
    /// Last lease id handed out; ids only grow.
    pub last_lease_id: u64,
    /// Sequence number of the last event written.
    pub last_seq: u64,
    /// Time of the last persisted transition.
    pub last_now: Millis,
}

/// The whole coordinator state. `pending` and `waiting` are derived / transient.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    pub campaigns: BTreeMap<String, Campaign>,
    pub tasks: BTreeMap<String, Task>,
    /// Live leases by task id.
    pub leases: BTreeMap<String, Lease>,
    pub workers: BTreeMap<String, Worker>,
    pub meta: Meta,
    /// Pending tasks in creation order (derived from `tasks`).
    pending: BTreeSet<String>,
    /// Workers in a long poll, with the devices they offer (not persisted).
    waiting: BTreeMap<String, Vec<String>>,
    /// Per campaign, tasks of the current phase not yet succeeded (derived from `tasks`), so a
    /// completion need not rescan a phase of thousands of shards.
    open_in_phase: BTreeMap<String, usize>,
}

impl State {
    /// Rebuilds a state from persisted records (derived indexes are recomputed).
    pub fn from_parts(
        campaigns: BTreeMap<String, Campaign>,
        tasks: BTreeMap<String, Task>,
        leases: BTreeMap<String, Lease>,
        workers: BTreeMap<String, Worker>,
        meta: Meta,
    ) -> State {
        let pending = tasks
            .values()
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.id.clone())
            .collect();
        let open_in_phase = campaigns
            .values()
            .map(|c| {
                let open = c.rounds.get(c.current_round as usize).map_or(0, |r| {
                    r.phase_tasks
                        .iter()
                        .filter(|t| {
                            tasks
                                .get(*t)
                                .is_none_or(|t| t.state != TaskState::Succeeded)
                        })
                        .count()
                });
                (c.id.clone(), open)
            })
            .collect();
        State {
            campaigns,
            tasks,
            leases,
            workers,
            meta,
            pending,
            waiting: BTreeMap::new(),
            open_in_phase,
        }
    }

    /// Workers currently in a long poll.
    pub fn waiting_workers(&self) -> impl Iterator<Item = &String> {
        self.waiting.keys()
    }
}

/// Identifies one rank of one attempt in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRef {
    pub task_id: String,
    pub lease_id: u64,
    pub rank: u32,
}

/// Everything that can happen to the coordinator.
#[derive(Debug, Clone)]
pub enum Event {
    Submit {
        spec: Box<pb::CampaignSpec>,
        now: Millis,
    },
    Register {
        host: String,
        devices: Vec<String>,
        /// Memory of each device in bytes (same order; empty or 0: unknown).
        device_memory: Vec<u64>,
        labels: BTreeMap<String, String>,
        version: String,
        task_kinds: Vec<String>,
        /// Random bits from the shell that make worker ids unique across data dirs: a worker
        /// that outlives a coordinator whose state was lost must never share an id.
        nonce: u32,
        /// The id this worker (a restarted process with the same work dir) had before: the
        /// attempts it held are lost now, not at their lease timeout.
        previous: Option<String>,
        now: Millis,
    },
    Poll {
        worker: String,
        free_devices: Vec<String>,
        now: Millis,
    },
    /// A long poll ended without an answer.
    PollWithdrawn {
        worker: String,
    },
    Heartbeat {
        worker: String,
        leases: Vec<LeaseRef>,
        now: Millis,
    },
    Progress {
        lease: LeaseRef,
        metrics: BTreeMap<String, f64>,
        checkpoint: Option<String>,
        message: String,
        now: Millis,
    },
    Complete {
        lease: LeaseRef,
        outputs: BTreeMap<String, String>,
        metrics: BTreeMap<String, f64>,
        now: Millis,
    },
    Fail {
        lease: LeaseRef,
        error: String,
        retryable: bool,
        /// The rank did not fail by itself: its gang's collective or rendezvous broke because a
        /// peer or the network was lost. The attempt is *lost*, not *failed*.
        lost: bool,
        now: Millis,
    },
    Rendezvous {
        lease: LeaseRef,
        key: String,
        payload: Vec<u8>,
        now: Millis,
    },
    Cancel {
        campaign: String,
        now: Millis,
    },
    Pause {
        campaign: String,
        now: Millis,
    },
    Resume {
        campaign: String,
        now: Millis,
    },
    /// Continues a failed campaign from its failed phase: that phase's unfinished tasks start
    /// over (counters cleared, checkpoints kept), everything finished is kept.
    Retry {
        campaign: String,
        now: Millis,
    },
    /// Periodic: expires leases and hands out tasks whose backoff ended.
    Tick {
        now: Millis,
    },
    /// Once at start-up, after loading the store.
    Recover {
        now: Millis,
    },
}

/// A task handed to one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub task_id: String,
    pub lease_id: u64,
    pub rank: u32,
    pub world_size: u32,
    pub device: String,
    pub campaign: String,
}

/// Side effects for the shell to carry out once the transition is durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Answer a worker's long poll.
    Assign {
        worker: String,
        assignments: Vec<Assignment>,
    },
    /// Every rank has sent its payload for `key`: release the barrier.
    RendezvousReady {
        task_id: String,
        lease_id: u64,
        key: String,
        payloads: Vec<Vec<u8>>,
    },
}

/// The direct answer to the event's sender.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Reply {
    #[default]
    None,
    CampaignId(String),
    WorkerId(String),
    Heartbeat {
        renewed: Vec<LeaseRef>,
        cancelled: Vec<LeaseRef>,
    },
    /// Whether the worker was still waiting (false: an assignment is on its way).
    StillWaiting(bool),
    /// The rendezvous payloads when the barrier is already complete.
    Rendezvous(Option<Vec<Vec<u8>>>),
}

/// Records changed by a transition, to persist (an id absent from the state is deleted).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dirty {
    pub campaigns: BTreeSet<String>,
    pub tasks: BTreeSet<String>,
    pub leases: BTreeSet<String>,
    pub workers: BTreeSet<String>,
    pub meta: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.campaigns.is_empty()
            && self.tasks.is_empty()
            && self.leases.is_empty()
            && self.workers.is_empty()
            && !self.meta
    }
}

#[derive(Debug, Default)]
pub struct Transition {
    pub reply: Reply,
    pub effects: Vec<Effect>,
    pub events: Vec<pb::Event>,
    pub dirty: Dirty,
}

/// Why an event was refused; the state is unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MachineError {
    #[error("unknown campaign {0}")]
    UnknownCampaign(String),
    #[error("unknown worker {0}: register again")]
    UnknownWorker(String),
    #[error("unknown task {0}")]
    UnknownTask(String),
    #[error("stale lease {lease_id} for task {task_id}: {why}")]
    StaleLease {
        task_id: String,
        lease_id: u64,
        why: String,
    },
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidArgument(String),
}

/// Applies one event. On `Err` nothing changed.
pub fn apply(state: &mut State, cfg: &Config, event: Event) -> Result<Transition, MachineError> {
    let mut tx = Tx {
        s: state,
        cfg,
        t: Transition::default(),
    };
    let now = match &event {
        Event::Submit { now, .. }
        | Event::Register { now, .. }
        | Event::Poll { now, .. }
        | Event::Heartbeat { now, .. }
        | Event::Progress { now, .. }
        | Event::Complete { now, .. }
        | Event::Fail { now, .. }
        | Event::Rendezvous { now, .. }
        | Event::Cancel { now, .. }
        | Event::Pause { now, .. }
        | Event::Resume { now, .. }
        | Event::Retry { now, .. }
        | Event::Tick { now }
        | Event::Recover { now } => Some(*now),
        Event::PollWithdrawn { .. } => None,
    };
    match event {
        Event::Submit { spec, now } => tx.submit(*spec, now),
        Event::Register {
            host,
            devices,
            device_memory,
            labels,
            version,
            task_kinds,
            nonce,
            previous,
            now,
        } => tx.register(
            Worker {
                id: String::new(),
                host,
                device_memory: if device_memory.is_empty() {
                    vec![0; devices.len()]
                } else {
                    device_memory
                },
                devices,
                labels,
                version,
                task_kinds,
                registered_ms: now,
            },
            nonce,
            previous,
            now,
        ),
        Event::Poll {
            worker,
            free_devices,
            now,
        } => tx.poll(worker, free_devices, now),
        Event::PollWithdrawn { worker } => {
            let was = tx.s.waiting.remove(&worker).is_some();
            tx.t.reply = Reply::StillWaiting(was);
            Ok(())
        }
        Event::Heartbeat {
            worker,
            leases,
            now,
        } => tx.heartbeat(&worker, leases, now),
        Event::Progress {
            lease,
            metrics,
            checkpoint,
            message,
            now,
        } => tx.progress(lease, metrics, checkpoint, message, now),
        Event::Complete {
            lease,
            outputs,
            metrics,
            now,
        } => tx.complete(lease, outputs, metrics, now),
        Event::Fail {
            lease,
            error,
            retryable,
            lost,
            now,
        } => tx.fail(lease, error, retryable, lost, now),
        Event::Rendezvous {
            lease,
            key,
            payload,
            now,
        } => tx.rendezvous(lease, key, payload, now),
        Event::Cancel { campaign, now } => tx.cancel(&campaign, now),
        Event::Pause { campaign, now } => tx.pause(&campaign, now),
        Event::Resume { campaign, now } => tx.resume(&campaign, now),
        Event::Retry { campaign, now } => tx.retry(&campaign, now),
        Event::Tick { now } => {
            tx.expire(now, now);
            tx.dispatch(now);
            Ok(())
        }
        Event::Recover { now } => {
            tx.recover(now);
            Ok(())
        }
    }?;
    let mut t = tx.t;
    if let Some(now) = now {
        if !t.dirty.is_empty() && state.meta.last_now < now {
            state.meta.last_now = now;
            t.dirty.meta = true;
        }
    }
    Ok(t)
}

/// How an attempt ended (see [`Tx::attempt_ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The task reported its own error.
    Failed { retryable: bool },
    /// The machine, the link or a gang peer was lost; the task itself did not fail.
    Lost,
    /// Taken back by the operator (pause).
    Revoked,
}

fn backoff(cfg: &Config, attempts: u32) -> Millis {
    let exp = attempts.saturating_sub(1).min(20);
    cfg.backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(cfg.backoff_max_ms)
}

/// Normalizes an artifact reference reported by a worker.
fn normalize_ref(r: &str) -> String {
    if r.starts_with("sha256:") || r.starts_with("path:") {
        r.to_string()
    } else {
        format!("sha256:{r}")
    }
}

struct Tx<'a> {
    s: &'a mut State,
    cfg: &'a Config,
    t: Transition,
}

impl Tx<'_> {
    fn emit(
        &mut self,
        now: Millis,
        campaign: &str,
        kind: &str,
        message: String,
        f: impl FnOnce(&mut pb::Event),
    ) {
        self.s.meta.last_seq += 1;
        self.t.dirty.meta = true;
        let mut e = pb::Event {
            seq: self.s.meta.last_seq,
            time_ms: now,
            campaign_id: campaign.to_string(),
            kind: kind.to_string(),
            message,
            ..Default::default()
        };
        f(&mut e);
        self.t.events.push(e);
    }

    fn set_campaign_state(
        &mut self,
        id: &str,
        to: CampaignState,
        error: Option<String>,
        now: Millis,
    ) {
        let Some(c) = self.s.campaigns.get_mut(id) else {
            return;
        };
        if c.state == to {
            return;
        }
        c.state = to;
        c.updated_ms = now;
        if error.is_some() {
            c.error = error.clone();
        }
        self.t.dirty.campaigns.insert(id.to_string());
        let msg = match &error {
            Some(e) => format!("campaign {} {}: {e}", id, to.as_str()),
            None => format!("campaign {} {}", id, to.as_str()),
        };
        self.emit(now, id, "campaign_state", msg, |e| {
            e.state = to.to_pb() as i32
        });
    }

    fn submit(&mut self, spec: pb::CampaignSpec, now: Millis) -> Result<(), MachineError> {
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

    fn register(
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

    fn poll(&mut self, worker: String, free: Vec<String>, now: Millis) -> Result<(), MachineError> {
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
    fn dispatch(&mut self, now: Millis) {
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
    fn check_lease(&self, r: &LeaseRef) -> Result<(), MachineError> {
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

    fn heartbeat(
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

    fn progress(
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

    fn complete(
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
            if let Some(missing) = kind::required_metrics(&kind)
                .iter()
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

    fn fail(
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
    fn attempt_ended(&mut self, task_id: &str, reason: String, ending: Ending, now: Millis) {
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

    /// Ends a campaign: its open tasks are cancelled and their leases revoked.
    fn finish_campaign(&mut self, id: &str, to: CampaignState, error: Option<String>, now: Millis) {
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
                if self.s.leases.remove(&t).is_some() {
                    self.t.dirty.leases.insert(t.clone());
                }
                self.t.dirty.tasks.insert(t);
            }
        }
        self.set_campaign_state(id, to, error, now);
    }

    fn rendezvous(
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
                self.emit(
                    now,
                    &campaign,
                    "rendezvous_complete",
                    format!("task {} gang met at {key:?}", r.task_id),
                    |e| {
                        e.task_id = r.task_id.clone();
                        e.lease_id = lease_id;
                        e.round = round;
                        e.phase = Phase::Distill.as_str().into();
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

    fn campaign_state(&self, id: &str) -> Result<CampaignState, MachineError> {
        self.s
            .campaigns
            .get(id)
            .map(|c| c.state)
            .ok_or_else(|| MachineError::UnknownCampaign(id.to_string()))
    }

    fn cancel(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
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

    fn pause(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
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

    fn resume(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
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
    fn retry(&mut self, id: &str, now: Millis) -> Result<(), MachineError> {
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

    /// Expires every rank lease whose deadline is before `cutoff`.
    fn expire(&mut self, cutoff: Millis, now: Millis) {
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

    fn recover(&mut self, now: Millis) {
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

    fn phase_context_parts(
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

    fn start_round(&mut self, id: &str, round: u32, now: Millis) {
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        c.current_round = round;
        let r = &mut c.rounds[round as usize];
        r.state = RoundState::Running;
        r.phase = Phase::Score;
        self.t.dirty.campaigns.insert(id.to_string());
        self.emit(
            now,
            id,
            "round_started",
            format!("round {round} started"),
            |e| e.round = round,
        );
        self.start_phase(id, round, Phase::Score, now);
    }

    /// Starts `phase` (or the first later phase that has work) of a round.
    fn start_phase(&mut self, id: &str, round: u32, mut phase: Phase, now: Millis) {
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
            let distill_checkpoint = if phase == Phase::Distill && r.extensions > 0 {
                c.tasks
                    .iter()
                    .rev()
                    .filter_map(|t| self.s.tasks.get(t))
                    .find(|t| t.round == round && t.kind == kind::DISTILL)
                    .and_then(|t| t.checkpoint.clone())
            } else {
                None
            };
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
                    },
                );
                self.s.pending.insert(tid.clone());
                self.t.dirty.tasks.insert(tid.clone());
                let c = self.s.campaigns.get_mut(id).expect("caller checked");
                c.tasks.push(tid.clone());
                c.rounds[round as usize].phase_tasks.push(tid);
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
    fn maybe_advance(&mut self, id: &str, round: u32, now: Millis) {
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
            let teacher = t.params.get("role").is_some_and(|r| r == "teacher");
            let idx = counts.entry(t.kind.as_str()).or_default();
            for (name, digest) in &t.outputs {
                if teacher {
                    c.teacher_artifacts
                        .insert(format!("teacher_{name}"), digest.clone());
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
            if teacher {
                let prefixed: BTreeMap<String, f64> = t
                    .metrics
                    .iter()
                    .map(|(k, v)| (format!("teacher_{k}"), *v))
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

    fn run_gate(&mut self, id: &str, round: u32, now: Millis) {
        let (_, metrics) = self.phase_context_parts(id, round);
        let c = self.s.campaigns.get_mut(id).expect("caller checked");
        // The round's table shows the teacher figures next to the student's.
        for (k, v) in &c.teacher_metrics {
            c.rounds[round as usize].metrics.insert(k.clone(), *v);
        }
        let extensions = c.rounds[round as usize].extensions;
        let decision = phases::gate(&c.spec, &metrics, extensions);
        let last = round as usize + 1 == c.rounds.len();
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

/// The client-facing view of a campaign.
pub fn campaign_view(state: &State, id: &str) -> Option<pb::Campaign> {
    let c = state.campaigns.get(id)?;
    let mut counts = pb::TaskCounts::default();
    let mut records = Vec::with_capacity(c.tasks.len());
    for t in c.tasks.iter().filter_map(|t| state.tasks.get(t)) {
        records.push(pb::TaskRecord {
            id: t.id.clone(),
            kind: t.kind.clone(),
            state: t.state.as_str().into(),
            round: t.round,
            phase: t.phase.as_str().into(),
            attempts: t.attempts,
            lost: t.lost,
            failed: t.failed,
            revoked: t.revoked,
            error: t.error.clone().unwrap_or_default(),
            world_size: t.world_size,
            checkpoint: t.checkpoint.clone().unwrap_or_default(),
        });
        match t.state {
            TaskState::Pending => counts.pending += 1,
            TaskState::Leased => counts.leased += 1,
            TaskState::Succeeded => counts.succeeded += 1,
            TaskState::Failed => counts.failed += 1,
            TaskState::Cancelled => counts.cancelled += 1,
        }
    }
    let rounds = c
        .rounds
        .iter()
        .map(|r| pb::Round {
            index: r.index,
            state: r.state.as_str().into(),
            phase: r.phase.as_str().into(),
            target: c
                .spec
                .rounds
                .get(r.index as usize)
                .and_then(|s| s.target.clone()),
            artifacts: r.artifacts.clone().into_iter().collect(),
            metrics: r.metrics.clone().into_iter().collect(),
            extensions: r.extensions,
        })
        .collect();
    Some(pb::Campaign {
        id: c.id.clone(),
        name: c.spec.name.clone(),
        state: c.state.to_pb() as i32,
        error: c.error.clone().unwrap_or_default(),
        rounds,
        spec: Some(c.spec.clone()),
        created_ms: c.created_ms,
        updated_ms: c.updated_ms,
        tasks: Some(counts),
        task_records: records,
        retries: c.retries,
    })
}

#[cfg(test)]
mod tests;

/// Metric maps as the store writes them: only finite values (JSON has no NaN or infinity, and
/// serde_json would write them as `null`, which it cannot read back as a number), and on reading,
/// a `null` left by an older version is dropped instead of making the record unreadable.
mod finite_metrics {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().filter(|(_, v)| v.is_finite()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        let m: BTreeMap<String, Option<f64>> = BTreeMap::deserialize(d)?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    #[cfg(test)]
    mod tests {
        use super::super::{Phase, Round, RoundState};

        #[test]
        fn a_record_with_a_non_finite_metric_reads_back() {
            let mut r = Round {
                index: 0,
                state: RoundState::Running,
                phase: Phase::Distill,
                source: "teacher".into(),
                phase_tasks: vec![],
                artifacts: Default::default(),
                metrics: [("a".to_string(), f64::NAN), ("b".to_string(), 1.5)].into(),
                extensions: 0,
            };
            let text = serde_json::to_string(&r).unwrap();
            let back: Round = serde_json::from_str(&text).unwrap();
            r.metrics.remove("a");
            assert_eq!(back, r);
            // A record an older version wrote with a null still loads, without it.
            let old = text.replace("\"b\":1.5", "\"b\":1.5,\"c\":null");
            assert!(old.contains("null"), "{old}");
            assert_eq!(serde_json::from_str::<Round>(&old).unwrap(), r);
        }
    }
}
