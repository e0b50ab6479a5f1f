//! The promise behind 250: an acknowledged message survives `kill -9`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;

#[test]
fn acknowledged_messages_survive_sigkill() {
    let mut node = Node::start(&hold_mail());
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for t in 0..8 {
        let (acked, stop, addr) = (Arc::clone(&acked), Arc::clone(&stop), node.smtp);
        senders.push(std::thread::spawn(move || {
            // Bounded: at most 400 messages per sender, and stops at the first error.
            let Ok(mut client) = Client::connect(addr) else {
                return;
            };
            let _ = client.command("EHLO load.test");
            for i in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let b = body(&format!("kill-{t}-{i}"), 2048);
                match client.send_mail("sender@tern.test", &["rcpt@example.test"], &b) {
                    Ok(id) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    // Kill while the burst is still running, right after 300 replies of 250.
    wait_for(Duration::from_secs(120), "300 acknowledged messages", || {
        acked.lock().unwrap().len() >= 300
    });
    node.kill();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);

    node.spawn();
    let queued = node.queued_ids();
    let lost: Vec<_> = acked.difference(&queued).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    let summary = node.ternctl_json(&["queue", "summary"]);
    assert_eq!(summary["messages"].as_u64().unwrap(), queued.len() as u64);
    assert_eq!(
        summary["domains"]["example.test"].as_u64().unwrap(),
        queued.len() as u64
    );
}
