//! Random event sequences against the state machine, checked against its invariants
//! (ARCHITECTURE.md, "Invariants") after every step. The property test in `tests.rs` and the
//! fuzzers (`fuzz_targets::machine_events`) drive the same [`Harness`]: valid events, stale and
//! forged reports, malformed completions, unknown workers and campaigns, invalid specs.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::*;
use crate::phases::kind;
use crate::spec::{self, FileChecks};

/// Fails the step with the condition's text (or the message) unless it holds.
macro_rules! ensure {
    ($c:expr) => {
        if !$c {
            return Err(format!("invariant broken: {}", stringify!($c)));
        }
    };
    ($c:expr, $($fmt:tt)+) => {
        if !$c {
            return Err(format!($($fmt)+));
        }
    };
}

/// Fails the step unless both sides are equal, showing them.
macro_rules! ensure_eq {
    ($a:expr, $b:expr) => {
        ensure_eq!($a, $b, "invariant broken")
    };
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!(
                "{}: {} != {}: {:?} vs {:?}",
                format!($($fmt)+),
                stringify!($a),
                stringify!($b),
                a,
                b
            ));
        }
    }};
}

pub(crate) const DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// `[teacher_correction]` as the tests give it.
pub(crate) const CORRECTION: &str = "[teacher_correction]\ntokens = 64\nworld_size = 2\n";

pub(crate) fn spec_text(rounds: usize, world: u32, extra: &str) -> String {
    let mut s = String::from(
        "name = \"t\"\n[teacher]\nmodel = \"/m\"\n[data]\ncalibration = { path = \"/c\" }\n\
         train = [{ name = \"web\", path = \"/w\" }]\nvalidation = [{ name = \"web\", path = \"/v\" }]\n",
    );
    for _ in 0..rounds {
        s.push_str(&format!("[[rounds]]\ntarget = {{ num_layers = 2 }}\ndistill = {{ tokens = 100, world_size = {world} }}\n"));
    }
    s.push_str(extra);
    s
}

thread_local! {
    /// Parsed specs by their text: a fuzzer submits the same few thousands of times.
    static SPECS: RefCell<BTreeMap<String, pb::CampaignSpec>> = const { RefCell::new(BTreeMap::new()) };
}

fn parse_cached(text: String) -> pb::CampaignSpec {
    SPECS.with(|m| {
        m.borrow_mut()
            .entry(text)
            .or_insert_with_key(|t| {
                // The texts are this module's constants: a failure is a bug here, not input.
                spec::parse(t, Path::new("/"), FileChecks::None).expect("test spec is valid")
            })
            .clone()
    })
}

pub(crate) fn spec(rounds: usize, world: u32, extra: &str) -> pb::CampaignSpec {
    parse_cached(spec_text(rounds, world, extra))
}

/// A spec whose rounds search `k` candidates at 70% of the parameters.
pub(crate) fn search_spec(rounds: usize, world: u32, k: u32, extra: &str) -> pb::CampaignSpec {
    let mut s = String::from(
        "name = \"t\"\n[teacher]\nmodel = \"/m\"\n[data]\ncalibration = { path = \"/c\" }\n\
         train = [{ name = \"web\", path = \"/w\" }]\nvalidation = [{ name = \"web\", path = \"/v\" }]\n",
    );
    for _ in 0..rounds {
        s.push_str(&format!(
            "[[rounds]]\ntarget = {{ params = 0.7 }}\nsearch = {{ candidates = {k}, tokens = 40 }}\n\
             distill = {{ tokens = 100, world_size = {world} }}\n"
        ));
    }
    s.push_str(extra);
    parse_cached(s)
}

pub(crate) fn cfg() -> Config {
    Config {
        lease_timeout_ms: 1_000,
        backoff_base_ms: 100,
        backoff_max_ms: 1_000,
        ..Config::default()
    }
}

