//! The cluster's PKI: which Tern identity a TLS certificate names, and the
//! issuing of a cluster's certificates (`ternctl cert`).
//!
//! A Tern certificate names exactly one identity in a URI subject
//! alternative name:
//! - `tern://node/<id>`: a cluster node (peer RPCs: Raft, forwarding, the
//!   gathering behind cluster-wide status). Never an operator credential.
//! - `tern://client/<role>/<name>`: an operator (`ternctl`) with a role,
//!   `admin`, `operator` or `viewer`.
//!
//! A certificate with no such name, or with more than one, names no Tern
//! identity and is refused by both services.
//!
//! Files `ternctl cert` writes into its `--dir` (keys mode 0600, never
//! overwritten): `ca.crt`, `ca.key`, `node-<id>.crt`, `node-<id>.key`,
//! `client-<name>.crt`, `client-<name>.key`.

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use tern_model::NodeId;

pub const NODE_URI_PREFIX: &str = "tern://node/";
pub const CLIENT_URI_PREFIX: &str = "tern://client/";
/// Every node certificate also names this DNS name: the default
/// `[cluster] tls_server_name`, which peers check.
pub const DEFAULT_SERVER_NAME: &str = "tern-cluster";

/// What an operator may do, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Status, lists, stats; no message bodies.
    Viewer,
    /// Queue operations, drain, domain suspend/resume.
    Operator,
    /// Membership, shards, everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Role, PkiError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::BadName(format!("unknown role {s:?} (admin, operator or viewer)")))
    }
}

/// The Tern identity a certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertIdentity {
    Node(NodeId),
    Client { name: String, role: Role },
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertIdentity::Node(id) => write!(f, "{NODE_URI_PREFIX}{id}"),
            CertIdentity::Client { name, role } => write!(f, "{CLIENT_URI_PREFIX}{role}/{name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("{0}")]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists; not overwriting it")]
    Exists(PathBuf),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Client names: what audit events and file names show.
pub fn check_client_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(format!(
            "bad client name {name:?}: 1-64 of A-Z a-z 0-9 - _ . @, not starting with ."
        )))
    }
}

/// Parses one URI SAN; `None` if it is not a Tern identity URI at all.
fn parse_uri(uri: &str) -> Option<Result<CertIdentity, PkiError>> {
    if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
        return Some(
            id.parse::<NodeId>()
                .ok()
                .filter(|id| *id > 0)
                .filter(|n| n.to_string() == id)
                .map(CertIdentity::Node)
                .ok_or_else(|| PkiError::BadName(format!("bad node id in {uri:?}"))),
        );
    }
    let rest = uri.strip_prefix(CLIENT_URI_PREFIX)?;
    Some((|| {
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| PkiError::BadName(format!("{uri:?}: expected {CLIENT_URI_PREFIX}<role>/<name>")))?;
        let role: Role = role.parse()?;
        check_client_name(name)?;
        Ok(CertIdentity::Client {
            name: name.to_owned(),
            role,
        })
    })())
}

/// The identity a DER certificate names; `Ok(None)` when it names none.
/// A certificate naming two identities, or a malformed Tern URI, is an error.
pub fn identity(der: &[u8]) -> Result<Option<CertIdentity>, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Malformed(e.to_string()))?;
    let mut found: Option<CertIdentity> = None;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Malformed(e.to_string()))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else { continue };
        let Some(parsed) = parse_uri(uri) else { continue };
        let parsed = parsed?;
        if found.as_ref().is_some_and(|f| *f != parsed) {
            return Err(PkiError::BadName(format!(
                "certificate names two identities: {} and {parsed}",
                found.as_ref().map(ToString::to_string).unwrap_or_default()
            )));
        }
        found = Some(parsed);
    }
    Ok(found)
}

/// The identity named by the client certificate of a gRPC request's
/// connection (verified against the cluster CA by the TLS layer);
/// `Ok(None)` without TLS or without a client certificate.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Option<CertIdentity>, PkiError> {
    match peer_certificate(request) {
        Some(der) => identity(&der),
        None => Ok(None),
    }
}

/// The DER leaf certificate a gRPC client presented, if any.
pub fn peer_certificate<T>(request: &tonic::Request<T>) -> Option<Vec<u8>> {
    let chain = request.peer_certs()?;
    chain.first().map(|c| c.to_vec())
}

/// The serial number of a DER certificate (hex, as `openssl x509 -serial`
/// shows it), for logs.
pub fn serial(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| c.raw_serial_as_string().replace(':', "").to_ascii_uppercase())
        .unwrap_or_else(|_| "<malformed certificate>".into())
}

