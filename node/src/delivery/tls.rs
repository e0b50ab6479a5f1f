//! Outbound TLS policy: which [`TlsPolicy`] a recipient domain gets
//! (`[[tls_policy]]`, `require_tls_domains`, default `may`), and the
//! certificate verification behind `verify`.
//!
//! Trusted roots for `verify` are the system's (rustls-native-certs: the
//! OpenSSL locations, `/etc/ssl/certs` on Debian, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` when set) plus `[delivery] tls_ca_file`. The chain check
//! is webpki's ([`WebPkiServerVerifier`]): trust anchor, validity period,
//! key usage, signatures. The name check:
//! - no `names`: the host name connected to (the MX host, or the route's
//!   host), as webpki matches it (SAN, one-label wildcards);
//! - `names = ["mx.example.com"]`: any of the names, same matching;
//! - `names = [".example.com"]`: any SAN DNS name under `example.com`
//!   (Postfix's `match=.example.com`), the chain then checked for that name.
//!
//! One rustls config is built per distinct policy at start (and again by a
//! config reload), so a handshake costs no set-up.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::client::{TlsPolicy, Verification};
use crate::config::{TlsLevel, TlsPolicies};

/// The TLS policy of every destination, built once from the config.
pub struct OutboundTls {
    policies: TlsPolicies,
    /// `verify` with the host name connected to.
    verify_host: TlsPolicy,
    /// `verify` with a policy's `names`, in the order of its entries.
    verify_named: Vec<(Vec<String>, TlsPolicy)>,
    /// `[dane] enabled`: destinations without a policy are at level `dane`.
    dane_default: bool,
}

impl OutboundTls {
    /// Loads the system roots and `tls_ca_file`; a CA file that cannot be
    /// read or holds no certificate is an error naming the key.
    pub fn new(policies: &TlsPolicies, ca_file: Option<&std::path::Path>) -> anyhow::Result<OutboundTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = roots(ca_file)?;
        let inner = if roots.is_empty() {
            tracing::warn!("no trusted roots (system or delivery.tls_ca_file): every verify destination will defer");
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .context("building the certificate verifier")?,
            )
        };
        let make = |names: Vec<String>| -> anyhow::Result<TlsPolicy> {
            let verifier = PolicyVerifier {
                inner: inner.clone(),
                names: names.clone(),
                provider: Arc::clone(&provider),
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            Ok(TlsPolicy::Verify(Arc::new(Verification {
                names,
                config: Arc::new(config),
            })))
        };
        let mut verify_named = Vec::new();
        for e in &policies.entries {
            if e.level == TlsLevel::Verify && !e.names.is_empty() && !verify_named.iter().any(|(n, _)| n == &e.names) {
                verify_named.push((e.names.clone(), make(e.names.clone())?));
            }
        }
        Ok(OutboundTls {
            policies: policies.clone(),
            verify_host: make(Vec::new())?,
            verify_named,
            dane_default: false,
        })
    }

    /// `[dane] enabled`: the default level becomes `dane` instead of `may`.
    pub fn with_dane_default(mut self, on: bool) -> OutboundTls {
        self.dane_default = on;
        self
    }

    /// `Some(required)` when `domain` is at level `dane` (`false`) or
    /// `dane-only` (`true`).
    pub fn dane_level(&self, domain: &str) -> Option<bool> {
        match self.policies.configured(domain).map(|r| r.level) {
            Some(TlsLevel::Dane) => Some(false),
            Some(TlsLevel::DaneOnly) => Some(true),
            None if self.dane_default => Some(false),
            _ => None,
        }
    }

    /// Whether any destination can be at a DANE level.
    pub fn uses_dane(&self) -> bool {
        self.dane_default
            || self
                .policies
                .entries
                .iter()
                .any(|e| matches!(e.level, TlsLevel::Dane | TlsLevel::DaneOnly))
    }

    /// `verify` with the host name connected to (MTA-STS `enforce`).
    pub fn verify_host(&self) -> TlsPolicy {
        self.verify_host.clone()
    }

    /// The policy for mail to recipient `domain` (lowercase). For the DANE
    /// levels, the policy when DANE does not apply ([`super::dane`]
    /// decides per MX host): `dane` is `may`; `dane-only` is `encrypt` (a
    /// route's hosts; MX destinations without DANE are deferred).
    pub fn policy_for(&self, domain: &str) -> TlsPolicy {
        let resolved = self.policies.level_for(domain);
        match resolved.level {
            TlsLevel::None => TlsPolicy::Disabled,
            TlsLevel::May | TlsLevel::Dane => TlsPolicy::Opportunistic,
            TlsLevel::DaneOnly => TlsPolicy::Required,
            TlsLevel::Encrypt => TlsPolicy::Required,
            TlsLevel::Verify if resolved.names.is_empty() => self.verify_host.clone(),
            TlsLevel::Verify => self
                .verify_named
                .iter()
                .find(|(n, _)| n.as_slice() == resolved.names)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| self.verify_host.clone()),
        }
    }
}