pub(crate) fn lref(a: &Assignment) -> LeaseRef {
    LeaseRef {
        task_id: a.task_id.clone(),
        lease_id: a.lease_id,
        rank: a.rank,
    }
}

/// The outputs and metrics a task of this kind must report to complete.
pub(crate) fn outputs_for(
    st: &State,
    task: &str,
) -> (BTreeMap<String, String>, BTreeMap<String, f64>) {
    let k = &st.tasks[task].kind;
    let outs = kind::required_outputs(k)
        .iter()
        .map(|o| (o.to_string(), DIGEST.to_string()))
        .collect();
    let mut metrics: BTreeMap<String, f64> = kind::required_metrics(k)
        .iter()
        .map(|m| (m.to_string(), 10.0))
        .collect();
    if k == kind::PRUNE && st.tasks[task].params.contains_key("candidate") {
        for m in kind::CANDIDATE_METRICS {
            metrics.insert(m.to_string(), 10.0);
        }
    }
    if k == kind::JUDGE {
        metrics.insert("sum.judge.wins".into(), 3.0);
        metrics.insert("sum.judge.ties".into(), 2.0);
        metrics.insert("sum.judge.losses".into(), 5.0);
        // A ranking's battles: the teacher beats this round's student 8 to 2.
        let r = st.tasks[task].round;
        metrics.insert(format!("sum.judge.battles.teacher.round{r}.a_wins"), 8.0);
        metrics.insert(format!("sum.judge.battles.teacher.round{r}.b_wins"), 2.0);
    }
    (outs, metrics)
}

#[derive(Debug, Clone)]
pub enum Op {
    Submit(u8),
    /// Devices, and the worker this one replaces (a restarted process).
    Register(u8, Option<u8>),
    Poll(u8, u8),
    Complete(u8, bool),
    Fail(u8, bool),
    Lost(u8),
    Rendezvous(u8),
    Heartbeat(u8),
    Advance(u16),
    Pause(u8),
    Resume(u8),
    Cancel(u8),
    Retry(u8),
    Recover,
    /// A report on a lease that never existed (forged id, rank past the gang).
    Forged(u8, u8),
    /// Completion of a live lease with outputs or metrics the phase does not accept.
    BadComplete(u8, u8),
    /// Progress on a live or ended lease, with odd metrics (NaN, infinities, result keys).
    Progress(u8, u8),
    /// Calls from a worker or about a campaign the coordinator does not know.
    Unknown(u8),
    /// A spec that passed no validation (the wire can carry anything).
    BadSubmit(u8),
}

impl Op {
    /// Decodes a byte string into operations (a fuzzer's input): one tag byte chooses the
    /// operation, the next bytes its arguments; whatever the bytes, the result is a valid list.
    pub fn decode(data: &[u8]) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut it = data.iter().copied();
        while let Some(tag) = it.next() {
            let mut b = || it.next().unwrap_or(0);
            let (x, y) = (b(), b());
            ops.push(match tag % 32 {
                0 => Op::Submit(x),
                1 => Op::Register(1 + x % 2, (y & 1 == 1).then_some(y >> 1)),
                2..=5 => Op::Poll(x, y),
                6..=11 => Op::Complete(x, y & 1 == 1),
                12 => Op::Fail(x, y & 1 == 1),
                13 | 14 => Op::Lost(x),
                15 => Op::Rendezvous(x),
                16 | 17 => Op::Heartbeat(x),
                18 | 19 => Op::Advance(u16::from_le_bytes([x, y]) % 1500),
                20 => Op::Pause(x),
                21 => Op::Resume(x),
                22 => Op::Cancel(x),
                23 => Op::Retry(x),
                24 => Op::Recover,
                25 => Op::Forged(x, y),
                26 => Op::BadComplete(x, y),
                27 | 28 => Op::Progress(x, y),
                29 | 30 => Op::Unknown(x),
                _ => Op::BadSubmit(x),
            });
        }
        ops
    }
}

