//! The backup file: engine-independent JSON lines holding every record of every table as
//! stored, with a SHA-256 over everything before the last line. Restoring it into either engine
//! gives the same records byte for byte, so restoring into the other engine is a migration.
//!
//! ```text
//! {"format":"distillery-store-backup","version":1,"engine":"sled","created_ms":1700000000000}
//! {"table":"campaigns","key":"c-1","value":"{\"id\":\"c-1\",...}"}      (JSON records as text)
//! {"table":"meta","key":"meta","value":"{...}"}
//! {"table":"events","key":"17","hex":"0811..."}                        (protobuf Event)
//! {"end":true,"records":1234,"sha256":"<hex of every byte above this line>"}
//! ```

use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::data_dir::{self, DataDirError, StoreKind, INCOMPLETE_FILE};
use super::{Records, KEYED_TABLES};

pub const FORMAT: &str = "distillery-store-backup";
pub const VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup {what}: line {line}: {message}")]
    Format {
        what: String,
        line: usize,
        message: String,
    },
    #[error("backup {what}: {message}")]
    Invalid { what: String, message: String },
    #[error("{0}")]
    DataDir(#[from] DataDirError),
    #[error("{0}")]
    Store(#[from] super::StoreError),
    #[error("{0}")]
    Io(String),
}

impl BackupError {
    /// Whether the user's input is at fault (exit 2): a bad file, a wrong or non-empty dir.
    pub fn is_input(&self) -> bool {
        match self {
            BackupError::Format { .. } | BackupError::Invalid { .. } => true,
            BackupError::DataDir(d) => d.is_input(),
            _ => false,
        }
    }
}

/// What a backup file says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The engine it was taken from.
    pub engine: String,
    pub created_ms: u64,
}

/// Encodes `records` (taken from a `source` store) as a backup file.
pub fn encode(records: &Records, source: StoreKind, created_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = |v: Value| {
        out.extend_from_slice(v.to_string().as_bytes());
        out.push(b'\n');
    };
    line(
        json!({"format": FORMAT, "version": VERSION, "engine": source.as_str(), "created_ms": created_ms}),
    );
    for name in KEYED_TABLES {
        for (k, v) in records.keyed(name).into_iter().flatten() {
            line(json!({"table": name, "key": k, "value": String::from_utf8_lossy(v)}));
        }
    }
    if let Some(m) = &records.meta {
        line(json!({"table": "meta", "key": super::META_KEY, "value": String::from_utf8_lossy(m)}));
    }
    for (seq, v) in &records.events {
        line(json!({"table": "events", "key": seq.to_string(), "hex": hex::encode(v)}));
    }
    let sha = hex::encode(Sha256::digest(&out));
    out.extend_from_slice(
        json!({"end": true, "records": records.len(), "sha256": sha})
            .to_string()
            .as_bytes(),
    );
    out.push(b'\n');
    out
}

/// Checks `records` can be backed up faithfully: every JSON record is UTF-8 text (the file holds
/// them as text) and every record decodes as `load` would read it (a backup of a corrupt store
/// fails here, naming the table and key, instead of producing a file `restore` refuses).
pub fn check_encodable(records: &Records) -> Result<(), BackupError> {
    for name in KEYED_TABLES {
        for (k, v) in records.keyed(name).into_iter().flatten() {
            if std::str::from_utf8(v).is_err() {
                return Err(BackupError::Store(super::StoreError::Corrupt {
                    tree: name_static(name),
                    key: k.clone(),
                    message: "record is not UTF-8 JSON".into(),
                }));
            }
        }
    }
    if let Some(m) = &records.meta {
        if std::str::from_utf8(m).is_err() {
            return Err(BackupError::Store(super::StoreError::Corrupt {
                tree: "meta",
                key: super::META_KEY.into(),
                message: "record is not UTF-8 JSON".into(),
            }));
        }
    }
    records.to_state()?;
    Ok(())
}

fn name_static(name: &str) -> &'static str {
    KEYED_TABLES
        .iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("?")
}

