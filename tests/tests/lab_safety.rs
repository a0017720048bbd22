//! The lab as an adversary: things that go wrong around Lifeboat (an
//! impostor agent, a guest started by hand on a second host, an old backup
//! restored, a host returning) and that must never end with one guest
//! running twice. Every test runs with the lab's copies checker on (it
//! samples every qemu process of every host every 200 ms) and asserts it.
//! Real libvirtd, qemu guests and Redfish BMCs. Needs root.

use std::time::{Duration, Instant};

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

/// Every guest running, managed by Lifeboat (libvirt autostart switched off).
fn settle(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(30), "guests running and managed", || {
        let v = lab.vms();
        v.len() == n
            && v.iter().all(|g| g["state"] == "running" && g["autostart"] == false && g["desired_state"] == "running")
    });
}

/// (name, uuid) of the guests the lab defined on `host` (`vm-a1`, ... on host-a).
fn lab_guests_of(lab: &Lab, host: &str) -> Vec<(String, String)> {
    let prefix = format!("vm-{}", &host[5..6]);
    let mut v: Vec<(String, String)> = lab
        .vms()
        .into_iter()
        .filter(|g| g["host_id"] == host && g["name"].as_str().is_some_and(|n| n.starts_with(&prefix)))
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["uuid"].as_str().unwrap().to_string()))
        .collect();
    v.sort();
    v
}

fn alarms(lab: &Lab) -> Vec<Value> {
    lab.cli_json(&["alarms"]).ok().and_then(|a| a.as_array().cloned()).unwrap_or_default()
}

fn audit(lab: &Lab) -> Vec<Value> {
    lab.cli_json(&["log"]).ok().and_then(|a| a.as_array().cloned()).unwrap_or_default()
}

/// The single running copy of guest `name` must be on `host` (from /proc).
fn runs_once_on(lab: &Lab, name: &str, uuid: &str, host: &str) {
    let c = lab.running_copies(uuid);
    assert!(c.len() == 1 && c[0].host == host, "{name} ({uuid}) must run exactly once, on {host}; it runs {c:?}");
}

