//! Mutual TLS for cluster gRPC (`[cluster] tls_cert, tls_key, tls_ca`),
//! with Tern's own acceptor and connector instead of tonic's built-in TLS,
//! so that the material can be reloaded without a restart.
//!
//! - Server: every accepted connection is handshaken with the newest
//!   server config ([`incoming`]); a client certificate signed by the CA is
//!   asked for but not required at the TLS layer (operators may use tokens;
//!   the peer services require a node certificate, see `raft/gate.rs`). The
//!   stream is tokio-rustls's, so tonic's `peer_certs()` and `remote_addr()`
//!   work as with its own TLS.
//! - Client: each new connection to node N is made with the newest
//!   material and checks that the server's certificate chains to the CA,
//!   names `tls_server_name`, and names `tern://node/N` (any node when the
//!   dialler does not know whom it reaches).
//! - Reload: [`ClusterTls::reload`] rebuilds everything from the files
//!   (keeping the old material if the new files are bad);
//!   [`ClusterTls::watch`] calls it when a file's mtime changes (polled every
//!   [`POLL`]) and on SIGHUP. Open connections keep their session.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};

use super::NodeId;
use tern_config::ClusterTlsFiles;
use tern_pki::CertIdentity;

/// How often the files' modification times are checked.
pub const POLL: Duration = Duration::from_secs(2);
/// Bound on one server-side TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the gRPC server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// Loaded cluster TLS material, shared (cheap to clone) and reloadable.
#[derive(Clone)]
pub struct ClusterTls(Arc<Inner>);

struct Inner {
    files: ClusterTlsFiles,
    current: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("files", &self.0.files)
            .finish_non_exhaustive()
    }
}

struct Material {
    server: Arc<rustls::ServerConfig>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    server_verifier: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    /// Modification times of cert, key and CA when read.
    mtimes: [Option<SystemTime>; 3],
}

fn mtimes(files: &ClusterTlsFiles) -> [Option<SystemTime>; 3] {
    [&files.cert, &files.key, &files.ca].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path).with_context(|| format!("{key}: opening {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{key}: reading certificates from {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{key}: no certificate in {}", path.display());
    Ok(certs)
}

impl Material {
    fn load(files: &ClusterTlsFiles) -> anyhow::Result<Material> {
        let stamps = mtimes(files);
        let certs = read_certs(&files.cert, "cluster.tls_cert")?;
        let key_file = std::fs::File::open(&files.key)
            .with_context(|| format!("cluster.tls_key: opening {}", files.key.display()))?;
        let key = rustls_pemfile::private_key(&mut io::BufReader::new(key_file))
            .with_context(|| format!("cluster.tls_key: reading {}", files.key.display()))?
            .with_context(|| format!("cluster.tls_key: no private key in {}", files.key.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs(&files.ca, "cluster.tls_ca")? {
            roots.add(ca).context("cluster.tls_ca: not a usable CA certificate")?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .context("cluster.tls_ca: client verifier")?;
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .context("cluster.tls_cert and cluster.tls_key do not match")?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .context("cluster.tls_ca: server verifier")?;
        Ok(Material {
            server: Arc::new(server),
            certs,
            key,
            server_verifier,
            provider,
            mtimes: stamps,
        })
    }
}

impl ClusterTls {
    pub fn load(files: &ClusterTlsFiles) -> anyhow::Result<ClusterTls> {
        let material = Material::load(files)?;
        Ok(ClusterTls(Arc::new(Inner {
            files: files.clone(),
            current: RwLock::new(Arc::new(material)),
        })))
    }

    fn current(&self) -> Arc<Material> {
        Arc::clone(&self.0.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Rebuilds the material from the files; new connections (accepted and
    /// dialled) use it. On error the old material stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let material = Material::load(&self.0.files)?;
        let serial = material.certs.first().map(|c| tern_pki::serial(c)).unwrap_or_default();
        *self.0.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        tracing::info!(cert = %self.0.files.cert.display(), serial = %serial, "cluster TLS reloaded");
        Ok(())
    }

    /// Reloads when a file changes (polled every [`POLL`]) or on SIGHUP, until `stop`.
    pub fn watch(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                    _ = stop.wait_for(|s| *s) => return,
                };
                if !forced && mtimes(&tls.0.files) == tls.current().mtimes {
                    continue;
                }
                if let Err(e) = tls.reload() {
                    tracing::warn!(error = %format!("{e:#}"), "cluster TLS not reloaded; the previous certificate stays in use");
                }
            }
        })
    }

    /// The newest server config (tests and the acceptor).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current().server)
    }

