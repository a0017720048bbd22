//! Accepting connections so that no peer can exhaust them: the controller
//! does the TLS handshake itself, with a deadline and caps on concurrent
//! handshakes (overall and per source address); a connection limit derived
//! from `RLIMIT_NOFILE` keeps headroom that only operators' certificates and
//! agents of known hosts may use; connections that carry no request are
//! closed after an idle timeout; the accept loop survives running out of
//! descriptors. Every refusal is counted in metrics and logged, one line per
//! reason per period with a count. Finished `TlsStream`s go to tonic, which
//! reads the peer certificates from them as before.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use lifeboat_common::identity::{Identity, identity_from_der};
use lifeboat_common::tls::TlsMaterial;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tracing::{info, warn};

/// Descriptors kept out of the connection limit for everything else the
/// controller opens: the database and its journal, the metrics endpoint,
/// fence agents' pipes, backups, logs.
pub const FD_RESERVE: usize = 256;

/// Connections one client certificate (an operator's, a viewer's) may hold
/// at once: a CLI command uses one, `jobs watch` one each.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// Connections one agent (or controller) certificate may hold at once: an
/// agent uses one, and a replaced session may linger a moment.
pub const MAX_CONNECTIONS_PER_AGENT: usize = 4;

/// The address handshakes are counted under: an IPv4 address, or the /64
/// of an IPv6 one (one machine has a whole /64 to dial from).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// The limits the accept loop enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A TLS handshake not finished by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, from all peers.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address.
    pub max_handshakes_per_ip: usize,
    /// Connections (handshaking or established) at most; beyond it a new
    /// TCP connection is closed at once.
    pub max_connections: usize,
    /// Established connections above which only operators' certificates
    /// and agents of hosts the controller knows are kept.
    pub soft_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Pause of the accept loop after an accept error (out of descriptors).
    pub accept_backoff: Duration,
    /// At most one log line per refusal reason per period.
    pub log_period: Duration,
}

impl Limits {
    /// The limits for a process allowed `nofile` open descriptors.
    pub fn from_nofile(nofile: u64) -> Limits {
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        let max_connections = nofile.saturating_sub(FD_RESERVE).max(64);
        let max_handshakes = 256.min(max_connections / 4).max(8);
        let headroom = (max_connections / 10).max(max_handshakes);
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes,
            max_handshakes_per_ip: 32.min(max_handshakes),
            max_connections,
            soft_connections: max_connections.saturating_sub(headroom),
            idle_timeout: Duration::from_secs(300),
            accept_backoff: Duration::from_millis(100),
            log_period: Duration::from_secs(10),
        }
    }

    /// The limits for this process's current `RLIMIT_NOFILE`.
    pub fn for_this_process() -> Limits {
        Limits::from_nofile(lifeboat_common::open_files_limit().unwrap_or(1024))
    }
}

/// Why a connection was refused or closed by the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Refusal {
    /// `max_connections` reached.
    #[error("connection limit reached")]
    ConnectionLimit,
    /// One certificate already holds [`MAX_CONNECTIONS_PER_CLIENT`] (or
    /// [`MAX_CONNECTIONS_PER_AGENT`]) connections.
    #[error("too many connections with this certificate")]
    PerIdentity,
    /// `max_handshakes` reached.
    #[error("too many TLS handshakes in progress")]
    HandshakeLimit,
    /// `max_handshakes_per_ip` reached for the source address.
    #[error("too many TLS handshakes in progress from this address")]
    HandshakeLimitPerIp,
    /// Above `soft_connections`, and the certificate is neither an
    /// operator's nor a known host's agent's.
    #[error("connection headroom is kept for operators and known agents")]
    Reserved,
}

impl Refusal {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PerIdentity => "per_certificate_limit",
            Refusal::HandshakeLimit => "handshake_limit",
            Refusal::HandshakeLimitPerIp => "handshake_limit_per_ip",
            Refusal::Reserved => "reserved_for_known_peers",
        }
    }
}

/// Whether a new TCP connection from `ip` may start a handshake.
pub fn admit_tcp(limits: &Limits, total: usize, handshaking: usize, from_ip: usize) -> Result<(), Refusal> {
    if total >= limits.max_connections {
        Err(Refusal::ConnectionLimit)
    } else if handshaking >= limits.max_handshakes {
        Err(Refusal::HandshakeLimit)
    } else if from_ip >= limits.max_handshakes_per_ip {
        Err(Refusal::HandshakeLimitPerIp)
    } else {
        Ok(())
    }
}

