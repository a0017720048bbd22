//! The agent with several controllers and the fencing epoch, against fake
//! controllers (real tonic servers with mutual TLS on 127.0.0.1:0) and
//! libvirt's test driver: a follower's leader hint is followed, a Welcome or
//! Command from a replaced leader (lower epoch) is refused and nothing is
//! done, the highest epoch survives an agent restart, an unreadable epoch
//! file refuses every session. No root needed.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_e2e::{Agent, Pki, agent_config, test_domain, test_node};
use lifeboat_proto::v1::{
    AgentMessage, Command, CommandResult, ControllerMessage, GrantLeases, HeartbeatAck, Lease, StopGuest, Welcome,
    agent_message,
    agent_session_server::{AgentSession, AgentSessionServer},
    command::Kind,
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type OutStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;
type Out = mpsc::Sender<Result<ControllerMessage, Status>>;

const VM: &str = "66666666-0000-4000-8000-000000000001";

/// A fake controller: a follower (answers every session UNAVAILABLE naming
/// `leader`) or a leader with `epoch` (Welcome, heartbeat answers; commands
/// sent with [`Fake::command`], results collected).
#[derive(Clone)]
struct Fake {
    leader_hint: Arc<Mutex<Option<String>>>,
    epoch: u64,
    sessions: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    out: Arc<Mutex<Option<Out>>>,
    results: Arc<Mutex<Vec<CommandResult>>>,
    /// The `lifeboat-lost-epoch` of each session call ("" without one).
    lost: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn leader(epoch: u64) -> Fake {
        Fake {
            leader_hint: Arc::default(),
            epoch,
            sessions: Arc::default(),
            ended: Arc::default(),
            out: Arc::default(),
            results: Arc::default(),
            lost: Arc::default(),
        }
    }

    fn follower(leader: &str) -> Fake {
        let f = Fake::leader(0);
        f.step_down(leader);
        f
    }

    /// From now on a follower naming `leader`; the open session is ended.
    fn step_down(&self, leader: &str) {
        *self.leader_hint.lock().unwrap() = Some(leader.to_string());
        if let Some(out) = self.out.lock().unwrap().take() {
            let _ = out.try_send(Err(Status::unavailable("leadership lost")));
        }
    }

    fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Sends a command on the current session and waits for its result.
    async fn command(&self, id: &str, epoch: u64, kind: Kind) -> CommandResult {
        let out = self.out.lock().unwrap().clone().expect("a session is open");
        let c = Command { id: id.into(), kind: Some(kind), epoch };
        out.send(Ok(ControllerMessage { msg: Some(controller_message::Msg::Command(c)) })).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.results.lock().unwrap().iter().find(|r| r.id == id) {
                return r.clone();
            }
            assert!(Instant::now() < deadline, "no result for command {id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl AgentSession for Fake {
    type SessionStream = OutStream;

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<OutStream>, Status> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let lost = req.metadata().get(lifeboat_proto::LOST_LEADER_METADATA).and_then(|v| v.to_str().ok());
        self.lost.lock().unwrap().push(lost.unwrap_or_default().to_string());
        let hint = self.leader_hint.lock().unwrap().clone();
        if let Some(l) = &hint {
            let mut s = Status::unavailable(format!("not the leader; leader is {l}"));
            s.metadata_mut().insert(lifeboat_proto::LEADER_METADATA, l.parse().unwrap());
            return Err(s);
        }
        let (tx, rx) = mpsc::channel(64);
        let welcome = Welcome { heartbeat_interval_ms: 500, epoch: self.epoch };
        tx.send(Ok(ControllerMessage { msg: Some(controller_message::Msg::Welcome(welcome)) })).await.unwrap();
        *self.out.lock().unwrap() = Some(tx.clone());
        let mut inbound = req.into_inner();
        let (results, ended) = (self.results.clone(), self.ended.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(agent_message::Msg::Heartbeat(h)) => {
                        let ack = HeartbeatAck { seq: h.seq, handled_unix_ms: 0 };
                        let _ = tx
                            .send(Ok(ControllerMessage { msg: Some(controller_message::Msg::HeartbeatAck(ack)) }))
                            .await;
                    }
                    Some(agent_message::Msg::CommandResult(r)) => results.lock().unwrap().push(r),
                    _ => {}
                }
            }
            ended.fetch_add(1, Ordering::SeqCst);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves `fake` with the controller's certificate; returns its URL.
async fn serve(pki: &Pki, fake: Fake) -> String {
    serve_counting(pki, fake).await.0
}

/// An agent's configuration with several controller URLs, on a test-driver host with one running guest.
fn config(pki: &Pki, tmp: &Path, urls: &[&str]) -> String {
    let node = tmp.join("node.xml");
    if !node.exists() {
        let dom = test_domain("vm-a", VM, "/srv/shared/vm-a.img", "52:54:00:00:0e:01", 1);
        std::fs::write(&node, test_node(&[dom])).unwrap();
    }
    let text = agent_config("host-e", &format!("test://{}", node.display()), urls[0], &pki.agent("host-e"), "");
    let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    text.replace(&format!("url = \"{}\"", urls[0]), &format!("urls = [{}]", list.join(", ")))
}

fn state_dir(pki: &Pki) -> PathBuf {
    pki.dir.join("state-host-e")
}

async fn wait(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn setup() -> (tempfile::TempDir, Pki) {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    (tmp, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_the_agent_to_the_leader_it_names() {
    let (tmp, pki) = setup();
    let leader = Fake::leader(4);
    let leader_url = serve(&pki, leader.clone()).await;
    let follower = Fake::follower(&leader_url);
    let follower_url = serve(&pki, follower.clone()).await;
    // Between them in the list: a follower that knows no leader. Following the hint
    // skips it; going down the list would reach it first.
    let no_leader = Fake::follower("");
    let no_leader_url = serve(&pki, no_leader.clone()).await;
    let started = Instant::now();
    let a = Agent::start(&config(&pki, tmp.path(), &[&follower_url, &no_leader_url, &leader_url]));
    wait(Duration::from_secs(10), "a session with the leader", || leader.sessions() >= 1).await;
    let took = started.elapsed();
    let r = leader.command("c1", 4, Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() })).await;
    a.stop().await;
    println!("leader reached in {} ms via the follower's hint", took.as_millis());
    assert_eq!(follower.sessions(), 1);
    assert_eq!(no_leader.sessions(), 0, "the hint was not followed: the next address in the list was tried");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(r.ok && r.outcome == "done", "{r:?}");
    assert_eq!(lifeboat_agent::epoch::load(&state_dir(&pki)).unwrap(), 4, "the leader's epoch is on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_with_a_stale_epoch_ends_the_session_and_the_next_address_is_tried() {
    let (tmp, pki) = setup();
    lifeboat_agent::epoch::store(&state_dir(&pki), 10).unwrap();
    let stale = Fake::leader(9);
    let stale_url = serve(&pki, stale.clone()).await;
    let current = Fake::leader(10);
    let current_url = serve(&pki, current.clone()).await;
    // An epoch no etcd revision reaches (a broken or forged sender) would
    // make every later leader stale: refused too, and not stored.
    let forged = Fake::leader(u64::MAX);
    let forged_url = serve(&pki, forged.clone()).await;
    let before = lifeboat_agent::metrics::get().stale_epoch_refused.get();
    let a = Agent::start(&config(&pki, tmp.path(), &[&forged_url, &stale_url, &current_url]));
    wait(Duration::from_secs(10), "a session with the current leader", || current.sessions() >= 1).await;
    wait(Duration::from_secs(5), "the forged session ended", || forged.ended.load(Ordering::SeqCst) >= 1).await;
    assert!(lifeboat_agent::metrics::get().stale_epoch_refused.get() >= before + 2, "refused Welcomes are counted");
    // The stale session was ended by the agent, right after its Welcome.
    wait(Duration::from_secs(5), "the stale session ended", || stale.ended.load(Ordering::SeqCst) >= 1).await;
    // The current one stays up (heartbeats answered) and commands work.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = current.command("c1", 10, Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() })).await;
    let (stale_sessions, current_sessions) = (stale.sessions(), current.sessions());
    a.stop().await;
    assert!(r.ok && r.outcome == "done", "{r:?}");
    assert_eq!(current_sessions, 1, "the current leader's session was not ended");
    assert!(stale_sessions >= 1);
    assert!(stale.results.lock().unwrap().is_empty());
    assert!(forged.results.lock().unwrap().is_empty());
    assert_eq!(lifeboat_agent::epoch::load(&state_dir(&pki)).unwrap(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_command_is_refused_and_changes_nothing_and_a_higher_one_is_persisted_first() {
    let (tmp, pki) = setup();
    let leader = Fake::leader(10);
    let url = serve(&pki, leader.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&url]));
    wait(Duration::from_secs(10), "a session", || leader.sessions() >= 1).await;
    let before = lifeboat_agent::metrics::get().stale_epoch_refused.get();
    let stop = || Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() });
    let r = leader.command("old", 9, stop()).await;
    assert!(!r.ok && r.outcome.is_empty(), "{r:?}");
    assert!(r.error.contains("stale controller epoch 9 < 10"), "{}", r.error);
    assert!(lifeboat_agent::metrics::get().stale_epoch_refused.get() > before, "counted");
    // Epoch 0 (a SQLite controller) is just a lower number.
    let r = leader.command("zero", 0, stop()).await;
    assert!(!r.ok && r.error.contains("stale controller epoch 0 < 10"), "{}", r.error);
    // Leases are commands too: a stale grant writes no lease file.
    let grant = |g: u64| {
        Kind::GrantLeases(GrantLeases {
            leases: vec![Lease { uuid: VM.into(), name: "vm-a".into(), generation: g }],
            expires_unix_ms: lifeboat_common::now_unix_ms() + 60_000,
            merge: false,
            issued_unix_ms: lifeboat_common::now_unix_ms(),
        })
    };
    let r = leader.command("old-grant", 9, grant(1)).await;
    assert!(!r.ok && r.error.contains("stale controller epoch 9 < 10"), "{}", r.error);
    assert!(lifeboat_agent::lease::read_file(&state_dir(&pki), VM).unwrap().is_none(), "a stale grant wrote a lease");
    let r = leader.command("grant", 10, grant(1)).await;
    assert!(r.ok, "{}", r.error);
    assert!(lifeboat_agent::lease::read_file(&state_dir(&pki), VM).unwrap().is_some());
    // Nothing was done: the guest still runs, so the current epoch's stop destroys it.
    let r = leader.command("now", 10, stop()).await;
    assert_eq!((r.ok, r.outcome.as_str()), (true, "done"), "{r:?}");
    // A higher epoch on a command: on disk, then carried out; the lower one refused from then on.
    let r = leader.command("newer", 11, stop()).await;
    assert_eq!((r.ok, r.outcome.as_str()), (true, "already"), "{r:?}");
    assert_eq!(lifeboat_agent::epoch::load(&state_dir(&pki)).unwrap(), 11);
    let r = leader.command("was-current", 10, stop()).await;
    assert!(!r.ok && r.error.contains("stale controller epoch 10 < 11"), "{}", r.error);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_highest_epoch_survives_an_agent_restart() {
    let (tmp, pki) = setup();
    let new = Fake::leader(20);
    let new_url = serve(&pki, new.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&new_url]));
    let sd = state_dir(&pki);
    wait(Duration::from_secs(10), "epoch 20 on disk", || lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 20)).await;
    a.stop().await;
    // Restarted, with only the replaced leader (epoch 19) reachable: never established.
    let old = Fake::leader(19);
    let old_url = serve(&pki, old.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&old_url]));
    wait(Duration::from_secs(10), "two sessions ended by the agent", || old.ended.load(Ordering::SeqCst) >= 2).await;
    let out = old.out.lock().unwrap().clone().unwrap();
    let c = Command {
        id: "late".into(),
        kind: Some(Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() })),
        epoch: 19,
    };
    let _ = out.send(Ok(ControllerMessage { msg: Some(controller_message::Msg::Command(c)) })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.stop().await;
    let got = old.results.lock().unwrap().clone();
    assert!(got.is_empty(), "the replaced leader got an answer: its session was used: {got:?}");
    assert_eq!(lifeboat_agent::epoch::load(&state_dir(&pki)).unwrap(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_epoch_file_refuses_every_session_until_repaired() {
    let (tmp, pki) = setup();
    let leader = Fake::leader(5);
    let url = serve(&pki, leader.clone()).await;
    std::fs::create_dir_all(state_dir(&pki)).unwrap();
    let file = lifeboat_agent::epoch::path(&state_dir(&pki));
    std::fs::write(&file, "garbage\n").unwrap();
    let a = Agent::start(&config(&pki, tmp.path(), &[&url]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = leader.sessions();
    // Repaired by the operator: picked up at the next attempt, no restart.
    std::fs::write(&file, "5\n").unwrap();
    wait(Duration::from_secs(5), "a session after the repair", || leader.sessions() >= 1).await;
    a.stop().await;
    assert_eq!(refused, 0, "a session was opened while the highest epoch was unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_agent_is_with_the_new_leader_within_seconds() {
    let (tmp, pki) = setup();
    let old = Fake::leader(30);
    let old_url = serve(&pki, old.clone()).await;
    // Elected after the old leader lost its lease: leads with a higher epoch.
    let new = Fake::leader(31);
    let new_url = serve(&pki, new.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&old_url, &new_url]));
    let sd = state_dir(&pki);
    wait(Duration::from_secs(10), "epoch 30 on disk", || lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 30)).await;
    assert_eq!(new.sessions(), 0, "the first address is tried first");
    // The old leader loses its leadership: ends the session, then answers as a follower.
    let lost = Instant::now();
    old.step_down(&new_url);
    wait(Duration::from_secs(5), "the new leader's epoch on disk", || {
        lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 31)
    })
    .await;
    let took = lost.elapsed();
    let r = new.command("c1", 31, Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() })).await;
    a.stop().await;
    println!("with the new leader {} ms after the old one ended its session", took.as_millis());
    assert!(r.ok, "{r:?}");
    assert_eq!(new.sessions(), 1);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_dial_its_leader_again_names_the_lost_epoch_to_the_follower() {
    let (tmp, pki) = setup();
    let old = Fake::leader(40);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old_url = format!("https://{}", listener.local_addr().unwrap());
    let tls = pki.controller().load().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls.server_config())
            .unwrap()
            .add_service(AgentSessionServer::new(old.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let follower = Fake::follower(&old_url);
    let follower_url = serve(&pki, follower.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&old_url, &follower_url]));
    let sd = state_dir(&pki);
    wait(Duration::from_secs(10), "epoch 40 on disk", || lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 40)).await;
    assert_eq!(follower.sessions(), 0, "the first address is tried first");
    // A session that ends while its controller still listens is taken up
    // with the same controller again: the follower never hears of it.
    let out = old.out.lock().unwrap().take().unwrap();
    out.try_send(Err(Status::unavailable("connection reset"))).unwrap();
    wait(Duration::from_secs(5), "a second session with the old leader", || old.sessions() == 2).await;
    assert_eq!(follower.sessions(), 0, "a leader still up is dialled again first");
    // The old leader's process dies: its session ends and it cannot be dialled.
    server.abort();
    let out = old.out.lock().unwrap().take().unwrap();
    out.try_send(Err(Status::unavailable("connection reset"))).unwrap();
    wait(Duration::from_secs(5), "a call at the follower", || follower.sessions() >= 1).await;
    let lost = follower.lost.lock().unwrap().clone();
    a.stop().await;
    assert_eq!(lost[0], "40", "the follower is told which leader the agent lost: {lost:?}");
    assert_eq!(old.sessions(), 2, "nothing more reached the dead leader");
}

