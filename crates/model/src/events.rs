//! The names of the events a node writes to its event log and webhooks.

/// Event types (the `event` field of docs/events.md), as `events` names them.
pub const EVENT_TYPES: &[&str] = &[
    "received",
    "delivered",
    "deferred",
    "failed",
    "expired",
    "bounced",
    "suppressed",
    "admin",
    "complaint",
    "shaping",
    // The sending API's (durable webhook events only).
    "queued",
    "cancelled",
];
