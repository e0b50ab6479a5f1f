//! Network side of the SMTP server: the accept loop, one task per connection
//! driving a [`Session`], timeouts, STARTTLS and implicit TLS via
//! tokio-rustls, AUTH checks, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::limits::{ConnectionRate, IpLimiter, MemoryBudget};
use super::proxy::{self, ProxyHeader};
use crate::envelope::Envelope;
use crate::metrics::{Limit, SmtpMetrics};
use crate::submission::{AuthVerdict, Authenticator};
use tern_smtp::session::{Output, Session};
use tern_smtp::{LimitObserver, Reply, SessionConfig};

pub use tern_smtp::{EnqueueError, RelayPolicy, TlsInfo};

/// How long running sessions get to finish after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 16 * 1024;
/// Read size while a message body streams in: fewer reads per message. The
/// buffer goes back to [`READ_CHUNK`] after the message.
const DATA_READ_CHUNK: usize = 64 * 1024;
/// The first seconds of DATA/BDAT content in which `min_data_rate` is not
/// enforced: a client has this long plus one second per `min_data_rate`
/// bytes it sent.
pub const DATA_RATE_GRACE: Duration = Duration::from_secs(10);
/// Bound on reading a PROXY header from a trusted proxy.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// SMTP listener settings.
#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// Our name in the banner, EHLO reply and Received header.
    pub hostname: String,
    /// SIZE limit in bytes, enforced at MAIL (SIZE=) and during DATA/BDAT.
    pub max_message_size: u64,
    /// Recipients per transaction; beyond it `452 4.5.3`.
    pub max_recipients: usize,
    /// Per command read (RFC 5321 4.5.3.2).
    pub command_timeout: Duration,
    /// Per read while receiving message content.
    pub data_timeout: Duration,
    /// Error replies allowed per session before `421 4.7.0` and close.
    pub max_errors: u32,
    /// Concurrent sessions; a permit is taken before `accept()`.
    pub max_connections: usize,
    pub relay: RelayPolicy,
    /// `None`: STARTTLS is not offered.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Ask [`Enqueuer::verify_recipient`] about recipients in local domains
    /// at RCPT time, so unknown users get 550 now instead of a bounce later.
    pub verify_recipients: bool,
    /// Where sessions, replies and received messages are counted.
    pub metrics: SmtpMetrics,
    /// Checks and signing applied to each message before it is queued.
    pub pipeline: Arc<crate::auth::Pipeline>,
    /// `Some` on submission listeners (RFC 6409): AUTH is offered once TLS
    /// is active and required before MAIL; authenticated users may relay.
    pub auth: Option<Arc<Authenticator>>,
    /// How far ahead a submitted message may be held (RFC 4865
    /// FUTURERELEASE, `[api] max_schedule_ahead`); used only with `auth`.
    pub future_release: Option<Duration>,
    /// TLS handshake right after accept (port 465, RFC 8314), before the
    /// greeting; needs `tls`.
    pub implicit_tls: bool,
    /// Whole-session deadline; then `421 4.4.2` and close.
    pub max_session: Duration,
    /// Bytes per second a client must sustain during DATA/BDAT after a
    /// grace of [`DATA_RATE_GRACE`]; 0 turns the check off.
    pub min_data_rate: u64,
    /// Bound on a STARTTLS or implicit TLS handshake.
    pub tls_handshake: Duration,
    /// NOOP, RSET, VRFY, HELP, HELO and EHLO allowed between two queued
    /// messages; beyond it `421 4.7.0` and close.
    pub max_junk_commands: u32,
    /// Concurrent sessions per client address, shared by every listener
    /// that clones this config.
    pub per_ip: Arc<IpLimiter>,
    /// New connections per client address and time, shared likewise; `None`: unlimited.
    pub connection_rate: Option<Arc<ConnectionRate>>,
    /// Node-wide budget of message content held in memory, shared likewise.
    pub memory: Arc<MemoryBudget>,
    /// Trusted proxies: a connection from one must start with a PROXY
    /// header, whose client address then stands for the TCP peer.
    pub proxy_from: Vec<ipnet::IpNet>,
    /// DNS block lists and greylisting at RCPT time; `None`: off.
    pub screen: Option<Arc<super::screen::Screen>>,
}

impl SmtpConfig {
    /// Takes the settings of `config` that a reload changes for new
    /// sessions (docs/operations.md, "Reloading the configuration"); the
    /// listener's TLS, AUTH, permits and shared counters stay.
    pub fn apply(&mut self, config: &crate::config::Config) {
        self.max_recipients = config.max_recipients;
        self.command_timeout = config.command_timeout;
        self.data_timeout = config.data_timeout;
        self.max_errors = config.max_errors;
        self.relay = RelayPolicy {
            local_domains: config.local_domains.clone(),
            relay_domains: config.relay_domains.clone(),
            relay_networks: config.relay_networks.clone(),
        };
        self.verify_recipients = config.verify_recipients;
        self.max_session = config.smtp_limits.max_session;
        self.min_data_rate = config.smtp_limits.min_data_rate;
        self.tls_handshake = config.smtp_limits.tls_handshake;
        self.max_junk_commands = config.smtp_limits.max_junk_commands;
        self.proxy_from.clone_from(&config.smtp_limits.proxy_protocol_from);
    }

    /// `max_connections_per_ip`, for logs.
    fn per_ip_max(&self) -> usize {
        self.per_ip.max()
    }

    /// The protocol part, which every session of the listener shares.
    pub fn session(&self) -> SessionConfig {
        SessionConfig {
            hostname: self.hostname.clone(),
            max_message_size: self.max_message_size,
            max_recipients: self.max_recipients,
            command_timeout: self.command_timeout,
            data_timeout: self.data_timeout,
            max_errors: self.max_errors,
            relay: self.relay.clone(),
            starttls: self.tls.is_some(),
            verify_recipients: self.verify_recipients,
            screen_recipients: self.screen.is_some(),
            submission: self.auth.is_some(),
            future_release: self.future_release,
            // Offered whenever TLS is active (docs/security.md, "REQUIRETLS").
            requiretls: true,
            clock: tern_smtp::policy::unix_now,
            max_junk_commands: self.max_junk_commands,
            memory: Arc::clone(&self.memory) as Arc<dyn tern_smtp::MemoryBudget>,
            limits: Arc::new(self.metrics.clone()),
        }
    }
}

