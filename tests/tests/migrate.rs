//! In-process forced-migration tests: real controller (mTLS, SQLite, job
//! engine) and real agents on libvirt's test driver; disks are real files
//! so the targets' path checks are real. The BMC paths are covered by the
//! lab tests with the Redfish emulator; here the operator attests.
//!
//! All agents run in this one process and see one filesystem, as the lab's
//! hosts share one kernel: the shared directory carries a storage marker,
//! and a disk outside it is local even though every "host" sees its path.

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{
    Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_for, wait_job_end,
};
use lifeboat_proto::v1::{
    CheckId, GetHostRequest, GuestState, JobKind, JobState, ListAuditRequest, ListGuestsRequest, MigrateRequest,
    MoveState, PowerEvidence,
};

/// Marks `dir` as shared storage, as an operator (or lab.sh) does.
fn mark_shared(dir: &std::path::Path, id: &str) {
    std::fs::write(dir.join(".lifeboat-storage-id"), format!("{id}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_forced_migration_moves_every_shared_guest_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    mark_shared(&shared, "5b0c3f9e-1111-4222-8333-444455556666");
    // A local disk whose path every other "host" sees too: another host's
    // file at that path would be another disk.
    let local_disk = dir.join("local/vm-local.img");
    std::fs::create_dir_all(local_disk.parent().unwrap()).unwrap();
    std::fs::write(&local_disk, b"").unwrap();
    let disk = |n: &str| {
        let p = shared.join(format!("{n}.img"));
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    };
    let a = node(&[
        domain("vm-1", "22222222-0000-4000-8000-000000000001", &disk("vm-1"), "52:54:00:00:01:01", 1),
        domain("vm-2", "22222222-0000-4000-8000-000000000002", &disk("vm-2"), "52:54:00:00:01:02", 1),
        domain("vm-3", "22222222-0000-4000-8000-000000000003", &disk("vm-3"), "52:54:00:00:01:03", 5),
        domain(
            "vm-local",
            "22222222-0000-4000-8000-000000000004",
            &local_disk.display().to_string(),
            "52:54:00:00:01:04",
            1,
        ),
        // A kernel device name: /dev/loop0 can be another device on another host.
        domain("vm-dev", "22222222-0000-4000-8000-000000000005", "/dev/loop0", "52:54:00:00:01:05", 1),
    ]);
    // host-c has another guest (another UUID) on vm-1's disk: vm-1 must not go there.
    let c_guests = [domain("squatter", "22222222-0000-4000-8000-0000000000c1", &disk("vm-1"), "52:54:00:00:01:c1", 5)];
    for (h, text) in [("host-a", a), ("host-b", node(&[])), ("host-c", node(&c_guests))] {
        std::fs::write(dir.join(format!("{h}.xml")), text).unwrap();
    }
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000")
        .await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let agent_a = Agent::start(&agent_config("host-a", &uri("host-a"), &c.url(), &pki.agent("host-a"), ""));
    let agent_b = Agent::start(&agent_config("host-b", &uri("host-b"), &c.url(), &pki.agent("host-b"), ""));
    let agent_c = Agent::start(&agent_config("host-c", &uri("host-c"), &c.url(), &pki.agent("host-c"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    wait_for(Duration::from_secs(10), "inventory", || {
        let mut op = op.clone();
        async move {
            let g = op.list_guests(ListGuestsRequest::default()).await.ok()?.into_inner().guests;
            (g.len() == 6).then_some(())
        }
    })
    .await;

    // A live source is refused, whatever the operator says.
    let mut req = MigrateRequest {
        source: "host-a".into(),
        attest_powered_off: true,
        attest_reason: "test: host-a is off".into(),
        ..Default::default()
    };
    let p = op.plan_migration(req.clone()).await.unwrap().into_inner();
    assert!(!p.executable);
    assert!(p.preconditions.iter().any(|c| c.name == "source silent" && !c.ok));
    // The wire carries the check's id beside its label: what decisions read.
    assert!(p.preconditions.iter().any(|c| c.id == CheckId::SourceSilent as i32 && c.name == "source silent"));

    // The host "fails": its agent goes silent.
    agent_a.stop().await;
    wait_for(Duration::from_secs(10), "host-a silent past the grace", || {
        let mut op = op.clone();
        let req = req.clone();
        async move {
            let p = op.plan_migration(req).await.ok()?.into_inner();
            if !p.executable {
                eprintln!("{:?}", p.preconditions.iter().filter(|c| !c.ok).collect::<Vec<_>>());
            }
            p.executable.then_some(())
        }
    })
    .await;

    // Viewers cannot migrate.
    let mut viewer = c.admin(&pki.client("vic", Role::Viewer)).await;
    let e = viewer.plan_migration(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("operator"), "{}", e.message());

    // No BMC and no attestation: refused, with the way out.
    let mut no_attest = req.clone();
    no_attest.attest_powered_off = false;
    let p = op.plan_migration(no_attest).await.unwrap().into_inner();
    let c_power = p.preconditions.iter().find(|c| c.name == "source powered off").unwrap();
    assert!(!c_power.ok && c_power.remedy.contains("--attest-powered-off"), "{c_power:?}");

    let p = op.plan_migration(req.clone()).await.unwrap().into_inner();
    assert!(p.executable, "{p:?}");
    let local = p.guests.iter().find(|g| g.name == "vm-local").unwrap();
    assert!(!local.movable && local.reason.contains("local storage"), "{local:?}");
    let shared_check = local.checks.iter().find(|c| c.name == "disks on shared storage").unwrap();
    assert!(
        shared_check.detail.contains(&format!("host-a reported {} on local:", local_disk.display())),
        "{shared_check:?}"
    );
    let dev = p.guests.iter().find(|g| g.name == "vm-dev").unwrap();
    assert!(!dev.movable && dev.checks[0].detail.contains("/dev/loop0 is a kernel device name"), "{dev:?}");
    assert!(dev.checks[0].remedy.contains("by-id"), "{dev:?}");
    // The evidence: the target sees the disk on the storage the source reported.
    let vm1 = p.guests.iter().find(|g| g.name == "vm-1").unwrap();
    assert_eq!(vm1.target, "host-b", "host-c has another guest on vm-1's disk: {vm1:?}");
    let seen = vm1.checks.iter().find(|c| c.name == "same disks on host-b").unwrap();
    assert!(
        seen.ok
            && seen.detail.ends_with("vm-1.img on marker:5b0c3f9e-1111-4222-8333-444455556666 (vm-1.img) like host-a"),
        "{seen:?}"
    );
    // Named explicitly, host-c is refused for vm-1, with the other guest named.
    let mut to_c = req.clone();
    to_c.target = "host-c".into();
    to_c.vms = vec!["vm-1".into()];
    let pc = op.plan_migration(to_c).await.unwrap().into_inner();
    assert!(!pc.executable);
    let busy = pc.guests[0].checks.iter().find(|c| c.name == "disks free on host-c").unwrap();
    assert!(!busy.ok && busy.detail.contains("'squatter'"), "{busy:?}");
    assert!(p.guests.iter().find(|g| g.name == "vm-3").is_some_and(|g| g.movable && !g.start));

    // A stale plan id is refused and nothing happens.
    req.plan_id = "000000000000".into();
    let e = op.start_migration(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("plan changed"), "{}", e.message());

    req.plan_id = p.plan_id.clone();
    let job = op.start_migration(req.clone()).await.unwrap().into_inner();
    // 3 carried, and the 2 that cannot move recorded with the job.
    assert_eq!(job.moves.len(), 5);
    assert_eq!(job.moves.iter().filter(|m| m.state == "NOT_MOVED").count(), 2, "{job:?}");
    assert_eq!(job.moves.iter().filter(|m| m.move_state == MoveState::NotMoved as i32).count(), 2, "{job:?}");
    assert_eq!((job.job_kind, job.evidence), (JobKind::Migrate as i32, PowerEvidence::Attestation as i32), "{job:?}");
    let (done, took) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
    println!("3-guest job finished in {took:?}");
    // vm-local and vm-dev run nowhere: not a success.
    assert_eq!(done.state, "PARTIAL", "{done:?}");
    assert_eq!(done.job_state, JobState::Partial as i32, "{done:?}");
    assert!(done.error.contains("vm-local") && done.error.contains("vm-dev"), "{}", done.error);

    // Every shared guest is now defined on b or c, same UUID/name/MAC,
    // autostart off, owned by its target; the running ones run.
    let guests = op.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests;
    for (name, running) in [("vm-1", true), ("vm-2", true), ("vm-3", false)] {
        let on_targets: Vec<_> =
            guests.iter().filter(|g| g.host_id != "host-a" && g.guest.as_ref().unwrap().name == name).collect();
        assert_eq!(on_targets.len(), 1, "{name} defined exactly once elsewhere");
        let g = on_targets[0].guest.as_ref().unwrap();
        assert_eq!(g.owner_host, on_targets[0].host_id);
        assert_eq!(g.owner_generation, 1);
        assert!(!g.autostart, "autostart stays off on the target");
        assert_eq!(g.state == GuestState::Running as i32, running, "{name}: {g:?}");
        assert_eq!(g.nics[0].mac, format!("52:54:00:00:01:0{}", &name[3..4]));
    }
    let b = op.get_host(GetHostRequest { host: "host-b".into() }).await.unwrap().into_inner();
    let cc = op.get_host(GetHostRequest { host: "host-c".into() }).await.unwrap().into_inner();
    assert_eq!(b.guest_count + cc.guest_count, 4, "three moved, and the squatter");
    assert!(b.guest_count >= 1 && cc.guest_count >= 1, "spread over both targets");

    // The audit log tells the story.
    let log = op
        .list_audit(ListAuditRequest { job: job.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    for a in ["migrate.requested", "power.attested", "move.recorded", "guest.defined", "guest.running", "job.partial"] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let attested = log.iter().find(|e| e.action == "power.attested").unwrap();
    assert_eq!(attested.actor, "olga");
    assert!(attested.detail.contains("test: host-a is off"));
    let first_define = log.iter().position(|e| e.action == "guest.defined").unwrap();
    let proof = log.iter().position(|e| e.action == "power.attested").unwrap();
    assert!(proof < first_define, "power evidence recorded before any define");

    // Running the same command again finds nothing left to do.
    req.plan_id.clear();
    let p = op.plan_migration(req.clone()).await.unwrap().into_inner();
    assert!(!p.executable);
    assert!(
        p.guests
            .iter()
            .filter(|g| g.name != "vm-local" && g.name != "vm-dev")
            .all(|g| g.reason.contains("already moved")),
        "{p:?}"
    );
    agent_b.stop().await;
    agent_c.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_move_stops_first_then_redefines_and_undefines_on_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    mark_shared(dir, "7d1e2f30-1111-4222-8333-444455556666");
    let disk = dir.join("m1.img");
    std::fs::write(&disk, b"").unwrap();
    let b = node(&[domain(
        "m-1",
        "44444444-0000-4000-8000-000000000001",
        &disk.display().to_string(),
        "52:54:00:00:04:01",
        1,
    )]);
    std::fs::write(dir.join("b.xml"), b).unwrap();
    std::fs::write(dir.join("c.xml"), node(&[])).unwrap();
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000")
        .await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let ab = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let ac = Agent::start(&agent_config("host-c", &uri("c"), &c.url(), &pki.agent("host-c"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    let req = MigrateRequest {
        source: "host-b".into(),
        target: "host-c".into(),
        vms: vec!["m-1".into()],
        planned_move: true,
        ..Default::default()
    };
    let (p, _) = wait_for(Duration::from_secs(10), "move plan executable", || {
        let mut op = op.clone();
        let req = req.clone();
        async move { op.plan_migration(req).await.ok().map(|p| p.into_inner()).filter(|p| p.executable) }
    })
    .await;
    let mut go = req.clone();
    go.plan_id = p.plan_id;
    let job = op.start_migration(go).await.unwrap().into_inner();
    assert_eq!(job.kind, "move");
    let (done, _) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
    assert_eq!(done.state, "SUCCEEDED", "{done:?}");
    assert_eq!((done.job_state, done.job_kind), (JobState::Succeeded as i32, JobKind::Move as i32), "{done:?}");
    let (guests, _) = wait_for(Duration::from_secs(5), "source definition removed", || {
        let mut op = op.clone();
        async move {
            let g = op.list_guests(ListGuestsRequest::default()).await.ok()?.into_inner().guests;
            (g.len() == 1).then_some(g)
        }
    })
    .await;
    assert_eq!(guests[0].host_id, "host-c");
    assert_eq!(guests[0].guest.as_ref().unwrap().state, GuestState::Running as i32);
    let log = op
        .list_audit(ListAuditRequest { job: job.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let pos = |a: &str| log.iter().position(|e| e.action == a).unwrap_or_else(|| panic!("{a} in {log:?}"));
    assert!(pos("guest.stopped_for_move") < pos("guest.defined"), "stopped on the source before defined on the target");
    assert!(pos("guest.running") < pos("cleanup.removed"));
    ab.stop().await;
    ac.stop().await;
    c.stop().await;
}
