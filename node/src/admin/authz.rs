//! Who is calling the AdminService, and may they (docs/security.md,
//! "Operators").
//!
//! A caller is identified, in this order, by:
//! 1. a client certificate naming `tern://client/<role>/<name>`;
//! 2. a bearer token (`authorization: Bearer <secret>`) matching the hash of
//!    an `[[admin_token]]`;
//! 3. the loopback default: a node with no operator credential configured
//!    (no `[[admin_token]]`, no cluster TLS) whose gRPC listens on loopback
//!    only lets every call through, as [`LOOPBACK_NAME`] with role admin.
//!
//! Anything else is `unauthenticated`. A node certificate is not an operator
//! credential: a call with one is refused (`permission_denied`), even if it
//! also carries a token. Nodes never call the admin service for each
//! other: what must run or be read on another node (a leader) travels as
//! typed peer RPCs (`PeerService`), authorised on the node the operator asked.
//!
//! `local_only` status, queue summary and stats are an operator's choice
//! (`ternctl shard list --local`) and need the viewer role like the rest;
//! nodes gather each other's parts through `PeerService`.
//!
//! Tokens cost an argon2 check (tens of ms, 19 MiB each): successful checks
//! are cached by the token's SHA-256 (at most [`CACHE_ENTRIES`]), at most
//! [`PARALLEL_CHECKS`] run at once, and an address that sent
//! [`MAX_FAILURES`] wrong tokens within [`FAILURE_WINDOW`] is refused
//! unchecked until the window has passed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use tokio::sync::Semaphore;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Status};
use tracing::warn;

use crate::config::AdminToken;
use crate::metrics::{AdminAuthResult, AdminMetrics};
use crate::pki::{CertIdentity, Role};
use crate::submission::limiter::FailureLimiter;

const AUTHORIZATION: &str = "authorization";
/// Who the loopback default lets through.
pub const LOOPBACK_NAME: &str = "anonymous@loopback";
/// Wrong tokens per client address within [`FAILURE_WINDOW`] before its
/// tokens are refused unchecked.
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// argon2 checks running at once (each takes a blocking thread and 19 MiB).
pub const PARALLEL_CHECKS: usize = 2;
/// Tokens whose successful check is remembered.
pub const CACHE_ENTRIES: usize = 256;

const NEED_CREDENTIAL: &str = "this node requires an operator credential: pass a token with \
     --token-file FILE or the TERN_TOKEN environment variable (one of the node's [[admin_token]]), \
     or a client certificate from `ternctl cert client` (--tls-ca, --tls-cert, --tls-key)";
const NODE_CERTIFICATE: &str = "a node certificate is not an operator credential";

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    Token,
    Certificate,
    LoopbackDefault,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Token => "token",
            How::Certificate => "certificate",
            How::LoopbackDefault => "loopback-default",
        }
    }
}

/// An authenticated caller of the admin service.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Token name, certificate name or [`LOOPBACK_NAME`].
    pub name: String,
    pub role: Role,
    pub how: How,
    /// The address the call came from.
    pub peer: Option<SocketAddr>,
}

/// A refused call: who it was as far as known, and the answer.
#[derive(Debug)]
pub struct Refusal {
    /// Name of the caller if it proved one, else `unauthenticated`.
    pub who: String,
    pub how: &'static str,
    pub status: Status,
}

/// The `[[admin_token]]` entries in force, with what was learnt about them.
struct Keys {
    tokens: Arc<[AdminToken]>,
    /// No operator credential configured and gRPC on loopback only.
    open: bool,
    /// SHA-256 of a token that passed its check -> index in `tokens`. It
    /// goes with the tokens it indexes: a reload starts an empty one, so a
    /// removed token is refused at once.
    cache: Mutex<HashMap<[u8; 32], usize>>,
}

/// The admin service's authentication and role checks.
pub struct Authz {
    /// Swapped whole by a config reload ([`Authz::set_tokens`]).
    keys: ArcSwap<Keys>,
    /// Whether the loopback default may apply (no cluster TLS, gRPC on loopback).
    loopback_only: bool,
    checks: Arc<Semaphore>,
    failures: FailureLimiter,
    metrics: AdminMetrics,
}

impl Authz {
    pub fn new(tokens: Vec<AdminToken>, cluster_tls: bool, listen_grpc: SocketAddr, metrics: AdminMetrics) -> Authz {
        let loopback_only = !cluster_tls && listen_grpc.ip().is_loopback();
        Authz {
            keys: ArcSwap::from_pointee(Keys::new(tokens, loopback_only)),
            loopback_only,
            checks: Arc::new(Semaphore::new(PARALLEL_CHECKS)),
            failures: FailureLimiter::new(MAX_FAILURES, FAILURE_WINDOW),
            metrics,
        }
    }

