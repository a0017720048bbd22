//! Host operations after a forced migration: `cleanup` of the stale
//! definitions a returned host still holds, and operators' status changes.
//! The planning functions are pure; the async ones carry plans out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lifeboat_proto::v1::{Check, CleanupGuest, CleanupItem, CleanupPlan, Guest, MigrateRequest, command::Kind};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::domain::host::HostStatus;
use crate::error::ControllerError;
use crate::migrate::engine::Engine;
use crate::ports::{AuditRow, MoveRow};
use crate::registry::Registry;

use crate::domain::checks::{self, CheckId, check};
use crate::domain::cleanup::CleanupAction;

/// Inputs of a cleanup plan.
#[derive(Debug, Clone)]
pub struct CleanupInput {
    /// Host to clean.
    pub host: String,
    /// Whether the host is known at all.
    pub host_known: bool,
    /// Completed moves away from the host, with when each was cleaned (0 = not).
    pub moves: Vec<(MoveRow, i64)>,
    /// Current owner per UUID.
    pub owners: BTreeMap<String, String>,
    /// Guests the host reports now.
    pub guests: Vec<Guest>,
    /// Its agent session is open.
    pub connected: bool,
    /// Its agent sent an inventory in that session: until then, what the
    /// host is known to run is from before it went away.
    pub inventory_fresh: bool,
    /// A migrate job on this host is running.
    pub active_job: Option<String>,
    /// `--destroy-running`.
    pub destroy_running: bool,
    /// Guests named by move records with a database row in quarantine:
    /// their owner is unknown, never "none".
    pub quarantined: BTreeSet<String>,
}

/// A quarantined guest's cleanup item: refused, never removed (its owner
/// row cannot be read, so it may be the live owner's definition).
fn refuse_quarantined(item: &mut CleanupItem, host: &str) -> String {
    CleanupAction::RefuseQuarantined.set(item);
    item.detail = format!(
        "{} ({}): its ownership record is quarantined (a database row could not be read: alarm row-quarantined), so whether {host} \
         owns it again is unknown; not touching it (see docs/security.md, \"The database never poisons a start\")",
        item.name, item.uuid
    );
    item.detail.clone()
}

