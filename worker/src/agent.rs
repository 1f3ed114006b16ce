//! The worker agent: registers, long-polls for assignments, keeps its leases alive by heartbeat,
//! stops what the coordinator cancels, and reports completion or failure with the lease id.
//! Survives coordinator restarts: calls are retried, and an unknown worker id re-registers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distillery_proto::client::{error_chain, Target, WorkerClient};
use distillery_proto::v1 as pb;
use tokio::sync::{Notify, RwLock};

use crate::runner::{TaskContext, TaskError, TaskRunner};

/// How long a rank waits before reporting a lost attempt (see `Agent::report`).
const LOST_REPORT_GRACE: Duration = Duration::from_millis(1000);

/// How a worker joins.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub target: Target,
    /// One slot per device: `cpu`, `cuda:0`, ...
    pub devices: Vec<String>,
    pub work_dir: PathBuf,
    pub host: String,
    pub labels: BTreeMap<String, String>,
}

struct Running {
    lease: pb::LeaseRef,
    device: String,
    cancel: Arc<AtomicBool>,
}

struct Shared {
    cfg: AgentConfig,
    runner: Arc<dyn TaskRunner>,
    client: WorkerClient,
    worker_id: RwLock<String>,
    heartbeat: Mutex<Duration>,
    running: Mutex<HashMap<(String, u32), Running>>,
    freed: Notify,
    /// `WORK_DIR/worker-id`: the id this work dir's worker last registered under, sent as
    /// `previous_worker_id` by the next process so the coordinator ends the dead one's attempts
    /// at once. `None` when another live worker holds the work dir's lock.
    id_file: Option<PathBuf>,
    /// Held for the process's life (released by the kernel when it dies).
    _dir_lock: Option<std::fs::File>,
}

/// Takes `WORK_DIR/worker.lock` exclusively (non-blocking): only one live worker may speak for
/// a work dir's previous worker id.
#[cfg(unix)]
fn lock_work_dir(dir: &std::path::Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("worker.lock"))
        .ok()?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(f)
}

#[cfg(not(unix))]
fn lock_work_dir(_dir: &std::path::Path) -> Option<std::fs::File> {
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker process's agent.
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    pub fn new(cfg: AgentConfig, runner: Arc<dyn TaskRunner>) -> anyhow::Result<Agent> {
        if cfg.devices.is_empty() {
            anyhow::bail!("--devices names no device");
        }
        std::fs::create_dir_all(cfg.work_dir.join("cache"))?;
        std::fs::create_dir_all(cfg.work_dir.join("tasks"))?;
        let channel = cfg.target.lazy_channel()?;
        let client = cfg.target.workers(channel)?;
        let dir_lock = lock_work_dir(&cfg.work_dir);
        if dir_lock.is_none() {
            tracing::warn!(work_dir = %cfg.work_dir.display(), "another worker uses this work dir (or it cannot be locked): give each worker its own --work-dir so a restart ends the dead process's attempts at once");
        }
        let id_file = dir_lock.as_ref().map(|_| cfg.work_dir.join("worker-id"));
        Ok(Agent {
            shared: Arc::new(Shared {
                cfg,
                runner,
                client,
                worker_id: RwLock::new(String::new()),
                heartbeat: Mutex::new(Duration::from_secs(5)),
                running: Mutex::new(HashMap::new()),
                freed: Notify::new(),
                id_file,
                _dir_lock: dir_lock,
            }),
        })
    }

    /// Runs until the process ends.
    pub async fn run(self) -> anyhow::Result<()> {
        let s = self.shared;
        s.register().await;
        let hb = s.clone();
        tokio::spawn(async move { hb.heartbeat_loop().await });
        s.poll_loop().await
    }
}

