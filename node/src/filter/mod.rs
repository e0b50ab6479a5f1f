//! Content filters at the end of DATA, before the reply (`[[filter]]`,
//! docs/filters.md): milter, rspamd's HTTP `/checkv2` and clamd's
//! `zINSTREAM`, asked in the configured order. A filter can refuse the
//! message (its reply goes to the client), discard it, or change its header
//! fields and body; the next filter sees the changed message.
//!
//! Each exchange is bounded by the filter's `timeout`; a filter that cannot
//! be asked (refused connection, timeout, an answer we do not understand)
//! either defers the message (`on_error = "tempfail"`, 451 4.7.1) or is
//! passed over (`on_error = "accept"`).
//!
//! Layout: `message.rs` (header fields and edits), `milter.rs`, `rspamd.rs`,
//! `clamd.rs` (one protocol each).

pub mod clamd;
pub mod message;
pub mod milter;
pub mod rspamd;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::config::Config;
use crate::config::{ApplyTo, FilterConfig, FilterKind, OnError};
use crate::envelope::Envelope;
use crate::metrics::FilterMetrics;
use message::{Edit, Parsed};
use tern_smtp::reply::Reply;

/// What a filter decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (to the next filter, then the queue).
    Accept,
    /// This reply (4xx or 5xx) to the client; nothing is queued.
    Refuse(Reply),
    /// Answer 250 but queue nothing (milter SMFIR_DISCARD).
    Discard,
}

/// A verdict plus the changes to make to the message first.
#[derive(Debug)]
pub struct Answer {
    pub verdict: Verdict,
    pub edits: Vec<Edit>,
}

impl Answer {
    fn accept() -> Answer {
        Answer {
            verdict: Verdict::Accept,
            edits: Vec::new(),
        }
    }
}

/// Why a filter could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Protocol(String),
}

/// What every filter is told besides the message.
#[derive(Debug)]
pub struct Context<'a> {
    pub envelope: &'a Envelope,
    /// The SMTP client, when its address parses.
    pub client_ip: Option<IpAddr>,
    /// Our host name (`[node] hostname`).
    pub hostname: &'a str,
}

/// Where a filter listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `host:port`.
    Tcp(String),
    Unix(PathBuf),
}

/// A connected filter stream, TCP or unix.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Address {
    /// `host:port`, `[v6]:port`, milter's `inet:port@host` and
    /// `inet6:port@host`, or a unix socket as `unix:/path`, `local:/path`
    /// or an absolute path.
    pub fn parse(s: &str) -> Result<Address, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:").or_else(|| s.strip_prefix("local:")) {
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        let milter = |rest: &str, v6: bool| -> Result<Address, String> {
            let (port, host) = rest.split_once('@').ok_or(format!("{s:?} is not inet:port@host"))?;
            let port: u16 = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
            Ok(Address::Tcp(if v6 {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }))
        };
        if let Some(rest) = s.strip_prefix("inet:") {
            return milter(rest, false);
        }
        if let Some(rest) = s.strip_prefix("inet6:") {
            return milter(rest, true);
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Address::Tcp(s.to_owned())),
            _ => Err(format!("{s:?} is not host:port, inet:port@host or unix:/path")),
        }
    }

    pub async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Address::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Address::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        })
    }

    /// The HTTP `Host` for this address.
    fn host(&self) -> &str {
        match self {
            Address::Tcp(addr) => addr,
            Address::Unix(_) => "localhost",
        }
    }
}

/// One configured filter.
#[derive(Debug)]
struct Filter {
    config: FilterConfig,
    address: Address,
}

/// The node's filters, in order.
#[derive(Debug)]
pub struct Filters {
    filters: Vec<Filter>,
    relay_networks: Vec<ipnet::IpNet>,
    hostname: String,
    metrics: FilterMetrics,
}