impl LimitObserver for SmtpMetrics {
    fn limited(&self, limit: tern_smtp::Limit) {
        SmtpMetrics::limited(self, limit.into());
    }
}

impl From<tern_smtp::Limit> for Limit {
    fn from(limit: tern_smtp::Limit) -> Limit {
        match limit {
            tern_smtp::Limit::SessionTime => Limit::SessionTime,
            tern_smtp::Limit::DataRate => Limit::DataRate,
            tern_smtp::Limit::JunkCommands => Limit::JunkCommands,
            tern_smtp::Limit::MemoryBudget => Limit::MemoryBudget,
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            hostname: "localhost".to_string(),
            max_message_size: 36_700_160,
            max_recipients: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_errors: 10,
            max_connections: 1000,
            relay: RelayPolicy::default(),
            verify_recipients: false,
            tls: None,
            metrics: SmtpMetrics::default(),
            pipeline: Arc::default(),
            auth: None,
            future_release: None,
            implicit_tls: false,
            max_session: Duration::from_secs(600),
            min_data_rate: 1024,
            tls_handshake: Duration::from_secs(10),
            max_junk_commands: 100,
            per_ip: IpLimiter::new(20),
            connection_rate: None,
            memory: MemoryBudget::new(512 << 20, SmtpMetrics::default()),
            proxy_from: Vec::new(),
            screen: None,
        }
    }
}

/// Where accepted messages go (the replicated queue).
pub trait Enqueuer: Send + Sync + 'static {
    /// A new unique queue id (the server puts it in the Received header and the 250 reply).
    fn next_id(&self) -> String;
    /// Store the message durably; resolves only when it is safe to answer 250.
    fn enqueue(
        &self,
        id: String,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<(), EnqueueError>> + Send;
    /// Like [`Enqueuer::enqueue`], for a message to deliver no earlier than
    /// `not_before` (unix seconds; RFC 4865 future release). A queue that
    /// cannot hold mail refuses rather than deliver early.
    fn enqueue_at(
        &self,
        id: String,
        envelope: Envelope,
        body: Vec<u8>,
        not_before: i64,
    ) -> impl Future<Output = Result<(), EnqueueError>> + Send {
        let _ = (id, envelope, body, not_before);
        async { Err(EnqueueError::Permanent("future release is not supported here".into())) }
    }
    /// Whether a local recipient exists (only asked when
    /// `verify_recipients` is on): `Err` carries the RCPT reply, e.g.
    /// `550 5.1.1` for an unknown user or `450 4.1.1` when unsure.
    fn verify_recipient(&self, address: String) -> impl Future<Output = Result<(), Reply>> + Send {
        let _ = address;
        async { Ok(()) }
    }
    /// The reply that refuses new transactions right now (e.g. `452 4.3.1`
    /// while the disk is full), or `None` when mail is welcome. Asked before
    /// each command, so it must be cheap.
    fn refusal(&self) -> Option<Reply> {
        None
    }
}

/// Runs the accept loop on an already-bound listener until `shutdown` becomes true; then stops accepting,
/// tells idle sessions `421 4.3.2 <hostname> Service shutting down` and closes them, lets sessions that are
/// waiting on an enqueue finish it and reply (then 421), and returns once all sessions ended or after a grace of 10 s.
pub async fn serve<E: Enqueuer>(
    listener: TcpListener,
    config: Arc<SmtpConfig>,
    enqueuer: Arc<E>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_reloadable(listener, Arc::new(ArcSwap::new(config)), enqueuer, shutdown).await
}

/// [`serve`] with settings a config reload may swap: each connection gets
/// those in force when it is accepted and keeps them to its end.
/// `max_connections` is the first config's (the listener's permits).
pub async fn serve_reloadable<E: Enqueuer>(
    listener: TcpListener,
    swap: Arc<ArcSwap<SmtpConfig>>,
    enqueuer: Arc<E>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut config = swap.load_full();
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut acceptor = config.tls.clone().map(TlsAcceptor::from);
    let mut session_config = Arc::new(config.session());
    let mut sessions = JoinSet::new();
    let mut stop = shutdown.clone();
    info!(addr = ?listener.local_addr().ok(), "smtp listening");
    loop {
        // Take the permit first so an overloaded server leaves new
        // connections in the kernel backlog instead of accepting them.
        let permit = tokio::select! {
            biased;
            _ = wait_shutdown(&mut stop) => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // semaphore closed: never happens
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = wait_shutdown(&mut stop) => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let now = swap.load_full();
        if !Arc::ptr_eq(&now, &config) {
            config = now;
            acceptor = config.tls.clone().map(TlsAcceptor::from);
            session_config = Arc::new(config.session());
        }
        let open = config.metrics.session_started();
        let config = config.clone();
        let session_config = session_config.clone();
        let enqueuer = enqueuer.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        sessions.spawn(async move {
            handle_connection(stream, peer, config, session_config, enqueuer, acceptor, shutdown).await;
            drop(open);
            drop(permit);
        });
        while sessions.try_join_next().is_some() {}
    }
    drop(listener);
    info!(sessions = sessions.len(), "smtp shutting down");
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            sessions = sessions.len(),
            "smtp sessions still running after grace period; aborting"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    Ok(())
}

/// Resolves once shutdown is requested; never if the sender is gone.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The connection before and after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Transient state while the handshake owns the socket.
    Gone,
}

impl Conn {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Tls(s) => s.read_buf(buf).await,
            Conn::Gone => Ok(0),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(data).await,
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }
}

