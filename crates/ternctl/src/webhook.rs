//! `ternctl webhook status [--dead]`: the durable webhook events' backlog
//! per endpoint and group, as the node asked holds them.

use serde_json::json;
use tern_proto::admin::{WebhookStatusReply, WebhookStatusRequest};

use crate::connect::Client;
use crate::output::{print_json, print_table};

pub async fn status(client: &mut Client, dead: bool, limit: u32, json: bool) -> Result<(), tonic::Status> {
    let reply = client
        .webhook_status(WebhookStatusRequest { dead, limit })
        .await?
        .into_inner();
    if json {
        print_json(&to_json(&reply, dead));
    } else {
        print(&reply, dead);
    }
    Ok(())
}

fn to_json(r: &WebhookStatusReply, dead: bool) -> serde_json::Value {
    let mut v = json!({
        "answered_by": r.answered_by,
        "groups": r.groups.iter().map(|g| json!({
            "endpoint": g.endpoint,
            "group": g.group,
            "leader": g.leader,
            "pending": g.pending,
            "oldest_age_secs": (g.oldest_age_secs >= 0).then_some(g.oldest_age_secs),
            "last_error": (!g.last_error.is_empty()).then(|| g.last_error.clone()),
            "last_error_at": (!g.last_error.is_empty()).then_some(g.last_error_at),
            "dead": g.dead,
        })).collect::<Vec<_>>(),
    });
    if dead {
        v["dead_letters"] = r
            .dead
            .iter()
            .map(|d| {
                json!({
                    "endpoint": d.endpoint, "group": d.group, "id": d.id, "type": d.r#type,
                    "msg_id": d.msg_id, "recipient": d.recipient, "age_secs": d.age_secs,
                })
            })
            .collect();
    }
    v
}

fn print(r: &WebhookStatusReply, dead: bool) {
    if r.groups.is_empty() {
        println!("no [[webhook]] configured on node {}", r.answered_by);
        return;
    }
    let rows: Vec<Vec<String>> = r
        .groups
        .iter()
        .map(|g| {
            vec![
                g.endpoint.clone(),
                g.group.to_string(),
                g.leader.to_string(),
                g.pending.to_string(),
                if g.oldest_age_secs < 0 {
                    "-".into()
                } else {
                    format!("{}s", g.oldest_age_secs)
                },
                g.dead.to_string(),
                if g.last_error.is_empty() {
                    "-".into()
                } else {
                    g.last_error.clone()
                },
            ]
        })
        .collect();
    print_table(
        &["ENDPOINT", "GROUP", "LEADER", "PENDING", "OLDEST", "DEAD", "LAST ERROR"],
        &rows,
    );
    if dead {
        println!();
        let rows: Vec<Vec<String>> = r
            .dead
            .iter()
            .map(|d| {
                vec![
                    d.endpoint.clone(),
                    d.id.clone(),
                    d.r#type.clone(),
                    d.msg_id.clone(),
                    d.recipient.clone(),
                    format!("{}s", d.age_secs),
                ]
            })
            .collect();
        print_table(&["ENDPOINT", "ID", "TYPE", "MSG ID", "RECIPIENT", "AGE"], &rows);
    }
}