impl Shared {
    /// Registers, retrying until the coordinator answers.
    async fn register(&self) {
        let mut delay = Duration::from_millis(200);
        let previous = {
            let current = self.worker_id.read().await.clone();
            if current.is_empty() {
                self.id_file
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            } else {
                current
            }
        };
        loop {
            let req = pb::RegisterRequest {
                host: self.cfg.host.clone(),
                devices: self.cfg.devices.clone(),
                labels: self.cfg.labels.clone().into_iter().collect(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                task_kinds: self.runner.kinds(),
                previous_worker_id: previous.clone(),
                device_memory: crate::devices::device_memory(&self.cfg.devices),
            };
            let mut c = self.client.clone();
            match c.register(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::info!(worker = %r.worker_id, devices = ?self.cfg.devices, "registered");
                    *lock(&self.heartbeat) = Duration::from_millis(r.heartbeat_interval_ms.max(50));
                    if let Some(p) = &self.id_file {
                        if let Err(e) = std::fs::write(p, &r.worker_id) {
                            tracing::warn!(file = %p.display(), error = %e, "cannot remember the worker id; a restart will not end this process's attempts at once");
                        }
                    }
                    *self.worker_id.write().await = r.worker_id;
                    return;
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "cannot register yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn reregister_if(&self, stale_id: &str) {
        if *self.worker_id.read().await == stale_id {
            tracing::warn!(worker = %stale_id, "the coordinator does not know this worker; registering again");
            self.register().await;
        }
    }

    fn free_devices(&self) -> Vec<String> {
        let running = lock(&self.running);
        self.cfg
            .devices
            .iter()
            .filter(|d| !running.values().any(|r| &r.device == *d))
            .cloned()
            .collect()
    }

    async fn poll_loop(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut delay = Duration::from_millis(100);
        loop {
            let free = self.free_devices();
            if free.is_empty() {
                self.freed.notified().await;
                continue;
            }
            let id = self.worker_id.read().await.clone();
            let mut c = self.client.clone();
            match c
                .poll_task(pb::PollTaskRequest {
                    worker_id: id.clone(),
                    free_devices: free,
                })
                .await
            {
                Ok(r) => {
                    delay = Duration::from_millis(100);
                    for a in r.into_inner().assignments {
                        self.start(a);
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => self.reregister_if(&id).await,
                Err(s) => {
                    tracing::debug!(error = %s.message(), "poll failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        loop {
            let every = *lock(&self.heartbeat);
            tokio::time::sleep(every).await;
            let leases: Vec<pb::LeaseRef> = lock(&self.running)
                .values()
                .map(|r| r.lease.clone())
                .collect();
            if leases.is_empty() {
                continue;
            }
            let id = self.worker_id.read().await.clone();
            let mut c = self.client.clone();
            match c
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: id.clone(),
                    leases,
                })
                .await
            {
                Ok(r) => {
                    for l in r.into_inner().cancelled {
                        if let Some(run) = lock(&self.running).get(&(l.task_id.clone(), l.rank)) {
                            if run.lease.lease_id == l.lease_id {
                                tracing::info!(task = %l.task_id, lease = l.lease_id, "lease revoked; stopping the task");
                                run.cancel.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => self.reregister_if(&id).await,
                Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed"),
            }
        }
    }

    fn start(self: &Arc<Self>, a: pb::TaskAssignment) {
        let Some(lease) = a.lease.clone() else { return };
        let cancel = Arc::new(AtomicBool::new(false));
        let key = (lease.task_id.clone(), lease.rank);
        lock(&self.running).insert(
            key.clone(),
            Running {
                lease: lease.clone(),
                device: a.device.clone(),
                cancel: cancel.clone(),
            },
        );
        let work_dir = self.cfg.work_dir.join("tasks").join(format!(
            "{}-r{}-l{}",
            lease.task_id, lease.rank, lease.lease_id
        ));
        let me = self.clone();
        tracing::info!(task = %lease.task_id, kind = %a.kind, rank = lease.rank, lease = lease.lease_id, device = %a.device, "task started");
        tokio::spawn(async move {
            let ctx = TaskContext {
                rt: tokio::runtime::Handle::current(),
                client: me.client.clone(),
                lease: lease.clone(),
                cancel: cancel.clone(),
                work_dir: work_dir.clone(),
                cache_dir: me.cfg.work_dir.join("cache"),
                coordinator_url: me.cfg.target.url.clone(),
            };
            let runner = me.runner.clone();
            let result = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&ctx.work_dir).map_err(|e| {
                    TaskError::retryable(format!("{}: {e}", ctx.work_dir.display()))
                })?;
                runner.run(&a, &ctx)
            })
            .await
            .unwrap_or_else(|e| Err(TaskError::retryable(format!("the task panicked: {e}"))));
            if cancel.load(Ordering::SeqCst) {
                tracing::info!(task = %lease.task_id, "task stopped: its lease was revoked");
            } else {
                me.report(&lease, result).await;
            }
            let _ = std::fs::remove_dir_all(&work_dir);
            lock(&me.running).remove(&key);
            me.freed.notify_one();
        });
    }

    /// Reports the result, retrying through coordinator restarts; a refused (stale) lease is
    /// dropped, an output the coordinator rejects fails the task without retry.
    async fn report(
        &self,
        lease: &pb::LeaseRef,
        result: Result<crate::runner::TaskOutput, TaskError>,
    ) {
        let mut delay = Duration::from_millis(200);
        let mut result = result;
        if result.as_ref().is_err_and(|e| e.lost) {
            // A broken collective is a symptom: when a peer failed by itself, its report (a
            // failed attempt) must win the race against ours (lost), or a task that fails
            // deterministically would be retried as lost forever. Ours is then refused as stale.
            tokio::time::sleep(LOST_REPORT_GRACE).await;
        }
        for _ in 0..200 {
            let mut c = self.client.clone();
            let r = match &result {
                Ok(out) => c
                    .complete_task(pb::CompleteTaskRequest {
                        lease: Some(lease.clone()),
                        outputs: out.outputs.clone().into_iter().collect(),
                        metrics: out.metrics.clone().into_iter().collect(),
                    })
                    .await
                    .map(|_| ()),
                Err(e) => c
                    .fail_task(pb::FailTaskRequest {
                        lease: Some(lease.clone()),
                        error: e.message.clone(),
                        retryable: e.retryable,
                        lost: e.lost,
                    })
                    .await
                    .map(|_| ()),
            };
            match r {
                Ok(()) => {
                    match &result {
                        Ok(_) => {
                            tracing::info!(task = %lease.task_id, rank = lease.rank, "task completed")
                        }
                        Err(e) => {
                            tracing::warn!(task = %lease.task_id, error = %e.message, "task failed")
                        }
                    }
                    return;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::NotFound
                    ) =>
                {
                    tracing::warn!(task = %lease.task_id, error = %s.message(), "report refused; dropping the result");
                    return;
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument && result.is_ok() => {
                    result = Err(TaskError::fatal(format!(
                        "the coordinator rejected the result: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    tracing::debug!(error = %error_chain(&s), "report failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        tracing::error!(task = %lease.task_id, "gave up reporting; the lease will expire and the task be retried");
    }
}
