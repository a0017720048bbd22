//! Guests that wait: a guest a job could not move (the plan left it behind,
//! or its move failed) whose desired state is running and which still
//! belongs to its own host. It is recorded (table `waiting`, in the same
//! transaction that ends the job), shown in `vms list`/`vms show`/`hosts
//! show`, alarmed (`guests-waiting`, one alarm per guest naming it) and
//! counted (`lifeboat_guests_waiting`). The reconciler starts it on its own
//! host once that host is healthy again; an operator can start it now with
//! `lifeboat vms start`. It stops waiting when it runs on its owner, when
//! a later job moves it, or when a complete ownership record names another
//! host (`vms restore --to`), whether or not its old host reports it.
//! A guest a forced move left unfinished after recording its new owner
//! is listed as waiting too ("unfinished move to B"), but nobody owns it:
//! it is never started by the reconciler, only `lifeboat move` finishes it.

use std::collections::BTreeMap;
use std::time::Duration;

use lifeboat_proto::v1::{GuestRecord, HostRecord, StartGuest, command::Kind};
use tracing::{info, warn};

use crate::error::ControllerError;
use crate::migrate::state::MoveState;
use crate::model::HostStatus;
use crate::registry::Registry;
use crate::store::{AuditRow, MoveRow, OwnerRow, StoreError, WaitingRow};

/// Alarm kind raised on a host for each guest waiting to run there again.
pub const GUESTS_WAITING: &str = "guests-waiting";

/// Longest reason quoted in a waiting guest's alarm, in characters.
const REASON_CHARS: usize = 300;

/// Longest guest name or UUID accepted by `vms start`, in bytes.
const MAX_VM: usize = 256;

/// Longest reason accepted by `vms start`, in bytes.
const MAX_REASON: usize = 1000;

/// Whether a guest a job ended with waits on `source`: its move was left
/// behind (never attempted, or failed), it should run (the move was to
/// start it, or its desired state on the source is running), and it still
/// belongs to the source (no ownership record elsewhere, not even an
/// unfinished move: such a guest is nobody's until the move is finished).
pub fn waits(state: MoveState, should_run: bool, owner: Option<&OwnerRow>, source: &str) -> bool {
    state.is_left_behind() && should_run && owner.is_none_or(|o| o.host == source && o.complete)
}

/// Whether a guest a job ended with is left by an unfinished move off
/// `source`: its move was left behind after its new owner was recorded
/// (the start failed or timed out, or the source talked mid-move), so the
/// record names another host but is not complete, and it should run. Such
/// a guest is nobody's (no lease anywhere): it is listed as waiting, never
/// started by the reconciler, until an operator finishes the move.
pub fn unfinished(state: MoveState, should_run: bool, owner: Option<&OwnerRow>, source: &str) -> bool {
    state.is_left_behind() && should_run && owner.is_some_and(|o| o.host != source && !o.complete && o.from_host == source)
}

/// How the reason of a waiting row left by an unfinished move starts.
const UNFINISHED: &str = "unfinished move to ";

/// The target of the unfinished move a waiting row was left by, if it was.
pub fn unfinished_target(w: &WaitingRow) -> Option<&str> {
    w.reason.strip_prefix(UNFINISHED)?.split_once(' ').map(|(t, _)| t).filter(|t| !t.is_empty())
}

/// The alarm raised for one waiting guest: names it, says why and how it
/// ends. Deterministic (no times), so raising it again changes nothing.
pub fn alarm_detail(w: &WaitingRow) -> String {
    let reason = match w.reason.char_indices().nth(REASON_CHARS) {
        None => w.reason.clone(),
        Some((i, _)) => format!("{}...", &w.reason[..i]),
    };
    if let Some(target) = unfinished_target(w) {
        return format!(
            "{name} ({uuid}) waits for its unfinished move from {host} (desired state running; left by job {job}: {reason}). \
             It is nobody's until the move is finished and is NOT started by itself; finish it with \
             `lifeboat move --vm {name} --from {host} --to {target} --yes`",
            name = w.name,
            uuid = w.uuid,
            host = w.host,
            job = w.job,
        );
    }
    format!(
        "{name} ({uuid}) waits to run again on {host} (desired state running; left behind by job {job}: {reason}). \
         It starts on {host} by itself once {host} talks, its cleanup is done and its status is AVAILABLE or NOT_ACCEPTING; \
         or now: `lifeboat vms start {name} --reason TEXT`",
        name = w.name,
        uuid = w.uuid,
        host = w.host,
        job = w.job,
    )
}

