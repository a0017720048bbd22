//! `lifeboat vms start` and the reconciler's start of a waiting guest: a
//! start claimed for its whole length, every never-twice check made again
//! right before the lease and before the start, every outcome audited.
//! (Moved here from `waiting`, which keeps only the waiting-guest
//! bookkeeping, so that `waiting` no longer imports `guestops`.)

use std::time::Duration;

use lifeboat_proto::v1::{GuestRecord, StartGuest, command::Kind};

use crate::domain::host::HostStatus;
use crate::error::ControllerError;
use crate::ports::AuditRow;
use crate::registry::Registry;
use crate::waiting::{annotate_guests, end};

/// Longest guest name or UUID accepted by `vms start`, in bytes.
const MAX_VM: usize = 256;

/// Longest reason accepted by `vms start`, in bytes.
const MAX_REASON: usize = 1000;

/// `lifeboat vms start VM --reason TEXT`: starts a stopped guest on its
/// owner now (a waiting one, or any stopped guest its host owns), also on
/// a MAINTENANCE host. The same never-twice checks as the reconciler's
/// starts: every host's report is current (no startup grace, no restored
/// database waiting for reports), its host owns it (no move, conflict or
/// unfinished move says otherwise) and defines it, no job moves it, its
/// host talks and reported in this session (one agent), it is not OFFLINE,
/// and no host reports it holding its disks. The guest is claimed (pseudo
/// job `start-UUID`) for the whole start, the checks are made again before
/// the lease and before the start, and every outcome is audited.
pub async fn start_vm(
    reg: &Registry,
    vm: &str,
    reason: &str,
    operator: &str,
    lease_ttl_ms: i64,
) -> Result<GuestRecord, ControllerError> {
    let vm = crate::guestops::bounded(vm, "VM", MAX_VM, "starting a guest")?;
    let reason = crate::guestops::bounded(reason, "--reason", MAX_REASON, "starting a guest")?;
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("name the guest (name or UUID, at most {MAX_VM} bytes)")));
    }
    if reason.is_empty() {
        return Err(ControllerError::InvalidArgument(format!(
            "--reason TEXT is required (at most {MAX_REASON} bytes)"
        )));
    }
    let refuse = |check: &str, detail: String, remedy: &str| {
        ControllerError::Refused(format!(
            "starting {vm} refused; nothing was changed. Failed check: {check}: {detail}. {remedy}"
        ))
    };
    if let Some(hold) = reg.hold(reg.now_ms()) {
        return Err(refuse(
            "reports-current",
            hold,
            "wait until the hosts have reconnected and reported (`lifeboat alarms`, `lifeboat hosts list`), then run the same command again",
        ));
    }
    let records = reg.list_guests(None, Some(vm), false)?;
    let mut uuids: Vec<&str> = records.iter().filter_map(|r| r.guest.as_ref().map(|g| g.uuid.as_str())).collect();
    uuids.sort();
    uuids.dedup();
    let uuid = match uuids.as_slice() {
        [] => return Err(ControllerError::NotFound(format!("unknown guest '{vm}' (see `lifeboat vms list`)"))),
        [u] => u.to_string(),
        many => {
            return Err(refuse(
                "one guest named",
                format!("{} guests are called {vm}: {}", many.len(), many.join(", ")),
                "name it by UUID",
            ));
        }
    };
    crate::guestops::refuse_quarantined(reg, &uuid, vm, "starting")?;
    let Some(rec) = records.iter().find(|r| {
        r.guest.as_ref().is_some_and(|g| g.uuid == uuid) && r.owner_host == r.host_id && reg.owns(&r.host_id, &uuid)
    }) else {
        let seen: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "{} (owner recorded: {})",
                    r.host_id,
                    if r.owner_host.is_empty() { "none" } else { &r.owner_host }
                )
            })
            .collect();
        return Err(refuse(
            "owner known",
            format!(
                "no host that reports {vm} owns it for sure (reported by {}; an unfinished move or a conflict leaves it nobody's)",
                seen.join(", ")
            ),
            "see `lifeboat vms show` and `lifeboat jobs list`; finish the move with `lifeboat move` or `lifeboat migrate`",
        ));
    };
    let host = rec.host_id.clone();
    let name = rec.guest.as_ref().map(|g| g.name.clone()).unwrap_or_default();
    if let Some(job) = reg.job_of(&uuid) {
        return Err(refuse(
            "not in a job",
            format!("job {job} is moving {name}"),
            "wait for the job to end (`lifeboat jobs watch`)",
        ));
    }
    let status = reg.status_of(&host);
    if status == Some(HostStatus::Offline) || status.is_none() {
        return Err(refuse(
            "owner not OFFLINE",
            format!("{host} is OFFLINE"),
            "bring the host back; it becomes MAINTENANCE when its agent connects",
        ));
    }
    if !reg.is_reachable(&host) || !reg.reports_now(&host) {
        return Err(refuse(
            "owner connected",
            format!(
                "{host} is not connected, has not reported its guests in this session, or a second agent claims it"
            ),
            "start its agent (one per host) and wait for `lifeboat hosts show` to read REACHABLE",
        ));
    }
    if !reg.reported_on(&uuid).iter().any(|(h, _)| h == &host) {
        return Err(refuse(
            "defined on its owner",
            format!("{host} does not define {name} (it is missing there)"),
            "define it again with `lifeboat vms restore` (or `lifeboat vms restore --start`)",
        ));
    }
    let holders = reg.holders(std::slice::from_ref(&uuid)).remove(&uuid).unwrap_or_default();
    if !holders.is_empty() {
        let here = holders.iter().any(|h| h == &host);
        return Err(refuse(
            "not running anywhere",
            format!("{name} is reported running (or holding its disks) on {}", holders.join(", ")),
            if here {
                "it runs already: nothing to do"
            } else {
                "a second copy must never start; see `lifeboat vms show` and `lifeboat alarms`"
            },
        ));
    }
    let generation = reg.owner_generation(&uuid);
    let job = format!("start-{uuid}");
    let _claim = match crate::guestops::claim(reg, &uuid, &job, &host, &host) {
        Ok(c) => c,
        Err(other) => {
            return Err(refuse(
                "not in a job",
                format!("{other} acts on {name} now"),
                "wait for it to end (`lifeboat jobs watch`)",
            ));
        }
    };
    let detail = format!(
        "operator {operator} asks to start {name} ({uuid}) on its owner {host} (generation {generation}): {reason}"
    );
    let a = AuditRow {
        actor: operator.into(),
        action: "guest.start_requested".into(),
        host: host.clone(),
        vm: name.clone(),
        detail,
        ..Default::default()
    };
    reg.repos().audit(move |l| l.append(&a)).await?;
    let end_of = guarded_start(reg, &uuid, &name, &host, generation, &job, lease_ttl_ms, Duration::from_secs(60)).await;
    let (action, outcome) = match &end_of {
        StartEnd::Started { outcome, .. } => ("guest.started", format!("started ({outcome})")),
        StartEnd::Refused { check, detail } => {
            ("guest.start_failed", format!("not started: check {check} failed right before it: {detail}"))
        }
        StartEnd::GrantFailed(e) => ("guest.start_failed", format!("not started: granting its lease failed: {e}")),
        StartEnd::StartFailed(e) => ("guest.start_failed", format!("start failed: {e}")),
        StartEnd::Unknown(e) => (
            "guest.start_unknown",
            format!("the start got no answer ({e}) and {host} does not report it running yet: it may still start"),
        ),
    };
    let a = AuditRow::by_controller(action, &host, &name, format!("{name} on {host}: {outcome}"));
    reg.repos().audit(move |l| l.append(&a)).await?;
    match end_of {
        StartEnd::Started { holds, .. } => {
            let waits = reg.repos().jobs(|j| j.waiting()).await;
            let w = waits.ok().and_then(|rows| rows.into_iter().find(|w| w.uuid == uuid && w.host == host));
            if holds && let Some(w) = w {
                end(reg, &w, &format!("started on {host} by {operator}")).await?;
            }
        }
        StartEnd::Refused { check, detail } => {
            return Err(ControllerError::Refused(format!(
                "starting {name} on {host} refused; nothing was started. Failed check: {check}: {detail}. See `lifeboat vms show {uuid}` and `lifeboat jobs list`"
            )));
        }
        StartEnd::GrantFailed(_) | StartEnd::StartFailed(_) => {
            return Err(ControllerError::Refused(format!("starting {name} on {host}: {outcome}")));
        }
        StartEnd::Unknown(_) => {
            // Not a refusal (it may have started) and not an unreachable
            // controller: an outcome the operator must look at (exit 1).
            return Err(ControllerError::Internal(format!(
                "starting {name} on {host}: {outcome}; see `lifeboat vms show {uuid}` before trying again"
            )));
        }
    }
    reg.touch(&host);
    let mut out: Vec<GuestRecord> = reg.list_guests(Some(&host), Some(&uuid), false)?;
    annotate_guests(reg, &mut out);
    out.into_iter().next().ok_or_else(|| ControllerError::NotFound(format!("{name} is no longer reported by {host}")))
}

