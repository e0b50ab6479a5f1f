//! Outbound delivery: where each recipient's mail goes (route, local MDA,
//! or the domain's MX hosts), one delivery actor per destination site with
//! its connection pool, and the SMTP/LMTP client they drive.
//!
//! The shard's scheduler calls [`Delivery::attempt`] for a due message and
//! gets one [`RcptAttempt`] per pending recipient back.

pub mod client;
pub mod dane;
pub use tern_smtp::client as client_proto;
pub mod egress;
pub mod fence;
pub mod headers;
pub use headers::header_value;
pub mod local;
pub mod mta_sts;
pub mod requiretls;
pub mod resolve;
pub mod site;
/// Test fixtures now in `tern-testkit`, kept at their old paths for unit tests.
#[cfg(test)]
pub mod testdns {
    pub use tern_testkit::dns::*;
}
#[cfg(test)]
pub mod testpeers {
    pub use tern_testkit::peers::*;
}
pub mod tls;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

pub use client::{ClientConfig, Endpoint, OutRecipient, Protocol, TlsPolicy};
pub use client_proto::RcptOutcome;
use resolve::{MxResolver, ResolveError, ResolverConfig};
use site::{Job, SiteActor};

use crate::config::{Config, LocalDelivery};
use crate::envelope::Envelope;
use crate::metrics::DeliveryMetrics;
use tern_model::record::MessageRecord;

/// A due message with its body, shared by the site actors delivering it.
pub struct LoadedMessage {
    pub record: MessageRecord,
    pub body: Vec<u8>,
}

/// What happened to one recipient in one attempt.
#[derive(Clone, Debug)]
pub struct RcptAttempt {
    /// Index into the envelope's recipients.
    pub index: usize,
    pub outcome: RcptOutcome,
    /// `mx1.example.test` (for Remote-MTA and logs).
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    /// TLS version and cipher, when the hop used TLS.
    pub tls: Option<String>,
    /// The next hop took over DSN duties (it offered DSN).
    pub dsn_relayed: bool,
    /// Delivered into the mailbox (LMTP or Maildir), not relayed to another
    /// MTA: a success report then says `delivered`, else `relayed`.
    pub final_delivery: bool,
    /// The message's Message-ID header, for the event log.
    pub message_id: String,
    /// Not attempted: held back by shaping (a rate, a suspension) until
    /// this time (unix seconds). The outcome is a deferral whose reply says
    /// why; the queue leaves the recipient's state and the attempt count as
    /// they were and tries again then (see `queue::outcome::decide`).
    pub not_before: Option<i64>,
    /// The shaping scope the attempt went to (e.g. `mx:.google.com`), for
    /// backoff rules and analytics; `None` for local delivery and routing failures.
    pub scope: Option<String>,
    /// Not attempted: the recipient is on the suppression list (the
    /// outcome is the failure that says so; the event is `suppressed`).
    pub suppressed: bool,
    /// The egress source (`[[source]] name`) the attempt left from; `None`
    /// without pools, for local delivery and routing failures.
    pub source: Option<String>,
}

/// How to reach the recipients of one destination.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Names the destination site; recipients with equal keys share one
    /// transaction and one delivery actor.
    pub key: String,
    pub target: Target,
}

#[derive(Clone, Debug)]
pub enum Target {
    /// SMTP or LMTP to these endpoints, tried in order.
    Remote {
        endpoints: Vec<Endpoint>,
        protocol: Protocol,
        tls: TlsPolicy,
        /// The MTA-STS policy in force, checked and recorded per connection.
        sts: Option<Arc<mta_sts::Applied>>,
    },
    /// A Maildir per user from this template.
    Maildir(String),
    /// A permanent or temporary routing failure for these recipients.
    Unroutable { reply: String },
}

/// What delivery derives from one configuration. A reload builds a new
/// one ([`Delivery::prepare`], which may fail) and swaps it whole
/// ([`Delivery::install`]); an attempt plans and sends with the one it
/// read first. Runtime state (the MTA-STS cache, the DANE resolver,
/// shaping limiters, warm-up counts, backoff proposals) is carried into
/// the new one.
pub struct Snapshot {
    /// The configuration in force (restart-only keys as started).
    pub config: Arc<Config>,
    /// `helo_name`, `connect_timeout`.
    client: Arc<ClientConfig>,
    /// `[[tls_policy]]`: the TLS policy per recipient domain.
    tls: tls::OutboundTls,
    /// DANE (RFC 7672), when a destination can be at a DANE level.
    dane: Option<Arc<dane::Dane>>,
    /// `[mta_sts]`: policies of recipient domains, when enabled.
    mta_sts: Option<mta_sts::MtaSts>,
    /// `[[backoff]]`: actions from remote replies, and their effect.
    backoff: Arc<crate::backoff::Backoff>,
    /// `[[pool]]`s and their sources; `None` without pools.
    egress: crate::delivery::egress::SharedEgress,
    /// `[[shaping]]`: scopes and cluster-wide limits per destination.
    shaper: Arc<crate::shaping::Shaper>,
}