/// The system's roots and `tls_ca_file` (also trusted for MTA-STS policy hosts).
pub(super) fn roots(ca_file: Option<&std::path::Path>) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "loading system trusted roots");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system trusted roots");
    if let Some(path) = ca_file {
        let file = std::fs::File::open(path)
            .with_context(|| format!("delivery.tls_ca_file: cannot open {}", path.display()))?;
        let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("delivery.tls_ca_file: reading {}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "delivery.tls_ca_file: no PEM certificate in {}",
            path.display()
        );
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!(
                    "delivery.tls_ca_file: a certificate in {} is not a usable root",
                    path.display()
                )
            })?;
        }
    }
    Ok(roots)
}

/// webpki's chain check, with the names of the policy.
#[derive(Debug)]
struct PolicyVerifier {
    /// `None` when no root is trusted at all.
    inner: Option<Arc<WebPkiServerVerifier>>,
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

fn name_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        };
        let check =
            |name: &ServerName<'_>| inner.verify_server_cert(end_entity, intermediates, name, ocsp_response, now);
        if self.names.is_empty() {
            return check(server_name);
        }
        // Each expected name in turn; a chain problem ends the search.
        for expected in &self.names {
            let candidates: Vec<String> = match expected.strip_prefix('.') {
                None => vec![expected.clone()],
                Some(_) => presented_names_under(end_entity, expected),
            };
            for name in candidates {
                let Ok(name) = ServerName::try_from(name) else { continue };
                match check(&name) {
                    Ok(v) => return Ok(v),
                    Err(e) if name_mismatch(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate's SAN DNS names that lie under `suffix` (`.example.com`),
/// as concrete names webpki can check the chain for: a wildcard
/// `*.mx.example.com` becomes `wildcard.mx.example.com`.
fn presented_names_under(end_entity: &CertificateDer<'_>, suffix: &str) -> Vec<String> {
    let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else {
        return Vec::new();
    };
    cert.valid_dns_names()
        .map(str::to_ascii_lowercase)
        .filter(|n| n.ends_with(suffix))
        .map(|n| match n.strip_prefix("*.") {
            Some(rest) => format!("wildcard.{rest}"),
            None => n,
        })
        .filter(|n| n.ends_with(suffix))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;

    fn outbound(toml: &str) -> OutboundTls {
        let c = Config::from_toml(toml).unwrap();
        OutboundTls::new(&c.tls_policies, c.tls_ca_file.as_deref()).unwrap()
    }

    #[test]
    fn levels_map_to_client_policies() {
        let o = outbound(
            "[delivery]\nrequire_tls_domains = [\"bank.test\"]\n\n\
             [[tls_policy]]\ndomain = \"off.test\"\nlevel = \"none\"\n\n\
             [[tls_policy]]\ndomain = \".enc.test\"\nlevel = \"encrypt\"\n\n\
             [[tls_policy]]\ndomain = \"named.test\"\nlevel = \"verify\"\nnames = [\".named.test\"]\n",
        );
        assert_eq!(o.policy_for("off.test"), TlsPolicy::Disabled);
        assert_eq!(o.policy_for("a.enc.test"), TlsPolicy::Required);
        assert_eq!(o.policy_for("other.test"), TlsPolicy::Opportunistic);
        match o.policy_for("bank.test") {
            TlsPolicy::Verify(v) => assert!(v.names.is_empty()),
            p => panic!("{p:?}"),
        }
        match o.policy_for("named.test") {
            TlsPolicy::Verify(v) => assert_eq!(v.names, [".named.test"]),
            p => panic!("{p:?}"),
        }
        // Different policies never share a delivery site.
        let tags: std::collections::BTreeSet<String> =
            ["off.test", "a.enc.test", "other.test", "bank.test", "named.test"]
                .iter()
                .map(|d| o.policy_for(d).tag())
                .collect();
        assert_eq!(tags.len(), 5, "{tags:?}");
    }

    #[test]
    fn dane_levels_and_the_dane_default() {
        let toml = "[[tls_policy]]\ndomain = \"d.test\"\nlevel = \"dane\"\n\n\
                    [[tls_policy]]\ndomain = \"strict.test\"\nlevel = \"dane-only\"\n\n\
                    [[tls_policy]]\ndomain = \"plain.test\"\nlevel = \"may\"\n";
        let o = outbound(toml);
        assert!(o.uses_dane());
        assert_eq!(o.dane_level("d.test"), Some(false));
        assert_eq!(o.dane_level("strict.test"), Some(true));
        assert_eq!(o.dane_level("other.test"), None);
        // Without DANE: `dane` is `may`, `dane-only` is `encrypt`.
        assert_eq!(o.policy_for("d.test"), TlsPolicy::Opportunistic);
        assert_eq!(o.policy_for("strict.test"), TlsPolicy::Required);
        // `[dane] enabled`: domains without a policy are at `dane`; an explicit `may` stays.
        let o = outbound(toml).with_dane_default(true);
        assert_eq!(o.dane_level("other.test"), Some(false));
        assert_eq!(o.dane_level("plain.test"), None);
        assert!(!outbound("").uses_dane());
        assert!(outbound("").with_dane_default(true).uses_dane());
    }

    #[test]
    fn unreadable_or_empty_ca_file_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = OutboundTls::new(&TlsPolicies::default(), Some(&missing)).err().unwrap();
        assert!(format!("{e:#}").contains("delivery.tls_ca_file"), "{e:#}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = OutboundTls::new(&TlsPolicies::default(), Some(&empty)).err().unwrap();
        assert!(format!("{e:#}").contains("delivery.tls_ca_file"), "{e:#}");
    }

    /// Real handshakes with aiosmtpd presenting certificates from a test CA.
    mod handshake {
        #![allow(clippy::unwrap_used)]

        use super::*;
        use crate::delivery::client::{ClientConfig, ConnectError, Connection, Endpoint, Protocol};
        use crate::delivery::testpeers::{Aiosmtpd, TestCa};

        fn verify(ca: &TestCa, names: &[&str]) -> TlsPolicy {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let policies = TlsPolicies {
                entries: vec![crate::config::TlsPolicyEntry {
                    domain: "dest.test".into(),
                    level: TlsLevel::Verify,
                    names,
                }],
                require_tls_domains: Vec::new(),
            };
            OutboundTls::new(&policies, Some(&ca.cert))
                .unwrap()
                .policy_for("dest.test")
        }

        async fn connect(peer: &Aiosmtpd, host: &str, policy: TlsPolicy) -> Result<Connection, ConnectError> {
            let endpoint = Endpoint::Tcp {
                host: host.into(),
                addr: peer.peer.addr,
            };
            let config = ClientConfig {
                helo_name: "client.tern.test".into(),
                ..ClientConfig::default()
            };
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                Connection::connect(&endpoint, Protocol::Smtp, policy, &config),
            )
            .await
            .unwrap()
        }

        fn failure(r: Result<Connection, ConnectError>) -> String {
            match r {
                Err(ConnectError::Temporary(t)) => t,
                other => panic!("expected a temporary failure, got {other:?}"),
            }
        }

        #[tokio::test]
        async fn chain_and_names_are_checked() {
            if !Aiosmtpd::available() {
                return;
            }
            let ca = TestCa::new("Tern Test CA");
            let (cert, key) = ca.issue("good", &["mx.good.test", "*.pool.good.test"]);
            let peer = Aiosmtpd::start_with_cert(&cert, &key);

            // The MX host name, as connected to.
            let c = connect(&peer, "mx.good.test", verify(&ca, &[])).await.unwrap();
            assert!(c.tls_active());
            c.quit().await;
            let e = failure(connect(&peer, "mx.evil.test", verify(&ca, &[])).await);
            assert_eq!(e, "TLS verification failed for mx.evil.test: certificate name mismatch");

            // Expected names instead of the host name; `.domain` matches subdomains, wildcards too.
            for names in [
                &["other.test", "mx.good.test"][..],
                &[".good.test"],
                &[".pool.good.test"],
            ] {
                let c = connect(&peer, "127.0.0.1", verify(&ca, names)).await;
                assert!(c.as_ref().is_ok_and(|c| c.tls_active()), "{names:?}: {c:?}");
                c.unwrap().quit().await;
            }
            for names in [&["good.test"][..], &[".other.test"], &["mx.pool.good.test.evil"]] {
                let e = failure(connect(&peer, "mx.good.test", verify(&ca, names)).await);
                assert!(e.ends_with("certificate name mismatch"), "{names:?}: {e}");
            }

            // Another CA's certificate (or a self-signed one) with the right name.
            let other = TestCa::new("Other CA");
            let e = failure(connect(&peer, "mx.good.test", verify(&other, &[])).await);
            assert_eq!(
                e,
                "TLS verification failed for mx.good.test: certificate not signed by a trusted root"
            );
            let self_signed = Aiosmtpd::start(true, false);
            let e = failure(connect(&self_signed, "mx.example.test", verify(&ca, &[])).await);
            assert_eq!(
                e,
                "TLS verification failed for mx.example.test: self-signed certificate (a CA certificate presented as the server's)"
            );
            // `encrypt` (Required) takes it.
            let c = connect(&self_signed, "mx.example.test", TlsPolicy::Required)
                .await
                .unwrap();
            assert!(c.tls_active());
            c.quit().await;
        }
    }
}
