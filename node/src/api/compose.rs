//! From an API request to the messages it stands for: validation,
//! template rendering (minijinja; HTML auto-escaped), MIME (mail-builder)
//! and the schedule of each message. No I/O: the caller signs and queues.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::problem::Problem;
use tern_model::api::StoredTemplate;

/// `POST /api/v1/messages` (docs/api.md).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// `a@example.org` or `Name <a@example.org>`.
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Extra headers (names checked; structural ones refused).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub campaign: Option<String>,
    /// RFC 3339 time or unix seconds.
    pub send_at: Option<serde_json::Value>,
    /// Spread the batch's messages evenly over this many minutes from `send_at` (or now).
    pub window_minutes: Option<u32>,
    /// Also accepted as the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// A stored template's name, or an inline `{subject, text, html}`.
    pub template: Option<TemplateRef>,
    /// Variables for every recipient (a recipient's own override them).
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// One message per entry, rendered with its variables.
    #[serde(default)]
    pub recipients: Vec<RecipientSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TemplateRef {
    Name(String),
    Inline {
        subject: String,
        text: Option<String>,
        html: Option<String>,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientSpec {
    pub to: String,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub filename: String,
    pub content_type: Option<String>,
    /// Base64 (standard alphabet).
    pub content: String,
    /// Inline part referenced from the HTML as `cid:<content_id>`.
    pub content_id: Option<String>,
}

/// What composing needs besides the request.
#[derive(Clone, Debug)]
pub struct ComposeCtx {
    /// For Message-ID.
    pub hostname: String,
    /// Unix seconds now.
    pub now: i64,
    pub max_recipients: usize,
    /// Largest message (`[smtp] max_message_size`).
    pub max_message_size: u64,
    pub max_schedule_ahead: std::time::Duration,
}

/// One message to queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Composed {
    /// Envelope reverse-path (the bare address of `from`).
    pub reverse_path: String,
    /// Envelope recipients (to, cc and bcc addresses, bare).
    pub recipients: Vec<String>,
    /// RFC 5322 bytes (CRLF), unsigned.
    pub body: Vec<u8>,
    /// Unix seconds before which it is not delivered (0: now).
    pub not_before: i64,
}

/// The messages `req` stands for; `stored` is the template `req.template`
/// names (looked up by the caller), if it names one.
pub fn compose(req: &SendRequest, stored: Option<&StoredTemplate>, ctx: &ComposeCtx) -> Result<Vec<Composed>, Problem> {
    let _ = (req, stored, ctx);
    Err(Problem::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        "not-implemented",
        "Not implemented",
        "composing is not built yet",
    ))
}