/// Plans a cleanup. Only definitions named by move records are candidates,
/// matched by UUID (never by name guessing).
pub fn plan_cleanup(i: &CleanupInput) -> CleanupPlan {
    let mut p = CleanupPlan { host: i.host.clone(), ..Default::default() };
    if !i.host_known {
        p.preconditions.push(check(
            CheckId::HostKnown,
            false,
            format!("unknown host '{}'", i.host),
            "name a host from `lifeboat hosts list`",
        ));
        return finish(p);
    }
    if i.moves.is_empty() {
        p.preconditions.push(check(
            CheckId::MoveRecords,
            false,
            format!(
                "no move records name {}: Lifeboat never moved a guest away from it, so there is nothing to clean",
                i.host
            ),
            "nothing to do; stale definitions of guests Lifeboat did not move are not Lifeboat's to remove",
        ));
        return finish(p);
    }
    p.preconditions.push(match (i.connected, i.inventory_fresh) {
        (true, true) => check(CheckId::HostConnected, true, format!("{}'s agent is connected", i.host), ""),
        (true, false) => check(
            CheckId::HostConnected,
            false,
            format!("{}'s agent is connected but has not sent its inventory yet: what it runs is not known", i.host),
            "wait a few seconds and plan again",
        ),
        (false, _) => check(
            CheckId::HostConnected,
            false,
            format!("{}'s agent is not connected", i.host),
            "power the repaired host on and wait until `lifeboat hosts show` says REACHABLE",
        ),
    });
    p.preconditions.push(match &i.active_job {
        Some(j) => check(
            CheckId::OneOperationPerHost,
            false,
            format!("job {j} on {} is still running", i.host),
            format!("wait: `lifeboat jobs watch {j}`"),
        ),
        None => check(CheckId::OneOperationPerHost, true, "no other operation on this host", ""),
    });
    // The newest move per guest.
    let mut latest: BTreeMap<&str, &(MoveRow, i64)> = BTreeMap::new();
    for m in &i.moves {
        latest.insert(m.0.uuid.as_str(), m);
    }
    let mut running_refused = Vec::new();
    let mut quarantine_refused = Vec::new();
    for (uuid, (m, cleaned)) in latest {
        let owner = i.owners.get(uuid).cloned().unwrap_or_default();
        let mut item = CleanupItem {
            uuid: uuid.into(),
            name: m.name.clone(),
            moved_to: m.target.clone(),
            job: m.job_id.clone(),
            ..Default::default()
        };
        if i.quarantined.contains(uuid) {
            quarantine_refused.push(refuse_quarantined(&mut item, &i.host));
            p.items.push(item);
            continue;
        }
        if owner == i.host {
            CleanupAction::Skip.set(&mut item);
            item.detail = format!("{} is owned by {} again; not stale", m.name, i.host);
            p.items.push(item);
            continue;
        }
        match i.guests.iter().find(|g| g.uuid == uuid) {
            None => {
                CleanupAction::Gone.set(&mut item);
                item.detail = if *cleaned > 0 {
                    "removed by an earlier cleanup".into()
                } else {
                    format!("not defined on {}", i.host)
                };
            }
            Some(g) => {
                item.managed_save = g.managed_save;
                // Paused, crashed, pm-suspended, shutting down: a qemu may still hold the disks.
                let running = lifeboat_proto::holds_disk(g.state);
                item.state = lifeboat_proto::state_name(g.state).into();
                if g.name != m.name {
                    CleanupAction::RefuseRenamed.set(&mut item);
                    item.detail = format!(
                        "UUID {uuid} is named '{}' on {}, not '{}' as the move record says; not touching it",
                        g.name, i.host, m.name
                    );
                    running_refused.push(item.detail.clone());
                } else if running && !i.destroy_running {
                    CleanupAction::RefuseRunning.set(&mut item);
                    item.detail = format!(
                        "{} is {} on {} (not shut off) although it was moved to {}",
                        m.name,
                        item.state.to_uppercase(),
                        i.host,
                        m.target
                    );
                    running_refused.push(item.detail.clone());
                } else if running {
                    CleanupAction::DestroyAndRemove.set(&mut item);
                    item.detail = format!(
                        "--destroy-running: destroy the stale copy, then undefine (disks untouched); it runs on {}",
                        m.target
                    );
                } else {
                    CleanupAction::Remove.set(&mut item);
                    item.detail = format!(
                        "disable autostart{}, undefine with snapshot and checkpoint metadata, keeping NVRAM (never storage: the moved guest may use both); it now lives on {}",
                        if g.managed_save { ", remove the managed-save image" } else { "" },
                        m.target
                    );
                }
            }
        }
        p.items.push(item);
    }
    p.preconditions.push(check(
        CheckId::NoStaleCopyRunning,
        running_refused.is_empty(),
        if running_refused.is_empty() { "no moved guest runs on this host".to_string() } else { running_refused.join("; ") },
        "find out why it runs (split brain?); `lifeboat cleanup HOST --destroy-running` destroys the stale copies first",
    ));
    if !quarantine_refused.is_empty() {
        p.preconditions.push(check(
            CheckId::OwnershipRecordsReadable,
            false,
            quarantine_refused.join("; "),
            "repair the quarantined row as the row-quarantined alarm says (docs/security.md), restart the controller, then plan the cleanup again",
        ));
    }
    finish(p)
}

