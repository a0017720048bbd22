//! A hostile agent (issue 14): a raw gRPC client holding a valid agent
//! certificate for its own host sends every bad input the independent
//! tester found, and more, to a real controller (mutual TLS) while two
//! honest agents on libvirt's test driver keep heartbeating. The controller
//! stays up, the honest hosts stay REACHABLE, nothing of the bad input is
//! stored, the client is told what was refused, and a restart on the same
//! database loads cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, wait_for};
use lifeboat_proto::v1::{
    AgentMessage, CommandResult, ControllerMessage, Guest, GuestChanged, GuestRemoved, Heartbeat, Hello, HostInfo,
    Inventory, ListAlarmsRequest, ListGuestsRequest, ListHostsRequest, agent_message::Msg,
    agent_session_client::AgentSessionClient, controller_message,
};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    format!("test://{}", p.display())
}

/// A raw session for `host` with its own certificate: what it sends, and
/// what the controller answers.
struct RawSession {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<ControllerMessage>,
}

async fn channel(c: &Controller, pki: &Pki, host: &str) -> Channel {
    lifeboat_common::tls::install_crypto_provider();
    let m = pki.agent(host).load().unwrap();
    Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(m.client_config("lifeboat-controller"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

impl RawSession {
    async fn open(c: &Controller, pki: &Pki, host: &str) -> Self {
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(Msg::Hello(Hello { host_id: host.into(), agent_version: "0.1.0".into(), boot_id: "b1".into() })))
            .await
            .unwrap();
        let mut client = AgentSessionClient::new(channel(c, pki, host).await).max_encoding_message_size(64 << 20);
        let mut rx = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        match rx.message().await.unwrap().and_then(|m| m.msg) {
            Some(controller_message::Msg::Welcome(_)) => {}
            other => panic!("no Welcome: {other:?}"),
        }
        RawSession { tx, rx }
    }

    async fn send(&self, m: Msg) {
        self.tx.send(msg(m)).await.unwrap();
    }

    /// The next `Refused` (heartbeat acks skipped), within 20 s.
    async fn refused(&mut self) -> (String, String) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.rx.message()).await.expect("a Refused within 20 s");
            match m {
                Ok(Some(ControllerMessage { msg: Some(controller_message::Msg::Refused(r)) })) => {
                    return (r.what, r.reason);
                }
                Ok(Some(_)) => {}
                other => panic!("the session ended without a Refused: {other:?}"),
            }
        }
    }
}