/// Parses and verifies a backup file (`what` names it in errors): header, every line, the
/// record count and the checksum, and that every record decodes.
pub fn decode(bytes: &[u8], what: &str) -> Result<(Header, Records), BackupError> {
    let what = what.to_string();
    let fmt_err = |line: usize, message: String| BackupError::Format {
        what: what.clone(),
        line,
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| BackupError::Invalid {
        what: what.clone(),
        message: format!("not UTF-8 text ({e}); is it a backup file?"),
    })?;
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| BackupError::Invalid {
            what: what.clone(),
            message: "does not end with a newline: truncated?".into(),
        })?;
    let (before_end, end_line) = match body.rfind('\n') {
        Some(i) => (&text[..=i], &body[i + 1..]),
        None => {
            return Err(BackupError::Invalid {
                what,
                message: "has fewer than two lines: truncated?".into(),
            })
        }
    };
    let lines: Vec<&str> = before_end.lines().collect();
    let n_lines = lines.len() + 1;
    let end: Value = serde_json::from_str(end_line).map_err(|e| {
        fmt_err(
            n_lines,
            format!("the end line is not JSON ({e}): truncated?"),
        )
    })?;
    if end["end"] != json!(true) {
        return Err(fmt_err(
            n_lines,
            "the last line is not the end line: truncated?".into(),
        ));
    }
    let want_sha = end["sha256"]
        .as_str()
        .ok_or_else(|| fmt_err(n_lines, "the end line has no sha256".into()))?;
    let got_sha = hex::encode(Sha256::digest(before_end.as_bytes()));
    if got_sha != want_sha {
        return Err(BackupError::Invalid {
            what,
            message: format!(
                "checksum mismatch (file says sha256 {want_sha}, content has {got_sha}): the file is damaged"
            ),
        });
    }
    let header: Value = serde_json::from_str(lines[0])
        .map_err(|e| fmt_err(1, format!("the header is not JSON: {e}")))?;
    if header["format"] != json!(FORMAT) {
        return Err(fmt_err(1, format!("not a {FORMAT} file")));
    }
    if header["version"] != json!(VERSION) {
        return Err(fmt_err(
            1,
            format!(
                "version {} is not supported (this coordinator reads version {VERSION})",
                header["version"]
            ),
        ));
    }
    let head = Header {
        engine: header["engine"].as_str().unwrap_or("").to_string(),
        created_ms: header["created_ms"].as_u64().unwrap_or(0),
    };
    let mut r = Records::default();
    for (i, l) in lines.iter().enumerate().skip(1) {
        let n = i + 1;
        let v: Value = serde_json::from_str(l).map_err(|e| fmt_err(n, format!("not JSON: {e}")))?;
        let table = v["table"].as_str().unwrap_or("");
        let key = v["key"]
            .as_str()
            .ok_or_else(|| fmt_err(n, "no \"key\"".into()))?;
        let dup = |n| fmt_err(n, format!("{table} {key:?} appears twice"));
        match table {
            "events" => {
                let seq: u64 = key
                    .parse()
                    .map_err(|_| fmt_err(n, format!("event key {key:?} is not a number")))?;
                let bytes = v["hex"]
                    .as_str()
                    .and_then(|h| hex::decode(h).ok())
                    .ok_or_else(|| fmt_err(n, "event without valid \"hex\"".into()))?;
                if r.events.insert(seq, bytes).is_some() {
                    return Err(dup(n));
                }
            }
            "meta" => {
                let value = v["value"]
                    .as_str()
                    .ok_or_else(|| fmt_err(n, "no \"value\"".into()))?;
                if key != super::META_KEY || r.meta.is_some() {
                    return Err(fmt_err(n, format!("unexpected meta record {key:?}")));
                }
                r.meta = Some(value.as_bytes().to_vec());
            }
            t => {
                let value = v["value"]
                    .as_str()
                    .ok_or_else(|| fmt_err(n, "no \"value\"".into()))?;
                let map = r.keyed_mut(t).ok_or_else(|| {
                    fmt_err(
                        n,
                        format!(
                            "unknown table {t:?} (campaigns, tasks, leases, workers, meta, events)"
                        ),
                    )
                })?;
                if map
                    .insert(key.to_string(), value.as_bytes().to_vec())
                    .is_some()
                {
                    return Err(dup(n));
                }
            }
        }
    }
    if end["records"].as_u64() != Some(r.len() as u64) {
        return Err(fmt_err(
            n_lines,
            format!(
                "says {} records, the file holds {}",
                end["records"],
                r.len()
            ),
        ));
    }
    r.to_state().map_err(|e| BackupError::Invalid {
        what: what.clone(),
        message: e.to_string(),
    })?;
    Ok((head, r))
}

/// What a restore or migration wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub records: usize,
    pub campaigns: usize,
    pub tasks: usize,
    pub events: usize,
}

