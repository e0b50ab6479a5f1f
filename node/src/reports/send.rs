//! Delivering a built report: the `rua` destinations from DNS, the RFC
//! 7489 7.1 check of external destinations, and the report itself as a
//! DKIM-signed mail with a gzip attachment (queued like any message) or,
//! for TLS-RPT `https` destinations, a POST of `application/tlsrpt+gzip`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mail_auth::hickory_resolver::proto::rr::RData;
use mail_auth::MessageAuthenticator;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use tern_model::envelope::{BodyType, Envelope, Notify, Recipient};

use crate::queue::{IdGen, QueueFront};

/// How long an HTTPS report destination has to answer.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// The envelope's `auth_user` for reports: marks them as our own
/// outbound mail, so the DKIM signer signs them.
const REPORTS_USER: &str = "tern-reports";

/// What a report needs to go out.
pub struct Sender {
    pub dns: MessageAuthenticator,
    /// The node's DKIM signer in force (swapped by a config reload).
    pub signer: crate::auth::DkimSlot,
    pub front: Arc<QueueFront>,
    pub ids: Arc<IdGen>,
    pub hostname: String,
    pub https_tls: Option<rustls::ClientConfig>,
}

/// One report mail: its headers and attachment.
pub struct ReportMail<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub subject: String,
    pub extra_headers: Vec<(&'static str, String)>,
    /// `multipart/report; report-type=tlsrpt` (TLS-RPT) or `multipart/mixed` (DMARC).
    pub report_type: Option<&'static str>,
    pub text: String,
    pub attachment_type: &'static str,
    pub filename: String,
    pub gz: Vec<u8>,
}

pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data)?;
    e.finish()
}

impl Sender {
    /// The TXT strings at `name` (each record's strings joined); empty
    /// when there is none.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        match self
            .dns
            .resolver()
            .txt_lookup(format!("{}.", name.trim_end_matches('.')))
            .await
        {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => {
                        let bytes: Vec<u8> = txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
                        Some(String::from_utf8_lossy(&bytes).into_owned())
                    }
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// RFC 7489 7.1: may reports about `policy_domain` go to an address in
    /// `rua_domain`? Yes within the same organisation, else only when
    /// `<policy_domain>._report._dmarc.<rua_domain>` has a DMARC1 record.
    pub async fn external_allowed(&self, policy_domain: &str, rua_domain: &str) -> bool {
        if super::dmarc::same_organization(policy_domain, rua_domain) {
            return true;
        }
        let name = format!("{policy_domain}._report._dmarc.{rua_domain}");
        match self.txt(&name).await {
            Ok(texts) => texts.iter().any(|t| {
                t.trim_start()
                    .get(..8)
                    .is_some_and(|v| v.eq_ignore_ascii_case("v=DMARC1"))
            }),
            Err(e) => {
                tracing::info!(name = %name, error = %e, "DMARC report: verification record lookup failed");
                false
            }
        }
    }

    /// Builds, signs and queues one report mail.
    pub async fn mail(&self, m: ReportMail<'_>) -> anyhow::Result<String> {
        let text = MimePart::new("text/plain", BodyPart::Text(m.text.into()));
        let attachment = MimePart::new(ContentType::new(m.attachment_type), BodyPart::Binary(m.gz.into()))
            .attachment(m.filename.clone());
        let body = match m.report_type {
            Some(t) => MimePart::new(
                ContentType::new("multipart/report").attribute("report-type", t),
                vec![text, attachment],
            ),
            None => MimePart::new("multipart/mixed", vec![text, attachment]),
        };
        let id = self.ids.next();
        let mut builder = MessageBuilder::new()
            .from(m.from.to_owned())
            .to(m.to.to_owned())
            .subject(Text::new(m.subject))
            .date(Date::new(chrono::Utc::now().timestamp()))
            .message_id(MessageId::new(format!("{id}.report@{}", self.hostname)));
        for (name, value) in m.extra_headers {
            builder = builder.header(name, Text::new(value));
        }
        let mut message = Vec::new();
        builder.body(body).write_to(&mut message)?;
        let envelope = Envelope {
            reverse_path: m.from.to_owned(),
            recipients: vec![Recipient {
                address: m.to.to_owned(),
                notify: Notify::default(),
                orcpt: None,
            }],
            body_type: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            declared_size: None,
            helo: "reports".into(),
            client_ip: "127.0.0.1".into(),
            auth_user: Some(REPORTS_USER.into()),
        };
        let message = match self.signer.load_full() {
            Some(signer) => signer.sign(&envelope, message).await,
            None => message,
        };
        self.front
            .submit(id.clone(), envelope, message)
            .await
            .map_err(|e| anyhow::anyhow!("queueing the report: {e}"))?;
        Ok(id)
    }

    /// POSTs a TLS-RPT report to an `https` destination (RFC 8460 3).
    pub async fn post(&self, url: &str, gz: Vec<u8>) -> anyhow::Result<()> {
        let tls = match &self.https_tls {
            Some(t) => t.clone(),
            None => crate::webhook::client::tls_config()?,
        };
        let uri: hyper::Uri = url.parse()?;
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/tlsrpt+gzip"),
        );
        let poster = crate::webhook::client::Poster::new(tls, uri, headers, POST_TIMEOUT);
        poster.post(Bytes::from(gz)).await?;
        Ok(())
    }
}
