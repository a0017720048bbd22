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

use lifeboat_proto::v1::{GuestRecord, HostRecord};
use tracing::{info, warn};

use crate::domain::job::MoveState;
use crate::ports::{AuditRow, MoveRow, OwnerRow, RepoError, WaitingRow};
use crate::registry::Registry;

/// Alarm kind raised on a host for each guest waiting to run there again.
pub const GUESTS_WAITING: &str = "guests-waiting";

/// Longest reason quoted in a waiting guest's alarm, in characters.
const REASON_CHARS: usize = 300;

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
    state.is_left_behind()
        && should_run
        && owner.is_some_and(|o| o.host != source && !o.complete && o.from_host == source)
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
            let state: MoveState = m.state;
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
            Some(WaitingRow {
                uuid: m.uuid.clone(),
                host: m.source.clone(),
                name: m.name.clone(),
                reason,
                since_ms: now_ms,
                job: m.job_id.clone(),
            })
        })
        .collect()
}

/// Raises the alarm of each guest about to be recorded as waiting (before
/// the job's end is written: a crash in between resumes the job, and the
/// same alarm is not raised twice). A guest that waited already with
/// another reason has its old alarm cleared.
pub async fn raise(reg: &Registry, rows: &[WaitingRow], before: &[WaitingRow]) -> Result<(), RepoError> {
    for w in rows {
        if let Some(old) = before.iter().find(|o| o.uuid == w.uuid) {
            let (a, b) = (alarm_detail(old), alarm_detail(w));
            if a != b {
                reg.clear_alarm_by_cause(
                    &old.host,
                    GUESTS_WAITING,
                    &a,
                    &format!("{} waits again, see the newer alarm", w.name),
                )
                .await?;
            }
        }
        reg.raise_alarm(&w.host, GUESTS_WAITING, &alarm_detail(w)).await?;
    }
    Ok(())
}

/// After a job's end was written: the guests it moved no longer wait, so
/// their alarms are cleared (the rows went with the job's end).
pub async fn clear_moved(reg: &Registry, before: &[WaitingRow], moved: &[String], job: &str) -> Result<(), RepoError> {
    for w in before.iter().filter(|w| moved.contains(&w.uuid)) {
        let why = format!("job {job} moved {}", w.name);
        reg.clear_alarm_by_cause(&w.host, GUESTS_WAITING, &alarm_detail(w), &why).await?;
        info!(guest = %w.name, %job, "stopped waiting: moved");
    }
    Ok(())
}

/// A guest stops waiting (`why`: it runs on its owner, or it belongs
/// elsewhere now): its row goes (audited `guest.waiting_ended`) and its
/// alarm is cleared by cause.
pub async fn end(reg: &Registry, w: &WaitingRow, why: &str) -> Result<(), RepoError> {
    let (row, a) = end_entry(w, why);
    let ended = reg.repos().jobs(move |j| j.end_waiting(&row, &a)).await?;
    if ended {
        info!(host = %w.host, guest = %w.name, "stopped waiting: {why}");
    }
    reg.clear_alarm_by_cause(&w.host, GUESTS_WAITING, &alarm_detail(w), why).await
}

/// [`end`] for code on a blocking thread (`vms forget`, the reconciler's
/// decision pass).
pub fn end_blocking(reg: &Registry, w: &WaitingRow, why: &str) -> Result<(), RepoError> {
    let (row, a) = end_entry(w, why);
    let ended = reg.repos().call_blocking(move |r| r.jobs().end_waiting(&row, &a))?;
    if ended {
        info!(host = %w.host, guest = %w.name, "stopped waiting: {why}");
    }
    reg.clear_alarm_by_cause_blocking(&w.host, GUESTS_WAITING, &alarm_detail(w), why)
}

