//! Configuration reload: SIGHUP and `ternctl config reload` read the file
//! `ternd` was started with again and swap, without a restart, the parts
//! that can change while mail flows (docs/operations.md, "Reloading the
//! configuration"); `ternd check-config FILE` runs the same checks offline.
//!
//! # Rules
//! - All or nothing: the new file is parsed and validated, and every file it
//!   names (DKIM keys, certificates, the users file, CA files) is read and
//!   parsed, before anything is swapped. Any error keeps the running
//!   configuration; the error names the key.
//! - Keys that need a restart (listen addresses, node id, data_dir, shards,
//!   ...; see [`compare`]) keep their running value when changed; the reply
//!   and the log name them (`restart needed for: listen.smtp, node.id`).
//! - Swaps are atomic (arc-swap): an SMTP session keeps the settings it was
//!   accepted with; sessions accepted and deliveries planned after the swap
//!   get the new ones. Certificates: new handshakes. DKIM, inbound checks,
//!   ARC and filters: messages whose DATA ends after the swap. Block lists
//!   and greylisting: new sessions. Operator tokens: the next call.
//!   Webhooks: new tasks (the old ones post what they hold, then stop),
//!   and the outbox is written while any webhook exists. Delivery:
//!   `Delivery::prepare` builds the new TLS policies, pools, shaping and
//!   backoff rules with their runtime state carried over (limiters,
//!   warm-up counts, MTA-STS cache); the queue takes the retry rules from
//!   it for each outcome decided after.
//! - One reload at a time; each is counted in `tern_config_reload_total{result}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;

use crate::config::Config;

/// The key groups a reload changed, and the restart-only keys it did not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Reloadable keys whose value changed: applied.
    pub applied: Vec<&'static str>,
    /// Keys that need a restart whose value changed: the running value stays.
    pub restart_needed: Vec<&'static str>,
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    // Config values have no PartialEq; their Debug form is deterministic (no hash maps).
    format!("{a:?}") != format!("{b:?}")
}

/// Compares every key of `old` (running) and `new` (the file): the config
/// to run (new values, except restart-only keys, which keep old ones) and
/// what changed. A new `Config` field fails to compile here until it is
/// classified.
macro_rules! classify {
    ($old:ident, $new:ident, $merged:ident, $diff:ident;
     restart: [$($rf:ident => $rk:literal),* $(,)?];
     live: [$($lf:ident => $lk:literal),* $(,)?];
     parts: [$($pf:ident),* $(,)?]) => {{
        let Config { $($rf: _,)* $($lf: _,)* $($pf: _,)* } = $new;
        $(
            if differs(&$old.$rf, &$new.$rf) {
                $diff.restart_needed.push($rk);
                $merged.$rf = $old.$rf.clone();
            }
        )*
        $(
            if differs(&$old.$lf, &$new.$lf) && !$diff.applied.contains(&$lk) {
                $diff.applied.push($lk);
            }
        )*
    }};
}

