//! The web console (`/console` on the HTTP listener; docs/console.md): a
//! small static page (HTML, JS and CSS embedded in the binary) and the JSON
//! it reads under `/console/api/`.
//!
//! The data is what the gRPC AdminService computes: every handler calls
//! [`Admin`]'s service methods in-process, with the caller's bearer token
//! as their metadata and the HTTP client's address as the connection's,
//! so roles are checked and changes audited exactly as for `ternctl`.
//!
//! Who may do what:
//! - With `Authorization: Bearer <token>` (one of `[[admin_token]]`): what
//!   the token's role allows (viewer reads; operator and admin act).
//! - Without credentials: read-only, and only when the HTTP listener is on
//!   a loopback address and the request names a loopback host (a DNS
//!   rebinding page cannot read it). Anything else gets 401.
//! - Actions are POSTs that need a token, `Content-Type: application/json`,
//!   the `X-Tern-Console` header (a cross-site form cannot send it, and a
//!   cross-site fetch with it needs a preflight nobody answers) and, when
//!   the browser sends one, an `Origin` naming this host.
//!
//! Layout: `access.rs` (who is calling, CSRF checks, tonic requests),
//! `handlers.rs` (the JSON endpoints), `series.rs` (stats windows into chart
//! series; no I/O), `events.rs` (the recent audit events this node logged),
//! `assets/` (the page).

pub mod access;
pub mod events;
pub mod handlers;
pub mod series;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::admin::Admin;
pub use events::RecentEvents;

/// The page's Content-Security-Policy: nothing inline, nothing from
/// elsewhere, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// What the console's handlers share.
pub struct Console {
    /// The node's AdminService: token callers, and every action.
    pub(crate) admin: Arc<Admin>,
    /// The same service with no caller check, for anonymous reads on a
    /// loopback listener; handlers call only its read-only methods.
    pub(crate) reader: Arc<Admin>,
    /// The HTTP listener is on a loopback address.
    pub(crate) loopback: bool,
    pub(crate) events: RecentEvents,
}

impl Console {
    /// The console of `admin`, served on `listen_http`.
    pub fn new(admin: Arc<Admin>, listen_http: SocketAddr, events: RecentEvents) -> Console {
        let open = crate::admin::authz::Authz::new(
            Vec::new(),
            false,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            crate::metrics::AdminMetrics::default(),
        );
        let reader = Arc::new(Admin {
            node_id: admin.node_id,
            hostname: admin.hostname.clone(),
            groups: Arc::clone(&admin.groups),
            cluster: Arc::clone(&admin.cluster),
            ids: Arc::clone(&admin.ids),
            stats: Arc::clone(&admin.stats),
            space: Arc::clone(&admin.space),
            authz: Arc::new(open),
            delivery: Arc::clone(&admin.delivery),
            webhooks: admin.webhooks.clone(),
            // The anonymous reader can never reload the configuration.
            reload: Arc::default(),
        });
        Console {
            admin,
            reader,
            loopback: listen_http.ip().is_loopback(),
            events,
        }
    }
}

/// The console's routes: the page, its script and style, and the JSON API.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/console", get(|| asset(INDEX_HTML, "text/html; charset=utf-8")))
        .route("/console/", get(|| asset(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/console/console.js",
            get(|| asset(CONSOLE_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/console/console.css",
            get(|| asset(CONSOLE_CSS, "text/css; charset=utf-8")),
        )
        .route("/console/api/whoami", get(handlers::whoami))
        .route("/console/api/overview", get(handlers::overview))
        .route("/console/api/queue", get(handlers::queue))
        .route("/console/api/stats", get(handlers::stats))
        .route("/console/api/domains", get(handlers::domains))
        .route("/console/api/events", get(handlers::events))
        .route("/console/api/domains/suspend", post(handlers::suspend))
        .route("/console/api/domains/resume", post(handlers::resume))
        .route("/console/api/queue/{op}", post(handlers::queue_op))
        .with_state(console)
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response();
    secure_headers(response.headers_mut());
    response
}

/// Headers every console answer carries.
pub(crate) fn secure_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
