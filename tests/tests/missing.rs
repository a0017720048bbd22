//! In-process end-to-end tests of guests missing on their owner: a real
//! controller and agents on libvirt's test driver (one node file per host).
//! A host's agent restarted on a node file without some guests is a host
//! back without them (reinstalled); `vms restore` defines them again through
//! the agent, `vms forget` drops one on purpose.

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_for};
use lifeboat_proto::v1::{
    ForgetGuestRequest, GuestRecord, GuestState, ListAlarmsRequest, ListAuditRequest, ListGuestsRequest,
    RestoreGuestRequest, admin_client::AdminClient,
};
use tonic::transport::Channel;

const M1: &str = "55555555-0000-4000-8000-000000000001";
const M2: &str = "55555555-0000-4000-8000-000000000002";
const M3: &str = "55555555-0000-4000-8000-000000000003";

async fn listed(op: &AdminClient<Channel>, vm: &str) -> Vec<GuestRecord> {
    let mut op = op.clone();
    op.list_guests(ListGuestsRequest { vm: vm.into(), ..Default::default() })
        .await
        .map(|r| r.into_inner().guests)
        .unwrap_or_default()
}

async fn audit_actions(op: &AdminClient<Channel>, vm: &str) -> Vec<String> {
    let mut op = op.clone();
    let log =
        op.list_audit(ListAuditRequest { vm: vm.into(), ..Default::default() }).await.unwrap().into_inner().entries;
    log.into_iter().map(|e| e.action).collect()
}

async fn missing_alarms(op: &AdminClient<Channel>) -> Vec<String> {
    let mut op = op.clone();
    let a = op.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    a.into_iter().filter(|a| a.kind == "guest-missing").map(|a| format!("{}: {}", a.host, a.detail)).collect()
}

