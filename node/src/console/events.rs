//! The console's "recent events": the last [`KEPT`] `admin` and `shaping`
//! events this node logged (its audit log: who changed what, and the
//! automatic shaping actions). A tracing layer keeps them in memory as the
//! JSON log would show their fields; message events pass by unkept.
//! Node-local and lost on restart: the durable record is the log itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::webhook::EVENT_TARGET;

/// Events kept.
pub const KEPT: usize = 200;
/// The event types kept.
pub const KINDS: &[&str] = &["admin", "shaping"];

/// The ring of recent events; clones share it.
#[derive(Clone, Default)]
pub struct RecentEvents {
    ring: Arc<Mutex<VecDeque<Value>>>,
}

impl RecentEvents {
    /// A tracing layer feeding this ring (install it in the subscriber).
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        self.clone()
            .with_filter(tracing_subscriber::filter::Targets::new().with_target(EVENT_TARGET, tracing::Level::INFO))
    }

    /// The kept events, newest first.
    pub fn recent(&self) -> Vec<Value> {
        self.lock().iter().rev().cloned().collect()
    }

    fn push(&self, event: Value) {
        let mut ring = self.lock();
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: tracing::Subscriber> Layer<S> for RecentEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.wanted {
            let mut object = Map::new();
            object.insert("timestamp".into(), chrono::Utc::now().to_rfc3339().into());
            object.insert("fields".into(), Value::Object(fields.map));
            self.push(Value::Object(object));
        }
    }
}

/// Collects an event's fields once its `event` field names a kept type.
#[derive(Default)]
struct Fields {
    map: Map<String, Value>,
    wanted: bool,
    /// The `event` field was seen and is not kept: ignore the rest.
    skip: bool,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if self.skip {
            return;
        }
        if field.name() == "event" {
            self.wanted = value.as_str().is_some_and(|v| KINDS.contains(&v));
            self.skip = !self.wanted;
            if self.skip {
                self.map.clear();
                return;
            }
        }
        self.map.insert(field.name().to_owned(), value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn keeps_admin_and_shaping_events_newest_first() {
        let recent = RecentEvents::default();
        let subscriber = tracing_subscriber::registry().with(recent.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "tern::event", event = "delivered", msg_id = "M1", "delivered");
            tracing::info!(target: "tern::event", event = "admin", action = "domain suspend", affected = 0u64, "admin");
            tracing::info!(target: "other", event = "admin", action = "not an event line");
            tracing::info!(target: "tern::event", event = "shaping", scope = "domain:a.test", "shaping");
        });
        let got = recent.recent();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["fields"]["event"], "shaping");
        assert_eq!(got[1]["fields"]["action"], "domain suspend");
        assert_eq!(got[1]["fields"]["affected"], 0);
        let subscriber = tracing_subscriber::registry().with(recent.layer());
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..KEPT + 5 {
                tracing::info!(target: "tern::event", event = "admin", n = i as u64, "admin");
            }
        });
        let got = recent.recent();
        assert_eq!(got.len(), KEPT);
        assert_eq!(got[0]["fields"]["n"], (KEPT + 4) as u64);
    }
}
