//! Content-addressed blob store under the data dir: `blobs/<2 hex>/<64 hex>`. Names are always
//! digests, never paths a client can steer. Model directories are manifest blobs
//! (`distillery_proto::artifact::DirManifest`) whose files are blobs too.

use std::path::{Path, PathBuf};

use distillery_proto::artifact::{self, parse_digest, ArtifactError, CHUNK_SIZE};
use distillery_proto::v1::Chunk;

/// Why a blob cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// Its bytes no longer hash to its name; it was moved out of the store.
    #[error("artifact sha256:{digest} is corrupt on the coordinator: its bytes hash to sha256:{actual}; it was moved to {moved} and is never served")]
    Corrupt {
        digest: String,
        actual: String,
        moved: String,
    },
}

/// The blob store.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> std::io::Result<ArtifactStore> {
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("incoming"))?;
        // Partial uploads from a previous run are garbage.
        for e in std::fs::read_dir(root.join("incoming"))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(ArtifactStore {
            root: root.to_path_buf(),
        })
    }

    /// Where a blob with this digest lives (validated; may not exist).
    pub fn path_of(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        let hex = parse_digest(digest)?;
        Ok(self.root.join("blobs").join(&hex[..2]).join(&hex))
    }

    /// Bytes a stored reference takes: a blob's size, a directory manifest's plus its files'
    /// (as the manifest lists them); 0 for `path:` references and missing blobs.
    pub async fn stored_bytes(&self, reference: &str) -> u64 {
        let Ok(path) = self.path_of(reference) else {
            return 0;
        };
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            return 0;
        };
        let mut total = meta.len();
        // Manifests are small JSON; larger blobs are not read.
        if meta.len() <= 1 << 20 {
            if let Ok(bytes) = tokio::fs::read(&path).await {
                if let Some(m) = artifact::DirManifest::parse(&bytes) {
                    total += m.files.iter().map(|f| f.size).sum::<u64>();
                }
            }
        }
        total
    }

    /// Whether the blob is stored.
    pub fn contains(&self, digest: &str) -> bool {
        self.path_of(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Stores an uploaded chunk stream; returns its digest and size.
    pub async fn put<S>(&self, stream: S) -> Result<(String, u64), ArtifactError>
    where
        S: futures::Stream<Item = Result<Chunk, tonic::Status>> + Unpin,
    {
        let n: u64 = rand::random();
        let tmp = self.root.join("incoming").join(format!("{n:016x}"));
        let (digest, size) = artifact::receive_to_file(stream, &tmp, None).await?;
        let dest = self.path_of(&digest)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| ArtifactError::Io {
                    path: parent.display().to_string(),
                    source,
                })?;
        }
        tokio::fs::rename(&tmp, &dest)
            .await
            .map_err(|source| ArtifactError::Io {
                path: dest.display().to_string(),
                source,
            })?;
        Ok((digest, size))
    }

    /// Hashes a stored blob; one that no longer matches its name is moved to `corrupt/` (out
    /// of the store: `contains` is false, an upload of the right bytes restores it).
    pub async fn verify(&self, digest: &str) -> Result<(), BlobError> {
        let path = self.path_of(digest)?;
        let hex = parse_digest(digest)?;
        let (actual, _) = artifact::digest_file(&path).await?;
        if actual == hex {
            return Ok(());
        }
        Err(self.quarantine(&hex, actual).await)
    }

    async fn quarantine(&self, hex: &str, actual: String) -> BlobError {
        let from = self.root.join("blobs").join(&hex[..2]).join(hex);
        let dir = self.root.join("corrupt");
        let to = dir.join(hex);
        let moved = match tokio::fs::create_dir_all(&dir).await {
            Ok(()) => tokio::fs::rename(&from, &to).await,
            Err(e) => Err(e),
        };
        let moved = match moved {
            Ok(()) => to.display().to_string(),
            Err(e) => {
                // Not movable: remove it, so it is never served either way.
                let _ = tokio::fs::remove_file(&from).await;
                format!("nowhere (moving it failed: {e}; it was deleted)")
            }
        };
        tracing::error!(artifact = %hex, %actual, %moved, "stored artifact is corrupt");
        BlobError::Corrupt {
            digest: hex.to_string(),
            actual,
            moved,
        }
    }

    /// The blob as a chunk stream; the last chunk carries the digest. The blob is hashed before
    /// anything is sent (a corrupt one is never served, see [`ArtifactStore::verify`]), and
    /// again as it is sent: bytes that change meanwhile end the stream with `DATA_LOSS` instead
    /// of the last chunk, so a receiver never completes a download of them.
    pub async fn get(
        &self,
        digest: &str,
    ) -> Result<impl futures::Stream<Item = Result<Chunk, tonic::Status>> + Send + 'static, BlobError>
    {
        use sha2::Digest as _;
        self.verify(digest).await?;
        let path = self.path_of(digest)?;
        let hex = parse_digest(digest)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| ArtifactError::Io {
                path: format!("artifact {hex}"),
                source,
            })?;
        let total = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        Ok(futures::stream::unfold(
            (Some((file, sha2::Sha256::new())), hex, total),
            |(file, hex, total)| async move {
                let (mut f, mut hasher) = file?;
                let buf = match artifact::read_chunk(&mut f).await {
                    Ok(b) => b,
                    Err(e) => {
                        let err = tonic::Status::internal(format!("reading artifact {hex}: {e}"));
                        return Some((Err(err), (None, hex, total)));
                    }
                };
                hasher.update(&buf);
                let last = buf.len() < CHUNK_SIZE;
                if last {
                    let actual = hex::encode(hasher.clone().finalize());
                    if actual != hex {
                        let err = tonic::Status::data_loss(format!(
                            "artifact sha256:{hex} changed on the coordinator's disk while it was sent (its bytes now hash to sha256:{actual}); discard what was received"
                        ));
                        return Some((Err(err), (None, hex, total)));
                    }
                }
                let chunk = Chunk {
                    data: buf,
                    digest: if last { hex.clone() } else { String::new() },
                    total_size: total,
                };
                let next = if last { None } else { Some((f, hasher)) };
                Some((Ok(chunk), (next, hex, total)))
            },
        ))
    }
}
