//! The contract between the agent and the code that does the work: a [`TaskRunner`] runs one
//! assignment on a blocking thread, talking to the coordinator only through its [`TaskContext`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distillery_proto::artifact::{self, parse_digest, DirManifest, ManifestEntry};
use distillery_proto::client::{error_chain, WorkerClient};
use distillery_proto::v1 as pb;

/// What a finished task reports.
#[derive(Debug, Default, Clone)]
pub struct TaskOutput {
    /// Named artifacts (digests from [`TaskContext::upload_file`] / [`TaskContext::upload_dir`]).
    pub outputs: BTreeMap<String, String>,
    pub metrics: BTreeMap<String, f64>,
}

/// Why a task failed; `retryable` lets the coordinator try again (with backoff).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    pub message: String,
    /// A failed attempt may be retried (up to `max_attempts`).
    pub retryable: bool,
    /// The attempt was *lost*, not failed: the task did not fail by itself, a gang peer or the
    /// network went away (its collective or rendezvous broke). Reported as `FailTask.lost`; the
    /// coordinator retries it without charging `max_attempts`.
    pub lost: bool,
}

impl TaskError {
    pub fn retryable(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: true,
            lost: false,
        }
    }
    pub fn fatal(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: false,
            lost: false,
        }
    }
    /// A gang peer or the link to it was lost (see [`TaskError::lost`]).
    pub fn lost(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: true,
            lost: true,
        }
    }
    pub fn cancelled() -> TaskError {
        TaskError {
            message: "cancelled by the coordinator".into(),
            retryable: true,
            lost: false,
        }
    }
}

impl From<crate::collective::CollectiveError> for TaskError {
    /// A collective only breaks when a peer or the network does: the attempt is lost.
    fn from(e: crate::collective::CollectiveError) -> TaskError {
        TaskError::lost(e.to_string())
    }
}

/// Runs task kinds. Implementations are blocking code (candle); they check
/// [`TaskContext::cancelled`] between steps.
pub trait TaskRunner: Send + Sync + 'static {
    /// The task kinds this runner accepts; the coordinator hands out no others.
    fn kinds(&self) -> Vec<String>;
    /// Runs one assignment to completion.
    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError>;
}

/// A runner's link to the coordinator for one assignment.
pub struct TaskContext {
    pub(crate) rt: tokio::runtime::Handle,
    pub(crate) client: WorkerClient,
    pub(crate) lease: pb::LeaseRef,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) work_dir: PathBuf,
    pub(crate) cache_dir: PathBuf,
    pub(crate) coordinator_url: String,
}

fn status_to_error(what: &str, s: &tonic::Status) -> TaskError {
    TaskError::retryable(format!("{what}: {} ({:?})", s.message(), s.code()))
}

impl TaskContext {
    /// Whether the coordinator took this lease back (cancel, pause, expiry).
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The lease this run holds.
    pub fn lease(&self) -> &pb::LeaseRef {
        &self.lease
    }

