//! Live updates: one hub task turns registry and job changes into at most
//! one tick per 250 ms; each open page's `/live` stream re-renders its
//! fragments on a tick and sends those that changed, as server-sent events
//! named `summary`, `alarms` and `live` (data = the HTML fragment).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};

use super::guard::SignedIn;
use super::routes::{self, GuestsQuery, HostQuery, HostsQuery};
use super::{AppState, Ctl, views};
use crate::migrate::engine::Engine;
use crate::registry::Registry;

/// The most often a page is updated.
pub const TICK: Duration = Duration::from_millis(250);
/// How often a quiet stream checks that its session still lasts.
const SESSION_CHECK: Duration = Duration::from_secs(5);

/// The hub: a counter that moves when something a page shows may have changed.
pub struct Hub {
    ticks: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hub {
    /// Watches `reg` (its view version) and `engine` (job changes).
    pub fn start(reg: Arc<Registry>, engine: Arc<Engine>) -> Hub {
        let ticks = Arc::new(watch::Sender::new(0u64));
        let tx = ticks.clone();
        let task = tokio::spawn(async move {
            let mut jobs = engine.subscribe();
            let mut seen = reg.view_version();
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                let mut changed = false;
                while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = jobs.try_recv() {
                    changed = true;
                }
                let v = reg.view_version();
                if v != seen {
                    seen = v;
                    changed = true;
                }
                if changed && tx.receiver_count() > 0 {
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        });
        Hub { ticks, task }
    }

    /// Ticks from now on (no stream subscribed: the hub sends nothing).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.ticks.subscribe()
    }
}

/// Which page a stream serves.
#[derive(Debug, Clone, Deserialize)]
pub struct LiveQuery {
    #[serde(default)]
    view: String,
    #[serde(default)]
    id: String,
}

/// The rows a live guests page shows (host id, UUID) and its next-page link.
type Shown = (Vec<(String, String)>, Option<String>);

enum View {
    Hosts(HostsQuery),
    /// The filter runs once; then the rows on screen (host, UUID) and the
    /// next-page link are re-read: new matches appear on reload.
    Guests(GuestsQuery, Option<Shown>),
    Host(String, HostQuery),
    Jobs,
    Job(String),
}

async fn render(ctl: &Arc<Ctl>, view: &mut View, s: &SignedIn) -> Option<(String, String, String)> {
    let c = ctl.clone();
    let (summary, alarms) = tokio::task::spawn_blocking(move || routes::chrome(&c))
        .await
        .ok()
        .map(|(a, b)| (a.into_string(), b.into_string()))?;
    let live = match view {
        View::Hosts(q) => {
            let (c, q) = (ctl.clone(), q.clone());
            tokio::task::spawn_blocking(move || routes::hosts_fragment(&c, &q)).await.ok()?.ok()?
        }
        View::Guests(q, shown) => {
            let (c, q, keys) = (ctl.clone(), q.clone(), shown.clone());
            let (rows, next) = tokio::task::spawn_blocking(move || match keys {
                Some((keys, next)) => Ok((c.reg.guest_rows(&keys), next)),
                None => routes::guests_rows(&c, &q),
            })
            .await
            .ok()?
            .ok()?;
            if shown.is_none() {
                let keys =
                    rows.iter().filter_map(|r| r.guest.as_ref().map(|g| (r.host_id.clone(), g.uuid.clone()))).collect();
                *shown = Some((keys, next.clone()));
            }
            views::guests_table_for(&rows, next.as_deref(), s.session.role)
        }
        View::Host(id, q) => routes::host_fragment(ctl, id, q, s.session.role).await.ok()?,
        View::Jobs => routes::jobs_fragment(ctl).await.ok()?,
        View::Job(id) => routes::job_fragment(ctl, id).await.ok()?,
    };
    Some((summary, alarms, live.into_string()))
}

/// `GET /live?view=hosts|guests|host&...`: the page's server-sent events.
pub async fn live(
    State(app): State<AppState>,
    Extension(s): Extension<SignedIn>,
    Query(q): Query<LiveQuery>,
    hosts: Result<Query<HostsQuery>, axum::extract::rejection::QueryRejection>,
    guests: Result<Query<GuestsQuery>, axum::extract::rejection::QueryRejection>,
    host: Result<Query<HostQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let mut view = match q.view.as_str() {
        "hosts" => View::Hosts(hosts.map(|q| q.0).unwrap_or_default()),
        "guests" => View::Guests(guests.map(|q| q.0).unwrap_or_default(), None),
        "host" if !q.id.is_empty() => {
            View::Host(q.id.chars().take(256).collect(), host.map(|q| q.0).unwrap_or_default())
        }
        "jobs" => View::Jobs,
        "job" if !q.id.is_empty() => View::Job(q.id.chars().take(256).collect()),
        _ => {
            return (axum::http::StatusCode::BAD_REQUEST, "view must be hosts, guests, jobs, host or job (with id)\n")
                .into_response();
        }
    };
    let (Some(ctl), Some(hub)) = (app.leading(), app.hub.get()) else {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not the leader\n").into_response();
    };
    let mut ticks = hub.subscribe();
    let (tx, rx) = mpsc::channel::<Event>(8);
    tokio::spawn(async move {
        let _ = tx.send(Event::default().retry(Duration::from_secs(2)).comment("open")).await;
        let mut last: [String; 3] = Default::default();
        loop {
            if app.auth.session(&s.id).is_none() || app.leading().is_none() {
                let _ = tx.send(Event::default().event("signed-out").data("")).await;
                return;
            }
            if let Some(now) = render(&ctl, &mut view, &s).await {
                let now = [now.0, now.1, now.2];
                for (i, name) in ["summary", "alarms", "live"].into_iter().enumerate() {
                    if now[i] != last[i] && tx.send(Event::default().event(name).data(now[i].as_str())).await.is_err() {
                        return;
                    }
                }
                last = now;
            }
            tokio::select! {
                r = ticks.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(SESSION_CHECK) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok::<_, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
