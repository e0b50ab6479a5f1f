//! A running `tern-powerfs` process seen from a test: mount, send `cut` /
//! `status`, and unmount on drop (also when the test panics), so no mount is
//! left behind.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a command may take before the daemon is presumed stuck.
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);

/// One mounted power-cut file system.
pub struct PowerMount {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
    mountpoint: PathBuf,
}

/// Whether FUSE can be used here; tests skip (with a message) only when it
/// cannot and `TERN_REQUIRE_PEERS` is unset.
pub fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
}

impl PowerMount {
    /// Starts `binary --backing BACKING --mountpoint MOUNTPOINT` (both created
    /// if missing) and waits until it has mounted.
    pub fn mount(binary: &Path, backing: &Path, mountpoint: &Path) -> anyhow::Result<PowerMount> {
        std::fs::create_dir_all(backing).with_context(|| format!("creating {}", backing.display()))?;
        std::fs::create_dir_all(mountpoint).with_context(|| format!("creating {}", mountpoint.display()))?;
        let mut child = Command::new(binary)
            .arg("--backing")
            .arg(backing)
            .arg("--mountpoint")
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        let stdin = child.stdin.take().context("powerfs stdin")?;
        let stdout = child.stdout.take().context("powerfs stdout")?;
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut mount = PowerMount {
            child: Some(child),
            stdin: Some(stdin),
            answers,
            mountpoint: mountpoint.to_path_buf(),
        };
        let first = mount.answer().context("waiting for powerfs to mount")?;
        anyhow::ensure!(
            first.starts_with("mounted"),
            "powerfs said {first:?} instead of `mounted`"
        );
        Ok(mount)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn answer(&mut self) -> anyhow::Result<String> {
        match self.answers.recv_timeout(ANSWER_DEADLINE) {
            Ok(line) => Ok(line),
            Err(e) => {
                let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                anyhow::bail!(
                    "no answer from powerfs at {} ({e}); exit status {status:?}",
                    self.mountpoint.display()
                )
            }
        }
    }

    fn command(&mut self, cmd: &str) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("powerfs already stopped")?;
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .context("writing to powerfs")?;
        let answer = self.answer()?;
        answer
            .strip_prefix("ok ")
            .map(str::to_string)
            .with_context(|| format!("powerfs answered {cmd:?} with {answer:?}"))
    }

    /// A power cut; `tear` keeps a 4 KiB-aligned prefix of each file's oldest
    /// unsynced write. Returns the daemon's counters (`key=value` pairs).
    pub fn cut(&mut self, tear: bool) -> anyhow::Result<Counters> {
        self.command(if tear { "cut tear" } else { "cut" })
            .map(|s| Counters::parse(&s))
    }

    /// Makes everything durable now (hides missing fsyncs: see the crate doc).
    pub fn settle(&mut self) -> anyhow::Result<Counters> {
        self.command("settle").map(|s| Counters::parse(&s))
    }

    /// What a cut would drop now.
    pub fn status(&mut self) -> anyhow::Result<Counters> {
        self.command("status").map(|s| Counters::parse(&s))
    }
}

/// `key=value` counters from one answer line.
#[derive(Debug, Clone, Default)]
pub struct Counters(pub Vec<(String, u64)>);

impl Counters {
    fn parse(s: &str) -> Counters {
        Counters(
            s.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect(),
        )
    }

    /// A counter's value, 0 when absent.
    pub fn get(&self, key: &str) -> u64 {
        self.0.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(" "))
    }
}

impl Drop for PowerMount {
    fn drop(&mut self) {
        // EOF on stdin asks for a clean unmount; kill and lazy-unmount if it hangs.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(10);
            let exited = loop {
                match child.try_wait() {
                    Ok(Some(_)) => break true,
                    Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                    _ => break false,
                }
            };
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Whether `/proc/self/mounts` lists `path` as a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path
        .canonicalize()
        .or_else(|_| Ok::<_, std::io::Error>(path.to_path_buf()))
    else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some(canon.to_string_lossy().as_ref()))
        })
        .unwrap_or(false)
}
