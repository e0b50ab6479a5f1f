//! The delivery actor of one destination site, with its connection pool.
//!
//! The actor holds the site's queue of jobs and counts its workers; each
//! worker is a tokio task that owns one connection, takes jobs from the
//! actor one after another (reusing the connection, up to
//! `messages_per_connection`). When the queue is empty a worker with an open
//! connection waits up to `connection_idle` for the next job (a connection
//! cache: mail that trickles in does not pay a connect, greeting, EHLO and
//! QUIT per message), then quits and ends. At most
//! `max_connections_per_site` workers run at once, waiting ones included.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::dev::MessageResponse;
use actix::prelude::*;
use tokio::sync::oneshot;

use super::client::{ConnectError, Connection, OutMessage, OutRecipient, SessionError};
use super::{
    deferred_all, each_rcpt, ClientConfig, Endpoint, LoadedMessage, Protocol, RcptAttempt, RcptOutcome, TlsPolicy,
};
use crate::metrics::DeliveryMetrics;

/// Recipients of one message that go to this site, in one transaction.
pub struct Job {
    pub message: Arc<LoadedMessage>,
    pub rcpts: Vec<usize>,
    pub endpoints: Vec<Endpoint>,
    pub protocol: Protocol,
    pub tls: TlsPolicy,
    /// The MTA-STS policy in force, if any (checks and records each connection).
    pub sts: Option<Arc<super::mta_sts::Applied>>,
    pub message_id: String,
    /// Asked before the end of data (shard leadership).
    pub fence: Option<Arc<dyn super::fence::Fence>>,
    /// This node's part of the scope's `[[shaping]]` connection limits
    /// (`None`: the `[delivery]` per-site defaults).
    pub conn: Option<crate::shaping::ConnLimits>,
    pub reply: tokio::sync::oneshot::Sender<Vec<RcptAttempt>>,
    /// The client settings (EHLO name, timeouts, an egress source's
    /// address) of the configuration the job was planned with: a new
    /// connection uses them; one already open keeps its own.
    pub client: Arc<ClientConfig>,
    /// The site's connection defaults in that configuration.
    pub site: SiteLimits,
}

/// `[delivery] max_connections_per_site` (or an egress source's
/// `max_connections`), `messages_per_connection`, `connection_idle_secs`:
/// each job brings them, so a reload reaches site actors already running.
#[derive(Clone, Copy, Debug)]
pub struct SiteLimits {
    pub max_connections: usize,
    pub messages_per_connection: usize,
    pub connection_idle: Duration,
}

/// A site actor with no job queued, no worker and nothing submitted for
/// this long stops; delivery starts a new one when mail for the site comes
/// (a config-free constant: an idle actor costs little, but sites are many).
pub const SITE_IDLE: Duration = Duration::from_secs(300);
/// Longest a worker waits for a `connection_rate` slot with a job in hand;
/// a later slot holds the message until then instead.
const CONNECTION_SLOT_WAIT: Duration = Duration::from_secs(5);
/// How often an actor looks whether it has been idle for [`SITE_IDLE`].
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// The live site actors by site key, shared by delivery (which starts them)
/// and the actors (which leave it when they stop idle).
pub type Sites = Arc<Mutex<HashMap<String, SiteHandle>>>;

/// How delivery reaches one site actor.
#[derive(Clone)]
pub struct SiteHandle {
    pub addr: Addr<SiteActor>,
    /// Jobs handed out for this actor and not received by it yet: taken
    /// under the [`Sites`] lock, so an actor that finds none there, and
    /// leaves the map under that lock, is sent nothing more.
    pub incoming: Arc<AtomicUsize>,
}

pub struct SiteActor {
    key: String,
    /// Where this actor is registered (it leaves when it stops idle).
    sites: Sites,
    incoming: Arc<AtomicUsize>,
    /// When it last had a job or a worker.
    busy_at: Instant,
    /// `[delivery] max_connections_per_site`, or this node's part of a
    /// `[[shaping]]` rule's `max_connections` (from the latest job).
    max_workers: usize,
    per_connection: usize,
    idle: Duration,
    queue: VecDeque<Job>,
    workers: usize,
    /// Workers waiting with an open connection (counted in `workers`), by
    /// worker id; the most recent last, so the least idle is used first.
    waiting: Vec<(u64, oneshot::Sender<Job>)>,
    next_worker: u64,
    metrics: DeliveryMetrics,
}