/// Whether a connection that finished its handshake as `who` is kept, with
/// `established` connections already open. `known_agent` says whether an
/// agent's host is one the controller knows.
pub fn admit_identity(limits: &Limits, established: usize, who: &Identity, known_agent: bool) -> Result<(), Refusal> {
    if established < limits.soft_connections {
        return Ok(());
    }
    match who {
        Identity::Client { .. } => Ok(()),
        Identity::Agent { .. } if known_agent => Ok(()),
        _ => Err(Refusal::Reserved),
    }
}

/// One log line per key per period: [`RateLog::hit`] says when to write
/// one, and how many events it stands for.
#[derive(Debug)]
pub struct RateLog {
    period: Duration,
    seen: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl RateLog {
    /// A limiter that lets one line per key through every `period`.
    pub fn new(period: Duration) -> RateLog {
        RateLog { period, seen: Mutex::new(HashMap::new()) }
    }

    /// Records one event for `key` at `now`; returns the number of events
    /// (this one included) the line to write now stands for, or `None`
    /// when a line for `key` was written less than a period ago.
    pub fn hit(&self, key: &'static str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let e = seen.entry(key).or_insert((None, 0));
        e.1 = e.1.saturating_add(1);
        match e.0 {
            Some(last) if now.saturating_duration_since(last) < self.period => None,
            _ => {
                e.0 = Some(now);
                Some(std::mem::take(&mut e.1))
            }
        }
    }

    /// The keys whose events since their last line have waited a whole
    /// period without a line, with their counts (reset): so a burst that
    /// stops is still reported in full.
    pub fn drain(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (k, e) in seen.iter_mut() {
            if e.1 > 0 && e.0.is_none_or(|last| now.saturating_duration_since(last) >= self.period) {
                e.0 = Some(now);
                out.push((*k, std::mem::take(&mut e.1)));
            }
        }
        out.sort_unstable();
        out
    }
}

/// Counts a metrics-endpoint connection closed at its connection cap
/// (`lifeboat_connections_refused_total{reason="metrics_limit"}`).
pub fn count_metrics_refused() {
    count_refused("metrics_limit");
}

fn count_refused(reason: &'static str) {
    crate::telemetry::get()
        .connections_refused
        .get_or_create(&crate::telemetry::ReasonLabels { reason: reason.into() })
        .inc();
}

fn count_handshake_failure(reason: &'static str) {
    crate::telemetry::get()
        .handshake_failures
        .get_or_create(&crate::telemetry::ReasonLabels { reason: reason.into() })
        .inc();
}

/// Counts and logs (rate-limited) a request refused by the rpc layer:
/// `reason` is "permission_denied", "unauthenticated" or an agent-session
/// refusal; `who` the certificate identity (or "none").
pub fn request_denied(reason: &'static str, who: &str, peer: Option<SocketAddr>, detail: &str) {
    static LOG: std::sync::OnceLock<RateLog> = std::sync::OnceLock::new();
    crate::telemetry::get()
        .requests_denied
        .get_or_create(&crate::telemetry::ReasonLabels { reason: reason.into() })
        .inc();
    let log = LOG.get_or_init(|| RateLog::new(Duration::from_secs(10)));
    if let Some(n) = log.hit(reason, Instant::now()) {
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        warn!(reason, certificate = %who, %peer, count = n, "request refused: {detail} ({n} refused for this reason since the last such line)");
    }
}

/// What the controller knows of one open connection.
#[derive(Debug)]
pub struct ConnState {
    peer: SocketAddr,
    who: String,
    killed: AtomicBool,
    waker: AtomicWaker,
    in_flight: AtomicUsize,
    last_active_ms: AtomicI64,
}

impl ConnState {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn idle_for_ms(&self, now_ms: i64) -> Option<i64> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| now_ms.saturating_sub(self.last_active_ms.load(Ordering::SeqCst)))
    }
}

#[derive(Default)]
struct Counts {
    handshaking: usize,
    per_ip: HashMap<IpAddr, usize>,
    open: HashMap<SocketAddr, Arc<ConnState>>,
    /// Handshakes in progress, oldest first: at the cap the oldest is
    /// dropped for a new one (an honest handshake takes milliseconds; a
    /// stalled one holds its slot until evicted or its deadline).
    pending: std::collections::BTreeMap<u64, (IpAddr, Arc<tokio::sync::Notify>)>,
    next_id: u64,
    per_who: HashMap<String, usize>,
}

