//! The agent's safety commands against libvirt's test driver, in process:
//! stop and cleanup on every guest state that may hold the disks (paused,
//! pm-suspended, crashed, ...), generations that only move forward, leases
//! bound to the boot; and the session's reconnect after the controller ends
//! an established session. No root needed.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifeboat_agent::libvirt::{Actor, ActorConfig, Shared, Update};
use lifeboat_e2e::{Agent, Pki, agent_config, test_domain, test_node};
use lifeboat_proto::v1::{
    AgentMessage, CleanupGuest, Command, CommandResult, ControllerMessage, DefineGuest, GrantLeases, GuestState, Lease,
    StopGuest, Welcome,
    agent_session_server::{AgentSession, AgentSessionServer},
    command::Kind,
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// libvirt state numbers, as `<test:runstate>` takes them, and what the agent reports.
const STATES: [(&str, u32, GuestState); 8] = [
    ("nostate", 0, GuestState::Nostate),
    ("running", 1, GuestState::Running),
    ("blocked", 2, GuestState::Blocked),
    ("paused", 3, GuestState::Paused),
    ("shutdown", 4, GuestState::Shutdown),
    ("shutoff", 5, GuestState::Shutoff),
    ("crashed", 6, GuestState::Crashed),
    ("pmsuspended", 7, GuestState::Pmsuspended),
];

fn uuid(i: usize) -> String {
    format!("44444444-0000-4000-8000-{i:012}")
}

/// One simulated host: a node file with one guest `vm-STATE` per libvirt state, and the
/// libvirt actor of an agent on it (state directory, boot id file).
struct Host {
    _tmp: tempfile::TempDir,
    actor: Actor,
    _updates: mpsc::Receiver<Update>,
    state_dir: std::path::PathBuf,
    boot_id_file: std::path::PathBuf,
}

impl Host {
    fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let doms: Vec<String> = STATES
            .iter()
            .enumerate()
            .map(|(i, (name, runstate, _))| {
                test_domain(
                    &format!("vm-{name}"),
                    &uuid(i),
                    &format!("/srv/shared/vm-{name}.img"),
                    &format!("52:54:00:00:0c:{i:02x}"),
                    *runstate,
                )
            })
            .collect();
        let node = tmp.path().join("node.xml");
        std::fs::write(&node, test_node(&doms)).unwrap();
        let boot_id_file = tmp.path().join("boot_id");
        std::fs::write(&boot_id_file, "boot-1\n").unwrap();
        let state_dir = tmp.path().join("state");
        let cfg = ActorConfig {
            host_id: "host-s".into(),
            uri: format!("test://{}", node.display()),
            boot_id_file: boot_id_file.clone(),
            autostart_dir: tmp.path().join("autostart"),
            qemu_conf: tmp.path().join("qemu.conf"),
            libvirt_guests_conf: vec![],
            resync_interval: Duration::from_secs(600),
            autostart_poll: Duration::from_millis(200),
            state_dir: state_dir.clone(),
        };
        let (actor, updates) = lifeboat_agent::libvirt::spawn(cfg, Arc::new(Shared::default())).unwrap();
        Host { _tmp: tmp, actor, _updates: updates, state_dir, boot_id_file }
    }

    async fn run(&self, kind: Kind) -> CommandResult {
        self.actor.command(Command { id: "c1".into(), kind: Some(kind), epoch: 0 }).await
    }

    async fn stop(&self, i: usize) -> CommandResult {
        self.run(Kind::StopGuest(StopGuest { uuid: uuid(i), reason: "test".into() })).await
    }

    async fn cleanup(&self, i: usize, destroy_running: bool) -> CommandResult {
        let name = format!("vm-{}", STATES[i].0);
        self.run(Kind::CleanupGuest(CleanupGuest { uuid: uuid(i), name, destroy_running })).await
    }

    async fn grant(&self, leases: &[(usize, u64)], issued: i64, merge: bool) -> CommandResult {
        let leases = leases
            .iter()
            .map(|(i, g)| Lease {
                uuid: uuid(*i),
                name: STATES.get(*i).map_or(format!("vm-new{i}"), |s| format!("vm-{}", s.0)),
                generation: *g,
            })
            .collect();
        let now = lifeboat_common::now_unix_ms();
        self.run(Kind::GrantLeases(GrantLeases {
            leases,
            expires_unix_ms: now + 60_000,
            merge,
            issued_unix_ms: issued,
        }))
        .await
    }
}

