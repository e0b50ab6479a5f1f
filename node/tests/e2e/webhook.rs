//! `[[webhook]]` end to end: a real HTTP receiver (Python's http.server)
//! on loopback records every POST; ternd posts the durable events of a
//! message it delivers to smtp-sink (from the shard's outbox), retries
//! after 500s with the same batch and honours the event filter.
//! (webhook_durable.rs: signatures, a receiver and a node killed.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// Appends one JSON line per POST to argv[1] ({status, path, headers,
/// body}), answering 500 to the first argv[2] requests and 200 after.
const RECEIVER: &str = r#"
import http.server, json, sys, threading
out, fail_first = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
count = 0
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global count
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        with lock:
            count += 1
            status = 500 if count <= fail_first else 200
            with open(out, "a") as f:
                f.write(json.dumps({"status": status, "path": self.path,
                    "content_type": self.headers.get("Content-Type"),
                    "authorization": self.headers.get("Authorization"), "body": body}) + "\n")
        answer = b'{"ok": true}' if status == 200 else b"try again"
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// One recorded POST.
#[derive(Debug, serde::Deserialize)]
struct Post {
    status: u16,
    path: String,
    content_type: Option<String>,
    authorization: Option<String>,
    body: String,
}

impl Post {
    fn events(&self) -> Vec<Value> {
        match serde_json::from_str(&self.body) {
            Ok(Value::Array(events)) => events,
            _ => panic!("POST body is not a JSON array: {}", self.body),
        }
    }
}

pub(crate) struct Receiver {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Receiver {
    pub(crate) fn start(fail_first: usize) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(RECEIVER)
            .arg(dir.path().join("posts.jsonl"))
            .arg(fail_first.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("receiver said {line:?}"));
        Receiver { port, dir, child }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every POST so far (complete lines only).
    fn posts(&self) -> Vec<Post> {
        let text = std::fs::read_to_string(self.dir.path().join("posts.jsonl")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Events of the posts answered 200.
    pub(crate) fn accepted_events(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .filter(|p| p.status == 200)
            .flat_map(Post::events)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn of_message<'a>(events: &'a [Value], id: &str, event: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["msg_id"] == id && e["type"] == event)
        .collect()
}

#[test]
fn webhooks_post_durable_events_retry_and_filter() {
    if !tern_testkit::peers::require("python3") {
        return;
    }
    let sink = SmtpSink::start(&[]);
    // Answers 500 twice: the first batch is posted three times.
    let all = Receiver::start(2);
    let delivered_only = Receiver::start(0);
    let mut node = Node::start(&format!(
        "[log]\nformat = \"json\"\n\n[[route]]\ndomain = \"*\"\nto = \"{sink}\"\n\n\
         [[webhook]]\nurl = \"{all}\"\nheaders = {{ Authorization = \"Bearer hook-s3cret\" }}\n\n\
         [[webhook]]\nurl = \"{only}\"\nevents = [\"delivered\"]\nflush_interval = \"1h\"\n",
        sink = sink.addr,
        all = all.url("/all?token=t1"),
        only = delivered_only.url("/delivered"),
    ));
    let mut c = Client::connect(node.smtp).unwrap();
    c.command("EHLO hook.test").unwrap();
    let id = c
        .send_mail("a@tern.test", &["r@example.test"], &body("hooked-1", 300))
        .unwrap();
    wait_for(Duration::from_secs(30), "delivery to the sink", || {
        sink.messages().iter().any(|m| m.contains("<hooked-1@tern.test>"))
    });
    wait_for(
        Duration::from_secs(30),
        "received and delivered events, after two 500s",
        || {
            let events = all.accepted_events();
            of_message(&events, &id, "received").len() == 1 && of_message(&events, &id, "delivered").len() == 1
        },
    );

    let posts = all.posts();
    assert!(posts.len() >= 3, "{posts:?}");
    assert_eq!(
        posts.iter().map(|p| p.status).take(3).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    // The batch that got 500s was posted again as it was.
    assert_eq!(posts[0].body, posts[1].body);
    assert_eq!(posts[1].body, posts[2].body);
    assert!(
        !of_message(&posts[0].events(), &id, "received").is_empty(),
        "{}",
        posts[0].body
    );
    for p in &posts {
        assert_eq!(p.path, "/all?token=t1");
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.authorization.as_deref(), Some("Bearer hook-s3cret"));
    }

    // The posted objects are the durable events (docs/events.md).
    let events = all.accepted_events();
    let received = of_message(&events, &id, "received")[0].clone();
    assert_eq!(received["from"], "a@tern.test", "{received}");
    assert_eq!(received["version"], 1, "{received}");
    assert!(received["recipient"].is_null(), "{received}");
    assert!(received["id"].as_str().unwrap().starts_with("evt_"), "{received}");
    let delivered = of_message(&events, &id, "delivered")[0].clone();
    assert_eq!(delivered["recipient"], "r@example.test");
    assert!(delivered["reply"].as_str().unwrap().starts_with("250"), "{delivered}");
    assert_eq!(delivered["attempts"], 1, "{delivered}");
    assert_eq!(delivered["shard"], received["shard"], "{delivered}");

    let all_label = format!("url=\"{}\"", all.url("/all"));
    let posted = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("tern_webhook_events_posted_total{{{all_label}}} ")))
            .and_then(|v| v.parse::<usize>().ok())
    };
    // The task counts a batch once it has read the answer.
    let mut metrics = String::new();
    wait_for(Duration::from_secs(5), "posted events counted", || {
        metrics = crate::metrics::get_metrics(node.http, None).1;
        posted(&metrics) == Some(all.accepted_events().len())
    });
    for line in [
        format!("tern_webhook_post_failures_total{{{all_label}}} 2"),
        format!("tern_webhook_events_dropped_total{{{all_label},reason=\"queue\"}} 0"),
        format!("tern_webhook_events_dropped_total{{{all_label},reason=\"buffer\"}} 0"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }

    // The filtered webhook gets the delivered event and nothing else.
    wait_for(Duration::from_secs(30), "the filtered webhook's event", || {
        !delivered_only.accepted_events().is_empty()
    });
    let events = delivered_only.accepted_events();
    assert!(events.iter().all(|e| e["type"] == "delivered"), "{events:?}");
    assert_eq!(of_message(&events, &id, "delivered").len(), 1, "{events:?}");
    assert!(delivered_only.posts().iter().all(|p| p.authorization.is_none()));
    let status = node.signal_and_wait("TERM", Duration::from_secs(20));
    assert!(status.success(), "{status}");
}
