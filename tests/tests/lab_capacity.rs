//! Capacity in the lab: two hosts fail at once and the one host left has
//! memory for half their guests. Two `migrate --force --fence --yes` run
//! concurrently; the target must never be given more than it has: two
//! guests move, the other two are NOT_MOVED ("no capacity"), their job is
//! PARTIAL with the guests-not-moved alarm, and no guest ever runs twice.
//! Real libvirtd/qemu, Redfish BMCs, the real CLI. Needs root.

use std::time::{Duration, Instant};

use lifeboat_e2e::lab::Lab;
use lifeboat_e2e::lab_or_skip;
use serde_json::Value;

/// Memory of every lab guest (lab.sh define_guest), MiB.
const GUEST_MIB: u64 = 32;

fn settle(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(30), "guests running and managed", || {
        let v = lab.vms();
        v.len() == n && v.iter().all(|g| g["state"] == "running" && g["desired_state"] == "running")
    });
}

fn all_reachable(lab: &Lab) {
    lab.wait(Duration::from_secs(30), "every host REACHABLE", || {
        ["host-a", "host-b", "host-c"].iter().all(|h| lab.host(h).is_some_and(|j| j["liveness"] == "REACHABLE"))
    });
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// (name, uuid) of the guests on `host`.
fn guests_of(lab: &Lab, host: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = lab
        .vms()
        .into_iter()
        .filter(|g| g["host_id"] == host)
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["uuid"].as_str().unwrap().to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn lab_two_hosts_failing_at_once_never_overcommit_the_survivor() {
    let lab = lab_or_skip!(3, 2);
    if !lab.has_bmcs() {
        return;
    }
    settle(&lab, 6);

    // Leave host-c room for exactly two more guests, from what it reports:
    // physical - running guests - reserve = 80 MiB (+ < 1 MiB of rounding).
    let c = lab.host("host-c").expect("host-c");
    let total_mib = num(&c, "memory_total_mib");
    let running_mib: u64 = lab
        .vms()
        .iter()
        .filter(|g| g["host_id"] == "host-c" && g["state"] == "running")
        .map(|g| num(g, "memory_mib"))
        .sum();
    assert_eq!(running_mib, 2 * GUEST_MIB, "host-c runs its two lab guests");
    let room_mib = 2 * GUEST_MIB + GUEST_MIB / 2;
    let reserve = total_mib.checked_sub(running_mib + room_mib).expect("host-c has more than 112 MiB");
    lab.ok(&["controller-memory-reserve", &reserve.to_string()]);
    all_reachable(&lab);
    settle(&lab, 6);
    println!(
        "host-c: {total_mib} MiB physical, {running_mib} MiB running, reserve {reserve} MiB: room for {room_mib} MiB"
    );

    let (a, b) = (guests_of(&lab, "host-a"), guests_of(&lab, "host-b"));
    assert_eq!((a.len(), b.len()), (2, 2));

    // Both fail together (power pulled; their BMCs still read On).
    lab.ok(&["host-kill", "host-a"]);
    lab.ok(&["host-kill", "host-b"]);
    lab.wait(Duration::from_secs(15), "host-a and host-b unreachable", || {
        ["host-a", "host-b"].iter().all(|h| lab.host(h).is_some_and(|j| j["liveness"] == "UNREACHABLE"))
    });
    std::thread::sleep(Duration::from_millis(5500));
    // Each plan alone would put both its guests on host-c.
    for h in ["host-a", "host-b"] {
        let p = lab.cli_json(&["migrate", "--force", "--from", h, "--fence", "--plan"]).expect("plan");
        let placed =
            p["guests"].as_array().unwrap().iter().filter(|g| g["movable"] == true && g["target"] == "host-c").count();
        assert_eq!(placed, 2, "{h}: {p}");
    }

    // Two operators, one per failed host, at the same moment.
    let t = Instant::now();
    let (ra, rb) = std::thread::scope(|s| {
        let ja = s.spawn(|| lab.cli(&["migrate", "--force", "--from", "host-a", "--fence", "--yes"]));
        let jb = s.spawn(|| lab.cli(&["migrate", "--force", "--from", "host-b", "--fence", "--yes"]));
        (ja.join().unwrap(), jb.join().unwrap())
    });
    println!("both migrations ended after {:?}", t.elapsed());
    println!("host-a: exit {}\n{}{}\nhost-b: exit {}\n{}{}", ra.0, ra.1, ra.2, rb.0, rb.1, rb.2);

    let jobs = lab.cli_json(&["jobs", "list"]).expect("jobs list");
    let jobs: Vec<&Value> = jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "migrate").collect();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let moves: Vec<&Value> = jobs.iter().flat_map(|j| j["moves"].as_array().unwrap().iter()).collect();
    let running: Vec<&&Value> = moves.iter().filter(|m| m["state"] == "RUNNING").collect();
    let not_moved: Vec<&&Value> = moves.iter().filter(|m| m["state"] == "NOT_MOVED").collect();
    assert_eq!(running.len(), 2, "room for two: {moves:#?}");
    assert!(running.iter().all(|m| m["target"] == "host-c"), "{moves:#?}");
    assert_eq!(not_moved.len(), 2, "{moves:#?}");
    for m in &not_moved {
        let e = m["error"].as_str().unwrap_or_default();
        assert!(e.starts_with("no capacity: needs 32 MiB"), "{e}");
    }
    let mut states: Vec<&str> = jobs.iter().map(|j| j["state"].as_str().unwrap()).collect();
    states.sort();
    assert!(states == ["PARTIAL", "PARTIAL"] || states == ["PARTIAL", "SUCCEEDED"], "{states:?}");
    // The exit codes say the same: 0 only for a job that moved everything.
    for (h, r) in [("host-a", &ra), ("host-b", &rb)] {
        let j = jobs.iter().find(|j| j["source"] == h).unwrap();
        assert_eq!(r.0 == 0, j["state"] == "SUCCEEDED", "{h}: exit {} for {}", r.0, j["state"]);
        if j["state"] == "PARTIAL" {
            assert!(r.2.contains("no capacity"), "{h}: {}", r.2);
        }
    }

    // What host-c runs, per its own qemu processes: its two and two moved ones.
    let on_c = |uuid: &str| lab.running_copies(uuid).iter().filter(|q| q.host == "host-c").count();
    let moved_in: usize = a.iter().chain(b.iter()).map(|(_, u)| on_c(u)).sum();
    assert_eq!(moved_in, 2, "host-c was given more than its memory");
    let c = lab.host("host-c").unwrap();
    assert_eq!(num(&c, "running_count"), 4);
    let running_now: u64 = lab
        .vms()
        .iter()
        .filter(|g| g["host_id"] == "host-c" && g["state"] == "running")
        .map(|g| num(g, "memory_mib"))
        .sum();
    assert!(
        running_now <= total_mib - reserve,
        "{running_now} MiB running on host-c, {} MiB allowed",
        total_mib - reserve
    );
    assert_eq!(num(&c, "reserved_memory_mib"), 0, "ended jobs hold nothing");

    // Each guest runs once or is listed NOT_MOVED with its reason; the job
    // that left guests behind raised the alarm on its source.
    for (name, uuid) in a.iter().chain(b.iter()) {
        let copies = lab.running_copies(uuid);
        let left = not_moved.iter().any(|m| m["uuid"] == uuid.as_str());
        assert_eq!(copies.len(), usize::from(!left), "{name}: {copies:?}");
    }
    let alarms = lab.cli_json(&["alarms"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default();
    for j in &jobs {
        let left = j["moves"].as_array().unwrap().iter().any(|m| m["state"] == "NOT_MOVED");
        let alarmed = alarms.iter().any(|x| x["kind"] == "guests-not-moved" && x["host"] == j["source"]);
        assert_eq!(alarmed, left, "{}: {alarms:?}", j["source"]);
    }
    lab.assert_never_two();
}
