//! The dashboard's HTTPS listener: an `axum::serve::Listener` over
//! tokio-rustls with a bound on connections (in total and per source
//! address) and a deadline on each TLS handshake, so a peer that opens
//! connections and sends nothing cannot hold the accept loop or more than
//! its share of descriptors.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// Connections the dashboard holds at once (handshaking or served).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source address (an IPv6 /64) may hold at once.
pub const MAX_PER_SOURCE: usize = 32;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with nothing read or written for this long is closed (an
/// open live page gets a keep-alive every 15 s, so it stays).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the listener cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The certificate or key does not read.
    #[error("dashboard certificate or key: {0}")]
    Pem(String),
    /// rustls refused them.
    #[error("dashboard TLS setup: {0}")]
    Rustls(String),
}

/// The TLS configuration browsers see: no client certificate, ALPN h2 and
/// http/1.1 (with h2 every tab shares one connection).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, ListenerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ListenerError::Pem(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ListenerError::Pem("no certificate in the PEM file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| ListenerError::Pem(format!("private key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ListenerError::Rustls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Connections held per source.
type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A slot of the per-source count, given back on drop.
struct SourceSlot {
    table: PerSource,
    key: IpAddr,
}

impl SourceSlot {
    fn take(table: &PerSource, key: IpAddr) -> Option<SourceSlot> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(key).or_insert(0);
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot { table: table.clone(), key })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.key);
            }
        }
    }
}

/// The dashboard's listener: accepted, handshaken connections.
pub struct DashListener {
    ready: mpsc::Receiver<(DashConn, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for DashListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl DashListener {
    /// Starts accepting on `tcp` with `tls`.
    pub fn new(tcp: TcpListener, tls: rustls::ServerConfig) -> std::io::Result<Self> {
        Self::with_idle(tcp, tls, IDLE_TIMEOUT)
    }

    /// [`DashListener::new`] with another idle timeout (tests).
    pub fn with_idle(tcp: TcpListener, tls: rustls::ServerConfig, idle: Duration) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept_loop(tcp, TlsAcceptor::from(Arc::new(tls)), tx, idle));
        Ok(DashListener { ready, local, acceptor })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(DashConn, SocketAddr)>,
    idle: Duration,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source: PerSource = Arc::default();
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors: the connection waits in the backlog.
                tracing::debug!("dashboard: cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::conn::request_denied(
                "dashboard_connections",
                "none",
                Some(peer),
                "dashboard connection cap reached",
            );
            continue;
        };
        let Some(slot) = SourceSlot::take(&per_source, crate::conn::source_key(peer.ip())) else {
            crate::conn::request_denied("dashboard_connections", "none", Some(peer), "too many connections from it");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let conn = DashConn {
                        tls: Box::new(tls),
                        idle,
                        deadline: Box::pin(tokio::time::sleep(idle)),
                        _permit: permit,
                        _slot: slot,
                    };
                    let _ = tx.send((conn, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "dashboard: TLS handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "dashboard: TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for DashListener {
    type Io = DashConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (DashConn, SocketAddr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept loop never ends on its own; if it was aborted,
            // this listener serves nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// One served dashboard connection; holds its place in the bounds and is
/// closed after [`IDLE_TIMEOUT`] without traffic.
pub struct DashConn {
    tls: Box<TlsStream<TcpStream>>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
    _slot: SourceSlot,
}

impl DashConn {
    /// Whether the idle deadline passed (registers the waker when not).
    fn idle_over(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }

    fn active(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "dashboard connection idle")
}

impl AsyncRead for DashConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut *self.tls).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.idle_over(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }
}

impl AsyncWrite for DashConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut *self.tls).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.active();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_over(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.tls).poll_shutdown(cx)
    }
}

/// The peer's address, for handlers (`ConnectInfo<Peer>`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, DashListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, DashListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}