/// The connections of one listener, and its limits.
pub struct Table {
    limits: Limits,
    counts: Mutex<Counts>,
    log: RateLog,
}

impl Table {
    /// An empty table enforcing `limits`.
    pub fn new(limits: Limits) -> Arc<Table> {
        let log = RateLog::new(limits.log_period);
        Arc::new(Table { limits, counts: Mutex::new(Counts::default()), log })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the counts as gauges (the process's one listener).
    fn publish(c: &Counts) {
        let t = crate::telemetry::get();
        t.connections_open.set(i64::try_from(c.open.len()).unwrap_or(i64::MAX));
        t.handshakes_in_progress.set(i64::try_from(c.handshaking).unwrap_or(i64::MAX));
    }

    /// Connections established now.
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// Handshakes in progress now.
    pub fn handshaking(&self) -> usize {
        self.lock().handshaking
    }

    /// The open connections, as "identity@peer".
    pub fn describe_open(&self) -> Vec<String> {
        self.lock().open.values().map(|c| format!("{}@{}", c.who, c.peer)).collect()
    }

    /// Closes every open connection.
    pub fn close_all(&self) {
        for c in self.lock().open.values() {
            c.kill();
        }
    }

    fn refuse(&self, reason: &'static str, peer: SocketAddr, what: &str) {
        count_refused(reason);
        if let Some(n) = self.log.hit(reason, Instant::now()) {
            warn!(reason, %peer, count = n, "connection refused: {what} ({n} for this reason since the last such line)");
        }
    }

    fn handshake_failed(&self, reason: &'static str, peer: SocketAddr, what: &str) {
        count_handshake_failure(reason);
        if let Some(n) = self.log.hit(reason, Instant::now()) {
            warn!(reason, %peer, count = n, "TLS handshake failed: {what} ({n} for this reason since the last such line)");
        }
    }

    fn start_handshake(self: &Arc<Self>, peer: SocketAddr) -> Result<HandshakeSlot, Refusal> {
        let mut c = self.lock();
        let ip = source_key(peer.ip());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        let total = c.open.len().saturating_add(c.handshaking);
        // At the handshake cap the oldest handshake still in progress makes
        // room, unless this address is over its own cap or there is no room
        // at all: peers that dial and stall from many addresses cannot keep
        // operators and agents out.
        let evict = c.handshaking >= self.limits.max_handshakes
            && total < self.limits.max_connections
            && from_ip < self.limits.max_handshakes_per_ip;
        if evict && let Some((_, (old_ip, stop))) = c.pending.pop_first() {
            Self::release(&mut c, old_ip);
            // Its task logs and counts it ("evicted").
            stop.notify_one();
        }
        let total = c.open.len().saturating_add(c.handshaking);
        admit_tcp(&self.limits, total, c.handshaking, from_ip)?;
        c.handshaking = c.handshaking.saturating_add(1);
        let n = c.per_ip.entry(ip).or_insert(0);
        *n = n.saturating_add(1);
        let id = c.next_id;
        c.next_id = c.next_id.wrapping_add(1);
        let stop = Arc::new(tokio::sync::Notify::new());
        c.pending.insert(id, (ip, stop.clone()));
        Self::publish(&c);
        Ok(HandshakeSlot { table: self.clone(), id, stop })
    }

    fn release(c: &mut Counts, ip: IpAddr) {
        c.handshaking = c.handshaking.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }

    fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        who: &Identity,
        known_agent: bool,
    ) -> Result<Arc<ConnState>, Refusal> {
        let mut c = self.lock();
        admit_identity(&self.limits, c.open.len(), who, known_agent)?;
        let key = who.to_string();
        let cap = match who {
            Identity::Client { .. } => MAX_CONNECTIONS_PER_CLIENT,
            _ => MAX_CONNECTIONS_PER_AGENT,
        };
        let held = c.per_who.get(&key).copied().unwrap_or(0);
        if held >= cap {
            return Err(Refusal::PerIdentity);
        }
        c.per_who.insert(key, held.saturating_add(1));
        let st = Arc::new(ConnState {
            peer,
            who: who.to_string(),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicI64::new(crate::now_ms()),
        });
        c.open.insert(peer, st.clone());
        Self::publish(&c);
        Ok(st)
    }

    fn unregister(&self, st: &Arc<ConnState>) {
        let mut c = self.lock();
        if c.open.get(&st.peer).is_some_and(|x| Arc::ptr_eq(x, st)) {
            c.open.remove(&st.peer);
            if let Some(n) = c.per_who.get_mut(&st.who) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_who.remove(&st.who);
                }
            }
        }
        Self::publish(&c);
    }

    fn lookup(&self, peer: SocketAddr) -> Option<Arc<ConnState>> {
        self.lock().open.get(&peer).cloned()
    }

    /// Closes connections idle for longer than the idle timeout; returns
    /// how many.
    pub fn reap_idle(&self) -> usize {
        let limit = i64::try_from(self.limits.idle_timeout.as_millis()).unwrap_or(i64::MAX);
        let now = crate::now_ms();
        let mut n = 0usize;
        for c in self.lock().open.values() {
            if !c.killed.load(Ordering::SeqCst) && c.idle_for_ms(now).is_some_and(|idle| idle >= limit) {
                c.kill();
                n = n.saturating_add(1);
            }
        }
        if n > 0 {
            for _ in 0..n {
                crate::telemetry::get()
                    .connections_closed
                    .get_or_create(&crate::telemetry::ReasonLabels { reason: "idle".into() })
                    .inc();
            }
            if let Some(k) = self.log.hit("idle", Instant::now()) {
                info!(
                    closed = n,
                    count = k,
                    "closed connections that carried no request for {} s",
                    self.limits.idle_timeout.as_secs()
                );
            }
        }
        n
    }
}