    /// The IP address other ranks of a gang can reach this worker at: `DISTILLERY_ADVERTISE_IP`
    /// when set, else the local address of the route to the coordinator.
    pub fn advertise_ip(&self) -> std::net::IpAddr {
        use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};
        if let Some(ip) = std::env::var("DISTILLERY_ADVERTISE_IP")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return ip;
        }
        let hostport = self
            .coordinator_url
            .split("://")
            .nth(1)
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let route = || -> Option<IpAddr> {
            let addr = hostport.to_socket_addrs().ok()?.next()?;
            let s = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .ok()?;
            s.connect(addr).ok()?;
            Some(s.local_addr().ok()?.ip())
        };
        route().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// A scratch folder for this assignment.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Reports progress (shown by `watch`), optionally a checkpoint digest to resume from.
    /// A refused report means the lease is gone: the run is marked cancelled.
    pub fn progress(
        &self,
        metrics: BTreeMap<String, f64>,
        checkpoint: Option<&str>,
        message: &str,
    ) -> Result<(), TaskError> {
        let req = pb::ReportProgressRequest {
            lease: Some(self.lease.clone()),
            metrics: metrics.into_iter().collect(),
            checkpoint: checkpoint.unwrap_or_default().to_string(),
            message: message.to_string(),
        };
        let mut c = self.client.clone();
        match self.rt.block_on(c.report_progress(req)) {
            Ok(_) => Ok(()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                self.cancel.store(true, Ordering::SeqCst);
                Err(TaskError::cancelled())
            }
            // Progress is advisory; a coordinator restart must not fail the task, and a
            // coordinator killed mid-call ends the call with a transport error, not Unavailable.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) =>
            {
                Ok(())
            }
            Err(s) => Err(status_to_error("progress", &s)),
        }
    }

    /// Uploads a file; returns `sha256:<hex>`.
    pub fn upload_file(&self, path: &Path) -> Result<String, TaskError> {
        self.rt.block_on(upload_file(self.client.clone(), path))
    }

    /// Uploads a directory (each file, then its manifest); returns the manifest's digest.
    pub fn upload_dir(&self, dir: &Path) -> Result<String, TaskError> {
        let files = artifact::list_files(dir).map_err(|e| TaskError::fatal(e.to_string()))?;
        let mut entries = Vec::new();
        for rel in files {
            let p = artifact::safe_join(dir, &rel).map_err(|e| TaskError::fatal(e.to_string()))?;
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            let digest = self.upload_file(&p)?;
            entries.push(ManifestEntry {
                path: rel,
                digest: digest.trim_start_matches("sha256:").to_string(),
                size,
            });
        }
        let manifest = DirManifest {
            distillery_dir: 1,
            files: entries,
        };
        let mpath = self
            .work_dir
            .join(format!(".manifest-{}.json", std::process::id()));
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|e| TaskError::fatal(e.to_string()))?;
        std::fs::write(&mpath, bytes)
            .map_err(|e| TaskError::retryable(format!("{}: {e}", mpath.display())))?;
        let d = self.upload_file(&mpath);
        let _ = std::fs::remove_file(&mpath);
        d
    }

    /// Makes an input available locally: `path:X` is X itself; an artifact is downloaded into
    /// the worker's cache once (a directory artifact becomes a folder).
    pub fn fetch(&self, reference: &str) -> Result<PathBuf, TaskError> {
        if let Some(p) = reference.strip_prefix("path:") {
            return Ok(PathBuf::from(p));
        }
        let hex = parse_digest(reference).map_err(|e| TaskError::fatal(e.to_string()))?;
        let blob = self.cache_dir.join(&hex);
        ensure_intact(&blob, &hex, |dest| {
            self.rt.block_on(download(self.client.clone(), &hex, dest))
        })?;
        let bytes = std::fs::read(&blob)
            .map_err(|e| TaskError::retryable(format!("{}: {e}", blob.display())))?;
        let Some(m) = DirManifest::parse(&bytes) else {
            return Ok(blob);
        };
        let dir = self.cache_dir.join(format!("{hex}.d"));
        // Every file of the folder is checked against its digest on every use: a cached copy
        // that changed on disk is fetched again, never used.
        for f in &m.files {
            let dest =
                artifact::safe_join(&dir, &f.path).map_err(|e| TaskError::fatal(e.to_string()))?;
            ensure_intact(&dest, &f.digest, |d| {
                self.rt
                    .block_on(download(self.client.clone(), &f.digest, d))
            })?;
        }
        Ok(dir)
    }

    /// Gang barrier: sends this rank's payload under `key` and returns every rank's payload, in
    /// rank order, once all have arrived (waiting across coordinator restarts).
    pub fn rendezvous(&self, key: &str, payload: &[u8]) -> Result<Vec<Vec<u8>>, TaskError> {
        loop {
            if self.cancelled() {
                return Err(TaskError::cancelled());
            }
            let req = pb::RendezvousRequest {
                lease: Some(self.lease.clone()),
                key: key.to_string(),
                payload: payload.to_vec(),
            };
            let mut c = self.client.clone();
            match self.rt.block_on(c.rendezvous(req)) {
                Ok(r) => return Ok(r.into_inner().payloads),
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::DeadlineExceeded
                            | tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                    ) =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    self.cancel.store(true, Ordering::SeqCst);
                    return Err(TaskError::cancelled());
                }
                // The gang could not meet: the attempt is lost, not failed.
                Err(s) => {
                    return Err(TaskError::lost(format!(
                        "rendezvous: {} ({:?})",
                        s.message(),
                        s.code()
                    )))
                }
            }
        }
    }
}

