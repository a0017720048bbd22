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
pub mod dashboard;
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

/// How long a controller that lost its leadership keeps its connections
/// open so that calls already being answered get their answer (a refused
/// write says why) instead of a broken connection. Nothing is commanded
/// meanwhile (`Leadership::holds()` is false, the gate refuses new calls),
/// and it ends well before the deadline watchdog's grace (at least 350 ms).
pub const LOST_FLUSH: Duration = Duration::from_millis(200);

/// The runtime that serves agents and clients (the controller's main
/// runtime): more workers than cores, since a worker waiting for the
/// registry lock or the database must not leave 10,000 sessions'
/// heartbeats unread. With the etcd backend its threads, workers and
/// blocking pool alike, run at [`ha::priority::SERVING_NICE`]: the etcd
/// runtime [`serve`] starts (from the calling thread, at its priority)
/// then outranks them, so lease keepalives are sent and read on time
/// however busy serving is.
pub fn serving_runtime(backend: config::Backend) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads((cores * 2).max(4)).enable_all();
    if backend == config::Backend::Etcd {
        b.on_thread_start(|| {
            static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if let Err(e) = ha::priority::lower_this_thread(ha::priority::SERVING_NICE)
                && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("{e}: serving threads run at the etcd runtime's priority");
            }
        });
    }
    b.build()
}

/// Runs the controller until the future `shutdown` completes, with the
/// connection limits this process's `RLIMIT_NOFILE` allows.
pub async fn serve(
    cfg: config::ControllerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_limits(cfg, conn::Limits::for_this_process(), listener, shutdown).await
}

/// The exit status of a controller that lost its etcd leadership: it stops
/// commanding at once and exits; its supervisor (systemd `Restart=always`)
/// starts it again, as a follower.
pub const EXIT_LEADERSHIP_LOST: u8 = 3;

/// The controller stopped because it lost its leadership (etcd backend):
/// exit with [`EXIT_LEADERSHIP_LOST`].
#[derive(Debug, thiserror::Error)]
#[error("lost the leadership: {0}; exiting with status 3 to start again as a follower")]
pub struct LeadershipLost(pub String);

/// Like [`serve`], with the given connection limits.
pub async fn serve_with_limits(
    cfg: config::ControllerConfig,
    limits: conn::Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    lifeboat_common::tls::install_crypto_provider();
    match cfg.store.backend {
        config::Backend::Sqlite => serve_sqlite(cfg, limits, listener, shutdown).await,
        config::Backend::Etcd => serve_etcd(cfg, limits, listener, shutdown).await,
    }
}

/// The routes every controller serves behind its gate.
type Routes = tonic::service::Routes;

