//! Thin tonic adapters: translate and authorize, then hand the decision to the engine.

pub mod campaigns;
pub mod workers;

use std::collections::BTreeMap;
use std::pin::Pin;

use distillery_proto::v1 as pb;

use crate::artifacts::ArtifactStore;

/// A boxed server stream.
pub type BoxStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// Streams a stored artifact to a caller.
pub(crate) async fn stream_artifact(
    store: &ArtifactStore,
    digest: &str,
) -> Result<BoxStream<pb::Chunk>, tonic::Status> {
    use distillery_proto::artifact::ArtifactError;
    match store.get(digest).await {
        Ok(s) => Ok(Box::pin(s)),
        Err(ArtifactError::BadDigest(d)) => Err(tonic::Status::invalid_argument(
            ArtifactError::BadDigest(d).to_string(),
        )),
        Err(ArtifactError::Io { .. }) => {
            Err(tonic::Status::not_found(format!("no artifact {digest}")))
        }
        Err(e) => Err(tonic::Status::internal(e.to_string())),
    }
}

pub(crate) fn to_btree<V>(m: std::collections::HashMap<String, V>) -> BTreeMap<String, V> {
    m.into_iter().collect()
}
