//! `[dnsbl]` and `[greylist]`: DNS block lists asked about connecting
//! clients, and greylisting of new (client, sender, recipient) triplets,
//! with state shared in the cluster (docs/dnsbl.md).

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::{parse_duration, ConfigError};

/// At most this many zones: each is one DNS query per new client address.
pub const MAX_DNSBL_ZONES: usize = 16;
/// At most this many return codes per zone.
pub const MAX_DNSBL_CODES: usize = 64;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDnsbl {
    enabled: Option<bool>,
    zones: Option<Vec<RawZone>>,
    reject_score: Option<u32>,
    timeout: Option<String>,
    cache_ttl: Option<String>,
    exempt: Option<Vec<IpNet>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    zone: String,
    codes: Option<Vec<String>>,
    score: Option<u32>,
    action: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGreylist {
    enabled: Option<bool>,
    delay: Option<String>,
    retry_window: Option<String>,
    pass_ttl: Option<String>,
    exempt: Option<Vec<IpNet>>,
    ipv4_prefix: Option<u8>,
    ipv6_prefix: Option<u8>,
    max_new_per_hour: Option<u32>,
}

/// What a listing in a zone does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneAction {
    /// Adds the zone's score; the client is refused once the sum reaches
    /// `reject_score`.
    Score,
    /// A listing alone refuses the client.
    Reject,
}

/// One block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsblZone {
    /// Lowercase, no trailing dot (`zen.spamhaus.org`).
    pub zone: String,
    /// Answers that count as a listing; empty: any answer in 127.0.0.0/8.
    pub codes: Vec<Ipv4Addr>,
    pub score: u32,
    pub action: ZoneAction,
}

/// `[dnsbl]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsblConfig {
    pub enabled: bool,
    pub zones: Vec<DnsblZone>,
    /// Sum of scores at which a client is refused.
    pub reject_score: u32,
    /// Bound on all lookups of one client; past it the client is not
    /// refused (fail open).
    pub timeout: Duration,
    /// Longest a verdict is kept per node (DNS TTLs shorten it).
    pub cache_ttl: Duration,
    /// Client networks never checked (besides `relay_networks` and
    /// authenticated clients, which never are).
    pub exempt: Vec<IpNet>,
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            enabled: false,
            zones: Vec::new(),
            reject_score: 1,
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(600),
            exempt: Vec::new(),
        }
    }
}

impl DnsblConfig {
    /// Whether clients are checked at all.
    pub fn active(&self) -> bool {
        self.enabled && !self.zones.is_empty()
    }
}

/// `[greylist]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreylistConfig {
    pub enabled: bool,
    /// How long a new triplet is refused with `451 4.7.1`.
    pub delay: Duration,
    /// After its first attempt, how long a triplet waits for a retry past
    /// `delay`; later it counts as new again.
    pub retry_window: Duration,
    /// How long a triplet that passed stays welcome after its last message.
    pub pass_ttl: Duration,
    /// Client networks never greylisted.
    pub exempt: Vec<IpNet>,
    /// The client address is cut to this prefix (senders retry from
    /// neighbouring addresses of one pool).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// New triplets recorded per client network and hour on one node;
    /// beyond it they are refused without a record, so one client cannot
    /// fill the cluster's state.
    pub max_new_per_hour: u32,
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: false,
            delay: Duration::from_secs(300),
            retry_window: Duration::from_secs(4 * 3600),
            pass_ttl: Duration::from_secs(36 * 86400),
            exempt: Vec::new(),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            max_new_per_hour: 1000,
        }
    }
}

