//! Bearer-token authorization with two roles, compared in constant time. Without a tokens file
//! only loopback peers are served.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// Who may call what: clients use `CampaignService`, workers `WorkerService`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Worker,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {message}")]
    Tokens { path: String, message: String },
}

/// Accepted tokens with their roles.
type Tokens = Arc<Vec<(Role, Vec<u8>)>>;

/// The tokens a server accepts, or none (loopback only).
#[derive(Clone, Debug)]
pub struct Auth {
    tokens: Option<Tokens>,
    /// Mutual TLS for workers: a worker call must also come with a client certificate that the
    /// TLS layer verified against `--tls-client-ca`.
    worker_certificates: bool,
}

impl Auth {
    /// Loopback peers only, no tokens.
    pub fn loopback_only() -> Auth {
        Auth {
            tokens: None,
            worker_certificates: false,
        }
    }

    /// Reads a tokens file: one `ROLE TOKEN` per line (`client` or `worker`), `#` comments.
    pub fn from_file(path: &Path) -> Result<Auth, AuthError> {
        let err = |message: String| AuthError::Tokens {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(role), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(err(format!(
                    "line {}: expected `ROLE TOKEN` (roles: client, worker)",
                    i + 1
                )));
            };
            let role = match role {
                "client" => Role::Client,
                "worker" => Role::Worker,
                other => {
                    return Err(err(format!(
                        "line {}: unknown role {other:?}: use client or worker",
                        i + 1
                    )))
                }
            };
            if token.len() < 16 {
                return Err(err(format!(
                    "line {}: token is shorter than 16 characters; use a long random token",
                    i + 1
                )));
            }
            tokens.push((role, token.as_bytes().to_vec()));
        }
        if tokens.is_empty() {
            return Err(err(
                "has no tokens: add lines like `client <token>` and `worker <token>`".into(),
            ));
        }
        Ok(Auth {
            tokens: Some(Arc::new(tokens)),
            worker_certificates: false,
        })
    }

    /// Whether tokens are required.
    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// Requires, in addition to the token rules, a verified client certificate on every
    /// worker call (the server's TLS checks it against `--tls-client-ca`).
    pub fn with_worker_certificates(mut self) -> Auth {
        self.worker_certificates = true;
        self
    }

    /// Checks a request for `role`.
    pub fn check<T>(&self, req: &Request<T>, role: Role) -> Result<(), Status> {
        if role == Role::Worker && self.worker_certificates {
            // Present only when the handshake verified a chain to the client CA; a certificate
            // from another CA never gets this far (the handshake fails).
            let verified = req.peer_certs().is_some_and(|c| !c.is_empty());
            if !verified {
                return Err(Status::unauthenticated(
                    "this coordinator requires workers to present a client certificate signed by its --tls-client-ca: start the worker with --tls-cert FILE --tls-key FILE (and --tls-ca FILE)",
                ));
            }
        }
        self.check_token(req, role)
    }

    fn check_token<T>(&self, req: &Request<T>, role: Role) -> Result<(), Status> {
        let Some(tokens) = &self.tokens else {
            return match req.remote_addr() {
                Some(SocketAddr::V4(a)) if a.ip().is_loopback() => Ok(()),
                Some(SocketAddr::V6(a)) if a.ip().is_loopback() => Ok(()),
                // No address: an in-process transport, not the network.
                None => Ok(()),
                Some(a) => Err(Status::unauthenticated(format!(
                    "peer {a} refused: this coordinator runs without --tokens and serves loopback only; start it with --tokens FILE"
                ))),
            };
        };
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "missing `authorization: Bearer <token>`: pass --token or set DISTILLERY_TOKEN",
            )
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("malformed authorization header: expected `Bearer <token>`")
            })?
            .as_bytes();
        // Compare against every token without stopping early, so timing says nothing.
        let mut role_ok = subtle::Choice::from(0u8);
        let mut any_ok = subtle::Choice::from(0u8);
        for (r, t) in tokens.iter() {
            let eq = t.as_slice().ct_eq(presented);
            any_ok |= eq;
            role_ok |= eq & subtle::Choice::from(u8::from(*r == role));
        }
        if bool::from(role_ok) {
            Ok(())
        } else if bool::from(any_ok) {
            Err(Status::permission_denied(format!(
                "this token may not call {} methods",
                role.as_str()
            )))
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[test]
    fn roles_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "# comment\nclient cccccccccccccccccccc\nworker wwwwwwwwwwwwwwwwwwww\n",
        )
        .unwrap();
        let a = Auth::from_file(&p).unwrap();
        assert!(a
            .check(&req(Some("cccccccccccccccccccc")), Role::Client)
            .is_ok());
        assert_eq!(
            a.check(&req(Some("cccccccccccccccccccc")), Role::Worker)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            a.check(&req(Some("wwwwwwwwwwwwwwwwwwww")), Role::Client)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            a.check(&req(Some("nope-nope-nope-nope")), Role::Client)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.check(&req(None), Role::Client).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn without_tokens_only_loopback_peers_are_served() {
        let a = Auth::loopback_only();
        let with_peer = |addr: &str| {
            let mut r = Request::new(());
            r.extensions_mut()
                .insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: Some(addr.parse().unwrap()),
                });
            r
        };
        assert!(a.check(&with_peer("127.0.0.1:5000"), Role::Client).is_ok());
        assert!(a.check(&with_peer("[::1]:5000"), Role::Worker).is_ok());
        let e = a
            .check(&with_peer("192.0.2.7:5000"), Role::Client)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("--tokens"));
    }

    #[test]
    fn bad_token_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        for bad in [
            "",
            "admin xxxxxxxxxxxxxxxxxxxxxx\n",
            "client short\n",
            "client a b\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(Auth::from_file(&p).is_err(), "{bad:?}");
        }
    }
}
