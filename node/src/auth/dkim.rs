//! DKIM signing of outbound mail (RFC 6376, RFC 8463 for Ed25519), with
//! mail-auth over ring.
//!
//! A message is outbound when its client authenticated (SMTP AUTH) or
//! connected from `[policy] relay_networks`. Its signing domain is the
//! domain of the RFC 5322 From address; it is signed with every `[[dkim]]`
//! entry of the most specific configured domain that is that domain or a
//! parent of it (several entries: key rotation, RSA + Ed25519 dual signing).
//! The DKIM-Signature fields are prepended once, before queueing, so every
//! Raft replica stores and later sends the same signed bytes.

pub mod keygen;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{DkimSigner, Done};
use mail_parser::{HeaderName, HeaderValue, MessageParser};
use rsa::pkcs8::ObjectIdentifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use tracing::{debug, info, warn};

use crate::config::{Canonicalization, DkimAlgorithm, DkimKeyConfig};
use crate::envelope::Envelope;

/// RSA modulus sizes ring can sign with (defined with the config's `[[dkim]]`).
pub use crate::config::{RSA_MAX_BITS, RSA_MIN_BITS};

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// A key file that cannot be used, named in the error.
#[derive(Debug, thiserror::Error)]
#[error("dkim key {file} ({selector}._domainkey.{domain}): {reason}")]
pub struct KeyError {
    pub file: PathBuf,
    pub domain: String,
    pub selector: String,
    pub reason: String,
}

/// One loaded `[[dkim]]` entry.
struct Key {
    domain: String,
    selector: String,
    algorithm: DkimAlgorithm,
    signer: DkimSigner<DkimKey, Done>,
}

