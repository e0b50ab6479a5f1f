//! Outbound SMTP/LMTP client: one [`Connection`] to a next hop (an MX over
//! TCP, or an LMTP server over TCP or a Unix socket) that sends any number of
//! transactions in a row.
//!
//! The protocol details (reply parsing, capabilities, command building,
//! dot-stuffing) live in [`tern_smtp::client`]; this module owns the
//! socket, the RFC 5321 4.5.3.2 timeouts, STARTTLS via tokio-rustls, and
//! the order of commands: PIPELINING (RFC 2920) for MAIL and RCPT, DATA or
//! a single `BDAT LAST` chunk (RFC 3030), and LMTP's per-recipient replies
//! after the content (RFC 2033).
//!
//! Choices worth knowing:
//! - 8-bit content (`BODY=8BITMIME`, or any byte >= 0x80 in the message)
//!   to a peer without 8BITMIME is not sent: RFC 6152 §3 lets a relay only
//!   convert or refuse, and converting would break DKIM signatures, so it
//!   fails with `554 5.6.3` (the sender gets a bounce). BINARYMIME content
//!   cannot be sent to a peer without BINARYMIME+CHUNKING: `554 5.6.3`.
//! - A message flagged SMTPUTF8 to a peer without SMTPUTF8 fails with
//!   `553 5.6.7` before anything is sent (no downgrade).
//! - DATA is only sent after the RCPT replies are in, so there is never a
//!   DATA to cancel when every recipient was refused.
//! - TLS follows the destination's [`TlsPolicy`] (Postfix's security
//!   levels): opportunistic and `encrypt` accept any certificate
//!   ([`ClientConfig::insecure_tls`]); `verify` checks the chain and the
//!   names with the policy's own rustls config (built in [`super::tls`]),
//!   and a failed check is a temporary failure of that host, never a
//!   fallback to an unverified or clear-text session.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::envelope::Notify;
pub use crate::envelope::{BodyType, Ret};
pub use tern_smtp::client::RcptOutcome;
use tern_smtp::client::{self as proto, Capabilities, MailParams, MalformedReply, Reply, ReplyReader};
use tern_smtp::transaction::{Cmd, RcptSpec, Transaction};

/// Size of each content write; each gets `data_block_timeout`.
const WRITE_BLOCK: usize = 64 * 1024;
/// How long QUIT may take.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

/// STARTTLS use (RFC 3207); the `[[tls_policy]]` levels none, may,
/// encrypt and verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never send STARTTLS.
    Disabled,
    /// STARTTLS when offered; a refused STARTTLS continues in the clear, a
    /// failed handshake is [`ConnectError::TlsFailed`] (the caller may retry
    /// with `Disabled`).
    Opportunistic,
    /// No TLS, no mail: [`ConnectError::Temporary`] otherwise. Any
    /// certificate is accepted.
    Required,
    /// TLS required and the certificate verified: chain to a trusted root,
    /// and a name from the policy (or the host connected to).
    Verify(Arc<Verification>),
}

impl TlsPolicy {
    /// TLS is a must: no clear text, no fallback.
    pub fn is_required(&self) -> bool {
        matches!(self, TlsPolicy::Required | TlsPolicy::Verify(_))
    }

    /// Part of a delivery site's key, so that destinations with different
    /// policies never share a connection.
    pub fn tag(&self) -> String {
        match self {
            TlsPolicy::Disabled => "+notls".into(),
            TlsPolicy::Opportunistic => String::new(),
            TlsPolicy::Required => "+tls".into(),
            TlsPolicy::Verify(v) if v.names.is_empty() => "+verify".into(),
            TlsPolicy::Verify(v) => format!("+verify={}", v.names.join(",")),
        }
    }
}

/// How a `verify` destination's certificate is checked.
pub struct Verification {
    /// Expected names (`.example.com` matches subdomains); empty: the host
    /// name connected to.
    pub names: Vec<String>,
    /// rustls settings whose verifier checks the chain and `names`.
    pub config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verification")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Verification {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for Verification {}

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp {
        /// MX host name, for SNI and logs.
        host: String,
        addr: SocketAddr,
    },
    /// LMTP over a Unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, addr } => write!(f, "{host}[{}]", addr.ip()),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Client settings; the timeouts are those of RFC 5321 4.5.3.2.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our name in EHLO/LHLO (an egress source's `ehlo`, else `helo_name`).
    pub helo_name: String,
    /// The egress source's local address to bind before connecting
    /// (`[[source]] address`); `None`: the system picks it.
    pub bind: Option<IpAddr>,
    pub connect_timeout: Duration,
    /// Waiting for the 220 banner.
    pub greeting_timeout: Duration,
    /// Reply to EHLO, STARTTLS (and the handshake), MAIL, RCPT, RSET.
    pub command_timeout: Duration,
    /// Reply to DATA (the 354).
    pub data_init_timeout: Duration,
    /// Each write of message content.
    pub data_block_timeout: Duration,
    /// Reply (LMTP: each reply) to the end of the content.
    pub data_term_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            helo_name: "localhost".to_string(),
            bind: None,
            connect_timeout: Duration::from_secs(30),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            data_init_timeout: Duration::from_secs(120),
            data_block_timeout: Duration::from_secs(180),
            data_term_timeout: Duration::from_secs(600),
            tls: ClientConfig::insecure_tls(),
        }
    }
}

impl ClientConfig {
    /// TLS settings that accept any server certificate (signatures in the
    /// handshake are still checked), with the ring provider: opportunistic
    /// TLS as MTAs do it, where a failed verification would only push the
    /// mail back to plaintext.
    pub fn insecure_tls() -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        Arc::new(config)
    }
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One recipient of an outbound transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecipient {
    pub address: String,
    pub notify: Notify,
    /// Decoded `addr-type;addr`, as in [`crate::envelope::Recipient`].
    pub orcpt: Option<String>,
}

/// One message to send.
#[derive(Clone, Debug)]
pub struct OutMessage<'a> {
    /// Without brackets; empty for `<>`.
    pub reverse_path: &'a str,
    pub recipients: &'a [OutRecipient],
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<&'a str>,
    /// Header and body with CRLF line ends, not dot-stuffed.
    pub body: &'a [u8],
    /// Asked just before the end of data; `false` abandons the transaction.
    pub fence: Option<&'a dyn super::fence::Fence>,
}

/// Result of one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionResult {
    /// One per recipient, in the order of [`OutMessage::recipients`].
    pub outcomes: Vec<RcptOutcome>,
    /// The next hop offered DSN, so NOTIFY/ORCPT/RET/ENVID went along and
    /// it is now responsible for success/delay notifications.
    pub dsn_relayed: bool,
}

/// Why [`Connection::connect`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Try again later (or another MX): I/O error, timeout, 4xx greeting or
    /// EHLO, TLS required but not available.
    #[error("{0}")]
    Temporary(String),
    /// 5xx greeting, HELO or LHLO.
    #[error("{0}")]
    Permanent(String),
    /// Opportunistic STARTTLS: the handshake failed and the connection was
    /// dropped. The caller may reconnect with [`TlsPolicy::Disabled`].
    #[error("{0}")]
    TlsFailed(String),
}

/// A transaction could not be completed; the connection is closed. The
/// caller treats every recipient as deferred with this text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Timeout(String),
    /// The server said 421 (service closing): the reply text.
    #[error("{0}")]
    ServiceClosing(String),
    /// Malformed or unexpected reply.
    #[error("{0}")]
    Protocol(String),
    /// The connection already failed before.
    #[error("connection to {0} is no longer usable")]
    Unusable(String),
    /// The fence said no before the end of data; the connection was dropped
    /// so the peer discards the message.
    #[error("{}", super::fence::FENCED_REPLY)]
    Fenced,
}

impl SessionError {
    pub fn is_421(&self) -> bool {
        matches!(self, SessionError::ServiceClosing(_))
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, SessionError::Timeout(_))
    }
}

