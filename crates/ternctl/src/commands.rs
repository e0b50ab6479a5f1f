//! The commands that ask a node (status, member, shard, node, queue,
//! domain, stats), each printed as a table or as JSON.

use serde_json::json;
use tern_proto::admin::*;

use crate::cli::{
    Args, ClusterCommand, Command, DomainCommand, Filters, MemberCommand, NodeCommand, Output, QueueCommand, Selection,
    ShapingCommand, ShardCommand, StatsBy,
};
use crate::connect::{connect, Client};
use crate::output::*;

/// Messages per page when listing a whole selection.
const PAGE: u32 = 5000;
/// Ids per queue operation request.
const OP_BATCH: usize = 2000;
/// Times one batch is sent again after UNAVAILABLE (a leader change).
const OP_RETRIES: u32 = 10;

/// Runs a command against the node at `endpoint`.
pub async fn run(args: &Args, endpoint: &str, token: Option<String>) -> Result<(), tonic::Status> {
    let call_timeout = match &args.command {
        // One call that lasts until the replicas have moved.
        Command::Member(MemberCommand::Remove { timeout, .. }) => {
            crate::connect::CALL_TIMEOUT.max(std::time::Duration::from_secs(timeout.saturating_add(10)))
        }
        _ => crate::connect::CALL_TIMEOUT,
    };
    if let Command::Config(crate::cli::ConfigCommand::Reload { all }) = &args.command {
        return crate::config::reload(args, endpoint, token, *all, args.output == Output::Json).await;
    }
    let mut client = connect(args, endpoint, token, call_timeout).await?;
    let json = args.output == Output::Json;
    match args.command.clone() {
        Command::Status => {
            let s = client.status(StatusRequest { local_only: false }).await?.into_inner();
            warn_unreachable(&s.unreachable);
            if json {
                print_json(&status_json(&s));
            } else {
                print_status(&s);
            }
        }
        Command::Member(MemberCommand::Add { id, id_flag, addr }) => {
            let id = id.or(id_flag).unwrap_or_default();
            let r = client
                .member_add(MemberAddRequest { id, addr: addr.clone() })
                .await?
                .into_inner();
            if json {
                print_json(&json!({"id": id, "addr": addr, "role": r.role}));
            } else {
                println!("node {id} ({addr}) added as {}", r.role);
            }
        }
        Command::Member(MemberCommand::List) => {
            let r = client.member_list(MemberListRequest {}).await?.into_inner();
            if json {
                print_json(&json!(r
                    .members
                    .iter()
                    .map(|m| json!({
                        "id": m.id, "addr": m.addr, "role": m.role, "control_leader": m.is_control_leader,
                        "reachable": m.reachable, "lag": m.lag, "shards_led": m.shards_led, "replicas": m.replicas,
                    }))
                    .collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = r
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.addr.clone(),
                            m.role.clone(),
                            if m.is_control_leader { "yes" } else { "" }.into(),
                            if m.reachable { "yes" } else { "NO" }.into(),
                            m.lag.to_string(),
                            m.shards_led.to_string(),
                            m.replicas.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID",
                        "ADDR",
                        "ROLE",
                        "CONTROL LEADER",
                        "REACHABLE",
                        "LAG",
                        "LEADS",
                        "REPLICAS",
                    ],
                    &rows,
                );
            }
        }
        Command::Member(MemberCommand::Remove {
            id,
            id_flag,
            force,
            timeout,
        }) => {
            let id = id.or(id_flag).unwrap_or_default();
            member_remove(&mut client, id, force, timeout).await?;
            if json {
                print_json(&json!({"id": id, "removed": true}));
            } else {
                println!("node {id} removed; its replicas were moved");
            }
        }
        Command::Node(cmd) => {
            let (id, drained, wait) = match cmd {
                NodeCommand::Drain { id, wait, timeout } => (id, true, wait.then_some(timeout)),
                NodeCommand::Undrain { id } => (id, false, None),
            };
            client.drain(DrainRequest { id, drained }).await?;
            if let Some(timeout) = wait {
                wait_drained(&mut client, id, timeout).await?;
            }
            if json {
                print_json(&json!({"id": id, "drained": drained}));
            } else if wait.is_some() {
                println!("node {id} drained: it leads no shard");
            } else if drained {
                println!("node {id} drained: its shard leaderships move to other replicas");
            } else {
                println!("node {id} undrained");
            }
        }
        Command::Queue(QueueCommand::Hold(sel)) => queue_op(&mut client, "hold", sel, json).await?,
        Command::Queue(QueueCommand::Release(sel)) => queue_op(&mut client, "release", sel, json).await?,
        Command::Queue(QueueCommand::Delete(sel)) => queue_op(&mut client, "delete", sel, json).await?,
        Command::Queue(QueueCommand::Bounce(sel)) => queue_op(&mut client, "bounce", sel, json).await?,
        Command::Queue(QueueCommand::Retry(sel)) => queue_op(&mut client, "retry", sel, json).await?,
        // Handled offline in main (config reload: above, it may ask every member).
        Command::Dkim(_) | Command::Cert(_) | Command::Token(_) | Command::Config(_) | Command::Completion { .. } => {}
        Command::Stats { by, since } => {
            let r = client
                .stats(StatsRequest {
                    since_secs: since,
                    local_only: false,
                })
                .await?
                .into_inner();
            print_stats(&r, by, since, json)?;
        }
        Command::Suppression(cmd) => crate::suppression::run(&mut client, cmd, json).await?,
        Command::Apikey(cmd) => crate::apikey::run(&mut client, cmd, json).await?,
        Command::Shaping(ShapingCommand::Clear { scope }) => {
            let r = client.shaping_clear(ShapingClearRequest { scope }).await?.into_inner();
            if json {
                print_json(&json!({
                    "scope": r.scope,
                    "action": r.action,
                    "until": r.until,
                    "rule": r.rule,
                    "reason": r.reason,
                }));
            } else {
                println!(
                    "lifted {} of {} (rule {}, would have run until {})",
                    r.action,
                    r.scope,
                    r.rule,
                    time(r.until)
                );
            }
        }
        Command::Pool(crate::cli::PoolCommand::Show) => crate::pool::show(&mut client, json).await?,
        Command::Webhook(crate::cli::WebhookCommand::Status { dead, limit }) => {
            crate::webhook::status(&mut client, dead, limit, json).await?
        }
        Command::Shaping(ShapingCommand::Show { domain }) => {
            let r = client.shaping_show(ShapingShowRequest { domain }).await?.into_inner();
            if json {
                print_json(&crate::shaping::to_json(&r));
            } else {
                crate::shaping::print(&r);
            }
        }
        Command::Domain(cmd) => {
            let reply = match cmd {
                DomainCommand::Suspend {
                    domain,
                    duration,
                    reason,
                } => client
                    .domain_suspend(DomainSuspendRequest {
                        domain,
                        duration_secs: duration.unwrap_or(0),
                        reason,
                    })
                    .await?
                    .into_inner(),
                DomainCommand::Resume { domain } => {
                    client.domain_resume(DomainResumeRequest { domain }).await?.into_inner()
                }
                DomainCommand::List => client.domain_list(DomainListRequest {}).await?.into_inner(),
            };
            if json {
                print_json(&json!(reply
                    .suspended
                    .iter()
                    .map(|d| json!({"domain": d.domain, "until": d.until, "reason": d.reason}))
                    .collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = reply
                    .suspended
                    .iter()
                    .map(|d| {
                        let until = if d.until >= i64::MAX / 4 {
                            "resumed by hand".into()
                        } else {
                            time(d.until)
                        };
                        vec![d.domain.clone(), until, d.reason.clone()]
                    })
                    .collect();
                print_table(&["SUSPENDED DOMAIN", "UNTIL", "REASON"], &rows);
            }
        }
        Command::Shard(ShardCommand::List { local }) => {
            let s = client.status(StatusRequest { local_only: local }).await?.into_inner();
            warn_unreachable(&s.unreachable);
            if json {
                print_json(&status_json(&s)["shards"]);
            } else {
                print_shards(&s);
            }
        }
        Command::Shard(ShardCommand::MoveLeader { shard, node }) => {
            client.move_leader(MoveLeaderRequest { shard, node }).await?;
            if json {
                print_json(&json!({"shard": shard, "node": node, "requested": true}));
            } else {
                println!("asked node {node} to take over shard {shard}");
            }
        }
        Command::Shard(ShardCommand::Add { count, request_id }) => {
            let request_id = request_id.clone().unwrap_or_else(|| run_id().to_owned());
            let reply = client
                .shard_add(ShardAddRequest { count, request_id })
                .await?
                .into_inner();
            if json {
                print_json(&json!({"added": reply.shards}));
            } else {
                let ids: Vec<String> = reply.shards.iter().map(u64::to_string).collect();
                println!(
                    "added shards {} (they take new mail once they have a leader)",
                    ids.join(",")
                );
            }
        }
        Command::Shard(ShardCommand::Retire { shard }) => {
            client.shard_retire(ShardRetireRequest { shard }).await?;
            if json {
                print_json(&json!({"shard": shard, "state": "retiring"}));
            } else {
                println!("shard {shard} is retiring: no new mail; it is removed once its queue is empty");
            }
        }
        Command::Cluster(ClusterCommand::Set { key, value }) => {
            client
                .cluster_set(ClusterSetRequest {
                    key: key.clone(),
                    value: value.clone(),
                })
                .await?;
            if json {
                print_json(&json!({"key": key, "value": value}));
            } else {
                println!("cluster {key} = {value}");
            }
        }
        Command::Queue(QueueCommand::Summary) => {
            let s = client
                .queue_summary(QueueSummaryRequest {
                    local_only: false,
                    shards: Vec::new(),
                })
                .await?
                .into_inner();
            warn_unreachable(&s.unreachable);
            if !s.missing_shards.is_empty() {
                eprintln!(
                    "warning: shards {:?} could not be counted (no replica answered)",
                    s.missing_shards
                );
            }
            if json {
                let domains: serde_json::Map<String, serde_json::Value> = s
                    .domains
                    .iter()
                    .map(|d| (d.domain.clone(), json!(d.messages)))
                    .collect();
                print_json(&json!({
                    "messages": s.messages,
                    "recipients": s.recipients,
                    "bytes": s.bytes,
                    "oldest_age_secs": s.oldest_age_secs,
                    "unreachable": s.unreachable,
                    "missing_shards": s.missing_shards,
                    "domains": domains,
                    "domain_recipients": s.domains.iter().map(|d| (d.domain.clone(), json!(d.recipients))).collect::<serde_json::Map<_, _>>(),
                    "domain_details": s.domains.iter().map(|d| json!({
                        "domain": d.domain, "messages": d.messages, "recipients": d.recipients, "held": d.held,
                        "oldest_age_secs": d.oldest_age_secs, "last_error": d.last_error,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "{} messages, {} recipients, {} bytes, oldest {}",
                    s.messages,
                    s.recipients,
                    s.bytes,
                    age(s.oldest_age_secs)
                );
                let rows: Vec<Vec<String>> = s
                    .domains
                    .iter()
                    .map(|d| {
                        vec![
                            d.domain.clone(),
                            d.messages.to_string(),
                            d.recipients.to_string(),
                            d.held.to_string(),
                            age(d.oldest_age_secs),
                            d.last_error.clone(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    println!();
                    print_table(
                        &["DOMAIN", "MESSAGES", "RECIPIENTS", "HELD", "OLDEST", "LAST ERROR"],
                        &rows,
                    );
                }
            }
        }
        Command::Queue(QueueCommand::List { filters, limit }) => {
            let (messages, more) = list_all(&mut client, &filters, &[], limit, false, "queue list").await?;
            if json {
                print_json(&json!({
                    "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
                    "truncated": more,
                }));
            } else {
                let now = chrono::Utc::now().timestamp();
                let rows: Vec<Vec<String>> = messages
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.shard.to_string(),
                            sender(&m.reverse_path),
                            m.recipients.len().to_string(),
                            m.size.to_string(),
                            time(m.received_at),
                            m.attempts.to_string(),
                            message_state(m, now).into(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID", "SHARD", "SENDER", "RCPTS", "SIZE", "RECEIVED", "ATTEMPTS", "STATE",
                    ],
                    &rows,
                );
                if more {
                    println!("(more messages match; raise --limit, or --limit 0 for all)");
                }
            }
        }
        Command::Queue(QueueCommand::Show { id, body }) => {
            let r = client
                .queue_show(QueueShowRequest {
                    id,
                    with_body: body,
                    local_only: false,
                })
                .await?
                .into_inner();
            let m = r.message.ok_or_else(|| tonic::Status::not_found("no such message"))?;
            if json {
                let mut v = message_json(&m);
                if body {
                    v["body"] = json!(String::from_utf8_lossy(&r.body));
                }
                print_json(&v);
            } else {
                print_message(&m);
                if body {
                    use std::io::Write as _;
                    println!();
                    let _ = std::io::stdout().write_all(&r.body);
                }
            }
        }
    }
    Ok(())
}

fn list_request(filters: &Filters, ids: &[String], after: String, limit: u32, ids_only: bool) -> QueueListRequest {
    QueueListRequest {
        domain: filters.domain.clone().unwrap_or_default(),
        limit,
        sender: filters.sender.clone().unwrap_or_default(),
        older_than_secs: filters.older_than.unwrap_or(0),
        newer_than_secs: filters.newer_than.unwrap_or(0),
        state: filters.state.clone().unwrap_or_default(),
        reply_class: filters.reply_class.clone().unwrap_or_default(),
        ids: ids.to_vec(),
        after,
        local_only: false,
        shards: Vec::new(),
        ids_only,
    }
}

/// The selected messages of the whole cluster, in arrival order, page by
/// page (`limit` 0: all of them), with progress on stderr past one page;
/// and whether more matched than `limit`. Members that did not answer and
/// shards nobody could read are warned about once.
async fn list_all(
    client: &mut Client,
    filters: &Filters,
    ids: &[String],
    limit: u64,
    ids_only: bool,
    what: &str,
) -> Result<(Vec<MessageInfo>, bool), tonic::Status> {
    let mut messages: Vec<MessageInfo> = Vec::new();
    let mut after = String::new();
    let mut warned = false;
    loop {
        let want = if limit == 0 {
            PAGE
        } else {
            u32::try_from(limit.saturating_sub(messages.len() as u64))
                .unwrap_or(PAGE)
                .min(PAGE)
        };
        let r = client
            .queue_list(list_request(filters, ids, after, want, ids_only))
            .await?
            .into_inner();
        if !warned {
            warn_unreachable(&r.unreachable);
            if !r.missing_shards.is_empty() {
                eprintln!(
                    "warning: shards {:?} could not be read (no replica answered): their messages are not included",
                    r.missing_shards
                );
            }
            warned = true;
        }
        messages.extend(r.messages);
        if !r.truncated || r.next.is_empty() {
            return Ok((messages, false));
        }
        if limit != 0 && messages.len() as u64 >= limit {
            return Ok((messages, true));
        }
        eprintln!("{what}: {} selected so far", messages.len());
        after = r.next;
    }
}

/// Selects the messages (every page, cluster-wide), then applies the
/// operation to each shard's messages in batches, through the shard's
/// leader, showing progress on stderr.
async fn queue_op(client: &mut Client, op: &str, sel: Selection, json: bool) -> Result<(), tonic::Status> {
    if sel.ids.is_empty() && sel.filters.is_empty() {
        return Err(tonic::Status::invalid_argument(
            "give message ids, or at least one of --domain, --sender, --older-than, --newer-than, --state, --reply-class",
        ));
    }
    let (found, _) = list_all(client, &sel.filters, &sel.ids, 0, true, op).await?;
    let total = found.len();
    if sel.dry_run {
        let ids: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
        if json {
            print_json(&json!({"op": op, "dry_run": true, "matched": total, "ids": ids}));
        } else {
            println!("{op}: {total} messages would be affected (dry run)");
            for id in ids {
                println!("{id}");
            }
        }
        return Ok(());
    }
    let mut by_shard: std::collections::BTreeMap<u64, Vec<String>> = std::collections::BTreeMap::new();
    for m in found {
        by_shard.entry(m.shard).or_default().push(m.id);
    }
    let mut done = 0;
    let mut affected = 0;
    for (shard, ids) in by_shard {
        for batch in ids.chunks(OP_BATCH) {
            let request = QueueOpRequest {
                op: op.into(),
                ids: batch.to_vec(),
                shard,
                ..Default::default()
            };
            // A shard changing leader answers UNAVAILABLE for a moment:
            // the batch is tried again (bounded) rather than the whole command.
            let mut tries = 0;
            let reply = loop {
                match client.queue_op(request.clone()).await {
                    Ok(r) => break r.into_inner(),
                    Err(e) if e.code() == tonic::Code::Unavailable && tries < OP_RETRIES => {
                        tries += 1;
                        eprintln!("{op}: shard {shard}: {}; trying again", e.message());
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            affected += reply.affected;
            done += batch.len();
            if total > OP_BATCH {
                eprintln!("{op}: {done}/{total}");
            }
        }
    }
    if json {
        print_json(&json!({"op": op, "matched": total, "affected": affected}));
    } else {
        println!("{op}: {affected} messages affected");
    }
    Ok(())
}

/// `member remove`: the call lasts until the node's replicas have moved;
/// meanwhile how many shards still have a replica on it, on stderr.
async fn member_remove(client: &mut Client, id: u64, force: bool, timeout: u64) -> Result<(), tonic::Status> {
    let mut watch = client.clone();
    let remove = client.member_remove(MemberRemoveRequest { id, force });
    tokio::pin!(remove);
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(timeout));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut last = None;
    loop {
        tokio::select! {
            done = &mut remove => {
                done?;
                return Ok(());
            }
            _ = &mut deadline => {
                return Err(tonic::Status::deadline_exceeded(format!(
                    "member remove {id}: not done within {}; it may still finish (see `ternctl member list`)",
                    age(timeout)
                )));
            }
            _ = tick.tick() => {
                let Ok(s) = watch.status(StatusRequest { local_only: false }).await else { continue };
                let left = s.into_inner().shards.iter().filter(|sh| sh.replicas.contains(&id) || sh.voters.contains(&id)).count();
                if last != Some(left) {
                    eprintln!("member remove {id}: {left} shards still have a replica on it");
                    last = Some(left);
                }
            }
        }
    }
}

/// `node drain --wait`: until node `id` leads no shard, with progress on stderr.
async fn wait_drained(client: &mut Client, id: u64, timeout: u64) -> Result<(), tonic::Status> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let mut last = None;
    loop {
        let s = client.status(StatusRequest { local_only: false }).await?.into_inner();
        let led = s.shards.iter().filter(|sh| sh.leader == id).count();
        if last != Some(led) {
            eprintln!("node drain {id}: leads {led} shards");
            last = Some(led);
        }
        if led == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(tonic::Status::deadline_exceeded(format!(
                "node drain {id}: still leads {led} shards after {}",
                age(timeout)
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn print_stats(r: &StatsReply, by: StatsBy, since: u64, json: bool) -> Result<(), tonic::Status> {
    use tern_model::stats::{Counts, Window};
    let mut all = Window::default();
    let mut rows: std::collections::BTreeMap<String, Counts> = std::collections::BTreeMap::new();
    for n in &r.nodes {
        let w = Window::decode(&n.window)
            .map_err(|e| tonic::Status::internal(format!("node {}: bad stats: {e}", n.node)))?;
        match by {
            StatsBy::Node => {
                rows.insert(format!("node {}", n.node), w.total());
            }
            StatsBy::Domain | StatsBy::Site => {
                let source = if by == StatsBy::Domain {
                    &w.by_domain
                } else {
                    &w.by_relay
                };
                for (k, c) in source {
                    let e = rows.entry(k.clone()).or_default();
                    e.delivered += c.delivered;
                    e.deferred += c.deferred;
                    e.bounced += c.bounced;
                }
            }
        }
        all.merge(w);
    }
    let total = all.total();
    let minutes = (since as f64 / 60.0).max(1.0);
    let (p50, p90, p99) = (all.percentile(50.0), all.percentile(90.0), all.percentile(99.0));
    let mut reasons: Vec<_> = all.reasons.iter().collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1.count));
    reasons.truncate(10);
    if json {
        print_json(&json!({
            "since_secs": since,
            "total": {"delivered": total.delivered, "deferred": total.deferred, "bounced": total.bounced},
            "per_minute": {
                "delivered": total.delivered as f64 / minutes,
                "deferred": total.deferred as f64 / minutes,
                "bounced": total.bounced as f64 / minutes,
            },
            "time_in_queue_secs": {"p50": p50, "p90": p90, "p99": p99},
            "rows": rows.iter().map(|(k, c)| json!({
                "key": k, "delivered": c.delivered, "deferred": c.deferred, "bounced": c.bounced,
            })).collect::<Vec<_>>(),
            "by_class": all.by_class.iter().map(|(k, c)| json!({
                "class": k, "deferred": c.deferred, "bounced": c.bounced,
            })).collect::<Vec<_>>(),
            "top_reasons": reasons.iter().map(|((kind, code), r)| json!({
                "kind": kind, "code": code, "count": r.count, "last_reply": r.last_reply,
            })).collect::<Vec<_>>(),
            "unreachable_nodes": r.unreachable,
        }));
        return Ok(());
    }
    println!(
        "last {}: {} delivered ({:.1}/min), {} deferred ({:.1}/min), {} bounced ({:.1}/min)",
        age(since),
        total.delivered,
        total.delivered as f64 / minutes,
        total.deferred,
        total.deferred as f64 / minutes,
        total.bounced,
        total.bounced as f64 / minutes
    );
    let secs = |p: Option<u32>| p.map(|s| format!("{s}s")).unwrap_or_else(|| "-".into());
    println!("time in queue: p50 {}, p90 {}, p99 {}", secs(p50), secs(p90), secs(p99));
    if !r.unreachable.is_empty() {
        println!("(no answer from nodes {:?})", r.unreachable);
    }
    println!();
    let key = match by {
        StatsBy::Domain => "DOMAIN",
        StatsBy::Site => "SITE",
        StatsBy::Node => "NODE",
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(k, c)| {
            vec![
                k.clone(),
                c.delivered.to_string(),
                c.deferred.to_string(),
                c.bounced.to_string(),
            ]
        })
        .collect();
    print_table(&[key, "DELIVERED", "DEFERRED", "BOUNCED"], &table);
    if !all.by_class.is_empty() {
        println!();
        let table: Vec<Vec<String>> = all
            .by_class
            .iter()
            .map(|(k, c)| vec![k.clone(), c.deferred.to_string(), c.bounced.to_string()])
            .collect();
        print_table(&["CLASS", "DEFERRED", "BOUNCED"], &table);
    }
    if !reasons.is_empty() {
        println!();
        let table: Vec<Vec<String>> = reasons
            .iter()
            .map(|((kind, code), r)| vec![kind.clone(), code.clone(), r.count.to_string(), r.last_reply.clone()])
            .collect();
        print_table(&["OUTCOME", "CODE", "COUNT", "LAST REPLY"], &table);
    }
    Ok(())
}

/// An id for this run of ternctl, the same on every endpoint it tries.
fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("ternctl-{:032x}", rand::random::<u128>()))
}
