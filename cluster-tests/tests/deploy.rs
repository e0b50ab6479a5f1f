//! The deployment files in deploy/, checked with the tools that use them:
//! the container image and the compose cluster with Docker, the Kubernetes
//! manifests against the Kubernetes API schema (kubernetes-validate), the
//! alert rules and the dashboard's queries with promtool, and every metric
//! they name against docs/metrics.md.
//!
//! Needs docker and docker-compose (or `docker compose`), debootstrap (only
//! to build the local base image the first time), swaks, promtool (Debian
//! `prometheus`) and kubernetes-validate (PyPI); cluster-tests/run-all.sh
//! installs them. Without one a test skips, and fails under
//! `TERN_REQUIRE_PEERS=1`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_testkit::ternd::run_bounded;

/// The local base image the tests build with debootstrap (no registry here).
const BASE_IMAGE: &str = "tern-test-base:bookworm";
/// The image built from deploy/Dockerfile with the workspace's binaries.
const TEST_IMAGE: &str = "tern-test:local";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// True when `tool` runs; else false (skip), or a panic under TERN_REQUIRE_PEERS=1.
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("TERN_REQUIRE_PEERS").as_deref() == Ok("1") {
            panic!("{tool} is required (TERN_REQUIRE_PEERS=1): cluster-tests/run-all.sh installs it");
        }
        eprintln!("skipped: {tool} not available");
    }
    ok
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` (bounded by `deadline`) and fails with its output unless it succeeds.
fn run_ok(cmd: &mut Command, deadline: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, deadline).with_context(|| what.clone())?;
    ensure!(out.status.success(), "{what} failed ({}):\n{}", out.status, text(&out));
    Ok(out)
}

// ---------------------------------------------------------------------------
// Prometheus rules and the Grafana dashboard
// ---------------------------------------------------------------------------

fn rules_file() -> PathBuf {
    repo().join("deploy/prometheus/tern-rules.yml")
}

fn dashboard() -> Result<serde_json::Value> {
    let path = repo().join("deploy/grafana/tern-dashboard.json");
    let raw = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&raw).with_context(|| format!("{} is not JSON", path.display()))
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                exprs.push(e.to_owned());
            }
        }
    }
    exprs
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() -> Result<()> {
    if !have("promtool", &["--version"]) {
        return Ok(());
    }
    let out = run_ok(
        Command::new("promtool").arg("check").arg("rules").arg(rules_file()),
        Duration::from_secs(60),
    )?;
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
    let out = run_ok(
        Command::new("promtool")
            .args(["test", "rules", "tern-rules.test.yml"])
            .current_dir(repo().join("deploy/prometheus")),
        Duration::from_secs(60),
    )?;
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));

    // The check can fail: a broken expression is refused.
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "groups:\n  - name: bad\n    rules:\n      - alert: Broken\n        expr: sum(tern_disk_full\n",
    )?;
    let out = run_bounded(
        Command::new("promtool").arg("check").arg("rules").arg(&bad),
        Duration::from_secs(60),
    )?;
    assert!(
        !out.status.success(),
        "promtool accepted a broken rule:\n{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn dashboard_queries_are_valid_promql() -> Result<()> {
    if !have("promtool", &["--version"]) {
        return Ok(());
    }
    let exprs = dashboard_exprs(&dashboard()?);
    ensure!(exprs.len() >= 10, "only {} queries in the dashboard", exprs.len());
    // promtool parses queries in rule files: one recording rule per query,
    // with the dashboard's variables given values (YAML reads JSON).
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": e.replace("$__rate_interval", "5m").replace("$job", "tern"),
            })
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}))?,
    )?;
    run_ok(
        Command::new("promtool").arg("check").arg("rules").arg(&file),
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// Metric names in docs/metrics.md's tables, with their type.
fn documented_metrics() -> Result<Vec<(String, String)>> {
    let docs = std::fs::read_to_string(repo().join("docs/metrics.md"))?;
    let mut names = Vec::new();
    for line in docs.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `name` | type | labels | meaning |" splits into ["", name, type, ...].
        if cells.len() > 3 {
            if let Some(name) = cells[1].strip_prefix("`tern_").and_then(|n| n.strip_suffix('`')) {
                names.push((format!("tern_{name}"), cells[2].to_owned()));
            }
        }
    }
    Ok(names)
}