/// Drives the machine from an empty state and checks the invariants after every step.
#[derive(Default)]
pub struct Harness {
    st: State,
    now: Millis,
    /// Every (task, lease id, rank) ever handed out, live or not.
    issued: Vec<Assignment>,
    max_lease: u64,
    terminal_campaigns: BTreeMap<String, CampaignState>,
    terminal_tasks: BTreeMap<String, TaskState>,
    last_seq: u64,
}

/// The first line where the pretty-printed states differ, with the lines around it.
fn first_difference(before: &State, after: &State) -> String {
    let (a, b) = (format!("{before:#?}"), format!("{after:#?}"));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let i = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let from = i.saturating_sub(6);
    format!(
        "before: {} / after: {}",
        a[from..(i + 2).min(a.len())].join("\n"),
        b[from..(i + 2).min(b.len())].join("\n")
    )
}

impl Harness {
    /// Applies `ops` from an empty state, checking the invariants after each one.
    pub fn run(ops: &[Op]) -> Result<(), String> {
        let mut h = Harness::default();
        for (i, op) in ops.iter().enumerate() {
            h.step(op)
                .map_err(|e| format!("after op {i} ({op:?}): {e}"))?;
        }
        Ok(())
    }

    fn pick<T>(v: &[T], i: u8) -> Option<&T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[i as usize % v.len()])
        }
    }

    fn event(&mut self, op: &Op) -> Option<Event> {
        let now = self.now;
        let workers: Vec<String> = self.st.workers.keys().cloned().collect();
        let campaigns: Vec<String> = self.st.campaigns.keys().cloned().collect();
        let pick_lease = |h: &Harness, i: u8, stale: bool| -> Option<LeaseRef> {
            let live: Vec<&Assignment> = h
                .issued
                .iter()
                .filter(|a| {
                    h.st.leases
                        .get(&a.task_id)
                        .is_some_and(|l| l.lease_id == a.lease_id)
                        != stale
                })
                .collect();
            Self::pick(&live, i).map(|a| lref(a))
        };
        Some(match op {
            Op::Submit(v) => {
                let world = 1 + u32::from(v % 2);
                let extra = match v % 5 {
                    0 => "",
                    1 => "[gate]\nmax_perplexity_ratio = 0.5\non_fail = \"extend_distill\"\n",
                    2 => "[scheduling]\nmax_attempts = 1\nscore_shards = 3\n",
                    3 => "[scheduling]\nmax_attempts = 2\nmax_lost = 1\n",
                    _ => "[evaluation]\nperplexity = false\n",
                };
                let rounds = 1 + usize::from(v % 3 == 0);
                // Some campaigns search candidates and correct their teacher first.
                let spec = match (v / 5) % 4 {
                    0 => search_spec(rounds, world, 1 + u32::from(v % 3), extra),
                    1 => spec(rounds, world, &format!("{CORRECTION}{extra}")),
                    _ => spec(rounds, world, extra),
                };
                Event::Submit {
                    spec: Box::new(spec),
                    now,
                }
            }
            Op::Register(n, previous) => Event::Register {
                host: "h".into(),
                devices: (0..*n).map(|i| format!("cpu:{i}")).collect(),
                device_memory: Vec::new(),
                labels: BTreeMap::new(),
                version: "0".into(),
                task_kinds: kind::ALL.iter().map(|k| k.to_string()).collect(),
                nonce: u32::from(*n),
                previous: previous.and_then(|p| Self::pick(&workers, p).cloned()),
                now,
            },
            Op::Poll(w, m) => {
                let w = Self::pick(&workers, *w)?.clone();
                let devs: Vec<String> = self.st.workers[&w]
                    .devices
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| m & (1 << i) != 0)
                    .map(|(_, d)| d.clone())
                    .collect();
                Event::Poll {
                    worker: w,
                    free_devices: devs,
                    now,
                }
            }
            Op::Complete(i, stale) => {
                let lease = pick_lease(self, *i, *stale)?;
                let (outputs, metrics) = outputs_for(&self.st, &lease.task_id);
                Event::Complete {
                    lease,
                    outputs,
                    metrics,
                    now,
                }
            }
            Op::Fail(i, retryable) => Event::Fail {
                lease: pick_lease(self, *i, false)?,
                error: "boom".into(),
                retryable: *retryable,
                lost: false,
                now,
            },
            Op::Lost(i) => Event::Fail {
                lease: pick_lease(self, *i, false)?,
                error: "collective: connection reset".into(),
                retryable: true,
                lost: true,
                now,
            },
            Op::Rendezvous(i) => Event::Rendezvous {
                lease: pick_lease(self, *i, false)?,
                key: "k".into(),
                payload: vec![*i],
                now,
            },
            Op::Heartbeat(w) => {
                let w = Self::pick(&workers, *w)?.clone();
                let leases = self.issued.iter().filter(|a| {
                    self.st.leases.get(&a.task_id).is_some_and(|l| {
                        l.ranks.get(a.rank as usize).is_some_and(|r| r.worker == w)
                    })
                });
                Event::Heartbeat {
                    worker: w.clone(),
                    leases: leases.map(lref).collect(),
                    now,
                }
            }
            Op::Advance(ms) => {
                self.now += u64::from(*ms);
                Event::Tick { now: self.now }
            }
            Op::Pause(c) => Event::Pause {
                campaign: Self::pick(&campaigns, *c)?.clone(),
                now,
            },
            Op::Resume(c) => Event::Resume {
                campaign: Self::pick(&campaigns, *c)?.clone(),
                now,
            },
            Op::Cancel(c) => Event::Cancel {
                campaign: Self::pick(&campaigns, *c)?.clone(),
                now,
            },
            Op::Retry(c) => Event::Retry {
                campaign: Self::pick(&campaigns, *c)?.clone(),
                now,
            },
            Op::Forged(i, r) => {
                let mut lease = pick_lease(self, *i, false)
                    .or_else(|| pick_lease(self, *i, true))
                    .unwrap_or(LeaseRef {
                        task_id: "t-nope".into(),
                        lease_id: 1,
                        rank: 0,
                    });
                match r % 3 {
                    0 => lease.lease_id = lease.lease_id.wrapping_add(1 + u64::from(*r)),
                    1 => lease.rank = lease.rank.wrapping_add(1 + u32::from(*r)),
                    _ => lease.lease_id = u64::MAX - u64::from(*r),
                }
                let (outputs, metrics) = if self.st.tasks.contains_key(&lease.task_id) {
                    outputs_for(&self.st, &lease.task_id)
                } else {
                    Default::default()
                };
                Event::Complete {
                    lease,
                    outputs,
                    metrics,
                    now,
                }
            }
            Op::BadComplete(i, what) => {
                let lease = pick_lease(self, *i, false)?;
                let (mut outputs, mut metrics) = outputs_for(&self.st, &lease.task_id);
                match what % 5 {
                    0 => outputs.clear(),
                    1 => outputs
                        .values_mut()
                        .for_each(|d| *d = "not-a-digest".into()),
                    2 => metrics.values_mut().for_each(|m| *m = f64::NAN),
                    3 => {
                        metrics.insert("progress.perplexity".into(), f64::INFINITY);
                        metrics.insert("sum.judge.wins".into(), -1.0);
                    }
                    _ => metrics.clear(),
                }
                Event::Complete {
                    lease,
                    outputs,
                    metrics,
                    now,
                }
            }
            Op::Progress(i, what) => {
                let lease =
                    pick_lease(self, *i, what & 1 == 1).or_else(|| pick_lease(self, *i, false))?;
                let value =
                    [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, 2.5][usize::from(what / 2) % 6];
                let key = [
                    "progress.loss",
                    "perplexity",
                    "judge.win_rate",
                    "sum.judge.wins",
                ][usize::from(what / 12) % 4];
                Event::Progress {
                    lease,
                    metrics: BTreeMap::from([(key.to_string(), value)]),
                    checkpoint: (what & 2 == 2).then(|| DIGEST.to_string()),
                    message: "step".into(),
                    now,
                }
            }
            Op::Unknown(k) => {
                let worker = "w-nope".to_string();
                let campaign = "c-nope".to_string();
                match k % 6 {
                    0 => Event::Poll {
                        worker,
                        free_devices: vec!["cpu:0".into()],
                        now,
                    },
                    1 => Event::Heartbeat {
                        worker,
                        leases: Vec::new(),
                        now,
                    },
                    2 => Event::Cancel { campaign, now },
                    3 => Event::Pause { campaign, now },
                    4 => Event::Retry { campaign, now },
                    _ => Event::Register {
                        host: String::new(),
                        devices: Vec::new(),
                        device_memory: vec![u64::MAX],
                        labels: BTreeMap::new(),
                        version: String::new(),
                        task_kinds: vec!["no-such-kind".into()],
                        nonce: 0,
                        previous: Some(worker),
                        now,
                    },
                }
            }
            Op::BadSubmit(v) => {
                let mut s = spec(1, 1, "");
                match v % 4 {
                    0 => s.rounds.clear(),
                    1 => s.teacher = None,
                    2 => {
                        for r in &mut s.rounds {
                            if let Some(d) = r.distill.as_mut() {
                                d.world_size = 0;
                            }
                        }
                    }
                    _ => s.name.clear(),
                }
                Event::Submit {
                    spec: Box::new(s),
                    now,
                }
            }
            Op::Recover => {
                let p = self.st.clone();
                self.st = State::from_parts(p.campaigns, p.tasks, p.leases, p.workers, p.meta);
                Event::Recover { now }
            }
        })
    }

    pub fn step(&mut self, op: &Op) -> Result<(), String> {
        let Some(ev) = self.event(op) else {
            return Ok(());
        };
        let before = self.st.clone();
        let max_before = self.max_lease;
        let tasks_before: BTreeSet<String> = self.st.tasks.keys().cloned().collect();
        let retried = match &ev {
            Event::Retry { campaign, .. } => Some(campaign.clone()),
            _ => None,
        };
        match apply(&mut self.st, &cfg(), ev) {
            Err(e) => {
                // Compared as printed too: a NaN metric (which a report may carry) is not equal
                // to itself, yet unchanged.
                if self.st != before && format!("{:?}", self.st) != format!("{before:?}") {
                    return Err(format!(
                        "a refused event ({e}) changed the state: {}",
                        first_difference(&before, &self.st)
                    ));
                }
            }
            Ok(t) => {
                if let Some(c) = retried {
                    // The one way out of a terminal state: a failed campaign continues.
                    ensure_eq!(before.campaigns[&c].state, CampaignState::Failed);
                    self.terminal_campaigns.remove(&c);
                    for t in &self.st.campaigns[&c].tasks {
                        if before.tasks[t].state != TaskState::Succeeded {
                            self.terminal_tasks.remove(t);
                        } else {
                            ensure_eq!(&self.st.tasks[t], &before.tasks[t]);
                        }
                    }
                }
                for e in &t.events {
                    ensure_eq!(e.seq, self.last_seq + 1, "event sequence has a gap");
                    self.last_seq = e.seq;
                }
                for e in &t.effects {
                    if let Effect::Assign { assignments, .. } = e {
                        for a in assignments {
                            if !self.issued.iter().any(|x| x.lease_id == a.lease_id) {
                                ensure!(a.lease_id > max_before, "lease ids must grow");
                            }
                            self.issued.push(a.clone());
                        }
                    }
                }
                self.max_lease = self.st.meta.last_lease_id;
                // Every phase's outputs exist before the next phase starts.
                for (id, t) in self
                    .st
                    .tasks
                    .iter()
                    .filter(|(id, _)| !tasks_before.contains(*id))
                {
                    for other in self.st.tasks.values().filter(|o| {
                        o.campaign == t.campaign && o.round == t.round && o.phase < t.phase
                    }) {
                        ensure_eq!(
                            other.state,
                            TaskState::Succeeded,
                            "task {} started before {} finished",
                            id,
                            other.id
                        );
                        for o in kind::required_outputs(&other.kind) {
                            ensure!(other.outputs.contains_key(*o));
                        }
                    }
                }
            }
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), String> {
        // Derived indexes equal what a restart would rebuild from the persisted records.
        let p = self.st.clone();
        let rebuilt = State::from_parts(p.campaigns, p.tasks, p.leases, p.workers, p.meta);
        ensure_eq!(&rebuilt.pending, &self.st.pending);
        ensure_eq!(&rebuilt.open_in_phase, &self.st.open_in_phase);
        for (id, t) in &self.st.tasks {
            // One live lease per task, and only for leased tasks.
            ensure_eq!(
                t.state == TaskState::Leased,
                self.st.leases.contains_key(id)
            );
            if let Some(l) = self.st.leases.get(id) {
                ensure_eq!(&l.task_id, id);
                ensure!(l.lease_id <= self.st.meta.last_lease_id);
                ensure_eq!(l.ranks.len() as u32, t.world_size.max(1));
                let c = self.st.campaigns[&t.campaign].state;
                ensure!(
                    matches!(c, CampaignState::Running),
                    "leased task in a {:?} campaign",
                    c
                );
            }
            ensure_eq!(t.state == TaskState::Pending, self.st.pending.contains(id));
            // Every attempt ended exactly one way (the live or succeeded one is the +1).
            let ended = t.failed + t.lost;
            let open = u32::from(matches!(t.state, TaskState::Leased | TaskState::Succeeded));
            if t.state == TaskState::Cancelled {
                ensure!(t.attempts == ended || t.attempts == ended + 1);
            } else {
                ensure_eq!(t.attempts, ended + open, "attempts of {}: {:?}", id, t);
            }
            ensure!(t.revoked <= t.lost);
            // Only failed attempts count toward max_attempts; lost ones never exhaust it.
            ensure!(t.failed <= t.max_attempts);
            let charged = t.lost - t.revoked;
            if let Some(m) = t.max_lost {
                ensure!(charged <= m + 1, "max_lost {} exceeded: {:?}", m, t);
                if charged == m + 1 {
                    ensure_eq!(t.state, TaskState::Failed);
                }
            }
            if t.state == TaskState::Failed && t.failed == 0 {
                ensure!(
                    t.max_lost.is_some_and(|m| charged > m),
                    "a task failed with only lost attempts: {:?}",
                    t
                );
            }
            // Terminal task states are final.
            if let Some(s) = self.terminal_tasks.get(id) {
                ensure_eq!(*s, t.state);
            } else if t.state.is_terminal() {
                self.terminal_tasks.insert(id.clone(), t.state);
            }
        }
        for (id, c) in &self.st.campaigns {
            // A search that ended has exactly one winner, the lowest score.
            for r in &c.rounds {
                if r.phase > Phase::Search && !r.candidates.is_empty() {
                    let winners: Vec<usize> = (0..r.candidates.len())
                        .filter(|i| r.candidates[*i].winner)
                        .collect();
                    ensure_eq!(
                        winners.clone(),
                        super::search::winner(&r.candidates)
                            .into_iter()
                            .collect::<Vec<_>>()
                    );
                    ensure_eq!(&r.artifacts["pruned"], &r.candidates[winners[0]].pruned);
                }
            }
            if let Some(s) = self.terminal_campaigns.get(id) {
                ensure_eq!(*s, c.state, "terminal campaign state changed");
            } else if c.state.is_terminal() {
                self.terminal_campaigns.insert(id.clone(), c.state);
                for t in &c.tasks {
                    ensure!(self.st.tasks[t].state.is_terminal());
                }
            }
        }
        Ok(())
    }
}
