//! Raft lives in the crate `tern-raft`; this module keeps the old paths
//! (`crate::raft::groups`, `crate::raft::state_machine`, ...) working, and
//! holds what ties it to the node: the `/metrics` gauges of the groups, the
//! storage suite over the node's rules, and the control group's key
//! prefixes at their old path.

pub use tern_raft::*;

pub mod state_machine {
    pub use crate::cluster::control::{DRAIN_PREFIX, NODE_PREFIX, PLACEMENT_PREFIX, REMOVED_PREFIX, SUSPEND_PREFIX};
    pub use tern_raft::state_machine::*;
}

#[cfg(test)]
mod storage_suite;

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