/// The waiting rows a finished job leaves: each left-behind move that waits
/// (see [`waits`]). `desired` gives a guest's desired-state row, `owner` its
/// ownership record.
pub fn rows_for_job(
    moves: &[MoveRow],
    desired: impl Fn(&str) -> Option<(String, String)>,
    owner: impl Fn(&str) -> Option<OwnerRow>,
    now_ms: i64,
) -> Vec<WaitingRow> {
    moves
        .iter()
        .filter_map(|m| {
            let state: MoveState = m.state.parse().unwrap_or(MoveState::Failed);
            let desired_running = desired(&m.uuid).is_some_and(|(h, d)| h == m.source && d == "running");
            let should_run = m.start || desired_running;
            let o = owner(&m.uuid);
            let why = if m.error.is_empty() { "no reason recorded".to_string() } else { m.error.clone() };
            let reason = if waits(state, should_run, o.as_ref(), &m.source) {
                why
            } else if let Some(o) = o.filter(|o| unfinished(state, should_run, Some(o), &m.source)) {
                format!("{UNFINISHED}{} (job {}): {why}", o.host, o.job)
            } else {
                return None;
            };
            Some(WaitingRow { uuid: m.uuid.clone(), host: m.source.clone(), name: m.name.clone(), reason, since_ms: now_ms, job: m.job_id.clone() })
        })
        .collect()
}

/// Raises the alarm of each guest about to be recorded as waiting (before
/// the job's end is written: a crash in between resumes the job, and the
/// same alarm is not raised twice). A guest that waited already with
/// another reason has its old alarm cleared.
pub fn raise(reg: &Registry, rows: &[WaitingRow], before: &[WaitingRow]) -> Result<(), StoreError> {
    for w in rows {
        if let Some(old) = before.iter().find(|o| o.uuid == w.uuid) {
            let (a, b) = (alarm_detail(old), alarm_detail(w));
            if a != b {
                reg.clear_alarm_by_cause(&old.host, GUESTS_WAITING, &a, &format!("{} waits again, see the newer alarm", w.name))?;
            }
        }
        reg.raise_alarm(&w.host, GUESTS_WAITING, &alarm_detail(w))?;
    }
    Ok(())
}

/// After a job's end was written: the guests it moved no longer wait, so
/// their alarms are cleared (the rows went with the job's end).
pub fn clear_moved(reg: &Registry, before: &[WaitingRow], moved: &[String], job: &str) -> Result<(), StoreError> {
    for w in before.iter().filter(|w| moved.contains(&w.uuid)) {
        reg.clear_alarm_by_cause(&w.host, GUESTS_WAITING, &alarm_detail(w), &format!("job {job} moved {}", w.name))?;
        info!(guest = %w.name, %job, "stopped waiting: moved");
    }
    Ok(())
}

/// A guest stops waiting (`why`: it runs on its owner, or it belongs
/// elsewhere now): its row goes (audited `guest.waiting_ended`) and its
/// alarm is cleared by cause.
pub fn end(reg: &Registry, w: &WaitingRow, why: &str) -> Result<(), StoreError> {
    let detail = format!("{} ({}) no longer waits on {}: {why} (waited since {} ms)", w.name, w.uuid, w.host, w.since_ms);
    let ended = reg.db(|s| s.end_waiting(&w.uuid, &AuditRow::by_controller("guest.waiting_ended", &w.host, &w.name, detail)))?;
    if ended {
        info!(host = %w.host, guest = %w.name, "stopped waiting: {why}");
    }
    reg.clear_alarm_by_cause(&w.host, GUESTS_WAITING, &alarm_detail(w), why)
}

/// What the wait-ending pass makes of one waiting row given the guest's
/// ownership record (whether or not its host reports the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitJudgement {
    /// A complete ownership record names another host: the wait ends (why).
    Ends(String),
    /// An unfinished move names another host: the guest is nobody's until
    /// an operator finishes the move; never started by the reconciler.
    Unfinished,
    /// Its host may still own it: the per-host decision applies.
    PerHost,
}