/// The subject of a DER certificate, for logs and audit events.
pub fn subject(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "<malformed certificate>".into())
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A cluster's certificate authority, loaded from or written to a directory.
pub struct Ca {
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// Validity of what `ternctl cert` issues unless told otherwise.
pub const DEFAULT_CA_DAYS: u32 = 3650;
pub const DEFAULT_CERT_DAYS: u32 = 825;

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: peers whose clocks run a little behind accept it at once.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn random_serial(params: &mut CertificateParams) {
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

impl Ca {
    /// A new self-signed CA.
    pub fn generate(common_name: &str, days: u32) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days);
        random_serial(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { key, cert })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
        };
        let cert_pem = read("ca.crt")?;
        let key = KeyPair::from_pem(&read("ca.key")?)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        // Re-signing the same subject and key gives an issuer whose name
        // and key identifier match the distributed ca.crt.
        let cert = params.self_signed(&key)?;
        Ok(Ca { key, cert })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A node certificate: `tern://node/<id>`, the given host names and
    /// addresses, and [`DEFAULT_SERVER_NAME`]; for both server and client use.
    pub fn issue_node(&self, id: NodeId, hosts: &[String], days: u32) -> Result<Issued, PkiError> {
        if id == 0 {
            return Err(PkiError::BadName("node ids start at 1".into()));
        }
        let mut sans = vec![SanType::URI(
            format!("{NODE_URI_PREFIX}{id}")
                .try_into()
                .map_err(|e| PkiError::BadName(format!("{e}")))?,
        )];
        let mut names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        if !names.contains(&DEFAULT_SERVER_NAME) {
            names.push(DEFAULT_SERVER_NAME);
        }
        for host in names {
            let host = host.trim();
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else {
                let dns = host
                    .to_owned()
                    .try_into()
                    .map_err(|e| PkiError::BadName(format!("bad host name {host:?}: {e}")))?;
                sans.push(SanType::DnsName(dns));
            }
        }
        self.issue(
            &format!("tern node {id}"),
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            days,
        )
    }

    /// An operator's client certificate: `tern://client/<role>/<name>`.
    pub fn issue_client(&self, name: &str, role: Role, days: u32) -> Result<Issued, PkiError> {
        check_client_name(name)?;
        let uri = format!("{CLIENT_URI_PREFIX}{role}/{name}")
            .try_into()
            .map_err(|e| PkiError::BadName(format!("{e}")))?;
        self.issue(
            name,
            vec![SanType::URI(uri)],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            days,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        days: u32,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        random_serial(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to a new file (never overwriting); `secret` files get mode 0600.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes an issued pair as `<stem>.crt` and `<stem>.key` in `dir`,
/// refusing to overwrite either; returns both paths.
pub fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> Result<(PathBuf, PathBuf), PkiError> {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    for p in [&cert, &key] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    write_new(&key, &issued.key_pem, true)?;
    write_new(&cert, &issued.cert_pem, false)?;
    Ok((cert, key))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("pem")
            .to_vec()
    }

    #[test]
    fn node_and_client_certificates_name_their_identity() {
        let ca = Ca::generate("test ca", 30).unwrap();
        let node = ca.issue_node(3, &["n3.example".into(), "10.0.0.3".into()], 30).unwrap();
        assert_eq!(identity(&der(&node.cert_pem)).unwrap(), Some(CertIdentity::Node(3)));
        let client = ca.issue_client("alice", Role::Operator, 30).unwrap();
        assert_eq!(
            identity(&der(&client.cert_pem)).unwrap(),
            Some(CertIdentity::Client {
                name: "alice".into(),
                role: Role::Operator
            })
        );
        // The CA itself names no identity.
        assert_eq!(identity(&der(&ca.cert_pem())).unwrap(), None);
        assert!(subject(&der(&client.cert_pem)).contains("alice"));
    }

    #[test]
    fn a_loaded_ca_issues_certificates_that_chain_to_the_written_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test ca", 30).unwrap();
        write_new(&dir.path().join("ca.crt"), &ca.cert_pem(), false).unwrap();
        write_new(&dir.path().join("ca.key"), &ca.key_pem(), true).unwrap();
        let loaded = Ca::load(dir.path()).unwrap();
        let node = loaded.issue_node(1, &[], 30).unwrap();
        // rustls' own verifier, against the ca.crt on disk.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.cert_pem()).into()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(&der(&node.cert_pem).into(), &[], now)
            .expect("node certificate chains to ca.crt");
        let key_mode = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
            0o600
        );
        assert!(matches!(
            write_new(&dir.path().join("ca.key"), "x", true),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn malformed_tern_names_are_errors() {
        assert!(parse_uri("tern://node/0").unwrap().is_err());
        assert!(parse_uri("tern://node/x").unwrap().is_err());
        assert!(parse_uri("tern://node/01").unwrap().is_err());
        assert!(parse_uri("tern://client/root/alice").unwrap().is_err());
        assert!(parse_uri("tern://client/admin/").unwrap().is_err());
        assert!(parse_uri("https://example.com/").is_none());
        assert!(check_client_name("ops-team.1").is_ok());
        assert!(check_client_name("a/b").is_err());
    }
}
