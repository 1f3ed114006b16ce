//! `CampaignService`: what clients call.

use std::path::PathBuf;
use std::sync::Arc;

use distillery_proto::v1 as pb;
use distillery_proto::v1::campaign_service_server::CampaignService;
use tonic::{Request, Response, Status};

use super::{stream_artifact, BoxStream};
use crate::artifacts::ArtifactStore;
use crate::engine::{now_ms, Engine};
use crate::limits::check_spec_bytes;
use crate::machine::{campaign_view, Event, MachineError, Reply};
use crate::spec::{self, FileChecks};

pub struct Campaigns {
    pub engine: Arc<Engine>,
    pub artifacts: ArtifactStore,
    /// `--max-spec-bytes`: the TOML text, or the encoded spec a client parsed.
    pub max_spec_bytes: usize,
    /// The served data dir (named in backups, so a client can tell whose backup it got).
    pub data_dir: PathBuf,
}

impl Campaigns {
    fn view(&self, id: &str) -> Result<pb::Campaign, Status> {
        self.engine.read(|s| campaign_view(s, id)).ok_or_else(|| {
            Status::not_found(MachineError::UnknownCampaign(id.to_string()).to_string())
        })
    }
}

/// A spec sent as TOML text (clients without our parser), parsed and validated with the rules of
/// `coordinator submit`; its files are checked, and the teacher's shape read, on this machine.
async fn parse_toml(text: String, dir: String) -> Result<pb::CampaignSpec, Status> {
    let base = PathBuf::from(&dir);
    if !base.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "SubmitRequest.spec_dir {dir:?} is not an absolute path: send the spec file's folder, which relative paths in spec_toml resolve against"
        )));
    }
    // Reads files (the teacher's config or GGUF header): off the reactor.
    tokio::task::spawn_blocking(move || spec::parse(&text, &base, FileChecks::Local))
        .await
        .map_err(|e| Status::internal(format!("spec parser: {e}")))?
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl CampaignService for Campaigns {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = req.into_inner();
        check_spec_bytes(
            "SubmitRequest.spec_toml",
            req.spec_toml.len(),
            self.max_spec_bytes,
        )?;
        if let Some(spec) = &req.spec {
            use prost::Message as _;
            check_spec_bytes(
                "SubmitRequest.spec",
                spec.encoded_len(),
                self.max_spec_bytes,
            )?;
        }
        let spec =
            match (req.spec, req.spec_toml.is_empty()) {
                (Some(spec), true) => spec,
                (None, false) => parse_toml(req.spec_toml, req.spec_dir).await?,
                (Some(_), false) => {
                    return Err(Status::invalid_argument(
                        "SubmitRequest has both spec and spec_toml: send one",
                    ))
                }
                (None, true) => return Err(Status::invalid_argument(
                    "SubmitRequest.spec is missing: send a CampaignSpec, or the TOML in spec_toml",
                )),
            };
        match self
            .engine
            .apply(Event::Submit {
                spec: Box::new(spec),
                now: now_ms(),
            })
            .await?
        {
            Reply::CampaignId(id) => {
                tracing::info!(campaign = %id, "campaign submitted");
                Ok(Response::new(pb::SubmitResponse { campaign_id: id }))
            }
            other => Err(Status::internal(format!("submit answered {other:?}"))),
        }
    }

    async fn get(
        &self,
        req: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        Ok(Response::new(self.view(&req.into_inner().campaign_id)?))
    }

    async fn list(
        &self,
        _req: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let campaigns = self.engine.read(|s| {
            s.campaigns
                .keys()
                .filter_map(|id| campaign_view(s, id))
                .collect()
        });
        Ok(Response::new(pb::ListCampaignsResponse { campaigns }))
    }

    type WatchStream = BoxStream<pb::Event>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let id = req.campaign_id;
        self.view(&id)?;
        let engine = self.engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut durable = engine.subscribe();
            let mut next = req.from_seq.max(1);
            // Failed events seen; one that a later retry continued does not end the stream.
            let mut failed_seen = 0u32;
            loop {
                let upto = *durable.borrow_and_update();
                while next <= upto {
                    let batch = match engine.store().events_from(next, 512) {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                    if batch.is_empty() {
                        break;
                    }
                    for e in batch {
                        if e.seq > upto {
                            break;
                        }
                        next = e.seq + 1;
                        if e.campaign_id != id {
                            continue;
                        }
                        let state = pb::CampaignState::try_from(e.state);
                        let terminal = e.kind == "campaign_state"
                            && match state {
                                Ok(pb::CampaignState::Succeeded | pb::CampaignState::Cancelled) => {
                                    true
                                }
                                Ok(pb::CampaignState::Failed) => {
                                    failed_seen += 1;
                                    let retries = engine
                                        .read(|s| s.campaigns.get(&id).map_or(0, |c| c.retries));
                                    failed_seen > retries
                                }
                                _ => false,
                            };
                        if tx.send(Ok(e)).await.is_err() || terminal {
                            return;
                        }
                    }
                }
                // Asked to start past the end of a finished campaign: nothing more will come.
                let (finished, last) = engine.read(|s| {
                    (
                        s.campaigns.get(&id).is_some_and(|c| c.state.is_terminal()),
                        s.meta.last_seq,
                    )
                });
                if finished && next > last {
                    return;
                }
                if durable.changed().await.is_err() {
                    return;
                }
                // Woken by a failed store write: end the stream with it.
                if let Err(e) = engine.ensure_serving() {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CampaignRef>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let id = req.into_inner().campaign_id;
        self.engine
            .apply(Event::Cancel {
                campaign: id.clone(),
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(self.view(&id)?))
    }

    async fn pause(&self, req: Request<pb::CampaignRef>) -> Result<Response<pb::Campaign>, Status> {
        let id = req.into_inner().campaign_id;
        self.engine
            .apply(Event::Pause {
                campaign: id.clone(),
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(self.view(&id)?))
    }

    async fn resume(
        &self,
        req: Request<pb::CampaignRef>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let id = req.into_inner().campaign_id;
        self.engine
            .apply(Event::Resume {
                campaign: id.clone(),
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(self.view(&id)?))
    }

    async fn retry(&self, req: Request<pb::CampaignRef>) -> Result<Response<pb::Campaign>, Status> {
        let id = req.into_inner().campaign_id;
        self.engine
            .apply(Event::Retry {
                campaign: id.clone(),
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(self.view(&id)?))
    }

    type GetArtifactStream = BoxStream<pb::Chunk>;

    async fn get_artifact(
        &self,
        req: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        Ok(Response::new(
            stream_artifact(&self.engine, &self.artifacts, &req.into_inner().digest).await?,
        ))
    }

    type BackupStream = BoxStream<pb::BackupChunk>;

    async fn backup(
        &self,
        _req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let records = self.engine.backup().await?;
        let kind = self.engine.store().kind();
        crate::store::backup::check_encodable(&records)
            .map_err(|e| Status::data_loss(format!("backup: {e}")))?;
        let bytes = crate::store::backup::encode(&records, kind, now_ms());
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        let data_dir = std::fs::canonicalize(&self.data_dir)
            .unwrap_or_else(|_| self.data_dir.clone())
            .display()
            .to_string();
        tracing::info!(records = records.len(), bytes = bytes.len(), "backup taken");
        const CHUNK: usize = 1 << 20;
        let n = bytes.len().div_ceil(CHUNK).max(1);
        let total = bytes.len() as u64;
        let chunks: Vec<Result<pb::BackupChunk, Status>> = (0..n)
            .map(|i| {
                let data = bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec();
                Ok(pb::BackupChunk {
                    data,
                    digest: if i + 1 == n {
                        digest.clone()
                    } else {
                        String::new()
                    },
                    total_size: if i == 0 { total } else { 0 },
                    data_dir: if i == 0 {
                        data_dir.clone()
                    } else {
                        String::new()
                    },
                    engine: if i == 0 {
                        kind.to_string()
                    } else {
                        String::new()
                    },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}