    /// Puts `tokens` in force (a config reload): calls checked from now on
    /// see only them; the first token configured closes the loopback
    /// default, removing the last one opens it again.
    pub fn set_tokens(&self, tokens: Vec<AdminToken>) {
        self.keys.store(Arc::new(Keys::new(tokens, self.loopback_only)));
    }

    /// True if every call is let through as [`LOOPBACK_NAME`].
    pub fn is_open(&self) -> bool {
        self.keys.load().open
    }

    /// True if `[[admin_token]]` entries exist (a bearer token can be checked).
    pub fn has_tokens(&self) -> bool {
        !self.keys.load().tokens.is_empty()
    }

    /// The caller of `request` if its role is at least `need`.
    pub async fn check<T>(&self, request: &Request<T>, need: Role) -> Result<Caller, Status> {
        self.judge(request, need).await.map_err(|r| r.status)
    }

    /// Identifies the caller and checks its role; a refusal says who it was.
    pub async fn judge<T>(&self, request: &Request<T>, need: Role) -> Result<Caller, Refusal> {
        let caller = self.identify(request).await?;
        if caller.role < need {
            self.metrics.auth(AdminAuthResult::Denied);
            warn!(
                who = %caller.name,
                how = caller.how.as_str(),
                role = %caller.role,
                need = %need,
                peer = ?caller.peer,
                "admin call refused: role too low"
            );
            return Err(Refusal {
                status: Status::permission_denied(format!(
                    "permission denied: {} ({}) has role {}; this needs role {need}",
                    caller.name,
                    caller.how.as_str(),
                    caller.role
                )),
                who: caller.name,
                how: caller.how.as_str(),
            });
        }
        self.metrics.auth(AdminAuthResult::Ok);
        Ok(caller)
    }

    async fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Refusal> {
        let peer = request.remote_addr();
        let bearer = request.metadata().get(AUTHORIZATION);
        let refuse = |result, who: String, how: &'static str, status: Status| {
            self.metrics.auth(result);
            warn!(%who, how, peer = ?peer, error = %status.message(), "admin call refused");
            Refusal { who, how, status }
        };
        match crate::pki::peer_identity(request) {
            Err(e) => {
                return Err(refuse(
                    AdminAuthResult::Unauthenticated,
                    "unauthenticated".into(),
                    "certificate",
                    Status::unauthenticated(format!("client certificate refused: {e}")),
                ))
            }
            Ok(Some(CertIdentity::Client { name, role })) => {
                return Ok(Caller {
                    name,
                    role,
                    how: How::Certificate,
                    peer,
                })
            }
            Ok(Some(CertIdentity::Node(id))) => {
                return Err(refuse(
                    AdminAuthResult::Denied,
                    format!("node {id}"),
                    "certificate",
                    Status::permission_denied(NODE_CERTIFICATE),
                ));
            }
            Ok(None) => {}
        }
        let keys = self.keys.load_full();
        match bearer {
            Some(value) if !keys.tokens.is_empty() => self
                .verify_token(&keys, value, peer)
                .await
                .map_err(|(result, status)| refuse(result, "unauthenticated".into(), "token", status)),
            _ if keys.open => Ok(Caller {
                name: LOOPBACK_NAME.into(),
                role: Role::Admin,
                how: How::LoopbackDefault,
                peer,
            }),
            _ => Err(refuse(
                AdminAuthResult::Unauthenticated,
                "unauthenticated".into(),
                "none",
                Status::unauthenticated(NEED_CREDENTIAL),
            )),
        }
    }

    /// Checks a bearer token against every `[[admin_token]]` hash.
    async fn verify_token(
        &self,
        keys: &Keys,
        value: &AsciiMetadataValue,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, (AdminAuthResult, Status)> {
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                (
                    AdminAuthResult::Unauthenticated,
                    Status::unauthenticated("malformed authorization metadata: expected `Bearer <token>`"),
                )
            })?
            .to_owned();
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref());
        let caller = |i: usize| {
            let token = &keys.tokens[i];
            Caller {
                name: token.name.clone(),
                role: token.role,
                how: How::Token,
                peer,
            }
        };
        if let Some(&i) = lock(&keys.cache).get(&key) {
            return Ok(caller(i));
        }
        let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        let ip_key = ip.to_canonical().to_string();
        if self.failures.blocked(ip, &ip_key, Instant::now()) {
            return Err((
                AdminAuthResult::RateLimited,
                Status::unauthenticated("too many wrong tokens from this address; try again in a minute"),
            ));
        }
        let permit = Arc::clone(&self.checks)
            .acquire_owned()
            .await
            .map_err(|e| (AdminAuthResult::Unauthenticated, Status::internal(e.to_string())))?;
        let tokens = Arc::clone(&keys.tokens);
        let found = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tokens.iter().position(|t| {
                PasswordHash::new(&t.hash)
                    .is_ok_and(|h| Argon2::default().verify_password(secret.as_bytes(), &h).is_ok())
            })
        })
        .await
        .map_err(|e| {
            (
                AdminAuthResult::Unauthenticated,
                Status::internal(format!("token check failed: {e}")),
            )
        })?;
        match found {
            Some(i) => {
                let mut cache = lock(&keys.cache);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, i);
                Ok(caller(i))
            }
            None => {
                self.failures.record_failure(ip, &ip_key, Instant::now());
                Err((
                    AdminAuthResult::Unauthenticated,
                    Status::unauthenticated("invalid token"),
                ))
            }
        }
    }
}

