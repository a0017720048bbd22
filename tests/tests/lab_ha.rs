//! High availability in the lab (`lab.sh up --ha`): a real 3-member etcd
//! cluster, three `lifeboat-controller` processes on `[store] backend =
//! "etcd"` (each restarted by a supervisor when it exits, as systemd's
//! Restart=always does), real libvirtd and qemu guests, a real Redfish BMC per
//! host. Every lab test also counts qemu processes per guest UUID across all
//! hosts every 200 ms (the copies checker): two copies of one guest fail it.
//! Needs root; skips with the reason otherwise (fails under `CI=true`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lifeboat_e2e::lab::{self, Lab};
use serde_json::Value;

/// The controllers' default `leader_ttl_ms`: a dead leader's etcd lease
/// expires this long after its last renewal.
const LEADER_TTL: Duration = Duration::from_millis(3000);
/// The bound: a standby leads within this long after the leader dies.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

/// An HA lab with 3 controllers, or `None` after printing why it cannot run.
fn ha_lab(hosts: u32, guests: u32) -> Option<Lab> {
    if !std::path::Path::new("/usr/bin/etcd").exists() {
        lab::skip_or_fail("/usr/bin/etcd is missing: run scripts/install-deps.sh (Debian's etcd-server)");
        return None;
    }
    match Lab::up_with(hosts, guests, &["--ha", "--controllers", "3"]) {
        Ok(l) => Some(l),
        Err(why) => {
            lab::skip_or_fail(&why);
            None
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// The controller holding the election, per etcd (`lab.sh leader`).
fn leader(lab: &Lab) -> Option<u32> {
    let o = lab.run(&["leader"]);
    if !o.status.success() {
        return None;
    }
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().and_then(|n| n.parse().ok())
}

/// Waits until a controller other than `old` leads; returns it and the time taken.
fn wait_new_leader(lab: &Lab, old: u32, limit: Duration) -> (u32, Duration) {
    let t = Instant::now();
    loop {
        if let Some(n) = leader(lab).filter(|n| *n != old) {
            return (n, t.elapsed());
        }
        assert!(t.elapsed() < limit, "no controller other than {old} leads {limit:?} after it lost leadership");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Controller `n`'s exits recorded by its supervisor: (unix ms, status).
fn exits(lab: &Lab, n: u32) -> Vec<(u64, i32)> {
    let text = std::fs::read_to_string(lab.path(&format!("CTL_{n}_EXITS"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (at, st) = l.split_once(' ')?;
            Some((at.trim().parse().ok()?, st.trim().parse().ok()?))
        })
        .collect()
}

/// One value of a Prometheus exposition (`name value` line), if present.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Whether controller `n` says it leads (`lifeboat_controller_leader`);
/// `None` when it does not answer (not running, or not serving yet).
fn ctl_leading(lab: &Lab, n: u32) -> Option<bool> {
    let o = lab.run(&["metrics", &n.to_string()]);
    if !o.status.success() {
        return None;
    }
    metric(&String::from_utf8_lossy(&o.stdout), "lifeboat_controller_leader").map(|v| v > 0.5)
}

/// The highest controller epoch `host`'s agent has seen.
fn agent_epoch(lab: &Lab, host: &str) -> Option<f64> {
    let o = lab.run(&["agent-metrics", host]);
    metric(&String::from_utf8_lossy(&o.stdout), "lifeboat_agent_controller_epoch")
}

fn wait_running(lab: &Lab, n: usize) {
    lab.wait(Duration::from_secs(60), "every guest listed as running", || {
        let v = lab.vms();
        v.len() == n && v.iter().all(|g| g["state"] == "running")
    });
}

/// Cuts `host`'s power the way a hang looks (its BMC still reads On) and
/// waits until it has been silent for the HA lab's forced-migration grace.
fn fail_host(lab: &Lab, host: &str) {
    lab.ok(&["host-kill", host]);
    lab.wait(Duration::from_secs(20), "host unreachable", || {
        lab.host(host).is_some_and(|h| h["liveness"] == "UNREACHABLE")
    });
    let grace: u64 = lab.paths.get("HA_FORCE_GRACE_MS").and_then(|g| g.parse().ok()).unwrap_or(10_000);
    std::thread::sleep(Duration::from_millis(grace + 500));
}

/// Starts a forced migration of `host`'s guests, one move at a time, without
/// waiting; returns the job id.
fn start_forced_migration(lab: &Lab, host: &str) -> String {
    let (code, out, err) = lab.cli(&[
        "migrate",
        "--force",
        "--from",
        host,
        "--fence",
        "--parallel",
        "1",
        "--yes",
        "--no-wait",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let job: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("job JSON ({e}): {out}"));
    job["id"].as_str().expect("job id").to_string()
}

/// Waits until between `lo` and `hi` (exclusive) of the job's moves are done.
fn wait_moves_done(lab: &Lab, id: &str, lo: usize, hi: usize) {
    lab.wait(Duration::from_secs(120), "some, not all, moves done", || {
        lab.cli_json(&["jobs", "show", id]).is_ok_and(|j| {
            let done = j["moves"].as_array().map_or(0, |m| m.iter().filter(|m| m["state"] == "RUNNING").count());
            (lo..hi).contains(&done)
        })
    });
}

/// Waits for the job to end (through whichever controller leads) and returns it.
fn wait_job_end(lab: &Lab, id: &str, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        // `jobs show` exits 1 for a PARTIAL or FAILED job: read its JSON whatever the exit code.
        if let Ok((_, j)) = lab.cli_json_exit(&["jobs", "show", id])
            && ["SUCCEEDED", "PARTIAL", "FAILED"].contains(&j["state"].as_str().unwrap_or_default())
        {
            return j;
        }
        assert!(t.elapsed() < limit, "job {id} not finished {limit:?} after the failover");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every move of the job: its guest runs exactly once, and the target
/// host's agent defined and started it exactly once.
fn assert_each_move_once(lab: &Lab, job: &Value, target: &str) {
    let key = format!("HOST_{}_AGENT_LOG", target.trim_start_matches("host-").to_uppercase());
    let log = std::fs::read_to_string(lab.path(&key)).expect("agent log");
    let moves = job["moves"].as_array().expect("moves");
    assert!(!moves.is_empty(), "{job}");
    for m in moves {
        let uuid = m["uuid"].as_str().expect("uuid");
        assert_eq!(lab.copies(uuid), 1, "{} runs exactly once", m["name"]);
        let defined = log.lines().filter(|l| l.contains("guest defined") && l.contains(uuid)).count();
        let started = log.lines().filter(|l| l.contains("guest started") && l.contains(uuid)).count();
        assert_eq!((defined, started), (1, 1), "{} defined and started exactly once on {target}", m["name"]);
    }
}

/// A reversible mutation (operator): `hosts set-status HOST STATUS`.
fn set_status(lab: &Lab, host: &str, status: &str) -> (i32, String) {
    let (code, out, err) = lab.cli(&["hosts", "set-status", host, status]);
    (code, format!("{out}{err}"))
}

/// Every host AVAILABLE and REACHABLE, read through the leader.
fn all_hosts_normal(lab: &Lab) -> bool {
    lab.cli_json(&["hosts", "list"]).is_ok_and(|h| {
        h.as_array().is_some_and(|a| {
            !a.is_empty() && a.iter().all(|h| h["status"] == "AVAILABLE" && h["liveness"] == "REACHABLE")
        })
    })
}

/// The etcd member that is raft leader now (1-based), from `etcdctl endpoint status`.
fn etcd_raft_leader(lab: &Lab) -> u32 {
    let out = lab.ok(&["etcdctl", "endpoint", "status", "-w", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("etcdctl endpoint status JSON");
    for e in v.as_array().expect("endpoints") {
        let st = &e["Status"];
        if st["header"]["member_id"] == st["leader"] {
            let url = e["Endpoint"].as_str().expect("endpoint");
            for n in 1..=3u32 {
                if lab.paths.get(&format!("ETCD_{n}_URL")).is_some_and(|u| u == url) {
                    return n;
                }
            }
        }
    }
    panic!("no etcd member is raft leader: {v}");
}

/// SIGKILL the leading controller (its machine dies, nothing restarts it)
/// during a 15-guest forced migration: a standby leads within 5 s, the job
/// finishes, and every guest is defined and started exactly once.
#[test]
fn lab_ha_leader_killed_mid_forced_migration_standby_finishes_the_job_once() {
    let Some(lab) = ha_lab(2, 15) else { return };
    if !lab.has_bmcs() {
        return;
    }
    wait_running(&lab, 30);
    fail_host(&lab, "host-a");
    let id = start_forced_migration(&lab, "host-a");
    wait_moves_done(&lab, &id, 2, 15);
    let old = leader(&lab).expect("a controller leads");
    let epoch_before = agent_epoch(&lab, "host-b").expect("host-b's agent reports its controller epoch");
    let t = Instant::now();
    lab.ok(&["ctl-kill", &old.to_string()]);
    let (new, elected) = wait_new_leader(&lab, old, Duration::from_secs(30));
    let serving = lab
        .wait(Duration::from_secs(30), "the new leader answers", || lab.cli_json(&["jobs", "show", &id]).is_ok())
        + elected;
    println!("leader {old} SIGKILLed: controller {new} elected after {elected:?}, answering after {serving:?}");
    assert!(elected < FAILOVER_BOUND, "a standby must lead within {FAILOVER_BOUND:?}; took {elected:?}");
    let j = wait_job_end(&lab, &id, Duration::from_secs(180));
    println!("job finished {:?} after the SIGKILL", t.elapsed());
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    assert_eq!(j["moves"].as_array().map(Vec::len), Some(15), "{j}");
    assert_each_move_once(&lab, &j, "host-b");
    let log = lab.cli_json(&["log", "--job", &id]).expect("audit log of the job");
    assert!(log.as_array().expect("entries").iter().any(|e| e["action"] == "job.resumed"), "{log}");
    assert_eq!(leader(&lab), Some(new), "the killed controller stays dead: nobody took over from {new}");
    let epoch_after = agent_epoch(&lab, "host-b").unwrap_or_default();
    assert!(
        epoch_after > epoch_before,
        "host-b follows the new leader's higher epoch: {epoch_before} -> {epoch_after}"
    );
    lab.assert_never_two();
}

/// Cut the leading controller from etcd, not from the agents, during a
/// forced migration: it stops commanding (exits with status 3) before its
/// etcd lease can expire, so before another controller can be elected; the
/// new leader finishes the job with every guest started exactly once; when
/// healed, the old leader comes back as a follower that names the new one.
#[test]
fn lab_ha_leader_cut_from_etcd_stops_before_the_new_leader_acts() {
    let Some(lab) = ha_lab(2, 6) else { return };
    if !lab.has_bmcs() {
        return;
    }
    wait_running(&lab, 12);
    fail_host(&lab, "host-a");
    let id = start_forced_migration(&lab, "host-a");
    wait_moves_done(&lab, &id, 1, 6);
    let old = leader(&lab).expect("a controller leads");
    assert_eq!(ctl_leading(&lab, old), Some(true), "controller {old} leads by its own metrics");
    let epoch_before = agent_epoch(&lab, "host-b").expect("host-b's agent reports its controller epoch");
    let before = exits(&lab, old).len();
    let cut_at = now_ms();
    lab.ok(&["ctl-partition", &old.to_string()]);
    // etcd's election: the next candidate's key becomes the lowest the moment the old
    // leader's lease expires, so this is when another controller can act.
    let (new, elected) = wait_new_leader(&lab, old, Duration::from_secs(30));
    let elected_at = cut_at + u64::try_from(elected.as_millis()).unwrap_or(u64::MAX);
    // The old leader's process ending is the proof it commands nothing any more
    // (holds() turned false even earlier); its supervisor records when.
    lab.wait(Duration::from_secs(15), "the cut-off leader exits", || exits(&lab, old).len() > before);
    let (exit_at, status) = exits(&lab, old)[before];
    println!(
        "leader {old} cut from etcd: exited (status {status}) after {} ms; controller {new} elected after {} ms",
        exit_at.saturating_sub(cut_at),
        elected.as_millis()
    );
    assert_eq!(status, 3, "a controller that lost leadership exits with status 3");
    assert!(exit_at < elected_at, "the cut-off leader must have stopped before another was elected");
    let j = wait_job_end(&lab, &id, Duration::from_secs(180));
    assert_eq!(j["state"], "SUCCEEDED", "{j}");
    assert_each_move_once(&lab, &j, "host-b");

    let epoch_after = agent_epoch(&lab, "host-b").unwrap_or_default();
    assert!(
        epoch_after > epoch_before,
        "host-b follows the new leader's higher epoch: {epoch_before} -> {epoch_after}"
    );
    let stale = lab.run(&["agent-metrics", "host-b"]);
    let stale = metric(&String::from_utf8_lossy(&stale.stdout), "lifeboat_agent_stale_epoch_refused_total");
    println!("host-b refused {stale:?} commands of a stale epoch");

    lab.ok(&["ctl-heal", &old.to_string()]);
    std::thread::sleep(LEADER_TTL * 2);
    assert_eq!(leader(&lab), Some(new), "healing the old leader must not hand leadership back");
    let o = lab.run(&["cli-at", &old.to_string(), "hosts", "list"]);
    let (code, err) = (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned());
    let new_url = lab.paths.get(&format!("CTL_{new}_URL")).cloned().unwrap_or_default();
    assert_ne!(code, 0, "a follower refuses: {err}");
    assert!(
        err.contains("not the leader") && err.contains(&new_url),
        "follower {old} must name leader {new_url}: {err}"
    );
    lab.assert_never_two();
}

/// Kill one of three etcd members (the raft leader): nothing visible
/// changes. Stop all of them: mutations are refused with a clear error, no
/// host is declared dead, every guest keeps running exactly once past the
/// start-lease TTL. Start etcd again: normal within seconds.
#[test]
fn lab_ha_etcd_member_loss_changes_nothing_and_total_loss_refuses_mutations_only() {
    let Some(lab) = ha_lab(2, 2) else { return };
    wait_running(&lab, 4);
    lab.past_startup_grace();
    let ctl = leader(&lab).expect("a controller leads");
    let exits_before = exits(&lab, ctl).len();

    // One member down: one of etcd's raft followers. (Losing etcd's raft
    // leader stalls lease renewals for etcd's own election, 1-2 s with its
    // defaults; on a loaded machine that can pass the leader's local
    // deadline, and then a standby takes over: safe, but visible. See
    // docs/operations.md, "What happens when etcd is lost".)
    let member = etcd_raft_leader(&lab) % 3 + 1;
    lab.ok(&["etcd-kill", &member.to_string()]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        assert!(all_hosts_normal(&lab), "hosts changed with etcd{member} down");
        assert_eq!(leader(&lab), Some(ctl), "the leader changed with one etcd member down");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, out) = set_status(&lab, "host-b", "NOT_ACCEPTING");
    assert_eq!(code, 0, "a mutation with 2 of 3 etcd members: {out}");
    let (code, out) = set_status(&lab, "host-b", "AVAILABLE");
    assert_eq!(code, 0, "{out}");
    assert_eq!(exits(&lab, ctl).len(), exits_before, "the leader restarted with one etcd member down");
    lab.ok(&["etcd-start", &member.to_string()]);

    // All members down.
    let guests = lab.guests();
    let stopped_at = now_ms();
    lab.ok(&["etcd-stop-all"]);
    let (code, out) = set_status(&lab, "host-b", "NOT_ACCEPTING");
    println!("mutation with etcd down: exit {code}: {out}");
    assert_ne!(code, 0, "a mutation must be refused while etcd is down: {out}");
    assert!(out.contains("etcd") || out.contains("leader"), "the refusal must say why (etcd / no leader): {out}");
    let lease_ttl: u64 = lab.paths.get("HA_LEASE_TTL_MS").and_then(|g| g.parse().ok()).unwrap_or(9000);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(lease_ttl + 3000) {
        for (name, uuid, _) in &guests {
            assert_eq!(lab.copies(uuid), 1, "{name} keeps running, once, while etcd is down");
        }
        let st = String::from_utf8_lossy(&lab.ok(&["status"]).stdout).into_owned();
        assert!(
            st.lines().filter(|l| l.starts_with("host-")).all(|l| l.contains("agent=running")),
            "agents keep running: {st}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Long after the leader lost its lease, the controllers still answer, as followers
    // that say why nobody leads (not "connection refused").
    let (code, out) = set_status(&lab, "host-b", "NOT_ACCEPTING");
    println!("mutation {} s into the etcd outage: exit {code}: {out}", now_ms().saturating_sub(stopped_at) / 1000);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("not the leader"),
        "followers must refuse with \"not the leader; no leader is elected\": {out}"
    );

    // etcd back.
    let t = Instant::now();
    lab.ok(&["etcd-start-all"]);
    let normal = lab.wait(Duration::from_secs(30), "hosts normal again through a leader", || all_hosts_normal(&lab));
    let (code, out) = set_status(&lab, "host-b", "NOT_ACCEPTING");
    assert_eq!(code, 0, "mutations work again: {out}");
    let (code, out) = set_status(&lab, "host-b", "AVAILABLE");
    assert_eq!(code, 0, "{out}");
    println!("etcd back: hosts normal after {normal:?}, mutations after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(20), "normal within seconds of etcd's return");
    // No host was declared dead, nothing was moved (this test moves nothing at all).
    let log = lab.cli_json(&["log"]).unwrap_or_else(|e| panic!("{e}"));
    let during = log
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e.get("at_unix_ms").and_then(Value::as_u64).is_none_or(|at| at >= stopped_at));
    for e in during {
        let (action, detail) = (e["action"].as_str().unwrap_or_default(), e["detail"].to_string());
        let declared_dead = action == "host.status" && detail.contains("OFFLINE");
        let moved = action.starts_with("migrate.") || action.starts_with("move.");
        assert!(!declared_dead && !moved, "nothing may be decided about a host while etcd is down: {e}");
    }
    lab.assert_never_two();
}

/// Controllers crash and restart one after another ten times while the
/// hosts report new guests: no guest loses its owner, the audit log has no
/// duplicate entry, no guest runs twice.
#[test]
fn lab_ha_rolling_controller_restarts_lose_nothing_and_duplicate_nothing() {
    let Some(lab) = ha_lab(2, 2) else { return };
    wait_running(&lab, 4);
    let mut took = Vec::new();
    let mut failovers = 0;
    for i in 0..10u32 {
        // Every other restart is the leader's (a real failover); the others
        // are followers' (the leader must not notice).
        let n =
            if i % 2 == 0 { leader(&lab).expect("a controller leads") } else { (leader(&lab).unwrap_or(1) % 3) + 1 };
        if i % 2 == 0 {
            failovers += 1;
        }
        let host = if i % 2 == 0 { "host-a" } else { "host-b" };
        lab.ok(&["define-guest", host, &format!("vm-r{i}")]);
        let t = Instant::now();
        lab.ok(&["ctl-kill", &n.to_string(), "--restart"]);
        lab.wait(Duration::from_secs(30), "a leader answers again", || {
            leader(&lab).is_some() && lab.cli_json(&["hosts", "list"]).is_ok()
        });
        took.push(t.elapsed());
    }
    println!("10 controller restarts ({failovers} of the leader); back to an answering leader after {took:?}");
    lab.note_running();
    wait_running(&lab, 14);

    // Every guest owned by the one host it runs on.
    let running: BTreeMap<String, Vec<String>> = lab.guests().into_iter().map(|(_, u, w)| (u, w)).collect();
    for v in lab.vms() {
        let uuid = v["uuid"].as_str().unwrap_or_default();
        let on = running.get(uuid).cloned().unwrap_or_default();
        assert_eq!(on.len(), 1, "{} runs once: {on:?}", v["name"]);
        assert_eq!(v["host_id"], on[0].as_str(), "{} is owned by the host it runs on", v["name"]);
    }

    // No audit entry twice.
    let log = lab.cli_json(&["log"]).expect("audit log");
    let entries = log.as_array().expect("entries");
    let mut seqs = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for e in entries {
        if let Some(s) = e.get("seq").and_then(Value::as_i64) {
            assert!(seqs.insert(s), "audit seq {s} appears twice");
        }
        let mut body = e.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("seq");
        }
        assert!(seen.insert(body.to_string()), "audit entry written twice: {e}");
    }
    // A step done twice would be two entries at two different times: the
    // once-only actions are compared without their time.
    let mut once = BTreeMap::new();
    for e in entries {
        let action = e.get("action").and_then(Value::as_str).unwrap_or_default();
        if !["guest.owner_recorded", "guest.defined", "move.done", "guest.stopped_for_move"].contains(&action) {
            continue;
        }
        let mut body = e.clone();
        if let Some(o) = body.as_object_mut() {
            o.remove("seq");
            o.remove("at_unix_ms");
            o.remove("at");
        }
        *once.entry(body.to_string()).or_insert(0u32) += 1;
    }
    for (body, n) in &once {
        assert_eq!(*n, 1, "a once-only audit entry appears {n} times: {body}");
    }
    println!("{} audit entries, none twice", entries.len());
    lab.assert_never_two();
}
