//! Wiring: config -> storage -> Raft groups -> gRPC/HTTP/SMTP listeners,
//! bootstrap of a new cluster, readiness, and orderly shutdown.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use openraft::BasicNode;
use tern_proto::admin::admin_service_server::AdminServiceServer;
use tern_proto::peer::peer_service_server::PeerServiceServer;
use tern_proto::raft::raft_service_server::RaftServiceServer;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::queue::shard::{QueueShard, ShardSettings};
use crate::queue::{IdGen, QueueFront};
use crate::raft::groups::Groups;
use crate::raft::host::{GroupEvents, GroupHooks, GroupHost, HostSettings};
use crate::raft::network::MAX_GRPC_MESSAGE;
use crate::raft::service::RaftServer;
use crate::raft::Durability;
use crate::raft::{Request, CONTROL_GROUP};

const LOCAL_INITIALIZED: &[u8] = b"initialized";
/// Largest HTTP/2 frame peers may send to this node's gRPC server.
const GRPC_MAX_FRAME: u32 = 1 << 20;
/// HTTP/2 flow-control window of one gRPC connection (all groups' traffic
/// from one peer).
const GRPC_CONNECTION_WINDOW: u32 = 8 << 20;

/// Prints a line for harnesses on stdout and flushes it at once.
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn bind(addr: SocketAddr, what: &str, v4_ports: &[u16]) -> anyhow::Result<TcpListener> {
    listener(addr, v4_ports.contains(&addr.port())).with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Ports (not 0) of the IPv4 listen addresses, for [`listener`].
fn ipv4_ports(config: &Config) -> Vec<u16> {
    let all = config
        .listen_smtp
        .iter()
        .chain(&config.listen_submission)
        .chain(&config.listen_submissions)
        .chain([&config.listen_grpc, &config.listen_http]);
    all.filter(|a| a.is_ipv4() && a.port() != 0)
        .map(SocketAddr::port)
        .collect()
}

/// A listening socket as `TcpListener::bind` makes one (SO_REUSEADDR,
/// backlog 1024). An IPv6 one whose port an IPv4 listener also takes is
/// IPv6-only: on Linux's default (`net.ipv6.bindv6only = 0`) `[::]:25`
/// takes IPv4 too, and `smtp = ["0.0.0.0:25", "[::]:25"]` failed with
/// "address in use". Alone, `[::]:25` keeps the system's default (IPv4 as
/// well, on Linux), as before.
fn listener(addr: SocketAddr, only_v6: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && only_v6 {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// How often the SMTP listeners' certificate files are checked for changes.
const CERT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The SMTP listeners' TLS settings (`[tls] cert/key`): the certificate is
/// served through a [`crate::tls_reload::CertWatcher`], so new handshakes
/// pick up replaced files.
fn tls_config(
    config: &Config,
    reload_errors: prometheus_client::metrics::counter::Counter,
) -> anyhow::Result<Option<(Arc<rustls::ServerConfig>, crate::tls_reload::CertWatcher)>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let watcher =
        crate::tls_reload::CertWatcher::with_error_counter(cert, key, reload_errors).context("tls.cert / tls.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(watcher.resolver());
    Ok(Some((Arc::new(server), watcher)))
}

/// First start of a bootstrapping node: every group gets this node as its
/// only voter, and the control group records the node and the placement.
async fn bootstrap(config: &Config, groups: &Groups, local: &sled::Tree) -> anyhow::Result<()> {
    let me = BTreeMap::from([(config.node_id, BasicNode::new(&config.advertise_grpc))]);
    for g in groups.all() {
        if let Err(e) = g.raft.initialize(me.clone()).await {
            // Already initialised by an earlier, interrupted bootstrap.
            tracing::debug!(group = g.id, error = %e, "initialize");
        }
    }
    let control = groups.get(CONTROL_GROUP).context("control group missing")?;
    wait_until(Duration::from_secs(30), || control.leader() == Some(config.node_id))
        .await
        .context("control group elected no leader")?;
    let mut requests = vec![Request::SetNode {
        id: config.node_id,
        addr: config.advertise_grpc.clone(),
    }];
    for g in groups.shards() {
        requests.push(Request::SetShardReplicas {
            shard: g.id,
            replicas: vec![config.node_id],
        });
    }
    for request in requests {
        control
            .raft
            .client_write(request)
            .await
            .context("writing cluster records to the control group")?;
    }
    local.insert(LOCAL_INITIALIZED, &[1u8])?;
    local.flush_async().await?;
    tracing::info!(
        node = config.node_id,
        shards = config.shards,
        "bootstrapped a new cluster"
    );
    Ok(())
}

/// How long a bootstrapping node waits for each configured peer's answer.
const BOOTSTRAP_PEER_CHECK: Duration = Duration::from_secs(2);

/// Refuses to bootstrap a new cluster when a peer from `[cluster]
/// peer_addresses` already belongs to one: this node's data directory was
/// lost (or it was pointed at a new one) and a second cluster under the
/// same identity would split the mail between two clusters that never
/// agree. Peers that do not answer are not evidence either way.
async fn refuse_second_cluster(config: &Config, cluster: &Cluster) -> anyhow::Result<()> {
    let asks = config
        .peer_addresses
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .map(|(id, addr)| {
            let client = cluster.peers.peer(*id, addr);
            async move {
                let mut client = client.ok()?;
                let ask = client.local_status(tern_proto::peer::LocalStatusRequest {});
                match tokio::time::timeout(BOOTSTRAP_PEER_CHECK, ask).await {
                    Ok(Ok(r)) => Some((addr.clone(), r.into_inner())),
                    _ => None,
                }
            }
        });
    for (addr, status) in futures::future::join_all(asks).await.into_iter().flatten() {
        if status.members.is_empty() {
            continue;
        }
        let members: Vec<u64> = status.members.iter().map(|m| m.id).collect();
        tracing::error!(
            node = config.node_id,
            peer = status.node_id,
            %addr,
            ?members,
            "refusing to bootstrap: a peer already belongs to a cluster"
        );
        anyhow::bail!(
            "refusing to bootstrap a new cluster: [cluster] bootstrap = true and the data directory {} is empty, \
             but peer node {} at {addr} already belongs to a cluster with members {members:?}. If this node lost \
             its data, do not bootstrap: set bootstrap = false, give it a new [node] id and add it with \
             `ternctl member add` (remove the old id with `ternctl member remove`); see docs/operations.md",
            config.data_dir.display(),
            status.node_id
        );
    }
    Ok(())
}

async fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    while !cond() {
        anyhow::ensure!(Instant::now() < end, "timed out after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs a node until SIGTERM/SIGINT, without webhooks: event lines reach
/// them only through a tap installed in the tracing subscriber.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_with_events(
        config,
        crate::webhook::EventTap::default(),
        crate::console::RecentEvents::default(),
    )
    .await
}

/// Runs a node until SIGTERM/SIGINT; `events` is the tap whose layer the
/// caller installed in its tracing subscriber, for `[[webhook]]`; `recent`
/// is the console's ring of audit events (its layer installed likewise).
pub async fn run_with_events(
    config: Config,
    events: crate::webhook::EventTap,
    recent: crate::console::RecentEvents,
) -> anyhow::Result<()> {
    run_from(config, events, recent, None).await
}

/// [`run_with_events`] for a config read from `path`, which SIGHUP and
/// `ternctl config reload` read again (`crate::reload`).
pub async fn run_from(
    config: Config,
    events: crate::webhook::EventTap,
    recent: crate::console::RecentEvents,
    path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let users = config
        .smtp_auth
        .users_file
        .as_deref()
        .map(|path| crate::submission::UserStore::load(path, config.smtp_auth.senders.clone()))
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("auth.users_file")?;
    // Before anything is bound: a bad DKIM key file stops the start.
    let metrics = Arc::new(Metrics::new());
    let pipeline = Arc::new(crate::auth::Pipeline::new(&config, metrics.filters.clone())?);
    let dmarc_reports = Arc::new(crate::reports::dmarc::DmarcRecorder::default());
    if config.dmarc_reports.enabled {
        pipeline.record_dmarc(Arc::clone(&dmarc_reports));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    // What the outbox's dispatch tasks saw, for `ternctl webhook status`.
    let outbox_status = crate::outbox::dispatch::Status::default();
    let webhook_names: crate::outbox::dispatch::Names = Arc::default();
    let (tls, cert_watcher) = tls_config(&config, metrics.tls_reload_errors.clone())?.unzip();
    // Before anything can emit events (recovered shards deliver at once).
    let webhooks = Arc::new(crate::webhook::start(&config.webhooks, &events, &metrics.webhook).context("webhooks")?);
    let durability = Durability::open_with(
        &config.data_dir,
        metrics.storage.clone(),
        config.log_segment_bytes,
        config.state_cache_bytes,
        crate::storage::OnSyncError::Exit,
    )?;
    // Known before any group starts: a node restarted on a full disk must
    // not campaign or take mail.
    let space = Arc::clone(durability.space());
    space.set_min_free(config.min_free_bytes);
    space.check();
    let local = durability.db().open_tree("local")?;
    let initialized = local.get(LOCAL_INITIALIZED)?.is_some();

    let ids = Arc::new(IdGen::new(config.node_id));
    // The event outbox is written while webhooks exist; a reload flips it.
    let outbox_switch = crate::outbox::Switch::new(!config.webhooks.is_empty());
    let delivery = Delivery::new(Arc::clone(&config), metrics.delivery.clone())?;
    let settings = Arc::new(ShardSettings {
        node: config.node_id,
        hostname: config.hostname.clone(),
        tick: config.scheduler_tick,
        metrics: Arc::clone(&metrics),
        stats: Arc::new(crate::queue::stats::Stats::default()),
        clock: Arc::new(crate::queue::schedule::SystemClock),
        // The event outbox tells new mail from bounces by entry kind.
        batchers: Arc::new(crate::queue::batch::Batchers::new(
            metrics.restarts.clone(),
            outbox_switch.clone(),
        )),
        peers: std::sync::OnceLock::new(),
    });
    if config.cluster_tls.is_none() && !config.listen_grpc.ip().is_loopback() {
        // Only reachable with `[cluster] insecure = true` (config validation).
        tracing::warn!(
            listen_grpc = %config.listen_grpc,
            "cluster gRPC is plaintext on a non-loopback address ([cluster] insecure = true): \
             anyone who reaches this port can read and change the queue"
        );
    }
    let cluster_tls = config
        .cluster_tls
        .as_ref()
        .map(crate::raft::tls::ClusterTls::load)
        .transpose()
        .context("cluster TLS")?;
    let host = Arc::new(GroupHost::new(
        HostSettings {
            node_id: config.node_id,
            shards: config.shards,
            log_keep_bytes: config.log_keep_bytes,
            peer_addresses: config.peer_addresses.clone(),
        },
        Arc::clone(&durability),
        crate::raft::raft_config()?,
        local.clone(),
        Arc::new(ShardActors {
            handover_timeout: config.handover_timeout,
            arbiter: actix::System::current().arbiter().clone(),
            delivery: Arc::clone(&delivery),
            settings: Arc::clone(&settings),
            ids: Arc::clone(&ids),
            actors: Default::default(),
        }),
        Arc::new(Rules {
            outbox: outbox_switch.clone(),
        }),
        cluster_tls.clone(),
    ));
    let mut group_ids = host.recorded()?;
    // An empty data directory: a new node, or one that lost its data.
    let fresh = group_ids.is_empty();
    if group_ids.is_empty() {
        // A new node: the bootstrap node hosts every group; others start
        // with the control group and get shard replicas when placed.
        group_ids = if config.bootstrap {
            (0..=u64::from(config.shards)).collect()
        } else {
            vec![CONTROL_GROUP]
        };
    }
    for &id in &group_ids {
        host.ensure(id).await?;
    }
    // Every state machine with queued messages has counted its bodies.
    durability.wal().enable_reclaim();
    let checkpointer = host.spawn_checkpointer(std::time::Duration::from_secs(1));
    let groups = Arc::clone(&host.groups);
    if let Some(control) = groups.get(CONTROL_GROUP) {
        delivery.set_control(crate::cluster::control::ControlState::new(control.sm.tree()));
        let state = crate::cluster::control::ControlState::new(control.sm.tree());
        metrics.fbl.set_counter(Box::new(move || {
            crate::bounce::suppress::count_by_class(&state, chrono::Utc::now().timestamp())
        }));
    }
    let cluster = Arc::new(Cluster::new(
        config.node_id,
        config.replicas as usize,
        Arc::clone(&groups),
        cluster_tls.clone(),
        config.peer_addresses.clone(),
        config.dead_node_after,
    ));
    cluster.set_host(Arc::clone(&host));
    delivery.set_writer(cluster.control_writer());
    let _ = settings.peers.set(cluster.peers());

    // Listeners first, so that a port conflict fails fast and loudly.
    let v4_ports = ipv4_ports(&config);
    let mut smtp_listeners = Vec::new();
    for &addr in &config.listen_smtp {
        let l = bind(addr, "smtp", &v4_ports).await?;
        announce(&format!("listening smtp={}", l.local_addr()?));
        smtp_listeners.push(l);
    }
    let mut submission_listeners = Vec::new();
    for (kind, addrs, implicit_tls) in [
        ("submission", &config.listen_submission, false),
        ("submissions", &config.listen_submissions, true),
    ] {
        for &addr in addrs {
            let l = bind(addr, kind, &v4_ports).await?;
            announce(&format!("listening {kind}={}", l.local_addr()?));
            submission_listeners.push((l, implicit_tls));
        }
    }
    let grpc_listener = bind(config.listen_grpc, "grpc", &v4_ports).await?;
    announce(&format!("listening grpc={}", grpc_listener.local_addr()?));
    let http_listener = bind(config.listen_http, "http", &v4_ports).await?;
    announce(&format!("listening http={}", http_listener.local_addr()?));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let quiet = Arc::new(crate::raft::quiet::Quiet::new(
        config.node_id,
        config.quiesce_idle_groups,
        Arc::clone(&groups),
        Arc::clone(&host.peers),
        metrics.quiet.clone(),
    ));
    let _quiet_rounds = quiet.spawn(stop_rx.clone());
    let mut guard = tokio::spawn(
        crate::disk_guard::DiskGuard {
            node_id: config.node_id,
            space: Arc::clone(&space),
            groups: Arc::clone(&groups),
            cluster: Arc::clone(&cluster),
            metrics: Arc::clone(&metrics),
            db: durability.db().clone(),
        }
        .run(stop_rx.clone()),
    );
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::watch::channel(false);
    // Set once the listeners' settings exist; `config reload` answers
    // `unavailable` until then.
    let reloader: Arc<std::sync::OnceLock<Arc<crate::reload::Reloader>>> = Arc::default();

    // Made with the admin service, which it calls as its callers.
    let console;
    // Operators' credentials; a reload swaps the tokens.
    let authz = Arc::new(crate::admin::authz::Authz::new(
        config.admin_tokens.clone(),
        config.cluster_tls.is_some(),
        config.listen_grpc,
        metrics.admin.clone(),
    ));
    let grpc = {
        // Peer RPCs (Raft and PeerService) are admitted by one gate.
        let gate = Arc::new(crate::raft::gate::PeerGate::new(
            cluster_tls.is_some(),
            Arc::clone(&groups),
            Arc::new(crate::cluster::control::Directory),
            metrics.peer_refused.clone(),
        ));
        let raft_svc = RaftServiceServer::new(RaftServer {
            host: Arc::clone(&host),
            gate: Arc::clone(&gate),
            refused: metrics.peer_refused.clone(),
            quiet: Arc::clone(&quiet),
        })
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
        let admin = Arc::new(Admin {
            node_id: config.node_id,
            hostname: config.hostname.clone(),
            groups: Arc::clone(&groups),
            cluster: Arc::clone(&cluster),
            ids: Arc::clone(&ids),
            stats: Arc::clone(&settings.stats),
            space: Arc::clone(&space),
            authz: Arc::clone(&authz),
            delivery: Arc::clone(&delivery),
            webhooks: (Arc::clone(&webhook_names), outbox_status.clone()),
            reload: Arc::clone(&reloader),
        });
        console = Arc::new(crate::console::Console::new(
            Arc::clone(&admin),
            config.listen_http,
            recent,
        ));
        let peer_svc = PeerServiceServer::new(crate::peer::server::PeerServer {
            admin: Arc::clone(&admin),
            gate,
        })
        .max_decoding_message_size(MAX_GRPC_MESSAGE)
        .max_encoding_message_size(MAX_GRPC_MESSAGE);
        let admin_svc = AdminServiceServer::from_arc(admin)
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE);
        // Its own stop: peers' votes and replies must still reach this node
        // while it hands its shards over at shutdown.
        let mut stop = grpc_stop_rx;
        // AppendEntries carry whole bodies: with HTTP/2's 16 KiB frames a
        // 100 KiB message costs a write, a read and a wake-up per frame on
        // each follower. Peers send frames of up to 1 MiB instead, and the
        // connection's window lets several groups' requests be in flight.
        let router = tonic::transport::Server::builder()
            .max_frame_size(GRPC_MAX_FRAME)
            .initial_connection_window_size(GRPC_CONNECTION_WINDOW)
            .initial_stream_window_size(GRPC_MAX_FRAME)
            .add_service(raft_svc)
            .add_service(peer_svc)
            .add_service(admin_svc);
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &cluster_tls {
            // Our own acceptor: each connection gets the newest certificate.
            Some(tls) => {
                let incoming = crate::raft::tls::incoming(grpc_listener, tls.clone());
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
            None => {
                // tonic ignores tcp_nodelay with a custom incoming stream: set it here,
                // or Nagle + delayed ACKs add ~40 ms to Raft round trips.
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    |conn| {
                        conn.inspect(|s| {
                            let _ = s.set_nodelay(true);
                        })
                    },
                );
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
        }
    };
    // Reloads the cluster certificate when its files change, or on SIGHUP.
    let _tls_watch = cluster_tls.as_ref().map(|tls| tls.watch(stop_rx.clone()));
    // Set once the queue front exists; the API answers 503 until then.
    let api_handle: crate::api::ApiHandle = Arc::default();
    let http = {
        let mut stop = stop_rx.clone();
        let router = crate::http::router(
            config.node_id,
            Arc::clone(&groups),
            Arc::clone(&metrics),
            config.data_dir.clone(),
            Arc::clone(&space),
            config.api.enabled.then(|| Arc::clone(&api_handle)),
            console,
        );
        tokio::spawn(async move {
            // The API records each caller's address in its messages' envelope.
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(http_listener, service)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        })
    };

    if config.bootstrap && !initialized {
        if fresh {
            refuse_second_cluster(&config, &cluster).await?;
        }
        bootstrap(&config, &groups, &local).await?;
    } else {
        // A restarted single-voter group need not wait out an election timeout.
        for g in groups.all() {
            if g.voters() == std::collections::BTreeSet::from([config.node_id]) {
                let _ = g.raft.trigger().elect().await;
            }
        }
    }

    // Ready once mail can be written: some shard has a leader (here, or one to forward to).
    if !groups.shards().is_empty()
        && wait_until(Duration::from_secs(60), || {
            groups.shards().iter().any(|g| g.leader().is_some())
        })
        .await
        .is_err()
    {
        tracing::warn!("no queue shard has a leader yet; mail gets 451 until one has");
    }

    let smtp_config = Arc::new(crate::smtp::SmtpConfig {
        hostname: config.hostname.clone(),
        max_message_size: config.max_message_size,
        max_recipients: config.max_recipients,
        command_timeout: config.command_timeout,
        data_timeout: config.data_timeout,
        max_errors: config.max_errors,
        max_connections: config.max_connections,
        relay: crate::smtp::RelayPolicy {
            local_domains: config.local_domains.clone(),
            relay_domains: config.relay_domains.clone(),
            relay_networks: config.relay_networks.clone(),
        },
        tls,
        verify_recipients: config.verify_recipients,
        metrics: metrics.smtp.clone(),
        pipeline: Arc::clone(&pipeline),
        auth: None,
        future_release: None,
        implicit_tls: false,
        max_session: config.smtp_limits.max_session,
        min_data_rate: config.smtp_limits.min_data_rate,
        tls_handshake: config.smtp_limits.tls_handshake,
        max_junk_commands: config.smtp_limits.max_junk_commands,
        // One count and one budget for every SMTP and submission listener.
        per_ip: crate::smtp::limits::IpLimiter::new(config.smtp_limits.max_connections_per_ip),
        connection_rate: config
            .smtp_limits
            .max_connection_rate_per_ip
            .map(|(count, per)| crate::smtp::limits::ConnectionRate::new(count, per)),
        memory: crate::smtp::limits::MemoryBudget::new(config.smtp_limits.memory_budget_bytes, metrics.smtp.clone()),
        proxy_from: config.smtp_limits.proxy_protocol_from.clone(),
        screen: crate::smtp::screen::Screen::from_config(
            &config,
            delivery.control().cloned(),
            delivery.writer().cloned(),
            metrics.screen.clone(),
        )?,
    });
    let authenticator = users.map(|store| {
        Arc::new(crate::submission::Authenticator::new(
            store,
            config.smtp_auth.max_failures,
            config.smtp_auth.failure_window,
            metrics.smtp.clone(),
        ))
    });
    // Submission listeners differ from the MX one only in AUTH and TLS mode.
    let submission_config = |implicit_tls: bool| {
        Arc::new(crate::smtp::SmtpConfig {
            auth: authenticator.clone(),
            // RFC 4865: the API's scheduling limit serves SMTP clients too.
            future_release: Some(config.api.max_schedule_ahead),
            implicit_tls,
            ..(*smtp_config).clone()
        })
    };
    let front = Arc::new(
        QueueFront::new(
            config.node_id,
            Arc::clone(&groups),
            Arc::clone(&ids),
            Arc::clone(&delivery),
            cluster.peers(),
            Arc::clone(&settings.batchers),
            Arc::clone(durability.space()),
        )
        .with_fbl(config.fbl.enabled().then(|| {
            crate::fbl::Fbl::new(
                config.fbl.clone(),
                config.node_id,
                Arc::clone(&delivery),
                metrics.fbl.clone(),
            )
        })),
    );
    if let Some(control) = groups.get(CONTROL_GROUP) {
        let _ = api_handle.set(Arc::new(crate::api::ApiState {
            config: config.api.clone(),
            node_id: config.node_id,
            hostname: config.hostname.clone(),
            max_message_size: config.max_message_size,
            groups: Arc::clone(&groups),
            control: crate::cluster::control::ControlState::new(control.sm.tree()),
            writer: cluster.control_writer(),
            peers: cluster.peers(),
            front: Arc::clone(&front),
            pipeline: Arc::clone(&pipeline),
            metrics: Arc::clone(&metrics),
            limits: crate::api::limits::Limits::new(config.api.max_in_flight_requests, config.api.max_in_flight_bytes),
        }));
    }
    let mut smtp_tasks = Vec::new();
    // Each listener's settings, swapped by a config reload.
    let mut listener_configs = Vec::new();
    for listener in smtp_listeners {
        let swap = Arc::new(arc_swap::ArcSwap::new(Arc::clone(&smtp_config)));
        listener_configs.push(Arc::clone(&swap));
        smtp_tasks.push(tokio::spawn(crate::smtp::serve_reloadable(
            listener,
            swap,
            Arc::clone(&front),
            stop_rx.clone(),
        )));
    }
    for (listener, implicit_tls) in submission_listeners {
        let swap = Arc::new(arc_swap::ArcSwap::new(submission_config(implicit_tls)));
        listener_configs.push(Arc::clone(&swap));
        smtp_tasks.push(tokio::spawn(crate::smtp::serve_reloadable(
            listener,
            swap,
            Arc::clone(&front),
            stop_rx.clone(),
        )));
    }
    crate::reports::start(
        &config,
        &delivery,
        dmarc_reports,
        &pipeline,
        Arc::clone(&front),
        Arc::clone(&ids),
        stop_rx.clone(),
    )
    .context("reports")?;
    let controller = tokio::spawn(Arc::clone(&cluster).run(stop_rx.clone()));
    let purge = crate::api::purge::run(
        Arc::clone(&groups),
        config.node_id,
        config.api.status_retention,
        stop_rx.clone(),
    );
    tokio::spawn(purge);
    let outbox = Arc::new(crate::outbox::dispatch::Dispatcher::new(
        config.node_id,
        Arc::clone(&groups),
        delivery.classifier().clone(),
        metrics.webhook.clone(),
        outbox_status.clone(),
        webhook_names,
        stop_rx.clone(),
    ));
    outbox.set(&config.webhooks).context("webhook outbox")?;
    if let Some(control) = delivery.control() {
        tokio::spawn(crate::backoff::watch(
            control.clone(),
            config.node_id,
            metrics.delivery.clone(),
            stop_rx.clone(),
        ));
    }
    if let Some(watcher) = &cert_watcher {
        watcher.watch(CERT_POLL_INTERVAL, stop_rx.clone());
    }
    metrics.reload.loaded();
    let reloader = reloader.get_or_init(|| {
        Arc::new(crate::reload::Reloader {
            path,
            running: std::sync::Mutex::new(Arc::clone(&config)),
            delivery: Arc::clone(&delivery),
            pipeline: Arc::clone(&pipeline),
            listeners: listener_configs,
            certificates: cert_watcher.into_iter().collect(),
            cluster_tls: cluster_tls.clone(),
            metrics: metrics.reload.clone(),
            screen: crate::reload::ScreenParts {
                control: delivery.control().cloned(),
                writer: delivery.writer().cloned(),
                metrics: metrics.screen.clone(),
            },
            authz: Arc::clone(&authz),
            webhooks: Arc::clone(&webhooks),
            outbox: Arc::clone(&outbox),
            outbox_switch: outbox_switch.clone(),
            front: Arc::clone(&front),
            fbl_metrics: metrics.fbl.clone(),
        })
    });
    // Installed even without a config file: SIGHUP never stops the node.
    Arc::clone(reloader)
        .on_sighup(stop_rx.clone())
        .context("SIGHUP handler")?;
    announce("ready");
    tracing::info!(node = config.node_id, hostname = %config.hostname, "ready");

    tokio::select! {
        () = crate::lifecycle::shutdown_signal() => {}
        failed = &mut guard => {
            // A group that failed never serves again here: exit without the
            // orderly stop (which would wait on it); the log is replayed at
            // the next start, as after a crash.
            let _ = stop_tx.send(true);
            return match failed {
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("storage failure")),
                Ok(Ok(())) => Err(anyhow::anyhow!("disk guard stopped")),
                Err(e) => Err(anyhow::anyhow!("disk guard task failed: {e}")),
            };
        }
    }
    let _ = stop_tx.send(true);
    let _ = guard.await;
    // Log writes held back by a full disk would keep their groups from
    // stopping.
    space.stop_waiting();
    for task in smtp_tasks {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "smtp listener ended with an error"),
            Err(e) => tracing::warn!(error = %e, "smtp listener task failed"),
            Ok(Ok(())) => {}
        }
    }
    let _ = controller.await;
    outbox.join().await;
    // A planned stop sends nothing twice: every shard led here is handed
    // over once its in-flight outcomes are committed.
    let still = cluster.hand_over_all(std::time::Duration::from_secs(5)).await;
    tracing::info!(still_leading = still.len(), "shutdown: shards handed over");
    let _ = grpc_stop_tx.send(true);
    let _ = grpc.await;
    let _ = http.await;
    host.shutdown().await;
    checkpointer.abort();
    // A clean stop re-applies nothing at the next start.
    host.checkpoint_all().await;
    durability.flush_all().await?;
    webhooks.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts one `QueueShard` actor per local shard replica as its group opens
/// (it delivers while this node leads); the control group gets none.
struct ShardActors {
    handover_timeout: Duration,
    /// The actix arbiter shard actors run on (the system arbiter).
    arbiter: actix::ArbiterHandle,
    delivery: Arc<Delivery>,
    settings: Arc<ShardSettings>,
    ids: Arc<IdGen>,
    actors: std::sync::Mutex<Vec<actix::Addr<QueueShard>>>,
}

impl GroupHooks for ShardActors {
    fn handover(&self, _group: crate::raft::GroupId) -> Arc<crate::queue::handover::HandOver> {
        Arc::new(crate::queue::handover::HandOver::new(
            self.handover_timeout,
            self.settings.metrics.queue.handovers.clone(),
            self.settings.metrics.queue.handover_timeouts.clone(),
        ))
    }

    fn leader_changes(&self, group: crate::raft::GroupId) -> prometheus_client::metrics::counter::Counter {
        self.settings.metrics.leader_changes(group)
    }

    fn opened(&self, group: &crate::raft::groups::GroupHandle, events: GroupEvents) {
        if group.id == CONTROL_GROUP {
            return;
        }
        let actor = QueueShard::new(
            group.clone(),
            Arc::clone(&self.settings),
            Arc::clone(&self.delivery),
            Arc::clone(&self.ids),
            events.rx,
            events.wanted,
        );
        let addr = <QueueShard as actix::Actor>::start_in_arbiter(&self.arbiter, move |_| actor);
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).push(addr);
    }

    fn shutdown(&self) {
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The node's rules for every group's requests: the queue shard's, then the
/// control group's (each group gets only its own kinds of request), and the
/// durable events' outbox of every group.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Write the events of what entries change to the group's outbox
    /// (`[[webhook]]` configured; every node must have the same set).
    pub outbox: crate::outbox::Switch,
}

impl crate::raft::apply::Apply for Rules {
    fn apply(
        &self,
        ctx: &mut crate::raft::apply::ApplyCtx<'_>,
        request: Request,
    ) -> Result<crate::raft::Response, crate::raft::StorageError> {
        if let Request::EventsAck {
            endpoint,
            upto,
            dead,
            trim,
        } = &request
        {
            crate::outbox::produce::ack(ctx, endpoint, upto, dead, trim)?;
            return Ok(crate::raft::Response { changed: true });
        }
        let events = if self.outbox.is_on() {
            Some(crate::outbox::produce::Pending::before(ctx, &request)?)
        } else {
            None
        };
        let response = self.apply_rules(ctx, request)?;
        if let Some(events) = events {
            events.write(ctx)?;
        }
        Ok(response)
    }
}

impl Rules {
    // StorageError as the trait answers (see queue/apply.rs).
    #[allow(clippy::result_large_err)]
    fn apply_rules(
        &self,
        ctx: &mut crate::raft::apply::ApplyCtx<'_>,
        request: Request,
    ) -> Result<crate::raft::Response, crate::raft::StorageError> {
        let request = match crate::queue::apply::apply(ctx, request)? {
            Ok(response) => return Ok(response),
            Err(request) => request,
        };
        match crate::cluster::control::apply(ctx, request)? {
            Ok(response) => Ok(response),
            Err(request) => Err(crate::raft::apply::write_error(&format_args!(
                "no rule applies {request:?}"
            ))),
        }
    }
}