/// The node's DKIM signing keys and the networks whose mail is outbound.
/// Cheap to clone (shared), so signing can move to a blocking thread.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<[Key]>,
    relay_networks: Arc<[IpNet]>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{}._domainkey.{} ({})", k.selector, k.domain, k.algorithm.name()))
            .collect();
        f.debug_struct("Signer").field("keys", &keys).finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads and checks every key file; `None` when there is no `[[dkim]]` entry.
    pub fn new(entries: &[DkimKeyConfig], relay_networks: &[IpNet]) -> Result<Option<Signer>, KeyError> {
        if entries.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::with_capacity(entries.len());
        for entry in entries {
            let (key, bits) = load_key(entry)?;
            info!(
                domain = %entry.domain,
                selector = %entry.selector,
                algorithm = entry.algorithm.name(),
                bits,
                file = %entry.private_key.display(),
                "dkim key loaded"
            );
            keys.push(Key {
                domain: entry.domain.clone(),
                selector: entry.selector.clone(),
                algorithm: entry.algorithm,
                signer: signer_for(entry, key),
            });
        }
        Ok(Some(Signer {
            keys: keys.into(),
            relay_networks: relay_networks.into(),
        }))
    }

    /// Mail we sign: from an authenticated user or a relay network.
    pub fn is_outbound(&self, envelope: &Envelope) -> bool {
        if envelope.auth_user.is_some() {
            return true;
        }
        envelope
            .client_ip
            .parse::<IpAddr>()
            .map(|ip| {
                let ip = ip.to_canonical();
                self.relay_networks.iter().any(|n| n.contains(&ip))
            })
            .unwrap_or(false)
    }

    /// Indexes of the keys that sign mail from `domain`: those of the
    /// longest configured domain equal to it or a parent of it.
    fn keys_for(&self, domain: &str) -> Vec<usize> {
        let matches = |d: &str| domain == d || domain.strip_suffix(d).is_some_and(|rest| rest.ends_with('.'));
        let Some(best) = self
            .keys
            .iter()
            .filter(|k| matches(&k.domain))
            .map(|k| k.domain.len())
            .max()
        else {
            return Vec::new();
        };
        (0..self.keys.len())
            .filter(|&i| self.keys[i].domain.len() == best && matches(&self.keys[i].domain))
            .collect()
    }

    /// The DKIM-Signature fields for `message`, one per key in `keys`,
    /// ready to prepend. CPU-bound (body hash, RSA): call off the runtime.
    fn signature_fields(&self, keys: &[usize], message: &[u8]) -> Result<Vec<u8>, mail_auth::Error> {
        let mut out = Vec::with_capacity(keys.len() * 512);
        for &i in keys {
            let signature = self.keys[i].signer.sign(message)?;
            out.extend_from_slice(signature.to_header().as_bytes());
        }
        Ok(out)
    }

    /// The message with DKIM-Signature fields prepended if it is outbound
    /// and we hold a key for its From domain; otherwise unchanged. A
    /// signing failure is logged and the message is passed on unsigned:
    /// losing or deferring mail is worse than an unsigned copy, and the
    /// keys were already checked at start.
    pub async fn sign(&self, envelope: &Envelope, message: Vec<u8>) -> Vec<u8> {
        if !self.is_outbound(envelope) {
            return message;
        }
        let Some(domain) = from_domain(&message) else {
            debug!(from = %envelope.reverse_path, "dkim: no single From domain, not signed");
            return message;
        };
        let keys = self.keys_for(&domain);
        if keys.is_empty() {
            debug!(domain = %domain, "dkim: no key for the From domain, not signed");
            return message;
        }
        // RSA signing (~1-2 ms per key) and hashing a large body would stall
        // this runtime worker; a blocking thread does it instead.
        let message = Arc::new(message);
        let (signer, shared, indexes) = (self.clone(), Arc::clone(&message), keys.clone());
        let fields = tokio::task::spawn_blocking(move || signer.signature_fields(&indexes, &shared)).await;
        let selectors = || {
            keys.iter()
                .map(|&i| format!("{}/{}", self.keys[i].domain, self.keys[i].selector))
                .collect::<Vec<_>>()
                .join(",")
        };
        match fields {
            Ok(Ok(fields)) => {
                debug!(domain = %domain, keys = %selectors(), "dkim signed");
                let mut out = Vec::with_capacity(fields.len() + message.len());
                out.extend_from_slice(&fields);
                out.extend_from_slice(&message);
                out
            }
            Ok(Err(e)) => {
                warn!(domain = %domain, keys = %selectors(), error = %e, "dkim signing failed; queued unsigned");
                Arc::try_unwrap(message).unwrap_or_else(|m| m.to_vec())
            }
            Err(e) => {
                warn!(domain = %domain, keys = %selectors(), error = %e, "dkim signing task failed; queued unsigned");
                Arc::try_unwrap(message).unwrap_or_else(|m| m.to_vec())
            }
        }
    }
}

/// The lowercase domain of the RFC 5322 From address, if the message has
/// exactly one From field and all its addresses share one domain.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = MessageParser::new().parse_headers(message)?;
    let mut fields = parsed.header_values(HeaderName::From);
    let value = fields.next()?;
    // Two From fields: malformed (RFC 5322 §3.6); receivers treat it as suspect.
    if fields.next().is_some() {
        return None;
    }
    let HeaderValue::Address(address) = value else {
        return None;
    };
    let mut domain: Option<String> = None;
    for addr in address.iter() {
        let d = addr
            .address()?
            .rsplit_once('@')?
            .1
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if d.is_empty() || domain.as_ref().is_some_and(|seen| *seen != d) {
            return None;
        }
        domain = Some(d);
    }
    domain
}

