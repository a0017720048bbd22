//! The level-triggered reconciler: every pass compares what each connected
//! host reports with what Lifeboat wants, and acts on the differences:
//! renew start leases for the guests a host owns, stop a copy of a guest
//! that runs on a host that does not own it, and after a normal reboot start
//! the guests that should run (this replaces libvirt autostart).
//! [`decide`] is pure; [`run`] carries the actions out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_proto::holds_disk;
use lifeboat_proto::v1::{GrantLeases, Lease, StartGuest, StopGuest, command::Kind};
use tracing::{info, warn};

use crate::ports::AuditRow;
use crate::registry::Registry;

pub use crate::domain::view::{HostSnapshot, OwnerView};

pub use crate::domain::reconcile::{Action, decide, decide_waiting};

/// What one pass decided for one host.
#[derive(Debug)]
pub struct Decision {
    /// Host.
    pub host: String,
    /// Its snapshot held a fresh inventory (stale copies were judged).
    pub fresh: bool,
    /// Its guests that hold their disks there (an alarm about one of them is
    /// not cleared, whatever was decided).
    pub holding: BTreeSet<String>,
    /// What to do.
    pub actions: Vec<Action>,
}

/// Stop and start attempts against one guest on one host: one at a time,
/// retried with a growing delay, audited once per distinct outcome, and its
/// alarm raised once per occurrence (an operator who clears it while the
/// copy still runs is not shouted at again every pass).
#[derive(Debug, Clone)]
struct Attempt {
    in_flight: bool,
    next_ms: i64,
    delay_ms: i64,
    last_outcome: String,
    alarm: Option<(&'static str, String)>,
}

const RETRY_FIRST_MS: i64 = 2_000;
const RETRY_MAX_MS: i64 = 60_000;

type Attempts = Arc<Mutex<HashMap<(String, String), Attempt>>>;

/// Runs the reconciler forever: a pass every 500 ms over the hosts whose
/// state changed or whose leases are due, and over every connected host
/// every 30 s (the resync backstop of a level-triggered loop). During the
/// startup grace, in which agents reconnect and report, only leases are
/// granted; while a restored database is not yet rebuilt from the hosts'
/// reports, nothing is decided: that would grant and start on old information.
pub async fn run(reg: Arc<Registry>, lease_ttl_ms: i64) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut pass = 0u64;
    let attempts: Attempts = Arc::default();
    // Grants decided as sessions open go out at once, each host's on its
    // own task, as a pass's would.
    reg.grant_at_open(lease_ttl_ms);
    let opened = {
        let (reg, attempts) = (reg.clone(), attempts.clone());
        tokio::spawn(async move {
            loop {
                for a in reg.take_open_grants().await {
                    let (reg, attempts) = (reg.clone(), attempts.clone());
                    tokio::spawn(async move { act(&reg, &attempts, a, lease_ttl_ms).await });
                }
            }
        })
    };
    let _stop_with_the_reconciler = AbortOnDrop(opened);
    let mut held_logged = false;
    loop {
        tick.tick().await;
        let now = reg.now_ms();
        // During the startup grace leases are granted (a host that fails in
        // it must not be left without lease files, with libvirt autostart
        // on), but nothing is stopped or started: what runs elsewhere is not
        // known yet. A restored database holds everything.
        let startup = reg.in_startup_grace(now);
        if let Some(why) = reg.restore_hold() {
            if !held_logged {
                info!("reconciler holding: {why}");
                held_logged = true;
            }
            continue;
        }
        if held_logged {
            info!("reconciler running");
            held_logged = false;
        }
        let full = pass.is_multiple_of(60);
        pass += 1;
        // Snapshots and decisions are plain CPU work (a full pass over 10,000
        // hosts takes tens of ms): off the async workers, which carry the
        // agents' heartbeats.
        let r = reg.clone();
        let decided = tokio::task::spawn_blocking(move || {
            // Guests waiting to run again on their host (a small table).
            // Unreadable: nothing is started or ended this pass.
            // On a blocking thread: the store call blocks it, not a worker.
            let waiting = r.repos().call_blocking(|r| r.jobs().waiting()).unwrap_or_else(|e| {
                warn!("reading waiting guests failed: {e}; no waiting guest is started this pass");
                Vec::new()
            });
            let uuids: Vec<String> = waiting.iter().map(|w| w.uuid.clone()).collect();
            let holders = if uuids.is_empty() { BTreeMap::new() } else { r.holders(&uuids) };
            let mut by_host: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            for w in waiting {
                // Judged on the ownership record whether or not the host
                // reports the guest (a silent host, a guest undefined there).
                match crate::waiting::judge(&w, r.owner_row(&w.uuid).as_ref()) {
                    crate::waiting::WaitJudgement::Ends(why) if !startup => {
                        if let Err(e) = crate::waiting::end_blocking(&r, &w, &why) {
                            warn!(host = %w.host, uuid = %w.uuid, "ending a guest's wait failed: {e}");
                        }
                    }
                    crate::waiting::WaitJudgement::Ends(_) | crate::waiting::WaitJudgement::Unfinished => {}
                    crate::waiting::WaitJudgement::PerHost => {
                        let held = holders.get(&w.uuid).map(Vec::as_slice).unwrap_or_default();
                        match crate::waiting::moved_by_hand(&w, held, |h| r.owns(h, &w.uuid)) {
                            Some(why) if !startup => {
                                if let Err(e) = crate::waiting::end_blocking(&r, &w, &why) {
                                    warn!(host = %w.host, uuid = %w.uuid, "ending a guest's wait failed: {e}");
                                }
                            }
                            Some(_) => {}
                            None => by_host.entry(w.host).or_default().push((w.uuid, w.name)),
                        }
                    }
                }
            }
            r.reconcile_each(now, lease_ttl_ms, full, |snap| {
                // Stamped when decided, after its snapshot was taken: a pass
                // that waited for the lock behind a session's opening must
                // not issue its newer view under an older time than the
                // grant that opening decided (the agent keeps the later one).
                let now = r.now_ms();
                let mut actions = decide(snap, now, lease_ttl_ms);
                if let Some(w) = by_host.get(&snap.host) {
                    actions.extend(decide_waiting(snap, w, &holders));
                }
                Decision {
                    host: snap.host.clone(),
                    fresh: snap.inventory_seen,
                    holding: snap.guests.iter().filter(|g| holds_disk(g.state)).map(|g| g.uuid.clone()).collect(),
                    actions,
                }
            })
        })
        .await
        .unwrap_or_default();
        for mut d in decided {
            if startup {
                d.actions.retain(|a| matches!(a, Action::GrantLeases { .. }));
                d.fresh = false;
            }
            let (actions, cleared) = plan_attempts(&reg, &attempts, d, now);
            if !cleared.is_empty() {
                let reg = reg.clone();
                tokio::spawn(async move { clear_gone(&reg, cleared).await });
            }
            if actions.is_empty() {
                continue;
            }
            let reg = reg.clone();
            let attempts = attempts.clone();
            // Each host's actions run in order; hosts do not wait for each other.
            tokio::spawn(async move {
                for a in actions {
                    act(&reg, &attempts, a, lease_ttl_ms).await;
                }
            });
        }
    }
}

