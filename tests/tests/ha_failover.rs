//! Two real `lifeboat-controller` processes on one real etcd: one leads, the
//! other answers every call `UNAVAILABLE` naming the leader. SIGKILL the
//! leader: the other leads within 5 s and an agent that follows the hint gets
//! a Welcome with a higher epoch. SIGSTOP the leader past its deadline: the
//! standby leads only after the stopped one's local deadline passed, and the
//! stopped one, continued, exits with status 3 without commanding.
//!
//! The agent here is driven by hand (Hello, heartbeats, following the
//! `lifeboat-leader` hint) so that the test sees each Welcome and Command.

use std::time::{Duration, Instant};

use lifeboat_common::etcd_test::Etcd;
use lifeboat_common::identity::Role;
use lifeboat_common::pki;
use lifeboat_e2e::{ControllerProcess, Pki, metric_value, wait_for, workspace_binary};
use lifeboat_proto::v1::agent_message::Msg;
use lifeboat_proto::v1::agent_session_client::AgentSessionClient;
use lifeboat_proto::v1::controller_message::Msg as CMsg;
use lifeboat_proto::v1::{AgentMessage, Heartbeat, Hello, ListHostsRequest};
use tonic::transport::Endpoint;

/// The default: shorter ones lapse under a loaded CI machine (2 cores, debug builds).
const LEADER_TTL_MS: u32 = 3000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap()
}

/// Starts a controller with `[store] backend = "etcd"`; returns at once
/// (a follower answers nothing but refusals, so there is nothing to wait for).
fn start_controller(pki: &Pki, dir: &std::path::Path, etcd: &str, name: &str) -> ControllerProcess {
    let (port, mport) = (free_port(), free_port());
    let db = dir.join(format!("{name}.db"));
    let cfg = dir.join(format!("{name}.toml"));
    let cache = dir.join(format!("{name}-cache"));
    std::fs::create_dir_all(&cache).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\ndatabase = {db:?}\n\
         heartbeat_interval_ms = 200\nunreachable_after_ms = 3000\nlease_ttl_ms = 10000\nforce_grace_ms = 20000\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [store]\nbackend = \"etcd\"\nendpoints = [\"{etcd}\"]\nadvertise_url = \"https://127.0.0.1:{port}\"\n\
         cache_dir = {cache:?}\nleader_ttl_ms = {LEADER_TTL_MS}\n",
        pki.controller().ca,
        pki.controller().cert,
        pki.controller().key
    );
    std::fs::write(&cfg, text).unwrap();
    // A new pool: the first controller's `init` writes the schema key; for
    // the next ones the prefix is no longer empty and init says so.
    let out = std::process::Command::new(workspace_binary("lifeboat-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("init")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() || err.contains("already exist"), "init: {err}");
    let log = dir.join(format!("{name}.log"));
    let child = std::process::Command::new(workspace_binary("lifeboat-controller"))
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    ControllerProcess { child, addr: ([127, 0, 0, 1], port).into(), metrics: ([127, 0, 0, 1], mport).into(), log }
}

async fn leads(c: &ControllerProcess) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(c.metrics)).await
    else {
        return false;
    };
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut out)).await;
    metric_value(&out, "lifeboat_controller_leader") == 1.0
}

async fn admin(pki: &Pki, url: &str) -> lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel> {
    let m = pki.client("olga", Role::Viewer).load().unwrap();
    let ch = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(m.client_config(pki::CONTROLLER_NAME))
        .unwrap()
        .connect_lazy();
    lifeboat_proto::v1::admin_client::AdminClient::new(ch)
}

/// What one hand-driven agent session saw.
#[derive(Debug)]
enum Seen {
    Welcome { url: String, epoch: u64, at: Instant },
    Command { url: String, epoch: u64, at: Instant },
    Ended,
}