impl Filters {
    /// `None` without `[[filter]]` entries; an error for an address that
    /// does not parse.
    pub fn new(config: &Config) -> anyhow::Result<Option<Filters>> {
        if config.filters.is_empty() {
            return Ok(None);
        }
        let filters = config
            .filters
            .iter()
            .map(|f| {
                let address = Address::parse(&f.address).map_err(|e| anyhow::anyhow!("filter.address: {e}"))?;
                Ok(Filter {
                    config: f.clone(),
                    address,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Some(Filters {
            filters,
            relay_networks: config.relay_networks.clone(),
            hostname: config.hostname.clone(),
            metrics: FilterMetrics::default(),
        }))
    }

    /// Counts into `metrics` (the node's registry) from now on.
    pub fn set_metrics(&mut self, metrics: FilterMetrics) {
        self.metrics = metrics;
    }

    /// Untrusted: not authenticated and not from `relay_networks`.
    fn untrusted(&self, envelope: &Envelope, ip: Option<IpAddr>) -> bool {
        envelope.auth_user.is_none() && ip.is_some_and(|ip| !self.relay_networks.iter().any(|n| n.contains(&ip)))
    }

    /// Asks each filter in turn: the message to queue (with the filters'
    /// changes), or the reply that refuses it. A discarded message gets
    /// a 250 reply here and is not queued.
    pub async fn run(&self, envelope: &Envelope, mut message: Vec<u8>) -> Result<Vec<u8>, Reply> {
        let client_ip = envelope.client_ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let untrusted = self.untrusted(envelope, client_ip);
        let context = Context {
            envelope,
            client_ip,
            hostname: &self.hostname,
        };
        for filter in &self.filters {
            let name = filter.config.name.as_str();
            if filter.config.apply_to == ApplyTo::Untrusted && !untrusted {
                continue;
            }
            if message.len() as u64 > filter.config.max_size {
                self.metrics.count(name, "skipped");
                info!(
                    filter = name,
                    size = message.len(),
                    "message larger than the filter's max_size, not filtered"
                );
                continue;
            }
            let started = Instant::now();
            let asked = tokio::time::timeout(filter.config.timeout, filter.ask(&context, &message)).await;
            let answer = match asked.unwrap_or(Err(FilterError::Timeout)) {
                Ok(answer) => answer,
                Err(e) => {
                    self.metrics.count(name, "error");
                    warn!(filter = name, address = %filter.config.address, error = %e, "content filter failed");
                    match filter.config.on_error {
                        OnError::Accept => continue,
                        OnError::Tempfail => {
                            return Err(Reply::new(451, "4.7.1", "Content filter unavailable, try again later"))
                        }
                    }
                }
            };
            let verdict_name = match &answer.verdict {
                Verdict::Accept => "accept",
                Verdict::Refuse(r) if r.code >= 500 => "reject",
                Verdict::Refuse(_) => "tempfail",
                Verdict::Discard => "discard",
            };
            self.metrics.count(name, verdict_name);
            info!(
                filter = name,
                verdict = verdict_name,
                edits = answer.edits.len(),
                ms = started.elapsed().as_millis() as u64,
                "content filter"
            );
            match answer.verdict {
                Verdict::Refuse(reply) => return Err(reply),
                Verdict::Discard => return Err(Reply::new(250, "2.0.0", "Ok: discarded by content filter")),
                Verdict::Accept => {}
            }
            if !answer.edits.is_empty() {
                let mut parsed = Parsed::new(&message);
                let skipped = parsed.apply(answer.edits);
                if skipped > 0 {
                    warn!(
                        filter = name,
                        skipped, "content filter asked for header fields with bad names"
                    );
                }
                message = parsed.to_bytes();
            }
        }
        Ok(message)
    }
}

impl Filter {
    async fn ask(&self, context: &Context<'_>, message: &[u8]) -> Result<Answer, FilterError> {
        match self.config.kind {
            FilterKind::Milter => milter::check(&self.address, context, message).await,
            FilterKind::Rspamd => rspamd::check(&self.address, self.config.password.as_deref(), context, message).await,
            FilterKind::Clamd => clamd::scan(&self.address, message).await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("127.0.0.1:11332"),
            Ok(Address::Tcp("127.0.0.1:11332".into()))
        );
        assert_eq!(
            Address::parse("inet:8891@localhost"),
            Ok(Address::Tcp("localhost:8891".into()))
        );
        assert_eq!(Address::parse("inet6:8891@::1"), Ok(Address::Tcp("[::1]:8891".into())));
        assert_eq!(
            Address::parse("unix:/run/clamd.sock"),
            Ok(Address::Unix("/run/clamd.sock".into()))
        );
        assert_eq!(Address::parse("/run/x.sock"), Ok(Address::Unix("/run/x.sock".into())));
        assert!(Address::parse("localhost").is_err());
        assert!(Address::parse("inet:x@h").is_err());
    }
}