impl Keys {
    fn new(tokens: Vec<AdminToken>, loopback_only: bool) -> Keys {
        Keys {
            open: tokens.is_empty() && loopback_only,
            tokens: tokens.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token(name: &str, role: Role, secret: &[u8]) -> AdminToken {
        AdminToken {
            name: name.into(),
            role,
            hash: crate::submission::hash_password(secret).unwrap(),
        }
    }

    fn call(bearer: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(b) = bearer {
            r.metadata_mut().insert(AUTHORIZATION, b.parse().unwrap());
        }
        r
    }

    const LOOPBACK: &str = "127.0.0.1:7070";

    #[tokio::test]
    async fn loopback_default_only_without_credentials_on_loopback() {
        let open = Authz::new(Vec::new(), false, LOOPBACK.parse().unwrap(), AdminMetrics::default());
        let c = open.check(&call(None), Role::Admin).await.unwrap();
        assert_eq!((c.name.as_str(), c.how), (LOOPBACK_NAME, How::LoopbackDefault));
        for a in [
            Authz::new(
                Vec::new(),
                false,
                "0.0.0.0:7070".parse().unwrap(),
                AdminMetrics::default(),
            ),
            Authz::new(Vec::new(), true, LOOPBACK.parse().unwrap(), AdminMetrics::default()),
            Authz::new(
                vec![token("a", Role::Admin, b"s")],
                false,
                LOOPBACK.parse().unwrap(),
                AdminMetrics::default(),
            ),
        ] {
            let e = a.check(&call(None), Role::Viewer).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(e.message().contains("--token-file"), "{}", e.message());
        }
    }

    #[tokio::test]
    async fn tokens_roles_cache_and_rate_limit() {
        let metrics = AdminMetrics::default();
        let a = Authz::new(
            vec![
                token("ops", Role::Operator, b"op-secret"),
                token("look", Role::Viewer, b"view-secret"),
            ],
            false,
            LOOPBACK.parse().unwrap(),
            metrics,
        );
        let c = a.check(&call(Some("Bearer op-secret")), Role::Operator).await.unwrap();
        assert_eq!((c.name.as_str(), c.role, c.how), ("ops", Role::Operator, How::Token));
        // Cached: a second check does not run argon2 (fast even in debug builds).
        let t = Instant::now();
        a.check(&call(Some("Bearer op-secret")), Role::Viewer).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(5), "{:?}", t.elapsed());
        let e = a
            .check(&call(Some("Bearer view-secret")), Role::Operator)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("look") && e.message().contains("viewer") && e.message().contains("operator"),
            "{}",
            e.message()
        );
        for bad in ["Bearer nope", "Basic op-secret", "Bearer "] {
            let e = a.check(&call(Some(bad)), Role::Viewer).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        // Requests without a remote address share one key: fill its budget.
        for _ in 0..MAX_FAILURES {
            let _ = a.check(&call(Some("Bearer wrong")), Role::Viewer).await;
        }
        // Even a right token not checked before is refused unchecked now.
        let e = a
            .check(&call(Some("Bearer admin-secret")), Role::Viewer)
            .await
            .unwrap_err();
        assert!(e.message().contains("too many"), "{}", e.message());
        // A token verified before still passes (from the cache).
        a.check(&call(Some("Bearer op-secret")), Role::Viewer).await.unwrap();
    }

    /// A reload's tokens apply to the next call: a cached token that was
    /// removed is refused, a new one works, and the loopback default
    /// follows whether any token is left.
    #[tokio::test]
    async fn set_tokens_applies_to_the_next_call() {
        let a = Authz::new(
            vec![token("old", Role::Admin, b"old-secret")],
            false,
            LOOPBACK.parse().unwrap(),
            AdminMetrics::default(),
        );
        a.check(&call(Some("Bearer old-secret")), Role::Admin).await.unwrap();
        assert!(!a.is_open() && a.has_tokens());
        a.set_tokens(vec![token("new", Role::Viewer, b"new-secret")]);
        let e = a
            .check(&call(Some("Bearer old-secret")), Role::Viewer)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let c = a.check(&call(Some("Bearer new-secret")), Role::Viewer).await.unwrap();
        assert_eq!((c.name.as_str(), c.role), ("new", Role::Viewer));
        a.set_tokens(Vec::new());
        assert!(a.is_open() && !a.has_tokens());
        let c = a.check(&call(None), Role::Admin).await.unwrap();
        assert_eq!(c.how, How::LoopbackDefault);
    }
}
