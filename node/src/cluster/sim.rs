//! A deterministic simulation of the control plane (test builds only):
//! N nodes, S shards of R replicas, simulated time in 1 s ticks (the
//! controller's period), driven by the controller's own decisions in
//! [`super::placement`] (`placement_repairs`, `rebalance_step`,
//! `next_leader_move`, `leaving_leader_target`, `membership_step`), with
//! Raft modelled simply:
//!
//! - a shard's configuration is a set of voters; a change goes through a
//!   joint configuration (old and new both vote) for one tick, then the new
//!   one; a leader left out steps down and an election follows;
//! - a shard that lost its leader elects a live voter after an election
//!   timeout (2 to 3 ticks, seeded), if a majority of each configuration is
//!   live; a hand-over's target wins at the next tick if it is a live voter;
//! - a learner catches up after a seeded delay (1 to 3 ticks by default);
//!   `add_learner` returns then, or fails after `CATCH_UP` when its node is
//!   down;
//! - the control leader is the lowest-id live control voter; it pings every
//!   member each tick; liveness, `dead_node_after_secs` (300) and
//!   `REACHABLE_WITHIN` (3 s) are as in `status.rs`; a new control leader
//!   starts with fresh liveness, as the real one does.
//!
//! Each tick: Raft progress (elections, hand-overs, catch-up, joint
//! configurations), then the control leader's loop (repairs, else one
//! rebalancing step, else one leader move, as `reconcile.rs` runs them),
//! then every shard leader's membership step, then the invariant: in each
//! configuration of every shard (both halves of a joint one) a majority of
//! voters is live and caught up. Same seed, same trace.
//!
//! `concurrency` > 1 is the real controller with `ternctl cluster set
//! rebalance_moves N`: up to that many shards move at once, each move on a
//! shard at rest (`rebalance_steps`); the leader balancer, which the real
//! one runs one move per tick, here moves up to N leaderships at once.

use std::collections::{BTreeMap, BTreeSet};

use tern_proto::admin::ShardStatus;

use super::placement::{
    control_voters, leaving_leader_target, membership_step, next_leader_move, placement_repairs, rebalance_move_among,
    rebalance_steps, MembershipStep, RebalanceStep,
};
use crate::raft::{GroupId, NodeId};

mod tests;

/// The leader's last log index in the model; a learner that caught up has
/// matched it, one still catching up has matched nothing.
const LAST: u64 = 1_000_000;

/// Simulated timings, in ticks of 1 s.
#[derive(Debug, Clone)]
pub struct Timing {
    /// `[cluster] dead_node_after_secs` (default 300).
    pub dead_after: u64,
    /// `REACHABLE_WITHIN` (3 s).
    pub reachable_within: u64,
    /// Ticks from losing a leader to electing one (inclusive range).
    pub election: (u64, u64),
    /// Ticks from asking a replica to campaign to its winning.
    pub hand_over: u64,
    /// Ticks a new learner takes to catch up (inclusive range).
    pub catch_up: (u64, u64),
    /// `CATCH_UP`: an `add_learner` whose node never catches up fails then.
    pub add_timeout: u64,
    /// `DRAIN_RETRY` (30 s).
    pub drain_retry: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            dead_after: 300,
            reachable_within: super::REACHABLE_WITHIN.as_secs(),
            election: (2, 3),
            hand_over: 1,
            catch_up: (1, 3),
            add_timeout: super::membership::CATCH_UP.as_secs(),
            drain_retry: 30,
        }
    }
}

/// What is simulated.
#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: u64,
    pub shards: u64,
    pub replicas: usize,
    pub seed: u64,
    /// Moves (replica or leader) started per tick; the real controller: 1.
    pub concurrency: usize,
    pub timing: Timing,
}

impl Config {
    pub fn new(nodes: u64, shards: u64, seed: u64) -> Config {
        Config {
            nodes,
            shards,
            replicas: 3,
            seed,
            concurrency: 1,
            timing: Timing::default(),
        }
    }
}

/// One thing that happened, for the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    NodeDown(NodeId),
    NodeJoin(NodeId),
    NodeRemoved(NodeId),
    Drain(NodeId),
    Placement { shard: GroupId, replicas: Vec<NodeId> },
    AddLearner { shard: GroupId, node: NodeId },
    Joint { shard: GroupId, voters: Vec<NodeId> },
    Leader { shard: GroupId, node: NodeId },
    HandOver { shard: GroupId, from: NodeId, to: NodeId },
}

