//! The agent's gRPC session to the controller: dial, say hello, send the
//! inventory and then changes and heartbeats; reconnect with backoff.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use lifeboat_common::tls::TlsMaterial;
use lifeboat_proto::v1::{
    AgentMessage, GuestChanged, GuestRemoved, Heartbeat, Hello, agent_message,
    agent_session_client::AgentSessionClient, controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::hostfacts;
use crate::libvirt::{Actor, Shared, Update};

/// Session settings and handles.
pub struct Session {
    urls: Vec<String>,
    state_dir: std::path::PathBuf,
    server_name: String,
    host_id: String,
    boot_id_file: std::path::PathBuf,
    tls: TlsMaterial,
    actor: Actor,
    shared: Arc<Shared>,
    /// Standby connections to the controllers the session is not on (none
    /// with `[controller] standby = false` or a single address).
    standby: Option<Standby>,
}

/// Connections made ahead of need to the controllers the session is not
/// on, each with its TLS and HTTP/2 handshakes done: when the leader is
/// lost, the session call to the next one goes out on one of them at once.
/// A failover then costs the new leader no handshake from the agents it
/// holds, which at thousands of hosts is most of its CPU while they come
/// back (docs/benchmarks.md).
///
/// The connection to the session's own controller is never kept here, so
/// the first dial after a lost session is always a fresh one and a dead
/// leader is told apart from a live one as before ([`Redial`]).
#[derive(Debug, Default)]
pub struct Standby {
    inner: std::sync::Mutex<StandbyInner>,
}

#[derive(Debug, Default)]
struct StandbyInner {
    /// URL → its standby connection (if one is kept) and when the address
    /// is next due (the connection made again, or a failed dial retried).
    slots: std::collections::HashMap<String, (Option<Channel>, tokio::time::Instant)>,
    /// The controller of the session attempt under way, or of the session
    /// established: never given a standby connection.
    current: Option<String>,
}

impl Standby {
    fn lock(&self) -> std::sync::MutexGuard<'_, StandbyInner> {
        // Plain data: a panic elsewhere leaves nothing half-changed in it.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A session attempt at `url` begins: its standby connection, if one is
    /// kept, is handed out (once), and none is made to `url` while the
    /// attempt or the session it opens lasts (a follower holds the call of
    /// an agent that lost its leader for seconds: a second connection then
    /// would cost the new leader the handshake standby saves it).
    pub fn take(&self, url: &str) -> Option<Channel> {
        let mut g = self.lock();
        g.current = Some(url.to_string());
        g.slots.remove(url).and_then(|(c, _)| c)
    }

    /// A session is established with `url` (as [`Standby::take`]).
    pub fn session_on(&self, url: &str) {
        let mut g = self.lock();
        g.slots.remove(url);
        g.current = Some(url.to_string());
    }

    /// The addresses of `urls` due for a (new) standby connection now:
    /// none before the first session attempt, never the current one's.
    pub fn due<'a>(&self, urls: &'a [String], now: tokio::time::Instant) -> Vec<&'a String> {
        let g = self.lock();
        let Some(current) = g.current.as_deref() else { return Vec::new() };
        urls.iter()
            .filter(|u| u.as_str() != current)
            .filter(|u| g.slots.get(u.as_str()).is_none_or(|(_, due)| now >= *due))
            .collect()
    }

    /// Keeps `channel` as the standby connection to `url` until `again`
    /// (then it is due: see [`standby_again`]), unless `url` became the
    /// current one while it was being made. Replaces the one kept.
    pub fn put(&self, url: &str, channel: Channel, again: tokio::time::Instant) -> bool {
        let mut g = self.lock();
        if g.current.as_deref() == Some(url) {
            return false;
        }
        g.slots.insert(url.to_string(), (Some(channel), again));
        true
    }

    /// A dial of `url` failed: tried again at `retry`. A connection still
    /// kept is kept meanwhile (it may still work; tonic redials it on use).
    pub fn failed(&self, url: &str, retry: tokio::time::Instant) {
        let mut g = self.lock();
        if g.current.as_deref() == Some(url) {
            return;
        }
        let kept = g.slots.remove(url).and_then(|(c, _)| c);
        g.slots.insert(url.to_string(), (kept, retry));
    }

    /// How many standby connections are kept.
    pub fn len(&self) -> usize {
        self.lock().slots.values().filter(|(c, _)| c.is_some()).count()
    }

    /// Whether no standby connection is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A standby connection is made again before it is this old: the
