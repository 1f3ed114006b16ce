//! Thin tonic adapters: translate and authorize, then hand the decision to the engine.

pub mod campaigns;
pub mod workers;

use std::collections::BTreeMap;
use std::pin::Pin;

use std::collections::BTreeSet;

use distillery_proto::artifact::DirManifest;
use distillery_proto::v1 as pb;

use crate::artifacts::{ArtifactStore, BlobError};
use crate::engine::{now_ms, Engine};
use crate::machine::Event;

/// A boxed server stream.
pub type BoxStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// Streams a stored artifact to a caller, once its bytes are checked against its digest. A
/// corrupt one is never sent: it is moved out of the store, the engine learns which campaigns
/// depended on it (`Event::ArtifactCorrupt`), and the caller gets `DATA_LOSS`.
pub(crate) async fn stream_artifact(
    engine: &Engine,
    store: &ArtifactStore,
    digest: &str,
) -> Result<BoxStream<pb::Chunk>, tonic::Status> {
    use distillery_proto::artifact::ArtifactError;
    match store.get(digest).await {
        Ok(s) => Ok(Box::pin(s)),
        Err(BlobError::Artifact(ArtifactError::BadDigest(d))) => Err(
            tonic::Status::invalid_argument(ArtifactError::BadDigest(d).to_string()),
        ),
        Err(BlobError::Artifact(ArtifactError::Io { .. })) => {
            Err(tonic::Status::not_found(format!("no artifact {digest}")))
        }
        Err(BlobError::Artifact(e)) => Err(tonic::Status::internal(e.to_string())),
        Err(e @ BlobError::Corrupt { .. }) => {
            let BlobError::Corrupt { digest: hex, .. } = &e else {
                return Err(tonic::Status::internal(e.to_string()));
            };
            let mut refs = vec![format!("sha256:{hex}")];
            refs.extend(manifests_listing(engine, store, hex).await);
            let outcome = match engine
                .apply(Event::ArtifactCorrupt {
                    refs,
                    now: now_ms(),
                })
                .await
            {
                Ok(_) => "campaigns that needed it were told (see their status)".to_string(),
                Err(err) => format!("recording it failed: {err}"),
            };
            Err(tonic::Status::data_loss(format!("{e}; {outcome}")))
        }
    }
}

/// Directory manifests the state names (task inputs, outputs, checkpoints, round artifacts)
/// that list the blob `hex` as one of their files.
async fn manifests_listing(engine: &Engine, store: &ArtifactStore, hex: &str) -> Vec<String> {
    let named: BTreeSet<String> = engine.read(|s| {
        let tasks = s.tasks.values().flat_map(|t| {
            t.inputs
                .values()
                .chain(t.outputs.values())
                .chain(t.checkpoint.iter())
                .cloned()
        });
        let rounds = s.campaigns.values().flat_map(|c| {
            c.rounds
                .iter()
                .flat_map(|r| r.artifacts.values().chain(std::iter::once(&r.source)))
                .chain(c.teacher_artifacts.values())
                .cloned()
                .collect::<Vec<_>>()
        });
        tasks.chain(rounds).collect()
    });
    let mut out = Vec::new();
    for r in named {
        let Ok(path) = store.path_of(&r) else {
            continue; // `path:` references
        };
        // Manifests are small JSON; a model file is not one, and is not read here.
        let small = tokio::fs::metadata(&path)
            .await
            .is_ok_and(|m| m.len() <= 1 << 20);
        if !small {
            continue;
        }
        let Ok(bytes) = tokio::fs::read(&path).await else {
            continue;
        };
        if let Some(m) = DirManifest::parse(&bytes) {
            if m.files
                .iter()
                .any(|f| f.digest.trim_start_matches("sha256:") == hex)
            {
                out.push(r);
            }
        }
    }
    out
}

pub(crate) fn to_btree<V>(m: std::collections::HashMap<String, V>) -> BTreeMap<String, V> {
    m.into_iter().collect()
}