/// Serves `fake` with the controller's certificate; returns its URL and
/// the count of TCP connections it accepted.
async fn serve_counting(pki: &Pki, fake: Fake) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = pki.controller().load().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |c| {
        if c.is_ok() {
            count.fetch_add(1, Ordering::SeqCst);
        }
        c
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls.server_config())
            .unwrap()
            .add_service(AgentSessionServer::new(fake))
            .serve_with_incoming(incoming),
    );
    (format!("https://{addr}"), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_with_a_new_leader_goes_out_on_the_standby_connection_made_before_the_failover() {
    let (tmp, pki) = setup();
    let old = Fake::leader(50);
    let (old_url, old_conns) = serve_counting(&pki, old.clone()).await;
    let new = Fake::leader(51);
    let (new_url, new_conns) = serve_counting(&pki, new.clone()).await;
    let a = Agent::start(&config(&pki, tmp.path(), &[&old_url, &new_url]));
    let sd = state_dir(&pki);
    wait(Duration::from_secs(10), "epoch 50 on disk", || lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 50)).await;
    // Within one look at the standby connections (10 s ± a third) the agent
    // holds a connection to the other controller, and calls nothing on it.
    wait(Duration::from_secs(20), "a standby connection to the other controller", || {
        new_conns.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(new.sessions(), 0, "a standby connection carries no call");
    assert_eq!(old_conns.load(Ordering::SeqCst), 1, "none is made to the session's own controller");
    // The old leader loses its leadership: the agent dials it again (a fresh
    // dial: a dead leader must be told apart), is sent on, and its session
    // with the new leader goes out on the standby connection.
    let lost = Instant::now();
    old.step_down(&new_url);
    wait(Duration::from_secs(5), "the new leader's epoch on disk", || {
        lifeboat_agent::epoch::load(&sd).is_ok_and(|e| e == 51)
    })
    .await;
    let took = lost.elapsed();
    let r = new.command("c1", 51, Kind::StopGuest(StopGuest { uuid: VM.into(), reason: "t".into() })).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(new.sessions(), 1);
    assert_eq!(new_conns.load(Ordering::SeqCst), 1, "the session needed no new connection (no handshake)");
    assert_eq!(old_conns.load(Ordering::SeqCst), 2, "the old leader was dialled again once, afresh");
    // Now the old controller is the other one: it gets a standby connection.
    wait(Duration::from_secs(20), "a standby connection to the old leader", || old_conns.load(Ordering::SeqCst) == 3)
        .await;
    a.stop().await;
    println!("with the new leader {} ms after the old one ended its session", took.as_millis());
    assert_eq!(old.sessions(), 2, "the standby connection carries no call");
}
