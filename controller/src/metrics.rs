//! Prometheus metrics (text exposition), served on `metrics_listen` when
//! configured: hosts by status and liveness, guests by state, jobs by kind
//! and state, and active alarms (split brain, stale copies) per host.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

use crate::registry::Registry;

type Labels = Vec<(String, String)>;

fn family(reg: &mut PromRegistry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

/// Renders every metric now.
pub fn render(reg: &Registry) -> String {
    let mut p = PromRegistry::with_prefix("lifeboat");
    let hosts = family(&mut p, "hosts", "Hosts by operators' status and liveness");
    let guests = family(&mut p, "guests", "Guests by reported state");
    let jobs = family(&mut p, "jobs", "Jobs by kind and state");
    let alarms = family(&mut p, "alarms_active", "Active alarms by host and kind (split-brain, stale-copy-running)");
    for h in reg.list_hosts() {
        hosts.get_or_create(&vec![("status".into(), h.status.clone()), ("liveness".into(), h.liveness.clone())]).inc();
    }
    for (state, n) in reg.guest_state_counts() {
        guests.get_or_create(&vec![("state".into(), lifeboat_proto::state_name(state).into())]).set(n as i64);
    }
    // Blocks on the store thread: `serve` renders on a blocking thread.
    if let Ok(js) = reg.repos().call_blocking(|r| r.jobs().list(None, u32::MAX)) {
        for j in js {
            jobs.get_or_create(&vec![
                ("kind".into(), j.kind.as_str().into()),
                ("state".into(), j.state.as_str().into()),
            ])
            .inc();
        }
    }
    for (host, kind, _) in reg.active_alarms() {
        alarms.get_or_create(&vec![("host".into(), host), ("kind".into(), kind)]).inc();
    }
    let waiting = family(
        &mut p,
        "guests_waiting",
        "Guests waiting to run again on their own host, by host (lifeboat vms list shows why)",
    );
    for (host, n) in crate::waiting::counts(reg) {
        waiting.get_or_create(&vec![("host".into(), host)]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    p.register(
        "agent_messages_refused",
        "Agent messages refused whole by the intake (docs/security.md, Agent input), by message kind",
        refused_family().clone(),
    );
    register_ha(&mut p);
    let mut gauges = String::new();
    let _ = encode(&mut gauges, &p);
    // One exposition: the event-driven metrics, then the gauges (which end with `# EOF`).
    let mut out = crate::telemetry::get().encode();
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&gauges);
    out
}

/// High availability as this process sees it (etcd backend; with SQLite
/// the controller always leads at epoch 0).
struct Ha {
    leader: Gauge,
    epoch: Gauge,
    leader_changes: prometheus_client::metrics::counter::Counter,
}

fn ha() -> &'static Ha {
    static H: std::sync::OnceLock<Ha> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        let h = Ha { leader: Gauge::default(), epoch: Gauge::default(), leader_changes: Default::default() };
        h.leader.set(1);
        h
    })
}

fn register_ha(p: &mut PromRegistry) {
    let h = ha();
    p.register(
        "controller_leader",
        "1 when this controller leads (always with SQLite), 0 for a follower",
        h.leader.clone(),
    );
    p.register(
        "controller_epoch",
        "The fencing epoch this controller commands with (0 with SQLite or as a follower)",
        h.epoch.clone(),
    );
    p.register(
        "controller_leader_changes",
        "Changes of the elected leader this controller saw (etcd backend)",
        h.leader_changes.clone(),
    );
    register_etcd(p);
}

/// The etcd backend's write figures (all 0 with SQLite).
fn register_etcd(p: &mut PromRegistry) {
    use prometheus_client::metrics::counter::Counter;
    let st = crate::store::etcd::stats();
    let counter = |v: u64| {
        let c: Counter = Counter::default();
        c.inc_by(v);
        c
    };
    p.register(
        "controller_etcd_txns",
        "etcd transactions the leader sent (one per store call that changed rows)",
        counter(st.txns),
    );
    p.register(
        "controller_etcd_txn_failures",
        "etcd transactions refused or failed (error, timeout, leadership guard)",
        counter(st.failures),
    );
    p.register(
        "controller_etcd_resends",
        "etcd requests sent again after a transport failure (an etcd member down)",
        counter(st.resends),
    );
    p.register(
        "controller_etcd_rows_refused",
        "Rows read from etcd that did not decode and were not applied to the local cache",
        counter(st.refused_rows),
    );
    let last: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    // Microseconds as f64: exact far beyond any latency.
    #[allow(clippy::cast_precision_loss)]
    last.set(st.last_latency_us as f64 / 1e6);
    p.register("controller_etcd_txn_latency_last_seconds", "The last etcd transaction's latency", last);
    let mean: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    #[allow(clippy::cast_precision_loss)]
    mean.set(if st.txns == 0 { 0.0 } else { st.latency_sum_us as f64 / 1e6 / st.txns as f64 });
    p.register("controller_etcd_txn_latency_mean_seconds", "Mean etcd transaction latency since start", mean);
    let slow: Gauge = Gauge::default();
    let over_100ms: u64 = st
        .latency_buckets
        .iter()
        .zip(crate::store::etcd::LATENCY_BUCKETS_MS.iter().map(Some).chain(std::iter::once(None)))
        .filter(|(_, b)| b.is_none_or(|b| *b > 100))
        .map(|(n, _)| *n)
        .sum();
    slow.set(i64::try_from(over_100ms).unwrap_or(i64::MAX));
    p.register("controller_etcd_txns_over_100ms", "etcd transactions slower than 100 ms since start", slow);
}

