//! `admin` events (docs/events.md): every AdminService call that changes
//! something, and `queue show --body` (it reads mail content), is one
//! `tern::event` line saying who did what to which selection, how many
//! messages it touched and how it ended. Refused attempts are events too.
//! Read-only calls are not audited.

use std::net::SocketAddr;

use tonic::{Request, Status};

use super::authz::{Authz, Caller};
use crate::pki::Role;

/// An authorised change under way; [`Audit::finish`] emits its event.
#[derive(Debug)]
pub struct Audit {
    pub caller: Caller,
    action: &'static str,
    selection: String,
}

impl Authz {
    /// [`Authz::check`] for a call that changes something (or reads mail
    /// content): a refusal is audited here; an allowed call is audited when
    /// the handler calls [`Audit::finish`].
    pub async fn check_change<T>(
        &self,
        request: &Request<T>,
        need: Role,
        action: &'static str,
        selection: String,
    ) -> Result<Audit, Status> {
        match self.judge(request, need).await {
            Ok(caller) => Ok(Audit {
                caller,
                action,
                selection,
            }),
            Err(refusal) => {
                emit(&Event {
                    who: &refusal.who,
                    how: refusal.how,
                    role: "",
                    peer: request.remote_addr(),
                    action,
                    selection: &selection,
                    affected: 0,
                    result: "refused",
                    error: refusal.status.message(),
                });
                Err(refusal.status)
            }
        }
    }
}

impl Audit {
    /// Emits the event for the call's `result`; `affected` counts the
    /// messages a successful call touched. Returns `result` unchanged.
    pub fn finish<R>(self, result: Result<R, Status>, affected: impl FnOnce(&R) -> u64) -> Result<R, Status> {
        let (count, outcome, error) = match &result {
            Ok(r) => (affected(r), "ok", ""),
            Err(status) => (0, "failed", status.message()),
        };
        emit(&Event {
            who: &self.caller.name,
            how: self.caller.how.as_str(),
            role: self.caller.role.as_str(),
            peer: self.caller.peer,
            action: self.action,
            selection: &self.selection,
            affected: count,
            result: outcome,
            error,
        });
        result
    }
}

struct Event<'a> {
    who: &'a str,
    how: &'a str,
    role: &'a str,
    peer: Option<SocketAddr>,
    action: &'a str,
    selection: &'a str,
    affected: u64,
    result: &'a str,
    error: &'a str,
}

fn emit(e: &Event<'_>) {
    tracing::info!(
        target: "tern::event",
        event = "admin",
        action = e.action,
        who = e.who,
        how = e.how,
        role = e.role,
        peer = %e.peer.map(|p| p.to_string()).unwrap_or_default(),
        selection = e.selection,
        affected = e.affected,
        result = e.result,
        error = e.error,
        "admin"
    );
}

/// `ids=a,b,... domain=d sender=s older_than=Ns` of a queue operation
/// (at most 20 ids, then how many more).
pub fn queue_selection(ids: &[String], domain: &str, sender: &str, older_than_secs: u64) -> String {
    let mut parts = Vec::new();
    if !ids.is_empty() {
        let shown: Vec<&str> = ids.iter().take(20).map(String::as_str).collect();
        let more = ids.len().saturating_sub(shown.len());
        let mut s = format!("ids={}", shown.join(","));
        if more > 0 {
            s.push_str(&format!(",+{more} more"));
        }
        parts.push(s);
    }
    if !domain.is_empty() {
        parts.push(format!("domain={domain}"));
    }
    if !sender.is_empty() {
        parts.push(format!("sender={sender}"));
    }
    if older_than_secs > 0 {
        parts.push(format!("older_than={older_than_secs}s"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_are_bounded() {
        let ids: Vec<String> = (0..25).map(|i| format!("M{i}")).collect();
        let s = queue_selection(&ids, "example.test", "", 3600);
        assert!(s.starts_with("ids=M0,M1,"), "{s}");
        assert!(s.contains("M19,+5 more domain=example.test older_than=3600s"), "{s}");
        assert_eq!(queue_selection(&[], "", "@x.test", 0), "sender=@x.test");
    }
}