/// controller closes a connection with no call in flight after 300 s
/// (`conn::Limits::idle_timeout`), and one it closed would cost the full
/// handshake at the failover after all.
pub const STANDBY_REFRESH: Duration = Duration::from_secs(240);

/// After a failed standby dial (a controller down or unreachable), the
/// next one is this much later (± a third): 10,000 agents do not knock at
/// a dead controller every few seconds.
pub const STANDBY_RETRY: Duration = Duration::from_secs(60);

/// When a standby connection made at `now` is to be made again: after
/// three quarters of [`STANDBY_REFRESH`] to all of it, at random, so that
/// agents started together (a pool brought up at once) do not all redial
/// in the same minute ever after. `r` is a random value in 0..1000.
pub fn standby_again(now: tokio::time::Instant, r: u32) -> tokio::time::Instant {
    now + STANDBY_REFRESH.mul_f64(0.75 + f64::from(r.min(1000)) / 4000.0)
}

/// How often the standby connections are looked at (± a third, so that
/// 10,000 agents do not redial in step).
pub const STANDBY_CHECK: Duration = Duration::from_secs(10);

/// Why one session attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Could not reach or handshake with the controller.
    #[error("cannot connect to controller {url}: {source}")]
    Connect {
        /// Controller URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The TCP connection was made but the TLS or HTTP/2 handshake did not
    /// finish within [`DIAL_TIMEOUT`] (a frozen process whose kernel still
    /// accepts connections).
    #[error("cannot connect to controller {url}: no handshake within {} s", DIAL_TIMEOUT.as_secs())]
    DialTimeout {
        /// Controller URL.
        url: String,
    },
    /// The controller answered nothing (not even heartbeats) for this long.
    #[error("the controller answered nothing for {ms} ms; reconnecting")]
    Silent {
        /// How long it was silent (ms).
        ms: u128,
    },
    /// The controller refused or ended the session.
    #[error("controller ended the session: {0}")]
    Status(#[from] tonic::Status),
    /// The controller sent something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The controller fencing epoch refused the session (a stale leader, or
    /// the epoch file cannot be read or written).
    #[error("{0}")]
    Epoch(#[from] crate::epoch::Refusal),
    /// The epoch file is unreadable: no session is opened at all.
    #[error("{0}")]
    EpochFile(#[from] crate::epoch::EpochError),
}

impl Session {
    /// Prepares a session; nothing is dialled until [`Session::run`].
    pub fn new(cfg: &AgentConfig, host_id: String, tls: TlsMaterial, actor: Actor, shared: Arc<Shared>) -> Self {
        Session {
            urls: cfg.controller.urls(),
            state_dir: cfg.state_dir.clone(),
            server_name: cfg.controller.server_name.clone(),
            host_id,
            boot_id_file: cfg.boot_id_file.clone(),
            tls,
            actor,
            shared,
            standby: (cfg.controller.standby && cfg.controller.urls().len() > 1).then(Standby::default),
        }
    }

    /// Keeps the standby connections ([`Standby`]) until dropped: every
    /// [`STANDBY_CHECK`] (jittered) each one that is due is dialled again,
    /// one at a time.
    async fn keep_standby(&self) -> std::convert::Infallible {
        let Some(standby) = &self.standby else { return std::future::pending().await };
        let mut rng =
            reconnect_backoff().with_min_delay(STANDBY_CHECK * 2 / 3).with_max_delay(STANDBY_CHECK * 2 / 3).build();
        loop {
            tokio::time::sleep(rng.next().unwrap_or(STANDBY_CHECK)).await;
            for url in standby.due(&self.urls, tokio::time::Instant::now()) {
                match self.channel(url).await {
                    Ok(ch) => {
                        let r = u32::try_from(jitter_seed() % 1000).unwrap_or(0);
                        if standby.put(url, ch, standby_again(tokio::time::Instant::now(), r)) {
                            tracing::debug!(controller = %url, "standby connection made");
                        }
                    }
                    Err(e) => {
                        let r = u32::try_from(jitter_seed() % 1000).unwrap_or(0);
                        let retry = STANDBY_RETRY.mul_f64(2.0 / 3.0 + f64::from(r) / 1500.0);
                        standby.failed(url, tokio::time::Instant::now() + retry);
                        crate::metrics::get().standby_failed.inc();
                        tracing::info!(controller = %url, "standby connection not made (tried again in {} s): {e}", retry.as_secs());
                    }
                }
            }
        }
    }

    /// Keeps a session open forever, reconnecting with capped exponential
    /// backoff and jitter ([`reconnect_backoff`]): the first retry after ~0.1 s, none
    /// later than ~1.3 s, and back to ~0.1 s after every session that was
    /// established (Welcome received). After an established session ends
    /// the same controller is dialled again first; otherwise each attempt
    /// goes to the next configured controller, or to the leader a follower
    /// named ([`Redial`]).
    pub async fn run(&self, updates: mpsc::Receiver<Update>) -> anyhow::Result<()> {
        tokio::select! {
            r = self.sessions(updates) => r,
            never = self.keep_standby() => match never {},
        }
    }

    async fn sessions(&self, mut updates: mpsc::Receiver<Update>) -> anyhow::Result<()> {
        let mut backoff = reconnect_backoff().build();
        let mut at = 0usize;
        let mut redial = Redial::default();
        loop {
            let url = self.urls.get(at).map_or("", String::as_str);
            let mut welcomed = None;
            let r = self.once(url, &mut updates, &mut backoff, redial.lost_epoch(), &mut welcomed).await;
            // Never exhausted (no limit on attempts); the cap if it were.
            let delay = backoff.next().unwrap_or(RECONNECT_CAP);
            let m = describe_end(&r);
            let (next, why) = redial.next(&self.urls, at, welcomed, &r);
            let then = match self.urls.get(next) {
                Some(u) if self.urls.len() > 1 => format!("{u} ({why})"),
                _ => "again".to_string(),
            };
            match r {
                Ok(()) => info!(controller = %url, "{m}; reconnecting in {} ms to {then}", delay.as_millis()),
                // Nothing is dialled until the operator repairs the file.
                Err(SessionError::EpochFile(_)) => tracing::error!("{m}; trying again in {} ms", delay.as_millis()),
                Err(_) => warn!(controller = %url, "{m}; reconnecting in {} ms to {then}", delay.as_millis()),
            }
            at = next;
            tokio::time::sleep(delay).await;
        }
    }

    async fn channel(&self, url: &str) -> Result<Channel, SessionError> {
        let err = |source| SessionError::Connect { url: url.to_string(), source };
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(err)?
            .tls_config(self.tls.client_config(&self.server_name))
            .map_err(err)?
            // With a connector of our own, tonic bounds TCP and TLS
            // together by this, also when a standby connection that broke
            // is dialled again inside the channel.
            .connect_timeout(DIAL_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(10)));
        tcp.set_connect_timeout(Some(TCP_CONNECT_TIMEOUT));
        // The HTTP/2 handshake after TLS is bounded here too.
        match tokio::time::timeout(DIAL_TIMEOUT, endpoint.connect_with_connector(tcp)).await {
            Ok(r) => r.map_err(err),
            Err(_) => Err(SessionError::DialTimeout { url: url.to_string() }),
        }
    }

    /// One session attempt at `url`, naming `lost` (the epoch of a leader
    /// this agent lost) on the call; `welcomed` is set to the controller's
    /// epoch once the session is established.
    async fn once(
        &self,
        url: &str,
        updates: &mut mpsc::Receiver<Update>,
        backoff: &mut ExponentialBackoff,
        lost: Option<u64>,
        welcomed: &mut Option<u64>,
    ) -> Result<(), SessionError> {
        // Read at every attempt: an operator's repair is picked up without a
        // restart, and nothing is dialled while the highest epoch is unknown.
        let mut epoch = match crate::epoch::EpochGuard::open(&self.state_dir) {
            Ok(g) => g,
            Err(e) => {
                crate::metrics::get().epoch_file_unreadable.set(1);
                return Err(e.into());
            }
        };
        crate::metrics::get().epoch_file_unreadable.set(0);
        crate::metrics::get().set_epoch(epoch.highest());
        // A standby connection needs no handshake now; if it broke since,
        // tonic dials again within the connect timeout ([`Session::channel`]).
        let channel = match self.standby.as_ref().and_then(|s| s.take(url)) {
            Some(ch) => ch,
            None => self.channel(url).await?,
        };
        let mut client = AgentSessionClient::new(channel);
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let send = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
        let boot_id = hostfacts::read_trimmed(&self.boot_id_file).unwrap_or_default();
        let _ = tx
            .send(send(agent_message::Msg::Hello(Hello {
                host_id: self.host_id.clone(),
                agent_version: lifeboat_common::VERSION.to_string(),
                boot_id,
            })))
            .await;
        let mut call = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(v) = lost.and_then(|e| e.to_string().parse().ok()) {
            call.metadata_mut().insert(lifeboat_proto::LOST_LEADER_METADATA, v);
        }
        let mut inbound = client.session(call).await?.into_inner();
        let welcome = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Err(_) => return Err(SessionError::Protocol("no Welcome within 10 s".into())),
            Ok(r) => match r?.and_then(|m| m.msg) {
                Some(controller_message::Msg::Welcome(w)) => w,
                other => return Err(SessionError::Protocol(format!("expected Welcome, got {other:?}"))),
            },
        };
        // A replaced leader: end the session before anything of it is used
        // (its commands would be refused one by one anyway). A newer leader:
        // its epoch is on disk before the session goes on.
        if let Err(e) = epoch.admit(welcome.epoch) {
            if !matches!(e, crate::epoch::Refusal::Persist(_)) {
                crate::metrics::get().stale_epoch_refused.inc();
            }
            return Err(e.into());
        }
        crate::metrics::get().set_epoch(epoch.highest());
        // Established: the next disconnection is retried quickly again.
        *backoff = reconnect_backoff().build();
        *welcomed = Some(welcome.epoch);
        if let Some(s) = &self.standby {
            s.session_on(url);
        }
        let hb_ms = u64::from(welcome.heartbeat_interval_ms.max(100));
        info!(controller = %url, heartbeat_ms = hb_ms, epoch = welcome.epoch, "session established");
        crate::metrics::get().session_up.store(true, Ordering::Relaxed);
        let r = self.serve(updates, tx, inbound, hb_ms, &mut epoch).await;
        crate::metrics::get().session_up.store(false, Ordering::Relaxed);
        r
    }

    async fn serve(
        &self,
        updates: &mut mpsc::Receiver<Update>,
        tx: mpsc::Sender<AgentMessage>,
        mut inbound: tonic::Streaming<lifeboat_proto::v1::ControllerMessage>,
        hb_ms: u64,
        epoch: &mut crate::epoch::EpochGuard,
    ) -> Result<(), SessionError> {
        let send = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
        while updates.try_recv().is_ok() {}
        self.actor.request_snapshot();
        let mut hb = tokio::time::interval(Duration::from_millis(hb_ms));
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // The controller answers every heartbeat; a session that stops
        // answering is dead even while TCP still looks open (a healed
        // partition can leave such a stream behind): dial again.
        let silent_limit = Duration::from_millis((hb_ms * 5).max(3000));
        let mut last_heard = tokio::time::Instant::now();
        let mut refused = RefusedLog::default();
        loop {
            tokio::select! {
                _ = hb.tick() => {
                    if last_heard.elapsed() > silent_limit {
                        return Err(SessionError::Silent { ms: last_heard.elapsed().as_millis() });
                    }
                    seq += 1;
                    let m = send(agent_message::Msg::Heartbeat(Heartbeat {
                        seq,
                        sent_unix_ms: lifeboat_common::now_unix_ms(),
                        memory_free_kib: self.shared.memory_free_kib.load(Ordering::Relaxed),
                    }));
                    if tx.send(m).await.is_err() { return Err(SessionError::Protocol("outbound stream closed".into())); }
                }
                u = updates.recv() => {
                    let Some(u) = u else { return Err(SessionError::Protocol("libvirt actor stopped".into())) };
                    let m = match u {
                        Update::Inventory(mut inv) => {
                            inv.guests.iter_mut().for_each(lifeboat_proto::pack_definition);
                            // Pages, so no buffer grows with the guest count.
                            let mut pages = lifeboat_proto::inventory_pages(inv, lifeboat_proto::INVENTORY_PAGE_BYTES);
                            let last = pages.pop().expect("one page at least");
                            for p in pages {
                                if tx.send(send(agent_message::Msg::Inventory(p))).await.is_err() {
                                    return Err(SessionError::Protocol("outbound stream closed".into()));
                                }
                            }
                            agent_message::Msg::Inventory(last)
                        }
                        Update::Changed(mut g) => {
                            lifeboat_proto::pack_definition(&mut g);
                            agent_message::Msg::GuestChanged(GuestChanged { guest: Some(g) })
                        }
                        Update::Removed { uuid, name } => agent_message::Msg::GuestRemoved(GuestRemoved { uuid, name }),
                        Update::Host(h) => agent_message::Msg::Host(h),
                    };
                    if tx.send(send(m)).await.is_err() { return Err(SessionError::Protocol("outbound stream closed".into())); }
                }
                m = inbound.message() => {
                    match m? {
                        None => return Ok(()),
                        Some(msg) => { last_heard = tokio::time::Instant::now(); match msg.msg {
                            Some(controller_message::Msg::Command(c)) => {
                                // Checked here, in arrival order, before the command is handed
                                // to libvirt; a higher epoch is on disk before it is acted on.
                                if let Err(e) = epoch.admit(c.epoch) {
                                    let r = send(agent_message::Msg::CommandResult(refuse_command(&c, &e)));
                                    if tx.send(r).await.is_err() {
                                        return Err(SessionError::Protocol("outbound stream closed".into()));
                                    }
                                    continue;
                                }
                                crate::metrics::get().set_epoch(epoch.highest());
                                let actor = self.actor.clone();
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    let r = actor.command(c).await;
                                    let _ = tx.send(AgentMessage { msg: Some(agent_message::Msg::CommandResult(r)) }).await;
                                });
                            }
                            Some(controller_message::Msg::Refused(r)) => refused.log(&r),
                            Some(controller_message::Msg::Welcome(_))
                            | Some(controller_message::Msg::HeartbeatAck(_))
                            | None => {}
                        }},
                    }
                }
            }
        }
    }
}

