//! The follower gate: one service in front of the gRPC routes. Until this
//! process leads (and has loaded its state), every call is answered
//! `UNAVAILABLE` "not the leader; leader is URL" with the leader's URL in the
//! [`lifeboat_proto::LEADER_METADATA`] response metadata; once it leads, the
//! real services answer. A process that lost its leadership refuses again
//! (it is about to exit).
//!
//! Two kinds of calls are held instead of refused:
//! - between winning the election and opening (while it catches up and
//!   loads the pool), every call: it is answered by the real services the
//!   moment the gate opens, or refused as before after [`HOLD_WHILE_LOADING`]
//!   or if it never does;
//! - on a follower, the call of an agent that lost its leader
//!   ([`lifeboat_proto::LOST_LEADER_METADATA`] names that leader's epoch)
//!   while etcd still names that leader (its lease has not run out yet) or
//!   nobody: held until this process is elected (then as above), another
//!   controller is elected (refused at once, naming it), or the follower
//!   hold (about the leader lease and a margin) has passed (refused naming
//!   whoever leads then).
//!
//! Agents reconnecting after a failover thus do their TLS handshakes while
//! the old leader's lease runs out and the new one loads, instead of
//! dialling again and again to be told to wait.
//!
//! Architecture invariant: a follower changes nothing and serves no state:
//! its cache may lag, so it only ever names the leader. A held call reaches
//! the services only once the gate is open and the leadership holds.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};

use super::Leadership;
use super::election::LeaderHint;

struct Open<S> {
    routes: S,
    leadership: Option<Arc<Leadership>>,
}

/// How long a call that reaches a leader still loading waits for it to
/// open before it is refused as a follower's would be: longer than loading
/// 10,000 hosts takes, shorter than an agent's wait for its Welcome (10 s
/// after the call is answered, so the hold does not count against it).
pub const HOLD_WHILE_LOADING: Duration = Duration::from_secs(15);

/// Where the gate is; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// A follower: refuses, or holds the calls of agents that lost the
    /// leader it names.
    Following,
    /// Won the election and loading: holds every call.
    Elected,
    /// The routes answer (while the leadership holds).
    Open,
}

struct Shared<S> {
    open: OnceLock<Open<S>>,
    hint: watch::Receiver<LeaderHint>,
    phase: watch::Sender<Phase>,
    /// How long a follower holds the call of an agent that lost its leader.
    follower_hold: Duration,
    /// Counts the calls a follower held: an agent says the leader is gone,
    /// so this process may lead soon (it may load ahead).
    suspect: watch::Sender<u64>,
}

/// The gate (cheap to clone: one state shared by every connection).
pub struct Gate<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate { shared: self.shared.clone() }
    }
}

/// The epoch an agent's call says it lost ([`lifeboat_proto::LOST_LEADER_METADATA`]);
/// `None` without one or when it is not a decimal epoch (then the call is
/// treated as any other).
fn lost_epoch<B>(req: &Request<B>) -> Option<u64> {
    let v = req.headers().get(lifeboat_proto::LOST_LEADER_METADATA)?;
    let t = v.to_str().ok()?;
    if t.is_empty() || t.len() > 20 {
        return None;
    }
    t.parse().ok()
}

/// Whether a follower holds the call of an agent that lost the leader of
/// epoch `lost`, given who etcd says leads: that leader (or an older one,
/// its lease not yet run out as far as this follower read) or nobody.
fn holds_for_lost(hint: &LeaderHint, lost: u64) -> bool {
    match hint {
        LeaderHint::Leader(_, epoch) => *epoch <= lost,
        LeaderHint::NoLeader => true,
        LeaderHint::Unknown | LeaderHint::EtcdError(_) => false,
    }
}

