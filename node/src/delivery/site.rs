//! The delivery actor of one destination site, with its connection pool.
//!
//! The actor holds the site's queue of jobs and counts its workers; each
//! worker is a tokio task that owns one connection, takes jobs from the
//! actor one after another (reusing the connection, up to
//! `messages_per_connection`), and ends when the queue is empty. At most
//! `max_connections_per_site` workers run at once.
//!
//! A site whose hosts all refuse or time out is held down for a while (the
//! first retry interval): its queued and newly submitted jobs are deferred at
//! once with the connection error instead of each trying to connect, so a
//! dead or black-holed destination costs one connect attempt per interval,
//! not one (of up to the connect timeout) per queued message.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::prelude::*;

use super::client::{ConnectError, Connection, OutMessage, OutRecipient};
use super::{deferred_all, ClientConfig, Endpoint, LoadedMessage, Protocol, RcptAttempt, TlsPolicy};
use crate::metrics::DeliveryMetrics;

/// Recipients of one message that go to this site, in one transaction.
pub struct Job {
    pub message: Arc<LoadedMessage>,
    pub rcpts: Vec<usize>,
    pub endpoints: Vec<Endpoint>,
    pub protocol: Protocol,
    pub tls: TlsPolicy,
    pub message_id: String,
    pub reply: tokio::sync::oneshot::Sender<Vec<RcptAttempt>>,
}

pub struct SiteActor {
    key: String,
    client: ClientConfig,
    max_workers: usize,
    per_connection: usize,
    queue: VecDeque<Job>,
    workers: usize,
    metrics: DeliveryMetrics,
    /// How long the site stays down after every host failed to connect.
    down_for: std::time::Duration,
    /// Until when, and why: jobs submitted before then are deferred with it.
    down: Option<(std::time::Instant, String)>,
    /// Workers holding a working connection: while one does, a failed
    /// connect (e.g. the far side's connection limit) does not take the
    /// site down.
    connected: usize,
}

impl SiteActor {
    pub fn new(
        key: String,
        client: ClientConfig,
        max_workers: usize,
        per_connection: usize,
        metrics: DeliveryMetrics,
        down_for: std::time::Duration,
    ) -> SiteActor {
        SiteActor {
            key,
            client,
            max_workers,
            per_connection,
            queue: VecDeque::new(),
            workers: 0,
            metrics,
            down_for,
            down: None,
            connected: 0,
        }
    }

    /// The connection error while the site is held down.
    fn down_reason(&mut self) -> Option<String> {
        match &self.down {
            Some((until, reason)) if std::time::Instant::now() < *until => Some(reason.clone()),
            Some(_) => {
                self.down = None;
                None
            }
            None => None,
        }
    }
}

/// Defers every recipient of `job` with `reply` (the site is down).
fn defer_job(job: Job, reply: &str) {
    let _ = job.reply.send(deferred_all(&job.rcpts, reply, &job.message_id));
}

impl Actor for SiteActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

/// A job for this site.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit(pub Job);

/// A worker asks for its next job; `None` tells it to finish.
#[derive(Message)]
#[rtype(result = "Option<Job>")]
struct Take;

/// A worker could connect to none of the site's hosts.
#[derive(Message)]
#[rtype(result = "()")]
struct ConnectFailed(String);

/// A worker got (`true`) or dropped (`false`) a working connection.
#[derive(Message)]
#[rtype(result = "()")]
struct Connected(bool);

impl Handler<Connected> for SiteActor {
    type Result = ();

    fn handle(&mut self, Connected(up): Connected, _: &mut Context<Self>) {
        if up {
            self.connected += 1;
            self.down = None;
        } else {
            self.connected = self.connected.saturating_sub(1);
        }
    }
}

impl Handler<ConnectFailed> for SiteActor {
    type Result = ();

    fn handle(&mut self, ConnectFailed(reply): ConnectFailed, _: &mut Context<Self>) {
        if self.down_for.is_zero() || self.connected > 0 {
            return;
        }
        let reason = format!("{reply} (site held down for {}s)", self.down_for.as_secs());
        tracing::info!(site = %self.key, queued = self.queue.len(), secs = self.down_for.as_secs(), "site down; deferring its queue");
        for job in self.queue.drain(..) {
            defer_job(job, &reason);
        }
        self.down = Some((std::time::Instant::now() + self.down_for, reason));
    }
}

impl Handler<Submit> for SiteActor {
    type Result = ();

    fn handle(&mut self, Submit(job): Submit, ctx: &mut Context<Self>) {
        if let Some(reason) = self.down_reason() {
            return defer_job(job, &reason);
        }
        self.queue.push_back(job);
        if self.workers < self.max_workers {
            self.workers += 1;
            let worker = Worker {
                site: ctx.address(),
                key: self.key.clone(),
                client: self.client.clone(),
                per_connection: self.per_connection,
                metrics: self.metrics.clone(),
            };
            tokio::spawn(worker.run());
        }
    }
}

