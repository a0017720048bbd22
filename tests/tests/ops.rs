//! Operations: backup of a busy controller restored into a fresh one, and
//! the agent's systemd notifications (READY, WATCHDOG).

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, wait_for};
use lifeboat_proto::v1::{GetJobRequest, ListAuditRequest, ListGuestsRequest, ListHostsRequest, ListJobsRequest};

fn fixture(name: &str) -> String {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    format!("test://{}", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_busy_controller_restores_into_a_fresh_one() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let db = tmp.path().join("c.db");
    let c = Controller::start_with(&pki, &db, 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000").await;
    let a = Agent::start(&agent_config("host-a", &fixture("host-a.xml"), &c.url(), &pki.agent("host-a"), ""));
    let b = Agent::start(&agent_config("host-b", &fixture("host-b.xml"), &c.url(), &pki.agent("host-b"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    wait_for(Duration::from_secs(10), "inventory", || {
        let mut op = op.clone();
        async move { (op.list_guests(ListGuestsRequest::default()).await.ok()?.into_inner().guests.len() == 5).then_some(()) }
    })
    .await;
    // Something audited to find again after the restore.
    op.set_host_status(lifeboat_proto::v1::SetHostStatusRequest {
        host: "host-b".into(),
        status: "NOT_ACCEPTING".into(),
        reason: "backup test".into(),
        attest_powered_off: false,
    })
    .await
    .unwrap();
    // Backup while host-b's agent heartbeats every 200 ms and leases are renewed.
    let out = tmp.path().join("backup.db");
    for i in 0..5 {
        let f = tmp.path().join(format!("b{i}.db"));
        let s = lifeboat_controller::backup::backup(&db, &f, false).unwrap();
        assert_eq!(s.counts.iter().find(|c| c.0 == "hosts").map(|c| c.1), Some(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = lifeboat_controller::backup::backup(&db, &out, false).unwrap();
    println!("backup while busy: {summary}");
    a.stop().await;
    b.stop().await;
    c.stop().await;
    // Restore into a fresh database and start a fresh controller on it.
    let db2 = tmp.path().join("fresh.db");
    lifeboat_controller::backup::restore(&out, &db2).unwrap();
    let c2 = Controller::start(&pki, &db2, 0, 1000, 3000).await;
    let mut v = c2.admin(&pki.client("vic", Role::Viewer)).await;
    let hosts = v.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    assert_eq!(hosts.len(), 2);
    assert!(hosts.iter().any(|h| h.status == "NOT_ACCEPTING"));
    assert_eq!(v.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests.len(), 5);
    let audit = v.list_audit(ListAuditRequest::default()).await.unwrap().into_inner().entries;
    assert!(audit.iter().any(|e| e.action == "host.status" && e.detail.contains("backup test")), "{audit:?}");
    let jobs = v.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    for j in jobs {
        let _ = v.get_job(GetJobRequest { id: j.id }).await.unwrap();
    }
    c2.stop().await;
}

#[test]
fn the_agent_tells_systemd_it_is_ready_and_feeds_the_watchdog() {
    let bin = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lifeboat-agent");
    if !bin.exists() {
        eprintln!("SKIPPED: {} not built (scripts/test.sh builds it first)", bin.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cfg = tmp.path().join("agent.toml");
    // No controller listens there: readiness does not wait for it.
    std::fs::write(&cfg, agent_config("host-n", &fixture("host-b.xml"), "https://127.0.0.1:9", &pki.agent("host-n"), "")).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: `exec` keeps the shell's.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"", bin.to_str().unwrap(), cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !(got.iter().any(|m: &String| m.contains("READY=1")) && got.iter().any(|m| m.contains("WATCHDOG=1"))) {
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => {
                let _ = child.kill();
                panic!("no READY/WATCHDOG from the agent ({e}); got {got:?}");
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
