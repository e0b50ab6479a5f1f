//! From an API request to the messages it stands for: validation,
//! template rendering (minijinja; HTML auto-escaped), MIME (mail-builder)
//! and the schedule of each message. No I/O: the caller signs and queues.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;

use super::mime::{self, Mailbox, Part};
use super::problem::Problem;
use super::template::{self, Compiled};
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
    /// Largest message (`[policy] max_message_size`).
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

/// Most tags per request, and their length.
pub const MAX_TAGS: usize = 10;
pub const MAX_TAG_LEN: usize = 128;
/// Most metadata entries per request, and their key and value lengths.
pub const MAX_METADATA: usize = 20;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 1024;
pub const MAX_CAMPAIGN_LEN: usize = 128;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Longest spreading window (a day).
pub const MAX_WINDOW_MINUTES: u32 = 1440;

/// A JSON pointer token (RFC 6901: `~` and `/` escaped).
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn too_large(detail: String, field: &str) -> Problem {
    let mut p = Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
        detail,
    );
    p.field = Some(field.to_owned());
    p
}

/// Checks tags, metadata and campaign (shared by both kinds of request).
pub fn check_labels(
    tags: &[String],
    metadata: &BTreeMap<String, String>,
    campaign: Option<&str>,
) -> Result<(), Problem> {
    if tags.len() > MAX_TAGS {
        return Err(Problem::invalid("/tags", format!("at most {MAX_TAGS} tags")));
    }
    for (i, tag) in tags.iter().enumerate() {
        if tag.is_empty() || tag.chars().count() > MAX_TAG_LEN || tag.chars().any(char::is_control) {
            return Err(Problem::invalid(
                &format!("/tags/{i}"),
                format!("a tag is 1 to {MAX_TAG_LEN} characters without control characters"),
            ));
        }
    }
    if metadata.len() > MAX_METADATA {
        return Err(Problem::invalid(
            "/metadata",
            format!("at most {MAX_METADATA} metadata keys"),
        ));
    }
    for (key, value) in metadata {
        let field = format!("/metadata/{}", pointer_token(key));
        if key.is_empty() || key.chars().count() > MAX_METADATA_KEY {
            return Err(Problem::invalid(
                &field,
                format!("a metadata key is 1 to {MAX_METADATA_KEY} characters"),
            ));
        }
        if value.chars().count() > MAX_METADATA_VALUE {
            return Err(Problem::invalid(
                &field,
                format!("a metadata value is at most {MAX_METADATA_VALUE} characters"),
            ));
        }
    }
    if let Some(campaign) = campaign {
        if campaign.is_empty() || campaign.chars().count() > MAX_CAMPAIGN_LEN || campaign.chars().any(char::is_control)
        {
            return Err(Problem::invalid(
                "/campaign",
                format!("campaign is 1 to {MAX_CAMPAIGN_LEN} characters without control characters"),
            ));
        }
    }
    Ok(())
}

/// Checks an idempotency key (body field or `Idempotency-Key` header):
/// 1 to 255 printable ASCII characters.
pub fn check_idempotency_key(key: &str, field: &str) -> Result<(), Problem> {
    let ok = !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN && key.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Problem::invalid(
            field,
            format!("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"),
        ))
    }
}

/// `send_at` as unix seconds: an RFC 3339 string or a number of seconds;
/// in the past means now; `None` when not given. Later than now +
/// `max_schedule_ahead`: 400.
pub fn send_at(value: Option<&serde_json::Value>, ctx: &ComposeCtx) -> Result<Option<i64>, Problem> {
    let at = match value {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| Problem::invalid("/send_at", "send_at must be whole unix seconds"))?,
        Some(serde_json::Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| Problem::invalid("/send_at", format!("`{s}` is not an RFC 3339 time: {e}")))?
            .timestamp(),
        Some(_) => {
            return Err(Problem::invalid(
                "/send_at",
                "send_at must be an RFC 3339 string or unix seconds",
            ))
        }
    };
    let ahead = i64::try_from(ctx.max_schedule_ahead.as_secs()).unwrap_or(i64::MAX);
    if at > ctx.now.saturating_add(ahead) {
        return Err(Problem::invalid(
            "/send_at",
            format!("send_at is more than {ahead} seconds ahead ([api] max_schedule_ahead)"),
        ));
    }
    Ok(Some(at.max(ctx.now)))
}

/// The not_before of each of `n` messages: all at `send_at` (0 when not
/// given), or spread evenly over `window_minutes` from `send_at` or now.
pub fn schedule(send_at: Option<i64>, window_minutes: Option<u32>, n: usize, now: i64) -> Result<Vec<i64>, Problem> {
    let Some(window) = window_minutes else {
        return Ok(vec![send_at.unwrap_or(0); n]);
    };
    if !(1..=MAX_WINDOW_MINUTES).contains(&window) {
        return Err(Problem::invalid(
            "/window_minutes",
            format!("window_minutes is 1 to {MAX_WINDOW_MINUTES}"),
        ));
    }
    let start = send_at.unwrap_or(now);
    let span = i64::from(window) * 60;
    let count = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
    Ok((0..count).map(|i| start + i * span / count).collect())
}

/// Where subject/text/html come from, and whether they are templates.
struct Sources<'a> {
    subject: Option<&'a str>,
    text: Option<&'a str>,
    html: Option<&'a str>,
    /// JSON pointer of each source, for errors.
    base: &'static str,
}

