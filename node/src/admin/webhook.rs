//! `ternctl webhook status`: each configured endpoint's backlog in every
//! group this node hosts (from the group's tree, the same on every
//! replica), the last POST error where this node leads the group, and
//! with `--dead` the dead letters.

use tern_proto::admin as pb;

use crate::outbox::dispatch::Status;
use crate::outbox::status::{backlog, dead_letters};
use crate::raft::groups::Groups;

/// The reply for `request` over the endpoint names `endpoints`.
pub fn status(
    groups: &Groups,
    endpoints: &[String],
    seen: &Status,
    request: &pb::WebhookStatusRequest,
) -> pb::WebhookStatusReply {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let limit = if request.limit == 0 {
        100
    } else {
        request.limit as usize
    };
    let mut reply = pb::WebhookStatusReply::default();
    for g in groups.all() {
        let tree = g.sm.tree();
        for name in endpoints {
            let b = backlog(&tree, name);
            let state = seen.get(g.id, name);
            let (last_error, last_error_at) = state.last_error.unwrap_or_default();
            reply.groups.push(pb::WebhookGroupStatus {
                endpoint: name.clone(),
                group: g.id,
                pending: b.pending,
                oldest_age_secs: b.oldest_at.map_or(-1, |at| (now_ms - at).max(0) / 1000),
                last_error,
                last_error_at,
                dead: b.dead,
                leader: g.leader().unwrap_or(0),
            });
            if request.dead && reply.dead.len() < limit {
                for d in dead_letters(&tree, name, limit - reply.dead.len()) {
                    reply.dead.push(pb::WebhookDeadLetter {
                        endpoint: name.clone(),
                        group: g.id,
                        id: d.id,
                        r#type: d.event.kind.as_str().into(),
                        msg_id: d.event.msg_id,
                        recipient: d.event.rcpt.unwrap_or_default(),
                        age_secs: (now_ms - d.event.at).max(0) / 1000,
                    });
                }
            }
        }
    }
    reply
}
