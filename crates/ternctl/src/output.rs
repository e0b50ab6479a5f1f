//! Output: aligned tables for people, pretty JSON for scripts, and the
//! small formatters both use.

use serde_json::json;
use tern_proto::admin::{MessageInfo, StatusReply};

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Cluster-wide answers name the members that did not answer (on stderr,
/// so that `-o json` output stays parseable).
pub fn warn_unreachable(nodes: &[u64]) {
    if !nodes.is_empty() {
        eprintln!("warning: members {nodes:?} did not answer; their shards may be missing or stale");
    }
}

pub fn status_json(s: &StatusReply) -> serde_json::Value {
    json!({
        "node_id": s.node_id,
        "hostname": s.hostname,
        "version": s.version,
        "control_leader": s.control_leader,
        "queued_messages": s.queued_messages,
        "unreachable": s.unreachable,
        "members": s.members.iter().map(|m| json!({
            "id": m.id, "addr": m.addr, "role": m.role, "control_leader": m.is_control_leader,
        })).collect::<Vec<_>>(),
        "shards": s.shards.iter().map(|sh| json!({
            "shard": sh.shard, "leader": sh.leader, "replicas": sh.replicas, "voters": sh.voters, "joint": sh.joint, "term": sh.term,
            "applied_index": sh.applied_index, "queued_messages": sh.queued_messages,
            "state": if sh.state.is_empty() { "active" } else { sh.state.as_str() },
        })).collect::<Vec<_>>(),
        "replicas": s.replicas,
        "rebalance_moves": s.rebalance_moves,
    })
}

pub fn message_json(m: &MessageInfo) -> serde_json::Value {
    json!({
        "id": m.id,
        "shard": m.shard,
        "reverse_path": m.reverse_path,
        "recipients": m.recipients.iter().map(|r| json!({
            "address": r.address, "status": r.status, "notify": r.notify,
            "orcpt": r.orcpt, "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
        "size": m.size,
        "received_at": m.received_at,
        "attempts": m.attempts,
        "next_attempt": m.next_attempt,
        "ret": m.ret,
        "envid": m.envid,
        "body_type": m.body_type,
        "smtputf8": m.smtputf8,
        "helo": m.helo,
        "client_ip": m.client_ip,
        "held": m.held,
        "state": message_state(m, chrono::Utc::now().timestamp()),
    })
}

/// The message's state as the API names it: `held`, `scheduled` (never
/// tried, due later: `send_at` or RFC 4865 HOLDFOR/HOLDUNTIL), `deferred`
/// (tried before) or `queued`.
pub fn message_state(m: &MessageInfo, now: i64) -> &'static str {
    if m.held {
        "held"
    } else if m.attempts == 0 && m.next_attempt > now {
        "scheduled"
    } else if m.attempts > 0 {
        "deferred"
    } else {
        "queued"
    }
}

pub fn print_status(s: &StatusReply) {
    println!("node {} ({}), tern {}", s.node_id, s.hostname, s.version);
    println!("control-group leader: {}", opt_node(s.control_leader));
    println!("queued messages: {}", s.queued_messages);
    println!(
        "replicas per shard: {}; rebalancer moves at once: {}\n",
        s.replicas, s.rebalance_moves
    );
    let members: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.addr.clone(),
                m.role.clone(),
                if m.is_control_leader { "yes" } else { "" }.into(),
            ]
        })
        .collect();
    print_table(&["ID", "ADDR", "ROLE", "CONTROL LEADER"], &members);
    println!();
    print_shards(s);
}

pub fn print_shards(s: &StatusReply) {
    let shards: Vec<Vec<String>> = s
        .shards
        .iter()
        .map(|sh| {
            vec![
                sh.shard.to_string(),
                if sh.state.is_empty() {
                    "active"
                } else {
                    sh.state.as_str()
                }
                .to_owned(),
                opt_node(sh.leader),
                sh.replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                sh.voters.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
                sh.term.to_string(),
                sh.applied_index.to_string(),
                sh.queued_messages.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "SHARD", "STATE", "LEADER", "REPLICAS", "VOTERS", "TERM", "APPLIED", "QUEUED",
        ],
        &shards,
    );
}

pub fn print_message(m: &MessageInfo) {
    let fields = [
        ("id", m.id.clone()),
        ("shard", m.shard.to_string()),
        ("sender", sender(&m.reverse_path)),
        ("size", format!("{} bytes", m.size)),
        ("received", time(m.received_at)),
        ("attempts", m.attempts.to_string()),
        ("state", message_state(m, chrono::Utc::now().timestamp()).into()),
        (
            "next attempt",
            if m.next_attempt == 0 {
                "now".into()
            } else {
                time(m.next_attempt)
            },
        ),
        (
            "body",
            format!("{}{}", m.body_type, if m.smtputf8 { ", SMTPUTF8" } else { "" }),
        ),
        ("ret", m.ret.clone()),
        ("envid", m.envid.clone()),
        ("client", format!("{} (helo {})", m.client_ip, m.helo)),
    ];
    for (k, v) in fields {
        if !v.is_empty() {
            println!("{k:>13}: {v}");
        }
    }
    println!();
    let rows: Vec<Vec<String>> = m
        .recipients
        .iter()
        .map(|r| {
            vec![
                r.address.clone(),
                r.status.clone(),
                r.notify.clone(),
                r.orcpt.clone(),
                r.last_reply.clone(),
            ]
        })
        .collect();
    print_table(&["RECIPIENT", "STATUS", "NOTIFY", "ORCPT", "LAST REPLY"], &rows);
}

pub fn sender(reverse_path: &str) -> String {
    if reverse_path.is_empty() {
        "<>".into()
    } else {
        reverse_path.into()
    }
}

pub fn opt_node(id: u64) -> String {
    if id == 0 {
        "none".into()
    } else {
        id.to_string()
    }
}

pub fn time(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| unix.to_string())
}

pub fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_formatters() {
        assert_eq!(age(119), "119s");
        assert_eq!(age(120), "2m");
        assert_eq!(age(7200), "2h");
        assert_eq!(sender(""), "<>");
        assert_eq!(opt_node(0), "none");
        assert_eq!(opt_node(3), "3");
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn message_state_names_scheduled_mail() {
        let now = 1_000;
        let m = |attempts, next_attempt, held| MessageInfo {
            attempts,
            next_attempt,
            held,
            ..MessageInfo::default()
        };
        assert_eq!(message_state(&m(0, 0, false), now), "queued");
        assert_eq!(message_state(&m(0, now + 8, false), now), "scheduled");
        assert_eq!(message_state(&m(0, now, false), now), "queued");
        assert_eq!(message_state(&m(2, now + 300, false), now), "deferred");
        assert_eq!(message_state(&m(0, now + 8, true), now), "held");
    }
}