struct HandshakeSlot {
    table: Arc<Table>,
    id: u64,
    stop: Arc<tokio::sync::Notify>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self.table.lock();
        // An evicted handshake was released when it was evicted.
        if let Some((ip, _)) = c.pending.remove(&self.id) {
            Table::release(&mut c, ip);
        }
        Table::publish(&c);
    }
}

/// An established connection, as tonic serves it: the TLS stream plus the
/// controller's hold on it (closed when idle or at shutdown).
pub struct Conn {
    inner: TlsStream<TcpStream>,
    state: Arc<ConnState>,
    table: Arc<Table>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.unregister(&self.state);
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by the controller (idle or shutting down)")
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.state.waker.register(cx.waker());
        if self.state.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.state.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.state.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A TLS configuration could not be built from the controller's files.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    /// A PEM block could not be read.
    #[error("reading {what}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The server side of mutual TLS: our certificate, client certificates
/// required and verified against the CA, HTTP/2 only (as tonic sets it).
pub fn server_config(m: &TlsMaterial) -> Result<rustls::ServerConfig, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem =
        |what: &'static str| move |e: rustls::pki_types::pem::Error| TlsSetupError::Pem { what, reason: e.to_string() };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&m.ca_pem) {
        roots.add(c.map_err(pem("CA bundle"))?).map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    }
    let certs =
        CertificateDer::pem_slice_iter(&m.cert_pem).collect::<Result<Vec<_>, _>>().map_err(pem("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(&m.key_pem).map_err(pem("private key"))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The metric label of a failed handshake.
fn handshake_reason(e: &io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => "client_certificate",
        Some(rustls::Error::AlertReceived(_)) => "alert_received",
        Some(_) => "protocol",
        None => "io",
    }
}

/// Accepts on `listener` until the returned stream is dropped; yields
/// finished, admitted connections. `known_agent` tells whether an agent
/// certificate's host is known to the controller.
pub fn incoming(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    table: Arc<Table>,
    known_agent: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> (tokio_stream::wrappers::ReceiverStream<Result<Conn, io::Error>>, tokio::task::JoinHandle<()>) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = mpsc::channel::<Result<Conn, io::Error>>(256);
    let task = tokio::spawn(async move {
        let mut reaper = tokio::time::interval(
            table.limits.idle_timeout.div_f64(10.0).clamp(Duration::from_millis(50), Duration::from_secs(5)),
        );
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                _ = reaper.tick() => {
                    table.reap_idle();
                    for (reason, n) in table.log.drain(Instant::now()) {
                        warn!(reason, count = n, "{n} more connections refused or handshakes failed for this reason since the last such line");
                    }
                    continue;
                }
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE/ENFILE and the like: the pending connection
                        // stays in the backlog; pause rather than spin.
                        count_refused("accept_error");
                        if let Some(n) = table.log.hit("accept_error", Instant::now()) {
                            warn!(count = n, "cannot accept a connection: {e} (descriptors exhausted?); pausing {} ms", table.limits.accept_backoff.as_millis());
                        }
                        tokio::time::sleep(table.limits.accept_backoff).await;
                        continue;
                    }
                },
            };
            let slot = match table.start_handshake(peer) {
                Ok(s) => s,
                Err(r) => {
                    table.refuse(r.reason(), peer, &r.to_string());
                    drop(tcp);
                    continue;
                }
            };
            // Replies go out at once: without TCP_NODELAY a reply of more than
            // one segment waits for the client's delayed ACK (~40 ms per plan
            // or list).
            let _ = tcp.set_nodelay(true);
            let (acceptor, table, tx, known_agent) = (acceptor.clone(), table.clone(), tx.clone(), known_agent.clone());
            tokio::spawn(async move {
                let stop = slot.stop.clone();
                let handshake = tokio::select! {
                    r = tokio::time::timeout(table.limits.handshake_timeout, acceptor.accept(tcp)) => r,
                    _ = stop.notified() => {
                        table.handshake_failed("evicted", peer, "dropped for a newer handshake while all handshake slots were taken");
                        return;
                    }
                };
                let tls = match handshake {
                    Err(_) => {
                        table.handshake_failed(
                            "timeout",
                            peer,
                            &format!("not finished within {} s", table.limits.handshake_timeout.as_secs()),
                        );
                        return;
                    }
                    Ok(Err(e)) => {
                        table.handshake_failed(handshake_reason(&e), peer, &e.to_string());
                        return;
                    }
                    Ok(Ok(s)) => s,
                };
                drop(slot);
                let who = match tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| identity_from_der(c.as_ref()))
                {
                    Some(Ok(who)) => who,
                    Some(Err(e)) => {
                        table.handshake_failed(
                            "no_identity",
                            peer,
                            &format!("certificate names no Lifeboat identity: {e}"),
                        );
                        return;
                    }
                    None => {
                        table.handshake_failed("client_certificate", peer, "no client certificate");
                        return;
                    }
                };
                // The registry is asked only above the soft limit: 10,000
                // agents dialing after a restart need no lookup each.
                let known = match &who {
                    Identity::Agent { host_id } if table.open() >= table.limits.soft_connections => {
                        known_agent(host_id)
                    }
                    _ => false,
                };
                let state = match table.register(peer, &who, known) {
                    Ok(s) => s,
                    Err(r) => {
                        table.refuse(r.reason(), peer, &format!("{r} ({who})"));
                        return;
                    }
                };
                let _ = tx.send(Ok(Conn { inner: tls, state, table: table.clone() })).await;
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// A service wrapper that marks a connection busy while any of its requests
/// (including the whole response stream) is in flight, so the idle timeout
/// closes only connections that carry nothing.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, table: Arc<Table>) -> Self {
        Tracked { inner, table }
    }
}

