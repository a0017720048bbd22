//! Issue 13, item 2: the controller never forgets a definition. An
//! operator's `virsh undefine` of a managed guest (shut off) on its owner
//! leaves it MISSING in `lifeboat vms show`, alarmed and audited, with its
//! last definition kept; `lifeboat vms restore --start` defines it again on
//! its owner and runs it, once. A host that comes back without a guest
//! (undefined while its agent was down) is the same; that guest is restored
//! on another host (`--to`). Real libvirtd and qemu, the copies checker on
//! throughout. Every guest running at the start runs once at the end. Needs root.

use std::time::{Duration, Instant};

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

fn settle(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(30), "guests running and managed", || {
        let v = lab.vms();
        v.len() == n
            && v.iter().all(|g| g["state"] == "running" && g["autostart"] == false && g["desired_state"] == "running")
    });
}

fn list(lab: &Lab, args: &[&str]) -> Vec<Value> {
    lab.cli_json(args).ok().and_then(|a| a.as_array().cloned()).unwrap_or_default()
}

fn shown(lab: &Lab, name: &str) -> Option<Value> {
    list(lab, &["vms", "show", name]).into_iter().next()
}

fn missing_alarms(lab: &Lab, name: &str) -> usize {
    list(lab, &["alarms"])
        .iter()
        .filter(|a| {
            a["kind"] == "guest-missing"
                && a["host"] == "host-a"
                && a["detail"].as_str().is_some_and(|d| d.contains(name))
        })
        .count()
}