/// Counters since the last [`Sim::reset_stats`].
#[derive(Debug, Clone)]
pub struct Stats {
    /// Replicas added to a shard's voters (one per replica moved or grown).
    pub replica_moves: u64,
    /// Placement records written by the controller.
    pub placement_writes: u64,
    /// Hand-overs the controller or a leaving leader asked for.
    pub hand_overs: u64,
    /// Leaders elected after a leader was lost or removed.
    pub elections: u64,
    /// The smallest (live, caught-up voters − majority) seen in any
    /// configuration of any shard; below 0 a shard lost its majority.
    pub min_margin: i64,
    /// Where and when a majority was lost.
    pub violations: Vec<String>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            replica_moves: 0,
            placement_writes: 0,
            hand_overs: 0,
            elections: 0,
            min_margin: i64::MAX,
            violations: Vec::new(),
        }
    }
}

/// A shard leader's membership change under way (`change_replicas`).
#[derive(Debug, Clone)]
struct Task {
    desired: BTreeSet<NodeId>,
    voters: BTreeSet<NodeId>,
    /// New replicas already dealt with in this try.
    done: BTreeSet<NodeId>,
    /// The learner being added, if any, and when `add_learner` returns.
    adding: Option<NodeId>,
    until: u64,
}

#[derive(Debug, Clone, Default)]
struct Shard {
    voters: BTreeSet<NodeId>,
    /// A joint configuration: old voters, new voters, when it completes.
    joint: Option<(BTreeSet<NodeId>, BTreeSet<NodeId>, u64)>,
    /// Learners and when they have caught up.
    learners: BTreeMap<NodeId, u64>,
    leader: Option<NodeId>,
    /// When the election under way ends.
    election_at: Option<u64>,
    /// A hand-over: its target and when it wins.
    campaign: Option<(NodeId, u64)>,
    task: Option<Task>,
    /// Leaders of this shard that already tried to hand over before leaving it.
    handed_over: BTreeSet<NodeId>,
}

/// The simulated cluster.
pub struct Sim {
    pub cfg: Config,
    /// Simulated seconds since the start.
    pub now: u64,
    rng: u64,
    /// Ids are never reused.
    next_id: NodeId,
    pub members: BTreeSet<NodeId>,
    down: BTreeSet<NodeId>,
    /// Removed members whose process still runs until its replicas moved.
    leaving: BTreeSet<NodeId>,
    pub drained: BTreeSet<NodeId>,
    control_voters: BTreeSet<NodeId>,
    control_leader: Option<NodeId>,
    last_seen: BTreeMap<NodeId, u64>,
    last_answer: BTreeMap<NodeId, u64>,
    pub placement: BTreeMap<GroupId, Vec<NodeId>>,
    shards: BTreeMap<GroupId, Shard>,
    drain_tries: BTreeMap<GroupId, (NodeId, u64)>,
    pub trace: Vec<(u64, Event)>,
    pub stats: Stats,
}

impl Sim {
    /// A cluster as bootstrapped: node 1 holds and leads every shard alone,
    /// and every other node has just been added as a member.
    pub fn bootstrap(cfg: Config) -> Sim {
        let mut sim = Sim::empty(cfg);
        for shard in 1..=sim.cfg.shards {
            sim.placement.insert(shard, vec![1]);
            let s = Shard {
                voters: BTreeSet::from([1]),
                leader: Some(1),
                ..Shard::default()
            };
            sim.shards.insert(shard, s);
        }
        sim
    }

    /// A cluster already spread out: every shard on R replicas placed as the
    /// controller places them, each led by its first replica (the leader
    /// balancer evens leaderships out from there). A quick start for
    /// scenarios that begin with a formed cluster.
    pub fn spread(cfg: Config) -> Sim {
        let mut sim = Sim::empty(cfg);
        let empty: BTreeMap<GroupId, Vec<NodeId>> = (1..=sim.cfg.shards).map(|s| (s, Vec::new())).collect();
        let none = BTreeSet::new();
        for (shard, replicas) in placement_repairs(&empty, &sim.members, &none, sim.cfg.replicas, true, |_| false) {
            let s = Shard {
                voters: replicas.iter().copied().collect(),
                leader: replicas.first().copied(),
                ..Shard::default()
            };
            sim.shards.insert(shard, s);
            sim.placement.insert(shard, replicas);
        }
        sim
    }