fn sources<'a>(req: &'a SendRequest, stored: Option<&'a StoredTemplate>) -> Result<Sources<'a>, Problem> {
    let Some(template) = &req.template else {
        return Ok(Sources {
            subject: req.subject.as_deref(),
            text: req.text.as_deref(),
            html: req.html.as_deref(),
            base: "",
        });
    };
    for (given, name) in [(&req.subject, "subject"), (&req.text, "text"), (&req.html, "html")] {
        if given.is_some() {
            return Err(Problem::invalid(
                &format!("/{name}"),
                format!("`{name}` and `template` cannot both be given (the template holds it)"),
            ));
        }
    }
    match template {
        TemplateRef::Name(name) => {
            template::check_name(name).map_err(|mut p| {
                p.field = Some("/template".into());
                p
            })?;
            let stored =
                stored.ok_or_else(|| Problem::invalid("/template", format!("no stored template named `{name}`")))?;
            Ok(Sources {
                subject: Some(&stored.subject),
                text: stored.text.as_deref(),
                html: stored.html.as_deref(),
                base: "/template",
            })
        }
        TemplateRef::Inline { subject, text, html } => Ok(Sources {
            subject: Some(subject),
            text: text.as_deref(),
            html: html.as_deref(),
            base: "/template",
        }),
    }
}

/// The body part of a message before MIME: literal or rendered.
struct Content {
    subject: String,
    text: Option<String>,
    html: Option<String>,
}

/// One message's addresses, and what its errors name.
struct Addressing<'a> {
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
    /// The recipient's own variables (over the request's).
    variables: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// `recipient` for templates.
    recipient: String,
    /// JSON pointer of this message's variables.
    vars_field: String,
    /// `recipient 17 (b@example.net)`, for template errors.
    who: String,
    /// JSON pointer blamed when this message is too large.
    size_field: String,
}

fn mailboxes(list: &[String], field: &str) -> Result<Vec<Mailbox>, Problem> {
    list.iter()
        .enumerate()
        .map(|(i, a)| mime::parse_mailbox(a, &format!("{field}/{i}")))
        .collect()
}

fn addressing<'a>(req: &'a SendRequest, ctx: &ComposeCtx) -> Result<Vec<Addressing<'a>>, Problem> {
    if req.recipients.is_empty() {
        let to = mailboxes(&req.to, "/to")?;
        let cc = mailboxes(&req.cc, "/cc")?;
        let bcc = mailboxes(&req.bcc, "/bcc")?;
        let total = to.len() + cc.len() + bcc.len();
        if total == 0 {
            return Err(Problem::invalid(
                "/to",
                "at least one recipient is needed (to, cc, bcc or recipients)",
            ));
        }
        if total > ctx.max_recipients {
            return Err(Problem::invalid(
                "/to",
                format!(
                    "{total} recipients: at most {} per call ([api] max_recipients)",
                    ctx.max_recipients
                ),
            ));
        }
        let recipient = to
            .iter()
            .chain(&cc)
            .chain(&bcc)
            .next()
            .map(|m| m.address.clone())
            .unwrap_or_default();
        return Ok(vec![Addressing {
            who: format!("message to {recipient}"),
            to,
            cc,
            bcc,
            variables: None,
            recipient,
            vars_field: "/variables".into(),
            size_field: "/".into(),
        }]);
    }
    for (list, name) in [(&req.to, "to"), (&req.cc, "cc"), (&req.bcc, "bcc")] {
        if !list.is_empty() {
            return Err(Problem::invalid(
                &format!("/{name}"),
                format!("`{name}` cannot be given with `recipients` (give each recipient's own `to` and `cc`)"),
            ));
        }
    }
    if req.recipients.len() > ctx.max_recipients {
        return Err(Problem::invalid(
            "/recipients",
            format!(
                "{} recipients: at most {} per call ([api] max_recipients)",
                req.recipients.len(),
                ctx.max_recipients
            ),
        ));
    }
    req.recipients
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let to = mime::parse_mailbox(&spec.to, &format!("/recipients/{i}/to"))?;
            let cc = mailboxes(&spec.cc, &format!("/recipients/{i}/cc"))?;
            Ok(Addressing {
                who: format!("recipient {i} ({})", to.address),
                recipient: to.address.clone(),
                to: vec![to],
                cc,
                bcc: Vec::new(),
                variables: Some(&spec.variables),
                vars_field: format!("/recipients/{i}/variables"),
                size_field: format!("/recipients/{i}"),
            })
        })
        .collect()
}

/// Bare addresses, each once (case-insensitively), in order.
fn envelope(m: &Addressing<'_>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    m.to.iter()
        .chain(&m.cc)
        .chain(&m.bcc)
        .filter(|mb| seen.insert(mb.address.to_lowercase()))
        .map(|mb| mb.address.clone())
        .collect()
}

/// Why `value` cannot be the `part` of a message: a subject is one header
/// line (no CR, LF or other control characters: no header injection); no
/// part may hold NUL, which no mail may carry.
fn unfit(part: template::Part, value: &str) -> Option<&'static str> {
    match part {
        template::Part::Subject if value.contains(['\r', '\n']) => Some("the subject contains CR or LF"),
        template::Part::Subject if value.chars().any(|c| c.is_control() && c != '\t') => {
            Some("the subject contains a control character")
        }
        _ if value.contains('\0') => Some("it contains a NUL character"),
        _ => None,
    }
}

