//! `ternctl shaping show DOMAIN`: what shaping does to mail for a domain,
//! as the node asked sees it. Each node's share is computed by that node
//! from the leaders of the queue shards it hosts (with three nodes or fewer
//! every node hosts every shard, so the view is complete; in larger clusters
//! shards it does not host count for no node).

use std::sync::Arc;
use tern_config::shaping::{Rate, ShapingLimits, ShapingRule};
use tern_model::shaping::{ActionKind, AutoAction};
use tern_proto::admin as pb;

use crate::delivery::Delivery;
use crate::raft::groups::Groups;
use crate::raft::NodeId;
use crate::shaping::{node_connections, Shaper};

fn rate_text(r: Option<Rate>) -> String {
    r.map(|r| r.to_string()).unwrap_or_default()
}

fn limits(l: &ShapingLimits) -> pb::ShapingLimits {
    pb::ShapingLimits {
        max_connections: l.max_connections.unwrap_or(0),
        messages_per_connection: l.messages_per_connection.unwrap_or(0),
        rate: rate_text(l.rate),
        connection_rate: rate_text(l.connection_rate),
        domain_rate: rate_text(l.domain_rate),
    }
}

fn rule(r: &ShapingRule) -> pb::ShapingRuleInfo {
    pb::ShapingRuleInfo {
        name: r.name.clone(),
        domain: r.domain.clone().unwrap_or_default(),
        mx_suffix: r.mx_suffix.clone().unwrap_or_default(),
        source: r.source.clone().unwrap_or_default(),
        limits: Some(limits(&r.limits)),
    }
}

fn action(a: &AutoAction) -> pb::ShapingActionInfo {
    let (kind, rate) = match a.kind {
        ActionKind::Suspend => ("suspend", String::new()),
        ActionKind::Throttle { count, per_secs } => ("throttle", Rate { count, per_secs }.to_string()),
        ActionKind::Bounce => ("bounce", String::new()),
    };
    pb::ShapingActionInfo {
        kind: kind.into(),
        rate,
        rule: a.rule.clone(),
        reason: a.reason.clone(),
        since: a.since,
        until: a.until,
        node: a.node,
    }
}

/// The reply for `domain` (lowercase, validated by the caller).
pub async fn show(delivery: &Delivery, groups: &Groups, node_id: NodeId, domain: &str) -> pb::ShapingShowReply {
    let shaper: Arc<Shaper> = delivery.shaper();
    let (hosts, note) = match delivery.next_hops(domain).await {
        Ok(h) => (h, String::new()),
        Err(e) => (Vec::new(), e),
    };
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let matched = shaper.rules().matching(domain, &host_refs, None);
    let dest = shaper.classify(domain, &host_refs, None);
    let now = chrono::Utc::now().timestamp();
    let actions: Vec<AutoAction> = delivery
        .control()
        .and_then(|c| c.action(&dest.scope))
        .filter(|a| a.in_force(now))
        .into_iter()
        .collect();
    let rate = Shaper::effective_rate(&dest, actions.first(), now);

    // Each member's share from the leaders of the shards hosted here.
    let placed = crate::cluster::records::placement(groups);
    let hosted = groups.shards();
    let shards = placed.len().max(hosted.len()) as u64;
    let mut members: Vec<NodeId> = crate::cluster::records::nodes(groups).into_keys().collect();
    if members.is_empty() {
        members.push(node_id);
    }
    let shares = members
        .into_iter()
        .map(|id| {
            let led = hosted.iter().filter(|h| h.leader() == Some(id)).count() as u64;
            // No shard known yet: this node counts as delivering everything
            // (as its limiters do), the others as nothing.
            let (led, shards, fraction) = match shards {
                0 if id == node_id => (1, 1, 1.0),
                0 => (0, 1, 0.0),
                _ => (led, shards, led as f64 / shards as f64),
            };
            pb::ShapingNodeShare {
                node_id: id,
                shards_led: led,
                shards,
                fraction,
                rate_per_min: match rate {
                    Some(r) if led > 0 => r.per_second() * 60.0 * fraction,
                    _ => 0.0,
                },
                max_connections: match dest.limits.max_connections {
                    Some(n) if led > 0 => node_connections(n, fraction) as u64,
                    _ => 0,
                },
            }
        })
        .collect();
    pb::ShapingShowReply {
        domain: domain.to_owned(),
        scope: dest.scope.clone(),
        hosts,
        note,
        rules: matched.rules.iter().map(|r| rule(r)).collect(),
        limits: Some(limits(&matched.limits)),
        effective_rate: rate_text(rate),
        shares,
        actions: actions.iter().map(action).collect(),
        answered_by: node_id,
    }
}