fn signer_for(entry: &DkimKeyConfig, key: DkimKey) -> DkimSigner<DkimKey, Done> {
    let canon = |c: Canonicalization| match c {
        Canonicalization::Simple => mail_auth::dkim::Canonicalization::Simple,
        Canonicalization::Relaxed => mail_auth::dkim::Canonicalization::Relaxed,
    };
    let mut signer = DkimSigner::from_key(key)
        .domain(entry.domain.clone())
        .selector(entry.selector.clone())
        .headers(entry.signed_header_list())
        .header_canonicalization(canon(entry.canonicalization.0))
        .body_canonicalization(canon(entry.canonicalization.1));
    if let Some(expire) = entry.expire {
        signer = signer.expiration(expire.as_secs());
    }
    signer
}

/// Reads the PEM key of `entry` and checks it fits its algorithm; returns
/// the key and its size in bits.
pub(crate) fn load_key(entry: &DkimKeyConfig) -> Result<(DkimKey, usize), KeyError> {
    let fail = |reason: String| KeyError {
        file: entry.private_key.clone(),
        domain: entry.domain.clone(),
        selector: entry.selector.clone(),
        reason,
    };
    let pem = std::fs::read(&entry.private_key).map_err(|e| fail(format!("cannot read: {e}")))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|_| fail("no unencrypted private key in PEM form (\"PRIVATE KEY\" or \"RSA PRIVATE KEY\")".into()))?;
    let kind = key_kind(&der);
    match (entry.algorithm, kind) {
        (DkimAlgorithm::RsaSha256, Some(KeyKind::Rsa { bits })) => {
            if bits < RSA_MIN_BITS {
                return Err(fail(format!(
                    "RSA key has {bits} bits; at least {RSA_MIN_BITS} are required (2048 recommended)"
                )));
            }
            if bits > RSA_MAX_BITS {
                return Err(fail(format!(
                    "RSA key has {bits} bits; at most {RSA_MAX_BITS} are supported"
                )));
            }
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| fail(format!("invalid RSA key: {e}")))?;
            Ok((DkimKey::Rsa(key), bits))
        }
        (DkimAlgorithm::Ed25519Sha256, Some(KeyKind::Ed25519)) => {
            // "maybe_unchecked" also takes PKCS#8 v1 files (OpenSSL's), which lack the public key.
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(der.secret_der())
                .map_err(|e| fail(format!("invalid Ed25519 key: {e}")))?;
            Ok((DkimKey::Ed25519(key), 256))
        }
        (algorithm, Some(kind)) => Err(fail(format!(
            "this is {} key but algorithm = {:?}",
            kind.name(),
            algorithm.name()
        ))),
        (_, None) => Err(fail(
            "not an RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8) private key".into(),
        )),
    }
}

enum KeyKind {
    Rsa { bits: usize },
    Ed25519,
}

impl KeyKind {
    fn name(&self) -> &'static str {
        match self {
            KeyKind::Rsa { .. } => "an RSA",
            KeyKind::Ed25519 => "an Ed25519",
        }
    }
}

