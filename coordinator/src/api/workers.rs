//! `WorkerService`: what workers call.

use std::sync::Arc;
use std::time::Duration;

use distillery_proto::v1 as pb;
use distillery_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status, Streaming};

use super::{stream_artifact, to_btree, BoxStream};
use crate::artifacts::ArtifactStore;
use crate::engine::{now_ms, Engine};
use crate::machine::{Event, LeaseRef, Reply};

/// Timing the server tells its workers.
#[derive(Debug, Clone)]
pub struct WorkerTiming {
    pub heartbeat_interval: Duration,
    pub poll_timeout: Duration,
    pub rendezvous_timeout: Duration,
}

pub struct Workers {
    pub engine: Arc<Engine>,
    pub artifacts: ArtifactStore,
    pub timing: WorkerTiming,
    /// `--max-artifact-bytes-per-campaign`.
    pub max_artifact_bytes_per_campaign: u64,
}

fn lease_ref(l: Option<pb::LeaseRef>) -> Result<LeaseRef, Status> {
    let l = l.ok_or_else(|| {
        Status::invalid_argument("lease is missing: every report names (task_id, lease_id, rank)")
    })?;
    Ok(LeaseRef {
        task_id: l.task_id,
        lease_id: l.lease_id,
        rank: l.rank,
    })
}

fn to_pb(l: LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        task_id: l.task_id,
        lease_id: l.lease_id,
        rank: l.rank,
    }
}

impl Workers {
    /// Outputs and checkpoints must name artifacts this coordinator holds.
    fn check_artifact(&self, what: &str, r: &str) -> Result<(), Status> {
        if r.starts_with("path:") {
            return Ok(());
        }
        if distillery_proto::artifact::parse_digest(r).is_err() {
            return Err(Status::invalid_argument(format!(
                "{what} {r:?} is neither a sha256 digest nor path:..."
            )));
        }
        if !self.artifacts.contains(r) {
            return Err(Status::invalid_argument(format!(
                "{what} {r} was never uploaded: PutArtifact it first"
            )));
        }
        Ok(())
    }
}

