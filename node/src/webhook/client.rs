//! POSTing one batch: hyper 1 (hyper-util's pooled client) over plain TCP
//! or rustls with the ring provider, trusting the system's root
//! certificates (Mozilla's, built in, where the system has none).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::{ConfigBuilderExt as _, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Most of an endpoint's answer that is read (and ignored): enough to keep
/// the connection for the next batch after a short answer.
const MAX_ANSWER: usize = 64 * 1024;

/// TLS settings shared by every webhook: rustls on ring, with the system's
/// roots, else the built-in Mozilla roots.
pub fn tls_config() -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions =
        || rustls::ClientConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions();
    let roots = match versions()?.with_native_roots() {
        Ok(roots) => roots,
        Err(e) => {
            tracing::info!(error = %e, "webhooks: no system root certificates, using the built-in Mozilla roots");
            versions()?.with_webpki_roots()
        }
    };
    Ok(roots.with_no_client_auth())
}

/// Posts batches to one webhook URL.
#[derive(Clone)]
pub struct Poster {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    headers: HeaderMap,
    timeout: Duration,
}

impl Poster {
    pub fn new(tls: rustls::ClientConfig, url: Uri, headers: HeaderMap, timeout: Duration) -> Poster {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1)
            .build(https);
        Poster {
            client,
            url,
            headers,
            timeout,
        }
    }

    /// POSTs `body` (a JSON array); Ok for a 2xx answer within the timeout.
    pub fn post(&self, body: Bytes) -> impl Future<Output = Result<(), PostError>> + Send + 'static {
        self.post_with(body, HeaderMap::new())
    }

    /// [`Poster::post`] with headers of this request only (the signature's).
    pub fn post_with(
        &self,
        body: Bytes,
        extra: HeaderMap,
    ) -> impl Future<Output = Result<(), PostError>> + Send + 'static {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.url.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("tern/", env!("CARGO_PKG_VERSION"))),
        );
        headers.extend(self.headers.clone());
        headers.extend(extra);
        let (client, timeout) = (self.client.clone(), self.timeout);
        async move {
            let exchange = async {
                let answer = client.request(request).await.map_err(PostError::Transport)?;
                let status = answer.status();
                // Read the (bounded) answer, so that the connection can be reused.
                let _ = Limited::new(answer.into_body(), MAX_ANSWER).collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(PostError::Status(status))
                }
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or_else(|_| Err(PostError::Timeout(timeout)))
        }
    }
}

/// Why a post failed (the batch is retried whatever the reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostError {
    /// Connecting, TLS or the exchange itself failed; shown with its causes.
    #[error("{}", chain(.0))]
    Transport(hyper_util::client::legacy::Error),
    /// The endpoint answered with a status other than 2xx.
    #[error("HTTP {0}")]
    Status(hyper::StatusCode),
    /// No whole answer within the webhook's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