/// Writes and clears `out`; a client that does not read for a whole command
/// timeout is dropped.
async fn flush(conn: &mut Conn, out: &mut Vec<u8>, limit: Duration) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = tokio::time::timeout(limit, conn.write_all(out)).await;
    out.clear();
    match r {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let (version, cipher) = tls_parameters(conn);
    TlsInfo { version, cipher }
}

/// Protocol version and cipher suite of a TLS connection, for Received
/// headers and delivery logs (both sides of the MTA use it).
pub(crate) fn tls_parameters(conn: &rustls::CommonState) -> (String, String) {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_string(), |s| format!("{:?}", s.suite()));
    (version, cipher)
}

/// The client's address: the TCP peer, or for a trusted proxy the address
/// its PROXY header names. `None`: a trusted proxy sent no valid header in
/// time; the connection is closed without a reply.
async fn client_address(stream: &mut TcpStream, peer: SocketAddr, config: &SmtpConfig) -> Option<SocketAddr> {
    let tcp_ip = peer.ip().to_canonical();
    if !config.proxy_from.iter().any(|n| n.contains(&tcp_ip)) {
        return Some(peer);
    }
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy::read_header(stream)).await {
        Ok(Ok(ProxyHeader::Proxied { source, destination })) => {
            debug!(proxy = %peer, client = %source, destination = %destination, "smtp proxied connection");
            Some(source)
        }
        Ok(Ok(header)) => {
            debug!(proxy = %peer, ?header, "smtp proxy connection without client address");
            Some(peer)
        }
        Ok(Err(e)) => {
            config.metrics.limited(Limit::ProxyHeader);
            warn!(proxy = %peer, error = %e, "smtp connection from a trusted proxy without a valid PROXY header; closed");
            None
        }
        Err(_) => {
            config.metrics.limited(Limit::ProxyHeader);
            warn!(proxy = %peer, timeout = ?PROXY_HEADER_TIMEOUT, "smtp connection from a trusted proxy sent no PROXY header in time; closed");
            None
        }
    }
}

/// Refuses a connection with `421 4.7.0 <text>` (plain listeners; an
/// implicit-TLS listener just closes).
async fn refuse(mut stream: TcpStream, config: &SmtpConfig, text: &str) {
    if !config.implicit_tls {
        let reply = Reply::new(421, "4.7.0", text);
        config.metrics.reply(reply.code);
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&reply.to_bytes())).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
}

/// Why the session's next read must end.
#[derive(Clone, Copy, Debug)]
enum ReadLimit {
    /// The per-read command or data timeout.
    Timeout,
    /// `max_session_secs`.
    Session,
    /// `min_data_rate`.
    DataRate,
}

