//! DANE for SMTP (RFC 7672), outbound: DNSSEC-validated TLSA records of the
//! MX hosts decide how their certificates are checked (docs/security.md,
//! "DANE").
//!
//! For a destination at level `dane` or `dane-only` ([`Dane::decide`]):
//! - the MX RRset (or, without MX, the domain's address records) and each
//!   MX host's address records are looked up with a DNSSEC-validating
//!   resolver (hickory, trust anchor `[dane] trust_anchor`); a host whose
//!   addresses are secure gets its `_25._tcp.<host>` TLSA RRset looked up;
//! - a bogus answer anywhere, or a failed TLSA lookup of a secure host,
//!   takes that host out (RFC 7672 §2.2: never a downgrade); no host left:
//!   `451 4.7.5`, deferred;
//! - hosts with secure TLSA records are held to them ([`DaneVerifier`]),
//!   hosts without are still sent to over mandatory TLS (a shortcut: one
//!   TLS policy per destination, documented);
//! - no secure TLSA at all: `dane` falls back to `may`, `dane-only` defers
//!   (`451 4.7.5`).
//!
//! Matching (RFC 7672 §3.1, RFC 6698): usage DANE-EE (3) against the leaf
//! certificate only, names and dates ignored; DANE-TA (2) against a
//! certificate of the presented chain, which then must chain the leaf to it
//! for the MX host name (webpki: dates, signatures, names); PKIX usages
//! (0, 1) and unknown parameters are unusable. Only unusable records: TLS
//! is still required, any certificate (RFC 7672 §2.2).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hickory_proto::dnssec::{Proof, TrustAnchors};
use hickory_proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_proto::rr::rdata::TLSA;
use hickory_proto::rr::{RData, RecordType};
use hickory_proto::ProtoErrorKind;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::client::{TlsPolicy, Verification};
use crate::reports::tls::{Failure, FailureType, PolicyKind, TlsOutcome, TlsRecorder};

/// TLSA records kept per host; more is a hostile or broken zone.
const MAX_TLSA: usize = 32;

/// The DNSSEC-validating resolver and what DANE policies share.
pub struct Dane {
    dns: TokioResolver,
    provider: Arc<CryptoProvider>,
    reports: Arc<TlsRecorder>,
}

/// What DANE makes of one destination.
pub enum Decision {
    /// DANE does not apply (no secure TLSA): the level's fallback.
    NotApplicable { why: String },
    /// Send to these hosts only, with this policy.
    Apply { policy: TlsPolicy, hosts: Vec<String> },
    /// No host may be used: defer with this reply.
    Defer { reply: String },
}

/// How secure an answer is.
#[derive(Debug)]
enum Answer {
    Secure(Vec<RData>),
    /// Secure or not, the name has no record of that type.
    Missing,
    Insecure,
    Bogus(String),
    Failed(String),
}

/// Reads `[dane] trust_anchor`; the error names the key (also for
/// `ternd check-config` and a reload, before anything is swapped).
pub fn load_trust_anchor(path: &Path) -> anyhow::Result<TrustAnchors> {
    let anchors =
        TrustAnchors::from_file(path).map_err(|e| anyhow::anyhow!("dane.trust_anchor: {}: {e}", path.display()))?;
    anyhow::ensure!(
        !anchors.is_empty(),
        "dane.trust_anchor: no DNSKEY record in {}",
        path.display()
    );
    Ok(anchors)
}

impl Dane {
    /// A validating resolver asking `nameservers` (empty: the system's).
    /// `trust_anchor`: a file of DNSKEY records; `None`: the root keys.
    pub fn new(
        nameservers: &[SocketAddr],
        timeout: Duration,
        trust_anchor: Option<&Path>,
        reports: Arc<TlsRecorder>,
    ) -> anyhow::Result<Dane> {
        let (config, mut opts) = if nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().context("reading the system resolver configuration")?
        } else {
            let mut c = HickoryConfig::new();
            for addr in nameservers {
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                c.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            (c, ResolverOpts::default())
        };
        opts.timeout = timeout;
        opts.validate = true;
        opts.edns0 = true;
        opts.use_hosts_file = ResolveHosts::Never;
        let anchors = match trust_anchor {
            Some(path) => load_trust_anchor(path)?,
            None => TrustAnchors::default(),
        };
        let dns = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .with_trust_anchor(Arc::new(anchors))
            .build();
        Ok(Dane {
            dns,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            reports,
        })
    }

