//! Content-addressed blob store under the data dir: `blobs/<2 hex>/<64 hex>`. Names are always
//! digests, never paths a client can steer. Model directories are manifest blobs
//! (`distillery_proto::artifact::DirManifest`) whose files are blobs too.

use std::path::{Path, PathBuf};

use distillery_proto::artifact::{self, parse_digest, ArtifactError, CHUNK_SIZE};
use distillery_proto::v1::Chunk;

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

    /// The blob as a chunk stream; the last chunk carries the digest.
    pub async fn get(
        &self,
        digest: &str,
    ) -> Result<
        impl futures::Stream<Item = Result<Chunk, tonic::Status>> + Send + 'static,
        ArtifactError,
    > {
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
            (Some(file), hex, total),
            |(file, hex, total)| async move {
                let mut f = file?;
                let buf = match artifact::read_chunk(&mut f).await {
                    Ok(b) => b,
                    Err(e) => {
                        let err = tonic::Status::internal(format!("reading artifact {hex}: {e}"));
                        return Some((Err(err), (None, hex, total)));
                    }
                };
                let last = buf.len() < CHUNK_SIZE;
                let chunk = Chunk {
                    data: buf,
                    digest: if last { hex.clone() } else { String::new() },
                    total_size: total,
                };
                Some((Ok(chunk), (if last { None } else { Some(f) }, hex, total)))
            },
        ))
    }
}
