//! Live updates: one hub task turns registry and job changes into at most
//! one tick per 250 ms; each open page's `/live` stream re-renders its
//! fragments on a tick and sends those that changed, as server-sent events
//! named `summary`, `alarms` and `live` (data = the HTML fragment).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// Open `/live` streams per session (a newer one ends the oldest).
pub const MAX_STREAMS_PER_SESSION: usize = 4;
/// Open `/live` streams in all.
pub const MAX_STREAMS: usize = 64;
/// The least time between two renders of a view that reads the store
/// (a host, the jobs, a job).
pub const SLOW_VIEW_EVERY: Duration = Duration::from_secs(1);
/// A stream opened this soon after a tick renders at once: the change may
/// have come after its page was rendered.
const OPEN_CATCH_UP: Duration = Duration::from_secs(2);

/// The summary and alarms fragments every page shows, rendered once per tick.
type Chrome = Arc<(String, String)>;

/// The hub: a counter that moves when something a page shows may have changed.
pub struct Hub {
    ticks: Arc<watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
    reg: Arc<Registry>,
    last_tick: Arc<Mutex<Option<Instant>>>,
    chrome: tokio::sync::Mutex<Option<(u64, Chrome)>>,
    chrome_renders: AtomicU64,
    view_renders: AtomicU64,
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
        let last_tick = Arc::new(Mutex::new(None));
        let last = last_tick.clone();
        let hub_reg = reg.clone();
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
                if changed {
                    // Moved with no stream too: the shared chrome is keyed by it.
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        });
        Hub {
            ticks,
            task,
            reg: hub_reg,
            last_tick,
            chrome: tokio::sync::Mutex::new(None),
            chrome_renders: AtomicU64::new(0),
            view_renders: AtomicU64::new(0),
        }
    }

    /// Whether the hub ticked within `d`.
    fn ticked_within(&self, d: Duration) -> bool {
        self.last_tick.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() < d)
    }

    /// The summary and alarms for tick `n` (or a later one): rendered by the
    /// first stream that asks, shared by the others.
    async fn chrome(&self, n: u64) -> Option<Chrome> {
        let mut cached = self.chrome.lock().await;
        if let Some((at, c)) = cached.as_ref()
            && *at >= n
        {
            return Some(c.clone());
        }
        let reg = self.reg.clone();
        let c = tokio::task::spawn_blocking(move || {
            (views::summary(&reg.host_counts()).into_string(), views::alarms(&reg.active_alarms()).into_string())
        })
        .await
        .ok()?;
        self.chrome_renders.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(c);
        *cached = Some((n, c.clone()));
        Some(c)
    }

    /// Renders so far: (shared chrome, per-stream views).
    pub fn renders(&self) -> (u64, u64) {
        (self.chrome_renders.load(Ordering::Relaxed), self.view_renders.load(Ordering::Relaxed))
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

impl View {
    /// Whether rendering it reads the store (throttled to one per second).
    fn slow(&self) -> bool {
        matches!(self, View::Host(..) | View::Jobs | View::Job(_))
    }
}

/// Open streams, per session and in all.
#[derive(Default)]
pub struct Streams {
    open: Mutex<Open>,
}

/// The open streams: how many in all, and each session's, oldest first.
#[derive(Default)]
struct Open {
    total: usize,
    next_id: u64,
    by_session: HashMap<String, Vec<Entry>>,
}

/// One open stream of a session.
struct Entry {
    id: u64,
    replaced: Arc<tokio::sync::Notify>,
    /// Told to end (a newer page took its place) but not gone yet: it still
    /// counts in all until its response body is dropped.
    ending: bool,
}

/// One open stream's place: given back when dropped (its response body
/// was dropped: the page closed, or the stream ended and was read out).
pub struct StreamSlot {
    streams: Arc<Streams>,
    sid: String,
    id: u64,
    /// Notified when a newer page of the same session took this place.
    replaced: Arc<tokio::sync::Notify>,
}

impl Streams {
    /// A place for one more stream of session `sid`, or why not. A session
    /// at its cap gets a place all the same: its oldest stream is told to
    /// end (a page the browser hid or froze can hold one; the page the
    /// operator just opened is the one that matters). Other sessions' streams
    /// are never ended for it: at the controller's cap the new one is
    /// refused. A stream told to end counts in all until it is gone, and a
    /// session holds at most [`MAX_STREAMS_PER_SESSION`] of those too, so a
    /// client that never reads cannot open streams without end.
    pub fn take(self: &Arc<Self>, sid: &str) -> Result<StreamSlot, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Open { total, next_id, by_session } = &mut *open;
        if *total >= MAX_STREAMS {
            return Err("too many live pages are open on this controller (64); close some tabs and reload\n");
        }
        let mine = by_session.entry(sid.to_string()).or_default();
        let live = mine.iter().filter(|e| !e.ending).count();
        if live >= MAX_STREAMS_PER_SESSION {
            if mine.len() - live >= MAX_STREAMS_PER_SESSION {
                return Err("too many live pages of this session are still closing (4); close some tabs and reload\n");
            }
            if let Some(oldest) = mine.iter_mut().find(|e| !e.ending) {
                oldest.ending = true;
                oldest.replaced.notify_one();
            }
        }
        *next_id = next_id.wrapping_add(1);
        let replaced = Arc::new(tokio::sync::Notify::new());
        mine.push(Entry { id: *next_id, replaced: replaced.clone(), ending: false });
        *total += 1;
        Ok(StreamSlot { streams: self.clone(), sid: sid.to_string(), id: *next_id, replaced })
    }

    /// Streams open: (in all, live ones of session `sid`).
    pub fn open(&self, sid: &str) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        (open.total, open.by_session.get(sid).map_or(0, |m| m.iter().filter(|e| !e.ending).count()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        let Open { total, by_session, .. } = &mut *open;
        if let Some(mine) = by_session.get_mut(&self.sid)
            && let Some(at) = mine.iter().position(|e| e.id == self.id)
        {
            mine.remove(at);
            *total = total.saturating_sub(1);
            if mine.is_empty() {
                by_session.remove(&self.sid);
            }
        }
    }
}

async fn render(
    ctl: &Arc<Ctl>,
    hub: &Hub,
    tick: u64,
    view: &mut View,
    s: &SignedIn,
) -> Option<(String, String, String)> {
    let chrome = hub.chrome(tick).await?;
    let (summary, alarms) = (chrome.0.clone(), chrome.1.clone());
    hub.view_renders.fetch_add(1, Ordering::Relaxed);
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
    let view = match q.view.as_str() {
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
    let (Some(ctl), Some(_)) = (app.leading(), app.hub.get()) else {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not the leader\n").into_response();
    };
    let slot = match app.streams.take(&s.id) {
        Ok(slot) => slot,
        Err(why) => return (axum::http::StatusCode::TOO_MANY_REQUESTS, why).into_response(),
    };
    let (tx, rx) = mpsc::channel::<Event>(8);
    let replaced = slot.replaced.clone();
    let feed = tx.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stream_updates(app, ctl, s, view, feed) => {}
            () = replaced.notified() => {
                // Whatever the feed was waiting for (a render, a full
                // channel) is dropped; a page that does not read must not
                // keep this task.
                let _ = tx.try_send(Event::default().event("replaced").data(""));
            }
        }
    });
    // The place is given back when the response body is dropped, not when
    // the task ends: until then the stream holds the connection's resources.
    let stream = tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |e| {
        let _held = &slot;
        Ok::<_, Infallible>(e)
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Sends the page's fragments as they change, until its page closes, its
/// session ends or this controller stops leading.
async fn stream_updates(app: AppState, ctl: Arc<Ctl>, s: SignedIn, mut view: View, tx: mpsc::Sender<Event>) {
    let Some(hub) = app.hub.get() else { return };
    let mut ticks = hub.subscribe();
    let _ = tx.send(Event::default().retry(Duration::from_secs(2)).comment("open")).await;
    // The page was rendered just now: wait for the next change, unless
    // one came so recently that the page may have missed it.
    let mut due = hub.ticked_within(OPEN_CATCH_UP);
    let mut last: [String; 3] = Default::default();
    let mut rendered: Option<Instant> = None;
    loop {
        if due {
            if app.auth.session(&s.id).is_none() || app.leading().is_none() {
                let _ = tx.send(Event::default().event("signed-out").data("")).await;
                return;
            }
            if view.slow()
                && let Some(at) = rendered
                && at.elapsed() < SLOW_VIEW_EVERY
            {
                tokio::select! {
                    _ = tokio::time::sleep(SLOW_VIEW_EVERY.saturating_sub(at.elapsed())) => {}
                    _ = tx.closed() => return,
                }
            }
            let tick = *ticks.borrow_and_update();
            rendered = Some(Instant::now());
            if let Some(now) = render(&ctl, hub, tick, &mut view, &s).await {
                let now = [now.0, now.1, now.2];
                for (i, name) in ["summary", "alarms", "live"].into_iter().enumerate() {
                    if now[i] != last[i] && tx.send(Event::default().event(name).data(now[i].as_str())).await.is_err() {
                        return;
                    }
                }
                last = now;
            }
        }
        tokio::select! {
            r = ticks.changed() => {
                if r.is_err() { return }
                due = true;
            }
            _ = tokio::time::sleep(SESSION_CHECK) => {
                if app.auth.session(&s.id).is_none() || app.leading().is_none() {
                    let _ = tx.send(Event::default().event("signed-out").data("")).await;
                    return;
                }
                due = false;
            }
            _ = tx.closed() => return,
        }
    }
}