    fn empty(cfg: Config) -> Sim {
        let members: BTreeSet<NodeId> = (1..=cfg.nodes).collect();
        Sim {
            next_id: cfg.nodes + 1,
            rng: cfg.seed ^ 0x9e37_79b9_7f4a_7c15,
            control_voters: control_voters(&BTreeSet::new(), &members),
            cfg,
            now: 0,
            members,
            down: BTreeSet::new(),
            leaving: BTreeSet::new(),
            drained: BTreeSet::new(),
            control_leader: None,
            last_seen: BTreeMap::new(),
            last_answer: BTreeMap::new(),
            placement: BTreeMap::new(),
            shards: BTreeMap::new(),
            drain_tries: BTreeMap::new(),
            trace: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// splitmix64: small, seeded, the same on every platform.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    fn event(&mut self, e: Event) {
        self.trace.push((self.now, e));
    }

    pub fn reset_stats(&mut self) {
        self.stats = Stats::default();
    }

    fn live(&self, n: NodeId) -> bool {
        !self.down.contains(&n) && (self.members.contains(&n) || self.leaving.contains(&n))
    }

    /// Kills a node (it never comes back).
    pub fn kill(&mut self, n: NodeId) {
        self.down.insert(n);
        self.event(Event::NodeDown(n));
    }

    /// A new, empty node becomes a member.
    pub fn join(&mut self) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        self.members.insert(id);
        self.event(Event::NodeJoin(id));
        id
    }

    /// `ternctl member remove`: the node leaves the members; its process runs
    /// on until no shard has it as a voter.
    pub fn remove(&mut self, n: NodeId) {
        self.members.remove(&n);
        self.leaving.insert(n);
        self.event(Event::NodeRemoved(n));
    }

    /// `ternctl node drain`.
    pub fn drain(&mut self, n: NodeId) {
        self.drained.insert(n);
        self.event(Event::Drain(n));
    }

    /// Runs ticks until `done` holds (checked after each tick), at most
    /// `limit` ticks; the ticks taken, or None at the limit.
    pub fn run_until(&mut self, limit: u64, done: impl Fn(&Sim) -> bool) -> Option<u64> {
        let start = self.now;
        while self.now - start < limit {
            self.tick();
            if done(self) {
                return Some(self.now - start);
            }
        }
        None
    }

    pub fn tick(&mut self) {
        self.now += 1;
        self.raft();
        self.control();
        self.reconcile();
        self.check();
    }

    fn in_config(s: &Shard, n: NodeId) -> bool {
        match &s.joint {
            Some((old, new, _)) => old.contains(&n) || new.contains(&n),
            None => s.voters.contains(&n),
        }
    }

    fn has_majority(&self, s: &Shard) -> bool {
        let configs: Vec<&BTreeSet<NodeId>> = match &s.joint {
            Some((old, new, _)) => vec![old, new],
            None => vec![&s.voters],
        };
        configs
            .iter()
            .all(|c| c.iter().filter(|n| self.live(**n)).count() > c.len() / 2)
    }

