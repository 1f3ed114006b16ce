//! Durable state: the [`StateStore`] trait and its two engines, sled ([`SledStore`]) and redb
//! ([`RedbStore`]). One transition is one write transaction over the tables it touches;
//! [`GroupCommit`] makes it durable (one flush for every transition that is waiting), and nothing
//! is acknowledged before that. [`data_dir`] records which engine a data dir holds; [`backup`]
//! is the engine-independent dump that backup, restore and migration share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use distillery_proto::v1 as pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::machine::{Campaign, Lease, Meta, State, Task, Transition, Worker};

pub mod backup;
pub mod data_dir;
mod redb_store;
mod sled_store;

pub use data_dir::{open_data_dir, StoreKind};
pub use redb_store::RedbStore;
pub use sled_store::SledStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    #[error("state store (redb): {0}")]
    Redb(#[from] redb::Error),
    #[error("state store: corrupt record {key:?} in tree {tree}: {message}")]
    Corrupt {
        tree: &'static str,
        key: String,
        message: String,
    },
    #[error("state store: cannot encode record: {0}")]
    Encode(String),
    #[error("state store: {0}")]
    Other(String),
}

/// Where the coordinator keeps its state: sled or redb behind one contract.
pub trait StateStore: Send + Sync + 'static {
    /// Everything persisted, as a state (derived indexes rebuilt).
    fn load(&self) -> Result<State, StoreError>;
    /// Writes the records a transition touched and its events, atomically (not yet durable).
    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError>;
    /// Makes every earlier commit durable.
    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>>;
    /// Events with `seq >= from`, in order, at most `limit`.
    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError>;
    /// Every record of every table, exactly as stored (the bytes, not re-encoded). Unless
    /// [`StateStore::export_is_snapshot`], the caller must not commit meanwhile (the engine holds
    /// its state lock): sled has no snapshot across trees.
    fn export(&self) -> Result<Records, StoreError>;
    /// Whether `export` reads one consistent snapshot even while commits go on (redb's read
    /// transactions do), so a backup need not stop transitions.
    fn export_is_snapshot(&self) -> bool {
        false
    }
    /// Writes `records` into this store, which must be empty, and makes them durable.
    fn import(&self, records: &Records) -> Result<(), StoreError>;
    /// The engine's name, as `--store` spells it.
    fn kind(&self) -> StoreKind;
}

/// Every record of a store, engine-independent: table -> key -> the stored bytes (JSON records;
/// events are protobuf `Event`s keyed by sequence number).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub campaigns: BTreeMap<String, Vec<u8>>,
    pub tasks: BTreeMap<String, Vec<u8>>,
    pub leases: BTreeMap<String, Vec<u8>>,
    pub workers: BTreeMap<String, Vec<u8>>,
    /// The one `meta` record, if written yet.
    pub meta: Option<Vec<u8>>,
    pub events: BTreeMap<u64, Vec<u8>>,
}

/// The keyed JSON tables, in the order backups list them.
pub const KEYED_TABLES: [&str; 4] = ["campaigns", "tasks", "leases", "workers"];

impl Records {
    /// The keyed JSON table called `name` (one of [`KEYED_TABLES`]).
    pub fn keyed(&self, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        match name {
            "campaigns" => Some(&self.campaigns),
            "tasks" => Some(&self.tasks),
            "leases" => Some(&self.leases),
            "workers" => Some(&self.workers),
            _ => None,
        }
    }

    pub fn keyed_mut(&mut self, name: &str) -> Option<&mut BTreeMap<String, Vec<u8>>> {
        match name {
            "campaigns" => Some(&mut self.campaigns),
            "tasks" => Some(&mut self.tasks),
            "leases" => Some(&mut self.leases),
            "workers" => Some(&mut self.workers),
            _ => None,
        }
    }