    async fn lookup(&self, name: &str, rtype: RecordType) -> Answer {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.dns.lookup(fqdn.as_str(), rtype).await {
            Ok(lookup) => {
                let mut data = Vec::new();
                let mut proofs = Vec::new();
                for proven in lookup.dnssec_iter() {
                    let (proof, rdata) = proven.into_parts();
                    if rdata.record_type() == rtype {
                        proofs.push(proof);
                        data.push(rdata.clone());
                    }
                }
                if proofs.contains(&Proof::Bogus) {
                    Answer::Bogus(format!("{fqdn} {rtype}: DNSSEC signature does not validate"))
                } else if proofs.is_empty() {
                    Answer::Missing
                } else if proofs.iter().all(|p| *p == Proof::Secure) {
                    Answer::Secure(data)
                } else {
                    Answer::Insecure
                }
            }
            Err(e) => match e.proto().map(|p| p.kind()) {
                Some(ProtoErrorKind::NoRecordsFound { .. }) => Answer::Missing,
                Some(ProtoErrorKind::Nsec { proof, .. }) => match proof {
                    Proof::Bogus => Answer::Bogus(format!("{fqdn} {rtype}: bogus DNSSEC denial of existence")),
                    _ => Answer::Insecure,
                },
                _ if e.to_string().contains("rrsig") || e.to_string().contains("RRSIG") => {
                    Answer::Bogus(format!("{fqdn} {rtype}: {e}"))
                }
                _ => Answer::Failed(format!("{fqdn} {rtype}: {e}")),
            },
        }
    }

    fn record(&self, domain: &str, host: Option<&str>, records: &[String], failure: Option<(FailureType, String)>) {
        self.reports.record(TlsOutcome {
            policy_domain: domain.to_owned(),
            policy: PolicyKind::Tlsa {
                records: records.to_vec(),
            },
            failure: failure.map(|(result_type, reason)| Failure {
                result_type,
                sending_mta_ip: None,
                receiving_mx_hostname: host.map(str::to_owned),
                receiving_ip: None,
                reason,
            }),
        });
    }