/// See [`classify`]: the configuration to run after a reload, and the diff.
pub fn compare(old: &Config, new: &Config) -> (Config, Diff) {
    let mut merged = new.clone();
    let mut diff = Diff::default();
    classify!(old, new, merged, diff;
        restart: [
            node_id => "node.id",
            hostname => "node.hostname",
            data_dir => "node.data_dir",
            state_cache_bytes => "node.state_cache_mb",
            worker_threads => "node.worker_threads",
            log_segment_bytes => "node.log_segment_mb",
            log_keep_bytes => "node.log_keep_mb",
            min_free_bytes => "node.min_free_mb",
            listen_smtp => "listen.smtp",
            listen_submission => "listen.submission",
            listen_submissions => "listen.submissions",
            listen_grpc => "listen.grpc",
            listen_http => "listen.http",
            smtp_auth => "auth",
            advertise_grpc => "cluster.advertise_grpc",
            cluster_tls => "cluster.tls_cert/tls_key/tls_ca/tls_server_name",
            cluster_insecure => "cluster.insecure",
            peer_addresses => "cluster.peer_addresses",
            dead_node_after => "cluster.dead_node_after_secs",
            handover_timeout => "cluster.handover_timeout_secs",
            quiesce_idle_groups => "cluster.quiesce_idle_groups",
            bootstrap => "cluster.bootstrap",
            shards => "cluster.shards",
            replicas => "cluster.replicas",
            tls_cert => "tls.cert",
            tls_key => "tls.key",
            max_message_size => "policy.max_message_size",
            max_connections => "smtp.max_connections",
            dns_nameservers => "dns.nameservers",
            dns_timeout => "dns.timeout_secs",
            scheduler_tick => "delivery.scheduler_tick_ms",
            log_format => "log.format",
            api => "api",
            tls_rpt => "tls_rpt",
            dmarc_reports => "dmarc_reports",
        ];
        live: [
            routes => "route",
            dkim => "dkim",
            relay_networks => "policy.relay_networks",
            local_domains => "policy.local_domains",
            relay_domains => "policy.relay_domains",
            max_recipients => "policy.max_recipients",
            command_timeout => "smtp.command_timeout_secs",
            data_timeout => "smtp.data_timeout_secs",
            max_errors => "smtp.max_errors",
            smtp_port => "delivery.smtp_port",
            max_connections_per_site => "delivery.max_connections_per_site",
            messages_per_connection => "delivery.messages_per_connection",
            connection_idle => "delivery.connection_idle_secs",
            local_delivery => "local.lmtp/maildir",
            verify_recipients => "local.verify_recipients",
            inbound => "inbound",
            arc => "arc",
            filters => "filter",
            dnsbl => "dnsbl",
            greylist => "greylist",
            admin_tokens => "admin_token",
            webhooks => "webhook",
            fbl => "fbl",
            // Delivery (`Delivery::prepare`) and the queue's retry rules.
            tls_policies => "tls_policy/delivery.require_tls_domains",
            tls_ca_file => "delivery.tls_ca_file",
            dane => "dane",
            mta_sts => "mta_sts",
            backoff => "backoff/delivery.backoff_defaults",
            shaping => "shaping",
            bounce_classes => "bounce_class",
            suppression => "suppression",
            egress => "source/pool/pool_rule",
            connect_timeout => "delivery.connect_timeout_secs",
            retry_schedule => "delivery.retry_schedule",
            max_age => "delivery.max_age",
            delay_notice_after => "delivery.delay_notice_after",
        ];
        parts: [smtp_limits, helo_name]
    );
    // Debug hides webhook secrets and header values: compare them too.
    if webhook_secrets(&old.webhooks) != webhook_secrets(&new.webhooks) && !diff.applied.contains(&"webhook") {
        diff.applied.push("webhook");
    }
    // `delivery.helo_name` defaults to `node.hostname`: one that follows a
    // hostname change waits for the restart with it.
    if old.helo_name != new.helo_name {
        if old.hostname != new.hostname && new.helo_name == new.hostname {
            diff.restart_needed.push("delivery.helo_name");
            merged.helo_name = old.helo_name.clone();
        } else {
            diff.applied.push("delivery.helo_name");
        }
    }
    // `[smtp]` limits: the shared counters' sizes need a restart, the rest applies.
    let (o, n) = (&old.smtp_limits, &new.smtp_limits);
    if o.max_connections_per_ip != n.max_connections_per_ip {
        diff.restart_needed.push("smtp.max_connections_per_ip");
        merged.smtp_limits.max_connections_per_ip = o.max_connections_per_ip;
    }
    if o.max_connection_rate_per_ip != n.max_connection_rate_per_ip {
        diff.restart_needed.push("smtp.max_connection_rate_per_ip");
        merged.smtp_limits.max_connection_rate_per_ip = o.max_connection_rate_per_ip;
    }
    if o.memory_budget_bytes != n.memory_budget_bytes {
        diff.restart_needed.push("smtp.memory_budget_mb");
        merged.smtp_limits.memory_budget_bytes = o.memory_budget_bytes;
    }
    for (changed, key) in [
        (o.max_session != n.max_session, "smtp.max_session_secs"),
        (o.min_data_rate != n.min_data_rate, "smtp.min_data_rate"),
        (o.tls_handshake != n.tls_handshake, "smtp.tls_handshake_secs"),
        (o.max_junk_commands != n.max_junk_commands, "smtp.max_junk_commands"),
        (
            o.proxy_protocol_from != n.proxy_protocol_from,
            "smtp.proxy_protocol_from",
        ),
    ] {
        if changed {
            diff.applied.push(key);
        }
    }
    (merged, diff)
}

