//! Aggregate reports Tern sends for the cluster: TLS-RPT (RFC 8460) from
//! the outcomes of outbound TLS, and DMARC aggregate reports (RFC 7489
//! 7.2) from inbound checks. Each node records outcomes in memory; the
//! counts of a period are collected in the control group and the report
//! is built and sent once, by the control group's leader (docs/reports.md).
//!
//! Layout: `tls.rs` (what delivery records), `tlsrpt.rs` (TLS-RPT counts
//! and JSON), `dmarc.rs` (DMARC recorder, counts and XML), `collect.rs`
//! (periods, the control group, the leader's merge), `send.rs` (DNS `rua`
//! and the report mail or POST).

pub mod collect;
pub mod dmarc;
pub mod send;
pub mod tls;
pub mod tlsrpt;

use std::sync::Arc;

use crate::config::Config;
use crate::queue::{IdGen, QueueFront};

/// Starts the reporting task when `[tls_rpt]` or `[dmarc_reports]` is
/// enabled and the node hosts the control group.
pub fn start(
    config: &Config,
    delivery: &crate::delivery::Delivery,
    dmarc: Arc<dmarc::DmarcRecorder>,
    pipeline: &crate::auth::Pipeline,
    front: Arc<QueueFront>,
    ids: Arc<IdGen>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if !config.tls_rpt.enabled && !config.dmarc_reports.enabled {
        return Ok(());
    }
    let (Some(writer), Some(control)) = (delivery.writer(), delivery.control()) else {
        tracing::warn!("reports: no control group on this node; reports are not collected");
        return Ok(());
    };
    let collector = collect::Collector {
        node_id: config.node_id,
        tls: config
            .tls_rpt
            .enabled
            .then(|| (config.tls_rpt.clone(), Arc::clone(delivery.tls_reports()))),
        dmarc: config
            .dmarc_reports
            .enabled
            .then(|| (config.dmarc_reports.clone(), dmarc)),
        writer: writer.clone(),
        control: control.clone(),
        sender: send::Sender {
            dns: crate::auth::inbound::authenticator(&config.dns_nameservers, config.dns_timeout)?,
            signer: pipeline.dkim.clone(),
            front,
            ids,
            hostname: config.hostname.clone(),
            https_tls: None,
        },
    };
    tokio::spawn(collector.run(stop));
    Ok(())
}
