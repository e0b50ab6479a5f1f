//! Quiet groups: a shard with nothing to replicate stops its heartbeats.
//!
//! Every group's leader heartbeats each follower every 200 ms; at hundreds
//! of shards per node those RPCs are the node's main idle cost
//! (bench/idle-cost). As TiKV's hibernating regions and CockroachDB's
//! quiesced ranges do, an idle group goes quiet, and one message per peer
//! and round stands for all of a node's quiet groups:
//!
//! - Every [`ROUND`], each node sends each peer one `Liveness` listing the
//!   shards it leads that are idle: the same last log entry for
//!   [`IDLE_AFTER`], held by every voter and applied on the leader.
//! - The peer checks that its replica follows that leader in that term and
//!   holds and has applied that same last entry. If so it hands its replica
//!   the heartbeat that leader would have sent (an empty AppendEntries with
//!   the leader's vote, the shared last entry and its commit), at most every
//!   [`TOUCH_EVERY`], and answers which groups it took it for.
//! - The leader stops a group's heartbeats once every other voter has
//!   answered so in this round. It resumes them at the first round in which
//!   the group is not idle or a voter did not answer (an older node answers
//!   `UNIMPLEMENTED`: its groups keep their heartbeats).
//!
//! A quiet follower is thus, to openraft, a follower that hears from its
//! leader: its election timer and its leader lease (which refuses a
//! disruptive candidate's vote) run exactly as in a busy group. A dead,
//! paused or cut-off leader's node stops vouching, and its followers
//! campaign one election timeout (openraft's lease plus 1 to 2 s) after the
//! last liveness, as they would after the last heartbeat.
//!
//! (A first version held the followers' elections instead and let them
//! campaign when the hold ran out. Their timers had run out long before, so
//! a liveness late by a second under load started an election at once, and
//! their expired leases granted any candidate's vote: one shard fell into
//! an election storm after a node restart.)
//!
//! Raft's safety never rests on timers. The shard lease
//! (node: queue/lease.rs) is confirmed by its own quorum round, whose
//! AppendEntries restart the followers' election timers as a heartbeat does,
//! so a quiet group's lease is as sound as a busy one's. A member can vouch
//! only for groups that its peer's replica already follows it in: the
//! sender is the certified node (peer gate) and must be the replica's leader,
//! and the heartbeat handed over carries nothing the replica does not hold.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{RaftMetrics, ServerState};
use prometheus_client::metrics::gauge::Gauge;
use tern_proto::raft::{LivenessRequest, QuietGroup};
use tokio::time::Instant;

use super::groups::{matched_index, Groups};
use super::network::Peers;
use super::{GroupId, NodeId, CONTROL_GROUP};

/// How often a node vouches for the groups it leads.
pub const ROUND: Duration = Duration::from_millis(200);
/// How long a group's last log entry must stay the same before it goes quiet.
pub const IDLE_AFTER: Duration = Duration::from_secs(2);
/// A follower hands its replica a heartbeat on a liveness at most this
/// often (openraft's lease is 2 s and its election timer 3 to 4 s, so this
/// leaves room for several late rounds).
pub const TOUCH_EVERY: Duration = Duration::from_millis(500);
/// A replica counts as following a quiet leader (gauge) this long after the
/// last heartbeat a liveness handed it.
const FOLLOWING_FOR: Duration = Duration::from_millis(2500);
/// Longest wait for a replica's Raft core to take a handed-over heartbeat.
const TOUCH_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest wait for a group's Raft core to answer the round's probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest wait for a peer's answer (then its groups resume heartbeats).
const RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// Gauges of quiet groups on this node.
#[derive(Clone, Debug, Default)]
pub struct QuietGauges {
    /// Groups led here whose heartbeats are stopped.
    pub leading: Gauge,
    /// Replicas here holding elections on their leader's liveness.
    pub following: Gauge,
}

/// What the leader tells a peer of one idle group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idle {
    pub group: GroupId,
    pub term: u64,
    pub index: u64,
}

/// An idle group led here: what to tell its other voters, who they are,
/// and where they listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub idle: Idle,
    pub others: Vec<(NodeId, String)>,
}

