//! The sled engine: trees `campaigns`, `tasks`, `leases`, `workers`, `events`, `meta`; one sled
//! transaction per transition, made durable by `flush` (sled commits are not durable alone).

use std::collections::BTreeMap;
use std::path::Path;

use distillery_proto::v1 as pb;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{
    decode, decode_event, EncodedTransition, Records, StateStore, StoreError, StoreKind, META_KEY,
};
use crate::machine::{Campaign, Lease, Meta, State, Task, Transition, Worker};

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

impl SledStore {
    /// Opens (or creates) the store in the directory `dir`.
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

    fn keyed(&self, name: &str) -> &sled::Tree {
        match name {
            "campaigns" => &self.campaigns,
            "tasks" => &self.tasks,
            "leases" => &self.leases,
            _ => &self.workers,
        }
    }
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

fn raw_tree(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let mut out = BTreeMap::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt {
            tree: name,
            key: hex::encode(&k),
            message: "key is not UTF-8".into(),
        })?;
        out.insert(key, v.to_vec());
    }
    Ok(out)
}

impl StateStore for SledStore {
    fn load(&self) -> Result<State, StoreError> {
        let campaigns: BTreeMap<String, Campaign> = load_tree(&self.campaigns, "campaigns")?;
        let tasks: BTreeMap<String, Task> = load_tree(&self.tasks, "tasks")?;
        let leases: BTreeMap<String, Lease> = load_tree(&self.leases, "leases")?;
        let workers: BTreeMap<String, Worker> = load_tree(&self.workers, "workers")?;
        let meta: Meta = match self.meta.get(META_KEY)? {
            Some(v) => decode("meta", META_KEY.as_bytes(), &v)?,
            None => Meta::default(),
        };
        Ok(State::from_parts(campaigns, tasks, leases, workers, meta))
    }

    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError> {
        // Encoded outside the transaction closure, which sled may run more than once.
        let Some(enc) = EncodedTransition::new(state, t)? else {
            return Ok(());
        };
        let events: Vec<([u8; 8], &[u8])> = enc
            .events
            .iter()
            .map(|(seq, v)| (seq.to_be_bytes(), v.as_slice()))
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
                for (tree, (_, ws)) in [tc, tt, tl, tw].into_iter().zip(&enc.keyed) {
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
                    te.insert(&k[..], *v)?;
                }
                if let Some(m) = &enc.meta {
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
                .map_err(|e| StoreError::Other(format!("flush thread: {e}")))??;
            Ok(())
        })
    }

    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError> {
        let mut out = Vec::new();
        for kv in self.events.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = kv?;
            out.push(decode_event(&k, &v)?);
        }
        Ok(out)
    }

    fn export(&self) -> Result<Records, StoreError> {
        let mut r = Records {
            campaigns: raw_tree(&self.campaigns, "campaigns")?,
            tasks: raw_tree(&self.tasks, "tasks")?,
            leases: raw_tree(&self.leases, "leases")?,
            workers: raw_tree(&self.workers, "workers")?,
            meta: self.meta.get(META_KEY)?.map(|v| v.to_vec()),
            events: BTreeMap::new(),
        };
        for kv in self.events.iter() {
            let (k, v) = kv?;
            let seq: [u8; 8] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                tree: "events",
                key: hex::encode(&k),
                message: "key is not an 8-byte sequence number".into(),
            })?;
            r.events.insert(u64::from_be_bytes(seq), v.to_vec());
        }
        Ok(r)
    }

    fn import(&self, records: &Records) -> Result<(), StoreError> {
        if self.holds_records() {
            return Err(StoreError::Other(
                "cannot import into a store that holds records".into(),
            ));
        }
        // A fresh store nobody else uses: batches per tree, then one flush. The data dir is
        // only marked complete after this returns (see `backup::restore`).
        for name in super::KEYED_TABLES {
            let mut b = sled::Batch::default();
            if let Some(t) = records.keyed(name) {
                for (k, v) in t {
                    b.insert(k.as_bytes(), v.as_slice());
                }
            }
            self.keyed(name).apply_batch(b)?;
        }
        let mut b = sled::Batch::default();
        for (seq, v) in &records.events {
            b.insert(&seq.to_be_bytes()[..], v.as_slice());
        }
        self.events.apply_batch(b)?;
        if let Some(m) = &records.meta {
            self.meta.insert(META_KEY, m.as_slice())?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn kind(&self) -> StoreKind {
        StoreKind::Sled
    }
}

impl SledStore {
    fn holds_records(&self) -> bool {
        [
            &self.campaigns,
            &self.tasks,
            &self.leases,
            &self.workers,
            &self.events,
            &self.meta,
        ]
        .iter()
        .any(|t| !t.is_empty())
    }
}