    /// Raft's part: leaders lost and elected, hand-overs, learners catching
    /// up, joint configurations completing.
    fn raft(&mut self) {
        let ids: Vec<GroupId> = self.shards.keys().copied().collect();
        for id in ids {
            let Some(mut s) = self.shards.remove(&id) else { continue };
            if s.leader.is_some_and(|l| !self.live(l)) {
                s.leader = None;
                s.task = None;
                s.campaign = None;
            }
            if s.leader.is_none() {
                match s.election_at {
                    None => s.election_at = Some(self.now + self.between(self.cfg.timing.election) - 1),
                    Some(at) if at <= self.now => {
                        let candidates: Vec<NodeId> = s
                            .voters
                            .iter()
                            .chain(s.joint.iter().flat_map(|(o, n, _)| o.iter().chain(n)))
                            .copied()
                            .filter(|n| self.live(*n))
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        if !candidates.is_empty() && self.has_majority(&s) {
                            let pick = self.next_u64() as usize % candidates.len();
                            s.leader = Some(candidates[pick]);
                            s.election_at = None;
                            self.stats.elections += 1;
                            self.event(Event::Leader {
                                shard: id,
                                node: candidates[pick],
                            });
                        } else {
                            s.election_at = Some(self.now + self.between(self.cfg.timing.election));
                        }
                    }
                    Some(_) => {}
                }
            }
            if let Some((to, at)) = s.campaign {
                if at <= self.now {
                    s.campaign = None;
                    if s.leader.is_some() && s.leader != Some(to) && self.live(to) && Sim::in_config(&s, to) {
                        s.leader = Some(to);
                        // The old leader's change in flight fails with it.
                        s.task = None;
                        self.event(Event::Leader { shard: id, node: to });
                    }
                }
            }
            if let Some((_, new, at)) = s.joint.clone() {
                if at <= self.now && s.leader.is_some() {
                    s.learners.retain(|n, _| !new.contains(n));
                    s.voters = new;
                    s.joint = None;
                    if s.leader.is_some_and(|l| !s.voters.contains(&l)) {
                        s.leader = None;
                        s.task = None;
                    }
                }
            }
            self.shards.insert(id, s);
            let waiting = self
                .shards
                .get(&id)
                .and_then(|s| s.task.as_ref())
                .is_some_and(|t| t.until <= self.now);
            if waiting {
                self.drive(id);
            }
        }
    }

    /// A learner's matched index.
    fn matched(&self, s: &Shard, n: NodeId) -> Option<u64> {
        let ready = *s.learners.get(&n)?;
        Some(if self.live(n) && ready <= self.now { LAST } else { 0 })
    }

    /// The shard leader's `change_replicas`, from where its task stands:
    /// runs `membership_step` until it must wait.
    fn drive(&mut self, id: GroupId) {
        let Some(mut s) = self.shards.remove(&id) else { return };
        let Some(mut t) = s.task.take() else {
            self.shards.insert(id, s);
            return;
        };
        if let Some(n) = t.adding.take() {
            // `add_learner` returned: caught up, or failed (its node is down).
            if self.matched(&s, n) != Some(LAST) {
                self.shards.insert(id, s);
                return;
            }
            t.done.insert(n);
        }
        loop {
            let step = membership_step(&t.desired, &t.voters, &t.done, |n| self.matched(&s, n), LAST);
            let node = match step {
                MembershipStep::Promote => {
                    let voters: Vec<NodeId> = t.desired.iter().copied().collect();
                    self.stats.replica_moves += t.desired.difference(&t.voters).count() as u64;
                    s.joint = Some((t.voters.clone(), t.desired.clone(), self.now + 1));
                    self.event(Event::Joint { shard: id, voters });
                    break;
                }
                MembershipStep::CaughtUp(n) | MembershipStep::AddLearner(n) | MembershipStep::Behind(n) => n,
            };
            // `nodes.get(n).ok_or(NoAddress)`: a node no longer a member.
            if !self.members.contains(&node) {
                break;
            }
            match step {
                MembershipStep::CaughtUp(n) => {
                    t.done.insert(n);
                }
                MembershipStep::AddLearner(n) => {
                    let ready = self.now + self.between(self.cfg.timing.catch_up);
                    s.learners.insert(n, ready);
                    let until = if self.live(n) {
                        ready
                    } else {
                        self.now + self.cfg.timing.add_timeout
                    };
                    self.event(Event::AddLearner { shard: id, node: n });
                    s.task = Some(Task {
                        adding: Some(n),
                        until,
                        ..t
                    });
                    break;
                }
                MembershipStep::Behind(_) | MembershipStep::Promote => break,
            }
        }
        self.shards.insert(id, s);
    }