fn restore(vm: &str, to: &str, start: bool) -> RestoreGuestRequest {
    RestoreGuestRequest { vm: vm.into(), to_host: to.into(), start, reason: "undefined by mistake".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_gone_from_their_owner_are_kept_restored_or_forgotten_on_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    let disk = |n: &str| {
        let p = dir.join(format!("{n}.img"));
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    };
    let guests = [
        domain("m-1", M1, &disk("m1"), "52:54:00:00:05:01", 5),
        domain("m-2", M2, &disk("m2"), "52:54:00:00:05:02", 5),
        domain("m-3", M3, &disk("m3"), "52:54:00:00:05:03", 5),
    ];
    std::fs::write(dir.join("a.xml"), node(&guests)).unwrap();
    std::fs::write(dir.join("a-empty.xml"), node(&[])).unwrap();
    std::fs::write(dir.join("b.xml"), node(&[])).unwrap();
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "lease_ttl_ms = 3000").await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let aa = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), ""));
    let ab = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let op = c.admin(&pki.client("olga", Role::Operator)).await;
    let viewer = c.admin(&pki.client("vera", Role::Viewer)).await;
    wait_for(Duration::from_secs(10), "three guests on host-a", || async {
        let g = listed(&op, "").await;
        (g.len() == 3 && g.iter().all(|r| r.desired_state == "stopped")).then_some(())
    })
    .await;
    // host-a comes back without its guests (reinstalled): all three are kept.
    aa.stop().await;
    let aa = Agent::start(&agent_config("host-a", &uri("a-empty"), &c.url(), &pki.agent("host-a"), ""));
    let (g, took) = wait_for(Duration::from_secs(10), "three missing guests", || async {
        let g = listed(&op, "").await;
        (g.len() == 3 && g.iter().all(|r| r.missing)).then_some(g)
    })
    .await;
    println!("missing guests shown {took:?} after the agent came back");
    for r in &g {
        assert_eq!((r.host_id.as_str(), r.owner_host.as_str()), ("host-a", "host-a"));
        assert!(r.missing_since_unix_ms > 0);
    }
    assert_eq!(missing_alarms(&op).await.len(), 3);
    assert!(audit_actions(&op, "m-1").await.contains(&"guest.missing".to_string()));
    let with_def = op
        .clone()
        .list_guests(ListGuestsRequest { vm: "m-1".into(), with_definitions: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    assert!(with_def[0].guest.as_ref().unwrap().definition_xml.contains(M1), "the last definition is kept");

    // Refusals change nothing and say why.
    let e = viewer.clone().restore_guest(restore("m-1", "", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let e = viewer.clone().forget_guest(ForgetGuestRequest { vm: "m-3".into(), reason: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    let e = op.clone().restore_guest(restore("m-9", "", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let e = op
        .clone()
        .restore_guest(RestoreGuestRequest { reason: " ".into(), ..restore("m-1", "", false) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    let e = op.clone().restore_guest(restore("m-1", "host-z", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    assert_eq!(listed(&op, "").await.iter().filter(|r| r.missing).count(), 3, "refusals changed nothing");

    // Right after the controller started (startup grace: twice the detection
    // time), a host that runs the guest may not have reported yet: refused.
    let e = op.clone().restore_guest(restore("m-1", "", true)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("reports-current") && e.message().contains("startup grace"), "{}", e.message());
    let e =
        op.clone().forget_guest(ForgetGuestRequest { vm: "m-3".into(), reason: "retired".into() }).await.unwrap_err();
    assert!(e.message().contains("reports-current"), "{}", e.message());
    let e = op
        .clone()
        .restore_guest(RestoreGuestRequest { reason: "bad\u{1b}[2J".into(), ..restore("m-1", "", true) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert_eq!(listed(&op, "").await.iter().filter(|r| r.missing).count(), 3, "refusals changed nothing");
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // m-1: restored on its owner and started.
    let r = op.clone().restore_guest(restore("m-1", "", true)).await.unwrap().into_inner();
    assert_eq!((r.host_id.as_str(), r.missing), ("host-a", false));
    let (_, took) = wait_for(Duration::from_secs(10), "m-1 running on host-a", || async {
        let g = listed(&op, "m-1").await;
        (g.len() == 1
            && !g[0].missing
            && g[0].host_id == "host-a"
            && g[0].guest.as_ref()?.state == GuestState::Running as i32)
            .then_some(())
    })
    .await;
    println!("m-1 running {took:?} after its restore returned");
    let log = audit_actions(&op, "m-1").await;
    for a in ["guest.restore.recorded", "guest.restored", "guest.reappeared", "guest.started"] {
        assert!(log.contains(&a.to_string()), "{a} in {log:?}");
    }
    // Not missing any more: a second restore is refused, naming where it is.
    let e = op.clone().restore_guest(restore("m-1", "", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("defined on host-a"), "{}", e.message());
    let e = op.clone().forget_guest(ForgetGuestRequest { vm: "m-1".into(), reason: "x".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());

    // m-2: restored elsewhere (a placement change, recorded first), not started.
    let r = op.clone().restore_guest(restore("m-2", "host-b", false)).await.unwrap().into_inner();
    assert_eq!((r.host_id.as_str(), r.owner_host.as_str(), r.missing), ("host-b", "host-b", false));
    assert_eq!(r.guest.as_ref().unwrap().owner_generation, 1);
    assert_eq!(r.guest.as_ref().unwrap().state, GuestState::Shutoff as i32);

    // m-3: forgotten on purpose, audited with the definition's size and hash.
    let f = op
        .clone()
        .forget_guest(ForgetGuestRequest { vm: "m-3".into(), reason: "retired".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((f.uuid.as_str(), f.host.as_str()), (M3, "host-a"));
    assert!(f.definition_bytes > 100 && f.definition_sha256.len() == 64, "{f:?}");
    assert!(listed(&op, "m-3").await.is_empty());
    let log = op
        .clone()
        .list_audit(ListAuditRequest { vm: "m-3".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let forgotten = log.iter().find(|e| e.action == "guest.forgotten").expect("guest.forgotten audited");
    assert_eq!(forgotten.actor, "olga");
    assert!(
        forgotten.detail.contains(&f.definition_sha256) && forgotten.detail.contains("retired"),
        "{}",
        forgotten.detail
    );
    assert!(missing_alarms(&op).await.is_empty(), "every guest-missing alarm is cleared by its cause");
    aa.stop().await;
    ab.stop().await;
    c.stop().await;
}
