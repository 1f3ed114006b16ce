//! Limits that keep one client, worker or spec from exhausting the coordinator, each with a
//! default, a `coordinator serve --max-...` flag and one error that names what, the limit and
//! the flag: spec size and artifact bytes per campaign (checked by the API), tasks per phase
//! (checked by the machine at submit, `Config::max_tasks_per_phase`), and calls in flight per
//! peer address (a tower layer in front of every service).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Default `--max-spec-bytes`: a spec is a page of TOML; 1 MiB is far beyond any real one.
pub const DEFAULT_MAX_SPEC_BYTES: usize = 1 << 20;
/// Default `--max-artifact-bytes-per-campaign`: 1 TiB (models, checkpoints, judgments).
pub const DEFAULT_MAX_ARTIFACT_BYTES_PER_CAMPAIGN: u64 = 1 << 40;
/// Default `--max-streams-per-peer`: calls in flight from one address (a worker holds a poll,
/// heartbeats, reports, rendezvous and downloads per rank; clients hold watches).
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 1024;

/// The configured limits (tasks per phase lives in the machine's `Config`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_spec_bytes: usize,
    pub max_artifact_bytes_per_campaign: u64,
    pub max_streams_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_spec_bytes: DEFAULT_MAX_SPEC_BYTES,
            max_artifact_bytes_per_campaign: DEFAULT_MAX_ARTIFACT_BYTES_PER_CAMPAIGN,
            max_streams_per_peer: DEFAULT_MAX_STREAMS_PER_PEER,
        }
    }
}

/// `INVALID_ARGUMENT` for a spec over `--max-spec-bytes`.
pub fn check_spec_bytes(what: &str, bytes: usize, limit: usize) -> Result<(), tonic::Status> {
    if bytes > limit {
        return Err(tonic::Status::invalid_argument(format!(
            "{what} is {bytes} bytes, over this coordinator's limit of {limit} bytes per spec (shorten it, or raise the limit with `coordinator serve --max-spec-bytes`)"
        )));
    }
    Ok(())
}

/// Calls in flight per peer address, shared by every connection.
#[derive(Clone, Debug)]
pub struct PeerStreamLimit {
    max: usize,
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerStreamLimit {
    pub fn new(max: usize) -> PeerStreamLimit {
        PeerStreamLimit {
            max,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn acquire(&self, ip: IpAddr) -> Result<PeerSlot, tonic::Status> {
        let mut m = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max {
            return Err(tonic::Status::resource_exhausted(format!(
                "peer {ip} has {n} calls in flight, this coordinator's limit per peer address (close some streams, or raise the limit with `coordinator serve --max-streams-per-peer`)"
            )));
        }
        *n += 1;
        Ok(PeerSlot {
            ip,
            in_flight: self.in_flight.clone(),
        })
    }
}

/// One call's place in its peer's count, given back when the response (stream) ends.
struct PeerSlot {
    ip: IpAddr,
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl<S> tower_layer::Layer<S> for PeerStreamLimit {
    type Service = PeerStreamLimited<S>;
    fn layer(&self, inner: S) -> PeerStreamLimited<S> {
        PeerStreamLimited {
            inner,
            limit: self.clone(),
        }
    }
}

/// The services behind a [`PeerStreamLimit`].
#[derive(Clone, Debug)]
pub struct PeerStreamLimited<S> {
    inner: S,
    limit: PeerStreamLimit,
}

fn peer_ip<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tonic::codegen::Service<http::Request<Body>> for PeerStreamLimited<S>
where
    S: tonic::codegen::Service<http::Request<Body>, Response = http::Response<Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let slot = match peer_ip(&req).map(|ip| self.limit.acquire(ip)) {
            Some(Err(status)) => return Box::pin(async move { Ok(status.into_http()) }),
            Some(Ok(slot)) => Some(slot),
            // No address: an in-process transport, not a network peer.
            None => None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| Body::new(SlotBody { body, _slot: slot })))
        })
    }
}

/// A response body that holds its call's slot until it is finished or dropped.
struct SlotBody {
    body: Body,
    _slot: Option<PeerSlot>,
}

impl http_body::Body for SlotBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
