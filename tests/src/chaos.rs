//! The seeded chaos driver: a two-round campaign (world_size 2, a local judge) on the real
//! coordinator and two `worker join` processes, while a seeded RNG picks which of the three to
//! SIGKILL and when, spread over the campaign's phases; each victim is restarted at once. The
//! campaign must succeed with the same student, bit for bit, as the same campaign run without
//! kills (run first, on a cluster of its own).
//!
//! Restarts: the coordinator comes back on the same data dir and port (what a supervisor does);
//! a worker comes back on the same work dir, as a machine that reboots with its disk: its
//! artifact cache survives (downloads are written to a temporary file and renamed, so a kill
//! leaves no half-written blob) and it registers under a new worker id, so its old leases end
//! only by expiring.
//!
//! Knobs: `DISTILLERY_CHAOS_SEED`, `DISTILLERY_CHAOS_KILLS` (see `ChaosConfig::from_env`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

use crate::{submit, wait_terminal, write_corpus, write_spec, CoordinatorProc, WorkerProc};

/// Phases that run tasks, in order; `gate` is the coordinator's own instant step.
pub const PHASES: [&str; 5] = ["score", "prune", "distill", "evaluate", "judge"];

/// SplitMix64: small, seedable, and the same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One of the three processes of the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Victim {
    Coordinator,
    WorkerA,
    WorkerB,
}

impl Victim {
    pub const ALL: [Victim; 3] = [Victim::Coordinator, Victim::WorkerA, Victim::WorkerB];

    pub fn name(self) -> &'static str {
        match self {
            Victim::Coordinator => "coordinator",
            Victim::WorkerA => "worker-a",
            Victim::WorkerB => "worker-b",
        }
    }
}

/// A kill the RNG planned: in phase slot `slot` (round × phase), `frac` of the way through
/// that phase's duration in the reference run.
#[derive(Clone, Debug)]
pub struct PlannedKill {
    pub victim: Victim,
    pub slot: usize,
    pub frac: f64,
}

/// A kill that happened.
#[derive(Clone, Debug)]
pub struct Kill {
    pub n: usize,
    pub victim: Victim,
    /// The killed worker's pid (the harness does not expose the coordinator's).
    pub pid: Option<i32>,
    /// `r0/distill` etc.: the phase `status --json` showed just before the kill.
    pub phase: String,
    /// Since the chaos campaign was submitted.
    pub at: Duration,
    /// What the plan aimed at (`r1/score`), for when the campaign had already moved on.
    pub planned: String,
}

/// Seed and number of kills.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    pub seed: u64,
    pub kills: usize,
}

impl ChaosConfig {
    /// `DISTILLERY_CHAOS_SEED` and `DISTILLERY_CHAOS_KILLS`, or the defaults given.
    pub fn from_env(seed: u64, kills: usize) -> ChaosConfig {
        let get = |k: &str| {
            std::env::var(k).ok().map(|v| {
                v.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{k}={v:?}: must be a non-negative integer"))
            })
        };
        ChaosConfig {
            seed: get("DISTILLERY_CHAOS_SEED").unwrap_or(seed),
            kills: get("DISTILLERY_CHAOS_KILLS").map_or(kills, |k| k as usize),
        }
    }

    /// The kills, sorted by when they are due: a pure function of the seed, so a seed replays.
    /// Slots are drawn uniformly over the campaign's `rounds × PHASES`, so short phases (prune)
    /// are hit as often as long ones (distill). The last slot (the final judge, under a second,
    /// and the campaign is over when it ends) takes at most `LAST_SLOT_KILLS`; further draws
    /// for it are drawn again among the other slots, else a large run would leave kills undone.
    pub fn plan(&self, rounds: usize) -> Vec<PlannedKill> {
        const LAST_SLOT_KILLS: usize = 2;
        let mut rng = Rng::new(self.seed);
        let slots = (rounds * PHASES.len()) as u64;
        let mut in_last = 0;
        let mut plan: Vec<PlannedKill> = (0..self.kills)
            .map(|_| {
                let victim = Victim::ALL[rng.below(3) as usize];
                let mut slot = rng.below(slots) as usize;
                if slot + 1 == slots as usize {
                    in_last += 1;
                    if in_last > LAST_SLOT_KILLS {
                        slot = rng.below(slots - 1) as usize;
                    }
                }
                PlannedKill {
                    victim,
                    slot,
                    // Never at the very end of a phase: the phase could finish before the kill.
                    frac: 0.8 * rng.unit(),
                }
            })
            .collect();
        plan.sort_by(|a, b| (a.slot, a.frac).partial_cmp(&(b.slot, b.frac)).unwrap());
        plan
    }
}