/// A controller that runs: its registry, its routes and its tasks.
struct Running {
    registry: Arc<registry::Registry>,
    routes: Routes,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Loads the registry from `repos` (or takes `loaded`, a registry loaded
/// ahead from the same rows, and binds it to `repos`) and starts everything
/// that acts: the liveness watcher, the reconciler, the engine (resuming
/// jobs after the startup grace) and the services. With `leadership`, every
/// command carries its epoch and none is sent once it no longer holds.
async fn start_controller(
    cfg: &config::ControllerConfig,
    repos: ports::Repos,
    loaded: Option<registry::Registry>,
    leadership: Option<Arc<ha::Leadership>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    dash: Option<&dashboard::AppState>,
) -> anyhow::Result<Running> {
    let timing = cfg.timing();
    let registry = match loaded {
        Some(r) => Arc::new(r.rebind(repos.clone())),
        None => {
            let loading = repos.clone();
            let t0 = std::time::Instant::now();
            // Start-up reads block on the store thread: off the async workers.
            let r = tokio::task::spawn_blocking(move || registry::Registry::load(loading, timing))
                .await
                .map_err(|e| anyhow::anyhow!("loading the database: {e}"))??;
            info!(
                ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                hosts = r.host_count(),
                "registry loaded"
            );
            Arc::new(r)
        }
    };
    if let Some(l) = leadership.clone() {
        registry.set_leadership(l);
    }
    let watcher = tokio::spawn(registry::watch_liveness(registry.clone()));
    let reconciler = tokio::spawn(reconcile::run(registry.clone(), i64::from(cfg.lease_ttl_ms)));
    let agent = rpc::agent::AgentService::new(registry.clone()).with_shutdown(stopping);
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
    let mut admin = rpc::admin::AdminService::new(registry.clone(), engine.clone());
    if let Some(app) = dash {
        admin = admin.with_dashboard(app.auth.clone(), app.port);
        app.open(dashboard::Ctl { reg: registry.clone(), engine, leadership });
    }
    let routes = tonic::service::Routes::new(agent.into_server()).add_service(AdminServer::new(admin)).prepare();
    Ok(Running { registry, routes, tasks: vec![watcher, reconciler] })
}

/// Why the server stops.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// Running.
    No,
    /// The shutdown signal: connections drain for up to [`SHUTDOWN_BOUND`].
    Shutdown,
    /// Leadership lost: every connection is closed after [`LOST_FLUSH`].
    Lost,
}

/// Serves `service` (behind [`conn::Tracked`]) on `listener` until `stop`
/// says why not.
async fn run_server<S>(
    listener: tokio::net::TcpListener,
    tls: &lifeboat_common::tls::TlsMaterial,
    limits: conn::Limits,
    service: S,
    known: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<Stop>,
) -> anyhow::Result<()>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
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
    let (incoming, acceptor) = conn::incoming(listener, conn::server_config(tls)?, table.clone(), known);
    let mut signal_stop = stop.clone();
    let signal = async move {
        let _ = signal_stop.wait_for(|s| *s != Stop::No).await;
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
        .serve_with_incoming_shutdown(conn::Tracked::new(service, table.clone()), incoming, signal);
    tokio::pin!(server);
    let res = tokio::select! {
        r = &mut server => r,
        _ = async {
            let why = stop.wait_for(|s| *s != Stop::No).await.map(|s| s.clone()).unwrap_or(Stop::Lost);
            match why {
                Stop::Shutdown => tokio::time::sleep(SHUTDOWN_BOUND).await,
                Stop::Lost => tokio::time::sleep(LOST_FLUSH).await,
                Stop::No => {}
            }
        } => {
            let open = table.describe_open();
            if *stop.borrow() == Stop::Shutdown {
                tracing::warn!(
                    open = open.len(),
                    "connections still open {} s after the shutdown signal, closing them: {}",
                    SHUTDOWN_BOUND.as_secs(),
                    open.join(", ")
                );
            }
            table.close_all();
            Ok(())
        }
    };
    acceptor.abort();
    table.close_all();
    res?;
    Ok(())
}

/// The SQLite backend: one controller, always the leader, epoch 0.
async fn serve_sqlite(
    cfg: config::ControllerConfig,
    limits: conn::Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
    // Set when the shutdown signal comes: agent sessions end their streams
    // with a status saying so, and the connections drain.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let dash = dashboard::Dashboard::new(&cfg.dashboard, &tls, Arc::new(ports::SystemClock), None).await?;
    let ctl = start_controller(&cfg, repos.clone(), None, None, stopping, dash.as_ref().map(|d| &d.app)).await?;
    let _dash_task = dash.map(dashboard::Dashboard::spawn);
    info!(
        listen = %listener.local_addr()?,
        database = %cfg.database.display(),
        hosts = ctl.registry.host_count(),
        "lifeboat-controller serving"
    );
    let metrics = start_metrics(&cfg, metrics::Source::of(ctl.registry.clone())).await?;
    let known = known_hosts(metrics::Source::of(ctl.registry.clone()));
    let (stop_tx, stop) = tokio::sync::watch::channel(Stop::No);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        let _ = stop_tx.send(Stop::Shutdown);
    });
    let res = run_server(listener, &tls, limits, ha::gate::Gate::open_now(ctl.routes.clone()), known, stop).await;
    for t in ctl.tasks.iter().chain(metrics.iter()) {
        t.abort();
    }
    ctl.registry.flush().await?;
    // The last writer is done: the store thread runs what is queued, then
    // checkpoints the write-ahead log into the database and stops.
    repos.shutdown().await?;
    info!("database flushed; stopped");
    res
}