/// A TCP connection to `addr`, from `bind` (port chosen by the system) when
/// given: an egress source's address, which must be of `addr`'s family.
async fn tcp_connect(addr: std::net::SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect(addr).await;
    };
    let socket = match (local, addr) {
        (IpAddr::V4(_), std::net::SocketAddr::V4(_)) => tokio::net::TcpSocket::new_v4()?,
        (IpAddr::V6(_), std::net::SocketAddr::V6(_)) => tokio::net::TcpSocket::new_v6()?,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("source address {local} cannot reach {addr} (other address family)"),
            ))
        }
    };
    socket
        .bind(std::net::SocketAddr::new(local, 0))
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind source address {local}: {e}")))?;
    socket.connect(addr).await
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An established session, greeted and EHLO'd (and TLS'd if so decided).
pub struct Connection {
    io: Box<dyn Io>,
    input: BytesMut,
    reader: ReplyReader,
    caps: Capabilities,
    protocol: Protocol,
    /// For logs and error texts: `mx.example.test[192.0.2.1]`.
    peer: String,
    host: String,
    ip: Option<IpAddr>,
    tls: Option<String>,
    config: ClientConfig,
    /// A transaction was left open (MAIL accepted, no final reply).
    needs_rset: bool,
    /// After an I/O error, timeout, 421 or garbage nothing more is sent.
    broken: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("protocol", &self.protocol)
            .field("tls", &self.tls)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects, reads the greeting, says EHLO (HELO after a 5xx EHLO) or
    /// LHLO, and runs STARTTLS according to `tls`.
    pub async fn connect(
        endpoint: &Endpoint,
        protocol: Protocol,
        tls: TlsPolicy,
        config: &ClientConfig,
    ) -> Result<Connection, ConnectError> {
        let peer = endpoint.to_string();
        let temp = |what: String| ConnectError::Temporary(what);
        let (io, host, ip): (Box<dyn Io>, String, Option<IpAddr>) = match endpoint {
            Endpoint::Tcp { host, addr } => {
                let s = tokio::time::timeout(config.connect_timeout, tcp_connect(*addr, config.bind))
                    .await
                    .map_err(|_| temp(format!("connect to {peer}: timed out")))?
                    .map_err(|e| temp(format!("connect to {peer}: {e}")))?;
                let _ = s.set_nodelay(true);
                (Box::new(s), host.clone(), Some(addr.ip()))
            }
            Endpoint::Unix(path) => {
                let s = tokio::time::timeout(config.connect_timeout, UnixStream::connect(path))
                    .await
                    .map_err(|_| temp(format!("connect to {peer}: timed out")))?
                    .map_err(|e| temp(format!("connect to {peer}: {e}")))?;
                (Box::new(s), path.display().to_string(), None)
            }
        };
        let mut conn = Connection {
            io,
            input: BytesMut::with_capacity(READ_CHUNK),
            reader: ReplyReader::new(),
            caps: Capabilities::default(),
            protocol,
            peer,
            host,
            ip,
            tls: None,
            config: config.clone(),
            needs_rset: false,
            broken: false,
        };
        let greeting = conn
            .read_reply(config.greeting_timeout, "greeting")
            .await
            .map_err(|e| temp(e.to_string()))?;
        match greeting.code / 100 {
            2 => {}
            5 => {
                conn.quit_quietly().await;
                return Err(ConnectError::Permanent(conn.refused("greeting", &greeting)));
            }
            _ => {
                // A 421 greeting closes the connection (RFC 5321 3.8); others get a QUIT.
                if greeting.code != 421 {
                    conn.quit_quietly().await;
                }
                return Err(temp(conn.refused("greeting", &greeting)));
            }
        }
        conn.hello().await?;
        match (&tls, conn.caps.has("STARTTLS")) {
            (TlsPolicy::Disabled, _) | (TlsPolicy::Opportunistic, false) => {}
            (TlsPolicy::Required | TlsPolicy::Verify(_), false) => {
                conn.quit_quietly().await;
                return Err(temp(format!("TLS required but {} does not offer STARTTLS", conn.peer)));
            }
            (_, true) => conn.starttls(&tls).await?,
        }
        debug!(
            peer = %conn.peer,
            tls = conn.tls.as_deref().unwrap_or("none"),
            pipelining = conn.caps.has("PIPELINING"),
            "connected"
        );
        Ok(conn)
    }

    /// EHLO/LHLO (HELO after a 5xx EHLO) and the capabilities.
    async fn hello(&mut self) -> Result<(), ConnectError> {
        let lmtp = self.protocol == Protocol::Lmtp;
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        let name = self.config.helo_name.clone();
        let reply = self
            .command(&proto::ehlo(&name, lmtp), self.config.command_timeout, verb)
            .await
            .map_err(|e| ConnectError::Temporary(e.to_string()))?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.code / 100 == 5 && !lmtp {
            debug!(peer = %self.peer, reply = %reply, "EHLO refused, trying HELO");
            let reply = self
                .command(&proto::helo(&name), self.config.command_timeout, "HELO")
                .await
                .map_err(|e| ConnectError::Temporary(e.to_string()))?;
            if reply.is_positive() {
                self.caps = Capabilities::default();
                return Ok(());
            }
            return Err(self.hello_refused("HELO", &reply).await);
        }
        Err(self.hello_refused(verb, &reply).await)
    }

    async fn hello_refused(&mut self, verb: &str, reply: &Reply) -> ConnectError {
        if reply.code != 421 {
            self.quit_quietly().await;
        }
        let text = self.refused(verb, reply);
        if reply.code / 100 == 5 {
            ConnectError::Permanent(text)
        } else {
            ConnectError::Temporary(text)
        }
    }

