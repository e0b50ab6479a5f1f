//! The OpenSPF RFC 7208 test suite (`rfc7208-tests.yml`, shipped in pyspf's
//! source distribution; cluster-tests/run-all.sh fetches it) run against
//! Tern's SPF evaluation, `auth::inbound::spf_envelope`. Each scenario's
//! zone is served by a real DNS server on loopback (spf_zone_server.py,
//! dnslib), and Tern's resolver queries it as in production.
//!
//! The suite's expected results are compared (not its explanations). The
//! test fails when fewer cases pass than [`PASS_FLOOR`]; the failing case
//! names are printed (`--nocapture`) and listed in docs/authentication.md.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tern_node::auth::inbound::{authenticator, spf_envelope};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/spf_zone_server.py");

/// Cases of the suite's 203 that must pass: Tern's own evaluator
/// (auth::spf) passes all of them.
const PASS_FLOOR: usize = 203;

/// Where run-all.sh puts the suite, unless `TERN_RFC7208_TESTS` names it.
fn suite_file() -> Option<PathBuf> {
    let path = std::env::var_os("TERN_RFC7208_TESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/spf-suite/rfc7208-tests.yml"));
    let python_ok = Command::new("python3")
        .args(["-c", "import dnslib, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if path.exists() && python_ok {
        return Some(path);
    }
    let what = format!(
        "the RFC 7208 test suite at {} and python3 with dnslib and pyyaml (see cluster-tests/run-all.sh)",
        path.display()
    );
    if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("{what} are required (TERN_REQUIRE_PEERS=1)");
    }
    eprintln!("skipping: {what} not found");
    None
}

/// spf_zone_server.py serving one scenario; stopped when dropped.
struct ZoneServer {
    addr: SocketAddr,
    child: Child,
    /// Closing it tells the server to exit.
    stdin: Option<ChildStdin>,
}

impl ZoneServer {
    fn start(suite: &Path, scenario: usize) -> ZoneServer {
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg("serve")
            .arg(suite)
            .arg(scenario.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("zone server for scenario {scenario} did not start: {line:?}"));
        ZoneServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            stdin,
        }
    }
}

impl Drop for ZoneServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rfc7208_test_suite() {
    let Some(suite) = suite_file() else {
        return;
    };
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg("list")
        .arg(&suite)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scenarios: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut passed, mut total, mut failures) = (0, 0, Vec::new());
    for (index, scenario) in scenarios.as_array().unwrap().iter().enumerate() {
        let server = ZoneServer::start(&suite, index);
        // A fresh resolver (and cache) per zone; TIMEOUT entries cost 2 x 500 ms.
        let auth = {
            let _rt = rt.enter();
            authenticator(&[server.addr], Duration::from_millis(500)).unwrap()
        };
        for case in scenario["tests"].as_array().unwrap() {
            total += 1;
            let name = case["name"].as_str().unwrap();
            let field = |k: &str| case[k].as_str().unwrap().to_owned();
            let expected: Vec<&str> = case["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            let ip: IpAddr = field("host").parse().unwrap();
            let output = rt.block_on(spf_envelope(
                &auth,
                ip,
                &field("helo"),
                &field("mailfrom"),
                "receiver.test",
            ));
            let got = output.result().to_string().to_ascii_lowercase();
            if expected.contains(&got.as_str()) {
                passed += 1;
            } else {
                failures.push(format!("{name}: expected {}, got {got}", expected.join(" or ")));
            }
        }
    }
    println!("RFC 7208 test suite: {passed}/{total} passed");
    for f in &failures {
        println!("  failed: {f}");
    }
    assert!(
        passed >= PASS_FLOOR,
        "only {passed}/{total} RFC 7208 cases passed (floor {PASS_FLOOR}); failing:\n{}",
        failures.join("\n")
    );
}