/// The answer to a command refused by the epoch guard: nothing was done.
/// Logged at WARN; a stale epoch is counted in
/// `lifeboat_agent_stale_epoch_refused_total`.
fn refuse_command(c: &lifeboat_proto::v1::Command, e: &crate::epoch::Refusal) -> lifeboat_proto::v1::CommandResult {
    if !matches!(e, crate::epoch::Refusal::Persist(_)) {
        crate::metrics::get().stale_epoch_refused.inc();
    }
    warn!(command = %c.id.escape_debug(), epoch = c.epoch, "refused a controller command: {e}");
    lifeboat_proto::v1::CommandResult {
        id: c.id.clone(),
        ok: false,
        error: format!("refused by the agent's controller epoch check: {e}"),
        ..Default::default()
    }
}

/// Where the agent dials after each attempt, and the leader it lost.
///
/// After an established session ends, the same controller is dialled again
/// first (a broken connection to a leader that is still up costs one
/// reconnect, not a detour through a follower). If that dial fails (the
/// process or its machine is gone), or the session ended because the
/// controller answered nothing (it is frozen or cut off: it is not dialled
/// again first), the agent has lost that leader: its epoch goes on every
/// session call ([`lifeboat_proto::LOST_LEADER_METADATA`]) until a session
/// is established again, so a follower holds the call while the old
/// leader's lease runs out instead of sending the agent back to it.
#[derive(Debug, Default)]
pub struct Redial {
    /// The epoch of the session that just ended (the next attempt goes to
    /// its controller again).
    ended: Option<u64>,
    /// The epoch of the leader this agent lost.
    lost: Option<u64>,
}

