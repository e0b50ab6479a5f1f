//! Feedback loops: ARF reports (RFC 5965) that mailbox providers send to
//! the addresses of `[fbl]` are taken by the node when it accepts them
//! (the queue front calls [`Fbl::receive`] before writing the message),
//! not delivered: the complained-about recipient becomes a `complaint`
//! event and an entry of the cluster's suppression list.
//!
//! Answers (the sender is a provider's robot, which only needs to know
//! the report arrived): `250` once processed, also for a report that
//! cannot be understood (logged, counted as `malformed`); `451` only when
//! the suppression could not be written to the control group, so that the
//! provider sends the report again.
//!
//! # Layout
//! - [`arf`]: the pure parser of reports.
//! - this file: what a report does ([`Fbl`]), the one write of a complaint
//!   ([`record_complaint`]), and the metrics.

pub mod arf;

use std::sync::Arc;

use tern_model::peer::Operation;
use tern_model::shaping::Suppression;

use crate::cluster::error::ClusterError;
use crate::cluster::writer::ControlWriter;
use crate::config::{FblConfig, FblScope};
use crate::envelope::Envelope;
use crate::raft::NodeId;
use tern_smtp::EnqueueError;

/// The suppression class of a complaint.
pub const COMPLAINT_CLASS: &str = "complaint";

/// Longest wait for the suppression's write to commit.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The node's feedback-loop handling.
pub struct Fbl {
    config: FblConfig,
    node: NodeId,
    /// The control group's state and writer, once the cluster is up.
    delivery: Arc<crate::delivery::Delivery>,
    metrics: crate::metrics::FblMetrics,
}

/// What became of a report's complaint (the event's `suppression` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Suppressed {
    /// A new entry was committed.
    Added,
    /// An entry in force already covers the recipient: nothing written.
    Existing,
    /// The feedback type is not one of `fbl.suppress_types`.
    Skipped,
    /// The report names no recipient (redacted, or several in To).
    NoRecipient,
}

impl Suppressed {
    fn as_str(self) -> &'static str {
        match self {
            Suppressed::Added => "added",
            Suppressed::Existing => "existing",
            Suppressed::Skipped => "skipped",
            Suppressed::NoRecipient => "no_recipient",
        }
    }
}

impl Fbl {
    pub fn new(
        config: FblConfig,
        node: NodeId,
        delivery: Arc<crate::delivery::Delivery>,
        metrics: crate::metrics::FblMetrics,
    ) -> Fbl {
        Fbl {
            config,
            node,
            delivery,
            metrics,
        }
    }

    /// Whether mail to `address` is a feedback report.
    pub fn is_report_address(&self, address: &str) -> bool {
        self.config.is_report_address(address)
    }

    /// Whether a report is also queued for its recipients (`fbl.keep`).
    pub fn keep(&self) -> bool {
        self.config.keep
    }

    /// Processes the report `body` accepted as queue id `id`. `Err` only
    /// when the suppression could not be written (the client gets 451).
    pub async fn receive(&self, id: &str, envelope: &Envelope, body: &[u8]) -> Result<(), EnqueueError> {
        let report = match arf::parse(body) {
            Ok(report) => report,
            Err(e) => {
                self.metrics.count("malformed");
                tracing::warn!(report_id = %id, from = %envelope.reverse_path, client_ip = %envelope.client_ip, error = %e, "feedback report not understood, dropped");
                return Ok(());
            }
        };
        if !self.config.trusts(&report.reporter) {
            self.metrics.count("untrusted");
            tracing::warn!(report_id = %id, reporter = %report.reporter, client_ip = %envelope.client_ip, "feedback report from a reporter not in fbl.reporters, dropped");
            return Ok(());
        }
        let now = chrono::Utc::now().timestamp();
        let Some(rcpt) = report.recipient().map(str::to_owned) else {
            self.metrics.count("no_recipient");
            self.event(id, &report, "", "", Suppressed::NoRecipient);
            return Ok(());
        };
        let scope = match self.config.scope {
            FblScope::Global => String::new(),
            // No sender known: the global list (a complaint is never dropped).
            FblScope::Sender => report.sender().map(Envelope::domain_of).unwrap_or_default(),
        };
        if !self.config.suppress_types.contains(&report.feedback_type) {
            self.metrics.count("complaint");
            self.event(id, &report, &rcpt, &scope, Suppressed::Skipped);
            return Ok(());
        }
        let expires = self.config.expire_after.map_or(0, |d| {
            now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        });
        let covered = self
            .delivery
            .control()
            .and_then(|c| c.suppression(&scope, &rcpt))
            .is_some_and(|s| s.in_force(now) && (s.expires == 0 || (expires != 0 && s.expires >= expires)));
        if covered {
            self.metrics.count("complaint");
            self.event(id, &report, &rcpt, &scope, Suppressed::Existing);
            return Ok(());
        }
        let entry = Suppression {
            scope: scope.clone(),
            address: rcpt.clone(),
            class: COMPLAINT_CLASS.into(),
            reason: reason(&report),
            added: now,
            expires,
        };
        let written = match self.delivery.writer() {
            Some(writer) => record_complaint(writer, entry).await,
            None => Err(ClusterError::NoControlGroup),
        };
        if let Err(e) = written {
            self.metrics.count("failed");
            tracing::warn!(report_id = %id, rcpt = %rcpt, error = %e, "complaint not recorded, the report is refused for now");
            return Err(EnqueueError::Temporary(
                "feedback report not recorded, try again later".into(),
            ));
        }
        self.metrics.count("complaint");
        self.event(id, &report, &rcpt, &scope, Suppressed::Added);
        Ok(())
    }

    fn event(&self, id: &str, report: &arf::Report, rcpt: &str, scope: &str, suppression: Suppressed) {
        let original = report.original.clone().unwrap_or_default();
        let reporter = if report.reporter.is_empty() {
            &report.user_agent
        } else {
            &report.reporter
        };
        tracing::info!(
            target: "tern::event",
            event = "complaint",
            rcpt = %rcpt,
            feedback_type = %report.feedback_type,
            msg_id = %original.queue_id.as_deref().unwrap_or_default(),
            message_id = %original.message_id,
            from = %report.sender().unwrap_or_default(),
            source_ip = %report.source_ip,
            reporter = %reporter,
            user_agent = %report.user_agent,
            report_id = %id,
            scope = %scope,
            suppression = suppression.as_str(),
            node = self.node,
            "complaint"
        );
    }
}

/// The suppression entry's reason: what reported it, about which message.
fn reason(report: &arf::Report) -> String {
    let by = if report.reporter.is_empty() {
        report.user_agent.as_str()
    } else {
        report.reporter.as_str()
    };
    let original = report.original.as_ref();
    let about = original
        .and_then(|o| o.queue_id.clone())
        .or_else(|| original.map(|o| o.message_id.clone()).filter(|m| !m.is_empty()))
        .unwrap_or_else(|| "an unknown message".into());
    let mut reason = format!("{} report by {by} about {about}", report.feedback_type);
    reason.truncate(arf::MAX_VALUE);
    reason
}

/// Writes one complaint's suppression entry to the control group (every
/// node applies it); `Ok` once committed. The one place complaints are
/// written, so that the suppression list's owner can find it.
pub async fn record_complaint(writer: &ControlWriter, entry: Suppression) -> Result<(), ClusterError> {
    let write = writer.write(Operation::Suppress { entries: vec![entry] });
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(ClusterError::Refused("the control group did not commit in time".into())),
    }
}