/// An agent that tries `urls` in order, follows the `lifeboat-leader` hint,
/// heartbeats every 200 ms, and reports every Welcome, Command and end.
fn hand_agent(
    pki: &Pki,
    urls: Vec<String>,
    seen: tokio::sync::mpsc::UnboundedSender<Seen>,
) -> tokio::task::JoinHandle<()> {
    let m = pki.agent("host-a").load().unwrap();
    tokio::spawn(async move {
        let mut next = 0usize;
        let mut hint: Option<String> = None;
        loop {
            let url = hint.take().unwrap_or_else(|| {
                next = (next + 1) % urls.len();
                urls[next].clone()
            });
            let Ok(ch) = Endpoint::from_shared(url.clone())
                .unwrap()
                .tls_config(m.client_config(pki::CONTROLLER_NAME))
                .unwrap()
                .connect_timeout(Duration::from_millis(300))
                .connect()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(8);
            let hello = Hello { host_id: "host-a".into(), agent_version: "test".into(), boot_id: "boot-a".into() };
            tx.send(AgentMessage { msg: Some(Msg::Hello(hello)) }).await.unwrap();
            let mut inbound =
                match AgentSessionClient::new(ch).session(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        if let Some(l) = s.metadata().get(lifeboat_proto::LEADER_METADATA).and_then(|v| v.to_str().ok())
                            && urls.iter().any(|u| u == l)
                        {
                            hint = Some(l.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
            let beat = tokio::spawn(async move {
                for seq in 0.. {
                    let hb = AgentMessage { msg: Some(Msg::Heartbeat(Heartbeat { seq, ..Default::default() })) };
                    if tx.send(hb).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            while let Ok(Some(msg)) = inbound.message().await {
                match msg.msg {
                    Some(CMsg::Welcome(w)) => {
                        let _ = seen.send(Seen::Welcome { url: url.clone(), epoch: w.epoch, at: Instant::now() });
                    }
                    Some(CMsg::Command(c)) => {
                        let _ = seen.send(Seen::Command { url: url.clone(), epoch: c.epoch, at: Instant::now() });
                    }
                    _ => {}
                }
            }
            beat.abort();
            let _ = seen.send(Seen::Ended);
        }
    })
}

async fn next_welcome(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>, limit: Duration) -> (String, u64, Instant) {
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await.expect("a Welcome in time").expect("agent running") {
            Seen::Welcome { url, epoch, at } => return (url, epoch, at),
            _ => continue,
        }
    }
}

/// Starts two controllers and waits until one leads: (leader, standby).
async fn two_controllers(pki: &Pki, dir: &std::path::Path, etcd: &str) -> (ControllerProcess, ControllerProcess) {
    let c1 = start_controller(pki, dir, etcd, "c1");
    let c2 = start_controller(pki, dir, etcd, "c2");
    let first = wait_for(Duration::from_secs(20), "one controller to lead", || async {
        if leads(&c1).await {
            Some(true)
        } else if leads(&c2).await {
            Some(false)
        } else {
            None
        }
    })
    .await
    .0;
    if first { (c1, c2) } else { (c2, c1) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_the_standby_leads_within_5_s_and_the_agent_follows_with_a_higher_epoch() {
    lifeboat_common::tls::install_crypto_provider();
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let (mut leader, standby) = two_controllers(&pki, dir, &etcd.url()).await;
    // The follower refuses and names the leader; the leader answers.
    // ("no leader is elected" also contains "leader is": wait for the name.)
    let (e, _) = wait_for(Duration::from_secs(10), "the standby to name the leader", || async {
        let e = admin(&pki, &standby.url()).await.list_hosts(ListHostsRequest::default()).await.unwrap_err();
        e.message().starts_with("not the leader; leader is ").then_some(e)
    })
    .await;
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(
        e.message(),
        format!("not the leader; leader is {}", leader.url()),
        "leader log:\n{}\nstandby log:\n{}",
        leader.log_text(),
        standby.log_text()
    );
    assert_eq!(e.metadata().get(lifeboat_proto::LEADER_METADATA).unwrap().to_str().unwrap(), leader.url());
    admin(&pki, &leader.url()).await.list_hosts(ListHostsRequest::default()).await.expect("the leader answers");
    // The agent dials the standby first and follows the hint.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = hand_agent(&pki, vec![leader.url(), standby.url()], tx);
    let (url, epoch1, _) = next_welcome(&mut rx, Duration::from_secs(10)).await;
    assert_eq!(url, leader.url());
    assert!(epoch1 > 0, "an etcd leader's epoch is its key's revision");
    // Both serve /metrics: the leader with its epoch, the follower with 0.
    assert_eq!(metric_value(&leader.metrics_text().await, "lifeboat_controller_epoch"), epoch1 as f64);
    let follower = standby.metrics_text().await;
    assert!(follower.contains("lifeboat_controller_leader 0"), "{follower}");
    let standby_url = standby.url();
    let killed = Instant::now();
    leader.child.kill().unwrap();
    let _ = leader.child.wait();
    let (url, epoch2, at) = next_welcome(&mut rx, Duration::from_secs(10)).await;
    let took = at - killed;
    println!("SIGKILL of the leader -> agent welcomed by the new leader: {} ms", took.as_millis());
    assert_eq!(url, standby_url);
    assert!(epoch2 > epoch1, "epochs only move forward: {epoch2} > {epoch1}");
    assert!(took < Duration::from_secs(5), "the standby leads and the agent is back within 5 s ({took:?})");
    let now_leading = standby.metrics_text().await;
    assert_eq!(metric_value(&now_leading, "lifeboat_controller_epoch"), epoch2 as f64);
    assert_eq!(metric_value(&now_leading, "lifeboat_controller_leader_changes_total"), 1.0, "{now_leading}");
    wait_for(Duration::from_secs(5), "the new leader to list the agent's host", || {
        let pki = &pki;
        let url = standby_url.clone();
        async move {
            let r = admin(pki, &url).await.list_hosts(ListHostsRequest::default()).await.ok()?;
            r.into_inner().hosts.iter().any(|h| h.info.as_ref().is_some_and(|i| i.host_id == "host-a")).then_some(())
        }
    })
    .await;
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_lapses_before_the_standby_leads_and_exits_3_without_commanding_once_continued() {
    lifeboat_common::tls::install_crypto_provider();
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let (mut leader, standby) = two_controllers(&pki, dir, &etcd.url()).await;
    // The agent knows only the leader: it stays on it while it is stopped.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = hand_agent(&pki, vec![leader.url()], tx);
    let (_, epoch1, _) = next_welcome(&mut rx, Duration::from_secs(10)).await;
    let pid = leader.child.id().to_string();
    let signal = |s: &str| assert!(std::process::Command::new("kill").args([s, &pid]).status().unwrap().success());
    signal("-STOP");
    let stopped = Instant::now();
    let (_, waited) =
        wait_for(Duration::from_secs(10), "the standby to lead", || async { leads(&standby).await.then_some(()) })
            .await;
    let standby_led = stopped + waited;
    println!("SIGSTOP of the leader -> standby leads after {} ms", waited.as_millis());
    // The stopped leader's last renewal was sent before it stopped: its
    // local deadline (2/3 of leader_ttl) had passed before the standby led.
    assert!(
        standby_led >= stopped + Duration::from_millis(u64::from(LEADER_TTL_MS) * 2 / 3),
        "the standby led {waited:?} after the stop, before the old leader's deadline"
    );
    while rx.try_recv().is_ok() {}
    let continued = Instant::now();
    signal("-CONT");
    let status = wait_for(Duration::from_secs(5), "the old leader to exit", || {
        let s = leader.child.try_wait().unwrap();
        async move { s }
    })
    .await
    .0;
    println!("continued old leader exited after {} ms: {status}", continued.elapsed().as_millis());
    assert_eq!(status.code(), Some(3), "lost leadership exits 3; log:\n{}", leader.log_text());
    assert!(leader.log_text().contains("lost the leadership"), "{}", leader.log_text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(s) = rx.try_recv() {
        if let Seen::Command { url, epoch, at } = s {
            panic!(
                "{url} (epoch {epoch1}) sent a command (epoch {epoch}) {:?} after it was continued",
                at.saturating_duration_since(continued)
            );
        }
    }
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_resigns_the_standby_leads_at_once_and_the_old_leader_exits_0() {
    lifeboat_common::tls::install_crypto_provider();
    let Some(etcd) = Etcd::start_or_skip() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let (mut leader, standby) = two_controllers(&pki, dir, &etcd.url()).await;
    // The standby is up and campaigning.
    wait_for(Duration::from_secs(10), "the standby to name the leader", || async {
        let e = admin(&pki, &standby.url()).await.list_hosts(ListHostsRequest::default()).await.unwrap_err();
        e.message().starts_with("not the leader; leader is ").then_some(())
    })
    .await;
    leader.terminate();
    let (_, took) =
        wait_for(Duration::from_secs(5), "the standby to lead", || async { leads(&standby).await.then_some(()) }).await;
    println!("SIGTERM of the leader -> standby leads after {} ms", took.as_millis());
    assert!(
        took < Duration::from_millis(u64::from(LEADER_TTL_MS)),
        "resigned: the standby does not wait for the lease to expire ({took:?})"
    );
    let status = wait_for(Duration::from_secs(10), "the old leader to exit", || {
        let s = leader.child.try_wait().unwrap();
        async move { s }
    })
    .await
    .0;
    assert_eq!(status.code(), Some(0), "{}", leader.log_text());
}
