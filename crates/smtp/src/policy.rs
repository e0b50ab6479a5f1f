//! What a session is told by the node that runs it: the protocol part of the
//! listener's settings ([`SessionConfig`]), who may relay ([`RelayPolicy`]),
//! and the hooks through which it reserves memory ([`MemoryBudget`]) and
//! reports the limits it enforced ([`LimitObserver`]). The node implements
//! the hooks over its own limits and metrics; this crate names neither.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The protocol settings of one listener, shared by its sessions.
#[derive(Clone, Debug)]
pub struct SessionConfig {
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
    pub relay: RelayPolicy,
    /// STARTTLS is offered (the listener has a TLS configuration).
    pub starttls: bool,
    /// Ask the driver ([`Output::Verify`](crate::session::Output::Verify))
    /// about recipients in local domains at RCPT time, so unknown users get
    /// 550 now instead of a bounce later.
    pub verify_recipients: bool,
    /// Ask the driver ([`Output::Screen`](crate::session::Output::Screen))
    /// about every recipient of an unauthenticated client (DNS block lists,
    /// greylisting); postmaster is never screened.
    pub screen_recipients: bool,
    /// A submission listener (RFC 6409): AUTH is offered once TLS is active
    /// and required before MAIL; authenticated users may relay.
    pub submission: bool,
    /// On submission listeners: how far ahead HOLDFOR/HOLDUNTIL may hold a
    /// message (RFC 4865, advertised as `FUTURERELEASE`); `None`: not offered.
    pub future_release: Option<Duration>,
    /// Offer REQUIRETLS (RFC 8689) once TLS is active; the flag is kept in
    /// the Received header this session adds (`(REQUIRETLS)`).
    pub requiretls: bool,
    /// The current time in unix seconds (a fixed one in tests).
    pub clock: fn() -> i64,
    /// NOOP, RSET, VRFY, HELP, HELO and EHLO allowed between two queued
    /// messages; beyond it `421 4.7.0` and close.
    pub max_junk_commands: u32,
    /// Node-wide budget of message content held in memory by sessions.
    pub memory: Arc<dyn MemoryBudget>,
    /// Told each time a limit refuses or ends something.
    pub limits: Arc<dyn LimitObserver>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".to_string(),
            max_message_size: 36_700_160,
            max_recipients: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_errors: 10,
            relay: RelayPolicy::default(),
            starttls: false,
            verify_recipients: false,
            screen_recipients: false,
            submission: false,
            future_release: None,
            requiretls: false,
            clock: unix_now,
            max_junk_commands: 100,
            memory: Arc::new(Unlimited),
            limits: Arc::new(Unobserved),
        }
    }
}

/// The system clock in unix seconds, [`SessionConfig::clock`]'s default.
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Which recipients we accept: our own domains, domains we relay for, or
/// anything from trusted networks.
#[derive(Clone, Debug, Default)]
pub struct RelayPolicy {
    pub local_domains: Vec<String>,
    pub relay_domains: Vec<String>,
    pub relay_networks: Vec<ipnet::IpNet>,
}

impl RelayPolicy {
    /// True if `domain` is one we are the final destination for.
    pub fn is_local(&self, domain: &str) -> bool {
        self.local_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// True if mail for `rcpt_domain` from `client_ip` may be accepted.
    pub fn allows(&self, client_ip: IpAddr, rcpt_domain: &str) -> bool {
        let ours = self
            .local_domains
            .iter()
            .chain(&self.relay_domains)
            .any(|d| d.eq_ignore_ascii_case(rcpt_domain));
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = client_ip.to_canonical();
        ours || self.relay_networks.iter().any(|n| n.contains(&ip))
    }
}

/// A limit the session enforced (the node counts them by name). Not
/// `non_exhaustive`: a new limit must make the node decide how to count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The whole-session deadline: `421 4.4.2`.
    SessionTime,
    /// The minimum data rate: `421 4.4.2`.
    DataRate,
    /// Too many commands without mail: `421 4.7.0`.
    JunkCommands,
    /// The memory budget: DATA or BDAT got `452 4.3.1`.
    MemoryBudget,
}

/// Told each time a [`Limit`] refuses or ends something.
pub trait LimitObserver: Send + Sync + fmt::Debug {
    fn limited(&self, limit: Limit);
}

/// An observer that ignores everything.
#[derive(Debug)]
pub struct Unobserved;

impl LimitObserver for Unobserved {
    fn limited(&self, _: Limit) {}
}

/// Bytes of message content that sessions may hold in memory at once.
/// Sessions hold a [`Reservation`] over it.
pub trait MemoryBudget: Send + Sync + fmt::Debug {
    /// Takes `bytes` more, or nothing and false when they do not fit.
    fn take(&self, bytes: u64) -> bool;
    /// Gives back `bytes` taken earlier.
    fn give(&self, bytes: u64);
}

/// A budget without a bound.
#[derive(Debug)]
pub struct Unlimited;

impl MemoryBudget for Unlimited {
    fn take(&self, _: u64) -> bool {
        true
    }
    fn give(&self, _: u64) {}
}

/// A share of a [`MemoryBudget`], given back on drop, so a session that ends
/// in any way (reply, error, disconnect, panic) releases it.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<dyn MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `bytes`, or `None` when the budget cannot cover them.
    pub fn try_new(budget: Arc<dyn MemoryBudget>, bytes: u64) -> Option<Reservation> {
        let mut r = Reservation { budget, bytes: 0 };
        r.grow_to(bytes).then_some(r)
    }

    /// Makes the reservation at least `total` bytes; false (and unchanged)
    /// when the budget cannot cover the difference.
    pub fn grow_to(&mut self, total: u64) -> bool {
        if total <= self.bytes {
            return true;
        }
        let more = total - self.bytes;
        if !self.budget.take(more) {
            return false;
        }
        self.bytes = total;
        true
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give(self.bytes);
        }
    }
}
