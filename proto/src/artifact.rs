//! How artifacts travel: content-addressed (sha256) blobs in chunks of at most 1 MiB, and model
//! directories as a manifest blob that names each file's digest. Shared by the coordinator's
//! store, the worker and the CLI.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::v1::Chunk;

/// Largest chunk sent on the wire.
pub const CHUNK_SIZE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(
        "{0:?} is not a sha256 digest: expect 64 hex characters, optionally after \"sha256:\""
    )]
    BadDigest(String),
    #[error("digest mismatch: expected {expected}, received data hashes to {actual}")]
    Mismatch { expected: String, actual: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("manifest path {0:?} is not a plain relative path")]
    UnsafePath(String),
    #[error("transfer failed: {0}")]
    Transfer(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Validates a digest and returns its 64 lowercase hex characters.
pub fn parse_digest(s: &str) -> Result<String, ArtifactError> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(ArtifactError::BadDigest(s.to_string()))
    }
}

/// One file of a directory artifact.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ManifestEntry {
    pub path: String,
    pub digest: String,
    pub size: u64,
}

/// A directory artifact: its digest is the digest of this manifest's JSON.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DirManifest {
    /// Format version; its presence marks a blob as a directory manifest.
    pub distillery_dir: u32,
    pub files: Vec<ManifestEntry>,
}

impl DirManifest {
    /// Parses a blob as a manifest, if it is one.
    pub fn parse(bytes: &[u8]) -> Option<DirManifest> {
        serde_json::from_slice::<DirManifest>(bytes)
            .ok()
            .filter(|m| m.distillery_dir == 1)
    }
}

/// Joins a manifest path under `root`, refusing absolute paths and `..`.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf, ArtifactError> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ArtifactError::UnsafePath(rel.to_string()));
    }
    Ok(root.join(p))
}

/// sha256 of a file, and its size.
pub async fn digest_file(path: &Path) -> Result<(String, u64), ArtifactError> {
    let mut f = tokio::fs::File::open(path).await.map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await.map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// Reads the next chunk of a file: `CHUNK_SIZE` bytes, fewer only at the end.
pub async fn read_chunk(f: &mut tokio::fs::File) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut filled = 0;
    while filled < CHUNK_SIZE {
        match f.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The chunks of a file, the first naming the expected digest.
pub fn file_chunks(
    path: PathBuf,
    digest: String,
) -> impl futures::Stream<Item = Chunk> + Send + 'static {
    futures::stream::unfold(
        (None::<tokio::fs::File>, path, Some(digest), false),
        |(f, path, digest, done)| async move {
            if done {
                return None;
            }
            let mut f = match f {
                Some(f) => f,
                None => tokio::fs::File::open(&path).await.ok()?,
            };
            let buf = read_chunk(&mut f).await.ok()?;
            let last = buf.len() < CHUNK_SIZE;
            let chunk = Chunk {
                data: buf,
                digest: digest.clone().unwrap_or_default(),
                total_size: 0,
            };
            Some((chunk, (Some(f), path, None, last)))
        },
    )
}

/// Receives a chunk stream into `dest` (written through a temporary file, renamed at the end),
/// checking the sha256 against `expected` and against any digest the chunks carry.
pub async fn receive_to_file<S>(
    mut stream: S,
    dest: &Path,
    expected: Option<&str>,
) -> Result<(String, u64), ArtifactError>
where
    S: futures::Stream<Item = Result<Chunk, tonic::Status>> + Unpin,
{
    use futures::StreamExt;
    // Unique per transfer, not just per process: tasks running side by side in one worker (a
    // search's candidates fetching the same scores) may download the same blob at once, and
    // each must write its own file before the atomic rename.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dest.with_extension(format!("part-{}-{n}", std::process::id()));
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io_err(parent))?;
    }
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io_err(&tmp))?;
    let mut h = Sha256::new();
    let mut size = 0u64;
    let mut announced: Option<String> = expected.map(str::to_string);
    let result = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| ArtifactError::Transfer(s.message().to_string()))?;
            if !chunk.digest.is_empty() {
                announced = Some(parse_digest(&chunk.digest)?);
            }
            h.update(&chunk.data);
            size += chunk.data.len() as u64;
            f.write_all(&chunk.data).await.map_err(io_err(&tmp))?;
        }
        f.flush().await.map_err(io_err(&tmp))?;
        f.sync_all().await.map_err(io_err(&tmp))?;
        let actual = hex::encode(h.finalize());
        if let Some(exp) = announced {
            let exp = parse_digest(&exp)?;
            if exp != actual {
                return Err(ArtifactError::Mismatch {
                    expected: exp,
                    actual,
                });
            }
        }
        Ok(actual)
    }
    .await;
    match result {
        Ok(actual) => {
            tokio::fs::rename(&tmp, dest).await.map_err(io_err(dest))?;
            Ok((actual, size))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Every regular file under `dir`, as sorted relative paths with `/` separators.
pub fn list_files(dir: &Path) -> Result<Vec<String>, ArtifactError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ArtifactError> {
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let p = entry.path();
            let ty = entry.file_type().map_err(io_err(&p))?;
            if ty.is_dir() {
                walk(root, &p, out)?;
            } else if ty.is_file() {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated() {
        let d = "ab".repeat(32);
        assert_eq!(parse_digest(&format!("sha256:{d}")).unwrap(), d);
        assert!(parse_digest("../../etc/passwd").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
    }

    #[test]
    fn manifest_paths_cannot_escape() {
        let root = Path::new("/tmp/x");
        assert!(safe_join(root, "a/b.json").is_ok());
        for bad in ["../a", "/etc/passwd", "a/../../b", "", "./a"] {
            assert!(safe_join(root, bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn chunks_round_trip_with_digest_check() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        let (digest, size) = digest_file(&src).await.unwrap();
        assert_eq!(size, data.len() as u64);
        use futures::StreamExt;
        let chunks: Vec<Chunk> = file_chunks(src.clone(), digest.clone()).collect().await;
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.data.len() <= CHUNK_SIZE));
        let dest = dir.path().join("out.bin");
        let s = futures::stream::iter(chunks.clone().into_iter().map(Ok));
        let (got, _) = receive_to_file(s, &dest, Some(&digest)).await.unwrap();
        assert_eq!(got, digest);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        // A corrupted chunk is refused and leaves nothing behind.
        let mut bad = chunks;
        bad[1].data[0] ^= 1;
        let dest2 = dir.path().join("bad.bin");
        let s = futures::stream::iter(bad.into_iter().map(Ok));
        assert!(matches!(
            receive_to_file(s, &dest2, None).await,
            Err(ArtifactError::Mismatch { .. })
        ));
        assert!(!dest2.exists());
    }
}
