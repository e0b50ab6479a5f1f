//! Local delivery into Maildirs (`[local] maildir`), for sites without an
//! LMTP server. Each message is written to `tmp/`, fsynced, then renamed
//! into `new/` (the Maildir protocol), so a crash never leaves a partial
//! message visible. The rename waits for the shard's lease, as the end of
//! an SMTP/LMTP transaction's data does (see [`super::fence`]).

use std::io::Write as _;
use std::path::PathBuf;

use super::fence::Fence;
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

/// Writes the message into `dir/tmp` (fsynced); the name to move it to.
fn write_tmp(dir: &std::path::Path, body: &[u8]) -> std::io::Result<(PathBuf, PathBuf)> {
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
    Ok((tmp, dir.join("new").join(name)))
}

/// Makes a written message visible (the Maildir protocol's rename), durably.
fn publish(tmp: &std::path::Path, new: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(tmp, new)?;
    match new.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Delivers into each recipient's Maildir. Fenced like SMTP/LMTP: the
/// messages are written to `tmp/` first, and moved into `new/` only if this
/// node still holds the shard's lease; otherwise they are removed and no
/// outcome is recorded (the current leader delivers them).
pub async fn deliver_maildir(
    template: &str,
    message: &std::sync::Arc<LoadedMessage>,
    rcpts: &[usize],
    message_id: &str,
    fence: Option<&dyn Fence>,
) -> Vec<RcptAttempt> {
    let template = template.to_owned();
    let message2 = std::sync::Arc::clone(message);
    let rcpts2 = rcpts.to_vec();
    // Per recipient: a failure now, or the file written to tmp/.
    let written = tokio::task::spawn_blocking(move || {
        rcpts2
            .iter()
            .map(|&i| {
                let address = message2
                    .record
                    .envelope
                    .recipients
                    .get(i)
                    .map(|r| r.address.as_str())
                    .unwrap_or_default();
                match maildir_path(&template, address) {
                    None => Err(RcptOutcome::Failed {
                        reply: format!("550 5.1.3 {address}: cannot map address to a mailbox"),
                    }),
                    Some(dir) => write_tmp(&dir, &message2.body).map_err(|e| RcptOutcome::Deferred {
                        reply: format!("451 4.3.0 maildir {}: {e}", dir.display()),
                    }),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let any = written.iter().any(|w| w.is_ok());
    let held = match fence {
        Some(f) if any => f.holds().await,
        _ => true,
    };
    let outcomes = tokio::task::spawn_blocking(move || {
        written
            .into_iter()
            .map(|w| match w {
                Err(outcome) => outcome,
                Ok((tmp, _)) if !held => {
                    let _ = std::fs::remove_file(&tmp);
                    RcptOutcome::Fenced
                }
                Ok((tmp, new)) => match publish(&tmp, &new) {
                    Ok(()) => RcptOutcome::Delivered {
                        reply: format!(
                            "250 2.0.0 delivered to maildir {}",
                            new.parent().and_then(|p| p.parent()).unwrap_or(&new).display()
                        ),
                    },
                    Err(e) => RcptOutcome::Deferred {
                        reply: format!("451 4.3.0 maildir {}: {e}", new.display()),
                    },
                },
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    if !held {
        tracing::info!(message_id, "maildir delivery fenced: shard leadership not confirmed");
    }
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
            not_before: None,
            scope: None,
            suppressed: false,
            source: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug)]
    struct Deposed;

    impl Fence for Deposed {
        fn holds(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
            Box::pin(async { false })
        }
    }

    /// A deposed leader leaves no message in the Maildir and records no outcome.
    #[tokio::test]
    async fn a_fenced_maildir_delivery_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let template = format!("{}/{{domain}}/{{user}}", dir.path().display());
        let message = std::sync::Arc::new(LoadedMessage {
            record: tern_model::record::MessageRecord::new(
                "m".into(),
                crate::envelope::Envelope {
                    recipients: vec![crate::envelope::Recipient {
                        address: "bob@example.test".into(),
                        notify: Default::default(),
                        orcpt: None,
                    }],
                    ..Default::default()
                },
                3,
                0,
            ),
            body: b"x\r\n".to_vec(),
        });
        let box_dir = dir.path().join("example.test/bob");
        let count = |sub: &str| std::fs::read_dir(box_dir.join(sub)).map(|d| d.count()).unwrap_or(0);
        let fenced = deliver_maildir(&template, &message, &[0], "<m@x>", Some(&Deposed)).await;
        assert!(matches!(&fenced[0].outcome, RcptOutcome::Fenced));
        assert_eq!((count("new"), count("tmp")), (0, 0));
        let done = deliver_maildir(&template, &message, &[0], "<m@x>", None).await;
        assert!(matches!(&done[0].outcome, RcptOutcome::Delivered { .. }));
        assert_eq!((count("new"), count("tmp")), (1, 0));
    }

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
