//! The sans-IO SMTP session: all protocol decisions, no I/O.
//!
//! The driver appends received bytes to a buffer and calls
//! [`Session::next`] until it returns [`Output::NeedInput`]; replies are
//! collected and written only when input is needed, before an enqueue wait,
//! before STARTTLS or on close, which gives PIPELINING (RFC 2920) for free.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};

use crate::command::{self, Command, MailFrom, RcptTo};
use crate::data::{DataDecoder, DataOutcome};
use crate::envelope::{BodyType, Envelope, Recipient};
use crate::future_release::{self, Hold};
use crate::policy::{Limit, Reservation, SessionConfig};
use crate::reply::Reply;
use crate::sasl::{self, Password};

/// Maximum command line length including CRLF (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Memory reserved at DATA when the client declared no (or a smaller) SIZE;
/// the reservation grows with the content.
pub const INITIAL_RESERVATION: u64 = 64 * 1024;

/// Why a message could not be queued (the driver's answer to
/// [`Output::Enqueue`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// Answered `451 4.3.0 <text>`; the client retries later.
    #[error("temporary enqueue failure: {0}")]
    Temporary(String),
    /// Answered `554 5.3.0 <text>`.
    #[error("permanent enqueue failure: {0}")]
    Permanent(String),
    /// Refused by a message check (DMARC, policy) with this exact reply.
    #[error("rejected: {0:?}")]
    Rejected(Reply),
}

/// The sender addresses an authenticated user may use in MAIL FROM.
pub trait Senders: Send + Sync + std::fmt::Debug {
    /// True if `address` (a reverse-path without brackets) is the user's.
    fn owns(&self, address: &str) -> bool;
}

/// A user who has authenticated, as the session keeps it.
#[derive(Clone, Debug)]
pub struct AuthUser {
    /// The name as the credential store spells it (recorded in the envelope).
    pub name: String,
    pub senders: Arc<dyn Senders>,
}

/// The driver's answer to [`Output::Authenticate`].
#[derive(Clone, Debug)]
pub enum AuthVerdict {
    /// `235 2.7.0`: the session is now this user's.
    Ok(AuthUser),
    /// `535 5.7.8`: wrong user name or password.
    Invalid,
    /// `454 4.7.0`: too many recent failures; the password was not checked.
    RateLimited,
    /// `454 4.7.0`: the check could not be run.
    Unavailable,
}

/// TLS parameters of the connection, for the Received header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Output {
    /// Queue this reply for writing.
    Reply(Reply),
    /// Flush replies and read more input (timeout: [`Session::read_timeout`]).
    NeedInput,
    /// Flush replies, store the message, then pass the result to
    /// [`Session::enqueue_result`] and write the reply it returns.
    Enqueue {
        id: String,
        envelope: Envelope,
        body: Vec<u8>,
        /// Deliver no earlier than this (unix seconds): the client asked
        /// for a future release (RFC 4865 HOLDFOR/HOLDUNTIL).
        release_at: Option<i64>,
    },
    /// Flush replies and run the TLS handshake, then call
    /// [`Session::tls_started`]. The session has already discarded any input
    /// pipelined after STARTTLS (CVE-2011-0411).
    StartTls,
    /// Ask whether a local recipient exists, then pass the answer to
    /// [`Session::verify_result`] (`verify_recipients`).
    Verify { address: String },
    /// Screen a recipient of an unauthenticated client (DNS block lists,
    /// greylisting; `screen_recipients`), verifying it first when `verify`
    /// is set, then pass the verdict to [`Session::verify_result`].
    Screen {
        reverse_path: String,
        address: String,
        verify: bool,
    },
    /// Check these credentials (SMTP AUTH), then pass the verdict to
    /// [`Session::auth_result`] before calling [`Session::next`] again.
    Authenticate {
        mechanism: &'static str,
        username: String,
        password: Password,
    },
    /// Flush replies and close the connection.
    Close,
}

#[derive(Debug)]
enum Phase {
    Command,
    Data(DataDecoder),
    Bdat {
        remaining: u64,
        chunk: u64,
        last: bool,
        /// Reply to send once the octets are consumed, if the chunk failed.
        failure: Option<Reply>,
    },
    /// Waiting for [`Session::enqueue_result`]; the message's memory stays
    /// reserved until then.
    Enqueue {
        id: String,
        _reservation: Option<Reservation>,
    },
    /// Inside an AUTH exchange: the next line answers our `334` challenge.
    Sasl(SaslStep),
    Closed,
}

/// Which `334` challenge the client is answering.
#[derive(Debug)]
enum SaslStep {
    /// PLAIN without an initial response: the whole PLAIN message.
    Plain,
    /// LOGIN: the user name.
    LoginUsername,
    /// LOGIN: the password for this user name.
    LoginPassword { username: String },
}

#[derive(Debug)]
struct Transaction {
    envelope: Envelope,
    /// Content received so far by BDAT; `Some` once BDAT was used.
    bdat: Option<Vec<u8>>,
    /// The memory budget's share covering the content buffered for this
    /// transaction (DATA or BDAT); given back when the transaction ends.
    reservation: Option<Reservation>,
    /// The release time from HOLDFOR/HOLDUNTIL, fixed at MAIL.
    release_at: Option<i64>,
    /// MAIL carried REQUIRETLS (recorded in the Received header).
    requiretls: bool,
}

/// One SMTP session.
pub struct Session {
    config: Arc<SessionConfig>,
    peer: SocketAddr,
    next_id: Box<dyn FnMut() -> String + Send>,
    tls_active: bool,
    tls: Option<TlsInfo>,
    /// HELO/EHLO name and whether it was EHLO.
    helo: Option<(String, bool)>,
    tx: Option<Transaction>,
    phase: Phase,
    pending: VecDeque<Output>,
    errors: u32,
    /// Inside an over-long command line, discarding until LF.
    discarding: bool,
    /// A recipient waiting for its verification verdict.
    verifying: Option<Recipient>,
    /// The user after a successful AUTH (submission listeners).
    auth: Option<AuthUser>,
    /// An [`Output::Authenticate`] awaits its verdict.
    authenticating: bool,
    /// While set, new transactions get this reply at MAIL, RCPT, DATA and
    /// BDAT (the queue cannot take mail now, e.g. `452 4.3.1` disk full).
    refusal: Option<Reply>,
    /// Commands that move no mail (NOOP, RSET, VRFY, HELP, HELO, EHLO) since
    /// the last queued message; bounded by `max_junk_commands`.
    junk: u32,
}

impl Session {
    /// `next_id` yields queue ids (the driver wraps `Enqueuer::next_id`).
    /// `tls_active` is true for implicit-TLS listeners.
    pub fn new(
        config: Arc<SessionConfig>,
        peer: SocketAddr,
        tls_active: bool,
        next_id: Box<dyn FnMut() -> String + Send>,
    ) -> Self {
        Session {
            config,
            peer,
            next_id,
            tls_active,
            tls: None,
            helo: None,
            tx: None,
            phase: Phase::Command,
            pending: VecDeque::new(),
            errors: 0,
            discarding: false,
            verifying: None,
            auth: None,
            authenticating: false,
            refusal: None,
            junk: 0,
        }
    }

    /// The `220` banner.
    pub fn greeting(&self) -> Reply {
        Reply::bare(220, format!("{} ESMTP Tern", self.config.hostname))
    }

    /// Read timeout for the current phase (RFC 5321 4.5.3.2).
    pub fn read_timeout(&self) -> Duration {
        match self.phase {
            Phase::Data(_) | Phase::Bdat { .. } => self.config.data_timeout,
            _ => self.config.command_timeout,
        }
    }

    /// The reply for an expired read; the session is closed afterwards.
    pub fn timeout_reply(&mut self) -> Reply {
        self.phase = Phase::Closed;
        Reply::new(
            421,
            "4.4.2",
            format!("{} Error: timeout exceeded", self.config.hostname),
        )
    }

    /// The reply when `max_session_secs` ran out; the session is closed afterwards.
    pub fn session_time_reply(&mut self) -> Reply {
        self.phase = Phase::Closed;
        self.config.limits.limited(Limit::SessionTime);
        Reply::new(
            421,
            "4.4.2",
            format!("{} Error: session time limit exceeded", self.config.hostname),
        )
    }

    /// The reply when content arrives slower than `min_data_rate`; the
    /// session is closed afterwards.
    pub fn data_rate_reply(&mut self) -> Reply {
        self.phase = Phase::Closed;
        self.config.limits.limited(Limit::DataRate);
        Reply::new(
            421,
            "4.4.2",
            format!("{} Error: data transfer rate too low", self.config.hostname),
        )
    }

    /// The reply for server shutdown; the session is closed afterwards.
    pub fn shutdown_reply(&mut self) -> Reply {
        self.phase = Phase::Closed;
        Reply::new(421, "4.3.2", format!("{} Service shutting down", self.config.hostname))
    }

    /// True from DATA until its end marker, and from the first BDAT chunk
    /// until the transaction ends (the commands between chunks included):
    /// the span `min_data_rate` applies to.
    pub fn receiving_content(&self) -> bool {
        self.in_data() || self.tx.as_ref().is_some_and(|t| t.bdat.is_some())
    }