    /// DANE for mail to `domain` over `hosts` (the MX host names in order);
    /// `required`: level `dane-only`.
    pub async fn decide(&self, domain: &str, hosts: &[String], required: bool) -> Decision {
        let defer = |why: String| Decision::Defer {
            reply: format!("451 4.7.5 DANE: {why}"),
        };
        // RFC 7672 §2.2.1: an insecure MX RRset means no DANE for the domain.
        let mx = match self.lookup(domain, RecordType::MX).await {
            Answer::Missing => self.lookup(domain, RecordType::A).await,
            a => a,
        };
        match mx {
            Answer::Secure(_) => {}
            Answer::Bogus(why) => {
                self.record(domain, None, &[], Some((FailureType::DnssecInvalid, why.clone())));
                return defer(why);
            }
            // A failed validating lookup is no proof of insecurity: defer.
            Answer::Failed(why) => return defer(why),
            other => {
                let why = format!("MX RRset of {domain} is not DNSSEC-secure ({other:?})");
                if required {
                    self.record(domain, None, &[], Some((FailureType::DaneRequired, why.clone())));
                    return defer(why);
                }
                return Decision::NotApplicable { why };
            }
        }
        let mut secure: HashMap<String, Vec<TLSA>> = HashMap::new();
        let mut plain: Vec<String> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        for host in hosts {
            match self.host_secure(host).await {
                Ok(true) => {}
                Ok(false) => {
                    plain.push(host.clone());
                    continue;
                }
                Err(why) => {
                    self.record(domain, Some(host), &[], Some((FailureType::DnssecInvalid, why.clone())));
                    errors.push(why);
                    continue;
                }
            }
            match self.lookup(&format!("_25._tcp.{host}"), RecordType::TLSA).await {
                Answer::Secure(data) => {
                    let tlsa: Vec<TLSA> = data
                        .into_iter()
                        .filter_map(|d| match d {
                            RData::TLSA(t) => Some(t),
                            _ => None,
                        })
                        .take(MAX_TLSA)
                        .collect();
                    secure.insert(host.clone(), tlsa);
                }
                Answer::Missing | Answer::Insecure => plain.push(host.clone()),
                Answer::Bogus(why) => {
                    self.record(domain, Some(host), &[], Some((FailureType::DnssecInvalid, why.clone())));
                    errors.push(why);
                }
                Answer::Failed(why) => {
                    // A secure host whose TLSA lookup fails is not used (RFC 7672 §2.2).
                    self.record(domain, Some(host), &[], Some((FailureType::DnssecInvalid, why.clone())));
                    errors.push(why);
                }
            }
        }
        if secure.is_empty() {
            if !errors.is_empty() {
                return defer(errors.join("; "));
            }
            let why = format!("no DNSSEC-secure TLSA records for the MX hosts of {domain}");
            if required {
                self.record(domain, None, &[], Some((FailureType::DaneRequired, why.clone())));
                return defer(why);
            }
            return Decision::NotApplicable { why };
        }
        let keep: Vec<String> = hosts
            .iter()
            .filter(|h| secure.contains_key(*h) || (!required && plain.contains(h)))
            .cloned()
            .collect();
        let mut digest: Vec<String> = secure
            .iter()
            .flat_map(|(h, rs)| rs.iter().map(move |r| format!("{h}:{r}")))
            .collect();
        digest.sort();
        let verifier = DaneVerifier {
            domain: domain.to_owned(),
            hosts: secure,
            provider: Arc::clone(&self.provider),
            reports: Arc::clone(&self.reports),
        };
        let config = match rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth(),
            Err(e) => return defer(format!("TLS set-up: {e}")),
        };
        // The tag keeps DANE sessions apart from others' (and from older records).
        let tag = format!("dane:{:016x}", fnv(digest.join(",").as_bytes()));
        Decision::Apply {
            policy: TlsPolicy::Verify(Arc::new(Verification {
                names: vec![tag],
                config: Arc::new(config),
            })),
            hosts: keep,
        }
    }

    /// Whether the host's address records are DNSSEC-secure (RFC 7672
    /// §2.2.2); `Err` when bogus or the lookup failed (the host is not used).
    async fn host_secure(&self, host: &str) -> Result<bool, String> {
        let answer = match self.lookup(host, RecordType::A).await {
            Answer::Missing => self.lookup(host, RecordType::AAAA).await,
            a => a,
        };
        match answer {
            Answer::Secure(_) => Ok(true),
            Answer::Missing | Answer::Insecure => Ok(false),
            Answer::Bogus(why) | Answer::Failed(why) => Err(why),
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub use super::client::TlsaMismatch;

/// For site.rs: a connection error under DANE is a `451 4.7.5`.
pub fn deferral(endpoint: &super::Endpoint, error: &str) -> Option<String> {
    error
        .contains(&TlsaMismatch.to_string())
        .then(|| format!("451 4.7.5 {endpoint}: {error}"))
}

/// Checks the presented chain against the host's TLSA records.
#[derive(Debug)]
struct DaneVerifier {
    domain: String,
    /// Secure TLSA records by MX host name.
    hosts: HashMap<String, Vec<TLSA>>,
    provider: Arc<CryptoProvider>,
    reports: Arc<TlsRecorder>,
}

fn selected(cert: &[u8], selector: Selector) -> Option<Vec<u8>> {
    match selector {
        Selector::Full => Some(cert.to_vec()),
        Selector::Spki => x509_parser::parse_x509_certificate(cert)
            .ok()
            .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec()),
        _ => None,
    }
}

fn matches(record: &TLSA, cert: &[u8]) -> bool {
    let Some(content) = selected(cert, record.selector()) else {
        return false;
    };
    let want = record.cert_data();
    match record.matching() {
        Matching::Raw => content == want,
        Matching::Sha256 => ring::digest::digest(&ring::digest::SHA256, &content).as_ref() == want,
        Matching::Sha512 => ring::digest::digest(&ring::digest::SHA512, &content).as_ref() == want,
        _ => false,
    }
}

fn usable(record: &TLSA) -> bool {
    matches!(record.cert_usage(), CertUsage::DaneEe | CertUsage::DaneTa)
        && matches!(record.selector(), Selector::Full | Selector::Spki)
        && matches!(record.matching(), Matching::Raw | Matching::Sha256 | Matching::Sha512)
}

impl DaneVerifier {
    fn check(
        &self,
        records: &[TLSA],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        for r in records.iter().filter(|r| usable(r)) {
            match r.cert_usage() {
                // DANE-EE: the key (or certificate) alone; names and dates do not matter.
                CertUsage::DaneEe if matches(r, end_entity) => return true,
                CertUsage::DaneTa => {
                    for ta in intermediates.iter().filter(|c| matches(r, c)) {
                        let mut roots = RootCertStore::empty();
                        if roots.add(ta.clone()).is_err() {
                            continue;
                        }
                        let Ok(v) =
                            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
                                .build()
                        else {
                            continue;
                        };
                        // Reference identifiers: the MX host, then the next-hop domain (RFC 7672 §3.2.2).
                        let domain = ServerName::try_from(self.domain.as_str()).ok();
                        if std::iter::once(server_name)
                            .chain(domain.as_ref())
                            .any(|name| v.verify_server_cert(end_entity, intermediates, name, &[], now).is_ok())
                        {
                            return true;
                        }
                    }
                }
                _ => {}
            }
        }
        false
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let host = match server_name {
            ServerName::DnsName(n) => n.as_ref().trim_end_matches('.').to_ascii_lowercase(),
            other => other.to_str().into_owned(),
        };
        let Some(records) = self.hosts.get(&host) else {
            // A host of the destination without secure TLSA: mandatory TLS only.
            return Ok(ServerCertVerified::assertion());
        };
        let texts: Vec<String> = records.iter().map(ToString::to_string).collect();
        if !records.iter().any(usable) {
            // RFC 7672 §2.2: only unusable records: encrypt, unauthenticated.
            let why = "no usable TLSA record (only PKIX usages or unknown parameters)".to_string();
            self.record(&host, &texts, Some((FailureType::TlsaInvalid, why)));
            return Ok(ServerCertVerified::assertion());
        }
        if self.check(records, end_entity, intermediates, server_name, now) {
            self.record(&host, &texts, None);
            return Ok(ServerCertVerified::assertion());
        }
        tracing::warn!(domain = %self.domain, host = %host, "certificate matches no TLSA record");
        self.record(
            &host,
            &texts,
            Some((FailureType::ValidationFailure, TlsaMismatch.to_string())),
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(TlsaMismatch)),
        )))
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

