//! Guests that could not move wait, visibly, and run again exactly once:
//! a local-disk guest left on a fenced host that returns, and a source that
//! is powered on in the middle of its forced migration. Real libvirtd, qemu
//! guests and Redfish BMCs, the copies checker on, and the lab's end-of-test
//! check (every guest that ran at the start runs once at the end, or waits
//! with a reason). Needs root.

use std::time::{Duration, Instant};

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

/// Every guest running and managed by Lifeboat.
fn settle(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(30), "guests running and managed", || {
        let v = lab.vms();
        v.len() == n
            && v.iter().all(|g| g["state"] == "running" && g["autostart"] == false && g["desired_state"] == "running")
    });
}

fn uuid_of(lab: &Lab, name: &str) -> String {
    lab.vm(name).and_then(|g| g["uuid"].as_str().map(String::from)).unwrap_or_else(|| panic!("{name} unknown"))
}

/// The single running copy of `name` is on `host` (from /proc).
fn runs_once_on(lab: &Lab, name: &str, uuid: &str, host: &str) {
    let c = lab.running_copies(uuid);
    assert!(c.len() == 1 && c[0].host == host, "{name} ({uuid}) must run exactly once, on {host}; it runs {c:?}");
}

fn alarms(lab: &Lab) -> Vec<Value> {
    lab.cli_json(&["alarms"]).ok().and_then(|a| a.as_array().cloned()).unwrap_or_default()
}

fn audit_actions(lab: &Lab, host: &str) -> Vec<String> {
    lab.cli_json(&["log", "--host", host])
        .ok()
        .and_then(|a| a.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| format!("{} {}", e["action"].as_str().unwrap_or_default(), e["vm"].as_str().unwrap_or_default()))
        .collect()
}

/// The guest's record on `host` (its own host while it waits).
fn record_on(lab: &Lab, name: &str, host: &str) -> Option<Value> {
    lab.vms().into_iter().find(|g| g["name"] == name && g["host_id"] == host)
}