/// Pulls the host's power (a crash: its BMC still reads On) and waits past
/// the controller's forced-migration grace.
fn fail_host(lab: &Lab, host: &str) {
    lab.ok(&["host-kill", host]);
    lab.wait(Duration::from_secs(15), "host unreachable", || {
        lab.host(host).is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
}

fn force_migrate_fenced(lab: &Lab, host: &str) {
    let t = Instant::now();
    let (code, out, err) = lab.cli(&["migrate", "--force", "--from", host, "--fence", "--yes"]);
    println!("migrate --force --from {host} --fence took {:?}", t.elapsed());
    assert_eq!(code, 0, "{out}\n{err}");
}

/// a. A second agent with host-a's certificate and config, from host-b's
/// network: the controller names both peers in a `duplicate-agent` alarm,
/// no guest is touched, and once the impostor is gone the real host-a is
/// REACHABLE again within 5 s.
#[test]
fn lab_impostor_agent_alarms_and_the_real_host_is_back_at_once() {
    let lab = lab_or_skip!(2, 1);
    settle(&lab, 2);
    let guests: Vec<(String, String)> =
        lab.vms().iter().map(|g| (g["name"].as_str().unwrap().into(), g["uuid"].as_str().unwrap().into())).collect();
    let (a_ip, b_ip) = (lab.paths["HOST_A_IP"].clone(), lab.paths["HOST_B_IP"].clone());

    lab.ok(&["agent-impostor", "host-a", "host-b", "start"]);
    let t = Instant::now();
    let took = lab.wait(Duration::from_secs(10), "a duplicate-agent alarm naming both peers", || {
        alarms(&lab).iter().any(|a| {
            let d = a["detail"].as_str().unwrap_or_default();
            a["kind"] == "duplicate-agent" && a["host"] == "host-a" && d.contains(&a_ip) && d.contains(&b_ip)
        })
    });
    println!("duplicate-agent alarm {took:?} after the impostor started");
    // Let the impostor keep trying (reconnects, inventories) for a while.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(t.elapsed()));
    lab.ok(&["agent-impostor", "host-a", "host-b", "stop"]);

    let took = lab.wait(Duration::from_secs(10), "host-a REACHABLE after the impostor left", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
    });
    println!("host-a REACHABLE {took:?} after the impostor stopped");
    assert!(took <= Duration::from_secs(5), "host-a back only after {took:?}");
    // It is the real agent that is heard: still REACHABLE past the unreachable threshold (3 s).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        let h = lab.host("host-a").unwrap();
        assert_eq!(h["liveness"], "REACHABLE", "host-a must stay reachable through its real agent: {h}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(lab.host("host-b").unwrap()["liveness"], "REACHABLE");
    for (name, uuid) in &guests {
        let host = format!("host-{}", &name[3..4]);
        runs_once_on(&lab, name, uuid, &host);
    }
    lab.assert_never_two();
}

/// b. host-a's running guest, defined by hand from its exact XML on host-b
/// and started there with virsh (no Lifeboat): a `split-brain` alarm at once
/// naming the UUID and both hosts, no lease for host-b, and the copy on
/// host-b stopped, host-a's untouched.
#[test]
fn lab_guest_started_by_hand_on_a_second_host_is_stopped_there() {
    let lab = lab_or_skip!(2, 1);
    settle(&lab, 2);
    let uuid = lab.vm("vm-a1").unwrap()["uuid"].as_str().unwrap().to_string();
    let before = lab.running_copies(&uuid);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].host, "host-a");
    let xml = lab.path("LAB_DIR").join("xml/vm-a1.xml");
    lab.virsh("host-b", &["define", xml.to_str().unwrap()]);

    // The 3 s below is the reconciler's, not the startup grace's.
    lab.past_startup_grace();
    lab.allow_two(&uuid, Duration::from_secs(15));
    let t = Instant::now();
    let o = lab.run(&["virsh", "host-b", "start", "vm-a1"]);
    assert!(o.status.success(), "virsh start vm-a1 on host-b: {}", String::from_utf8_lossy(&o.stderr));
    let started = t.elapsed();
    let took = lab.wait(Duration::from_secs(10), "a split-brain alarm naming the UUID and both hosts", || {
        alarms(&lab).iter().any(|a| {
            let d = a["detail"].as_str().unwrap_or_default();
            a["kind"] == "split-brain" && d.contains(&uuid) && d.contains("host-a") && d.contains("host-b")
        })
    });
    println!("virsh start took {started:?}; split-brain alarm {took:?} after it was issued");
    assert!(took <= Duration::from_secs(3), "alarm only after {took:?}");
    lab.wait(Duration::from_secs(15), "the copy on host-b stopped", || {
        lab.virsh("host-b", &["domstate", "vm-a1"]).trim() == "shut off"
    });
    let stopped = t.elapsed();
    let seen = lab.end_allowance(&uuid);
    println!(
        "the copy on host-b shut off {stopped:?} after virsh start was issued; the checker saw two copies in {} sample(s) ({:?} .. {:?} since the lab came up)",
        seen.samples, seen.first, seen.last
    );
    let after = lab.running_copies(&uuid);
    assert_eq!(after, before, "host-a's copy untouched (same process)");
    let lease = lab.path("HOST_B_AGENT_STATE_DIR").join(format!("leases/{uuid}.lease"));
    assert!(!lease.exists(), "host-b must get no lease for vm-a1: {}", lease.display());
    let a1: Vec<Value> =
        lab.vms().into_iter().filter(|g| g["uuid"] == uuid.as_str() && g["state"] == "running").collect();
    assert_eq!(a1.len(), 1, "{a1:?}");
    assert_eq!(a1[0]["host_id"], "host-a");
    lab.assert_never_two();
}

