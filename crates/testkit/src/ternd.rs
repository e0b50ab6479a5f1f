//! One harness for a real `ternd` process, for single-node tests and for
//! each member of a test cluster alike.
//!
//! A [`Ternd`] runs the binary with a config file (or with no arguments in
//! its working directory: the embedded default), keeps its stdout lines and
//! its log (stderr, optionally prefixed per start), waits for the `ready`
//! line and reads the `listening KIND=ADDR` lines printed before it. Faults
//! are signals: SIGKILL, SIGSTOP/SIGCONT, SIGTERM. The process is killed
//! (after a SIGCONT if paused) when the handle is dropped, and its log is
//! printed then if the thread is panicking. [`run_bounded`] runs any command
//! (e.g. `ternctl` against a paused node) with a deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// What the harness last did to the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    /// SIGSTOPped.
    Paused,
    /// SIGKILLed (or never started / exited).
    Down,
}

/// A `ternd` process; see the module docs.
pub struct Ternd {
    binary: PathBuf,
    /// `--config FILE`; `None` runs `ternd` with no arguments in `cwd`.
    config: Option<PathBuf>,
    cwd: Option<PathBuf>,
    /// Environment for the next [`Ternd::start`] (besides `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Names the process in errors (`ternd`, `ternd n1`).
    name: String,
    /// `[TAG#START] ` before each log line, when set.
    log_tag: Option<String>,
    child: Option<Child>,
    state: State,
    stdout: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
    /// From the last `listening KIND=ADDR` lines (port 0 changes at each start).
    listening: BTreeMap<String, SocketAddr>,
    starts: u32,
    /// Print the log on drop when the thread is panicking (tests).
    pub print_logs_on_panic: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ternd {
    /// A harness for `ternd --config CONFIG` (not started yet).
    pub fn with_config(config: &Path) -> Result<Ternd> {
        Ok(Ternd::new(crate::try_bin("ternd")?, Some(config.to_owned()), None))
    }

    /// A harness for `ternd` with no arguments, run in `dir` (not started yet).
    pub fn embedded_default(dir: &Path) -> Result<Ternd> {
        Ok(Ternd::new(crate::try_bin("ternd")?, None, Some(dir.to_owned())))
    }

    fn new(binary: PathBuf, config: Option<PathBuf>, cwd: Option<PathBuf>) -> Ternd {
        Ternd {
            binary,
            config,
            cwd,
            env: Vec::new(),
            name: "ternd".to_owned(),
            log_tag: None,
            child: None,
            state: State::Down,
            stdout: Arc::default(),
            logs: Arc::default(),
            listening: BTreeMap::new(),
            starts: 0,
            print_logs_on_panic: true,
        }
    }

    /// Names the process `ternd TAG` in errors; with `log_prefix`, each log
    /// line gets `[TAG#START] ` (several nodes' logs side by side).
    pub fn labelled(mut self, tag: &str, log_prefix: bool) -> Ternd {
        self.name = format!("ternd {tag}");
        self.log_tag = log_prefix.then(|| tag.to_owned());
        self
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Starts the process (again, same config and data) without waiting.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::Failed(format!("{} is already running", self.name)));
        }
        lock(&self.stdout).clear();
        self.listening.clear();
        self.starts += 1;
        let prefix = match &self.log_tag {
            Some(tag) => format!("[{tag}#{}] ", self.starts),
            None => String::new(),
        };
        let mut cmd = Command::new(&self.binary);
        match (&self.config, &self.cwd) {
            (Some(config), _) => {
                cmd.arg("--config").arg(config);
            }
            (None, Some(dir)) => {
                cmd.current_dir(dir);
            }
            (None, None) => {}
        }
        let mut child = cmd
            // TERN_TEST_RUST_LOG: more logging for a diagnosis run.
            .env(
                "RUST_LOG",
                std::env::var("TERN_TEST_RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io(format!("spawning {}", self.binary.display())))?;
        let out = child.stdout.take().ok_or_else(|| Error::Failed("no stdout".into()))?;
        let err = child.stderr.take().ok_or_else(|| Error::Failed("no stderr".into()))?;
        let (lines, logs) = (Arc::clone(&self.stdout), Arc::clone(&self.logs));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(std::result::Result::ok) {
                lock(&lines).push(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(std::result::Result::ok) {
                lock(&logs).push(format!("{prefix}{line}"));
            }
        });
        self.child = Some(child);
        self.state = State::Running;
        Ok(())
    }

    /// Waits (bounded) for the `ready` line and reads the `listening` lines.
    pub fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let end = Instant::now() + deadline;
        loop {
            let Some(c) = self.child.as_mut() else {
                return Err(Error::Failed(format!("{} is not running", self.name)));
            };
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                self.state = State::Down;
                return Err(Error::ExitedBeforeReady {
                    name: self.name.clone(),
                    status,
                    logs: self.logs(),
                });
            }
            let lines = self.stdout_lines();
            if lines.iter().any(|l| l == "ready") {
                for line in &lines {
                    if let Some((kind, addr)) = line.strip_prefix("listening ").and_then(|r| r.split_once('=')) {
                        let addr: SocketAddr = addr
                            .parse()
                            .map_err(|e| Error::Failed(format!("listening line {line}: {e}")))?;
                        self.listening.insert(kind.to_owned(), addr);
                    }
                }
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(Error::Failed(format!(
                    "{} not ready after {deadline:?}\n{}",
                    self.name,
                    self.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the last start listens for `kind` (`smtp`, `grpc`, `http`, ...).
    pub fn listening(&self, kind: &str) -> Option<SocketAddr> {
        self.listening.get(kind).copied()
    }

    /// Whether the process has exited (as a supervisor would notice).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash or power loss would (waits for the exit).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.state = State::Down;
        self.listening.clear();
    }

    /// Sends `kill -SIG` (STOP, CONT, TERM, ...) without waiting.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| Error::Failed(format!("{} is not running", self.name)))?;
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .map_err(Error::io("running kill"))?;
        if !st.success() {
            return Err(Error::Failed(format!("kill -{sig} {pid} failed")));
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes (sockets stay open, nothing answers).
    pub fn pause(&mut self) -> Result<()> {
        self.signal("STOP")?;
        self.state = State::Paused;
        Ok(())
    }

    /// SIGCONT after [`Ternd::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.signal("CONT")?;
        self.state = State::Running;
        Ok(())
    }

    /// Waits (bounded, polling) for the process to exit by itself; `None`
    /// if it still runs at `deadline` (it is left running).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                self.state = State::Down;
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits up to `deadline` for the exit; an error (after
    /// a SIGKILL) when it did not exit in time.
    pub fn signal_and_wait(&mut self, sig: &str, deadline: Duration) -> Result<ExitStatus> {
        self.signal(sig)?;
        match self.wait_exit(deadline) {
            Some(status) => Ok(status),
            None => {
                self.kill();
                Err(Error::Failed(format!(
                    "{} did not exit within {deadline:?} after SIG{sig}\n{}",
                    self.name,
                    self.logs()
                )))
            }
        }
    }

    /// SIGTERM, an orderly stop, waiting up to `deadline` for the exit,
    /// then SIGKILL. False when it had to kill.
    pub fn terminate(&mut self, deadline: Duration) -> Result<bool> {
        if self.child.is_none() {
            return Ok(true);
        }
        self.signal("TERM")?;
        let clean = self.wait_exit(deadline).is_some();
        self.kill();
        Ok(clean)
    }

    /// Every stdout line of the current start.
    pub fn stdout_lines(&self) -> Vec<String> {
        lock(&self.stdout).clone()
    }

    /// Every stderr line since the first start.
    pub fn logs(&self) -> String {
        lock(&self.logs).join("\n")
    }
}

impl Drop for Ternd {
    fn drop(&mut self) {
        if self.state == State::Paused {
            let _ = self.signal("CONT");
        }
        self.kill();
        if self.print_logs_on_panic && std::thread::panicking() {
            let name = &self.name;
            eprintln!("---- {name} log ----\n{}\n---- end {name} log ----", self.logs());
        }
    }
}

/// `ternctl --endpoint GRPC ARGS` with `env`, run with a deadline.
pub fn ternctl(grpc: SocketAddr, args: &[&str], env: &[(String, String)], deadline: Duration) -> Result<Output> {
    run_bounded(
        Command::new(crate::try_bin("ternctl")?)
            .arg("--endpoint")
            .arg(grpc.to_string())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v))),
        deadline,
    )
}

/// `ternctl ... ARGS -o json`, parsed; an error when ternctl fails.
pub fn ternctl_json(
    grpc: SocketAddr,
    args: &[&str],
    env: &[(String, String)],
    deadline: Duration,
) -> Result<serde_json::Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = ternctl(grpc, &all, env, deadline)?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "ternctl {args:?} at {grpc}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::Failed(format!("ternctl {args:?}: not JSON: {e}")))
}

/// Runs a command with its output captured; killed after `deadline`.
pub fn run_bounded(cmd: &mut Command, deadline: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("spawning {cmd:?}")))?;
    let mut out = child.stdout.take().ok_or_else(|| Error::Failed("no stdout".into()))?;
    let mut err = child.stderr.take().ok_or_else(|| Error::Failed("no stderr".into()))?;
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(Error::io("waiting for a command"))? {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                what: format!("{cmd:?} to finish"),
                deadline,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}