async fn start_metrics(
    cfg: &config::ControllerConfig,
    source: metrics::Source,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    Ok(match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on metrics_listen {addr}: {e}"))?;
            info!(listen = %addr, "metrics at /metrics");
            Some(tokio::spawn(metrics::serve_source(source, l)))
        }
        None => None,
    })
}

/// Whether an agent's host is known (for the connection headroom): none
/// is, until the registry is loaded.
fn known_hosts(source: metrics::Source) -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
    Arc::new(move |host: &str| source.registry().is_some_and(|r| r.get_host(host).is_ok()))
}

/// A thread outside every runtime that ends the process (status 3) when
/// the leadership lapses and the orderly stop has not done so within
/// `grace` (before the etcd lease can expire):
/// however stuck the runtimes are, a controller that no longer leads does
/// not stay up in its leader's state. Not armed while resigning.
fn deadline_watchdog(
    l: Arc<ha::Leadership>,
    resigning: Arc<std::sync::atomic::AtomicBool>,
    grace: Duration,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("lifeboat-deadline".into())
        .spawn(move || {
            loop {
                if resigning.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if l.holds() {
                    let left = l.expires_at().into_std().saturating_duration_since(std::time::Instant::now());
                    std::thread::sleep(left.clamp(Duration::from_millis(20), Duration::from_millis(250)));
                    continue;
                }
                std::thread::sleep(grace);
                if resigning.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                tracing::error!(
                    epoch = l.epoch(),
                    "leadership lapsed and the controller did not stop in time: exiting"
                );
                std::process::exit(i32::from(EXIT_LEADERSHIP_LOST));
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the deadline watchdog: {e}"))?;
    Ok(())
}

/// At most one load ahead per this long: an agent that keeps saying the
/// leader is gone (a flaky network, or a hostile agent) costs a follower
/// one registry load a minute at most.
const LOAD_AHEAD_EVERY: Duration = Duration::from_secs(60);

/// How long a follower keeps a registry loaded ahead, from the last call
/// that said the leader is gone, if it is not elected (its memory is the
/// pool's in-memory view).
const LOAD_AHEAD_KEEP: Duration = Duration::from_secs(30);

/// How long a newly elected leader waits for a load ahead still running
/// before it abandons it and loads again at full priority: a load of
/// 10,000 hosts takes about 3 s, and this one began before the election.
/// A read that hangs must not keep the new leader closed.
const LOAD_AHEAD_WAIT: Duration = Duration::from_secs(5);

/// A registry being loaded ahead by a follower through a read-only
/// connection to its local copy, and the rows revision it was started at.
struct LoadAhead {
    at: i64,
    t0: std::time::Instant,
    /// When an agent last said the leader is gone (the load is kept
    /// [`LOAD_AHEAD_KEEP`] from then).
    suspected_at: std::time::Instant,
    /// The read-only store the load reads through: shut down when the load
    /// is abandoned (a blocking task cannot be aborted; the read in
    /// progress, for the guest scan most of the load, still runs to its end).
    reader: ports::Repos,
    task: tokio::task::JoinHandle<Result<registry::Registry, ports::RepoError>>,
}

/// Starts loading the registry ahead (at the serving runtime's lowered
/// priority: it must not slow the election or etcd's answers); `None` if
/// the local copy cannot be opened for reading (then it loads after
/// promotion, as always).
fn load_ahead(
    replica: &store::etcd::Replica,
    rows: &store::etcd::RowsRevision,
    timing: domain::host::Timing,
) -> Option<LoadAhead> {
    // Read before the first row is: rows read later are those of this
    // revision if it has not moved when they are used.
    let at = rows.get();
    let reader = match replica.reader() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot read the local copy ahead ({e}); it is loaded once this controller leads");
            return None;
        }
    };
    info!(revision = at, "an agent says the leader is gone: loading the registry ahead from the local copy");
    let loading = reader.clone();
    let task = tokio::task::spawn_blocking(move || registry::Registry::load(loading, timing));
    let now = std::time::Instant::now();
    Some(LoadAhead { at, t0: now, suspected_at: now, reader, task })
}

impl LoadAhead {
    /// The registry loaded ahead, once promotion has caught the local copy
    /// up to etcd (its watch is stopped then, so `rows` no longer moves):
    /// only if no row changed since it began (else `None`, and the registry
    /// is loaded from the promoted store). Waits up to `wait` for a load
    /// still running (it began earlier than a new one would), then abandons it.
    async fn take(mut self, rows: &store::etcd::RowsRevision, wait: Duration) -> Option<registry::Registry> {
        if rows.get() != self.at {
            info!(ahead = self.at, now = rows.get(), "rows changed since the load ahead began: loading again");
            self.abandon();
            return None;
        }
        let done = match tokio::time::timeout(wait, &mut self.task).await {
            Ok(done) => done,
            Err(_) => {
                tracing::warn!(
                    waited_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "the load ahead has not finished: abandoning it and loading again"
                );
                self.abandon();
                return None;
            }
        };
        match done {
            Ok(Ok(r)) => {
                info!(
                    ms = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                    hosts = r.host_count(),
                    revision = self.at,
                    "registry loaded ahead and used (no row changed since)"
                );
                Some(r)
            }
            Ok(Err(e)) => {
                info!("the load ahead failed ({e}): loading again");
                None
            }
            Err(e) => {
                tracing::warn!("the load ahead did not finish ({e}): loading again");
                None
            }
        }
    }

    /// Whether it can no longer be used, or has been kept long enough since
    /// the last suspicion.
    fn stale(&self, rows: &store::etcd::RowsRevision) -> bool {
        rows.get() != self.at || (self.task.is_finished() && self.suspected_at.elapsed() >= LOAD_AHEAD_KEEP)
    }

    /// Lets it go without holding anything up: a load still running ends
    /// at its low priority (its reads after the one in progress fail once
    /// the reader stops), and the registry is freed on a blocking thread,
    /// not an async worker.
    fn abandon(self) {
        let LoadAhead { reader, task, .. } = self;
        tokio::spawn(async move {
            let _ = reader.shutdown().await;
            if let Ok(Ok(r)) = task.await {
                drop_off_runtime(r);
            }
        });
    }
}

/// Frees a whole registry (200,000 guests: tens of milliseconds) on a
/// blocking thread.
fn drop_off_runtime(r: registry::Registry) {
    drop(tokio::task::spawn_blocking(move || drop(r)));
}

/// The etcd backend: serve as a follower (every call refused, naming the
/// leader), campaign, and once elected promote the replica and run the
/// controller until the shutdown signal (resign: a standby leads at once)
/// or the leadership is lost ([`LeadershipLost`]: stop at once).
async fn serve_etcd(
    cfg: config::ControllerConfig,
    limits: conn::Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = cfg.tls.load()?;
    let st = cfg.store.clone();
    let url = st.advertise_url.clone().ok_or_else(|| anyhow::anyhow!("[store] advertise_url is required for etcd"))?;
    let leader_ttl = Duration::from_millis(u64::from(st.leader_ttl_ms));
    // Every etcd request, the lease keepalives, the replica's watch and the
    // store thread's writes run on a runtime of their own: a busy or blocked
    // serving runtime can neither starve the keepalives nor hold up the
    // store thread, which blocks on etcd while callers wait for it.
    let etcd_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lifeboat-etcd")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the etcd runtime: {e}"))?;
    let io = etcd_rt.handle().clone();
    let res = serve_etcd_on(cfg, limits, listener, shutdown, &io, tls, st, url, leader_ttl).await;
    etcd_rt.shutdown_background();
    res
}