impl Summary {
    pub fn of(r: &Records) -> Summary {
        Summary {
            records: r.len(),
            campaigns: r.campaigns.len(),
            tasks: r.tasks.len(),
            events: r.events.len(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({} campaigns, {} tasks, {} events)",
            self.records, self.campaigns, self.tasks, self.events
        )
    }
}

fn io(what: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io(format!("{}: {e}", what.display()))
}

/// Backs up a data dir that no coordinator is serving (the store is opened here).
pub fn offline(data_dir: &Path) -> Result<(Vec<u8>, Summary), BackupError> {
    let store = data_dir::open_existing(data_dir)?;
    let records = store.export()?;
    check_encodable(&records)?;
    Ok((
        encode(&records, store.kind(), crate::engine::now_ms()),
        Summary::of(&records),
    ))
}

/// Writes `records` into the fresh data dir `data_dir` with engine `kind`: refuses a dir that
/// holds anything; marks it incomplete until every record is durable and read back equal.
pub fn restore_records(
    records: &Records,
    data_dir: &Path,
    kind: StoreKind,
) -> Result<Summary, BackupError> {
    if let Ok(mut entries) = std::fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(BackupError::Invalid {
                what: format!("restore into {}", data_dir.display()),
                message: "the data dir is not empty: restore only into a new or empty directory"
                    .into(),
            });
        }
    }
    std::fs::create_dir_all(data_dir).map_err(|e| io(data_dir, e))?;
    data_dir::write_durably(data_dir, INCOMPLETE_FILE, "restore\n").map_err(|e| io(data_dir, e))?;
    data_dir::write_engine_file(data_dir, kind)?;
    {
        let store = kind.open_store(data_dir)?;
        store.import(records)?;
        if store.export()? != *records {
            return Err(BackupError::Io(format!(
                "restore into {}: the records read back differ from the backup",
                data_dir.display()
            )));
        }
    }
    std::fs::remove_file(data_dir.join(INCOMPLETE_FILE)).map_err(|e| io(data_dir, e))?;
    data_dir::sync_dir(data_dir).map_err(|e| io(data_dir, e))?;
    Ok(Summary::of(records))
}

/// `coordinator restore FILE --data-dir D --store E`.
pub fn restore_file(file: &Path, data_dir: &Path, kind: StoreKind) -> Result<Summary, BackupError> {
    let bytes = std::fs::read(file).map_err(|e| io(file, e))?;
    let (_, records) = decode(&bytes, &file.display().to_string())?;
    restore_records(&records, data_dir, kind)
}

/// `coordinator migrate --data-dir D --to E`: copies every record into the other engine's store
/// beside the old one, reads it back, switches the engine file, then removes the old store.
/// A crash before the switch leaves the old engine in use; after it, the new one, complete.
pub fn migrate(data_dir: &Path, to: StoreKind) -> Result<(StoreKind, Summary), BackupError> {
    let from = match data_dir::recorded(data_dir) {
        Ok(Some(k)) => k,
        Ok(None) => {
            return Err(DataDirError::NoStore {
                dir: data_dir.display().to_string(),
            }
            .into())
        }
        Err(DataDirError::Incomplete { .. }) => {
            return Err(BackupError::Invalid {
                what: format!("migrate {}", data_dir.display()),
                message: format!("{INCOMPLETE_FILE} is there: an earlier restore did not finish; restore again into a new dir"),
            })
        }
        Err(e) => return Err(e.into()),
    };
    if from == to {
        return Err(BackupError::Invalid {
            what: format!("migrate {}", data_dir.display()),
            message: format!("the data dir already holds a {to} store"),
        });
    }
    // The source store stays open (so locked: a `serve` started meanwhile cannot open it and
    // acknowledge writes the migration would then delete) until the engine file names `to`.
    let source = data_dir::open_existing(data_dir)?;
    let records = source.export()?;
    let target = to.store_path(data_dir);
    // Left by an interrupted migration (the engine file still names `from`): start over.
    remove_store(&target)?;
    {
        let store = to.open_store(data_dir)?;
        store.import(&records)?;
        if store.export()? != records {
            return Err(BackupError::Io(format!(
                "migrate {}: the records read back differ from the {from} store; the data dir still uses {from}",
                data_dir.display()
            )));
        }
    }
    data_dir::write_engine_file(data_dir, to)?;
    drop(source);
    remove_store(&from.store_path(data_dir))?;
    data_dir::sync_dir(data_dir).map_err(|e| io(data_dir, e))?;
    Ok((from, Summary::of(&records)))
}

fn remove_store(path: &Path) -> Result<(), BackupError> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        Ok(())
    };
    r.map_err(|e| io(path, e))
}

/// Writes `bytes` to `out` durably and atomically (a temporary file renamed into place).
pub fn write_file(out: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| BackupError::Io(format!("{}: not a file name", out.display())))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))?;
    Ok(())
}