/// How a guarded start ([`guarded_start`]) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartEnd {
    /// A re-check failed before the lease or before the start: nothing was started.
    Refused {
        /// The check that failed.
        check: &'static str,
        /// What it found.
        detail: String,
    },
    /// The lease was not granted: nothing was started.
    GrantFailed(String),
    /// The host started it (its outcome); `holds`: the host's answer or
    /// report has it holding its disks.
    Started {
        /// The agent's outcome.
        outcome: String,
        /// It holds its disks there now.
        holds: bool,
    },
    /// The host refused or failed the start.
    StartFailed(String),
    /// The start got no answer and the host does not report it running: it
    /// may still start.
    Unknown(String),
}

/// What a start of `uuid` on `host` at ownership `generation` under the
/// claim `job` needs right before each step: reports current, the claim
/// still its own, the owner and generation unchanged, the host reporting
/// now (one agent), and no other host reporting it holding its disks.
/// Returns the failed check and what it found.
pub(crate) fn recheck_start(
    reg: &Registry,
    uuid: &str,
    host: &str,
    generation: u64,
    job: &str,
) -> Result<(), (&'static str, String)> {
    if let Some(hold) = reg.hold(reg.now_ms()) {
        return Err(("reports-current", hold));
    }
    match reg.job_of(uuid) {
        Some(j) if j == job => {}
        Some(j) => return Err(("not in a job", format!("job {j} acts on it now"))),
        None => return Err(("not in a job", format!("its claim {job} is gone"))),
    }
    let now = reg.owner_generation(uuid);
    if !reg.owns(host, uuid) || now != generation {
        return Err((
            "owner unchanged",
            format!("{host} no longer owns it at generation {generation} (recorded generation now {now})"),
        ));
    }
    if !reg.reports_now(host) {
        return Err((
            "owner connected",
            format!("{host} is not connected, has not reported in this session, or a second agent claims it"),
        ));
    }
    let others: Vec<String> =
        reg.holders(&[uuid.to_string()]).remove(uuid).unwrap_or_default().into_iter().filter(|h| h != host).collect();
    if !others.is_empty() {
        return Err(("not running anywhere", format!("{} reports it holding its disks", others.join(", "))));
    }
    Ok(())
}