/// Judges one waiting row against its ownership record. Pure.
pub fn judge(w: &WaitingRow, owner: Option<&OwnerRow>) -> WaitJudgement {
    match owner {
        Some(o) if o.host != w.host && o.complete => WaitJudgement::Ends(format!("{} owns it now", o.host)),
        Some(o) if o.host != w.host => WaitJudgement::Unfinished,
        _ => WaitJudgement::PerHost,
    }
}

/// Why a waiting row ends because the guest was moved by hand: another
/// host reports it holding its disks and owns it (`owns`: Lifeboat's
/// ownership view, which gives a hand-moved guest to the one host running
/// it once its first host talks and holds nothing). Pure; only ends a wait,
/// never starts anything.
pub fn moved_by_hand(w: &WaitingRow, holders: &[String], owns: impl Fn(&str) -> bool) -> Option<String> {
    holders.iter().find(|h| **h != w.host && owns(h)).map(|h| format!("it runs on {h}, which owns it now (moved outside Lifeboat)"))
}

/// Ends every wait of `uuid` on a host other than `owner` (the guest was
/// placed on `owner` by an operator, e.g. `vms restore --to`): audited,
/// alarms cleared. A read error is returned.
pub fn end_elsewhere(reg: &Registry, uuid: &str, owner: &str, why: &str) -> Result<(), StoreError> {
    for w in reg.db(|s| s.waiting())?.into_iter().filter(|w| w.uuid == uuid && w.host != owner) {
        end(reg, &w, why)?;
    }
    Ok(())
}

/// A guest forgotten on an operator's word (`lifeboat vms forget`) waits
/// no more: its wait, if any, ends (audited) and its alarm is cleared.
/// Unlike listings this reads strictly: a read error is returned.
pub fn end_forgotten(reg: &Registry, uuid: &str, why: &str) -> Result<(), StoreError> {
    for w in reg.db(|s| s.waiting())?.into_iter().filter(|w| w.uuid == uuid) {
        end(reg, &w, why)?;
    }
    Ok(())
}

/// Every waiting guest, by UUID; a read error is logged and shows nothing
/// waiting (only shown, never decided on).
fn by_uuid(reg: &Registry) -> BTreeMap<String, WaitingRow> {
    match reg.db(|s| s.waiting()) {
        Ok(rows) => rows.into_iter().map(|w| (w.uuid.clone(), w)).collect(),
        Err(e) => {
            warn!("reading waiting guests failed: {e}");
            BTreeMap::new()
        }
    }
}

/// Fills in `waiting_reason` / `waiting_since_unix_ms` of the records of
/// waiting guests (on their own host).
pub fn annotate_guests(reg: &Registry, records: &mut [GuestRecord]) {
    let waiting = by_uuid(reg);
    if waiting.is_empty() {
        return;
    }
    for r in records.iter_mut() {
        let Some(g) = &r.guest else { continue };
        if let Some(w) = waiting.get(&g.uuid).filter(|w| w.host == r.host_id) {
            r.waiting_reason = format!("{} (job {})", w.reason, w.job);
            r.waiting_since_unix_ms = w.since_ms;
        }
    }
}

/// Fills in `waiting_guests` of host records.
pub fn annotate_hosts(reg: &Registry, records: &mut [HostRecord]) {
    let waiting = by_uuid(reg);
    for r in records.iter_mut() {
        let id = r.info.as_ref().map(|i| i.host_id.as_str()).unwrap_or_default();
        r.waiting_guests = u32::try_from(waiting.values().filter(|w| w.host == id).count()).unwrap_or(u32::MAX);
    }
}

/// Waiting guests per host, for the metric.
pub fn counts(reg: &Registry) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for w in by_uuid(reg).into_values() {
        *out.entry(w.host).or_insert(0) += 1;
    }
    out
}