    async fn starttls(&mut self, policy: &TlsPolicy) -> Result<(), ConnectError> {
        let required = policy.is_required();
        let reply = self
            .command(b"STARTTLS\r\n", self.config.command_timeout, "STARTTLS")
            .await
            .map_err(|e| ConnectError::Temporary(e.to_string()))?;
        if !reply.is_positive() {
            if required || reply.code == 421 {
                self.quit_quietly().await;
                return Err(ConnectError::Temporary(self.refused("STARTTLS", &reply)));
            }
            // RFC 3207 4: the client may go on without TLS.
            info!(peer = %self.peer, reply = %reply, "STARTTLS refused, continuing without TLS");
            return Ok(());
        }
        if !self.input.is_empty() {
            // Anything the server sent after its 220 came in the clear and
            // could be injected (cf. CVE-2011-0411); do not trust it.
            let n = self.input.len();
            self.broken = true;
            return Err(ConnectError::Temporary(format!(
                "{} sent {n} unexpected octets after STARTTLS reply",
                self.peer
            )));
        }
        let name = match ServerName::try_from(self.host.clone()) {
            Ok(n) => n,
            Err(_) => match self.ip {
                Some(ip) => ServerName::from(ip),
                None => ServerName::try_from("localhost").map_err(|e| ConnectError::Temporary(e.to_string()))?,
            },
        };
        let connector = TlsConnector::from(match policy {
            TlsPolicy::Verify(v) => Arc::clone(&v.config),
            _ => self.config.tls.clone(),
        });
        // Swap in a dummy so the handshake can own the plain stream.
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let fail = |what: String| {
            if required {
                ConnectError::Temporary(what)
            } else {
                ConnectError::TlsFailed(what)
            }
        };
        let stream = match tokio::time::timeout(self.config.command_timeout, connector.connect(name, plain)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.broken = true;
                if let Some(reason) = verification_failure(&e) {
                    warn!(peer = %self.peer, host = %self.host, reason, "TLS verification failed");
                    return Err(ConnectError::Temporary(format!(
                        "TLS verification failed for {}: {reason}",
                        self.host
                    )));
                }
                warn!(peer = %self.peer, error = %e, "TLS handshake failed");
                return Err(fail(format!("TLS handshake with {} failed: {e}", self.peer)));
            }
            Err(_) => {
                self.broken = true;
                warn!(peer = %self.peer, "TLS handshake timed out");
                return Err(fail(format!("TLS handshake with {} timed out", self.peer)));
            }
        };
        let info = tls_description(stream.get_ref().1);
        debug!(peer = %self.peer, tls = %info, "TLS established");
        self.tls = Some(info);
        self.io = Box::new(stream);
        self.reader = ReplyReader::new();
        // RFC 3207 4.2: forget everything learnt before, EHLO again.
        self.caps = Capabilities::default();
        self.hello().await
    }

    /// Sends one message. Returns one outcome per recipient; `Err` when the
    /// connection failed before any recipient was delivered (the caller
    /// defers them all). If an LMTP server fails midway through its
    /// per-recipient replies, the recipients already answered keep their
    /// outcome, the rest are deferred with the error text, and the
    /// connection is closed ([`Connection::is_usable`] turns false).
    pub async fn send(&mut self, msg: &OutMessage<'_>) -> Result<TransactionResult, SessionError> {
        self.check_usable()?;
        let dsn = self.caps.has("DSN");
        let n = msg.recipients.len();
        let result = |outcomes| TransactionResult {
            outcomes,
            dsn_relayed: dsn,
        };
        if n == 0 {
            return Ok(result(Vec::new()));
        }
        if let Some(reply) = self.refuse_locally(msg) {
            debug!(peer = %self.peer, reply = %reply, "message not sent");
            return Ok(TransactionResult {
                outcomes: vec![RcptOutcome::from_reply(&reply); n],
                dsn_relayed: false,
            });
        }
        self.reset_if_needed().await?;

        let params = MailParams {
            size: self.caps.has("SIZE").then_some(msg.body.len() as u64),
            body: match msg.body_type {
                BodyType::SevenBit => None,
                BodyType::EightBitMime => self.caps.has("8BITMIME").then_some(BodyType::EightBitMime),
                BodyType::BinaryMime => Some(BodyType::BinaryMime),
            },
            smtputf8: msg.smtputf8,
            ret: if dsn { msg.ret } else { None },
            envid: if dsn { msg.envid } else { None },
            requiretls: self.protocol == Protocol::Smtp && super::requiretls::required(msg.body),
        };
        let rcpts: Vec<RcptSpec<'_>> = msg
            .recipients
            .iter()
            .map(|r| RcptSpec {
                address: &r.address,
                notify: &r.notify,
                orcpt: r.orcpt.as_deref(),
            })
            .collect();
        let mut tx = Transaction::new(msg.reverse_path, &params, &rcpts, dsn, self.protocol == Protocol::Lmtp);
        self.envelope(&mut tx).await?;
        if !tx.mail_refused() {
            self.needs_rset = true;
        }
        if let Some(outcomes) = tx.after_envelope() {
            if !tx.mail_refused() {
                debug!(peer = %self.peer, "no recipient accepted");
            }
            return Ok(result(outcomes));
        }

        // The last byte of data (or the final ".") is held back until the
        // fence agrees: without it the peer cannot take the message.
        let chunking = self.caps.has("CHUNKING");
        if chunking {
            if msg.body.is_empty() {
                self.fence(msg).await?;
            }
            let cmd = format!("BDAT {} LAST\r\n", msg.body.len());
            self.write(cmd.as_bytes(), self.config.command_timeout, "BDAT").await?;
            if let Some((last, content)) = msg.body.split_last() {
                self.write_content(content).await?;
                self.fence(msg).await?;
                self.write_content(std::slice::from_ref(last)).await?;
            }
        } else {
            let reply = self.command(b"DATA\r\n", self.config.data_init_timeout, "DATA").await?;
            if reply.code != 354 {
                debug!(peer = %self.peer, reply = %reply, "DATA refused");
                return Ok(result(tx.data_refused(&reply)));
            }
            let stuffed = proto::dot_stuff(msg.body);
            let (content, end) = stuffed.split_at(stuffed.len().saturating_sub(3));
            self.write_content(content).await?;
            self.fence(msg).await?;
            self.write_content(end).await?;
        }

        // After the content: one reply (SMTP) or one per accepted recipient (LMTP).
        let stage = if chunking { "end of BDAT" } else { "end of DATA" };
        for _ in 0..tx.content_replies() {
            let reply = match self.read_reply(self.config.data_term_timeout, stage).await {
                Ok(r) if r.code == 421 => Err(self.closing(&r)),
                other => other,
            };
            match reply {
                Ok(r) => tx.content_reply(&r),
                Err(e) => match tx.content_failed(&e.to_string()) {
                    // LMTP failed midway: deliveries so far stand, the rest is deferred.
                    Some(outcomes) => {
                        warn!(peer = %self.peer, error = %e, answered = tx.answered(), "LMTP failed after partial replies");
                        return Ok(result(outcomes));
                    }
                    None => return Err(e),
                },
            }
        }
        let (outcomes, all_ok) = tx.finish();
        // A refused transaction may leave state behind at some servers.
        self.needs_rset = !all_ok;
        debug!(
            peer = %self.peer,
            rcpts = n,
            delivered = outcomes.iter().filter(|o| o.is_delivered()).count(),
            size = msg.body.len(),
            "transaction done"
        );
        Ok(result(outcomes))
    }

    /// Asks the message's fence; on "no" the connection becomes unusable
    /// (the caller drops it, and the peer discards the unfinished data).
    async fn fence(&mut self, msg: &OutMessage<'_>) -> Result<(), SessionError> {
        match msg.fence {
            Some(f) if !f.holds().await => {
                self.broken = true;
                info!(peer = %self.peer, "leadership not confirmed before the end of data; transaction abandoned");
                Err(SessionError::Fenced)
            }
            _ => Ok(()),
        }
    }

    /// `MAIL FROM:<reverse_path>`, `RCPT TO:<rcpt>`, `RSET`: does the next hop
    /// accept this recipient right now? (LMTP verification at RCPT time.)
    pub async fn verify_recipient(&mut self, reverse_path: &str, rcpt: &str) -> Result<RcptOutcome, SessionError> {
        self.check_usable()?;
        if !proto::valid_path(reverse_path) || !proto::valid_path(rcpt) {
            return Ok(RcptOutcome::from_reply(&Reply::synthetic(
                553,
                "5.1.3",
                "Invalid address syntax",
            )));
        }
        self.reset_if_needed().await?;
        let utf8 = !(reverse_path.is_ascii() && rcpt.is_ascii()) && self.caps.has("SMTPUTF8");
        let params = MailParams {
            smtputf8: utf8,
            ..MailParams::default()
        };
        let notify = Notify::default();
        let spec = RcptSpec {
            address: rcpt,
            notify: &notify,
            orcpt: None,
        };
        let mut tx = Transaction::new(reverse_path, &params, &[spec], false, false);
        let reply = self.envelope(&mut tx).await?;
        if tx.mail_refused() {
            // MAIL refused: its reply is the answer.
            if let Some(outcome) = tx.after_envelope().and_then(|o| o.into_iter().next()) {
                return Ok(outcome);
            }
        }
        self.needs_rset = true;
        let Some(reply) = reply else {
            return Err(SessionError::Protocol(format!("no RCPT reply from {}", self.peer)));
        };
        let outcome = RcptOutcome::from_reply(&reply);
        // The answer is known; a failing RSET only costs the connection.
        if let Err(e) = self.reset_if_needed().await {
            debug!(peer = %self.peer, error = %e, "RSET after verification failed");
        }
        Ok(outcome)
    }

    /// QUIT and close; errors are of no interest any more.
    pub async fn quit(mut self) {
        self.quit_quietly().await;
    }

    pub fn tls_active(&self) -> bool {
        self.tls.is_some()
    }

    /// Protocol version and cipher, e.g. `TLSv1.3 TLS13_AES_256_GCM_SHA384`.
    pub fn tls_info(&self) -> Option<String> {
        self.tls.clone()
    }

    /// The MX host name (or socket path) connected to.
    pub fn remote_host(&self) -> &str {
        &self.host
    }

    pub fn remote_ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// Whether the last EHLO/LHLO reply listed this extension (case-insensitive).
    pub fn offers(&self, ext: &str) -> bool {
        self.caps.has(ext)
    }

    /// False once the connection failed; then it can only be dropped.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// After an idle wait: false (and unusable from then on) when the peer
    /// closed the connection or sent something unasked, such as a 421
    /// before closing, so that the next transaction opens a new connection
    /// instead of failing on this one.
    pub fn still_open(&mut self) -> bool {
        if self.broken || !self.input.is_empty() {
            self.broken = true;
            return false;
        }
        self.input.reserve(READ_CHUNK);
        // Nothing to read is the only good answer: an idle peer says nothing.
        if futures::FutureExt::now_or_never(self.io.read_buf(&mut self.input)).is_some() {
            self.broken = true;
            debug!(peer = %self.peer, "cached connection closed by the peer");
            return false;
        }
        true
    }

    /// Replies for which we do not even start a transaction.
    fn refuse_locally(&self, msg: &OutMessage<'_>) -> Option<Reply> {
        // LMTP is final delivery: REQUIRETLS governs relaying only.
        if self.protocol == Protocol::Smtp
            && super::requiretls::required(msg.body)
            && !(self.tls.is_some() && self.caps.has("REQUIRETLS"))
        {
            return Some(super::requiretls::unsupported(&self.peer));
        }
        if msg.smtputf8 && !self.caps.has("SMTPUTF8") {
            return Some(Reply::synthetic(
                553,
                "5.6.7",
                format!(
                    "Message needs SMTPUTF8, SMTPUTF8 not supported by next hop {}",
                    self.peer
                ),
            ));
        }
        if msg.body_type == BodyType::BinaryMime && !(self.caps.has("BINARYMIME") && self.caps.has("CHUNKING")) {
            return Some(Reply::synthetic(
                554,
                "5.6.3",
                format!("Binary content not supported by next hop {}", self.peer),
            ));
        }
        if !self.caps.has("8BITMIME")
            && (msg.body_type == BodyType::EightBitMime || msg.body.iter().any(|&b| b >= 0x80))
        {
            return Some(Reply::synthetic(
                554,
                "5.6.3",
                format!(
                    "Conversion required but not supported: 8-bit message, 8BITMIME not supported by next hop {}",
                    self.peer
                ),
            ));
        }
        if let Some(limit) = self.caps.size_limit().filter(|&l| msg.body.len() as u64 > l) {
            return Some(Reply::synthetic(
                552,
                "5.3.4",
                format!(
                    "Message size {} exceeds the limit of {limit} of next hop {}",
                    msg.body.len(),
                    self.peer
                ),
            ));
        }
        if !proto::valid_path(msg.reverse_path) {
            return Some(Reply::synthetic(553, "5.1.7", "Invalid sender address syntax"));
        }
        None
    }

    /// Sends the envelope commands (in batches when the peer pipelines)
    /// and hands their replies to `tx`; stops after the batch in which MAIL
    /// was refused. A `421` ends the session. Returns the last RCPT reply
    /// (the answer a verification wants).
    async fn envelope(&mut self, tx: &mut Transaction) -> Result<Option<Reply>, SessionError> {
        let cmds = tx.take_envelope();
        let limit = self.config.command_timeout;
        let mut last_rcpt = None;
        for group in cmds.chunks(Transaction::batch(self.caps.has("PIPELINING"))) {
            let out: Vec<u8> = group.iter().flat_map(|(_, c)| c.iter().copied()).collect();
            self.write(&out, limit, "MAIL/RCPT").await?;
            for &(cmd, _) in group {
                let reply = self.read_reply(limit, cmd.stage()).await?;
                if reply.code == 421 {
                    return Err(self.closing(&reply));
                }
                if !reply.is_positive() && !tx.mail_refused() {
                    match cmd {
                        Cmd::Mail => debug!(peer = %self.peer, reply = %reply, "MAIL refused"),
                        Cmd::Rcpt(i) => debug!(peer = %self.peer, rcpt = i, reply = %reply, "RCPT refused"),
                    }
                }
                tx.envelope_reply(cmd, &reply);
                if let Cmd::Rcpt(_) = cmd {
                    last_rcpt = Some(reply);
                }
            }
            if tx.mail_refused() {
                break;
            }
        }
        Ok(last_rcpt)
    }

    /// RSET if an earlier transaction was left open.
    async fn reset_if_needed(&mut self) -> Result<(), SessionError> {
        if !self.needs_rset {
            return Ok(());
        }
        let reply = self.command(b"RSET\r\n", self.config.command_timeout, "RSET").await?;
        if reply.code == 421 {
            return Err(self.closing(&reply));
        }
        if !reply.is_positive() {
            self.broken = true;
            return Err(SessionError::Protocol(self.refused("RSET", &reply)));
        }
        self.needs_rset = false;
        Ok(())
    }

    /// Writes message content in blocks, each within `data_block_timeout`.
    async fn write_content(&mut self, data: &[u8]) -> Result<(), SessionError> {
        for block in data.chunks(WRITE_BLOCK) {
            self.write(block, self.config.data_block_timeout, "message content")
                .await?;
        }
        Ok(())
    }

    /// Writes a command, reads its reply.
    async fn command(&mut self, cmd: &[u8], limit: Duration, stage: &str) -> Result<Reply, SessionError> {
        self.write(cmd, self.config.command_timeout, stage).await?;
        self.read_reply(limit, stage).await
    }

    async fn write(&mut self, data: &[u8], limit: Duration, stage: &str) -> Result<(), SessionError> {
        self.check_usable()?;
        let io = &mut self.io;
        let r = tokio::time::timeout(limit, async {
            io.write_all(data).await?;
            // TLS buffers records until flushed.
            io.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(SessionError::Io(format!(
                    "lost connection with {} while sending {stage}: {e}",
                    self.peer
                )))
            }
            Err(_) => {
                self.broken = true;
                Err(SessionError::Timeout(format!(
                    "timeout sending {stage} to {}",
                    self.peer
                )))
            }
        }
    }

    /// Reads one whole reply within `limit`.
    async fn read_reply(&mut self, limit: Duration, stage: &str) -> Result<Reply, SessionError> {
        self.check_usable()?;
        let deadline = Instant::now() + limit;
        loop {
            match self.reader.next(&mut self.input) {
                Ok(Some(reply)) => {
                    debug!(peer = %self.peer, stage, reply = %reply, "reply");
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(MalformedReply(what)) => {
                    self.broken = true;
                    return Err(SessionError::Protocol(format!(
                        "malformed reply from {} to {stage}: {what}",
                        self.peer
                    )));
                }
            }
            self.input.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.input)).await {
                Ok(Ok(0)) => {
                    self.broken = true;
                    return Err(SessionError::Io(format!(
                        "connection closed by {} while waiting for reply to {stage}",
                        self.peer
                    )));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.broken = true;
                    return Err(SessionError::Io(format!(
                        "lost connection with {} while waiting for reply to {stage}: {e}",
                        self.peer
                    )));
                }
                Err(_) => {
                    self.broken = true;
                    return Err(SessionError::Timeout(format!(
                        "timeout waiting for reply to {stage} from {}",
                        self.peer
                    )));
                }
            }
        }
    }

    /// A 421 (RFC 5321 3.8): the server is closing the connection.
    fn closing(&mut self, reply: &Reply) -> SessionError {
        self.broken = true;
        SessionError::ServiceClosing(format!("{} said: {}", self.peer, reply.one_line()))
    }

    fn refused(&self, stage: &str, reply: &Reply) -> String {
        format!("{} refused {stage}: {}", self.peer, reply.one_line())
    }

    fn check_usable(&self) -> Result<(), SessionError> {
        if self.broken {
            return Err(SessionError::Unusable(self.peer.clone()));
        }
        Ok(())
    }

    async fn quit_quietly(&mut self) {
        if !self.broken {
            let limit = self.config.command_timeout.min(QUIT_TIMEOUT);
            let _ = self.command(b"QUIT\r\n", limit, "QUIT").await;
        }
        self.broken = true;
        let _ = tokio::time::timeout(QUIT_TIMEOUT, self.io.shutdown()).await;
    }
}