impl Workers {
    /// Refuses a report whose new artifacts would take its campaign over
    /// `--max-artifact-bytes-per-campaign` (counting every distinct output and current
    /// checkpoint of the campaign's tasks, directory artifacts by their files): the attempt
    /// fails for good (the campaign with it, so `coordinator retry` continues it once the limit
    /// is raised) and the worker gets `RESOURCE_EXHAUSTED`. Nothing that was stored is lost.
    async fn check_campaign_bytes(
        &self,
        lease: &LeaseRef,
        new: impl Iterator<Item = &String>,
    ) -> Result<(), Status> {
        let limit = self.max_artifact_bytes_per_campaign;
        let Some((campaign, mut refs)) = self.engine.read(|s| {
            let c = s.tasks.get(&lease.task_id)?.campaign.clone();
            let refs: std::collections::BTreeSet<String> = s
                .campaigns
                .get(&c)?
                .tasks
                .iter()
                .filter_map(|t| s.tasks.get(t))
                .flat_map(|t| t.outputs.values().chain(t.checkpoint.iter()).cloned())
                .collect();
            Some((c, refs))
        }) else {
            return Ok(()); // unknown task: the engine refuses the report by name
        };
        let before = refs.len();
        refs.extend(new.cloned());
        if refs.len() == before {
            return Ok(());
        }
        let mut total = 0u64;
        for r in &refs {
            total = total.saturating_add(self.artifacts.stored_bytes(r).await);
        }
        if total <= limit {
            return Ok(());
        }
        let msg = format!(
            "campaign {campaign} would hold {total} artifact bytes with this report's, over this coordinator's limit of {limit} bytes per campaign (raise it with `coordinator serve --max-artifact-bytes-per-campaign`, then `coordinator retry {campaign}`)"
        );
        self.engine
            .apply(Event::Fail {
                lease: lease.clone(),
                error: msg.clone(),
                retryable: false,
                lost: false,
                now: now_ms(),
            })
            .await?;
        Err(Status::resource_exhausted(msg))
    }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let host = r.host.clone();
        match self
            .engine
            .apply(Event::Register {
                host: r.host,
                devices: r.devices,
                device_memory: r.device_memory,
                labels: to_btree(r.labels),
                version: r.version,
                task_kinds: r.task_kinds,
                nonce: rand::random(),
                previous: Some(r.previous_worker_id).filter(|p| !p.is_empty()),
                now: now_ms(),
            })
            .await?
        {
            Reply::WorkerId(id) => {
                tracing::info!(worker = %id, %host, "worker registered");
                Ok(Response::new(pb::RegisterResponse {
                    worker_id: id,
                    heartbeat_interval_ms: self.timing.heartbeat_interval.as_millis() as u64,
                    lease_timeout_ms: self.engine.config().lease_timeout_ms,
                    poll_timeout_ms: self.timing.poll_timeout.as_millis() as u64,
                }))
            }
            other => Err(Status::internal(format!("register answered {other:?}"))),
        }
    }

    async fn poll_task(
        &self,
        req: Request<pb::PollTaskRequest>,
    ) -> Result<Response<pb::PollTaskResponse>, Status> {
        let r = req.into_inner();
        let assignments = self
            .engine
            .poll(r.worker_id, r.free_devices, self.timing.poll_timeout)
            .await?;
        Ok(Response::new(pb::PollTaskResponse { assignments }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let leases = r
            .leases
            .into_iter()
            .map(|l| lease_ref(Some(l)))
            .collect::<Result<Vec<_>, _>>()?;
        match self
            .engine
            .apply(Event::Heartbeat {
                worker: r.worker_id,
                leases,
                now: now_ms(),
            })
            .await?
        {
            Reply::Heartbeat { renewed, cancelled } => Ok(Response::new(pb::HeartbeatResponse {
                renewed: renewed.into_iter().map(to_pb).collect(),
                cancelled: cancelled.into_iter().map(to_pb).collect(),
            })),
            other => Err(Status::internal(format!("heartbeat answered {other:?}"))),
        }
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let r = req.into_inner();
        let checkpoint = Some(r.checkpoint).filter(|c| !c.is_empty());
        if let Some(c) = &checkpoint {
            self.check_artifact("checkpoint", c)?;
        }
        let lease = lease_ref(r.lease)?;
        self.check_campaign_bytes(&lease, checkpoint.iter()).await?;
        self.engine
            .apply(Event::Progress {
                lease,
                metrics: finite_metrics(r.metrics)?,
                checkpoint,
                message: r.message,
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(pb::ReportProgressResponse {
            cancelled: false,
        }))
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = req.into_inner();
        for (name, v) in &r.outputs {
            self.check_artifact(&format!("output {name:?}"), v)?;
        }
        let lease = lease_ref(r.lease)?;
        self.check_campaign_bytes(&lease, r.outputs.values())
            .await?;
        self.engine
            .apply(Event::Complete {
                lease,
                outputs: to_btree(r.outputs),
                metrics: finite_metrics(r.metrics)?,
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::Ack>, Status> {
        let r = req.into_inner();
        self.engine
            .apply(Event::Fail {
                lease: lease_ref(r.lease)?,
                error: r.error,
                retryable: r.retryable,
                lost: r.lost,
                now: now_ms(),
            })
            .await?;
        Ok(Response::new(pb::Ack {}))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = req.into_inner();
        if r.payload.len() > 64 * 1024 {
            return Err(Status::invalid_argument(
                "rendezvous payload is over 64 KiB",
            ));
        }
        match self
            .engine
            .rendezvous(
                lease_ref(r.lease)?,
                r.key,
                r.payload,
                self.timing.rendezvous_timeout,
            )
            .await?
        {
            Some(payloads) => Ok(Response::new(pb::RendezvousResponse { payloads })),
            None => Err(Status::deadline_exceeded(
                "the other ranks have not arrived yet: call Rendezvous again",
            )),
        }
    }

    async fn put_artifact(
        &self,
        req: Request<Streaming<pb::Chunk>>,
    ) -> Result<Response<pb::PutArtifactResponse>, Status> {
        // Chunks may name the digest the uploader expects; it is checked once the data is hashed.
        let stream = req.into_inner();
        let (digest, size) = self.artifacts.put(stream).await.map_err(|e| match e {
            distillery_proto::artifact::ArtifactError::Mismatch { .. }
            | distillery_proto::artifact::ArtifactError::BadDigest(_) => {
                Status::data_loss(e.to_string())
            }
            other => Status::internal(other.to_string()),
        })?;
        Ok(Response::new(pb::PutArtifactResponse { digest, size }))
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
}

/// A report's metrics, refused whole (INVALID_ARGUMENT, nothing changes) when one is not a
/// finite number: the state store holds only what it can read back, and a NaN loss is a
/// worker's bug to report as a failure, not a value to keep.
fn finite_metrics(
    m: std::collections::HashMap<String, f64>,
) -> Result<std::collections::BTreeMap<String, f64>, Status> {
    if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_finite()) {
        return Err(Status::invalid_argument(format!(
            "metric {k:?} = {v} is not a finite number; report it as a task failure or leave it out"
        )));
    }
    Ok(m.into_iter().collect())
}
