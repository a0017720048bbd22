//! Operators' commands on guests missing on their owner: `lifeboat vms
//! restore` (define the kept definition again, optionally elsewhere and
//! started) and `lifeboat vms forget` (drop the record on purpose). The
//! checks are pure ([`restore_checks`]); the async part carries them out.

use std::time::Duration;

use lifeboat_proto::v1::{
    Check, DefineGuest, ForgetGuestRequest, ForgetGuestResponse, GuestRecord, RestoreGuestRequest, StartGuest,
    command::Kind,
};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::alarms::{MAX_NAME, MAX_REASON};
use crate::domain::host::HostStatus;
use crate::error::{ControllerError, refusal};
use crate::ports::{AuditRow, OwnerRow};
use crate::registry::Registry;

mod start;
pub use start::start_vm;
pub(crate) use start::{StartEnd, guarded_start};

/// Held for the whole of a restore (checks, record, define, start).
static RESTORES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long one agent call of a restore may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restore waits for the agent's report of the defined guest.
const REPORT_WAIT: Duration = Duration::from_secs(10);

use crate::domain::checks::{CheckId, check};

/// What the restore checks read.
#[derive(Debug, Clone)]
pub struct RestoreInput {
    /// Guest name and UUID.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Whether a definition is kept.
    pub has_definition: bool,
    /// The owner it is restored on without `--to`.
    pub owner: String,
    /// Where it is defined now: (host, state).
    pub reported_on: Vec<(String, i32)>,
    /// The active job acting on it, if any.
    pub job: Option<String>,
    /// Target host (the owner, or `--to`).
    pub target: String,
    /// The target's agent is connected and heard from.
    pub target_reachable: bool,
    /// The target's status.
    pub target_status: Option<HostStatus>,
    /// The owner's agent is connected and heard from.
    pub owner_reachable: bool,
    /// The owner's status.
    pub owner_status: Option<HostStatus>,
    /// `--start`.
    pub start: bool,
    /// Why the controller may not act on what hosts reported yet (startup
    /// grace, a restored database not yet rebuilt), if so.
    pub hold: Option<String>,
    /// The guest's memory (KiB), as last reported.
    pub guest_memory_kib: u64,
    /// The target's memory as the planner counts it, for `--start`.
    pub target_memory: TargetMemory,
}

/// A target's memory figures (KiB): what a start there may use is the total
/// less the running guests, the configured reserve and what moves under way
/// have reserved there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetMemory {
    /// Total memory the host reports.
    pub total_kib: u64,
    /// Memory of the guests it runs.
    pub running_kib: u64,
    /// The configured per-host reserve.
    pub reserve_kib: u64,
    /// Held by moves under way to it (not yet running there).
    pub reserved_kib: u64,
}

impl TargetMemory {
    /// What is left for one more guest.
    pub fn free_kib(&self) -> u64 {
        self.total_kib
            .saturating_sub(self.running_kib)
            .saturating_sub(self.reserve_kib)
            .saturating_sub(self.reserved_kib)
    }
}

