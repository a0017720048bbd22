//! The web dashboard (docs/dashboard.md): HTTPS pages over the registry,
//! sign-in by one-time links from `lifeboat dashboard login`, live updates
//! by server-sent events, and the operators' actions through the same
//! functions the gRPC admin service calls.
//!
//! Architecture invariant: the dashboard authenticates the session, checks
//! Origin and CSRF, authorizes the role and delegates to the same functions
//! as `rpc/admin.rs`; it holds no business logic. It never imports `rpc`
//! (`rpc` imports `dashboard::auth`).
//!
//! Architecture invariant: a follower's dashboard serves no state: it
//! redirects to the leader (or answers 503 while there is none).

pub mod actions;
pub mod auth;
pub mod guard;
pub mod listener;
pub mod live;
pub mod routes;
pub mod views;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

use crate::config::DashboardConfig;
use crate::ha::election::LeaderHint;
use crate::migrate::engine::Engine;
use crate::registry::Registry;

/// What the dashboard serves from once this process leads.
pub struct Ctl {
    /// The registry.
    pub reg: Arc<Registry>,
    /// The job engine.
    pub engine: Arc<Engine>,
    /// The leadership (etcd backend); `None` with SQLite (always leads).
    pub leadership: Option<Arc<crate::ha::Leadership>>,
}

/// The dashboard's shared state.
pub struct App {
    /// Links and sessions.
    pub auth: Arc<Auth>,
    /// Set when this process leads and has loaded.
    pub ctl: OnceLock<Arc<Ctl>>,
    /// Who leads (etcd backend), for a follower's redirect.
    pub hint: Option<watch::Receiver<LeaderHint>>,
    /// The dashboard port (the same on every controller of a pool).
    pub port: u16,
    /// Live updates, once leading.
    pub hub: OnceLock<live::Hub>,
    /// Open `/live` streams (bounded per session and in all).
    pub streams: Arc<live::Streams>,
    /// This controller's `[store] advertise_url` (etcd backend): a leader
    /// hint naming it is no reason to redirect.
    pub advertise_url: OnceLock<String>,
}

pub use auth::{Auth, Session};

/// The state handlers get.
pub type AppState = Arc<App>;

impl App {
    /// A dashboard not serving yet (follower, or before load).
    pub fn new(auth: Arc<Auth>, port: u16, hint: Option<watch::Receiver<LeaderHint>>) -> AppState {
        Arc::new(App {
            auth,
            ctl: OnceLock::new(),
            hint,
            port,
            hub: OnceLock::new(),
            streams: Default::default(),
            advertise_url: OnceLock::new(),
        })
    }

    /// Tells the dashboard this controller's own advertise URL.
    pub fn set_advertise_url(&self, url: &str) {
        let _ = self.advertise_url.set(url.to_string());
    }

    /// Serves from `ctl` from now on (this process leads and has loaded),
    /// and starts the live-update hub.
    pub fn open(&self, ctl: Ctl) {
        let hub = live::Hub::start(ctl.reg.clone(), ctl.engine.clone());
        let _ = self.hub.set(hub);
        let _ = self.ctl.set(Arc::new(ctl));
    }

    /// The controller to serve from, while this process leads.
    pub fn leading(&self) -> Option<Arc<Ctl>> {
        self.ctl.get().cloned().filter(|c| c.leadership.as_ref().is_none_or(|l| l.holds()))
    }
}

/// A dashboard ready to serve: its bound socket, TLS and state.
pub struct Dashboard {
    /// The shared state (also given to the admin service's `with_dashboard`).
    pub app: AppState,
    tcp: tokio::net::TcpListener,
    tls: tokio_rustls::rustls::ServerConfig,
}

impl Dashboard {
    /// Binds `[dashboard] listen` when enabled (`None` when off).
    pub async fn new(
        cfg: &DashboardConfig,
        tls: &lifeboat_common::tls::TlsMaterial,
        clock: Arc<dyn crate::ports::clock::Clock>,
        hint: Option<watch::Receiver<LeaderHint>>,
    ) -> anyhow::Result<Option<Dashboard>> {
        if !cfg.enabled {
            return Ok(None);
        }
        let (cert, key) = cfg.material(tls)?;
        let tls = listener::server_config(&cert, &key)?;
        let tcp = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on [dashboard] listen = \"{}\": {e}", cfg.listen))?;
        let port = tcp.local_addr()?.port();
        let app = App::new(Arc::new(Auth::new(clock, cfg.session_ttl_s)), port, hint);
        Ok(Some(Dashboard { app, tcp, tls }))
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Serves until the returned task is dropped.
    pub fn spawn(self) -> ServeTask {
        let Dashboard { app, tcp, tls } = self;
        ServeTask(tokio::spawn(async move {
            tracing::info!(listen = ?tcp.local_addr().ok(), "dashboard serving (HTTPS)");
            let l = match listener::DashListener::new(tcp, tls) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("dashboard listener: {e}");
                    return;
                }
            };
            let router = routes::router(app);
            if let Err(e) = axum::serve(l, router.into_make_service_with_connect_info::<listener::Peer>()).await {
                tracing::warn!("dashboard stopped: {e}");
            }
        }))
    }
}

/// The dashboard's serving task: stops accepting when dropped.
pub struct ServeTask(tokio::task::JoinHandle<()>);

impl Drop for ServeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
