//! `[api]`: the sending API on the HTTP listener (`/api/v1/`,
//! docs/api.md): its limits, back-pressure and retention.

use std::time::Duration;

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    enabled: Option<bool>,
    max_request_bytes: Option<u64>,
    max_recipients: Option<usize>,
    max_in_flight_requests: Option<usize>,
    max_in_flight_bytes: Option<u64>,
    max_schedule_ahead: Option<String>,
    status_retention: Option<String>,
}

/// `[api]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// Serve `/api/v1/` (default true; every call needs an API key).
    pub enabled: bool,
    /// Largest request body (JSON with base64 attachments, or a raw message
    /// with its envelope), default 32 MiB; larger: 413.
    pub max_request_bytes: u64,
    /// Most recipients (messages) one call may create, default 10,000.
    pub max_recipients: usize,
    /// Calls being composed or written at once on this node, default 64;
    /// more: 429 with Retry-After.
    pub max_in_flight_requests: usize,
    /// Bytes of request bodies held at once on this node, default 512 MiB;
    /// more: 429 with Retry-After.
    pub max_in_flight_bytes: u64,
    /// Latest `send_at` (and SMTP FUTURERELEASE) accepted, from now
    /// (default 72h, or half of `[delivery] max_age` when that is not longer);
    /// it must stay below `max_age`, which counts from acceptance.
    pub max_schedule_ahead: Duration,
    /// How long the status of a finished API message and its batch record
    /// are kept for `GET` (default 7d).
    pub status_retention: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            max_request_bytes: 32 << 20,
            max_recipients: tern_model::api::MAX_BATCH_MESSAGES,
            max_in_flight_requests: 64,
            max_in_flight_bytes: 512 << 20,
            max_schedule_ahead: Duration::from_secs(72 * 3600),
            status_retention: Duration::from_secs(7 * 86400),
        }
    }
}

pub(super) fn validate(raw: RawApi, max_age: Duration) -> Result<ApiConfig, ConfigError> {
    let d = ApiConfig::default();
    let duration = |v: Option<String>, default: Duration, key: &'static str| -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => crate::parse_duration(&s).map_err(|e| ConfigError::Invalid {
                key,
                reason: e.to_string(),
            }),
        }
    };
    let config = ApiConfig {
        enabled: raw.enabled.unwrap_or(d.enabled),
        max_request_bytes: raw.max_request_bytes.unwrap_or(d.max_request_bytes),
        max_recipients: raw.max_recipients.unwrap_or(d.max_recipients),
        max_in_flight_requests: raw.max_in_flight_requests.unwrap_or(d.max_in_flight_requests),
        max_in_flight_bytes: raw.max_in_flight_bytes.unwrap_or(d.max_in_flight_bytes),
        // Unset: 72h, or half of a max_age not above it (a short max_age alone
        // must not make an existing config invalid).
        max_schedule_ahead: duration(
            raw.max_schedule_ahead,
            if d.max_schedule_ahead < max_age {
                d.max_schedule_ahead
            } else {
                max_age / 2
            },
            "api.max_schedule_ahead",
        )?,
        status_retention: duration(raw.status_retention, d.status_retention, "api.status_retention")?,
    };
    if config.max_recipients == 0 || config.max_recipients > tern_model::api::MAX_BATCH_MESSAGES {
        return Err(ConfigError::Invalid {
            key: "api.max_recipients",
            reason: format!("must be 1 to {}", tern_model::api::MAX_BATCH_MESSAGES),
        });
    }
    if config.max_request_bytes < 1024 || config.max_in_flight_requests == 0 {
        return Err(ConfigError::Invalid {
            key: "api.max_request_bytes",
            reason: "max_request_bytes must be at least 1024 and max_in_flight_requests at least 1".into(),
        });
    }
    if config.max_in_flight_bytes < config.max_request_bytes {
        return Err(ConfigError::Invalid {
            key: "api.max_in_flight_bytes",
            reason: "must be at least max_request_bytes (else no large call could ever run)".into(),
        });
    }
    if config.max_schedule_ahead >= max_age {
        return Err(ConfigError::Invalid {
            key: "api.max_schedule_ahead",
            reason: format!(
                "must be below the queue's max_age ({}s): a message expires max_age after it is accepted",
                max_age.as_secs()
            ),
        });
    }
    Ok(config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schedule_limit_follows_a_short_max_age_unless_set() {
        let d = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(validate(RawApi::default(), d(120)).unwrap().max_schedule_ahead, d(72));
        assert_eq!(
            validate(RawApi::default(), Duration::from_secs(3))
                .unwrap()
                .max_schedule_ahead,
            Duration::from_millis(1500)
        );
        let raw = RawApi {
            max_schedule_ahead: Some("5d".into()),
            ..RawApi::default()
        };
        let e = validate(raw, d(120)).unwrap_err().to_string();
        assert!(e.contains("api.max_schedule_ahead"), "{e}");
    }
}