/// `r{round}/{phase}` of a slot index.
pub fn slot_name(slot: usize) -> String {
    format!("r{}/{}", slot / PHASES.len(), PHASES[slot % PHASES.len()])
}

/// `status ID --json`, or `None` while the coordinator does not answer.
pub fn try_status(c: &CoordinatorProc, id: &str) -> Option<serde_json::Value> {
    let out = c.cli(&["status", id, "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Follows a campaign's durable event log (`phase_started`, `campaign_state`) on a thread of its
/// own, reconnecting after coordinator restarts from the last sequence number it saw, so the
/// driver knows the phase the moment it starts (polling `status` misses phases shorter than a
/// poll).
pub struct PhaseWatch {
    now: Arc<Mutex<(usize, String)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PhaseWatch {
    pub fn start(url: String, campaign: String) -> PhaseWatch {
        use futures::StreamExt;
        let now = Arc::new(Mutex::new((0usize, "submitted".to_string())));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, st) = (now.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut next = 1u64;
            while !st.load(Ordering::SeqCst) {
                rt.block_on(async {
                    let t = distillery_proto::client::Target {
                        url: url.clone(),
                        ..Default::default()
                    };
                    let Ok(ch) = t.channel().await else { return };
                    let Ok(mut c) = t.campaigns(ch) else { return };
                    let Ok(s) = c
                        .watch(distillery_proto::v1::WatchRequest {
                            campaign_id: campaign.clone(),
                            from_seq: next,
                        })
                        .await
                    else {
                        return;
                    };
                    let mut s = s.into_inner();
                    loop {
                        let e = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
                        if st.load(Ordering::SeqCst) {
                            return;
                        }
                        let e = match e {
                            Err(_) => continue,
                            Ok(Some(Ok(e))) => e,
                            Ok(_) => return,
                        };
                        next = e.seq + 1;
                        let mut now = n.lock().unwrap_or_else(|p| p.into_inner());
                        match e.kind.as_str() {
                            "phase_started" => {
                                let p = match e.phase.as_str() {
                                    "gate" | "done" => PHASES.len() - 1,
                                    other => PHASES.iter().position(|x| *x == other).unwrap_or(0),
                                };
                                *now = (
                                    e.round as usize * PHASES.len() + p,
                                    format!("r{}/{}", e.round, e.phase),
                                );
                            }
                            "campaign_state" if terminal(e.state) => {
                                *now = (usize::MAX, e.message.clone());
                            }
                            _ => {}
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        PhaseWatch {
            now,
            stop,
            thread: Some(thread),
        }
    }

    /// The current slot (`usize::MAX` once the campaign ended) and its name (`r0/distill`).
    pub fn position(&self) -> (usize, String) {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn terminal(state: i32) -> bool {
    use distillery_proto::v1::CampaignState as S;
    [S::Succeeded, S::Failed, S::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

impl Drop for PhaseWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Teacher, judge, corpus and questions for the chaos campaign, in a temporary folder.
pub struct CampaignFixture {
    pub dir: tempfile::TempDir,
    pub rounds: usize,
    pub judge: bool,
    /// Tokens per round's distillation: 128 per step (2 ranks × 2 sequences × 32).
    pub distill_tokens: u64,
}

impl CampaignFixture {
    /// `rounds` (1 or 2) rounds of world_size 2; a local judge when `judge`.
    pub fn new(rounds: usize, judge: bool) -> CampaignFixture {
        assert!((1..=2).contains(&rounds));
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write_test_model(
            &d.join("teacher"),
            &TestModelSpec {
                num_layers: 3,
                seed: 8,
                ..Default::default()
            },
        )
        .expect("teacher");
        if judge {
            write_test_model(
                &d.join("judge"),
                &TestModelSpec {
                    seed: 99,
                    ..Default::default()
                },
            )
            .expect("judge model");
        }
        write_corpus(
            d,
            &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
            (0..80).map(|i| {
                format!("Line {i}: a small model learns from a larger one, step by step.")
            }),
        );
        std::fs::write(
            d.join("questions.jsonl"),
            (1..=4)
                .map(|i| {
                    format!(
                        "{{\"question_id\": {i}, \"category\": \"writing\", \"turns\": [\"Say hi {i} times.\"]}}\n"
                    )
                })
                .collect::<String>(),
        )
        .expect("questions");
        CampaignFixture {
            dir,
            rounds,
            judge,
            distill_tokens: 12_288,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The campaign's spec under `name` (the name does not change any artifact).
    pub fn spec(&self, name: &str) -> PathBuf {
        let d = self.path();
        let mut toml = format!(
            "name = \"{name}\"\nseed = 11\n[teacher]\nmodel = \"{}\"\n[data]\n\
             calibration = {{ path = \"calib.jsonl\", samples = 16, seq_len = 32 }}\n\
             train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
             validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
             [scheduling]\nscore_shards = 2\n",
            d.join("teacher").display()
        );
        let targets = [
            "{ hidden_size = 48, intermediate_size = 192, num_layers = 2 }",
            "{ hidden_size = 32, intermediate_size = 128, num_layers = 2 }",
        ];
        for t in &targets[..self.rounds] {
            let _ = write!(
                toml,
                "[[rounds]]\ntarget = {t}\n\
                 distill = {{ tokens = {}, seq_len = 32, micro_batch = 2, world_size = 2, lr = 0.003, warmup_steps = 2, checkpoint_every = 8 }}\n",
                self.distill_tokens
            );
        }
        if self.judge {
            let _ = write!(
                toml,
                "[evaluation]\nperplexity = true\n\
                 judge = {{ backend = \"local\", model = \"{}\", mode = \"pairwise\", questions = \"questions.jsonl\", baseline = \"teacher\", max_tokens = 8 }}\n",
                d.join("judge").display()
            );
        } else {
            toml.push_str("[evaluation]\nperplexity = false\n");
        }
        write_spec(d, &format!("{name}.toml"), &toml)
    }
}

/// The students of every round (artifact digests) of a finished campaign.
pub fn students(v: &serde_json::Value) -> Vec<Option<String>> {
    v["rounds"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| r["artifacts"]["student"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The uninterrupted run: its final status, how long each phase slot lasted, and the wall time.
pub struct Reference {
    pub status: serde_json::Value,
    pub slot_durations: Vec<Duration>,
    pub wall: Duration,
}

impl Reference {
    pub fn student(&self) -> Option<String> {
        students(&self.status).last().cloned().flatten()
    }
}

/// Runs the fixture's campaign on a fresh coordinator and two workers, with no faults.
pub fn run_reference(fx: &CampaignFixture, timing: &[&str], timeout: Duration) -> Reference {
    let root = fx.path().join("reference");
    std::fs::create_dir_all(&root).expect("reference dir");
    let coord = CoordinatorProc::start(&root.join("data"), timing);
    let _a = WorkerProc::real(&coord.url(), &root.join("worker-a"), "cpu");
    let _b = WorkerProc::real(&coord.url(), &root.join("worker-b"), "cpu");
    let start = Instant::now();
    let id = submit(&coord, &fx.spec("reference"));
    let slots = fx.rounds * PHASES.len();
    let mut first_seen: Vec<Option<Instant>> = vec![None; slots + 1];
    let deadline = start + timeout;
    let watch = PhaseWatch::start(coord.url(), id.clone());
    loop {
        let (slot, _) = watch.position();
        let i = slot.min(slots);
        if first_seen[i].is_none() {
            first_seen[i] = Some(Instant::now());
        }
        if slot == usize::MAX {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reference run is stuck: {}",
            coord.status_json(Some(&id))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(watch);
    let status = wait_terminal(&coord, &id, Duration::from_secs(30));
    let wall = start.elapsed();
    assert_eq!(
        status["state"],
        "succeeded",
        "the reference run (no faults) failed: {status}\n{}",
        coord.log_text()
    );
    // A slot lasts until the next one seen; slots never seen (too short to poll) get zero.
    let mut slot_durations = vec![Duration::ZERO; slots];
    for (i, d) in slot_durations.iter_mut().enumerate() {
        if let Some(t) = first_seen[i] {
            let next = first_seen[i + 1..].iter().flatten().next().copied();
            *d = next
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(t);
        }
    }
    Reference {
        status,
        slot_durations,
        wall,
    }
}

/// Attempt counts over a campaign's tasks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attempts {
    /// Task records `status --json` listed.
    pub records: u64,
    pub attempts: u64,
    pub lost: u64,
    pub failed: u64,
    pub revoked: u64,
}

/// What a chaos run did and how it ended.
pub struct ChaosReport {
    pub config: ChaosConfig,
    pub kills: Vec<Kill>,
    /// Planned kills that did not happen because the campaign had already ended.
    pub not_done: usize,
    pub status: serde_json::Value,
    pub reference_student: Option<String>,
    pub reference_wall: Duration,
    pub wall: Duration,
    /// `task_retry` / `task_failed` events: attempts charged as failures, with their reasons.
    pub failures: Vec<String>,
}

impl ChaosReport {
    pub fn state(&self) -> &str {
        self.status["state"].as_str().unwrap_or("unknown")
    }

    pub fn student(&self) -> Option<String> {
        students(&self.status).last().cloned().flatten()
    }

    /// True iff the campaign succeeded with the reference's final student.
    pub fn passed(&self) -> bool {
        self.state() == "succeeded"
            && self.student().is_some()
            && self.student() == self.reference_student
    }

    /// Attempts of every task of the campaign, summed from `status --json`'s per-task records.
    pub fn attempts(&self) -> Attempts {
        let mut a = Attempts::default();
        for r in self.status["rounds"].as_array().into_iter().flatten() {
            for t in r["tasks"].as_array().into_iter().flatten() {
                a.records += 1;
                let n = |k: &str| t[k].as_u64().unwrap_or(0);
                a.attempts += n("attempts");
                a.lost += n("lost");
                a.failed += n("failed");
                a.revoked += n("revoked");
            }
        }
        a
    }

    /// Kills per process, phases hit, result, digest equality, wall times.
    pub fn summary(&self) -> String {
        use std::collections::BTreeMap;
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        let mut phases: BTreeMap<String, usize> = BTreeMap::new();
        for k in &self.kills {
            *per.entry(k.victim.name()).or_default() += 1;
            *phases.entry(k.phase.clone()).or_default() += 1;
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos summary: seed {} kills {}/{} planned ({} not done: the campaign had ended)",
            self.config.seed,
            self.kills.len(),
            self.config.kills,
            self.not_done
        );
        let _ = writeln!(s, "  kills per process: {per:?}");
        let _ = writeln!(s, "  phases hit: {phases:?}");
        let _ = writeln!(
            s,
            "  result: {}{}",
            self.state(),
            self.status["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "  tasks: {}", self.status["tasks"]);
        let a = self.attempts();
        let _ = writeln!(
            s,
            "  attempts: {} in all, {} lost, {} failed, {} revoked (status --json, per task)",
            a.attempts, a.lost, a.failed, a.revoked
        );
        for r in self.status["rounds"].as_array().into_iter().flatten() {
            for t in r["tasks"].as_array().into_iter().flatten() {
                if t["failed"].as_u64().unwrap_or(0) > 0 {
                    let _ = writeln!(
                        s,
                        "  charged as failed: task {} ({}, r{}) {} time(s)",
                        t["id"], t["kind"], t["round"], t["failed"]
                    );
                }
            }
        }
        for f in &self.failures {
            let _ = writeln!(s, "  failed attempt: {f}");
        }
        let _ = writeln!(
            s,
            "  final student: {} vs reference {}: {}",
            self.student().as_deref().unwrap_or("none"),
            self.reference_student.as_deref().unwrap_or("none"),
            if self.student().is_some() && self.student() == self.reference_student {
                "EQUAL"
            } else {
                "DIFFERENT"
            }
        );
        let _ = writeln!(
            s,
            "  wall time: {:.1} s with kills, {:.1} s reference",
            self.wall.as_secs_f64(),
            self.reference_wall.as_secs_f64()
        );
        s
    }
}

/// The cluster under fire: a coordinator and two workers, each restartable in place.
struct Cluster {
    coord: CoordinatorProc,
    workers: [Option<WorkerProc>; 2],
    dirs: [PathBuf; 2],
}

impl Cluster {
    fn start(root: &Path, timing: &[&str]) -> Cluster {
        std::fs::create_dir_all(root).expect("cluster dir");
        let coord = CoordinatorProc::start(&root.join("data"), timing);
        let dirs = [root.join("worker-a"), root.join("worker-b")];
        let workers = [
            Some(WorkerProc::real(&coord.url(), &dirs[0], "cpu")),
            Some(WorkerProc::real(&coord.url(), &dirs[1], "cpu")),
        ];
        Cluster {
            coord,
            workers,
            dirs,
        }
    }

    /// SIGKILLs `v` and starts it again at once; returns the killed worker's pid.
    fn kill_and_restart(&mut self, v: Victim) -> Option<i32> {
        match v {
            Victim::Coordinator => {
                self.coord.restart();
                None
            }
            Victim::WorkerA | Victim::WorkerB => {
                let i = usize::from(v == Victim::WorkerB);
                let mut w = self.workers[i].take().expect("worker running");
                let pid = w.pid();
                w.kill();
                self.workers[i] = Some(WorkerProc::real(&self.coord.url(), &self.dirs[i], "cpu"));
                Some(pid)
            }
        }
    }
}

/// Prints a line straight to the process's stderr, past the test harness's output capture, so
/// CI's log shows the seed and every kill even when the test passes.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Runs the reference campaign, then the same campaign under `cfg.kills` seeded kills.
/// Prints the seed first and every kill as it happens, so a failing run can be replayed.
pub fn run(cfg: &ChaosConfig, timing: &[&str]) -> ChaosReport {
    say!(
        "chaos: seed {} kills {} (replay: DISTILLERY_CHAOS_SEED={} DISTILLERY_CHAOS_KILLS={} scripts/chaos.sh)",
        cfg.seed, cfg.kills, cfg.seed, cfg.kills
    );
    let fx = CampaignFixture::new(2, true);
    let reference = run_reference(&fx, timing, Duration::from_secs(400));
    say!(
        "chaos: reference run succeeded in {:.1} s, student {}; phase durations {:?}",
        reference.wall.as_secs_f64(),
        reference.student().unwrap_or_default(),
        reference
            .slot_durations
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{} {:.1}s", slot_name(i), d.as_secs_f64()))
            .collect::<Vec<_>>()
    );
    let plan = cfg.plan(fx.rounds);
    let mut cluster = Cluster::start(&fx.path().join("chaos"), timing);
    let start = Instant::now();
    let id = submit(&cluster.coord, &fx.spec("chaos"));
    // Every kill is followed by at least this much undisturbed time, so the cluster always
    // makes some progress between kills and the run ends.
    let min_gap = Duration::from_millis(100);
    // Generous: every worker kill may cost a lease timeout and the work since a checkpoint.
    let deadline = start + reference.wall * 3 + Duration::from_secs(30 * (cfg.kills as u64 + 4));
    let mut kills = Vec::new();
    let mut not_done = 0;
    let mut last_kill: Option<Instant> = None;
    let watch = PhaseWatch::start(cluster.coord.url(), id.clone());
    'plan: for (n, k) in plan.iter().enumerate() {
        // Wait for the planned phase (or any later one), then for the planned moment in it.
        let mut entered: Option<Instant> = None;
        let due = reference.slot_durations[k.slot].mul_f64(k.frac);
        let phase = loop {
            assert!(
                Instant::now() < deadline,
                "chaos: the campaign is stuck after {} kills: {}\ncoordinator log:\n{}",
                kills.len(),
                try_status(&cluster.coord, &id).unwrap_or_default(),
                cluster.coord.log_text()
            );
            let (slot, phase) = watch.position();
            if slot == usize::MAX {
                not_done = plan.len() - n;
                break 'plan;
            }
            if slot >= k.slot {
                let t = *entered.get_or_insert_with(Instant::now);
                let moved_on = slot > k.slot;
                if (moved_on || t.elapsed() >= due)
                    && last_kill.is_none_or(|t| t.elapsed() >= min_gap)
                {
                    break phase;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let at = start.elapsed();
        let pid = cluster.kill_and_restart(k.victim);
        let kill = Kill {
            n: n + 1,
            victim: k.victim,
            pid,
            phase,
            at,
            planned: slot_name(k.slot),
        };
        say!(
            "chaos: kill {}/{}: {}{} in {} at {:.2} s (planned {})",
            kill.n,
            plan.len(),
            kill.victim.name(),
            kill.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            kill.phase,
            kill.at.as_secs_f64(),
            kill.planned
        );
        kills.push(kill);
        last_kill = Some(Instant::now());
    }
    drop(watch);
    let remaining = deadline.saturating_duration_since(Instant::now());
    let status = wait_terminal(&cluster.coord, &id, remaining.max(Duration::from_secs(60)));
    let failures = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(crate::all_events(&cluster.coord, &id))
        .into_iter()
        .filter(|e| matches!(e.kind.as_str(), "task_retry" | "task_failed"))
        .map(|e| format!("[{}] {}", e.kind, e.message))
        .collect();
    let report = ChaosReport {
        failures,
        config: cfg.clone(),
        kills,
        not_done,
        status,
        reference_student: reference.student(),
        reference_wall: reference.wall,
        wall: start.elapsed(),
    };
    say!("{}", report.summary().trim_end());
    report
}