impl Snapshot {
    /// The settings of `config`; with `old` (a reload), what did not
    /// change is kept and runtime state carried over.
    fn build(
        config: Arc<Config>,
        old: Option<&Snapshot>,
        resolver: &MxResolver,
        reports: &Arc<crate::reports::tls::TlsRecorder>,
        metrics: &DeliveryMetrics,
    ) -> anyhow::Result<Snapshot> {
        let client = ClientConfig {
            helo_name: config.helo_name.clone(),
            connect_timeout: config.connect_timeout,
            ..ClientConfig::default()
        };
        let tls = tls::OutboundTls::new(&config.tls_policies, config.tls_ca_file.as_deref())?
            .with_dane_default(config.dane.enabled);
        // The validating resolver (and its cache) stays unless its trust anchor changed.
        let kept_dane = old
            .filter(|o| o.config.dane.trust_anchor == config.dane.trust_anchor)
            .and_then(|o| o.dane.clone());
        let dane = match (tls.uses_dane(), kept_dane) {
            (false, _) => None,
            (true, Some(kept)) => Some(kept),
            (true, None) => Some(Arc::new(dane::Dane::new(
                &config.dns_nameservers,
                config.dns_timeout,
                config.dane.trust_anchor.as_deref(),
                Arc::clone(reports),
            )?)),
        };
        let mta_sts = match (
            config.mta_sts.enabled,
            old.and_then(|o| o.mta_sts.as_ref().map(|m| (o, m))),
        ) {
            (false, _) => None,
            (true, Some((o, kept)))
                if o.config.mta_sts == config.mta_sts && o.config.tls_ca_file == config.tls_ca_file =>
            {
                Some(kept.clone())
            }
            (true, Some((_, kept))) => {
                Some(kept.reconfigured(config.mta_sts.clone(), tls::roots(config.tls_ca_file.as_deref())?)?)
            }
            (true, None) => Some(mta_sts::MtaSts::new(
                config.mta_sts.clone(),
                resolver.clone(),
                tls::roots(config.tls_ca_file.as_deref())?,
                Arc::clone(reports),
            )?),
        };
        let backoff = match old {
            Some(o) => o.backoff.with_rules(&config.backoff),
            None => crate::backoff::Backoff::new(&config.backoff, config.node_id, metrics.clone()),
        };
        let egress = match old.and_then(|o| o.egress.as_ref()) {
            Some(e) => e.reconfigured(&config.egress, &client),
            None => egress::Egress::new(&config.egress, &client),
        };
        let shaper = match old {
            Some(o) => o.shaper.with_rules(config.shaping.clone()),
            None => crate::shaping::Shaper::new(config.shaping.clone()),
        };
        Ok(Snapshot {
            client: Arc::new(client),
            tls,
            dane,
            mta_sts,
            backoff: Arc::new(backoff),
            egress: egress.map(Arc::new),
            shaper: Arc::new(shaper),
            config,
        })
    }
}

/// The delivery service: routing, site actors, client settings.
pub struct Delivery {
    /// The settings in force: a reload swaps them (`crate::reload`).
    now: arc_swap::ArcSwap<Snapshot>,
    resolver: MxResolver,
    /// The site actors (each stops after [`site::SITE_IDLE`] idle).
    sites: site::Sites,
    metrics: DeliveryMetrics,
    /// The control group's state (domain suspensions), once it is open.
    control: std::sync::OnceLock<crate::cluster::control::ControlState>,
    /// Writes to the control group (automatic shaping actions, suppressions).
    writer: std::sync::OnceLock<crate::cluster::writer::ControlWriter>,
    /// `[[bounce_class]]` and the shipped table: the class of a failure
    /// (shared with the event outbox; a reload sets its rules).
    classifier: crate::bounce::Classifier,
    /// Automatic suppressions after hard bounces, once the writer is set.
    auto_suppress: std::sync::OnceLock<crate::bounce::suppress::AutoSuppress>,
    /// Outcomes of TLS under MTA-STS/DANE policies, for TLS-RPT.
    tls_reports: Arc<crate::reports::tls::TlsRecorder>,
}

impl Delivery {
    /// Gives delivery the control group's state, for domain suspensions.
    pub fn set_control(&self, control: crate::cluster::control::ControlState) {
        let _ = self.control.set(control);
    }

    /// Gives delivery its way to write control-group records (and starts
    /// the task that writes automatic suppressions: call on the runtime).
    pub fn set_writer(&self, writer: crate::cluster::writer::ControlWriter) {
        if self.auto_suppress.get().is_none() {
            let _ = self.auto_suppress.set(crate::bounce::suppress::AutoSuppress::start(
                self.now.load().config.suppression.clone(),
                writer.clone(),
                self.control.get().cloned(),
                self.metrics.clone(),
            ));
        }
        // Shapers made by a reload share the writer with this one.
        self.now.load().shaper.set_writer(writer.clone());
        let _ = self.writer.set(writer);
    }

    /// The shaping state (rules, this node's share, limiters).
    pub fn shaper(&self) -> Arc<crate::shaping::Shaper> {
        Arc::clone(&self.now.load().shaper)
    }