    /// Every shard leader (`reconcile`): a shard whose voters are not its
    /// placement, with no change under way, starts one.
    fn reconcile(&mut self) {
        let ids: Vec<GroupId> = self.shards.keys().copied().collect();
        for id in ids {
            let Some(s) = self.shards.get(&id) else { continue };
            let Some(leader) = s.leader else { continue };
            let Some(desired) = self.placement.get(&id) else {
                continue;
            };
            let desired: BTreeSet<NodeId> = desired.iter().copied().collect();
            if desired.is_empty() || desired == s.voters || s.task.is_some() || s.joint.is_some() {
                continue;
            }
            let voters = s.voters.clone();
            let first_try = !s.handed_over.contains(&leader);
            if !desired.contains(&leader) && first_try {
                let target = leaving_leader_target(&desired, &voters, |n| if self.live(n) { LAST } else { 0 });
                if let Some(to) = target {
                    if let Some(s) = self.shards.get_mut(&id) {
                        s.handed_over.insert(leader);
                    }
                    self.hand_over(id, leader, to);
                    continue;
                }
            }
            if let Some(s) = self.shards.get_mut(&id) {
                s.handed_over.remove(&leader);
                s.task = Some(Task {
                    desired,
                    voters,
                    done: BTreeSet::new(),
                    adding: None,
                    until: self.now,
                });
            }
            self.drive(id);
        }
    }

    fn hand_over(&mut self, shard: GroupId, from: NodeId, to: NodeId) {
        let at = self.now + self.cfg.timing.hand_over;
        if let Some(s) = self.shards.get_mut(&shard) {
            s.campaign = Some((to, at));
        }
        self.stats.hand_overs += 1;
        self.event(Event::HandOver { shard, from, to });
    }

    /// Each shard as `all_shards` reports it.
    pub fn rows(&self) -> BTreeMap<GroupId, ShardStatus> {
        self.shards
            .iter()
            .map(|(id, s)| {
                let voters: BTreeSet<NodeId> = match &s.joint {
                    Some((old, new, _)) => old.union(new).copied().collect(),
                    None => s.voters.clone(),
                };
                let row = ShardStatus {
                    shard: *id,
                    leader: s.leader.filter(|l| self.live(*l)).unwrap_or(0),
                    replicas: self.placement.get(id).cloned().unwrap_or_default(),
                    voters: voters.into_iter().collect(),
                    joint: s.joint.is_some(),
                    ..ShardStatus::default()
                };
                (*id, row)
            })
            .collect()
    }

    /// The control leader's liveness view, updated by this tick's pings;
    /// (dead, reachable).
    fn ping(&mut self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let leader = self.control_voters.iter().copied().find(|n| self.live(*n));
        if leader != self.control_leader {
            // A new control leader knows nothing of when nodes last answered.
            self.last_seen.clear();
            self.last_answer.clear();
            self.control_leader = leader;
        }
        let members = self.members.clone();
        self.last_seen.retain(|n, _| members.contains(n));
        self.last_answer.retain(|n, _| members.contains(n));
        for n in &members {
            self.last_seen.entry(*n).or_insert(self.now);
            if self.live(*n) {
                self.last_seen.insert(*n, self.now);
                self.last_answer.insert(*n, self.now);
            }
        }
        let t = &self.cfg.timing;
        let dead = self
            .last_seen
            .iter()
            .filter(|(_, at)| self.now - **at >= t.dead_after)
            .map(|(n, _)| *n)
            .collect();
        let mut reachable: BTreeSet<NodeId> = self
            .last_answer
            .iter()
            .filter(|(_, at)| self.now - **at < t.reachable_within)
            .map(|(n, _)| *n)
            .collect();
        reachable.extend(leader);
        (dead, reachable)
    }

    /// The control leader's loop (`Cluster::run`).
    fn control(&mut self) {
        self.control_voters = control_voters(&self.control_voters, &self.members);
        let (dead, reachable) = self.ping();
        if self.control_leader.is_none() {
            return;
        }
        let changes = placement_repairs(&self.placement, &self.members, &dead, self.cfg.replicas, true, |_| {
            false
        });
        if !changes.is_empty() {
            for (shard, replicas) in changes {
                self.set_placement(shard, replicas);
            }
            return;
        }
        if self.cfg.concurrency <= 1 && !self.at_rest() {
            // `rebalance_step` and `next_leader_move` would both wait (a
            // shortcut: building every row each tick is the sim's main cost).
            return;
        }
        let rows = self.rows();
        let unreachable: Vec<NodeId> = self.members.iter().copied().filter(|n| !self.live(*n)).collect();
        let all_reachable = unreachable.is_empty() && self.members.is_subset(&reachable);
        if self.cfg.concurrency > 1 {
            self.control_concurrent(&rows, &unreachable, all_reachable);
            return;
        }
        match self.next_rebalance(&rows, all_reachable) {
            Some(RebalanceStep::Resize { shard, replicas }) | Some(RebalanceStep::Move { shard, replicas, .. }) => {
                self.set_placement(shard, replicas);
                return;
            }
            Some(RebalanceStep::HandOver { shard, from, to }) => {
                if let Some(to) = to {
                    self.hand_over(shard, from, to);
                }
                return;
            }
            None => {}
        }
        let retry = self.cfg.timing.drain_retry;
        let tried = |shard| {
            self.drain_tries
                .get(&shard)
                .filter(|(_, at)| self.now - at < retry)
                .map(|(n, _)| *n)
        };
        let next = next_leader_move(
            &self.placement,
            &rows,
            &self.members,
            &self.drained,
            &unreachable,
            tried,
        );
        if let Some(m) = next {
            if m.drain {
                self.drain_tries.insert(m.shard, (m.to, self.now));
            }
            self.hand_over(m.shard, m.from, m.to);
        }
    }

