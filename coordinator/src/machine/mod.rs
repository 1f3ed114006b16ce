//! The campaign state machine: `apply(state, event) -> transition`. Pure: no I/O, no clock (time
//! comes in the events), deterministic. Every change it makes is listed in the transition's
//! [`Dirty`] set so the store can persist exactly that, and every observable step is an
//! [`pb::Event`] with the next sequence number. An `Err` leaves the state untouched.

use std::collections::{BTreeMap, BTreeSet};

use distillery_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::phases::Phase;

pub mod history;
pub use history::{AttemptOutcome, AttemptRecord, ProgressPoint, ProgressSeries};

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
    /// Most tasks one phase of a submitted spec may fan out to (`--max-tasks-per-phase`).
    pub max_tasks_per_phase: u32,
}

/// Default of [`Config::max_tasks_per_phase`]: far above any real fan-out (shards, candidates),
/// low enough that a typo (`score_shards = 1000000`) cannot flood the state store.
pub const DEFAULT_MAX_TASKS_PER_PHASE: u32 = 1024;

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_timeout_ms: 30_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            max_tasks_per_phase: DEFAULT_MAX_TASKS_PER_PHASE,
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
    /// With `search`: the candidate shapes (filled when the prune phase ends), their short
    /// distillations' results and the winner (when the search phase ends).
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Every gate decision on this round (the report's "gate decisions and why").
    #[serde(default)]
    pub gate_log: Vec<GateRecord>,
}

/// One gate decision and the figures it was taken on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GateRecord {
    pub time_ms: Millis,
    /// `pass`, `extend` or `stop`.
    pub decision: String,
    pub reason: String,
    #[serde(with = "finite_metrics", default)]
    pub metrics: BTreeMap<String, f64>,
}

/// One shape of a round's candidate search.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Candidate {
    /// Position in the budget search's proposal (0 = best fit).
    pub index: u32,
    pub hidden_size: u32,
    pub intermediate_size: u32,
    pub num_attention_heads: u32,
    pub num_layers: u32,
    pub params: u64,
    /// Its pruned model (artifact reference).
    pub pruned: String,
    /// Its search task, once the search phase started.
    #[serde(default)]
    pub task: Option<String>,
    /// Tokens its short distillation trained (set when it finished).
    #[serde(default)]
    pub tokens: u64,
    /// Its validation score, lower is better (set when it finished; only finite scores).
    #[serde(default)]
    pub score: Option<f64>,
    /// Its last checkpoint, which the round's distillation continues when it wins.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Its student after the short distillation.
    #[serde(default)]
    pub student: Option<String>,
    /// The candidate the round continues: exactly one once the search ended.
    #[serde(default)]
    pub winner: bool,
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
    /// Its progress reports over time, downsampled (the report's curves).
    #[serde(default)]
    pub progress: ProgressSeries,
    /// Its attempts: workers, start, end, outcome (the report's timeline).
    #[serde(default)]
    pub attempt_log: Vec<AttemptRecord>,
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
    /// The shell found a stored artifact whose bytes no longer match its digest: `refs` are
    /// that blob and every directory manifest listing it.
    ArtifactCorrupt {
        refs: Vec<String>,
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
    /// Over a limit of this coordinator (the message names it and the flag that raises it).
    #[error("{0}")]
    ResourceExhausted(String),
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
        | Event::ArtifactCorrupt { now, .. }
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
        Event::ArtifactCorrupt { refs, now } => {
            tx.artifact_corrupt(&refs, now);
            tx.dispatch(now);
            Ok(())
        }
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

/// One transition in progress: the state it changes, the knobs, and what it has produced so far.
/// Its methods live with their concern (`campaigns.rs`, `leases.rs`, `rounds.rs`, `search.rs`).
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
}

mod campaigns;
mod corrupt;
mod leases;
mod rounds;
mod search;
#[doc(hidden)]
pub mod sequence;
mod view;

pub use search::winner;
pub use view::campaign_view;

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
                candidates: Vec::new(),
                gate_log: vec![],
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