/// [`serve_etcd`] once the etcd runtime `io` exists.
#[allow(clippy::too_many_arguments)]
async fn serve_etcd_on(
    cfg: config::ControllerConfig,
    limits: conn::Limits,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    io: &tokio::runtime::Handle,
    tls: lifeboat_common::tls::TlsMaterial,
    st: config::StoreConfig,
    url: String,
    leader_ttl: Duration,
) -> anyhow::Result<()> {
    // A follower from the first moment: while etcd cannot be reached every
    // call is refused saying so (not "connection refused").
    let (hint_tx, hint) = tokio::sync::watch::channel(ha::election::LeaderHint::EtcdError("not connected yet".into()));
    // An agent that lost the leader is held while that leader's lease runs
    // out (at most leader_ttl after its last renewal) and the election and
    // the next hint poll happen.
    let follower_hold = leader_ttl + Duration::from_secs(2);
    let gate: ha::gate::Gate<Routes> = ha::gate::Gate::follower(hint.clone(), follower_hold);
    // Calls held before the local copy is loaded count too.
    let mut suspected = gate.leader_suspected();
    let source = metrics::Source::empty();
    metrics::ha_follower(hint.clone());
    let metrics = start_metrics(&cfg, source.clone()).await?;
    // A follower's dashboard redirects to the leader's (same port).
    let dash =
        dashboard::Dashboard::new(&cfg.dashboard, &tls, Arc::new(ports::SystemClock), Some(hint.clone())).await?;
    let dash_app = dash.as_ref().map(|d| d.app.clone());
    if let Some(app) = &dash_app {
        app.set_advertise_url(&url);
    }
    let _dash_task = dash.map(dashboard::Dashboard::spawn);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let (stop_tx, stop) = tokio::sync::watch::channel(Stop::No);
    info!(listen = %listener.local_addr()?, advertise_url = %url, endpoints = ?st.endpoints, "lifeboat-controller serving as a follower");
    let server = tokio::spawn({
        let gate = gate.clone();
        let known = known_hosts(source.clone());
        async move { run_server(listener, &tls, limits, gate, known, stop).await }
    });
    tokio::pin!(shutdown);
    let finish = |why: Stop| {
        let _ = stopping_tx.send(true);
        let _ = stop_tx.send(why);
    };
    // Connect and build the local copy, again and again while etcd cannot
    // be reached; a refusal that waiting cannot mend (a schema this
    // controller cannot read) ends the process.
    let cache = st.cache_dir.join("cache.db");
    let mut delay = Duration::from_millis(200);
    let (client, replica) = loop {
        let (st2, cache2) = (st.clone(), cache.clone());
        let attempt = io.spawn(async move {
            let client =
                ha::election::connect(&st2.endpoints, st2.ca.as_deref(), st2.cert.as_deref(), st2.key.as_deref())
                    .await
                    .map_err(|e| (true, e.to_string()))?;
            match store::etcd::initialized(&client, &st2.prefix).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err((
                        false,
                        format!(
                            "etcd holds no Lifeboat data under {:?}: a new installation runs `lifeboat-controller \
                             init` once (or `etcd-import --from controller.db` to move a SQLite pool); otherwise \
                             [store] prefix has a typo",
                            st2.prefix
                        ),
                    ));
                }
                Err(e) => {
                    let retry = matches!(e, store::etcd::EtcdError::Etcd(_) | store::etcd::EtcdError::Timeout(_));
                    return Err((retry, e.to_string()));
                }
            }
            std::fs::create_dir_all(cache2.parent().unwrap_or(std::path::Path::new(".")))
                .map_err(|e| (false, format!("cache_dir {}: {e}", cache2.display())))?;
            let replica = store::etcd::Replica::open(client.clone(), &st2.prefix, &cache2).await.map_err(|e| {
                let retry = matches!(e, store::etcd::EtcdError::Etcd(_) | store::etcd::EtcdError::Timeout(_));
                (retry, e.to_string())
            })?;
            Ok::<_, (bool, String)>((client, replica))
        });
        let r = tokio::select! {
            r = attempt => r.map_err(|e| anyhow::anyhow!("etcd start-up task: {e}"))?,
            _ = &mut shutdown => {
                finish(Stop::Shutdown);
                let _ = server.await;
                return Ok(());
            }
        };
        match r {
            Ok(ok) => break ok,
            Err((true, why)) => {
                tracing::warn!("etcd cannot be reached ({why}); trying again in {} ms", delay.as_millis());
                hint_tx.send_replace(ha::election::LeaderHint::EtcdError(why));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut shutdown => {
                        finish(Stop::Shutdown);
                        let _ = server.await;
                        return Ok(());
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err((false, why)) => {
                finish(Stop::Shutdown);
                let _ = server.await;
                anyhow::bail!("the etcd store cannot be used: {why}");
            }
        }
    };
    info!(revision = replica.loaded_revision(), "local copy of etcd loaded; campaigning for leadership");
    let poller = io.spawn({
        let (client, name) = (client.clone(), ha::election::election_name(&st.prefix));
        async move {
            let (mut rx, task) = ha::election::watch_leader(client, name);
            while rx.changed().await.is_ok() {
                let h = rx.borrow_and_update().clone();
                hint_tx.send_replace(h);
            }
            task.abort();
        }
    });
    let campaign = {
        let (client, prefix, url2) = (client.clone(), st.prefix.clone(), url.clone());
        Arc::new(
            io.spawn(async move { ha::election::Campaign::start(client, &prefix, &url2, leader_ttl).await })
                .await
                .map_err(|e| anyhow::anyhow!("campaign task: {e}"))??,
        )
    };
    let mut won = io.spawn({
        let c = campaign.clone();
        async move { c.campaign().await }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // An agent held here says the leader is gone: the registry is loaded
    // ahead from the local copy, and used if no row changed since.
    let rows = replica.rows_revision();
    let mut ahead: Option<LoadAhead> = None;
    let mut last_ahead: Option<std::time::Instant> = None;
    let leadership = loop {
        tokio::select! {
            r = suspected.changed() => {
                if r.is_ok() {
                    if let Some(a) = ahead.as_mut() {
                        a.suspected_at = std::time::Instant::now();
                    } else if last_ahead.is_none_or(|t| t.elapsed() >= LOAD_AHEAD_EVERY) {
                        ahead = load_ahead(&replica, &rows, cfg.timing());
                        last_ahead = Some(std::time::Instant::now());
                    }
                }
            }
            l = &mut won => match l.map_err(|e| anyhow::anyhow!("campaign task: {e}"))? {
                Ok(l) => break l,
                // Restarting is how a process gets a new lease: exit as if lost.
                Err(ha::election::ElectionError::LeaseGone(why)) => {
                    finish(Stop::Lost);
                    poller.abort();
                    let _ = server.await;
                    return Err(LeadershipLost(why).into());
                }
                Err(e) => return Err(e.into()),
            },
            _ = tick.tick() => {
                // Not elected after all (the leader lives, or another leads):
                // a load ahead that can no longer be used is not kept.
                if let Some(a) = ahead.take_if(|a| a.stale(&rows)) {
                    a.abandon();
                }
                if let Some(why) = replica.stopped_following() {
                    won.abort();
                    campaign.resign().await;
                    finish(Stop::Shutdown);
                    poller.abort();
                    let _ = server.await;
                    anyhow::bail!("the local copy stopped following etcd ({why}); a restart rebuilds it");
                }
            }
            _ = &mut shutdown => {
                won.abort();
                campaign.resign().await;
                finish(Stop::Shutdown);
                poller.abort();
                let _ = server.await;
                return Ok(());
            }
        }
    };
    // Calls that reach this controller while it loads wait for it to open.
    gate.elected();
    let resigning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The process is gone before the lease can expire (the deadline is at
    // least 500 ms before it), the orderly stop having a head start.
    let grace = leader_ttl
        .saturating_sub(ha::election::local_deadline(leader_ttl))
        .saturating_sub(Duration::from_millis(150))
        .max(Duration::from_millis(100));
    deadline_watchdog(leadership.clone(), resigning.clone(), grace)?;
    metrics::ha_leading(leadership.epoch(), &url);
    let t0 = std::time::Instant::now();
    let repos = {
        let l = leadership.clone();
        io.spawn(async move { replica.promote(l).await })
            .await
            .map_err(|e| anyhow::anyhow!("promotion task: {e}"))?
            .map_err(|e| anyhow::anyhow!("promoting the local copy of etcd: {e}"))?
    };
    info!(ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX), "local copy caught up and promoted");
    let loaded = match ahead {
        Some(a) => a.take(&rows, LOAD_AHEAD_WAIT).await,
        None => None,
    };
    let ctl =
        start_controller(&cfg, repos.clone(), loaded, Some(leadership.clone()), stopping.clone(), dash_app.as_ref())
            .await?;
    let _ = source.set(ctl.registry.clone());
    gate.open(ctl.routes.clone(), leadership.clone());
    info!(epoch = leadership.epoch(), hosts = ctl.registry.host_count(), "leading: serving agents and clients");
    let lost = tokio::select! {
        why = leadership.lost() => Some(why),
        _ = &mut shutdown => None,
    };
    if let Some(why) = &lost {
        // holds() is already false: the bus sends nothing from here on.
        tracing::error!(epoch = leadership.epoch(), "lost the leadership: {why}; stopping at once");
        finish(Stop::Lost);
    } else {
        // Resigning first stops this process commanding (holds() turns
        // false) and lets a standby lead at once, while connections drain.
        resigning.store(true, std::sync::atomic::Ordering::SeqCst);
        campaign.resign().await;
        finish(Stop::Shutdown);
    }
    for t in ctl.tasks.iter().chain(metrics.iter()) {
        t.abort();
    }
    poller.abort();
    let res = server.await.map_err(|e| anyhow::anyhow!("server task: {e}"))?;
    if let Some(why) = lost {
        return Err(LeadershipLost(why).into());
    }
    if let Err(e) = ctl.registry.flush().await {
        tracing::warn!("flushing observations at shutdown: {e}");
    }
    repos.shutdown().await?;
    info!("resigned; stopped");
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etcd_serving_runtime_runs_below_the_thread_that_builds_it_and_the_sqlite_one_does_not() {
        let base = ha::priority::this_thread_nice().unwrap();
        let seen = |backend| {
            let rt = serving_runtime(backend).unwrap();
            rt.block_on(async {
                let worker = tokio::spawn(async { ha::priority::this_thread_nice().unwrap() }).await.unwrap();
                let blocking = tokio::task::spawn_blocking(|| ha::priority::this_thread_nice().unwrap()).await.unwrap();
                (worker, blocking)
            })
        };
        let lowered = ha::priority::SERVING_NICE.max(base);
        assert_eq!(seen(config::Backend::Etcd), (lowered, lowered));
        assert_eq!(seen(config::Backend::Sqlite), (base, base));
        // The etcd runtime is built by this (unlowered) thread, as `serve` does.
        let etcd_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        assert_eq!(
            etcd_rt
                .block_on(async { tokio::spawn(async { ha::priority::this_thread_nice().unwrap() }).await.unwrap() }),
            base
        );
        assert_eq!(ha::priority::this_thread_nice().unwrap(), base);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registry_loaded_ahead_is_used_only_if_no_row_changed_since_it_began() {
        use lifeboat_proto::v1::HostInfo;
        let Some(etcd) = lifeboat_common::etcd_test::Etcd::start_or_skip() else { return };
        let c = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut follower = store::etcd::Replica::open(c.clone(), "/t/", &dir.path().join("f.db")).await.unwrap();
        let leader = store::etcd::Replica::open(c.clone(), "/t/", &dir.path().join("l.db")).await.unwrap();
        let mut kv = c.clone();
        let rev = kv.put("/t/leader/a", "https://a", None).await.unwrap().header().unwrap().revision();
        let lead = Arc::new(ha::Leadership::new(
            b"/t/leader/a".to_vec(),
            u64::try_from(rev).unwrap(),
            Duration::from_secs(600),
            tokio::time::Instant::now(),
        ));
        let repos = leader.promote(lead).await.unwrap();
        let host = |id: &str| HostInfo { host_id: id.into(), ..Default::default() };
        repos.hosts(move |h| h.upsert(&host("h1"), 5)).await.unwrap();
        follower.catch_up().await.unwrap();
        let rows = follower.rows_revision();
        let timing = domain::host::Timing::default();

        // Nothing changed since: the load ahead is the registry.
        let a = load_ahead(&follower, &rows, timing).expect("the local copy opens for reading");
        let r = a.take(&rows, LOAD_AHEAD_WAIT).await.expect("used");
        assert_eq!(r.host_count(), 1);
        // Bound to the leader's store: its writes reach etcd, also those made
        // under the registry's lock.
        let r = Arc::new(r.rebind(repos.clone()));
        let r2 = r.clone();
        tokio::task::spawn_blocking(move || r2.raise_alarm_blocking("h1", "test-alarm", "after rebind"))
            .await
            .unwrap()
            .unwrap();
        let alarms = repos.call(|r| r.alarms().list(false)).await.unwrap();
        assert!(alarms.iter().any(|a| a.kind == "test-alarm"), "{alarms:?}");
        assert!(
            r.repos().hosts(|h| h.upsert(&HostInfo { host_id: "h3".into(), ..Default::default() }, 7)).await.is_ok()
        );
        drop(r);

        // The old leader wrote after the load began (it was not dead after
        // all, or its last writes were still arriving): loaded again instead.
        let a = load_ahead(&follower, &rows, timing).unwrap();
        while !a.task.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        repos.hosts(move |h| h.upsert(&host("h2"), 6)).await.unwrap();
        follower.catch_up().await.unwrap();
        assert!(a.take(&rows, LOAD_AHEAD_WAIT).await.is_none(), "a registry missing h2 is never used");

        // A load ahead that does not finish (a read that hangs) is abandoned
        // after the wait, its reader shut down: the new leader loads again.
        follower.catch_up().await.unwrap();
        let reader = follower.reader().unwrap();
        let stuck = LoadAhead {
            at: rows.get(),
            t0: std::time::Instant::now(),
            suspected_at: std::time::Instant::now(),
            reader: reader.clone(),
            task: tokio::spawn(std::future::pending()),
        };
        let t = std::time::Instant::now();
        assert!(stuck.take(&rows, Duration::from_millis(200)).await.is_none(), "not used");
        assert!(t.elapsed() < Duration::from_secs(5), "waited {:?}", t.elapsed());
        let mut shut = false;
        for _ in 0..100 {
            if reader.call(|r| r.alarms().list(false)).await.is_err() {
                shut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(shut, "the abandoned load's reader is shut down");
        repos.shutdown().await.unwrap();
    }
}
