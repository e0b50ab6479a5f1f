//! Load generator: `messages` messages with unique Message-IDs over
//! `sessions` concurrent SMTP sessions spread across the nodes, optionally
//! paced, bounded in count and time. Every message attempted gets a record:
//! `250` (acknowledged: it must be delivered), a 4xx/5xx reply, or a broken
//! connection / timeout (unknown: it may or may not be delivered).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Node id → SMTP address of the nodes clients may connect to. The cluster
/// updates it when nodes die, restart (new port) or join.
pub type Targets = Arc<RwLock<BTreeMap<u64, SocketAddr>>>;

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub messages: usize,
    pub sessions: usize,
    /// Messages per second over all sessions (`None`: as fast as possible).
    pub rate: Option<f64>,
    /// No new message is started after this.
    pub deadline: Duration,
    /// Approximate message size in bytes.
    pub size: usize,
    /// Message-IDs are `<prefix>-<n>@load.tern.test`.
    pub prefix: String,
    /// Reply timeout per command (a paused node never answers).
    pub reply_timeout: Duration,
    /// A session reconnects (to the next node) after this many messages.
    pub per_connection: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            messages: 200,
            sessions: 4,
            rate: None,
            deadline: Duration::from_secs(60),
            size: 1024,
            prefix: "load".into(),
            reply_timeout: Duration::from_secs(20),
            per_connection: 25,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `250` after the data, with the queue id.
    Acked(String),
    /// A 4xx/5xx reply at some step.
    Rejected(String),
    /// The connection broke or a reply timed out (outcome unknown).
    Broken(String),
}

#[derive(Clone, Debug)]
pub struct Record {
    /// Message-ID without angle brackets.
    pub message_id: String,
    /// The node the message was sent to.
    pub node: u64,
    pub started: Instant,
    pub finished: Instant,
    pub outcome: Outcome,
}

impl Record {
    pub fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Acked(_))
    }
}

/// What a load run did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub records: Vec<Record>,
}

impl LoadReport {
    pub fn acked(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| r.acked()).collect()
    }

    pub fn acked_ids(&self) -> Vec<String> {
        self.acked().iter().map(|r| r.message_id.clone()).collect()
    }

    pub fn rejected(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Rejected(_)))
            .count()
    }

    pub fn broken(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Broken(_)))
            .count()
    }
}

struct Shared {
    config: LoadConfig,
    targets: Targets,
    next: AtomicUsize,
    stop: AtomicBool,
    start: Instant,
    records: Mutex<Vec<Record>>,
}

