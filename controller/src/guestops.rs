//! Operators' commands on guests missing on their owner: `lifeboat vms
//! restore` (define the kept definition again, optionally elsewhere and
//! started) and `lifeboat vms forget` (drop the record on purpose). The
//! checks are pure ([`restore_checks`]); the async part carries them out.

use std::time::Duration;

use lifeboat_proto::v1::{
    Check, DefineGuest, ForgetGuestRequest, ForgetGuestResponse, GrantLeases, GuestRecord, Lease, RestoreGuestRequest,
    StartGuest, command::Kind,
};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::error::{ControllerError, refusal};
use crate::model::HostStatus;
use crate::registry::Registry;
use crate::store::{AuditRow, OwnerRow};

/// Held for the whole of a restore (checks, record, define, start).
static RESTORES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long one agent call of a restore may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restore waits for the agent's report of the defined guest.
const REPORT_WAIT: Duration = Duration::from_secs(10);

fn check(name: &str, ok: bool, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
    Check { name: name.into(), ok, detail: detail.into(), remedy: if ok { String::new() } else { remedy.into() } }
}

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
}

/// Every check of a restore (pure); all must pass.
pub fn restore_checks(i: &RestoreInput) -> Vec<Check> {
    let moving = i.target != i.owner;
    let mut out = vec![
        check(
            "definition-kept",
            i.has_definition,
            if i.has_definition { "the last definition is kept".into() } else { format!("no definition of {} was ever read", i.name) },
            "define it by hand (virsh define) on its owner, or `lifeboat vms forget` it",
        ),
        check(
            "defined-nowhere",
            i.reported_on.is_empty(),
            if i.reported_on.is_empty() {
                "no host reports it".to_string()
            } else {
                format!("defined on {}", i.reported_on.iter().map(|r| r.0.as_str()).collect::<Vec<_>>().join(", "))
            },
            "it is not lost: nothing to restore (`lifeboat vms show` shows where it is)",
        ),
        check(
            "no-job",
            i.job.is_none(),
            match &i.job {
                None => "no job acts on it".to_string(),
                Some(j) => format!("job {j} acts on it"),
            },
            "wait for the job to end (`lifeboat jobs watch`)",
        ),
        check(
            "target-reachable",
            i.target_reachable,
            format!("{} {}", i.target, if i.target_reachable { "talks to the controller" } else { "is not talking to the controller" }),
            format!("start {}'s agent (`systemctl start lifeboat-agent`), or restore it elsewhere with --to HOST", i.target),
        ),
    ];
    if moving {
        let accepting = i.target_status == Some(HostStatus::Available);
        out.push(check(
            "target-accepting",
            accepting,
            format!("{} is {}", i.target, i.target_status.map(|s| s.as_str()).unwrap_or("unknown")),
            format!("choose an AVAILABLE host, or `lifeboat hosts set-status {} AVAILABLE`", i.target),
        ));
        // The owner must be known not to hold it: talking to us (and not
        // reporting it), or declared OFFLINE (proven off).
        let sure = i.owner_reachable || i.owner_status == Some(HostStatus::Offline);
        out.push(check(
            "owner-holds-nothing",
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
            "target-may-run",
            ok,
            format!("{} is {}", i.target, i.target_status.map(|s| s.as_str()).unwrap_or("unknown")),
            "restore without --start, or make the host AVAILABLE first",
        ));
    }
    out
}

fn audit(operator: &str, action: &str, host: &str, vm: &str, detail: String) -> AuditRow {
    AuditRow { actor: operator.into(), action: action.into(), host: host.into(), vm: vm.into(), detail, ..Default::default() }
}

fn reason_of(r: &str, what: &str) -> Result<String, ControllerError> {
    let r = r.trim();
    if r.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("{what}: --reason is required (it is recorded in the audit log)")));
    }
    Ok(r.to_string())
}

