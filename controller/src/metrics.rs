//! Prometheus metrics (text exposition), served on `metrics_listen` when
//! configured: hosts by status and liveness, guests by state, jobs by kind
//! and state, and active alarms (split brain, stale copies) per host.

use std::sync::Arc;

use lifeboat_proto::v1::GuestState;
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
        let st = GuestState::try_from(state).unwrap_or(GuestState::Unspecified);
        guests.get_or_create(&vec![("state".into(), format!("{st:?}").to_lowercase())]).set(n as i64);
    }
    if let Ok(js) = reg.db(|s| s.jobs(None, u32::MAX)) {
        for j in js {
            jobs.get_or_create(&vec![("kind".into(), j.kind), ("state".into(), j.state)]).inc();
        }
    }
    for (host, kind, _) in reg.active_alarms() {
        alarms.get_or_create(&vec![("host".into(), host), ("kind".into(), kind)]).inc();
    }
    let waiting = family(&mut p, "guests_waiting", "Guests waiting to run again on their own host, by host (lifeboat vms list shows why)");
    for (host, n) in crate::waiting::counts(reg) {
        waiting.get_or_create(&vec![("host".into(), host)]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    p.register(
        "agent_messages_refused",
        "Agent messages refused whole by the intake (docs/security.md, Agent input), by message kind",
        refused_family().clone(),
    );
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

fn refused_family() -> &'static Family<Labels, prometheus_client::metrics::counter::Counter> {
    static F: std::sync::OnceLock<Family<Labels, prometheus_client::metrics::counter::Counter>> = std::sync::OnceLock::new();
    F.get_or_init(Family::default)
}

/// Counts an agent message the intake refused (`kind`: "Inventory",
/// "GuestChanged", ...; no host label, so the series stay few).
pub fn agent_message_refused(kind: &str) {
    refused_family().get_or_create(&vec![("kind".into(), kind.into())]).inc();
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve(reg: Arc<Registry>, listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let reg = reg.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    render(&reg),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timing;
    use crate::store::Store;

    #[test]
    fn alarms_and_hosts_are_exposed() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        reg.open_session("host-a", "boot", tx).unwrap();
        reg.raise_alarm("host-a", "split-brain", "came back with the same boot id").unwrap();
        let text = render(&reg);
        assert!(text.contains("lifeboat_alarms_active{host=\"host-a\",kind=\"split-brain\"} 1"), "{text}");
        assert!(text.contains("lifeboat_hosts{status=\"AVAILABLE\",liveness=\"REACHABLE\"} 1"), "{text}");
    }
}