#[test]
fn lab_an_undefined_managed_guest_is_kept_missing_and_restored_on_its_owner() {
    let lab = lab_or_skip!(2, 1);
    settle(&lab, 2);
    let g = lab.vm("vm-a1").expect("vm-a1 listed");
    let uuid = g["uuid"].as_str().unwrap().to_string();
    assert_eq!(g["host_id"], "host-a");

    // The operator shuts it off and undefines it by hand.
    lab.virsh("host-a", &["destroy", "vm-a1"]);
    lab.wait(Duration::from_secs(10), "vm-a1 shut off, desired stopped", || {
        lab.vm("vm-a1").is_some_and(|v| v["state"] == "shutoff" && v["desired_state"] == "stopped")
    });
    lab.virsh("host-a", &["undefine", "vm-a1"]);
    let t = Instant::now();
    let took = lab.wait(Duration::from_secs(10), "vm-a1 shown MISSING", || {
        shown(&lab, "vm-a1").is_some_and(|v| v["missing"] == true)
    });
    println!("vm-a1 shown missing {took:?} after virsh undefine");
    assert!(!lab.defined("host-a").contains(&"vm-a1".to_string()), "libvirt on host-a no longer has it");
    let v = shown(&lab, "vm-a1").unwrap();
    assert_eq!((v["host_id"].as_str(), v["owner_host"].as_str()), (Some("host-a"), Some("host-a")));
    assert!(v["missing_since_unix_ms"].as_i64().unwrap_or(0) > 0);
    lab.wait(Duration::from_secs(5), "a guest-missing alarm naming vm-a1", || missing_alarms(&lab, "vm-a1") == 1);
    let log = list(&lab, &["log", "--vm", "vm-a1"]);
    assert!(
        log.iter().any(|e| e["action"] == "guest.missing" && e["host"] == "host-a"),
        "guest.missing audited: {log:?}"
    );
    let (_, table, _) = lab.cli(&["vms", "list"]);
    assert!(table.lines().any(|l| l.contains("vm-a1") && l.contains("MISSING")), "{table}");
    println!("missing, alarmed and audited within {:?}", t.elapsed());

    // A viewer cannot restore; an unknown guest is not found; nothing changes.
    let (code, _, err) = lab.cli_as("viewer", &["vms", "restore", "vm-a1", "--reason", "x"]);
    assert_ne!(code, 0, "a viewer restores nothing: {err}");
    assert!(err.contains("operator"), "{err}");
    let (code, _, err) = lab.cli(&["vms", "restore", "vm-zz", "--reason", "x"]);
    assert_ne!(code, 0, "{err}");
    assert!(shown(&lab, "vm-a1").is_some_and(|v| v["missing"] == true));

    // Restore on its owner, started. Within the controller's startup grace
    // (a host running the guest may not have reported yet) it is refused,
    // changing nothing: run again until the grace is over.
    let t = Instant::now();
    let (code, out, err) = loop {
        let (code, out, err) = lab.cli(&["vms", "restore", "vm-a1", "--start", "--reason", "undefined by mistake"]);
        if code == 0 || !err.contains("reports-current") || t.elapsed() > Duration::from_secs(30) {
            break (code, out, err);
        }
        assert!(shown(&lab, "vm-a1").is_some_and(|v| v["missing"] == true), "a refusal changes nothing");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 0, "{out}\n{err}");
    let took = lab.wait(Duration::from_secs(30), "vm-a1 running on host-a", || {
        lab.vm("vm-a1").is_some_and(|v| v["state"] == "running" && v["host_id"] == "host-a" && v["missing"] == false)
    });
    println!("vm-a1 restored and running {took:?} after `vms restore --start` (call took {:?})", t.elapsed());
    let c = lab.running_copies(&uuid);
    assert!(c.len() == 1 && c[0].host == "host-a", "vm-a1 runs once, on host-a: {c:?}");
    assert!(lab.defined("host-a").contains(&"vm-a1".to_string()));
    lab.wait(Duration::from_secs(5), "the guest-missing alarm cleared", || missing_alarms(&lab, "vm-a1") == 0);
    let log = list(&lab, &["log", "--vm", "vm-a1"]);
    for a in ["guest.restored", "guest.reappeared", "guest.started"] {
        assert!(log.iter().any(|e| e["action"] == a), "{a} audited: {log:?}");
    }
    // A second restore is refused: it is not missing.
    let (code, _, err) = lab.cli(&["vms", "restore", "vm-a1", "--reason", "again"]);
    assert_ne!(code, 0);
    assert!(err.contains("not missing"), "{err}");

    // host-b's agent is down while vm-b1 is shut off and undefined there:
    // host-b comes back without it (its complete inventory lacks it).
    let b1 = lab.vm("vm-b1").expect("vm-b1 listed");
    let b1_uuid = b1["uuid"].as_str().unwrap().to_string();
    lab.ok(&["agent-stop", "host-b"]);
    lab.virsh("host-b", &["destroy", "vm-b1"]);
    lab.virsh("host-b", &["undefine", "vm-b1"]);
    lab.ok(&["agent-start", "host-b"]);
    let took = lab.wait(Duration::from_secs(20), "vm-b1 shown MISSING", || {
        shown(&lab, "vm-b1").is_some_and(|v| v["missing"] == true)
    });
    println!("vm-b1 shown missing {took:?} after host-b's agent came back without it");
    lab.wait(Duration::from_secs(5), "a guest-missing alarm for vm-b1 on host-b", || {
        list(&lab, &["alarms"]).iter().any(|a| a["kind"] == "guest-missing" && a["host"] == "host-b")
    });
    // Restored elsewhere: a placement change recorded before the define.
    let t = Instant::now();
    let (code, out, err) =
        lab.cli(&["vms", "restore", "vm-b1", "--to", "host-a", "--start", "--reason", "host-b lost it"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let took = lab.wait(Duration::from_secs(30), "vm-b1 running on host-a", || {
        lab.vm("vm-b1")
            .is_some_and(|v| v["state"] == "running" && v["host_id"] == "host-a" && v["owner_host"] == "host-a")
    });
    println!(
        "vm-b1 restored on host-a and running {took:?} after `vms restore --to host-a --start` (call took {:?})",
        t.elapsed()
    );
    let c = lab.running_copies(&b1_uuid);
    assert!(c.len() == 1 && c[0].host == "host-a", "vm-b1 runs once, on host-a: {c:?}");
    assert!(!lab.defined("host-b").contains(&"vm-b1".to_string()));
    let log = list(&lab, &["log", "--vm", "vm-b1"]);
    let pos = |a: &str| log.iter().position(|e| e["action"] == a).unwrap_or_else(|| panic!("{a} in {log:?}"));
    assert!(
        pos("guest.missing") < pos("guest.restore.recorded") && pos("guest.restore.recorded") < pos("guest.restored")
    );
    assert!(list(&lab, &["alarms"]).iter().all(|a| a["kind"] != "guest-missing"), "every guest-missing alarm cleared");

    // Both guests run, once each (vm-b1 now on host-a).
    settle(&lab, 2);
    for v in lab.vms() {
        let u = v["uuid"].as_str().unwrap();
        assert_eq!(lab.copies(u), 1, "{} runs once", v["name"]);
    }
    lab.assert_never_two();
}
