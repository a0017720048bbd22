//! The failed host can never run a moved guest again: the start guard
//! (libvirt qemu hook + leases), quarantine on return, split-brain alarm,
//! cleanup, host statuses, and Lifeboat replacing libvirt autostart.
//! Lab: real libvirtd, qemu guests and Redfish BMCs. Needs root.

use std::time::Duration;

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

fn settle(lab: &Lab, n: usize) {
    // Every guest running and taken over by Lifeboat (autostart switched off).
    lab.wait(Duration::from_secs(30), "guests running and managed", || {
        let v = lab.vms();
        v.len() == n
            && v.iter().all(|g| g["state"] == "running" && g["autostart"] == false && g["desired_state"] == "running")
    });
}

fn fail_and_migrate(lab: &Lab, host: &str) {
    lab.ok(&["host-kill", host]);
    lab.wait(Duration::from_secs(15), "unreachable", || lab.host(host).is_some_and(|h| h["liveness"] == "UNREACHABLE"));
    std::thread::sleep(Duration::from_millis(5500));
    let (code, out, err) = lab.cli(&["migrate", "--force", "--from", host, "--fence", "--yes"]);
    // The local-disk guest stays behind: the job ends PARTIAL, exit 1.
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("vm-alocal: NOT_MOVED"), "{out}\n{err}");
}