/// Every `tern_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tern_") {
        // Not the tail of a longer identifier.
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if boundary {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The names in `used` that docs/metrics.md does not document (a
/// histogram's `_bucket`, `_sum` and `_count` series count as documented).
fn undocumented(used: &BTreeSet<String>, documented: &[(String, String)]) -> Vec<String> {
    used.iter()
        .filter(|name| {
            let known = documented.iter().any(|(d, kind)| {
                *name == d
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(d.as_str())))
            });
            !known
        })
        .cloned()
        .collect()
}

#[test]
fn rules_and_dashboard_use_only_documented_metrics() -> Result<()> {
    let documented = documented_metrics()?;
    ensure!(
        documented.len() > 40,
        "found only {} metrics in docs/metrics.md",
        documented.len()
    );

    let rules = metric_names(&std::fs::read_to_string(rules_file())?);
    let dash = metric_names(&dashboard_exprs(&dashboard()?).join("\n"));
    for (what, used) in [("deploy/prometheus/tern-rules.yml", &rules), ("the dashboard", &dash)] {
        let missing = undocumented(used, &documented);
        assert!(
            missing.is_empty(),
            "{what} uses metrics docs/metrics.md does not list: {missing:?}"
        );
    }
    // What the dashboard and the alerts are for.
    for name in [
        "tern_queue_messages",
        "tern_queue_oldest_message_age_seconds",
        "tern_queue_recipients_total",
        "tern_raft_is_leader",
        "tern_storage_fsync_duration_seconds_bucket",
        "tern_disk_free_bytes",
    ] {
        assert!(dash.contains(name), "the dashboard does not show {name}");
        assert!(rules.contains(name), "no alert rule uses {name}");
    }
    // The guard can fail: an invented name is caught, a histogram's series are not.
    let probe: BTreeSet<String> = ["tern_made_up_total", "tern_storage_fsync_duration_seconds_count"]
        .map(String::from)
        .into();
    assert_eq!(undocumented(&probe, &documented), vec!["tern_made_up_total".to_owned()]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

#[test]
fn kubernetes_manifests_match_the_api_schema() -> Result<()> {
    if !have("kubernetes-validate", &["--version"]) {
        return Ok(());
    }
    let dir = repo().join("deploy/kubernetes");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml"))?;
    let mut manifests = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(kustomization.contains(&name), "kustomization.yaml does not list {name}");
            manifests.push(path);
        }
    }
    manifests.sort();
    ensure!(manifests.len() >= 4, "manifests: {manifests:?}");
    let out = run_ok(
        Command::new("kubernetes-validate").arg("--strict").args(&manifests),
        Duration::from_secs(120),
    )?;
    let report = text(&out);
    for kind in [
        "statefulset/tern",
        "service/tern-peers",
        "service/tern-smtp",
        "poddisruptionbudget/tern",
        "configmap/tern-config",
    ] {
        assert!(
            report.contains(&format!("{kind} against")),
            "{kind} not validated:\n{report}"
        );
    }

    // It fails on an invalid manifest: a wrong type, and (strict) an unknown field.
    let statefulset = std::fs::read_to_string(dir.join("statefulset.yaml"))?;
    let tmp = tempfile::tempdir()?;
    for (name, from, to) in [
        ("wrong-type.yaml", "replicas: 3", "replicas: three"),
        (
            "unknown-field.yaml",
            "serviceName: tern-peers",
            "serviceNme: tern-peers",
        ),
    ] {
        ensure!(statefulset.contains(from), "statefulset.yaml has no `{from}`");
        let bad = tmp.path().join(name);
        std::fs::write(&bad, statefulset.replacen(from, to, 1))?;
        let out = run_bounded(
            Command::new("kubernetes-validate").arg("--strict").arg(&bad),
            Duration::from_secs(120),
        )?;
        assert!(!out.status.success(), "{name} was accepted:\n{}", text(&out));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The image and the compose cluster
// ---------------------------------------------------------------------------

/// Builds [`BASE_IMAGE`] with debootstrap unless it exists (it is kept:
/// later runs reuse it).
fn ensure_base_image() -> Result<()> {
    let exists = run_bounded(
        Command::new("docker").args(["image", "inspect", BASE_IMAGE]),
        Duration::from_secs(60),
    )?;
    if exists.status.success() {
        return Ok(());
    }
    let t = Instant::now();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg("http://deb.debian.org/debian"),
        Duration::from_secs(600),
    )?;
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("tar -C \"$1\" -c . | docker import - {BASE_IMAGE}"))
            .arg("sh")
            .arg(&root),
        Duration::from_secs(300),
    )?;
    eprintln!("built {BASE_IMAGE} in {:.0?}", t.elapsed());
    Ok(())
}