/// Aborts a task when dropped (the reconciler's companions end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock(a: &Attempts) -> std::sync::MutexGuard<'_, HashMap<(String, String), Attempt>> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// Filters one host's decided actions through the attempts in progress:
/// a stop or start already running or waiting for its retry time is not
/// sent again; a boot start is marked done at once (it is decided once per
/// boot, not once per pass while its starts run). With a fresh inventory, a
/// stale copy that no longer holds its disk has its alarm cleared: the cause
/// is gone.
fn plan_attempts(reg: &Registry, attempts: &Attempts, d: Decision, now: i64) -> (Vec<Action>, Vec<GoneAlarm>) {
    let mut out = Vec::new();
    let mut cleared = Vec::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut map = lock(attempts);
    for a in d.actions {
        let key = match &a {
            Action::StopStale { host, uuid, .. }
            | Action::StartForBoot { host, uuid, .. }
            | Action::StartWaiting { host, uuid, .. } => (host.clone(), uuid.clone()),
            Action::EndWaiting { .. } => {
                out.push(a);
                continue;
            }
            Action::BootStartDone { host } => {
                reg.boot_start_done(host);
                continue;
            }
            Action::GrantLeases { .. } => {
                out.push(a);
                continue;
            }
        };
        if matches!(a, Action::StopStale { .. }) {
            wanted.insert(key.1.clone());
        }
        let e = map.entry(key).or_insert_with(|| Attempt {
            in_flight: false,
            next_ms: 0,
            delay_ms: RETRY_FIRST_MS,
            last_outcome: String::new(),
            alarm: None,
        });
        if e.in_flight || now < e.next_ms {
            continue;
        }
        e.in_flight = true;
        out.push(a);
    }
    if d.fresh {
        let gone: Vec<(String, String)> = map
            .iter()
            .filter(|((h, u), e)| {
                h == &d.host && !wanted.contains(u) && !d.holding.contains(u) && !e.in_flight && e.alarm.is_some()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(Attempt { alarm: Some((kind, detail)), .. }) = map.remove(&k) {
                cleared.push((k.0, k.1, kind, detail));
            }
        }
    }
    (out, cleared)
}

/// An alarm of a stale copy that no longer holds its disks: (host, uuid,
/// kind, detail). Cleared after the attempts' lock is released.
type GoneAlarm = (String, String, &'static str, String);

/// Clears the alarms of stale copies that no longer hold their disks.
async fn clear_gone(reg: &Registry, gone: Vec<GoneAlarm>) {
    for (host, uuid, kind, detail) in gone {
        let why = format!("guest {uuid} no longer holds its disks on {host}");
        match reg.clear_alarm_by_cause(&host, kind, &detail, &why).await {
            Ok(()) => info!(host = %host, uuid = %uuid, kind, "alarm cleared: the copy no longer runs"),
            Err(e) => warn!(host = %host, "clearing an alarm failed: {e}"),
        }
    }
}

/// Records how one stop or start attempt ended; returns whether this
/// outcome differs from the last one (only then is it audited).
fn finish_attempt(attempts: &Attempts, host: &str, uuid: &str, ok: bool, outcome: &str, now: i64) -> bool {
    let mut map = lock(attempts);
    let Some(e) = map.get_mut(&(host.to_string(), uuid.to_string())) else { return true };
    e.in_flight = false;
    if ok {
        e.delay_ms = RETRY_FIRST_MS;
        e.next_ms = now + RETRY_FIRST_MS;
    } else {
        e.next_ms = now + e.delay_ms;
        e.delay_ms = (e.delay_ms * 2).min(RETRY_MAX_MS);
    }
    let new = e.last_outcome != outcome;
    e.last_outcome = outcome.to_string();
    new
}

async fn act(reg: &Registry, attempts: &Attempts, a: Action, lease_ttl_ms: i64) {
    let timeout = Duration::from_secs(20);
    match a {
        Action::GrantLeases { host, leases, issued_ms, early } => {
            let now = reg.now_ms();
            // Mark first, so the next pass does not send the same again meanwhile.
            reg.leases_sent(&host, now, crate::domain::reconcile::lease_set(&leases), issued_ms);
            let cmd = GrantLeases {
                leases: leases.into_iter().map(|(uuid, name, generation)| Lease { uuid, name, generation }).collect(),
                expires_unix_ms: now + lease_ttl_ms,
                merge: false,
                issued_unix_ms: issued_ms,
            };
            // Unordered: granted as soon as the session opens, its answer
            // would otherwise wait behind the inventory the agent sends then.
            let res = reg.call_unordered(&host, Kind::GrantLeases(cmd), timeout).await;
            if let Ok(r) = &res {
                // The agent refused some leases: a generation older than
                // one it already holds (this controller's view is behind),
                // or a lease file it cannot read. Either way those guests
                // cannot start there until someone looks.
                for uuid in &r.stale_generation {
                    if early {
                        // The stored generation may be behind what the host
                        // holds; its inventory shows it (then the set, and
                        // the grant, change) and the grant after it judges.
                        info!(host = %host, uuid = %uuid, "a lease granted before the inventory was refused as older than the host's; the grants after the inventory judge it");
                        continue;
                    }
                    let detail = format!(
                        "{host} refused the lease of {uuid}: its generation is older than the one {host} already holds \
                         (generations only move forward); the controller's database may be behind the hosts (a restored \
                         backup?): see `lifeboat vms show {uuid}` and `lifeboat log --vm {uuid}`"
                    );
                    let _ = reg.raise_alarm(&host, "stale-generation", &detail).await;
                }
                for uuid in &r.lease_unreadable {
                    let detail = format!(
                        "{host} cannot read its lease file of {uuid} (corrupt or an I/O error; the agent's log names the \
                         path): the guest cannot start there until the file is repaired or removed"
                    );
                    let _ = reg.raise_alarm(&host, "lease-unreadable", &detail).await;
                }
            }
            match res {
                Ok(r) if r.ok => {
                    for uuid in &r.autostart_disabled {
                        // Rare (once per guest, or after a `virsh autostart`): look the name up then.
                        let name = reg
                            .list_guests(Some(&host), Some(uuid), false)
                            .ok()
                            .and_then(|g| g.into_iter().next())
                            .and_then(|g| g.guest)
                            .map(|g| g.name)
                            .unwrap_or_else(|| uuid.clone());
                        let name = name.as_str();
                        let detail = format!(
                            "libvirt autostart of {name} ({uuid}) on {host} was on; switched it off: Lifeboat, not libvirt, decides what starts (docs/return.md)"
                        );
                        info!(%host, guest = %name, "libvirt autostart switched off");
                        let a = AuditRow::by_controller("guest.autostart_disabled", &host, name, detail);
                        let _ = reg.repos().audit(move |l| l.append(&a)).await;
                    }
                }
                Ok(r) => warn!(%host, "granting leases failed: {}", r.error),
                Err(e) => warn!(%host, "granting leases failed: {e}"),
            }
        }
        Action::StopStale { host, uuid, name, owner, alarm } => {
            let detail = match alarm {
                "split-brain" => format!(
                    "{name} ({uuid}) holds its disks on {host} and on {owner}, which reported it first: two copies; stopping the copy on {host}"
                ),
                _ => format!(
                    "{name} ({uuid}) is running on {host}, but Lifeboat recorded {owner} as its owner: stopping the copy on {host}"
                ),
            };
            let first = {
                let mut map = lock(attempts);
                match map.get_mut(&(host.clone(), uuid.clone())) {
                    Some(e) if e.alarm.is_none() => {
                        e.alarm = Some((alarm, detail.clone()));
                        true
                    }
                    _ => false,
                }
            };
            if first && let Err(e) = reg.raise_alarm(&host, alarm, &detail).await {
                warn!(%host, "raising an alarm failed: {e}");
            }
            let r = reg
                .call(&host, Kind::StopGuest(StopGuest { uuid: uuid.clone(), reason: detail.clone() }), timeout)
                .await;
            let (ok, outcome) = match r {
                Ok(r) if r.ok => (true, format!("stopped ({})", r.outcome)),
                Ok(r) => (false, format!("stop failed: {}", r.error)),
                Err(e) => (false, format!("stop failed: {e}")),
            };
            if finish_attempt(attempts, &host, &uuid, ok, &outcome, reg.now_ms()) {
                warn!(%host, guest = %name, "{alarm}: {outcome}");
                let a = AuditRow::by_controller("guest.stopped_stale", &host, &name, format!("{detail}: {outcome}"));
                let _ = reg.repos().audit(move |l| l.append(&a)).await;
            }
        }
        Action::StartForBoot { host, uuid, name } => {
            let r = reg.call(&host, Kind::StartGuest(StartGuest { uuid: uuid.clone() }), timeout).await;
            let (ok, outcome) = match r {
                Ok(r) if r.ok => (true, format!("started ({})", r.outcome)),
                Ok(r) => (false, format!("start failed: {}", r.error)),
                Err(e) => (false, format!("start failed: {e}")),
            };
            let new = finish_attempt(attempts, &host, &uuid, ok, &outcome, reg.now_ms());
            // Decided once per boot: nothing to keep once it has an outcome.
            lock(attempts).remove(&(host.clone(), uuid.clone()));
            if new {
                info!(%host, guest = %name, "after reboot: {outcome}");
                let a = AuditRow::by_controller(
                    "guest.boot_start",
                    &host,
                    &name,
                    format!("{host} rebooted; {name} ({uuid}) should run: {outcome}"),
                );
                let _ = reg.repos().audit(move |l| l.append(&a)).await;
            }
        }
        Action::BootStartDone { host } => reg.boot_start_done(&host),
        Action::StartWaiting { host, uuid, name, generation } => {
            // Claimed for the whole start (a move or restore meanwhile finds
            // it busy); checked again before the lease and before the start
            // against what was decided.
            let job = format!("start-{uuid}");
            let (ok, outcome) = match crate::guestops::claim(reg, &uuid, &job, &host, &host) {
                Err(other) => (false, format!("not started: {other} acts on it")),
                Ok(_claim) => match crate::guestops::guarded_start(
                    reg,
                    &uuid,
                    &name,
                    &host,
                    generation,
                    &job,
                    lease_ttl_ms,
                    timeout,
                )
                .await
                {
                    crate::guestops::StartEnd::Started { outcome, .. } => (true, format!("started ({outcome})")),
                    crate::guestops::StartEnd::Refused { check, detail } => {
                        (false, format!("not started: check {check} failed: {detail}"))
                    }
                    crate::guestops::StartEnd::GrantFailed(e) => {
                        (false, format!("not started: granting its lease failed: {e}"))
                    }
                    crate::guestops::StartEnd::StartFailed(e) => (false, format!("start failed: {e}")),
                    crate::guestops::StartEnd::Unknown(e) => {
                        (false, format!("start got no answer ({e}); it may still start"))
                    }
                },
            };
            // Kept (not removed) on success: the next attempt waits for the
            // backoff, by which time the host reports it running.
            if finish_attempt(attempts, &host, &uuid, ok, &outcome, reg.now_ms()) {
                info!(%host, guest = %name, "waiting guest: {outcome}");
                let a = AuditRow::by_controller(
                    "guest.waiting_start",
                    &host,
                    &name,
                    format!("{host} is healthy again; {name} ({uuid}) waited to run there: {outcome}"),
                );
                let _ = reg.repos().audit(move |l| l.append(&a)).await;
            }
        }
        Action::EndWaiting { host, uuid, why } => {
            let rows = reg.repos().jobs(|j| j.waiting()).await.unwrap_or_default();
            if let Some(w) = rows.into_iter().find(|w| w.uuid == uuid && w.host == host)
                && let Err(e) = crate::waiting::end(reg, &w, &why).await
            {
                warn!(%host, %uuid, "ending a guest's wait failed: {e}");
            }
            lock(attempts).remove(&(host, uuid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_proto::v1::{Guest, GuestState};

    use crate::domain::host::HostStatus;

    fn g(uuid: &str, running: bool) -> Guest {
        Guest {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            state: if running { GuestState::Running as i32 } else { GuestState::Shutoff as i32 },
            ..Default::default()
        }
    }

    fn snap() -> HostSnapshot {
        HostSnapshot {
            host: "a".into(),
            status: HostStatus::Available,
            inventory_seen: true,
            pending_boot_start: false,
            leases_sent: None,
            uninventoried_since_ms: 0,
            guests: vec![g("1", true), g("2", false), g("3", true)],
            owners: [("3".to_string(), OwnerView::Other { host: "b".into(), recorded: true })].into_iter().collect(),
            desired: [("1", "running"), ("2", "running")].iter().map(|(u, d)| (u.to_string(), d.to_string())).collect(),
            owned_unreported: vec![],
            generations: [("1".to_string(), 3u64)].into_iter().collect(),
            in_job: BTreeSet::new(),
            claimed: BTreeSet::new(),
            elsewhere: BTreeSet::new(),
        }
    }

    #[test]
    fn a_waiting_guest_starts_only_on_a_healthy_owner_with_its_lease_and_nothing_holding_its_disk() {
        let w = |u: &str| vec![(u.to_string(), format!("vm-{u}"))];
        let none = BTreeMap::new();
        let mut s = snap();
        let start2 =
            vec![Action::StartWaiting { host: "a".into(), uuid: "2".into(), name: "vm-2".into(), generation: 0 }];
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "no lease sent yet this session: lease first");
        s.leases_sent = Some((0, vec![("1".into(), 3), ("2".into(), 0)]));
        assert_eq!(decide_waiting(&s, &w("2"), &none), start2);
        for st in [HostStatus::Maintenance, HostStatus::Offline] {
            s.status = st;
            assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "{st:?}: not healthy, cleanup not done");
        }
        s.status = HostStatus::NotAccepting;
        assert_eq!(decide_waiting(&s, &w("2"), &none), start2, "NOT_ACCEPTING is healthy");
        s.inventory_seen = false;
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "no fresh inventory");
        s.inventory_seen = true;
        let held: BTreeMap<String, Vec<String>> = [("2".to_string(), vec!["c".to_string()])].into_iter().collect();
        assert!(decide_waiting(&s, &w("2"), &held).is_empty(), "holds its disk on c: never a second copy");
        let here: BTreeMap<String, Vec<String>> = [("2".to_string(), vec!["a".to_string()])].into_iter().collect();
        assert_eq!(decide_waiting(&s, &w("2"), &here), start2, "only another host's copy counts as elsewhere");
        s.in_job.insert("2".into());
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "a job moves it");
        s.in_job.clear();
        s.claimed.insert("2".into());
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "a restore or start on its owner acts on it");
        s.claimed.clear();
        s.owners.insert("2".into(), OwnerView::Unsure);
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "owner unsure: nothing");
        s.owners.remove("2");
        s.leases_sent = Some((0, vec![("1".into(), 3)]));
        assert!(decide_waiting(&s, &w("2"), &none).is_empty(), "its lease was not in the set sent");
        assert!(decide_waiting(&s, &w("9"), &none).is_empty(), "not reported: nothing to start");
        // It runs on its owner: it stops waiting (whatever the status).
        s.status = HostStatus::Maintenance;
        assert_eq!(
            decide_waiting(&s, &w("1"), &none),
            vec![Action::EndWaiting { host: "a".into(), uuid: "1".into(), why: "it runs on a again".into() }]
        );
        // A completed move made b its owner.
        assert_eq!(
            decide_waiting(&s, &w("3"), &none),
            vec![Action::EndWaiting { host: "a".into(), uuid: "3".into(), why: "b owns it now".into() }]
        );
    }

    #[test]
    fn leases_cover_owned_guests_only_and_are_renewed() {
        let a = decide(&snap(), 1000, 30_000);
        assert!(a.contains(&Action::StopStale {
            host: "a".into(),
            uuid: "3".into(),
            name: "vm-3".into(),
            owner: "b".into(),
            alarm: "stale-copy-running"
        }));
        let leases = a
            .iter()
            .find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None })
            .unwrap();
        assert_eq!(leases.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(leases[0].2, 3, "a lease carries the ownership generation");
        let mut s = snap();
        s.leases_sent = Some((1000, vec![("1".into(), 3), ("2".into(), 0)]));
        assert!(!decide(&s, 5000, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })));
        assert!(
            decide(&s, 11_001, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })),
            "renewed at a third of the TTL"
        );
    }

    #[test]
    fn leases_are_renewed_from_the_stored_view_before_the_inventory_but_nothing_is_stopped_or_started() {
        let leases = |a: &[Action]| {
            a.iter().find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None })
        };
        let mut s = snap();
        s.inventory_seen = false;
        s.pending_boot_start = true;
        s.owned_unreported = vec![("7".into(), String::new())];
        s.generations.insert("7".into(), 9);
        s.in_job.insert("2".into());
        let a = decide(&s, 1000, 30_000);
        let got = leases(&a).expect("a grant before the inventory");
        assert_eq!(
            got,
            [("1".to_string(), "vm-1".to_string(), 3), ("7".to_string(), String::new(), 9)],
            "owned guests and owned unreported ones with their generations; not 3 (b owns it), not 2 (a job moves it)"
        );
        assert_eq!(a.len(), 1, "only the grant: no stale-copy stop, no boot start: {a:?}");
        s.leases_sent = Some((1000, vec![("1".into(), 3), ("7".into(), 9)]));
        assert!(decide(&s, 1500, 30_000).is_empty(), "the same set is not sent again, and still no boot start");
        assert!(
            matches!(a[0], Action::GrantLeases { early: true, .. }),
            "marked as decided before the inventory: {a:?}"
        );
        // The inventory arrives with the same guests: not due again, and the boot start goes ahead.
        s.inventory_seen = true;
        let a = decide(&s, 2000, 30_000);
        assert!(leases(&a).is_none(), "{a:?}");
        assert!(a.contains(&Action::BootStartDone { host: "a".into() }), "{a:?}");
        // The inventory showed the store behind on a generation: granted
        // again at once, with it, before the boot start.
        s.generations.insert("1".into(), 4);
        let a = decide(&s, 2000, 30_000);
        assert_eq!(leases(&a).unwrap()[0], ("1".to_string(), "vm-1".to_string(), 4));
        let grant = a.iter().position(|x| matches!(x, Action::GrantLeases { early: false, .. })).expect("a grant");
        let boot = a.iter().position(|x| matches!(x, Action::BootStartDone { .. })).expect("the boot start");
        assert!(grant < boot, "{a:?}");
        // An inventory that never arrives: renewals from the stored view
        // stop three lease lives after the first session without one, and
        // the leases lapse.
        let mut s = snap();
        s.inventory_seen = false;
        s.uninventoried_since_ms = 100_000;
        assert!(leases(&decide(&s, 189_999, 30_000)).is_some());
        s.leases_sent = Some((180_000, vec![("1".into(), 3), ("2".into(), 0)]));
        assert!(decide(&s, 190_000, 30_000).is_empty(), "no renewal without an inventory after 90 s");
        s.inventory_seen = true;
        assert!(leases(&decide(&s, 190_000, 30_000)).is_some(), "the inventory brings them back");
        // A host the store knows no guest of gets no empty grant before its inventory.
        let mut s = snap();
        s.inventory_seen = false;
        s.guests.clear();
        assert!(decide(&s, 1, 30_000).is_empty());
        s.inventory_seen = true;
        assert_eq!(leases(&decide(&s, 1, 30_000)), Some(vec![]), "after it, an empty set is granted (revocation)");
        // OFFLINE: nothing, before or after the inventory.
        let mut s = snap();
        s.status = HostStatus::Offline;
        for seen in [false, true] {
            s.inventory_seen = seen;
            assert!(leases(&decide(&s, 1, 30_000)).is_none());
        }
    }

    #[test]
    fn a_rebooted_host_starts_what_should_run_after_its_leases() {
        let mut s = snap();
        s.pending_boot_start = true;
        assert!(!decide(&s, 1, 30_000).iter().any(|x| matches!(x, Action::StartForBoot { .. })), "leases first");
        s.leases_sent = Some((1, vec![("1".into(), 3), ("2".into(), 0)]));
        let a = decide(&s, 2, 30_000);
        assert_eq!(
            a.iter().filter(|x| matches!(x, Action::StartForBoot { .. })).collect::<Vec<_>>(),
            [&Action::StartForBoot { host: "a".into(), uuid: "2".into(), name: "vm-2".into() }]
        );
        assert!(a.contains(&Action::BootStartDone { host: "a".into() }));
        s.status = HostStatus::Maintenance;
        assert!(
            !decide(&s, 2, 30_000).iter().any(|x| matches!(x, Action::StartForBoot { .. })),
            "quarantine starts nothing"
        );
    }

    #[test]
    fn an_offline_host_gets_no_leases() {
        let mut s = snap();
        s.status = HostStatus::Offline;
        assert!(!decide(&s, 1, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })));
    }

    fn with_state(uuid: &str, st: GuestState) -> Guest {
        Guest { state: st as i32, ..g(uuid, false) }
    }

    #[test]
    fn stale_copies_are_judged_only_on_a_fresh_inventory_and_in_every_state_that_holds_the_disk() {
        let mut s = snap();
        s.guests.push(with_state("4", GuestState::Pmsuspended));
        s.guests.push(with_state("5", GuestState::Shutoff));
        s.owners.insert("4".into(), OwnerView::Other { host: "b".into(), recorded: true });
        s.owners.insert("5".into(), OwnerView::Other { host: "b".into(), recorded: true });
        let stops = |a: &[Action]| {
            a.iter()
                .filter_map(|x| if let Action::StopStale { uuid, .. } = x { Some(uuid.clone()) } else { None })
                .collect::<Vec<_>>()
        };
        assert_eq!(stops(&decide(&s, 1, 30_000)), ["3", "4"], "pmsuspended holds its disk; shut off does not");
        s.inventory_seen = false;
        assert!(stops(&decide(&s, 1, 30_000)).is_empty(), "the list from before this session decides nothing");
    }

    #[test]
    fn a_second_copy_of_a_guest_that_runs_on_its_first_host_is_split_brain_and_gets_no_lease() {
        let mut s = snap();
        s.owners.insert("1".into(), OwnerView::Other { host: "b".into(), recorded: false });
        let a = decide(&s, 1, 30_000);
        assert!(
            a.iter().any(|x| matches!(x, Action::StopStale { uuid, alarm: "split-brain", .. } if uuid == "1")),
            "{a:?}"
        );
        let leases = a
            .iter()
            .find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None })
            .unwrap();
        assert!(!leases.iter().any(|l| l.0 == "1"), "no lease for a second copy");
        // Unsure (the first host is silent): no lease, no stop.
        s.owners.insert("1".into(), OwnerView::Unsure);
        let a = decide(&s, 1, 30_000);
        assert!(!a.iter().any(|x| matches!(x, Action::StopStale { uuid, .. } if uuid == "1")));
        let leases = a
            .iter()
            .find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None })
            .unwrap();
        assert!(!leases.iter().any(|l| l.0 == "1"));
    }

    #[test]
    fn guests_in_a_job_are_left_alone_and_nothing_starts_that_runs_elsewhere() {
        let mut s = snap();
        s.in_job.insert("1".into());
        s.in_job.insert("3".into());
        let a = decide(&s, 1, 30_000);
        assert!(!a.iter().any(|x| matches!(x, Action::StopStale { .. })), "the job stops its own guests");
        let leases = a
            .iter()
            .find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None })
            .unwrap();
        assert_eq!(
            leases.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
            ["2"],
            "no renewal for a guest being moved"
        );
        let mut s = snap();
        s.pending_boot_start = true;
        s.leases_sent = Some((1, vec![("1".into(), 3), ("2".into(), 0)]));
        s.elsewhere.insert("2".into());
        assert!(!decide(&s, 2, 30_000).iter().any(|x| matches!(x, Action::StartForBoot { .. })), "2 runs elsewhere");
    }

    #[tokio::test]
    async fn a_waiting_start_claims_the_guest_and_starts_only_the_decided_generation_on_an_unchanged_owner() {
        use crate::waiting::tests::{Then, actions, after_grace, agent, drain, with_vm1};
        let start = |generation: u64| Action::StartWaiting {
            host: "a".into(),
            uuid: "u1".into(),
            name: "vm1".into(),
            generation,
        };
        let (reg, a, rx) = with_vm1();
        let mut seen = agent(reg.clone(), a, rx, Then::Obey);
        after_grace(&reg, a).await;
        let attempts: Attempts = Arc::default();
        // Decided at generation 5; the record says 0 now: nothing is sent.
        act(&reg, &attempts, start(5), 3000).await;
        assert!(drain(&mut seen).is_empty());
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
        assert!(
            log.iter().any(|x| x.action == "guest.waiting_start" && x.detail.contains("check owner unchanged failed")),
            "{log:?}"
        );
        // A restore acts on it: the waiting start leaves it alone.
        reg.claim_for_restore("u1", "restore-u1", "a", "a").unwrap();
        act(&reg, &attempts, start(0), 3000).await;
        assert!(drain(&mut seen).is_empty());
        assert_eq!(reg.job_of("u1").as_deref(), Some("restore-u1"), "the restore's claim stays");
        reg.clear_in_job("restore-u1");
        // Unchanged: lease and start, both under the start's own claim, released after.
        act(&reg, &attempts, start(0), 3000).await;
        let claim = Some("start-u1".to_string());
        assert_eq!(drain(&mut seen), [("grant", claim.clone()), ("start", claim)]);
        assert!(reg.job_of("u1").is_none());
        assert!(actions(&reg).iter().filter(|a| *a == "guest.waiting_start").count() >= 2);
    }

    #[tokio::test]
    async fn a_restore_or_start_on_the_owner_itself_keeps_its_guest_from_the_waiting_start_but_not_from_its_lease() {
        use crate::waiting::tests::{after_grace, with_vm1};
        let (reg, a, _rx) = with_vm1();
        after_grace(&reg, a).await;
        reg.claim_for_restore("u1", "restore-u1", "a", "a").unwrap();
        let snaps =
            reg.reconcile_each(crate::now_ms(), 3000, true, |s| (s.host.clone(), s.claimed.clone(), s.in_job.clone()));
        let (_, claimed, in_job) = snaps.into_iter().find(|s| s.0 == "a").expect("a's snapshot");
        assert!(claimed.contains("u1") && !in_job.contains("u1"), "{claimed:?} {in_job:?}");
        assert!(reg.lease_set("a").iter().any(|l| l.0 == "u1"), "its lease stays while it is restored or started");
    }
}