fn moved_from(lab: &Lab, host: &str) -> Vec<(String, String)> {
    let prefix = format!("vm-{}", &host[5..6]);
    lab.vms()
        .into_iter()
        .filter(|g| g["host_id"] != host && g["name"].as_str().unwrap().starts_with(&prefix))
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["uuid"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn lab_returning_host_is_quarantined_guarded_and_cleaned_up() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 6);
    lab.ok(&["define-guest", "host-a", "vm-alocal", "--local-disk"]);
    lab.wait(Duration::from_secs(10), "local guest managed", || {
        lab.vm("vm-alocal").is_some_and(|g| g["state"] == "running" && g["autostart"] == false)
    });
    // It must run once at the end again, or wait with a reason (end-of-test check).
    lab.note_running();
    fail_and_migrate(&lab, "host-a");
    let moved = moved_from(&lab, "host-a");
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert_eq!(lab.host("host-a").unwrap()["status"], "OFFLINE");

    // Power host-a back on through its BMC: libvirt autostart fires at boot
    // (fresh run dir), and the start guard refuses every moved guest.
    lab.ok(&["bmc-power", "host-a", "on"]);
    lab.wait(Duration::from_secs(60), "host-a back", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
    });
    let h = lab.host("host-a").unwrap();
    assert_eq!(h["status"], "MAINTENANCE", "{h}");
    assert_eq!(h["stale_definitions"], 2, "{h}");
    std::thread::sleep(Duration::from_secs(3));
    for (name, uuid) in &moved {
        let st = lab.virsh("host-a", &["domstate", name]);
        assert_eq!(st.trim(), "shut off", "{name} must not run on host-a");
        assert_eq!(lab.copies(uuid), 1, "{name} runs once, elsewhere");
        let o = lab.run(&["virsh", "host-a", "start", name]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "virsh start {name} on host-a must fail");
        assert!(err.contains("Lifeboat start guard"), "{err}");
    }
    // The guest that could not move (local disk) is not started by Lifeboat either: quarantine.
    assert_eq!(lab.virsh("host-a", &["domstate", "vm-alocal"]).trim(), "shut off");

    // Back into service only after cleanup.
    let (code, _, err) = lab.cli(&["hosts", "set-status", "host-a", "AVAILABLE"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("cleanup"), "{err}");
    let (code, out, _) = lab.cli(&["cleanup", "host-a", "--plan"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("remove") && !out.contains("vm-alocal ("), "only move records are named: {out}");
    let disks_before: Vec<_> = moved.iter().map(|(n, _)| lab.path("SHARED_DIR").join(format!("{n}.img"))).collect();
    let (code, out, err) = lab.cli(&["cleanup", "host-a", "--yes"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let defined = lab.defined("host-a");
    for (name, uuid) in &moved {
        assert!(!defined.contains(name), "{name} undefined on host-a: {defined:?}");
        assert_eq!(lab.copies(uuid), 1);
        let g: Vec<Value> = lab.vms().into_iter().filter(|g| g["uuid"] == uuid.as_str()).collect();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0]["state"], "running", "still running on its new host");
    }
    assert!(defined.contains(&"vm-alocal".to_string()), "other guests stay");
    for d in &disks_before {
        assert!(d.exists(), "{} untouched", d.display());
    }
    // A second cleanup is a no-op.
    let (code, out, _) = lab.cli(&["cleanup", "host-a", "--yes"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing to clean"), "{out}");
    // The runbook: NOT_ACCEPTING, then AVAILABLE.
    let (code, out, err) =
        lab.cli(&["hosts", "set-status", "host-a", "NOT_ACCEPTING", "--reason", "repaired, testing"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = lab.cli(&["hosts", "set-status", "host-a", "AVAILABLE", "--reason", "tested"]);
    assert_eq!(code, 0, "{out}{err}");
    // The guest that could not move waited for host-a: back in service, it runs there again, once.
    let alocal = lab
        .vms()
        .into_iter()
        .find(|g| g["name"] == "vm-alocal")
        .and_then(|g| g["uuid"].as_str().map(String::from))
        .unwrap();
    let took = lab.wait(Duration::from_secs(20), "vm-alocal running on host-a again", || lab.copies(&alocal) == 1);
    println!("vm-alocal started on host-a {took:?} after it was back in service");
    let c = lab.running_copies(&alocal);
    assert!(c.len() == 1 && c[0].host == "host-a", "{c:?}");
    let actions: Vec<String> = lab
        .cli_json(&["log", "--host", "host-a"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for a in ["host.returned", "cleanup.removed", "host.status"] {
        assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
    }
}

#[test]
fn lab_split_brain_agent_outage_reboot_and_bad_input() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 6);

    // The agent stopped on a healthy host: after the TTL the guard refuses
    // starts of managed guests; with the agent back, starts work again.
    lab.virsh("host-b", &["destroy", "vm-b1"]);
    lab.ok(&["agent-stop", "host-b"]);
    std::thread::sleep(Duration::from_secs(5));
    let o = lab.run(&["virsh", "host-b", "start", "vm-b1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("Lifeboat start guard") && err.contains("expired"), "{err}");
    lab.ok(&["agent-start", "host-b"]);
    lab.wait(Duration::from_secs(20), "virsh start works again", || {
        lab.run(&["virsh", "host-b", "start", "vm-b1"]).status.success()
    });

    // A normal reboot: Lifeboat (not libvirt autostart) starts what should run.
    lab.wait(Duration::from_secs(10), "vm-b1 running", || lab.vm("vm-b1").is_some_and(|g| g["state"] == "running"));
    lab.excuse("vm-c2", "destroyed on purpose: a stopped guest stays stopped across a reboot");
    lab.virsh("host-c", &["destroy", "vm-c2"]);
    lab.wait(Duration::from_secs(10), "vm-c2 desired stopped", || {
        lab.vm("vm-c2").is_some_and(|g| g["desired_state"] == "stopped")
    });
    lab.ok(&["host-kill", "host-c"]);
    lab.ok(&["host-boot", "host-c"]);
    lab.wait(Duration::from_secs(40), "vm-c1 running again", || {
        lab.host("host-c").is_some_and(|h| h["liveness"] == "REACHABLE")
            && lab.vm("vm-c1").is_some_and(|g| g["state"] == "running")
    });
    assert_eq!(lab.vm("vm-c2").unwrap()["state"], "shutoff", "a guest that was stopped stays stopped");
    let log = lab.cli_json(&["log", "--host", "host-c"]).unwrap();
    assert!(log.as_array().unwrap().iter().any(|e| e["action"] == "guest.boot_start" && e["vm"] == "vm-c1"), "{log}");
    assert_eq!(lab.vm("vm-c1").unwrap()["autostart"], false, "not libvirt autostart");

    // Split brain: host-a is cut off but alive, its BMC unreachable, and an
    // operator wrongly attests it is off. When the partition heals, host-a
    // returns with the same boot id: alarm, and no moved guest runs on it.
    lab.ok(&["host-partition", "host-a"]);
    lab.ok(&["bmc-stop", "host-a"]);
    lab.wait(Duration::from_secs(15), "host-a unreachable", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
    // The wrong attestation makes host-a's guests run twice ON PURPOSE until
    // the partition heals and Lifeboat stops host-a's copies.
    let doubled: Vec<String> = lab
        .vms()
        .iter()
        .filter(|g| g["host_id"] == "host-a")
        .map(|g| g["uuid"].as_str().unwrap().to_string())
        .collect();
    for uuid in &doubled {
        lab.allow_two(uuid, Duration::from_secs(60));
    }
    let (code, out, err) = lab.cli(&[
        "migrate",
        "--force",
        "--from",
        "host-a",
        "--attest-powered-off",
        "--reason",
        "looked dead (wrongly)",
        "--yes",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let moved = moved_from(&lab, "host-a");
    lab.ok(&["host-heal", "host-a"]);
    lab.wait(Duration::from_secs(20), "split-brain alarm", || {
        lab.cli_json(&["alarms"])
            .is_ok_and(|a| a.as_array().unwrap().iter().any(|x| x["kind"] == "split-brain" && x["host"] == "host-a"))
    });
    lab.wait(Duration::from_secs(20), "moved guests stopped on host-a", || {
        moved
            .iter()
            .all(|(name, uuid)| lab.virsh("host-a", &["domstate", name]).trim() == "shut off" && lab.copies(uuid) == 1)
    });
    for uuid in &doubled {
        let seen = lab.end_allowance(uuid);
        println!(
            "the wrongly attested double run of {uuid}: seen in {} sample(s) ({:?} .. {:?})",
            seen.samples, seen.first, seen.last
        );
    }
    let metrics = String::from_utf8_lossy(&lab.ok(&["metrics"]).stdout).into_owned();
    assert!(metrics.contains("lifeboat_alarms_active{host=\"host-a\",kind=\"split-brain\"} 1"), "{metrics}");
    let h = lab.host("host-a").unwrap();
    assert_eq!(h["status"], "MAINTENANCE");
    assert!(h["alarms"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().contains("split-brain")), "{h}");
    lab.ok(&["bmc-start", "host-a"]);

    // Bad input.
    let (code, _, err) = lab.cli(&["hosts", "set-status", "host-zz", "AVAILABLE"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = lab.cli(&["hosts", "set-status", "host-b", "BROKEN"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown host status 'BROKEN'"), "{err}");
    let (code, out, err) = lab.cli(&["cleanup", "host-b", "--yes"]);
    assert_eq!(code, 6, "{out}{err}");
    assert!(err.contains("no move records"), "{err}");
    let o = std::process::Command::new(lab.path("LIFEBOAT_BIN_DIR").join("lifeboat-agent"))
        .args(["--config", lab.path("HOST_B_AGENT_CONFIG").to_str().unwrap(), "guard", "vm-b1", "explode", "now"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected 4 arguments"));
    let (code, _, err) = lab.cli_as("viewer", &["cleanup", "host-a", "--yes"]);
    assert_eq!(code, 4, "{err}");
}