/// c. An older backup restored after a forced migration: the store says
/// host-a owns guests that now run on host-b. Powered back on through its
/// BMC, host-a must not start them: an alarm says the store is older than
/// what the hosts report, and the guests stay on host-b, once.
#[test]
fn lab_restored_older_backup_runs_no_guest_twice() {
    let lab = lab_or_skip!(2, 2);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 4);
    let moved = lab_guests_of(&lab, "host-a");
    assert_eq!(moved.len(), 2, "{moved:?}");
    let ctl = lab.path("LIFEBOAT_BIN_DIR").join("lifeboat-controller");
    let config = lab.path("CONTROLLER_CONFIG");
    let backup = lab.path("LAB_DIR").join("backup-before-move.db");
    let o = std::process::Command::new(&ctl)
        .args(["--config", config.to_str().unwrap(), "backup", "--out", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "backup: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    fail_host(&lab, "host-a");
    force_migrate_fenced(&lab, "host-a");
    for (name, uuid) in &moved {
        runs_once_on(&lab, name, uuid, "host-b");
    }

    lab.ok(&["controller-stop"]);
    let o = std::process::Command::new(&ctl)
        .args(["--config", config.to_str().unwrap(), "restore", "--from", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "restore: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    lab.ok(&["controller-start"]);
    let t = Instant::now();
    lab.ok(&["bmc-power", "host-a", "on"]);
    lab.wait(Duration::from_secs(60), "host-a back", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
    });
    println!("host-a REACHABLE {:?} after the power-on request", t.elapsed());
    let older = |a: &Value| {
        let d = a["detail"].as_str().unwrap_or_default().to_lowercase();
        let k = a["kind"].as_str().unwrap_or_default();
        d.contains("older") || k.contains("store") || k.contains("restore") || k.contains("backup")
    };
    let took = lab.wait(Duration::from_secs(20), "an alarm that the store is older than the hosts' reports", || {
        alarms(&lab).iter().any(older)
    });
    println!(
        "store-older alarm {took:?} after host-a was back: {:?}",
        alarms(&lab).into_iter().filter(|a| older(a)).collect::<Vec<_>>()
    );
    // Give the controller time to act on its old view (boot starts, lease renewals).
    std::thread::sleep(Duration::from_secs(5));
    for (name, uuid) in &moved {
        runs_once_on(&lab, name, uuid, "host-b");
        assert_eq!(lab.virsh("host-a", &["domstate", name]).trim(), "shut off", "{name} must not run on host-a");
        assert!(
            lab.vms().iter().any(|g| g["uuid"] == uuid.as_str() && g["host_id"] == "host-b" && g["state"] == "running"),
            "{name} stays on host-b: {:?}",
            lab.vms()
        );
    }
    lab.assert_never_two();
}

/// d. After a forced migration and host-a's return (and an operator trying
/// `virsh start` there), no alarm claims a stale copy runs and nothing was
/// stopped as one: none of the moved guests runs on host-a.
#[test]
fn lab_returning_host_raises_no_false_stale_copy_alarm() {
    let lab = lab_or_skip!(2, 2);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 4);
    let moved = lab_guests_of(&lab, "host-a");
    fail_host(&lab, "host-a");
    force_migrate_fenced(&lab, "host-a");
    lab.ok(&["bmc-power", "host-a", "on"]);
    lab.wait(Duration::from_secs(60), "host-a back with its stale definitions reported", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE" && h["stale_definitions"] == 2)
    });
    for (name, _) in &moved {
        let o = lab.run(&["virsh", "host-a", "start", name]);
        assert!(!o.status.success(), "virsh start {name} on host-a must be refused");
    }
    // Lease renewals and inventory passes come every ~1.3 s: watch a few.
    std::thread::sleep(Duration::from_secs(4));
    for (name, uuid) in &moved {
        runs_once_on(&lab, name, uuid, "host-b");
        assert_eq!(lab.virsh("host-a", &["domstate", name]).trim(), "shut off");
    }
    let stale: Vec<Value> = alarms(&lab).into_iter().filter(|a| a["kind"] == "stale-copy-running").collect();
    assert!(stale.is_empty(), "no stale copy runs, yet: {stale:?}");
    let stopped: Vec<Value> = audit(&lab).into_iter().filter(|e| e["action"] == "guest.stopped_stale").collect();
    assert!(stopped.is_empty(), "nothing was stopped as a stale copy, yet: {stopped:?}");
    lab.assert_never_two();
}

