//! Operations: backup of a busy controller restored into a fresh one, and
//! the agent's systemd notifications (READY, WATCHDOG).

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_job_end};
use lifeboat_proto::v1::{GetJobRequest, ListAuditRequest, ListGuestsRequest, ListHostsRequest, MigrateRequest};

fn fixture(name: &str) -> String {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    format!("test://{}", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_busy_controller_restores_into_a_fresh_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let db = dir.join("c.db");
    // The disks' directory is shared storage (a marker says so: one filesystem for all agents here).
    std::fs::write(dir.join(".lifeboat-storage-id"), "0f5e0c1a-1111-4222-8333-444455556666\n").unwrap();
    let mut doms = Vec::new();
    for i in 0..4 {
        let disk = dir.join(format!("bk{i}.img"));
        std::fs::write(&disk, b"").unwrap();
        let (name, uuid, mac) =
            (format!("bk-{i}"), format!("66666666-0000-4000-8000-00000000000{i}"), format!("52:54:00:00:06:0{i}"));
        doms.push(domain(&name, &uuid, &disk.display().to_string(), &mac, 1));
    }
    std::fs::write(dir.join("a.xml"), node(&doms)).unwrap();
    std::fs::write(dir.join("b.xml"), node(&[])).unwrap();
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let c = Controller::start_with(&pki, &db, 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000").await;
    let a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), ""));
    let b = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let op = c.admin(&pki.client("olga", Role::Operator)).await;
    lifeboat_e2e::wait_guest_count(&op, 4).await;
    // host-a "fails"; its guests are force-migrated (move records, audit).
    a.stop().await;
    let req = MigrateRequest {
        source: "host-a".into(),
        attest_powered_off: true,
        attest_reason: "backup test".into(),
        yes: true,
        parallel: 1,
        ..Default::default()
    };
    let job = lifeboat_e2e::start_migration_when_accepted(&op, &req).await;
    // Backups while the job runs and host-b's agent heartbeats every 200 ms.
    for i in 0..5 {
        let f = dir.join(format!("b{i}.db"));
        let s = lifeboat_controller::backup::backup(&db, &f, false).unwrap();
        assert_eq!(s.counts.iter().find(|c| c.0 == "hosts").map(|c| c.1), Some(2), "{s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (done, _) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    let out = dir.join("backup.db");
    let summary = lifeboat_controller::backup::backup(&db, &out, false).unwrap();
    println!("backup while busy: {summary}");
    b.stop().await;
    c.stop().await;
    // Restore into a fresh database and start a fresh controller on it.
    let db2 = dir.join("fresh.db");
    lifeboat_controller::backup::restore(&out, &db2).unwrap();
    let c2 = Controller::start(&pki, &db2, 0, 1000, 3000).await;
    let mut v = c2.admin(&pki.client("vic", Role::Viewer)).await;
    let hosts = v.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    assert_eq!(hosts.len(), 2);
    assert!(hosts.iter().any(|h| h.status == "OFFLINE"), "{hosts:?}");
    assert_eq!(
        v.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests.len(),
        8,
        "4 stale on host-a, 4 moved to host-b"
    );
    let restored = v.get_job(GetJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(restored.state, "SUCCEEDED");
    assert_eq!(restored.moves.len(), 4);
    assert!(restored.moves.iter().all(|m| m.state == "RUNNING" && m.target == "host-b"));
    let audit = v.list_audit(ListAuditRequest::default()).await.unwrap().into_inner().entries;
    for a in ["migrate.requested", "power.attested", "guest.defined", "guest.running", "job.succeeded"] {
        assert!(audit.iter().any(|e| e.action == a), "{a} restored");
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
    std::fs::write(
        &cfg,
        agent_config("host-n", &fixture("host-b.xml"), "https://127.0.0.1:9", &pki.agent("host-n"), ""),
    )
    .unwrap();
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
