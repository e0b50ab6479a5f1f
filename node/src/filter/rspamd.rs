//! rspamd's HTTP protocol: `POST /checkv2` to its normal worker with the
//! message as body and the envelope in headers (`IP`, `Helo`, `From`, one
//! `Rcpt` per recipient, `User`, `MTA-Name`, `Password`), over one
//! HTTP/1.1 connection per message (hyper's low-level client, so unix
//! sockets work as TCP does).
//!
//! The JSON answer's `action` decides: `reject` refuses with 550 5.7.1,
//! `soft reject` and `greylist` defer with 451 4.7.1, `rewrite subject`
//! sets the Subject rspamd computed, `add header` marks `X-Spam: Yes`. Every
//! scanned message gets `X-Spam-Action` and `X-Spam-Score` (fields of those
//! names the sender wrote are removed first), plus the `milter.add_headers`
//! and `milter.remove_headers` rspamd's modules asked for.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tracing::debug;

use super::message::Edit;
use super::{Address, Answer, Context, FilterError, Verdict};
use tern_smtp::reply::Reply;

/// Largest JSON answer read (rspamd's are a few KiB, with every symbol).
const MAX_ANSWER: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
struct Check {
    action: String,
    #[serde(default)]
    score: f64,
    #[serde(default)]
    required_score: f64,
    /// The new Subject for `rewrite subject`.
    subject: Option<String>,
    #[serde(default)]
    messages: Messages,
    milter: Option<Milter>,
}

#[derive(Debug, Default, Deserialize)]
struct Messages {
    smtp_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Milter {
    #[serde(default)]
    add_headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    remove_headers: serde_json::Map<String, serde_json::Value>,
}

pub async fn check(
    address: &Address,
    password: Option<&str>,
    context: &Context<'_>,
    message: &[u8],
) -> Result<Answer, FilterError> {
    let stream = address.connect().await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    let connection = tokio::spawn(connection);
    let envelope = context.envelope;
    let mut request = Request::post("/checkv2")
        .header(HOST, address.host())
        .header(CONTENT_TYPE, "message/rfc822");
    let mut add = |name: &'static str, value: &str| {
        // Envelope text holds no CR/LF; anything else odd is left out.
        if let (Ok(value), Some(headers)) = (HeaderValue::from_bytes(value.as_bytes()), request.headers_mut()) {
            headers.append(HeaderName::from_static(name), value);
        }
    };
    if let Some(ip) = context.client_ip {
        add("ip", &ip.to_string());
    }
    add("helo", &envelope.helo);
    add("from", &envelope.reverse_path);
    for recipient in &envelope.recipients {
        add("rcpt", &recipient.address);
    }
    if let Some(user) = &envelope.auth_user {
        add("user", user);
    }
    add("mta-name", context.hostname);
    if let Some(password) = password {
        add("password", password);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(message)))
        .map_err(|e| FilterError::Protocol(format!("bad request: {e}")))?;
    let response = sender.send_request(request).await.map_err(http_error)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| FilterError::Protocol(format!("reading the answer: {e}")))?
        .to_bytes();
    connection.abort();
    if !status.is_success() {
        return Err(FilterError::Protocol(format!(
            "rspamd answered HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )));
    }
    let check: Check =
        serde_json::from_slice(&body).map_err(|e| FilterError::Protocol(format!("rspamd's answer: {e}")))?;
    debug!(action = %check.action, score = check.score, "rspamd");
    Ok(answer(check))
}

fn http_error(e: hyper::Error) -> FilterError {
    FilterError::Protocol(format!("HTTP: {e}"))
}

/// The verdict and header edits for one `/checkv2` answer.
fn answer(check: Check) -> Answer {
    let mut edits: Vec<Edit> = ["X-Spam", "X-Spam-Action", "X-Spam-Score"]
        .into_iter()
        .map(|name| Edit::Remove { name: name.into() })
        .collect();
    if let Some(milter) = &check.milter {
        for name in milter.remove_headers.keys() {
            edits.push(Edit::Remove { name: name.clone() });
        }
    }
    edits.push(Edit::Append {
        name: "X-Spam-Action".into(),
        value: check.action.clone(),
    });
    edits.push(Edit::Append {
        name: "X-Spam-Score".into(),
        value: format!("{:.2} / {:.2}", check.score, check.required_score),
    });
    if let Some(milter) = &check.milter {
        for (name, value) in &milter.add_headers {
            for value in header_values(value) {
                edits.push(Edit::Append {
                    name: name.clone(),
                    value,
                });
            }
        }
    }
    let text = |default: &str| {
        check
            .messages
            .smtp_message
            .as_deref()
            .filter(|m| !m.is_empty() && m.chars().all(|c| !c.is_control()))
            .unwrap_or(default)
            .chars()
            .take(200)
            .collect::<String>()
    };
    let verdict = match check.action.as_str() {
        "reject" => Verdict::Refuse(Reply::new(550, "5.7.1", text("Spam message rejected"))),
        "soft reject" | "greylist" => Verdict::Refuse(Reply::new(451, "4.7.1", text("Try again later"))),
        "add header" => {
            edits.push(Edit::Append {
                name: "X-Spam".into(),
                value: "Yes".into(),
            });
            Verdict::Accept
        }
        "rewrite subject" => {
            edits.push(Edit::Append {
                name: "X-Spam".into(),
                value: "Yes".into(),
            });
            if let Some(subject) = check.subject {
                edits.push(Edit::Remove { name: "Subject".into() });
                edits.push(Edit::Append {
                    name: "Subject".into(),
                    value: subject,
                });
            }
            Verdict::Accept
        }
        _ => Verdict::Accept,
    };
    Answer { verdict, edits }
}

/// `add_headers` values: a string, `{"value": ..., "order": n}`, or a list of either.
fn header_values(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Object(o) => o
            .get("value")
            .and_then(|v| v.as_str())
            .map(|s| vec![s.to_owned()])
            .unwrap_or_default(),
        serde_json::Value::Array(a) => a.iter().flat_map(header_values).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Answer {
        answer(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn actions() {
        let a =
            parse(r#"{"action":"reject","score":15,"required_score":15,"messages":{"smtp_message":"Gtube pattern"}}"#);
        assert_eq!(a.verdict, Verdict::Refuse(Reply::new(550, "5.7.1", "Gtube pattern")));
        let a = parse(r#"{"action":"soft reject","score":1,"required_score":15}"#);
        assert_eq!(a.verdict, Verdict::Refuse(Reply::new(451, "4.7.1", "Try again later")));
        let a = parse(r#"{"action":"rewrite subject","subject":"*** SPAM *** hi","score":0,"required_score":15}"#);
        assert_eq!(a.verdict, Verdict::Accept);
        assert!(a.edits.contains(&Edit::Append {
            name: "Subject".into(),
            value: "*** SPAM *** hi".into()
        }));
        let a = parse(
            r#"{"action":"no action","score":-0.5,"required_score":15,
                "milter":{"add_headers":{"X-Rspamd-Server":{"value":"a","order":0},"X-Two":["b","c"]},"remove_headers":{"X-Spam":0}}}"#,
        );
        assert_eq!(a.verdict, Verdict::Accept);
        assert!(a.edits.contains(&Edit::Append {
            name: "X-Spam-Score".into(),
            value: "-0.50 / 15.00".into()
        }));
        assert!(a.edits.contains(&Edit::Append {
            name: "X-Two".into(),
            value: "c".into()
        }));
        assert!(!a
            .edits
            .iter()
            .any(|e| matches!(e, Edit::Append { name, .. } if name == "X-Spam")));
    }
}