impl Handler<Take> for SiteActor {
    type Result = Option<Job>;

    fn handle(&mut self, _: Take, _: &mut Context<Self>) -> Option<Job> {
        let job = self.queue.pop_front();
        if job.is_none() {
            // Decided here, in order with Submit, so no job is ever stranded.
            self.workers = self.workers.saturating_sub(1);
        }
        job
    }
}

struct Worker {
    site: Addr<SiteActor>,
    key: String,
    client: ClientConfig,
    per_connection: usize,
    metrics: DeliveryMetrics,
}

impl Worker {
    async fn run(self) {
        let mut conn: Option<Connection> = None;
        // Whether the actor counts this worker as connected.
        let mut had_conn = false;
        let mut sent = 0;
        loop {
            let Ok(Some(job)) = self.site.send(Take).await else {
                break;
            };
            let started = std::time::Instant::now();
            if sent >= self.per_connection {
                if let Some(c) = conn.take() {
                    c.quit().await;
                }
                sent = 0;
            }
            if conn.as_ref().is_some_and(|c| !c.is_usable()) {
                conn = None;
            }
            if conn.is_none() {
                if had_conn {
                    had_conn = false;
                    self.site.do_send(Connected(false));
                }
                match connect(&job, &self.client).await {
                    Ok(c) => {
                        self.metrics.connection(c.tls_active());
                        conn = Some(c);
                        had_conn = true;
                        self.site.do_send(Connected(true));
                    }
                    Err(reply) => {
                        self.metrics.attempt(started.elapsed().as_secs_f64(), false);
                        tracing::info!(site = %self.key, error = %reply, "no connection to site");
                        defer_job(job, &reply);
                        // Before the next Take, so the rest of the queue is deferred, not tried.
                        let _ = self.site.send(ConnectFailed(reply)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            sent += 1;
            let result = transaction(c, &job).await;
            self.metrics.attempt(started.elapsed().as_secs_f64(), result.is_ok());
            if result.is_err() {
                conn = None;
            }
            let _ = job.reply.send(match result {
                Ok(r) => r,
                Err(reply) => deferred_all(&job.rcpts, &reply, &job.message_id),
            });
        }
        if had_conn {
            self.site.do_send(Connected(false));
        }
        if let Some(c) = conn {
            c.quit().await;
        }
    }
}

/// Tries the endpoints in order; opportunistic TLS that fails falls back to
/// clear text on the same host (never for a required-TLS destination).
async fn connect(job: &Job, client: &ClientConfig) -> Result<Connection, String> {
    let mut last = String::from("451 4.4.1 no address to connect to");
    for endpoint in &job.endpoints {
        match Connection::connect(endpoint, job.protocol, job.tls, client).await {
            Ok(c) => return Ok(c),
            Err(ConnectError::TlsFailed(e)) if job.tls == TlsPolicy::Opportunistic => {
                tracing::info!(endpoint = %endpoint, error = %e, "STARTTLS failed; retrying without TLS");
                match Connection::connect(endpoint, job.protocol, TlsPolicy::Disabled, client).await {
                    Ok(c) => return Ok(c),
                    Err(e) => last = format!("451 4.4.1 {endpoint}: {e}"),
                }
            }
            Err(e) => last = format!("451 4.4.1 {endpoint}: {e}"),
        }
    }
    Err(last)
}

/// One transaction for the job's recipients; `Err` means the connection broke.
async fn transaction(conn: &mut Connection, job: &Job) -> Result<Vec<RcptAttempt>, String> {
    let envelope = &job.message.record.envelope;
    let recipients: Vec<OutRecipient> = job
        .rcpts
        .iter()
        .filter_map(|&i| envelope.recipients.get(i))
        .map(|r| OutRecipient {
            address: r.address.clone(),
            notify: r.notify,
            orcpt: r.orcpt.clone(),
        })
        .collect();
    let message = OutMessage {
        reverse_path: &envelope.reverse_path,
        recipients: &recipients,
        body_type: envelope.body_type,
        smtputf8: envelope.smtputf8,
        ret: envelope.ret,
        envid: envelope.envid.as_deref(),
        body: &job.message.body,
    };
    let result = conn
        .send(&message)
        .await
        .map_err(|e| format!("451 4.4.2 {}: {e}", conn.remote_host()))?;
    let host = conn.remote_host().to_owned();
    let ip = conn.remote_ip().map(|ip| ip.to_string());
    let tls = conn.tls_info();
    Ok(job
        .rcpts
        .iter()
        .zip(result.outcomes)
        .map(|(&index, outcome)| RcptAttempt {
            index,
            outcome,
            remote_host: Some(host.clone()),
            remote_ip: ip.clone(),
            tls: tls.clone(),
            dsn_relayed: result.dsn_relayed,
            message_id: job.message_id.clone(),
        })
        .collect())
}
