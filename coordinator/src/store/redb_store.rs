//! The redb engine: one file, tables `campaigns`, `tasks`, `leases`, `workers`, `meta` (string
//! keys, JSON values) and `events` (u64 sequence number, protobuf `Event`).
//!
//! Durability follows the same contract as sled's: a transition is one write transaction
//! committed with `Durability::None` (atomic and visible, not yet on disk), and `flush` commits
//! an empty transaction with `Durability::Immediate`, which redb defines as making every earlier
//! non-durable commit durable with it (one fsync for the whole group). So group commit works
//! as with sled, and nothing is acknowledged before it is on disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use distillery_proto::v1 as pb;
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{decode, decode_event, EncodedTransition, Records, StateStore, StoreError, StoreKind};
use crate::machine::{Meta, State, Transition};

const CAMPAIGNS: TableDefinition<&str, &[u8]> = TableDefinition::new("campaigns");
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

fn keyed_def(name: &str) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match name {
        "campaigns" => CAMPAIGNS,
        "tasks" => TASKS,
        "leases" => LEASES,
        _ => WORKERS,
    }
}

/// Any redb error, as a store error.
fn rdb<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Redb(e.into())
}

/// redb-backed store: one database file.
pub struct RedbStore {
    db: Arc<redb::Database>,
}

impl RedbStore {
    /// Opens (or creates) the store in the file `path`. Fails with redb's "Database already
    /// open" when another process holds it.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| rdb(redb::StorageError::Io(e)))?;
        }
        let db = redb::Database::create(path).map_err(rdb)?;
        // Create every table once, so readers never meet a missing one.
        let tx = db.begin_write().map_err(rdb)?;
        for def in [CAMPAIGNS, TASKS, LEASES, WORKERS, META] {
            tx.open_table(def).map_err(rdb)?;
        }
        tx.open_table(EVENTS).map_err(rdb)?;
        tx.commit().map_err(rdb)?;
        Ok(RedbStore { db: Arc::new(db) })
    }

    fn read_keyed(
        tx: &redb::ReadTransaction,
        name: &'static str,
    ) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let t = tx.open_table(keyed_def(name)).map_err(rdb)?;
        let mut out = BTreeMap::new();
        for kv in t.iter().map_err(rdb)? {
            let (k, v) = kv.map_err(rdb)?;
            out.insert(k.value().to_string(), v.value().to_vec());
        }
        Ok(out)
    }

    fn read_meta(tx: &redb::ReadTransaction) -> Result<Option<Vec<u8>>, StoreError> {
        let t = tx.open_table(META).map_err(rdb)?;
        let v = t.get(super::META_KEY).map_err(rdb)?;
        Ok(v.map(|v| v.value().to_vec()))
    }
}

impl StateStore for RedbStore {
    fn load(&self) -> Result<State, StoreError> {
        fn typed<T: serde::de::DeserializeOwned>(
            tx: &redb::ReadTransaction,
            name: &'static str,
        ) -> Result<BTreeMap<String, T>, StoreError> {
            RedbStore::read_keyed(tx, name)?
                .into_iter()
                .map(|(k, v)| {
                    let t = decode(name, k.as_bytes(), &v)?;
                    Ok((k, t))
                })
                .collect()
        }
        let tx = self.db.begin_read().map_err(rdb)?;
        let meta: Meta = match Self::read_meta(&tx)? {
            Some(v) => decode("meta", super::META_KEY.as_bytes(), &v)?,
            None => Meta::default(),
        };
        Ok(State::from_parts(
            typed(&tx, "campaigns")?,
            typed(&tx, "tasks")?,
            typed(&tx, "leases")?,
            typed(&tx, "workers")?,
            meta,
        ))
    }

