//! `lifeboat-controller`: the single source of truth for hosts, guests and
//! (later) placement, jobs and the audit log.
//!
//! Code map: [`config`] reads the TOML file; [`store`] is the SQLite
//! persistence; [`model`] holds pure logic (liveness, statuses);
//! [`registry`] is the in-memory state backed by the store; [`rpc`] is the
//! thin gRPC layer (authenticate, authorize, delegate); [`error`] maps
//! domain errors to gRPC status codes in one place.
//!
//! Architecture invariant: the controller never talks to libvirt.

pub mod alarms;
pub mod backup;
pub mod config;
pub mod error;
pub mod fence;
pub mod guestops;
pub mod hostops;
pub mod intake;
pub mod metrics;
pub mod migrate;
pub mod model;
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

/// Runs the controller until the future `shutdown` completes.
pub async fn serve(
    cfg: config::ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    lifeboat_common::tls::install_crypto_provider();
    let tls = cfg.tls.load()?;
    let _db_lock = backup::lock(&cfg.database)?;
    let store = store::Store::open(&cfg.database)?;
    // Files made before the umask (older versions, other tools) become
    // owner-only. A controller that cannot chmod them (not their owner)
    // still serves: refusing to start would stop failovers over file modes.
    if let Err(e) = backup::restrict_db_files(&cfg.database) {
        tracing::warn!(database = %cfg.database.display(), error = %e, "cannot make the database files owner-only (mode 0600): chown them to the controller's user");
    }
    let registry = Arc::new(registry::Registry::load(store, cfg.timing())?);
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
            let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on metrics_listen {addr}: {e}"))?;
            info!(listen = %addr, "metrics at /metrics");
            Some(tokio::spawn(metrics::serve(registry.clone(), l)))
        }
        None => None,
    };
    let agent = rpc::agent::AgentService::new(registry.clone());
    let engine = migrate::engine::Engine::new(
        registry.clone(),
        &cfg.bmc,
        cfg.force_grace_ms,
        cfg.host_memory_reserve_mib * 1024,
        i64::from(cfg.lease_ttl_ms),
    )?;
    let resumed = engine.resume_all()?;
    if resumed > 0 {
        info!(jobs = resumed, "resumed unfinished jobs");
    }
    let admin = rpc::admin::AdminService::new(registry.clone(), engine);
    // Replies go out at once: without TCP_NODELAY a reply of more than one
    // segment waits for the client's delayed ACK (~40 ms per plan or list).
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let res = Server::builder()
        .tls_config(tls.server_config())?
        .initial_stream_window_size(Some(STREAM_WINDOW))
        // Pings only find dead TCP connections; liveness is the heartbeat's
        // job, and an agent dials again when its heartbeats go unanswered.
        // A short ping timeout drops healthy sessions of a busy controller
        // (seen with 10,000 agents on 2 cores), each costing a new TLS
        // handshake and a full inventory.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(agent.into_server())
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    watcher.abort();
    reconciler.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    registry.flush()?;
    res?;
    Ok(())
}