/// Pulls the host's power (its BMC still reads On) and waits past the
/// controller's forced-migration grace.
fn fail_host(lab: &Lab, host: &str) {
    lab.ok(&["host-kill", host]);
    lab.wait(Duration::from_secs(15), "host unreachable", || {
        lab.host(host).is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
}

/// Case 1: two local-disk guests on a host that fails: the forced migration
/// leaves them behind, and they wait, visibly (vms list, hosts show, an
/// alarm naming each, the metric). The host is powered on again: quarantine
/// (MAINTENANCE) starts nothing by itself; an operator starts one with
/// `vms start` (allowed in MAINTENANCE); after cleanup and NOT_ACCEPTING the
/// reconciler starts the other on its own host. Never twice.
#[test]
fn lab_local_disk_guest_waits_while_its_host_is_away_and_runs_there_again() {
    let lab = lab_or_skip!(2, 1);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 2);
    for name in ["vm-alocal", "vm-alocal2"] {
        lab.ok(&["define-guest", "host-a", name, "--local-disk"]);
    }
    lab.wait(Duration::from_secs(15), "local guests managed", || {
        ["vm-alocal", "vm-alocal2"]
            .iter()
            .all(|n| lab.vm(n).is_some_and(|g| g["state"] == "running" && g["autostart"] == false))
    });
    lab.note_running();
    let (a1, local, local2) = (uuid_of(&lab, "vm-a1"), uuid_of(&lab, "vm-alocal"), uuid_of(&lab, "vm-alocal2"));

    fail_host(&lab, "host-a");
    let (code, out, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    println!("exit {code}\n{out}\n{err}");
    assert_eq!(code, 1, "a job that leaves guests behind exits 1:\n{out}\n{err}");
    runs_once_on(&lab, "vm-a1", &a1, "host-b");

    // Waiting, visibly, while host-a is off.
    for name in ["vm-alocal", "vm-alocal2"] {
        let g = record_on(&lab, name, "host-a").unwrap_or_else(|| panic!("{name} listed on host-a"));
        let why = g["waiting_reason"].as_str().unwrap_or_default();
        assert!(why.contains("local") && why.contains("job mig-"), "{name} waits with its reason: {g}");
        assert!(g["waiting_since_unix_ms"].as_i64().unwrap_or(0) > 0, "{g}");
        assert_eq!(g["desired_state"], "running", "{g}");
    }
    let h = lab.host("host-a").unwrap();
    assert_eq!(h["waiting_guests"], 2, "{h}");
    let waiting_alarms: Vec<String> = alarms(&lab)
        .iter()
        .filter(|a| a["kind"] == "guests-waiting")
        .map(|a| a["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    for name in ["vm-alocal", "vm-alocal2"] {
        assert!(
            waiting_alarms.iter().any(|d| d.contains(name) && d.contains("lifeboat vms start")),
            "an alarm names {name}: {waiting_alarms:?}"
        );
    }
    let metrics = String::from_utf8_lossy(&lab.ok(&["metrics"]).stdout).into_owned();
    assert!(
        metrics.contains("lifeboat_guests_waiting{host=\"host-a\"} 2"),
        "{}",
        metrics.lines().filter(|l| l.contains("waiting")).collect::<Vec<_>>().join("\n")
    );
    let (_, table, _) = lab.cli(&["vms", "list"]);
    assert!(table.lines().any(|l| l.contains("vm-alocal ") && l.contains("WAITING")), "{table}");
    // A start on a host that is off is refused, naming the check.
    let (code, _, err) = lab.cli(&["vms", "start", "vm-alocal", "--reason", "lab: too early"]);
    assert_ne!(code, 0);
    assert!(err.contains("OFFLINE") || err.contains("owner connected"), "{err}");

    // host-a powered on: MAINTENANCE, nothing started by itself.
    let t = Instant::now();
    lab.ok(&["bmc-power", "host-a", "on"]);
    lab.wait(Duration::from_secs(90), "host-a back", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
    });
    println!("host-a REACHABLE {:?} after power on", t.elapsed());
    assert_eq!(lab.host("host-a").unwrap()["status"], "MAINTENANCE");
    std::thread::sleep(Duration::from_secs(4));
    for (name, uuid) in [("vm-alocal", &local), ("vm-alocal2", &local2)] {
        assert_eq!(lab.copies(uuid), 0, "{name} is not started in quarantine");
        assert!(record_on(&lab, name, "host-a").is_some_and(|g| g["waiting_reason"] != ""), "{name} still waits");
    }

    // The operator starts one now (MAINTENANCE allows it); checks refuse the wrong ones.
    let (code, _, err) = lab.cli(&["vms", "start", "vm-a1", "--reason", "lab: runs on host-b"]);
    assert_ne!(code, 0, "vm-a1 runs on host-b: {err}");
    assert!(err.contains("not running anywhere") && err.contains("host-b"), "{err}");
    let t = Instant::now();
    let (code, out, err) = lab.cli(&["vms", "start", "vm-alocal2", "--reason", "lab: needed now"]);
    assert_eq!(code, 0, "{out}\n{err}");
    println!("vms start took {:?}", t.elapsed());
    lab.wait(Duration::from_secs(15), "vm-alocal2 running on host-a", || lab.copies(&local2) == 1);
    runs_once_on(&lab, "vm-alocal2", &local2, "host-a");
    lab.wait(Duration::from_secs(15), "vm-alocal2 no longer waits", || {
        record_on(&lab, "vm-alocal2", "host-a").is_some_and(|g| g["waiting_reason"] == "" && g["state"] == "running")
    });
    let (code, _, err) = lab.cli(&["vms", "start", "vm-alocal2", "--reason", "lab: twice"]);
    assert_ne!(code, 0, "a running guest is not started again");
    assert!(err.contains("not running anywhere"), "{err}");

    // Cleanup, then NOT_ACCEPTING: the reconciler starts the other one there.
    let (code, out, err) = lab.cli(&["cleanup", "host-a", "--yes"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(lab.copies(&local), 0, "cleanup starts nothing");
    let (code, out, err) = lab.cli(&["hosts", "set-status", "host-a", "NOT_ACCEPTING", "--reason", "lab: repaired"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let took = lab.wait(Duration::from_secs(30), "vm-alocal running on host-a", || lab.copies(&local) == 1);
    println!("waiting guest started {took:?} after NOT_ACCEPTING");
    runs_once_on(&lab, "vm-alocal", &local, "host-a");
    lab.wait(Duration::from_secs(15), "vm-alocal no longer waits, alarm cleared", || {
        record_on(&lab, "vm-alocal", "host-a").is_some_and(|g| g["waiting_reason"] == "")
            && !alarms(&lab).iter().any(|a| a["kind"] == "guests-waiting")
    });
    assert_eq!(lab.host("host-a").unwrap()["waiting_guests"], 0);
    runs_once_on(&lab, "vm-a1", &a1, "host-b");
    let actions = audit_actions(&lab, "host-a");
    for a in [
        "guest.start_requested vm-alocal2",
        "guest.waiting_start vm-alocal",
        "guest.waiting_ended vm-alocal",
        "alarm.cleared ",
    ] {
        assert!(actions.iter().any(|x| x.starts_with(a)), "{a} in {actions:?}");
    }
    lab.assert_never_two();
}

/// The `lifeboat move ...` commands a job's error advises.
fn advised_moves(error: &str) -> Vec<Vec<String>> {
    error
        .split('`')
        .filter(|s| s.starts_with("lifeboat move "))
        .map(|s| s.split_whitespace().skip(1).map(String::from).collect())
        .collect()
}

/// Case 2: the source of a forced migration is powered on in the middle of the
/// job (a target's agent is held back so the job cannot finish first): the
/// remaining moves fail ("talking again"), the job is PARTIAL naming each,
/// and its advice is a planned move per target, never "re-run". Carrying
/// out that advice leaves every guest running exactly once, and started
/// (their desired state is running).
#[test]
fn lab_source_powered_on_mid_job_ends_partial_and_the_advice_runs_every_guest_once() {
    let lab = lab_or_skip!(2, 5);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 10);
    let names: Vec<String> = (1..=5).map(|i| format!("vm-a{i}")).collect();
    let uuids: Vec<String> = names.iter().map(|n| uuid_of(&lab, n)).collect();

    fail_host(&lab, "host-a");
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let job =
            s.spawn(|| lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--parallel", "1", "--yes"]));
        // After the first guest runs on host-b, hold host-b's agent back: the
        // next move waits for its session (up to 60 s) while host-a returns.
        lab.wait(Duration::from_secs(60), "the first move done", || {
            lab.cli_json(&["jobs", "list"])
                .ok()
                .and_then(|j| j.as_array().cloned())
                .unwrap_or_default()
                .first()
                .is_some_and(|j| j["moves"].as_array().is_some_and(|m| m.iter().any(|m| m["state"] == "RUNNING")))
        });
        lab.ok(&["agent-stop", "host-b"]);
        println!("first move done, host-b's agent stopped, {:?} into the job", t0.elapsed());
        let t = Instant::now();
        lab.ok(&["bmc-power", "host-a", "on"]);
        lab.wait(Duration::from_secs(45), "host-a back mid-job", || {
            lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
        });
        println!("host-a REACHABLE {:?} after power on", t.elapsed());
        lab.ok(&["agent-start", "host-b"]);
        let (code, out, err) = job.join().expect("migrate thread");
        println!("migrate exit {code} after {:?}\n{out}\n{err}", t0.elapsed());
        assert_eq!(code, 1, "PARTIAL exits 1:\n{out}\n{err}");
    });
    let jobs = lab.cli_json(&["jobs", "list"]).unwrap();
    let job = &jobs[0];
    assert_eq!(job["state"], "PARTIAL", "{job}");
    let error = job["error"].as_str().unwrap();
    println!("job error: {error}");
    assert!(error.starts_with("host-a is talking to the controller again"), "{error}");
    assert!(!error.contains("re-run"), "never advise a re-run while the source talks: {error}");
    let moves = job["moves"].as_array().unwrap();
    let left: Vec<&str> =
        moves.iter().filter(|m| m["state"] != "RUNNING").map(|m| m["name"].as_str().unwrap()).collect();
    assert!(!left.is_empty() && left.len() < 5, "some moved, some left: {job}");
    for n in &left {
        assert!(error.contains(n), "the error names {n}: {error}");
    }
    let advice = advised_moves(error);
    assert!(!advice.is_empty(), "a planned move is advised: {error}");
    let advised: Vec<&String> =
        advice.iter().flat_map(|a| a.windows(2).filter(|w| w[0] == "--vm").map(|w| &w[1])).collect();
    for n in &left {
        assert!(advised.iter().any(|a| a == n), "{n} is in the advised commands: {advice:?}");
    }
    // The guests left behind are stopped on host-a (it rebooted), none twice.
    for (n, u) in names.iter().zip(&uuids) {
        assert!(lab.copies(u) <= 1, "{n}");
    }

    // The documented next step, exactly as advised.
    for cmd in &advice {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let t = Instant::now();
        let (code, out, err) = lab.cli(&args);
        println!("lifeboat {} -> exit {code} in {:?}\n{out}\n{err}", args.join(" "), t.elapsed());
        assert_eq!(code, 0, "the advised command works: {out}\n{err}");
    }
    let jobs = lab.cli_json(&["jobs", "list"]).unwrap();
    let follow_up = &jobs[0];
    assert_eq!(follow_up["kind"], "move", "{follow_up}");
    assert!(
        follow_up["moves"].as_array().unwrap().iter().all(|m| m["state"] == "RUNNING"),
        "every guest the advised move carried is started (desired state running), none DEFINED_STOPPED: {follow_up}"
    );
    for (n, u) in names.iter().zip(&uuids) {
        lab.wait(Duration::from_secs(20), &format!("{n} running once"), || lab.copies(u) == 1);
        runs_once_on(&lab, n, u, "host-b");
        let g = record_on(&lab, n, "host-b").unwrap_or_else(|| panic!("{n} on host-b"));
        assert_eq!(g["state"], "running", "{n} started, not DEFINED_STOPPED: {g}");
        assert_eq!(g["waiting_reason"], "", "{g}");
    }
    assert!(!alarms(&lab).iter().any(|a| a["kind"] == "guests-waiting"), "no guest waits any more");
    lab.assert_never_two();
}