    /// The configuration in force (the retry rules the queue applies, ...).
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.now.load().config)
    }

    /// The bounce classifier (`[[bounce_class]]` first, then the shipped table).
    pub fn classifier(&self) -> &crate::bounce::Classifier {
        &self.classifier
    }

    /// After a permanent failure of class `class`: adds the recipient to
    /// the suppression list when `[suppression]` asks for it and it is not
    /// there yet (asynchronously, batched; see [`crate::bounce::suppress`]).
    pub fn hard_bounce(&self, reverse_path: &str, recipient: &str, class: crate::bounce::Class, reply: &str, now: i64) {
        let Some(auto) = self.auto_suppress.get() else { return };
        let config = self.config();
        let Some(entry) = crate::bounce::suppress::AutoSuppress::entry_for(
            &config.suppression,
            reverse_path,
            recipient,
            class,
            reply,
            now,
        ) else {
            return;
        };
        let known = self
            .control
            .get()
            .and_then(|c| c.suppression(&entry.scope, &entry.address))
            .is_some_and(|s| s.in_force(now));
        if !known {
            auto.offer(entry);
        }
    }

    /// `Some(reply)` when `recipient` is on the global suppression list or
    /// on the list of the sender's domain.
    fn suppressed(&self, reverse_path: &str, recipient: &str, now: i64) -> Option<String> {
        let control = self.control.get()?;
        let address = crate::bounce::suppress::normalise_address(recipient);
        let sender_domain = Envelope::domain_of(reverse_path);
        control
            .suppressed(&sender_domain, &address, now)
            .map(|entry| crate::bounce::suppress::reply(&entry))
    }

    /// Where TLS outcomes under a policy are counted (TLS-RPT).
    pub fn tls_reports(&self) -> &Arc<crate::reports::tls::TlsRecorder> {
        &self.tls_reports
    }

    /// The egress pools, when `[[pool]]`s are configured.
    pub fn egress(&self) -> crate::delivery::egress::SharedEgress {
        self.now.load().egress.clone()
    }

    /// This node's fraction of the cluster's delivery (1 before the cluster is up).
    pub fn share_fraction(&self) -> f64 {
        self.writer.get().map_or(1.0, |w| w.share().fraction())
    }

    /// The control group's state, once it is open.
    pub fn control(&self) -> Option<&crate::cluster::control::ControlState> {
        self.control.get()
    }

    /// The control-group writer, once the cluster is up.
    pub fn writer(&self) -> Option<&crate::cluster::writer::ControlWriter> {
        self.writer.get()
    }

    /// `Some(reply)` when an operator suspended deliveries to `domain`.
    fn suspended(&self, domain: &str, now: i64) -> Option<String> {
        let crate::cluster::control::Suspension { until, reason } = self.control.get()?.suspension(domain)?;
        (until > now).then(|| format!("451 4.7.0 deliveries to {domain} suspended by the administrator: {reason}"))
    }

    pub fn new(config: Arc<Config>, metrics: DeliveryMetrics) -> anyhow::Result<Arc<Delivery>> {
        let resolver = MxResolver::new(&ResolverConfig {
            nameservers: config.dns_nameservers.clone(),
            timeout: config.dns_timeout,
            ..ResolverConfig::default()
        })
        .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?;
        let tls_reports: Arc<crate::reports::tls::TlsRecorder> = Arc::default();
        let now = Snapshot::build(config, None, &resolver, &tls_reports, &metrics)?;
        Ok(Arc::new(Delivery {
            tls_reports,
            resolver,
            sites: site::Sites::default(),
            metrics,
            control: std::sync::OnceLock::new(),
            writer: std::sync::OnceLock::new(),
            classifier: crate::bounce::Classifier::new(now.config.bounce_classes.clone()),
            auto_suppress: std::sync::OnceLock::new(),
            now: arc_swap::ArcSwap::from_pointee(now),
        }))
    }

    /// The settings of a reloaded `config`, built from the ones in force
    /// (their runtime state carried over); nothing is swapped yet. Fails,
    /// naming the key, where a start would (a CA file, a DANE trust anchor).
    pub fn prepare(&self, config: Arc<Config>) -> anyhow::Result<Snapshot> {
        let old = self.now.load_full();
        Snapshot::build(config, Some(&old), &self.resolver, &self.tls_reports, &self.metrics)
    }

    /// Puts prepared settings in force: attempts planned from now on use
    /// them; attempts under way finish with the ones they started with.
    pub fn install(&self, next: Snapshot) {
        self.classifier.set_rules(next.config.bounce_classes.clone());
        self.now.store(Arc::new(next));
    }

    fn is_local(config: &Config, domain: &str) -> bool {
        config.local_domains.iter().any(|d| d == domain)
    }

    /// Where mail for `domain` goes: a route, the local MDA, or its MX hosts.
    pub async fn plan(&self, domain: &str) -> Plan {
        self.plan_with(&self.now.load_full(), domain, true).await
    }

    /// [`Delivery::plan`] under the settings `s`; `recipient_policies:
    /// false` leaves MTA-STS out (a message with `TLS-Required: No`, RFC 8689 5).
    async fn plan_with(&self, s: &Snapshot, domain: &str, recipient_policies: bool) -> Plan {
        let config = &s.config;
        if Self::is_local(config, domain) {
            return match &config.local_delivery {
                LocalDelivery::Lmtp(spec) => match lmtp_endpoint(&self.resolver, spec).await {
                    Ok(endpoint) => Plan {
                        key: format!("local:{spec}"),
                        target: Target::Remote {
                            endpoints: vec![endpoint],
                            protocol: Protocol::Lmtp,
                            tls: TlsPolicy::Disabled,
                            sts: None,
                        },
                    },
                    Err(e) => unroutable(format!("451 4.3.0 local delivery agent {spec}: {e}")),
                },
                LocalDelivery::Maildir(template) => Plan {
                    key: "local:maildir".into(),
                    target: Target::Maildir(template.clone()),
                },
                LocalDelivery::None => unroutable("451 4.3.5 no local delivery agent configured ([local])".into()),
            };
        }
        let tls = s.tls.policy_for(domain);
        let tls_tag = tls.tag();
        let route = config
            .routes
            .iter()
            .find(|r| r.domain == domain)
            .or_else(|| config.routes.iter().find(|r| r.domain == "*"));
        if let Some(route) = route {
            let mut endpoints = Vec::new();
            let mut errors = Vec::new();
            for hop in &route.to {
                match route_endpoints(&self.resolver, hop, config.smtp_port).await {
                    Ok(mut e) => endpoints.append(&mut e),
                    Err(e) => errors.push(e),
                }
            }
            if endpoints.is_empty() {
                return unroutable(format!("451 4.4.4 route for {domain}: {}", errors.join("; ")));
            }
            return Plan {
                key: format!("route:{}{tls_tag}", route.to.join(",")),
                target: Target::Remote {
                    endpoints,
                    protocol: if route.lmtp { Protocol::Lmtp } else { Protocol::Smtp },
                    tls,
                    sts: None,
                },
            };
        }
        match self.resolver.resolve_site(domain).await {
            Ok(mut site) => {
                let dane_level = s.tls.dane_level(domain);
                let (tls, keep) = match dane::for_site(s.dane.as_deref(), dane_level, domain, &site, tls).await {
                    Ok(v) => v,
                    Err(reply) => return unroutable(reply),
                };
                // DANE, where it applies, wins over MTA-STS (RFC 8461 2).
                let sts_applies = recipient_policies && keep.is_none();
                let (tls, tls_tag, sts) = match s.mta_sts.as_ref().filter(|_| sts_applies) {
                    None => {
                        let tag = tls.tag();
                        (tls, tag, None)
                    }
                    Some(sts) => match sts.decide(domain, &config.tls_policies, &mut site.hosts).await {
                        mta_sts::Decision::None => {
                            let tag = tls.tag();
                            (tls, tag, None)
                        }
                        mta_sts::Decision::Refuse(reply) => return unroutable(reply),
                        mta_sts::Decision::Apply(a) => (s.tls.verify_host(), format!("{}={domain}", a.tag()), Some(a)),
                    },
                };
                let port = config.smtp_port;
                let endpoints = site
                    .hosts
                    .iter()
                    .filter(|h| keep.as_ref().is_none_or(|k| k.contains(&h.name)))
                    .flat_map(|h| {
                        h.addrs.iter().map(move |ip| Endpoint::Tcp {
                            host: h.name.clone(),
                            addr: std::net::SocketAddr::new(*ip, port),
                        })
                    })
                    .collect();
                Plan {
                    key: format!("mx:{}{tls_tag}", site.key()),
                    target: Target::Remote {
                        endpoints,
                        protocol: Protocol::Smtp,
                        tls,
                        sts,
                    },
                }
            }
            Err(e) => {
                let (status, text) = e.status();
                let code = if matches!(e, ResolveError::Temporary(_)) {
                    451
                } else {
                    550
                };
                unroutable(format!("{code} {status} {domain}: {text}"))
            }
        }
    }

    /// The host names mail for `domain` goes to (MX or route hosts), for
    /// shaping rules; `Err` says why there are none.
    pub async fn next_hops(&self, domain: &str) -> Result<Vec<String>, String> {
        match self.plan(domain).await.target {
            Target::Remote { endpoints, .. } => {
                let mut hosts: Vec<String> = Vec::new();
                for e in endpoints {
                    let name = match e {
                        Endpoint::Tcp { host, .. } => host,
                        Endpoint::Unix(path) => path.display().to_string(),
                    };
                    if !hosts.contains(&name) {
                        hosts.push(name);
                    }
                }
                Ok(hosts)
            }
            Target::Maildir(_) => Err("local delivery (Maildir)".into()),
            Target::Unroutable { reply } => Err(reply),
        }
    }

    /// Asks the local MDA (LMTP `RCPT` probe) whether a recipient exists.
    /// `Ok` when it does or cannot be checked (Maildir); `Err` carries the
    /// reply line to give at RCPT time.
    pub async fn verify_local(&self, address: &str) -> Result<(), String> {
        let plan = self.plan(&Envelope::domain_of(address)).await;
        let (endpoints, protocol) = match plan.target {
            Target::Remote {
                endpoints, protocol, ..
            } => (endpoints, protocol),
            Target::Maildir(_) => return Ok(()),
            Target::Unroutable { reply } => return Err(reply),
        };
        let client = Arc::clone(&self.now.load().client);
        let mut last = String::from("451 4.4.1 no address to connect to");
        for endpoint in &endpoints {
            match client::Connection::connect(endpoint, protocol, TlsPolicy::Disabled, &client).await {
                Ok(mut conn) => {
                    let verdict = conn.verify_recipient("", address).await;
                    conn.quit().await;
                    return match verdict {
                        Ok(RcptOutcome::Delivered { .. }) => Ok(()),
                        Ok(RcptOutcome::Failed { reply } | RcptOutcome::Deferred { reply }) => Err(reply),
                        Ok(fenced @ RcptOutcome::Fenced) => Err(fenced.reply().to_owned()),
                        Err(e) => Err(format!("451 4.4.2 {e}")),
                    };
                }
                Err(e) => last = format!("451 4.4.1 {endpoint}: {e}"),
            }
        }
        Err(last)
    }

    /// The actor of site `key`, started when there is none (first mail,
    /// or it stopped idle) or started again when it died; one more job
    /// counted as on its way to it (see [`site::SiteHandle::incoming`]).
    /// `client` and `max_connections`: the egress source's, if any (an
    /// actor keyed by site and source), else the node's.
    fn site(&self, config: &Config, key: &str, max_connections: usize) -> site::SiteHandle {
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = sites.get(key) {
            if handle.addr.connected() {
                handle.incoming.fetch_add(1, Ordering::SeqCst);
                return handle.clone();
            }
            // An idle actor leaves the map before it stops: this one died.
            tracing::warn!(site = %key, "site actor stopped unexpectedly; started again");
            self.metrics.actor_restarted("site");
        }
        let incoming = Arc::new(AtomicUsize::new(1));
        let actor = SiteActor::new(
            key.to_owned(),
            Arc::clone(&self.sites),
            Arc::clone(&incoming),
            max_connections,
            config.messages_per_connection,
            config.connection_idle,
            self.metrics.clone(),
        );
        // Site actors live on the system arbiter; their I/O runs on the runtime's workers.
        let addr = SiteActor::start_in_arbiter(&actix::System::current().arbiter().clone(), |_| actor);
        let handle = site::SiteHandle { addr, incoming };
        sites.insert(key.to_owned(), handle.clone());
        handle
    }

    /// One delivery attempt for every pending recipient of a message.
    /// `fence` is asked before the end of each SMTP/LMTP transaction's data.
    pub async fn attempt(
        self: &Arc<Self>,
        message: Arc<LoadedMessage>,
        fence: Option<Arc<dyn fence::Fence>>,
    ) -> Vec<RcptAttempt> {
        let message_id = header_value(&message.body, "message-id").unwrap_or_default();
        // One snapshot of the settings for the whole attempt.
        let s = self.now.load_full();
        let (message, pool) = self.egress_of(&s, message);
        let pending: Vec<usize> = message
            .record
            .rcpt_state
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.status.is_final())
            .map(|(i, _)| i)
            .collect();
        let now = chrono::Utc::now().timestamp();
        // Suppressed recipients are not attempted: they fail here, without a connection.
        let mut results = Vec::new();
        let mut attempted = Vec::with_capacity(pending.len());
        for i in pending {
            let address = &message.record.envelope.recipients[i].address;
            match self.suppressed(&message.record.envelope.reverse_path, address, now) {
                Some(reply) => results.extend(
                    each_rcpt(&[i], &RcptOutcome::Failed { reply }, &message_id)
                        .into_iter()
                        .map(|mut a| {
                            a.suppressed = true;
                            a
                        }),
                ),
                None => attempted.push(i),
            }
        }
        let pending = attempted;
        // Recipients by destination site (domains sharing MXes share a site).
        let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in &pending {
            let address = &message.record.envelope.recipients[i].address;
            by_domain.entry(Envelope::domain_of(address)).or_default().push(i);
        }
        let mut by_site: BTreeMap<String, (Plan, Vec<usize>, Option<crate::shaping::Destination>)> = BTreeMap::new();
        // The shaping scope of each recipient sent to a remote site.
        let mut scopes: Vec<Option<String>> = vec![None; message.record.envelope.recipients.len()];
        let require_tls = requiretls::required(&message.body);
        // RFC 8689 4.1: with REQUIRETLS, a TLS-Required header field is ignored.
        let recipient_policies = require_tls || !mta_sts::tls_optional(&message.body);
        for (domain, rcpts) in by_domain {
            let plan = match self.suspended(&domain, now) {
                Some(reply) => Plan {
                    key: format!("suspended:{domain}"),
                    target: Target::Unroutable { reply },
                },
                None => self.plan_with(&s, &domain, recipient_policies).await,
            };
            let plan = match require_tls {
                true => harden_for_requiretls(plan, &s.tls),
                false => plan,
            };
            let mut key = plan.key.clone();
            let mut shaped = None;
            if let Target::Remote { endpoints, .. } = &plan.target {
                let hosts: Vec<&str> = endpoints
                    .iter()
                    .filter_map(|e| match e {
                        Endpoint::Tcp { host, .. } => Some(host.as_str()),
                        Endpoint::Unix(_) => None,
                    })
                    .collect();
                let dest = s.shaper.classify(&domain, &hosts, None);
                // Automatic actions are kept per shaping scope, known once planned.
                if let Some(held) = s.backoff.held(self.control(), &dest.scope, None, now) {
                    results.extend(held_attempts(&rcpts, held, &dest.scope, &message_id, &self.metrics));
                    continue;
                }
                for &i in &rcpts {
                    scopes[i] = Some(dest.scope.clone());
                }
                let throttled = self
                    .control
                    .get()
                    .and_then(|c| c.action(&dest.scope))
                    .is_some_and(|a| a.in_force(now));
                if throttled || !dest.limits.is_empty() {
                    // Its own site actor: the scope's connection limits apply to it.
                    key = format!("{key}#{}", dest.scope);
                    shaped = Some(dest);
                }
            }
            by_site
                .entry(key)
                .or_insert_with(|| (plan, Vec::new(), shaped))
                .1
                .extend(rcpts);
        }
        let mut waits = Vec::new();
        for (key, (plan, rcpts, shaped)) in by_site {
            let mut conn_limits = None;
            if let Some(dest) = &shaped {
                let action = self.control.get().and_then(|c| c.action(&dest.scope));
                // Reserved per message and domain: a message's domains may
                // share a scope but go out in separate transactions.
                let reservation = format!("{}/{}", message.record.id, dest.domain);
                if let crate::shaping::Admission::Hold { until, reply } =
                    s.shaper.admit(dest, &reservation, action.as_ref())
                {
                    self.metrics
                        .shaping_held(if dest.ruled { &dest.scope } else { "other" }, rcpts.len());
                    results.extend(
                        deferred_all(&rcpts, &reply, &message_id)
                            .into_iter()
                            .map(|a| RcptAttempt {
                                not_before: Some(until),
                                scope: Some(dest.scope.clone()),
                                ..a
                            }),
                    );
                    continue;
                }
                conn_limits = s.shaper.connections(dest);
            }
            match plan.target {
                Target::Unroutable { reply } => {
                    results.extend(rcpts.into_iter().map(|index| RcptAttempt {
                        index,
                        outcome: outcome_from_text(&reply),
                        remote_host: None,
                        remote_ip: None,
                        tls: None,
                        dsn_relayed: false,
                        final_delivery: false,
                        message_id: message_id.clone(),
                        not_before: None,
                        scope: None,
                        suppressed: false,
                        source: None,
                    }));
                }
                Target::Maildir(template) => {
                    results.extend(
                        local::deliver_maildir(&template, &message, &rcpts, &message_id, fence.as_deref()).await,
                    );
                }
                Target::Remote {
                    endpoints,
                    protocol,
                    tls,
                    sts,
                } => {
                    let egress = match (&s.egress, pool) {
                        (Some(egress), Some(pool)) if protocol == Protocol::Smtp && !key.starts_with("local:") => {
                            Some((egress, pool))
                        }
                        _ => None,
                    };
                    let sends = match egress {
                        None => vec![(rcpts, endpoints, None)],
                        Some((egress, pool)) => {
                            let (sends, held) = self.choose_sources(
                                &s,
                                egress,
                                pool,
                                &message,
                                &scopes,
                                rcpts,
                                &endpoints,
                                &message_id,
                                now,
                            );
                            results.extend(held);
                            sends
                        }
                    };
                    for (rcpts, endpoints, choice) in sends {
                        // `[[shaping]]` rules naming the chosen source: their own budget.
                        let mut conn_limits = conn_limits.clone();
                        if let (Some(c), true, Some(&first)) = (&choice, s.shaper.has_source_rules(), rcpts.first()) {
                            let hosts: Vec<&str> = endpoints
                                .iter()
                                .filter_map(|e| match e {
                                    Endpoint::Tcp { host, .. } => Some(host.as_str()),
                                    Endpoint::Unix(_) => None,
                                })
                                .collect();
                            let domain = Envelope::domain_of(&message.record.envelope.recipients[first].address);
                            let dest = s.shaper.classify(&domain, &hosts, None);
                            if let Some(by_source) = s.shaper.for_source(&dest, &hosts, &c.name) {
                                let action = self.control.get().and_then(|ctl| ctl.action(&by_source.scope));
                                let reservation = format!("{}/{}/{}", message.record.id, domain, c.name);
                                if let crate::shaping::Admission::Hold { until, reply } =
                                    s.shaper.admit(&by_source, &reservation, action.as_ref())
                                {
                                    self.metrics.shaping_held(&format!("source:{}", c.name), rcpts.len());
                                    let scope = by_source.scope.clone();
                                    self.settle_source(&s, choice, &mut []);
                                    results.extend(deferred_all(&rcpts, &reply, &message_id).into_iter().map(|a| {
                                        RcptAttempt {
                                            not_before: Some(until),
                                            scope: Some(scope.clone()),
                                            ..a
                                        }
                                    }));
                                    continue;
                                }
                                if let Some(limits) = s.shaper.connections(&by_source) {
                                    conn_limits = Some(limits);
                                }
                            }
                        }
                        let max_connections = match (&choice, &s.egress) {
                            (Some(c), Some(egress)) => egress.config().sources[c.source]
                                .max_connections
                                .unwrap_or(s.config.max_connections_per_site),
                            _ => s.config.max_connections_per_site,
                        };
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let job = Job {
                            message: Arc::clone(&message),
                            rcpts: rcpts.clone(),
                            endpoints,
                            protocol,
                            tls: tls.clone(),
                            sts: sts.clone(),
                            message_id: message_id.clone(),
                            fence: fence.clone(),
                            conn: conn_limits.clone(),
                            reply: tx,
                            client: match (&choice, &s.egress) {
                                (Some(c), Some(egress)) => Arc::clone(egress.client(c.source)),
                                _ => Arc::clone(&s.client),
                            },
                            site: site::SiteLimits {
                                max_connections,
                                messages_per_connection: s.config.messages_per_connection,
                                connection_idle: s.config.connection_idle,
                            },
                        };
                        // A source has its own site actor (its own connections, its address and EHLO name).
                        let site = match &choice {
                            Some(c) => self.site(&s.config, &format!("{key}|source:{}", c.name), max_connections),
                            None => self.site(&s.config, &key, max_connections),
                        };
                        if site.addr.send(site::Submit(job)).await.is_err() {
                            site.incoming.fetch_sub(1, Ordering::SeqCst);
                            self.settle_source(&s, choice, &mut []);
                            results.extend(deferred_all(
                                &rcpts,
                                "451 4.3.0 delivery agent unavailable",
                                &message_id,
                            ));
                            continue;
                        }
                        waits.push((rcpts, rx, choice, tls == TlsPolicy::Opportunistic));
                    }
                }
            }
        }
        for (rcpts, rx, choice, no_policy) in waits {
            match rx.await {
                Ok(mut r) => {
                    if no_policy && s.config.tls_rpt.enabled {
                        record_no_policy(&self.tls_reports, &message.record.envelope, &r);
                    }
                    for a in &mut r {
                        if a.scope.is_none() {
                            a.scope = scopes.get(a.index).cloned().flatten();
                        }
                    }
                    self.settle_source(&s, choice, &mut r);
                    let replies = r.iter().filter(|a| a.not_before.is_none()).filter_map(|a| {
                        let (RcptOutcome::Deferred { reply } | RcptOutcome::Failed { reply }) = &a.outcome else {
                            return None;
                        };
                        Some((reply.as_str(), a.scope.as_deref()?, a.source.as_deref()))
                    });
                    s.backoff.observe(replies, self.control(), self.writer());
                    results.extend(r)
                }
                Err(_) => {
                    self.settle_source(&s, choice, &mut []);
                    results.extend(deferred_all(&rcpts, "451 4.3.0 delivery interrupted", &message_id))
                }
            }
        }
        results.sort_by_key(|a| a.index);
        results
    }
}

