//! End-to-end tests in the multi-host lab: real libvirtd per simulated host,
//! real qemu guests, the real agent and controller over mutual TLS.
//! They need root (namespaces, privileged libvirtd); without it each test
//! prints why it skips. CI runs as root.

use std::time::Duration;

use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    &v[k]
}

#[test]
fn lab_inventory_changes_liveness_and_restart() {
    let lab = lab_or_skip!(3, 2);
    // Every guest, with the right host, state and autostart.
    lab.wait(Duration::from_secs(20), "6 running guests in the CLI", || {
        let v = lab.vms();
        v.len() == 6 && v.iter().all(|g| g["state"] == "running")
    });
    for g in lab.vms() {
        let name = g["name"].as_str().unwrap();
        let host = format!("host-{}", &name[3..4]);
        assert_eq!(field(&g, "host_id"), &Value::from(host.clone()), "{g}");
        assert_eq!(g["persistent"], true, "{g}");
        assert!(g["disks"][0]["source"].as_str().unwrap().ends_with(&format!("{name}.img")), "{g}");
        let uuid = g["uuid"].as_str().unwrap();
        let virsh_uuid = lab.virsh(&host, &["domuuid", name]);
        assert_eq!(virsh_uuid.trim(), uuid);
    }
    for h in ["host-a", "host-b", "host-c"] {
        let j = lab.host(h).unwrap();
        assert_eq!(j["liveness"], "REACHABLE", "{j}");
        assert_eq!(j["hostname"], h, "{j}");
        assert!(!j["boot_id"].as_str().unwrap().is_empty());
        assert_eq!(j["libvirt_version"], "9.0.0", "{j}");
        assert_eq!(j["guest_count"], 2);
    }

    // Lifeboat takes the guests over: libvirt autostart is switched off (the
    // controller starts what should run, docs/return.md).
    lab.wait(Duration::from_secs(10), "autostart off everywhere", || lab.vms().iter().all(|g| g["autostart"] == false));

    // Autostart switched on with virsh (libvirt sends no event for it): the
    // controller notices within 1 s and says so in the action log; Lifeboat
    // then switches it off again at the next lease renewal (it decides what
    // starts). The lab renews leases every ~1.3 s, so `vms list` may show
    // "on" only for a moment: the log, which keeps both steps, is checked.
    let t0 = lifeboat_common::now_unix_ms();
    lab.virsh("host-a", &["autostart", "vm-a1"]);
    let logged = |action: &str| -> Option<i64> {
        let log = lab.cli_json(&["log", "--vm", "vm-a1"]).ok()?;
        log.as_array()?.iter().find(|e| e["action"] == action && e["at_unix_ms"].as_i64() >= Some(t0))?["at_unix_ms"]
            .as_i64()
    };
    lab.wait(Duration::from_secs(5), "autostart switched on, in the action log", || {
        logged("guest.autostart_enabled").is_some()
    });
    let seen = logged("guest.autostart_enabled").unwrap() - t0;
    println!("virsh autostart noticed by the controller after {seen} ms");
    assert!(seen < 1000, "took {seen} ms");
    let took = lab.wait(Duration::from_secs(10), "autostart switched off again by Lifeboat", || {
        logged("guest.autostart_disabled").is_some() && lab.vm("vm-a1").is_some_and(|g| g["autostart"] == false)
    });
    println!("Lifeboat switched libvirt autostart off again after {took:?}");
    assert!(
        lab.virsh("host-a", &["dominfo", "vm-a1"])
            .lines()
            .any(|l| l.starts_with("Autostart:") && l.contains("disable"))
    );

    // A destroyed guest.
    lab.excuse("vm-b1", "destroyed on purpose (desired state stopped)");
    lab.virsh("host-b", &["destroy", "vm-b1"]);
    let took = lab.wait(Duration::from_secs(5), "vm-b1 shut off in the CLI", || {
        lab.vm("vm-b1").is_some_and(|g| g["state"] == "shutoff" && g["state_reason"] == "destroyed")
    });
    println!("virsh destroy visible in the CLI after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Pull host-c's power: unreachable within 5 s.
    for vm in ["vm-c1", "vm-c2"] {
        lab.excuse(vm, "host-c's power is pulled and never restored (no migration in this test)");
    }
    lab.ok(&["host-kill", "host-c"]);
    let took = lab.wait(Duration::from_secs(10), "host-c UNREACHABLE", || {
        lab.host("host-c").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    println!("host power pulled: UNREACHABLE after {took:?}");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    assert_eq!(lab.host("host-a").unwrap()["liveness"], "REACHABLE");

    // Controller restart: every host and guest is still there, including
    // the dead host's guests, which only the database can remember.
    lab.ok(&["controller-stop"]);
    lab.ok(&["controller-start"]);
    lab.wait(Duration::from_secs(10), "controller back", || lab.cli_json(&["hosts", "list"]).is_ok());
    let hosts = lab.cli_json(&["hosts", "list"]).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
    let vms = lab.vms();
    assert_eq!(vms.len(), 6, "{vms:?}");
    assert!(vms.iter().any(|g| g["name"] == "vm-c1"), "vm-c1 remembered");
    // No host reads UNREACHABLE before the controller has been up for the
    // detection time (its agent may not have reconnected yet); the dead
    // host-c does right after that.
    lab.wait(Duration::from_secs(6), "host-c UNREACHABLE after the startup grace", || {
        lab.vm("vm-c1").is_some_and(|g| g["host_liveness"] == "UNREACHABLE")
    });
    assert_eq!(lab.vm("vm-b1").unwrap()["state"], "shutoff");
    lab.wait(Duration::from_secs(10), "host-a reconnected", || {
        lab.host("host-a").is_some_and(|h| h["liveness"] == "REACHABLE")
    });
}

#[test]
fn lab_bad_certificate_config_and_libvirt_faults() {
    let lab = lab_or_skip!(2, 2);
    lab.wait(Duration::from_secs(20), "4 guests", || lab.vms().len() == 4);

    // host-b's agent is given host-a's certificate: it refuses to start (exit 2, naming the
    // certificate and the command that issues the right one), host-b goes silent. (The
    // controller's own refusal of such a session is tested in-process, in inventory.rs.)
    let b_pki = lab.path("HOST_B_AGENT_CONFIG").parent().unwrap().join("pki");
    let a_pki = lab.path("HOST_A_AGENT_CONFIG").parent().unwrap().join("pki");
    lab.ok(&["agent-stop", "host-b"]);
    let saved_cert = std::fs::read(b_pki.join("agent.pem")).unwrap();
    let saved_key = std::fs::read(b_pki.join("agent.key")).unwrap();
    std::fs::copy(a_pki.join("agent.pem"), b_pki.join("agent.pem")).unwrap();
    std::fs::copy(a_pki.join("agent.key"), b_pki.join("agent.key")).unwrap();
    // lab.sh may or may not see the process before it exits 2: its own verdict is racy.
    let _ = lab.run(&["agent-start", "host-b"]);
    let log = lab.path("HOST_B_AGENT_LOG");
    lab.wait(Duration::from_secs(10), "the agent's refusal in its log", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("is the agent certificate of host 'host-a'") && text.contains("--agent host-b")
    });
    lab.wait(Duration::from_secs(10), "host-b UNREACHABLE", || {
        lab.host("host-b").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    assert_eq!(lab.host("host-a").unwrap()["liveness"], "REACHABLE", "the real host-a is unaffected");
    assert!(
        lab.vms().iter().filter(|g| g["host_id"] == "host-a").all(|g| g["name"].as_str().unwrap().starts_with("vm-a"))
    );
    lab.ok(&["agent-stop", "host-b"]);
    std::fs::write(b_pki.join("agent.pem"), saved_cert).unwrap();
    std::fs::write(b_pki.join("agent.key"), saved_key).unwrap();
    lab.ok(&["agent-start", "host-b"]);
    lab.wait(Duration::from_secs(15), "host-b back", || {
        lab.host("host-b").is_some_and(|h| h["liveness"] == "REACHABLE")
    });

    // A malformed config: the agent refuses to start and says where.
    let bad = lab.path("LAB_DIR").join("bad-agent.toml");
    std::fs::write(&bad, "host_id = \"x\"\n[controller]\nurl = \"https://10.77.0.2:7443\"\nca = 42\n").unwrap();
    let o = std::process::Command::new(lab.path("LIFEBOAT_BIN_DIR").join("lifeboat-agent"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("bad-agent.toml") && err.contains("ca") && err.contains("line 4"), "{err}");

    // libvirtd dies on host-a: the agent stays up, reports why, and recovers.
    lab.ok(&["libvirtd-kill", "host-a"]);
    lab.wait(Duration::from_secs(15), "libvirt error reported", || {
        lab.host("host-a").is_some_and(|h| h["libvirt_error"].as_str().is_some_and(|e| !e.is_empty()))
    });
    let h = lab.host("host-a").unwrap();
    assert_eq!(h["liveness"], "REACHABLE", "agent alive: {h}");
    assert_eq!(lab.vms().iter().filter(|g| g["host_id"] == "host-a").count(), 2, "guests not dropped");
    lab.ok(&["libvirtd-start", "host-a"]);
    lab.wait(Duration::from_secs(20), "libvirt back", || lab.host("host-a").is_some_and(|h| h["libvirt_error"] == ""));
}
