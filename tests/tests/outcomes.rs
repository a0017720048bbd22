//! Honest job outcomes, in process: a forced migration that leaves a guest
//! behind ends PARTIAL (never SUCCEEDED), lists the guest as NOT_MOVED with
//! its reason, raises a `guests-not-moved` alarm on the source, and that
//! alarm is cleared only by an operator through `ClearAlarms`, audited.

use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, test_domain as domain, test_node as node, wait_job_end};
use lifeboat_proto::v1::{
    ClearAlarmsRequest, GetHostRequest, GetJobRequest, ListAlarmsRequest, ListAuditRequest, ListGuestsRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_leaves_a_local_guest_behind_is_partial_and_alarms_until_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"));
    // The directory is shared storage (all agents here share one filesystem: a marker says so).
    std::fs::write(dir.join(".lifeboat-storage-id"), "7a1e0c1a-1111-4222-8333-444455556666\n").unwrap();
    let shared = dir.join("shared.img");
    std::fs::write(&shared, b"").unwrap();
    let a = node(&[
        domain(
            "vm-shared",
            "77777777-0000-4000-8000-000000000001",
            &shared.display().to_string(),
            "52:54:00:00:07:01",
            1,
        ),
        domain(
            "vm-local",
            "77777777-0000-4000-8000-000000000002",
            "/nonexistent/local/vm-local.img",
            "52:54:00:00:07:02",
            1,
        ),
    ]);
    std::fs::write(dir.join("a.xml"), a).unwrap();
    std::fs::write(dir.join("b.xml"), node(&[])).unwrap();
    let c = Controller::start_with(&pki, &dir.join("c.db"), 0, 200, 600, "force_grace_ms = 1500\nlease_ttl_ms = 1000")
        .await;
    let uri = |h: &str| format!("test://{}", dir.join(format!("{h}.xml")).display());
    let agent_a = Agent::start(&agent_config("host-a", &uri("a"), &c.url(), &pki.agent("host-a"), ""));
    let agent_b = Agent::start(&agent_config("host-b", &uri("b"), &c.url(), &pki.agent("host-b"), ""));
    let mut op = c.admin(&pki.client("olga", Role::Operator)).await;
    lifeboat_e2e::wait_guest_count(&op, 2).await;

    // host-a fails; the operator attests it is off and carries out the plan.
    agent_a.stop().await;
    let req = lifeboat_e2e::attested_migration("host-a");
    let job = lifeboat_e2e::start_migration_when_accepted(&op, &req).await;
    // The guest left behind is recorded with the job from the start.
    let local = job.moves.iter().find(|m| m.name == "vm-local").expect("vm-local recorded with the job");
    assert_eq!(local.state, "NOT_MOVED", "{job:?}");
    assert_eq!(job.moves.len(), 2);

    let (done, took) = wait_job_end(&op, &job.id, Duration::from_secs(20)).await;
    println!("job with one guest left behind finished in {took:?}: {}", done.error);
    assert_eq!(done.state, "PARTIAL", "a guest running nowhere is not a success: {done:?}");
    let shared_move = done.moves.iter().find(|m| m.name == "vm-shared").unwrap();
    assert_eq!((shared_move.state.as_str(), shared_move.target.as_str()), ("RUNNING", "host-b"));
    let local = done.moves.iter().find(|m| m.name == "vm-local").unwrap();
    assert_eq!(local.state, "NOT_MOVED");
    assert!(
        local.error.contains("not shown to be shared") && local.error.contains("/nonexistent/local/vm-local.img"),
        "{local:?}"
    );
    assert!(local.error.contains("failed checks: disks on shared storage"), "the plan's failed checks: {local:?}");
    assert!(local.target.is_empty() && local.generation == 0, "{local:?}");
    for want in [
        "vm-local (not moved: storage not shown to be shared",
        "running nowhere while host-a stays off",
        "lifeboat alarms clear --host host-a --kind guests-not-moved",
    ] {
        assert!(done.error.contains(want), "job error lacks '{want}': {}", done.error);
    }
    // The report reads the same later.
    let shown = op.get_job(GetJobRequest { id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(shown, done);

    // The guest left behind was never defined anywhere else, nor owned elsewhere.
    let guests = op.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests;
    let copies: Vec<&str> =
        guests.iter().filter(|g| g.guest.as_ref().unwrap().name == "vm-local").map(|g| g.host_id.as_str()).collect();
    assert_eq!(copies, ["host-a"]);
    assert_eq!(
        guests.iter().filter(|g| g.guest.as_ref().unwrap().name == "vm-shared" && g.host_id == "host-b").count(),
        1
    );

    // The alarm is raised on the source, naming the guest, and shown on the host.
    let alarms = op.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    let alarm = alarms.iter().find(|a| a.kind == "guests-not-moved").unwrap_or_else(|| panic!("{alarms:?}"));
    assert_eq!(alarm.host, "host-a");
    assert!(
        alarm.detail.contains(&job.id) && alarm.detail.contains("vm-local") && alarm.detail.contains("1 of 2"),
        "{alarm:?}"
    );
    let host = op.get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner();
    assert!(host.alarms.iter().any(|a| a.starts_with("guests-not-moved")), "{:?}", host.alarms);
    let log = op
        .list_audit(ListAuditRequest { job: job.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let partial = log.iter().find(|e| e.action == "job.partial").unwrap_or_else(|| panic!("no job.partial in {log:?}"));
    assert!(partial.detail.starts_with("1 of 2 guest(s) moved"), "{partial:?}");
    assert!(!log.iter().any(|e| e.action == "job.succeeded"));
    let requested = log.iter().find(|e| e.action == "migrate.requested").unwrap();
    assert!(requested.detail.contains("1 left behind: vm-local"), "{requested:?}");

    // The CLI agrees: `jobs show` exits 1 and lists the guest with its reason.
    let cli = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lifeboat");
    if cli.exists() {
        let olga = pki.client("olga", Role::Operator);
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&cli)
                .args(["--controller-url", &c.url(), "--ca"])
                .arg(&olga.ca)
                .arg("--cert")
                .arg(&olga.cert)
                .arg("--key")
                .arg(&olga.key)
                .args(args)
                .env_remove("LIFEBOAT_CONFIG")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (code, stdout, stderr) = run(&["jobs", "show", &job.id]);
        println!("lifeboat jobs show {}:\n{stdout}{stderr}", job.id);
        assert_eq!(code, Some(1), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("NOT_MOVED") && stdout.contains("left behind on host-a: vm-local (NOT_MOVED)"),
            "{stdout}"
        );
        assert!(stderr.contains("PARTIAL"), "{stderr}");
        let (code, stdout, stderr) = run(&["alarms", "--all"]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stdout.contains("ALARM guests-not-moved on host-a"), "{stdout}");
        let (code, _, stderr) = run(&["alarms", "clear", "--host", "host-a", "--kind", "split-brain"]);
        assert_eq!(code, Some(6), "a refusal changes nothing: {stderr}");
        assert!(stderr.contains("active: guests-not-moved on host-a"), "{stderr}");
    } else {
        eprintln!("SKIPPED the CLI part: {} not built (scripts/test.sh builds it first)", cli.display());
    }

    // Clearing: viewers may not; a kind that is not active is refused, naming what is.
    let mut viewer = c.admin(&pki.client("vic", Role::Viewer)).await;
    let clear = |kind: &str| ClearAlarmsRequest {
        host: "host-a".into(),
        kind: kind.into(),
        reason: "vm-local restored from backup".into(),
    };
    let e = viewer.clear_alarms(clear("guests-not-moved")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = op.clear_alarms(clear("split-brain")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("no active 'split-brain' alarm on host-a")
            && e.message().contains("guests-not-moved on host-a"),
        "{}",
        e.message()
    );
    let e = op.clear_alarms(ClearAlarmsRequest { host: "host-a".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let cleared = op.clear_alarms(clear("guests-not-moved")).await.unwrap().into_inner().cleared;
    assert_eq!(cleared.len(), 1);
    assert!(cleared[0].detail.contains("vm-local") && cleared[0].cleared_unix_ms > 0, "{cleared:?}");
    let active = op.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    // vm-local still waits for host-a (its own alarm, cleared when it runs again).
    assert!(
        active.len() == 1 && active[0].kind == "guests-waiting" && active[0].detail.contains("vm-local"),
        "{active:?}"
    );
    let host = op.get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner();
    assert!(
        host.alarms.iter().all(|a| a.starts_with("guests-waiting")),
        "the registry's view is reloaded: {:?}",
        host.alarms
    );
    let all = op.list_alarms(ListAlarmsRequest { include_cleared: true }).await.unwrap().into_inner().alarms;
    assert!(all.iter().any(|a| a.kind == "guests-not-moved" && a.cleared_unix_ms > 0), "kept as history: {all:?}");
    let log = op
        .list_audit(ListAuditRequest { host: "host-a".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let entry =
        log.iter().find(|e| e.action == "alarm.cleared").unwrap_or_else(|| panic!("no alarm.cleared in {log:?}"));
    assert_eq!(entry.actor, "olga");
    assert!(
        entry.detail.contains("guests-not-moved") && entry.detail.contains("vm-local restored from backup"),
        "{entry:?}"
    );
    let e = op.clear_alarms(clear("guests-not-moved")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("no active 'guests-not-moved' alarm")
            && e.message().contains("active: guests-waiting on host-a"),
        "{}",
        e.message()
    );

    agent_b.stop().await;
    c.stop().await;
}
