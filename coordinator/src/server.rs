//! Assembles and runs the gRPC server: campaign and worker services behind the auth
//! interceptor, health, reflection, optional TLS, the ticker and the metrics endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use distillery_proto::client::MAX_MESSAGE_BYTES;
use distillery_proto::v1::campaign_service_server::CampaignServiceServer;
use distillery_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::campaigns::Campaigns;
use crate::api::workers::{WorkerTiming, Workers};
use crate::artifacts::ArtifactStore;
use crate::auth::{Auth, Role};
use crate::engine::Engine;
use crate::machine::{CampaignState, Config, TaskState};
use crate::store::{self, StateStore, StoreKind};

/// Everything `coordinator serve` is configured with.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub auth: Auth,
    /// PEM certificate chain and key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// PEM CA that signs workers' client certificates (mutual TLS; needs `tls`). Clients may
    /// connect without a certificate; `auth` decides which calls require one.
    pub tls_client_ca: Option<Vec<u8>>,
    pub metrics_listen: Option<SocketAddr>,
    pub machine: Config,
    pub timing: WorkerTiming,
    pub tick: Duration,
    /// Spec size, artifact bytes per campaign, calls in flight per peer.
    pub limits: crate::limits::Limits,
    /// Tests only: store writes fail when this says so (`faults::FaultyStore`).
    pub faults: Option<Arc<crate::faults::FaultInjection>>,
    /// `--store`: the engine of a fresh data dir; must match the one an existing dir holds.
    pub store: Option<StoreKind>,
}

impl ServeOptions {
    /// Defaults for a data dir, listening on `listen`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            listen,
            data_dir,
            auth: Auth::loopback_only(),
            tls: None,
            tls_client_ca: None,
            metrics_listen: None,
            machine: Config::default(),
            timing: WorkerTiming {
                heartbeat_interval: Duration::from_secs(5),
                poll_timeout: Duration::from_secs(25),
                rendezvous_timeout: Duration::from_secs(20),
            },
            tick: Duration::from_millis(200),
            limits: crate::limits::Limits::default(),
            faults: None,
            store: None,
        }
    }
}

/// A started server.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The engine of the state store.
    pub store: StoreKind,
    pub engine: Arc<Engine>,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Opens the data dir, recovers the state and starts serving; returns once the port is bound.
pub async fn start(opts: ServeOptions) -> anyhow::Result<RunningServer> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("cannot create data dir {}", opts.data_dir.display()))?;
    let store = store::open_data_dir(&opts.data_dir, opts.store)?;
    let engine_kind = store.kind();
    let artifacts = ArtifactStore::open(&opts.data_dir.join("artifacts")).with_context(|| {
        format!(
            "cannot open the artifact store in {}",
            opts.data_dir.display()
        )
    })?;
    let store: Arc<dyn StateStore> = match &opts.faults {
        Some(f) => Arc::new(crate::faults::FaultyStore::new(store, f.clone())),
        None => store,
    };
    let engine = Engine::open(store, opts.machine.clone())
        .await
        .context("cannot load the state store")?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    // Where this data dir is served, for `coordinator backup --data-dir` (online backup).
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    store::data_dir::write_durably(
        &opts.data_dir,
        store::data_dir::SERVE_URL_FILE,
        &format!("{scheme}://{host}\n"),
    )
    .with_context(|| {
        format!(
            "cannot write {} in {}",
            store::data_dir::SERVE_URL_FILE,
            opts.data_dir.display()
        )
    })?;
    tracing::debug!(store = %engine_kind, "state store opened");

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CampaignServiceServer<Campaigns>>()
        .await;
    health_reporter
        .set_serving::<WorkerServiceServer<Workers>>()
        .await;
    // Reflection in both versions: grpcurl and tonic speak v1, grpcio's Python reflection client
    // and older tools only v1alpha; each lists every service served, both reflections included.
    // Like health, reflection is not behind the auth interceptor: it reveals the public schema
    // only (what `proto/` holds), and tools need it before they have a token.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(distillery_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // After a failed store write every call is refused (UNAVAILABLE, naming the failure): the
    // state in memory may be ahead of the disk, so it is neither changed nor shown.
    let auth_c = opts.auth.clone();
    let engine_c = engine.clone();
    let campaigns = InterceptedService::new(
        CampaignServiceServer::new(Campaigns {
            engine: engine.clone(),
            artifacts: artifacts.clone(),
            max_spec_bytes: opts.limits.max_spec_bytes,
            data_dir: opts.data_dir.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        move |req: tonic::Request<()>| {
            auth_c.check(&req, Role::Client)?;
            engine_c.ensure_serving()?;
            Ok(req)
        },
    );
    let auth_w = opts.auth.clone();
    let engine_w = engine.clone();
    let workers = InterceptedService::new(
        WorkerServiceServer::new(Workers {
            engine: engine.clone(),
            artifacts,
            timing: opts.timing.clone(),
            max_artifact_bytes_per_campaign: opts.limits.max_artifact_bytes_per_campaign,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        move |req: tonic::Request<()>| {
            auth_w.check(&req, Role::Worker)?;
            engine_w.ensure_serving()?;
            Ok(req)
        },
    );

    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)));
    if let Some((cert, key)) = &opts.tls {
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &opts.tls_client_ca {
            // Optional at the handshake (clients have none), but a certificate that is
            // presented must chain to this CA, or the handshake fails.
            tls = tls
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        builder = builder
            .tls_config(tls)
            .context("invalid TLS certificate, key or client CA")?;
    } else if opts.tls_client_ca.is_some() {
        anyhow::bail!("a client CA (--tls-client-ca) needs TLS: give --tls-cert and --tls-key");
    }
    let router = builder
        .layer(crate::limits::PeerStreamLimit::new(
            opts.limits.max_streams_per_peer,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(campaigns)
        .add_service(workers);
    // Health follows the engine: NOT_SERVING once a store write failed, so probes and load
    // balancers see what every call would answer.
    let mut poisoned = engine.subscribe_poisoned();
    tokio::spawn(async move {
        while poisoned.changed().await.is_ok() {
            if poisoned.borrow_and_update().is_some() {
                health_reporter
                    .set_not_serving::<CampaignServiceServer<Campaigns>>()
                    .await;
                health_reporter
                    .set_not_serving::<WorkerServiceServer<Workers>>()
                    .await;
                health_reporter
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                break;
            }
        }
    });
    let ticker = engine.spawn_ticker(opts.tick);
    if let Some(m) = opts.metrics_listen {
        spawn_metrics(m, engine.clone()).await?;
    }
    // Our own listener (so port 0 works and the address is known before serving) loses the
    // builder's TCP_NODELAY: set it here, or small replies wait ~40 ms for delayed ACKs.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let handle = tokio::spawn(async move {
        let r = router.serve_with_incoming(incoming).await;
        ticker.abort();
        r.context("gRPC server stopped")
    });
    Ok(RunningServer {
        addr,
        store: engine_kind,
        engine,
        handle,
    })
}

/// The HTTP side port (`--metrics-listen`): Prometheus text on `GET /metrics`, a campaign's
/// HTML report on `GET /campaigns/ID/report`, its `status --json` object on
/// `GET /campaigns/ID/status`. Read-only, like the metrics (no token: bind it to a private
/// address).
async fn spawn_metrics(addr: SocketAddr, engine: Arc<Engine>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let engine = engine.clone();
            tokio::spawn(async move {
                // The request head: up to 8 KiB or the blank line.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) = http_route(&engine, method, path);
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = sock.write_all(body.as_bytes()).await;
                }
            });
        }
    });
    Ok(())
}