/// What a DER private key holds, read from its ASN.1 structure.
fn key_kind(der: &PrivateKeyDer<'_>) -> Option<KeyKind> {
    let rsa_bits = |pkcs1: &[u8]| {
        let key = rsa::pkcs1::RsaPrivateKey::try_from(pkcs1).ok()?;
        let modulus = key.modulus.as_bytes();
        let first = *modulus.first()?;
        Some(KeyKind::Rsa {
            bits: modulus.len() * 8 - first.leading_zeros() as usize,
        })
    };
    match der {
        PrivateKeyDer::Pkcs1(k) => rsa_bits(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => {
            let info = rsa::pkcs8::PrivateKeyInfo::try_from(k.secret_pkcs8_der()).ok()?;
            if info.algorithm.oid == OID_RSA {
                rsa_bits(info.private_key)
            } else if info.algorithm.oid == OID_ED25519 {
                Some(KeyKind::Ed25519)
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use mail_auth::hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};

    use super::keygen::{self, GeneratedKey};
    use super::*;
    use crate::config::Config;
    use crate::delivery::testdns::DnsServer;

    const MESSAGE: &str = "Received: from client.test (client.test [127.0.0.1])\r\n\tby mx1.tern.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        From: \"Some One\"\r\n <someone@News.Example.TEST>\r\n\
        To: rcpt@elsewhere.test\r\n\
        Subject: a test\r\n\
        Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
        Message-ID: <1@example.test>\r\n\
        \r\n\
        Hello  there.\r\n\
        \r\n\
        \r\n";

    fn envelope(ip: &str, auth_user: Option<&str>) -> Envelope {
        Envelope {
            client_ip: ip.into(),
            auth_user: auth_user.map(str::to_owned),
            ..Envelope::default()
        }
    }

    /// `[[dkim]]` entries for (domain, selector, algorithm, key) written to `dir`.
    fn signer(dir: &Path, entries: &[(&str, &str, &GeneratedKey)], extra: &str) -> Result<Option<Signer>, KeyError> {
        let mut toml = String::new();
        for (domain, selector, key) in entries {
            let path = dir.join(format!("{selector}.{domain}.pem"));
            if !path.exists() {
                std::fs::write(&path, &key.private_pem).unwrap();
            }
            toml.push_str(&format!(
                "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{}\"\nprivate_key = \"{}\"\n{extra}\n",
                key.algorithm.name(),
                path.display()
            ));
        }
        let config = Config::from_toml(&toml).unwrap();
        Signer::new(&config.dkim, &config.relay_networks)
    }

    fn ed25519() -> GeneratedKey {
        keygen::generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap()
    }

    fn rsa2048() -> GeneratedKey {
        keygen::generate(DkimAlgorithm::RsaSha256, 2048).unwrap()
    }

    /// A resolver that asks only `server`.
    fn authenticator(server: &DnsServer) -> MessageAuthenticator {
        let mut udp = ConnectionConfig::udp();
        udp.port = server.addr.port();
        let ns = NameServerConfig::new(server.addr.ip(), true, vec![udp]);
        MessageAuthenticator::new(
            ResolverConfig::from_parts(None, vec![], vec![ns]),
            ResolverOpts::default(),
        )
        .unwrap()
    }

    /// A dnsmasq line publishing `key` at `selector._domainkey.domain`.
    fn txt_record(domain: &str, selector: &str, key: &GeneratedKey) -> String {
        let strings: Vec<String> = keygen::txt_strings(&key.txt_value())
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        format!("txt-record={selector}._domainkey.{domain},{}\n", strings.join(","))
    }

    async fn verify(auth: &MessageAuthenticator, message: &[u8]) -> Vec<DkimResult> {
        let parsed = AuthenticatedMessage::parse(message).unwrap();
        auth.verify_dkim(&parsed)
            .await
            .iter()
            .map(|o| o.result().clone())
            .collect()
    }

    #[test]
    fn from_domain_of_folded_and_encoded_fields() {
        let d = |m: &str| from_domain(m.as_bytes());
        assert_eq!(d(MESSAGE).as_deref(), Some("news.example.test"));
        assert_eq!(
            d("from: =?utf-8?q?J=C3=B6rg?= <j@Example.test.>\r\n\r\nx").as_deref(),
            Some("example.test")
        );
        assert_eq!(d("From: a@x.test, b@X.test\r\n\r\n").as_deref(), Some("x.test"));
        assert_eq!(d("From: team: a@x.test, b@x.test;\r\n\r\n").as_deref(), Some("x.test"));
        assert_eq!(d("From: a@x.test, b@y.test\r\n\r\n"), None);
        assert_eq!(d("From: a@x.test\r\nFrom: b@x.test\r\n\r\n"), None);
        assert_eq!(d("Sender: a@x.test\r\n\r\n"), None);
        assert_eq!(d("From: undisclosed\r\n\r\n"), None);
        assert_eq!(d(""), None);
    }

    #[test]
    fn which_keys_sign_which_domain() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519();
        let s = signer(
            dir.path(),
            &[
                ("example.test", "a", &key),
                ("example.test", "b", &key),
                ("news.example.test", "c", &key),
            ],
            "",
        )
        .unwrap()
        .unwrap();
        let selectors =
            |domain: &str| -> Vec<String> { s.keys_for(domain).iter().map(|&i| s.keys[i].selector.clone()).collect() };
        assert_eq!(selectors("example.test"), ["a", "b"]);
        assert_eq!(selectors("mail.example.test"), ["a", "b"], "parent domain");
        assert_eq!(selectors("news.example.test"), ["c"], "most specific domain wins");
        assert_eq!(selectors("a.news.example.test"), ["c"]);
        assert!(selectors("badexample.test").is_empty());
        assert!(selectors("test").is_empty());
        // Outbound: authenticated, or from relay_networks (default loopback).
        assert!(s.is_outbound(&envelope("192.0.2.1", Some("alice"))));
        assert!(s.is_outbound(&envelope("127.0.0.1", None)));
        assert!(s.is_outbound(&envelope("::ffff:127.0.0.1", None)));
        assert!(s.is_outbound(&envelope("::1", None)));
        assert!(!s.is_outbound(&envelope("192.0.2.1", None)));
        assert!(!s.is_outbound(&envelope("", None)));
    }

    #[test]
    fn key_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (ed, rsa) = (ed25519(), rsa2048());
        assert!(signer(dir.path(), &[], "").unwrap().is_none());
        // PKCS#8 for both; PKCS#1 for RSA.
        signer(
            dir.path(),
            &[("example.test", "ed", &ed), ("example.test", "rsa", &rsa)],
            "",
        )
        .unwrap();
        let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(&rsa.private_pem)
            .unwrap()
            .to_pkcs1_pem(LineEnding::LF)
            .unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let pkcs1_key = GeneratedKey {
            algorithm: DkimAlgorithm::RsaSha256,
            private_pem: pkcs1.to_string(),
            public_b64: String::new(),
        };
        signer(dir.path(), &[("example.test", "pkcs1", &pkcs1_key)], "").unwrap();

        let load_err = |name: &str, algorithm: &str, pem: Option<&str>| -> String {
            let path = dir.path().join(name);
            if let Some(pem) = pem {
                std::fs::write(&path, pem).unwrap();
            }
            let toml = format!(
                "[[dkim]]\ndomain = \"example.test\"\nselector = \"s\"\nalgorithm = \"{algorithm}\"\nprivate_key = \"{}\"\n",
                path.display()
            );
            let c = Config::from_toml(&toml).unwrap();
            let e = Signer::new(&c.dkim, &[]).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "error names the file: {e}");
            e
        };
        let e = load_err("missing.pem", "ed25519-sha256", None);
        assert!(e.contains("cannot read"), "{e}");
        let e = load_err("garbage.pem", "ed25519-sha256", Some("not a key\n"));
        assert!(e.contains("no unencrypted private key"), "{e}");
        let e = load_err("rsa-as-ed.pem", "ed25519-sha256", Some(&rsa.private_pem));
        assert!(e.contains("an RSA key but algorithm = \"ed25519-sha256\""), "{e}");
        let e = load_err("ed-as-rsa.pem", "rsa-sha256", Some(&ed.private_pem));
        assert!(e.contains("an Ed25519 key but algorithm = \"rsa-sha256\""), "{e}");
        let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024)
            .unwrap()
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap();
        let e = load_err("rsa1024.pem", "rsa-sha256", Some(&small));
        assert!(e.contains("RSA key has 1024 bits; at least 2048"), "{e}");
    }

    #[tokio::test]
    async fn signed_message_verifies_with_mail_auth() {
        let dir = tempfile::tempdir().unwrap();
        let (ed, rsa) = (ed25519(), rsa2048());
        let s = signer(
            dir.path(),
            &[("example.test", "ed", &ed), ("example.test", "rsa", &rsa)],
            "",
        )
        .unwrap()
        .unwrap();
        let dns = DnsServer::start(&(txt_record("example.test", "ed", &ed) + &txt_record("example.test", "rsa", &rsa)));
        let auth = authenticator(&dns);

        let signed = s.sign(&envelope("127.0.0.1", None), MESSAGE.as_bytes().to_vec()).await;
        let text = String::from_utf8(signed.clone()).unwrap();
        // Two signatures prepended; the message itself, Received first, is unchanged.
        assert!(text.starts_with("DKIM-Signature: "), "{text}");
        assert!(text.ends_with(MESSAGE), "{text}");
        assert_eq!(text.matches("DKIM-Signature:").count(), 2);
        assert!(
            text.contains("a=ed25519-sha256; s=ed; d=example.test; c=relaxed/relaxed"),
            "{text}"
        );
        assert!(
            text.contains("a=rsa-sha256; s=rsa; d=example.test; c=relaxed/relaxed"),
            "{text}"
        );
        let sig = &text[..text.find("Received:").unwrap()];
        let unfolded = sig.replace("\r\n\t", "");
        let h = unfolded.split("h=").nth(1).unwrap().split(';').next().unwrap();
        // Over-signed: From, To, Subject, Date appear twice; absent Cc once; Received never.
        let names: Vec<&str> = h.split(':').map(str::trim).collect();
        for name in ["From", "To", "Subject", "Date"] {
            assert_eq!(
                names.iter().filter(|n| n.eq_ignore_ascii_case(name)).count(),
                2,
                "{name} in {h}"
            );
        }
        assert_eq!(names.iter().filter(|n| n.eq_ignore_ascii_case("Cc")).count(), 1, "{h}");
        assert!(!names.iter().any(|n| n.eq_ignore_ascii_case("Received")), "{h}");
        assert!(!unfolded.contains("x="), "no expiry by default");

        assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass, DkimResult::Pass]);
        // Relaxed body: trailing blank lines and inner whitespace runs do not matter...
        let relaxed_same = text.replace("Hello  there.\r\n\r\n\r\n", "Hello there.\r\n");
        assert_eq!(
            verify(&auth, relaxed_same.as_bytes()).await,
            [DkimResult::Pass, DkimResult::Pass]
        );
        // ...a changed byte does, and so does an added From or Subject (over-signing).
        let tampered = text.replace("Hello  there.", "Hello  there!");
        let results = verify(&auth, tampered.as_bytes()).await;
        assert_eq!(results.len(), 2);
        assert!(
            results.iter().all(|r| format!("{r:?}").contains("FailedBodyHashMatch")),
            "{results:?}"
        );
        let added = text.replace("Subject: a test\r\n", "Subject: a test\r\nSubject: another\r\n");
        let results = verify(&auth, added.as_bytes()).await;
        assert!(results.iter().all(|r| matches!(r, DkimResult::Fail(_))), "{results:?}");
    }

    #[tokio::test]
    async fn simple_canonicalization_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ed = ed25519();
        let s = signer(
            dir.path(),
            &[("example.test", "ed", &ed)],
            "canonicalization = \"simple/simple\"\nexpire = \"7d\"\n",
        )
        .unwrap()
        .unwrap();
        let dns = DnsServer::start(&txt_record("example.test", "ed", &ed));
        let auth = authenticator(&dns);
        let signed = s
            .sign(&envelope("192.0.2.9", Some("u")), MESSAGE.as_bytes().to_vec())
            .await;
        let text = String::from_utf8(signed.clone()).unwrap();
        assert!(text.contains("c=simple/simple"), "{text}");
        let unfolded = text.replace("\r\n\t", "");
        let tag = |t: &str| -> u64 {
            unfolded
                .split(&format!("; {t}="))
                .nth(1)
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(tag("x") - tag("t"), 7 * 86400);
        assert_eq!(verify(&auth, &signed).await, [DkimResult::Pass]);
        // Simple: a refolded signed header no longer matches.
        let refolded = text.replace("Subject: a test", "Subject:  a test");
        assert!(matches!(
            verify(&auth, refolded.as_bytes()).await[..],
            [DkimResult::Fail(_)]
        ));
    }

    #[tokio::test]
    async fn inbound_and_foreign_mail_pass_unsigned() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), &[("example.test", "ed", &ed25519())], "")
            .unwrap()
            .unwrap();
        let body = MESSAGE.as_bytes().to_vec();
        // Not outbound: a client outside relay_networks, not authenticated.
        assert_eq!(s.sign(&envelope("192.0.2.1", None), body.clone()).await, body);
        // Outbound, but no key for the From domain.
        let other = MESSAGE.replace("News.Example.TEST", "other.test").into_bytes();
        assert_eq!(s.sign(&envelope("127.0.0.1", None), other.clone()).await, other);
        // Through the pipeline as the SMTP server calls it.
        let pipeline = crate::auth::Pipeline {
            dkim: Arc::new(arc_swap::ArcSwapOption::from_pointee(s)),
            ..Default::default()
        };
        let out = pipeline
            .process(&envelope("127.0.0.1", None), body.clone())
            .await
            .unwrap();
        assert!(out.starts_with(b"DKIM-Signature: ") && out.ends_with(&body));
    }

    #[test]
    fn generated_keys_and_txt_records() {
        let ed = ed25519();
        assert!(ed.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(ed.txt_value().starts_with("v=DKIM1; k=ed25519; p="));
        assert_eq!(BASE64_LEN_ED25519, ed.public_b64.len());
        let rsa = keygen::generate(DkimAlgorithm::RsaSha256, 3072).unwrap();
        assert!(rsa.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let value = rsa.txt_value();
        assert!(
            value.starts_with("v=DKIM1; k=rsa; p=MII"),
            "SubjectPublicKeyInfo: {value}"
        );
        let strings = keygen::txt_strings(&value);
        assert!(strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), value);
        assert_eq!(keygen::zone_txt("ab"), "\"ab\"");
        assert!(keygen::generate(DkimAlgorithm::RsaSha256, 1024).is_err());
        assert!(keygen::generate(DkimAlgorithm::RsaSha256, 8192).is_err());
        // The key file is created 0600 and never overwritten.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        keygen::write_private_key(&path, &ed.private_pem).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let e = keygen::write_private_key(&path, "x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), ed.private_pem);
    }

    /// Keys made by OpenSSL load, and OpenSSL reads the keys we make.
    #[test]
    fn keys_interoperate_with_openssl() {
        if !crate::delivery::testpeers::require("openssl") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ed_file = dir.path().join("ed.pem");
        let rsa_file = dir.path().join("rsa.pem");
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", ed_file.to_str().unwrap()]);
        openssl(&["genrsa", "-traditional", "-out", rsa_file.to_str().unwrap(), "2048"]);
        assert!(std::fs::read_to_string(&rsa_file)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let toml = format!(
            "[[dkim]]\ndomain = \"x.test\"\nselector = \"e\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\n\
             [[dkim]]\ndomain = \"x.test\"\nselector = \"r\"\nalgorithm = \"rsa-sha256\"\nprivate_key = \"{}\"\n",
            ed_file.display(),
            rsa_file.display()
        );
        let config = Config::from_toml(&toml).unwrap();
        Signer::new(&config.dkim, &[]).unwrap().unwrap();
        for (name, key) in [("ours-ed.pem", ed25519()), ("ours-rsa.pem", rsa2048())] {
            let path = dir.path().join(name);
            std::fs::write(&path, &key.private_pem).unwrap();
            openssl(&["pkey", "-in", path.to_str().unwrap(), "-noout"]);
        }
    }

    /// 32 bytes in base64.
    const BASE64_LEN_ED25519: usize = 44;
}
