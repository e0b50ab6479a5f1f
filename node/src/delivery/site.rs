//! The delivery actor of one destination site, with its connection pool.
//!
//! The actor holds the site's queue of jobs and counts its workers; each
//! worker is a tokio task that owns one connection, takes jobs from the
//! actor one after another (reusing the connection, up to
//! `messages_per_connection`), and ends when the queue is empty. At most
//! `max_connections_per_site` workers run at once.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::prelude::*;

use super::client::{ConnectError, Connection, OutMessage, OutRecipient, SessionError};
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
    /// Asked before the end of data (shard leadership).
    pub fence: Option<Arc<dyn super::fence::Fence>>,
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
}

impl SiteActor {
    pub fn new(
        key: String,
        client: ClientConfig,
        max_workers: usize,
        per_connection: usize,
        metrics: DeliveryMetrics,
    ) -> SiteActor {
        SiteActor {
            key,
            client,
            max_workers,
            per_connection,
            queue: VecDeque::new(),
            workers: 0,
            metrics,
        }
    }
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

impl Handler<Submit> for SiteActor {
    type Result = ();

    fn handle(&mut self, Submit(job): Submit, ctx: &mut Context<Self>) {
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
                match connect(&job, &self.client).await {
                    Ok(c) => {
                        self.metrics.connection(c.tls_active());
                        conn = Some(c);
                    }
                    Err(reply) => {
                        self.metrics.attempt(started.elapsed().as_secs_f64(), false);
                        tracing::info!(site = %self.key, error = %reply, "no connection to site");
                        let _ = job.reply.send(deferred_all(&job.rcpts, &reply, &job.message_id));
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
        fence: job.fence.as_deref(),
    };
    let result = conn.send(&message).await.map_err(|e| match e {
        SessionError::Fenced(reply) => reply,
        e => format!("451 4.4.2 {}: {e}", conn.remote_host()),
    })?;
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
            final_delivery: job.protocol == Protocol::Lmtp,
            message_id: job.message_id.clone(),
        })
        .collect())
}