/// Every check of a restore (pure); all must pass.
pub fn restore_checks(i: &RestoreInput) -> Vec<Check> {
    let moving = i.target != i.owner;
    let mut out = vec![
        check(
            CheckId::ReportsCurrent,
            i.hold.is_none(),
            i.hold.clone().unwrap_or_else(|| "every host's report is current".into()),
            "wait until the hosts have reconnected and reported (`lifeboat alarms`, `lifeboat hosts list`), then run the same command again",
        ),
        check(
            CheckId::DefinitionKept,
            i.has_definition,
            if i.has_definition {
                "the last definition is kept".into()
            } else {
                format!("no definition of {} was ever read", i.name)
            },
            "define it by hand (virsh define) on its owner, or `lifeboat vms forget` it",
        ),
        check(
            CheckId::DefinedNowhere,
            i.reported_on.is_empty(),
            if i.reported_on.is_empty() {
                "no host reports it".to_string()
            } else {
                format!("defined on {}", i.reported_on.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join(", "))
            },
            "it is not lost: nothing to restore (`lifeboat vms show` shows where it is)",
        ),
        check(
            CheckId::NoJob,
            i.job.is_none(),
            match &i.job {
                None => "no job acts on it".to_string(),
                Some(j) => format!("job {j} acts on it"),
            },
            "wait for the job to end (`lifeboat jobs watch`)",
        ),
        check(
            CheckId::RestoreTargetReachable,
            i.target_reachable,
            format!(
                "{} {}",
                i.target,
                if i.target_reachable {
                    "talks to the controller and reported its guests"
                } else {
                    "is not talking to the controller or has not reported its guests in this session"
                }
            ),
            format!(
                "start {}'s agent (`systemctl start lifeboat-agent`), or restore it elsewhere with --to HOST",
                i.target
            ),
        ),
    ];
    if moving {
        let accepting = i.target_status == Some(HostStatus::Available);
        out.push(check(
            CheckId::TargetAccepting,
            accepting,
            format!("{} is {}", i.target, i.target_status.map(|s| s.as_str()).unwrap_or("unknown")),
            format!("choose an AVAILABLE host, or `lifeboat hosts set-status {} AVAILABLE`", i.target),
        ));
        // The owner must be known not to hold it: talking to us (and not
        // reporting it), or declared OFFLINE (proven off).
        let sure = i.owner_reachable || i.owner_status == Some(HostStatus::Offline);
        out.push(check(
            CheckId::OwnerHoldsNothing,
            sure,
            if sure {
                format!("{} does not hold it", i.owner)
            } else {
                format!("{} (its owner) is silent: it may hold the guest again without Lifeboat seeing it", i.owner)
            },
            format!(
                "bring {}'s agent back (then restore without --to), or declare it OFFLINE (`lifeboat hosts set-status {} OFFLINE`)",
                i.owner, i.owner
            ),
        ));
    }
    if i.start {
        let ok = matches!(i.target_status, Some(HostStatus::Available | HostStatus::NotAccepting));
        out.push(check(
            CheckId::TargetMayRun,
            ok,
            format!("{} is {}", i.target, i.target_status.map(|s| s.as_str()).unwrap_or("unknown")),
            "restore without --start, or make the host AVAILABLE first",
        ));
        let m = i.target_memory;
        let fits = i.guest_memory_kib <= m.free_kib();
        let mib = |k: u64| k / 1024;
        out.push(check(
            CheckId::TargetMemory,
            fits,
            format!(
                "{} needs {} MiB; {} has {} MiB free ({} MiB total - {} MiB running - {} MiB reserve - {} MiB reserved by moves under way)",
                i.name,
                mib(i.guest_memory_kib),
                i.target,
                mib(m.free_kib()),
                mib(m.total_kib),
                mib(m.running_kib),
                mib(m.reserve_kib),
                mib(m.reserved_kib)
            ),
            "restore without --start and start it once memory is free, or restore it elsewhere with --to HOST",
        ));
    }
    out
}

fn audit(operator: &str, action: &str, host: &str, vm: &str, detail: String) -> AuditRow {
    AuditRow {
        actor: operator.into(),
        action: action.into(),
        host: host.into(),
        vm: vm.into(),
        detail,
        ..Default::default()
    }
}

fn reason_of(r: &str, what: &str) -> Result<String, ControllerError> {
    let r = bounded(r, "--reason", MAX_REASON, what)?;
    if r.is_empty() {
        return Err(ControllerError::InvalidArgument(format!(
            "{what}: --reason is required (it is recorded in the audit log)"
        )));
    }
    Ok(r.to_string())
}

/// Outside input, trimmed: at most `max` bytes, no control characters.
/// `flag` names it in the error.
pub fn bounded<'a>(v: &'a str, flag: &str, max: usize, what: &str) -> Result<&'a str, ControllerError> {
    let v = v.trim();
    if v.len() > max {
        return Err(ControllerError::InvalidArgument(format!(
            "{what}: {flag} is {} bytes long; at most {max}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(ControllerError::InvalidArgument(format!("{what}: {flag} contains control characters")));
    }
    Ok(v)
}

/// Marks a restored guest as acted on (pseudo job `restore-UUID`) for as
/// long as it lives: the reconciler leaves the guest alone, and a move
/// started meanwhile replaces the mark (which the restore's re-checks see).
/// Dropping it ends the mark on every path, errors included.
pub(crate) struct Claim<'a> {
    reg: &'a Registry,
    job: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.reg.clear_in_job(&self.job);
    }
}

/// Claims `uuid` for `job` (a pseudo job such as `start-UUID`; `source`
/// its owner, `target` where it acts) until the returned guard is dropped,
/// unless a job acts on it already, which is returned.
pub(crate) fn claim<'a>(
    reg: &'a Registry,
    uuid: &str,
    job: &str,
    source: &str,
    target: &str,
) -> Result<Claim<'a>, String> {
    reg.claim_for_restore(uuid, job, source, target)?;
    Ok(Claim { reg, job: job.to_string() })
}

/// Refuses (changing nothing) an operator's action on a guest with a
/// database row in quarantine: who owns it, and at which generation, is
/// unknown, never "no owner". `what` names the action.
pub(crate) fn refuse_quarantined(reg: &Registry, uuid: &str, name: &str, what: &str) -> Result<(), ControllerError> {
    if !reg.is_quarantined(uuid) {
        return Ok(());
    }
    Err(refusal(
        &format!("{what} {name} ({uuid})"),
        &[check(
            CheckId::OwnershipReadable,
            false,
            "the guest's ownership record is quarantined (a database row of it could not be read: alarm row-quarantined); \
             who owns it, and at which generation, is unknown",
            "repair the row as the row-quarantined alarm says and restart the controller; see docs/security.md, \
             \"The database never poisons a start\"",
        )],
    ))
}