impl<S> Gate<S> {
    /// A closed gate that names the leader `hint` says, holding the calls of
    /// agents that lost that leader for up to `follower_hold`.
    pub fn follower(hint: watch::Receiver<LeaderHint>, follower_hold: Duration) -> Self {
        let (phase, _) = watch::channel(Phase::Following);
        let (suspect, _) = watch::channel(0);
        Gate { shared: Arc::new(Shared { open: OnceLock::new(), hint, phase, follower_hold, suspect }) }
    }

    /// This process won the election and is loading: from now until the
    /// gate opens, calls are held (at most [`HOLD_WHILE_LOADING`]) instead
    /// of refused.
    pub fn elected(&self) {
        self.shared.phase.send_if_modified(|p| {
            let moved = *p < Phase::Elected;
            if moved {
                *p = Phase::Elected;
            }
            moved
        });
    }

    /// A gate open from the start, with no leadership to hold (the SQLite
    /// backend: one controller, always the leader).
    pub fn open_now(routes: S) -> Self {
        let g = Gate::follower(watch::channel(LeaderHint::Unknown).1, Duration::ZERO);
        let _ = g.shared.open.set(Open { routes, leadership: None });
        g.shared.phase.send_replace(Phase::Open);
        g
    }

    /// Opens the gate: `routes` answer from now on, while `leadership`
    /// holds. Only the first call counts.
    pub fn open(&self, routes: S, leadership: Arc<Leadership>) {
        let _ = self.shared.open.set(Open { routes, leadership: Some(leadership) });
        self.shared.phase.send_replace(Phase::Open);
    }

    /// Whether a call with `lost` (see [`lost_epoch`]) is held now rather
    /// than refused.
    fn holds_call(&self, lost: Option<u64>) -> bool {
        if self.shared.open.get().is_some() {
            return false;
        }
        match *self.shared.phase.borrow() {
            Phase::Elected => true,
            Phase::Following => {
                let held = lost.is_some_and(|e| holds_for_lost(&self.shared.hint.borrow(), e));
                if held {
                    self.shared.suspect.send_modify(|n| *n = n.saturating_add(1));
                }
                held
            }
            Phase::Open => false,
        }
    }

    /// Changes each time this follower holds the call of an agent that lost
    /// the leader etcd still names (or nobody): that leader may be gone.
    pub fn leader_suspected(&self) -> watch::Receiver<u64> {
        self.shared.suspect.subscribe()
    }

    /// Whether calls reach the routes now.
    pub fn is_open(&self) -> bool {
        self.shared.open.get().is_some_and(|o| o.leadership.as_ref().is_none_or(|l| l.holds()))
    }

    /// The refusal a call gets now (`None` when the gate is open).
    pub fn refusal(&self) -> Option<tonic::Status> {
        if let Some(o) = self.shared.open.get() {
            match &o.leadership {
                None => return None,
                Some(l) if l.holds() => return None,
                Some(_) => {
                    return Some(tonic::Status::unavailable(
                        "not the leader; this controller lost its leadership and is restarting as a follower; \
                         try the other controllers",
                    ));
                }
            }
        }
        Some(refusal_for(&self.shared.hint.borrow()))
    }

