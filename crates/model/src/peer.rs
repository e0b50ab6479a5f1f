//! What one node asks another to write, besides Raft itself: an operator's
//! [`Operation`] (made through the group's leader) and the strict bincode
//! framing of every peer write (`PeerService` payloads).

use serde::{Deserialize, Serialize};

use crate::request::{QueueAction, Request};
use crate::{GroupId, NodeId, CONTROL_GROUP};

/// An operator's write decided on one node and made through another (the
/// group's leader): the only writes besides enqueues a peer may ask for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    /// `ternctl queue hold|release|delete|retry` on messages of a shard.
    Queue { action: QueueAction, ids: Vec<String> },
    /// `ternctl queue bounce`, decided on the shard's leader.
    Bounce { ids: Vec<String> },
    /// `ternctl member drain|undrain` (control group).
    Drain { node: NodeId, drained: bool },
    /// `ternctl domain suspend|resume` (control group; `until` 0 resumes).
    Suspend { domain: String, until: i64, reason: String },
    /// `ternctl member add`, run by the control leader (control group).
    MemberAdd { id: NodeId, addr: String },
    /// `ternctl member remove`, run by the control leader (control group).
    MemberRemove { id: NodeId, force: bool },
    /// An automatic shaping action decided by a `[[backoff]]` rule on the
    /// node that saw the reply (control group; `None` lifts it).
    ShapingAction {
        key: String,
        action: Option<crate::shaping::AutoAction>,
    },
    /// Recipients added to the suppression list (control group).
    Suppress { entries: Vec<crate::shaping::Suppression> },
    /// Recipients removed from the suppression list (control group).
    Unsuppress {
        entries: Vec<crate::shaping::SuppressionKey>,
    },
    /// `ternctl apikey create` (control group).
    ApiKey { key: crate::api::ApiKey },
    /// `ternctl apikey revoke` (control group).
    RevokeApiKey { id: String, at: i64 },
    /// `PUT`/`DELETE /api/v1/templates/NAME` (control group).
    Template {
        tenant: String,
        name: String,
        template: Option<crate::api::StoredTemplate>,
    },
    /// An API call's batch record (control group).
    Batch { batch: Box<crate::api::Batch> },
    /// Cluster-shared records of a feature (control group).
    PutShared {
        space: String,
        entries: Vec<(String, Vec<u8>)>,
    },
    /// Cluster-shared records removed (control group).
    DeleteShared {
        space: String,
        keys: Vec<String>,
        prefixes: Vec<String>,
    },
    /// Delivery outcomes (and the reports they cause) that a shard's former
    /// leader decided and could not write because it lost leadership in
    /// between: passed to the new leader so that what was delivered is not
    /// delivered again. Replay-safe: a final recipient keeps its state.
    /// (Added last: bincode numbers variants by position.)
    Outcomes {
        updates: Vec<crate::request::OutcomeUpdate>,
        bounces: Vec<crate::request::NewMessage>,
    },
    /// `ternctl shard add`, run by the control leader (control group): it
    /// picks the next ids. (Appended: a node of an earlier release refuses
    /// it as unreadable, which the operator sees.)
    ShardAdd { count: u32 },
    /// `ternctl shard add` with a request id: a repeat of the same id
    /// returns the first call's shards. (Appended, as `ShardAdd`.)
    ShardAddOnce { count: u32, request_id: String },
}

/// gRPC metadata key a peer sets on a write it gave up waiting for: the
/// write may still commit, so the sender must not retry it elsewhere.
pub const WRITE_TIMED_OUT: &str = "tern-write-timed-out";

/// Message ids one operation may name (the sender writes in batches of 500).
pub const MAX_OPERATION_IDS: usize = 10_000;

