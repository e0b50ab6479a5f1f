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
