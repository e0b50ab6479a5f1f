//! Postfix's `smtp-sink` on a chosen or free loopback port, dumping each
//! message to a file in its own directory, for node end-to-end tests that
//! read what was delivered (see [`crate::peers::SmtpSink`] for the variant
//! that waits for a banner and retries ports, used by the client's tests).

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Postfix's smtp-sink on a free loopback port, dumping each message to a
/// file; stopped on drop.
pub struct SmtpSink {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl SmtpSink {
    /// `extra` are smtp-sink options such as `["-f", "RCPT"]` (5xx at RCPT).
    pub fn start(extra: &[&str]) -> SmtpSink {
        Self::start_on(crate::free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> SmtpSink {
        let dir = tempfile::tempdir().expect("tempdir");
        // smtp-sink drops to `nobody`, which must be able to write the dumps.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(format!("{}/%M.", dir.path().display()))
            .args(extra)
            .arg(addr.to_string())
            .arg("100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("smtp-sink is installed by cluster-tests/run-all.sh");
        crate::wait_for(Duration::from_secs(10), "smtp-sink listening", || {
            TcpStream::connect(addr).is_ok()
        });
        SmtpSink { addr, dir, child }
    }

    /// Every message dumped so far (envelope lines, then the message).
    ///
    /// smtp-sink creates a dump file when the transaction starts and writes
    /// it as data arrives, so a file still being written (empty, or changed
    /// in the last 200 ms) is waited for, up to 5 s, before anything is read.
    pub fn messages(&self) -> Vec<String> {
        let settled = |e: &std::fs::DirEntry| {
            e.metadata().is_ok_and(|m| {
                m.len() > 0
                    && m.modified()
                        .is_ok_and(|t| t.elapsed().unwrap_or_default() >= Duration::from_millis(200))
            })
        };
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let entries: Vec<_> = std::fs::read_dir(self.dir.path())
                .map(|d| d.flatten().collect())
                .unwrap_or_default();
            if entries.iter().all(settled) || Instant::now() >= end {
                return entries
                    .iter()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|text| String::from_utf8_lossy(&text).into_owned())
                    .collect();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
