//! `ternctl shaping show DOMAIN`: the shaping rules matching a domain, the
//! effective limits, each node's share and automatic actions in force.

use serde_json::json;
use tern_proto::admin::{ShapingLimits, ShapingShowReply};

use crate::output::{print_table, time};

fn limits_json(l: Option<&ShapingLimits>) -> serde_json::Value {
    let l = l.cloned().unwrap_or_default();
    let n = |v: u32| if v == 0 { json!(null) } else { json!(v) };
    let s = |v: &str| if v.is_empty() { json!(null) } else { json!(v) };
    json!({
        "max_connections": n(l.max_connections),
        "messages_per_connection": n(l.messages_per_connection),
        "rate": s(&l.rate),
        "connection_rate": s(&l.connection_rate),
        "domain_rate": s(&l.domain_rate),
    })
}

fn limits_text(l: Option<&ShapingLimits>) -> String {
    let l = l.cloned().unwrap_or_default();
    let mut parts = Vec::new();
    if l.max_connections > 0 {
        parts.push(format!("max_connections={}", l.max_connections));
    }
    if l.messages_per_connection > 0 {
        parts.push(format!("messages_per_connection={}", l.messages_per_connection));
    }
    for (k, v) in [
        ("rate", &l.rate),
        ("connection_rate", &l.connection_rate),
        ("domain_rate", &l.domain_rate),
    ] {
        if !v.is_empty() {
            parts.push(format!("{k}={v}"));
        }
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

pub fn to_json(r: &ShapingShowReply) -> serde_json::Value {
    json!({
        "domain": r.domain,
        "scope": r.scope,
        "hosts": r.hosts,
        "note": r.note,
        "rules": r.rules.iter().map(|x| json!({
            "name": x.name,
            "domain": x.domain,
            "mx_suffix": x.mx_suffix,
            "source": x.source,
            "limits": limits_json(x.limits.as_ref()),
        })).collect::<Vec<_>>(),
        "limits": limits_json(r.limits.as_ref()),
        "effective_rate": if r.effective_rate.is_empty() { json!(null) } else { json!(r.effective_rate) },
        "shares": r.shares.iter().map(|s| json!({
            "node": s.node_id,
            "shards_led": s.shards_led,
            "shards": s.shards,
            "fraction": s.fraction,
            "rate_per_min": s.rate_per_min,
            "max_connections": s.max_connections,
        })).collect::<Vec<_>>(),
        "actions": r.actions.iter().map(|a| json!({
            "kind": a.kind,
            "rate": a.rate,
            "rule": a.rule,
            "reason": a.reason,
            "since": a.since,
            "until": a.until,
            "node": a.node,
        })).collect::<Vec<_>>(),
        "answered_by": r.answered_by,
    })
}

pub fn print(r: &ShapingShowReply) {
    println!("domain:   {}", r.domain);
    println!("scope:    {}", r.scope);
    if r.hosts.is_empty() {
        println!("hosts:    - ({})", r.note);
    } else {
        println!("hosts:    {}", r.hosts.join(", "));
    }
    println!("limits:   {}", limits_text(r.limits.as_ref()));
    if !r.effective_rate.is_empty() {
        println!("rate now: {}", r.effective_rate);
    }
    println!();
    let rows: Vec<Vec<String>> = r
        .rules
        .iter()
        .map(|x| {
            let mut m = Vec::new();
            for (k, v) in [
                ("domain", &x.domain),
                ("mx_suffix", &x.mx_suffix),
                ("source", &x.source),
            ] {
                if !v.is_empty() {
                    m.push(format!("{k}={v}"));
                }
            }
            vec![
                x.name.clone(),
                if m.is_empty() { "default".into() } else { m.join(" ") },
                limits_text(x.limits.as_ref()),
            ]
        })
        .collect();
    print_table(&["RULE", "MATCH", "LIMITS"], &rows);
    println!();
    let rows: Vec<Vec<String>> = r
        .shares
        .iter()
        .map(|s| {
            vec![
                s.node_id.to_string(),
                format!("{}/{}", s.shards_led, s.shards),
                format!("{:.3}", s.fraction),
                if s.rate_per_min > 0.0 {
                    format!("{:.2}/min", s.rate_per_min)
                } else {
                    "-".into()
                },
                if s.max_connections > 0 {
                    s.max_connections.to_string()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    print_table(&["NODE", "SHARDS LED", "SHARE", "RATE", "CONNECTIONS"], &rows);
    if !r.actions.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = r
            .actions
            .iter()
            .map(|a| {
                vec![
                    if a.rate.is_empty() {
                        a.kind.clone()
                    } else {
                        format!("{} {}", a.kind, a.rate)
                    },
                    a.rule.clone(),
                    time(a.until),
                    a.reason.clone(),
                ]
            })
            .collect();
        print_table(&["ACTION", "RULE", "UNTIL", "REASON"], &rows);
    }
}