/// `lifeboat vms start VM --reason TEXT`: starts a stopped guest on its
/// owner now (a waiting one, or any stopped guest its host owns), also on
/// a MAINTENANCE host. The same never-twice checks as the reconciler's
/// starts: its host owns it (no move, conflict or unfinished move says
/// otherwise), no job moves it, its host talks and reported in this
/// session, it is not OFFLINE, and no host reports it holding its disks.
/// The request is audited before anything is sent; the lease goes first.
pub async fn start_vm(reg: &Registry, vm: &str, reason: &str, operator: &str, lease_ttl_ms: i64) -> Result<GuestRecord, ControllerError> {
    let vm = crate::guestops::bounded(vm, "VM", MAX_VM, "starting a guest")?;
    let reason = crate::guestops::bounded(reason, "--reason", MAX_REASON, "starting a guest")?;
    if vm.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("name the guest (name or UUID, at most {MAX_VM} bytes)")));
    }
    if reason.is_empty() {
        return Err(ControllerError::InvalidArgument(format!("--reason TEXT is required (at most {MAX_REASON} bytes)")));
    }
    let refuse = |check: &str, detail: String, remedy: &str| {
        ControllerError::Refused(format!("starting {vm} refused; nothing was changed. Failed check: {check}: {detail}. {remedy}"))
    };
    let records = reg.list_guests(None, Some(vm), false)?;
    let mut uuids: Vec<&str> = records.iter().filter_map(|r| r.guest.as_ref().map(|g| g.uuid.as_str())).collect();
    uuids.sort();
    uuids.dedup();
    let uuid = match uuids.as_slice() {
        [] => return Err(ControllerError::NotFound(format!("unknown guest '{vm}' (see `lifeboat vms list`)"))),
        [u] => u.to_string(),
        many => {
            return Err(refuse("one guest named", format!("{} guests are called {vm}: {}", many.len(), many.join(", ")), "name it by UUID"));
        }
    };
    let Some(rec) = records.iter().find(|r| r.guest.as_ref().is_some_and(|g| g.uuid == uuid) && r.owner_host == r.host_id && reg.owns(&r.host_id, &uuid))
    else {
        let seen: Vec<String> = records.iter().map(|r| format!("{} (owner recorded: {})", r.host_id, if r.owner_host.is_empty() { "none" } else { &r.owner_host })).collect();
        return Err(refuse(
            "owner known",
            format!("no host that reports {vm} owns it for sure (reported by {}; an unfinished move or a conflict leaves it nobody's)", seen.join(", ")),
            "see `lifeboat vms show` and `lifeboat jobs list`; finish the move with `lifeboat move` or `lifeboat migrate`",
        ));
    };
    let host = rec.host_id.clone();
    let name = rec.guest.as_ref().map(|g| g.name.clone()).unwrap_or_default();
    if let Some(job) = reg.job_of(&uuid) {
        return Err(refuse("not in a job", format!("job {job} is moving {name}"), "wait for the job to end (`lifeboat jobs watch`)"));
    }
    let status = reg.status_of(&host);
    if status == Some(HostStatus::Offline) || status.is_none() {
        return Err(refuse("owner not OFFLINE", format!("{host} is OFFLINE"), "bring the host back; it becomes MAINTENANCE when its agent connects"));
    }
    if !reg.is_reachable(&host) || !reg.inventory_fresh(&host) {
        return Err(refuse(
            "owner connected",
            format!("{host} is not connected or has not reported its guests in this session"),
            "start its agent and wait for `lifeboat hosts show` to read REACHABLE",
        ));
    }
    let holders = reg.holders(std::slice::from_ref(&uuid)).remove(&uuid).unwrap_or_default();
    if !holders.is_empty() {
        let here = holders.iter().any(|h| h == &host);
        return Err(refuse(
            "not running anywhere",
            format!("{name} is reported running (or holding its disks) on {}", holders.join(", ")),
            if here { "it runs already: nothing to do" } else { "a second copy must never start; see `lifeboat vms show` and `lifeboat alarms`" },
        ));
    }
    let generation = reg.owner_generation(&uuid);
    let detail = format!("operator {operator} asks to start {name} ({uuid}) on its owner {host} (generation {generation}): {reason}");
    reg.db(|s| s.audit(&AuditRow { actor: operator.into(), action: "guest.start_requested".into(), host: host.clone(), vm: name.clone(), detail, ..Default::default() }))?;
    let grant = crate::reconcile::merged_lease(&uuid, &name, generation, lease_ttl_ms);
    let timeout = Duration::from_secs(60);
    let r = reg.call(&host, Kind::GrantLeases(grant), timeout).await?;
    if !r.ok {
        return Err(ControllerError::Refused(format!("granting {name}'s lease on {host} failed: {}; nothing was started", r.error)));
    }
    let r = reg.call(&host, Kind::StartGuest(StartGuest { uuid: uuid.clone() }), timeout).await?;
    let outcome = if r.ok { format!("started ({})", r.outcome) } else { format!("start failed: {}", r.error) };
    reg.db(|s| s.audit(&AuditRow::by_controller(if r.ok { "guest.started" } else { "guest.start_failed" }, &host, &name, format!("{name} on {host}: {outcome}"))))?;
    if !r.ok {
        return Err(ControllerError::Refused(format!("starting {name} on {host} failed: {}", r.error)));
    }
    if r.guest.as_ref().is_some_and(|g| lifeboat_proto::holds_disk(g.state)) {
        if let Some(w) = by_uuid(reg).remove(&uuid).filter(|w| w.host == host) {
            end(reg, &w, &format!("started on {host} by {operator}"))?;
        }
    }
    reg.touch(&host);
    let mut out: Vec<GuestRecord> = reg.list_guests(Some(&host), Some(&uuid), false)?;
    annotate_guests(reg, &mut out);
    out.into_iter().next().ok_or_else(|| ControllerError::NotFound(format!("{name} is no longer reported by {host}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(uuid: &str, state: &str, start: bool) -> MoveRow {
        MoveRow {
            job_id: "mig-1".into(),
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            source: "a".into(),
            target: "b".into(),
            state: state.into(),
            start,
            error: format!("why {uuid}"),
            ..Default::default()
        }
    }

    fn own(host: &str, complete: bool) -> OwnerRow {
        OwnerRow { uuid: "x".into(), host: host.into(), generation: 2, from_host: "a".into(), job: "j".into(), complete }
    }

    #[test]
    fn only_a_guest_left_behind_that_should_run_and_is_still_the_sources_waits() {
        use MoveState::*;
        assert!(waits(NotMoved, true, None, "a"));
        assert!(waits(Failed, true, None, "a"));
        assert!(waits(Failed, true, Some(&own("a", true)), "a"), "owned by the source itself");
        assert!(!waits(Failed, false, None, "a"), "desired stopped: nothing to wait for");
        assert!(!waits(Running, true, None, "a") && !waits(DefinedStopped, true, None, "a"), "moved");
        assert!(!waits(Pending, true, None, "a"), "still in flight");
        assert!(!waits(Failed, true, Some(&own("b", false)), "a"), "an unfinished move: nobody's until finished");
        assert!(!waits(NotMoved, true, Some(&own("b", true)), "a"), "moved elsewhere earlier");
    }

    #[test]
    fn a_wait_ends_on_a_complete_owner_elsewhere_and_an_unfinished_move_is_never_the_hosts() {
        let w = WaitingRow { uuid: "x".into(), host: "a".into(), name: "vm-x".into(), reason: "r".into(), since_ms: 1, job: "j".into() };
        assert_eq!(judge(&w, Some(&own("b", true))), WaitJudgement::Ends("b owns it now".into()), "restored or moved to b");
        assert_eq!(judge(&w, Some(&own("b", false))), WaitJudgement::Unfinished, "nobody's: never started, never ended");
        assert_eq!(judge(&w, Some(&own("a", true))), WaitJudgement::PerHost);
        assert_eq!(judge(&w, None), WaitJudgement::PerHost);
        let u = WaitingRow { reason: "unfinished move to b (job j): start timed out".into(), ..w.clone() };
        assert_eq!(unfinished_target(&u), Some("b"));
        assert_eq!(unfinished_target(&w), None);
        assert_eq!(judge(&u, Some(&own("b", false))), WaitJudgement::Unfinished);
        assert_eq!(judge(&u, Some(&own("b", true))), WaitJudgement::Ends("b owns it now".into()), "the move was finished");
    }

    #[test]
    fn a_wait_ends_when_another_host_runs_and_owns_the_guest() {
        let w = WaitingRow { uuid: "x".into(), host: "a".into(), name: "vm-x".into(), reason: "r".into(), since_ms: 1, job: "j".into() };
        let hs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(moved_by_hand(&w, &hs(&["b"]), |h| h == "b").as_deref(), Some("it runs on b, which owns it now (moved outside Lifeboat)"));
        assert_eq!(moved_by_hand(&w, &hs(&["b"]), |_| false), None, "b runs a copy it does not own: still waits (and never starts on a)");
        assert_eq!(moved_by_hand(&w, &hs(&["a"]), |_| true), None, "running on its own host ends it elsewhere");
        assert_eq!(moved_by_hand(&w, &[], |_| true), None);
    }

    #[test]
    fn a_forced_move_that_failed_after_its_owner_was_recorded_waits_for_an_operator_to_finish_it() {
        use MoveState::*;
        assert!(unfinished(Failed, true, Some(&own("b", false)), "a"));
        assert!(!unfinished(Failed, false, Some(&own("b", false)), "a"), "desired stopped");
        assert!(!unfinished(Failed, true, Some(&own("b", true)), "a"), "finished: b's");
        assert!(!unfinished(Failed, true, None, "a") && !unfinished(Running, true, Some(&own("b", false)), "a"));
        let other_source = OwnerRow { from_host: "c".into(), ..own("b", false) };
        assert!(!unfinished(Failed, true, Some(&other_source), "a"), "an unfinished move off another host");
        let moves = [mv("5", "FAILED", true)];
        let rows = rows_for_job(&moves, |_| None, |_| Some(own("b", false)), 42);
        assert_eq!(rows.len(), 1, "listed as waiting");
        assert_eq!((rows[0].host.as_str(), rows[0].reason.as_str()), ("a", "unfinished move to b (job j): why 5"));
        assert_eq!(unfinished_target(&rows[0]), Some("b"));
        let d = alarm_detail(&rows[0]);
        assert!(d.contains("NOT started by itself") && d.contains("`lifeboat move --vm vm-5 --from a --to b --yes`"), "{d}");
        assert!(!d.contains("vms start"), "vms start refuses a guest nobody owns: {d}");
    }

    #[test]
    fn waiting_rows_keep_their_since_time_and_end_with_a_move_or_a_run() {
        let mut s = crate::store::Store::open_in_memory().unwrap();
        let row = |uuid: &str, host: &str, since: i64, job: &str| WaitingRow {
            uuid: uuid.into(),
            host: host.into(),
            name: format!("vm-{uuid}"),
            reason: format!("left by {job}"),
            since_ms: since,
            job: job.into(),
        };
        s.end_job_with_waiting("j1", "PARTIAL", "e", None, &[row("1", "a", 10, "j1"), row("2", "a", 10, "j1")], &[]).unwrap();
        // A later job leaves 1 waiting again on the same host: since is kept, reason and job follow.
        s.end_job_with_waiting("j2", "PARTIAL", "e", None, &[row("1", "a", 20, "j2")], &["2".to_string()]).unwrap();
        assert_eq!(s.waiting().unwrap(), vec![row("1", "a", 10, "j2")]);
        // On another host it is a new wait.
        s.end_job_with_waiting("j3", "PARTIAL", "e", None, &[row("1", "b", 30, "j3")], &[]).unwrap();
        assert_eq!(s.waiting().unwrap(), vec![row("1", "b", 30, "j3")]);
        let a = AuditRow::by_controller("guest.waiting_ended", "b", "vm-1", "runs".into());
        assert!(s.end_waiting("1", &a).unwrap());
        assert!(!s.end_waiting("1", &a).unwrap(), "ending twice changes nothing");
        assert!(s.waiting().unwrap().is_empty());
    }

    #[test]
    fn a_jobs_waiting_rows_follow_the_moves_desired_state_and_owner() {
        let moves = [mv("1", "NOT_MOVED", true), mv("2", "FAILED", false), mv("3", "FAILED", false), mv("4", "RUNNING", true), mv("5", "FAILED", true)];
        let desired = |u: &str| match u {
            "2" => Some(("a".to_string(), "running".to_string())),
            "3" => Some(("a".to_string(), "stopped".to_string())),
            _ => None,
        };
        let owner = |u: &str| (u == "5").then(|| own("b", false));
        let rows = rows_for_job(&moves, desired, owner, 42);
        let got: Vec<(&str, &str, &str, i64)> = rows.iter().map(|w| (w.uuid.as_str(), w.host.as_str(), w.reason.as_str(), w.since_ms)).collect();
        assert_eq!(&got[..2], [("1", "a", "why 1", 42), ("2", "a", "why 2", 42)]);
        assert_eq!(got[2], ("5", "a", "unfinished move to b (job j): why 5", 42), "an unfinished move waits for an operator");
        assert_eq!(got.len(), 3);
        let d = alarm_detail(&rows[0]);
        assert!(d.contains("vm-1 (1) waits to run again on a") && d.contains("job mig-1: why 1") && d.contains("lifeboat vms start vm-1"), "{d}");
        let long = WaitingRow { reason: "x".repeat(1000), ..rows[0].clone() };
        assert!(alarm_detail(&long).len() < 700, "the reason is clipped");
    }
}