/// A running load; [`Load::finish`] waits for it.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(config: LoadConfig, targets: Targets) -> Load {
        let shared = Arc::new(Shared {
            config,
            targets,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            start: Instant::now(),
            records: Mutex::new(Vec::new()),
        });
        let threads = (0..shared.config.sessions)
            .map(|s| {
                let sh = Arc::clone(&shared);
                std::thread::spawn(move || session(s, &sh))
            })
            .collect();
        Load { shared, threads }
    }

    /// A handle that counts progress from another thread.
    pub fn progress(&self) -> Progress {
        Progress(Arc::clone(&self.shared))
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> usize {
        self.records().iter().filter(|r| r.acked()).count()
    }

    /// Messages attempted so far (finished).
    pub fn attempted(&self) -> usize {
        self.records().len()
    }

    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True once every session has ended.
    pub fn is_done(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Stops starting new messages (messages in flight finish).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for every session to end.
    pub fn finish(self) -> LoadReport {
        for t in self.threads {
            let _ = t.join();
        }
        LoadReport {
            records: std::mem::take(&mut *self.shared.records.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

/// Counts of a running [`Load`], readable from any thread.
#[derive(Clone)]
pub struct Progress(Arc<Shared>);

impl Progress {
    /// (attempted, acknowledged) so far.
    pub fn counts(&self) -> (usize, usize) {
        let r = self.0.records.lock().unwrap_or_else(|p| p.into_inner());
        (r.len(), r.iter().filter(|r| r.acked()).count())
    }
}

/// Runs a load to completion.
pub fn run(config: LoadConfig, targets: Targets) -> LoadReport {
    Load::start(config, targets).finish()
}

fn session(index: usize, sh: &Shared) {
    let c = &sh.config;
    let mut turn = index;
    let mut conn: Option<(u64, Client)> = None;
    let mut on_conn = 0;
    loop {
        if sh.stop.load(Ordering::SeqCst)
            || sh.start.elapsed() > c.deadline
            || sh.next.load(Ordering::SeqCst) >= c.messages
        {
            return;
        }
        if conn.is_none() {
            let target = {
                let t = sh.targets.read().unwrap_or_else(|p| p.into_inner());
                if t.is_empty() {
                    None
                } else {
                    t.iter().nth(turn % t.len()).map(|(id, a)| (*id, *a))
                }
            };
            turn += 1;
            let Some((node, addr)) = target else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            match Client::connect(addr, c.reply_timeout) {
                Ok(cl) => {
                    conn = Some((node, cl));
                    on_conn = 0;
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        let n = sh.next.fetch_add(1, Ordering::SeqCst);
        if n >= c.messages {
            return;
        }
        if let Some(rate) = c.rate {
            let due = sh.start + Duration::from_secs_f64(n as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let Some((node, client)) = conn.as_mut() else { continue };
        let node = *node;
        let message_id = format!("{}-{n}@load.tern.test", c.prefix);
        let started = Instant::now();
        let outcome = client.send(&message_id, c.size);
        let finished = Instant::now();
        let keep = matches!(outcome, Outcome::Acked(_));
        sh.records.lock().unwrap_or_else(|p| p.into_inner()).push(Record {
            message_id,
            node,
            started,
            finished,
            outcome,
        });
        on_conn += 1;
        if !keep || on_conn >= c.per_connection {
            if let Some((_, mut cl)) = conn.take() {
                if keep {
                    let _ = cl.command("QUIT");
                }
            }
            if !keep {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A small blocking SMTP client.
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    /// Connects, reads the greeting and says EHLO.
    pub fn connect(addr: SocketAddr, reply_timeout: Duration) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(reply_timeout))?;
        stream.set_write_timeout(Some(reply_timeout))?;
        let _ = stream.set_nodelay(true);
        let mut c = Client {
            stream: BufReader::new(stream),
        };
        let greeting = c.read_reply()?;
        if !greeting.starts_with("220") {
            return Err(std::io::Error::other(format!("greeting: {greeting}")));
        }
        let ehlo = c.command("EHLO load.tern.test")?;
        if !ehlo.starts_with("250") {
            return Err(std::io::Error::other(format!("EHLO: {ehlo}")));
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply, lines joined by '\n'.
    pub fn read_reply(&mut self) -> std::io::Result<String> {
        tern_testkit::smtp::read_reply(&mut self.stream)
    }

    pub fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.stream.get_mut().write_all(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// One transaction for `message_id`.
    pub fn send(&mut self, message_id: &str, size: usize) -> Outcome {
        match self.transaction(message_id, size) {
            Ok(Ok(queue_id)) => Outcome::Acked(queue_id),
            Ok(Err(reply)) => Outcome::Rejected(reply),
            Err(e) => Outcome::Broken(e.to_string()),
        }
    }

    fn transaction(&mut self, message_id: &str, size: usize) -> std::io::Result<Result<String, String>> {
        for (cmd, want) in [
            ("MAIL FROM:<load@tern.test>", "250"),
            ("RCPT TO:<sink@example.test>", "250"),
            ("DATA", "354"),
        ] {
            let r = self
                .command(cmd)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{cmd}: {e}")))?;
            if !r.starts_with(want) {
                return Ok(Err(format!("{cmd}: {r}")));
            }
        }
        self.stream.get_mut().write_all(body(message_id, size).as_bytes())?;
        let r = self
            .command(".")
            .map_err(|e| std::io::Error::new(e.kind(), format!("end of data: {e}")))?;
        if r.starts_with("250") {
            Ok(Ok(r.rsplit(' ').next().unwrap_or_default().to_owned()))
        } else {
            Ok(Err(format!("DATA: {r}")))
        }
    }
}

/// A message with `Message-ID: <message_id>` of about `size` bytes
/// (without the final dot line).
pub fn body(message_id: &str, size: usize) -> String {
    let mut b = format!(
        "From: <load@tern.test>\r\nTo: <sink@example.test>\r\nSubject: {message_id}\r\nMessage-ID: <{message_id}>\r\n\r\n"
    );
    while b.len() < size {
        b.push_str("The quick brown fox jumps over the lazy dog 0123456789.\r\n");
    }
    b
}

/// Sends one message to `addr`: the outcome (connection errors are `Broken`).
pub fn send_one(addr: SocketAddr, message_id: &str, reply_timeout: Duration) -> Outcome {
    match Client::connect(addr, reply_timeout) {
        Ok(mut c) => {
            let o = c.send(message_id, 300);
            if !matches!(o, Outcome::Broken(_)) {
                let _ = c.command("QUIT");
            }
            o
        }
        Err(e) => Outcome::Broken(e.to_string()),
    }
}
