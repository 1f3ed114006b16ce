//! Which engine a data dir holds, and opening it. The engine is recorded in the file
//! `store-engine` (`sled` or `redb`), written before the store is created, so a data dir is never
//! opened with the other engine (which would show an empty store): that is one clear error.
//! A data dir from before the record existed holds sled's `state/` directory and is read as sled.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{RedbStore, SledStore, StateStore, StoreError};

/// The file that records the engine.
pub const ENGINE_FILE: &str = "store-engine";
/// Present while a restore or migration writes into the data dir; removed when it is complete.
pub const INCOMPLETE_FILE: &str = "store-incomplete";
/// Written by `serve`: the URL the coordinator that serves this data dir listens on (what an
/// online `coordinator backup --data-dir` calls).
pub const SERVE_URL_FILE: &str = "serve-url";

/// A store engine, as `--store` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sled,
    Redb,
}

impl StoreKind {
    /// The engine of a fresh data dir when `--store` is not given (README, "Store engines").
    pub const DEFAULT: StoreKind = StoreKind::Redb;

    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sled => "sled",
            StoreKind::Redb => "redb",
        }
    }

    pub fn parse(s: &str) -> Option<StoreKind> {
        match s {
            "sled" => Some(StoreKind::Sled),
            "redb" => Some(StoreKind::Redb),
            _ => None,
        }
    }

    pub fn other(self) -> StoreKind {
        match self {
            StoreKind::Sled => StoreKind::Redb,
            StoreKind::Redb => StoreKind::Sled,
        }
    }

    /// Where this engine keeps its store inside a data dir (a directory for sled, a file for
    /// redb).
    pub fn store_path(self, data_dir: &Path) -> PathBuf {
        match self {
            StoreKind::Sled => data_dir.join("state"),
            StoreKind::Redb => data_dir.join("state.redb"),
        }
    }

    /// Opens (or creates) this engine's store in `data_dir` (the engine file is not checked).
    pub fn open_store(self, data_dir: &Path) -> Result<Arc<dyn StateStore>, DataDirError> {
        let path = self.store_path(data_dir);
        let opened: Result<Arc<dyn StateStore>, StoreError> = match self {
            StoreKind::Sled => SledStore::open(&path).map(|s| Arc::new(s) as Arc<dyn StateStore>),
            StoreKind::Redb => RedbStore::open(&path).map(|s| Arc::new(s) as Arc<dyn StateStore>),
        };
        opened.map_err(|source| DataDirError::Open {
            kind: self,
            path: path.display().to_string(),
            source,
        })
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data dir {dir} holds a {holds} store, not {wanted}: pass --store {holds}, or migrate it with `coordinator migrate --data-dir {dir} --to {wanted}`")]
    WrongEngine {
        dir: String,
        holds: StoreKind,
        wanted: StoreKind,
    },
    #[error("data dir {dir}: a restore or migration into it did not finish ({INCOMPLETE_FILE} is there); restore it again from the backup, or finish the migration with `coordinator migrate`")]
    Incomplete { dir: String },
    #[error("data dir {dir}: {ENGINE_FILE} says {found:?}, not sled or redb; write the engine that created it there")]
    BadEngineFile { dir: String, found: String },
    #[error("data dir {dir} holds no state store (is it the right --data-dir?)")]
    NoStore { dir: String },
    #[error("data dir {dir}: {message}")]
    Io { dir: String, message: String },
    #[error("cannot open the {kind} state store {path} (is another coordinator using this data dir?): {source}")]
    Open {
        kind: StoreKind,
        path: String,
        source: StoreError,
    },
}

impl DataDirError {
    /// Whether this is the user's input to fix (exit 2) rather than a failure (exit 1).
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            DataDirError::WrongEngine { .. }
                | DataDirError::Incomplete { .. }
                | DataDirError::BadEngineFile { .. }
                | DataDirError::NoStore { .. }
        )
    }
}

fn io_err(dir: &Path, what: &str, e: std::io::Error) -> DataDirError {
    DataDirError::Io {
        dir: dir.display().to_string(),
        message: format!("{what}: {e}"),
    }
}

/// The engine a data dir holds, or `None` for a dir without a store (missing or fresh).
pub fn recorded(data_dir: &Path) -> Result<Option<StoreKind>, DataDirError> {
    let dir = data_dir.display().to_string();
    if data_dir.join(INCOMPLETE_FILE).exists() {
        return Err(DataDirError::Incomplete { dir });
    }
    match std::fs::read_to_string(data_dir.join(ENGINE_FILE)) {
        Ok(s) => {
            let found = s.trim();
            StoreKind::parse(found)
                .map(Some)
                .ok_or_else(|| DataDirError::BadEngineFile {
                    dir,
                    found: found.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Before the engine file: a sled `state/` directory.
            if StoreKind::Sled.store_path(data_dir).is_dir() {
                Ok(Some(StoreKind::Sled))
            } else if StoreKind::Redb.store_path(data_dir).is_file() {
                Ok(Some(StoreKind::Redb))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(io_err(data_dir, ENGINE_FILE, e)),
    }
}

/// Writes a small file durably: a temporary file, fsync, rename over `name`, fsync the dir.
pub(crate) fn write_durably(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Records `kind` as the engine of `data_dir`.
pub fn write_engine_file(data_dir: &Path, kind: StoreKind) -> Result<(), DataDirError> {
    write_durably(data_dir, ENGINE_FILE, &format!("{kind}\n"))
        .map_err(|e| io_err(data_dir, ENGINE_FILE, e))
}

/// Which engine to open `data_dir` with: the recorded one; `wanted` (or the default) for a
/// fresh dir; an error when `wanted` is not the recorded one.
pub fn resolve(data_dir: &Path, wanted: Option<StoreKind>) -> Result<StoreKind, DataDirError> {
    match (recorded(data_dir)?, wanted) {
        (Some(holds), Some(w)) if holds != w => Err(DataDirError::WrongEngine {
            dir: data_dir.display().to_string(),
            holds,
            wanted: w,
        }),
        (Some(holds), _) => Ok(holds),
        (None, w) => Ok(w.unwrap_or(StoreKind::DEFAULT)),
    }
}

/// Opens the state store of `data_dir` (created if needed) with the engine it holds; `wanted`
/// (`--store`) must match it, and chooses the engine of a fresh dir.
pub fn open_data_dir(
    data_dir: &Path,
    wanted: Option<StoreKind>,
) -> Result<Arc<dyn StateStore>, DataDirError> {
    std::fs::create_dir_all(data_dir).map_err(|e| io_err(data_dir, "cannot create it", e))?;
    let kind = resolve(data_dir, wanted)?;
    if !data_dir.join(ENGINE_FILE).exists() {
        write_engine_file(data_dir, kind)?;
    }
    kind.open_store(data_dir)
}

/// Opens the store an existing data dir holds (for backup and migration): an error when there
/// is none, rather than creating an empty one.
pub fn open_existing(data_dir: &Path) -> Result<Arc<dyn StateStore>, DataDirError> {
    match recorded(data_dir)? {
        Some(kind) if kind.store_path(data_dir).exists() => kind.open_store(data_dir),
        _ => Err(DataDirError::NoStore {
            dir: data_dir.display().to_string(),
        }),
    }
}