    /// The rebalancer's next step, one at a time (`rebalance_step`).
    fn next_rebalance(&self, rows: &BTreeMap<GroupId, ShardStatus>, all_reachable: bool) -> Option<RebalanceStep> {
        self.rebalance(rows, all_reachable, 1).into_iter().next()
    }

    /// The rebalancer's steps with up to `moves` shards under way (`rebalance_steps`).
    fn rebalance(
        &self,
        rows: &BTreeMap<GroupId, ShardStatus>,
        all_reachable: bool,
        moves: usize,
    ) -> Vec<RebalanceStep> {
        rebalance_steps(
            &self.placement,
            rows,
            &self.members,
            all_reachable,
            self.cfg.replicas,
            |_| false,
            moves,
        )
    }

    /// `rebalance_moves` > 1: up to `concurrency` replica moves under way at once,
    /// each started on a shard at rest; leaderships likewise, once replicas
    /// are balanced and every shard is at rest.
    fn control_concurrent(
        &mut self,
        rows: &BTreeMap<GroupId, ShardStatus>,
        unreachable: &[NodeId],
        all_reachable: bool,
    ) {
        let k = self.cfg.concurrency;
        // Replica moves: the real controller's choice (`rebalance_steps`).
        let steps = self.rebalance(rows, all_reachable, k);
        let started = !steps.is_empty();
        for step in steps {
            match step {
                RebalanceStep::Resize { shard, replicas } | RebalanceStep::Move { shard, replicas, .. } => {
                    self.set_placement(shard, replicas);
                }
                RebalanceStep::HandOver { shard, from, to } => {
                    if let Some(to) = to {
                        self.hand_over(shard, from, to);
                    }
                }
            }
        }
        let leaders: BTreeMap<GroupId, NodeId> = rows.iter().map(|(s, r)| (*s, r.leader)).collect();
        let busy = self.shards.keys().any(|id| !self.shard_at_rest(*id));
        if started || busy {
            return;
        }
        if all_reachable && rebalance_move_among(&self.placement, &self.members, &leaders, |_| true).is_some() {
            return;
        }
        // Leaderships: drained nodes first, then towards an even share, k at once.
        let mut rows = rows.clone();
        for _ in 0..k {
            let retry = self.cfg.timing.drain_retry;
            let tried = |shard| {
                self.drain_tries
                    .get(&shard)
                    .filter(|(_, at)| self.now - at < retry)
                    .map(|(n, _)| *n)
            };
            let Some(m) = next_leader_move(&self.placement, &rows, &self.members, &self.drained, unreachable, tried)
            else {
                break;
            };
            if m.drain {
                self.drain_tries.insert(m.shard, (m.to, self.now));
            }
            self.hand_over(m.shard, m.from, m.to);
            if let Some(r) = rows.get_mut(&m.shard) {
                r.leader = m.to;
            }
        }
    }

    fn set_placement(&mut self, shard: GroupId, replicas: Vec<NodeId>) {
        self.stats.placement_writes += 1;
        self.event(Event::Placement {
            shard,
            replicas: replicas.clone(),
        });
        self.placement.insert(shard, replicas);
    }

