//! Local delivery into Maildirs (`[local] maildir`), for sites without an
//! LMTP server. Each message is written to `tmp/`, fsynced, then renamed
//! into `new/` (the Maildir protocol), so a crash never leaves a partial
//! message visible.

use std::io::Write as _;
use std::path::PathBuf;

use super::{LoadedMessage, RcptAttempt, RcptOutcome};

/// The Maildir of a recipient from the template (`{domain}`, `{user}`).
/// Path separators and dot-dot in the address cannot escape the template.
pub fn maildir_path(template: &str, address: &str) -> Option<PathBuf> {
    let (user, domain) = address.rsplit_once('@')?;
    let clean = |s: &str| -> Option<String> {
        let s = s.to_lowercase();
        (!s.is_empty() && !s.contains(['/', '\0']) && s != "." && s != "..").then_some(s)
    };
    let path = template
        .replace("{domain}", &clean(domain)?)
        .replace("{user}", &clean(user)?);
    Some(PathBuf::from(path))
}

fn write_one(dir: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let name = format!(
        "{}.{}_{}.tern",
        chrono::Utc::now().timestamp(),
        std::process::id(),
        rand::random::<u64>()
    );
    let tmp = dir.join("tmp").join(&name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("new").join(&name))?;
    std::fs::File::open(dir.join("new"))?.sync_all()
}

pub async fn deliver_maildir(
    template: &str,
    message: &std::sync::Arc<LoadedMessage>,
    rcpts: &[usize],
    message_id: &str,
) -> Vec<RcptAttempt> {
    let template = template.to_owned();
    let message2 = std::sync::Arc::clone(message);
    let rcpts2 = rcpts.to_vec();
    let outcomes = tokio::task::spawn_blocking(move || {
        rcpts2
            .iter()
            .map(|&i| {
                let address = &message2.record.envelope.recipients[i].address;
                match maildir_path(&template, address) {
                    None => RcptOutcome::Failed {
                        reply: format!("550 5.1.3 {address}: cannot map address to a mailbox"),
                    },
                    Some(dir) => match write_one(&dir, &message2.body) {
                        Ok(()) => RcptOutcome::Delivered {
                            reply: format!("250 2.0.0 delivered to maildir {}", dir.display()),
                        },
                        Err(e) => RcptOutcome::Deferred {
                            reply: format!("451 4.3.0 maildir {}: {e}", dir.display()),
                        },
                    },
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    rcpts
        .iter()
        .zip(outcomes)
        .map(|(&index, outcome)| RcptAttempt {
            index,
            outcome,
            remote_host: Some("maildir".into()),
            remote_ip: None,
            tls: None,
            dsn_relayed: false,
            final_delivery: true,
            message_id: message_id.to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maildir_paths_cannot_escape() {
        assert_eq!(
            maildir_path("/m/{domain}/{user}", "Bob@Example.Test"),
            Some(PathBuf::from("/m/example.test/bob"))
        );
        assert_eq!(maildir_path("/m/{domain}/{user}", "../x@example.test"), None);
        assert_eq!(maildir_path("/m/{domain}/{user}", "..@example.test"), None);
        assert_eq!(maildir_path("/m/{domain}/{user}", "nodomain"), None);
    }
}