/// The row a wait's end removes and its audit entry.
fn end_entry(w: &WaitingRow, why: &str) -> (WaitingRow, AuditRow) {
    let detail =
        format!("{} ({}) no longer waits on {}: {why} (waited since {} ms)", w.name, w.uuid, w.host, w.since_ms);
    (w.clone(), AuditRow::by_controller("guest.waiting_ended", &w.host, &w.name, detail))
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
    holders
        .iter()
        .find(|h| **h != w.host && owns(h))
        .map(|h| format!("it runs on {h}, which owns it now (moved outside Lifeboat)"))
}

/// Ends every wait of `uuid` on a host other than `owner` (the guest was
/// placed on `owner` by an operator, e.g. `vms restore --to`): audited,
/// alarms cleared. A read error is returned.
pub async fn end_elsewhere(reg: &Registry, uuid: &str, owner: &str, why: &str) -> Result<(), RepoError> {
    for w in reg.repos().jobs(|j| j.waiting()).await?.into_iter().filter(|w| w.uuid == uuid && w.host != owner) {
        end(reg, &w, why).await?;
    }
    Ok(())
}

/// A guest forgotten on an operator's word (`lifeboat vms forget`) waits
/// no more: its wait, if any, ends (audited) and its alarm is cleared.
/// Unlike listings this reads strictly: a read error is returned.
/// Runs on a blocking thread (the `vms forget` handler's `spawn_blocking`).
pub fn end_forgotten(reg: &Registry, uuid: &str, why: &str) -> Result<(), RepoError> {
    for w in reg.repos().call_blocking(|r| r.jobs().waiting())?.into_iter().filter(|w| w.uuid == uuid) {
        end_blocking(reg, &w, why)?;
    }
    Ok(())
}