fn render_ha() -> String {
    let mut p = PromRegistry::with_prefix("lifeboat");
    register_ha(&mut p);
    let mut out = String::new();
    let _ = encode(&mut out, &p);
    out
}

/// Counts a change of the leader when `url` is not the one seen last.
fn saw_leader(url: &str) {
    static LAST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.as_deref() != Some(url) {
        if last.is_some() {
            ha().leader_changes.inc();
        }
        *last = Some(url.to_string());
    }
}

/// This process is a follower of the etcd backend: `lifeboat_controller_leader`
/// 0, and every change of the leader `hint` names is counted.
pub fn ha_follower(mut hint: tokio::sync::watch::Receiver<crate::ha::election::LeaderHint>) {
    let h = ha();
    h.leader.set(0);
    h.epoch.set(0);
    tokio::spawn(async move {
        while hint.changed().await.is_ok() {
            let url = match &*hint.borrow_and_update() {
                crate::ha::election::LeaderHint::Leader(u, _) => u.clone(),
                _ => continue,
            };
            saw_leader(&url);
        }
    });
}

/// This process (advertised as `url`) leads at `epoch`.
pub fn ha_leading(epoch: u64, url: &str) {
    let h = ha();
    h.leader.set(1);
    h.epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    saw_leader(url);
}

fn refused_family() -> &'static Family<Labels, prometheus_client::metrics::counter::Counter> {
    static F: std::sync::OnceLock<Family<Labels, prometheus_client::metrics::counter::Counter>> =
        std::sync::OnceLock::new();
    F.get_or_init(Family::default)
}

/// Counts an agent message the intake refused (`kind`: "Inventory",
/// "GuestChanged", ...; no host label, so the series stay few).
pub fn agent_message_refused(kind: &str) {
    refused_family().get_or_create(&vec![("kind".into(), kind.into())]).inc();
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve(reg: Arc<Registry>, listener: tokio::net::TcpListener) {
    serve_source(Source::of(reg), listener).await
}

/// Where metrics come from: the registry once there is one (a follower of
/// the etcd backend has none yet and serves the process's own metrics).
#[derive(Clone, Default)]
pub struct Source(Arc<std::sync::OnceLock<Arc<Registry>>>);

impl Source {
    /// No registry yet.
    pub fn empty() -> Source {
        Source::default()
    }

    /// A source with `reg`.
    pub fn of(reg: Arc<Registry>) -> Source {
        let s = Source::default();
        let _ = s.0.set(reg);
        s
    }

    /// Sets the registry (the first call counts); false if already set.
    pub fn set(&self, reg: Arc<Registry>) -> bool {
        self.0.set(reg).is_ok()
    }

    /// The registry, once set.
    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.0.get()
    }
}

/// Renders the metrics `source` has now.
pub fn render_source(source: &Source) -> String {
    match source.registry() {
        Some(reg) => render(reg),
        None => {
            let mut out = crate::telemetry::get().encode();
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&render_ha());
            out
        }
    }
}

/// Serves `GET /metrics` from `source` until the task is aborted.
pub async fn serve_source(source: Source, listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = source.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    tokio::task::spawn_blocking(move || render_source(&source)).await.unwrap_or_default(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(Bounded::new(listener), app).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

/// Connections the metrics endpoint serves at once; a connection past it is
/// closed at once (a scraper dials again), so the unauthenticated endpoint
/// never holds more descriptors than this.
pub const MAX_METRICS_CONNECTIONS: usize = 32;

/// How long one metrics connection may stay open, idle or not: a scrape
/// takes milliseconds, and a peer that opens connections and sends nothing
/// must not keep them.
pub const METRICS_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The metrics listener with [`MAX_METRICS_CONNECTIONS`] and
/// [`METRICS_CONNECTION_LIFETIME`].
struct Bounded {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Bounded {
    fn new(inner: tokio::net::TcpListener) -> Self {
        Bounded { inner, permits: Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS)) }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Limited;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Limited, std::net::SocketAddr) {
        loop {
            let (tcp, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors: the connection waits in the backlog.
                    tracing::debug!("metrics endpoint: cannot accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let deadline = Box::pin(tokio::time::sleep(METRICS_CONNECTION_LIFETIME));
                    return (Limited { tcp, deadline, _permit: permit }, addr);
                }
                Err(_) => {
                    crate::conn::count_metrics_refused();
                    drop(tcp);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// One metrics connection: closed when its lifetime is over.
struct Limited {
    tcp: tokio::net::TcpStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Limited {
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        use std::future::Future as _;
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn lifetime_over() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "metrics connection lifetime over")
}

impl tokio::io::AsyncRead for Limited {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(lifetime_over()));
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(lifetime_over()));
        }
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::host::Timing;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_metrics_endpoint_holds_at_most_its_cap_of_connections() {
        let reg = Arc::new(
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap(),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve(reg, l));
        let mut idle = Vec::new();
        for _ in 0..MAX_METRICS_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Past the cap: closed by the endpoint at once (EOF), not held.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 16];
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(5), extra.read(&mut b)).await.expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // The ones within the cap are served.
        let c = &mut idle[0];
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), c.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0 && b.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&b[..n]));
        server.abort();
    }

    #[test]
    fn alarms_and_hosts_are_exposed() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        reg.open_session("host-a", "boot", tx).unwrap();
        reg.raise_alarm_blocking("host-a", "split-brain", "came back with the same boot id").unwrap();
        let text = render(&reg);
        assert!(text.contains("lifeboat_alarms_active{host=\"host-a\",kind=\"split-brain\"} 1"), "{text}");
        assert!(text.contains("lifeboat_hosts{status=\"AVAILABLE\",liveness=\"REACHABLE\"} 1"), "{text}");
    }
}
