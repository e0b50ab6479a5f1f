//! Raft lives in the crate `tern-raft`; this module names it for the node
//! (`crate::raft::groups`, ...) and holds the `/metrics` gauges of the
//! groups (the queue's rules over the state machine are tested in
//! `queue/apply_suite.rs`).

pub use tern_raft::*;

/// The per-group values `/metrics` reads at scrape time.
impl crate::metrics::GroupGauges for groups::Groups {
    fn sample(&self, node: u64, each: &mut dyn FnMut(crate::metrics::GroupSample)) {
        for g in self.all() {
            let mut sample = {
                let m = g.raft.metrics();
                let m = m.borrow();
                crate::metrics::GroupSample {
                    group: g.id,
                    term: m.current_term,
                    leading: m.current_leader == Some(node) && m.state == openraft::ServerState::Leader,
                    last_log_index: m.last_log_index.unwrap_or(0),
                    last_applied: m.last_applied.map_or(0, |l| l.index),
                    purged_index: m.purged.map_or(0, |l| l.index),
                    queue: None,
                }
            };
            if g.id != CONTROL_GROUP {
                sample.queue = Some((g.sm.message_count(), g.sm.oldest_received_at()));
            }
            each(sample);
        }
    }
}