impl SiteActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: String,
        sites: Sites,
        incoming: Arc<AtomicUsize>,
        max_workers: usize,
        per_connection: usize,
        idle: Duration,
        metrics: DeliveryMetrics,
    ) -> SiteActor {
        SiteActor {
            key,
            sites,
            incoming,
            busy_at: Instant::now(),
            max_workers,
            per_connection,
            idle,
            queue: VecDeque::new(),
            workers: 0,
            waiting: Vec::new(),
            next_worker: 0,
            metrics,
        }
    }
}

impl Actor for SiteActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(IDLE_CHECK, |act, ctx| {
            if act.workers > 0 || !act.queue.is_empty() {
                act.busy_at = Instant::now();
                return;
            }
            if act.busy_at.elapsed() < SITE_IDLE {
                return;
            }
            let mut sites = act.sites.lock().unwrap_or_else(|p| p.into_inner());
            if act.incoming.load(Ordering::SeqCst) > 0 {
                return;
            }
            if sites
                .get(&act.key)
                .is_some_and(|h| Arc::ptr_eq(&h.incoming, &act.incoming))
            {
                sites.remove(&act.key);
            }
            drop(sites);
            tracing::debug!(site = %act.key, "site actor idle; stopped");
            ctx.stop();
        });
    }
}

/// A job for this site.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit(pub Job);

/// A worker asks for its next job. `wait`: it has an open connection and
/// may wait for one when the queue is empty.
#[derive(Message)]
#[rtype(result = "Next")]
struct Take {
    worker: u64,
    wait: bool,
}

enum Next {
    Job(Box<Job>),
    /// Nothing queued: the next job submitted comes here, unless the worker
    /// leaves first ([`Leave`]).
    Wait(oneshot::Receiver<Job>),
    /// Nothing queued: finish.
    Done,
}

impl MessageResponse<SiteActor, Take> for Next {
    fn handle(self, _: &mut Context<SiteActor>, tx: Option<actix::dev::OneshotSender<Next>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}

/// A waiting worker's idle time is over; true if it may finish, false if a
/// job was handed to it meanwhile (it is in its receiver).
#[derive(Message)]
#[rtype(result = "bool")]
struct Leave(u64);

impl Handler<Submit> for SiteActor {
    type Result = ();

    fn handle(&mut self, Submit(mut job): Submit, ctx: &mut Context<Self>) {
        self.incoming.fetch_sub(1, Ordering::SeqCst);
        self.busy_at = Instant::now();
        // This node's share of the scope's connections follows leadership;
        // the defaults follow the configuration the job was planned with.
        self.max_workers = job
            .conn
            .as_ref()
            .and_then(|c| c.max_connections)
            .unwrap_or(job.site.max_connections);
        self.per_connection = job.site.messages_per_connection;
        self.idle = job.site.connection_idle;
        // A worker waiting with an open connection takes it at once.
        while let Some((_, tx)) = self.waiting.pop() {
            match tx.send(job) {
                Ok(()) => return,
                Err(back) => {
                    // That worker is gone (its task was dropped).
                    job = back;
                    self.workers = self.workers.saturating_sub(1);
                }
            }
        }
        self.queue.push_back(job);
        if self.workers < self.max_workers {
            self.workers += 1;
            self.next_worker += 1;
            let worker = Worker {
                id: self.next_worker,
                site: ctx.address(),
                key: self.key.clone(),
                idle: self.idle,
                metrics: self.metrics.clone(),
            };
            tokio::spawn(worker.run());
        }
    }
}

impl Handler<Take> for SiteActor {
    type Result = Next;

    fn handle(&mut self, take: Take, _: &mut Context<Self>) -> Next {
        if let Some(job) = self.queue.pop_front() {
            return Next::Job(Box::new(job));
        }
        // Decided here, in order with Submit, so no job is ever stranded.
        if take.wait && !self.idle.is_zero() {
            let (tx, rx) = oneshot::channel();
            self.waiting.push((take.worker, tx));
            return Next::Wait(rx);
        }
        self.workers = self.workers.saturating_sub(1);
        Next::Done
    }
}

impl Handler<Leave> for SiteActor {
    type Result = bool;