    /// Waits while the call of an agent that lost epoch `lost` (if any) is
    /// to be held: until the gate opens, a follower's reason to hold ends or
    /// its bound passes. The caller decides again afterwards.
    async fn hold(&self, lost: Option<u64>) {
        let start = tokio::time::Instant::now();
        let mut phase = self.shared.phase.subscribe();
        let mut hint = self.shared.hint.clone();
        let mut elected_seen: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            let until = match *phase.borrow_and_update() {
                Phase::Open => return,
                Phase::Elected => *elected_seen.get_or_insert(now) + HOLD_WHILE_LOADING,
                Phase::Following => {
                    if !lost.is_some_and(|e| holds_for_lost(&hint.borrow_and_update(), e)) {
                        return;
                    }
                    start + self.shared.follower_hold
                }
            };
            if now >= until {
                return;
            }
            tokio::select! {
                r = phase.changed() => if r.is_err() { return },
                r = hint.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

/// The status a follower answers with, given who leads.
pub fn refusal_for(hint: &LeaderHint) -> tonic::Status {
    match hint {
        LeaderHint::Leader(url, _) => {
            let mut s = tonic::Status::unavailable(format!("not the leader; leader is {url}"));
            if let Ok(v) = url.parse() {
                s.metadata_mut().insert(lifeboat_proto::LEADER_METADATA, v);
            }
            s
        }
        LeaderHint::NoLeader => tonic::Status::unavailable(
            "not the leader; no leader is elected (etcd: no controller holds the election; one takes over within \
             leader_ttl_ms)",
        ),
        LeaderHint::Unknown => {
            tonic::Status::unavailable("not the leader; no leader is elected (etcd: not read yet; retry in a moment)")
        }
        LeaderHint::EtcdError(e) => {
            tonic::Status::unavailable(format!("not the leader; no leader is elected (etcd: {e})"))
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<Request<B>> for Gate<S>
where
    S: tonic::codegen::Service<Request<B>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The routes are always ready (tonic's `Routes`); a refusal needs nothing.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let lost = lost_epoch(&req);
        if self.holds_call(lost) {
            let gate = self.clone();
            return Box::pin(async move {
                gate.hold(lost).await;
                // Decided again now: open and holding, or refused.
                if let Some(status) = gate.refusal() {
                    return Ok(status.into_http::<Body>());
                }
                match gate.shared.open.get() {
                    Some(o) => o.routes.clone().call(req).await,
                    None => Ok(tonic::Status::unavailable("not the leader").into_http::<Body>()),
                }
            });
        }
        if let Some(status) = self.refusal() {
            return Box::pin(async move { Ok(status.into_http::<Body>()) });
        }
        match self.shared.open.get() {
            Some(o) => {
                let mut routes = o.routes.clone();
                Box::pin(routes.call(req))
            }
            None => Box::pin(async { Ok(tonic::Status::unavailable("not the leader").into_http::<Body>()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::codegen::Service;

    #[derive(Clone)]
    struct Echo;

    impl tonic::codegen::Service<Request<()>> for Echo {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Response<Body>, Infallible>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: Request<()>) -> Self::Future {
            Box::pin(async { Ok(Response::builder().header("x-served", "yes").body(Body::empty()).unwrap()) })
        }
    }

    const HOLD: Duration = Duration::from_secs(6);

    fn grpc_status(r: &Response<Body>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(r.headers())
    }

    #[tokio::test]
    async fn a_follower_refuses_every_call_naming_the_leader_until_it_leads_and_again_once_it_lost() {
        let (tx, rx) = watch::channel(LeaderHint::Unknown);
        let mut g: Gate<Echo> = Gate::follower(rx, HOLD);
        let r = g.call(Request::new(())).await.unwrap();
        let s = grpc_status(&r).expect("a refusal");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("not the leader; no leader is elected (etcd: "), "{}", s.message());
        assert!(r.headers().get(lifeboat_proto::LEADER_METADATA).is_none());

        tx.send(LeaderHint::Leader("https://c2:7443".into(), 7)).unwrap();
        let r = g.call(Request::new(())).await.unwrap();
        let s = grpc_status(&r).expect("a refusal");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "not the leader; leader is https://c2:7443");
        assert_eq!(r.headers().get(lifeboat_proto::LEADER_METADATA).unwrap(), "https://c2:7443");
        assert!(r.headers().get("x-served").is_none(), "the routes never saw it");

        tx.send(LeaderHint::EtcdError("connection refused".into())).unwrap();
        let s = grpc_status(&g.call(Request::new(())).await.unwrap()).unwrap();
        assert_eq!(s.message(), "not the leader; no leader is elected (etcd: connection refused)");

        // The same gate value (cloned per connection before leading) opens.
        let mut before = g.clone();
        let l = Arc::new(Leadership::new(b"k".to_vec(), 7, Duration::from_secs(60), tokio::time::Instant::now()));
        g.open(Echo, l.clone());
        let r = before.call(Request::new(())).await.unwrap();
        assert_eq!(r.headers().get("x-served").unwrap(), "yes", "a connection accepted before leading is served");
        assert!(grpc_status(&r).is_none());

        l.lose("compare failed");
        let r = before.call(Request::new(())).await.unwrap();
        assert!(r.headers().get("x-served").is_none());
        let s = grpc_status(&r).expect("refused after losing");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("not the leader"), "{}", s.message());
    }

    #[tokio::test(start_paused = true)]
    async fn an_elected_leader_holds_calls_while_it_loads_and_serves_them_once_open() {
        let (_tx, rx) = watch::channel(LeaderHint::Leader("https://me:7443".into(), 7));
        let mut g: Gate<Echo> = Gate::follower(rx, HOLD);
        g.elected();
        let held = tokio::spawn({
            let mut g = g.clone();
            async move { g.call(Request::new(())).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!held.is_finished(), "held, not refused, while loading");
        let l = Arc::new(Leadership::new(b"k".to_vec(), 7, Duration::from_secs(60), tokio::time::Instant::now()));
        g.open(Echo, l.clone());
        let r = held.await.unwrap();
        assert_eq!(r.headers().get("x-served").unwrap(), "yes", "served by the routes once open");
        // Open: nothing is held any more; lost: refused at once.
        l.lose("compare failed");
        let s = grpc_status(&g.call(Request::new(())).await.unwrap()).expect("refused after losing");
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_is_refused_if_the_leader_does_not_open_in_time_or_loses_first() {
        let (_tx, rx) = watch::channel(LeaderHint::Leader("https://me:7443".into(), 7));
        let mut g: Gate<Echo> = Gate::follower(rx, HOLD);
        // Not elected: refused at once, naming the leader.
        let s = grpc_status(&g.call(Request::new(())).await.unwrap()).unwrap();
        assert_eq!(s.message(), "not the leader; leader is https://me:7443");
        g.elected();
        let t0 = tokio::time::Instant::now();
        let r = g.call(Request::new(())).await.unwrap();
        assert_eq!(t0.elapsed(), HOLD_WHILE_LOADING);
        let s = grpc_status(&r).expect("refused after the hold");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(r.headers().get("x-served").is_none());
        // Opened with a leadership already lost: the held call is refused.
        let held = tokio::spawn({
            let mut g = g.clone();
            async move { g.call(Request::new(())).await.unwrap() }
        });
        tokio::task::yield_now().await;
        let l = Arc::new(Leadership::new(b"k".to_vec(), 7, Duration::from_secs(60), tokio::time::Instant::now()));
        l.lose("the leadership key was deleted");
        g.open(Echo, l);
        let r = held.await.unwrap();
        assert!(r.headers().get("x-served").is_none(), "never served without the leadership");
        assert_eq!(grpc_status(&r).unwrap().code(), tonic::Code::Unavailable);
    }

    /// A call of an agent that lost the leader of epoch `e` (header value).
    fn lost(e: &str) -> Request<()> {
        let mut r = Request::new(());
        r.headers_mut().insert(lifeboat_proto::LOST_LEADER_METADATA, e.parse().unwrap());
        r
    }

    fn spawn_call(g: &Gate<Echo>, r: Request<()>) -> tokio::task::JoinHandle<Response<Body>> {
        let mut g = g.clone();
        tokio::spawn(async move { g.call(r).await.unwrap() })
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_holds_an_agent_that_lost_the_named_leader_until_it_leads_and_serves_it() {
        let (tx, rx) = watch::channel(LeaderHint::Leader("https://c1:7443".into(), 7));
        let mut g: Gate<Echo> = Gate::follower(rx, HOLD);
        let suspected = g.leader_suspected();
        // No claim, an older leader than the one named, or a value that is
        // no epoch: refused at once, naming the leader.
        for r in [Request::new(()), lost("6"), lost(""), lost("seven"), lost("-7"), lost("99999999999999999999999")] {
            let t0 = tokio::time::Instant::now();
            let s = grpc_status(&g.call(r).await.unwrap()).expect("refused");
            assert_eq!(s.message(), "not the leader; leader is https://c1:7443");
            assert_eq!(t0.elapsed(), Duration::ZERO);
        }
        assert_eq!(*suspected.borrow(), 0, "a refused call suspects nothing");
        // Lost the leader etcd still names (its lease has not run out): held.
        let held = spawn_call(&g, lost("7"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!held.is_finished(), "held while etcd names the lost leader");
        assert_eq!(*suspected.borrow(), 1, "a held call says the leader may be gone");
        // The lease ran out: nobody leads; a newly lost claim is held too.
        tx.send(LeaderHint::NoLeader).unwrap();
        let second = spawn_call(&g, lost("7"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!held.is_finished() && !second.is_finished(), "held while nobody leads");
        // This process is elected at 3 s and loads for 8 s, past the follower
        // hold: the calls stay held (now by the loading hold) and are served.
        g.elected();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!held.is_finished() && !second.is_finished(), "held while loading");
        let l = Arc::new(Leadership::new(b"k".to_vec(), 8, Duration::from_secs(60), tokio::time::Instant::now()));
        g.open(Echo, l);
        for h in [held, second] {
            let r = h.await.unwrap();
            assert_eq!(r.headers().get("x-served").unwrap(), "yes", "served by the new leader's routes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_agent_is_sent_on_at_once_when_another_leads_and_after_the_hold_when_none_changes() {
        let (tx, rx) = watch::channel(LeaderHint::Leader("https://c1:7443".into(), 7));
        let g: Gate<Echo> = Gate::follower(rx, HOLD);
        // The lost leader still named for the whole hold: refused after it,
        // naming that leader (the agent's own link to it was what broke).
        let t0 = tokio::time::Instant::now();
        let r = spawn_call(&g, lost("7")).await.unwrap();
        assert_eq!(t0.elapsed(), HOLD);
        assert_eq!(grpc_status(&r).unwrap().message(), "not the leader; leader is https://c1:7443");
        assert!(r.headers().get("x-served").is_none());
        // Another controller is elected while a call is held: refused at
        // once, naming it.
        let held = spawn_call(&g, lost("7"));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t1 = tokio::time::Instant::now();
        tx.send(LeaderHint::Leader("https://c3:7443".into(), 9)).unwrap();
        let r = held.await.unwrap();
        assert_eq!(t1.elapsed(), Duration::ZERO);
        let s = grpc_status(&r).unwrap();
        assert_eq!(s.message(), "not the leader; leader is https://c3:7443");
        assert_eq!(r.headers().get(lifeboat_proto::LEADER_METADATA).unwrap(), "https://c3:7443");
        // A forged claim of the highest epoch (2^64-1) waits no longer than
        // any other: the follower hold, then refused naming the leader.
        let t2 = tokio::time::Instant::now();
        let r = spawn_call(&g, lost("18446744073709551615")).await.unwrap();
        assert_eq!(t2.elapsed(), HOLD);
        assert_eq!(grpc_status(&r).unwrap().message(), "not the leader; leader is https://c3:7443");
        assert!(r.headers().get("x-served").is_none());
        // etcd unreadable: nothing to wait for, refused at once.
        tx.send(LeaderHint::EtcdError("connection refused".into())).unwrap();
        let s = grpc_status(&spawn_call(&g, lost("9")).await.unwrap()).unwrap();
        assert!(s.message().contains("etcd: connection refused"), "{}", s.message());
    }

    #[tokio::test]
    async fn an_sqlite_gate_is_open_from_the_start() {
        let mut g = Gate::open_now(Echo);
        assert!(g.is_open());
        let r = g.call(Request::new(())).await.unwrap();
        assert_eq!(r.headers().get("x-served").unwrap(), "yes");
    }
}