impl Delivery {
    /// With pools: the message as sent (without its `X-Tern-Pool` header)
    /// and its pool; without pools the message as it is and no pool.
    fn egress_of(&self, s: &Snapshot, message: Arc<LoadedMessage>) -> (Arc<LoadedMessage>, Option<usize>) {
        let Some(egress) = &s.egress else {
            return (message, None);
        };
        let envelope = &message.record.envelope;
        let pool = match egress.pool_for(
            &message.record.id,
            &message.body,
            &Envelope::domain_of(&envelope.reverse_path),
            envelope.auth_user.as_deref(),
        ) {
            crate::config::egress::PoolChoice::Pool(p) => Some(p),
            crate::config::egress::PoolChoice::None => None,
        };
        let message = match crate::delivery::egress::strip_pool_header(&message.body) {
            Some(body) => Arc::new(LoadedMessage {
                record: message.record.clone(),
                body,
            }),
            None => message,
        };
        (message, pool)
    }

    /// A source of `pool` per destination scope of the site's recipients,
    /// with the endpoints it can reach; recipients held back by warm-up (or
    /// that no source can reach) come back as attempts.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn choose_sources(
        &self,
        s: &Snapshot,
        egress: &crate::delivery::egress::Egress,
        pool: usize,
        message: &LoadedMessage,
        scopes: &[Option<String>],
        rcpts: Vec<usize>,
        endpoints: &[Endpoint],
        message_id: &str,
        now: i64,
    ) -> (
        Vec<(Vec<usize>, Vec<Endpoint>, Option<crate::delivery::egress::Choice>)>,
        Vec<RcptAttempt>,
    ) {
        let mut by_scope: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in rcpts {
            let scope = match scopes.get(i).cloned().flatten() {
                Some(scope) => scope,
                None => format!(
                    "domain:{}",
                    Envelope::domain_of(&message.record.envelope.recipients[i].address)
                ),
            };
            by_scope.entry(scope).or_default().push(i);
        }
        let mut sends = Vec::new();
        let mut held = Vec::new();
        for (scope, rcpts) in by_scope {
            // Sources an automatic action (scope = "source") keeps from this scope.
            let suspended: Vec<(&str, crate::backoff::Held)> = egress.config().pools[pool]
                .members
                .iter()
                .map(|&(source, _)| egress.config().sources[source].name.as_str())
                .filter_map(|name| {
                    let key = format!("{name}|{scope}");
                    s.backoff.held(self.control(), &key, None, now).map(|h| (name, h))
                })
                .collect();
            let skip = |name: &str| suspended.iter().any(|(n, _)| *n == name);
            match egress.choose_except(pool, &scope, endpoints, now, || self.share_fraction(), &skip) {
                Ok(choice) => {
                    self.metrics.egress_message(&choice.name);
                    let family = egress.config().sources[choice.source].address.is_ipv4();
                    let reachable = endpoints
                        .iter()
                        .filter(|e| matches!(e, Endpoint::Tcp { addr, .. } if addr.is_ipv4() == family))
                        .cloned()
                        .collect();
                    sends.push((rcpts, reachable, Some(choice)));
                }
                Err(no) => {
                    let (reply, until) = match no {
                        crate::delivery::egress::NoSource::Capped { until, reply } => {
                            self.metrics.warmup_held(&egress.config().pools[pool].name, rcpts.len());
                            (reply, Some(until))
                        }
                        crate::delivery::egress::NoSource::Unreachable { .. } if !suspended.is_empty() => {
                            // Every reachable source is suspended for this scope: wait for the first to end.
                            let first = suspended.into_iter().map(|(_, h)| h).min_by_key(|h| match h {
                                crate::backoff::Held::Until { not_before, .. } => *not_before,
                                crate::backoff::Held::Bounced { .. } => i64::MIN,
                            });
                            if let Some(h) = first {
                                held.extend(held_attempts(&rcpts, h, &scope, message_id, &self.metrics));
                            }
                            continue;
                        }
                        crate::delivery::egress::NoSource::Unreachable { reply } => (reply, None),
                    };
                    held.extend(
                        deferred_all(&rcpts, &reply, message_id)
                            .into_iter()
                            .map(|a| RcptAttempt {
                                not_before: until,
                                scope: Some(scope.clone()),
                                ..a
                            }),
                    );
                }
            }
        }
        (sends, held)
    }

    /// Names the source in the attempts, and gives a warm-up count back
    /// when nothing was delivered.
    fn settle_source(
        &self,
        s: &Snapshot,
        choice: Option<crate::delivery::egress::Choice>,
        attempts: &mut [RcptAttempt],
    ) {
        let (Some(choice), Some(egress)) = (choice, &s.egress) else {
            return;
        };
        let delivered = attempts
            .iter()
            .any(|a| matches!(a.outcome, RcptOutcome::Delivered { .. }));
        for a in attempts.iter_mut() {
            a.source = Some(choice.name.clone());
        }
        if let (false, Some(counted)) = (delivered, choice.counted) {
            egress.give_back(counted);
        }
    }
}

