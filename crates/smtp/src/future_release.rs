//! Future message release (RFC 4865): the `HOLDFOR=` / `HOLDUNTIL=`
//! parameters of MAIL on submission listeners, and the `FUTURERELEASE`
//! EHLO keyword that announces how far ahead a client may ask.
//!
//! Pure functions over the current time (unix seconds), so the session
//! stays free of clocks it cannot control in tests.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::reply::Reply;

/// Most digits of a `HOLDFOR` interval (RFC 4865 3: `1*9DIGIT`).
const MAX_INTERVAL_DIGITS: usize = 9;

/// The hold a client asked for in MAIL FROM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// `HOLDFOR=<seconds>`: release this long after the MAIL command.
    For(u64),
    /// `HOLDUNTIL=<date-time>`: release at this time (unix seconds).
    Until(i64),
}

/// Parses a `HOLDFOR` value: 1 to 9 digits.
pub fn parse_holdfor(value: &str) -> Option<Hold> {
    let ok = (1..=MAX_INTERVAL_DIGITS).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| value.parse().ok().map(Hold::For)).flatten()
}

/// Parses a `HOLDUNTIL` value: an RFC 3339 `date-time` (RFC 4865 erratum
/// 2040); any offset is accepted and converted, fractions are dropped.
pub fn parse_holduntil(value: &str) -> Option<Hold> {
    // chrono also takes a space for `T`; an ESMTP value cannot hold one anyway.
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|t| Hold::Until(t.timestamp()))
}

/// The release time for `hold` asked at `now`, with holds allowed up to
/// `max_secs` ahead. A `HOLDUNTIL` already past releases at once (`now`).
/// Too far ahead: `554 5.7.0` (RFC 4865 4).
pub fn release_time(hold: Hold, now: i64, max_secs: u64) -> Result<i64, Reply> {
    let latest = now.saturating_add(i64::try_from(max_secs).unwrap_or(i64::MAX));
    let release = match hold {
        Hold::For(secs) => now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)),
        Hold::Until(at) => at.max(now),
    };
    if release > latest {
        return Err(Reply::new(
            554,
            "5.7.0",
            format!(
                "Requested release time exceeds the maximum ({max_secs} seconds, until {})",
                format_date_time(latest)
            ),
        ));
    }
    Ok(release)
}

/// The EHLO keyword line: `FUTURERELEASE <max interval> <max date-time>`.
pub fn ehlo_keyword(now: i64, max_secs: u64) -> String {
    let latest = now.saturating_add(i64::try_from(max_secs).unwrap_or(i64::MAX));
    format!("FUTURERELEASE {max_secs} {}", format_date_time(latest))
}

/// Unix seconds as an RFC 3339 UTC date-time, e.g. `2026-12-07T09:00:00Z`.
pub fn format_date_time(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_634_000; // 2026-12-07T09:00:00Z

    #[test]
    fn holdfor_is_one_to_nine_digits() {
        assert_eq!(parse_holdfor("0"), Some(Hold::For(0)));
        assert_eq!(parse_holdfor("999999999"), Some(Hold::For(999_999_999)));
        for bad in ["", "1000000000", "-1", "+5", "1h", " 5", "٣"] {
            assert_eq!(parse_holdfor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn holduntil_is_rfc3339_with_any_offset() {
        assert_eq!(parse_holduntil("2026-12-07T09:00:00Z"), Some(Hold::Until(NOW)));
        assert_eq!(parse_holduntil("2026-12-07t09:00:00.75z"), Some(Hold::Until(NOW)));
        assert_eq!(parse_holduntil("2026-12-07T10:00:00+01:00"), Some(Hold::Until(NOW)));
        for bad in [
            "2026-12-07",
            "2026-12-07T09:00:00",
            "2026-13-07T09:00:00Z",
            "tomorrow",
            "",
        ] {
            assert_eq!(parse_holduntil(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn release_time_within_the_limit() {
        assert_eq!(release_time(Hold::For(8), NOW, 3600), Ok(NOW + 8));
        assert_eq!(release_time(Hold::For(3600), NOW, 3600), Ok(NOW + 3600));
        assert_eq!(release_time(Hold::Until(NOW + 60), NOW, 3600), Ok(NOW + 60));
        // Already past: released now, not refused.
        assert_eq!(release_time(Hold::Until(NOW - 60), NOW, 3600), Ok(NOW));
    }

    #[test]
    fn release_time_beyond_the_limit_is_554_5_7_0() {
        for hold in [Hold::For(3601), Hold::Until(NOW + 3601), Hold::For(999_999_999)] {
            let r = release_time(hold, NOW, 3600).unwrap_err();
            assert_eq!((r.code, r.enhanced.as_deref()), (554, Some("5.7.0")), "{hold:?}");
        }
    }

    #[test]
    fn ehlo_keyword_names_both_limits() {
        assert_eq!(ehlo_keyword(NOW, 259_200), "FUTURERELEASE 259200 2026-12-10T09:00:00Z");
    }
}