    /// How many records in all (meta counts as one when present).
    pub fn len(&self) -> usize {
        self.campaigns.len()
            + self.tasks.len()
            + self.leases.len()
            + self.workers.len()
            + usize::from(self.meta.is_some())
            + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes every record, as `load` would (errors name the table and key), and every event.
    pub fn to_state(&self) -> Result<(State, Vec<pb::Event>), StoreError> {
        fn table<T: serde::de::DeserializeOwned>(
            name: &'static str,
            t: &BTreeMap<String, Vec<u8>>,
        ) -> Result<BTreeMap<String, T>, StoreError> {
            t.iter()
                .map(|(k, v)| Ok((k.clone(), decode(name, k.as_bytes(), v)?)))
                .collect()
        }
        let meta: Meta = match &self.meta {
            Some(v) => decode("meta", META_KEY.as_bytes(), v)?,
            None => Meta::default(),
        };
        let state = State::from_parts(
            table::<Campaign>("campaigns", &self.campaigns)?,
            table::<Task>("tasks", &self.tasks)?,
            table::<Lease>("leases", &self.leases)?,
            table::<Worker>("workers", &self.workers)?,
            meta,
        );
        let events = self
            .events
            .iter()
            .map(|(seq, v)| decode_event(&seq.to_be_bytes(), v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((state, events))
    }
}

/// The key of the one record in the `meta` table.
pub(crate) const META_KEY: &str = "meta";

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
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

pub(crate) fn decode_event(key: &[u8], v: &[u8]) -> Result<pb::Event, StoreError> {
    pb::Event::decode(v).map_err(|e| StoreError::Corrupt {
        tree: "events",
        key: hex::encode(key),
        message: e.to_string(),
    })
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Encoded writes of one keyed table: key -> Some(value) to insert, None to remove.
pub(crate) type Writes = Vec<(String, Option<Vec<u8>>)>;

fn writes<T: serde::Serialize>(
    ids: &BTreeSet<String>,
    map: &BTreeMap<String, T>,
) -> Result<Writes, StoreError> {
    ids.iter()
        .map(|id| Ok((id.clone(), map.get(id).map(encode).transpose()?)))
        .collect()
}

/// A transition's writes, encoded once, before any engine transaction (sled may run its
/// closure more than once): per keyed table in [`KEYED_TABLES`] order, the meta record if
/// dirty, and the events keyed by big-endian sequence number.
pub(crate) struct EncodedTransition {
    pub keyed: [(&'static str, Writes); 4],
    pub meta: Option<Vec<u8>>,
    pub events: Vec<(u64, Vec<u8>)>,
}

impl EncodedTransition {
    /// `None` when the transition wrote nothing.
    pub fn new(state: &State, t: &Transition) -> Result<Option<EncodedTransition>, StoreError> {
        let d = &t.dirty;
        if d.is_empty() && t.events.is_empty() {
            return Ok(None);
        }
        Ok(Some(EncodedTransition {
            keyed: [
                ("campaigns", writes(&d.campaigns, &state.campaigns)?),
                ("tasks", writes(&d.tasks, &state.tasks)?),
                ("leases", writes(&d.leases, &state.leases)?),
                ("workers", writes(&d.workers, &state.workers)?),
            ],
            meta: if d.meta {
                Some(encode(&state.meta)?)
            } else {
                None
            },
            events: t
                .events
                .iter()
                .map(|e| (e.seq, e.encode_to_vec()))
                .collect(),
        }))
    }
}

/// Group commit: callers that committed wait here until a flush that started after their
/// commit has finished; one flush serves every caller that queued while the previous ran. A
/// failed flush is final: every later caller gets its error (nothing committed after it can be
/// made durable on top of a write that may be lost), and [`GroupCommit::failed`] says so even
/// when no caller was waiting any more (a cancelled request).
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
    failed: tokio::sync::watch::Receiver<Option<String>>,
}

impl GroupCommit {
    /// Starts the flusher task for `store` on the current runtime.
    pub fn start(store: Arc<dyn StateStore>) -> GroupCommit {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let (failed_tx, failed) = tokio::sync::watch::channel(None::<String>);
        tokio::spawn(async move {
            let mut failure: Option<String> = None;
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let res = match &failure {
                    Some(e) => Err(e.clone()),
                    None => store.flush().await.map_err(|e| e.to_string()),
                };
                if let (Err(e), None) = (&res, &failure) {
                    failure = Some(e.clone());
                    let _ = failed_tx.send(Some(e.clone()));
                }
                for w in batch {
                    let _ = w.send(res.clone());
                }
            }
        });
        GroupCommit { tx, failed }
    }

    /// Changes once, to the first flush error.
    pub fn failed(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failed.clone()
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
mod tests;