/// The attempts of recipients an automatic action keeps from `scope`.
fn held_attempts(
    rcpts: &[usize],
    held: crate::backoff::Held,
    scope: &str,
    message_id: &str,
    metrics: &DeliveryMetrics,
) -> Vec<RcptAttempt> {
    let (outcome, not_before, action) = match held {
        crate::backoff::Held::Until { not_before, reply } => {
            (RcptOutcome::Deferred { reply }, Some(not_before), "suspend")
        }
        crate::backoff::Held::Bounced { reply } => (RcptOutcome::Failed { reply }, None, "bounce"),
    };
    metrics.backoff_recipients(action, rcpts.len() as u64);
    let mut attempts = each_rcpt(rcpts, &outcome, message_id);
    for a in &mut attempts {
        a.not_before = not_before;
        a.scope = Some(scope.to_owned());
    }
    attempts
}

/// 2xx delivered, 5xx failed, anything else deferred.
fn outcome_from_text(reply: &str) -> RcptOutcome {
    let reply = reply.to_owned();
    match reply.as_bytes().first() {
        Some(b'2') => RcptOutcome::Delivered { reply },
        Some(b'5') => RcptOutcome::Failed { reply },
        _ => RcptOutcome::Deferred { reply },
    }
}

fn unroutable(reply: String) -> Plan {
    Plan {
        key: format!("unroutable:{reply}"),
        target: Target::Unroutable { reply },
    }
}

