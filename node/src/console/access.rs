//! Who is calling the console, whether a POST may act, and the tonic
//! requests that carry the caller to the AdminService.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::server::TcpConnectInfo;

use super::Console;
use crate::admin::Admin;
use crate::api::problem::Problem;
use crate::api::ApiError;

/// The header the console's script sends with every action.
pub const CSRF_HEADER: &str = "x-tern-console";

/// The caller of one console request.
#[derive(Clone, Debug)]
pub struct Call {
    /// The `Authorization` header as sent, `None` for an anonymous reader.
    pub bearer: Option<AsciiMetadataValue>,
    /// The HTTP client's address (audit events and the wrong-token limiter).
    pub peer: Option<SocketAddr>,
}

impl FromRequestParts<std::sync::Arc<Console>> for Call {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, console: &std::sync::Arc<Console>) -> Result<Call, ApiError> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        identify(console, &parts.headers, peer)
    }
}

/// The caller of a request with `headers` from `peer`, or 401.
pub fn identify(console: &Console, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<Call, ApiError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        // Read at each request: a reload may add or remove the tokens.
        if !console.admin.authz.has_tokens() {
            return Err(unauthorized(
                "this node has no [[admin_token]]: the console cannot check a token (configure one, \
                 see docs/console.md)",
            ));
        }
        let bearer = value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<AsciiMetadataValue>().ok())
            .ok_or_else(|| unauthorized("the Authorization header is not \"Bearer <token>\""))?;
        return Ok(Call {
            bearer: Some(bearer),
            peer,
        });
    }
    if !console.loopback {
        return Err(unauthorized(
            "this console listens on a non-loopback address: sign in with an operator token",
        ));
    }
    if !loopback_host(headers) {
        return Err(unauthorized(
            "without a token the console answers only requests to localhost or a loopback address",
        ));
    }
    Ok(Call { bearer: None, peer })
}

/// True if the Host header names localhost or a loopback address (what a
/// browser on this machine or through an SSH tunnel sends; a DNS rebinding
/// page sends its own name).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

impl Call {
    /// Whom to ask: the real service for token callers, the unchecked
    /// reader for anonymous ones.
    pub fn service<'a>(&self, console: &'a Console) -> &'a Admin {
        match self.bearer {
            Some(_) => &console.admin,
            None => &console.reader,
        }
    }

    /// A tonic request for the AdminService carrying this caller.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(bearer) = &self.bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: self.peer,
        });
        request
    }

    /// 401 (audited as a refused `action`) unless the caller sent a token.
    pub fn require_token(&self, action: &str, selection: &str) -> Result<(), ApiError> {
        if self.bearer.is_some() {
            return Ok(());
        }
        let detail = "actions need an operator token: sign in";
        tracing::info!(
            target: "tern::event",
            event = "admin",
            action,
            who = "unauthenticated",
            how = "none",
            role = "",
            peer = %self.peer.map(|p| p.to_string()).unwrap_or_default(),
            selection,
            affected = 0u64,
            result = "refused",
            error = detail,
            "admin"
        );
        Err(unauthorized(detail))
    }
}

/// The CSRF checks of an action: the console's header, a JSON body, and
/// an Origin (when sent) naming the Host the request went to.
pub fn check_csrf(headers: &HeaderMap) -> Result<(), ApiError> {
    let forbidden = |detail: &str| -> ApiError {
        tracing::warn!(detail, "console action refused by its CSRF checks");
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail).into()
    };
    if !headers.contains_key(CSRF_HEADER) {
        return Err(forbidden("console actions need the X-Tern-Console header"));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("application/json")
    {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("the body must be application/json, not {content_type:?}"),
        )
        .into());
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if authority.is_empty() || !authority.eq_ignore_ascii_case(host) {
            return Err(forbidden("the request's Origin is not this console"));
        }
    }
    Ok(())
}

pub fn unauthorized(detail: &str) -> ApiError {
    let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    ApiError::response(response)
}

/// An AdminService error as the problem a browser gets.
pub fn from_status(status: tonic::Status) -> ApiError {
    use tonic::Code;
    let message = status.message().to_owned();
    let (code, kind, title) = match status.code() {
        Code::Unauthenticated => return unauthorized(&message),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid-request", "Invalid request"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "conflict", "Conflict"),
        Code::Unavailable | Code::DeadlineExceeded => {
            return crate::api::unavailable(message).into();
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
    };
    Problem::new(code, kind, title, message).into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn loopback_hosts() {
        for ok in [
            "localhost:8080",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
            "LOCALHOST",
        ] {
            assert!(loopback_host(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in ["evil.example:8080", "10.0.0.1:8080", "[2001:db8::1]:80", ""] {
            assert!(!loopback_host(&headers(&[("host", bad)])), "{bad}");
        }
        assert!(!loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn csrf_needs_header_json_and_same_origin() {
        let json = ("content-type", "application/json");
        let mark = (CSRF_HEADER, "1");
        let host = ("host", "127.0.0.1:8080");
        assert!(check_csrf(&headers(&[json, mark, host])).is_ok());
        assert!(check_csrf(&headers(&[json, mark, host, ("origin", "http://127.0.0.1:8080")])).is_ok());
        for bad in [
            headers(&[json, host]),
            headers(&[mark, host, ("content-type", "text/plain")]),
            headers(&[json, mark, host, ("origin", "http://evil.example")]),
            headers(&[json, mark, host, ("origin", "null")]),
        ] {
            assert!(check_csrf(&bad).is_err(), "{bad:?}");
        }
    }
}
