//! Message submission (RFC 6409) credentials for SMTP AUTH (RFC 4954): the
//! users file, which sender addresses each user owns, password checks off
//! the async runtime, and limits on failed attempts.
//!
//! Layout: [`users`] reads the users file and checks passwords, [`limiter`]
//! counts failures per client IP and per user name, and [`Authenticator`]
//! puts them together for the SMTP server, which asks it when a session
//! emits `Output::Authenticate`.

pub mod limiter;
pub mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use users::{hash_password, AuthUser, LineError, LineProblem, Owned, Ownership, UserStore, UsersFileError};

use crate::metrics::{AuthResult, SmtpMetrics};
use limiter::FailureLimiter;
use tern_smtp::sasl::Password;

/// The answer to one authentication attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthVerdict {
    /// `235 2.7.0`: the session is now this user's.
    Ok(AuthUser),
    /// `535 5.7.8`: wrong user name or password (counted as a failure).
    Invalid,
    /// `454 4.7.0`: too many recent failures from this IP or for this user;
    /// the password was not checked.
    RateLimited,
    /// `454 4.7.0`: the check could not be run.
    Unavailable,
}

impl tern_smtp::Senders for Ownership {
    fn owns(&self, address: &str) -> bool {
        Ownership::owns(self, address)
    }
}

impl From<AuthVerdict> for tern_smtp::AuthVerdict {
    fn from(verdict: AuthVerdict) -> Self {
        match verdict {
            AuthVerdict::Ok(user) => tern_smtp::AuthVerdict::Ok(tern_smtp::AuthUser {
                name: user.name,
                senders: user.senders,
            }),
            AuthVerdict::Invalid => tern_smtp::AuthVerdict::Invalid,
            AuthVerdict::RateLimited => tern_smtp::AuthVerdict::RateLimited,
            AuthVerdict::Unavailable => tern_smtp::AuthVerdict::Unavailable,
        }
    }
}

/// Checks credentials for the submission listeners (shared by all of them).
pub struct Authenticator {
    store: Arc<UserStore>,
    limiter: FailureLimiter,
    /// An argon2 check with the default parameters takes 19 MiB and tens of
    /// milliseconds of CPU: bound how many run at once, so a flood of AUTH
    /// attempts cannot exhaust memory through the blocking thread pool.
    checks: Arc<Semaphore>,
    metrics: SmtpMetrics,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `max_failures` within `window` per client IP and per user name, then
    /// `454` until the window has passed.
    pub fn new(store: UserStore, max_failures: u32, window: Duration, metrics: SmtpMetrics) -> Self {
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        Authenticator {
            store: Arc::new(store),
            limiter: FailureLimiter::new(max_failures, window),
            checks: Arc::new(Semaphore::new(parallel.max(2))),
            metrics,
        }
    }

    /// Checks `username`/`password` for a client at `ip`, logging and
    /// counting the outcome. The password hash is checked on a blocking
    /// thread (also for unknown users, against a dummy hash).
    pub async fn authenticate(
        &self,
        ip: IpAddr,
        mechanism: &'static str,
        username: String,
        password: Password,
    ) -> AuthVerdict {
        let ip = ip.to_canonical();
        if self.limiter.blocked(ip, &username, Instant::now()) {
            self.metrics.auth(AuthResult::RateLimited);
            warn!(peer = %ip, user = %username, mechanism, reason = "too many failures", "auth failed");
            return AuthVerdict::RateLimited;
        }
        let checked = match Arc::clone(&self.checks).acquire_owned().await {
            Ok(permit) => {
                let store = Arc::clone(&self.store);
                let name = username.clone();
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    store.current().verify(&name, password.as_bytes())
                })
                .await
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match checked {
            Ok(Some(user)) => {
                self.metrics.auth(AuthResult::Ok);
                info!(peer = %ip, user = %user.name, mechanism, "auth ok");
                AuthVerdict::Ok(user)
            }
            Ok(None) => {
                self.limiter.record_failure(ip, &username, Instant::now());
                self.metrics.auth(AuthResult::Failed);
                warn!(peer = %ip, user = %username, mechanism, reason = "bad credentials", "auth failed");
                AuthVerdict::Invalid
            }
            Err(e) => {
                self.metrics.auth(AuthResult::Error);
                warn!(peer = %ip, user = %username, mechanism, reason = "check failed", error = %e, "auth failed");
                AuthVerdict::Unavailable
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verdicts_and_rate_limit() {
        let h = hash_password(b"right").unwrap();
        let store = UserStore::from_text(&format!("alice@example.test:{h}\n")).unwrap();
        let metrics = crate::metrics::Metrics::new();
        let a = Authenticator::new(store, 2, Duration::from_secs(900), metrics.smtp.clone());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let pw = |p: &[u8]| Password::new(p.to_vec());
        let ok = a
            .authenticate(ip, "PLAIN", "ALICE@example.test".into(), pw(b"right"))
            .await;
        assert!(
            matches!(&ok, AuthVerdict::Ok(u) if u.name == "alice@example.test"),
            "{ok:?}"
        );
        let t = Instant::now();
        assert_eq!(
            a.authenticate(ip, "LOGIN", "nobody".into(), pw(b"x")).await,
            AuthVerdict::Invalid
        );
        let unknown = t.elapsed();
        let t = Instant::now();
        assert_eq!(
            a.authenticate(ip, "LOGIN", "alice@example.test".into(), pw(b"x")).await,
            AuthVerdict::Invalid
        );
        let known = t.elapsed();
        // An unknown user costs a hash check too (not a tight bound: shared CPUs).
        assert!(unknown * 4 > known, "unknown {unknown:?} vs known {known:?}");
        // Two failures from this IP: even the right password is refused unchecked.
        assert_eq!(
            a.authenticate(ip, "PLAIN", "alice@example.test".into(), pw(b"right"))
                .await,
            AuthVerdict::RateLimited
        );
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(matches!(
            a.authenticate(other, "PLAIN", "alice@example.test".into(), pw(b"right"))
                .await,
            AuthVerdict::Ok(_)
        ));
        let dir = tempfile::tempdir().unwrap();
        let text = metrics.encode(1, &crate::raft::groups::Groups::default(), dir.path());
        for line in [
            "tern_smtp_auth_total{result=\"ok\"} 2",
            "tern_smtp_auth_total{result=\"failed\"} 2",
            "tern_smtp_auth_total{result=\"rate_limited\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
