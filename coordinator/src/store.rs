//! Durable state: the [`StateStore`] trait and its sled implementation. One transition is one
//! sled transaction over the trees it touches; [`GroupCommit`] makes it durable (one flush for
//! every transition that is waiting), and nothing is acknowledged before that.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use distillery_proto::v1 as pb;
use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{mpsc, oneshot};

use crate::machine::{Campaign, Lease, Meta, State, Task, Transition, Worker};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store: corrupt record {key:?} in tree {tree}: {message}")]
    Corrupt {
        tree: &'static str,
        key: String,
        message: String,
    },
    #[error("state store: cannot encode record: {0}")]
    Encode(String),
}

/// Where the coordinator keeps its state. sled today; the trait lets another engine replace it.
pub trait StateStore: Send + Sync + 'static {
    /// Everything persisted, as a state (derived indexes rebuilt).
    fn load(&self) -> Result<State, StoreError>;
    /// Writes the records a transition touched and its events, atomically (not yet durable).
    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError>;
    /// Makes every earlier commit durable.
    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>>;
    /// Events with `seq >= from`, in order, at most `limit`.
    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError>;
}

/// sled-backed store with trees `campaigns`, `tasks`, `leases`, `workers`, `events`, `meta`.
pub struct SledStore {
    db: sled::Db,
    campaigns: sled::Tree,
    tasks: sled::Tree,
    leases: sled::Tree,
    workers: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
}

const META_KEY: &[u8] = b"meta";

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(SledStore {
            campaigns: db.open_tree("campaigns")?,
            tasks: db.open_tree("tasks")?,
            leases: db.open_tree("leases")?,
            workers: db.open_tree("workers")?,
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn load_tree<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<BTreeMap<String, T>, StoreError> {
    let mut out = BTreeMap::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        out.insert(
            String::from_utf8_lossy(&k).into_owned(),
            decode(name, &k, &v)?,
        );
    }
    Ok(out)
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Encoded writes of one transition: key -> Some(value) to insert, None to remove.
type Writes = Vec<(String, Option<Vec<u8>>)>;

fn writes<T: serde::Serialize>(
    ids: &std::collections::BTreeSet<String>,
    map: &BTreeMap<String, T>,
) -> Result<Writes, StoreError> {
    ids.iter()
        .map(|id| Ok((id.clone(), map.get(id).map(encode).transpose()?)))
        .collect()
}

impl StateStore for SledStore {
    fn load(&self) -> Result<State, StoreError> {
        let campaigns: BTreeMap<String, Campaign> = load_tree(&self.campaigns, "campaigns")?;
        let tasks: BTreeMap<String, Task> = load_tree(&self.tasks, "tasks")?;
        let leases: BTreeMap<String, Lease> = load_tree(&self.leases, "leases")?;
        let workers: BTreeMap<String, Worker> = load_tree(&self.workers, "workers")?;
        let meta: Meta = match self.meta.get(META_KEY)? {
            Some(v) => decode("meta", META_KEY, &v)?,
            None => Meta::default(),
        };
        Ok(State::from_parts(campaigns, tasks, leases, workers, meta))
    }

    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError> {
        let d = &t.dirty;
        if d.is_empty() && t.events.is_empty() {
            return Ok(());
        }
        // Encode outside the transaction closure, which sled may run more than once.
        let campaigns = writes(&d.campaigns, &state.campaigns)?;
        let tasks = writes(&d.tasks, &state.tasks)?;
        let leases = writes(&d.leases, &state.leases)?;
        let workers = writes(&d.workers, &state.workers)?;
        let meta = if d.meta {
            Some(encode(&state.meta)?)
        } else {
            None
        };
        let events: Vec<([u8; 8], Vec<u8>)> = t
            .events
            .iter()
            .map(|e| (e.seq.to_be_bytes(), e.encode_to_vec()))
            .collect();
        let res: Result<(), TransactionError<()>> = (
            &self.campaigns,
            &self.tasks,
            &self.leases,
            &self.workers,
            &self.events,
            &self.meta,
        )
            .transaction(|(tc, tt, tl, tw, te, tm)| {
                for (tree, ws) in [
                    (tc, &campaigns),
                    (tt, &tasks),
                    (tl, &leases),
                    (tw, &workers),
                ] {
                    for (k, v) in ws.iter() {
                        match v {
                            Some(v) => {
                                tree.insert(k.as_bytes(), v.as_slice())?;
                            }
                            None => {
                                tree.remove(k.as_bytes())?;
                            }
                        }
                    }
                }
                for (k, v) in &events {
                    te.insert(&k[..], v.as_slice())?;
                }
                if let Some(m) = &meta {
                    tm.insert(META_KEY, m.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match res {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => {
                Err(StoreError::Encode("transaction aborted".into()))
            }
        }
    }

    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        // sled 0.34's `flush_async` can deadlock (spacejam/sled#1308); the synchronous flush on
        // a blocking thread does not, and group commit keeps it to one flush at a time.
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || db.flush())
                .await
                .map_err(|e| StoreError::Encode(format!("flush thread: {e}")))??;
            Ok(())
        })
    }

    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError> {
        let mut out = Vec::new();
        for kv in self.events.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = kv?;
            let e = pb::Event::decode(v.as_ref()).map_err(|e| StoreError::Corrupt {
                tree: "events",
                key: hex::encode(&k),
                message: e.to_string(),
            })?;
            out.push(e);
        }
        Ok(out)
    }
}

/// Group commit: callers that committed wait here until a flush that started after their
/// commit has finished; one flush serves every caller that queued while the previous ran.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl GroupCommit {
    /// Starts the flusher task for `store` on the current runtime.
    pub fn start(store: Arc<dyn StateStore>) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let res = store.flush().await.map_err(|e| e.to_string());
                for w in batch {
                    let _ = w.send(res.clone());
                }
            }
        });
        GroupCommit { tx }
    }

    /// Returns once everything committed before this call is durable.
    pub async fn durable(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| "the flusher has stopped".to_string())?;
        rx.await
            .map_err(|_| "the flusher has stopped".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{apply, Config, Event};

    #[tokio::test]
    async fn a_committed_transition_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let (worker, seqs) = {
            let store = SledStore::open(dir.path()).unwrap();
            let mut st = store.load().unwrap();
            let t = apply(
                &mut st,
                &cfg,
                Event::Register {
                    host: "h".into(),
                    devices: vec!["cpu".into()],
                    device_memory: vec![24 << 30],
                    labels: Default::default(),
                    version: "0".into(),
                    task_kinds: vec![],
                    nonce: 0,
                    previous: None,
                    now: 5,
                },
            )
            .unwrap();
            store.commit(&st, &t).unwrap();
            store.flush().await.unwrap();
            (st.workers.keys().next().cloned().unwrap(), st.meta.clone())
        };
        let store = SledStore::open(dir.path()).unwrap();
        let st = store.load().unwrap();
        assert!(st.workers.contains_key(&worker));
        // The device's memory survives a restart (submit checks against it).
        assert_eq!(st.workers[&worker].device_memory, vec![24u64 << 30]);
        assert_eq!(st.meta, seqs);
    }
}
