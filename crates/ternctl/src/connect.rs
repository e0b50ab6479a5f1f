//! The channel to a node: plaintext or TLS (the cluster CA, maybe a client
//! certificate), and the operator token sent with every call.

use std::path::{Path, PathBuf};

use tern_proto::admin::admin_service_client::AdminServiceClient;

use crate::cli::Args;

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(b) = &self.0 {
            request.metadata_mut().insert("authorization", b.clone());
        }
        Ok(request)
    }
}

pub type Client =
    AdminServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

/// Why no usable operator token was found (a usage error: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--token-file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("--token-file {}: the first line is empty", path.display())]
    Empty { path: PathBuf },
    #[error("the token must be printable ASCII without spaces")]
    NotPrintable,
}

/// The operator token: the first line of `--token-file` (trimmed), else
/// `TERN_TOKEN`. A token file others may read draws a warning.
pub fn read_token(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    let token = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.to_owned(),
                source,
            })?;
            if let Ok(meta) = std::fs::metadata(path) {
                if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
                    eprintln!(
                        "ternctl: warning: {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
            let line = text.lines().next().unwrap_or_default().trim().to_owned();
            if line.is_empty() {
                return Err(TokenError::Empty { path: path.to_owned() });
            }
            Some(line)
        }
        None => std::env::var("TERN_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    if let Some(t) = &token {
        if t.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(TokenError::NotPrintable);
        }
    }
    Ok(token)
}

/// True if `endpoint` (HOST:PORT, maybe with a scheme) names a loopback address.
pub fn endpoint_is_loopback(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// How long one call may take unless the command says otherwise.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Connects to `address` (one of `--endpoints`; TLS when `--tls-ca` is
/// given) with `token` as the bearer credential; each call may take up to
/// `call_timeout`.
pub async fn connect(
    args: &Args,
    address: &str,
    token: Option<String>,
    call_timeout: std::time::Duration,
) -> Result<Client, tonic::Status> {
    let scheme = if args.tls_ca.is_some() { "https" } else { "http" };
    let endpoint = if address.contains("://") {
        address.to_owned()
    } else {
        format!("{scheme}://{address}")
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(endpoint)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad endpoint {address}: {e}")))?;
    if let Some(ca) = &args.tls_ca {
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", p.display())));
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
            .domain_name(args.tls_server_name.clone());
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| tonic::Status::invalid_argument(format!("TLS: {e}")))?;
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(call_timeout)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect to {address}: {e}")))?;
    let bearer: Option<tonic::metadata::AsciiMetadataValue> = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("the token is not valid gRPC metadata"))?,
        ),
        None => None,
    };
    let client =
        AdminServiceClient::with_interceptor(channel, Bearer(bearer)).max_decoding_message_size(256 * 1024 * 1024);
    Ok(client)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_endpoints() {
        for e in [
            "127.0.0.1:7070",
            "localhost:7070",
            "http://[::1]:7070",
            "https://127.0.0.2:1/x",
            "LOCALHOST",
        ] {
            assert!(endpoint_is_loopback(e), "{e}");
        }
        for e in [
            "10.0.0.1:7070",
            "node1:7070",
            "https://tern.example:443",
            "[2001:db8::1]:7070",
        ] {
            assert!(!endpoint_is_loopback(e), "{e}");
        }
    }

    #[test]
    fn token_file_first_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret \nsecond line\n").unwrap();
        assert_eq!(read_token(Some(&path)).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, "\nsecond line\n").unwrap();
        assert!(matches!(read_token(Some(&path)), Err(TokenError::Empty { .. })));
        std::fs::write(&path, "two words\n").unwrap();
        assert!(matches!(read_token(Some(&path)), Err(TokenError::NotPrintable)));
        let missing = dir.path().join("missing");
        let e = read_token(Some(&missing)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("--token-file {}: ", missing.display())),
            "{e}"
        );
    }
}
