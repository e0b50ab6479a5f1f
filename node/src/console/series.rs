//! Delivery analytics as chart series. The Stats call answers one window
//! ("the last N seconds", at least a minute); asking it for the last 1, 2,
//! ..., N minutes and subtracting neighbours gives per-minute counts. The
//! newest point also holds the minute under way (a window of one minute
//! covers the current and the previous minute).

use serde::Serialize;

use crate::queue::stats::{Counts, Window};

/// Deferral reasons charted, the most frequent first.
pub const TOP_REASONS: usize = 5;

/// One minute's outcome counts; `minutes_ago` 1 is the newest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Point {
    pub minutes_ago: u32,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

/// A deferral reason (reply code and enhanced code) over the same minutes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonSeries {
    pub reason: String,
    pub last_reply: String,
    pub total: u64,
    /// Counts per minute, oldest first (as `points`).
    pub counts: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Series {
    /// Oldest first.
    pub points: Vec<Point>,
    pub reasons: Vec<ReasonSeries>,
}

/// Series from `windows[k]` = the cluster's window of the last `k + 1` minutes.
pub fn series(windows: &[Window]) -> Series {
    let totals: Vec<Counts> = windows.iter().map(Window::total).collect();
    let mut points = Vec::with_capacity(windows.len());
    for k in (0..windows.len()).rev() {
        let now = totals[k];
        let before = k.checked_sub(1).map(|i| totals[i]).unwrap_or_default();
        points.push(Point {
            minutes_ago: k as u32 + 1,
            delivered: now.delivered.saturating_sub(before.delivered),
            deferred: now.deferred.saturating_sub(before.deferred),
            bounced: now.bounced.saturating_sub(before.bounced),
        });
    }
    let Some(widest) = windows.last() else {
        return Series::default();
    };
    let mut top: Vec<(&(String, String), &crate::queue::stats::Reason)> = widest
        .reasons
        .iter()
        .filter(|((kind, _), _)| kind == "deferred")
        .collect();
    top.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
    top.truncate(TOP_REASONS);
    let reasons = top
        .into_iter()
        .map(|(key, reason)| {
            let count_in = |w: &Window| w.reasons.get(key).map_or(0, |r| r.count);
            let counts = (0..windows.len())
                .rev()
                .map(|k| {
                    let before = k.checked_sub(1).map_or(0, |i| count_in(&windows[i]));
                    count_in(&windows[k]).saturating_sub(before)
                })
                .collect();
            ReasonSeries {
                reason: key.1.clone(),
                last_reply: reason.last_reply.clone(),
                total: reason.count,
                counts,
            }
        })
        .collect();
    Series { points, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stats::{Outcome, Stats};

    #[test]
    fn minutes_and_reasons_from_nested_windows() {
        let stats = Stats::default();
        let now = 1_000_000 * 60 + 30;
        let reply = "451 4.4.1 connect refused";
        for _ in 0..3 {
            stats.record(now - 180, "a.test", "mx", Outcome::Deferred, reply, "routing", 0);
        }
        stats.record(now - 120, "a.test", "mx", Outcome::Delivered, "250 ok", "", 5);
        stats.record(now, "a.test", "mx", Outcome::Deferred, reply, "routing", 0);
        stats.record(
            now,
            "b.test",
            "mx",
            Outcome::Deferred,
            "421 4.7.0 slow down",
            "throttled",
            0,
        );
        stats.record(
            now,
            "b.test",
            "mx",
            Outcome::Bounced,
            "550 5.1.1 no",
            "invalid_recipient",
            0,
        );
        let windows: Vec<Window> = (1..=5).map(|k| stats.window(now, 60 * k)).collect();
        let s = series(&windows);
        let ago: Vec<u32> = s.points.iter().map(|p| p.minutes_ago).collect();
        assert_eq!(ago, [5, 4, 3, 2, 1]);
        let deferred: Vec<u64> = s.points.iter().map(|p| p.deferred).collect();
        assert_eq!(deferred, [0, 0, 3, 0, 2]);
        assert_eq!(s.points[3].delivered, 1);
        assert_eq!(s.points[4].bounced, 1);
        assert_eq!(s.reasons.len(), 2);
        assert_eq!(s.reasons[0].reason, "451 4.4.1");
        assert_eq!((s.reasons[0].total, s.reasons[0].last_reply.as_str()), (4, reply));
        assert_eq!(s.reasons[0].counts, [0, 0, 3, 0, 1]);
        assert_eq!(s.reasons[1].counts, [0, 0, 0, 0, 1]);
        assert_eq!(series(&[]), Series::default());
    }
}
