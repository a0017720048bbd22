//! `lifeboat-controller`: the single source of truth for hosts, guests,
//! placement (ownership), jobs and the audit log.
//!
//! Code map: [`config`] reads the TOML file; [`store`] is the SQLite
//! persistence; [`domain`] holds pure logic (liveness, statuses, the
//! registry's rules, the values the planner and reconciler read, their
//! decisions); [`registry`] is the in-memory state backed by the store
//! (sessions and command bus, view, listings); [`rpc`] is the
//! thin gRPC layer (authenticate, authorize, delegate); [`error`] maps
//! domain errors to gRPC status codes in one place.
//!
//! Architecture invariant: the controller never talks to libvirt.
//!
//! Architecture invariant: no module imports one that imports it back, and
//! `domain` imports no other module of the crate (`tests/layers.rs`).

#![forbid(unsafe_code)]

pub mod alarms;
pub mod backup;
pub mod config;
pub mod conn;
pub mod domain;
pub mod error;
pub mod fence;
pub mod guestops;
pub mod ha;
pub mod hostops;
pub mod intake;
pub mod metrics;
pub mod migrate;
pub mod ports;
pub mod reconcile;
pub mod registry;
pub mod rpc;
pub mod store;
pub mod telemetry;
pub mod waiting;

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::v1::admin_server::AdminServer;
use tonic::transport::Server;
use tracing::info;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    lifeboat_common::now_unix_ms()
}

/// HTTP/2 flow-control window per stream. A peer may send this much before
/// the controller has read it, and a session's read buffers grow to hold a
/// window's worth of DATA plus the message in progress, for the life of the
/// session: tonic's 8 KiB decode buffer doubled to 32 KiB per session with
/// an 8 KiB window and 6 KiB messages (heaptrack), 320 MiB at 10,000
/// agents. With a 4 KiB window and messages under 4 KiB (packed definitions,
/// 3 KiB inventory pages) it stays at 8 KiB.
pub const STREAM_WINDOW: u32 = 4 * 1024;

/// How long after the shutdown signal connections may take to close before
/// the controller closes them itself (and then flushes and exits).
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(8);

/// Runs the controller until the future `shutdown` completes, with the
/// connection limits this process's `RLIMIT_NOFILE` allows.
pub async fn serve(
    cfg: config::ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_limits(cfg, conn::Limits::for_this_process(), listener, shutdown).await
}

/// Like [`serve`], with the given connection limits.
pub async fn serve_with_limits(
    cfg: config::ControllerConfig,
    limits: conn::Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    lifeboat_common::tls::install_crypto_provider();
    let tls = cfg.tls.load()?;
    let _db_lock = backup::lock(&cfg.database)?;
    // The store thread owns the database from here on; nothing else opens it.
    let repos = store::sqlite::SqliteRepos::start(&cfg.database)?;
    // Files made before the umask (older versions, other tools) become
    // owner-only. A controller that cannot chmod them (not their owner)
    // still serves: refusing to start would stop failovers over file modes.
    if let Err(e) = backup::restrict_db_files(&cfg.database) {
        tracing::warn!(database = %cfg.database.display(), error = %e, "cannot make the database files owner-only (mode 0600): chown them to the controller's user");
    }
    let timing = cfg.timing();
    let loading = repos.clone();
    // Start-up reads block on the store thread: off the async workers.
    let registry = Arc::new(
        tokio::task::spawn_blocking(move || registry::Registry::load(loading, timing))
            .await
            .map_err(|e| anyhow::anyhow!("loading the database: {e}"))??,
    );
    info!(
        listen = %listener.local_addr()?,
        database = %cfg.database.display(),
        hosts = registry.host_count(),
        "lifeboat-controller serving"
    );
    let watcher = tokio::spawn(registry::watch_liveness(registry.clone()));
    let reconciler = tokio::spawn(reconcile::run(registry.clone(), i64::from(cfg.lease_ttl_ms)));
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on metrics_listen {addr}: {e}"))?;
            info!(listen = %addr, "metrics at /metrics");
            Some(tokio::spawn(metrics::serve(registry.clone(), l)))
        }
        None => None,
    };
    // Set when the shutdown signal comes: agent sessions end their streams
    // with a status saying so, and the connections drain.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let agent = rpc::agent::AgentService::new(registry.clone()).with_shutdown(stopping.clone());
    let engine = migrate::engine::Engine::new(
        registry.clone(),
        &cfg.bmc,
        cfg.force_grace_ms,
        cfg.host_memory_reserve_mib * 1024,
        i64::from(cfg.lease_ttl_ms),
    )?;
    let resumed = engine.resume_all().await?;
    if resumed > 0 {
        info!(jobs = resumed, "resumed unfinished jobs");
    }
    let admin = rpc::admin::AdminService::new(registry.clone(), engine);
    let table = conn::Table::new(limits.clone());
    info!(
        max_connections = limits.max_connections,
        reserved_above = limits.soft_connections,
        max_handshakes = limits.max_handshakes,
        max_handshakes_per_ip = limits.max_handshakes_per_ip,
        handshake_timeout_s = limits.handshake_timeout.as_secs(),
        idle_timeout_s = limits.idle_timeout.as_secs(),
        "connection limits"
    );
    let known = {
        let reg = registry.clone();
        Arc::new(move |host: &str| reg.get_host(host).is_ok()) as Arc<dyn Fn(&str) -> bool + Send + Sync>
    };
    let (incoming, acceptor) = conn::incoming(listener, conn::server_config(&tls)?, table.clone(), known);
    let routes = tonic::service::Routes::new(agent.into_server()).add_service(AdminServer::new(admin)).prepare();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server = Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        // Pings only find dead TCP connections; liveness is the heartbeat's
        // job, and an agent dials again when its heartbeats go unanswered.
        // A short ping timeout drops healthy sessions of a busy controller
        // (seen with 10,000 agents on 2 cores), each costing a new TLS
        // handshake and a full inventory.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .serve_with_incoming_shutdown(conn::Tracked::new(routes, table.clone()), incoming, signal);
    tokio::pin!(server);
    let mut stopping_wait = stopping.clone();
    let res = tokio::select! {
        r = &mut server => r,
        _ = async {
            let _ = stopping_wait.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_BOUND).await;
        } => {
            let open = table.describe_open();
            tracing::warn!(
                open = open.len(),
                "connections still open {} s after the shutdown signal, closing them: {}",
                SHUTDOWN_BOUND.as_secs(),
                open.join(", ")
            );
            table.close_all();
            Ok(())
        }
    };
    acceptor.abort();
    table.close_all();
    watcher.abort();
    reconciler.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    registry.flush().await?;
    // The last writer is done: the store thread runs what is queued, then
    // checkpoints the write-ahead log into the database and stops.
    repos.shutdown().await?;
    info!("database flushed; stopped");
    res?;
    Ok(())
}