impl DaneVerifier {
    fn record(&self, host: &str, records: &[String], failure: Option<(FailureType, String)>) {
        self.reports.record(TlsOutcome {
            policy_domain: self.domain.clone(),
            policy: PolicyKind::Tlsa {
                records: records.to_vec(),
            },
            failure: failure.map(|(result_type, reason)| Failure {
                result_type,
                sending_mta_ip: None,
                receiving_mx_hostname: Some(host.to_owned()),
                receiving_ip: host.parse::<IpAddr>().ok(),
                reason,
            }),
        });
    }
}

/// The hook in `Delivery::plan` for an MX destination: its TLS policy and
/// the hosts it may use (`None`: all), or the reply to defer with.
/// `required`: the DANE level of the domain (`None`: not a DANE level).
pub async fn for_site(
    dane: Option<&Dane>,
    required: Option<bool>,
    domain: &str,
    site: &super::resolve::Site,
    tls: TlsPolicy,
) -> Result<(TlsPolicy, Option<Vec<String>>), String> {
    let (Some(dane), Some(required)) = (dane, required) else {
        return Ok((tls, None));
    };
    if domain.starts_with('[') {
        return Ok((tls, None));
    }
    let hosts: Vec<String> = site.hosts.iter().map(|h| h.name.clone()).collect();
    match dane.decide(domain, &hosts, required).await {
        Decision::NotApplicable { why } => {
            tracing::debug!(domain, why, "DANE does not apply");
            Ok((tls, None))
        }
        Decision::Apply { policy, hosts } => Ok((policy, Some(hosts))),
        Decision::Defer { reply } => Err(reply),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sha(alg: &'static ring::digest::Algorithm, data: &[u8]) -> Vec<u8> {
        ring::digest::digest(alg, data).as_ref().to_vec()
    }

    #[test]
    fn dane_ee_matches_every_selector_and_matching_type() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mx.example.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        let spki = key.public_key_der();
        let ok = [
            TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                sha(&ring::digest::SHA256, &spki),
            ),
            TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha512,
                sha(&ring::digest::SHA512, &spki),
            ),
            TLSA::new(CertUsage::DaneEe, Selector::Spki, Matching::Raw, spki.clone()),
            TLSA::new(
                CertUsage::DaneEe,
                Selector::Full,
                Matching::Sha256,
                sha(&ring::digest::SHA256, &der),
            ),
            TLSA::new(CertUsage::DaneEe, Selector::Full, Matching::Raw, der.clone()),
        ];
        for r in &ok {
            assert!(usable(r) && matches(r, &der), "{r}");
        }
        // Another key, or a hash of the wrong part, does not match.
        let other = rcgen::KeyPair::generate().unwrap().public_key_der();
        let wrong = [
            TLSA::new(
                CertUsage::DaneEe,
                Selector::Spki,
                Matching::Sha256,
                sha(&ring::digest::SHA256, &other),
            ),
            TLSA::new(
                CertUsage::DaneEe,
                Selector::Full,
                Matching::Sha256,
                sha(&ring::digest::SHA256, &spki),
            ),
            TLSA::new(CertUsage::DaneEe, Selector::Spki, Matching::Sha256, Vec::new()),
        ];
        for r in &wrong {
            assert!(!matches(r, &der), "{r}");
        }
        // PKIX usages and unknown parameters are unusable for SMTP (RFC 7672 §3.1).
        for r in [
            TLSA::new(
                CertUsage::PkixEe,
                Selector::Spki,
                Matching::Sha256,
                sha(&ring::digest::SHA256, &spki),
            ),
            TLSA::new(CertUsage::PkixTa, Selector::Spki, Matching::Sha256, Vec::new()),
            TLSA::new(CertUsage::DaneEe, Selector::Unassigned(7), Matching::Sha256, Vec::new()),
            TLSA::new(CertUsage::DaneEe, Selector::Spki, Matching::Unassigned(9), Vec::new()),
        ] {
            assert!(!usable(&r), "{r}");
        }
        // A hostile certificate that does not parse matches no SPKI record.
        assert!(!matches(&ok[0], b"not a certificate"));
    }

    #[test]
    fn tlsa_mismatch_defers_with_4_7_5() {
        let ep = super::super::Endpoint::Tcp {
            host: "mx.example.test".into(),
            addr: "127.0.0.1:25".parse().unwrap(),
        };
        let reply = deferral(
            &ep,
            &format!("TLS verification failed for mx.example.test: {TlsaMismatch}"),
        )
        .unwrap();
        assert!(reply.starts_with("451 4.7.5 mx.example.test[127.0.0.1]: "), "{reply}");
        assert!(deferral(&ep, "connect to x: refused").is_none());
    }
}