impl Operation {
    /// Whether this operation may be written to `group`: queue operations
    /// to queue shards, drains and suspensions to the control group.
    pub fn fits(&self, group: GroupId) -> Result<(), String> {
        let (ok, wants) = match self {
            Operation::Outcomes { updates, bounces } => {
                if updates.len() + bounces.len() > MAX_OPERATION_IDS {
                    return Err(format!(
                        "{} outcomes in one operation (at most {MAX_OPERATION_IDS})",
                        updates.len() + bounces.len()
                    ));
                }
                (group != CONTROL_GROUP, "a queue shard")
            }
            Operation::Queue { ids, .. } | Operation::Bounce { ids } => {
                if ids.len() > MAX_OPERATION_IDS {
                    return Err(format!(
                        "{} message ids in one operation (at most {MAX_OPERATION_IDS})",
                        ids.len()
                    ));
                }
                (group != CONTROL_GROUP, "a queue shard")
            }
            Operation::Suppress { entries } if entries.len() > crate::shaping::MAX_SUPPRESSIONS_PER_WRITE => {
                return Err(format!(
                    "{} suppressions in one operation (at most {})",
                    entries.len(),
                    crate::shaping::MAX_SUPPRESSIONS_PER_WRITE
                ));
            }
            Operation::Batch { batch } => {
                if batch.messages.len() > crate::api::MAX_BATCH_MESSAGES {
                    return Err(format!(
                        "{} messages in one batch (at most {})",
                        batch.messages.len(),
                        crate::api::MAX_BATCH_MESSAGES
                    ));
                }
                (group == CONTROL_GROUP, "the control group (0)")
            }
            Operation::Unsuppress { entries } if entries.len() > crate::shaping::MAX_SUPPRESSIONS_PER_WRITE => {
                return Err(format!(
                    "{} suppressions in one operation (at most {})",
                    entries.len(),
                    crate::shaping::MAX_SUPPRESSIONS_PER_WRITE
                ));
            }
            Operation::PutShared { space, entries } => {
                let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
                if entries.len() > crate::request::MAX_SHARED_PER_WRITE
                    || bytes > crate::request::MAX_SHARED_BYTES_PER_WRITE
                    || space.is_empty()
                    || space.contains('\0')
                {
                    return Err(format!(
                        "{} shared records of {bytes} bytes in space {space:?} (at most {} records, {} bytes)",
                        entries.len(),
                        crate::request::MAX_SHARED_PER_WRITE,
                        crate::request::MAX_SHARED_BYTES_PER_WRITE
                    ));
                }
                (group == CONTROL_GROUP, "the control group (0)")
            }
            Operation::DeleteShared { space, keys, prefixes } => {
                if keys.len() + prefixes.len() > crate::request::MAX_SHARED_PER_WRITE
                    || space.is_empty()
                    || space.contains('\0')
                {
                    return Err(format!(
                        "{} shared keys in space {space:?} (at most {})",
                        keys.len() + prefixes.len(),
                        crate::request::MAX_SHARED_PER_WRITE
                    ));
                }
                (group == CONTROL_GROUP, "the control group (0)")
            }
            Operation::Drain { .. }
            | Operation::Suspend { .. }
            | Operation::ShapingAction { .. }
            | Operation::Suppress { .. }
            | Operation::Unsuppress { .. }
            | Operation::ApiKey { .. }
            | Operation::RevokeApiKey { .. }
            | Operation::Template { .. }
            | Operation::MemberAdd { .. }
            | Operation::MemberRemove { .. }
            | Operation::ShardAdd { .. }
            | Operation::ShardAddOnce { .. } => (group == CONTROL_GROUP, "the control group (0)"),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("this operation is written to {wants}, not to group {group}"))
        }
    }

    /// The Raft request it stands for (not for `Bounce`, which the shard
    /// leader decides message by message, nor for membership changes,
    /// which the control leader runs step by step).
    pub fn into_request(self) -> Option<Request> {
        match self {
            Operation::Queue { action, ids } => Some(Request::QueueOp { action, ids }),
            Operation::Drain { node, drained } => Some(Request::SetDrain { id: node, drained }),
            Operation::Suspend { domain, until, reason } => Some(Request::SuspendDomain { domain, until, reason }),
            Operation::ShapingAction { key, action } => Some(Request::SetShapingAction { key, action }),
            Operation::Suppress { entries } => Some(Request::Suppress { entries }),
            Operation::Unsuppress { entries } => Some(Request::Unsuppress { entries }),
            Operation::ApiKey { key } => Some(Request::PutApiKey { key }),
            Operation::RevokeApiKey { id, at } => Some(Request::RevokeApiKey { id, at }),
            Operation::Template { tenant, name, template } => Some(Request::PutTemplate { tenant, name, template }),
            Operation::Batch { batch } => Some(Request::PutBatch { batch }),
            Operation::PutShared { space, entries } => Some(Request::PutShared { space, entries }),
            Operation::DeleteShared { space, keys, prefixes } => Some(Request::DeleteShared { space, keys, prefixes }),
            Operation::Outcomes { updates, bounces } => Some(Request::Outcomes { updates, bounces }),
            Operation::Bounce { .. }
            | Operation::MemberAdd { .. }
            | Operation::MemberRemove { .. }
            | Operation::ShardAdd { .. }
            | Operation::ShardAddOnce { .. } => None,
        }
    }
}