async fn handle_connection<E: Enqueuer>(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: Arc<SmtpConfig>,
    session_config: Arc<SessionConfig>,
    enqueuer: Arc<E>,
    acceptor: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = tokio::time::Instant::now();
    let session_deadline = started + config.max_session;
    let _ = stream.set_nodelay(true);
    let Some(peer) = client_address(&mut stream, peer, &config).await else {
        return;
    };
    // Before any other work: no TLS handshake, no greeting.
    if let Some(rate) = &config.connection_rate {
        if !rate.allow(peer.ip(), std::time::Instant::now()) {
            config.metrics.limited(Limit::ConnectionRate);
            info!(peer = %peer, rate = %rate.describe(), "smtp connection refused: connection rate from this address");
            return refuse(stream, &config, "Too many connections from your address, slow down").await;
        }
    }
    let Some(_slot) = config.per_ip.try_acquire(peer.ip()) else {
        config.metrics.limited(Limit::PerIp);
        info!(peer = %peer, limit = config.per_ip_max(), "smtp connection refused: too many connections from this address");
        return refuse(stream, &config, "Too many connections from your address").await;
    };
    // Submission sessions authenticate and are never screened: no lookup.
    let mut screen = config
        .screen
        .as_ref()
        .filter(|_| config.auth.is_none())
        .map(|s| s.client(peer.ip()));
    let ids = enqueuer.clone();
    let mut session = Session::new(session_config, peer, false, Box::new(move || ids.next_id()));
    let write_limit = config.command_timeout;
    let mut conn = Conn::Plain(stream);
    if config.implicit_tls {
        let (Some(acceptor), Conn::Plain(tcp)) = (acceptor.as_ref(), conn) else {
            warn!(peer = %peer, "implicit TLS listener without a TLS config");
            return;
        };
        match tokio::time::timeout(config.tls_handshake, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let info = tls_info(tls.get_ref().1);
                debug!(peer = %peer, version = %info.version, cipher = %info.cipher, "smtp tls");
                session.tls_started(info);
                conn = Conn::Tls(Box::new(tls));
            }
            Ok(Err(e)) => {
                info!(peer = %peer, error = %e, "smtp tls handshake failed");
                return;
            }
            Err(_) => {
                config.metrics.limited(Limit::TlsHandshake);
                info!(peer = %peer, "smtp tls handshake timeout");
                return;
            }
        }
    }
    // Start of the current DATA content (or BDAT transaction, chunks and the
    // commands between them) and the bytes read since.
    let mut data_window: Option<(tokio::time::Instant, u64)> = None;
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    let metrics = &config.metrics;
    // Every reply goes out through here, to be counted by class.
    let put = |r: Reply, out: &mut Vec<u8>| {
        metrics.reply(r.code);
        r.write_to(out);
    };
    debug!(peer = %peer, "smtp connect");
    put(session.greeting(), &mut out);
    let reason = loop {
        session.set_refusal(enqueuer.refusal());
        match session.next(&mut input) {
            Output::Reply(r) => put(r, &mut out),
            Output::NeedInput => {
                if let Err(e) = flush(&mut conn, &mut out, write_limit).await {
                    debug!(peer = %peer, error = %e, "smtp write failed");
                    break "write error";
                }
                if session.in_data() {
                    input.reserve(DATA_READ_CHUNK);
                } else {
                    if input.is_empty() && input.capacity() > READ_CHUNK {
                        input = BytesMut::with_capacity(READ_CHUNK);
                    }
                    input.reserve(READ_CHUNK);
                }
                let now = tokio::time::Instant::now();
                if !session.receiving_content() {
                    data_window = None;
                } else if data_window.is_none() {
                    data_window = Some((now, 0));
                }
                let (until, why) = read_deadline(&config, now + session.read_timeout(), session_deadline, data_window);
                tokio::select! {
                    biased;
                    _ = wait_shutdown(&mut shutdown) => {
                        put(session.shutdown_reply(), &mut out);
                        let _ = flush(&mut conn, &mut out, write_limit).await;
                        break "shutdown";
                    }
                    r = tokio::time::timeout_at(until, conn.read_buf(&mut input)) => match r {
                        Err(_) => {
                            let elapsed = started.elapsed();
                            info!(peer = %peer, in_data = session.in_data(), limit = ?why, ?elapsed, "smtp timeout");
                            let reply = match why {
                                ReadLimit::Timeout => session.timeout_reply(),
                                ReadLimit::Session => session.session_time_reply(),
                                ReadLimit::DataRate => session.data_rate_reply(),
                            };
                            put(reply, &mut out);
                            let _ = flush(&mut conn, &mut out, write_limit).await;
                            break "timeout";
                        }
                        Ok(Ok(0)) => break "client closed",
                        Ok(Ok(n)) => {
                            if let Some((_, bytes)) = data_window.as_mut() {
                                *bytes += n as u64;
                            }
                        }
                        Ok(Err(e)) => {
                            debug!(peer = %peer, error = %e, "smtp read failed");
                            break "read error";
                        }
                    },
                }
            }
            Output::Enqueue {
                id,
                envelope,
                body,
                release_at,
            } => {
                let data_ended = std::time::Instant::now();
                if let Err(e) = flush(&mut conn, &mut out, write_limit).await {
                    debug!(peer = %peer, error = %e, "smtp write failed");
                    break "write error";
                }
                let from = envelope.reverse_path.clone();
                let rcpts = envelope.recipients.len();
                let size = body.len();
                let result = match (config.pipeline.process(&envelope, body).await, release_at) {
                    (Ok(body), None) => enqueuer.enqueue(id.clone(), envelope, body).await,
                    (Ok(body), Some(at)) => enqueuer.enqueue_at(id.clone(), envelope, body, at).await,
                    (Err(reply), _) => Err(EnqueueError::Rejected(reply)),
                };
                match &result {
                    Ok(()) => {
                        metrics.message_received(size);
                        info!(peer = %peer, id = %id, from = %from, rcpts, size, release_at, "queued")
                    }
                    Err(e) => warn!(peer = %peer, id = %id, error = %e, "enqueue failed"),
                }
                let reply = session.enqueue_result(result);
                metrics.queueing_time(data_ended.elapsed().as_secs_f64());
                metrics.transaction_reply(reply.code);
                put(reply, &mut out);
                if *shutdown.borrow() {
                    put(session.shutdown_reply(), &mut out);
                    let _ = flush(&mut conn, &mut out, write_limit).await;
                    break "shutdown";
                }
            }
            Output::Verify { address } => {
                let verdict = enqueuer.verify_recipient(address).await;
                session.verify_result(verdict);
            }
            Output::Screen {
                reverse_path,
                address,
                verify,
            } => {
                let verify = verify.then(|| enqueuer.verify_recipient(address.clone()));
                let verdict = match screen.as_mut() {
                    Some(s) => s.recipient(&reverse_path, &address, verify).await,
                    None => match verify {
                        Some(v) => v.await,
                        None => Ok(()),
                    },
                };
                session.verify_result(verdict);
            }
            Output::Authenticate {
                mechanism,
                username,
                password,
            } => {
                let verdict = match &config.auth {
                    Some(auth) => auth.authenticate(peer.ip(), mechanism, username, password).await,
                    None => AuthVerdict::Unavailable,
                };
                session.auth_result(verdict.into());
            }
            Output::StartTls => {
                if let Err(e) = flush(&mut conn, &mut out, write_limit).await {
                    debug!(peer = %peer, error = %e, "smtp write failed");
                    break "write error";
                }
                let (Some(acceptor), Conn::Plain(tcp)) = (acceptor.as_ref(), std::mem::replace(&mut conn, Conn::Gone))
                else {
                    break "STARTTLS without TLS config";
                };
                match tokio::time::timeout(config.tls_handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let info = tls_info(tls.get_ref().1);
                        debug!(peer = %peer, version = %info.version, cipher = %info.cipher, "smtp tls");
                        session.tls_started(info);
                        conn = Conn::Tls(Box::new(tls));
                    }
                    Ok(Err(e)) => {
                        info!(peer = %peer, error = %e, "smtp tls handshake failed");
                        break "tls handshake failed";
                    }
                    Err(_) => {
                        config.metrics.limited(Limit::TlsHandshake);
                        break "tls handshake timeout";
                    }
                }
            }
            Output::Close => {
                let _ = flush(&mut conn, &mut out, write_limit).await;
                break "closed";
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.shutdown()).await;
    debug!(peer = %peer, reason, "smtp disconnect");
}

