//! TLS certificate reload: a certificate chain and key read from two PEM
//! files, replaced in memory when the files change or on demand (SIGHUP),
//! without touching connections that are already up.
//!
//! # API
//! ```text
//! let watcher = CertWatcher::new(cert_path, key_path)?;   // loads now; bad files = error
//! watcher.current()        -> Arc<CertifiedKey>           // what new handshakes get
//! watcher.resolver()       -> Arc<dyn ResolvesServerCert> // for rustls::ServerConfig
//! watcher.reload_now()     -> Result<bool, CertError>     // read the files again (SIGHUP)
//! watcher.subscribe()      -> watch::Receiver<Arc<CertifiedKey>> // every new key
//! watcher.watch(interval, stop)                           // task polling the files
//! reload_on_sighup(vec![watcher, ...], stop)              // task: SIGHUP -> reload_now
//! ```
//! A server built with `ServerConfig::builder()...with_cert_resolver(watcher.resolver())`
//! picks up each new certificate at its next handshake; sessions already
//! running keep the keys they negotiated. A client-side user (the cluster's
//! mutual TLS) can [`CertWatcher::subscribe`] and rebuild its own config.
//!
//! # Rules
//! - A file pair that does not load (unreadable, no certificate, no key,
//!   key not matching the certificate) keeps the previous certificate;
//!   the failure is logged (`error`, with both paths) and counted in the
//!   counter given to [`CertWatcher::with_error_counter`]
//!   (`tern_tls_reload_errors_total` for the SMTP listeners).
//! - Polling compares each file's modification time, size and inode, so an
//!   atomic rename counts as a change. A pair that failed is retried only
//!   when a file changes again (no error every poll), or on `reload_now`.
//!   Writing the certificate and then the key (two changes) may log one
//!   mismatch in between; the second change loads the pair.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// Why a certificate/key pair could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no PEM certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("no PEM private key in {0}")]
    NoKey(PathBuf),
    #[error("{cert} and {key} do not make a usable pair: {reason}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        reason: rustls::Error,
    },
}

/// What the files looked like when last loaded (or tried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Stamps of (cert, key) when last read, successfully or not.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
    updates: watch::Sender<Arc<CertifiedKey>>,
    errors: Counter,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// A certificate and key that follow their files; cheap to clone.
#[derive(Clone)]
pub struct CertWatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertWatcher")
            .field("cert", &self.inner.cert_path)
            .field("key", &self.inner.key_path)
            .finish_non_exhaustive()
    }
}

impl CertWatcher {
    /// Loads the pair; an error here means there is nothing to serve.
    pub fn new(cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Result<CertWatcher, CertError> {
        Self::with_error_counter(cert_path, key_path, Counter::default())
    }

    /// As [`CertWatcher::new`]; every failed reload increments `errors`.
    pub fn with_error_counter(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        errors: Counter,
    ) -> Result<CertWatcher, CertError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = (stamp(&cert_path), stamp(&key_path));
        let key = Arc::new(load(&cert_path, &key_path, &provider)?);
        let (updates, _) = watch::channel(Arc::clone(&key));
        Ok(CertWatcher {
            inner: Arc::new(Inner {
                cert_path,
                key_path,
                current: RwLock::new(key),
                seen: Mutex::new(seen),
                updates,
                errors,
                provider,
            }),
        })
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.inner.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A resolver for `rustls::ServerConfig::with_cert_resolver`.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver(self.clone()))
    }

    /// Every certificate loaded from now on (the receiver starts with the current one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<CertifiedKey>> {
        self.inner.updates.subscribe()
    }

    /// Reads the files again, whether or not they changed. `Ok(true)` when
    /// the new pair differs from the one served; on `Err` the old one stays.
    pub fn reload_now(&self) -> Result<bool, CertError> {
        let inner = &self.inner;
        *inner.seen.lock().unwrap_or_else(|p| p.into_inner()) = (stamp(&inner.cert_path), stamp(&inner.key_path));
        match load(&inner.cert_path, &inner.key_path, &inner.provider) {
            Ok(key) => {
                let changed = self.current().cert != key.cert;
                if changed {
                    let key = Arc::new(key);
                    *inner.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&key);
                    inner.updates.send_replace(key);
                    tracing::info!(cert = %inner.cert_path.display(), key = %inner.key_path.display(), "TLS certificate reloaded");
                }
                Ok(changed)
            }
            Err(e) => {
                inner.errors.inc();
                tracing::error!(
                    cert = %inner.cert_path.display(),
                    key = %inner.key_path.display(),
                    error = %e,
                    "TLS certificate reload failed; keeping the previous certificate"
                );
                Err(e)
            }
        }
    }

    /// Reloads if either file changed since it was last read.
    pub fn reload_if_changed(&self) -> Result<bool, CertError> {
        let now = (stamp(&self.inner.cert_path), stamp(&self.inner.key_path));
        if *self.inner.seen.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        self.reload_now()
    }

    /// A task that checks the files every `interval` until `stop` turns true.
    pub fn watch(&self, interval: Duration, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // Errors are logged and counted inside.
                        let _ = me.reload_if_changed();
                    }
                    r = stop.changed() => if r.is_err() || *stop.borrow() { return },
                }
            }
        })
    }
}

