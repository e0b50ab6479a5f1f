//! Mutual TLS for cluster gRPC (`[cluster] tls_cert, tls_key, tls_ca`):
//! the node's server presents its certificate and requires a client
//! certificate signed by the cluster CA; its clients (Raft, admin
//! forwarding) present the same certificate and check the peer's against
//! the CA and the cluster's server name.

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ClusterTlsFiles;

/// Loaded cluster TLS material.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
    server_name: String,
}

impl ClusterTls {
    pub fn load(files: &ClusterTlsFiles) -> anyhow::Result<ClusterTls> {
        use anyhow::Context as _;
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(ClusterTls {
            identity: Identity::from_pem(read(&files.cert)?, read(&files.key)?),
            ca: Certificate::from_pem(read(&files.ca)?),
            server_name: files.server_name.clone(),
        })
    }

    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            // Operators may authenticate with a bearer token instead; peer
            // services require a node certificate themselves.
            .client_auth_optional(true)
    }

    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(self.server_name.clone())
    }
}

/// An endpoint to a peer's gRPC address, with TLS when the cluster uses it.
pub fn endpoint(addr: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| e.to_string())?;
    match tls {
        Some(t) => endpoint.tls_config(t.client()).map_err(|e| e.to_string()),
        None => Ok(endpoint),
    }
}
