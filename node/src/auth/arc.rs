//! ARC sealing (RFC 8617) of checked inbound mail that Tern forwards, so
//! the next hop can trust the SPF/DKIM/DMARC results we saw even after the
//! forward broke SPF (or a list footer broke DKIM).
//!
//! The seal is made by the inbound checks (auth::inbound), once the
//! `Authentication-Results` are known: the ARC-Authentication-Results
//! carry the same results, the ARC-Message-Signature covers the message as
//! it will be queued, and the ARC-Seal covers the earlier sets of the chain
//! (cv=none for the first set, cv=pass/fail from our ARC verification).
//! mail-auth 0.13's `ArcSealer` does the cryptography.

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::Done;
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults, DkimResult};
use tracing::{debug, warn};

use crate::config::{ArcSealScope, Canonicalization, Config, DkimAlgorithm, DkimKeyConfig};
use crate::envelope::Envelope;

/// Header fields the ARC-Message-Signature covers (as for DKIM: those a
/// forwarder keeps; Authentication-Results and Received are not signed).
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "DKIM-Signature",
];

/// The node's ARC sealer (`[arc]`).
pub struct Sealer {
    sealer: ArcSealer<DkimKey, Done>,
    /// authserv-id of our ARC-Authentication-Results.
    pub authserv_id: String,
    scope: ArcSealScope,
    local_domains: Vec<String>,
    /// For the log line.
    pub domain: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("domain", &self.domain)
            .field("authserv_id", &self.authserv_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// The sealer `[arc]` asks for (`None` when disabled); the key file is
    /// read and checked here, so a bad key stops the start.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Sealer>> {
        let arc = &config.arc;
        if !arc.enabled {
            return Ok(None);
        }
        let private_key = match &arc.key_file {
            Some(path) => path.clone(),
            None => config
                .dkim
                .iter()
                .find(|k| k.domain == arc.domain && k.selector.eq_ignore_ascii_case(&arc.selector))
                .map(|k| k.private_key.clone())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "[arc] has no key_file and no [[dkim]] entry for {}._domainkey.{}",
                        arc.selector,
                        arc.domain
                    )
                })?,
        };
        let entry = DkimKeyConfig {
            domain: arc.domain.clone(),
            selector: arc.selector.clone(),
            algorithm: DkimAlgorithm::RsaSha256,
            private_key,
            headers: Vec::new(),
            oversign_headers: Vec::new(),
            canonicalization: (Canonicalization::Relaxed, Canonicalization::Relaxed),
            expire: None,
        };
        let (key, _) = super::dkim::load_key(&entry).map_err(|e| anyhow::anyhow!("[arc]: {e}"))?;
        let sealer = ArcSealer::from_key(key)
            .domain(arc.domain.clone())
            .selector(arc.selector.clone())
            .headers(SIGNED_HEADERS.iter().copied());
        Ok(Some(Sealer {
            sealer,
            authserv_id: arc.authserv_id.clone().unwrap_or_else(|| config.hostname.clone()),
            scope: arc.seal,
            local_domains: config.local_domains.clone(),
            domain: arc.domain.clone(),
        }))
    }

    /// Whether this message gets a seal: `seal = "all"`, or it has a
    /// recipient outside `local_domains` (it leaves the cluster again).
    pub fn wants(&self, envelope: &Envelope) -> bool {
        wanted(self.scope, &self.local_domains, envelope)
    }

    /// The ARC set (ARC-Seal, ARC-Message-Signature,
    /// ARC-Authentication-Results; CRLF-terminated) for `message`, or
    /// `None` when it is not sealed: an incoming chain that did not
    /// validate (Tern does not add cv=fail sets), or one of 50 sets
    /// already (RFC 8617 4.2.1). The message then goes on unsealed.
    pub fn seal(
        &self,
        message: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        chain: &ArcOutput<'_>,
    ) -> Option<String> {
        let sets = message.as_headers.len();
        let chain_ok = sets == 0 || (*chain.result() == DkimResult::Pass && chain.can_be_sealed());
        if !chain_ok || sets >= 50 {
            debug!(domain = %self.domain, sets, result = ?chain.result(), "arc: incoming chain not sealable; not sealed");
            return None;
        }
        match self.sealer.seal(message, results, chain) {
            Ok(set) => Some(set.to_header()),
            Err(e) => {
                warn!(domain = %self.domain, error = %e, "arc sealing failed; forwarded unsealed");
                None
            }
        }
    }
}

fn wanted(scope: ArcSealScope, local_domains: &[String], envelope: &Envelope) -> bool {
    match scope {
        ArcSealScope::All => true,
        ArcSealScope::Relayed => envelope
            .recipients
            .iter()
            .any(|r| !local_domains.contains(&Envelope::domain_of(&r.address))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Recipient;

    #[test]
    fn relayed_mail_is_sealed_local_mail_is_not() {
        let local = vec!["example.test".to_owned()];
        let envelope = |rcpts: &[&str]| Envelope {
            recipients: rcpts
                .iter()
                .map(|a| Recipient {
                    address: (*a).to_owned(),
                    notify: Default::default(),
                    orcpt: None,
                })
                .collect(),
            ..Envelope::default()
        };
        let relayed = ArcSealScope::Relayed;
        assert!(!wanted(
            relayed,
            &local,
            &envelope(&["bob@example.test", "carol@EXAMPLE.test"])
        ));
        assert!(wanted(
            relayed,
            &local,
            &envelope(&["bob@example.test", "fwd@elsewhere.test"])
        ));
        assert!(wanted(ArcSealScope::All, &local, &envelope(&["bob@example.test"])));
    }
}
