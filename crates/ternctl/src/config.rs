//! `ternctl config reload [--all]`: the node at `--endpoint` (or, with
//! `--all`, every member in turn) reads its config file again and applies
//! what can change without a restart; keys that need one are named.
//! Exit 1 when a node's reload failed (that node keeps its running config).

use serde_json::json;
use tern_proto::admin::{ConfigReloadReply, ConfigReloadRequest, MemberListRequest};

use crate::cli::Args;
use crate::connect::{connect, CALL_TIMEOUT};
use crate::output::{print_json, print_table};

/// One node's answer.
struct Row {
    /// From the member list (`--all`), else from the reply.
    node: Option<u64>,
    endpoint: String,
    result: Result<ConfigReloadReply, tonic::Status>,
}

pub async fn reload(
    args: &Args,
    endpoint: &str,
    token: Option<String>,
    all: bool,
    json: bool,
) -> Result<(), tonic::Status> {
    let mut client = connect(args, endpoint, token.clone(), CALL_TIMEOUT).await?;
    if !all {
        // One node: its error (naming the key) is the command's error.
        let reply = client.config_reload(ConfigReloadRequest {}).await?.into_inner();
        print(
            &[Row {
                node: Some(reply.node_id),
                endpoint: endpoint.to_owned(),
                result: Ok(reply),
            }],
            json,
        );
        return Ok(());
    }
    let members = client.member_list(MemberListRequest {}).await?.into_inner().members;
    let mut rows = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        eprintln!(
            "ternctl: reloading node {} at {} ({}/{})",
            m.id,
            m.addr,
            i + 1,
            members.len()
        );
        let result = match connect(args, &m.addr, token.clone(), CALL_TIMEOUT).await {
            Ok(mut c) => c
                .config_reload(ConfigReloadRequest {})
                .await
                .map(tonic::Response::into_inner),
            Err(e) => Err(e),
        };
        rows.push(Row {
            node: Some(m.id),
            endpoint: m.addr.clone(),
            result,
        });
    }
    print(&rows, json);
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        return Err(tonic::Status::aborted(format!(
            "the reload failed on {failed} of {} nodes; they keep their running configuration",
            rows.len()
        )));
    }
    Ok(())
}

fn print(rows: &[Row], json: bool) {
    if json {
        let nodes: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match &r.result {
                Ok(reply) => json!({
                    "node": r.node,
                    "endpoint": r.endpoint,
                    "ok": true,
                    "path": reply.path,
                    "applied": reply.applied,
                    "restart_needed": reply.restart_needed,
                }),
                Err(status) => json!({
                    "node": r.node,
                    "endpoint": r.endpoint,
                    "ok": false,
                    "error": status.message(),
                }),
            })
            .collect();
        print_json(&json!({ "nodes": nodes }));
        return;
    }
    let list = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let node = r.node.map_or_else(|| "?".to_owned(), |n| n.to_string());
            match &r.result {
                Ok(reply) => vec![
                    node,
                    r.endpoint.clone(),
                    "ok".into(),
                    list(&reply.applied),
                    list(&reply.restart_needed),
                ],
                Err(status) => vec![
                    node,
                    r.endpoint.clone(),
                    format!("failed: {}", status.message()),
                    "-".into(),
                    "-".into(),
                ],
            }
        })
        .collect();
    print_table(&["NODE", "ENDPOINT", "RESULT", "APPLIED", "RESTART NEEDED"], &table);
}
