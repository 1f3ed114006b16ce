//! The shell around the pure state machine: one mutex serializes transitions, each is
//! committed to the store under it, made durable by group commit outside it, and only then are
//! its replies and effects (poll answers, rendezvous releases, watch notifications) released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distillery_proto::v1 as pb;
use tokio::sync::{oneshot, watch};

use crate::machine::{self, Config, Effect, Event, MachineError, Millis, Reply, State};
use crate::store::{GroupCommit, Records, StateStore, StoreError};

/// Wall-clock milliseconds (the only clock; the machine gets time through events).
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A write to the state store failed just now, or earlier (the engine is poisoned): the
    /// message names the first failure.
    #[error("the coordinator's state store could not be written ({0}); it refuses every request until it is restarted on the same --data-dir (free disk space or fix the I/O error first): the state it restarts with is what was acknowledged")]
    Store(String),
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> tonic::Status {
        match &e {
            EngineError::Machine(m) => match m {
                MachineError::UnknownCampaign(_)
                | MachineError::UnknownTask(_)
                | MachineError::UnknownWorker(_) => tonic::Status::not_found(e.to_string()),
                MachineError::StaleLease { .. } | MachineError::InvalidState(_) => {
                    tonic::Status::failed_precondition(e.to_string())
                }
                MachineError::InvalidArgument(_) => tonic::Status::invalid_argument(e.to_string()),
                MachineError::ResourceExhausted(_) => {
                    tonic::Status::resource_exhausted(e.to_string())
                }
            },
            EngineError::Store(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

type RendezvousKey = (String, u64, String);
/// A worker's pending long poll: its poll number and where to send the answer.
type PollWaiter = (u64, oneshot::Sender<Vec<pb::TaskAssignment>>);
type RendezvousWaiters = HashMap<RendezvousKey, Vec<oneshot::Sender<Vec<Vec<u8>>>>>;

/// Shared coordinator state and the machinery to change it durably.
pub struct Engine {
    state: Mutex<State>,
    cfg: Config,
    store: Arc<dyn StateStore>,
    commit: GroupCommit,
    poll_waiters: Mutex<HashMap<String, PollWaiter>>,
    rendezvous_waiters: Mutex<RendezvousWaiters>,
    next_poll: AtomicU64,
    /// Highest event sequence number that is durable.
    durable_seq: watch::Sender<u64>,
    /// The first store failure, once one happened: from then on memory may be ahead of disk,
    /// so nothing is served (changes, reads, streams) until a restart reloads from disk.
    poisoned: watch::Sender<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock would be a bug; the data is still the last good state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the shell must deliver after the transition is durable.
enum Delivery {
    Poll(String, Vec<pb::TaskAssignment>),
    Rendezvous(RendezvousKey, Vec<Vec<u8>>),
}

impl Engine {
    /// Loads the store and recovers (expires overdue leases, grants the rest a fresh timeout).
    pub async fn open(store: Arc<dyn StateStore>, cfg: Config) -> Result<Arc<Engine>, StoreError> {
        let state = store.load()?;
        let seq = state.meta.last_seq;
        let commit = GroupCommit::start(store.clone());
        let (durable_seq, _) = watch::channel(seq);
        let engine = Arc::new(Engine {
            state: Mutex::new(state),
            cfg,
            store,
            commit,
            poll_waiters: Mutex::new(HashMap::new()),
            rendezvous_waiters: Mutex::new(HashMap::new()),
            next_poll: AtomicU64::new(0),
            durable_seq,
            poisoned: watch::channel(None).0,
        });
        // A failed flush poisons the engine even when every request that waited for it was
        // cancelled meanwhile (nobody else would then see the error).
        let mut failed = engine.commit.failed();
        let weak = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let cause = match failed.wait_for(|f| f.is_some()).await {
                Ok(f) => f.clone(),
                Err(_) => None,
            };
            if let (Some(cause), Some(engine)) = (cause, weak.upgrade()) {
                engine.poison(format!("flush: {cause}"));
            }
        });
        engine
            .apply(Event::Recover { now: now_ms() })
            .await
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        Ok(engine)
    }

    /// Marks the engine poisoned by `cause` (the first cause is kept) and wakes every stream, so
    /// watchers end with the error instead of waiting. Returns the error to answer with.
    fn poison(&self, cause: String) -> EngineError {
        tracing::error!(error = %cause, "state store write failed: refusing every request until restarted");
        self.poisoned.send_if_modified(|p| {
            if p.is_none() {
                *p = Some(cause.clone());
                true
            } else {
                false
            }
        });
        self.durable_seq.send_modify(|_| {});
        let first = self.poisoned.borrow().clone().unwrap_or(cause);
        EngineError::Store(first)
    }

    /// `Err` (UNAVAILABLE, naming the store failure) once a store write failed: the in-memory
    /// state may then hold what the disk does not, so it is neither changed nor shown.
    pub fn ensure_serving(&self) -> Result<(), EngineError> {
        match &*self.poisoned.borrow() {
            Some(cause) => Err(EngineError::Store(cause.clone())),
            None => Ok(()),
        }
    }

    /// A receiver that changes once, when the engine is poisoned (health turns NOT_SERVING).
    pub fn subscribe_poisoned(&self) -> watch::Receiver<Option<String>> {
        self.poisoned.subscribe()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Reads the state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&lock(&self.state))
    }

    /// Every record of the store, as one consistent snapshot: read between two transitions
    /// (redb: one read transaction while transitions go on; sled: under the state lock, so its
    /// trees agree with each other) and returned only once durable (a group-commit flush that
    /// started after the read), so a backup never holds what a crash could still take back.
    pub async fn backup(&self) -> Result<Records, EngineError> {
        let records = if self.store.export_is_snapshot() {
            self.store.export()
        } else {
            let _st = lock(&self.state);
            self.store.export()
        }
        .map_err(|e| EngineError::Store(e.to_string()))?;
        self.commit
            .durable()
            .await
            .map_err(|e| self.poison(format!("flush: {e}")))?;
        Ok(records)
    }

    /// A receiver of the durable event watermark.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable_seq.subscribe()
    }

    /// Applies an event: transition, commit, durable, then deliveries. Returns the reply.
    pub async fn apply(&self, event: Event) -> Result<Reply, EngineError> {
        let (reply, deliveries, last_seq, wrote) = {
            let mut st = lock(&self.state);
            // Checked under the lock: a transition that queued behind the failing one must not
            // build on its unwritten state.
            self.ensure_serving()?;
            let t = machine::apply(&mut st, &self.cfg, event)?;
            let wrote = !(t.dirty.is_empty() && t.events.is_empty());
            if wrote {
                if let Err(e) = self.store.commit(&st, &t) {
                    // Memory is now ahead of disk: refuse everything until a restart reloads.
                    return Err(self.poison(format!("commit: {e}")));
                }
            }
            let deliveries = t
                .effects
                .into_iter()
                .map(|e| self.prepare(&st, e))
                .collect::<Vec<_>>();
            (t.reply, deliveries, st.meta.last_seq, wrote)
        };
        if wrote {
            if let Err(e) = self.commit.durable().await {
                return Err(self.poison(format!("flush: {e}")));
            }
            // A flush that succeeded after another transition's write failed may hold state
            // built on that write: acknowledge nothing once poisoned.
            self.ensure_serving()?;
            self.durable_seq.send_if_modified(|s| {
                if last_seq > *s {
                    *s = last_seq;
                    true
                } else {
                    false
                }
            });
        }
        for d in deliveries {
            self.deliver(d);
        }
        Ok(reply)
    }

    fn prepare(&self, st: &State, effect: Effect) -> Delivery {
        match effect {
            Effect::Assign {
                worker,
                assignments,
            } => {
                let msgs = assignments
                    .into_iter()
                    .filter_map(|a| assignment_message(st, a))
                    .collect();
                Delivery::Poll(worker, msgs)
            }
            Effect::RendezvousReady {
                task_id,
                lease_id,
                key,
                payloads,
            } => Delivery::Rendezvous((task_id, lease_id, key), payloads),
        }
    }

    fn deliver(&self, d: Delivery) {
        match d {
            Delivery::Poll(worker, msgs) => {
                if let Some((_, tx)) = lock(&self.poll_waiters).remove(&worker) {
                    if tx.send(msgs).is_err() {
                        tracing::warn!(%worker, "poll answer lost: the lease will expire and be retried");
                    }
                }
            }
            Delivery::Rendezvous(key, payloads) => {
                if let Some(ws) = lock(&self.rendezvous_waiters).remove(&key) {
                    for w in ws {
                        let _ = w.send(payloads.clone());
                    }
                }
            }
        }
    }

    /// Long poll: registers the worker as waiting and answers with its assignments, or with
    /// none after `timeout`.
    pub async fn poll(
        &self,
        worker: String,
        free: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<pb::TaskAssignment>, EngineError> {
        let id = self.next_poll.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = oneshot::channel();
        lock(&self.poll_waiters).insert(worker.clone(), (id, tx));
        if let Err(e) = self
            .apply(Event::Poll {
                worker: worker.clone(),
                free_devices: free,
                now: now_ms(),
            })
            .await
        {
            self.drop_waiter(&worker, id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(_)) => Ok(Vec::new()), // replaced by a newer poll of the same worker
            Err(_) => {
                let reply = self
                    .apply(Event::PollWithdrawn {
                        worker: worker.clone(),
                    })
                    .await?;
                if reply == Reply::StillWaiting(false) {
                    // Assigned just now: the answer is on its way once durable.
                    if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(10), rx).await {
                        return Ok(a);
                    }
                }
                self.drop_waiter(&worker, id);
                Ok(Vec::new())
            }
        }
    }

    fn drop_waiter(&self, worker: &str, id: u64) {
        let mut w = lock(&self.poll_waiters);
        if w.get(worker).is_some_and(|(i, _)| *i == id) {
            w.remove(worker);
        }
    }

    /// Gang barrier: answers once every rank has sent its payload for `key`, or `None` after
    /// `timeout` (the caller retries; payloads are durable).
    pub async fn rendezvous(
        &self,
        lease: machine::LeaseRef,
        key: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<Vec<u8>>>, EngineError> {
        let wkey = (lease.task_id.clone(), lease.lease_id, key.clone());
        let (tx, rx) = oneshot::channel();
        lock(&self.rendezvous_waiters)
            .entry(wkey.clone())
            .or_default()
            .push(tx);
        match self
            .apply(Event::Rendezvous {
                lease,
                key,
                payload,
                now: now_ms(),
            })
            .await?
        {
            Reply::Rendezvous(Some(p)) => Ok(Some(p)),
            _ => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(p)) => Ok(Some(p)),
                _ => {
                    let mut w = lock(&self.rendezvous_waiters);
                    if let Some(v) = w.get_mut(&wkey) {
                        v.retain(|s| !s.is_closed());
                        if v.is_empty() {
                            w.remove(&wkey);
                        }
                    }
                    Ok(None)
                }
            },
        }
    }

    /// Periodic tick: lease expiry and retries whose backoff ended.
    pub fn spawn_ticker(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(every);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                iv.tick().await;
                let Some(e) = me.upgrade() else { break };
                if e.ensure_serving().is_err() {
                    // Logged once, when it was poisoned.
                    continue;
                }
                if let Err(err) = e.apply(Event::Tick { now: now_ms() }).await {
                    tracing::error!(error = %err, "tick failed");
                }
            }
        })
    }
}

/// The wire form of an assignment, from the task it names.
fn assignment_message(st: &State, a: machine::Assignment) -> Option<pb::TaskAssignment> {
    let task = st.tasks.get(&a.task_id)?;
    let campaign = st.campaigns.get(&task.campaign)?;
    Some(pb::TaskAssignment {
        lease: Some(pb::LeaseRef {
            task_id: a.task_id.clone(),
            lease_id: a.lease_id,
            rank: a.rank,
        }),
        campaign_id: a.campaign,
        kind: task.kind.clone(),
        round: task.round,
        attempt: task.attempts,
        spec: Some(campaign.spec.clone()),
        inputs: task.inputs.clone().into_iter().collect(),
        params: task.params.clone().into_iter().collect(),
        gang: Some(pb::GangInfo {
            gang_id: a.task_id,
            rank: a.rank,
            world_size: a.world_size,
        }),
        device: a.device,
        resume_checkpoint: task.checkpoint.clone().unwrap_or_default(),
    })
}
