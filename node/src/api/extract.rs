//! What the API's handlers share: the state extractor, JSON answers,
//! bounded body reading and serde errors as problems (routes.rs holds the
//! router only, so handlers never import it).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::limits::InFlight;
use super::problem::Problem;
use super::{ApiError, ApiHandle, ApiState};

/// The API's state in a handler; 503 while the node is still starting.
pub struct Api(pub Arc<ApiState>);

impl FromRequestParts<ApiHandle> for Api {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, handle: &ApiHandle) -> Result<Api, ApiError> {
        handle
            .get()
            .cloned()
            .map(Api)
            .ok_or_else(|| super::unavailable("the node is starting; try again").into())
    }
}

/// A JSON answer.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response(),
        Err(e) => internal(&format!("encoding the answer: {e}")).into_response(),
    }
}

/// 500: a fault of the node, not of the request.
pub fn internal(detail: &str) -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", detail)
}

/// The body of a JSON call, read within `[api] max_request_bytes` and the
/// node's in-flight limits (taken before reading, from Content-Length when
/// given, else for the largest allowed body). The permit lives as long as
/// the call.
pub async fn read_json_body(state: &ApiState, headers: &HeaderMap, body: Body) -> Result<(Bytes, InFlight), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("the body must be application/json, not {content_type:?}"),
        )
        .into());
    }
    let max = state.config.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max).into());
    }
    let in_flight = state.limits.admit(declared.unwrap_or(max))?;
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok((bytes, in_flight)),
        Err(e) if is_length_limit(&e) => Err(too_large(max).into()),
        Err(e) => Err(Problem::invalid("", format!("reading the body: {e}")).into()),
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn too_large(max: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
        format!("the body is larger than [api] max_request_bytes ({max} bytes)"),
    )
}

/// Decodes a JSON body into `T`: 400 with serde's words, and the field
/// they name as a JSON pointer when they name one.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(bytes).map_err(|e| {
        let message = e.to_string();
        Problem::invalid(&field_of(&message), format!("invalid JSON body: {message}"))
    })
}

/// `/from` for "missing field `from` ..." or "unknown field `x`, ..."; else
/// the whole document (`""`).
fn field_of(message: &str) -> String {
    for prefix in ["missing field `", "unknown field `", "duplicate field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((name, _)) = rest.split_once('`') {
                return format!("/{}", name.replace('~', "~0").replace('/', "~1"));
            }
        }
    }
    String::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        from: String,
    }

    #[test]
    fn serde_errors_name_the_field() {
        let missing = decode::<Sample>(b"{}").unwrap_err();
        assert_eq!(missing.status, 400);
        assert_eq!(missing.field.as_deref(), Some("/from"));
        assert!(missing.detail.contains("missing field `from`"), "{}", missing.detail);
        let unknown = decode::<Sample>(br#"{"from": "a", "fro/m": 1}"#).unwrap_err();
        assert_eq!(unknown.field.as_deref(), Some("/fro~1m"));
        let syntax = decode::<Sample>(b"{\"from\": ").unwrap_err();
        assert_eq!(syntax.field.as_deref(), Some(""));
        assert!(syntax.detail.contains("line 1"), "{}", syntax.detail);
    }
}