/// The messages `req` stands for; `stored` is the template `req.template`
/// names (looked up by the caller), if it names one.
pub fn compose(req: &SendRequest, stored: Option<&StoredTemplate>, ctx: &ComposeCtx) -> Result<Vec<Composed>, Problem> {
    let from = mime::parse_mailbox(&req.from, "/from")?;
    let reply_to = req
        .reply_to
        .as_deref()
        .map(|r| mime::parse_mailbox(r, "/reply_to"))
        .transpose()?;
    check_labels(&req.tags, &req.metadata, req.campaign.as_deref())?;
    if let Some(key) = &req.idempotency_key {
        check_idempotency_key(key, "/idempotency_key")?;
    }
    let mut headers = Vec::with_capacity(req.headers.len());
    for (name, value) in &req.headers {
        mime::check_header(name, value, &format!("/headers/{}", pointer_token(name)))?;
        headers.push((name.clone(), value.clone()));
    }
    let parts: Vec<Part> = req
        .attachments
        .iter()
        .enumerate()
        .map(|(i, a)| {
            mime::attachment(
                &a.filename,
                a.content_type.as_deref(),
                &a.content,
                a.content_id.as_deref(),
                &format!("/attachments/{i}"),
            )
        })
        .collect::<Result<_, _>>()?;
    let attached: u64 = parts.iter().map(|p| p.content.len() as u64).sum();
    if attached > ctx.max_message_size {
        return Err(too_large(
            format!(
                "attachments hold {attached} bytes, more than the largest message ({} bytes)",
                ctx.max_message_size
            ),
            "/attachments",
        ));
    }
    let messages = addressing(req, ctx)?;

    let src = sources(req, stored)?;
    let subject = src
        .subject
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| Problem::invalid(&format!("{}/subject", src.base), "a subject is required"))?;
    if src.text.is_none() && src.html.is_none() {
        return Err(Problem::invalid(
            &format!("{}/text", src.base),
            "`text`, `html` or both are required",
        ));
    }
    let templated = req.template.is_some() || !req.recipients.is_empty() || !req.variables.is_empty();
    let compiled = if templated {
        Some(Compiled::compile(subject, src.text, src.html, |part| {
            format!("{}/{}", src.base, part.name())
        })?)
    } else {
        for (part, value) in [
            (template::Part::Subject, Some(subject)),
            (template::Part::Text, src.text),
            (template::Part::Html, src.html),
        ] {
            if let Some(why) = value.and_then(|v| unfit(part, v)) {
                return Err(Problem::invalid(&format!("/{}", part.name()), why));
            }
        }
        None
    };

    let send_at = send_at(req.send_at.as_ref(), ctx)?;
    let times = schedule(send_at, req.window_minutes, messages.len(), ctx.now)?;

    let mut out = Vec::with_capacity(messages.len());
    for (m, not_before) in messages.iter().zip(times) {
        let content = match &compiled {
            None => Content {
                subject: subject.to_owned(),
                text: src.text.map(str::to_owned),
                html: src.html.map(str::to_owned),
            },
            Some(c) => render(c, req, m, ctx.max_message_size)?,
        };
        let message_id = mime::message_id(&ctx.hostname);
        let body = mime::build(&mime::Message {
            from: &from,
            to: &m.to,
            cc: &m.cc,
            reply_to: reply_to.as_ref(),
            subject: &content.subject,
            text: content.text.as_deref(),
            html: content.html.as_deref(),
            parts: &parts,
            headers: &headers,
            date: ctx.now,
            message_id: &message_id,
        });
        if body.len() as u64 > ctx.max_message_size {
            return Err(too_large(
                format!(
                    "{}: the message is {} bytes, more than the largest message ({} bytes)",
                    m.who,
                    body.len(),
                    ctx.max_message_size
                ),
                &m.size_field,
            ));
        }
        out.push(Composed {
            reverse_path: from.address.clone(),
            recipients: envelope(m),
            body,
            not_before,
        });
    }
    Ok(out)
}

/// Renders one message's subject, text and html.
fn render(c: &Compiled, req: &SendRequest, m: &Addressing<'_>, max: u64) -> Result<Content, Problem> {
    let mut vars = req.variables.clone();
    vars.insert("recipient".into(), serde_json::Value::String(m.recipient.clone()));
    if let Some(own) = m.variables {
        for (k, v) in own {
            vars.insert(k.clone(), v.clone());
        }
    }
    let vars = minijinja::Value::from_serialize(&vars);
    let one = |part: template::Part| -> Result<Option<String>, Problem> {
        if !c.has(part) {
            return Ok(None);
        }
        let out = c.render(part, &vars, max, &m.who, &m.vars_field)?;
        match unfit(part, &out) {
            Some(why) => Err(Problem::invalid(
                &m.vars_field,
                format!("{}: rendered `{}`: {why}", m.who, part.name()),
            )),
            None => Ok(Some(out)),
        }
    };
    Ok(Content {
        subject: one(template::Part::Subject)?.unwrap_or_default(),
        text: one(template::Part::Text)?,
        html: one(template::Part::Html)?,
    })
}

/// `POST /api/v1/messages/raw`: a whole RFC 5322 message and its envelope.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    /// Envelope reverse-path (a bare address).
    pub from: String,
    /// Envelope recipients (bare addresses).
    pub to: Vec<String>,
    /// The message as text; bare LF is turned into CRLF.
    pub message: Option<String>,
    /// The message as base64 (for 8-bit content that is not UTF-8).
    pub message_base64: Option<String>,
    /// RFC 3339 time or unix seconds.
    pub send_at: Option<serde_json::Value>,
    /// Also accepted as the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub campaign: Option<String>,
}

