//! Counters and histograms that events update (as opposed to the gauges in
//! [`crate::metrics`], computed from state at each scrape): fence
//! operations and their latency, and the time from a host's failure to the
//! recovery of its guests.

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a fence operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FenceLabels {
    /// "read" or "power_off".
    pub op: String,
    /// "off", "on" or "unknown".
    pub result: String,
}

/// Labels of a refusal counter: why (never who, to bound cardinality).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The reason, a fixed word.
    pub reason: String,
}

/// The event-driven metrics.
pub struct Telemetry {
    /// TLS handshakes that failed, by reason.
    pub handshake_failures: Family<ReasonLabels, Counter>,
    /// TCP connections refused or dropped by the accept loop, by reason.
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Established connections the controller closed, by reason.
    pub connections_closed: Family<ReasonLabels, Counter>,
    /// Requests refused by authentication or authorization, by reason.
    pub requests_denied: Family<ReasonLabels, Counter>,
    /// Established connections now.
    pub connections_open: prometheus_client::metrics::gauge::Gauge,
    /// TLS handshakes in progress now.
    pub handshakes_in_progress: prometheus_client::metrics::gauge::Gauge,
    registry: Mutex<Registry>,
    /// Fence operations by kind and result.
    pub fence_ops: Family<FenceLabels, Counter>,
    /// Seconds from a power-off request until the BMC read Off (or gave up).
    pub fence_seconds: Histogram,
    /// Seconds from the last message of a failed host to the end of its
    /// forced migration.
    pub recovery_seconds: Histogram,
}

/// The process-wide telemetry.
pub fn get() -> &'static Telemetry {
    static T: OnceLock<Telemetry> = OnceLock::new();
    T.get_or_init(|| {
        let mut r = Registry::with_prefix("lifeboat");
        let fence_ops = Family::<FenceLabels, Counter>::default();
        let fence_seconds = Histogram::new(exponential_buckets(0.25, 2.0, 10));
        let recovery_seconds = Histogram::new(exponential_buckets(5.0, 2.0, 10));
        r.register("fence_operations", "BMC / fence-agent operations by kind and result", fence_ops.clone());
        r.register(
            "fence_power_off_seconds",
            "Seconds from a power-off request until Off was read (or the wait ended)",
            fence_seconds.clone(),
        );
        r.register(
            "failure_to_recovery_seconds",
            "Seconds from the last message of a failed host to the end of its forced migration",
            recovery_seconds.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        let connections_refused = Family::<ReasonLabels, Counter>::default();
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        let requests_denied = Family::<ReasonLabels, Counter>::default();
        r.register("tls_handshake_failures", "TLS handshakes that failed, by reason", handshake_failures.clone());
        r.register(
            "connections_refused",
            "Connections refused by the controller's limits, by reason",
            connections_refused.clone(),
        );
        r.register(
            "connections_closed",
            "Established connections closed by the controller, by reason",
            connections_closed.clone(),
        );
        r.register(
            "requests_denied",
            "Requests refused for the certificate presented, by reason",
            requests_denied.clone(),
        );
        let connections_open = prometheus_client::metrics::gauge::Gauge::default();
        let handshakes_in_progress = prometheus_client::metrics::gauge::Gauge::default();
        r.register(
            "connections_open",
            "Established connections (agents' sessions and clients')",
            connections_open.clone(),
        );
        r.register("tls_handshakes_in_progress", "TLS handshakes in progress", handshakes_in_progress.clone());
        Telemetry {
            connections_open,
            handshakes_in_progress,
            handshake_failures,
            connections_refused,
            connections_closed,
            requests_denied,
            registry: Mutex::new(r),
            fence_ops,
            fence_seconds,
            recovery_seconds,
        }
    })
}

impl Telemetry {
    /// Counts a fence operation.
    pub fn fence(&self, op: &str, result: &str) {
        self.fence_ops.get_or_create(&FenceLabels { op: op.into(), result: result.into() }).inc();
    }

    /// Text exposition, without the final `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out.trim_end().trim_end_matches("# EOF").to_string()
    }
}