/// What Debug does not show of each webhook: its secret and header values.
fn webhook_secrets(hooks: &[crate::config::Webhook]) -> Vec<Vec<&[u8]>> {
    hooks
        .iter()
        .map(|h| {
            let secret = h.secret.as_ref().map_or(&[][..], |s| s.0.as_slice());
            std::iter::once(secret)
                .chain(h.headers.values().map(|v| v.as_bytes()))
                .collect()
        })
        .collect()
}

/// Reads and checks `path` as `ternd check-config` does: the TOML and its
/// values, then every file it names. The error names the key.
pub fn check_file(path: &Path) -> anyhow::Result<Config> {
    let config = Config::from_file(path)?;
    check_files(&config)?;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        crate::tls_reload::CertWatcher::new(cert, key).context("tls.cert / tls.key")?;
    }
    Ok(config)
}

/// Reads and parses the files `config` names, as a start would, except the
/// listener certificate (a reload loads that last, through its watcher, so
/// that a bad pair is counted in `tern_tls_reload_errors_total`).
fn check_files(config: &Config) -> anyhow::Result<()> {
    crate::auth::dkim::Signer::new(&config.dkim, &config.relay_networks).context("dkim")?;
    // As a start: the sealer's key is read only when the checks run.
    if config.inbound.enabled {
        crate::auth::arc::Sealer::from_config(config)?;
    }
    crate::filter::Filters::new(config)?;
    if config.dnsbl.active() {
        crate::smtp::dnsbl::Dnsbl::new(
            config.dnsbl.clone(),
            &config.dns_nameservers,
            crate::metrics::ScreenMetrics::default(),
        )?;
    }
    if !config.webhooks.is_empty() {
        crate::webhook::client::tls_config().context("webhook")?;
    }
    if let Some(files) = &config.cluster_tls {
        crate::raft::tls::ClusterTls::load(files).context("cluster.tls_cert / tls_key / tls_ca")?;
    }
    if let Some(users) = &config.smtp_auth.users_file {
        crate::submission::UserStore::load(users, config.smtp_auth.senders.clone())
            .map_err(anyhow::Error::msg)
            .context("auth.users_file")?;
    }
    let tls = crate::delivery::tls::OutboundTls::new(&config.tls_policies, config.tls_ca_file.as_deref())
        .context("delivery.tls_ca_file")?
        .with_dane_default(config.dane.enabled);
    // Read when DANE can apply, as a start does (the error names the key).
    if let (true, Some(anchor)) = (tls.uses_dane(), &config.dane.trust_anchor) {
        crate::delivery::dane::load_trust_anchor(anchor)?;
    }
    Ok(())
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("ternd runs on the embedded default (no --config): there is no file to reload")]
    NoFile,
    #[error("{path}: {reason}; the running configuration stays")]
    Invalid { path: PathBuf, reason: String },
}

/// What a successful reload did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub path: PathBuf,
    pub diff: Diff,
}

/// Who asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Admin => "ternctl",
        }
    }
}