pub(crate) fn deferred_all(rcpts: &[usize], reply: &str, message_id: &str) -> Vec<RcptAttempt> {
    each_rcpt(
        rcpts,
        &RcptOutcome::Deferred {
            reply: reply.to_owned(),
        },
        message_id,
    )
}

/// `outcome` for each of `rcpts`, with no next hop to name.
pub(crate) fn each_rcpt(rcpts: &[usize], outcome: &RcptOutcome, message_id: &str) -> Vec<RcptAttempt> {
    rcpts
        .iter()
        .map(|&index| RcptAttempt {
            index,
            outcome: outcome.clone(),
            remote_host: None,
            remote_ip: None,
            tls: None,
            dsn_relayed: false,
            final_delivery: false,
            message_id: message_id.to_owned(),
            not_before: None,
            scope: None,
            suppressed: false,
            source: None,
        })
        .collect()
}

/// `host:port` (IP literal or name, looked up with the `[dns]` resolver) into endpoints.
async fn route_endpoints(resolver: &MxResolver, hop: &str, default_port: u16) -> Result<Vec<Endpoint>, String> {
    let (host, port) = resolve::parse_host_port(hop, default_port).map_err(|e| e.to_string())?;
    let addrs = resolver
        .host_addresses(&host)
        .await
        .map_err(|e| format!("{hop}: {e}"))?;
    Ok(addrs
        .into_iter()
        .map(|ip| Endpoint::Tcp {
            host: host.clone(),
            addr: std::net::SocketAddr::new(ip, port),
        })
        .collect())
}