/// e. A forced migration that leaves a local-disk guest behind ends PARTIAL,
/// exit code 1, and names the guest and why.
#[test]
fn lab_job_leaving_a_local_disk_guest_behind_is_partial() {
    let lab = lab_or_skip!(2, 1);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 2);
    lab.ok(&["define-guest", "host-a", "vm-alocal", "--local-disk"]);
    lab.wait(Duration::from_secs(10), "local guest managed", || {
        lab.vm("vm-alocal").is_some_and(|g| g["state"] == "running" && g["autostart"] == false)
    });
    // It must run once at the end again, or wait with a reason (end-of-test check).
    lab.note_running();
    // The same path exists on host-b, as another file: seeing the path proves
    // nothing, the guest would boot from the wrong disk there.
    let impostor_disk = lab.path("HOST_B_LOCAL_DISK_DIR").join("vm-alocal.img");
    std::fs::create_dir_all(impostor_disk.parent().unwrap()).unwrap();
    std::fs::write(&impostor_disk, vec![0u8; 4096]).unwrap();
    let a1 = lab.vm("vm-a1").unwrap()["uuid"].as_str().unwrap().to_string();
    // A crash with the BMC unreachable: the operator attests the power is off.
    lab.ok(&["bmc-stop", "host-a"]);
    fail_host(&lab, "host-a");
    let (code, out, err) = lab.cli(&[
        "migrate",
        "--force",
        "--from",
        "host-a",
        "--attest-powered-off",
        "--reason",
        "lab: power cut, BMC unreachable",
        "--yes",
    ]);
    println!("exit {code}\n{out}\n{err}");
    assert_eq!(code, 1, "a job that leaves a guest behind exits 1:\n{out}\n{err}");
    let text = format!("{out}{err}");
    assert!(text.contains("PARTIAL") && text.contains("vm-alocal") && text.contains("local"), "{text}");
    let jobs = lab.cli_json(&["jobs", "list"]).unwrap();
    assert_eq!(jobs[0]["state"], "PARTIAL", "{jobs}");
    let (code, job) = lab.cli_json_exit(&["jobs", "show", jobs[0]["id"].as_str().unwrap()]).unwrap();
    assert_eq!(code, 1, "jobs show of a PARTIAL job exits 1 like migrate did: {job}");
    let left: Vec<&Value> = job["moves"].as_array().unwrap().iter().filter(|m| m["name"] == "vm-alocal").collect();
    assert_eq!(left.len(), 1, "the job lists the guest it left behind: {job}");
    assert_ne!(left[0]["state"], "RUNNING", "{job}");
    assert!(left[0].to_string().contains("local"), "with its reason: {job}");
    assert!(
        left[0]["error"].as_str().is_some_and(|e| e.contains("host-b: local:")),
        "host-b's file at that path is not the disk: {job}"
    );
    runs_once_on(&lab, "vm-a1", &a1, "host-b");
    lab.ok(&["bmc-start", "host-a"]);
    lab.assert_never_two();
}

