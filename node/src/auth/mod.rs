//! What happens to a message between the end of DATA and the queue:
//! inbound authentication checks (SPF, DKIM, DMARC, ARC, iprev) with an
//! `Authentication-Results` header, and DKIM signing of outbound mail, so
//! every replica stores the same final bytes.

pub mod arc;
pub mod dkim;
pub mod inbound;
pub mod spf;

use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;

use crate::config::Config;
use crate::envelope::Envelope;
use crate::metrics::FilterMetrics;
use tern_smtp::reply::Reply;

/// The DKIM signer in force, swapped whole by a reload.
pub type DkimSlot = Arc<ArcSwapOption<dkim::Signer>>;

/// The per-message checks and signing of one node (shared by all listeners).
/// A config reload swaps each part whole (`crate::reload`): a message uses
/// the parts in force when its DATA ends.
#[derive(Debug, Default)]
pub struct Pipeline {
    /// DKIM signing of outbound mail; empty without `[[dkim]]` entries.
    /// The reports sender shares it.
    pub dkim: DkimSlot,
    /// Checks of mail from untrusted clients (with `[arc]` sealing); empty
    /// when `[inbound] enabled = false`.
    pub inbound: ArcSwapOption<inbound::Checker>,
    /// `[[filter]]` content filters; empty without any.
    pub filters: ArcSwapOption<crate::filter::Filters>,
    /// Where rebuilt filters count their verdicts.
    filter_metrics: FilterMetrics,
    /// DMARC aggregate reports: rebuilt checkers record here too.
    dmarc_reports: OnceLock<Arc<crate::reports::dmarc::DmarcRecorder>>,
}

/// The parts of a pipeline built from a config, checked and not yet in force.
pub struct Parts {
    dkim: Option<Arc<dkim::Signer>>,
    inbound: Option<Arc<inbound::Checker>>,
    filters: Option<Arc<crate::filter::Filters>>,
}

impl Pipeline {
    /// The pipeline `config` asks for; DKIM and ARC key files are read and
    /// checked here. Filters count their verdicts in `filter_metrics`.
    pub fn new(config: &Config, filter_metrics: FilterMetrics) -> anyhow::Result<Pipeline> {
        let pipeline = Pipeline {
            filter_metrics,
            ..Pipeline::default()
        };
        let parts = pipeline.prepare(config)?;
        pipeline.install(parts);
        Ok(pipeline)
    }

    /// Builds every part `config` asks for, reading its key files, without
    /// changing what is in force; the error names the key.
    pub fn prepare(&self, config: &Config) -> anyhow::Result<Parts> {
        let dkim = dkim::Signer::new(&config.dkim, &config.relay_networks).context("dkim")?;
        let resolver = self.inbound.load().as_deref().map(inbound::Checker::resolver);
        // Its errors name `[inbound]` or `[arc]`.
        let inbound = inbound::Checker::from_config_reusing(config, resolver)?;
        if let (Some(checker), Some(recorder)) = (&inbound, self.dmarc_reports.get()) {
            checker.record_dmarc(Arc::clone(recorder));
        }
        let mut filters = crate::filter::Filters::new(config)?;
        if let Some(filters) = filters.as_mut() {
            filters.set_metrics(self.filter_metrics.clone());
        }
        Ok(Parts {
            dkim: dkim.map(Arc::new),
            inbound: inbound.map(Arc::new),
            filters: filters.map(Arc::new),
        })
    }

    /// Puts `parts` in force, each swapped whole.
    pub fn install(&self, parts: Parts) {
        self.dkim.store(parts.dkim);
        self.inbound.store(parts.inbound);
        self.filters.store(parts.filters);
    }

    /// Counts every DMARC evaluation in `recorder` (`[dmarc_reports]`), now
    /// and after reloads.
    pub fn record_dmarc(&self, recorder: Arc<crate::reports::dmarc::DmarcRecorder>) {
        if let Some(checker) = self.inbound.load().as_deref() {
            checker.record_dmarc(Arc::clone(&recorder));
        }
        let _ = self.dmarc_reports.set(recorder);
    }

    /// The bytes to queue (possibly with headers added or removed), or the
    /// reply that refuses the message (e.g. `550 5.7.1` for DMARC p=reject,
    /// `451 4.7.0` when a DNS error leaves the policy undecided).
    pub async fn process(&self, envelope: &Envelope, body: Vec<u8>) -> Result<Vec<u8>, Reply> {
        let body = match self.inbound.load_full() {
            Some(checker) => checker.check(envelope, body).await?,
            None => body,
        };
        let body = match self.filters.load_full() {
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