/// The running node's swappable parts, and the config in force.
pub struct Reloader {
    /// The file `ternd` was started with; `None` on the embedded default.
    pub path: Option<PathBuf>,
    /// The configuration in force (restart-only keys as started).
    pub running: Mutex<Arc<Config>>,
    pub delivery: Arc<crate::delivery::Delivery>,
    pub pipeline: Arc<crate::auth::Pipeline>,
    /// One per SMTP and submission listener.
    pub listeners: Vec<Arc<ArcSwap<crate::smtp::SmtpConfig>>>,
    pub certificates: Vec<crate::tls_reload::CertWatcher>,
    pub cluster_tls: Option<crate::raft::tls::ClusterTls>,
    pub metrics: crate::metrics::ReloadMetrics,
    /// What a rebuilt `[dnsbl]` / `[greylist]` screen needs.
    pub screen: ScreenParts,
    /// Operators' tokens (`[[admin_token]]`).
    pub authz: Arc<crate::admin::authz::Authz>,
    /// `[[webhook]]`: the node events' tasks, the outbox's dispatch, and
    /// whether applies write the outbox.
    pub webhooks: Arc<crate::webhook::Webhooks>,
    pub outbox: Arc<crate::outbox::dispatch::Dispatcher>,
    pub outbox_switch: crate::outbox::Switch,
    /// Where `[fbl]` reports are taken, and what a rebuilt taker needs.
    pub front: Arc<crate::queue::QueueFront>,
    pub fbl_metrics: crate::metrics::FblMetrics,
}

/// What [`crate::smtp::screen::Screen::rebuild`] needs besides the config.
pub struct ScreenParts {
    pub control: Option<crate::cluster::control::ControlState>,
    pub writer: Option<crate::cluster::writer::ControlWriter>,
    pub metrics: crate::metrics::ScreenMetrics,
}

