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
}

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

/// One `[[filter]]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub kind: FilterKind,
    /// `host:port`, `inet:port@host` (milter) or a `unix:` socket path.
    pub address: String,
    /// Bound on the whole exchange with the filter (default 30s).
    pub timeout: Duration,
    pub on_error: OnError,
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
            Ok(FilterConfig {
                kind,
                address: f.address,
                timeout,
                on_error,
            })
        })
        .collect()
}
