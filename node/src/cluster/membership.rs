//! Membership changes on the control-group leader: a node added (learner of
//! group 0, caught up, promoted while there are fewer than five voters) and
//! a node removed (its replicas moved away first).

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};

use super::placement::control_voters;
use super::{Cluster, ClusterError};
use crate::raft::{NodeId, Request};

/// How long a new replica may take to catch up before the change is retried.
pub(super) const CATCH_UP: Duration = Duration::from_secs(60);

/// Why `member add` refuses a removed node's id.
pub fn removed_id_error(id: NodeId) -> String {
    format!(
        "node id {id} belonged to a node removed from this cluster and is never reused: \
         give the new node a fresh [node] id (and an empty data directory)"
    )
}

impl Cluster {
    /// Removes a node: its replicas are moved elsewhere first (placement
    /// drops it, shard leaders change membership), then it leaves the
    /// control group. Refuses, unless `force`, when a shard would be left
    /// without a reachable majority. Must run on the control-group leader.
    pub async fn remove_member(
        &self,
        id: NodeId,
        force: bool,
        reachable: &BTreeSet<NodeId>,
    ) -> Result<(), ClusterError> {
        let control = self.control().ok_or(ClusterError::ControlNotHosted)?;
        if !self.nodes().contains_key(&id) {
            return Err(ClusterError::Refused(format!("node {id} is not a member")));
        }
        if id == self.node_id {
            // The caller moves the control leadership away first.
            return Err(ClusterError::Refused(
                "this node leads the control group; move its leadership first".into(),
            ));
        }
        if !force {
            for (shard, replicas) in self.placement() {
                let rest: Vec<_> = replicas.iter().filter(|n| **n != id).collect();
                let live = rest.iter().filter(|n| reachable.contains(n)).count();
                if replicas.contains(&id) && live * 2 <= replicas.len() {
                    return Err(ClusterError::Refused(format!(
                        "removing node {id} would leave shard {shard} without a reachable majority \
                         (replicas {replicas:?}); use --force to remove it anyway"
                    )));
                }
            }
        }
        control
            .raft
            .client_write(Request::RemoveNode { id })
            .await
            .map_err(ClusterError::raft)?;
        // Wait for the placement controller and shard leaders to move its replicas.
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let placed = self.placement().values().any(|r| r.contains(&id));
            let member = self.groups.shards().iter().any(|g| g.is_voter(id));
            if !placed && !member {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                if force {
                    break;
                }
                return Err(ClusterError::NotYet(format!(
                    "node {id}'s replicas were not moved within {CATCH_UP:?}; try again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let membership = control.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if voters.contains(&id) {
            // Keep up to five voters: a learner is promoted in its place.
            let rest: BTreeSet<NodeId> = voters
                .iter()
                .copied()
                .chain(membership.learner_ids())
                .filter(|n| *n != id)
                .collect();
            let next = control_voters(&voters, &rest);
            control
                .raft
                .change_membership(ChangeMembers::ReplaceAllVoters(next), false)
                .await
                .map_err(ClusterError::raft)?;
        } else {
            control
                .raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(ClusterError::raft)?;
        }
        tracing::info!(node = id, "member removed");
        Ok(())
    }

    /// Adds a node: recorded in the control group, added as a learner of
    /// group 0, caught up, then promoted while there are fewer than five
    /// voters. Must run on the control-group leader.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<&'static str, ClusterError> {
        let control = self.control().ok_or(ClusterError::ControlNotHosted)?;
        if self.removed().contains(&id) {
            return Err(ClusterError::Refused(removed_id_error(id)));
        }
        control
            .raft
            .client_write(Request::SetNode {
                id,
                addr: addr.to_owned(),
            })
            .await
            .map_err(ClusterError::raft)?;
        let add = control.raft.add_learner(id, BasicNode::new(addr), true);
        match tokio::time::timeout(CATCH_UP, add).await {
            Err(_) => {
                return Err(ClusterError::NotYet(format!(
                    "node {id} at {addr} did not catch up within {CATCH_UP:?}"
                )))
            }
            Ok(Err(e)) => return Err(ClusterError::raft(e)),
            Ok(Ok(_)) => {}
        }
        let voters = control.voters();
        if voters.contains(&id) {
            return Ok("voter");
        }
        let membership = control.raft.metrics().borrow().membership_config.membership().clone();
        let members: BTreeSet<NodeId> = membership.voter_ids().chain(membership.learner_ids()).collect();
        if !control_voters(&voters, &members).contains(&id) {
            return Ok("learner");
        }
        control
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true)
            .await
            .map_err(ClusterError::raft)?;
        tracing::info!(node = id, %addr, "member added");
        Ok("voter")
    }
}
