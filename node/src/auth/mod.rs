//! What happens to a message between the end of DATA and the queue:
//! inbound authentication checks (SPF, DKIM, DMARC, ARC, iprev) with an
//! `Authentication-Results` header, and DKIM signing of outbound mail, so
//! every replica stores the same final bytes.

pub mod arc;
pub mod dkim;
pub mod inbound;
pub mod spf;

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::config::Config;
use crate::envelope::Envelope;
use tern_smtp::reply::Reply;

/// The DKIM signer in force, swapped whole by a reload.
pub type DkimSlot = Arc<ArcSwapOption<dkim::Signer>>;

/// The per-message checks and signing of one node (shared by all listeners).
#[derive(Debug, Default)]
pub struct Pipeline {
    /// DKIM signing of outbound mail; empty without `[[dkim]]` entries.
    /// A config reload swaps it (`crate::reload`); the reports sender shares it.
    pub dkim: DkimSlot,
    /// Checks of mail from untrusted clients; `None` when `[inbound] enabled = false`.
    pub inbound: Option<inbound::Checker>,
    /// `[[filter]]` content filters; `None` without any.
    pub filters: Option<crate::filter::Filters>,
}

impl Pipeline {
    /// The pipeline `config` asks for; DKIM key files are read and checked here.
    pub fn new(config: &Config) -> anyhow::Result<Pipeline> {
        Ok(Pipeline {
            dkim: Arc::new(ArcSwapOption::from(
                dkim::Signer::new(&config.dkim, &config.relay_networks)?.map(Arc::new),
            )),
            inbound: inbound::Checker::from_config(config)?,
            filters: crate::filter::Filters::new(config)?,
        })
    }

    /// The bytes to queue (possibly with headers added or removed), or the
    /// reply that refuses the message (e.g. `550 5.7.1` for DMARC p=reject,
    /// `451 4.7.0` when a DNS error leaves the policy undecided).
    pub async fn process(&self, envelope: &Envelope, body: Vec<u8>) -> Result<Vec<u8>, Reply> {
        let body = match &self.inbound {
            Some(checker) => checker.check(envelope, body).await?,
            None => body,
        };
        let body = match &self.filters {
            Some(filters) => filters.run(envelope, body).await?,
            None => body,
        };
        // Signing comes last: it covers the message exactly as queued.
        let body = match self.dkim.load_full() {
            Some(signer) => signer.sign(envelope, body).await,
            None => body,
        };
        Ok(body)
    }
}