    /// A client config from the newest material that accepts only a server
    /// certificate naming node `expect` (any node certificate when None).
    pub fn client_config(&self, expect: Option<NodeId>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let m = self.current();
        let verifier = Arc::new(NodeVerifier {
            inner: Arc::clone(&m.server_verifier),
            expect,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&m.provider))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(m.certs.clone(), m.key.clone_key())
            .context("cluster.tls_cert and cluster.tls_key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    pub fn server_name(&self) -> &str {
        &self.0.files.server_name
    }
}

/// The CA's and the server name's check (webpki), then: the certificate
/// names the node the dialler meant to reach.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expect: Option<NodeId>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        match (tern_pki::identity(end_entity), self.expect) {
            (Ok(Some(CertIdentity::Node(id))), Some(expect)) if id == expect => Ok(verified),
            (Ok(Some(CertIdentity::Node(_))), None) => Ok(verified),
            (named, expect) => {
                let names = match named {
                    Ok(Some(identity)) => identity.to_string(),
                    Ok(None) => "no Tern identity".into(),
                    Err(e) => e.to_string(),
                };
                let wanted = expect.map_or_else(|| "a node".to_owned(), |e| format!("node {e}"));
                Err(rustls::Error::General(format!(
                    "the peer's certificate names {names}, expected {wanted}"
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An endpoint to a peer's gRPC address (TLS, if any, is the connector's:
/// see [`lazy_channel`]).
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{addr}")).map_err(|e| format!("{addr}: {e}"))
}

/// A lazily connecting channel; with cluster TLS each connection is made
/// by [`TlsConnect`] from the newest material, checking that the server is
/// node `expect`.
pub fn lazy_channel(endpoint: Endpoint, tls: Option<&ClusterTls>, expect: Option<NodeId>) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(TlsConnect {
            tls: tls.clone(),
            expect,
        }),
        None => endpoint.tcp_nodelay(true).connect_lazy(),
    }
}

/// Dials a peer over TCP and TLS (tonic's connector for [`lazy_channel`]).
#[derive(Clone)]
pub struct TlsConnect {
    tls: ClusterTls,
    expect: Option<NodeId>,
}

type TlsClientIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = TlsClientIo;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsClientIo, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no port in {uri}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let config = this.tls.client_config(this.expect).map_err(io::Error::other)?;
            let name = ServerName::try_from(this.tls.server_name().to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Accepted gRPC connections, each handshaken (concurrently, bounded by
/// [`HANDSHAKE_TIMEOUT`]) with the newest server config. Failed handshakes
/// are logged at debug and dropped. Ends when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: ClusterTls,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "gRPC accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "cluster TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "cluster TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn files(dir: &Path, ca: &tern_pki::Ca, id: NodeId) -> ClusterTlsFiles {
        let issued = ca.issue_node(id, &["127.0.0.1".into()], 1).unwrap();
        let (cert, key) = tern_pki::write_pair(dir, &format!("node-{id}"), &issued).unwrap();
        let ca_path = dir.join("ca.crt");
        if !ca_path.exists() {
            std::fs::write(&ca_path, ca.cert_pem()).unwrap();
        }
        ClusterTlsFiles {
            cert,
            key,
            ca: ca_path,
            server_name: tern_pki::DEFAULT_SERVER_NAME.into(),
        }
    }

    /// Handshakes a client expecting `expect` with a server presenting `server`'s certificate.
    async fn handshake(server: &ClusterTls, client: &ClusterTls, expect: Option<NodeId>) -> Result<(), String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(client.server_name().to_owned()).unwrap();
        let result = tokio_rustls::TlsConnector::from(client.client_config(expect).unwrap())
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = accept.await;
        result
    }

    #[tokio::test]
    async fn a_client_reaches_only_the_node_it_dials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = tern_pki::Ca::generate("test CA", 1).unwrap();
        let n1 = ClusterTls::load(&files(dir.path(), &ca, 1)).unwrap();
        let n2 = ClusterTls::load(&files(dir.path(), &ca, 2)).unwrap();
        handshake(&n1, &n2, Some(1)).await.unwrap();
        handshake(&n1, &n2, None).await.unwrap();
        let err = handshake(&n1, &n2, Some(3)).await.unwrap_err();
        assert!(err.contains("names tern://node/1, expected node 3"), "{err}");
    }

    #[tokio::test]
    async fn reload_serves_the_new_certificate_and_keeps_the_old_on_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = tern_pki::Ca::generate("test CA", 1).unwrap();
        let f = files(dir.path(), &ca, 1);
        let tls = ClusterTls::load(&f).unwrap();
        let first = tls.current().certs[0].clone();
        let again = ca.issue_node(1, &[], 1).unwrap();
        std::fs::write(&f.cert, &again.cert_pem).unwrap();
        std::fs::write(&f.key, &again.key_pem).unwrap();
        tls.reload().unwrap();
        assert_ne!(tls.current().certs[0], first);
        let peer = ClusterTls::load(&files(dir.path(), &ca, 2)).unwrap();
        handshake(&tls, &peer, Some(1)).await.unwrap();
        std::fs::write(&f.key, "not a key").unwrap();
        assert!(tls.reload().is_err());
        handshake(&tls, &peer, Some(1)).await.unwrap();
    }
}
