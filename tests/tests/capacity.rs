//! Placement reservations, in process: real controller (mTLS, SQLite, job
//! engine) and agents on libvirt's test driver. Two hosts fail together
//! and two forced migrations start at the same moment; the one target has
//! room for half their guests. Neither plan may hand out the memory the
//! other took: what does not fit is NOT_MOVED ("no capacity") and alarmed.

use std::collections::BTreeMap;
use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{
    Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_for, wait_job_end,
};
use lifeboat_proto::v1::{GetHostRequest, GuestState, ListGuestsRequest, MigrateRequest};

/// The test driver's node memory (`test_node`), MiB.
const NODE_MIB: u64 = 8192;
/// Every test guest's memory (`test_domain`), MiB.
const GUEST_MIB: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_forced_migrations_never_overcommit_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join(".lifeboat-storage-id"), "6c1d4e0f-2222-4333-8444-555566667777\n").unwrap();
    let disk = |n: &str| {
        let p = shared.join(format!("{n}.img"));
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    };
    let a = node(&[
        domain("a-1", "33333333-0000-4000-8000-0000000000a1", &disk("a-1"), "52:54:00:00:0a:01", 1),
        domain("a-2", "33333333-0000-4000-8000-0000000000a2", &disk("a-2"), "52:54:00:00:0a:02", 1),
    ]);
    let b = node(&[
        domain("b-1", "33333333-0000-4000-8000-0000000000b1", &disk("b-1"), "52:54:00:00:0b:01", 1),
        domain("b-2", "33333333-0000-4000-8000-0000000000b2", &disk("b-2"), "52:54:00:00:0b:02", 1),
    ]);
    for (h, text) in [("host-a", a), ("host-b", b), ("host-c", node(&[]))] {
        std::fs::write(dir.join(format!("{h}.xml")), text).unwrap();
    }
    // host-c (no guests) keeps room for exactly two guests.
    let reserve = NODE_MIB - 2 * GUEST_MIB;
    let extra = format!("force_grace_ms = 1500\nlease_ttl_ms = 1000\nhost_memory_reserve_mib = {reserve}");
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, &extra).await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let agent_a = Agent::start(&agent_config("host-a", &uri("host-a"), &c.url(), &pki.agent("host-a"), ""));
    let agent_b = Agent::start(&agent_config("host-b", &uri("host-b"), &c.url(), &pki.agent("host-b"), ""));
    let agent_c = Agent::start(&agent_config("host-c", &uri("host-c"), &c.url(), &pki.agent("host-c"), ""));
    let op = c.admin(&pki.client("olga", Role::Operator)).await;
    lifeboat_e2e::wait_guest_count(&op, 4).await;
    let total = op.clone().get_host(GetHostRequest { host: "host-c".into() }).await.unwrap().into_inner();
    assert_eq!(total.info.as_ref().unwrap().memory_total_kib, NODE_MIB * 1024, "the test driver's node memory");

    // Both hosts fail together.
    agent_a.stop().await;
    agent_b.stop().await;
    let req = |source: &str| MigrateRequest {
        source: source.into(),
        attest_powered_off: true,
        attest_reason: "test: both hosts lost power".into(),
        yes: true,
        ..Default::default()
    };
    for h in ["host-a", "host-b"] {
        wait_for(Duration::from_secs(10), &format!("{h} silent past the grace"), || {
            let mut op = op.clone();
            let r = req(h);
            async move { op.plan_migration(r).await.ok()?.into_inner().executable.then_some(()) }
        })
        .await;
        // Each plan alone would place both its guests on host-c.
        let p = op.clone().plan_migration(req(h)).await.unwrap().into_inner();
        assert!(p.guests.iter().all(|g| g.movable && g.target == "host-c"), "{:?}", p.guests);
    }

    // Both at once.
    let (mut op1, mut op2) = (op.clone(), op.clone());
    let (r1, r2) = tokio::join!(op1.start_migration(req("host-a")), op2.start_migration(req("host-b")));
    let (j1, j2) = (r1.unwrap().into_inner(), r2.unwrap().into_inner());
    let (d1, _) = wait_job_end(&op, &j1.id, Duration::from_secs(30)).await;
    let (d2, _) = wait_job_end(&op, &j2.id, Duration::from_secs(30)).await;

    let moves: Vec<_> = d1.moves.iter().chain(d2.moves.iter()).collect();
    let running: Vec<_> = moves.iter().filter(|m| m.state == "RUNNING").collect();
    let not_moved: Vec<_> = moves.iter().filter(|m| m.state == "NOT_MOVED").collect();
    assert_eq!(running.len(), 2, "room for two: {moves:#?}");
    assert!(running.iter().all(|m| m.target == "host-c"));
    assert_eq!(not_moved.len(), 2, "{moves:#?}");
    for m in &not_moved {
        assert!(m.error.starts_with("no capacity: needs 32 MiB"), "{}", m.error);
    }
    // The job created second saw the first one's reservations by name.
    let (first, second) = if d1.created_unix_ms <= d2.created_unix_ms { (&d1, &d2) } else { (&d2, &d1) };
    let named = second
        .moves
        .iter()
        .filter(|m| m.state == "NOT_MOVED")
        .all(|m| m.error.contains(&format!("reserved by job {}", first.id)));
    let mut states = [d1.state.as_str(), d2.state.as_str()];
    states.sort();
    assert!(
        states == ["PARTIAL", "PARTIAL"] || states == ["PARTIAL", "SUCCEEDED"],
        "{states:?}: {} / {}",
        d1.error,
        d2.error
    );
    if states == ["PARTIAL", "SUCCEEDED"] {
        assert!(named, "{:#?}", second.moves);
    }

    // What host-c runs: within its memory.
    let guests = op
        .clone()
        .list_guests(ListGuestsRequest { host: "host-c".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    let kib: u64 = guests
        .iter()
        .filter_map(|r| r.guest.as_ref())
        .filter(|g| g.state == GuestState::Running as i32)
        .map(|g| g.memory_kib)
        .sum();
    assert!(kib <= 2 * GUEST_MIB * 1024, "host-c runs {} MiB of guests; it had room for {}", kib / 1024, 2 * GUEST_MIB);
    assert_eq!(kib, 2 * GUEST_MIB * 1024);
    // Every job that left a guest behind raised its alarm, and nothing is
    // reserved any more.
    let mut alarmed = BTreeMap::new();
    for h in ["host-a", "host-b", "host-c"] {
        let rec = op.clone().get_host(GetHostRequest { host: h.into() }).await.unwrap().into_inner();
        assert_eq!(rec.reserved_memory_kib, 0, "{h}: ended jobs hold nothing");
        alarmed.insert(h, rec.alarms.iter().any(|a| a.starts_with("guests-not-moved")));
    }
    for d in [&d1, &d2] {
        let left = d.moves.iter().any(|m| m.state == "NOT_MOVED");
        assert_eq!(alarmed[d.source.as_str()], left, "{}: alarm iff something was left ({:?})", d.source, d.moves);
    }
    agent_c.stop().await;
    c.stop().await;
}
