//! The `/api/v1` router, its fallbacks and the per-route request counter
//! (what handlers share is in extract.rs).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::problem::Problem;
use super::{messages, send, templates, ApiHandle};

/// The API's routes, nested under `/api/v1` (merged into the HTTP
/// listener's router when `[api] enabled`).
pub fn router(handle: ApiHandle) -> Router {
    let v1 = Router::new()
        .route("/messages", post(send::send))
        .route("/messages/raw", post(send::send_raw))
        .route(
            "/messages/{id}",
            get(messages::get_message).delete(messages::cancel_message),
        )
        .route("/batches/{id}", get(messages::get_batch).delete(messages::cancel_batch))
        .route("/templates", get(templates::list))
        .route(
            "/templates/{name}",
            get(templates::get).put(templates::put).delete(templates::delete),
        )
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(handle.clone(), count))
        .with_state(handle);
    Router::new().nest("/api/v1", v1)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        super::openapi::DOCUMENT,
    )
        .into_response()
}

async fn no_route() -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such API endpoint (see /api/v1/openapi.json)",
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid-request",
        "Method not allowed",
        "this endpoint does not take this method (see /api/v1/openapi.json)",
    )
    .into_response()
}

/// Counts every answer by route template and status.
async fn count(State(handle): State<ApiHandle>, request: Request, next: Next) -> Response {
    let endpoint = format!("{} {}", request.method(), endpoint(request.uri().path()));
    let response = next.run(request).await;
    if let Some(state) = handle.get() {
        state.metrics.api.request(&endpoint, response.status().as_u16());
    }
    response
}

/// The route template of a path (a label of bounded cardinality: ids and
/// names never become label values).
fn endpoint(path: &str) -> &'static str {
    let rest = path.strip_prefix("/api/v1").unwrap_or(path);
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["messages"] => "/api/v1/messages",
        ["messages", "raw"] => "/api/v1/messages/raw",
        ["messages", _] => "/api/v1/messages/{id}",
        ["batches", _] => "/api/v1/batches/{id}",
        ["templates"] => "/api/v1/templates",
        ["templates", _] => "/api/v1/templates/{name}",
        ["openapi.json"] => "/api/v1/openapi.json",
        _ => "other",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_route_templates() {
        assert_eq!(endpoint("/api/v1/messages"), "/api/v1/messages");
        assert_eq!(endpoint("/api/v1/messages/raw"), "/api/v1/messages/raw");
        assert_eq!(endpoint("/api/v1/messages/0123ABC"), "/api/v1/messages/{id}");
        assert_eq!(endpoint("/api/v1/templates/welcome"), "/api/v1/templates/{name}");
        assert_eq!(endpoint("/api/v1/x/y/z"), "other");
    }
}