fn msg(m: Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

fn uuid(i: usize) -> String {
    format!("eeeeeeee-0000-4000-8000-{i:012x}")
}

fn guest(i: usize, name: &str) -> Guest {
    Guest { uuid: uuid(i), name: name.into(), state: 6, memory_kib: 1024, vcpus: 1, ..Default::default() }
}

fn changed(g: Guest) -> Msg {
    Msg::GuestChanged(GuestChanged { guest: Some(g) })
}

/// Heartbeats of an honest raw session every 100 ms: the longest round trip
/// seen (µs), until `stop`.
fn heartbeats(mut s: RawSession, stop: Arc<AtomicBool>, worst_us: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let t = Instant::now();
            s.send(Msg::Heartbeat(Heartbeat { seq: n, sent_unix_ms: 0, memory_free_kib: 0 })).await;
            loop {
                match tokio::time::timeout(Duration::from_secs(30), s.rx.message()).await {
                    Ok(Ok(Some(ControllerMessage { msg: Some(controller_message::Msg::HeartbeatAck(a)) })))
                        if a.seq == n =>
                    {
                        break;
                    }
                    Ok(Ok(Some(_))) => continue,
                    other => panic!("honest heartbeat session ended: {other:?}"),
                }
            }
            worst_us.fetch_max(u64::try_from(t.elapsed().as_micros()).unwrap(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_refused_whole_and_honest_hosts_stay_reachable() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let db = tmp.path().join("c.db");
    let c = Controller::start(&pki, &db, 0, 500, 3000).await;
    let a = Agent::start(&agent_config("host-a", &fixture("host-a.xml"), &c.url(), &pki.agent("host-a"), ""));
    let b = Agent::start(&agent_config("host-b", &fixture("host-b.xml"), &c.url(), &pki.agent("host-b"), ""));
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let adm2 = adm.clone();
    wait_for(Duration::from_secs(15), "5 honest guests", || {
        let mut adm = adm2.clone();
        async move {
            (adm.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests.len() == 5).then_some(())
        }
    })
    .await;

    // Watch the honest hosts' liveness and a third honest session's heartbeat round trips throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let unreachable_seen = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (mut adm, stop, seen) = (adm.clone(), stop.clone(), unreachable_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for h in adm.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts {
                    let id = h.info.as_ref().map(|i| i.host_id.clone()).unwrap_or_default();
                    if (id == "host-a" || id == "host-b") && h.liveness != "REACHABLE" {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let worst_us = Arc::new(AtomicU64::new(0));
    let honest = heartbeats(RawSession::open(&c, &pki, "host-h").await, stop.clone(), worst_us.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calm_us = worst_us.swap(0, Ordering::Relaxed);

    let mut evil = RawSession::open(&c, &pki, "host-evil").await;
    // One honest inventory first: what a refused one must leave in place.
    evil.send(Msg::Inventory(Inventory {
        host: Some(HostInfo { host_id: "host-evil".into(), hostname: "evil.example".into(), ..Default::default() }),
        guests: vec![guest(0, "evil-ok")],
        more: false,
    }))
    .await;
    let t0 = Instant::now();
    let bomb = {
        let mut g = guest(1, "bomb");
        g.definition_xml = " ".repeat(4 << 20);
        lifeboat_proto::pack_definition(&mut g);
        g.definition_deflate
    };
    let bombs: Vec<Guest> =
        (1..=64).map(|i| Guest { definition_deflate: bomb.clone(), ..guest(i, &format!("bomb{i}")) }).collect();
    let cases: Vec<(Msg, &str)> = vec![
        (changed(Guest { memory_kib: u64::MAX, state: 2, ..guest(2, "huge") }), "GuestChanged guest.memory_kib"),
        (changed(guest(3, &"n".repeat(100_000))), "GuestChanged guest.name"),
        (changed(guest(4, "evil\u{1b}[2J\u{1b}]0;pwned\u{7}")), "GuestChanged guest.name"),
        (changed(guest(5, "nul\0name")), "GuestChanged guest.name"),
        (changed(Guest { uuid: "../../x".into(), ..guest(6, "path") }), "GuestChanged guest.uuid"),
        (changed(Guest { uuid: uuid(7).to_uppercase(), ..guest(7, "upper") }), "GuestChanged guest.uuid"),
        (Msg::Host(HostInfo { hostname: "h\u{1b}[31mred".into(), ..Default::default() }), "HostInfo hostname"),
        (Msg::Host(HostInfo { libvirt_version: "v\r\n1".into(), ..Default::default() }), "HostInfo libvirt_version"),
        (
            Msg::Inventory(Inventory { host: None, guests: vec![guest(8, "d1"), guest(8, "d2")], more: false }),
            "Inventory guests[1].uuid",
        ),
        (
            Msg::Inventory(Inventory { host: None, guests: bombs, more: false }),
            "Inventory guests[0].definition_deflate",
        ),
        (
            Msg::CommandResult(CommandResult { id: "../../x".into(), ok: true, ..Default::default() }),
            "CommandResult id",
        ),
        (Msg::Hello(Hello { host_id: "host-evil".into(), ..Default::default() }), "Hello hello"),
    ];
    // Removing another host's guest (honest host-a's vm-a1) changes nothing:
    // the registry removes only from the sender, and an unknown removal is
    // dropped quietly (an honest agent sends one after a lost change).
    evil.send(Msg::GuestRemoved(GuestRemoved {
        uuid: "11111111-0000-4000-8000-00000000a001".into(),
        name: "vm-a1".into(),
    }))
    .await;
    let n_cases = cases.len();
    for (m, want) in cases {
        evil.send(m).await;
        let (what, reason) = evil.refused().await;
        assert_eq!(what, want, "{reason}");
        assert!(!reason.is_empty());
    }
    let single_s = t0.elapsed().as_secs_f64();
    // 1,000,000 guests in pages of 40,000: refused at 100,000, every later page
    // discarded, the last one included.
    let t1 = Instant::now();
    for p in 0..25 {
        let guests: Vec<Guest> =
            (0..40_000).map(|i| guest(1_000 + p * 40_000 + i, &format!("m{}", p * 40_000 + i))).collect();
        evil.send(Msg::Inventory(Inventory { host: None, guests, more: p < 24 })).await;
    }
    let (what, _) = evil.refused().await;
    assert_eq!(what, "Inventory guests");
    // The session still works: a heartbeat after the discarded pages is answered.
    evil.send(Msg::Heartbeat(Heartbeat { seq: 7, ..Default::default() })).await;
    let acked = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(controller_message::Msg::HeartbeatAck(a)) = evil.rx.message().await.unwrap().and_then(|m| m.msg)
                && a.seq == 7
            {
                break;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "the hostile session's heartbeat after the big inventory was not answered");
    let million_s = t1.elapsed().as_secs_f64();
    // An oversize message (5 MiB) ends that stream; nothing of it is stored.
    let t2 = Instant::now();
    let mut big = RawSession::open(&c, &pki, "host-evil").await;
    big.send(changed(Guest { definition_xml: "x".repeat(5 << 20), ..guest(9, "oversize") })).await;
    let (what, reason) = big.refused().await;
    assert_eq!(what, "message size", "{reason}");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match big.rx.message().await {
                Ok(Some(_)) => continue,
                other => break other.err(),
            }
        }
    })
    .await
    .expect("the oversize message ends the stream");
    let oversize_s = t2.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    let beats = honest.await.unwrap();
    watcher.await.unwrap();
    let worst = worst_us.load(Ordering::Relaxed);
    println!(
        "hostile agent: {n_cases} bad messages in {single_s:.2} s, 1,000,000-guest inventory refused in {million_s:.2} s, \
         oversize in {oversize_s:.2} s ({ended:?}); honest heartbeat round trip: worst {:.1} ms under attack ({beats} beats), \
         {:.1} ms before",
        worst as f64 / 1000.0,
        calm_us as f64 / 1000.0
    );
    assert_eq!(unreachable_seen.load(Ordering::Relaxed), 0, "an honest host went UNREACHABLE during the attack");
    assert!(worst < 2_000_000, "an honest heartbeat took {worst} µs");

    // Nothing of the bad input is stored.
    let evil_guests: Vec<String> = adm
        .list_guests(ListGuestsRequest { host: "host-evil".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests
        .into_iter()
        .map(|g| g.guest.unwrap().name)
        .collect();
    assert_eq!(evil_guests, ["evil-ok"]);
    let hosts = adm.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    let evil_host =
        hosts.iter().find(|h| h.info.as_ref().unwrap().host_id == "host-evil").unwrap().info.clone().unwrap();
    assert_eq!(evil_host.hostname, "evil.example");
    assert!(evil_host.libvirt_version.is_empty());
    let all = adm.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests;
    assert_eq!(all.len(), 6, "5 honest guests and evil-ok");
    let alarms = adm.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    let refused: Vec<_> = alarms.iter().filter(|a| a.kind == "agent-input-refused").collect();
    assert_eq!(refused.len(), 1, "one alarm, refreshed: {refused:?}");
    assert_eq!(refused[0].host, "host-evil");
    let metrics = lifeboat_controller::metrics::render(
        &lifeboat_controller::registry::Registry::load(
            lifeboat_controller::store::sqlite::SqliteRepos::start_in_memory().unwrap(),
            lifeboat_controller::domain::host::Timing::default(),
        )
        .unwrap(),
    );
    assert!(metrics.contains("lifeboat_agent_messages_refused_total{kind=\"GuestChanged\"} 6"), "{metrics}");

    // A restart on the same database loads cleanly, nothing quarantined.
    drop((evil, big));
    a.stop().await;
    b.stop().await;
    c.stop().await;
    let c = Controller::start(&pki, &db, 0, 500, 3000).await;
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    assert_eq!(adm.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests.len(), 6);
    let alarms = adm.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    assert!(!alarms.iter().any(|a| a.kind == "row-quarantined"), "{alarms:?}");
    c.stop().await;
    let store = lifeboat_controller::store::Store::open(&db).unwrap();
    assert!(store.quarantined().unwrap().is_empty());
}

/// The largest inventory the intake accepts (64 MiB of definitions: 256 of
/// 256 KiB each, in 32 pages): stored, while an honest session's heartbeats
/// go on. (The per-minute budget that refuses a flood of them is unit-tested
/// in `intake`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_legal_inventory_does_not_stall_other_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 500, 3000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let worst_us = Arc::new(AtomicU64::new(0));
    let honest = heartbeats(RawSession::open(&c, &pki, "host-h").await, stop.clone(), worst_us.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calm_us = worst_us.swap(0, Ordering::Relaxed);
    let big = RawSession::open(&c, &pki, "host-big").await;
    let limit = usize::try_from(lifeboat_controller::intake::MAX_DEFINITION_BYTES).unwrap();
    let pages = |round: usize| -> Vec<Inventory> {
        (0..32)
            .map(|p| Inventory {
                host: None,
                guests: (0..8)
                    .map(|i| {
                        let n = p * 8 + i;
                        let mut g = guest(round * 1000 + n, &format!("big{n}"));
                        let mut xml = format!("<domain><name>big{n}</name><description>");
                        // Random hex, so it compresses like real text does not: about 2:1.
                        let mut k = n as u64 + 1;
                        let mut bytes = Vec::with_capacity(limit);
                        while bytes.len() < limit - 40 - xml.len() {
                            k ^= k << 13;
                            k ^= k >> 7;
                            k ^= k << 17;
                            bytes.push(b"0123456789abcdef"[(k & 15) as usize]);
                        }
                        xml.push_str(std::str::from_utf8(&bytes).unwrap());
                        xml.truncate(limit - 32);
                        xml.push_str("</description></domain>");
                        g.definition_xml = xml;
                        lifeboat_proto::pack_definition(&mut g);
                        g
                    })
                    .collect(),
                more: p < 31,
            })
            .collect()
    };
    let first = pages(0);
    let t = Instant::now();
    for p in first {
        big.send(Msg::Inventory(p)).await;
    }
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let adm2 = adm.clone();
    wait_for(Duration::from_secs(120), "256 big guests stored", || {
        let mut adm = adm2.clone();
        async move {
            let n = adm
                .list_guests(ListGuestsRequest { host: "host-big".into(), ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .guests
                .len();
            (n == 256).then_some(())
        }
    })
    .await;
    let stored_s = t.elapsed().as_secs_f64();
    let max_legal_us = worst_us.swap(0, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    honest.await.unwrap();
    let names: Vec<String> = adm
        .list_guests(ListGuestsRequest { host: "host-big".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests
        .into_iter()
        .map(|g| g.guest.unwrap().uuid)
        .collect();
    assert_eq!(names.len(), 256);
    println!(
        "largest legal inventory (256 x 256 KiB) stored in {stored_s:.2} s; honest heartbeat round trip worst {:.1} ms \
         meanwhile, {:.1} ms before",
        max_legal_us as f64 / 1000.0,
        calm_us as f64 / 1000.0
    );
    assert!(max_legal_us < 2_000_000, "an honest heartbeat took {max_legal_us} µs");
    c.stop().await;
}

/// The next command (heartbeat answers skipped) within `limit`.
async fn next_command(s: &mut RawSession, limit: Duration) -> lifeboat_proto::v1::Command {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.rx.message()).await.expect("a command in time") {
            Ok(Some(ControllerMessage { msg: Some(controller_message::Msg::Command(c)) })) => return c,
            Ok(Some(_)) => {}
            other => panic!("the session ended without a command: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_host_hears_the_welcome_first_and_its_lease_grant_right_after() {
    use lifeboat_proto::v1::command::Kind;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 500, 3000).await;
    // The host reports a guest: it holds it, and is granted its lease.
    let mut s = RawSession::open(&c, &pki, "host-r").await;
    s.send(Msg::Inventory(Inventory { host: None, guests: vec![guest(900, "r0")], more: false })).await;
    let first = next_command(&mut s, Duration::from_secs(10)).await;
    assert!(matches!(first.kind, Some(Kind::GrantLeases(_))), "{first:?}");
    drop(s);
    // Each new session is granted as it opens, from the stored view. The
    // grant is decided on another task while the session opens: it must
    // never reach the agent before the Welcome (`RawSession::open` panics
    // on anything else first), which agents take as a protocol error.
    for round in 0..20 {
        let mut s = RawSession::open(&c, &pki, "host-r").await;
        let t0 = Instant::now();
        let cmd = next_command(&mut s, Duration::from_secs(5)).await;
        match cmd.kind {
            Some(Kind::GrantLeases(g)) => {
                assert_eq!(g.leases.iter().map(|l| l.uuid.clone()).collect::<Vec<_>>(), [uuid(900)], "round {round}");
            }
            other => panic!("round {round}: the first command is not the grant: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "round {round}: granted after {:?}", t0.elapsed());
    }
}