impl Reloader {
    /// Reads the file again and applies it (see the module's rules); logged and counted.
    pub fn reload(&self, trigger: Trigger) -> Result<Outcome, ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.try_reload(&mut running, trigger);
        match &result {
            Ok(outcome) => {
                self.metrics.succeeded();
                tracing::info!(
                    trigger = trigger.as_str(),
                    path = %outcome.path.display(),
                    applied = %outcome.diff.applied.join(", "),
                    "configuration reloaded"
                );
                if !outcome.diff.restart_needed.is_empty() {
                    tracing::warn!(
                        trigger = trigger.as_str(),
                        "restart needed for: {}; the running values stay until then",
                        outcome.diff.restart_needed.join(", ")
                    );
                }
            }
            Err(e) => {
                self.metrics.failed();
                tracing::error!(trigger = trigger.as_str(), error = %e, "configuration reload failed");
            }
        }
        result
    }

    fn try_reload(&self, running: &mut Arc<Config>, trigger: Trigger) -> Result<Outcome, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let invalid = |reason: String| ReloadError::Invalid {
            path: path.clone(),
            reason,
        };
        let new = Config::from_file(&path).map_err(|e| invalid(e.to_string()))?;
        let (merged, diff) = compare(running, &new);
        // Everything that can fail, before anything is swapped.
        // (check_files loaded the cluster TLS files, so their reload below should not fail.)
        check_files(&merged).map_err(|e| invalid(format!("{e:#}")))?;
        let pipeline = self.pipeline.prepare(&merged).map_err(|e| invalid(format!("{e:#}")))?;
        // Kept parts of the running screen, so no lookup cache or pending
        // greylist write is lost; a new greylist starts its writer here.
        let previous = self.listeners.first().and_then(|l| l.load().screen.clone());
        let screen = crate::smtp::screen::Screen::rebuild(
            &merged,
            previous.as_deref(),
            self.screen.control.clone(),
            self.screen.writer.clone(),
            self.screen.metrics.clone(),
        )
        .map_err(|e| invalid(format!("{e:#}")))?;
        let merged = Arc::new(merged);
        let delivery = self
            .delivery
            .prepare(Arc::clone(&merged))
            .map_err(|e| invalid(format!("{e:#}")))?;
        // Certificates last: a pair that loads is served at once.
        for watcher in &self.certificates {
            watcher
                .reload_now()
                .map_err(|e| invalid(format!("tls.cert / tls.key: {e}")))?;
        }
        // On SIGHUP the cluster certificate's own watcher reloads it.
        if let Some(tls) = self.cluster_tls.as_ref().filter(|_| trigger == Trigger::Admin) {
            if let Err(e) = tls.reload() {
                tracing::warn!(error = %format!("{e:#}"), "cluster TLS not reloaded; the previous certificate stays in use");
            }
        }
        self.pipeline.install(pipeline);
        if diff.applied.contains(&"admin_token") {
            self.authz.set_tokens(merged.admin_tokens.clone());
        }
        if diff.applied.contains(&"webhook") {
            // check_files built the TLS client these need: they do not fail here.
            self.outbox_switch.set(!merged.webhooks.is_empty());
            if let Err(e) = self.webhooks.replace(&merged.webhooks) {
                tracing::error!(error = %format!("{e:#}"), "webhook: node events not replaced");
            }
            if let Err(e) = self.outbox.set(&merged.webhooks) {
                tracing::error!(error = %format!("{e:#}"), "webhook: outbox dispatch not replaced");
            }
        }
        if diff.applied.contains(&"fbl") {
            self.front.set_fbl(merged.fbl.enabled().then(|| {
                crate::fbl::Fbl::new(
                    merged.fbl.clone(),
                    merged.node_id,
                    Arc::clone(&self.delivery),
                    self.fbl_metrics.clone(),
                )
            }));
        }
        self.delivery.install(delivery);
        for listener in &self.listeners {
            let mut smtp = (*listener.load_full()).clone();
            smtp.apply(&merged);
            smtp.screen.clone_from(&screen);
            listener.store(Arc::new(smtp));
        }
        *running = merged;
        Ok(Outcome { path, diff })
    }

    /// A task that reloads on SIGHUP until `stop` turns true.
    pub fn on_sighup(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        let me = Arc::clone(&self);
                        // File reads and key parsing: off the async workers.
                        let _ = tokio::task::spawn_blocking(move || me.reload(Trigger::Signal)).await;
                    }
                    r = stop.changed() => if r.is_err() || *stop.borrow() { return },
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    #[test]
    fn restart_only_keys_keep_their_running_value_and_the_rest_applies() {
        let old = config(
            "[node]\nid = 1\n[listen]\nsmtp = [\"127.0.0.1:2525\"]\n[smtp]\nmax_errors = 5\nmax_connections_per_ip = 10\n\
             [[route]]\ndomain = \"a.test\"\nto = \"127.0.0.1:25\"\n",
        );
        let new = config(
            "[node]\nid = 2\n[listen]\nsmtp = [\"127.0.0.1:2526\"]\n[smtp]\nmax_errors = 7\nmax_connections_per_ip = 20\n\
             [[route]]\ndomain = \"a.test\"\nto = \"127.0.0.1:26\"\n",
        );
        let (merged, diff) = compare(&old, &new);
        assert_eq!(
            diff.restart_needed,
            ["node.id", "listen.smtp", "smtp.max_connections_per_ip"]
        );
        assert_eq!(diff.applied, ["route", "smtp.max_errors"]);
        assert_eq!(merged.node_id, 1);
        assert_eq!(merged.listen_smtp, old.listen_smtp);
        assert_eq!(merged.smtp_limits.max_connections_per_ip, 10);
        assert_eq!(merged.max_errors, 7);
        assert_eq!(merged.routes, new.routes);

        // The same file again: nothing changed.
        assert_eq!(compare(&old, &old).1, Diff::default());
    }

    #[test]
    fn inbound_keys_tokens_and_webhooks_apply_and_hidden_webhook_secrets_count() {
        let hook = |secret: &str| format!("[[webhook]]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"whsec_{secret}\"\n");
        let token = "[[admin_token]]\nname = \"ops\"\nrole = \"operator\"\n\
                     hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA\"\n";
        let old = config(&hook("c2VjcmV0LW9uZS1zZWNyZXQtb25lLXNlY3JldC1vbmU="));
        let new = config(&format!(
            "{}{token}[dnsbl]\nenabled = true\nzones = [{{ zone = \"bl.test\" }}]\n\
             [greylist]\nenabled = true\n[inbound]\nenabled = false\n[fbl]\naddresses = [\"fbl@tern.test\"]\n\
             [policy]\nlocal_domains = [\"tern.test\"]\n\
             [[filter]]\nname = \"r\"\nkind = \"rspamd\"\naddress = \"127.0.0.1:11333\"\n",
            hook("c2VjcmV0LXR3by1zZWNyZXQtdHdvLXNlY3JldC10d28tcw==")
        ));
        let (merged, diff) = compare(&old, &new);
        assert!(diff.restart_needed.is_empty(), "{diff:?}");
        for key in [
            "inbound",
            "filter",
            "dnsbl",
            "greylist",
            "admin_token",
            "webhook",
            "fbl",
        ] {
            assert!(diff.applied.contains(&key), "{key} not in {diff:?}");
        }
        assert_eq!(merged.admin_tokens, new.admin_tokens);
        assert_eq!(merged.dnsbl, new.dnsbl);
        // Only the secret differs (Debug hides it): still a change.
        let (_, diff) = compare(&old, &config(&hook("c2VjcmV0LXR3by1zZWNyZXQtdHdvLXNlY3JldC10d28tcw==")));
        assert_eq!(diff.applied, ["webhook"]);
    }

    #[test]
    fn delivery_keys_apply_and_a_defaulted_helo_name_waits_with_the_hostname() {
        let old = config("[node]\nhostname = \"a.test\"\n");
        let new = config(
            "[node]\nhostname = \"b.test\"\n[delivery]\nretry_schedule = [\"1h\"]\nconnect_timeout_secs = 5\n\
             [[tls_policy]]\ndomain = \"x.test\"\nlevel = \"encrypt\"\n\
             [[shaping]]\ndomain = \"x.test\"\nrate = \"1/h\"\n",
        );
        let (merged, diff) = compare(&old, &new);
        assert_eq!(diff.restart_needed, ["node.hostname", "delivery.helo_name"]);
        assert_eq!(
            diff.applied,
            [
                "tls_policy/delivery.require_tls_domains",
                "shaping",
                "delivery.connect_timeout_secs",
                "delivery.retry_schedule"
            ]
        );
        assert_eq!(merged.helo_name, "a.test");
        assert_eq!(merged.retry_schedule, [std::time::Duration::from_secs(3600)]);
        assert_eq!(merged.tls_policies, new.tls_policies);

        // A helo_name of its own applies at once.
        let new = config("[node]\nhostname = \"a.test\"\n[delivery]\nhelo_name = \"out.a.test\"\n");
        let (merged, diff) = compare(&old, &new);
        assert_eq!(diff.applied, ["delivery.helo_name"]);
        assert!(diff.restart_needed.is_empty());
        assert_eq!(merged.helo_name, "out.a.test");
    }

    #[test]
    fn check_file_names_the_key_of_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let file = dir.path().join("tern.toml");
        for (text, key) in [
            (
                format!(
                    "[[dkim]]\ndomain = \"a.test\"\nselector = \"s\"\nalgorithm = \"ed25519-sha256\"\nprivate_key = \"{}\"\n",
                    missing.display()
                ),
                "dkim",
            ),
            (
                format!("[tls]\ncert = \"{0}\"\nkey = \"{0}\"\n", missing.display()),
                "tls.cert / tls.key",
            ),
            (
                format!("[dane]\nenabled = true\ntrust_anchor = \"{}\"\n", missing.display()),
                "dane.trust_anchor",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = format!("{:#}", check_file(&file).unwrap_err());
            assert!(e.starts_with(key), "{e}");
        }
        std::fs::write(&file, "[node]\nid = 2\n").unwrap();
        assert_eq!(check_file(&file).unwrap().node_id, 2);
    }
}