/// Every waiting guest, by UUID; a read error is logged and shows nothing
/// waiting (only shown, never decided on). Blocks on the store thread:
/// for listings (the admin handlers' blocking threads, metrics).
fn by_uuid(reg: &Registry) -> BTreeMap<String, WaitingRow> {
    match reg.repos().call_blocking(|r| r.jobs().waiting()) {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    use lifeboat_proto::v1::command::Kind;

    fn mv(uuid: &str, state: &str, start: bool) -> MoveRow {
        MoveRow {
            job_id: "mig-1".into(),
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            source: "a".into(),
            target: "b".into(),
            state: state.parse().unwrap(),
            start,
            error: format!("why {uuid}"),
            generation: 0,
            definition_xml: String::new(),
            priority: 0,
            updated_ms: 0,
            memory_kib: 0,
        }
    }

    fn own(host: &str, complete: bool) -> OwnerRow {
        OwnerRow {
            uuid: "x".into(),
            host: host.into(),
            generation: 2,
            from_host: "a".into(),
            job: "j".into(),
            complete,
        }
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
        let w = WaitingRow {
            uuid: "x".into(),
            host: "a".into(),
            name: "vm-x".into(),
            reason: "r".into(),
            since_ms: 1,
            job: "j".into(),
        };
        assert_eq!(
            judge(&w, Some(&own("b", true))),
            WaitJudgement::Ends("b owns it now".into()),
            "restored or moved to b"
        );
        assert_eq!(
            judge(&w, Some(&own("b", false))),
            WaitJudgement::Unfinished,
            "nobody's: never started, never ended"
        );
        assert_eq!(judge(&w, Some(&own("a", true))), WaitJudgement::PerHost);
        assert_eq!(judge(&w, None), WaitJudgement::PerHost);
        let u = WaitingRow { reason: "unfinished move to b (job j): start timed out".into(), ..w.clone() };
        assert_eq!(unfinished_target(&u), Some("b"));
        assert_eq!(unfinished_target(&w), None);
        assert_eq!(judge(&u, Some(&own("b", false))), WaitJudgement::Unfinished);
        assert_eq!(
            judge(&u, Some(&own("b", true))),
            WaitJudgement::Ends("b owns it now".into()),
            "the move was finished"
        );
    }

    #[test]
    fn a_wait_ends_when_another_host_runs_and_owns_the_guest() {
        let w = WaitingRow {
            uuid: "x".into(),
            host: "a".into(),
            name: "vm-x".into(),
            reason: "r".into(),
            since_ms: 1,
            job: "j".into(),
        };
        let hs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            moved_by_hand(&w, &hs(&["b"]), |h| h == "b").as_deref(),
            Some("it runs on b, which owns it now (moved outside Lifeboat)")
        );
        assert_eq!(
            moved_by_hand(&w, &hs(&["b"]), |_| false),
            None,
            "b runs a copy it does not own: still waits (and never starts on a)"
        );
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
        assert!(
            d.contains("NOT started by itself") && d.contains("`lifeboat move --vm vm-5 --from a --to b --yes`"),
            "{d}"
        );
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
        s.end_job_with_waiting("j1", "PARTIAL", "e", None, &[row("1", "a", 10, "j1"), row("2", "a", 10, "j1")], &[])
            .unwrap();
        // A later job leaves 1 waiting again on the same host: since is kept, reason and job follow.
        s.end_job_with_waiting("j2", "PARTIAL", "e", None, &[row("1", "a", 20, "j2")], &["2".to_string()]).unwrap();
        assert_eq!(s.waiting().unwrap(), vec![row("1", "a", 10, "j2")]);
        // On another host it is a new wait.
        s.end_job_with_waiting("j3", "PARTIAL", "e", None, &[row("1", "b", 30, "j3")], &[]).unwrap();
        assert_eq!(s.waiting().unwrap(), vec![row("1", "b", 30, "j3")]);
        let a = AuditRow::by_controller("guest.waiting_ended", "b", "vm-1", "runs".into());
        assert!(!s.end_waiting(&row("1", "b", 30, "j1"), &a).unwrap(), "a wait another job wrote is not ended");
        assert!(!s.end_waiting(&row("1", "a", 30, "j3"), &a).unwrap(), "nor one on another host");
        assert!(s.end_waiting(&row("1", "b", 30, "j3"), &a).unwrap());
        assert!(!s.end_waiting(&row("1", "b", 30, "j3"), &a).unwrap(), "ending twice changes nothing");
        assert!(s.waiting().unwrap().is_empty());
    }

    #[test]
    fn a_jobs_waiting_rows_follow_the_moves_desired_state_and_owner() {
        let moves = [
            mv("1", "NOT_MOVED", true),
            mv("2", "FAILED", false),
            mv("3", "FAILED", false),
            mv("4", "RUNNING", true),
            mv("5", "FAILED", true),
        ];
        let desired = |u: &str| match u {
            "2" => Some(("a".to_string(), "running".to_string())),
            "3" => Some(("a".to_string(), "stopped".to_string())),
            _ => None,
        };
        let owner = |u: &str| (u == "5").then(|| own("b", false));
        let rows = rows_for_job(&moves, desired, owner, 42);
        let got: Vec<(&str, &str, &str, i64)> =
            rows.iter().map(|w| (w.uuid.as_str(), w.host.as_str(), w.reason.as_str(), w.since_ms)).collect();
        assert_eq!(&got[..2], [("1", "a", "why 1", 42), ("2", "a", "why 2", 42)]);
        assert_eq!(
            got[2],
            ("5", "a", "unfinished move to b (job j): why 5", 42),
            "an unfinished move waits for an operator"
        );
        assert_eq!(got.len(), 3);
        let d = alarm_detail(&rows[0]);
        assert!(
            d.contains("vm-1 (1) waits to run again on a")
                && d.contains("job mig-1: why 1")
                && d.contains("lifeboat vms start vm-1"),
            "{d}"
        );
        let long = WaitingRow { reason: "x".repeat(1000), ..rows[0].clone() };
        assert!(alarm_detail(&long).len() < 700, "the reason is clipped");
    }

    /// What the fake agent of the start tests does.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Then {
        /// Carries out every command.
        Obey,
        /// A move claims the guest while the lease is granted.
        MoveOnGrant,
        /// A new ownership generation is recorded while the lease is granted.
        NewGenerationOnGrant,
        /// Starts the guest, reports it running, and its session closes before it answers.
        RunThenClose,
        /// The session closes on the start, unanswered, the guest not started.
        CloseSilently,
    }

    pub(crate) type Rx = tokio::sync::mpsc::Receiver<Box<lifeboat_proto::v1::ControllerMessage>>;

    fn vm1(state: lifeboat_proto::v1::GuestState) -> lifeboat_proto::v1::Guest {
        lifeboat_proto::v1::Guest {
            uuid: "u1".into(),
            name: "vm1".into(),
            state: state as i32,
            definition_xml: "<domain/>".into(),
            ..Default::default()
        }
    }

    /// A registry whose host `a` reports `vm1` (u1) shut off, in its startup grace.
    pub(crate) fn with_vm1() -> (std::sync::Arc<Registry>, crate::registry::SessionId, Rx) {
        use lifeboat_proto::v1::{GuestState, Inventory};
        let timing = crate::domain::host::Timing { heartbeat_interval_ms: 75, unreachable_after_ms: 300 };
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), timing).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx).unwrap();
        reg.apply_inventory("a", a, Inventory { host: None, guests: vec![vm1(GuestState::Shutoff)], more: false })
            .unwrap();
        (std::sync::Arc::new(reg), a, rx)
    }

    /// Past the startup grace, `a` heard now.
    pub(crate) async fn after_grace(reg: &Registry, a: crate::registry::SessionId) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        reg.heard_cell("a", a).unwrap().store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs the fake agent; each command it receives is sent on the
    /// returned channel with the job the guest was in at that moment.
    pub(crate) fn agent(
        reg: std::sync::Arc<Registry>,
        a: crate::registry::SessionId,
        mut rx: Rx,
        then: Then,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(&'static str, Option<String>)> {
        use lifeboat_proto::v1::{CommandResult, GuestState, Inventory, controller_message::Msg};
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let Some(Msg::Command(c)) = m.msg else { continue };
                let kind = match c.kind {
                    Some(Kind::GrantLeases(_)) => "grant",
                    Some(Kind::StartGuest(_)) => "start",
                    _ => "other",
                };
                let _ = seen_tx.send((kind, reg.job_of("u1")));
                match (kind, then) {
                    ("grant", Then::MoveOnGrant) => reg.set_in_job("mig-9", &[("u1".into(), "a".into(), "b".into())]),
                    ("grant", Then::NewGenerationOnGrant) => {
                        let o = OwnerRow {
                            uuid: "u1".into(),
                            host: "a".into(),
                            generation: 3,
                            from_host: "b".into(),
                            job: "mig-8".into(),
                            complete: true,
                        };
                        reg.repos()
                            .call_blocking(move |r| {
                                r.ownership().set_owner(&o, &AuditRow::by_controller("t", "a", "vm1", String::new()))
                            })
                            .unwrap();
                        reg.refresh_owners().await.unwrap();
                    }
                    ("start", Then::RunThenClose) => {
                        reg.apply_inventory(
                            "a",
                            a,
                            Inventory { host: None, guests: vec![vm1(GuestState::Running)], more: false },
                        )
                        .unwrap();
                        reg.close_session("a", a);
                        continue;
                    }
                    ("start", Then::CloseSilently) => {
                        reg.close_session("a", a);
                        continue;
                    }
                    _ => {}
                }
                reg.complete(CommandResult { id: c.id, ok: true, outcome: "done".into(), ..Default::default() });
            }
        });
        seen
    }

    pub(crate) fn drain(
        seen: &mut tokio::sync::mpsc::UnboundedReceiver<(&'static str, Option<String>)>,
    ) -> Vec<(&'static str, Option<String>)> {
        let mut out = Vec::new();
        while let Ok(x) = seen.try_recv() {
            out.push(x);
        }
        out
    }

    pub(crate) fn actions(reg: &Registry) -> Vec<String> {
        reg.repos()
            .call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default()))
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect()
    }
}
