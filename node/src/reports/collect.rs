//! Aggregating once for the cluster. Every node counts in memory; when a
//! period ends it writes its counts to the control group, one value per
//! domain: `PutShared { space: "report", key: "<kind>/<period start>/<domain>/<node>" }`.
//! The control group's leader, `grace` after the period's end, reads every
//! node's values, merges them, sends one report per domain and deletes
//! the period's keys. A leader change between sending and deleting makes
//! the new leader send the period again (at-least-once, as delivery).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tern_model::peer::Operation;

use super::dmarc::{DmarcRecorder, DomainTally};
use super::send::{gzip, ReportMail, Sender};
use super::tls::TlsRecorder;
use super::tlsrpt::PolicyTally;
use crate::cluster::control::ControlState;
use crate::cluster::writer::ControlWriter;
use crate::config::{DmarcReportsConfig, TlsRptConfig};

/// The control group's space for report counts.
pub const SPACE: &str = "report";
/// Most values the leader reads per kind and pass (the rest wait a pass).
const MAX_SCAN: usize = 200_000;
/// Values per control-group write (under the 5,000-entry limit).
const PER_WRITE: usize = 1_000;
/// Bytes per control-group write (under the 4 MiB limit).
const BYTES_PER_WRITE: usize = 2 * 1024 * 1024;
/// Values kept for a retry when writing them failed (a leaderless control
/// group); beyond, a period's counts of this node are dropped (logged).
const MAX_PENDING: usize = 50_000;

/// The two kinds of report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tls,
    Dmarc,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Dmarc => "dmarc",
        }
    }
}

/// The reporting task of one node.
pub struct Collector {
    pub node_id: u64,
    pub tls: Option<(TlsRptConfig, Arc<TlsRecorder>)>,
    pub dmarc: Option<(DmarcReportsConfig, Arc<DmarcRecorder>)>,
    pub writer: ControlWriter,
    pub control: ControlState,
    pub sender: Sender,
}

fn period_start(now: i64, interval: i64) -> i64 {
    now.div_euclid(interval) * interval
}

fn key(kind: Kind, start: i64, domain: &str, node: u64) -> String {
    format!("{}/{start:020}/{domain}/{node}", kind.name())
}

/// `(period start, domain)` of a key written by [`key`].
fn parse_key(kind: Kind, key: &str) -> Option<(i64, String)> {
    let rest = key.strip_prefix(kind.name())?.strip_prefix('/')?;
    let mut parts = rest.splitn(3, '/');
    let start = parts.next()?.parse().ok()?;
    let domain = parts.next()?.to_owned();
    parts.next()?;
    Some((start, domain))
}