struct InFlight(Option<Arc<ConnState>>);

impl InFlight {
    fn start(c: Option<Arc<ConnState>>) -> InFlight {
        if let Some(c) = &c {
            c.in_flight.fetch_add(1, Ordering::SeqCst);
            c.last_active_ms.store(crate::now_ms(), Ordering::SeqCst);
        }
        InFlight(c)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.last_active_ms.store(crate::now_ms(), Ordering::SeqCst);
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The connection a request came on, for handlers whose response is a
/// stream: [`busy`] keeps it from being closed as idle.
#[derive(Clone)]
pub struct ConnHandle(Arc<ConnState>);

/// Marks the connection `req` came on busy until the guard is dropped
/// (for streaming responses, which outlive their handler).
pub fn busy<T>(req: &tonic::Request<T>) -> Option<Busy> {
    req.extensions().get::<ConnHandle>().map(|h| Busy(InFlight::start(Some(h.0.clone()))))
}

/// Keeps a connection from being closed as idle while it lives.
pub struct Busy(#[allow(dead_code)] InFlight);

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Tracked<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<B>) -> Self::Future {
        let conn = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .and_then(|a| self.table.lookup(a));
        if let Some(c) = &conn {
            req.extensions_mut().insert(ConnHandle(c.clone()));
        }
        let busy = InFlight::start(conn);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(busy);
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::identity::Role;

    fn limits() -> Limits {
        Limits {
            max_connections: 100,
            soft_connections: 80,
            max_handshakes: 10,
            max_handshakes_per_ip: 3,
            ..Limits::from_nofile(1024)
        }
    }

    #[test]
    fn limits_follow_the_descriptor_limit_and_keep_headroom() {
        let l = Limits::from_nofile(65536);
        assert_eq!(l.max_connections, 65536 - FD_RESERVE);
        assert_eq!(l.max_handshakes, 256);
        assert_eq!(l.max_handshakes_per_ip, 32);
        assert_eq!(l.soft_connections, l.max_connections - l.max_connections / 10);
        let small = Limits::from_nofile(1024);
        assert_eq!(small.max_connections, 768);
        assert_eq!(small.max_handshakes, 192);
        assert_eq!(small.soft_connections, 768 - 192);
        let tiny = Limits::from_nofile(10);
        assert!(tiny.max_connections >= 64 && tiny.soft_connections < tiny.max_connections && tiny.max_handshakes >= 8);
        assert_eq!(Limits::from_nofile(u64::MAX).max_handshakes, 256);
    }

    #[test]
    fn tcp_admission_checks_total_then_handshakes_then_the_address() {
        let l = limits();
        assert_eq!(admit_tcp(&l, 0, 0, 0), Ok(()));
        assert_eq!(admit_tcp(&l, 100, 0, 0), Err(Refusal::ConnectionLimit));
        assert_eq!(admit_tcp(&l, 50, 10, 0), Err(Refusal::HandshakeLimit));
        assert_eq!(admit_tcp(&l, 50, 9, 3), Err(Refusal::HandshakeLimitPerIp));
        assert_eq!(admit_tcp(&l, 99, 9, 2), Ok(()));
    }

    #[test]
    fn above_the_soft_limit_only_operators_and_known_agents_are_kept() {
        let l = limits();
        let agent = Identity::Agent { host_id: "h1".into() };
        let viewer = Identity::Client { name: "v".into(), role: Role::Viewer };
        assert_eq!(admit_identity(&l, 79, &agent, false), Ok(()));
        assert_eq!(admit_identity(&l, 80, &agent, false), Err(Refusal::Reserved));
        assert_eq!(admit_identity(&l, 80, &agent, true), Ok(()));
        assert_eq!(admit_identity(&l, 99, &viewer, false), Ok(()));
        assert_eq!(Refusal::Reserved.reason(), "reserved_for_known_peers");
    }

    #[test]
    fn the_rate_limited_log_writes_one_line_per_reason_per_period_with_the_count() {
        let log = RateLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.hit("a", t0), Some(1));
        for i in 1..1000 {
            assert_eq!(log.hit("a", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.hit("b", t0 + Duration::from_secs(1)), Some(1), "another reason has its own line");
        assert_eq!(log.hit("a", t0 + Duration::from_secs(10)), Some(1000), "the line counts the suppressed ones");
        assert_eq!(log.hit("a", t0 + Duration::from_secs(11)), None);
        assert_eq!(log.hit("a", t0 + Duration::from_secs(20)), Some(2));
        assert!(log.drain(t0 + Duration::from_secs(21)).is_empty(), "nothing pending");
        assert_eq!(log.hit("a", t0 + Duration::from_secs(22)), None);
        assert_eq!(log.hit("a", t0 + Duration::from_secs(23)), None);
        assert!(log.drain(t0 + Duration::from_secs(25)).is_empty(), "a period has not passed");
        assert_eq!(log.drain(t0 + Duration::from_secs(30)), vec![("a", 2)], "a burst that stopped is reported");
        assert!(log.drain(t0 + Duration::from_secs(45)).is_empty());
    }

    #[tokio::test]
    async fn at_the_handshake_cap_the_oldest_stalled_handshake_makes_room() {
        let t = Table::new(limits());
        let ip = |i: u8, port| SocketAddr::from(([10, 0, 1, i], port));
        // 10 stalled handshakes from 4 addresses fill every slot.
        let mut held = Vec::new();
        for i in 0..10u16 {
            held.push(t.start_handshake(ip(u8::try_from(i / 3).unwrap(), i)).unwrap());
        }
        assert_eq!(t.handshaking(), 10);
        // An operator dialing from elsewhere still gets a slot: the oldest
        // stalled one is told to stop, and its slot is already counted free.
        let first_stop = held[0].stop.clone();
        let op = t.start_handshake(SocketAddr::from(([192, 168, 0, 9], 1))).expect("room made");
        assert_eq!(t.handshaking(), 10);
        tokio::time::timeout(Duration::from_secs(1), first_stop.notified()).await.expect("the oldest was told to stop");
        assert_eq!(t.lock().per_ip.get(&ip(0, 0).ip()), Some(&2));
        // Dropping the evicted slot later releases nothing twice.
        drop(held.remove(0));
        assert_eq!(t.handshaking(), 10);
        drop(op);
        drop(held);
        assert_eq!(t.handshaking(), 0);
        assert!(t.lock().per_ip.is_empty() && t.lock().pending.is_empty());
        // An address at its own cap evicts nobody.
        let mine: Vec<_> = (1..=3).map(|p| t.start_handshake(ip(7, p)).unwrap()).collect();
        assert_eq!(t.start_handshake(ip(7, 4)).err(), Some(Refusal::HandshakeLimitPerIp));
        drop(mine);
        // IPv6 peers are counted per /64.
        let v6 = |last: u16| SocketAddr::from((std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last), 1));
        let v6s: Vec<_> = (1..=3).map(|i| t.start_handshake(v6(i)).unwrap()).collect();
        assert_eq!(t.start_handshake(v6(99)).err(), Some(Refusal::HandshakeLimitPerIp));
        drop(v6s);
    }

    #[test]
    fn one_certificate_cannot_hold_every_connection() {
        let t = Table::new(Limits { max_connections: 10_000, soft_connections: 9_000, ..limits() });
        let viewer = Identity::Client { name: "v".into(), role: Role::Viewer };
        let mut held = Vec::new();
        for port in 0..u16::try_from(MAX_CONNECTIONS_PER_CLIENT).unwrap() {
            held.push(t.register(SocketAddr::from(([10, 0, 2, 1], port)), &viewer, false).unwrap());
        }
        assert_eq!(
            t.register(SocketAddr::from(([10, 0, 2, 1], 9999)), &viewer, false).err(),
            Some(Refusal::PerIdentity)
        );
        let other = Identity::Client { name: "olga".into(), role: Role::Operator };
        assert!(
            t.register(SocketAddr::from(([10, 0, 2, 2], 1)), &other, false).is_ok(),
            "another certificate has its own cap"
        );
        let agent = Identity::Agent { host_id: "h".into() };
        for port in 0..u16::try_from(MAX_CONNECTIONS_PER_AGENT).unwrap() {
            held.push(t.register(SocketAddr::from(([10, 0, 2, 3], port)), &agent, true).unwrap());
        }
        assert_eq!(t.register(SocketAddr::from(([10, 0, 2, 3], 999)), &agent, true).err(), Some(Refusal::PerIdentity));
        let st = held.pop().unwrap();
        t.unregister(&st);
        assert!(
            t.register(SocketAddr::from(([10, 0, 2, 3], 998)), &agent, true).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn a_table_counts_handshakes_per_address_and_frees_them() {
        let t = Table::new(limits());
        let p = |port| SocketAddr::from(([10, 0, 0, 1], port));
        let slots: Vec<_> = (1..=3).map(|i| t.start_handshake(p(i)).unwrap()).collect();
        assert_eq!(t.start_handshake(p(4)).err(), Some(Refusal::HandshakeLimitPerIp));
        assert!(t.start_handshake(SocketAddr::from(([10, 0, 0, 2], 1))).is_ok(), "another address has its own cap");
        assert_eq!(t.handshaking(), 3, "the other address's slot was dropped at once");
        drop(slots);
        assert_eq!(t.handshaking(), 0);
        assert!(t.lock().per_ip.is_empty());
        let st = t.register(p(9), &Identity::Client { name: "o".into(), role: Role::Operator }, false).unwrap();
        assert_eq!(t.open(), 1);
        assert_eq!(t.reap_idle(), 0, "not idle yet");
        st.last_active_ms.store(0, Ordering::SeqCst);
        st.in_flight.store(1, Ordering::SeqCst);
        assert_eq!(t.reap_idle(), 0, "a request in flight keeps it");
        st.in_flight.store(0, Ordering::SeqCst);
        assert_eq!(t.reap_idle(), 1);
        assert!(st.killed.load(Ordering::SeqCst));
        t.unregister(&st);
        assert_eq!(t.open(), 0);
    }
}
