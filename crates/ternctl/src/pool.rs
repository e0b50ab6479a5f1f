//! `ternctl pool show`: egress pools, their sources and weights, and each
//! source's warm-up progress (day, cap, what the node asked sent today per
//! destination scope).

use serde_json::json;
use tern_proto::admin::{PoolShowReply, PoolShowRequest};

use crate::connect::Client;
use crate::output::{print_json, print_table};

pub async fn show(client: &mut Client, json: bool) -> Result<(), tonic::Status> {
    let reply = client.pool_show(PoolShowRequest {}).await?.into_inner();
    if json {
        print_json(&to_json(&reply));
    } else {
        print(&reply);
    }
    Ok(())
}

fn to_json(r: &PoolShowReply) -> serde_json::Value {
    json!({
        "node": r.node,
        "share": r.share,
        "pools": r.pools.iter().map(|p| json!({
            "name": p.name,
            "sources": p.sources.iter().map(|s| {
                let mut v = json!({
                    "name": s.name,
                    "address": s.address,
                    "ehlo": s.ehlo,
                    "weight": s.weight,
                    "warmup": null,
                });
                if s.warmup {
                    v["warmup"] = json!({
                        "start": s.warmup_start,
                        "day": s.day,
                        "days": s.days,
                        "cap": s.cap,
                        "node_cap": s.node_cap,
                        "used": s.used.iter().map(|u| json!({"scope": u.scope, "used": u.used})).collect::<Vec<_>>(),
                    });
                }
                v
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print(r: &PoolShowReply) {
    if r.pools.is_empty() {
        println!("no [[pool]] configured: mail leaves from the system's address with the node's helo_name");
        return;
    }
    let mut rows = Vec::new();
    for p in &r.pools {
        for s in &p.sources {
            let (warmup, used) = if s.warmup {
                let cap = match (s.cap, s.node_cap) {
                    (Some(cap), Some(node)) => format!("day {}/{}: {cap}/day (this node {node})", s.day, s.days),
                    _ => format!("day {} (schedule of {} days over: no cap)", s.day, s.days),
                };
                let used: Vec<String> = s.used.iter().map(|u| format!("{} {}", u.scope, u.used)).collect();
                (cap, if used.is_empty() { "-".into() } else { used.join(", ") })
            } else {
                ("-".into(), "-".into())
            };
            rows.push(vec![
                p.name.clone(),
                s.name.clone(),
                s.address.clone(),
                s.ehlo.clone(),
                s.weight.to_string(),
                warmup,
                used,
            ]);
        }
    }
    print_table(
        &["POOL", "SOURCE", "ADDRESS", "EHLO", "WEIGHT", "WARM-UP", "SENT TODAY"],
        &rows,
    );
    println!("node {} (share {:.2}); warm-up counts are this node's", r.node, r.share);
}
