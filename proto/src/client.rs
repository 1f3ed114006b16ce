//! Connecting to a coordinator: channel with optional TLS, and bearer-token injection.

use std::str::FromStr;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::campaign_service_client::CampaignServiceClient;
use crate::v1::worker_service_client::WorkerServiceClient;

/// Largest gRPC message either side accepts (artifacts move in 1 MiB chunks).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<BearerToken, ConnectError> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(BearerToken(None)),
            Some(t) => MetadataValue::from_str(&format!("Bearer {t}"))
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| ConnectError::BadToken),
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} is not a coordinator URL: use http://HOST:PORT or https://HOST:PORT")]
    BadUrl(String),
    #[error("the token has characters a gRPC header cannot carry")]
    BadToken,
    #[error("cannot read CA certificate {path}: {message}")]
    BadCa { path: String, message: String },
    #[error("cannot read the client certificate or key {path}: {message}")]
    BadIdentity { path: String, message: String },
    #[error("{0}: a client certificate (--tls-cert/--tls-key) needs an https:// coordinator URL")]
    IdentityNeedsTls(String),
    #[error(
        "cannot reach the coordinator at {url}: {message} (is `coordinator serve` running there?)"
    )]
    Unreachable { url: String, message: String },
}

/// How to reach a coordinator.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub url: String,
    pub token: Option<String>,
    /// PEM file of the CA that signed the coordinator's certificate (https only).
    pub ca_cert: Option<String>,
    /// PEM files (certificate chain, private key) this side presents for mutual TLS: a worker
    /// of a coordinator started with `--tls-client-ca` (https only).
    pub client_identity: Option<(String, String)>,
}

impl Target {
    fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(ConnectError::BadUrl(self.url.clone()));
        }
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|_| ConnectError::BadUrl(self.url.clone()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if self.client_identity.is_some() && !self.url.starts_with("https://") {
            return Err(ConnectError::IdentityNeedsTls(self.url.clone()));
        }
        if self.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                let pem = std::fs::read(ca).map_err(|e| ConnectError::BadCa {
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.client_identity {
                let read = |p: &String| {
                    std::fs::read(p).map_err(|e| ConnectError::BadIdentity {
                        path: p.clone(),
                        message: e.to_string(),
                    })
                };
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            ep = ep.tls_config(tls).map_err(|e| ConnectError::BadCa {
                path: self.ca_cert.clone().unwrap_or_default(),
                message: e.to_string(),
            })?;
        }
        Ok(ep)
    }

    /// A channel that connects on first use (and reconnects after failures).
    pub fn lazy_channel(&self) -> Result<Channel, ConnectError> {
        Ok(self.endpoint()?.connect_lazy())
    }

    /// Connects now, failing fast if the coordinator is not there.
    pub async fn channel(&self) -> Result<Channel, ConnectError> {
        self.endpoint()?
            .connect()
            .await
            .map_err(|e| ConnectError::Unreachable {
                url: self.url.clone(),
                message: error_chain(&e),
            })
    }

    pub fn campaigns(&self, ch: Channel) -> Result<CampaignClient, ConnectError> {
        Ok(
            CampaignServiceClient::with_interceptor(ch, BearerToken::new(self.token.as_deref())?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    pub fn workers(&self, ch: Channel) -> Result<WorkerClient, ConnectError> {
        Ok(
            WorkerServiceClient::with_interceptor(ch, BearerToken::new(self.token.as_deref())?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }
}

pub type CampaignClient = CampaignServiceClient<InterceptedService<Channel, BearerToken>>;
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

/// An error and its causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The gist of a multi-line usage error (clap's rendering) on one line.
pub fn one_line_usage_error(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string();
    match (first.ends_with(':'), lines.next()) {
        (true, Some(next)) => format!("{first} {next}"),
        _ => first,
    }
}