/// The message a raw request stands for: its header section must be
/// well-formed and hold a From; Message-ID and Date are added when missing.
pub fn compose_raw(req: &RawRequest, ctx: &ComposeCtx) -> Result<Composed, Problem> {
    mime::check_address(&req.from, "/from")?;
    if req.to.is_empty() {
        return Err(Problem::invalid("/to", "at least one recipient is needed"));
    }
    if req.to.len() > ctx.max_recipients {
        return Err(Problem::invalid(
            "/to",
            format!(
                "{} recipients: at most {} per call ([api] max_recipients)",
                req.to.len(),
                ctx.max_recipients
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut recipients = Vec::with_capacity(req.to.len());
    for (i, rcpt) in req.to.iter().enumerate() {
        mime::check_address(rcpt, &format!("/to/{i}"))?;
        if seen.insert(rcpt.to_lowercase()) {
            recipients.push(rcpt.clone());
        }
    }
    check_labels(&req.tags, &req.metadata, req.campaign.as_deref())?;
    if let Some(key) = &req.idempotency_key {
        check_idempotency_key(key, "/idempotency_key")?;
    }
    let (bytes, field) = match (&req.message, &req.message_base64) {
        (Some(text), None) => (std::borrow::Cow::Borrowed(text.as_bytes()), "/message"),
        (None, Some(b64)) => {
            let compact: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(&compact)
                .map_err(|e| Problem::invalid("/message_base64", format!("not valid base64: {e}")))?;
            (std::borrow::Cow::Owned(decoded), "/message_base64")
        }
        (Some(_), Some(_)) => {
            return Err(Problem::invalid(
                "/message_base64",
                "give `message` or `message_base64`, not both",
            ))
        }
        (None, None) => {
            return Err(Problem::invalid(
                "/message",
                "`message` or `message_base64` is required",
            ))
        }
    };
    let limit = |len: usize| {
        if len as u64 > ctx.max_message_size {
            Err(too_large(
                format!(
                    "the message is {len} bytes, more than the largest message ({} bytes)",
                    ctx.max_message_size
                ),
                field,
            ))
        } else {
            Ok(())
        }
    };
    limit(bytes.len())?;
    let body = crlf(&bytes);
    let names = header_names(&body, field)?;
    let has = |name: &str| names.iter().any(|n| n.eq_ignore_ascii_case(name));
    if !has("From") {
        return Err(Problem::invalid(field, "the header section has no From"));
    }
    let parsed = mail_parser::MessageParser::default()
        .parse_headers(&body[..])
        .ok_or_else(|| Problem::invalid(field, "the header section does not parse"))?;
    if parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .is_none()
    {
        return Err(Problem::invalid(field, "the From header holds no address"));
    }
    let mut added = Vec::new();
    if !has("Message-ID") {
        added.extend_from_slice(format!("Message-ID: <{}>\r\n", mime::message_id(&ctx.hostname)).as_bytes());
    }
    if !has("Date") {
        let date = mail_builder::headers::date::Date::new(ctx.now).to_rfc822();
        added.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    let body = if added.is_empty() {
        body.into_owned()
    } else {
        added.extend_from_slice(&body);
        added
    };
    limit(body.len())?;
    Ok(Composed {
        reverse_path: req.from.clone(),
        recipients,
        body,
        not_before: send_at(req.send_at.as_ref(), ctx)?.unwrap_or(0),
    })
}

/// `bytes` with every bare LF turned into CRLF.
fn crlf(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let bare = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'));
    if !bare {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut prev = 0u8;
    for &b in bytes {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    std::borrow::Cow::Owned(out)
}

/// The field names of the header section (up to the first empty line),
/// checking that every line is a `name: value` field (ftext name) or the
/// folded continuation of one.
fn header_names(body: &[u8], field: &str) -> Result<Vec<String>, Problem> {
    let mut names = Vec::new();
    for (n, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok(names);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if names.is_empty() {
                return Err(Problem::invalid(field, "the message starts with a folded line"));
            }
            continue;
        }
        let name = line
            .iter()
            .position(|&b| b == b':')
            .map(|colon| &line[..colon])
            .filter(|name| !name.is_empty() && name.iter().all(|b| matches!(b, b'!'..=b'9' | b';'..=b'~')))
            .ok_or_else(|| {
                let shown: String = String::from_utf8_lossy(line).chars().take(60).collect();
                Problem::invalid(field, format!("header line {} is not `Name: value`: `{shown}`", n + 1))
            })?;
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    // No empty line: the whole message is its header section.
    Ok(names)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};

    fn ctx() -> ComposeCtx {
        ComposeCtx {
            hostname: "mta.example.org".into(),
            now: 1_800_000_000,
            max_recipients: 1000,
            max_message_size: 1 << 20,
            max_schedule_ahead: std::time::Duration::from_secs(72 * 3600),
        }
    }

    fn request(json: serde_json::Value) -> SendRequest {
        serde_json::from_value(json).expect("request shape")
    }

    fn one(json: serde_json::Value) -> Composed {
        let mut v = compose(&request(json), None, &ctx()).expect("composes");
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn field(json: serde_json::Value) -> (u16, String, String) {
        let p = compose(&request(json), None, &ctx()).expect_err("refused");
        (p.status, p.field.unwrap_or_default(), p.detail)
    }

    #[test]
    fn smallest_request() {
        let m = one(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "subject": "Hi", "text": "Hello"}),
        );
        assert_eq!(m.reverse_path, "a@example.org");
        assert_eq!(m.recipients, ["b@example.net"]);
        assert_eq!(m.not_before, 0);
        // CRLF only.
        assert!(!m.body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
        assert!(m.body.is_ascii());
        let parsed = MessageParser::default().parse(&m.body).expect("parses");
        assert_eq!(parsed.subject(), Some("Hi"));
        assert_eq!(
            parsed.from().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("a@example.org")
        );
        assert_eq!(
            parsed.to().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("b@example.net")
        );
        assert_eq!(parsed.body_text(0).as_deref().map(str::trim_end), Some("Hello"));
        let id = parsed.message_id().expect("Message-ID");
        assert!(id.ends_with("@mta.example.org"), "{id}");
        assert_eq!(parsed.date().map(|d| d.to_timestamp()), Some(1_800_000_000));
        assert!(parsed.header("MIME-Version").is_some());
    }

    #[test]
    fn full_message_structure() {
        let m = one(serde_json::json!({
            "from": "Ann Example <a@example.org>",
            "to": ["b@example.net"], "cc": ["Cy <c@example.net>"], "bcc": ["d@example.net", "B@example.net"],
            "reply_to": "help@example.org",
            "subject": "Grüße", "text": "Grüße aus Köln", "html": "<p>Grüße <img src=\"cid:logo\"></p>",
            "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<https://example.org/u>"},
            "attachments": [
                {"filename": "a.txt", "content_type": "text/plain", "content": "aGVsbG8="},
                {"filename": "logo.png", "content_type": "image/png", "content": "iVBORw0K", "content_id": "logo"}
            ]
        }));
        // Bcc only in the envelope; duplicates once.
        assert_eq!(m.recipients, ["b@example.net", "c@example.net", "d@example.net"]);
        let text = String::from_utf8(m.body.clone()).unwrap();
        assert!(!text.to_ascii_lowercase().contains("\r\nbcc:"), "{text}");
        assert!(m.body.is_ascii(), "7-bit safe");
        let parsed = MessageParser::default().parse(&m.body).unwrap();
        assert_eq!(parsed.subject(), Some("Grüße"));
        assert_eq!(parsed.from().unwrap().first().unwrap().name(), Some("Ann Example"));
        assert_eq!(
            parsed.reply_to().unwrap().first().unwrap().address(),
            Some("help@example.org")
        );
        assert_eq!(parsed.cc().unwrap().first().unwrap().address(), Some("c@example.net"));
        assert_eq!(parsed.header("X-Campaign").and_then(|h| h.as_text()), Some("spring"));
        assert_eq!(
            parsed.body_text(0).as_deref().map(str::trim_end),
            Some("Grüße aus Köln")
        );
        assert!(parsed.body_html(0).unwrap().contains("Grüße"));
        assert_eq!(parsed.content_type().unwrap().subtype(), Some("mixed"));
        assert!(text.contains("multipart/alternative"));
        assert!(text.contains("multipart/related"));
        let attachment = parsed
            .attachments()
            .find(|a| a.attachment_name() == Some("a.txt"))
            .expect("a.txt");
        assert_eq!(attachment.contents(), b"hello");
        let logo = parsed
            .attachments()
            .find(|a| a.content_id() == Some("logo"))
            .expect("inline logo");
        assert_eq!(logo.content_type().unwrap().ctype(), "image");
    }

    #[test]
    fn templated_batch_with_per_recipient_variables() {
        let req = request(serde_json::json!({
            "from": "a@example.org",
            "subject": "Hi {{ name }}", "text": "Dear {{ name }} ({{ recipient }}), {{ greeting }}",
            "html": "<p>Dear {{ name }}</p>",
            "variables": {"greeting": "welcome", "name": "default"},
            "recipients": [
                {"to": "b@example.net", "variables": {"name": "Bo"}},
                {"to": "c@example.net", "cc": ["d@example.net"], "variables": {"name": "<script>alert(1)</script>"}}
            ]
        }));
        let v = compose(&req, None, &ctx()).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].recipients, ["c@example.net", "d@example.net"]);
        let p0 = MessageParser::default().parse(&v[0].body).unwrap();
        assert_eq!(p0.subject(), Some("Hi Bo"));
        assert_eq!(
            p0.body_text(0).as_deref().map(str::trim_end),
            Some("Dear Bo (b@example.net), welcome")
        );
        let p1 = MessageParser::default().parse(&v[1].body).unwrap();
        assert_eq!(p1.subject(), Some("Hi <script>alert(1)</script>"));
        let html = p1.body_html(0).unwrap();
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert_eq!(p1.to().unwrap().first().unwrap().address(), Some("c@example.net"));
        // Different Message-IDs.
        assert_ne!(p0.message_id(), p1.message_id());
    }

    /// Whatever the content, the message is CRLF-only, 7-bit, with lines
    /// of at most 998 octets (RFC 5322 2.1.1), and reads back the same.
    #[test]
    fn wire_safe_for_any_content() {
        let long = "word ".repeat(1000) + &"x".repeat(3000);
        for text in [
            "a\nb\n",
            "a\r\nb",
            "Grüße\naus\nKöln",
            long.as_str(),
            "tab\there  \n.\n",
            "\u{1F600} emoji",
        ] {
            let m = one(
                serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "subject": text.lines().next().unwrap_or("s"),
                "text": text, "html": format!("<p>{text}</p>")}),
            );
            assert!(m.body.is_ascii(), "{text:?}");
            assert!(
                !m.body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                "bare LF for {text:?}"
            );
            assert!(
                m.body.split(|&b| b == b'\n').all(|l| l.len() <= 1000),
                "long line for {text:?}"
            );
            let parsed = MessageParser::default().parse(&m.body).unwrap();
            let crlf = |s: &str| s.replace("\r\n", "\n");
            assert_eq!(
                crlf(&parsed.body_text(0).unwrap()).trim_end(),
                crlf(text).trim_end(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn non_ascii_names_and_header_values() {
        let m = one(
            serde_json::json!({"from": "Jürgen Müller <j@example.org>", "to": ["Zoë <z@example.net>"],
            "subject": "s", "text": "t", "headers": {"X-Note": "für dich"},
            "attachments": [{"filename": "Übersicht 2027.pdf", "content_type": "application/pdf", "content": "JVBERg=="}]}),
        );
        assert!(m.body.is_ascii());
        let parsed = MessageParser::default().parse(&m.body).unwrap();
        assert_eq!(parsed.from().unwrap().first().unwrap().name(), Some("Jürgen Müller"));
        assert_eq!(parsed.to().unwrap().first().unwrap().name(), Some("Zoë"));
        // RFC 2047 (mail-parser leaves unknown fields undecoded).
        assert_eq!(
            parsed.header("X-Note").and_then(|h| h.as_text()),
            Some("=?utf-8?B?ZsO8ciBkaWNo?=")
        );
        let a = parsed.attachments().next().unwrap();
        assert_eq!(a.attachment_name(), Some("Übersicht 2027.pdf"));
        assert_eq!(a.contents(), b"%PDF");
    }

    /// Random hostile strings in every field: never a panic, and whatever
    /// is accepted is wire-safe with no header line the request did not ask for.
    #[test]
    fn hostile_fields_never_panic_or_inject() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(25);
        let atoms = [
            "a",
            "@",
            "example.org",
            "<",
            ">",
            "\r",
            "\n",
            "\r\n",
            " ",
            "\"",
            "\\",
            ":",
            ";",
            ",",
            "=?utf-8?q?x?=",
            "ü",
            "\u{0}",
            "\t",
            "{{",
            "}}",
            "Bcc: v@evil.test",
            ".",
            "-",
            "/",
            "~",
        ];
        let word = |rng: &mut rand::rngs::StdRng| -> String {
            let n = rng.gen_range(0..8);
            (0..n).map(|_| atoms[rng.gen_range(0..atoms.len())]).collect()
        };
        let mut accepted = 0;
        for _ in 0..3000 {
            let pick =
                |rng: &mut rand::rngs::StdRng, w: String, ok: &str| if rng.gen_bool(0.75) { ok.to_owned() } else { w };
            let w: Vec<String> = (0..8).map(|_| word(&mut rng)).collect();
            let json = serde_json::json!({
                "from": pick(&mut rng, w[0].clone(), "a@example.org"),
                "to": [pick(&mut rng, w[1].clone(), "b@example.net")],
                "subject": pick(&mut rng, w[2].clone(), "Hi"),
                "text": pick(&mut rng, w[3].clone(), "Hello"),
                "headers": {pick(&mut rng, w[4].clone(), "X-Ok"): pick(&mut rng, w[5].clone(), "v")},
                "attachments": [{"filename": pick(&mut rng, w[6].clone(), "f.txt"), "content": "eA==",
                                 "content_type": pick(&mut rng, w[7].clone(), "text/plain")}],
            });
            let Ok(req) = serde_json::from_value::<SendRequest>(json) else {
                continue;
            };
            let Ok(v) = compose(&req, None, &ctx()) else { continue };
            accepted += 1;
            let m = &v[0];
            assert!(m.body.is_ascii() && !m.body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
            assert!(!m.body.contains(&0), "{:?} {}", req, String::from_utf8_lossy(&m.body));
            let head_end = m.body.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            let head = String::from_utf8_lossy(&m.body[..head_end]);
            let fields: Vec<&str> = head.split("\r\n").filter(|l| !l.starts_with([' ', '\t'])).collect();
            assert!(!head.to_ascii_lowercase().contains("\r\nbcc:"), "{head}");
            // From, Subject, Date, Message-ID, To, the extra header, MIME-Version, Content-Type.
            assert_eq!(fields.len(), 8, "{head}");
        }
        assert!(
            accepted > 100,
            "{accepted} accepted: the generator is too hostile to test acceptance"
        );
    }

    #[test]
    fn thousand_recipients() {
        let recipients: Vec<_> = (0..1000)
            .map(|i| serde_json::json!({"to": format!("user{i}@example.net"), "variables": {"name": format!("User {i}")}}))
            .collect();
        let req = request(
            serde_json::json!({"from": "a@example.org", "subject": "Hi {{ name }}", "text": "Dear {{ name }}",
            "html": "<p>Dear {{ name }}</p>", "recipients": recipients}),
        );
        let started = std::time::Instant::now();
        let v = compose(&req, None, &ctx()).unwrap();
        eprintln!("1000 messages composed in {:?}", started.elapsed());
        assert_eq!(v.len(), 1000);
        for (i, m) in v.iter().enumerate().step_by(97) {
            assert_eq!(m.recipients, [format!("user{i}@example.net")]);
            let parsed = MessageParser::default().parse(&m.body).unwrap();
            assert_eq!(parsed.subject(), Some(format!("Hi User {i}").as_str()));
        }
    }

    #[test]
    fn literal_text_is_not_a_template() {
        let m = one(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "subject": "{{ x }}", "text": "{% raw"}),
        );
        let parsed = MessageParser::default().parse(&m.body).unwrap();
        assert_eq!(parsed.subject(), Some("{{ x }}"));
    }

    #[test]
    fn stored_and_inline_templates() {
        let stored = StoredTemplate {
            subject: "Order {{ order }}".into(),
            text: Some("Thanks, {{ name }}".into()),
            html: None,
            updated: 1,
        };
        let req = request(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "template": "orders",
            "variables": {"order": 7, "name": "Bo"}}),
        );
        let v = compose(&req, Some(&stored), &ctx()).unwrap();
        assert_eq!(
            MessageParser::default().parse(&v[0].body).unwrap().subject(),
            Some("Order 7")
        );
        let e = compose(&req, None, &ctx()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/template"));
        let req = request(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"],
            "template": {"subject": "S {{ recipient }}", "html": "<b>x</b>"}}));
        let v = compose(&req, None, &ctx()).unwrap();
        assert_eq!(
            MessageParser::default().parse(&v[0].body).unwrap().subject(),
            Some("S b@example.net")
        );
        let (status, f, _) = field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"],
            "subject": "x", "template": {"subject": "S", "text": "t"}}));
        assert_eq!((status, f.as_str()), (400, "/subject"));
    }

    #[test]
    fn strict_variables_name_recipient_and_variable() {
        let (status, f, detail) = field(
            serde_json::json!({"from": "a@example.org", "subject": "Hi {{ name }}", "text": "x",
            "recipients": [{"to": "b@example.net", "variables": {"name": "Bo"}}, {"to": "c@example.net"}]}),
        );
        assert_eq!(status, 400);
        assert_eq!(f, "/recipients/1/variables");
        assert!(detail.contains("recipient 1") && detail.contains("`name`"), "{detail}");
        let (_, f, _) = field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"],
            "subject": "Hi {{ name }}", "text": "x", "variables": {"other": 1}}));
        assert_eq!(f, "/variables");
        let (_, f, _) = field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"],
            "subject": "Hi", "text": "{% for %}", "variables": {"other": 1}}));
        assert_eq!(f, "/text");
        // A rendered subject cannot inject headers.
        let (_, f, _) = field(
            serde_json::json!({"from": "a@example.org", "subject": "Hi {{ name }}", "text": "x",
            "recipients": [{"to": "b@example.net", "variables": {"name": "x\r\nBcc: v@example.com"}}]}),
        );
        assert_eq!(f, "/recipients/0/variables");
    }

    #[test]
    fn validation_names_the_field() {
        let base =
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "subject": "Hi", "text": "Hello"});
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            field(j)
        };
        assert_eq!(with("from", "nope".into()).1, "/from");
        assert_eq!(
            with(
                "to",
                serde_json::json!(["b@example.net", "c@example.net", "bad address@x.org"])
            )
            .1,
            "/to/2"
        );
        assert_eq!(with("to", serde_json::json!([])).1, "/to");
        assert_eq!(with("cc", serde_json::json!(["x@y.org\r\nBcc: z@y.org"])).1, "/cc/0");
        assert_eq!(with("subject", "Hi\r\nBcc: z@y.org".into()).1, "/subject");
        assert_eq!(with("subject", "Hi\u{7}".into()).1, "/subject");
        assert_eq!(with("text", "a\u{0}b".into()).1, "/text");
        assert_eq!(
            with("headers", serde_json::json!({"X-Foo": "a\r\nBcc: z@y.org"})).1,
            "/headers/X-Foo"
        );
        assert_eq!(
            with("headers", serde_json::json!({"Subject": "x"})).1,
            "/headers/Subject"
        );
        assert_eq!(with("headers", serde_json::json!({"a/b c": "x"})).1, "/headers/a~1b c");
        assert_eq!(with("tags", serde_json::json!(vec!["t"; 11])).1, "/tags");
        assert_eq!(with("tags", serde_json::json!(["ok", "x".repeat(129)])).1, "/tags/1");
        assert_eq!(
            with("metadata", serde_json::json!({"k": "v".repeat(1025)})).1,
            "/metadata/k"
        );
        assert_eq!(with("campaign", "c".repeat(129).into()).1, "/campaign");
        assert_eq!(with("window_minutes", 0.into()).1, "/window_minutes");
        assert_eq!(with("send_at", "tomorrow".into()).1, "/send_at");
        assert_eq!(with("send_at", (1_800_000_000 + 73 * 3600).into()).1, "/send_at");
        assert_eq!(
            with("recipients", serde_json::json!([{"to": "c@example.net"}])).1,
            "/to",
            "to and recipients together"
        );
        let mut no_body = base.clone();
        no_body.as_object_mut().unwrap().remove("text");
        assert_eq!(field(no_body).1, "/text");
        let mut no_subject = base.clone();
        no_subject.as_object_mut().unwrap().remove("subject");
        assert_eq!(field(no_subject).1, "/subject");
        let many: Vec<String> = (0..1001).map(|i| format!("r{i}@example.net")).collect();
        assert_eq!(with("to", serde_json::json!(many)).1, "/to");
        let recipients: Vec<_> = (0..1001)
            .map(|i| serde_json::json!({"to": format!("r{i}@example.net")}))
            .collect();
        let mut j = base.clone();
        j.as_object_mut().unwrap().remove("to");
        j["recipients"] = serde_json::json!(recipients);
        assert_eq!(field(j).1, "/recipients");
    }

    #[test]
    fn size_limit_is_413() {
        let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 900_000]);
        let (status, f, _) = field(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "subject": "Hi", "text": "x",
            "attachments": [{"filename": "big.bin", "content": big}]}),
        );
        assert_eq!((status, f.as_str()), (413, "/"));
        let (status, _, _) = field(
            serde_json::json!({"from": "a@example.org", "subject": "Hi", "text": "{{ 'x' * 2000000 }}",
            "recipients": [{"to": "b@example.net"}]}),
        );
        assert_eq!(status, 413);
    }

    #[test]
    fn schedule_and_window() {
        let c = ctx();
        assert_eq!(
            send_at(Some(&serde_json::json!(c.now + 60)), &c).unwrap(),
            Some(c.now + 60)
        );
        assert_eq!(
            send_at(Some(&serde_json::json!(5)), &c).unwrap(),
            Some(c.now),
            "the past is now"
        );
        assert_eq!(
            send_at(Some(&serde_json::json!("2027-01-15T09:00:00Z")), &c).unwrap(),
            Some(1_800_000_000 + 3600),
        );
        assert_eq!(
            send_at(Some(&serde_json::json!("2027-01-15T10:00:00+01:00")), &c).unwrap(),
            Some(1_800_003_600)
        );
        assert!(send_at(Some(&serde_json::json!(1.5)), &c).is_err());
        assert_eq!(schedule(None, None, 3, c.now).unwrap(), [0, 0, 0]);
        assert_eq!(schedule(Some(c.now + 10), None, 2, c.now).unwrap(), [c.now + 10; 2]);
        // 4 messages over 10 minutes: every 150 s from the start.
        assert_eq!(
            schedule(Some(c.now + 10), Some(10), 4, c.now).unwrap(),
            [c.now + 10, c.now + 160, c.now + 310, c.now + 460]
        );
        assert_eq!(schedule(None, Some(1), 1, c.now).unwrap(), [c.now]);
        assert!(schedule(None, Some(1441), 1, c.now).is_err());

        let req = request(
            serde_json::json!({"from": "a@example.org", "subject": "s", "text": "t", "send_at": c.now + 100,
            "window_minutes": 1, "recipients": [{"to": "b@example.net"}, {"to": "c@example.net"}, {"to": "d@example.net"}]}),
        );
        let times: Vec<i64> = compose(&req, None, &c).unwrap().iter().map(|m| m.not_before).collect();
        assert_eq!(times, [c.now + 100, c.now + 120, c.now + 140]);
    }

    fn raw(json: serde_json::Value) -> Result<Composed, Problem> {
        compose_raw(&serde_json::from_value(json).expect("raw shape"), &ctx())
    }

    #[test]
    fn raw_is_normalised_and_completed() {
        let m = raw(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net", "B@example.net", "c@example.net"],
            "message": "From: Ann <a@example.org>\nTo: b@example.net\nSubject: raw\n\nline 1\nline 2\n"}),
        )
        .unwrap();
        assert_eq!(m.reverse_path, "a@example.org");
        assert_eq!(m.recipients, ["b@example.net", "c@example.net"]);
        assert!(!m.body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'), "CRLF only");
        let parsed = MessageParser::default().parse(&m.body).unwrap();
        assert_eq!(parsed.subject(), Some("raw"));
        assert!(parsed.message_id().unwrap().ends_with("@mta.example.org"));
        assert_eq!(parsed.date().map(|d| d.to_timestamp()), Some(1_800_000_000));
        assert_eq!(parsed.body_text(0).as_deref(), Some("line 1\r\nline 2\r\n"));

        // Present Message-ID and Date are kept, CRLF input untouched.
        let text = "From: a@example.org\r\nMessage-ID: <x@y>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nhi\r\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(text);
        let m = raw(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "message_base64": b64,
            "send_at": 1_800_000_600}),
        )
        .unwrap();
        assert_eq!(m.body, text.as_bytes());
        assert_eq!(m.not_before, 1_800_000_600);
    }

    #[test]
    fn raw_refusals() {
        let field = |json: serde_json::Value| {
            let p = raw(json).unwrap_err();
            (p.status, p.field.unwrap_or_default(), p.detail)
        };
        let ok = "From: a@example.org\r\n\r\nx";
        assert_eq!(
            field(serde_json::json!({"from": "a@example.org", "to": [], "message": ok})).1,
            "/to"
        );
        assert_eq!(
            field(serde_json::json!({"from": "a@example.org", "to": ["x y@z.org"], "message": ok})).1,
            "/to/0"
        );
        assert_eq!(
            field(serde_json::json!({"from": "<a@example.org>", "to": ["b@example.net"], "message": ok})).1,
            "/from"
        );
        assert_eq!(
            field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"]})).1,
            "/message"
        );
        assert_eq!(
            field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "message": ok, "message_base64": "eA=="})).1,
            "/message_base64"
        );
        let (_, f, detail) = field(
            serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "message": "Subject: x\r\n\r\nbody"}),
        );
        assert_eq!(f, "/message");
        assert!(detail.contains("From"), "{detail}");
        let (_, _, detail) = field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"],
            "message": "From: a@example.org\r\nthis is not a header\r\n\r\nbody"}));
        assert!(detail.contains("line 2"), "{detail}");
        assert_eq!(
            field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "message_base64": "***"})).1,
            "/message_base64"
        );
        let big = format!("From: a@example.org\r\n\r\n{}", "x".repeat(1 << 20));
        let (status, f, _) =
            field(serde_json::json!({"from": "a@example.org", "to": ["b@example.net"], "message": big}));
        assert_eq!((status, f.as_str()), (413, "/message"));
    }
}