impl Redial {
    /// The epoch to name on the next session call.
    pub fn lost_epoch(&self) -> Option<u64> {
        self.lost
    }

    /// After an attempt at `urls[at]` that ended with `r` (established at
    /// epoch `welcomed`, if it was): where to dial next, and why.
    pub fn next(
        &mut self,
        urls: &[String],
        at: usize,
        welcomed: Option<u64>,
        r: &Result<(), SessionError>,
    ) -> (usize, String) {
        if let Some(e) = welcomed {
            if matches!(r, Err(SessionError::Silent { .. })) {
                self.ended = None;
                self.lost = Some(e);
                return next_controller(urls, at, r);
            }
            self.lost = None;
            self.ended = Some(e);
            return (at, "the same controller first, its session having ended".into());
        }
        if let Some(e) = self.ended.take()
            && matches!(r, Err(SessionError::Connect { .. } | SessionError::DialTimeout { .. }))
        {
            self.lost = Some(e);
        }
        next_controller(urls, at, r)
    }
}

/// Where the next session attempt goes after an attempt at `urls[at]`
/// ended with `r`, and why: the leader a follower named (response metadata
/// [`lifeboat_proto::LEADER_METADATA`] on an `UNAVAILABLE` answer) when it
/// is one of `urls`, otherwise the next address in the list (wrapping).
pub fn next_controller(urls: &[String], at: usize, r: &Result<(), SessionError>) -> (usize, String) {
    let n = urls.len().max(1);
    let next = (at + 1) % n;
    let Err(SessionError::Status(s)) = r else { return (next, "the next address".into()) };
    let Some(hint) = leader_hint(s) else { return (next, "the next address".into()) };
    if hint.is_empty() {
        return (next, "no leader is elected yet".into());
    }
    let same = |u: &String| u.trim_end_matches('/') == hint.trim_end_matches('/');
    match urls.iter().position(same) {
        Some(i) => (i, "the leader, as the follower named it".into()),
        None => {
            warn!(
                leader = %hint.escape_debug(),
                "the controller named a leader whose URL is not in this agent's [controller] url/urls; \
                 trying the next configured address (add the leader's URL to the configuration)"
            );
            (next, "the next address; the leader's URL is not configured".into())
        }
    }
}

