//! The agent's Prometheus metrics, served on `metrics_listen` when set:
//! session and libvirt state, guests, leases by state, and the latency of
//! the controller's commands as carried out against libvirt.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// Command kind, e.g. `define_guest`.
    pub kind: String,
    /// "ok" or "error".
    pub result: String,
}

/// Labels by kind only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Command kind.
    pub kind: String,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Mutex<Registry>,
    /// Session to the controller open.
    pub session_up: AtomicBool,
    /// libvirt connected.
    pub libvirt_connected: AtomicBool,
    /// Guests libvirt reports.
    pub guests: AtomicI64,
    commands: Family<CommandLabels, Counter>,
    command_seconds: Family<KindLabel, Histogram>,
    gauges: (Gauge, Gauge, Gauge),
    leases: Family<Vec<(String, String)>, Gauge>,
    state_dir: Mutex<Option<PathBuf>>,
    /// Commands refused because their controller epoch was lower than the
    /// highest this agent has seen (sent by a replaced leader).
    pub stale_epoch_refused: Counter,
    /// The highest controller epoch seen (the epoch file's value).
    pub controller_epoch: Gauge,
    /// 1 while the epoch file cannot be read or parsed (every session and
    /// command is refused until it is repaired).
    pub epoch_file_unreadable: Gauge,
    /// Standby connections that could not be made (`session::Standby`).
    pub standby_failed: Counter,
}

/// The process-wide metrics.
pub fn get() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut r = Registry::with_prefix("lifeboat_agent");
        let commands = Family::<CommandLabels, Counter>::default();
        let command_seconds =
            Family::<KindLabel, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 4.0, 8)));
        let (s, l, g) = (Gauge::default(), Gauge::default(), Gauge::default());
        let leases = Family::<Vec<(String, String)>, Gauge>::default();
        r.register("commands", "Controller commands carried out, by kind and result", commands.clone());
        r.register(
            "command_seconds",
            "Time to carry out a controller command against libvirt, by kind",
            command_seconds.clone(),
        );
        r.register("session_up", "1 while the session to the controller is open", s.clone());
        r.register("libvirt_connected", "1 while libvirt answers", l.clone());
        r.register("guests", "Guests libvirt reports on this host", g.clone());
        r.register("leases", "Start leases on local disk by state (valid, expired)", leases.clone());
        let stale_epoch_refused = Counter::default();
        let controller_epoch = Gauge::default();
        let epoch_file_unreadable = Gauge::default();
        let standby_failed = Counter::default();
        r.register(
            "standby_failed",
            "Standby connections to a controller the session is not on that could not be made (tried again a minute later)",
            standby_failed.clone(),
        );
        r.register(
            "stale_epoch_refused",
            "Controller commands and session Welcomes refused because their fencing epoch was lower than the highest \
             seen (or above any etcd revision)",
            stale_epoch_refused.clone(),
        );
        r.register(
            "controller_epoch",
            "The highest controller fencing epoch this agent has seen",
            controller_epoch.clone(),
        );
        r.register(
            "epoch_file_unreadable",
            "1 while state_dir/controller-epoch cannot be read or parsed (all sessions and commands refused)",
            epoch_file_unreadable.clone(),
        );
        AgentMetrics {
            standby_failed,
            stale_epoch_refused,
            controller_epoch,
            epoch_file_unreadable,
            registry: Mutex::new(r),
            session_up: AtomicBool::new(false),
            libvirt_connected: AtomicBool::new(false),
            guests: AtomicI64::new(0),
            commands,
            command_seconds,
            gauges: (s, l, g),
            leases,
            state_dir: Mutex::new(None),
        }
    })
}

impl AgentMetrics {
    /// Records one command.
    pub fn command(&self, kind: &str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.commands.get_or_create(&CommandLabels { kind: kind.into(), result: result.into() }).inc();
        self.command_seconds.get_or_create(&KindLabel { kind: kind.into() }).observe(seconds);
    }

    /// Records the highest epoch seen.
    pub fn set_epoch(&self, epoch: u64) {
        self.controller_epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
    }

    /// Where the lease files are (for the lease gauge).
    pub fn set_state_dir(&self, d: PathBuf) {
        *self.state_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        self.gauges.0.set(i64::from(self.session_up.load(Ordering::Relaxed)));
        self.gauges.1.set(i64::from(self.libvirt_connected.load(Ordering::Relaxed)));
        self.gauges.2.set(self.guests.load(Ordering::Relaxed));
        let (mut valid, mut expired) = (0, 0);
        if let Some(d) = self.state_dir.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            let now = lifeboat_common::now_unix_ms();
            if let Ok(rd) = std::fs::read_dir(crate::lease::dir(&d)) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(uuid) = name.strip_suffix(".lease") {
                        match crate::lease::read(&d, uuid) {
                            Ok(l) if l.expires_unix_ms > now => valid += 1,
                            _ => expired += 1,
                        }
                    }
                }
            }
        }
        self.leases.get_or_create(&vec![("state".into(), "valid".into())]).set(valid);
        self.leases.get_or_create(&vec![("state".into(), "expired".into())]).set(expired);
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// Serves `GET /metrics` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                get().render(),
            )
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_leases_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let m = get();
        m.set_state_dir(d.path().to_path_buf());
        m.command("define_guest", true, 0.02);
        let l = crate::lease::LeaseFile {
            uuid: "55555555-0000-4000-8000-000000000001".into(),
            name: "x".into(),
            host: "h".into(),
            generation: 0,
            expires_unix_ms: i64::MAX,
            issued_unix_ms: 1,
            epoch: 0,
            boot_id: String::new(),
        };
        crate::lease::apply(d.path(), "h", &[l], false, 1, 0).unwrap();
        let t = m.render();
        assert!(t.contains("lifeboat_agent_commands_total{kind=\"define_guest\",result=\"ok\"} 1"), "{t}");
        assert!(t.contains("lifeboat_agent_leases{state=\"valid\"} 1"), "{t}");
        assert!(t.contains("lifeboat_agent_command_seconds_count{kind=\"define_guest\"} 1"), "{t}");
    }
}
