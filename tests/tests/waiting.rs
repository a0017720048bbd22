//! Waiting guests, in process: a guest a forced migration leaves behind is
//! recorded as waiting with its reason (vms list, hosts show, an alarm
//! naming it), `StartVm` refuses while its host is OFFLINE, starts it on a
//! returned host in MAINTENANCE, and then it no longer waits (alarm cleared
//! by cause, audited); a second start is refused.

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{
    Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_for, wait_job_end,
};
use lifeboat_proto::v1::{GetHostRequest, ListAlarmsRequest, ListAuditRequest, ListGuestsRequest, StartVmRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_left_behind_waits_visibly_and_an_operator_starts_it_on_its_returned_host() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join(".lifeboat-storage-id"), "7a1e0c1a-1111-4222-8333-444455556666\n").unwrap();
    let shared = dir.join("shared.img");
    std::fs::write(&shared, b"").unwrap();
    let (shared_uuid, local_uuid) = ("88888888-0000-4000-8000-000000000001", "88888888-0000-4000-8000-000000000002");
    let a_node = |runstate: u32| {
        node(&[
            domain("vm-shared", shared_uuid, &shared.display().to_string(), "52:54:00:00:08:01", runstate),
            domain("vm-local", local_uuid, "/nonexistent/local/vm-local.img", "52:54:00:00:08:02", runstate),
        ])
    };
    std::fs::write(dir.join("a.xml"), a_node(1)).unwrap();
    std::fs::write(dir.join("b.xml"), node(&[])).unwrap();
    let boot = dir.join("boot-a");
    std::fs::write(&boot, "boot-1\n").unwrap();
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000")
        .await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let extra_a = format!("boot_id_file = {boot:?}");
    let agent_a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), &extra_a));
    let _agent_b = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    lifeboat_e2e::wait_guest_count(&op, 2).await;
    // Desired state "running" is learned from the running guests.
    lifeboat_e2e::wait_desired_running(&op).await;

    agent_a.stop().await;
    let req = lifeboat_e2e::attested_migration("host-a");
    let job = lifeboat_e2e::start_migration_when_accepted(&op, &req).await;
    let (done, _) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
    assert_eq!(done.state, "PARTIAL", "{done:?}");
    assert!(
        done.error.contains("vm-local (not moved:") && done.error.contains("waits for host-a to return"),
        "{}",
        done.error
    );

    // Waiting, with its reason and since-time, on its own host.
    let local_rec = |op: &mut lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>| {
        let mut op = op.clone();
        async move {
            op.list_guests(ListGuestsRequest { vm: "vm-local".into(), ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .guests
                .into_iter()
                .find(|g| g.host_id == "host-a")
                .expect("vm-local on host-a")
        }
    };
    let r = local_rec(&mut op).await;
    assert!(r.waiting_reason.contains("not shown to be shared") && r.waiting_reason.contains(&job.id), "{r:?}");
    assert!(r.waiting_since_unix_ms > 0);
    let shared_rec = op
        .list_guests(ListGuestsRequest { vm: "vm-shared".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    assert!(shared_rec.iter().all(|g| g.waiting_reason.is_empty()), "a moved guest does not wait: {shared_rec:?}");
    let h = op.get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner();
    assert_eq!(h.waiting_guests, 1);
    let waiting_alarm = |op: &mut lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>| {
        let mut op = op.clone();
        async move {
            op.list_alarms(ListAlarmsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .alarms
                .into_iter()
                .filter(|a| a.kind == "guests-waiting")
                .collect::<Vec<_>>()
        }
    };
    let a = waiting_alarm(&mut op).await;
    assert!(
        a.len() == 1
            && a[0].host == "host-a"
            && a[0].detail.contains("vm-local")
            && a[0].detail.contains("lifeboat vms start vm-local"),
        "{a:?}"
    );

    // Refused while host-a is OFFLINE; a reason is required.
    let e = op.start_vm(StartVmRequest { vm: "vm-local".into(), reason: "test".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("owner not OFFLINE") && e.message().contains("nothing was changed"),
        "{}",
        e.message()
    );
    let e = op.start_vm(StartVmRequest { vm: "vm-local".into(), reason: " ".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = op.start_vm(StartVmRequest { vm: "vm-nope".into(), reason: "test".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // A viewer may not.
    let mut viewer = c.admin(&pki.client("vera", Role::Viewer)).await;
    let e = viewer.start_vm(StartVmRequest { vm: "vm-local".into(), reason: "test".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // host-a returns after a power cycle: its guests shut off, MAINTENANCE.
    std::fs::write(dir.join("a.xml"), a_node(5)).unwrap();
    std::fs::write(&boot, "boot-2\n").unwrap();
    let _agent_a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), &extra_a));
    wait_for(Duration::from_secs(10), "host-a back in MAINTENANCE", || {
        let mut op = op.clone();
        async move {
            let h = op.get_host(GetHostRequest { host: "host-a".into() }).await.ok()?.into_inner();
            (h.status == "MAINTENANCE" && h.liveness == "REACHABLE").then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = local_rec(&mut op).await;
    assert_eq!(
        r.guest.as_ref().unwrap().state,
        lifeboat_proto::v1::GuestState::Shutoff as i32,
        "quarantine starts nothing: {r:?}"
    );
    assert!(!r.waiting_reason.is_empty(), "still waiting: {r:?}");

    // The shared guest runs on host-b: starting it again is refused.
    let e = op.start_vm(StartVmRequest { vm: "vm-shared".into(), reason: "test".into() }).await.unwrap_err();
    assert!(e.message().contains("not running anywhere") && e.message().contains("host-b"), "{}", e.message());

    // The operator starts the waiting guest on its host now (MAINTENANCE allows it).
    let (started, took) = wait_for(Duration::from_secs(10), "vms start accepted", || {
        let mut op = op.clone();
        async move {
            op.start_vm(StartVmRequest { vm: "vm-local".into(), reason: "test: needed now".into() })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    println!("StartVm accepted after {took:?}: {started:?}");
    assert_eq!(started.host_id, "host-a");
    wait_for(Duration::from_secs(10), "vm-local running, no longer waiting", || {
        let mut op = op.clone();
        async move {
            let r = local_rec(&mut op).await;
            (r.guest.as_ref()?.state == lifeboat_proto::v1::GuestState::Running as i32 && r.waiting_reason.is_empty())
                .then_some(())
        }
    })
    .await;
    assert!(waiting_alarm(&mut op).await.is_empty(), "the waiting alarm is cleared by cause");
    assert_eq!(op.get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner().waiting_guests, 0);
    let e = op.start_vm(StartVmRequest { vm: "vm-local".into(), reason: "test: twice".into() }).await.unwrap_err();
    assert!(e.message().contains("it runs already"), "{}", e.message());
    let log = op
        .list_audit(ListAuditRequest { vm: "vm-local".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<(&str, &str)> = log.iter().map(|e| (e.action.as_str(), e.actor.as_str())).collect();
    for want in
        [("guest.start_requested", "olga"), ("guest.started", "controller"), ("guest.waiting_ended", "controller")]
    {
        assert!(actions.contains(&want), "{want:?} in {actions:?}");
    }
    let alarm_log = op
        .list_audit(ListAuditRequest { host: "host-a".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        alarm_log.iter().any(|e| e.action == "alarm.cleared" && e.detail.contains("guests-waiting")),
        "{alarm_log:?}"
    );
}

/// `vms start` right after the controller started: refused with
/// `reports-current` (the startup grace: a host may still run the guest and
/// not have reported yet), nothing audited as requested; accepted once the
/// grace is over, audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_start_waits_for_the_startup_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let uuid = "88888888-0000-4000-8000-000000000011";
    std::fs::write(
        dir.join("a.xml"),
        node(&[domain("vm-grace", uuid, "/nonexistent/vm-grace.img", "52:54:00:00:08:11", 5)]),
    )
    .unwrap();
    // Detection 2.5 s: a startup grace of 5 s.
    let c = Controller::start(&pki, &dir.join("c.db"), 0, 500, 2500).await;
    let uri = format!("test://{}", dir.join("a.xml").display());
    let _agent_a = Agent::start(&agent_config("host-a", &uri, &c.url(), &pki.agent("host-a"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    lifeboat_e2e::wait_guest_count(&op, 1).await;
    let e = op.start_vm(StartVmRequest { vm: "vm-grace".into(), reason: "test: too early".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("reports-current") && e.message().contains("startup grace"), "{}", e.message());
    let (started, took) = wait_for(Duration::from_secs(15), "vms start accepted after the grace", || {
        let mut op = op.clone();
        async move {
            op.start_vm(StartVmRequest { vm: "vm-grace".into(), reason: "test: now".into() })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    println!("StartVm accepted after {took:?}");
    assert_eq!(started.host_id, "host-a");
    let log = op
        .list_audit(ListAuditRequest { vm: "vm-grace".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let requested = log.iter().filter(|e| e.action == "guest.start_requested").count();
    assert_eq!(requested, 1, "a refusal audits no request: {log:?}");
    assert!(log.iter().any(|e| e.action == "guest.started"), "{log:?}");
}

type Admin = lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>;

/// Two hosts; host-a had a shared-disk guest (moved to host-b by a forced
/// migration) and a local-disk one, `vm-local`, which the migration left
/// waiting; host-a then came back without it (vm-local is missing there,
/// and still waits).
struct LocalGuestWaiting {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    pki: Pki,
    c: Controller,
    op: Admin,
    _agent_a: Agent,
    agent_b: Agent,
    shared: std::path::PathBuf,
    shared_uuid: &'static str,
    local_uuid: &'static str,
}

impl LocalGuestWaiting {
    async fn set_up(storage_id: &str, shared_uuid: &'static str, local_uuid: &'static str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let pki = Pki::new(&dir.join("pki"));
        std::fs::write(dir.join(".lifeboat-storage-id"), format!("{storage_id}\n")).unwrap();
        let shared = dir.join("shared.img");
        std::fs::write(&shared, b"").unwrap();
        let moved = domain("vm-shared", shared_uuid, &shared.display().to_string(), "52:54:00:00:08:11", 1);
        let a_node =
            node(&[moved, domain("vm-local", local_uuid, "/nonexistent/local/vm-local.img", "52:54:00:00:08:12", 1)]);
        std::fs::write(dir.join("a.xml"), a_node).unwrap();
        std::fs::write(dir.join("a-empty.xml"), node(&[])).unwrap();
        std::fs::write(dir.join("b.xml"), node(&[])).unwrap();
        let boot = dir.join("boot-a");
        std::fs::write(&boot, "boot-1\n").unwrap();
        let c =
            Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000")
                .await;
        let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
        let extra_a = format!("boot_id_file = {boot:?}");
        let agent_a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), &extra_a));
        let agent_b = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
        let op = c.admin(&pki.client("olga", Role::Operator)).await;
        lifeboat_e2e::wait_guest_count(&op, 2).await;
        lifeboat_e2e::wait_desired_running(&op).await;
        agent_a.stop().await;
        let req = lifeboat_e2e::attested_migration("host-a");
        let job = lifeboat_e2e::start_migration_when_accepted(&op, &req).await;
        let (done, _) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
        assert_eq!(done.state, "PARTIAL", "{done:?}");
        let (w, alarms, _) = waits(&op).await;
        assert!(w && alarms == 1, "vm-local waits on host-a");

        // host-a comes back (power-cycled) without vm-local: it is missing there.
        std::fs::write(&boot, "boot-2\n").unwrap();
        let agent_a = Agent::start(&agent_config("host-a", &uri("a-empty"), &c.url(), &pki.agent("host-a"), &extra_a));
        wait_for(Duration::from_secs(10), "vm-local missing on host-a", || {
            let mut op = op.clone();
            async move {
                let g = op
                    .list_guests(ListGuestsRequest { vm: "vm-local".into(), ..Default::default() })
                    .await
                    .ok()?
                    .into_inner()
                    .guests;
                g.iter().any(|g| g.missing && g.host_id == "host-a").then_some(())
            }
        })
        .await;
        let (w, _, _) = waits(&op).await;
        assert!(w, "still waiting on host-a");
        LocalGuestWaiting { _tmp: tmp, dir, pki, c, op, _agent_a: agent_a, agent_b, shared, shared_uuid, local_uuid }
    }
}

/// Whether vm-local waits, how many `guests-waiting` alarms are active, and its records.
async fn waits(op: &Admin) -> (bool, usize, Vec<lifeboat_proto::v1::GuestRecord>) {
    let mut op = op.clone();
    let g = op
        .list_guests(ListGuestsRequest { vm: "vm-local".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    let a = op.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    (g.iter().any(|g| !g.waiting_reason.is_empty()), a.iter().filter(|a| a.kind == "guests-waiting").count(), g)
}

/// A guest waiting on host-a that an operator restores on host-b (`vms
/// restore --to`) waits no more, although host-a does not report it (it came
/// back without it): the wait ends with the owner recorded on host-b
/// (audited `guest.waiting_ended`, its alarm cleared by cause).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_guest_restored_on_another_host_waits_no_more() {
    use lifeboat_proto::v1::RestoreGuestRequest;
    let t = LocalGuestWaiting::set_up(
        "7a1e0c1a-1111-4222-8333-444455556677",
        "88888888-0000-4000-8000-000000000011",
        "88888888-0000-4000-8000-000000000012",
    )
    .await;
    let op = t.op.clone();
    let restore = RestoreGuestRequest {
        vm: "vm-local".into(),
        to_host: "host-b".into(),
        start: false,
        reason: "test: lives on b now".into(),
    };
    let (r, _) = wait_for(Duration::from_secs(10), "restore --to host-b accepted", || {
        let mut op = op.clone();
        let restore = restore.clone();
        async move { op.restore_guest(restore).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    assert_eq!((r.host_id.as_str(), r.owner_host.as_str()), ("host-b", "host-b"));
    let (w, alarms, g) = waits(&op).await;
    assert!(!w && alarms == 0, "restored on host-b: no longer waits on host-a: {g:?}");
    assert_eq!(
        op.clone().get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner().waiting_guests,
        0
    );
    let log = op
        .clone()
        .list_audit(ListAuditRequest { vm: "vm-local".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ended = log.iter().find(|e| e.action == "guest.waiting_ended").expect("guest.waiting_ended audited");
    assert!(ended.detail.contains("restored on host-b by olga"), "{}", ended.detail);
}

/// A guest waiting on host-a that an operator moved to host-b by hand (defined
/// and started there outside Lifeboat; host-a came back without it) waits no
/// more: host-b runs it and owns it (audited `guest.waiting_ended`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_guest_moved_by_hand_to_another_host_waits_no_more() {
    let t = LocalGuestWaiting::set_up(
        "7a1e0c1a-1111-4222-8333-444455556688",
        "88888888-0000-4000-8000-000000000021",
        "88888888-0000-4000-8000-000000000022",
    )
    .await;
    let op = t.op.clone();
    // By hand: vm-local defined and started on host-b (its agent restarted on that node).
    t.agent_b.stop().await;
    let hand = domain("vm-local", t.local_uuid, "/nonexistent/local/vm-local.img", "52:54:00:00:08:12", 1);
    let b_shared = op
        .clone()
        .list_guests(ListGuestsRequest { vm: "vm-shared".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    assert!(b_shared.iter().any(|g| g.host_id == "host-b"), "vm-shared moved to host-b");
    let shared = domain("vm-shared", t.shared_uuid, &t.shared.display().to_string(), "52:54:00:00:08:11", 1);
    std::fs::write(t.dir.join("b-hand.xml"), node(&[shared, hand])).unwrap();
    let uri = format!("test://{}", t.dir.join("b-hand.xml").display());
    let _agent_b = Agent::start(&agent_config("host-b", &uri, &t.c.url(), &t.pki.agent("host-b"), ""));
    let (_, took) = wait_for(Duration::from_secs(15), "vm-local no longer waiting", || {
        let op = op.clone();
        async move {
            let (w, alarms, g) = waits(&op).await;
            (!w && alarms == 0 && g.iter().any(|g| g.host_id == "host-b")).then_some(())
        }
    })
    .await;
    println!("the wait ended {took:?} after host-b reported the hand-moved guest");
    let log = op
        .clone()
        .list_audit(ListAuditRequest { vm: "vm-local".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ended = log.iter().find(|e| e.action == "guest.waiting_ended").expect("guest.waiting_ended audited");
    assert!(ended.detail.contains("it runs on host-b, which owns it now"), "{}", ended.detail);
}