/// The leader a follower named in a status: `Some("")` when it says no
/// leader is elected, `None` when the status is not a follower's answer.
pub fn leader_hint(s: &tonic::Status) -> Option<String> {
    if s.code() != tonic::Code::Unavailable {
        return None;
    }
    let v = s.metadata().get(lifeboat_proto::LEADER_METADATA)?;
    // Bounded and printable: it is logged and compared, never dialled unless configured.
    let t = v.to_str().ok()?.trim();
    if t.len() > 2048 {
        return None;
    }
    Some(t.to_string())
}

/// Logs the controller's `Refused` answers (a message of ours it refused
/// whole) at WARN, at most one line per [`RefusedLog::INTERVAL`] with the
/// count of those not logged; the session goes on.
#[derive(Debug, Default)]
struct RefusedLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusedLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn log(&mut self, r: &lifeboat_proto::v1::Refused) {
        self.unlogged = self.unlogged.saturating_add(1);
        if self.last.is_some_and(|t| t.elapsed() < Self::INTERVAL) {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        tracing::warn!(
            what = %r.what.escape_debug(),
            refused = self.unlogged,
            "the controller refused a message of this agent (nothing of it was stored): {}; see docs/security.md, Agent input",
            r.reason.escape_debug()
        );
        self.unlogged = 0;
    }
}

