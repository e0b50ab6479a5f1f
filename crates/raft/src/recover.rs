//! Unsafe recovery of one group after a majority of its voters is lost for
//! good (`ternd recover`, docs/operations.md "Unsafe recovery"), run
//! offline on a surviving replica's data: like etcd's
//! `--force-new-cluster`, the group's membership is rewritten to the kept
//! nodes by appending a membership entry to this replica's log (openraft
//! takes the last membership entry in the log as the group's, committed or
//! not), after a term above any this replica has seen, and the vote is
//! reset to that term. On the next start the kept nodes elect a leader
//! among themselves, which commits everything in its log, this entry too.
//!
//! Unsafe: entries the lost majority had committed but this replica never
//! received are gone, and entries this replica had but were never committed
//! become committed.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, Vote};

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::{Entry, GroupId, LogId, NodeId, Request};

/// What [`force_membership`] found and wrote for one group.
#[derive(Clone, Debug)]
pub struct Forced {
    pub group: GroupId,
    /// The membership before (every config's voters, then learners).
    pub old_voters: BTreeSet<NodeId>,
    pub old_learners: BTreeSet<NodeId>,
    /// The kept members of the group: its voters from now on.
    pub new_voters: BTreeSet<NodeId>,
    /// The new membership entry.
    pub log_id: LogId,
}

/// The membership in force on this replica: the last membership entry in
/// the log, else the state machine's.
async fn current(log: &mut LogStore, sm: &mut StateMachine) -> anyhow::Result<Membership<NodeId, BasicNode>> {
    let state = log.get_log_state().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = state.last_purged_log_id.map_or(0, |l| l.index + 1);
    let last = state.last_log_id.map_or(0, |l| l.index);
    let mut found = None;
    // Newest first, in slices: the last membership entry is usually recent.
    let mut end = last + 1;
    const SLICE: u64 = 1024;
    while end > first && found.is_none() {
        let start = end.saturating_sub(SLICE).max(first);
        let entries: Vec<Entry> = log
            .try_get_log_entries(start..end)
            .await
            .map_err(|e| anyhow::anyhow!("reading the log: {e}"))?;
        found = entries.into_iter().rev().find_map(|e| match e.payload {
            EntryPayload::Membership(m) => Some(m),
            _ => None,
        });
        end = start;
    }
    if let Some(m) = found {
        return Ok(m);
    }
    let (_, stored) = sm.applied_state().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(stored.membership().clone())
}

/// Rewrites the membership of the group whose `log` and `sm` these are (on
/// node `me`, offline) to the members in `keep`, then appends `then` (normal
/// entries, e.g. the control group's records of the lost nodes). Nothing is
/// written when no kept node is a member (`None`); `dry_run` writes nothing
/// either and says what would be written.
pub async fn force_membership(
    log: &mut LogStore,
    sm: &mut StateMachine,
    group: GroupId,
    me: NodeId,
    keep: &BTreeSet<NodeId>,
    then: Vec<Request>,
    dry_run: bool,
) -> anyhow::Result<Option<Forced>> {
    let membership = current(log, sm).await?;
    let old_voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let old_learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let new_voters: BTreeSet<NodeId> = old_voters
        .iter()
        .chain(&old_learners)
        .copied()
        .filter(|n| keep.contains(n))
        .collect();
    if !new_voters.contains(&me) {
        return Ok(None);
    }
    let nodes: BTreeMap<NodeId, BasicNode> = membership
        .nodes()
        .filter(|(id, _)| new_voters.contains(id))
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    let state = log.get_log_state().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let vote = log.read_vote().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let last = state.last_log_id;
    let term = vote
        .map_or(0, |v| v.leader_id.term)
        .max(last.map_or(0, |l| l.leader_id.term))
        + 1;
    let index = last.map_or(0, |l| l.index + 1);
    let leader = CommittedLeaderId::new(term, me);
    let log_id = LogId::new(leader, index);
    let forced = Forced {
        group,
        old_voters,
        old_learners,
        new_voters: new_voters.clone(),
        log_id,
    };
    if dry_run {
        return Ok(Some(forced));
    }
    let mut entries = vec![Entry {
        log_id,
        payload: EntryPayload::Membership(Membership::new(vec![new_voters], nodes)),
    }];
    for (i, request) in then.into_iter().enumerate() {
        entries.push(Entry {
            log_id: LogId::new(leader, index + 1 + i as u64),
            payload: EntryPayload::Normal(request),
        });
    }
    // The vote first: a crash between the two leaves a higher vote and the
    // old log, which is where it was (run the command again).
    log.save_vote(&Vote::new(term, me))
        .await
        .map_err(|e| anyhow::anyhow!("saving the vote: {e}"))?;
    log.blocking_append(entries)
        .await
        .map_err(|e| anyhow::anyhow!("appending the membership entry: {e}"))?;
    Ok(Some(forced))
}