/// `[local] lmtp`: `host:port`, `unix:/path` or `/path`.
async fn lmtp_endpoint(resolver: &MxResolver, spec: &str) -> Result<Endpoint, String> {
    if let Some(path) = spec
        .strip_prefix("unix:")
        .or_else(|| spec.starts_with('/').then_some(spec))
    {
        return Ok(Endpoint::Unix(path.into()));
    }
    route_endpoints(resolver, spec, 24)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{spec}: no address"))
}

/// A plan for a REQUIRETLS message: SMTP relays need verified TLS (the
/// host name, unless the domain's `verify` policy names others), and never
/// share connections with other mail. MTA-STS `testing` is dropped: its
/// fallback to unverified TLS is not allowed here.
fn harden_for_requiretls(mut plan: Plan, tls: &tls::OutboundTls) -> Plan {
    if let Target::Remote {
        protocol: Protocol::Smtp,
        tls: policy,
        sts,
        ..
    } = &mut plan.target
    {
        if !matches!(policy, TlsPolicy::Verify(_)) {
            *policy = tls.verify_host();
        }
        if sts.as_ref().is_some_and(|a| !a.requires_verified_tls()) {
            *sts = None;
        }
        plan.key.push_str("+requiretls");
    }
    plan
}

/// Records a `no-policy-found` outcome per recipient domain of one
/// transaction with opportunistic TLS (neither MTA-STS nor DANE applied):
/// success when the session used TLS, `starttls-not-supported` when it
/// went out in clear. Attempts that reached no server are not sessions.
fn record_no_policy(
    recorder: &crate::reports::tls::TlsRecorder,
    envelope: &crate::envelope::Envelope,
    attempts: &[RcptAttempt],
) {
    use crate::reports::tls as tls_report;
    let mut seen: Vec<String> = Vec::new();
    for a in attempts {
        let Some(host) = &a.remote_host else { continue };
        let Some(rcpt) = envelope.recipients.get(a.index) else {
            continue;
        };
        let domain = crate::envelope::Envelope::domain_of(&rcpt.address);
        if domain.is_empty() || seen.contains(&domain) {
            continue;
        }
        seen.push(domain.clone());
        let failure = a.tls.is_none().then(|| tls_report::Failure {
            result_type: tls_report::FailureType::StarttlsNotSupported,
            sending_mta_ip: None,
            receiving_mx_hostname: Some(host.clone()),
            receiving_ip: a.remote_ip.as_deref().and_then(|ip| ip.parse().ok()),
            reason: "STARTTLS not offered".into(),
        });
        recorder.record(tls_report::TlsOutcome {
            policy_domain: domain,
            policy: tls_report::PolicyKind::NoPolicyFound,
            failure,
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::delivery::testdns::DnsServer;

    fn addrs(endpoints: &[Endpoint]) -> Vec<SocketAddr> {
        endpoints
            .iter()
            .map(|e| match e {
                Endpoint::Tcp { addr, .. } => *addr,
                Endpoint::Unix(p) => panic!("unexpected {p:?}"),
            })
            .collect()
    }

    /// Route hops are looked up with the `[dns]` servers (a name only the
    /// test DNS knows), IP literals and `localhost` without DNS.
    #[tokio::test]
    async fn route_hosts_use_the_configured_resolver() {
        let dns = DnsServer::start("host-record=relay.test,127.0.0.7,::7\nhost-record=v4relay.test,127.0.0.8\n");
        let resolver = MxResolver::new(&ResolverConfig {
            nameservers: vec![dns.addr],
            timeout: Duration::from_secs(2),
            attempts: 1,
            ..ResolverConfig::default()
        })
        .unwrap();
        let r = route_endpoints(&resolver, "Relay.test:2525", 25).await.unwrap();
        assert_eq!(
            addrs(&r),
            ["[::7]:2525".parse().unwrap(), "127.0.0.7:2525".parse().unwrap()]
        );
        assert!(matches!(&r[0], Endpoint::Tcp { host, .. } if host == "relay.test"));
        let r = route_endpoints(&resolver, "v4relay.test", 25).await.unwrap();
        assert_eq!(addrs(&r), ["127.0.0.8:25".parse().unwrap()]);
        assert!(dns.log().contains("relay.test"), "{}", dns.log());

        let queries = dns.log().matches("query[").count();
        let r = route_endpoints(&resolver, "192.0.2.1:26", 25).await.unwrap();
        assert_eq!(addrs(&r), ["192.0.2.1:26".parse().unwrap()]);
        let r = route_endpoints(&resolver, "[2001:db8::1]:27", 25).await.unwrap();
        assert_eq!(addrs(&r), ["[2001:db8::1]:27".parse().unwrap()]);
        let r = route_endpoints(&resolver, "localhost:28", 25).await.unwrap();
        assert!(addrs(&r).contains(&"127.0.0.1:28".parse().unwrap()));
        assert_eq!(dns.log().matches("query[").count(), queries, "literals need no DNS");

        let e = route_endpoints(&resolver, "nosuch.test:25", 25).await.unwrap_err();
        assert!(e.starts_with("nosuch.test:25: ") && e.contains("nosuch.test"), "{e}");
    }
}