/// Right before a restore grants a lease or starts the guest: its owner is
/// still what the restore recorded and no job took it over meanwhile.
fn still_ours(
    reg: &Registry,
    uuid: &str,
    name: &str,
    target: &str,
    generation: u64,
    job: &str,
) -> Result<(), ControllerError> {
    let owner = reg.owner_row(uuid);
    let theirs = reg.job_of(uuid).filter(|j| j != job);
    let same = owner.as_ref().is_some_and(|o| o.host == target && o.generation == generation && o.complete);
    if same && theirs.is_none() {
        return Ok(());
    }
    let why = match theirs {
        Some(j) => format!("job {j} acts on it now"),
        None => format!(
            "its ownership record changed to {} (restore recorded {target}, generation {generation})",
            owner
                .map(|o| format!(
                    "{}, generation {}{}",
                    o.host,
                    o.generation,
                    if o.complete { "" } else { ", unfinished" }
                ))
                .unwrap_or_else(|| "none".into())
        ),
    };
    Err(ControllerError::Refused(format!(
        "{name} ({uuid}) is defined on {target} but was not started: {why}; nothing else was changed. \
         See `lifeboat vms show {uuid}` and `lifeboat jobs list`"
    )))
}

/// `lifeboat vms restore`: defines a missing guest's last definition again
/// on its owner (or `to_host`, a placement change recorded first, with the
/// next generation), then optionally grants its lease and starts it.
/// Refusals change nothing and name every failed check.
pub async fn restore(
    reg: &Registry,
    req: &RestoreGuestRequest,
    operator: &str,
    lease_ttl_ms: i64,
    memory_reserve_kib: u64,
) -> Result<GuestRecord, ControllerError> {
    const WHAT: &str = "restoring a guest";
    let reason = reason_of(&req.reason, WHAT)?;
    let vm = bounded(&req.vm, "VM", MAX_NAME, WHAT)?;
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("{WHAT}: no guest given")));
    }
    let to_host = bounded(&req.to_host, "--to", MAX_NAME, WHAT)?;
    // One restore (or forget) at a time: two at once could both pass the
    // checks and define one guest on two hosts.
    let _one = RESTORES.lock().await;
    let r = reg.find_missing(vm, WHAT)?;
    let (uuid, name) = (r.guest.uuid.clone(), r.guest.name.clone());
    refuse_quarantined(reg, &uuid, &name, "restoring")?;
    let owner = reg.restore_owner(&r);
    let target = match to_host {
        "" => owner.clone(),
        h => reg.get_host(h)?.info.map(|i| i.host_id).unwrap_or_default(),
    };
    let input = RestoreInput {
        name: name.clone(),
        uuid: uuid.clone(),
        has_definition: !r.guest.definition_xml.trim().is_empty(),
        owner: owner.clone(),
        reported_on: reg.reported_on(&uuid),
        job: reg.job_of(&uuid),
        target_reachable: reg.reports_now(&target),
        target_status: reg.status_of(&target),
        owner_reachable: reg.reports_now(&owner),
        owner_status: reg.status_of(&owner),
        target: target.clone(),
        start: req.start,
        hold: reg.hold(reg.now_ms()),
        guest_memory_kib: r.guest.memory_kib,
        target_memory: if req.start {
            target_memory(reg, &target, memory_reserve_kib).await?
        } else {
            TargetMemory::default()
        },
    };
    let checks = restore_checks(&input);
    if checks.iter().any(|c| !c.ok) {
        info!(operator, guest = %name, "restore refused");
        return Err(refusal(&format!("restoring {name} ({uuid}) on {target}"), &checks));
    }
    let job = format!("restore-{uuid}");
    if let Err(other) = reg.claim_for_restore(&uuid, &job, &owner, &target) {
        return Err(refusal(
            &format!("restoring {name} ({uuid}) on {target}"),
            &[check(
                CheckId::NoJob,
                false,
                format!("job {other} acts on it"),
                "wait for the job to end (`lifeboat jobs watch`)",
            )],
        ));
    }
    let _claim = Claim { reg, job: job.clone() };
    // The placement is recorded before it is carried out: a new owner
    // (--to) gets the next generation; a guest never moved gets its first
    // ownership record (a definition needs a generation).
    let current = reg.owner_row(&uuid);
    let generation = match &current {
        Some(o) if o.host == target => o.generation.max(1),
        Some(o) => o
            .generation
            .checked_add(1)
            .ok_or_else(|| ControllerError::Internal(format!("generation of {uuid} overflows")))?,
        None => 1,
    };
    if current.as_ref().is_none_or(|o| o.host != target || o.generation != generation || !o.complete) {
        let row = OwnerRow {
            uuid: uuid.clone(),
            host: target.clone(),
            generation,
            // Where it was last: its owner, or the host it vanished from.
            from_host: [owner.as_str(), r.host.as_str()]
                .into_iter()
                .find(|h| *h != target)
                .unwrap_or_default()
                .to_string(),
            job: String::new(),
            complete: true,
        };
        let desired = reg.desired_of(&uuid).map(|d| d.1).unwrap_or_else(|| "stopped".into());
        let a = audit(
            operator,
            "guest.restore.recorded",
            &target,
            &name,
            format!(
                "{name} ({uuid}) is to be defined on {target} with ownership generation {generation} (was missing on {}); reason: {reason}",
                r.host
            ),
        );
        reg.record_restore_owner(&row, &desired, &a).await?;
    }
    // Its owner is recorded on the target now: a wait on another host
    // (its old owner) would never end there.
    crate::waiting::end_elsewhere(reg, &uuid, &target, &format!("restored on {target} by {operator}")).await?;
    let define = DefineGuest { definition_xml: r.guest.definition_xml.clone(), owner_host: target.clone(), generation };
    let res = reg.call(&target, Kind::DefineGuest(define), CALL_TIMEOUT).await;
    let failed = match &res {
        Ok(x) if x.ok => None,
        Ok(x) => Some(x.error.clone()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(err) = failed {
        let msg = format!(
            "defining {name} ({uuid}) on {target} failed: {err}; it stays missing (ownership generation {generation} on {target} \
             is recorded); fix the cause and run the same restore again"
        );
        let a = audit(operator, "guest.restore.failed", &target, &name, msg.clone());
        reg.repos().audit(move |l| l.append(&a)).await?;
        return Err(ControllerError::AgentUnavailable(msg));
    }
    let outcome = res.map(|x| x.outcome).unwrap_or_default();
    let a = audit(
        operator,
        "guest.restored",
        &target,
        &name,
        format!(
            "defined {name} ({uuid}) on {target} ({outcome}), autostart off, owner generation {generation}; reason: {reason}"
        ),
    );
    reg.repos().audit(move |l| l.append(&a)).await?;
    // The agent reports the new definition; that clears the missing mark.
    let t0 = tokio::time::Instant::now();
    while !reg.reported_on(&uuid).iter().any(|(h, _)| *h == target) {
        if t0.elapsed() > REPORT_WAIT {
            let msg = format!(
                "{name} ({uuid}) was defined on {target}, but {target} has not reported it within {REPORT_WAIT:?}{}; \
                 `lifeboat vms show {uuid}` later{}",
                if req.start { ", so it was NOT started" } else { "" },
                if req.start { ", then `lifeboat vms start` it" } else { "" }
            );
            let a = audit(operator, "guest.restore.unreported", &target, &name, msg.clone());
            reg.repos().audit(move |l| l.append(&a)).await?;
            return Err(ControllerError::AgentUnavailable(msg));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if req.start {
        start(reg, &uuid, &name, &target, generation, lease_ttl_ms, operator, &job).await?;
    }
    reg.list_guests(Some(&target), Some(&uuid), false)?
        .into_iter()
        .next()
        .ok_or_else(|| ControllerError::NotFound(format!("{name} is no longer listed on {target}")))
}

/// The target's memory figures as the planner counts them (reservations of
/// moves whose guest already runs there are in its running figure).
async fn target_memory(reg: &Registry, target: &str, reserve_kib: u64) -> Result<TargetMemory, ControllerError> {
    let Some(view) = reg.host_view(target) else { return Ok(TargetMemory { reserve_kib, ..Default::default() }) };
    let reservations: Vec<crate::migrate::plan::Reservation> = reg
        .repos()
        .jobs({
            let now = reg.now_ms();
            move |j| j.reservations(now)
        })
        .await?
        .into_iter()
        .map(|r| crate::migrate::plan::Reservation {
            job: r.job_id,
            uuid: r.uuid,
            name: r.name,
            target: r.target,
            memory_kib: r.memory_kib,
        })
        .collect();
    let held = crate::migrate::plan::held_by_reservations(&reservations, std::slice::from_ref(&view));
    let reserved_kib =
        held.get(target).map(|v| v.iter().fold(0u64, |a, r| a.saturating_add(r.memory_kib))).unwrap_or(0);
    Ok(TargetMemory {
        total_kib: view.memory_total_kib,
        running_kib: view.running_memory_kib,
        reserve_kib,
        reserved_kib,
    })
}

/// Grants the lease and starts a restored guest, never where another host
/// holds it.
#[allow(clippy::too_many_arguments)]
async fn start(
    reg: &Registry,
    uuid: &str,
    name: &str,
    target: &str,
    generation: u64,
    lease_ttl_ms: i64,
    operator: &str,
    job: &str,
) -> Result<(), ControllerError> {
    still_ours(reg, uuid, name, target, generation, job)?;
    let elsewhere: Vec<String> = reg
        .reported_on(uuid)
        .into_iter()
        .filter(|(h, s)| h != target && lifeboat_proto::holds_disk(*s))
        .map(|(h, _)| h)
        .collect();
    if !elsewhere.is_empty() {
        return Err(ControllerError::Refused(format!(
            "{name} was defined on {target} but not started: {} runs it; nothing else was changed",
            elsewhere.join(", ")
        )));
    }
    let grant = crate::domain::policy::merged_lease_at(uuid, name, generation, lease_ttl_ms, reg.now_ms());
    let step = |r: Result<lifeboat_proto::v1::CommandResult, ControllerError>, what: &str| match r {
        Ok(x) if x.ok => Ok(x.outcome),
        Ok(x) => Err(format!("{what} failed: {}", x.error)),
        Err(e) => Err(format!("{what} failed: {e}")),
    };
    let res = match step(reg.call(target, Kind::GrantLeases(grant), CALL_TIMEOUT).await, "granting its lease") {
        Ok(_) => {
            still_ours(reg, uuid, name, target, generation, job)?;
            step(
                reg.call(target, Kind::StartGuest(StartGuest { uuid: uuid.into() }), CALL_TIMEOUT).await,
                "starting it",
            )
        }
        Err(e) => Err(e),
    };
    match res {
        Ok(outcome) => {
            let a = audit(
                operator,
                "guest.started",
                target,
                name,
                format!("{name} ({uuid}) started on {target} ({outcome})"),
            );
            reg.repos().audit(move |l| l.append(&a)).await?;
            Ok(())
        }
        Err(e) => {
            let msg =
                format!("{name} is defined on {target} again, but {e}; `lifeboat vms show {uuid}`, then start it");
            let a = audit(operator, "guest.start.failed", target, name, msg.clone());
            reg.repos().audit(move |l| l.append(&a)).await?;
            Err(ControllerError::AgentUnavailable(msg))
        }
    }
}

/// `lifeboat vms forget`: drops a missing guest's record (kept definition
/// and desired state) on an operator's word, audited with the definition's
/// size and SHA-256; clears its alarm.
pub fn forget(
    reg: &Registry,
    req: &ForgetGuestRequest,
    operator: &str,
) -> Result<ForgetGuestResponse, ControllerError> {
    const WHAT: &str = "forgetting a guest";
    let reason = reason_of(&req.reason, WHAT)?;
    let vm = bounded(&req.vm, "VM", MAX_NAME, WHAT)?;
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("{WHAT}: no guest given")));
    }
    // Not while a restore of it may be under way (it would define what is
    // being forgotten); forget is quick, so a busy lock is a refusal.
    let Ok(_one) = RESTORES.try_lock() else {
        return Err(ControllerError::Refused(format!(
            "{WHAT} refused; nothing was changed. Failed check:\n  - no-restore: a restore is under way\n    what to do: run the same command again in a minute"
        )));
    };
    let r = reg.find_missing(vm, WHAT)?;
    refuse_quarantined(reg, &r.guest.uuid, &r.guest.name, "forgetting")?;
    if let Some(why) = reg.hold(reg.now_ms()) {
        return Err(refusal(
            &format!("forgetting {} ({})", r.guest.name, r.guest.uuid),
            &[check(
                CheckId::ReportsCurrent,
                false,
                why,
                "wait until the hosts have reconnected and reported, then run the same command again",
            )],
        ));
    }
    let def = r.guest.definition_xml.as_bytes();
    let sha: String = Sha256::digest(def).iter().map(|b| format!("{b:02x}")).collect();
    let a = audit(
        operator,
        "guest.forgotten",
        &r.host,
        &r.guest.name,
        format!(
            "{} ({}), missing on {}, forgotten: its kept definition ({} bytes, sha256 {sha}) is dropped; reason: {reason}",
            r.guest.name,
            r.guest.uuid,
            r.host,
            def.len()
        ),
    );
    // Runs on a blocking thread (the handler's `spawn_blocking`).
    let r = reg.forget_missing(&r.guest.uuid, &a)?;
    crate::waiting::end_forgotten(reg, &r.guest.uuid, &format!("{} was forgotten by {operator}", r.guest.name))?;
    Ok(ForgetGuestResponse {
        uuid: r.guest.uuid,
        name: r.guest.name,
        host: r.host,
        definition_bytes: def.len() as u64,
        definition_sha256: sha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> RestoreInput {
        RestoreInput {
            name: "vm1".into(),
            uuid: "u1".into(),
            has_definition: true,
            owner: "a".into(),
            reported_on: vec![],
            job: None,
            target: "a".into(),
            target_reachable: true,
            target_status: Some(HostStatus::Available),
            owner_reachable: true,
            owner_status: Some(HostStatus::Available),
            start: false,
            hold: None,
            guest_memory_kib: 512 * 1024,
            target_memory: TargetMemory {
                total_kib: 4 << 20,
                running_kib: 1 << 20,
                reserve_kib: 1 << 20,
                reserved_kib: 1 << 20,
            },
        }
    }

    fn failed(i: &RestoreInput) -> Vec<String> {
        restore_checks(i).into_iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }

    #[test]
    fn a_restore_on_its_owner_needs_a_definition_a_free_uuid_and_a_talking_owner() {
        assert!(failed(&input()).is_empty());
        let i = RestoreInput { reported_on: vec![("b".into(), 1)], ..input() };
        assert_eq!(failed(&i), ["defined-nowhere"]);
        let i = RestoreInput { has_definition: false, target_reachable: false, job: Some("j1".into()), ..input() };
        assert_eq!(failed(&i), ["definition-kept", "no-job", "target-reachable"]);
        let i = RestoreInput { start: true, target_status: Some(HostStatus::Maintenance), ..input() };
        assert_eq!(failed(&i), ["target-may-run"]);
    }

    #[test]
    fn a_start_needs_the_targets_free_memory_less_running_reserve_and_reservations() {
        let i = RestoreInput { start: true, guest_memory_kib: 1 << 20, ..input() };
        assert!(failed(&i).is_empty(), "1 GiB fits 4 - 1 - 1 - 1 GiB");
        let i = RestoreInput { guest_memory_kib: (1 << 20) + 1, ..i };
        assert_eq!(failed(&i), ["target-memory"]);
        let c = restore_checks(&i).into_iter().find(|c| c.name == "target-memory").unwrap();
        assert_eq!(
            c.detail,
            "vm1 needs 1024 MiB; a has 1024 MiB free (4096 MiB total - 1024 MiB running - 1024 MiB reserve - 1024 MiB reserved by moves under way)"
        );
        let huge = TargetMemory { total_kib: 1, running_kib: u64::MAX, reserve_kib: u64::MAX, reserved_kib: u64::MAX };
        assert_eq!(huge.free_kib(), 0);
        assert_eq!(failed(&RestoreInput { start: false, ..i }), Vec::<String>::new(), "without --start nothing runs");
    }

    #[test]
    fn a_restore_waits_for_current_reports_and_outside_input_is_bounded() {
        let i = RestoreInput { hold: Some("startup grace: 6000 ms".into()), ..input() };
        assert_eq!(failed(&i), ["reports-current"]);
        assert_eq!(bounded(" vm1 ", "VM", 8, "x").unwrap(), "vm1");
        let e = bounded("vm\n1", "VM", 8, "restoring a guest").unwrap_err().to_string();
        assert!(e.contains("VM contains control characters"), "{e}");
        let e = bounded(&"r".repeat(MAX_REASON + 1), "--reason", MAX_REASON, "x").unwrap_err().to_string();
        assert!(e.contains("--reason is 2049 bytes long; at most 2048"), "{e}");
    }

    /// A registry whose host `a` reported `vm1` (u1) and then lost it.
    fn with_missing_vm1(
        ms: u32,
    ) -> (Registry, crate::registry::SessionId, tokio::sync::mpsc::Receiver<Box<lifeboat_proto::v1::ControllerMessage>>)
    {
        use lifeboat_proto::v1::{Guest, GuestState, Inventory};
        let timing = crate::domain::host::Timing { heartbeat_interval_ms: ms / 4, unreachable_after_ms: ms };
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), timing).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx).unwrap();
        let g = Guest {
            uuid: "u1".into(),
            name: "vm1".into(),
            state: GuestState::Shutoff as i32,
            definition_xml: "<domain/>".into(),
            ..Default::default()
        };
        reg.apply_inventory("a", a, Inventory { host: None, guests: vec![g], more: false }).unwrap();
        reg.remove_guest("a", a, "u1").unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"]);
        (reg, a, rx)
    }

    #[tokio::test]
    async fn restore_and_forget_refuse_before_hosts_report_and_forget_ends_a_wait() {
        let (reg, a, _rx) = with_missing_vm1(300);
        let req = |vm: &str, to: &str| RestoreGuestRequest {
            vm: vm.into(),
            to_host: to.into(),
            start: true,
            reason: "oops".into(),
        };
        // Right after the controller started, nothing any host reported is current yet.
        let e = restore(&reg, &req("vm1", ""), "olga", 3000, 0).await.unwrap_err().to_string();
        assert!(e.contains("reports-current") && e.contains("startup grace"), "{e}");
        let fr = ForgetGuestRequest { vm: "vm1".into(), reason: "retired".into() };
        let e = forget(&reg, &fr, "olga").unwrap_err().to_string();
        assert!(e.contains("reports-current"), "{e}");
        assert_eq!(reg.missing_uuids(), ["u1"], "refusals change nothing");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (tx, _rx_b) = tokio::sync::mpsc::channel(8);
        let b = reg.open_session("b", "boot", tx).unwrap();
        for (h, sid) in [("a", a), ("b", b)] {
            reg.heard_cell(h, sid).unwrap().store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
        // b talks but has not reported its guests in this session: it may hold vm1.
        let e = restore(&reg, &req("vm1", "b"), "olga", 3000, 0).await.unwrap_err().to_string();
        assert!(e.contains("target-reachable") && e.contains("has not reported its guests"), "{e}");
        // Outside input is bounded and printable.
        let e = restore(&reg, &RestoreGuestRequest { reason: "a\u{7}b".into(), ..req("vm1", "") }, "olga", 3000, 0)
            .await
            .unwrap_err();
        assert!(matches!(e, ControllerError::InvalidArgument(_)), "{e}");
        let e = forget(&reg, &ForgetGuestRequest { vm: "v".repeat(MAX_NAME + 1), ..fr.clone() }, "olga").unwrap_err();
        assert!(matches!(e, ControllerError::InvalidArgument(_)), "{e}");

        // The restore's re-checks before its lease and its start.
        let o = OwnerRow {
            uuid: "u1".into(),
            host: "a".into(),
            generation: 1,
            from_host: String::new(),
            job: String::new(),
            complete: true,
        };
        reg.record_restore_owner(&o, "running", &AuditRow::by_controller("t", "a", "vm1", String::new()))
            .await
            .unwrap();
        reg.claim_for_restore("u1", "restore-u1", "a", "a").unwrap();
        assert_eq!(
            reg.claim_for_restore("u1", "restore-u1", "a", "a"),
            Err("restore-u1".to_string()),
            "one claim at a time"
        );
        still_ours(&reg, "u1", "vm1", "a", 1, "restore-u1").unwrap();
        reg.set_in_job("mig-7", &[("u1".into(), "a".into(), "c".into())]);
        let e = still_ours(&reg, "u1", "vm1", "a", 1, "restore-u1").unwrap_err().to_string();
        assert!(e.contains("job mig-7 acts on it now") && e.contains("not started"), "{e}");
        reg.clear_in_job("mig-7");
        assert!(reg.job_of("u1").is_none());
        let moved = OwnerRow { host: "c".into(), generation: 2, complete: false, ..o.clone() };
        reg.repos()
            .call_blocking(move |r| {
                r.ownership().set_owner(&moved, &AuditRow::by_controller("t", "c", "vm1", String::new()))
            })
            .unwrap();
        reg.refresh_owners().await.unwrap();
        let e = still_ours(&reg, "u1", "vm1", "a", 1, "x").unwrap_err().to_string();
        assert!(e.contains("changed to c, generation 2, unfinished"), "{e}");
        {
            let _claim = Claim { reg: &reg, job: "restore-u1".into() };
            reg.claim_for_restore("u1", "restore-u1", "a", "a").unwrap();
        }
        assert!(reg.job_of("u1").is_none(), "the claim ends when dropped");

        // vm1 also waits on a (a job left it behind): forgetting it ends the wait and its alarm.
        let w = crate::ports::WaitingRow {
            uuid: "u1".into(),
            host: "a".into(),
            name: "vm1".into(),
            reason: "r".into(),
            since_ms: 1,
            job: "mig-1".into(),
        };
        let w_stored = w.clone();
        reg.repos()
            .call_blocking(move |r| {
                r.jobs().end_with_waiting(
                    "mig-1",
                    crate::domain::job::JobState::Partial,
                    "",
                    None,
                    std::slice::from_ref(&w_stored),
                    &[],
                )
            })
            .unwrap();
        crate::waiting::raise(&reg, std::slice::from_ref(&w), &[]).await.unwrap();
        {
            let _busy = RESTORES.lock().await;
            let e = forget(&reg, &fr, "olga").unwrap_err().to_string();
            assert!(e.contains("no-restore"), "{e}");
        }
        forget(&reg, &fr, "olga").unwrap();
        assert!(
            reg.repos().call_blocking(move |r| r.jobs().waiting()).unwrap().is_empty(),
            "a forgotten guest waits no more"
        );
        let kinds: Vec<String> = reg.active_alarms().into_iter().map(|a| a.1).collect();
        assert!(kinds.is_empty(), "{kinds:?}");
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
        assert!(
            log.iter().any(|a| a.action == "guest.waiting_ended" && a.detail.contains("forgotten by olga")),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_restore_whose_define_is_not_reported_starts_nothing_says_so_and_releases_the_guest() {
        use lifeboat_proto::v1::{CommandResult, controller_message::Msg};
        let (reg, a, mut rx) = with_missing_vm1(300);
        let reg = std::sync::Arc::new(reg);
        tokio::time::sleep(Duration::from_millis(700)).await;
        reg.heard_cell("a", a).unwrap().store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
        // An agent that carries out every command but never reports the guest.
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let agent = reg.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Some(Msg::Command(c)) = m.msg {
                    let _ = seen_tx.send(match c.kind {
                        Some(Kind::DefineGuest(_)) => "define",
                        Some(Kind::GrantLeases(_)) => "grant",
                        Some(Kind::StartGuest(_)) => "start",
                        _ => "other",
                    });
                    agent.complete(CommandResult { id: c.id, ok: true, outcome: "done".into(), ..Default::default() });
                }
            }
        });
        let req = RestoreGuestRequest { vm: "vm1".into(), to_host: String::new(), start: true, reason: "oops".into() };
        let e = restore(&reg, &req, "olga", 3000, 0).await.unwrap_err().to_string();
        assert!(e.contains("was NOT started") && e.contains("lifeboat vms start"), "{e}");
        let mut sent = Vec::new();
        while let Ok(k) = seen.try_recv() {
            sent.push(k);
        }
        assert_eq!(sent, ["define"], "no lease, no start: {sent:?}");
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
        assert!(log.iter().any(|x| x.action == "guest.restore.unreported" && x.actor == "olga"), "{log:?}");
        assert!(reg.job_of("u1").is_none(), "the restore's mark ends with it, on errors too");
    }

    #[tokio::test]
    async fn restore_forget_and_start_refuse_a_guest_whose_owner_row_is_quarantined_and_change_nothing() {
        use lifeboat_proto::v1::{Guest, GuestState, Inventory};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        let timing = crate::domain::host::Timing { heartbeat_interval_ms: 75, unreachable_after_ms: 300 };
        {
            // vm1 went missing on a; it had been moved away and back (owner a, generation 2).
            let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), timing).unwrap();
            let (tx, _rx) = tokio::sync::mpsc::channel(8);
            let a = reg.open_session("a", "boot", tx).unwrap();
            let g = Guest {
                uuid: "u1".into(),
                name: "vm1".into(),
                state: GuestState::Shutoff as i32,
                definition_xml: "<domain/>".into(),
                ..Default::default()
            };
            reg.apply_inventory("a", a, Inventory { host: None, guests: vec![g], more: false }).unwrap();
            let o = OwnerRow {
                uuid: "u1".into(),
                host: "a".into(),
                generation: 2,
                from_host: "b".into(),
                job: "mig-2".into(),
                complete: true,
            };
            reg.repos()
                .call_blocking(move |r| {
                    r.ownership().set_owner(&o, &AuditRow::by_controller("t", "a", "vm1", String::new()))
                })
                .unwrap();
            reg.remove_guest("a", a, "u1").unwrap();
            reg.flush().await.unwrap();
        }
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute("UPDATE owners SET generation = -5 WHERE uuid = 'u1'", [])
            .unwrap();
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), timing).unwrap();
        assert!(reg.is_quarantined("u1") && reg.missing_uuids() == ["u1"]);
        // a is back and reports (no agent answers: nothing may be sent).
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        drop(rx);
        let a = reg.open_session("a", "boot2", tx).unwrap();
        reg.apply_inventory("a", a, Inventory { host: None, guests: vec![], more: false }).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        reg.heard_cell("a", a).unwrap().store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
        assert!(reg.hold(crate::now_ms()).is_none());
        for start in [false, true] {
            let req = RestoreGuestRequest { vm: "vm1".into(), to_host: String::new(), start, reason: "oops".into() };
            let e = restore(&reg, &req, "olga", 3000, 0).await.unwrap_err().to_string();
            assert!(
                e.contains("ownership record is quarantined")
                    && e.contains("docs/security.md")
                    && e.contains("nothing was changed"),
                "{e}"
            );
        }
        let e = forget(&reg, &ForgetGuestRequest { vm: "vm1".into(), reason: "retired".into() }, "olga")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ownership record is quarantined") && e.contains("docs/security.md"), "{e}");
        let e = crate::guestops::start_vm(&reg, "vm1", "test", "olga", 3000).await.unwrap_err().to_string();
        assert!(e.contains("quarantined") && e.contains("docs/security.md"), "{e}");
        // Refusals change nothing: still missing, no owner row written, nothing audited as done.
        assert_eq!(reg.missing_uuids(), ["u1"]);
        assert!(
            reg.owner_row("u1").is_none()
                && reg.repos().call_blocking(move |r| r.ownership().owners()).unwrap().is_empty()
        );
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
        assert!(!log.iter().any(|x| x.action.starts_with("guest.restore") || x.action == "guest.forgotten"), "{log:?}");
    }

    #[test]
    fn a_restore_elsewhere_needs_an_accepting_target_and_an_owner_known_not_to_hold_it() {
        let to_b = RestoreInput { target: "b".into(), ..input() };
        assert!(failed(&to_b).is_empty());
        let i = RestoreInput { owner_reachable: false, ..to_b.clone() };
        assert_eq!(failed(&i), ["owner-holds-nothing"]);
        let i = RestoreInput { owner_reachable: false, owner_status: Some(HostStatus::Offline), ..to_b.clone() };
        assert!(failed(&i).is_empty(), "an OFFLINE owner is proven off");
        let i = RestoreInput { target_status: Some(HostStatus::NotAccepting), ..to_b };
        assert_eq!(failed(&i), ["target-accepting"]);
    }
}
