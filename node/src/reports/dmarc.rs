//! DMARC aggregate reports (RFC 7489 7.2): what inbound checks tell the
//! recorder (one [`Evaluation`] per message with a DMARC record that asks
//! for `rua` reports), the per-domain counts nodes exchange, and the XML
//! report (RFC 7489 Appendix C) built from the merged counts.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;

use mail_auth::dmarc::{Alignment, Policy};
use mail_auth::{DkimOutput, DkimResult, DmarcOutput, DmarcResult, SpfOutput, SpfResult};
use serde::{Deserialize, Serialize};

/// One DKIM signature's result in a row (`DKIMAuthResultType`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DkimAuth {
    pub domain: String,
    pub selector: String,
    pub result: String,
}

/// The identity a group of messages shares (`RecordType` without the count).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Row {
    pub source_ip: String,
    pub header_from: String,
    pub envelope_from: String,
    /// `none`, `quarantine` or `reject`: what we did.
    pub disposition: String,
    /// DMARC-aligned results, `pass` or `fail`.
    pub dkim_aligned: String,
    pub spf_aligned: String,
    pub dkim: Vec<DkimAuth>,
    pub spf_domain: String,
    /// `mfrom` or `helo`.
    pub spf_scope: String,
    pub spf_result: String,
}

/// The policy published by the domain (`PolicyPublishedType`) and where it wants reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub domain: String,
    pub adkim: String,
    pub aspf: String,
    pub p: String,
    pub sp: String,
    pub pct: u8,
    /// `rua` addresses (mailto only, without the scheme).
    pub rua: Vec<String>,
}

/// One message's DMARC evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub row: Row,
    pub published: Published,
}

fn dkim_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn spf_word(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn policy_word(p: Policy) -> &'static str {
    match p {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

fn alignment_word(a: Alignment) -> &'static str {
    match a {
        Alignment::Relaxed => "r",
        Alignment::Strict => "s",
    }
}

/// The evaluation of one message, or `None` when its From domain
/// publishes no DMARC record asking for aggregate reports.
#[allow(clippy::too_many_arguments)]
pub fn evaluation(
    ip: IpAddr,
    mail_from: &str,
    helo: &str,
    spf: &SpfOutput,
    dkim: &[DkimOutput<'_>],
    dmarc: &DmarcOutput,
    disposition: &str,
    pct: u8,
) -> Option<Evaluation> {
    let record = dmarc.dmarc_record()?;
    let rua: Vec<String> = record
        .rua
        .iter()
        .map(|u| u.uri.clone())
        .filter(|u| u.contains('@'))
        .collect();
    if rua.is_empty() || dmarc.domain().is_empty() {
        return None;
    }
    let (spf_domain, spf_scope) = match mail_from.rsplit_once('@') {
        Some((_, d)) => (d.to_ascii_lowercase(), "mfrom"),
        None => (helo.to_ascii_lowercase(), "helo"),
    };
    let word = |r: &DmarcResult| if *r == DmarcResult::Pass { "pass" } else { "fail" };
    Some(Evaluation {
        row: Row {
            source_ip: ip.to_string(),
            header_from: dmarc.domain().to_ascii_lowercase(),
            envelope_from: spf_domain.clone(),
            disposition: disposition.to_owned(),
            dkim_aligned: word(dmarc.dkim_result()).into(),
            spf_aligned: word(dmarc.spf_result()).into(),
            dkim: dkim
                .iter()
                .filter_map(|d| {
                    let s = d.signature()?;
                    Some(DkimAuth {
                        domain: s.d.to_ascii_lowercase(),
                        selector: s.s.clone(),
                        result: dkim_word(d.result()).into(),
                    })
                })
                .collect(),
            spf_domain,
            spf_scope: spf_scope.into(),
            spf_result: spf_word(spf.result()).into(),
        },
        published: Published {
            domain: dmarc.domain().to_ascii_lowercase(),
            adkim: alignment_word(record.adkim).into(),
            aspf: alignment_word(record.aspf).into(),
            p: policy_word(record.p).into(),
            sp: policy_word(if record.sp == Policy::Unspecified {
                record.p
            } else {
                record.sp
            })
            .into(),
            pct,
            rua,
        },
    })
}

/// Most From domains held between two takes.
pub const MAX_DMARC_DOMAINS: usize = 50_000;
/// Most distinct rows per domain; later new rows are dropped (logged).
pub const MAX_ROWS: usize = 10_000;

/// Counts of one domain, as a node writes them to the control group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainTally {
    pub published: Published,
    pub rows: Vec<(Row, u64)>,
}

/// The latest policy of a domain and the count of each row.
type DomainCounts = (Published, HashMap<Row, u64>);

/// Counts of evaluations per From domain, shared by every check of the node.
#[derive(Debug, Default)]
pub struct DmarcRecorder {
    counts: Mutex<HashMap<String, DomainCounts>>,
}

impl DmarcRecorder {
    pub fn record(&self, e: Evaluation) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let domain = e.published.domain.clone();
        if !counts.contains_key(&domain) && counts.len() >= MAX_DMARC_DOMAINS {
            tracing::warn!(domain = %domain, "DMARC reports: too many domains this period, not counted");
            return;
        }
        let entry = counts
            .entry(domain)
            .or_insert_with(|| (e.published.clone(), HashMap::new()));
        // The latest record seen is the one reported.
        entry.0 = e.published;
        if entry.1.len() >= MAX_ROWS && !entry.1.contains_key(&e.row) {
            tracing::warn!(domain = %entry.0.domain, "DMARC reports: too many rows for the domain, not counted");
            return;
        }
        *entry.1.entry(e.row).or_default() += 1;
    }

    /// Everything counted since the last take, by domain, emptied.
    pub fn take(&self) -> BTreeMap<String, DomainTally> {
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        counts
            .into_iter()
            .map(|(d, (published, rows))| {
                (
                    d,
                    DomainTally {
                        published,
                        rows: rows.into_iter().collect(),
                    },
                )
            })
            .collect()
    }
}