/// Builds [`TEST_IMAGE`] from deploy/Dockerfile, with the workspace's
/// `ternd` and `ternctl` (stripped) as PREBUILT binaries, in a small context.
fn build_image() -> Result<()> {
    let t = Instant::now();
    let ctx = tempfile::tempdir()?;
    let root = repo();
    for file in [
        "deploy/Dockerfile",
        "deploy/docker/tern-entrypoint",
        "deploy/docker/tern.toml",
    ] {
        let to = ctx.path().join(file);
        std::fs::create_dir_all(to.parent().context("parent")?)?;
        // fs::copy keeps the mode (the entry point is executable).
        std::fs::copy(root.join(file), &to).with_context(|| file.to_owned())?;
    }
    std::fs::create_dir_all(ctx.path().join("prebuilt"))?;
    for bin in ["ternd", "ternctl"] {
        let from = tern_testkit::try_bin(bin)?;
        let to = ctx.path().join("prebuilt").join(bin);
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&to)
            .arg(&from)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !stripped {
            std::fs::copy(&from, &to)?;
        }
    }
    run_ok(
        Command::new("docker")
            .args(["build", "-q", "-t", TEST_IMAGE, "--label", "tern-test=1"])
            .args(["--build-arg", &format!("BUILDER={BASE_IMAGE}")])
            .args(["--build-arg", &format!("BASE={BASE_IMAGE}")])
            .args(["--build-arg", "PREBUILT=prebuilt"])
            .arg("-f")
            .arg(ctx.path().join("deploy/Dockerfile"))
            .arg(ctx.path()),
        Duration::from_secs(600),
    )?;
    // The image this build replaced (now untagged) and the build stage's
    // images (the legacy builder keeps them) are of no further use.
    for label in ["label=tern-test=1", "label=tern.stage=build"] {
        let _ = run_bounded(
            Command::new("docker").args(["image", "prune", "-f", "--filter", label]),
            Duration::from_secs(60),
        );
    }
    eprintln!("built {TEST_IMAGE} in {:.1?}", t.elapsed());
    Ok(())
}

/// A compose project of deploy/compose.yaml; `down -v` when dropped,
/// with the containers' logs first if the test did not finish.
struct Compose {
    program: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    finished: bool,
}