/// f. The start guard fails closed: on a host enrolled in Lifeboat, a lease
/// directory that is gone (lost, not mounted) or a lease that cannot be read
/// (here: a directory where the file should be) refuses every start of the
/// guest, instead of reading as "not managed here".
#[test]
fn lab_start_guard_refuses_when_lease_state_cannot_be_read() {
    let lab = lab_or_skip!(1, 1);
    settle(&lab, 1);
    let uuid = lab.vm("vm-a1").unwrap()["uuid"].as_str().unwrap().to_string();
    let leases = lab.path("HOST_A_AGENT_STATE_DIR").join("leases");
    assert!(leases.join(format!("{uuid}.lease")).exists(), "vm-a1 is leased on host-a");
    // No renewal may rewrite the lease state meanwhile: the agent is stopped
    // (its guests keep running), and vm-a1 is shut down by hand.
    lab.ok(&["agent-stop", "host-a"]);
    lab.virsh("host-a", &["destroy", "vm-a1"]);
    let start = |lab: &Lab| {
        let o = lab.run(&["virsh", "host-a", "start", "vm-a1"]);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let saved = lab.path("HOST_A_AGENT_STATE_DIR").join("leases.saved");
    std::fs::rename(&leases, &saved).unwrap();
    let (ok, err) = start(&lab);
    assert!(!ok, "an enrolled host without its lease directory must refuse: {err}");
    assert!(err.contains("Lifeboat start guard") && err.contains("lease directory"), "{err}");
    std::fs::rename(&saved, &leases).unwrap();
    let file = leases.join(format!("{uuid}.lease"));
    let kept = leases.join("kept.json");
    std::fs::rename(&file, &kept).unwrap();
    std::fs::create_dir(&file).unwrap();
    let (ok, err) = start(&lab);
    assert!(!ok, "an unreadable lease must refuse: {err}");
    assert!(err.contains("cannot read Lifeboat's lease state"), "{err}");
    std::fs::remove_dir(&file).unwrap();
    std::fs::rename(&kept, &file).unwrap();
    // With its lease state back (and renewed by the agent), the start passes.
    lab.ok(&["agent-start", "host-a"]);
    lab.wait(Duration::from_secs(15), "vm-a1 startable again", || start(&lab).0);
    runs_once_on(&lab, "vm-a1", &uuid, "host-a");
    lab.assert_never_two();
}

/// g. A host declared OFFLINE by hand (`hosts set-status OFFLINE`, with an
/// operator's attestation) while it was only cut off: when it talks again
/// with the boot id it had, it never lost power. Like after a forced
/// migration, the controller must recognise that (split-brain alarm,
/// MAINTENANCE), which needs the boot id recorded when it was declared.
#[test]
fn lab_host_declared_offline_by_hand_that_never_powered_off_is_flagged() {
    let lab = lab_or_skip!(2, 1);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 2);
    // Its BMC cannot be reached either: only an attestation can declare it.
    lab.ok(&["bmc-stop", "host-a"]);
    lab.ok(&["host-partition", "host-a"]);
    lab.wait(Duration::from_secs(15), "host-a unreachable", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
    let (code, out, err) = lab.cli(&[
        "hosts",
        "set-status",
        "host-a",
        "OFFLINE",
        "--attest-powered-off",
        "--reason",
        "lab: operator believes host-a is off",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    lab.ok(&["bmc-start", "host-a"]);
    lab.ok(&["host-heal", "host-a"]);
    // Back when its agent has a new session (heartbeats the old stream held
    // through the partition may arrive first, and are not a return).
    lab.wait(Duration::from_secs(20), "host-a back", || {
        lab.host("host-a").is_some_and(|h| h["session_open"] == true && h["liveness"] == "REACHABLE")
    });
    let h = lab.host("host-a").unwrap();
    assert_eq!(h["status"], "MAINTENANCE", "{h}");
    lab.wait(Duration::from_secs(5), "split-brain alarm", || {
        alarms(&lab).iter().any(|a| a["host"] == "host-a" && a["kind"] == "split-brain")
    });
    lab.assert_never_two();
}