/// When the next read must end and why: the per-read timeout, the session
/// deadline, or, during DATA/BDAT content, the time by which a client
/// keeping `min_data_rate` would have sent more than it has
/// ([`DATA_RATE_GRACE`] plus one second per `min_data_rate` bytes).
fn read_deadline(
    config: &SmtpConfig,
    per_read: tokio::time::Instant,
    session: tokio::time::Instant,
    data_window: Option<(tokio::time::Instant, u64)>,
) -> (tokio::time::Instant, ReadLimit) {
    let mut limit = (per_read, ReadLimit::Timeout);
    if session < limit.0 {
        limit = (session, ReadLimit::Session);
    }
    if let (Some((start, bytes)), rate) = (data_window, config.min_data_rate) {
        let earned = Duration::from_millis(bytes.saturating_mul(1000) / rate.max(1));
        match start.checked_add(DATA_RATE_GRACE.saturating_add(earned)) {
            Some(slow) if rate > 0 && slow < limit.0 => limit = (slow, ReadLimit::DataRate),
            _ => {}
        }
    }
    limit
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, BufReader};
    use tokio::task::JoinHandle;

    const DEADLINE: Duration = Duration::from_secs(10);
    /// Client deadline in paused-clock tests, far beyond the server timeouts.
    const LONG: Duration = Duration::from_secs(100_000);

    /// In-memory queue; optionally holds each enqueue until released.
    #[derive(Default)]
    struct MemQueue {
        n: AtomicU64,
        msgs: Mutex<Vec<(String, Envelope, Vec<u8>)>>,
        hold: Option<Arc<Semaphore>>,
        entered: tokio::sync::Notify,
    }

    impl Enqueuer for MemQueue {
        fn next_id(&self) -> String {
            format!("T{}", self.n.fetch_add(1, Ordering::SeqCst) + 1)
        }

        async fn enqueue(&self, id: String, envelope: Envelope, body: Vec<u8>) -> Result<(), EnqueueError> {
            self.entered.notify_one();
            if let Some(hold) = &self.hold {
                let _permit = hold.acquire().await.unwrap();
            }
            self.msgs.lock().unwrap().push((id, envelope, body));
            Ok(())
        }
    }

    fn config() -> SmtpConfig {
        SmtpConfig {
            hostname: "mx.test".into(),
            relay: RelayPolicy {
                local_domains: vec!["example.test".into()],
                ..RelayPolicy::default()
            },
            ..SmtpConfig::default()
        }
    }

    async fn start(cfg: SmtpConfig, q: Arc<MemQueue>) -> (SocketAddr, watch::Sender<bool>, JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(cfg), q, rx));
        (addr, tx, task)
    }

    /// Reads one complete (possibly multi-line) reply; "" on EOF.
    async fn reply<R: AsyncBufRead + Unpin>(r: &mut R) -> String {
        reply_within(r, DEADLINE).await
    }

    /// As `reply`; paused-clock tests need a deadline beyond the server's timeouts.
    async fn reply_within<R: AsyncBufRead + Unpin>(r: &mut R, deadline: Duration) -> String {
        let read = async {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    return all;
                }
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        };
        tokio::time::timeout(deadline, read).await.expect("reply deadline")
    }

    async fn send<S: AsyncWrite + Unpin>(s: &mut S, data: &str) {
        s.write_all(data.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
    }

    async fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
        BufReader::new(TcpStream::connect(addr).await.unwrap())
    }

    #[tokio::test]
    async fn plain_transaction_over_socket() {
        let q = Arc::new(MemQueue::default());
        let metrics = crate::metrics::Metrics::new();
        let (addr, stop, task) = start(
            SmtpConfig {
                metrics: metrics.smtp.clone(),
                ..config()
            },
            q.clone(),
        )
        .await;
        let mut c = connect(addr).await;
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        // Whole transaction pipelined in one write.
        send(
            c.get_mut(),
            "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
        )
        .await;
        let ehlo = reply(&mut c).await;
        assert!(
            ehlo.contains("250-PIPELINING\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(reply(&mut c).await, "250 2.1.0 Sender ok\r\n");
        assert_eq!(reply(&mut c).await, "250 2.1.5 Recipient ok\r\n");
        assert!(reply(&mut c).await.starts_with("354 "));
        send(c.get_mut(), "Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n").await;
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok: queued as T1\r\n");
        assert_eq!(reply(&mut c).await, "221 2.0.0 Bye\r\n");
        assert_eq!(reply(&mut c).await, "");
        {
            let msgs = q.msgs.lock().unwrap();
            let body = String::from_utf8(msgs[0].2.clone()).unwrap();
            assert!(body
                .starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Tern) with ESMTP id T1\r\n"));
            assert!(body.ends_with("\r\nSubject: x\r\n\r\n.dot\r\n"));
            assert_eq!(msgs[0].1.client_ip, "127.0.0.1");
        }
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let text = metrics.encode(1, &crate::raft::groups::Groups::default(), dir.path());
        let size = q.msgs.lock().unwrap()[0].2.len();
        for line in [
            "tern_smtp_sessions_total 1".to_string(),
            "tern_smtp_sessions_open 0".to_string(),
            // 220 greeting, EHLO, MAIL, RCPT, queued, 221.
            "tern_smtp_replies_total{class=\"2xx\"} 6".to_string(),
            "tern_smtp_replies_total{class=\"3xx\"} 1".to_string(),
            "tern_smtp_transaction_replies_total{class=\"2xx\"} 1".to_string(),
            "tern_smtp_messages_received_total 1".to_string(),
            format!("tern_smtp_received_bytes_total {size}"),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[derive(Debug)]
    struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &rustls::pki_types::CertificateDer<'_>,
            _intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _server_name: &rustls::pki_types::ServerName<'_>,
            _ocsp: &[u8],
            _now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// Self-signed certificate made with the openssl CLI.
    fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-days",
                "1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl CLI");
        assert!(status.success());
        let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(&cert).unwrap()))
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(&key).unwrap()))
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    #[tokio::test]
    async fn starttls_discards_pipelined_plaintext() {
        let (server_tls, client_tls) = tls_configs();
        let q = Arc::new(MemQueue::default());
        let (addr, stop, task) = start(
            SmtpConfig {
                tls: Some(server_tls),
                ..config()
            },
            q.clone(),
        )
        .await;
        let mut c = connect(addr).await;
        reply(&mut c).await;
        send(c.get_mut(), "EHLO client.test\r\n").await;
        assert!(reply(&mut c).await.contains("250-STARTTLS\r\n"));
        // The injected EHLO must not survive into the TLS session.
        send(c.get_mut(), "STARTTLS\r\nEHLO injected.test\r\n").await;
        assert_eq!(reply(&mut c).await, "220 2.0.0 Ready to start TLS\r\n");
        assert!(c.buffer().is_empty());
        let tcp = c.into_inner();
        let connector = tokio_rustls::TlsConnector::from(client_tls);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        let mut c = BufReader::new(tls);
        send(c.get_mut(), "NOOP\r\n").await;
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok\r\n");
        send(c.get_mut(), "MAIL FROM:<a@client.test>\r\n").await;
        assert_eq!(reply(&mut c).await, "503 5.5.1 Error: send HELO/EHLO first\r\n");
        send(c.get_mut(), "EHLO client.test\r\n").await;
        let ehlo = reply(&mut c).await;
        assert!(
            ehlo.starts_with("250-mx.test\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        send(c.get_mut(), "STARTTLS\r\n").await;
        assert_eq!(reply(&mut c).await, "503 5.5.1 Error: TLS already active\r\n");
        send(
            c.get_mut(),
            "MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        )
        .await;
        assert_eq!(reply(&mut c).await, "250 2.1.0 Sender ok\r\n");
        assert_eq!(reply(&mut c).await, "250 2.1.5 Recipient ok\r\n");
        assert!(reply(&mut c).await.starts_with("354 "));
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok: queued as T1\r\n");
        assert_eq!(reply(&mut c).await, "221 2.0.0 Bye\r\n");
        {
            let msgs = q.msgs.lock().unwrap();
            let body = String::from_utf8(msgs[0].2.clone()).unwrap();
            assert!(
                body.contains("with ESMTPS id T1\r\n\t(using TLSv1.3 with cipher TLS13_"),
                "{body}"
            );
            assert!(body.ends_with("\r\nhi\r\n"));
        }
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn implicit_tls_submission_with_auth() {
        use base64::Engine as _;
        let (server_tls, client_tls) = tls_configs();
        let hash = crate::submission::hash_password(b"pw").unwrap();
        let store = crate::submission::UserStore::from_text(&format!("u@example.test:{hash}\n")).unwrap();
        let auth = crate::submission::Authenticator::new(store, 5, Duration::from_secs(60), SmtpMetrics::default());
        let q = Arc::new(MemQueue::default());
        let (addr, stop, task) = start(
            SmtpConfig {
                tls: Some(server_tls),
                auth: Some(Arc::new(auth)),
                implicit_tls: true,
                ..config()
            },
            q.clone(),
        )
        .await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_tls);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        let mut c = BufReader::new(tls);
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        send(c.get_mut(), "EHLO client.test\r\nMAIL FROM:<u@example.test>\r\n").await;
        let ehlo = reply(&mut c).await;
        assert!(
            ehlo.contains("250-AUTH PLAIN LOGIN\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(reply(&mut c).await, "530 5.7.0 Authentication required\r\n");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        send(c.get_mut(), &format!("AUTH PLAIN {}\r\n", b64("\0u@example.test\0bad"))).await;
        assert_eq!(reply(&mut c).await, "535 5.7.8 Authentication credentials invalid\r\n");
        send(c.get_mut(), &format!("AUTH PLAIN {}\r\n", b64("\0U@example.test\0pw"))).await;
        assert_eq!(reply(&mut c).await, "235 2.7.0 Authentication successful\r\n");
        send(
            c.get_mut(),
            "MAIL FROM:<u@example.test>\r\nRCPT TO:<far@elsewhere.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        )
        .await;
        assert_eq!(reply(&mut c).await, "250 2.1.0 Sender ok\r\n");
        assert_eq!(reply(&mut c).await, "250 2.1.5 Recipient ok\r\n");
        assert!(reply(&mut c).await.starts_with("354 "));
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok: queued as T1\r\n");
        {
            let msgs = q.msgs.lock().unwrap();
            assert_eq!(msgs[0].1.auth_user.as_deref(), Some("u@example.test"));
            let body = String::from_utf8(msgs[0].2.clone()).unwrap();
            assert!(body.contains("with ESMTPSA id T1\r\n\t(using TLSv1.3"), "{body}");
        }
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn tls_handshake_failure_closes() {
        let (server_tls, _) = tls_configs();
        let (addr, stop, task) = start(
            SmtpConfig {
                tls: Some(server_tls),
                ..config()
            },
            Arc::new(MemQueue::default()),
        )
        .await;
        let mut c = connect(addr).await;
        reply(&mut c).await;
        send(c.get_mut(), "STARTTLS\r\n").await;
        assert_eq!(reply(&mut c).await, "220 2.0.0 Ready to start TLS\r\n");
        send(c.get_mut(), "this is not a ClientHello\r\n").await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest)).await.unwrap();
        // Either an alert and EOF or a reset; never an SMTP reply.
        assert!(n.is_err() || !String::from_utf8_lossy(&rest).contains("250"));
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_and_finishes_enqueue() {
        let hold = Arc::new(Semaphore::new(0));
        let q = Arc::new(MemQueue {
            hold: Some(hold.clone()),
            ..MemQueue::default()
        });
        let (addr, stop, task) = start(config(), q.clone()).await;
        let mut idle = connect(addr).await;
        reply(&mut idle).await;
        send(idle.get_mut(), "EHLO idle.test\r\n").await;
        reply(&mut idle).await;

        let mut busy = connect(addr).await;
        reply(&mut busy).await;
        send(
            busy.get_mut(),
            "HELO busy.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n",
        )
        .await;
        for _ in 0..4 {
            reply(&mut busy).await;
        }
        tokio::time::timeout(DEADLINE, q.entered.notified()).await.unwrap();

        stop.send(true).unwrap();
        assert_eq!(reply(&mut idle).await, "421 4.3.2 mx.test Service shutting down\r\n");
        assert_eq!(reply(&mut idle).await, "");
        assert!(!task.is_finished());

        hold.add_permits(1);
        assert_eq!(reply(&mut busy).await, "250 2.0.0 Ok: queued as T1\r\n");
        assert_eq!(reply(&mut busy).await, "421 4.3.2 mx.test Service shutting down\r\n");
        assert_eq!(reply(&mut busy).await, "");
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
        assert_eq!(q.msgs.lock().unwrap().len(), 1);
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn connection_limit_defers_accept() {
        let (addr, stop, task) = start(
            SmtpConfig {
                max_connections: 1,
                ..config()
            },
            Arc::new(MemQueue::default()),
        )
        .await;
        let mut first = connect(addr).await;
        reply(&mut first).await;
        // The kernel completes the handshake, but we do not accept or greet.
        let mut second = connect(addr).await;
        let mut line = String::new();
        let early = tokio::time::timeout(Duration::from_millis(300), second.read_line(&mut line)).await;
        assert!(early.is_err(), "second connection greeted early: {line}");
        send(first.get_mut(), "QUIT\r\n").await;
        assert_eq!(reply(&mut first).await, "221 2.0.0 Bye\r\n");
        assert_eq!(reply(&mut second).await, "220 mx.test ESMTP Tern\r\n");
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn command_timeout() {
        let (addr, _stop, _task) = start(
            SmtpConfig {
                command_timeout: Duration::from_secs(300),
                ..config()
            },
            Arc::new(MemQueue::default()),
        )
        .await;
        let mut c = connect(addr).await;
        let start = tokio::time::Instant::now();
        let read = async {
            assert_eq!(reply_within(&mut c, LONG).await, "220 mx.test ESMTP Tern\r\n");
            assert_eq!(
                reply_within(&mut c, LONG).await,
                "421 4.4.2 mx.test Error: timeout exceeded\r\n"
            );
            assert_eq!(reply_within(&mut c, LONG).await, "");
        };
        tokio::time::timeout(LONG, read).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn data_timeout() {
        let q = Arc::new(MemQueue::default());
        let (addr, _stop, _task) = start(
            SmtpConfig {
                command_timeout: Duration::from_secs(3000),
                data_timeout: Duration::from_secs(180),
                min_data_rate: 0,
                ..config()
            },
            q.clone(),
        )
        .await;
        let mut c = connect(addr).await;
        let start = tokio::time::Instant::now();
        let read = async {
            reply_within(&mut c, LONG).await;
            send(
                c.get_mut(),
                "HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\npartial",
            )
            .await;
            for _ in 0..4 {
                reply_within(&mut c, LONG).await;
            }
            assert_eq!(
                reply_within(&mut c, LONG).await,
                "421 4.4.2 mx.test Error: timeout exceeded\r\n"
            );
        };
        tokio::time::timeout(LONG, read).await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(180) && waited < Duration::from_secs(3000),
            "{waited:?}"
        );
        assert!(q.msgs.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn per_ip_limit_spans_listeners() {
        let cfg = Arc::new(SmtpConfig {
            per_ip: IpLimiter::new(2),
            ..config()
        });
        let q = Arc::new(MemQueue::default());
        let mut addrs = Vec::new();
        let (tx, rx) = watch::channel(false);
        for _ in 0..2 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            tokio::spawn(serve(listener, Arc::clone(&cfg), q.clone(), rx.clone()));
        }
        let mut a = connect(addrs[0]).await;
        assert_eq!(reply(&mut a).await, "220 mx.test ESMTP Tern\r\n");
        let mut b = connect(addrs[1]).await;
        assert_eq!(reply(&mut b).await, "220 mx.test ESMTP Tern\r\n");
        for addr in &addrs {
            let mut c = connect(*addr).await;
            assert_eq!(
                reply(&mut c).await,
                "421 4.7.0 Too many connections from your address\r\n"
            );
            assert_eq!(reply(&mut c).await, "");
        }
        send(a.get_mut(), "QUIT\r\n").await;
        assert_eq!(reply(&mut a).await, "221 2.0.0 Bye\r\n");
        assert_eq!(reply(&mut a).await, "");
        // The slot is free once the session has ended.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while cfg.per_ip.open("127.0.0.1".parse().unwrap()) > 1 {
            assert!(tokio::time::Instant::now() < deadline, "slot not given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut c = connect(addrs[1]).await;
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        tx.send(true).unwrap();
    }

    #[tokio::test]
    async fn connection_rate_per_address() {
        let (addr, stop, task) = start(
            SmtpConfig {
                connection_rate: Some(ConnectionRate::new(2, Duration::from_secs(3600))),
                ..config()
            },
            Arc::new(MemQueue::default()),
        )
        .await;
        for _ in 0..2 {
            let mut c = connect(addr).await;
            assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        }
        let mut c = connect(addr).await;
        assert_eq!(
            reply(&mut c).await,
            "421 4.7.0 Too many connections from your address, slow down\r\n"
        );
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    fn proxied_config(from: &str) -> SmtpConfig {
        SmtpConfig {
            proxy_from: vec![from.parse().unwrap()],
            relay: RelayPolicy {
                local_domains: vec!["example.test".into()],
                relay_domains: vec![],
                relay_networks: vec!["192.0.2.0/24".parse().unwrap()],
            },
            ..config()
        }
    }

    #[tokio::test]
    async fn proxy_header_from_a_trusted_proxy_names_the_client() {
        let q = Arc::new(MemQueue::default());
        let (addr, stop, task) = start(proxied_config("127.0.0.0/8"), q.clone()).await;
        // v1: a client in relay_networks may relay.
        let mut c = connect(addr).await;
        send(c.get_mut(), "PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n").await;
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        send(
            c.get_mut(),
            "HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        )
        .await;
        for _ in 0..4 {
            reply(&mut c).await;
        }
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok: queued as T1\r\n");
        // v2 with IPv6: not in relay_networks, so no relaying.
        let mut c = connect(addr).await;
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
        h.extend_from_slice(&"2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        h.extend_from_slice(&[0x9c, 0x40, 0, 25]);
        c.get_mut().write_all(&h).await.unwrap();
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        send(
            c.get_mut(),
            "HELO c6.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@far.test>\r\n",
        )
        .await;
        reply(&mut c).await;
        reply(&mut c).await;
        assert_eq!(reply(&mut c).await, "554 5.7.1 <x@far.test>: Relay access denied\r\n");
        {
            let msgs = q.msgs.lock().unwrap();
            assert_eq!(msgs[0].1.client_ip, "192.0.2.7");
            let body = String::from_utf8(msgs[0].2.clone()).unwrap();
            assert!(body.starts_with("Received: from c.test ([192.0.2.7])"), "{body}");
        }
        // Without a header the trusted proxy's connection is closed unanswered.
        let mut c = connect(addr).await;
        send(c.get_mut(), "EHLO direct.test\r\n").await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest)).await.unwrap();
        // EOF or a reset (unread input), never a reply.
        assert!(n.is_err() || rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    /// On an implicit-TLS listener the header comes before the ClientHello,
    /// which must reach the handshake intact.
    #[tokio::test]
    async fn proxy_header_before_implicit_tls() {
        let (server_tls, client_tls) = tls_configs();
        let q = Arc::new(MemQueue::default());
        let (addr, stop, task) = start(
            SmtpConfig {
                tls: Some(server_tls),
                implicit_tls: true,
                ..proxied_config("127.0.0.0/8")
            },
            q.clone(),
        )
        .await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x07\x7f\x00\x00\x01\x9c\x40\x01\xd1")
            .await
            .unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_tls);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        let mut c = BufReader::new(tls);
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        send(
            c.get_mut(),
            "HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\nhi\r\n.\r\n",
        )
        .await;
        for _ in 0..4 {
            reply(&mut c).await;
        }
        assert_eq!(reply(&mut c).await, "250 2.0.0 Ok: queued as T1\r\n");
        assert_eq!(q.msgs.lock().unwrap()[0].1.client_ip, "192.0.2.7");
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn proxy_header_from_an_untrusted_peer_is_a_bad_command() {
        let q = Arc::new(MemQueue::default());
        let (addr, stop, task) = start(proxied_config("192.0.2.0/24"), q.clone()).await;
        let mut c = connect(addr).await;
        assert_eq!(reply(&mut c).await, "220 mx.test ESMTP Tern\r\n");
        send(c.get_mut(), "PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n").await;
        assert!(reply(&mut c).await.starts_with("500 5.5."));
        send(
            c.get_mut(),
            "HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<x@far.test>\r\n",
        )
        .await;
        reply(&mut c).await;
        reply(&mut c).await;
        assert_eq!(reply(&mut c).await, "554 5.7.1 <x@far.test>: Relay access denied\r\n");
        stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn slow_data_is_cut_off_after_the_grace() {
        let q = Arc::new(MemQueue::default());
        let (addr, _stop, _task) = start(
            SmtpConfig {
                min_data_rate: 1024,
                ..config()
            },
            q.clone(),
        )
        .await;
        let mut c = connect(addr).await;
        let start = tokio::time::Instant::now();
        let read = async {
            reply_within(&mut c, LONG).await;
            send(
                c.get_mut(),
                "HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
            )
            .await;
            for _ in 0..4 {
                reply_within(&mut c, LONG).await;
            }
            // 2 KiB at once earns two seconds beyond the grace; then a trickle.
            send(c.get_mut(), &"x".repeat(2046)).await;
            send(c.get_mut(), "\r\n").await;
            loop {
                tokio::select! {
                    r = reply_within(&mut c, LONG) => return r,
                    () = tokio::time::sleep(Duration::from_secs(1)) => send(c.get_mut(), "y").await,
                }
            }
        };
        let r = tokio::time::timeout(LONG, read).await.unwrap();
        assert_eq!(r, "421 4.4.2 mx.test Error: data transfer rate too low\r\n");
        let waited = start.elapsed();
        assert!(
            waited >= DATA_RATE_GRACE + Duration::from_secs(1) && waited < Duration::from_secs(15),
            "{waited:?}"
        );
        assert!(q.msgs.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn session_deadline_ends_a_session_after_its_mail() {
        let q = Arc::new(MemQueue::default());
        let (addr, _stop, _task) = start(
            SmtpConfig {
                max_session: Duration::from_secs(60),
                ..config()
            },
            q.clone(),
        )
        .await;
        let mut c = connect(addr).await;
        let start = tokio::time::Instant::now();
        let read = async {
            reply_within(&mut c, LONG).await;
            send(
                c.get_mut(),
                "HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\n",
            )
            .await;
            for _ in 0..4 {
                reply_within(&mut c, LONG).await;
            }
            assert_eq!(reply_within(&mut c, LONG).await, "250 2.0.0 Ok: queued as T1\r\n");
            // Busy, but never done: NOOP every 20 s, well within the command timeout.
            loop {
                send(c.get_mut(), "NOOP\r\n").await;
                let r = reply_within(&mut c, LONG).await;
                if r != "250 2.0.0 Ok\r\n" {
                    return r;
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        };
        let r = tokio::time::timeout(LONG, read).await.unwrap();
        assert_eq!(r, "421 4.4.2 mx.test Error: session time limit exceeded\r\n");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
        assert_eq!(q.msgs.lock().unwrap().len(), 1, "the message accepted before is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn tls_handshake_is_bounded() {
        let (server_tls, _) = tls_configs();
        let (addr, _stop, _task) = start(
            SmtpConfig {
                tls: Some(server_tls),
                implicit_tls: true,
                tls_handshake: Duration::from_secs(10),
                ..config()
            },
            Arc::new(MemQueue::default()),
        )
        .await;
        let mut c = connect(addr).await;
        let start = tokio::time::Instant::now();
        // Half a ClientHello record header, then nothing.
        c.get_mut().write_all(&[0x16, 0x03]).await.unwrap();
        assert_eq!(reply_within(&mut c, LONG).await, "");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(300),
            "{waited:?}"
        );
    }
}