/// Sums several nodes' tallies of one domain.
pub fn merge(parts: impl IntoIterator<Item = DomainTally>) -> DomainTally {
    let mut published = Published::default();
    let mut rows: HashMap<Row, u64> = HashMap::new();
    for part in parts {
        published = part.published;
        for (row, n) in part.rows {
            *rows.entry(row).or_default() += n;
        }
    }
    let mut rows: Vec<(Row, u64)> = rows.into_iter().collect();
    rows.sort_by(|a, b| a.0.source_ip.cmp(&b.0.source_ip).then(b.1.cmp(&a.1)));
    DomainTally { published, rows }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// What identifies a report besides its rows.
pub struct Header<'a> {
    pub org_name: &'a str,
    pub email: &'a str,
    pub contact: &'a str,
    pub report_id: &'a str,
    pub begin: i64,
    pub end: i64,
}

/// The XML report (RFC 7489 Appendix C; namespace `http://dmarc.org/dmarc-xml/0.1`).
pub fn report_xml(h: &Header<'_>, tally: &DomainTally) -> String {
    let p = &tally.published;
    let mut x = String::with_capacity(1024 + tally.rows.len() * 600);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str("<feedback xmlns=\"http://dmarc.org/dmarc-xml/0.1\">\n  <version>1.0</version>\n");
    let _ = write!(
        x,
        "  <report_metadata>\n    <org_name>{}</org_name>\n    <email>{}</email>\n",
        esc(h.org_name),
        esc(h.email)
    );
    if !h.contact.is_empty() {
        let _ = writeln!(x, "    <extra_contact_info>{}</extra_contact_info>", esc(h.contact));
    }
    let _ = write!(
        x,
        "    <report_id>{}</report_id>\n    <date_range>\n      <begin>{}</begin>\n      <end>{}</end>\n    </date_range>\n  </report_metadata>\n",
        esc(h.report_id),
        h.begin,
        h.end
    );
    let _ = write!(
        x,
        "  <policy_published>\n    <domain>{}</domain>\n    <adkim>{}</adkim>\n    <aspf>{}</aspf>\n    <p>{}</p>\n    <sp>{}</sp>\n    <pct>{}</pct>\n  </policy_published>\n",
        esc(&p.domain),
        p.adkim,
        p.aspf,
        p.p,
        p.sp,
        p.pct
    );
    for (row, count) in &tally.rows {
        let _ = write!(
            x,
            "  <record>\n    <row>\n      <source_ip>{}</source_ip>\n      <count>{}</count>\n      <policy_evaluated>\n        <disposition>{}</disposition>\n        <dkim>{}</dkim>\n        <spf>{}</spf>\n      </policy_evaluated>\n    </row>\n",
            esc(&row.source_ip),
            count,
            esc(&row.disposition),
            esc(&row.dkim_aligned),
            esc(&row.spf_aligned)
        );
        let _ = write!(
            x,
            "    <identifiers>\n      <envelope_from>{}</envelope_from>\n      <header_from>{}</header_from>\n    </identifiers>\n    <auth_results>\n",
            esc(&row.envelope_from),
            esc(&row.header_from)
        );
        for d in &row.dkim {
            let _ = write!(
                x,
                "      <dkim>\n        <domain>{}</domain>\n        <selector>{}</selector>\n        <result>{}</result>\n      </dkim>\n",
                esc(&d.domain),
                esc(&d.selector),
                esc(&d.result)
            );
        }
        let _ = write!(
            x,
            "      <spf>\n        <domain>{}</domain>\n        <scope>{}</scope>\n        <result>{}</result>\n      </spf>\n    </auth_results>\n  </record>\n",
            esc(&row.spf_domain),
            esc(&row.spf_scope),
            esc(&row.spf_result)
        );
    }
    x.push_str("</feedback>\n");
    x
}

/// Whether reports for `policy_domain` may go to `rua_domain` without the
/// RFC 7489 7.1 verification record: the same domain or one of its
/// subdomains/parents (a simple stand-in for "same organizational domain").
pub fn same_organization(policy_domain: &str, rua_domain: &str) -> bool {
    let under = |a: &str, b: &str| a == b || a.strip_suffix(b).is_some_and(|rest| rest.ends_with('.'));
    under(policy_domain, rua_domain) || under(rua_domain, policy_domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organization_check() {
        assert!(same_organization("example.com", "example.com"));
        assert!(same_organization("mail.example.com", "example.com"));
        assert!(!same_organization("example.com", "reports.test"));
        assert!(!same_organization("badexample.com", "example.com"));
    }

    #[test]
    fn xml_escapes() {
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }
}