    /// True while a DATA or BDAT body is being read.
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Bdat { .. })
    }

    /// Called by the driver after a successful TLS handshake: back to the
    /// initial state, the client must EHLO again (RFC 3207 4.2).
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls_active = true;
        self.tls = Some(info);
        self.helo = None;
        self.tx = None;
        self.auth = None;
        self.authenticating = false;
        self.phase = Phase::Command;
        self.pending.clear();
    }

    /// Sets (or clears) the reply that refuses new transactions
    /// (the node asks its queue); the driver calls
    /// this before each [`Session::next`]. A refusal is flow control: it does
    /// not count towards `max_errors`.
    pub fn set_refusal(&mut self, refusal: Option<Reply>) {
        self.refusal = refusal;
    }

    /// The refusal for a command that needs HELO (and a transaction, for
    /// RCPT and DATA): sequence errors keep their own replies.
    fn refused(&self, needs_tx: bool) -> Option<Reply> {
        let ready = self.helo.is_some() && (self.tx.is_some() == needs_tx);
        self.refusal.clone().filter(|_| ready)
    }

    /// Result of the enqueue requested by [`Output::Enqueue`]; returns the
    /// reply to send. The transaction is over either way.
    pub fn enqueue_result(&mut self, result: Result<(), EnqueueError>) -> Reply {
        let id = match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Enqueue { id, .. } => id,
            other => {
                // Driver bug; keep state and say something harmless.
                self.phase = other;
                return Reply::new(451, "4.3.0", "Error: internal error");
            }
        };
        self.tx = None;
        match result {
            Ok(()) => {
                // A session that moves mail may tidy up between messages.
                self.junk = 0;
                Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
            }
            Err(EnqueueError::Temporary(text)) => Reply::new(451, "4.3.0", text),
            Err(EnqueueError::Permanent(text)) => Reply::new(554, "5.3.0", text),
            Err(EnqueueError::Rejected(reply)) => reply,
        }
    }

    /// Consumes input and returns the next thing to do. Call repeatedly
    /// until [`Output::NeedInput`] (or `Close`).
    pub fn next(&mut self, input: &mut BytesMut) -> Output {
        loop {
            if let Some(out) = self.pending.pop_front() {
                if matches!(out, Output::StartTls) {
                    // The next bytes must be a ClientHello: plaintext
                    // pipelined after STARTTLS is dropped (CVE-2011-0411).
                    input.clear();
                }
                return out;
            }
            match &mut self.phase {
                Phase::Closed => return Output::Close,
                // The driver owes us an enqueue result; nothing to do.
                Phase::Enqueue { .. } => return Output::NeedInput,
                Phase::Data(decoder) => {
                    let (n, done) = decoder.feed(input);
                    input.advance(n);
                    // Cover what the content buffer now holds, or stop buffering.
                    if let Some(tx) = self.tx.as_mut() {
                        if let Some(r) = tx.reservation.as_mut() {
                            if !r.grow_to(decoder.capacity() as u64) {
                                decoder.discard();
                                tx.reservation = None;
                            }
                        }
                    }
                    if !done {
                        return Output::NeedInput;
                    }
                    if let Phase::Data(decoder) = std::mem::replace(&mut self.phase, Phase::Command) {
                        self.data_done(decoder.finish());
                    }
                }
                Phase::Bdat { remaining, failure, .. } => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    if take > 0 {
                        if failure.is_none() {
                            if let Some(buf) = self.tx.as_mut().and_then(|t| t.bdat.as_mut()) {
                                buf.extend_from_slice(&input[..take]);
                            }
                        }
                        input.advance(take);
                        *remaining -= take as u64;
                    }
                    if *remaining > 0 {
                        return Output::NeedInput;
                    }
                    self.bdat_done();
                }
                Phase::Command => match self.take_line(input) {
                    Some(Ok(line)) => self.command(&line),
                    Some(Err(reply)) => self.error(reply),
                    None => return Output::NeedInput,
                },
                Phase::Sasl(_) => match self.take_line(input) {
                    Some(line) => {
                        let Phase::Sasl(step) = std::mem::replace(&mut self.phase, Phase::Command) else {
                            continue;
                        };
                        match line {
                            Ok(line) => self.sasl_response(step, &line),
                            // An over-long response ends the exchange.
                            Err(reply) => self.error(reply),
                        }
                    }
                    None => return Output::NeedInput,
                },
            }
        }
    }

    /// Splits one command line off `input`. `None`: need more input.
    /// `Some(Err)`: the line was too long.
    fn take_line(&mut self, input: &mut BytesMut) -> Option<Result<Vec<u8>, Reply>> {
        let Some(lf) = input.iter().position(|&b| b == b'\n') else {
            if self.discarding || input.len() >= MAX_COMMAND_LINE {
                // Never buffer more than a command line's worth.
                self.discarding = true;
                input.clear();
            }
            return None;
        };
        let raw = input.split_to(lf + 1);
        if self.discarding || raw.len() > MAX_COMMAND_LINE {
            self.discarding = false;
            return Some(Err(Reply::new(500, "5.5.2", "Error: line too long")));
        }
        // Tolerate bare LF as a terminator; strip the CR of CRLF.
        let mut line = &raw[..lf];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        Some(Ok(line.to_vec()))
    }

    fn reply(&mut self, reply: Reply) {
        self.pending.push_back(Output::Reply(reply));
    }

    /// Sends an error reply and enforces `max_errors`.
    fn error(&mut self, reply: Reply) {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.reply(Reply::new(
                421,
                "4.7.0",
                format!("{} Error: too many errors", self.config.hostname),
            ));
            self.pending.push_back(Output::Close);
            self.phase = Phase::Closed;
        }
    }

    /// Sends `reply`, counting it if it is an error.
    fn respond(&mut self, reply: Reply) {
        if reply.is_error() {
            self.error(reply);
        } else {
            self.reply(reply);
        }
    }

    fn command(&mut self, line: &[u8]) {
        let cmd = match command::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => return self.error(e.reply()),
        };
        // (BDAT still reads its chunk: refused below, through its failure.)
        let refusal = match &cmd {
            Command::Mail(_) => self.refused(false),
            Command::Rcpt(_) | Command::Data => self.refused(true),
            _ => None,
        };
        if let Some(reply) = refusal {
            return self.reply(reply);
        }
        let junk = matches!(
            cmd,
            Command::Ehlo(_) | Command::Helo(_) | Command::Rset | Command::Noop | Command::Vrfy(_) | Command::Help
        );
        if junk && self.junk_limit() {
            return;
        }
        match cmd {
            Command::Ehlo(name) => {
                self.helo = Some((name, true));
                self.tx = None;
                let reply = self.ehlo_reply();
                self.reply(reply);
            }
            Command::Helo(name) => {
                self.helo = Some((name, false));
                self.tx = None;
                let host = self.config.hostname.clone();
                self.reply(Reply::new(250, "2.0.0", host));
            }
            Command::Mail(m) => {
                let r = self.mail(m);
                self.respond(r);
            }
            Command::Rcpt(r) => {
                // 452 for too many recipients is flow control (RFC 5321
                // 4.5.3.1.10), not a client error.
                if let Some(reply) = self.rcpt(r) {
                    if reply.code == 452 {
                        self.reply(reply);
                    } else {
                        self.respond(reply);
                    }
                }
            }
            Command::Data => match self.data_check() {
                Err(r) => self.error(r),
                Ok(declared) => {
                    let max = self.config.max_message_size;
                    let declared = declared.min(max);
                    let Some(reservation) = Reservation::try_new(
                        Arc::clone(&self.config.memory),
                        declared.max(INITIAL_RESERVATION).min(max),
                    ) else {
                        // Flow control: the transaction stays, DATA may be retried.
                        self.config.limits.limited(Limit::MemoryBudget);
                        return self.reply(insufficient_storage());
                    };
                    if let Some(tx) = self.tx.as_mut() {
                        tx.reservation = Some(reservation);
                    }
                    self.reply(Reply::bare(354, "Start mail input; end with <CRLF>.<CRLF>"));
                    // The declared size is reserved, so it may be allocated now.
                    let capacity = usize::try_from(declared).unwrap_or(0);
                    self.phase = Phase::Data(DataDecoder::with_capacity(max, capacity));
                }
            },
            Command::Bdat { size, last } => {
                let failure = self
                    .refused(true)
                    .map_or_else(|| self.bdat_check(size).err(), Some)
                    .or_else(|| self.bdat_reserve(size).err());
                if failure.is_some() {
                    // RFC 3030: a failed chunk fails the transaction.
                    self.tx = None;
                }
                self.phase = Phase::Bdat {
                    remaining: size,
                    chunk: size,
                    last,
                    failure,
                };
            }
            Command::Rset => {
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "Ok"));
            }
            Command::Noop => self.reply(Reply::new(250, "2.0.0", "Ok")),
            Command::Quit => {
                self.reply(Reply::new(221, "2.0.0", "Bye"));
                self.pending.push_back(Output::Close);
                self.phase = Phase::Closed;
            }
            Command::Vrfy(_) => self.reply(Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.error(Reply::new(502, "5.5.1", "Error: command not implemented")),
            Command::Help => self.reply(Reply::new(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(&mechanism, initial_response.as_deref()),
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
        ];
        if self.starttls_offered() {
            lines.push("STARTTLS".to_string());
        }
        // RFC 4954 14: no plaintext passwords over an unencrypted connection.
        if self.submission() && self.tls_active {
            lines.push(format!("AUTH {}", sasl::MECHANISMS));
        }
        if let Some(max) = self.future_release() {
            lines.push(future_release::ehlo_keyword((self.config.clock)(), max.as_secs()));
        }
        if self.requiretls_offered() {
            lines.push("REQUIRETLS".to_string());
        }
        for ext in [
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "DSN",
            "SMTPUTF8",
        ] {
            lines.push(ext.to_string());
        }
        Reply::multiline(250, lines)
    }

    /// A submission listener: AUTH offered under TLS and required for MAIL.
    fn submission(&self) -> bool {
        self.config.submission
    }

    /// How far ahead a message may be held: only submission listeners offer it.
    fn future_release(&self) -> Option<Duration> {
        self.config.future_release.filter(|_| self.submission())
    }

    /// RFC 8689 2: only offered under TLS.
    fn requiretls_offered(&self) -> bool {
        self.config.requiretls && self.tls_active
    }

    fn starttls_offered(&self) -> bool {
        self.config.starttls && !self.tls_active
    }

    fn starttls(&mut self) {
        if self.tls_active {
            return self.error(Reply::new(503, "5.5.1", "Error: TLS already active"));
        }
        if !self.starttls_offered() {
            return self.error(Reply::new(502, "5.5.1", "Error: command not implemented"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: MAIL transaction in progress"));
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.pending.push_back(Output::StartTls);
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) {
        if !self.submission() {
            return self.error(Reply::new(502, "5.5.1", "Error: command not implemented"));
        }
        if !self.tls_active {
            return self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if !matches!(self.helo, Some((_, true))) {
            return self.error(Reply::new(503, "5.5.1", "Error: send EHLO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: MAIL transaction in progress"));
        }
        // RFC 4954 4: one successful AUTH per session.
        if self.auth.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Error: already authenticated"));
        }
        let step = match mechanism {
            "PLAIN" => SaslStep::Plain,
            "LOGIN" => SaslStep::LoginUsername,
            _ => return self.error(Reply::new(504, "5.5.4", "Unrecognized authentication type")),
        };
        match initial {
            Some(arg) => match sasl::decode_initial(arg) {
                Some(data) => self.sasl_data(step, data),
                None => self.error(bad_base64()),
            },
            None => self.challenge(step),
        }
    }

    /// Sends the `334` challenge for `step` and waits for the answer.
    fn challenge(&mut self, step: SaslStep) {
        let text = match step {
            SaslStep::Plain => "",
            SaslStep::LoginUsername => sasl::LOGIN_USERNAME,
            SaslStep::LoginPassword { .. } => sasl::LOGIN_PASSWORD,
        };
        self.reply(Reply::bare(334, text));
        self.phase = Phase::Sasl(step);
    }

    /// A line answering a `334` challenge.
    fn sasl_response(&mut self, step: SaslStep, line: &[u8]) {
        if line == b"*" {
            return self.error(Reply::new(501, "5.0.0", "Authentication cancelled"));
        }
        match sasl::decode_response(line) {
            Some(data) => self.sasl_data(step, data),
            None => self.error(bad_base64()),
        }
    }

    /// Decoded client data for `step`.
    fn sasl_data(&mut self, step: SaslStep, data: Vec<u8>) {
        let malformed = || Reply::new(501, "5.5.2", "Error: malformed authentication data");
        match step {
            SaslStep::Plain => {
                let Some(plain) = sasl::parse_plain(&data) else {
                    return self.error(malformed());
                };
                // RFC 4616 2: acting as another user is not something we grant.
                if !plain.authzid.is_empty() && !plain.authzid.eq_ignore_ascii_case(&plain.authcid) {
                    return self.error(Reply::new(
                        535,
                        "5.7.8",
                        "Authorization identity must be empty or the user name",
                    ));
                }
                self.authenticate("PLAIN", plain.authcid, plain.password);
            }
            SaslStep::LoginUsername => match sasl::valid_name(&data) {
                Some(username) if !username.is_empty() => self.challenge(SaslStep::LoginPassword { username }),
                _ => self.error(malformed()),
            },
            SaslStep::LoginPassword { username } => self.authenticate("LOGIN", username, Password::new(data)),
        }
    }

    fn authenticate(&mut self, mechanism: &'static str, username: String, password: Password) {
        self.authenticating = true;
        self.pending.push_back(Output::Authenticate {
            mechanism,
            username,
            password,
        });
    }

    /// The verdict on the credentials of the last [`Output::Authenticate`].
    pub fn auth_result(&mut self, verdict: AuthVerdict) {
        if !std::mem::take(&mut self.authenticating) {
            return;
        }
        match verdict {
            AuthVerdict::Ok(user) => {
                self.auth = Some(user);
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            }
            AuthVerdict::Invalid => self.error(Reply::new(535, "5.7.8", "Authentication credentials invalid")),
            AuthVerdict::RateLimited => self.error(Reply::new(
                454,
                "4.7.0",
                "Too many failed authentication attempts, try again later",
            )),
            AuthVerdict::Unavailable => self.error(Reply::new(454, "4.7.0", "Temporary authentication failure")),
        }
    }

    fn mail(&mut self, m: MailFrom) -> Reply {
        let Some((helo, _)) = &self.helo else {
            return Reply::new(503, "5.5.1", "Error: send HELO/EHLO first");
        };
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "Error: nested MAIL command");
        }
        if self.submission() && self.auth.is_none() {
            return Reply::new(530, "5.7.0", "Authentication required");
        }
        if !m.smtputf8 && !m.address.is_ascii() {
            return Reply::new(553, "5.6.7", "Must declare SMTPUTF8 to send Unicode address");
        }
        if m.size.is_some_and(|s| s > self.config.max_message_size) {
            return Reply::new(552, "5.3.4", "Message size exceeds fixed limit");
        }
        // The null sender is allowed: users send bounces and receipts too.
        if let Some(user) = &self.auth {
            if !m.address.is_empty() && !user.senders.owns(&m.address) {
                return Reply::new(553, "5.7.1", format!("Sender address not owned by user {}", user.name));
            }
        }
        if m.requiretls && !self.requiretls_offered() {
            // Not advertised in this session (no TLS yet, or not offered at all).
            return Reply::new(555, "5.5.4", "Unsupported option: REQUIRETLS");
        }
        let release_at = match (m.hold, self.future_release()) {
            (None, _) => None,
            // Not advertised here: as unknown as any other parameter.
            (Some(hold), None) => {
                let name = if matches!(hold, Hold::For(_)) {
                    "HOLDFOR"
                } else {
                    "HOLDUNTIL"
                };
                return Reply::new(555, "5.5.4", format!("Unsupported option: {name}"));
            }
            (Some(hold), Some(max)) => match future_release::release_time(hold, (self.config.clock)(), max.as_secs()) {
                Ok(at) => Some(at),
                Err(reply) => return reply,
            },
        };
        let envelope = Envelope {
            reverse_path: m.address,
            recipients: Vec::new(),
            body_type: m.body.unwrap_or_default(),
            smtputf8: m.smtputf8,
            ret: m.ret,
            envid: m.envid,
            declared_size: m.size,
            helo: helo.clone(),
            client_ip: self.peer.ip().to_canonical().to_string(),
            auth_user: self.auth.as_ref().map(|u| u.name.clone()),
        };
        self.tx = Some(Transaction {
            envelope,
            bdat: None,
            reservation: None,
            release_at,
            requiretls: m.requiretls,
        });
        Reply::new(250, "2.1.0", "Sender ok")
    }

    /// The RCPT reply, or `None` when the recipient awaits verification.
    fn rcpt(&mut self, r: RcptTo) -> Option<Reply> {
        let Some(tx) = &mut self.tx else {
            return Some(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.bdat.is_some() {
            return Some(Reply::new(503, "5.5.1", "Error: RCPT after BDAT"));
        }
        if !tx.envelope.smtputf8 && !r.address.is_ascii() {
            return Some(Reply::new(
                553,
                "5.6.7",
                "Must declare SMTPUTF8 to send Unicode address",
            ));
        }
        if tx.envelope.recipients.len() >= self.config.max_recipients {
            return Some(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        let domain = Envelope::domain_of(&r.address);
        // A bare `postmaster` is always ours (RFC 5321 4.1.1.3).
        let local_postmaster = domain.is_empty();
        // An authenticated user may send anywhere (RFC 6409 submission).
        if !local_postmaster && self.auth.is_none() && !self.config.relay.allows(self.peer.ip(), &domain) {
            return Some(Reply::new(
                554,
                "5.7.1",
                format!("<{}>: Relay access denied", r.address),
            ));
        }
        let recipient = Recipient {
            address: r.address,
            notify: r.notify,
            orcpt: r.orcpt,
        };
        let verify = self.config.verify_recipients && !local_postmaster && self.config.relay.is_local(&domain);
        if self.config.screen_recipients && !local_postmaster && self.auth.is_none() {
            self.pending.push_back(Output::Screen {
                reverse_path: tx.envelope.reverse_path.clone(),
                address: recipient.address.clone(),
                verify,
            });
            self.verifying = Some(recipient);
            return None;
        }
        if verify {
            // Stop here until the driver has the verdict; pipelined input waits.
            self.pending.push_back(Output::Verify {
                address: recipient.address.clone(),
            });
            self.verifying = Some(recipient);
            return None;
        }
        tx.envelope.recipients.push(recipient);
        Some(Reply::new(250, "2.1.5", "Recipient ok"))
    }

    /// The verdict on the recipient of the last [`Output::Verify`] or [`Output::Screen`].
    pub fn verify_result(&mut self, verdict: Result<(), Reply>) {
        let Some(recipient) = self.verifying.take() else { return };
        match (verdict, &mut self.tx) {
            (Ok(()), Some(tx)) => {
                tx.envelope.recipients.push(recipient);
                self.reply(Reply::new(250, "2.1.5", "Recipient ok"));
            }
            (Ok(()), None) => self.error(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            (Err(reply), _) => self.respond(reply),
        }
    }

    /// Counts a command that moves no mail; true when that was one too
    /// many and the session is closing with `421 4.7.0`.
    fn junk_limit(&mut self) -> bool {
        self.junk = self.junk.saturating_add(1);
        if self.junk <= self.config.max_junk_commands {
            return false;
        }
        self.config.limits.limited(Limit::JunkCommands);
        self.reply(Reply::new(
            421,
            "4.7.0",
            format!("{} Error: too many commands without mail", self.config.hostname),
        ));
        self.pending.push_back(Output::Close);
        self.phase = Phase::Closed;
        true
    }

    /// Reserves memory for a BDAT chunk of `size` octets on top of what
    /// the transaction holds, and makes room for it.
    fn bdat_reserve(&mut self, size: u64) -> Result<(), Reply> {
        let budget = &self.config.memory;
        let Some(tx) = self.tx.as_mut() else {
            return Ok(());
        };
        let Some(buf) = tx.bdat.as_mut() else {
            return Ok(());
        };
        let total = (buf.len() as u64).saturating_add(size);
        let reserved = match tx.reservation.as_mut() {
            Some(r) => r.grow_to(total),
            None => match Reservation::try_new(Arc::clone(budget), total) {
                Some(r) => {
                    tx.reservation = Some(r);
                    true
                }
                None => false,
            },
        };
        if !reserved {
            self.config.limits.limited(Limit::MemoryBudget);
            return Err(insufficient_storage());
        }
        // Reserved and within max_message_size (bdat_check), so it may be allocated.
        buf.reserve_exact(usize::try_from(size).unwrap_or(0));
        Ok(())
    }

    /// Checks DATA; returns the declared SIZE (0 when none).
    fn data_check(&self) -> Result<u64, Reply> {
        let Some(tx) = &self.tx else {
            return Err(Reply::new(503, "5.5.1", "Error: need RCPT command"));
        };
        if tx.bdat.is_some() {
            return Err(Reply::new(503, "5.5.1", "Error: DATA after BDAT"));
        }
        if tx.envelope.recipients.is_empty() {
            return Err(Reply::new(554, "5.5.1", "Error: no valid recipients"));
        }
        if tx.envelope.body_type == BodyType::BinaryMime {
            return Err(Reply::new(503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT"));
        }
        Ok(tx.envelope.declared_size.unwrap_or(0))
    }

    fn bdat_check(&mut self, size: u64) -> Result<(), Reply> {
        let max = self.config.max_message_size;
        let Some(tx) = &mut self.tx else {
            return Err(Reply::new(503, "5.5.1", "Error: need MAIL command"));
        };
        if tx.envelope.recipients.is_empty() {
            return Err(Reply::new(554, "5.5.1", "Error: no valid recipients"));
        }
        let have = tx.bdat.as_ref().map_or(0, |b| b.len() as u64);
        if have.saturating_add(size) > max {
            return Err(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        tx.bdat.get_or_insert_with(Vec::new);
        Ok(())
    }

    fn data_done(&mut self, out: DataOutcome) {
        // Precedence: smuggling, then size, then line length.
        let reject = if out.bare_cr_lf {
            Some(Reply::new(
                550,
                "5.6.0",
                "Bare CR or LF in message (SMTP smuggling protection)",
            ))
        } else if out.oversize {
            Some(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"))
        } else if out.over_budget {
            // Flow control, not a client error: the client retries later.
            self.tx = None;
            self.config.limits.limited(Limit::MemoryBudget);
            return self.reply(insufficient_storage());
        } else if out.line_too_long {
            // RFC 5321 4.5.3.1.6 limits text lines to 1000 octets; X.6.0
            // because it is a content problem (RFC 3463).
            Some(Reply::new(
                550,
                "5.6.0",
                "Message line too long (limit 1000 octets including CRLF)",
            ))
        } else {
            None
        };
        match reject {
            Some(r) => {
                self.tx = None;
                self.error(r);
            }
            None => self.queue_message(out.body),
        }
    }

    fn bdat_done(&mut self) {
        let Phase::Bdat {
            chunk, last, failure, ..
        } = std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return;
        };
        if let Some(r) = failure {
            // A refusal (disk full, memory budget) is flow control, not a client error.
            if self.refusal.as_ref() == Some(&r) || r == insufficient_storage() {
                return self.reply(r);
            }
            return self.error(r);
        }
        if !last {
            return self.reply(Reply::new(250, "2.0.0", format!("{chunk} octets received")));
        }
        let body = self.tx.as_mut().and_then(|t| t.bdat.take()).unwrap_or_default();
        self.queue_message(body);
    }

    /// Prepends the Received header and asks the driver to enqueue.
    fn queue_message(&mut self, content: Vec<u8>) {
        let Some(tx) = self.tx.take() else {
            return self.error(Reply::new(503, "5.5.1", "Error: no transaction"));
        };
        let id = (self.next_id)();
        let received = self.received_header(&id, &tx.envelope, tx.requiretls);
        let mut body = Vec::with_capacity(received.len() + content.len());
        body.extend_from_slice(received.as_bytes());
        body.extend_from_slice(&content);
        self.phase = Phase::Enqueue {
            id: id.clone(),
            _reservation: tx.reservation,
        };
        self.pending.push_back(Output::Enqueue {
            id,
            envelope: tx.envelope,
            body,
            release_at: tx.release_at,
        });
    }

    /// RFC 5321 4.4 trace header; protocol words per RFC 3848.
    /// `requiretls`: the marker delivery reads back ([`REQUIRETLS_MARK`]).
    fn received_header(&self, id: &str, env: &Envelope, requiretls: bool) -> String {
        let esmtp = self.helo.as_ref().is_some_and(|(_, e)| *e);
        let with = match (esmtp, self.tls_active, self.auth.is_some()) {
            (true, true, true) => "ESMTPSA",
            (true, false, true) => "ESMTPA",
            (true, true, false) => "ESMTPS",
            (true, false, false) => "ESMTP",
            (false, _, _) => "SMTP",
        };
        let mut h = format!(
            "Received: from {} ([{}])\r\n\tby {} (Tern) with {} id {}",
            env.helo, env.client_ip, self.config.hostname, with, id
        );
        if let Some(t) = &self.tls {
            h.push_str(&format!("\r\n\t(using {} with cipher {})", t.version, t.cipher));
        }
        if requiretls {
            h.push_str("\r\n\t");
            h.push_str(REQUIRETLS_MARK);
        }
        if let [only] = env.recipients.as_slice() {
            h.push_str(&format!("\r\n\tfor <{}>", only.address));
        }
        h.push_str(&format!("; {}\r\n", chrono::Utc::now().to_rfc2822()));
        h
    }
}

/// Comment in the Received header a session adds for a message sent with
/// `MAIL ... REQUIRETLS`: the flag travels with the message (through the
/// Raft log and queue records unchanged) and delivery reads it back from
/// the topmost Received header, which is always this node's own.
pub const REQUIRETLS_MARK: &str = "(REQUIRETLS)";

/// The answer to DATA or BDAT when the memory budget cannot hold the message.
fn insufficient_storage() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}

fn bad_base64() -> Reply {
    Reply::new(501, "5.5.2", "Error: invalid base64 data")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::envelope::{Notify, Ret};
    use crate::policy::{MemoryBudget, RelayPolicy};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The test user's addresses: alice@example.test and the domain team.test
    /// (domains without regard to case, the local part exactly).
    #[derive(Debug)]
    struct AliceOwns;

    impl Senders for AliceOwns {
        fn owns(&self, address: &str) -> bool {
            let Some((local, domain)) = address.rsplit_once('@') else {
                return false;
            };
            let domain = domain.trim_end_matches('.');
            (local == "alice" && domain.eq_ignore_ascii_case("example.test"))
                || domain.eq_ignore_ascii_case("team.test")
        }
    }

    /// A bounded budget that tells how much is taken.
    #[derive(Debug)]
    struct TestBudget {
        capacity: u64,
        used: AtomicU64,
    }

    impl TestBudget {
        fn used(&self) -> u64 {
            self.used.load(Ordering::Acquire)
        }

        fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
            Reservation::try_new(Arc::clone(self) as Arc<dyn MemoryBudget>, bytes)
        }
    }

    impl MemoryBudget for TestBudget {
        fn take(&self, bytes: u64) -> bool {
            self.used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(bytes).filter(|&total| total <= self.capacity)
                })
                .is_ok()
        }

        fn give(&self, bytes: u64) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
    use base64::Engine as _;

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: "mx.test".into(),
            relay: RelayPolicy {
                local_domains: vec!["example.test".into()],
                relay_domains: vec!["relay.test".into()],
                relay_networks: vec![],
            },
            ..SessionConfig::default()
        }
    }

    struct H {
        s: Session,
        input: BytesMut,
        queued: Vec<(String, Envelope, Vec<u8>)>,
        /// The release time of each queued message, in order.
        releases: Vec<Option<i64>>,
        next_result: Option<EnqueueError>,
        tls_starts: usize,
        closed: bool,
        /// Mechanism and user name of each credential check asked for.
        auths: Vec<(&'static str, String)>,
    }

    impl H {
        fn new(cfg: SessionConfig) -> Self {
            let mut n = 0;
            let ids = Box::new(move || {
                n += 1;
                format!("Q{n}")
            });
            let peer: SocketAddr = "192.0.2.1:40000".parse().unwrap();
            H {
                s: Session::new(Arc::new(cfg), peer, false, ids),
                input: BytesMut::new(),
                queued: Vec::new(),
                releases: Vec::new(),
                next_result: None,
                tls_starts: 0,
                closed: false,
                auths: Vec::new(),
            }
        }

        fn std() -> Self {
            H::new(config())
        }

        /// Feeds bytes and returns all replies produced until input is needed.
        fn send(&mut self, bytes: impl AsRef<[u8]>) -> String {
            self.input.extend_from_slice(bytes.as_ref());
            let mut out = Vec::new();
            loop {
                match self.s.next(&mut self.input) {
                    Output::Reply(r) => r.write_to(&mut out),
                    Output::NeedInput => break,
                    Output::Close => {
                        self.closed = true;
                        break;
                    }
                    Output::Enqueue {
                        id,
                        envelope,
                        body,
                        release_at,
                    } => {
                        self.queued.push((id, envelope, body));
                        self.releases.push(release_at);
                        let res = match self.next_result.take() {
                            Some(e) => Err(e),
                            None => Ok(()),
                        };
                        self.s.enqueue_result(res).write_to(&mut out);
                    }
                    Output::Verify { address } => {
                        // The test "MDA" knows everyone but `unknown@`.
                        let verdict = if address.starts_with("unknown@") {
                            Err(Reply::new(550, "5.1.1", format!("<{address}>: User unknown")))
                        } else {
                            Ok(())
                        };
                        self.s.verify_result(verdict);
                    }
                    Output::Screen {
                        reverse_path,
                        address,
                        verify,
                    } => {
                        // The test screen greylists mail from `new@`; it
                        // verifies first, as the driver does.
                        let verdict = if verify && address.starts_with("unknown@") {
                            Err(Reply::new(550, "5.1.1", format!("<{address}>: User unknown")))
                        } else if reverse_path.starts_with("new@") {
                            Err(Reply::new(451, "4.7.1", "Greylisted"))
                        } else {
                            Ok(())
                        };
                        self.s.verify_result(verdict);
                    }
                    Output::Authenticate {
                        mechanism,
                        username,
                        password,
                    } => {
                        assert_eq!(format!("{password:?}"), "Password(<redacted>)");
                        self.auths.push((mechanism, username.clone()));
                        // The test users: alice (secret), and `limited`, who is rate limited.
                        let verdict = match (username.as_str(), password.as_bytes()) {
                            ("alice@example.test", b"secret") => AuthVerdict::Ok(AuthUser {
                                name: username,
                                senders: Arc::new(AliceOwns),
                            }),
                            ("limited", _) => AuthVerdict::RateLimited,
                            _ => AuthVerdict::Invalid,
                        };
                        self.s.auth_result(verdict);
                    }
                    Output::StartTls => {
                        self.tls_starts += 1;
                        assert!(self.input.is_empty(), "pipelined input must be discarded");
                        // Reply first, as the driver would flush it before the handshake.
                        self.s.tls_started(TlsInfo {
                            version: "TLSv1.3".into(),
                            cipher: "TLS13_AES_128_GCM_SHA256".into(),
                        });
                    }
                }
            }
            String::from_utf8(out).unwrap()
        }

        /// EHLO, MAIL and one local RCPT.
        fn begin(&mut self) {
            self.send("EHLO client.test\r\n");
            let r = self.send("MAIL FROM:<alice@client.test>\r\nRCPT TO:<bob@example.test>\r\n");
            assert_eq!(r, "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n");
        }

        fn body(&self, i: usize) -> String {
            String::from_utf8(self.queued[i].2.clone()).unwrap()
        }
    }

    fn content_of(body: &str) -> &str {
        // The Received header ends at the first line that does not start with a tab.
        let mut rest = body;
        loop {
            let (line, tail) = rest.split_once("\r\n").unwrap();
            rest = tail;
            if !tail.starts_with('\t') {
                assert!(line.starts_with("Received: ") || line.starts_with('\t'));
                return rest;
            }
        }
    }

    #[test]
    fn greeting_and_ehlo() {
        let mut h = H::std();
        assert_eq!(h.s.greeting().to_string(), "220 mx.test ESMTP Tern");
        let r = h.send("EHLO client.test\r\n");
        assert_eq!(
            r,
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 36700160\r\n250-ENHANCEDSTATUSCODES\r\n\
             250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n250 SMTPUTF8\r\n"
        );
        assert_eq!(h.send("HELO old.test\r\n"), "250 2.0.0 mx.test\r\n");
    }

    #[test]
    fn full_transaction() {
        let mut h = H::std();
        h.begin();
        assert_eq!(h.send("DATA\r\n"), "354 Start mail input; end with <CRLF>.<CRLF>\r\n");
        assert_eq!(h.s.read_timeout(), Duration::from_secs(180));
        let r = h.send("Subject: t\r\n\r\nHello\r\n.\r\n");
        assert_eq!(r, "250 2.0.0 Ok: queued as Q1\r\n");
        assert_eq!(h.s.read_timeout(), Duration::from_secs(300));
        let (id, env, _) = &h.queued[0];
        assert_eq!(id, "Q1");
        assert_eq!(env.reverse_path, "alice@client.test");
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(env.recipients[0].address, "bob@example.test");
        assert_eq!(env.helo, "client.test");
        assert_eq!(env.client_ip, "192.0.2.1");
        assert_eq!(env.body_type, BodyType::SevenBit);
        let body = h.body(0);
        assert!(
            body.starts_with(
                "Received: from client.test ([192.0.2.1])\r\n\tby mx.test (Tern) with ESMTP id Q1\r\n\
                 \tfor <bob@example.test>; "
            ),
            "{body}"
        );
        assert_eq!(content_of(&body), "Subject: t\r\n\r\nHello\r\n");
        assert_eq!(h.send("QUIT\r\n"), "221 2.0.0 Bye\r\n");
        assert!(h.closed);
    }

    #[test]
    fn pipelined_transaction_in_one_buffer() {
        let mut h = H::std();
        let r = h.send(
            "EHLO c.test\r\nMAIL FROM:<a@c.test> BODY=8BITMIME\r\nRCPT TO:<b@example.test>\r\n\
             RCPT TO:<c@relay.test>\r\nDATA\r\nHi\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<d@example.test>\r\n\
             DATA\r\nsecond\r\n.\r\nQUIT\r\nNOOP\r\n",
        );
        let codes: Vec<&str> = r.lines().map(|l| &l[..4]).filter(|c| !c.ends_with('-')).collect();
        assert_eq!(
            codes,
            ["250 ", "250 ", "250 ", "250 ", "354 ", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "]
        );
        assert!(h.closed);
        assert_eq!(h.queued.len(), 2);
        assert_eq!(h.queued[0].1.recipients.len(), 2);
        assert_eq!(h.queued[0].1.body_type, BodyType::EightBitMime);
        // No `for` clause with several recipients.
        assert!(!h.body(0).contains("\tfor <"));
        assert!(h.body(0).contains("with ESMTP id Q1; "));
        assert_eq!(content_of(&h.body(1)), "second\r\n");
        assert_eq!(h.queued[1].1.reverse_path, "");
    }

    #[test]
    fn byte_by_byte_input() {
        let mut h = H::std();
        let script = "EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n..x\r\n.\r\n\
                      BDAT 3\r\nabcMAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 3 LAST\r\nxyz";
        let mut all = String::new();
        for b in script.bytes() {
            all.push_str(&h.send([b]));
        }
        assert_eq!(h.queued.len(), 2);
        assert_eq!(content_of(&h.body(0)), ".x\r\n");
        assert_eq!(content_of(&h.body(1)), "xyz");
        assert!(all.contains("503 5.5.1 Error: need MAIL command\r\n"));
    }

    #[test]
    fn sequence_and_syntax_errors() {
        let mut h = H::new(SessionConfig {
            max_errors: 100,
            ..config()
        });
        assert_eq!(h.send("FOO\r\n"), "500 5.5.2 Error: command not recognized\r\n");
        assert_eq!(h.send("\r\n"), "500 5.5.2 Error: bad syntax\r\n");
        assert_eq!(
            h.send(b"NO\xffOP\r\n"),
            "500 5.5.2 Error: bad UTF-8 syntax or control character\r\n"
        );
        assert_eq!(
            h.send("MAIL FROM:<a@c.test>\r\n"),
            "503 5.5.1 Error: send HELO/EHLO first\r\n"
        );
        h.send("EHLO c.test\r\n");
        assert_eq!(
            h.send("RCPT TO:<b@example.test>\r\n"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Error: need RCPT command\r\n");
        assert_eq!(
            h.send("MAIL FROM:<a@c.test> SIZE=x\r\n"),
            "501 5.5.4 Bad SIZE parameter syntax\r\n"
        );
        assert_eq!(
            h.send("MAIL FROM:<a@c.test> FOO\r\n"),
            "555 5.5.4 Unsupported option: FOO\r\n"
        );
        assert_eq!(
            h.send("MAIL FROM:a@c.test\r\n"),
            "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        );
        assert_eq!(h.send("MAIL FROM:<a@c.test>\r\n"), "250 2.1.0 Sender ok\r\n");
        assert_eq!(
            h.send("MAIL FROM:<a@c.test>\r\n"),
            "503 5.5.1 Error: nested MAIL command\r\n"
        );
        assert_eq!(h.send("DATA\r\n"), "554 5.5.1 Error: no valid recipients\r\n");
        assert_eq!(
            h.send("RCPT TO:<b@example.test> NOTIFY=NEVER,DELAY\r\n"),
            "501 5.5.4 Bad NOTIFY parameter syntax\r\n"
        );
        assert!(!h.closed);
    }

    #[test]
    fn misc_commands() {
        let mut h = H::std();
        assert_eq!(h.send("NOOP\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(h.send("noop\r\n"), "250 2.0.0 Ok\r\n");
        assert!(h.send("VRFY bob\r\n").starts_with("252 2.5.2 "));
        assert_eq!(h.send("EXPN list\r\n"), "502 5.5.1 Error: command not implemented\r\n");
        assert!(h.send("HELP\r\n").starts_with("214 2.0.0 "));
        assert_eq!(h.send("STARTTLS\r\n"), "502 5.5.1 Error: command not implemented\r\n");
        assert_eq!(h.send("RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(h.send("RSET x\r\n"), "501 5.5.4 Syntax: RSET\r\n");
    }

    #[test]
    fn rset_discards_transaction() {
        let mut h = H::std();
        h.begin();
        assert_eq!(h.send("RSET\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(
            h.send("RCPT TO:<b@example.test>\r\n"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        assert_eq!(h.send("MAIL FROM:<a@c.test>\r\n"), "250 2.1.0 Sender ok\r\n");
        // EHLO also resets.
        h.send("EHLO again.test\r\n");
        assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Error: need RCPT command\r\n");
    }

    #[test]
    fn smuggling_variants_are_rejected_and_session_stays_in_sync() {
        for v in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\n.\r", "\r\n.\r"] {
            let mut h = H::std();
            h.begin();
            h.send("DATA\r\n");
            let smuggled = format!(
                "legit{v}MAIL FROM:<evil@c.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
            );
            let r = h.send(smuggled);
            assert_eq!(
                r, "550 5.6.0 Bare CR or LF in message (SMTP smuggling protection)\r\n",
                "variant {v:?}"
            );
            assert!(h.queued.is_empty(), "variant {v:?} enqueued something");
            assert_eq!(h.send("NOOP\r\n"), "250 2.0.0 Ok\r\n");
            // The transaction is gone; a new one works.
            assert_eq!(
                h.send("RCPT TO:<b@example.test>\r\n"),
                "503 5.5.1 Error: need MAIL command\r\n"
            );
            h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
            assert_eq!(h.send("ok\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
        }
    }

    #[test]
    fn bare_lf_inside_text_is_rejected() {
        let mut h = H::std();
        h.begin();
        let r = h.send("DATA\r\nline one\nline two\r\n.\r\n");
        assert!(r.ends_with("550 5.6.0 Bare CR or LF in message (SMTP smuggling protection)\r\n"));
        assert!(h.queued.is_empty());
    }

    #[test]
    fn dot_unstuffing() {
        let mut h = H::std();
        h.begin();
        h.send("DATA\r\n..\r\n..leading\r\nmid.dot\r\n....\r\n.\r\n");
        assert_eq!(content_of(&h.body(0)), ".\r\n.leading\r\nmid.dot\r\n...\r\n");
    }

    #[test]
    fn command_line_limit() {
        let mut h = H::std();
        let ok = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 7));
        assert_eq!(ok.len(), 512);
        assert_eq!(h.send(&ok), "250 2.0.0 Ok\r\n");
        let long = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 6));
        assert_eq!(h.send(&long), "500 5.5.2 Error: line too long\r\n");
        // Far longer, across several reads, without buffering it all.
        assert_eq!(h.send("MAIL FROM:<".to_string() + &"a".repeat(3000)), "");
        assert!(h.input.len() < MAX_COMMAND_LINE);
        assert_eq!(h.send("a".repeat(3000)), "");
        assert_eq!(
            h.send(">\r\nNOOP\r\n"),
            "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"
        );
    }

    #[test]
    fn text_line_limit() {
        let mut h = H::std();
        h.begin();
        let ok = format!("DATA\r\n{}\r\n.\r\n", "x".repeat(998));
        assert_eq!(h.send(ok).lines().last().unwrap(), "250 2.0.0 Ok: queued as Q1");
        h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n");
        let long = format!("DATA\r\n{}\r\n.\r\nNOOP\r\n", "x".repeat(999));
        let r = h.send(long);
        assert!(
            r.ends_with("550 5.6.0 Message line too long (limit 1000 octets including CRLF)\r\n250 2.0.0 Ok\r\n"),
            "{r}"
        );
        assert_eq!(h.queued.len(), 1);
    }

    #[test]
    fn a_refusal_answers_new_transactions_and_lifts() {
        let full = || Reply::new(452, "4.3.1", "Insufficient system storage");
        let mut h = H::new(SessionConfig {
            max_errors: 2,
            ..config()
        });
        h.s.set_refusal(Some(full()));
        // Sequence errors keep their own replies.
        assert!(h.send("MAIL FROM:<a@c.test>\r\n").starts_with("503 5.5.1"));
        h.send("EHLO c.test\r\n");
        for _ in 0..3 {
            // Flow control: never counted towards max_errors.
            assert_eq!(
                h.send("MAIL FROM:<a@c.test>\r\n"),
                "452 4.3.1 Insufficient system storage\r\n"
            );
        }
        assert!(!h.closed);
        h.s.set_refusal(None);
        h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n");
        // The disk fills mid-transaction: RCPT, DATA and BDAT are refused too.
        h.s.set_refusal(Some(full()));
        assert!(h.send("RCPT TO:<c@example.test>\r\n").starts_with("452 4.3.1"));
        assert!(h.send("DATA\r\n").starts_with("452 4.3.1"));
        assert!(h.send("BDAT 3 LAST\r\nabc").starts_with("452 4.3.1"));
        assert!(h.queued.is_empty());
        h.s.set_refusal(None);
        let r = h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
        assert!(r.contains("250 2.0.0 Ok: queued as "), "{r}");
        assert_eq!(h.queued.len(), 1);
    }

    #[test]
    fn path_limit() {
        let mut h = H::std();
        h.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n");
        let local = "a".repeat(60);
        let domain = format!("{}.example.test", "d.".repeat(95));
        let r = h.send(format!("RCPT TO:<{local}@{domain}>\r\n"));
        assert_eq!(r, "501 5.1.3 Path too long\r\n");
        let r = h.send(format!("RCPT TO:<{}@example.test>\r\n", "a".repeat(65)));
        assert_eq!(r, "501 5.1.3 Local part too long\r\n");
    }

    #[test]
    fn recipient_limit() {
        let mut h = H::new(SessionConfig {
            max_recipients: 100,
            max_errors: 2,
            ..config()
        });
        h.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n");
        let mut cmds = String::new();
        for i in 0..101 {
            cmds.push_str(&format!("RCPT TO:<u{i}@example.test>\r\n"));
        }
        let r = h.send(cmds);
        assert_eq!(r.matches("250 2.1.5").count(), 100);
        assert!(r.ends_with("452 4.5.3 Too many recipients\r\n"));
        // 452 is flow control and does not count toward max_errors.
        assert_eq!(
            h.send("RCPT TO:<x@example.test>\r\n"),
            "452 4.5.3 Too many recipients\r\n"
        );
        assert!(!h.closed);
        h.send("DATA\r\nx\r\n.\r\n");
        assert_eq!(h.queued[0].1.recipients.len(), 100);
    }

    #[test]
    fn size_limits() {
        let mut h = H::new(SessionConfig {
            max_message_size: 100,
            ..config()
        });
        h.send("EHLO c.test\r\n");
        assert!(h.send("EHLO c.test\r\n").contains("250-SIZE 100\r\n"));
        assert_eq!(
            h.send("MAIL FROM:<a@c.test> SIZE=101\r\n"),
            "552 5.3.4 Message size exceeds fixed limit\r\n"
        );
        assert_eq!(h.send("MAIL FROM:<a@c.test> SIZE=100\r\n"), "250 2.1.0 Sender ok\r\n");
        h.send("RCPT TO:<b@example.test>\r\nDATA\r\n");
        let r = h.send(format!("{}\r\n.\r\nNOOP\r\n", "x".repeat(150)));
        assert_eq!(r, "552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n");
        assert!(h.queued.is_empty());
        assert_eq!(h.queued.len(), 0);
        assert_eq!(h.queued.first().map(|q| q.1.declared_size), None);
        h.send("MAIL FROM:<a@c.test> SIZE=50\r\nRCPT TO:<b@example.test>\r\nDATA\r\nsmall\r\n.\r\n");
        assert_eq!(h.queued[0].1.declared_size, Some(50));
    }

    #[test]
    fn bdat_chunks() {
        let mut h = H::std();
        h.begin();
        let r = h.send("BDAT 7\r\nHello, BDAT 6 LAST\r\nworld!NOOP\r\n");
        assert_eq!(
            r,
            "250 2.0.0 7 octets received\r\n250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"
        );
        assert_eq!(content_of(&h.body(0)), "Hello, world!");
        // Raw octets: no dot processing, bare LF allowed.
        h.send("MAIL FROM:<a@c.test> BODY=BINARYMIME\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(h.send("BDAT 5\r\n.\r\n\n\0"), "250 2.0.0 5 octets received\r\n");
        assert_eq!(h.send("BDAT 0 LAST\r\n"), "250 2.0.0 Ok: queued as Q2\r\n");
        assert_eq!(content_of(&h.body(1)).as_bytes(), b".\r\n\n\0");
        assert_eq!(h.queued[1].1.body_type, BodyType::BinaryMime);
    }

    #[test]
    fn bdat_zero_last() {
        let mut h = H::std();
        h.begin();
        assert_eq!(h.send("BDAT 0 LAST\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
        assert_eq!(content_of(&h.body(0)), "");
    }

    #[test]
    fn bdat_errors_consume_octets() {
        let mut h = H::new(SessionConfig {
            max_message_size: 20,
            ..config()
        });
        h.send("EHLO c.test\r\n");
        // No transaction: 503, but the 10 octets are still eaten.
        assert_eq!(
            h.send("BDAT 10\r\nMAIL FROM:NOOP\r\n"),
            "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"
        );
        h.send("MAIL FROM:<a@c.test>\r\n");
        assert_eq!(
            h.send("BDAT 4 LAST\r\nQUITNOOP\r\n"),
            "554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n"
        );
        h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(h.send("BDAT 15\r\n123456789012345"), "250 2.0.0 15 octets received\r\n");
        // Over the limit in total: rejected after the octets, in pieces.
        assert_eq!(h.send("BDAT 10 LAST\r\n12345"), "");
        assert_eq!(
            h.send("67890NOOP\r\n"),
            "552 5.3.4 Message size exceeds fixed limit\r\n250 2.0.0 Ok\r\n"
        );
        assert!(h.queued.is_empty());
        // The failed chunk ended the transaction.
        assert_eq!(h.send("BDAT 1 LAST\r\nx"), "503 5.5.1 Error: need MAIL command\r\n");
    }

    #[test]
    fn data_and_bdat_do_not_mix() {
        let mut h = H::std();
        h.begin();
        h.send("BDAT 3\r\nabc");
        assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Error: DATA after BDAT\r\n");
        assert_eq!(
            h.send("RCPT TO:<c@example.test>\r\n"),
            "503 5.5.1 Error: RCPT after BDAT\r\n"
        );
        h.send("RSET\r\nMAIL FROM:<a@c.test> BODY=BINARYMIME\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Error: BODY=BINARYMIME requires BDAT\r\n");
    }

    #[test]
    fn dsn_parameters_are_stored() {
        let mut h = H::std();
        h.send(
            "EHLO c.test\r\nMAIL FROM:<a@c.test> RET=HDRS ENVID=abc+2Bdef\r\n\
             RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.test\r\n\
             RCPT TO:<c@example.test> NOTIFY=NEVER\r\nRCPT TO:<d@example.test>\r\nDATA\r\nx\r\n.\r\n",
        );
        let env = &h.queued[0].1;
        assert_eq!(env.ret, Some(Ret::Hdrs));
        assert_eq!(env.envid.as_deref(), Some("abc+def"));
        let r = &env.recipients;
        assert_eq!(
            r[0].notify,
            Notify {
                given: true,
                never: false,
                success: true,
                failure: true,
                delay: false
            }
        );
        assert_eq!(r[0].orcpt.as_deref(), Some("rfc822;b+x@example.test"));
        assert!(r[1].notify.never && r[1].notify.given);
        assert_eq!(r[2].notify, Notify::default());
        assert_eq!(r[2].orcpt, None);
    }

    #[test]
    fn smtputf8() {
        let mut h = H::std();
        h.send("EHLO c.test\r\n");
        assert_eq!(
            h.send("MAIL FROM:<jörg@c.test>\r\n"),
            "553 5.6.7 Must declare SMTPUTF8 to send Unicode address\r\n"
        );
        h.send("MAIL FROM:<a@c.test>\r\n");
        assert_eq!(
            h.send("RCPT TO:<jörg@example.test>\r\n"),
            "553 5.6.7 Must declare SMTPUTF8 to send Unicode address\r\n"
        );
        h.send("RSET\r\n");
        assert_eq!(
            h.send("MAIL FROM:<jörg@c.test> SMTPUTF8\r\n"),
            "250 2.1.0 Sender ok\r\n"
        );
        assert_eq!(
            h.send("RCPT TO:<δοκιμή@example.test>\r\n"),
            "250 2.1.5 Recipient ok\r\n"
        );
        h.send("DATA\r\nSubject: ü\r\n.\r\n");
        assert!(h.queued[0].1.smtputf8);
        assert_eq!(h.queued[0].1.recipients[0].address, "δοκιμή@example.test");
    }

    #[test]
    fn relay_policy() {
        let mut h = H::std();
        h.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n");
        assert_eq!(
            h.send("RCPT TO:<x@elsewhere.test>\r\n"),
            "554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
        );
        assert_eq!(h.send("RCPT TO:<x@EXAMPLE.TEST>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(h.send("RCPT TO:<x@Relay.Test>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(h.send("RCPT TO:<postmaster>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(
            h.send("RCPT TO:<@hop.test:y@example.test>\r\n"),
            "250 2.1.5 Recipient ok\r\n"
        );

        let mut cfg = config();
        cfg.relay.relay_networks = vec!["192.0.2.0/24".parse().unwrap()];
        let mut h = H::new(cfg);
        h.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n");
        assert_eq!(h.send("RCPT TO:<x@elsewhere.test>\r\n"), "250 2.1.5 Recipient ok\r\n");
        h.send("DATA\r\nx\r\n.\r\n");
        assert_eq!(h.queued[0].1.recipients[1..].len(), 0);
    }

    #[test]
    fn relay_policy_allows() {
        let p = RelayPolicy {
            local_domains: vec!["Example.Test".into()],
            relay_domains: vec![],
            relay_networks: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let outside: IpAddrT = "192.0.2.9".parse().unwrap();
        assert!(p.allows(outside, "example.test"));
        assert!(!p.allows(outside, "other.test"));
        assert!(p.allows("10.1.2.3".parse().unwrap(), "other.test"));
        assert!(p.allows("::ffff:10.1.2.3".parse().unwrap(), "other.test"));
    }
    type IpAddrT = std::net::IpAddr;

    #[test]
    fn too_many_errors_closes() {
        let mut h = H::new(SessionConfig {
            max_errors: 3,
            ..config()
        });
        let r = h.send("FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n");
        assert_eq!(
            r,
            "500 5.5.2 Error: command not recognized\r\n500 5.5.2 Error: command not recognized\r\n\
             250 2.0.0 Ok\r\n500 5.5.2 Error: command not recognized\r\n\
             421 4.7.0 mx.test Error: too many errors\r\n"
        );
        assert!(h.closed);
        assert_eq!(h.send("NOOP\r\n"), "");
    }

    #[test]
    fn enqueue_failures() {
        let mut h = H::std();
        h.begin();
        h.next_result = Some(EnqueueError::Temporary("Queue unavailable".into()));
        assert_eq!(
            h.send("DATA\r\nx\r\n.\r\n").lines().last().unwrap(),
            "451 4.3.0 Queue unavailable"
        );
        h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n");
        h.next_result = Some(EnqueueError::Permanent("Rejected".into()));
        assert_eq!(h.send("BDAT 1 LAST\r\nx"), "554 5.3.0 Rejected\r\n");
        // The transaction was reset after each.
        assert_eq!(h.send("DATA\r\n"), "503 5.5.1 Error: need RCPT command\r\n");
    }

    #[test]
    fn starttls_discards_pipelined_input_and_resets() {
        let mut cfg = config();
        cfg.starttls = true;
        let mut h = H::new(cfg);
        assert!(h.send("EHLO c.test\r\n").contains("250-STARTTLS\r\n"));
        h.send("MAIL FROM:<a@c.test>\r\n");
        assert_eq!(
            h.send("STARTTLS\r\n"),
            "503 5.5.1 Error: MAIL transaction in progress\r\n"
        );
        h.send("RSET\r\n");
        let r = h.send("STARTTLS\r\nMAIL FROM:<evil@c.test>\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(r, "220 2.0.0 Ready to start TLS\r\n");
        assert_eq!(h.tls_starts, 1);
        // Back to the initial state: EHLO required again.
        assert_eq!(
            h.send("MAIL FROM:<a@c.test>\r\n"),
            "503 5.5.1 Error: send HELO/EHLO first\r\n"
        );
        let ehlo = h.send("EHLO c.test\r\n");
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        assert_eq!(h.send("STARTTLS\r\n"), "503 5.5.1 Error: TLS already active\r\n");
        h.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
        assert!(h.body(0).contains(
            "with ESMTPS id Q1\r\n\t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)\r\n\tfor <b@example.test>; "
        ));
    }

    #[test]
    fn helo_is_plain_smtp() {
        let mut h = H::std();
        h.send(
            "HELO old.test\r\nMAIL FROM:<@a.test,@b.test:a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert!(h
            .body(0)
            .starts_with("Received: from old.test ([192.0.2.1])\r\n\tby mx.test (Tern) with SMTP id Q1\r\n"));
        assert_eq!(h.queued[0].1.reverse_path, "a@c.test");
        assert_eq!(h.queued[0].1.helo, "old.test");
    }

    #[test]
    fn timeout_and_shutdown_replies() {
        let mut h = H::std();
        assert_eq!(
            h.s.timeout_reply().to_string(),
            "421 4.4.2 mx.test Error: timeout exceeded"
        );
        assert_eq!(h.send("NOOP\r\n"), "");
        assert!(h.closed);
        let mut h = H::std();
        assert_eq!(
            h.s.shutdown_reply().to_string(),
            "421 4.3.2 mx.test Service shutting down"
        );
    }

    #[test]
    fn local_recipients_are_verified_at_rcpt_time_in_pipeline_order() {
        let mut cfg = config();
        cfg.verify_recipients = true;
        let mut h = H::new(cfg);
        h.send("EHLO c\r\n");
        let replies = h.send(
            "MAIL FROM:<a@x.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<unknown@example.test>\r\nRCPT TO:<r@relay.test>\r\nDATA\r\n",
        );
        assert_eq!(
            replies,
            "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n550 5.1.1 <unknown@example.test>: User unknown\r\n250 2.1.5 Recipient ok\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n"
        );
        h.send("Subject: x\r\n\r\nhi\r\n.\r\n");
        let (_, envelope, _) = h.queued.last().unwrap();
        let rcpts: Vec<_> = envelope.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["bob@example.test", "r@relay.test"]);
    }

    #[test]
    fn screened_recipients_wait_for_the_verdict_and_postmaster_is_never_screened() {
        let mut cfg = config();
        cfg.verify_recipients = true;
        cfg.screen_recipients = true;
        let mut h = H::new(cfg);
        h.send("EHLO c\r\n");
        let replies = h.send(
            "MAIL FROM:<new@x.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<postmaster>\r\nRSET\r\nMAIL FROM:<old@x.test>\r\nRCPT TO:<unknown@example.test>\r\nRCPT TO:<bob@example.test>\r\n",
        );
        assert_eq!(
            replies,
            "250 2.1.0 Sender ok\r\n451 4.7.1 Greylisted\r\n250 2.1.5 Recipient ok\r\n250 2.0.0 Ok\r\n250 2.1.0 Sender ok\r\n550 5.1.1 <unknown@example.test>: User unknown\r\n250 2.1.5 Recipient ok\r\n"
        );
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn submission_config() -> SessionConfig {
        SessionConfig {
            starttls: true,
            submission: true,
            max_errors: 100,
            ..config()
        }
    }

    impl H {
        /// A submission session after STARTTLS and EHLO.
        fn submission() -> Self {
            let mut h = H::new(submission_config());
            h.send("EHLO c.test\r\nSTARTTLS\r\n");
            assert!(h.send("EHLO c.test\r\n").contains("250-AUTH PLAIN LOGIN\r\n"));
            h
        }
    }

    const ALICE_PLAIN: &str = "\0alice@example.test\0secret";

    #[test]
    fn submission_needs_tls_before_auth_and_auth_before_mail() {
        let mut h = H::new(submission_config());
        let ehlo = h.send("EHLO c.test\r\n");
        assert!(ehlo.contains("250-STARTTLS\r\n") && !ehlo.contains("AUTH"), "{ehlo}");
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64(ALICE_PLAIN))),
            "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        );
        assert_eq!(
            h.send("MAIL FROM:<alice@example.test>\r\n"),
            "530 5.7.0 Authentication required\r\n"
        );
        assert!(h.auths.is_empty());
        h.send("STARTTLS\r\n");
        assert_eq!(
            h.send("AUTH PLAIN\r\n"),
            "503 5.5.1 Error: send EHLO first\r\n",
            "a new EHLO is needed after STARTTLS"
        );
        let ehlo = h.send("EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-AUTH PLAIN LOGIN\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(
            h.send("MAIL FROM:<alice@example.test>\r\n"),
            "530 5.7.0 Authentication required\r\n"
        );
        assert_eq!(h.send("MAIL FROM:<>\r\n"), "530 5.7.0 Authentication required\r\n");
        // The MX listener neither offers nor accepts AUTH.
        let mut mx = H::new(SessionConfig {
            starttls: true,
            ..config()
        });
        mx.send("EHLO c.test\r\nSTARTTLS\r\n");
        assert!(!mx.send("EHLO c.test\r\n").contains("AUTH"));
        assert_eq!(
            mx.send("AUTH PLAIN\r\n"),
            "502 5.5.1 Error: command not implemented\r\n"
        );
    }

    #[test]
    fn auth_plain_with_initial_response_then_relay_anywhere() {
        let mut h = H::submission();
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64(ALICE_PLAIN))),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(h.auths, [("PLAIN", "alice@example.test".to_string())]);
        // Not a local or relay domain, and the client is in no relay network.
        let r = h.send(
            "MAIL FROM:<alice@EXAMPLE.test>\r\nRCPT TO:<bob@elsewhere.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n",
        );
        assert!(r.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{r}");
        let env = &h.queued[0].1;
        assert_eq!(env.auth_user.as_deref(), Some("alice@example.test"));
        assert!(
            h.body(0).contains("with ESMTPSA id Q1\r\n\t(using TLSv1.3"),
            "{}",
            h.body(0)
        );
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64(ALICE_PLAIN))),
            "503 5.5.1 Error: already authenticated\r\n"
        );
        h.send("MAIL FROM:<alice@example.test>\r\n");
        assert_eq!(
            h.send("AUTH LOGIN\r\n"),
            "503 5.5.1 Error: MAIL transaction in progress\r\n"
        );
    }

    #[test]
    fn auth_plain_after_empty_challenge_and_authzid() {
        let mut h = H::submission();
        assert_eq!(h.send("AUTH PLAIN\r\n"), "334 \r\n");
        assert_eq!(
            h.send(format!("{}\r\n", b64("alice@example.test\0alice@example.test\0secret"))),
            "235 2.7.0 Authentication successful\r\n"
        );
        let mut h = H::submission();
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64("bob\0alice@example.test\0secret"))),
            "535 5.7.8 Authorization identity must be empty or the user name\r\n"
        );
        assert!(h.auths.is_empty(), "no password check for a refused authzid");
        assert_eq!(
            h.send(format!("AUTH plain {}\r\n", b64("alice\0secret"))),
            "501 5.5.2 Error: malformed authentication data\r\n"
        );
        // `=` is the empty initial response: malformed for PLAIN.
        assert_eq!(
            h.send("AUTH PLAIN =\r\n"),
            "501 5.5.2 Error: malformed authentication data\r\n"
        );
    }

    #[test]
    fn auth_login_with_and_without_initial_response() {
        let mut h = H::submission();
        assert_eq!(h.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(
            h.send(format!("{}\r\n", b64("alice@example.test"))),
            "334 UGFzc3dvcmQ6\r\n"
        );
        assert_eq!(
            h.send(format!("{}\r\n", b64("secret"))),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(h.auths, [("LOGIN", "alice@example.test".to_string())]);
        let mut h = H::submission();
        assert_eq!(
            h.send(format!("AUTH LOGIN {}\r\n", b64("alice@example.test"))),
            "334 UGFzc3dvcmQ6\r\n"
        );
        assert_eq!(
            h.send(format!("{}\r\n", b64("wrong"))),
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
        // A failed AUTH may be retried; pipelining MAIL after a one-step PLAIN.
        let r = h.send(format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<x@team.test>\r\n",
            b64(ALICE_PLAIN)
        ));
        assert_eq!(r, "235 2.7.0 Authentication successful\r\n250 2.1.0 Sender ok\r\n");
    }

    #[test]
    fn auth_cancel_bad_base64_unknown_mechanism_and_rate_limit() {
        let mut h = H::submission();
        assert_eq!(h.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
        assert_eq!(h.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        h.send(format!("{}\r\n", b64("alice@example.test")));
        assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
        assert_eq!(h.send("AUTH PLAIN\r\n"), "334 \r\n");
        assert_eq!(h.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
        // Back to commands after each.
        assert_eq!(h.send("NOOP\r\n"), "250 2.0.0 Ok\r\n");
        assert_eq!(h.send("AUTH PLAIN !!!\r\n"), "501 5.5.2 Error: invalid base64 data\r\n");
        assert_eq!(h.send("AUTH PLAIN\r\n"), "334 \r\n");
        assert_eq!(h.send("not base64\r\n"), "501 5.5.2 Error: invalid base64 data\r\n");
        assert_eq!(
            h.send("AUTH CRAM-MD5\r\n"),
            "504 5.5.4 Unrecognized authentication type\r\n"
        );
        assert_eq!(
            h.send("AUTH\r\n"),
            "501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
        );
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64("\0limited\0x"))),
            "454 4.7.0 Too many failed authentication attempts, try again later\r\n"
        );
        assert!(h.auths.iter().all(|(_, u)| u == "limited"));
        // An over-long response ends the exchange; the session stays in sync.
        assert_eq!(h.send("AUTH PLAIN\r\n"), "334 \r\n");
        let long = format!("{}\r\nNOOP\r\n", "A".repeat(MAX_COMMAND_LINE));
        assert_eq!(h.send(long), "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n");
        assert!(!h.closed);
    }

    #[test]
    fn authenticated_sender_must_be_owned() {
        let mut h = H::submission();
        h.send(format!("AUTH PLAIN {}\r\n", b64(ALICE_PLAIN)));
        assert_eq!(
            h.send("MAIL FROM:<bob@example.test>\r\n"),
            "553 5.7.1 Sender address not owned by user alice@example.test\r\n"
        );
        assert_eq!(
            h.send("MAIL FROM:<Alice@example.test>\r\n"),
            "553 5.7.1 Sender address not owned by user alice@example.test\r\n",
            "local parts are compared exactly"
        );
        assert_eq!(h.send("MAIL FROM:<anyone@TEAM.test>\r\n"), "250 2.1.0 Sender ok\r\n");
        h.send("RSET\r\n");
        // The null sender is allowed.
        assert_eq!(h.send("MAIL FROM:<>\r\n"), "250 2.1.0 Sender ok\r\n");
        assert_eq!(h.send("RCPT TO:<x@far.test>\r\n"), "250 2.1.5 Recipient ok\r\n");
    }

    #[test]
    fn content_spans_bdat_chunks_and_ends_with_the_transaction() {
        let mut h = H::std();
        h.begin();
        assert!(!h.s.receiving_content());
        h.send("BDAT 4\r\nab");
        assert!(h.s.receiving_content() && h.s.in_data());
        h.send("cd");
        assert!(h.s.receiving_content() && !h.s.in_data(), "between chunks");
        h.send("BDAT 1 LAST\r\ne");
        assert!(!h.s.receiving_content());
        h.send("MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
        assert!(h.s.receiving_content());
        h.send("x\r\n.\r\n");
        assert!(!h.s.receiving_content());
        assert_eq!(h.queued.len(), 2);
    }

    #[test]
    fn junk_commands_are_bounded_between_messages() {
        let mut h = H::new(SessionConfig {
            max_junk_commands: 4,
            ..config()
        });
        h.begin(); // EHLO: 1
        assert_eq!(h.send("NOOP\r\nRSET\r\n"), "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"); // 3
        h.send("MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nx\r\n.\r\n");
        assert_eq!(h.queued.len(), 1);
        // The queued message started a new count.
        for _ in 0..4 {
            assert_eq!(h.send("NOOP\r\n"), "250 2.0.0 Ok\r\n");
        }
        assert!(!h.closed);
        assert_eq!(
            h.send("VRFY x\r\nNOOP\r\n"),
            "421 4.7.0 mx.test Error: too many commands without mail\r\n"
        );
        assert!(h.closed);
    }

    fn budgeted(bytes: u64) -> (H, Arc<TestBudget>) {
        let memory = Arc::new(TestBudget {
            capacity: bytes,
            used: AtomicU64::new(0),
        });
        let h = H::new(SessionConfig {
            memory: Arc::clone(&memory) as Arc<dyn MemoryBudget>,
            max_message_size: 1 << 20,
            ..config()
        });
        (h, memory)
    }

    #[test]
    fn data_over_the_memory_budget_gets_452_and_frees_it() {
        let (mut h, memory) = budgeted(200_000);
        h.begin();
        assert_eq!(h.send("DATA\r\n"), "354 Start mail input; end with <CRLF>.<CRLF>\r\n");
        assert_eq!(memory.used(), INITIAL_RESERVATION);
        let line = format!("{}\r\n", "x".repeat(98));
        let r = h.send(line.repeat(3000));
        assert_eq!(r, "");
        assert_eq!(memory.used(), 0, "stopped buffering and gave its share back");
        assert_eq!(
            h.send(".\r\n"),
            "452 4.3.1 Insufficient system storage, try again later\r\n"
        );
        assert!(h.queued.is_empty());
        // The session stays usable; a message that fits is queued.
        h.send("MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(
            h.send(format!("DATA\r\n{}.\r\n", line.repeat(1000))),
            "354 Start mail input; end with <CRLF>.<CRLF>\r\n250 2.0.0 Ok: queued as Q1\r\n"
        );
        assert_eq!(memory.used(), 0);
        assert_eq!(h.s.errors, 0, "452 is flow control, not a client error");
    }

    #[test]
    fn data_refused_up_front_when_the_declared_size_does_not_fit() {
        let (mut h, memory) = budgeted(200_000);
        let held = memory.try_reserve(150_000).unwrap();
        h.send("EHLO client.test\r\n");
        h.send("MAIL FROM:<a@client.test> SIZE=100000\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(
            h.send("DATA\r\n"),
            "452 4.3.1 Insufficient system storage, try again later\r\n"
        );
        drop(held);
        // Same transaction, retried once memory is free: SIZE is reserved up front.
        assert_eq!(h.send("DATA\r\n"), "354 Start mail input; end with <CRLF>.<CRLF>\r\n");
        assert_eq!(memory.used(), 100_000);
        assert_eq!(h.send("hi\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn reservation_is_held_until_the_enqueue_result() {
        let (mut h, memory) = budgeted(200_000);
        h.begin();
        h.input.extend_from_slice(b"DATA\r\nhello\r\n.\r\n");
        let mut enqueued = false;
        for _ in 0..10 {
            if let Output::Enqueue { .. } = h.s.next(&mut h.input) {
                enqueued = true;
                break;
            }
        }
        assert!(enqueued);
        assert_eq!(memory.used(), INITIAL_RESERVATION);
        h.s.enqueue_result(Err(EnqueueError::Temporary("later".into())));
        assert_eq!(memory.used(), 0);
        // And on a disconnect mid-DATA: the session is dropped.
        h.begin();
        h.send("DATA\r\npartial");
        assert_eq!(memory.used(), INITIAL_RESERVATION);
        drop(h);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn bdat_over_the_memory_budget_fails_the_transaction_only() {
        let (mut h, memory) = budgeted(200_000);
        h.begin();
        assert_eq!(
            h.send(format!("BDAT 100000\r\n{}", "a".repeat(100_000))),
            "250 2.0.0 100000 octets received\r\n"
        );
        assert_eq!(memory.used(), 100_000);
        // The chunk is read and discarded; the transaction is over.
        let r = h.send(format!("BDAT 150000\r\n{}", "b".repeat(150_000)));
        assert_eq!(r, "452 4.3.1 Insufficient system storage, try again later\r\n");
        assert_eq!(memory.used(), 0);
        assert_eq!(h.send("BDAT 1 LAST\r\nx"), "503 5.5.1 Error: need MAIL command\r\n");
        h.send("RSET\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n");
        assert_eq!(h.send("BDAT 5 LAST\r\nhello"), "250 2.0.0 Ok: queued as Q1\r\n");
        assert!(h.body(0).ends_with("hello"));
        assert_eq!(memory.used(), 0);
    }

    /// 2026-12-07T09:00:00Z, the fixed clock of the future-release tests.
    fn fixed_now() -> i64 {
        1_796_634_000
    }

    fn future_release_config() -> SessionConfig {
        SessionConfig {
            future_release: Some(Duration::from_secs(3600)),
            clock: fixed_now,
            ..submission_config()
        }
    }

    /// A submission session with FUTURERELEASE, after STARTTLS, EHLO and AUTH.
    fn future_release_session() -> H {
        let mut h = H::new(future_release_config());
        h.send("EHLO c.test\r\nSTARTTLS\r\n");
        h.send("EHLO c.test\r\n");
        assert_eq!(
            h.send(format!("AUTH PLAIN {}\r\n", b64(ALICE_PLAIN))),
            "235 2.7.0 Authentication successful\r\n"
        );
        h
    }

    #[test]
    fn futurerelease_is_advertised_on_submission_listeners_only() {
        let mut h = H::new(future_release_config());
        let ehlo = h.send("EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-FUTURERELEASE 3600 2026-12-07T10:00:00Z\r\n"),
            "{ehlo}"
        );
        h.send("STARTTLS\r\n");
        let ehlo = h.send("EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-FUTURERELEASE 3600 2026-12-07T10:00:00Z\r\n"),
            "{ehlo}"
        );
        // The MX listener: neither advertised nor accepted, even if configured.
        let mut mx = H::new(SessionConfig {
            submission: false,
            ..future_release_config()
        });
        assert!(!mx.send("EHLO c.test\r\n").contains("FUTURERELEASE"));
        assert_eq!(
            mx.send("MAIL FROM:<a@client.test> HOLDFOR=8\r\n"),
            "555 5.5.4 Unsupported option: HOLDFOR\r\n"
        );
        // A submission listener without the option configured.
        let mut plain = H::submission();
        assert!(!plain.send("EHLO c.test\r\n").contains("FUTURERELEASE"));
    }

    #[test]
    fn holdfor_and_holduntil_set_the_release_time() {
        let mut h = future_release_session();
        let r =
            h.send("MAIL FROM:<alice@example.test> HOLDFOR=8\r\nRCPT TO:<bob@elsewhere.test>\r\nDATA\r\nhi\r\n.\r\n");
        assert_eq!(
            r,
            "250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n\
             250 2.0.0 Ok: queued as Q1\r\n"
        );
        let r = h.send(
            "MAIL FROM:<alice@example.test> HOLDUNTIL=2026-12-07T09:30:00Z\r\nRCPT TO:<bob@elsewhere.test>\r\n\
             BDAT 2 LAST\r\nhi",
        );
        assert!(r.ends_with("250 2.0.0 Ok: queued as Q2\r\n"), "{r}");
        // A time already past is released at once; no hold is no release time.
        h.send("MAIL FROM:<alice@example.test> HOLDUNTIL=2026-12-07T08:00:00Z\r\nRCPT TO:<b@x.test>\r\nDATA\r\nhi\r\n.\r\n");
        h.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\nhi\r\n.\r\n");
        let now = fixed_now();
        assert_eq!(h.releases, [Some(now + 8), Some(now + 1800), Some(now), None]);
    }

    #[test]
    fn hold_errors_get_the_rfc_4865_replies() {
        let mut h = future_release_session();
        for (mail, reply) in [
            (
                "MAIL FROM:<alice@example.test> HOLDFOR=3601",
                "554 5.7.0 Requested release time exceeds the maximum (3600 seconds, until 2026-12-07T10:00:00Z)",
            ),
            (
                "MAIL FROM:<alice@example.test> HOLDUNTIL=2026-12-07T10:00:01Z",
                "554 5.7.0 Requested release time exceeds the maximum (3600 seconds, until 2026-12-07T10:00:00Z)",
            ),
            (
                "MAIL FROM:<alice@example.test> HOLDFOR=8 HOLDUNTIL=2026-12-07T09:30:00Z",
                "501 5.5.4 Invalid parameters: HOLDFOR and HOLDUNTIL together",
            ),
            (
                "MAIL FROM:<alice@example.test> HOLDFOR=soon",
                "501 5.5.4 Bad HOLDFOR parameter syntax",
            ),
            (
                "MAIL FROM:<alice@example.test> HOLDUNTIL=2026-12-07",
                "501 5.5.4 Bad HOLDUNTIL parameter syntax",
            ),
        ] {
            assert_eq!(h.send(format!("{mail}\r\n")), format!("{reply}\r\n"), "{mail}");
        }
        // No transaction was started by any of them.
        assert_eq!(
            h.send("RCPT TO:<b@x.test>\r\n"),
            "503 5.5.1 Error: need MAIL command\r\n"
        );
        // Without AUTH, the submission listener refuses MAIL first (RFC 4954).
        let mut anon = H::new(future_release_config());
        anon.send("EHLO c.test\r\nSTARTTLS\r\n");
        anon.send("EHLO c.test\r\n");
        assert_eq!(
            anon.send("MAIL FROM:<alice@example.test> HOLDFOR=8\r\n"),
            "530 5.7.0 Authentication required\r\n"
        );
        assert!(h.queued.is_empty() && anon.queued.is_empty());
    }

    #[test]
    fn requiretls_is_offered_and_accepted_under_tls_only_and_marked_in_received() {
        let cfg = || SessionConfig {
            starttls: true,
            requiretls: true,
            ..config()
        };
        let mut h = H::new(cfg());
        assert!(!h.send("EHLO c.test\r\n").contains("REQUIRETLS"));
        assert_eq!(
            h.send("MAIL FROM:<a@client.test> REQUIRETLS\r\n"),
            "555 5.5.4 Unsupported option: REQUIRETLS\r\n"
        );
        h.send("STARTTLS\r\n");
        assert!(h.send("EHLO c.test\r\n").contains("250-REQUIRETLS\r\n"));
        assert_eq!(
            h.send("MAIL FROM:<a@client.test> REQUIRETLS=yes\r\n"),
            "501 5.5.4 Bad REQUIRETLS parameter syntax\r\n"
        );
        h.send("MAIL FROM:<a@client.test> REQUIRETLS\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
        assert_eq!(h.send("hi\r\n.\r\n"), "250 2.0.0 Ok: queued as Q1\r\n");
        let received = h.body(0).split("\r\n\r\n").next().unwrap().to_owned();
        let first = received.split("\r\nhi").next().unwrap();
        assert!(
            first.starts_with("Received: ") && first.contains("\r\n\t(REQUIRETLS)"),
            "{first}"
        );
        // Without the parameter, no mark.
        h.send("MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n");
        h.send("hi\r\n.\r\n");
        assert!(!h.body(1).contains("REQUIRETLS"));
        // Not configured: never offered, even under TLS.
        let mut off = H::new(SessionConfig {
            requiretls: false,
            ..cfg()
        });
        off.send("EHLO c.test\r\nSTARTTLS\r\n");
        assert!(!off.send("EHLO c.test\r\n").contains("REQUIRETLS"));
        assert_eq!(
            off.send("MAIL FROM:<a@client.test> REQUIRETLS\r\n"),
            "555 5.5.4 Unsupported option: REQUIRETLS\r\n"
        );
    }
}
