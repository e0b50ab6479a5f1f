//! `[[filter]]`: content filters asked at the end of DATA, before the 250
//! (milter, rspamd's HTTP protocol, clamd INSTREAM; docs/filters.md).

use std::time::Duration;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFilter {
    kind: String,
    address: String,
    timeout: Option<String>,
    on_error: Option<String>,
    name: Option<String>,
    apply_to: Option<String>,
    max_size: Option<u64>,
    password: Option<String>,
}

/// Default `max_size`: larger messages are not sent to the filter (rspamd's
/// and clamd's own default limits are of this order).
pub const DEFAULT_MAX_SIZE: u64 = 25 * 1024 * 1024;

/// Which protocol a filter speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterKind {
    Milter,
    Rspamd,
    Clamd,
}

/// What a filter that cannot be asked (timeout, refused, bad answer) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// `451 4.7.1`: the client retries later.
    Tempfail,
    /// The message goes on as if the filter had accepted it.
    Accept,
}

/// Which messages a filter sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyTo {
    /// Only mail from clients that neither authenticated nor are in
    /// `[policy] relay_networks` (the MX role), as for `[inbound]` checks.
    Untrusted,
    /// Every message received over SMTP, submission included.
    All,
}

/// One `[[filter]]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub kind: FilterKind,
    /// `host:port`, `inet:port@host` (milter) or a `unix:` socket path.
    pub address: String,
    /// Bound on the whole exchange with the filter (default 30s).
    pub timeout: Duration,
    pub on_error: OnError,
    /// Label in logs and metrics (default: the kind, e.g. `rspamd`).
    pub name: String,
    pub apply_to: ApplyTo,
    /// Messages larger than this (bytes) skip the filter (default 25 MiB).
    pub max_size: u64,
    /// rspamd only: the `Password` header its normal worker may require.
    pub password: Option<String>,
}

pub(super) fn validate(raw: Vec<RawFilter>) -> Result<Vec<FilterConfig>, ConfigError> {
    raw.into_iter()
        .map(|f| {
            let kind = match f.kind.as_str() {
                "milter" => FilterKind::Milter,
                "rspamd" => FilterKind::Rspamd,
                "clamd" => FilterKind::Clamd,
                other => {
                    return Err(ConfigError::Invalid {
                        key: "filter.kind",
                        reason: format!("{other:?} is not milter, rspamd or clamd"),
                    })
                }
            };
            let on_error = match f.on_error.as_deref().unwrap_or("tempfail") {
                "tempfail" => OnError::Tempfail,
                "accept" => OnError::Accept,
                other => {
                    return Err(ConfigError::Invalid {
                        key: "filter.on_error",
                        reason: format!("{other:?} is not tempfail or accept"),
                    })
                }
            };
            let timeout = match f.timeout.as_deref() {
                None => Duration::from_secs(30),
                Some(s) => crate::parse_duration(s).map_err(|e| ConfigError::Invalid {
                    key: "filter.timeout",
                    reason: e.to_string(),
                })?,
            };
            if f.address.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "filter.address",
                    reason: "empty".into(),
                });
            }
            let apply_to = match f.apply_to.as_deref().unwrap_or("untrusted") {
                "untrusted" => ApplyTo::Untrusted,
                "all" => ApplyTo::All,
                other => {
                    return Err(ConfigError::Invalid {
                        key: "filter.apply_to",
                        reason: format!("{other:?} is not untrusted or all"),
                    })
                }
            };
            let max_size = f.max_size.unwrap_or(DEFAULT_MAX_SIZE);
            if max_size == 0 {
                return Err(ConfigError::Invalid {
                    key: "filter.max_size",
                    reason: "must be at least 1 byte".into(),
                });
            }
            if timeout.is_zero() {
                return Err(ConfigError::Invalid {
                    key: "filter.timeout",
                    reason: "must be more than 0s".into(),
                });
            }
            if f.password.is_some() && kind != FilterKind::Rspamd {
                return Err(ConfigError::Invalid {
                    key: "filter.password",
                    reason: "only rspamd filters take a password".into(),
                });
            }
            let name = f.name.unwrap_or_else(|| f.kind.clone());
            Ok(FilterConfig {
                kind,
                address: f.address,
                timeout,
                on_error,
                name,
                apply_to,
                max_size,
                password: f.password,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<FilterConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct Raw {
            filter: Vec<RawFilter>,
        }
        let raw: Raw = toml::from_str(toml_text).expect("toml");
        validate(raw.filter)
    }

    #[test]
    fn defaults_and_keys() {
        let f = parse("[[filter]]\nkind = \"clamd\"\naddress = \"127.0.0.1:3310\"\n").unwrap();
        assert_eq!(
            f,
            vec![FilterConfig {
                kind: FilterKind::Clamd,
                address: "127.0.0.1:3310".into(),
                timeout: Duration::from_secs(30),
                on_error: OnError::Tempfail,
                name: "clamd".into(),
                apply_to: ApplyTo::Untrusted,
                max_size: DEFAULT_MAX_SIZE,
                password: None,
            }]
        );
        let f = parse(
            "[[filter]]\nkind = \"rspamd\"\naddress = \"h:11333\"\ntimeout = \"5s\"\non_error = \"accept\"\n\
             name = \"spam\"\napply_to = \"all\"\nmax_size = 1000\npassword = \"q\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                f[0].timeout,
                f[0].on_error,
                f[0].name.as_str(),
                f[0].apply_to,
                f[0].max_size
            ),
            (Duration::from_secs(5), OnError::Accept, "spam", ApplyTo::All, 1000)
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("kind = \"spamd\"\naddress = \"h:1\"", "filter.kind"),
            (
                "kind = \"milter\"\naddress = \"h:1\"\non_error = \"drop\"",
                "filter.on_error",
            ),
            (
                "kind = \"milter\"\naddress = \"h:1\"\napply_to = \"some\"",
                "filter.apply_to",
            ),
            ("kind = \"milter\"\naddress = \" \"", "filter.address"),
            (
                "kind = \"milter\"\naddress = \"h:1\"\ntimeout = \"0s\"",
                "filter.timeout",
            ),
            ("kind = \"milter\"\naddress = \"h:1\"\nmax_size = 0", "filter.max_size"),
            (
                "kind = \"clamd\"\naddress = \"h:1\"\npassword = \"x\"",
                "filter.password",
            ),
        ] {
            match parse(&format!("[[filter]]\n{text}\n")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