/// Largest payload a peer write decodes (a message of the largest allowed
/// size with its record).
const MAX_PAYLOAD: u64 = 1 << 30;

/// Decodes a peer's bincode payload strictly: the whole buffer must be one
/// value of `T` (a request of another kind, or trailing bytes, is refused).
pub fn decode_strict<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    use bincode::Options as _;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .reject_trailing_bytes()
        .with_limit(MAX_PAYLOAD)
        .deserialize::<T>(bytes)
        .map_err(|e| e.to_string())
}

/// Encodes a peer write (the counterpart of [`decode_strict`]).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serialize(value).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_of_a_former_leader_go_to_queue_shards_as_an_outcomes_entry() {
        let update = crate::request::OutcomeUpdate {
            id: "m1".into(),
            results: vec![],
            attempts: 1,
            next_attempt: 0,
            delay_notified: false,
        };
        let op = Operation::Outcomes {
            updates: vec![update.clone()],
            bounces: vec![],
        };
        assert!(op.fits(3).is_ok());
        assert!(op.fits(CONTROL_GROUP).is_err());
        let back: Operation = decode_strict(&encode(&op).unwrap()).unwrap();
        assert_eq!(
            back.into_request(),
            Some(Request::Outcomes {
                updates: vec![update.clone()],
                bounces: vec![]
            })
        );
        let many = Operation::Outcomes {
            updates: vec![update; MAX_OPERATION_IDS + 1],
            bounces: vec![],
        };
        assert!(many.fits(3).is_err());
    }

    #[test]
    fn operations_fit_their_groups_only() {
        let drain = Operation::Drain { node: 2, drained: true };
        assert!(drain.fits(CONTROL_GROUP).is_ok());
        assert!(drain.fits(3).is_err());
        let hold = Operation::Queue {
            action: QueueAction::Hold,
            ids: vec!["a".into()],
        };
        assert!(hold.fits(3).is_ok());
        assert!(hold.fits(CONTROL_GROUP).is_err());
        let many = Operation::Bounce {
            ids: vec![String::new(); MAX_OPERATION_IDS + 1],
        };
        assert!(many.fits(1).is_err());
    }

    #[test]
    fn a_raw_state_machine_request_is_not_an_operation() {
        let raw = bincode::serialize(&Request::SetNode {
            id: 7,
            addr: "10.0.0.7:7070".into(),
        })
        .unwrap();
        assert!(decode_strict::<Operation>(&raw).is_err());
        assert!(decode_strict::<crate::request::NewMessage>(&raw).is_err());
        let op = Operation::Suspend {
            domain: "example.test".into(),
            until: 5,
            reason: "r".into(),
        };
        let mut bytes = encode(&op).unwrap();
        assert_eq!(decode_strict::<Operation>(&bytes).unwrap(), op);
        bytes.push(0);
        assert!(decode_strict::<Operation>(&bytes).is_err());
    }
}