/// A task that reloads every watcher on SIGHUP until `stop` turns true.
pub fn reload_on_sighup(
    watchers: Vec<CertWatcher>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!(certificates = watchers.len(), "SIGHUP: reloading TLS certificates");
                    for w in &watchers {
                        let _ = w.reload_now();
                    }
                }
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    }))
}

#[derive(Debug)]
struct Resolver(CertWatcher);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

fn load(
    cert_path: &Path,
    key_path: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate(cert_path.to_owned()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| CertError::Read {
            path: key_path.to_owned(),
            source,
        })?
        .ok_or_else(|| CertError::NoKey(key_path.to_owned()))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|reason| CertError::Unusable {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tern_testkit::peers::TestCa;

    fn copy(from: &(PathBuf, PathBuf), to: &(PathBuf, PathBuf)) {
        // Written beside, then renamed in, as deployment tools do.
        for (f, t) in [(&from.0, &to.0), (&from.1, &to.1)] {
            let tmp = t.with_extension("tmp");
            std::fs::copy(f, &tmp).unwrap();
            std::fs::rename(&tmp, t).unwrap();
        }
    }

    #[test]
    fn follows_the_files_and_keeps_the_old_pair_when_the_new_one_is_bad() {
        let ca = TestCa::new("Reload CA");
        let a = ca.issue("a", &["a.test"]);
        let b = ca.issue("b", &["b.test"]);
        let dir = tempfile::tempdir().unwrap();
        let live = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        copy(&a, &live);
        let errors = Counter::default();
        let w = CertWatcher::with_error_counter(&live.0, &live.1, errors.clone()).unwrap();
        let mut updates = w.subscribe();
        let first = w.current();
        assert!(!w.reload_if_changed().unwrap(), "nothing changed");

        copy(&b, &live);
        assert!(w.reload_if_changed().unwrap());
        assert_ne!(w.current().cert, first.cert);
        assert!(updates.has_changed().unwrap());
        assert_eq!(updates.borrow_and_update().cert, w.current().cert);
        let second = w.current();

        // A key that does not match the certificate, then garbage: B stays.
        std::fs::copy(&a.1, &live.1).unwrap();
        assert!(matches!(w.reload_now(), Err(CertError::Unusable { .. })));
        std::fs::write(&live.0, "garbage\n").unwrap();
        assert!(matches!(w.reload_if_changed(), Err(CertError::NoCertificate(_))));
        assert_eq!(w.current().cert, second.cert);
        assert_eq!(errors.get(), 2);
        // A failed pair is not retried until a file changes again.
        assert!(!w.reload_if_changed().unwrap());
        assert_eq!(errors.get(), 2);
        assert!(!updates.has_changed().unwrap());

        // Missing files at start are an error naming the path.
        let e = CertWatcher::new(dir.path().join("none.pem"), &live.1).unwrap_err();
        assert!(e.to_string().contains("none.pem"), "{e}");
    }
}