/// Grants `uuid`'s merged start lease on `host` and starts it there,
/// re-checking ([`recheck_start`]) before each step; the caller holds the
/// claim `job` throughout. A start with no answer is judged by the host's
/// report read again: it may have started.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn guarded_start(
    reg: &Registry,
    uuid: &str,
    name: &str,
    host: &str,
    generation: u64,
    job: &str,
    lease_ttl_ms: i64,
    timeout: Duration,
) -> StartEnd {
    if let Err((check, detail)) = recheck_start(reg, uuid, host, generation, job) {
        return StartEnd::Refused { check, detail };
    }
    let grant = crate::domain::policy::merged_lease_at(uuid, name, generation, lease_ttl_ms, reg.now_ms());
    match reg.call(host, Kind::GrantLeases(grant), timeout).await {
        Ok(r) if r.ok => {}
        Ok(r) => return StartEnd::GrantFailed(r.error),
        Err(e) => return StartEnd::GrantFailed(e.to_string()),
    }
    if let Err((check, detail)) = recheck_start(reg, uuid, host, generation, job) {
        return StartEnd::Refused { check, detail };
    }
    let running_here = || reg.reported_on(uuid).iter().any(|(h, s)| h == host && lifeboat_proto::holds_disk(*s));
    match reg.call(host, Kind::StartGuest(StartGuest { uuid: uuid.to_string() }), timeout).await {
        Ok(r) if r.ok => {
            let holds = r.guest.as_ref().is_some_and(|g| lifeboat_proto::holds_disk(g.state)) || running_here();
            StartEnd::Started { outcome: r.outcome, holds }
        }
        Ok(r) => StartEnd::StartFailed(r.error),
        Err(e) if running_here() => {
            StartEnd::Started { outcome: format!("no answer ({e}), but {host} reports it running"), holds: true }
        }
        Err(e) => StartEnd::Unknown(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lifeboat_proto::v1::GuestRecord;

    use super::*;
    use crate::waiting::tests::*;

    async fn start(reg: &Registry) -> Result<GuestRecord, ControllerError> {
        tokio::time::timeout(Duration::from_secs(5), crate::guestops::start_vm(reg, "vm1", "test", "olga", 3000))
            .await
            .expect("vms start answers at once")
    }

    #[tokio::test]
    async fn vms_start_refuses_while_reports_are_not_current_or_the_owner_has_two_agents_and_sends_nothing() {
        let (reg, a, rx) = with_vm1();
        let mut seen = agent(reg.clone(), a, rx, Then::Obey);
        let e = start(&reg).await.unwrap_err().to_string();
        assert!(e.contains("reports-current") && e.contains("startup grace"), "{e}");
        after_grace(&reg, a).await;
        // A restored database holds until every host not OFFLINE has reported: b talks but has not.
        reg.raise_alarm("", "store-restored", "backup of yesterday").await.unwrap();
        let (tx, _rx_b) = tokio::sync::mpsc::channel(8);
        let _b = reg.open_session("b", "boot", tx).unwrap();
        let e = start(&reg).await.unwrap_err().to_string();
        assert!(e.contains("reports-current") && e.contains("nothing was changed"), "{e}");
        reg.set_status("b", HostStatus::Offline, "test", "olga").await.unwrap();
        assert!(reg.restore_hold().is_none(), "every host not OFFLINE reported");
        reg.raise_alarm("a", "duplicate-agent", "two agents").await.unwrap();
        let e = start(&reg).await.unwrap_err().to_string();
        assert!(e.contains("owner connected") && e.contains("second agent"), "{e}");
        assert!(drain(&mut seen).is_empty(), "nothing sent");
        assert!(
            !actions(&reg).iter().any(|a| a.starts_with("guest.start")),
            "a refusal audits no start: {:?}",
            actions(&reg)
        );
    }

    #[tokio::test]
    async fn vms_start_refuses_a_guest_its_owner_no_longer_defines() {
        let (reg, a, rx) = with_vm1();
        let mut seen = agent(reg.clone(), a, rx, Then::Obey);
        after_grace(&reg, a).await;
        reg.remove_guest("a", a, "u1").unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"]);
        let e = start(&reg).await.unwrap_err().to_string();
        assert!(e.contains("defined on its owner") && e.contains("lifeboat vms restore"), "{e}");
        assert!(drain(&mut seen).is_empty(), "nothing sent");
    }

    #[tokio::test]
    async fn vms_start_claims_the_guest_and_stops_before_the_start_when_a_move_or_a_new_generation_comes_between() {
        for then in [Then::MoveOnGrant, Then::NewGenerationOnGrant] {
            let (reg, a, rx) = with_vm1();
            let mut seen = agent(reg.clone(), a, rx, then);
            after_grace(&reg, a).await;
            let e = start(&reg).await.unwrap_err().to_string();
            let sent = drain(&mut seen);
            assert_eq!(sent, [("grant", Some("start-u1".to_string()))], "claimed while it starts; no start sent");
            if then == Then::MoveOnGrant {
                assert!(
                    e.contains("not in a job")
                        && e.contains("job mig-9 acts on it now")
                        && e.contains("nothing was started"),
                    "{e}"
                );
                assert_eq!(
                    reg.job_of("u1").as_deref(),
                    Some("mig-9"),
                    "the start's claim ends without ending the move's"
                );
            } else {
                assert!(e.contains("owner unchanged") && e.contains("generation 0") && e.contains("now 3"), "{e}");
                assert!(reg.job_of("u1").is_none(), "the claim ends on a refusal too");
            }
            let log = actions(&reg);
            assert!(
                log.contains(&"guest.start_requested".to_string()) && log.contains(&"guest.start_failed".to_string()),
                "{log:?}"
            );
        }
        // Carried out: claimed through the start, released after.
        let (reg, a, rx) = with_vm1();
        let mut seen = agent(reg.clone(), a, rx, Then::Obey);
        after_grace(&reg, a).await;
        start(&reg).await.unwrap();
        let claim = Some("start-u1".to_string());
        assert_eq!(drain(&mut seen), [("grant", claim.clone()), ("start", claim)]);
        assert!(reg.job_of("u1").is_none());
        assert!(actions(&reg).contains(&"guest.started".to_string()));
    }

    #[tokio::test]
    async fn vms_start_audits_a_start_that_got_no_answer_and_reads_the_hosts_report_again() {
        let (reg, a, rx) = with_vm1();
        let _seen = agent(reg.clone(), a, rx, Then::RunThenClose);
        after_grace(&reg, a).await;
        let r = start(&reg).await.unwrap();
        assert_eq!(r.guest.map(|g| g.state), Some(lifeboat_proto::v1::GuestState::Running as i32), "it did start");
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
        assert!(log.iter().any(|x| x.action == "guest.started" && x.detail.contains("reports it running")), "{log:?}");

        let (reg, a, rx) = with_vm1();
        let _seen = agent(reg.clone(), a, rx, Then::CloseSilently);
        after_grace(&reg, a).await;
        let e = start(&reg).await.unwrap_err();
        assert!(matches!(e, ControllerError::Internal(_)) && e.to_string().contains("may still start"), "{e}");
        assert!(actions(&reg).contains(&"guest.start_unknown".to_string()), "{:?}", actions(&reg));
        assert!(reg.job_of("u1").is_none());
    }
}