/// The group `m` describes, if this node leads it and it has nothing to
/// replicate: its last entry applied here and matched by every other voter,
/// no membership change and no learner under way. The control group never
/// goes quiet (one group; its followers serve reads of the latest records).
pub fn candidate(group: GroupId, me: NodeId, m: &RaftMetrics<NodeId, openraft::BasicNode>) -> Option<Candidate> {
    if group == CONTROL_GROUP || m.state != ServerState::Leader || m.running_state.is_err() {
        return None;
    }
    if !m.vote.is_committed() || m.vote.leader_id().node_id != me {
        return None;
    }
    let last = m.last_log_index?;
    if m.last_applied.map(|l| l.index) != Some(last) {
        return None;
    }
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() != 1 || membership.learner_ids().next().is_some() {
        return None;
    }
    let mut others = Vec::new();
    for v in membership.voter_ids().filter(|v| *v != me) {
        if matched_index(m, v) != last {
            return None;
        }
        let addr = membership.get_node(&v).map(|n| n.addr.clone()).unwrap_or_default();
        others.push((v, addr));
    }
    if others.is_empty() {
        // A single voter sends no heartbeats anyway.
        return None;
    }
    Some(Candidate {
        idle: Idle {
            group,
            term: m.vote.leader_id().term,
            index: last,
        },
        others,
    })
}

/// Whether this replica (`m`) may stop campaigning on `from`'s word that
/// it leads `idle`: it follows `from` in that term and holds and has
/// applied the same last entry, so nothing is left to tell it.
pub fn follows(from: NodeId, idle: &Idle, m: &RaftMetrics<NodeId, openraft::BasicNode>) -> bool {
    m.running_state.is_ok()
        && m.state == ServerState::Follower
        && m.current_leader == Some(from)
        && m.vote.is_committed()
        && m.vote.leader_id().node_id == from
        && m.vote.leader_id().term == idle.term
        && m.last_log_index == Some(idle.index)
        && m.last_applied.map(|l| l.index) == Some(idle.index)
}

/// Leader side: since when each led group has had its current last entry.
#[derive(Default)]
struct Leading {
    since: HashMap<GroupId, (Idle, Instant)>,
    /// Groups whose heartbeats are stopped.
    silenced: HashSet<GroupId>,
}

/// The node's quiet groups, both sides (see the module docs).
pub struct Quiet {
    me: NodeId,
    enabled: bool,
    groups: Arc<Groups>,
    peers: Arc<Peers>,
    /// Follower side: when each replica here was last handed a heartbeat.
    touched: Mutex<HashMap<GroupId, Instant>>,
    leading: Mutex<Leading>,
    pub gauges: QuietGauges,
}

impl Quiet {
    /// `enabled`: `[cluster] quiesce_idle_groups`. Off, this node stops no
    /// heartbeats and takes no liveness for one (it answers that it took none).
    pub fn new(me: NodeId, enabled: bool, groups: Arc<Groups>, peers: Arc<Peers>, gauges: QuietGauges) -> Quiet {
        Quiet {
            me,
            enabled,
            groups,
            peers,
            touched: Mutex::new(HashMap::new()),
            leading: Mutex::new(Leading::default()),
            gauges,
        }
    }