fn finish(mut p: CleanupPlan) -> CleanupPlan {
    let todo = p.items.iter().filter(|i| CleanupAction::of(i).is_ok_and(CleanupAction::acts)).count();
    let pre_ok = p.preconditions.iter().all(|c| c.ok);
    p.executable = pre_ok && todo > 0;
    p.summary = if !pre_ok {
        format!(
            "refused: {}",
            p.preconditions.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    } else if todo == 0 {
        format!("nothing to clean on {}", p.host)
    } else {
        format!("{todo} stale definition(s) to remove from {}", p.host)
    };
    let mut h = Sha256::new();
    for i in &p.items {
        h.update(format!("{}|{}|{}\0", i.uuid, i.action, i.state).as_bytes());
    }
    p.plan_id = h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    p
}

async fn input(reg: &Registry, host: &str, destroy_running: bool) -> Result<CleanupInput, ControllerError> {
    let h = host.to_string();
    let (moves, owners, active) = reg
        .repos()
        .call(move |r| Ok((r.jobs().moves_from(&h)?, r.ownership().owners()?, r.jobs().active_checked()?)))
        .await?;
    // After the store call (it can take a while): the session and whether
    // its inventory came first, then the guests, so "fresh" never vouches
    // for a guest list older than itself.
    let connected = reg.has_session(host);
    let inventory_fresh = reg.inventory_fresh(host);
    let view = reg.host_view(host);
    let owners = owners.into_iter().map(|o| (o.uuid, o.host)).collect();
    // A job row that does not read blocks its own source only (see the engine's plan input).
    let (active, corrupt) = active;
    let active_job = active
        .into_iter()
        .find(|j| j.source == host)
        .map(|j| j.id)
        .or_else(|| corrupt.into_iter().find(|b| b.host == host || b.host.is_empty()).map(|b| b.key));
    Ok(CleanupInput {
        host: host.into(),
        host_known: view.is_some(),
        owners,
        guests: view.as_ref().map(|v| v.guests.clone()).unwrap_or_default(),
        connected,
        inventory_fresh,
        active_job,
        destroy_running,
        quarantined: moves.iter().map(|m| m.0.uuid.clone()).filter(|u| reg.is_quarantined(u)).collect(),
        moves,
    })
}

/// Plans a cleanup (no side effects).
pub async fn cleanup_plan(reg: &Registry, host: &str, destroy_running: bool) -> Result<CleanupPlan, ControllerError> {
    Ok(plan_cleanup(&input(reg, host, destroy_running).await?))
}

/// Carries out a cleanup.
pub async fn cleanup(
    reg: &Registry,
    host: &str,
    destroy_running: bool,
    plan_id: &str,
    operator: &str,
) -> Result<CleanupPlan, ControllerError> {
    let mut p = cleanup_plan(reg, host, destroy_running).await?;
    if !p.preconditions.iter().all(|c| c.ok) {
        if checks::failed(&p.preconditions, CheckId::NoStaleCopyRunning) {
            let detail = p
                .preconditions
                .iter()
                .find(|c| CheckId::of(c) == Ok(CheckId::NoStaleCopyRunning))
                .map(|c| c.detail.clone())
                .unwrap_or_default();
            reg.raise_alarm(host, "stale-copy-running", &detail).await?;
        }
        return Err(crate::error::refusal(&format!("cleanup of {host}"), &p.preconditions));
    }
    if !plan_id.is_empty() && plan_id != p.plan_id {
        return Err(ControllerError::Refused(format!(
            "the cleanup plan changed since it was made (reviewed {plan_id}, now {}); nothing was changed",
            p.plan_id
        )));
    }
    if !p.executable {
        return Ok(p);
    }
    let a = AuditRow {
        actor: operator.into(),
        action: "cleanup.requested".into(),
        host: host.into(),
        detail: format!("plan {}: {}", p.plan_id, p.summary),
        ..Default::default()
    };
    reg.repos().audit(move |l| l.append(&a)).await?;
    let jobs: BTreeMap<String, String> = p.items.iter().map(|i| (i.uuid.clone(), i.job.clone())).collect();
    for item in p.items.iter_mut().filter(|i| CleanupAction::of(i).is_ok_and(CleanupAction::acts)) {
        let cmd = CleanupGuest {
            uuid: item.uuid.clone(),
            name: item.name.clone(),
            destroy_running: CleanupAction::of(item) == Ok(CleanupAction::DestroyAndRemove),
        };
        let r = reg.call(host, Kind::CleanupGuest(cmd), Duration::from_secs(60)).await;
        match r {
            Ok(r) if r.ok => {
                let a = AuditRow {
                    actor: operator.into(),
                    action: "cleanup.removed".into(),
                    host: host.into(),
                    vm: item.name.clone(),
                    job: jobs.get(&item.uuid).cloned().unwrap_or_default(),
                    detail: format!(
                        "undefined stale {} ({}) on {host} ({}); it lives on {}; storage untouched",
                        item.name, item.uuid, r.outcome, item.moved_to
                    ),
                    ..Default::default()
                };
                let (job, uuid) = (item.job.clone(), item.uuid.clone());
                reg.repos().jobs(move |j| j.mark_cleaned(&job, &uuid, &a)).await?;
                CleanupAction::Removed.set(item);
                info!(%host, guest = %item.name, "stale definition removed");
            }
            Ok(r) => {
                CleanupAction::Failed.set(item);
                item.detail = r.error;
            }
            Err(e) => {
                CleanupAction::Failed.set(item);
                item.detail = e.to_string();
            }
        }
        if CleanupAction::of(item) == Ok(CleanupAction::Failed) {
            let a = AuditRow {
                actor: operator.into(),
                action: "cleanup.failed".into(),
                host: host.into(),
                vm: item.name.clone(),
                detail: item.detail.clone(),
                ..Default::default()
            };
            let _ = reg.repos().audit(move |l| l.append(&a)).await;
        }
    }
    let removed = p.items.iter().filter(|i| CleanupAction::of(i) == Ok(CleanupAction::Removed)).count();
    let failed = p.items.iter().filter(|i| CleanupAction::of(i) == Ok(CleanupAction::Failed)).count();
    p.summary = format!(
        "removed {removed} stale definition(s) from {host}{}",
        if failed > 0 { format!(", {failed} failed") } else { String::new() }
    );
    Ok(p)
}

/// Changes a host's status, with the runbook's checks.
pub async fn set_status(
    reg: &Registry,
    engine: &Engine,
    host: &str,
    status: &str,
    reason: &str,
    attest: bool,
    operator: &str,
) -> Result<(), ControllerError> {
    let to: HostStatus = status.parse().map_err(ControllerError::InvalidArgument)?;
    let rec = reg.get_host(host)?;
    let id = rec.info.as_ref().map(|i| i.host_id.clone()).unwrap_or_else(|| host.to_string());
    // The status as held (typed; a stored one that did not read was
    // quarantined at load), never the record's display text.
    let from: HostStatus =
        reg.status_of(&id).ok_or_else(|| ControllerError::NotFound(format!("unknown host '{id}'")))?;
    if from == to {
        return Ok(());
    }
    match to {
        HostStatus::Offline => {
            let req = MigrateRequest {
                source: id.clone(),
                attest_powered_off: attest,
                attest_reason: reason.to_string(),
                ..Default::default()
            };
            let p = engine.plan(&req).await?;
            let failed: Vec<&Check> = p
                .preconditions
                .iter()
                .filter(|c| !c.ok && matches!(CheckId::of(c), Ok(CheckId::SourceSilent | CheckId::SourcePoweredOff)))
                .collect();
            if !failed.is_empty() {
                let lines: Vec<String> = failed
                    .iter()
                    .map(|c| format!("  - {}: {}\n    what to do: {}", c.name, c.detail, c.remedy))
                    .collect();
                return Err(ControllerError::Refused(format!(
                    "declaring {id} OFFLINE refused (the same checks as a forced migration); nothing was changed:\n{}",
                    lines.join("\n")
                )));
            }
            // As a forced migration does: a host that comes back with the boot
            // id it had now never lost power, and is flagged (split brain).
            reg.mark_fenced(&id).await?;
        }
        HostStatus::Available | HostStatus::NotAccepting => {
            if rec.stale_definitions > 0 {
                return Err(ControllerError::Refused(format!(
                    "{id} still holds {} definition(s) of guests moved away from it; run `lifeboat cleanup {id} --yes` first (without --yes it only prints what it would remove; the runbook: cleanup, NOT_ACCEPTING, test, AVAILABLE)",
                    rec.stale_definitions
                )));
            }
            if from == HostStatus::Offline && rec.liveness != "REACHABLE" {
                return Err(ControllerError::Refused(format!(
                    "{id} is OFFLINE and not back yet; power it on and wait until it is REACHABLE"
                )));
            }
        }
        HostStatus::Maintenance => {}
    }
    reg.set_status(&id, to, reason, operator).await?;
    if matches!(to, HostStatus::Available | HostStatus::NotAccepting) {
        for kind in ["split-brain", "stale-copy-running"] {
            let h = id.clone();
            let n = reg.repos().alarms(move |a| a.clear(&h, kind)).await?;
            if n > 0 {
                reg.reload_alarms().await?;
                let a = AuditRow {
                    actor: operator.into(),
                    action: "alarm.cleared".into(),
                    host: id.clone(),
                    detail: format!("{n} {kind} alarm(s) cleared as {id} went back into service"),
                    ..Default::default()
                };
                reg.repos().audit(move |l| l.append(&a)).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::checks::CheckId;

    /// The check is `id` (by its id; its label is the id's).
    fn is(c: &Check, id: CheckId) -> bool {
        let yes = CheckId::of(c) == Ok(id);
        assert!(!yes || c.name == id.label(), "{c:?}");
        yes
    }

    fn mv(uuid: &str, name: &str) -> (MoveRow, i64) {
        (
            MoveRow {
                job_id: "j".into(),
                uuid: uuid.into(),
                name: name.into(),
                source: "a".into(),
                target: "b".into(),
                generation: 1,
                state: "RUNNING".parse().unwrap(),
                start: true,
                definition_xml: String::new(),
                error: String::new(),
                priority: 0,
                updated_ms: 0,
                memory_kib: 0,
            },
            0,
        )
    }

    fn g(uuid: &str, name: &str, running: bool) -> Guest {
        Guest {
            uuid: uuid.into(),
            name: name.into(),
            state: if running {
                lifeboat_proto::v1::GuestState::Running as i32
            } else {
                lifeboat_proto::v1::GuestState::Shutoff as i32
            },
            ..Default::default()
        }
    }

    fn input() -> CleanupInput {
        CleanupInput {
            host: "a".into(),
            host_known: true,
            moves: vec![mv("1", "vm1"), mv("2", "vm2")],
            owners: [("1", "b"), ("2", "b")].iter().map(|(u, h)| (u.to_string(), h.to_string())).collect(),
            guests: vec![g("1", "vm1", false), g("2", "vm2", false), g("9", "other", true)],
            connected: true,
            inventory_fresh: true,
            active_job: None,
            destroy_running: false,
            quarantined: BTreeSet::new(),
        }
    }

    #[test]
    fn a_host_whose_inventory_has_not_arrived_is_refused_not_judged_by_its_old_one() {
        let mut i = input();
        i.inventory_fresh = false;
        let p = plan_cleanup(&i);
        assert!(!p.executable);
        let c = p.preconditions.iter().find(|c| !c.ok).expect("a failed check");
        assert!(c.detail.contains("has not sent its inventory yet") && c.remedy.contains("plan again"), "{c:?}");
        i.connected = false;
        let p = plan_cleanup(&i);
        let c = p.preconditions.iter().find(|c| !c.ok).expect("a failed check");
        assert!(c.detail.contains("not connected"), "{c:?}");
    }

    #[test]
    fn removes_only_what_move_records_name() {
        let p = plan_cleanup(&input());
        assert!(p.executable);
        let names: Vec<_> = p.items.iter().map(|i| (i.name.as_str(), i.action.as_str())).collect();
        assert_eq!(names, [("vm1", "remove"), ("vm2", "remove")], "'other' is not touched");
        assert!(p.items.iter().all(|i| CleanupAction::of(i) == Ok(CleanupAction::Remove)));
    }

    #[test]
    fn every_item_carries_its_action_as_an_enum_and_every_check_an_id() {
        let mut i = input();
        i.guests[0] = g("1", "vm1", true);
        i.guests[1] = g("2", "renamed", false);
        i.moves.push(mv("3", "vm3"));
        i.moves.push(mv("4", "vm4"));
        i.owners.insert("4".into(), "a".into());
        let p = plan_cleanup(&i);
        let got: Vec<_> = p.items.iter().map(|i| (CleanupAction::of(i).unwrap(), i.action.as_str())).collect();
        assert_eq!(
            got,
            [
                (CleanupAction::RefuseRunning, "refuse-running"),
                (CleanupAction::RefuseRenamed, "refuse-renamed"),
                (CleanupAction::Gone, "gone"),
                (CleanupAction::Skip, "skip"),
            ]
        );
        assert!(p.preconditions.iter().all(|c| CheckId::of(c).is_ok()));
        assert!(checks::failed(&p.preconditions, CheckId::NoStaleCopyRunning));
        // An item whose enum was lost is never acted on, whatever its text says.
        let mut p = plan_cleanup(&input());
        p.items[0].cleanup_action = 0;
        assert!(!CleanupAction::of(&p.items[0]).is_ok_and(CleanupAction::acts));
    }

    #[test]
    fn a_running_stale_copy_refuses_unless_told() {
        let mut i = input();
        i.guests[0] = g("1", "vm1", true);
        let p = plan_cleanup(&i);
        assert!(!p.executable);
        assert!(
            p.preconditions
                .iter()
                .any(|c| is(c, CheckId::NoStaleCopyRunning) && !c.ok && c.remedy.contains("--destroy-running"))
        );
        i.destroy_running = true;
        let p = plan_cleanup(&i);
        assert!(p.executable);
        assert_eq!(p.items[0].action, "destroy-and-remove");
    }

    #[test]
    fn nothing_to_do_and_no_records_are_told_apart() {
        let mut i = input();
        i.guests.retain(|g| g.uuid == "9");
        let p = plan_cleanup(&i);
        assert!(!p.executable && p.preconditions.iter().all(|c| c.ok));
        assert!(p.summary.contains("nothing to clean"));
        i.moves.clear();
        let p = plan_cleanup(&i);
        assert!(p.preconditions.iter().any(|c| !c.ok && c.detail.contains("no move records")));
        let mut i = input();
        i.connected = false;
        assert!(!plan_cleanup(&i).executable);
        let mut i = input();
        i.guests[1] = g("2", "renamed", false);
        let p = plan_cleanup(&i);
        assert!(!p.executable, "a UUID with another name is not removed");
    }

    #[test]
    fn a_guest_whose_owner_row_is_quarantined_is_never_cleaned_as_if_it_had_no_owner() {
        use crate::ports::{AuditRow, JobRow, OwnerRow};
        use lifeboat_proto::v1::Inventory;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        // vm1 was moved a -> b by job j1, then moved back: its owner row says a, generation 2.
        let live = Guest { memory_kib: 1024, ..g("u1", "vm1", false) };
        let report = |reg: &Registry| {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            std::mem::forget(rx);
            let sid = reg.open_session("a", "boot", tx).unwrap();
            reg.apply_inventory("a", sid, Inventory { host: None, guests: vec![live.clone()], more: false }).unwrap();
        };
        {
            let reg = Registry::load(
                crate::store::sqlite::SqliteRepos::start(&path).unwrap(),
                crate::domain::host::Timing::default(),
            )
            .unwrap();
            report(&reg);
            let job = JobRow {
                id: "j1".into(),
                kind: crate::domain::JobKind::Migrate,
                source: "a".into(),
                state: "SUCCEEDED".parse().unwrap(),
                operator: "olga".into(),
                plan_id: "p".into(),
                power_evidence: crate::domain::PowerEvidence::Attestation,
                request: Vec::new(),
                parallel: 1,
                created_ms: 1,
                updated_ms: 1,
                error: String::new(),
            };
            let (m, _) = mv("u1", "vm1");
            let m = MoveRow { job_id: "j1".into(), ..m };
            reg.repos()
                .call_blocking(move |r| {
                    r.jobs().create(&job, &[m], &AuditRow::by_controller("t", "a", "vm1", String::new()))
                })
                .unwrap();
            let back = OwnerRow {
                uuid: "u1".into(),
                host: "a".into(),
                generation: 2,
                from_host: "b".into(),
                job: "j2".into(),
                complete: true,
            };
            reg.repos()
                .call_blocking(move |r| {
                    r.ownership().set_owner(&back, &AuditRow::by_controller("t", "a", "vm1", String::new()))
                })
                .unwrap();
            reg.refresh_owners_blocking().unwrap();
            let p = futures::executor::block_on(cleanup_plan(&reg, "a", false)).unwrap();
            assert_eq!(p.items[0].action, "skip", "{p:?}");
            reg.flush_blocking().unwrap();
        }
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("UPDATE owners SET generation = -5 WHERE uuid = 'u1'", [])
            .unwrap();
        let reg = Registry::load(
            crate::store::sqlite::SqliteRepos::start(&path).unwrap(),
            crate::domain::host::Timing::default(),
        )
        .unwrap();
        assert!(reg.is_quarantined("u1"));
        report(&reg);
        for destroy_running in [false, true] {
            let p = futures::executor::block_on(cleanup_plan(&reg, "a", destroy_running)).unwrap();
            assert!(!p.executable, "{p:?}");
            assert_eq!(p.items[0].action, "refuse-quarantined", "{p:?}");
            assert!(
                p.items[0].detail.contains("row-quarantined") && p.items[0].detail.contains("docs/security.md"),
                "{}",
                p.items[0].detail
            );
            let c = p.preconditions.iter().find(|c| !c.ok).expect("a failed precondition");
            assert!(c.detail.contains("vm1") && c.detail.contains("quarantine"), "{c:?}");
            assert!(p.summary.starts_with("refused"), "{}", p.summary);
        }
    }
}