/// `lifeboat vms restore`: defines a missing guest's last definition again
/// on its owner (or `to_host`, a placement change recorded first, with the
/// next generation), then optionally grants its lease and starts it.
/// Refusals change nothing and name every failed check.
pub async fn restore(reg: &Registry, req: &RestoreGuestRequest, operator: &str, lease_ttl_ms: i64) -> Result<GuestRecord, ControllerError> {
    const WHAT: &str = "restoring a guest";
    let reason = reason_of(&req.reason, WHAT)?;
    let vm = req.vm.trim();
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("{WHAT}: no guest given")));
    }
    // One restore at a time: two at once could both pass the checks and
    // define one guest on two hosts.
    let _one = RESTORES.lock().await;
    let r = reg.find_missing(vm, WHAT)?;
    let (uuid, name) = (r.guest.uuid.clone(), r.guest.name.clone());
    let owner = reg.restore_owner(&r);
    let target = match req.to_host.trim() {
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
        target_reachable: reg.is_reachable(&target) && reg.has_session(&target),
        target_status: reg.status_of(&target),
        owner_reachable: reg.is_reachable(&owner) && reg.has_session(&owner),
        owner_status: reg.status_of(&owner),
        target: target.clone(),
        start: req.start,
    };
    let checks = restore_checks(&input);
    if checks.iter().any(|c| !c.ok) {
        info!(operator, guest = %name, "restore refused");
        return Err(refusal(&format!("restoring {name} ({uuid}) on {target}"), &checks));
    }
    // The placement is recorded before it is carried out: a new owner
    // (--to) gets the next generation; a guest never moved gets its first
    // ownership record (a definition needs a generation).
    let current = reg.owner_row(&uuid);
    let generation = match &current {
        Some(o) if o.host == target => o.generation.max(1),
        Some(o) => o.generation.checked_add(1).ok_or_else(|| ControllerError::Internal(format!("generation of {uuid} overflows")))?,
        None => 1,
    };
    if current.as_ref().is_none_or(|o| o.host != target || o.generation != generation || !o.complete) {
        let row = OwnerRow {
            uuid: uuid.clone(),
            host: target.clone(),
            generation,
            // Where it was last: its owner, or the host it vanished from.
            from_host: [owner.as_str(), r.host.as_str()].into_iter().find(|h| *h != target).unwrap_or_default().to_string(),
            job: String::new(),
            complete: true,
        };
        let desired = reg.desired_of(&uuid).map(|d| d.1).unwrap_or_else(|| "stopped".into());
        let a = audit(
            operator,
            "guest.restore.recorded",
            &target,
            &name,
            format!("{name} ({uuid}) is to be defined on {target} with ownership generation {generation} (was missing on {}); reason: {reason}", r.host),
        );
        reg.record_restore_owner(&row, &desired, &a)?;
    }
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
        reg.db(|s| s.audit(&audit(operator, "guest.restore.failed", &target, &name, msg.clone())))?;
        return Err(ControllerError::AgentUnavailable(msg));
    }
    let outcome = res.map(|x| x.outcome).unwrap_or_default();
    reg.db(|s| {
        s.audit(&audit(
            operator,
            "guest.restored",
            &target,
            &name,
            format!("defined {name} ({uuid}) on {target} ({outcome}), autostart off, owner generation {generation}; reason: {reason}"),
        ))
    })?;
    // The agent reports the new definition; that clears the missing mark.
    let t0 = tokio::time::Instant::now();
    while !reg.reported_on(&uuid).iter().any(|(h, _)| *h == target) {
        if t0.elapsed() > REPORT_WAIT {
            return Err(ControllerError::AgentUnavailable(format!(
                "{name} was defined on {target}, but {target} has not reported it within {REPORT_WAIT:?}; `lifeboat vms show {uuid}` later"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if req.start {
        start(reg, &uuid, &name, &target, generation, lease_ttl_ms, operator).await?;
    }
    reg.list_guests(Some(&target), Some(&uuid), false)?
        .into_iter()
        .next()
        .ok_or_else(|| ControllerError::NotFound(format!("{name} is no longer listed on {target}")))
}

/// Grants the lease and starts a restored guest, never where another host
/// holds it.
async fn start(reg: &Registry, uuid: &str, name: &str, target: &str, generation: u64, lease_ttl_ms: i64, operator: &str) -> Result<(), ControllerError> {
    let elsewhere: Vec<String> =
        reg.reported_on(uuid).into_iter().filter(|(h, s)| h != target && lifeboat_proto::holds_disk(*s)).map(|(h, _)| h).collect();
    if !elsewhere.is_empty() {
        return Err(ControllerError::Refused(format!(
            "{name} was defined on {target} but not started: {} runs it; nothing else was changed",
            elsewhere.join(", ")
        )));
    }
    let now = crate::now_ms();
    let grant = GrantLeases {
        leases: vec![Lease { uuid: uuid.into(), name: name.into(), generation }],
        expires_unix_ms: now + lease_ttl_ms,
        merge: true,
        issued_unix_ms: now,
    };
    let step = |r: Result<lifeboat_proto::v1::CommandResult, ControllerError>, what: &str| match r {
        Ok(x) if x.ok => Ok(x.outcome),
        Ok(x) => Err(format!("{what} failed: {}", x.error)),
        Err(e) => Err(format!("{what} failed: {e}")),
    };
    let res = match step(reg.call(target, Kind::GrantLeases(grant), CALL_TIMEOUT).await, "granting its lease") {
        Ok(_) => step(reg.call(target, Kind::StartGuest(StartGuest { uuid: uuid.into() }), CALL_TIMEOUT).await, "starting it"),
        Err(e) => Err(e),
    };
    match res {
        Ok(outcome) => {
            reg.db(|s| s.audit(&audit(operator, "guest.started", target, name, format!("{name} ({uuid}) started on {target} ({outcome})"))))?;
            Ok(())
        }
        Err(e) => {
            let msg = format!("{name} is defined on {target} again, but {e}; `lifeboat vms show {uuid}`, then start it");
            reg.db(|s| s.audit(&audit(operator, "guest.start.failed", target, name, msg.clone())))?;
            Err(ControllerError::AgentUnavailable(msg))
        }
    }
}

/// `lifeboat vms forget`: drops a missing guest's record (kept definition
/// and desired state) on an operator's word, audited with the definition's
/// size and SHA-256; clears its alarm.
pub fn forget(reg: &Registry, req: &ForgetGuestRequest, operator: &str) -> Result<ForgetGuestResponse, ControllerError> {
    const WHAT: &str = "forgetting a guest";
    let reason = reason_of(&req.reason, WHAT)?;
    let vm = req.vm.trim();
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("{WHAT}: no guest given")));
    }
    let r = reg.find_missing(vm, WHAT)?;
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
    let r = reg.forget_missing(&r.guest.uuid, &a)?;
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