    /// Runs a round every [`ROUND`] until `stop`.
    pub fn spawn(self: &Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let quiet = Arc::clone(self);
        tokio::spawn(async move {
            if !quiet.enabled {
                return;
            }
            let mut tick = tokio::time::interval(ROUND);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                quiet.round().await;
            }
        })
    }

    /// One round: release the holds that ran out, vouch for the idle groups
    /// led here, and stop or resume their heartbeats by the answers.
    pub async fn round(&self) {
        let now = Instant::now();
        self.release(now);
        let candidates = self.responsive(self.candidates(now)).await;
        let mut per_peer: BTreeMap<NodeId, (String, Vec<QuietGroup>)> = BTreeMap::new();
        for c in &candidates {
            for (peer, addr) in &c.others {
                let entry = per_peer.entry(*peer).or_insert_with(|| (addr.clone(), Vec::new()));
                entry.1.push(QuietGroup {
                    group_id: c.idle.group,
                    term: c.idle.term,
                    index: c.idle.index,
                });
            }
        }
        let mut calls = tokio::task::JoinSet::new();
        for (peer, (addr, groups)) in per_peer {
            let client = self.peers.client(peer, &addr);
            let request = LivenessRequest { from: self.me, groups };
            calls.spawn(async move {
                let Ok(mut client) = client else {
                    return (peer, HashSet::new());
                };
                let reply = tokio::time::timeout(RPC_TIMEOUT, client.liveness(request)).await;
                let held: HashSet<GroupId> = match reply {
                    Ok(Ok(r)) => r.into_inner().quiet.into_iter().collect(),
                    Ok(Err(status)) => {
                        tracing::debug!(peer, error = %status, "liveness refused");
                        HashSet::new()
                    }
                    Err(_) => HashSet::new(),
                };
                (peer, held)
            });
        }
        let mut answers: HashMap<NodeId, HashSet<GroupId>> = HashMap::new();
        while let Some(joined) = calls.join_next().await {
            if let Ok((peer, held)) = joined {
                answers.insert(peer, held);
            }
        }
        let quiet: HashSet<GroupId> = candidates
            .iter()
            .filter(|c| {
                c.others
                    .iter()
                    .all(|(peer, _)| answers.get(peer).is_some_and(|h| h.contains(&c.idle.group)))
            })
            .map(|c| c.idle.group)
            .collect();
        self.silence(&quiet);
    }

    /// Idle groups led here (their idle time counted from the first round
    /// that saw their current last entry).
    fn candidates(&self, now: Instant) -> Vec<Candidate> {
        let mut leading = self.leading.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for g in self.groups.shards() {
            let c = {
                let m = g.raft.metrics();
                let m = m.borrow();
                candidate(g.id, self.me, &m)
            };
            let Some(c) = c else { continue };
            seen.insert(g.id);
            let since = match leading.since.get(&g.id) {
                Some((idle, since)) if *idle == c.idle => *since,
                _ => {
                    leading.since.insert(g.id, (c.idle, now));
                    now
                }
            };
            if now.duration_since(since) >= IDLE_AFTER {
                out.push(c);
            }
        }
        leading.since.retain(|g, _| seen.contains(g));
        out
    }

    /// The candidates whose Raft core answers at once and still leads: a
    /// wedged core sends no heartbeats, and must not be vouched for either.
    async fn responsive(&self, candidates: Vec<Candidate>) -> Vec<Candidate> {
        let mut probes = tokio::task::JoinSet::new();
        for c in candidates {
            let Some(g) = self.groups.get(c.idle.group) else {
                continue;
            };
            let me = self.me;
            probes.spawn(async move {
                let probe = g.raft.with_raft_state(move |s| {
                    s.server_state == ServerState::Leader && s.vote_ref().leader_id().node_id == me
                });
                match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(Ok(true)) => Some(c),
                    _ => None,
                }
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = probes.join_next().await {
            if let Ok(Some(c)) = joined {
                out.push(c);
            }
        }
        out
    }

    /// Stops the heartbeats of `quiet` and resumes those of every other
    /// group silenced before.
    fn silence(&self, quiet: &HashSet<GroupId>) {
        let mut leading = self.leading.lock().unwrap_or_else(|p| p.into_inner());
        for id in leading.silenced.difference(quiet) {
            if let Some(g) = self.groups.get(*id) {
                g.raft.runtime_config().heartbeat(true);
            }
        }
        for id in quiet.difference(&leading.silenced) {
            if let Some(g) = self.groups.get(*id) {
                g.raft.runtime_config().heartbeat(false);
                tracing::debug!(group = id, "group quiet: heartbeats stopped");
            }
        }
        leading.silenced = quiet.clone();
        self.gauges.leading.set(quiet.len() as i64);
    }

    /// A peer's liveness: hands each listed group's replica here that
    /// follows `from` with the same last entry the heartbeat `from` would
    /// have sent (see the module docs), and returns those groups.
    pub async fn vouched(&self, from: NodeId, groups: &[QuietGroup]) -> Vec<GroupId> {
        if !self.enabled {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::with_capacity(groups.len());
        let mut touches = Vec::new();
        {
            let touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            for q in groups {
                let idle = Idle {
                    group: q.group_id,
                    term: q.term,
                    index: q.index,
                };
                let Some(g) = self.groups.get(idle.group) else { continue };
                let heartbeat = {
                    let m = g.raft.metrics();
                    let m = m.borrow();
                    follows(from, &idle, &m).then(|| heartbeat(&m))
                };
                let Some(heartbeat) = heartbeat else { continue };
                if touched
                    .get(&idle.group)
                    .is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY)
                {
                    out.push(idle.group);
                } else {
                    touches.push((g, heartbeat));
                }
            }
        }
        // Each replica's core takes its heartbeat on its own task; bounded.
        let mut calls = tokio::task::JoinSet::new();
        for (g, rpc) in touches {
            calls.spawn(async move {
                let reply = tokio::time::timeout(TOUCH_TIMEOUT, g.raft.append_entries(rpc)).await;
                matches!(reply, Ok(Ok(AppendEntriesResponse::Success))).then_some(g.id)
            });
        }
        let mut taken = Vec::new();
        while let Some(joined) = calls.join_next().await {
            if let Ok(Some(id)) = joined {
                taken.push(id);
            }
        }
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        for id in taken {
            touched.insert(id, now);
            out.push(id);
        }
        out
    }

    /// Forgets the replicas no liveness has reached for a while (the gauge).
    fn release(&self, now: Instant) {
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        touched.retain(|id, t| self.groups.get(*id).is_some() && now.duration_since(*t) < FOLLOWING_FOR);
        self.gauges.following.set(touched.len() as i64);
    }
}

/// The heartbeat a follower described by `m` would get from the leader it
/// follows while both hold the same last entry (checked by [`follows`]).
fn heartbeat(m: &RaftMetrics<NodeId, openraft::BasicNode>) -> AppendEntriesRequest<crate::TypeConfig> {
    AppendEntriesRequest {
        vote: m.vote,
        prev_log_id: m.last_applied,
        entries: Vec::new(),
        leader_commit: m.last_applied,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use openraft::{BasicNode, CommittedLeaderId, LogId, Membership, StoredMembership, Vote};
    use std::collections::BTreeSet;

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// Metrics of node `me` in a 3-voter group led by node 1 in term 4,
    /// every log at `index`.
    fn metrics(me: NodeId, index: u64) -> RaftMetrics<NodeId, BasicNode> {
        let voters = BTreeSet::from([1, 2, 3]);
        let nodes: BTreeMap<NodeId, BasicNode> = voters.iter().map(|v| (*v, BasicNode::new(format!("n{v}")))).collect();
        let membership = Membership::new(vec![voters], nodes);
        let mut m = RaftMetrics::new_initial(me);
        m.membership_config = Arc::new(StoredMembership::new(Some(log_id(4, 1)), membership));
        m.vote = Vote::new_committed(4, 1);
        m.current_leader = Some(1);
        m.current_term = 4;
        m.last_log_index = Some(index);
        m.last_applied = Some(log_id(4, index));
        if me == 1 {
            m.state = ServerState::Leader;
            m.replication = Some(
                [
                    (1, Some(log_id(4, index))),
                    (2, Some(log_id(4, index))),
                    (3, Some(log_id(4, index))),
                ]
                .into(),
            );
        } else {
            m.state = ServerState::Follower;
        }
        m
    }

    #[test]
    fn only_a_fully_replicated_and_applied_shard_is_idle() {
        let m = metrics(1, 9);
        let c = candidate(5, 1, &m).expect("idle");
        assert_eq!(
            c.idle,
            Idle {
                group: 5,
                term: 4,
                index: 9
            }
        );
        assert_eq!(c.others, vec![(2, "n2".to_owned()), (3, "n3".to_owned())]);
        assert_eq!(
            candidate(CONTROL_GROUP, 1, &m),
            None,
            "the control group keeps its heartbeats"
        );
        assert_eq!(candidate(5, 2, &metrics(2, 9)), None, "a follower vouches for nothing");

        let mut lagging = metrics(1, 9);
        lagging.replication.as_mut().unwrap().insert(3, Some(log_id(4, 8)));
        assert_eq!(candidate(5, 1, &lagging), None, "a voter misses the last entry");

        let mut unapplied = metrics(1, 9);
        unapplied.last_applied = Some(log_id(4, 8));
        assert_eq!(candidate(5, 1, &unapplied), None, "not applied on the leader");

        let mut learner = metrics(1, 9);
        let mut nodes: BTreeMap<NodeId, BasicNode> = (1..=4).map(|v| (v, BasicNode::new(format!("n{v}")))).collect();
        nodes.insert(4, BasicNode::new("n4"));
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        learner.membership_config = Arc::new(StoredMembership::new(Some(log_id(4, 2)), membership));
        assert_eq!(candidate(5, 1, &learner), None, "a learner is catching up");
    }

    #[test]
    fn a_follower_takes_liveness_only_from_its_own_leader_term_and_last_entry() {
        let idle = Idle {
            group: 5,
            term: 4,
            index: 9,
        };
        assert!(follows(1, &idle, &metrics(2, 9)));
        assert!(!follows(3, &idle, &metrics(2, 9)), "another node claims the group");
        assert!(!follows(1, &Idle { term: 5, ..idle }, &metrics(2, 9)), "another term");
        assert!(!follows(1, &idle, &metrics(2, 8)), "an entry is missing here");
        let mut unapplied = metrics(2, 9);
        unapplied.last_applied = Some(log_id(4, 8));
        assert!(!follows(1, &idle, &unapplied), "the commit is not known here yet");
        let mut candidate_state = metrics(2, 9);
        candidate_state.state = ServerState::Candidate;
        assert!(!follows(1, &idle, &candidate_state));
    }

    #[test]
    fn the_handed_over_heartbeat_is_the_leaders_own() {
        let m = metrics(2, 9);
        let hb = heartbeat(&m);
        assert_eq!(hb.vote, Vote::new_committed(4, 1));
        assert_eq!(hb.prev_log_id, Some(log_id(4, 9)));
        assert_eq!(hb.leader_commit, Some(log_id(4, 9)));
        assert!(hb.entries.is_empty());
    }
}