impl Compose {
    fn new(env: Vec<(String, String)>) -> Result<Compose> {
        // Debian's docker-compose (v1), else the `docker compose` plugin.
        let v1 = Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        let program = if v1 {
            vec!["docker-compose".to_owned()]
        } else {
            vec!["docker".to_owned(), "compose".to_owned()]
        };
        Ok(Compose {
            program,
            project: format!("tern-test-{}", std::process::id()),
            env,
            finished: false,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(repo().join("deploy/compose.yaml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn run(&self, args: &[&str], deadline: Duration) -> Result<Output> {
        run_ok(&mut self.command(args), deadline)
    }

    /// `ternctl -o json ARGS` in a `ctl` container, talking to node `via`.
    fn ternctl_json(&self, via: u64, args: &[&str]) -> Result<serde_json::Value> {
        let endpoint = format!("TERN_ENDPOINT=tern{via}:7070");
        let mut all = vec!["run", "--rm", "-T", "-e", &endpoint, "ctl", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.run(&all, Duration::from_secs(60))?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("ternctl {args:?}: {}", text(&out)))
    }

    fn ternctl(&self, via: u64, args: &[&str]) -> Result<Output> {
        let endpoint = format!("TERN_ENDPOINT=tern{via}:7070");
        let mut all = vec!["run", "--rm", "-T", "-e", &endpoint, "ctl"];
        all.extend_from_slice(args);
        self.run(&all, Duration::from_secs(60))
    }

    fn container(&self, service: &str) -> Result<String> {
        let out = self.run(&["ps", "-q", service], Duration::from_secs(30))?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(!id.is_empty(), "no container for {service}");
        Ok(id)
    }

    fn inspect(&self, service: &str, format: &str) -> Result<String> {
        let id = self.container(service)?;
        let out = run_ok(
            Command::new("docker").args(["inspect", "-f", format, &id]),
            Duration::from_secs(30),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The host address Docker published `port` of `service` on.
    fn port(&self, service: &str, port: u16) -> Result<std::net::SocketAddr> {
        let out = self.run(&["port", service, &port.to_string()], Duration::from_secs(30))?;
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        addr.parse()
            .with_context(|| format!("`port {service} {port}` said {addr:?}"))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if !self.finished {
            if let Ok(out) = run_bounded(
                &mut self.command(&["logs", "--no-color", "--tail", "60"]),
                Duration::from_secs(60),
            ) {
                eprintln!("--- compose logs ---\n{}", text(&out));
            }
        }
        match run_bounded(
            &mut self.command(&["down", "-v", "--remove-orphans", "-t", "5"]),
            Duration::from_secs(180),
        ) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("compose down failed: {}", text(&out)),
            Err(e) => eprintln!("compose down: {e}"),
        }
    }
}

/// Polls `probe` until it returns Some (its value) or `deadline` passes;
/// the last error or value is in the timeout message.
fn poll<T>(deadline: Duration, what: &str, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn image_entrypoint_derives_node_ids_from_statefulset_ordinals_and_runs_unprivileged() -> Result<()> {
    // Shares the image build with the compose test: both run in one process
    // only when asked by name; each builds (cached layers make the second quick).
    if !have("docker", &["info"]) {
        return Ok(());
    }
    let _lock = DOCKER.lock().unwrap_or_else(|e| e.into_inner());
    prepare_image()?;
    for (host, offset, want) in [
        ("tern-0", "", "1 true"),
        ("tern-2", "", "3 false"),
        ("tern-b-0", "100", "101 false"),
        ("mx", "", "false"),
    ] {
        let out = run_ok(
            Command::new("docker").args([
                "run",
                "--rm",
                "--hostname",
                host,
                "-e",
                &format!("TERN_NODE_ID_OFFSET={offset}"),
                TEST_IMAGE,
                "sh",
                "-c",
                "echo \"${TERN_NODE_ID:-} $TERN_BOOTSTRAP\"",
            ]),
            Duration::from_secs(60),
        )?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "host {host}");
    }
    let out = run_ok(
        Command::new("docker").args(["run", "--rm", TEST_IMAGE, "id", "-u"]),
        Duration::from_secs(60),
    )?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10001");
    // A template naming an unset variable stops the container with a clear error.
    let out = run_bounded(
        Command::new("docker").args([
            "run",
            "--rm",
            "-e",
            "TERN_NODE_ID=2",
            "-e",
            "TERN_CONFIG_TEMPLATE=/tmp/t.toml",
            "-e",
            "TERN_CONFIG=/tmp/out.toml",
            "--entrypoint",
            "sh",
            TEST_IMAGE,
            "-c",
            "printf 'id = ${TERN_NODE_ID}\\nx = \"${NOT_SET}\"\\n' > /tmp/t.toml && tern-entrypoint cat /tmp/out.toml",
        ]),
        Duration::from_secs(60),
    )?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("${NOT_SET} is not set"), "{}", text(&out));
    Ok(())
}

/// One image build per test process; Docker tests run one at a time.
static DOCKER: std::sync::Mutex<()> = std::sync::Mutex::new(());
static IMAGE_BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();

fn prepare_image() -> Result<()> {
    if IMAGE_BUILT.get().is_none() {
        ensure_base_image()?;
        build_image()?;
        let _ = IMAGE_BUILT.set(());
    }
    Ok(())
}

#[test]
fn compose_cluster_delivers_a_message_once_after_its_shard_leader_stops() -> Result<()> {
    if !have("docker", &["info"]) || !have("swaks", &["--version"]) {
        return Ok(());
    }
    let _lock = DOCKER.lock().unwrap_or_else(|e| e.into_inner());
    prepare_image()?;
    let started = Instant::now();
    let mut env = vec![("TERN_IMAGE".to_owned(), TEST_IMAGE.to_owned())];
    for n in 1..=3 {
        // "127.0.0.1:" makes "127.0.0.1::25": Docker picks free host ports.
        env.push((format!("TERN{n}_SMTP"), "127.0.0.1:".to_owned()));
        env.push((format!("TERN{n}_HTTP"), "127.0.0.1:".to_owned()));
    }
    let mut compose = Compose::new(env)?;
    compose.run(&["up", "-d", "--no-build"], Duration::from_secs(300))?;

    // join adds nodes 2 and 3 and exits 0.
    let join = poll(Duration::from_secs(180), "the join service to finish", || {
        let state = compose.inspect("join", "{{.State.Status}} {{.State.ExitCode}}")?;
        Ok(state.starts_with("exited").then_some(state))
    })?;
    assert_eq!(join, "exited 0", "join failed");

    // Every shard on all three nodes with a leader.
    let converged = Instant::now();
    poll(
        Duration::from_secs(180),
        "every shard to have 3 voters and a leader",
        || {
            let shards = compose.ternctl_json(1, &["shard", "list"])?;
            let shards = shards.as_array().context("shard list is not an array")?;
            let ok = !shards.is_empty()
                && shards.iter().all(|s| {
                    s["voters"].as_array().is_some_and(|v| v.len() == 3)
                        && s["leader"].as_u64().is_some_and(|l| l > 0)
                        && s["joint"].as_bool() != Some(true)
                });
            Ok(ok.then_some(()))
        },
    )?;
    // Docker's health check (curl /readyz) passes on every node once each leads a shard.
    for service in ["tern1", "tern2", "tern3", "sink"] {
        poll(Duration::from_secs(120), &format!("{service} to be healthy"), || {
            let health = compose.inspect(service, "{{.State.Health.Status}}")?;
            Ok((health == "healthy").then_some(()))
        })?;
    }
    eprintln!("cluster formed and healthy {:.1?} after join", converged.elapsed());

    // Deliveries to example.net wait (suspended) so the message stays queued
    // on its shard's leader while that leader stops.
    compose.ternctl(1, &["domain", "suspend", "example.net", "--reason", "deploy test"])?;
    let marker = format!("deploy-test-{}-{}", std::process::id(), started.elapsed().as_nanos());
    let smtp = compose.port("tern1", 25)?;
    let out = run_ok(
        Command::new("swaks")
            .args(["--server", &smtp.to_string()])
            .args(["--from", "sender@example.org", "--to", "alice@example.net"])
            .args(["--header", &format!("Subject: {marker}")])
            .args(["--body", "sent to the compose cluster"]),
        Duration::from_secs(60),
    )?;
    let log = text(&out);
    let id = log
        .split("queued as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .context(format!("no queue id in swaks' output:\n{log}"))?
        .to_owned();

    let message = compose.ternctl_json(1, &["queue", "show", &id])?;
    let shard = message["shard"].as_u64().context(format!("no shard in {message}"))?;
    let shards = compose.ternctl_json(1, &["shard", "list"])?;
    let leader = shards
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["shard"].as_u64() == Some(shard))
        .and_then(|s| s["leader"].as_u64())
        .context(format!("no leader of shard {shard} in {shards}"))?;
    let survivor = if leader == 1 { 2 } else { 1 };

    // Stop the leader gracefully, as `docker compose stop` does.
    let stop = Instant::now();
    compose.run(
        &["stop", "-t", "45", &format!("tern{leader}")],
        Duration::from_secs(120),
    )?;
    eprintln!(
        "stopped tern{leader} (leader of shard {shard}) in {:.1?}",
        stop.elapsed()
    );
    let new_leader = poll(Duration::from_secs(60), "a new leader of the shard", || {
        let shards = compose.ternctl_json(survivor, &["shard", "list"])?;
        Ok(shards
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["shard"].as_u64() == Some(shard))
            .and_then(|s| s["leader"].as_u64())
            .filter(|l| *l != leader && *l > 0))
    })?;
    eprintln!(
        "shard {shard}: tern{new_leader} leads {:.1?} after the stop",
        stop.elapsed()
    );

    compose.ternctl(survivor, &["domain", "resume", "example.net"])?;
    compose.ternctl(survivor, &["queue", "retry", &id])?;

    let count = |compose: &Compose| -> Result<usize> {
        let out = compose.run(
            &[
                "exec",
                "-T",
                "sink",
                "sh",
                "-c",
                &format!("grep -rlF '{marker}' /var/lib/tern/mail/example.net/alice/new 2>/dev/null | wc -l"),
            ],
            Duration::from_secs(30),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let delivered = Instant::now();
    poll(Duration::from_secs(90), "the message in the sink's Maildir", || {
        Ok((count(&compose)? > 0).then_some(()))
    })?;
    eprintln!("delivered {:.1?} after the retry", delivered.elapsed());
    // Nothing left to deliver anywhere, and one copy delivered.
    poll(Duration::from_secs(60), "an empty queue", || {
        let summary = compose.ternctl_json(survivor, &["queue", "summary"])?;
        Ok((summary["messages"].as_u64() == Some(0)).then_some(()))
    })?;
    assert_eq!(count(&compose)?, 1, "the message was not delivered exactly once");

    // The stopped node comes back from its volume and leads shards again.
    let restart = Instant::now();
    compose.run(&["start", &format!("tern{leader}")], Duration::from_secs(120))?;
    poll(Duration::from_secs(120), &format!("tern{leader} healthy again"), || {
        let health = compose.inspect(&format!("tern{leader}"), "{{.State.Health.Status}}")?;
        Ok((health == "healthy").then_some(()))
    })?;
    eprintln!("tern{leader} healthy {:.1?} after its restart", restart.elapsed());
    eprintln!("compose test took {:.1?}", started.elapsed());
    compose.finished = true;
    Ok(())
}

/// The `tern.toml` of deploy/kubernetes/configmap.yaml (the block under `tern.toml: |`).
fn configmap_template() -> Result<String> {
    let raw = std::fs::read_to_string(repo().join("deploy/kubernetes/configmap.yaml"))?;
    let mut lines = raw.lines().skip_while(|l| l.trim() != "tern.toml: |").skip(1);
    let mut toml = String::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        toml.push_str(line.strip_prefix("    ").unwrap_or(line));
        toml.push('\n');
    }
    ensure!(toml.contains("[node]"), "no tern.toml block in configmap.yaml");
    Ok(toml)
}

/// A container removed (with its volumes) when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("docker").args(["rm", "-f", "-v", &self.0]),
            Duration::from_secs(60),
        );
    }
}

#[test]
fn kubernetes_config_template_runs_as_pod_tern_0() -> Result<()> {
    if !have("docker", &["info"]) {
        return Ok(());
    }
    let _lock = DOCKER.lock().unwrap_or_else(|e| e.into_inner());
    prepare_image()?;
    // The ConfigMap and the Secret as the pod mounts them, certificates from
    // `ternctl cert` named as deploy/kubernetes/README.md makes them.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("tern.toml"), configmap_template()?)?;
    let ternctl = tern_testkit::try_bin("ternctl")?;
    for args in [
        vec!["init-ca"],
        vec![
            "node",
            "--id",
            "1",
            "--host",
            "tern-0.tern-peers.tern.svc.cluster.local",
        ],
    ] {
        run_ok(
            Command::new(&ternctl)
                .arg("cert")
                .arg(args[0])
                .arg("--dir")
                .arg(&tls)
                .args(&args[1..]),
            Duration::from_secs(30),
        )?;
    }
    std::fs::remove_file(tls.join("ca.key"))?;
    // The pod's fsGroup makes the Secret readable by uid 10001.
    for path in [dir.path().to_owned(), config.clone(), tls.clone()]
        .into_iter()
        .chain(
            std::fs::read_dir(&tls)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()?,
        )
        .chain([config.join("tern.toml")])
    {
        std::os::unix::fs::chown(&path, Some(10001), Some(10001))?;
    }

    let name = format!("tern-test-k8s-{}", std::process::id());
    let container = Container(name.clone());
    // As the StatefulSet runs it: read-only root, no capabilities.
    run_ok(
        Command::new("docker")
            .args(["run", "-d", "--name", &name, "--hostname", "tern-0"])
            .args([
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
            ])
            .args(["-e", "POD_NAME=tern-0"])
            .args(["-e", "TERN_PEER_DOMAIN=tern-peers.tern.svc.cluster.local"])
            .args(["-e", "TERN_CONFIG_TEMPLATE=/etc/tern/config/tern.toml"])
            .arg("-v")
            .arg(format!("{}:/etc/tern/config:ro", config.display()))
            .arg("-v")
            .arg(format!("{}:/etc/tern/tls:ro", tls.display()))
            .args([TEST_IMAGE, "ternd", "--config", "/var/lib/tern/tern.toml"]),
        Duration::from_secs(60),
    )?;
    // Ready: it bootstrapped as node 1 and leads the queue shards.
    let ready = poll(Duration::from_secs(60), "/readyz of pod tern-0", || {
        let out = run_bounded(
            Command::new("docker").args(["exec", &name, "curl", "-fsS", "http://127.0.0.1:8080/readyz"]),
            Duration::from_secs(20),
        )?;
        if !out.status.success() {
            let state = run_bounded(
                Command::new("docker").args(["inspect", "-f", "{{.State.Running}}", &name]),
                Duration::from_secs(20),
            )?;
            if String::from_utf8_lossy(&state.stdout).trim() != "true" {
                let logs = run_bounded(Command::new("docker").args(["logs", &name]), Duration::from_secs(20))?;
                bail!("tern-0 exited:\n{}", text(&logs));
            }
        }
        Ok(out.status.success().then_some(()))
    });
    if let Err(e) = ready {
        let logs = run_bounded(Command::new("docker").args(["logs", &name]), Duration::from_secs(20))?;
        bail!("{e:#}\n{}", text(&logs));
    }
    let out = run_ok(
        Command::new("docker").args(["exec", &name, "cat", "/var/lib/tern/tern.toml"]),
        Duration::from_secs(20),
    )?;
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(rendered.contains("id = 1\n"), "{rendered}");
    assert!(rendered.contains("bootstrap = true\n"), "{rendered}");
    assert!(
        rendered.contains("advertise_grpc = \"tern-0.tern-peers.tern.svc.cluster.local:7070\""),
        "{rendered}"
    );
    drop(container);
    Ok(())
}