fn tls_description(conn: &rustls::ClientConnection) -> String {
    let (version, cipher) = crate::smtp::server::tls_parameters(conn);
    format!("{version} {cipher}")
}

/// If a TLS handshake error is a failed certificate check, what failed, in
/// words for a deferral reason.
pub fn verification_failure(e: &std::io::Error) -> Option<String> {
    let rustls::Error::InvalidCertificate(c) = e.get_ref()?.downcast_ref::<rustls::Error>()? else {
        return None;
    };
    Some(
        match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "certificate name mismatch"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "certificate not yet valid",
            CertificateError::UnknownIssuer => "certificate not signed by a trusted root",
            CertificateError::BadSignature => "bad certificate signature",
            CertificateError::Revoked => "certificate revoked",
            CertificateError::BadEncoding => "malformed certificate",
            CertificateError::Other(o) if matches!(o.0.downcast_ref(), Some(webpki::Error::CaUsedAsEndEntity)) => {
                "self-signed certificate (a CA certificate presented as the server's)"
            }
            CertificateError::Other(o) if o.0.downcast_ref::<TlsaMismatch>().is_some() => {
                return Some(TlsaMismatch.to_string())
            }
            other => return Some(format!("certificate rejected: {other}")),
        }
        .to_string(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tern_testkit::peers::{self as testpeers, Aiosmtpd, Dovecot, SmtpSink};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    /// Upper bound for anything a test waits on.
    const DEADLINE: Duration = Duration::from_secs(30);

    fn config() -> ClientConfig {
        ClientConfig {
            helo_name: "client.tern.test".into(),
            ..ClientConfig::default()
        }
    }

    fn tcp(addr: SocketAddr) -> Endpoint {
        Endpoint::Tcp {
            host: "mx.example.test".into(),
            addr,
        }
    }

    fn rcpts(addrs: &[&str]) -> Vec<OutRecipient> {
        addrs
            .iter()
            .map(|a| OutRecipient {
                address: a.to_string(),
                notify: Notify::default(),
                orcpt: None,
            })
            .collect()
    }

    fn message<'a>(rcpts: &'a [OutRecipient], body: &'a [u8]) -> OutMessage<'a> {
        OutMessage {
            reverse_path: "sender@tern.test",
            recipients: rcpts,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            body,
            fence: None,
        }
    }

    /// An egress source's address is bound before connecting; one of the
    /// other family is refused with a reason, not tried.
    #[tokio::test]
    async fn a_source_address_is_bound_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn, accepted) = tokio::join!(
            tokio::time::timeout(DEADLINE, tcp_connect(addr, Some("127.0.0.2".parse().unwrap()))),
            tokio::time::timeout(DEADLINE, listener.accept()),
        );
        let conn = conn.unwrap().unwrap();
        let (_, peer) = accepted.unwrap().unwrap();
        assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(conn.local_addr().unwrap().ip(), peer.ip());
        let e = tcp_connect(addr, Some("::1".parse().unwrap())).await.unwrap_err();
        assert!(e.to_string().contains("other address family"), "{e}");
        let e = tcp_connect(addr, Some("192.0.2.77".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bind source address 192.0.2.77"), "{e}");
    }

    const BODY: &[u8] = b"From: sender@tern.test\r\nSubject: test\r\n\r\nHello.\r\n";

    async fn connect(ep: &Endpoint, protocol: Protocol, tls: TlsPolicy) -> Result<Connection, ConnectError> {
        tokio::time::timeout(DEADLINE, Connection::connect(ep, protocol, tls, &config()))
            .await
            .expect("connect deadline")
    }

    async fn send(c: &mut Connection, msg: &OutMessage<'_>) -> Result<TransactionResult, SessionError> {
        tokio::time::timeout(DEADLINE, c.send(msg))
            .await
            .expect("send deadline")
    }

    fn all_delivered(r: &TransactionResult) -> bool {
        r.outcomes.iter().all(RcptOutcome::is_delivered)
    }

    fn sink_available() -> bool {
        testpeers::require(testpeers::SMTP_SINK)
    }

    #[tokio::test]
    async fn sink_three_recipients_pipelined_then_second_message() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&[]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        assert!(c.offers("pipelining") && c.offers("DSN") && !c.tls_active());
        assert_eq!(c.remote_host(), "mx.example.test");
        assert_eq!(c.remote_ip(), Some(IpAddr::from([127, 0, 0, 1])));
        let to = rcpts(&["a@example.test", "b@example.test", "c@example.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert_eq!(r.outcomes.len(), 3);
        assert!(all_delivered(&r), "{r:?}");
        assert!(r.outcomes[0].reply().starts_with("250 2.0.0"), "{r:?}");
        let dumps = sink.wait_dumps(1);
        assert_eq!(dumps.len(), 1, "one transaction");
        assert_eq!(dumps[0].matches("X-Rcpt-Args: <").count(), 3, "{}", dumps[0]);
        assert!(dumps[0].contains("X-Rcpt-Args: <c@example.test>\n"), "{}", dumps[0]);
        assert!(dumps[0].contains("X-Helo-Args: client.tern.test"), "{}", dumps[0]);

        // Same connection, another message.
        let to2 = rcpts(&["d@example.test"]);
        let r = send(&mut c, &message(&to2, b"Subject: two\r\n\r\nsecond\r\n"))
            .await
            .unwrap();
        assert!(all_delivered(&r));
        let dumps = sink.wait_dumps(2);
        assert!(dumps
            .iter()
            .any(|d| d.contains("<d@example.test>") && d.contains("second")));
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_without_pipelining_goes_lock_step() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-p"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        assert!(!c.offers("PIPELINING"));
        let to = rcpts(&["a@example.test", "b@example.test", "c@example.test"]);
        for _ in 0..2 {
            let r = send(&mut c, &message(&to, BODY)).await.unwrap();
            assert!(all_delivered(&r), "{r:?}");
        }
        assert_eq!(sink.wait_dumps(2).len(), 2);
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_rcpt_4xx_is_deferred_and_connection_reusable() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-r", "RCPT"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@example.test", "b@example.test"]);
        for _ in 0..2 {
            // The second round needs the RSET for the transaction left open.
            let r = send(&mut c, &message(&to, BODY)).await.unwrap();
            for o in &r.outcomes {
                assert_eq!(
                    o,
                    &RcptOutcome::Deferred {
                        reply: "450 4.3.0 Error: command failed".into()
                    }
                );
            }
        }
        // smtp-sink opens a dump at MAIL; no content may have reached it.
        for d in testpeers::files_in(&sink.dumps_dir()) {
            let d = std::fs::read_to_string(d).unwrap();
            assert!(!d.contains("Hello."), "{d}");
        }
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_rcpt_5xx_is_failed() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-f", "RCPT"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@example.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert_eq!(
            r.outcomes,
            vec![RcptOutcome::Failed {
                reply: "500 5.3.0 Error: command failed".into()
            }]
        );
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_mail_5xx_fails_everybody() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-f", "MAIL"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@example.test", "b@example.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert!(
            r.outcomes.iter().all(|o| matches!(o, RcptOutcome::Failed { .. })),
            "{r:?}"
        );
        assert!(c.is_usable());
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_421_at_rcpt_is_session_error() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-Q", "RCPT"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@example.test", "b@example.test"]);
        let e = send(&mut c, &message(&to, BODY)).await.unwrap_err();
        assert!(e.is_421(), "{e:?}");
        assert!(e.to_string().contains("421"), "{e}");
        assert!(!c.is_usable());
        assert!(matches!(
            send(&mut c, &message(&to, BODY)).await,
            Err(SessionError::Unusable(_))
        ));
    }

    #[tokio::test]
    async fn sink_disconnect_after_dot_is_session_error() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-q", "."]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let e = send(&mut c, &message(&rcpts(&["a@example.test"]), BODY))
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Io(_)), "{e:?}");
    }

    fn dsn_recipients() -> Vec<OutRecipient> {
        vec![
            OutRecipient {
                address: "a@example.test".into(),
                notify: Notify {
                    given: true,
                    success: true,
                    failure: true,
                    ..Notify::default()
                },
                orcpt: Some("rfc822;a+tag@example.test".into()),
            },
            OutRecipient {
                address: "b@example.test".into(),
                notify: Notify {
                    given: true,
                    never: true,
                    ..Notify::default()
                },
                orcpt: None,
            },
        ]
    }

    #[tokio::test]
    async fn sink_dsn_parameters_passed_when_offered() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&[]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = dsn_recipients();
        let msg = OutMessage {
            ret: Some(Ret::Hdrs),
            envid: Some("Q123 x=y"),
            body_type: BodyType::EightBitMime,
            ..message(&to, "Subject: caf\u{e9}\r\n\r\n8bit\r\n".as_bytes())
        };
        let r = send(&mut c, &msg).await.unwrap();
        assert!(all_delivered(&r) && r.dsn_relayed, "{r:?}");
        let d = &sink.wait_dumps(1)[0];
        assert!(
            d.contains("X-Mail-Args: <sender@tern.test> BODY=8BITMIME RET=HDRS ENVID=Q123+20x+3Dy\n"),
            "{d}"
        );
        assert!(
            d.contains("X-Rcpt-Args: <a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Btag@example.test\n"),
            "{d}"
        );
        assert!(d.contains("X-Rcpt-Args: <b@example.test> NOTIFY=NEVER\n"), "{d}");
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_dsn_parameters_dropped_when_not_offered() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-N"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        assert!(!c.offers("DSN"));
        let to = dsn_recipients();
        let msg = OutMessage {
            ret: Some(Ret::Full),
            envid: Some("Q123"),
            ..message(&to, BODY)
        };
        let r = send(&mut c, &msg).await.unwrap();
        assert!(all_delivered(&r) && !r.dsn_relayed, "{r:?}");
        let d = &sink.wait_dumps(1)[0];
        assert!(d.contains("X-Mail-Args: <sender@tern.test>\n"), "{d}");
        assert!(d.contains("X-Rcpt-Args: <a@example.test>\n"), "{d}");
        assert!(
            !d.contains("NOTIFY") && !d.contains("ORCPT") && !d.contains("ENVID"),
            "{d}"
        );
        c.quit().await;
    }

    /// RFC 6152: 8-bit content is neither sent to nor converted for a hop
    /// without 8BITMIME (smtp-sink -8 does not offer it); 7-bit mail still goes.
    #[tokio::test]
    async fn sink_8bit_refused_without_8bitmime() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-8"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        assert!(!c.offers("8BITMIME"));
        let to = rcpts(&["a@example.test"]);
        let eight_bit = "Subject: caf\u{e9}\r\n\r\n8bit\r\n".as_bytes();
        // Declared 8BITMIME (the sender's word counts even for a 7-bit
        // body), and undeclared 8-bit bytes: all refused.
        let declared = |body| OutMessage {
            body_type: BodyType::EightBitMime,
            ..message(&to, body)
        };
        for msg in [declared(eight_bit), declared(BODY), message(&to, eight_bit)] {
            let r = send(&mut c, &msg).await.unwrap();
            assert!(
                matches!(&r.outcomes[..], [RcptOutcome::Failed { reply }] if reply.starts_with("554 5.6.3 ") && reply.contains("8BITMIME not supported by next hop")),
                "{r:?}"
            );
        }
        // Nothing was sent; plain 7-bit mail still goes on this connection.
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert!(all_delivered(&r), "{r:?}");
        let dumps = sink.wait_dumps(1);
        assert_eq!(dumps.len(), 1);
        assert!(!dumps[0].contains("caf"), "{}", dumps[0]);
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_tls_required_but_not_offered() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&[]);
        let e = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Required)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Temporary(t) if t.contains("STARTTLS")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn sink_smtputf8_refused_locally() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&[]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["j\u{f6}rg@example.test", "b@example.test"]);
        let msg = OutMessage {
            smtputf8: true,
            ..message(&to, BODY)
        };
        let r = send(&mut c, &msg).await.unwrap();
        for o in &r.outcomes {
            assert!(
                matches!(o, RcptOutcome::Failed { reply } if reply.starts_with("553 5.6.7 ") && reply.contains("SMTPUTF8 not supported by next hop")),
                "{o:?}"
            );
        }
        // Nothing was sent; the connection is fine for the next message.
        let ascii = rcpts(&["b@example.test"]);
        assert!(all_delivered(&send(&mut c, &message(&ascii, BODY)).await.unwrap()));
        let dumps = sink.wait_dumps(1);
        assert_eq!(dumps.len(), 1);
        assert!(!dumps[0].contains("SMTPUTF8"));
        c.quit().await;
    }

    #[tokio::test]
    async fn sink_lmtp_per_recipient_replies_with_data() {
        if !sink_available() {
            return;
        }
        let sink = SmtpSink::start(&["-L"]);
        let mut c = connect(&tcp(sink.peer.addr), Protocol::Lmtp, TlsPolicy::Disabled)
            .await
            .unwrap();
        assert!(!c.offers("CHUNKING"));
        let to = rcpts(&["a@example.test", "b@example.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert!(all_delivered(&r) && r.outcomes.len() == 2, "{r:?}");
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert!(all_delivered(&r), "{r:?}");
        assert!(sink.wait_dumps(2)[0].contains("X-Client-Proto: LMTP"));
        c.quit().await;
    }

    #[tokio::test]
    async fn aiosmtpd_starttls_opportunistic_and_dot_stuffing() {
        if !Aiosmtpd::available() {
            return;
        }
        let peer = Aiosmtpd::start(true, false);
        let mut c = connect(&tcp(peer.peer.addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        assert!(c.tls_active());
        let info = c.tls_info().unwrap();
        assert!(info.starts_with("TLSv1.") && info.contains("TLS"), "{info}");
        assert!(!c.offers("STARTTLS"), "capabilities are those of the second EHLO");
        let to = rcpts(&["bob@example.test"]);
        let body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nend\r\n";
        let r = send(&mut c, &message(&to, body)).await.unwrap();
        assert!(all_delivered(&r), "{r:?}");
        let got = String::from_utf8(peer.wait_messages(1).remove(0)).unwrap();
        // Maildir stores LF line ends.
        assert!(got.contains("\n.\n..two\n.leading\nend\n"), "{got}");
        c.quit().await;
    }

    #[tokio::test]
    async fn aiosmtpd_tls_required_and_smtputf8() {
        if !Aiosmtpd::available() {
            return;
        }
        let peer = Aiosmtpd::start(true, true);
        let mut c = connect(&tcp(peer.peer.addr), Protocol::Smtp, TlsPolicy::Required)
            .await
            .unwrap();
        assert!(c.tls_active() && c.offers("SMTPUTF8"));
        let to = rcpts(&["j\u{f6}rg@example.test"]);
        let msg = OutMessage {
            smtputf8: true,
            body_type: BodyType::EightBitMime,
            ..message(&to, "Subject: gr\u{fc}\u{df}e\r\n\r\nhi\r\n".as_bytes())
        };
        let r = send(&mut c, &msg).await.unwrap();
        assert!(all_delivered(&r), "{r:?}");
        let got = String::from_utf8_lossy(&peer.wait_messages(1)[0]).into_owned();
        // The Mailbox handler RFC 2047-encodes the recipient: j\u{f6}rg@example.test.
        assert!(
            got.contains("asO2cmdAZXhhbXBsZS50ZXN0") && got.contains("gr\u{fc}\u{df}e"),
            "{got}"
        );
        c.quit().await;
    }

    #[tokio::test]
    async fn aiosmtpd_tls_disabled_stays_plain() {
        if !Aiosmtpd::available() {
            return;
        }
        // Without TLS aiosmtpd (require_starttls) refuses MAIL with 530.
        let peer = Aiosmtpd::start(true, false);
        let mut c = connect(&tcp(peer.peer.addr), Protocol::Smtp, TlsPolicy::Disabled)
            .await
            .unwrap();
        assert!(!c.tls_active() && c.offers("STARTTLS"));
        let r = send(&mut c, &message(&rcpts(&["bob@example.test"]), BODY))
            .await
            .unwrap();
        assert!(
            matches!(&r.outcomes[0], RcptOutcome::Failed { reply } if reply.starts_with("530")),
            "{r:?}"
        );
        c.quit().await;
    }

    #[tokio::test]
    async fn dovecot_lmtp_known_and_unknown_recipients() {
        if !Dovecot::available() {
            return;
        }
        let dc = Dovecot::start(&["bob@example.test", "dave@example.test"]);
        for ep in [tcp(dc.peer.addr), Endpoint::Unix(dc.socket())] {
            let mut c = connect(&ep, Protocol::Lmtp, TlsPolicy::Opportunistic).await.unwrap();
            assert!(c.offers("CHUNKING"), "BDAT path");
            let v = tokio::time::timeout(DEADLINE, c.verify_recipient("s@tern.test", "bob@example.test"))
                .await
                .unwrap()
                .unwrap();
            assert!(v.is_delivered(), "{v:?}");
            let v = tokio::time::timeout(DEADLINE, c.verify_recipient("s@tern.test", "carol@example.test"))
                .await
                .unwrap()
                .unwrap();
            assert!(
                matches!(&v, RcptOutcome::Failed { reply } if reply.starts_with("550 5.1.1")),
                "{v:?}"
            );
            let to = rcpts(&["bob@example.test", "carol@example.test", "dave@example.test"]);
            let r = send(&mut c, &message(&to, BODY)).await.unwrap();
            assert!(r.outcomes[0].is_delivered(), "{r:?}");
            assert!(matches!(&r.outcomes[1], RcptOutcome::Failed { reply } if reply.starts_with("550 5.1.1")));
            assert!(r.outcomes[2].is_delivered(), "{r:?}");
            c.quit().await;
        }
        let got = dc.wait_messages("bob@example.test", 2);
        assert!(String::from_utf8_lossy(&got[0]).contains("Hello."));
        dc.wait_messages("dave@example.test", 2);
    }

    /// A scripted server: for each step, read commands until `expect` is
    /// complete (all lines), then write `reply`. Returns what it read.
    async fn scripted(steps: Vec<(Vec<&'static str>, &'static str)>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut log = String::new();
            for (expect, reply) in steps {
                for want in expect {
                    let mut line = String::new();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return log;
                    }
                    log.push_str(&line);
                    assert!(line.starts_with(want), "expected {want:?}, got {line:?}");
                }
                if reply == "CLOSE" {
                    return log;
                }
                s.get_mut().write_all(reply.as_bytes()).await.unwrap();
            }
            // Drain until the client goes.
            loop {
                let mut rest = String::new();
                if s.read_line(&mut rest).await.unwrap_or(0) == 0 {
                    return log;
                }
                log.push_str(&rest);
            }
        });
        (addr, task)
    }

    const EHLO_PIPE: &str = "250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n";

    #[tokio::test]
    async fn pipelined_envelope_is_sent_before_any_reply() {
        // The server answers only once it has MAIL and all RCPTs: a
        // lock-step client would hang here.
        let (addr, task) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO client.tern.test"], EHLO_PIPE),
            (
                vec![
                    "MAIL FROM:<sender@tern.test>",
                    "RCPT TO:<a@",
                    "RCPT TO:<b@",
                    "RCPT TO:<c@",
                ],
                "250 ok\r\n550 5.1.1 no a\r\n250 ok\r\n450 4.2.0 later c\r\n",
            ),
            (vec!["DATA"], "354 go\r\n"),
            (vec!["From", "Subject", "", "Hello.", "."], "250 2.0.0 queued\r\n"),
            (vec!["QUIT"], "221 bye\r\n"),
        ])
        .await;
        let mut c = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@x.test", "b@x.test", "c@x.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert_eq!(
            r.outcomes,
            vec![
                RcptOutcome::Failed {
                    reply: "550 5.1.1 no a".into()
                },
                RcptOutcome::Delivered {
                    reply: "250 2.0.0 queued".into()
                },
                RcptOutcome::Deferred {
                    reply: "450 4.2.0 later c".into()
                },
            ]
        );
        assert!(!r.dsn_relayed);
        c.quit().await;
        let log = task.await.unwrap();
        assert!(log.ends_with("QUIT\r\n"), "{log}");
    }

    #[tokio::test]
    async fn ehlo_5xx_falls_back_to_helo() {
        let (addr, task) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], "502 5.5.1 what\r\n"),
            (vec!["HELO client.tern.test"], "250 mx\r\n"),
            (vec!["QUIT"], "221 bye\r\n"),
        ])
        .await;
        let c = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Required).await;
        // Required TLS and no EHLO at all: no STARTTLS either.
        assert!(matches!(c, Err(ConnectError::Temporary(_))), "{c:?}");
        assert!(task.await.unwrap().ends_with("QUIT\r\n"));

        let (addr, task) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], "502 5.5.1 what\r\n"),
            (vec!["HELO client.tern.test"], "250 mx\r\n"),
            (vec!["MAIL FROM:<sender@tern.test>\r\n"], "250 ok\r\n"),
            (vec!["RCPT TO:<a@x.test>\r\n"], "250 ok\r\n"),
            (vec!["DATA"], "354 go\r\n"),
            (vec!["From", "Subject", "", "Hello.", "."], "451 4.3.0 try later\r\n"),
            (vec!["RSET"], "250 ok\r\n"),
            (vec!["MAIL FROM:<sender@tern.test>\r\n"], "421 4.3.2 shutting down\r\n"),
        ])
        .await;
        let mut c = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let to = rcpts(&["a@x.test"]);
        let r = send(&mut c, &message(&to, BODY)).await.unwrap();
        assert!(matches!(&r.outcomes[0], RcptOutcome::Deferred { reply } if reply == "451 4.3.0 try later"));
        let e = send(&mut c, &message(&to, BODY)).await.unwrap_err();
        assert!(e.is_421() && e.to_string().contains("421 4.3.2 shutting down"), "{e}");
        drop(c);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn greeting_codes_and_garbage() {
        let (addr, _t) = scripted(vec![(vec![], "554 5.7.1 go away\r\n"), (vec!["QUIT"], "221 bye\r\n")]).await;
        let e = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Permanent(t) if t.contains("554 5.7.1 go away")),
            "{e:?}"
        );
        let (addr, _t) = scripted(vec![(vec![], "421 4.7.0 busy\r\n")]).await;
        let e = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Temporary(_)), "{e:?}");
        let (addr, _t) = scripted(vec![(vec![], "SSH-2.0-OpenSSH\r\n")]).await;
        let e = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Temporary(t) if t.contains("malformed")),
            "{e:?}"
        );
        // Nothing listening.
        let port = testpeers::free_port();
        let e = connect(
            &tcp(SocketAddr::from(([127, 0, 0, 1], port))),
            Protocol::Smtp,
            TlsPolicy::Disabled,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ConnectError::Temporary(_)), "{e:?}");
    }

    #[tokio::test]
    async fn garbage_mid_transaction_is_protocol_error() {
        let (addr, _t) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], EHLO_PIPE),
            (vec!["MAIL", "RCPT"], "250 ok\r\n2x0 what\r\n"),
        ])
        .await;
        let mut c = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let e = send(&mut c, &message(&rcpts(&["a@x.test"]), BODY)).await.unwrap_err();
        assert!(matches!(e, SessionError::Protocol(_)), "{e:?}");
        assert!(!c.is_usable());
    }

    #[tokio::test]
    async fn lmtp_partial_failure_keeps_delivered() {
        let (addr, _t) = scripted(vec![
            (vec![], "220 lmtp\r\n"),
            (vec!["LHLO client.tern.test"], "250-lmtp\r\n250 PIPELINING\r\n"),
            (vec!["MAIL", "RCPT", "RCPT"], "250 ok\r\n250 ok\r\n250 ok\r\n"),
            (vec!["DATA"], "354 go\r\n"),
            // One per-recipient reply, then the server dies.
            (
                vec!["From", "Subject", "", "Hello.", "."],
                "250 2.0.0 <a@x.test> saved\r\n",
            ),
            (vec![], "CLOSE"),
        ])
        .await;
        let mut c = connect(&tcp(addr), Protocol::Lmtp, TlsPolicy::Opportunistic)
            .await
            .unwrap();
        let r = send(&mut c, &message(&rcpts(&["a@x.test", "b@x.test"]), BODY))
            .await
            .unwrap();
        assert!(r.outcomes[0].is_delivered(), "{r:?}");
        assert!(
            matches!(&r.outcomes[1], RcptOutcome::Deferred { reply } if reply.contains("connection closed")),
            "{r:?}"
        );
        assert!(!c.is_usable());
    }

    /// A fence that answers `allow` and counts the questions.
    #[derive(Debug)]
    struct TestFence {
        allow: bool,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl super::super::fence::Fence for TestFence {
        fn holds(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(std::future::ready(self.allow))
        }
    }

    /// A node that lost its shard leadership mid-transaction sends the
    /// content but never the end of data, and drops the connection: the
    /// peer discards the message (DATA and BDAT alike).
    #[tokio::test]
    async fn a_failed_fence_withholds_the_end_of_data() {
        for (ehlo, data_step) in [
            ("250 mx\r\n", (vec!["DATA"], "354 go\r\n")),
            ("250-mx\r\n250 CHUNKING\r\n", (vec![], "")),
        ] {
            let (addr, task) = scripted(vec![
                (vec![], "220 mx\r\n"),
                (vec!["EHLO"], ehlo),
                (vec!["MAIL"], "250 ok\r\n"),
                (vec!["RCPT"], "250 ok\r\n"),
                data_step,
            ])
            .await;
            let mut c = Connection::connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic, &config())
                .await
                .unwrap();
            let fence = TestFence {
                allow: false,
                asked: Default::default(),
            };
            let to = rcpts(&["a@x.test"]);
            let msg = OutMessage {
                fence: Some(&fence),
                ..message(&to, BODY)
            };
            let e = tokio::time::timeout(DEADLINE, c.send(&msg)).await.unwrap().unwrap_err();
            assert!(matches!(&e, SessionError::Fenced), "{e:?}");
            assert_eq!(fence.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
            assert!(!c.is_usable());
            drop(c);
            let log = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
            // Everything up to the last byte, and no more.
            assert!(log.contains("Subject: test\r\n"), "{log:?}");
            if ehlo.contains("CHUNKING") {
                assert!(log.ends_with("Hello.\r"), "{log:?}");
            } else {
                assert!(log.ends_with("Hello.\r\n"), "{log:?}");
            }
        }
        // A fence that holds: the transaction completes as usual.
        let (addr, _task) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], "250 mx\r\n"),
            (vec!["MAIL"], "250 ok\r\n"),
            (vec!["RCPT"], "250 ok\r\n"),
            (vec!["DATA"], "354 go\r\n"),
            (vec!["From", "Subject", "", "Hello.", "."], "250 2.0.0 queued\r\n"),
        ])
        .await;
        let mut c = Connection::connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic, &config())
            .await
            .unwrap();
        let fence = TestFence {
            allow: true,
            asked: Default::default(),
        };
        let to = rcpts(&["a@x.test"]);
        let msg = OutMessage {
            fence: Some(&fence),
            ..message(&to, BODY)
        };
        let r = tokio::time::timeout(DEADLINE, c.send(&msg)).await.unwrap().unwrap();
        assert!(all_delivered(&r), "{r:?}");
        assert_eq!(fence.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn final_reply_timeout() {
        let (addr, _t) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], "250-mx\r\n250 CHUNKING\r\n"),
            (vec!["MAIL"], "250 ok\r\n"),
            (vec!["RCPT"], "250 ok\r\n"),
            // BDAT and the content, then silence.
            (vec!["BDAT 49 LAST", "From"], ""),
        ])
        .await;
        let mut c = Connection::connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic, &config())
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let e = c.send(&message(&rcpts(&["a@x.test"]), BODY)).await.unwrap_err();
        assert!(e.is_timeout() && e.to_string().contains("end of BDAT"), "{e}");
        assert!(started.elapsed() >= Duration::from_secs(600));
    }

    #[tokio::test]
    async fn starttls_refused_failed_or_injected() {
        const EHLO_TLS: &str = "250-mx\r\n250 STARTTLS\r\n";
        // 454: opportunistic goes on in the clear, required gives up.
        for (policy, ok) in [(TlsPolicy::Opportunistic, true), (TlsPolicy::Required, false)] {
            let (addr, _t) = scripted(vec![
                (vec![], "220 mx\r\n"),
                (vec!["EHLO"], EHLO_TLS),
                (vec!["STARTTLS"], "454 4.7.0 TLS not available\r\n"),
                (vec!["QUIT"], "221 bye\r\n"),
            ])
            .await;
            let c = connect(&tcp(addr), Protocol::Smtp, policy).await;
            match c {
                Ok(c) => assert!(ok && !c.tls_active()),
                Err(e) => assert!(
                    !ok && matches!(&e, ConnectError::Temporary(t) if t.contains("454")),
                    "{e:?}"
                ),
            }
        }
        // The handshake fails: TlsFailed (retry in clear allowed) or, if required, Temporary.
        for policy in [TlsPolicy::Opportunistic, TlsPolicy::Required] {
            let (addr, _t) = scripted(vec![
                (vec![], "220 mx\r\n"),
                (vec!["EHLO"], EHLO_TLS),
                (vec!["STARTTLS"], "220 go ahead\r\n"),
                (vec![], "CLOSE"),
            ])
            .await;
            let e = connect(&tcp(addr), Protocol::Smtp, policy.clone()).await.unwrap_err();
            match policy {
                TlsPolicy::Opportunistic => {
                    assert!(matches!(&e, ConnectError::TlsFailed(t) if t.contains("TLS")), "{e:?}")
                }
                _ => assert!(matches!(&e, ConnectError::Temporary(t) if t.contains("TLS")), "{e:?}"),
            }
        }
        // Plaintext after the 220 would be read as if it came over TLS.
        let (addr, _t) = scripted(vec![
            (vec![], "220 mx\r\n"),
            (vec!["EHLO"], EHLO_TLS),
            (vec!["STARTTLS"], "220 go ahead\r\n250 injected\r\n"),
        ])
        .await;
        let e = connect(&tcp(addr), Protocol::Smtp, TlsPolicy::Opportunistic)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Temporary(t) if t.contains("unexpected")),
            "{e:?}"
        );
    }

    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let cfg = ClientConfig::default();
        let ep = Endpoint::Unix("/nonexistent".into());
        send(&Connection::connect(&ep, Protocol::Lmtp, TlsPolicy::Disabled, &cfg));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let Err(_) = rt.block_on(Connection::connect(&ep, Protocol::Lmtp, TlsPolicy::Disabled, &cfg)) else {
            panic!("connected to nothing");
        };
        fn check(c: &mut Connection, m: &OutMessage<'_>) {
            send(&c.send(m));
            send(&c.verify_recipient("a", "b"));
        }
        let _ = check;
    }
}

/// The certificate did not match the host's TLSA records.
#[derive(Debug)]
pub struct TlsaMismatch;

impl std::fmt::Display for TlsaMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("certificate matches no TLSA record (DANE)")
    }
}

impl std::error::Error for TlsaMismatch {}