fn state_of(r: &CommandResult) -> GuestState {
    GuestState::try_from(r.guest.as_ref().expect("the guest after the command").state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_destroys_every_state_that_holds_the_disks_and_confirms_shut_off() {
    let h = Host::new();
    for (i, (name, _, reported)) in STATES.iter().enumerate() {
        let r = h.stop(i).await;
        assert!(r.ok, "{name}: {}", r.error);
        if *reported == GuestState::Shutoff {
            assert_eq!(r.outcome, "already", "{name}");
        } else {
            assert_eq!(r.outcome, "done", "{name} holds its disks and must be destroyed");
        }
        assert_eq!(state_of(&r), GuestState::Shutoff, "{name}");
        println!("stop {name}: {} -> {:?}", r.outcome, state_of(&r));
        // Check-then-act: a second stop finds it off.
        let again = h.stop(i).await;
        assert_eq!((again.ok, again.outcome.as_str()), (true, "already"), "{name}");
    }
    // A guest that is not there is stopped already.
    let r = h.run(Kind::StopGuest(StopGuest { uuid: uuid(99), reason: "test".into() })).await;
    assert_eq!((r.ok, r.outcome.as_str()), (true, "already"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_refuses_every_state_but_shut_off_unless_told_to_destroy() {
    let h = Host::new();
    for (i, (name, _, reported)) in STATES.iter().enumerate() {
        if *reported == GuestState::Shutoff {
            continue;
        }
        let r = h.cleanup(i, false).await;
        assert!(!r.ok, "{name} was removed while it may hold its disks");
        let shown = reported.as_str_name().trim_start_matches("GUEST_STATE_");
        assert!(r.error.contains(shown) && r.error.contains("--destroy-running"), "{name}: {}", r.error);
        println!("cleanup {name}: refused: {}", r.error);
        // Refusals change nothing: it is still there, in the same state.
        let still = h.stop(i).await;
        assert_eq!(still.outcome, "done", "{name} was changed by the refused cleanup");
    }
    // A fresh host: --destroy-running destroys, confirms shut off, then undefines.
    let h = Host::new();
    for (i, (name, _, _)) in STATES.iter().enumerate() {
        let r = h.cleanup(i, true).await;
        assert!(r.ok && r.outcome == "done", "{name}: {}", r.error);
        let again = h.cleanup(i, true).await;
        assert_eq!((again.ok, again.outcome.as_str()), (true, "already"), "{name} is gone");
    }
    // A shut-off guest is removed without --destroy-running (the test driver rejects
    // KEEP_NVRAM: the fallback without any NVRAM flag is what runs here).
    let h = Host::new();
    let off = STATES.iter().position(|s| s.2 == GuestState::Shutoff).unwrap();
    let r = h.cleanup(off, false).await;
    assert!(r.ok && r.outcome == "done", "{}", r.error);
    // The name must match the UUID's guest.
    let r =
        h.run(Kind::CleanupGuest(CleanupGuest { uuid: uuid(1), name: "vm-other".into(), destroy_running: true })).await;
    assert!(!r.ok && r.error.contains("not 'vm-other'"), "{}", r.error);
}

fn definition(i: usize) -> String {
    test_domain(&format!("vm-new{i}"), &uuid(i), "/srv/shared/new.img", "52:54:00:00:0d:01", 5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_only_move_forward_on_the_agent() {
    let h = Host::new();
    // Leases: generation 5 for guest 20 (not defined here), then a grant with 4.
    let r = h.grant(&[(20, 5), (1, 1)], 10, false).await;
    assert!(r.ok && r.stale_generation.is_empty(), "{}", r.error);
    let r = h.grant(&[(20, 4), (1, 2)], 20, false).await;
    assert!(r.ok, "{}", r.error);
    assert_eq!(r.stale_generation, vec![uuid(20)], "the lower generation is refused and reported");
    let kept = lifeboat_agent::lease::read_file(&h.state_dir, &uuid(20)).unwrap().unwrap();
    assert_eq!(kept.generation, 5);
    assert_eq!(
        lifeboat_agent::lease::read_file(&h.state_dir, &uuid(1)).unwrap().unwrap().generation,
        2,
        "the rest applies"
    );
    // Define below the lease file's generation: refused, naming both.
    let def = |i: usize, g: u64| {
        Kind::DefineGuest(DefineGuest { definition_xml: definition(i), owner_host: "host-s".into(), generation: g })
    };
    let r = h.run(def(20, 3)).await;
    assert!(!r.ok && r.error.contains("generation 3") && r.error.contains("generation 5"), "{}", r.error);
    let r = h.run(def(20, 5)).await;
    assert!(r.ok && r.outcome == "done", "{}", r.error);
    // Below an existing definition's generation (no lease file for guest 21): refused.
    let r = h.run(def(21, 7)).await;
    assert!(r.ok, "{}", r.error);
    let r = h.run(def(21, 6)).await;
    assert!(!r.ok && r.error.contains("generation 6") && r.error.contains("generation 7"), "{}", r.error);
    let r = h.run(def(21, 7)).await;
    assert_eq!((r.ok, r.outcome.as_str()), (true, "already"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_written_for_the_current_boot_durably_with_the_enrolled_marker() {
    let h = Host::new();
    assert!(!lifeboat_agent::lease::enrolled(&h.state_dir).unwrap());
    let r = h.grant(&[(1, 1)], 10, false).await;
    assert!(r.ok, "{}", r.error);
    assert!(lifeboat_agent::lease::enrolled(&h.state_dir).unwrap());
    assert_eq!(lifeboat_agent::lease::read_file(&h.state_dir, &uuid(1)).unwrap().unwrap().boot_id, "boot-1");
    // The guard, as libvirt's hook runs it, for a start of that guest.
    let xml = test_domain("vm-running", &uuid(1), "/srv/shared/vm-running.img", "52:54:00:00:0c:01", 5);
    let check = |boot_file: &Path| {
        let env = lifeboat_agent::lease::GuardEnv {
            state_dir: &h.state_dir,
            host: "host-s",
            boot_id_file: boot_file,
            now_ms: lifeboat_common::now_unix_ms(),
        };
        let args: Vec<String> = ["vm-running", "prepare", "begin", "-"].iter().map(|s| s.to_string()).collect();
        lifeboat_agent::lease::guard(&args, &xml, &env)
    };
    assert_eq!(check(&h.boot_id_file), lifeboat_agent::lease::Verdict::Allow);
    // A reboot: the lease is void until granted again.
    std::fs::write(&h.boot_id_file, "boot-2\n").unwrap();
    assert!(
        matches!(check(&h.boot_id_file), lifeboat_agent::lease::Verdict::Refuse(m) if m.contains("granted before this host last booted"))
    );
    let r = h.grant(&[(1, 1)], 20, false).await;
    assert!(r.ok, "{}", r.error);
    assert_eq!(lifeboat_agent::lease::read_file(&h.state_dir, &uuid(1)).unwrap().unwrap().boot_id, "boot-2");
    assert_eq!(check(&h.boot_id_file), lifeboat_agent::lease::Verdict::Allow);
    // No boot id: revocations still apply, the command fails and says why.
    std::fs::remove_file(&h.boot_id_file).unwrap();
    let r = h.grant(&[], 30, false).await;
    assert!(!r.ok && r.error.contains("boot id"), "{}", r.error);
    assert_eq!(
        lifeboat_agent::lease::read_file(&h.state_dir, &uuid(1)).unwrap().unwrap().expires_unix_ms,
        0,
        "revoked"
    );
}

// ------------------------------------------------------------------------------------
// Reconnect: a controller that ends every established session (as it does when another
// session takes over the host's identity) is dialled again at once, not after a growing
// backoff.

type OutStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

/// Welcomes every session, then ends it 100 ms later with an error status.
struct Superseding {
    starts: Arc<Mutex<Vec<Instant>>>,
}

#[tonic::async_trait]
impl AgentSession for Superseding {
    type SessionStream = OutStream;

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<OutStream>, Status> {
        self.starts.lock().unwrap().push(Instant::now());
        let mut inbound = req.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let welcome = ControllerMessage {
                msg: Some(controller_message::Msg::Welcome(Welcome { heartbeat_interval_ms: 1000, epoch: 0 })),
            };
            let _ = tx.send(Ok(welcome)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Err(Status::aborted("superseded: another session of host-s took over"))).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_established_session_that_ends_is_dialled_again_at_once() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let svc = Superseding { starts: starts.clone() };
    let tls = pki.controller().load().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls.server_config())
            .unwrap()
            .add_service(AgentSessionServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let a =
        Agent::start(&agent_config("host-s", "test:///default", &format!("https://{addr}"), &pki.agent("host-s"), ""));
    let deadline = Instant::now() + Duration::from_secs(8);
    while starts.lock().unwrap().len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = starts.lock().unwrap().clone();
    a.stop().await;
    server.abort();
    assert!(s.len() >= 6, "only {} sessions in 8 s: the agent backs off after established sessions", s.len());
    let gaps: Vec<u128> = s.windows(2).map(|w| w[1].duration_since(w[0]).as_millis()).collect();
    println!("sessions every {gaps:?} ms (each ends 100 ms after Welcome)");
    // 100 ms of session + at most 500 ms of backoff + the handshake.
    assert!(gaps.iter().take(5).all(|g| *g < 1000), "{gaps:?}");
}