    /// `placement::at_rest` over [`Sim::rows`], without building them.
    fn at_rest(&self) -> bool {
        self.placement.iter().all(|(id, p)| {
            self.shards.get(id).is_some_and(|s| {
                s.leader.is_some_and(|l| self.live(l))
                    && s.joint.is_none()
                    && s.voters.len() <= p.len()
                    && p.iter().all(|n| s.voters.contains(n))
            })
        })
    }

    /// Led by a live node, voters = placement, nothing under way.
    fn shard_at_rest(&self, id: GroupId) -> bool {
        let Some(s) = self.shards.get(&id) else { return false };
        let placed: BTreeSet<NodeId> = self.placement.get(&id).into_iter().flatten().copied().collect();
        s.leader.is_some_and(|l| self.live(l))
            && s.joint.is_none()
            && s.task.is_none()
            && s.campaign.is_none()
            && s.voters == placed
    }

    /// The invariant, every tick: in each configuration of every shard (both
    /// halves of a joint one) a majority of voters is live and caught up.
    fn check(&mut self) {
        let mut worst = i64::MAX;
        let mut lost = Vec::new();
        for (id, s) in &self.shards {
            let configs: Vec<&BTreeSet<NodeId>> = match &s.joint {
                Some((old, new, _)) => vec![old, new],
                None => vec![&s.voters],
            };
            for c in configs {
                // Voters are caught up by construction (only caught-up
                // learners are promoted; restarts are not modelled).
                let up = c.iter().filter(|n| self.live(**n)).count() as i64;
                let margin = up - (c.len() / 2 + 1) as i64;
                worst = worst.min(margin);
                if margin < 0 {
                    lost.push(format!("t={} shard {id}: voters {c:?}, {up} live", self.now));
                }
            }
        }
        self.stats.min_margin = self.stats.min_margin.min(worst);
        self.stats.violations.extend(lost);
        // A removed node's process stops once no shard has it as a voter.
        let gone: Vec<NodeId> = self
            .leaving
            .iter()
            .copied()
            .filter(|n| self.shards.values().all(|s| !Sim::in_config(s, *n)))
            .collect();
        for n in gone {
            self.leaving.remove(&n);
        }
    }

    /// Everything at rest and nothing left for the controller to do: the
    /// placement complete, no rebalancing step, no leader move.
    pub fn settled(&self) -> bool {
        if !self.shards.keys().all(|id| self.shard_at_rest(*id)) {
            return false;
        }
        let dead: BTreeSet<NodeId> = self
            .last_seen
            .iter()
            .filter(|(_, at)| self.now - **at >= self.cfg.timing.dead_after)
            .map(|(n, _)| *n)
            .collect();
        if !placement_repairs(&self.placement, &self.members, &dead, self.cfg.replicas, true, |_| {
            false
        })
        .is_empty()
        {
            return false;
        }
        let rows = self.rows();
        let unreachable: Vec<NodeId> = self.members.iter().copied().filter(|n| !self.live(*n)).collect();
        let all_reachable = unreachable.is_empty();
        if self.next_rebalance(&rows, all_reachable).is_some() {
            return false;
        }
        let drained = &self.drained;
        next_leader_move(&self.placement, &rows, &self.members, drained, &unreachable, |_| None).is_none()
    }

    /// Leaderships per node among `nodes`.
    pub fn leader_counts(&self, nodes: &[NodeId]) -> BTreeMap<NodeId, usize> {
        let mut count: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for s in self.shards.values() {
            if let Some(c) = s.leader.and_then(|l| count.get_mut(&l)) {
                *c += 1;
            }
        }
        count
    }

    /// Replicas (placement) per member.
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut count: BTreeMap<NodeId, usize> = self.members.iter().map(|n| (*n, 0)).collect();
        for r in self.placement.values() {
            for n in r {
                if let Some(c) = count.get_mut(n) {
                    *c += 1;
                }
            }
        }
        count
    }

    /// Shards whose voters include `n`.
    pub fn shards_on(&self, n: NodeId) -> usize {
        self.shards.values().filter(|s| Sim::in_config(s, n)).count()
    }

    /// A shard's voters, leader and whether a change is under way.
    pub fn shard_view(&self, id: GroupId) -> Option<(BTreeSet<NodeId>, Option<NodeId>, bool)> {
        self.shards
            .get(&id)
            .map(|s| (s.voters.clone(), s.leader, s.joint.is_some() || s.task.is_some()))
    }
}