impl Collector {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = Duration::from_secs(60);
        if let Some((c, _)) = &self.tls {
            tick = tick.min(c.interval / 4).min(c.grace / 2);
        }
        if let Some((c, _)) = &self.dmarc {
            tick = tick.min(c.interval / 4).min(c.grace / 2);
        }
        let tick = tick.max(Duration::from_millis(500));
        let now = chrono::Utc::now().timestamp();
        let mut tls_period = self
            .tls
            .as_ref()
            .map(|(c, _)| period_start(now, c.interval.as_secs() as i64));
        let mut dmarc_period = self
            .dmarc
            .as_ref()
            .map(|(c, _)| period_start(now, c.interval.as_secs() as i64));
        let mut pending: Vec<(String, Vec<u8>)> = Vec::new();
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            let now = chrono::Utc::now().timestamp();
            if let (Some((c, recorder)), Some(current)) = (&self.tls, tls_period.as_mut()) {
                let start = period_start(now, c.interval.as_secs() as i64);
                if start > *current {
                    for (domain, tallies) in super::tlsrpt::by_domain(recorder.take()) {
                        if let Ok(v) = serde_json::to_vec(&tallies) {
                            pending.push((key(Kind::Tls, *current, &domain, self.node_id), v));
                        }
                    }
                    *current = start;
                }
            }
            if let (Some((c, recorder)), Some(current)) = (&self.dmarc, dmarc_period.as_mut()) {
                let start = period_start(now, c.interval.as_secs() as i64);
                if start > *current {
                    for (domain, tally) in recorder.take() {
                        if let Ok(v) = serde_json::to_vec(&tally) {
                            pending.push((key(Kind::Dmarc, *current, &domain, self.node_id), v));
                        }
                    }
                    *current = start;
                }
            }
            self.flush(&mut pending).await;
            if self.writer.leads_control() {
                if let Some((c, _)) = &self.tls {
                    self.lead(Kind::Tls, c.interval, c.grace, c.max_reports, now).await;
                }
                if let Some((c, _)) = &self.dmarc {
                    self.lead(Kind::Dmarc, c.interval, c.grace, c.max_reports, now).await;
                }
            }
        }
    }

    /// Writes this node's counts; what fails stays for the next pass.
    async fn flush(&self, pending: &mut Vec<(String, Vec<u8>)>) {
        while !pending.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < pending.len() && n < PER_WRITE {
                let size = pending[n].0.len() + pending[n].1.len();
                if n > 0 && bytes + size > BYTES_PER_WRITE {
                    break;
                }
                bytes += size;
                n += 1;
            }
            let entries: Vec<(String, Vec<u8>)> = pending[..n].to_vec();
            let op = Operation::PutShared {
                space: SPACE.into(),
                entries,
            };
            match self.writer.write(op).await {
                Ok(()) => {
                    pending.drain(..n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, values = pending.len(), "reports: writing this node's counts failed; retried");
                    if pending.len() > MAX_PENDING {
                        let dropped = pending.len() - MAX_PENDING;
                        pending.drain(..dropped);
                        tracing::warn!(dropped, "reports: counts dropped (control group unavailable too long)");
                    }
                    return;
                }
            }
        }
    }

    /// As the control group's leader: sends the reports of every period
    /// whose grace time is over, then deletes its counts.
    async fn lead(&self, kind: Kind, interval: Duration, grace: Duration, max_reports: usize, now: i64) {
        let prefix = format!("{}/", kind.name());
        let values = self.control.shared_scan(SPACE, &prefix, MAX_SCAN);
        let mut periods: BTreeMap<i64, BTreeMap<String, Vec<Vec<u8>>>> = BTreeMap::new();
        for (k, v) in values {
            if let Some((start, domain)) = parse_key(kind, &k) {
                periods.entry(start).or_default().entry(domain).or_default().push(v);
            }
        }
        let (interval, grace) = (interval.as_secs() as i64, grace.as_secs() as i64);
        for (start, domains) in periods {
            let end = start + interval;
            if now < end + grace {
                continue;
            }
            let mut sent = 0usize;
            for (domain, values) in domains {
                if sent >= max_reports {
                    tracing::warn!(kind = kind.name(), period = start, domain = %domain, "reports: max_reports reached; not sent");
                    continue;
                }
                let result = match kind {
                    Kind::Tls => {
                        let parts = values
                            .iter()
                            .filter_map(|v| serde_json::from_slice::<Vec<PolicyTally>>(v).ok());
                        self.send_tls(&domain, start, end - 1, &super::tlsrpt::merge(parts))
                            .await
                    }
                    Kind::Dmarc => {
                        let parts = values
                            .iter()
                            .filter_map(|v| serde_json::from_slice::<DomainTally>(v).ok());
                        self.send_dmarc(&domain, start, end - 1, &super::dmarc::merge(parts))
                            .await
                    }
                };
                match result {
                    Ok(n) => sent += usize::from(n > 0),
                    Err(e) => tracing::warn!(kind = kind.name(), domain = %domain, error = %e, "report not sent"),
                }
            }
            let op = Operation::DeleteShared {
                space: SPACE.into(),
                keys: Vec::new(),
                prefixes: vec![format!("{}/{start:020}/", kind.name())],
            };
            if let Err(e) = self.writer.write(op).await {
                tracing::warn!(kind = kind.name(), period = start, error = %e, "reports: deleting a sent period failed");
            }
        }
    }

    /// The TLS-RPT report of `domain` to every `rua` of its `_smtp._tls` record.
    async fn send_tls(&self, domain: &str, begin: i64, end: i64, tallies: &[PolicyTally]) -> anyhow::Result<usize> {
        let Some((c, _)) = &self.tls else { return Ok(0) };
        let texts = self
            .sender
            .txt(&format!("_smtp._tls.{domain}"))
            .await
            .map_err(|e| anyhow::anyhow!("_smtp._tls lookup: {e}"))?;
        let Some(rua) = texts.iter().find_map(|t| super::tlsrpt::parse_record(t)) else {
            return Ok(0);
        };
        let submitter = crate::envelope::Envelope::domain_of(&c.from);
        let report_id = format!("{begin}.{domain}@{submitter}");
        let json = super::tlsrpt::report_json(
            &super::tlsrpt::Header {
                org_name: &c.org_name,
                contact_info: &c.contact_info,
                report_id: &report_id,
                begin,
                end: end + 1,
                policy_domain: domain,
            },
            tallies,
        );
        let gz = gzip(&serde_json::to_vec(&json)?)?;
        let mut sent = 0;
        for uri in rua {
            if let Some(to) = uri.strip_prefix("mailto:") {
                let to = to.split('?').next().unwrap_or(to);
                let id = self
                    .sender
                    .mail(ReportMail {
                        from: &c.from,
                        to,
                        subject: format!("Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"),
                        extra_headers: vec![
                            ("TLS-Report-Domain", domain.to_owned()),
                            ("TLS-Report-Submitter", submitter.clone()),
                        ],
                        report_type: Some("tlsrpt"),
                        text: format!("This is an aggregate TLS report from {}.\r\n", c.org_name),
                        attachment_type: "application/tlsrpt+gzip",
                        filename: format!("{submitter}!{domain}!{begin}!{}.json.gz", end + 1),
                        gz: gz.clone(),
                    })
                    .await?;
                tracing::info!(domain = %domain, to = %to, id = %id, "TLS-RPT report queued");
                sent += 1;
            } else if uri.starts_with("https://") {
                match self.sender.post(&uri, gz.clone()).await {
                    Ok(()) => {
                        tracing::info!(domain = %domain, url = %uri, "TLS-RPT report posted");
                        sent += 1;
                    }
                    Err(e) => tracing::warn!(domain = %domain, url = %uri, error = %e, "TLS-RPT report post failed"),
                }
            }
        }
        Ok(sent)
    }

    /// The DMARC aggregate report of `domain` to its record's `rua`.
    async fn send_dmarc(&self, domain: &str, begin: i64, end: i64, tally: &DomainTally) -> anyhow::Result<usize> {
        let Some((c, _)) = &self.dmarc else { return Ok(0) };
        if tally.rows.is_empty() {
            return Ok(0);
        }
        let receiver = crate::envelope::Envelope::domain_of(&c.from);
        let report_id = format!("{begin}.{domain}@{receiver}");
        let xml = super::dmarc::report_xml(
            &super::dmarc::Header {
                org_name: &c.org_name,
                email: &c.from,
                contact: &c.contact,
                report_id: &report_id,
                begin,
                end,
            },
            tally,
        );
        let gz = gzip(xml.as_bytes())?;
        let mut sent = 0;
        for to in &tally.published.rua {
            let to = to.strip_prefix("mailto:").unwrap_or(to);
            let rua_domain = crate::envelope::Envelope::domain_of(to);
            if !self.sender.external_allowed(domain, &rua_domain).await {
                tracing::info!(domain = %domain, to = %to, "DMARC report: external destination not verified (RFC 7489 7.1); skipped");
                continue;
            }
            let id = self
                .sender
                .mail(ReportMail {
                    from: &c.from,
                    to,
                    subject: format!("Report Domain: {domain} Submitter: {receiver} Report-ID: <{report_id}>"),
                    extra_headers: Vec::new(),
                    report_type: None,
                    text: format!("This is a DMARC aggregate report from {}.\r\n", c.org_name),
                    attachment_type: "application/gzip",
                    filename: format!("{receiver}!{domain}!{begin}!{end}.xml.gz"),
                    gz: gz.clone(),
                })
                .await?;
            tracing::info!(domain = %domain, to = %to, id = %id, "DMARC aggregate report queued");
            sent += 1;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_period() {
        let k = key(Kind::Tls, 86_400, "example.com", 3);
        assert_eq!(parse_key(Kind::Tls, &k), Some((86_400, "example.com".into())));
        assert_eq!(parse_key(Kind::Dmarc, &k), None);
        assert!(key(Kind::Tls, 9, "a", 1) < key(Kind::Tls, 10, "a", 1));
        assert_eq!(period_start(100, 30), 90);
    }
}