/// Answers one request of the side port: (status line, content type, body).
fn http_route(engine: &Engine, method: &str, path: &str) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            TEXT,
            format!("{method} {path}: only GET is served here\n"),
        );
    }
    let path = path.split('?').next().unwrap_or("");
    if let Err(e) = engine.ensure_serving() {
        return ("503 Service Unavailable", TEXT, format!("{e}\n"));
    }
    if path == "/metrics" || path == "/" {
        return ("200 OK", "text/plain; version=0.0.4", metrics_text(engine));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["campaigns", id, what @ ("report" | "status")] = parts.as_slice() {
        let Some(c) = engine.read(|s| crate::machine::campaign_view(s, id)) else {
            return (
                "404 Not Found",
                TEXT,
                format!("campaign {id} not found (list them with `coordinator status`)\n"),
            );
        };
        let v = crate::cli::campaign_json(&c);
        return if *what == "report" {
            (
                "200 OK",
                "text/html; charset=utf-8",
                crate::report::render(&v),
            )
        } else {
            ("200 OK", "application/json", format!("{v}\n"))
        };
    }
    (
        "404 Not Found",
        TEXT,
        format!("{path}: not found (try /metrics or /campaigns/ID/report)\n"),
    )
}

fn metrics_text(engine: &Engine) -> String {
    engine.read(|s| {
        let mut out = String::new();
        out.push_str("# TYPE distillery_campaigns gauge\n");
        for st in [
            CampaignState::Pending,
            CampaignState::Running,
            CampaignState::Paused,
            CampaignState::Succeeded,
            CampaignState::Failed,
            CampaignState::Cancelled,
        ] {
            let n = s.campaigns.values().filter(|c| c.state == st).count();
            out.push_str(&format!(
                "distillery_campaigns{{state=\"{}\"}} {n}\n",
                st.as_str()
            ));
        }
        out.push_str("# TYPE distillery_tasks gauge\n");
        for (st, name) in [
            (TaskState::Pending, "pending"),
            (TaskState::Leased, "leased"),
            (TaskState::Succeeded, "succeeded"),
            (TaskState::Failed, "failed"),
            (TaskState::Cancelled, "cancelled"),
        ] {
            let n = s.tasks.values().filter(|t| t.state == st).count();
            out.push_str(&format!("distillery_tasks{{state=\"{name}\"}} {n}\n"));
        }
        out.push_str(&format!(
            "# TYPE distillery_workers gauge\ndistillery_workers {}\n",
            s.workers.len()
        ));
        out.push_str(&format!(
            "# TYPE distillery_workers_polling gauge\ndistillery_workers_polling {}\n",
            s.waiting_workers().count()
        ));
        out.push_str(&format!(
            "# TYPE distillery_events_total counter\ndistillery_events_total {}\n",
            s.meta.last_seq
        ));
        out
    })
}
