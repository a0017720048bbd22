//! SIGTERM to the real `lifeboat-controller` with agents connected: every
//! agent session ends with a status saying the controller is shutting down,
//! the process exits 0 within the bound, and what it knew last (hosts'
//! last-seen times) is in the database afterwards.

use std::time::{Duration, Instant};

use lifeboat_common::pki;
use lifeboat_e2e::{Agent, ControllerProcess, Pki, agent_config, test_node, wait_for};
use lifeboat_proto::v1::agent_message::Msg;
use lifeboat_proto::v1::agent_session_client::AgentSessionClient;
use lifeboat_proto::v1::{AgentMessage, Heartbeat, Hello, ListHostsRequest};
use tonic::transport::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_agent_sessions_flushes_and_exits_within_the_bound() {
    lifeboat_common::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join("a.xml"), test_node(&[])).unwrap();
    let db = dir.join("c.db");
    let mut c = ControllerProcess::start(&pki, &db, 200, 3000).await;
    let a = Agent::start(&agent_config(
        "host-a",
        &format!("test://{}", dir.join("a.xml").display()),
        &c.url(),
        &pki.agent("host-a"),
        "",
    ));
    // A second agent driven by hand, to see how its session ends.
    let m = pki.agent("host-b").load().unwrap();
    let ch = Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(m.client_config(pki::CONTROLLER_NAME))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(8);
    tx.send(AgentMessage {
        msg: Some(Msg::Hello(Hello {
            host_id: "host-b".into(),
            agent_version: "test".into(),
            boot_id: "boot-b".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = AgentSessionClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    inbound.message().await.expect("welcome").expect("welcome");
    let beat = tokio::spawn(async move {
        for seq in 0.. {
            if tx
                .send(AgentMessage { msg: Some(Msg::Heartbeat(Heartbeat { seq, ..Default::default() })) })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let op_tls = pki.client("olga", lifeboat_common::identity::Role::Viewer);
    let om = op_tls.load().unwrap();
    let och = Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(om.client_config(pki::CONTROLLER_NAME))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let op = lifeboat_proto::v1::admin_client::AdminClient::new(och);
    wait_for(Duration::from_secs(10), "both hosts REACHABLE", || {
        let mut op = op.clone();
        async move {
            let h = op.list_hosts(ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            (h.len() == 2 && h.iter().all(|h| h.liveness == "REACHABLE")).then_some(())
        }
    })
    .await;
    // Heartbeats go on for a while; only the flush at shutdown writes them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_term = lifeboat_common::now_unix_ms();
    let t = Instant::now();
    c.terminate();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("host-b's session did not end within 10 s of SIGTERM");
    let session_end = t.elapsed().as_secs_f64();
    let status = ended.expect("the session ended without a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down") && status.message().contains("dial again"), "{status:?}");
    let code = wait_for(Duration::from_secs(10), "the controller to exit", || {
        let r = c.child.try_wait().ok().flatten();
        async move { r }
    })
    .await
    .0;
    let exit_s = t.elapsed().as_secs_f64();
    let log = c.log_text();
    assert_eq!(code.code(), Some(0), "exit status {code:?}\n{log}");
    assert!(exit_s < 10.0, "exited {exit_s:.2} s after SIGTERM");
    assert!(log.contains("database flushed; stopped"), "{log}");
    beat.abort();
    a.stop().await;
    let store = lifeboat_controller::store::Store::open(&db).unwrap();
    let hosts = store.hosts().unwrap();
    assert_eq!(hosts.len(), 2);
    for h in &hosts {
        assert!(
            h.last_seen_ms >= before_term - 1000,
            "{}: last seen {} ms before SIGTERM in the database: not flushed",
            h.info.host_id,
            before_term - h.last_seen_ms
        );
    }
    println!(
        "SIGTERM: host-b's session ended after {session_end:.2} s ({}), controller exited 0 after {exit_s:.2} s",
        status.message()
    );
}

#[test]
fn the_units_give_the_shutdown_bound_before_sigkill() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("packaging/systemd");
    let stop_s = |unit: &str| -> u64 {
        let text = std::fs::read_to_string(root.join(unit)).unwrap();
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .unwrap_or_else(|| panic!("{unit}: no TimeoutStopSec"));
        v.trim().parse().unwrap_or_else(|e| panic!("{unit}: TimeoutStopSec={v}: {e}"))
    };
    // The bound, one second for the flush and the runtime's end, and a margin.
    let need = lifeboat_controller::SHUTDOWN_BOUND.as_secs() + 2;
    let c = stop_s("lifeboat-controller.service");
    assert!(c > need && c <= need + 10, "controller TimeoutStopSec={c}, shutdown needs up to {need} s");
    assert!(stop_s("lifeboat-agent.service") >= 5);
}