    fn commit(&self, state: &State, t: &Transition) -> Result<(), StoreError> {
        let Some(enc) = EncodedTransition::new(state, t)? else {
            return Ok(());
        };
        let mut tx = self.db.begin_write().map_err(rdb)?;
        // Not durable yet: `flush` makes it so, for the whole group at once.
        tx.set_durability(Durability::None).map_err(rdb)?;
        for (name, ws) in &enc.keyed {
            if ws.is_empty() {
                continue;
            }
            let mut table = tx.open_table(keyed_def(name)).map_err(rdb)?;
            for (k, v) in ws {
                match v {
                    Some(v) => {
                        table.insert(k.as_str(), v.as_slice()).map_err(rdb)?;
                    }
                    None => {
                        table.remove(k.as_str()).map_err(rdb)?;
                    }
                }
            }
        }
        if !enc.events.is_empty() {
            let mut table = tx.open_table(EVENTS).map_err(rdb)?;
            for (seq, v) in &enc.events {
                table.insert(*seq, v.as_slice()).map_err(rdb)?;
            }
        }
        if let Some(m) = &enc.meta {
            let mut table = tx.open_table(META).map_err(rdb)?;
            table.insert(super::META_KEY, m.as_slice()).map_err(rdb)?;
        }
        tx.commit().map_err(rdb)
    }

    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), StoreError>> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                // An empty durable commit persists every non-durable commit before it.
                let mut tx = db.begin_write().map_err(rdb)?;
                tx.set_durability(Durability::Immediate).map_err(rdb)?;
                tx.commit().map_err(rdb)
            })
            .await
            .map_err(|e| StoreError::Other(format!("flush thread: {e}")))?
        })
    }

    fn events_from(&self, from: u64, limit: usize) -> Result<Vec<pb::Event>, StoreError> {
        let tx = self.db.begin_read().map_err(rdb)?;
        let t = tx.open_table(EVENTS).map_err(rdb)?;
        let mut out = Vec::new();
        for kv in t.range(from..).map_err(rdb)?.take(limit) {
            let (k, v) = kv.map_err(rdb)?;
            out.push(decode_event(&k.value().to_be_bytes(), v.value())?);
        }
        Ok(out)
    }

    fn export(&self) -> Result<Records, StoreError> {
        // One read transaction: a consistent snapshot even with commits going on.
        let tx = self.db.begin_read().map_err(rdb)?;
        let mut r = Records {
            meta: Self::read_meta(&tx)?,
            ..Records::default()
        };
        for name in super::KEYED_TABLES {
            if let Some(t) = r.keyed_mut(name) {
                *t = Self::read_keyed(&tx, name)?;
            }
        }
        let t = tx.open_table(EVENTS).map_err(rdb)?;
        for kv in t.iter().map_err(rdb)? {
            let (k, v) = kv.map_err(rdb)?;
            r.events.insert(k.value(), v.value().to_vec());
        }
        Ok(r)
    }

    fn export_is_snapshot(&self) -> bool {
        true
    }

    fn import(&self, records: &Records) -> Result<(), StoreError> {
        if !self.export()?.is_empty() {
            return Err(StoreError::Other(
                "cannot import into a store that holds records".into(),
            ));
        }
        let mut tx = self.db.begin_write().map_err(rdb)?;
        tx.set_durability(Durability::Immediate).map_err(rdb)?;
        for name in super::KEYED_TABLES {
            let mut table = tx.open_table(keyed_def(name)).map_err(rdb)?;
            if let Some(t) = records.keyed(name) {
                for (k, v) in t {
                    table.insert(k.as_str(), v.as_slice()).map_err(rdb)?;
                }
            }
        }
        {
            let mut table = tx.open_table(EVENTS).map_err(rdb)?;
            for (seq, v) in &records.events {
                table.insert(*seq, v.as_slice()).map_err(rdb)?;
            }
        }
        if let Some(m) = &records.meta {
            let mut table = tx.open_table(META).map_err(rdb)?;
            table.insert(super::META_KEY, m.as_slice()).map_err(rdb)?;
        }
        tx.commit().map_err(rdb)
    }

    fn kind(&self) -> StoreKind {
        StoreKind::Redb
    }
}
