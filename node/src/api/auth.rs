//! Who is calling: the bearer key of a request, checked against the
//! control group's records (`api::keys::verify`), and what it may do.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use tern_model::api::{ApiKey, Scope};

use super::problem::Problem;
use super::{ApiError, ApiState};

/// The verified key of a call.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key: ApiKey,
}

impl Caller {
    /// The tenant whose batches, messages and templates the caller sees.
    pub fn tenant(&self) -> &str {
        &self.key.tenant
    }

    /// 403 unless the key has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.key.scopes.contains(&scope) {
            return Ok(());
        }
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            format!("this API key lacks the scope {:?}", scope.as_str()),
        )
        .into())
    }

    /// The envelope's `auth_user` of the messages it sends (DKIM signs
    /// them like submitted mail; events name the key).
    pub fn auth_user(&self) -> String {
        format!("apikey:{}", self.key.name)
    }
}

/// The caller of a request, or 401 with `WWW-Authenticate: Bearer`.
pub fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("no Authorization header (expected \"Bearer tern_...\")"));
    };
    let bearer = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(bearer) = bearer else {
        return Err(unauthorized("the Authorization header is not \"Bearer <key>\""));
    };
    match super::keys::verify(&state.control, bearer) {
        Ok(key) => Ok(Caller { key }),
        Err(e) => {
            tracing::debug!(error = %e, "api key refused");
            Err(unauthorized(&format!("the API key is not valid: {e}")))
        }
    }
}

fn unauthorized(detail: &str) -> ApiError {
    let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    ApiError::response(response)
}