/// How long a dial may take, TCP, TLS and HTTP/2 handshakes together.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the TCP connection of a dial may take.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The first reconnect delay (before jitter).
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// The longest reconnect delay (before jitter).
pub const RECONNECT_CAP: Duration = Duration::from_secs(1);

/// Reconnect delays: the first retry after ~100 ms, doubling after each
/// failed attempt up to 1 s, back to the start once a session is
/// established (Welcome received: the caller builds a new one). A controller
/// that comes back is found within about a second, however many restarts
/// came before. Each delay is moved up or down by up to a third at random,
/// so agents that lost the controller together do not all dial at once.
///
/// backon's jitter adds a random part of the delay to it (`d` becomes
/// `d..2d`), so the schedule runs on two thirds of the nominal delays: a
/// nominal `b` becomes `2b/3..4b/3`. The seed is random per backoff
/// (backon's own default seed is fixed without its `std` feature, which
/// would make every agent wait alike).
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_FIRST * 2 / 3)
        .with_max_delay(RECONNECT_CAP * 2 / 3)
        .with_factor(2.0)
        .with_jitter()
        .with_jitter_seed(jitter_seed())
        .without_max_times()
}

fn jitter_seed() -> u64 {
    let b = uuid::Uuid::new_v4();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// How a session attempt ended, for the log. A status from the controller
/// is given as its code and message only (the controller closes a
/// superseded session with a status saying which session took over).
pub fn describe_end(r: &Result<(), SessionError>) -> String {
    match r {
        Ok(()) => "session closed by the controller".to_string(),
        Err(SessionError::Status(s)) => {
            let msg = if s.message().is_empty() { "(no message)" } else { s.message() };
            format!("the controller ended the session ({:?}): {msg}", s.code())
        }
        Err(e) => lifeboat_common::error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn standby_connections_go_to_every_controller_but_the_sessions_own_and_are_made_again_when_old() {
        let urls: Vec<String> = ["https://a:1", "https://b:1", "https://c:1"].map(String::from).to_vec();
        let ch = || Endpoint::from_static("https://127.0.0.1:1").connect_lazy();
        let s = Standby::default();
        let t0 = tokio::time::Instant::now();
        assert!(s.due(&urls, t0).is_empty(), "none before the first session (the leader is not known yet)");
        s.session_on(&urls[0]);
        assert_eq!(s.due(&urls, t0), vec![&urls[1], &urls[2]]);
        let again = standby_again(t0, 1000);
        assert_eq!(again, t0 + STANDBY_REFRESH, "at most the refresh age");
        assert_eq!(standby_again(t0, 0), t0 + STANDBY_REFRESH * 3 / 4, "at least three quarters of it");
        assert_eq!(standby_again(t0, u32::MAX), again, "a random value out of range is capped");
        assert!(!s.put(&urls[0], ch(), again), "never to the session's own controller");
        assert!(s.put(&urls[1], ch(), again));
        assert_eq!(s.due(&urls, t0), vec![&urls[2]]);
        assert_eq!(s.due(&urls, again - Duration::from_millis(1)), vec![&urls[2]]);
        assert_eq!(s.due(&urls, again), vec![&urls[1], &urls[2]], "made again before the idle timeout");
        // A failed dial is tried again only at its retry time, and a
        // connection still kept stays until a new one replaces it.
        s.failed(&urls[2], t0 + STANDBY_RETRY);
        assert_eq!(s.due(&urls, t0), Vec::<&String>::new());
        assert_eq!(s.due(&urls, t0 + STANDBY_RETRY), vec![&urls[2]]);
        assert!(s.put(&urls[2], ch(), again));
        s.failed(&urls[1], t0 + STANDBY_RETRY);
        assert_eq!(s.len(), 2, "a failed refresh keeps the connection it had");
        // The leader is lost: the attempt at b takes b's connection, and
        // while that call is held (seconds, at a follower) b gets no second
        // one; a, the lost leader, is due.
        assert!(s.take(&urls[1]).is_some());
        assert!(s.take(&urls[1]).is_none(), "a connection is handed out once");
        assert_eq!(s.due(&urls, t0 + STANDBY_RETRY), vec![&urls[0]]);
        assert!(!s.put(&urls[1], ch(), again), "none for the address of the attempt under way");
        s.session_on(&urls[1]);
        assert_eq!(s.due(&urls, t0), vec![&urls[0]]);
        // A session established on c while its standby connection was kept
        // (an attempt that dialled afresh): the pool lets it go.
        s.session_on(&urls[2]);
        assert!(s.is_empty());
        s.failed(&urls[2], t0);
        assert!(s.is_empty(), "nothing recorded for the current address");
    }

    #[test]
    fn backoff_starts_near_a_tenth_of_a_second_doubles_to_one_and_resets() {
        // Nominal delays 0.1, 0.2, 0.4, 0.8 s, then 1 s; each within a third either side.
        let nominal = [100u128, 200, 400, 800, 1000, 1000, 1000, 1000];
        let mut spread_low = false;
        let mut spread_high = false;
        for _ in 0..200 {
            let b = reconnect_backoff().build();
            for (d, n) in b.take(nominal.len()).zip(nominal) {
                let us = d.as_micros();
                assert!(us + 1 >= n * 2000 / 3 && us <= n * 4000 / 3 + 1, "{us} us for nominal {n} ms");
                spread_low |= us < n * 1000 * 3 / 4;
                spread_high |= us > n * 1000 * 5 / 4;
            }
        }
        assert!(spread_low && spread_high, "the jitter spreads the delays both ways");
        // Two agents that lost the controller together do not wait alike (random seeds).
        let a: Vec<Duration> = reconnect_backoff().build().take(5).collect();
        let b: Vec<Duration> = reconnect_backoff().build().take(5).collect();
        assert_ne!(a, b);
        // Five failed attempts in a row (a restart storm) still retry within 1.4 s, and a
        // new backoff (an established session) starts over near 0.1 s.
        let mut b = reconnect_backoff().build();
        let total: u128 = b.by_ref().take(5).map(|d| d.as_millis()).sum();
        assert!(total <= 3_400, "five attempts took {total} ms of waiting");
        assert!(b.next().is_some_and(|d| d <= RECONNECT_CAP * 4 / 3 + Duration::from_millis(1)));
        assert!(reconnect_backoff().build().next().is_some_and(|d| d <= RECONNECT_FIRST * 4 / 3));
    }

    #[test]
    fn a_status_from_the_controller_is_logged_as_code_and_message() {
        let r = Err(SessionError::Status(tonic::Status::aborted("superseded: another session of host-a took over")));
        let m = describe_end(&r);
        assert_eq!(m, "the controller ended the session (Aborted): superseded: another session of host-a took over");
        assert_eq!(describe_end(&Ok(())), "session closed by the controller");
        let m = describe_end(&Err(SessionError::Protocol("no Welcome within 10 s".into())));
        assert!(m.contains("no Welcome"), "{m}");
    }

    /// A real dial failure: nothing listens on 127.0.0.1:1.
    async fn refused_dial() -> Result<(), SessionError> {
        let e = Endpoint::from_static("http://127.0.0.1:1").connect().await.expect_err("nothing listens on port 1");
        Err(SessionError::Connect { url: "http://127.0.0.1:1".into(), source: e })
    }

    #[tokio::test]
    async fn after_a_session_ends_the_same_controller_comes_first_and_only_a_failed_redial_loses_it() {
        let urls: Vec<String> = ["https://a:1", "https://b:1", "https://c:1"].iter().map(|s| s.to_string()).collect();
        let mut r = Redial::default();
        assert_eq!(r.lost_epoch(), None);
        // A session with a (epoch 7) ended: a again first, nothing lost yet.
        let (i, why) = r.next(&urls, 0, Some(7), &Ok(()));
        assert_eq!(i, 0);
        assert!(why.contains("same controller"), "{why}");
        assert_eq!(r.lost_epoch(), None);
        // a cannot be dialled: its leader is lost; b next, told so.
        assert_eq!(r.next(&urls, 0, None, &refused_dial().await).0, 1);
        assert_eq!(r.lost_epoch(), Some(7));
        // b names c: to c, still naming the lost epoch (b may have timed out).
        assert_eq!(r.next(&urls, 1, None, &follower("https://c:1")).0, 2);
        assert_eq!(r.lost_epoch(), Some(7));
        // A dial that fails later does not change which leader was lost.
        assert_eq!(r.next(&urls, 2, None, &refused_dial().await).0, 0);
        assert_eq!(r.lost_epoch(), Some(7));
        // Welcomed by c (epoch 9): nothing lost any more; its end dials c again.
        assert_eq!(r.next(&urls, 2, Some(9), &Err(SessionError::Protocol("x".into()))).0, 2);
        assert_eq!(r.lost_epoch(), None);
        // c answers as a follower now (it resigned): that is no loss, follow its hint.
        assert_eq!(r.next(&urls, 2, None, &follower("https://a:1")).0, 0);
        assert_eq!(r.lost_epoch(), None);
        // A session that ended, then a redial answered by anything but a failed
        // dial (here a stale-epoch style protocol error): not lost.
        r.next(&urls, 0, Some(11), &Ok(()));
        assert_eq!(r.next(&urls, 0, None, &Err(SessionError::Protocol("expected Welcome".into()))).0, 1);
        assert_eq!(r.lost_epoch(), None);
        // A redial whose handshake never finishes (a frozen process) loses it too.
        r.next(&urls, 1, Some(12), &Ok(()));
        assert_eq!(r.next(&urls, 1, None, &Err(SessionError::DialTimeout { url: urls[1].clone() })).0, 2);
        assert_eq!(r.lost_epoch(), Some(12));
        // A controller that stopped answering is not dialled again first: lost at once.
        let (i, _) = r.next(&urls, 2, Some(13), &Err(SessionError::Silent { ms: 5000 }));
        assert_eq!((i, r.lost_epoch()), (0, Some(13)));
    }

    fn follower(leader: &str) -> Result<(), SessionError> {
        let mut s = tonic::Status::unavailable(format!("not the leader; leader is {leader}"));
        s.metadata_mut().insert(lifeboat_proto::LEADER_METADATA, leader.parse().unwrap());
        Err(SessionError::Status(s))
    }

    #[test]
    fn a_follower_hint_is_followed_only_to_a_configured_address() {
        let urls: Vec<String> = ["https://a:1", "https://b:1", "https://c:1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(next_controller(&urls, 0, &follower("https://c:1")).0, 2);
        assert_eq!(next_controller(&urls, 2, &follower("https://b:1/")).0, 1, "a trailing slash is the same URL");
        let (i, why) = next_controller(&urls, 0, &follower("https://evil:1"));
        assert_eq!(i, 1);
        assert!(why.contains("not configured"), "{why}");
        let (i, why) = next_controller(&urls, 2, &follower(""));
        assert_eq!(i, 0, "wraps around");
        assert!(why.contains("no leader"), "{why}");
        // Anything else moves on: a refused connection, an ended session, an
        // UNAVAILABLE without the metadata (not a follower's answer).
        assert_eq!(next_controller(&urls, 1, &Ok(())).0, 2);
        assert_eq!(next_controller(&urls, 1, &Err(SessionError::Status(tonic::Status::unavailable("x")))).0, 2);
        let mut other = tonic::Status::aborted("x");
        other.metadata_mut().insert(lifeboat_proto::LEADER_METADATA, "https://c:1".parse().unwrap());
        assert_eq!(
            next_controller(&urls, 0, &Err(SessionError::Status(other))).0,
            1,
            "only UNAVAILABLE carries a hint"
        );
        let one = vec!["https://a:1".to_string()];
        assert_eq!(next_controller(&one, 0, &follower("https://b:1")).0, 0);
    }
}