/// Makes `path` hold the artifact whose SHA-256 is `hex`: a cached copy is used only if its
/// digest still matches (a file that rotted or was cut short on disk is removed and fetched
/// again); otherwise `download` writes it, and what it wrote is checked too. Returns whether it
/// downloaded.
pub(crate) fn ensure_intact(
    path: &Path,
    hex: &str,
    mut download: impl FnMut(&Path) -> Result<(), TaskError>,
) -> Result<bool, TaskError> {
    let digest_of = |p: &Path| -> Option<String> {
        use sha2::Digest;
        let mut f = std::fs::File::open(p).ok()?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h).ok()?;
        Some(hex::encode(h.finalize()))
    };
    if path.exists() {
        if digest_of(path).as_deref() == Some(hex) {
            return Ok(false);
        }
        tracing::warn!(path = %path.display(), "cached artifact does not match its digest: fetching it again");
        std::fs::remove_file(path)
            .map_err(|e| TaskError::retryable(format!("{}: {e}", path.display())))?;
    }
    download(path)?;
    match digest_of(path) {
        Some(d) if d == hex => Ok(true),
        got => {
            let _ = std::fs::remove_file(path);
            Err(TaskError::retryable(format!(
                "{}: fetched artifact sha256:{hex} but the file holds {}",
                path.display(),
                got.map_or("nothing readable".to_string(), |d| format!("sha256:{d}"))
            )))
        }
    }
}

async fn upload_file(mut client: WorkerClient, path: &Path) -> Result<String, TaskError> {
    let (digest, _) = artifact::digest_file(path)
        .await
        .map_err(|e| TaskError::retryable(e.to_string()))?;
    let mut last = None;
    for attempt in 0..5u32 {
        let chunks = artifact::file_chunks(path.to_path_buf(), digest.clone());
        match client.put_artifact(chunks).await {
            Ok(r) => {
                let got = r.into_inner().digest;
                if got != digest {
                    return Err(TaskError::retryable(format!(
                        "uploaded {} but the coordinator stored {got}",
                        path.display()
                    )));
                }
                return Ok(format!("sha256:{digest}"));
            }
            Err(s) => {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    let s = last.unwrap_or_else(|| tonic::Status::unknown("upload failed"));
    Err(status_to_error(&format!("upload {}", path.display()), &s))
}

/// Downloads an artifact, retrying (as uploads do) through a coordinator restart: a kill
/// mid-transfer ends the call with a transport error or a short stream, not a task failure.
async fn download(client: WorkerClient, digest: &str, dest: &Path) -> Result<(), TaskError> {
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let mut c = client.clone();
        let stream = match c
            .get_artifact(pb::GetArtifactRequest {
                digest: digest.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                last = format!("{} ({:?})", s.message(), s.code());
                continue;
            }
            Err(s) => return Err(status_to_error(&format!("download {digest}"), &s)),
        };
        match artifact::receive_to_file(stream, dest, Some(digest)).await {
            Ok(_) => return Ok(()),
            Err(e) => last = error_chain(&e),
        }
    }
    Err(TaskError::retryable(format!("download {digest}: {last}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    #[test]
    fn a_cached_artifact_is_used_only_while_it_matches_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let good = b"the artifact's bytes".to_vec();
        let hex = sha(&good);
        let mut downloads = 0;
        let mut fetch = |p: &Path| -> Result<(), TaskError> {
            downloads += 1;
            std::fs::write(p, &good).map_err(|e| TaskError::retryable(e.to_string()))
        };
        // Missing: downloaded. Present and intact: used as is.
        assert!(ensure_intact(&path, &hex, &mut fetch).unwrap());
        assert!(!ensure_intact(&path, &hex, &mut fetch).unwrap());
        // One flipped byte, or a file cut short: detected, fetched again, intact afterwards.
        let mut bad = good.clone();
        bad[3] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(ensure_intact(&path, &hex, &mut fetch).unwrap());
        std::fs::write(&path, &good[..5]).unwrap();
        assert!(ensure_intact(&path, &hex, &mut fetch).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), good);
        assert_eq!(downloads, 3);
        // A download that delivers other bytes is an error (retryable), and nothing is left to
        // be used by mistake.
        let other = dir.path().join("other");
        let e = ensure_intact(&other, &hex, |p: &Path| {
            std::fs::write(p, b"something else").map_err(|e| TaskError::retryable(e.to_string()))
        })
        .unwrap_err();
        assert!(e.retryable && e.message.contains(&hex), "{}", e.message);
        assert!(!other.exists());
    }
}
