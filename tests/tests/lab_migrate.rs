//! Forced migration in the lab: real libvirtd and qemu guests per host, a
//! real Redfish BMC (sushy-tools) per host wired to the host's power, the
//! real agent/controller/CLI. Needs root; skips with the reason otherwise.

use std::time::{Duration, Instant};

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

fn wait_running(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(30), "guests running", || {
        let v = lab.vms();
        v.len() == n && v.iter().all(|g| g["state"] == "running")
    });
}

fn uuid_of(lab: &Lab, name: &str) -> String {
    lab.vm(name).unwrap()["uuid"].as_str().unwrap().to_string()
}

/// Pulls host-a's "power" the way a hang looks: the host dies, the BMC
/// still reads On. Waits until the controller sees it silent past the grace.
fn fail_host(lab: &Lab, host: &str) {
    lab.ok(&["host-kill", host]);
    lab.wait(Duration::from_secs(15), "host unreachable", || {
        lab.host(host).is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
}

fn guests_on(lab: &Lab, host: &str) -> Vec<Value> {
    lab.vms().into_iter().filter(|g| g["host_id"] == host).collect()
}

#[test]
fn lab_fenced_forced_migration_brings_every_guest_back_once() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    wait_running(&lab, 6);
    let before: Vec<(String, String, String)> = guests_on(&lab, "host-a")
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().into(),
                g["uuid"].as_str().unwrap().into(),
                g["nics"][0]["mac"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(before.len(), 2);

    // A live host is refused.
    let (code, _, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("nothing was changed") || err.contains("cannot be carried out"), "{err}");

    fail_host(&lab, "host-a");
    assert_eq!(
        String::from_utf8_lossy(&lab.ok(&["bmc-state", "host-a"]).stdout).trim(),
        "On",
        "a hung host still reads On"
    );

    // Without --fence the BMC's On reading refuses.
    let (code, out, _) = lab.cli(&["migrate", "--force", "--from", "host-a", "--plan"]);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("BMC reads On") && out.contains("--fence"), "{out}");

    let metrics = |lab: &Lab| String::from_utf8_lossy(&lab.ok(&["metrics"]).stdout).into_owned();
    let scraped = metrics(&lab);
    assert!(scraped.contains("lifeboat_hosts{status=\"AVAILABLE\",liveness=\"UNREACHABLE\"} 1"), "{scraped}");
    assert!(!scraped.contains("state=\"SUCCEEDED\""), "{scraped}");
    let t = Instant::now();
    let (code, out, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    println!("migrate --force --fence --yes took {:?}\n{out}", t.elapsed());
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(String::from_utf8_lossy(&lab.ok(&["bmc-state", "host-a"]).stdout).trim(), "Off");
    assert_eq!(lab.host("host-a").unwrap()["liveness"], "UNREACHABLE");

    // The metrics tell the same story.
    let after = metrics(&lab);
    for series in [
        "lifeboat_jobs{kind=\"migrate\",state=\"SUCCEEDED\"} 1",
        "lifeboat_hosts{status=\"OFFLINE\",liveness=\"UNREACHABLE\"} 1",
        "lifeboat_fence_operations_total{op=\"power_off\",result=\"off\"} 1",
        "lifeboat_fence_power_off_seconds_count 1",
        "lifeboat_failure_to_recovery_seconds_count 1",
    ] {
        assert!(after.contains(series), "{series} missing:\n{after}");
    }

    let agent = String::from_utf8_lossy(&lab.ok(&["agent-metrics", "host-b"]).stdout).into_owned();
    assert!(
        agent.contains("lifeboat_agent_session_up 1") && agent.contains("lifeboat_agent_libvirt_connected 1"),
        "{agent}"
    );
    assert!(agent.contains("lifeboat_agent_command_seconds_count{kind=\"grant_leases\"}"), "{agent}");

    // Every guest runs elsewhere, once, with its UUID, name and MAC.
    for (name, uuid, mac) in &before {
        let copies: Vec<Value> =
            lab.vms().into_iter().filter(|g| g["uuid"] == uuid.as_str() && g["host_id"] != "host-a").collect();
        assert_eq!(copies.len(), 1, "{name}");
        let g = &copies[0];
        let host = g["host_id"].as_str().unwrap();
        assert_eq!(g["name"], name.as_str());
        assert_eq!(g["state"], "running");
        assert_eq!(g["autostart"], false);
        assert_eq!(lab.virsh(host, &["domuuid", name]).trim(), uuid);
        assert!(lab.virsh(host, &["domiflist", name]).contains(mac.as_str()), "{name} keeps its MAC");
        assert_eq!(lab.copies(uuid), 1, "{name} runs exactly once");
    }

    // The audit log: the BMC read Off before anything was defined.
    let log = lab.cli_json(&["log", "--host", "host-a"]).unwrap();
    let all = lab.cli_json(&["log"]).unwrap();
    let entries = all.as_array().unwrap();
    let off = entries.iter().position(|e| e["action"] == "power.confirmed_off").expect("power confirmed off");
    let first_define = entries.iter().position(|e| e["action"] == "guest.defined").expect("guests defined");
    assert!(off < first_define, "Off confirmed before the first define");
    assert!(
        entries.iter().any(|e| e["action"] == "bmc.exchange" && e["detail"].as_str().unwrap().contains("ForceOff"))
    );
    assert!(log.as_array().unwrap().iter().any(|e| e["action"] == "migrate.requested"));
    let jobs = lab.cli_json(&["jobs", "list"]).unwrap();
    assert_eq!(jobs[0]["state"], "SUCCEEDED");
}

#[test]
fn lab_bmc_faults_and_bad_input_change_nothing() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    wait_running(&lab, 6);
    lab.ok(&["define-guest", "host-a", "vm-alocal", "--local-disk"]);
    lab.wait(Duration::from_secs(10), "local guest", || lab.vm("vm-alocal").is_some());
    fail_host(&lab, "host-a");
    let snapshot = |lab: &Lab| (lab.defined("host-b"), lab.defined("host-c"));
    let before = snapshot(&lab);
    let migrate = ["migrate", "--force", "--from", "host-a", "--fence", "--yes"];

    // The BMC refuses to power off.
    lab.ok(&["bmc-disable-poweroff", "host-a"]);
    let (code, out, err) = lab.cli(&migrate);
    assert_ne!(code, 0, "{out}");
    assert!(format!("{out}{err}").contains("not confirmed"), "{out}\n{err}");
    assert_eq!(snapshot(&lab), before, "nothing defined anywhere");
    lab.ok(&["bmc-enable-poweroff", "host-a"]);

    // The BMC is unreachable.
    lab.ok(&["bmc-stop", "host-a"]);
    let (code, out, _) = lab.cli(&migrate);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("UNKNOWN") && out.contains("unreachable"), "{out}");
    // ... and an attestation is the documented way out, but needs a reason.
    let (code, _, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--attest-powered-off", "--yes"]);
    assert_eq!(code, 2, "{err}");
    lab.ok(&["bmc-start", "host-a"]);
    assert_eq!(snapshot(&lab), before);

    // Wrong BMC password.
    lab.ok(&["bmc-break-auth", "host-a"]);
    let (code, out, _) = lab.cli(&migrate);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("401") || out.to_lowercase().contains("credential"), "{out}");
    lab.ok(&["bmc-fix-auth", "host-a"]);
    assert_eq!(snapshot(&lab), before);

    // Bad input.
    let (code, _, err) = lab.cli(&["migrate", "--force", "--from", "host-zz", "--yes"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("unknown host 'host-zz'"), "{err}");
    let (code, _, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--to", "host-a", "--yes"]);
    assert_eq!(code, 2);
    assert!(err.contains("failed host itself"), "{err}");
    let (code, out, _) = lab.cli(&["migrate", "--force", "--from", "host-a", "--vm", "nope", "--fence", "--yes"]);
    assert_eq!(code, 6);
    assert!(out.contains("no guest 'nope'"), "{out}");
    let (code, out, _) =
        lab.cli(&["migrate", "--force", "--from", "host-a", "--to", "host-b", "--vm", "vm-alocal", "--fence", "--yes"]);
    assert_eq!(code, 6);
    assert!(out.contains("vm-alocal cannot move") && out.contains("local storage"), "{out}");
    let (code, _, err) = lab.cli_as("viewer", &["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    assert_eq!(code, 4);
    assert!(err.contains("needs the operator role"), "{err}");
    let (code, _, err) = lab.cli(&["migrate", "--from", "host-a", "--yes"]);
    assert_eq!(code, 2, "--force is required: {err}");
    assert_eq!(snapshot(&lab), before, "nothing changed by any refusal");
    assert!(lab.cli_json(&["jobs", "list"]).unwrap().as_array().unwrap().iter().all(|j| j["state"] != "SUCCEEDED"));

    // A partitioned host that is alive: silent, but its BMC reads On.
    lab.ok(&["host-partition", "host-b"]);
    lab.wait(Duration::from_secs(15), "host-b unreachable", || {
        lab.host("host-b").is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    std::thread::sleep(Duration::from_millis(5500));
    let (code, out, _) = lab.cli(&["migrate", "--force", "--from", "host-b", "--yes"]);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("BMC reads On"), "{out}");
    let (code, out, _) =
        lab.cli(&["migrate", "--force", "--from", "host-b", "--attest-powered-off", "--reason", "I think so", "--yes"]);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("cannot contradict"), "{out}");
    lab.ok(&["host-heal", "host-b"]);
    for g in lab.vms().iter().filter(|g| g["name"].as_str().unwrap().starts_with("vm-b")) {
        assert_eq!(lab.copies(g["uuid"].as_str().unwrap()), 1);
    }

    // The local-disk guest is listed as unmovable; the others move; the job
    // that leaves it behind ends PARTIAL (exit 1).
    let (code, out, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(format!("{out}{err}").contains("PARTIAL"), "{out}\n{err}");
    assert!(out.contains("vm-alocal") && out.contains("CANNOT MOVE: local storage"), "{out}");
    let uuid = uuid_of(&lab, "vm-a1");
    assert_eq!(lab.copies(&uuid), 1);
}

#[test]
fn lab_controller_crash_mid_job_resumes_without_doing_anything_twice() {
    let lab = lab_or_skip!(2, 10);
    if !lab.has_bmcs() {
        return;
    }
    wait_running(&lab, 20);
    fail_host(&lab, "host-a");
    // Power is cut for real first, so the job's fencing step only reads Off.
    let (code, out, err) = lab.cli(&[
        "migrate",
        "--force",
        "--from",
        "host-a",
        "--fence",
        "--parallel",
        "1",
        "--yes",
        "--no-wait",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let job: Value = serde_json::from_str(&out).unwrap();
    let id = job["id"].as_str().unwrap().to_string();

    // A second operation on the same host is refused while this one runs.
    let (code, _, err) = lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains(&id) || err.contains("still running"), "{err}");

    // Kill the controller once some, but not all, guests run on host-b.
    lab.wait(Duration::from_secs(90), "some moves done", || {
        lab.cli_json(&["jobs", "show", &id]).is_ok_and(|j| {
            let done = j["moves"].as_array().unwrap().iter().filter(|m| m["state"] == "RUNNING").count();
            (2..10).contains(&done)
        })
    });
    lab.ok(&["controller-kill"]);
    let defined_at_kill = lab.defined("host-b").len();
    lab.ok(&["controller-start"]);
    // `jobs show` exits 1 for a PARTIAL or FAILED job: read its JSON whatever the exit code.
    let t = Instant::now();
    let j = loop {
        if let Ok((_, j)) = lab.cli_json_exit(&["jobs", "show", &id])
            && ["SUCCEEDED", "PARTIAL", "FAILED"].contains(&j["state"].as_str().unwrap_or_default())
        {
            break j;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "job {id} not finished 120 s after the controller restart");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    println!("controller killed with {defined_at_kill} guests defined on host-b; job finished after restart");
    let log = std::fs::read_to_string(lab.path("HOST_B_AGENT_LOG")).unwrap();
    for m in j["moves"].as_array().unwrap() {
        let uuid = m["uuid"].as_str().unwrap();
        assert_eq!(lab.copies(uuid), 1, "{} runs exactly once", m["name"]);
        let defined = log.lines().filter(|l| l.contains("guest defined") && l.contains(uuid)).count();
        let started = log.lines().filter(|l| l.contains("guest started") && l.contains(uuid)).count();
        assert_eq!((defined, started), (1, 1), "{} defined and started exactly once", m["name"]);
    }
    let resumed = lab.cli_json(&["log", "--job", &id]).unwrap();
    assert!(resumed.as_array().unwrap().iter().any(|e| e["action"] == "job.resumed"));
}