fn duration(key: &'static str, raw: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(s) => parse_duration(&s).map_err(|e| ConfigError::Invalid {
            key,
            reason: e.to_string(),
        }),
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn validate_zone(raw: RawZone) -> Result<DnsblZone, ConfigError> {
    let zone = raw.zone.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels_ok = zone.split('.').all(|l| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // Room for the 64 characters of an IPv6 nibble name within 253.
    if zone.is_empty() || zone.len() > 180 || !labels_ok {
        return Err(invalid(
            "dnsbl.zones.zone",
            format!("{:?} is not a DNS zone name", raw.zone),
        ));
    }
    let codes = raw.codes.unwrap_or_default();
    if codes.len() > MAX_DNSBL_CODES {
        return Err(invalid(
            "dnsbl.zones.codes",
            format!("{zone}: at most {MAX_DNSBL_CODES} codes"),
        ));
    }
    let codes = codes
        .iter()
        .map(|c| match c.trim().parse::<Ipv4Addr>() {
            // RFC 5782 2.1: listings are in 127.0.0.0/8; other answers are ignored.
            Ok(ip) if ip.octets()[0] == 127 => Ok(ip),
            _ => Err(invalid(
                "dnsbl.zones.codes",
                format!("{zone}: {c:?} is not an address in 127.0.0.0/8"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let action = match raw.action.as_deref().map(str::trim) {
        None | Some("score") => ZoneAction::Score,
        Some("reject") => ZoneAction::Reject,
        Some(other) => {
            return Err(invalid(
                "dnsbl.zones.action",
                format!("{zone}: {other:?} (use \"score\" or \"reject\")"),
            ))
        }
    };
    Ok(DnsblZone {
        zone,
        codes,
        score: raw.score.unwrap_or(1),
        action,
    })
}

pub(super) fn validate_dnsbl(raw: RawDnsbl) -> Result<DnsblConfig, ConfigError> {
    let d = DnsblConfig::default();
    let zones = raw
        .zones
        .unwrap_or_default()
        .into_iter()
        .map(validate_zone)
        .collect::<Result<Vec<_>, _>>()?;
    if zones.len() > MAX_DNSBL_ZONES {
        return Err(invalid("dnsbl.zones", format!("at most {MAX_DNSBL_ZONES} zones")));
    }
    let reject_score = raw.reject_score.unwrap_or(d.reject_score);
    if reject_score == 0 {
        return Err(invalid("dnsbl.reject_score", "must be at least 1"));
    }
    let timeout = duration("dnsbl.timeout", raw.timeout, d.timeout)?;
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err(invalid("dnsbl.timeout", "between 1s and 60s"));
    }
    Ok(DnsblConfig {
        enabled: raw.enabled.unwrap_or(false),
        zones,
        reject_score,
        timeout,
        cache_ttl: duration("dnsbl.cache_ttl", raw.cache_ttl, d.cache_ttl)?,
        exempt: raw.exempt.unwrap_or_default(),
    })
}

pub(super) fn validate_greylist(raw: RawGreylist) -> Result<GreylistConfig, ConfigError> {
    let d = GreylistConfig::default();
    let delay = duration("greylist.delay", raw.delay, d.delay)?;
    let retry_window = duration("greylist.retry_window", raw.retry_window, d.retry_window)?;
    let pass_ttl = duration("greylist.pass_ttl", raw.pass_ttl, d.pass_ttl)?;
    if retry_window <= delay {
        return Err(invalid("greylist.retry_window", "must be longer than greylist.delay"));
    }
    if pass_ttl.is_zero() {
        return Err(invalid("greylist.pass_ttl", "must be positive"));
    }
    let ipv4_prefix = raw.ipv4_prefix.unwrap_or(d.ipv4_prefix);
    if ipv4_prefix > 32 {
        return Err(invalid("greylist.ipv4_prefix", "at most 32"));
    }
    let ipv6_prefix = raw.ipv6_prefix.unwrap_or(d.ipv6_prefix);
    if ipv6_prefix > 128 {
        return Err(invalid("greylist.ipv6_prefix", "at most 128"));
    }
    Ok(GreylistConfig {
        enabled: raw.enabled.unwrap_or(false),
        delay,
        retry_window,
        pass_ttl,
        exempt: raw.exempt.unwrap_or_default(),
        ipv4_prefix,
        ipv6_prefix,
        max_new_per_hour: raw.max_new_per_hour.unwrap_or(d.max_new_per_hour).max(1),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn zone(toml_text: &str) -> Result<DnsblConfig, ConfigError> {
        validate_dnsbl(toml::from_str(toml_text).unwrap())
    }

    #[test]
    fn zones_parse_with_defaults() {
        let c = zone(
            r#"enabled = true
            reject_score = 5
            zones = [{ zone = "Zen.Spamhaus.org.", codes = ["127.0.0.2", "127.0.0.4"], score = 5 },
                     { zone = "bl.test", action = "reject" }]"#,
        )
        .unwrap();
        assert!(c.active());
        assert_eq!(c.zones[0].zone, "zen.spamhaus.org");
        assert_eq!(c.zones[0].codes.len(), 2);
        assert_eq!(c.zones[1].score, 1);
        assert_eq!(c.zones[1].action, ZoneAction::Reject);
        assert_eq!(c.timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_zones_are_refused() {
        assert!(zone(r#"zones = [{ zone = "bl.test", codes = ["10.0.0.2"] }]"#).is_err());
        assert!(zone(r#"zones = [{ zone = "bl..test" }]"#).is_err());
        assert!(zone(r#"zones = [{ zone = "bl.test", action = "drop" }]"#).is_err());
        assert!(zone("reject_score = 0").is_err());
        let many: Vec<String> = (0..17).map(|i| format!("{{ zone = \"z{i}.test\" }}")).collect();
        assert!(zone(&format!("zones = [{}]", many.join(","))).is_err());
    }

    /// The example in docs/dnsbl.md parses as a whole configuration.
    #[test]
    fn documented_example_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dnsbl.md");
        let doc = std::fs::read_to_string(path).unwrap();
        let example = &doc[doc.find("## Example").unwrap()..];
        let start = example.find("```\n").unwrap() + 4;
        let end = start + example[start..].find("```").unwrap();
        let c = crate::Config::from_toml(&example[start..end]).unwrap();
        assert_eq!(c.dnsbl.zones.len(), 3);
        assert_eq!(c.dnsbl.zones[0].action, ZoneAction::Reject);
        assert!(c.greylist.enabled);
    }

    #[test]
    fn greylist_windows_are_checked() {
        let g = |t: &str| validate_greylist(toml::from_str(t).unwrap());
        let c = g(r#"enabled = true
            delay = "2s""#)
        .unwrap();
        assert_eq!(c.delay, Duration::from_secs(2));
        assert_eq!(c.pass_ttl, Duration::from_secs(36 * 86400));
        assert!(g(r#"delay = "5h""#).is_err());
        assert!(g("ipv6_prefix = 129").is_err());
    }
}