    fn handle(&mut self, Leave(worker): Leave, _: &mut Context<Self>) -> bool {
        let Some(i) = self.waiting.iter().position(|(w, _)| *w == worker) else {
            return false;
        };
        self.waiting.remove(i);
        self.workers = self.workers.saturating_sub(1);
        true
    }
}

struct Worker {
    id: u64,
    site: Addr<SiteActor>,
    key: String,
    idle: Duration,
    metrics: DeliveryMetrics,
}

impl Worker {
    /// The next job, after waiting with the open connection if need be;
    /// `None`: finish.
    async fn next_job(&self, conn: &mut Option<Connection>) -> Option<Job> {
        let wait = conn.as_ref().is_some_and(Connection::is_usable);
        let mut rx = match self.site.send(Take { worker: self.id, wait }).await {
            Ok(Next::Job(job)) => return Some(*job),
            Ok(Next::Wait(rx)) => rx,
            Ok(Next::Done) | Err(_) => return None,
        };
        let job = match tokio::time::timeout(self.idle, &mut rx).await {
            Ok(job) => job.ok()?,
            Err(_) => match self.site.send(Leave(self.id)).await {
                Ok(false) => rx.await.ok()?,
                Ok(true) | Err(_) => return None,
            },
        };
        // The peer may have closed it while we waited.
        if conn.as_mut().is_some_and(|c| !c.still_open()) {
            *conn = None;
        }
        Some(job)
    }

    async fn run(self) {
        let mut conn: Option<Connection> = None;
        let mut sent = 0;
        while let Some(job) = self.next_job(&mut conn).await {
            let started = std::time::Instant::now();
            let per_connection = job
                .conn
                .as_ref()
                .and_then(|c| c.messages_per_connection)
                .unwrap_or(job.site.messages_per_connection);
            if sent >= per_connection {
                if let Some(c) = conn.take() {
                    c.quit().await;
                }
                sent = 0;
            }
            if conn.as_ref().is_some_and(|c| !c.is_usable()) {
                conn = None;
            }
            if conn.is_none() {
                // `connection_rate`: wait for this node's next connection
                // slot if it is near, else hold the message until then.
                if let Some(pacer) = job.conn.as_ref().and_then(|c| c.pacer.as_ref()) {
                    match pacer.reserve_within(CONNECTION_SLOT_WAIT) {
                        Ok(wait) => tokio::time::sleep(wait).await,
                        Err(slot) => {
                            let reply = format!("451 4.7.0 held by shaping: connection_rate {}", pacer.rate());
                            let mut held = deferred_all(&job.rcpts, &reply, &job.message_id);
                            for a in &mut held {
                                a.not_before = Some(slot);
                            }
                            let _ = job.reply.send(held);
                            continue;
                        }
                    }
                }
                match connect(&job, &job.client).await {
                    Ok(c) => {
                        self.metrics.connection(c.tls_active());
                        conn = Some(c);
                        sent = 0;
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
                Err(outcome) => each_rcpt(&job.rcpts, &outcome, &job.message_id),
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
        let connected = match &job.sts {
            Some(sts) => sts.connect(endpoint, job.protocol, job.tls.clone(), client).await,
            None => Connection::connect(endpoint, job.protocol, job.tls.clone(), client).await,
        };
        match connected {
            Ok(c) => return Ok(c),
            Err(ConnectError::TlsFailed(e)) if job.tls == TlsPolicy::Opportunistic => {
                tracing::info!(endpoint = %endpoint, error = %e, "STARTTLS failed; retrying without TLS");
                match Connection::connect(endpoint, job.protocol, TlsPolicy::Disabled, client).await {
                    Ok(c) => return Ok(c),
                    Err(e) => last = format!("451 4.4.1 {endpoint}: {e}"),
                }
            }
            Err(e) => {
                let e = e.to_string();
                last = super::dane::deferral(endpoint, &e).unwrap_or_else(|| format!("451 4.4.1 {endpoint}: {e}"));
            }
        }
    }
    Err(last)
}

/// One transaction for the job's recipients; `Err` means the connection
/// broke (or the fence abandoned it), with the outcome of every recipient.
async fn transaction(conn: &mut Connection, job: &Job) -> Result<Vec<RcptAttempt>, RcptOutcome> {
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
        SessionError::Fenced => RcptOutcome::Fenced,
        e => RcptOutcome::Deferred {
            reply: format!("451 4.4.2 {}: {e}", conn.remote_host()),
        },
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
            not_before: None,
            scope: None,
            suppressed: false,
            source: None,
        })
        .collect())
}
