//! The controller's in-memory view of hosts and guests, written through to
//! the [`Store`] before any change is acknowledged.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lifeboat_common::now_unix_ms;
use lifeboat_proto::v1::{
    Command, CommandResult, ControllerMessage, Guest, GuestRecord, GuestState, HostInfo, HostRecord, Inventory,
    command::Kind, controller_message,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::domain::host::{HostStatus, Liveness, Timing, liveness};
use crate::error::ControllerError;
use crate::store::{AuditRow, HostRow, Store, StoreError};

mod missing;
pub use missing::missing_detail;

/// An open agent session.
struct SessionHandle {
    generation: u64,
    tx: mpsc::Sender<Box<ControllerMessage>>,
    /// Where the agent connected from (for the duplicate-agent alarm).
    peer: Option<std::net::SocketAddr>,
    /// Set to `true` when another session takes over the host: the old
    /// session's reader stops at once (no more heartbeat acknowledgements,
    /// so its agent cannot believe it is still connected) and its stream
    /// ends with an error, so that agent dials again.
    superseded: tokio::sync::watch::Sender<bool>,
}

struct HostEntry {
    row: HostRow,
    /// When anything last arrived (Unix ms; 0 = not since this controller
    /// started). Shared with the session's reader task, which updates it
    /// without taking the registry lock; a new session gets a new cell, so a
    /// superseded session cannot keep the host alive.
    heard: Arc<AtomicI64>,
    /// Set when something the reconciler reads changed for this host.
    dirty: bool,
    /// Memory of the guests running there (KiB), kept with the guest map so
    /// a plan over 10,000 hosts need not add up 200,000 guests.
    running_kib: u64,
    session: Option<SessionHandle>,
    reported: Liveness,
    /// The host came back from a normal reboot: start what should run.
    pending_boot_start: bool,
    /// An inventory arrived in the current session.
    inventory_seen: bool,
    /// When leases were last sent in this session, and which.
    leases_sent: Option<(i64, Vec<String>)>,
}

impl HostEntry {
    fn new(row: HostRow) -> Self {
        HostEntry {
            row,
            heard: Arc::new(AtomicI64::new(0)),
            dirty: true,
            running_kib: 0,
            session: None,
            reported: Liveness::Unreachable,
            pending_boot_start: false,
            inventory_seen: false,
            leases_sent: None,
        }
    }
}

impl HostEntry {
    fn last_heard_ms(&self) -> Option<i64> {
        match self.heard.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}

/// A guest as held in memory: the fields read on every pass, and the rest
/// of what the agent reported in encoded form, without the definition XML,
/// which stays in the database and is read when a move or an operator
/// needs it. About 0.5 KiB a guest: 200,000 guests in 100 MiB instead of
/// the 1.2 GB their definitions take.
struct GuestEntry {
    name: Box<str>,
    state: i32,
    memory_kib: u64,
    /// The reported `Guest` with `definition_xml` emptied, prost-encoded.
    rest: Box<[u8]>,
    /// Hash of the whole reported guest, definition included: an inventory
    /// rewrites only the guests whose hash changed.
    hash: u64,
    updated_ms: i64,
}

fn by_host(owners: &BTreeMap<String, crate::store::OwnerRow>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in owners.values() {
        m.entry(o.host.clone()).or_default().push(o.uuid.clone());
    }
    m
}

/// Memory of the running guests of one host, KiB.
fn running_kib(guests: &BTreeMap<String, GuestEntry>) -> u64 {
    // Saturating: the figures come from the agent, and an overflow must neither
    // panic under the registry lock nor wrap to a host that looks empty.
    guests
        .values()
        .filter(|g| crate::migrate::plan::is_running(g.state))
        .fold(0u64, |a, g| a.saturating_add(g.memory_kib))
}

fn guest_hash(encoded: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encoded.hash(&mut h);
    h.finish()
}

impl GuestEntry {
    /// Keeps `g` without its definition.
    fn new(mut g: Guest, hash: u64, updated_ms: i64) -> Self {
        g.definition_xml = String::new();
        GuestEntry {
            name: g.name.as_str().into(),
            state: g.state,
            memory_kib: g.memory_kib,
            rest: prost::Message::encode_to_vec(&g).into_boxed_slice(),
            hash,
            updated_ms,
        }
    }

    /// The guest as reported, without its definition.
    fn guest(&self) -> Guest {
        // Encoded by `new` from a valid message: decoding cannot fail.
        prost::Message::decode(&self.rest[..]).unwrap_or_default()
    }
}

struct Inner {
    store: Store,
    /// Silence after which a host is UNREACHABLE (from [`Timing`]).
    unreachable_after_ms: u32,
    hosts: BTreeMap<String, HostEntry>,
    guests: BTreeMap<String, BTreeMap<String, GuestEntry>>,
    next_generation: u64,
    /// Ownership records by UUID (cache of the owners table).
    owners: BTreeMap<String, crate::store::OwnerRow>,
    /// UUIDs in `owners` by owning host.
    owners_by_host: BTreeMap<String, Vec<String>>,
    /// Desired state by UUID: (host, "running" | "stopped").
    desired: BTreeMap<String, (String, String)>,
    /// Active alarms: (host, kind, detail).
    alarms: Vec<(String, String, String)>,
    /// Guests an active job moves: UUID → (job, source, target). The
    /// reconciler leaves them alone on their source.
    in_job: BTreeMap<String, (String, String, String)>,
    /// Guests whose reported ownership conflicts (a host claims a newer
    /// generation than the database while the recorded owner runs it):
    /// no lease, start or stop anywhere until the conflict is gone.
    conflicts: BTreeMap<String, String>,
    /// Guests missing on their owner, by UUID, with their last report
    /// (definition included: they are few, and this is the last copy).
    missing: BTreeMap<String, crate::store::MissingRow>,
    /// Guests with a row in quarantine (a guest, owner, desired-state or
    /// missing row that could not be read): nobody knows who owns them, so
    /// no lease, start or stop anywhere while the row is there.
    quarantined: BTreeSet<String>,
}

/// One row of a guest listing: a reported guest or a missing one.
enum Listed<'a> {
    Seen(&'a GuestEntry),
    Gone(&'a crate::store::MissingRow),
}

/// What happened when a host opened a session, for the caller to act on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReturnEvent {
    /// The host was OFFLINE (force-migrated away) and is back: now MAINTENANCE.
    pub returned_from_offline: bool,
    /// ...with the same boot id it had when fenced: it never powered off.
    pub same_boot_id: bool,
    /// A normal reboot of a host that owns its guests.
    pub rebooted: bool,
}

/// The `duplicate-agent` alarm's text: the same for both orders of the two
/// addresses, so agents that keep taking the session from each other raise
/// it once.
fn duplicate_agent_detail(host: &str, a: std::net::IpAddr, b: std::net::IpAddr) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!(
        "two agents claim to be {host} (certificate CN={host}): one connected from {lo}, the other from {hi}, while the first \
         was still talking; each new session closes the other. One of them is not {host}: find it (a cloned host, a copied \
         certificate) and stop it; revoke the certificate if it was copied. Until then {host}'s liveness cannot be trusted: \
         it is never force-migrated while this alarm is active"
    )
}

/// Decides what a returning host means (pure).
pub fn classify_return(status: &str, prev_boot: &str, fenced_boot: &str, new_boot: &str) -> ReturnEvent {
    if status == HostStatus::Offline.as_str() {
        return ReturnEvent {
            returned_from_offline: true,
            same_boot_id: !fenced_boot.is_empty() && fenced_boot == new_boot,
            rebooted: false,
        };
    }
    ReturnEvent {
        rebooted: !prev_boot.is_empty() && !new_boot.is_empty() && prev_boot != new_boot,
        ..Default::default()
    }
}

/// Hosts and guests, in memory and in the database.
pub struct Registry {
    started_ms: i64,
    inner: Mutex<Inner>,
    timing: Timing,
    /// Commands awaiting their result: id → (host it was sent to, waiter).
    pending: Mutex<std::collections::HashMap<String, (String, tokio::sync::oneshot::Sender<CommandResult>)>>,
}

/// Hosts handled per hold of the registry lock by passes over every host,
/// so that no pass holds it long with 10,000 hosts.
const LOCK_CHUNK: usize = 100;

/// Where a page of guests ends: (host id, guest name, UUID) of its last guest.
pub type GuestCursor = (String, String, String);

/// A session token: updates from a superseded session are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId(u64);

fn valid_guest(g: &Guest) -> Result<(), String> {
    if g.uuid.trim().is_empty() {
        return Err(format!("guest '{}' has no UUID", g.name));
    }
    if g.name.trim().is_empty() {
        return Err(format!("guest {} has no name", g.uuid));
    }
    Ok(())
}

impl Registry {
    /// Loads everything from the store. A row that cannot be read does not
    /// stop the load: it is quarantined (see [`Registry::quarantine_bad_rows`])
    /// and the rest loads.
    pub fn load(mut store: Store, timing: Timing) -> Result<Self, StoreError> {
        let (_, bad_hosts) = store.hosts_checked()?;
        Self::quarantine_bad_rows(&mut store, &bad_hosts)?;
        let (host_rows, _) = store.hosts_checked()?;
        let mut hosts = BTreeMap::new();
        for row in host_rows {
            hosts.insert(row.info.host_id.clone(), HostEntry::new(row));
        }
        let (owner_rows, mut bad) = store.owners_checked()?;
        let owners: BTreeMap<String, crate::store::OwnerRow> =
            owner_rows.into_iter().map(|o| (o.uuid.clone(), o)).collect();
        let owners_by_host = by_host(&owners);
        let (desired, b) = store.desired_checked()?;
        bad.extend(b);
        let (missing_rows, b) = store.missing_checked()?;
        bad.extend(b);
        let missing = missing_rows.into_iter().map(|r| (r.guest.uuid.clone(), r)).collect();
        let mut guests: BTreeMap<String, BTreeMap<String, GuestEntry>> = BTreeMap::new();
        bad.extend(store.each_guest_checked(
            |g| crate::intake::check_stored_guest(g).map_err(|r| r.to_string()),
            |g| {
                let hash = guest_hash(&prost::Message::encode_to_vec(&g.guest));
                guests
                    .entry(g.host_id)
                    .or_default()
                    .insert(g.guest.uuid.clone(), GuestEntry::new(g.guest, hash, g.updated_ms));
            },
        )?);
        Self::quarantine_bad_rows(&mut store, &bad)?;
        let quarantined: BTreeSet<String> =
            store.quarantined()?.into_iter().map(|q| q.uuid).filter(|u| !u.is_empty()).collect();
        let alarms = store.alarms(false)?.into_iter().map(|a| (a.2, a.3, a.4)).collect();
        for (h, m) in &guests {
            if let Some(e) = hosts.get_mut(h) {
                e.running_kib = running_kib(m);
            }
        }
        let mut in_job = BTreeMap::new();
        // Read as stored text: a job row that does not read still holds its
        // guests (the engine raises `job-corrupt` and does not run it).
        for (job, uuid, source, target) in store.active_job_guests()? {
            in_job.insert(uuid, (job, source, target));
        }
        Ok(Registry {
            started_ms: now_unix_ms(),
            inner: Mutex::new(Inner {
                store,
                unreachable_after_ms: timing.unreachable_after_ms,
                hosts,
                guests,
                next_generation: 1,
                owners,
                owners_by_host,
                desired,
                alarms,
                in_job,
                conflicts: BTreeMap::new(),
                missing,
                quarantined,
            }),
            timing,
            pending: Mutex::new(Default::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Timing settings.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Number of known hosts.
    pub fn host_count(&self) -> usize {
        self.lock().hosts.len()
    }

    /// Registers a new session for an authenticated host; supersedes any
    /// older session of the same host.
    pub fn open_session(
        &self,
        host_id: &str,
        boot_id: &str,
        tx: mpsc::Sender<Box<ControllerMessage>>,
    ) -> Result<SessionId, ControllerError> {
        self.open_session_from(host_id, boot_id, tx, None).map(|(sid, _)| sid)
    }

    /// Like [`Registry::open_session`], for an agent that connected from
    /// `peer`. The returned receiver turns `true` when a later session
    /// supersedes this one: the caller must then stop reading and end the
    /// stream. When the superseded session was still alive (heard within the
    /// detection time) and came from another address, two agents claim one
    /// host: a `duplicate-agent` alarm names both.
    pub fn open_session_from(
        &self,
        host_id: &str,
        boot_id: &str,
        tx: mpsc::Sender<Box<ControllerMessage>>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(SessionId, tokio::sync::watch::Receiver<bool>), ControllerError> {
        let now = now_unix_ms();
        let (superseded, superseded_rx) = tokio::sync::watch::channel(false);
        let mut inner = self.lock();
        let generation = inner.next_generation;
        inner.next_generation = inner.next_generation.saturating_add(1);
        if !inner.hosts.contains_key(host_id) {
            let info = HostInfo { host_id: host_id.into(), boot_id: boot_id.into(), ..Default::default() };
            inner.store.upsert_host(&info, now)?;
            let row = HostRow {
                info,
                status: HostStatus::Available,
                first_seen_ms: now,
                last_seen_ms: now,
                status_reason: String::new(),
                fenced_boot_id: String::new(),
            };
            inner.hosts.insert(host_id.into(), HostEntry::new(row));
            info!(host = host_id, "new host registered");
        }
        let e = inner.hosts.get_mut(host_id).expect("inserted above");
        let mut duplicate = None;
        if let Some(old) = e.session.take() {
            let alive =
                e.last_heard_ms().is_some_and(|t| now.saturating_sub(t) <= i64::from(self.timing.unreachable_after_ms));
            let ips = (old.peer.map(|p| p.ip()), peer.map(|p| p.ip()));
            info!(host = host_id, old_peer = ?old.peer, new_peer = ?peer, "new session supersedes the previous one");
            if let (true, (Some(a), Some(b))) = (alive, ips) {
                if a != b {
                    duplicate = Some(duplicate_agent_detail(host_id, a, b));
                }
            }
            let _ = old.superseded.send(true);
        }
        e.session = Some(SessionHandle { generation, tx, peer, superseded });
        e.heard = Arc::new(AtomicI64::new(now));
        e.dirty = true;
        e.inventory_seen = false;
        e.leases_sent = None;
        let ev = classify_return(e.row.status.as_str(), &e.row.info.boot_id, &e.row.fenced_boot_id, boot_id);
        if ev.rebooted {
            e.pending_boot_start = true;
        }
        if !boot_id.is_empty() {
            e.row.info.boot_id = boot_id.to_string();
        }
        let fenced_boot = e.row.fenced_boot_id.clone();
        if ev.returned_from_offline {
            let reason = if ev.same_boot_id {
                "returned with the boot id it had when fenced: it was never powered off (split brain)"
            } else {
                "returned after its guests were force-migrated away; quarantined until cleanup"
            };
            e.row.status = HostStatus::Maintenance;
            e.row.status_reason = reason.into();
            let a = AuditRow::by_controller(
                "host.returned",
                host_id,
                "",
                format!(
                    "{host_id} is back (boot id {boot_id}, fenced with {fenced_boot}): status MAINTENANCE; {reason}"
                ),
            );
            inner.store.set_status(host_id, HostStatus::Maintenance.as_str(), reason, Some(&a))?;
            warn!(host = host_id, "{reason}");
            if ev.same_boot_id {
                let detail = format!(
                    "{host_id} came back with boot id {boot_id}, the one it had when it was fenced: it never powered off; every guest moved away from it is kept from running there"
                );
                Self::raise_locked(&mut inner, host_id, "split-brain", &detail)?;
            }
        }
        if let Some(detail) = duplicate {
            Self::raise_locked(&mut inner, host_id, "duplicate-agent", &detail)?;
        }
        Ok((SessionId(generation), superseded_rx))
    }

    fn raise_locked(inner: &mut Inner, host: &str, kind: &str, detail: &str) -> Result<(), StoreError> {
        if inner.store.raise_alarm(host, kind, detail)? {
            tracing::error!(host, kind, "ALARM: {detail}");
            inner.alarms.push((host.into(), kind.into(), detail.into()));
            inner.store.audit(&AuditRow::by_controller(&format!("alarm.{kind}"), host, "", detail.into()))?;
        }
        Ok(())
    }

    /// Raises an alarm (logged at ERROR, stored, audited) unless already active.
    pub fn raise_alarm(&self, host: &str, kind: &str, detail: &str) -> Result<(), StoreError> {
        Self::raise_locked(&mut self.lock(), host, kind, detail)
    }

    /// Re-reads active alarms from the store.
    pub fn reload_alarms(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let a = inner.store.alarms(false)?.into_iter().map(|a| (a.2, a.3, a.4)).collect();
        inner.alarms = a;
        Ok(())
    }

    /// Active alarms.
    pub fn active_alarms(&self) -> Vec<(String, String, String)> {
        self.lock().alarms.clone()
    }

    /// Re-reads ownership records (after a move step changed them).
    pub fn refresh_owners(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let owners: BTreeMap<String, crate::store::OwnerRow> =
            inner.store.owners()?.into_iter().map(|o| (o.uuid.clone(), o)).collect();
        inner.owners_by_host = by_host(&owners);
        inner.owners = owners;
        for e in inner.hosts.values_mut() {
            e.dirty = true;
        }
        Ok(())
    }

    /// Whether what `host` reports now is known: its agent is connected and
    /// sent a full inventory in this session.
    fn fresh(inner: &Inner, host: &str) -> bool {
        let now = now_unix_ms();
        inner.hosts.get(host).is_some_and(|e| {
            e.session.is_some()
                && e.inventory_seen
                && e.last_heard_ms().is_some_and(|t| now.saturating_sub(t) <= i64::from(inner.unreachable_after_ms))
        }) && !Self::suspect(inner, host)
    }

    /// Whether two agents claim this host (an active `duplicate-agent`
    /// alarm): whichever answers may be the other machine, so its reports
    /// judge nothing and it is sent no command (a stop meant for a copy on
    /// "host-a" would destroy a guest on the impostor's machine) until an
    /// operator has found the second agent and cleared the alarm.
    fn suspect(inner: &Inner, host: &str) -> bool {
        inner.alarms.iter().any(|a| a.0 == host && a.1 == "duplicate-agent")
    }

    /// Who owns guest `uuid` as reported by `host`; `None`: `host` does.
    /// One UUID has one owner: the recorded owner of a move; else the host
    /// that first reported it (its desired-state row), as long as that host
    /// reports the guest holding its disks; a host that reports it no longer
    /// (a hand migration, an undefine) hands it to the one that does. While
    /// the first host is silent nobody can tell: [`OwnerView::Unsure`].
    fn owner_view(inner: &Inner, uuid: &str, host: &str) -> Option<crate::reconcile::OwnerView> {
        Self::owner_view_as(inner, uuid, host, None)
    }

    /// [`Registry::owner_view`] with whether `host`'s copy holds its disks
    /// given (`None`: as last reported).
    fn owner_view_as(
        inner: &Inner,
        uuid: &str,
        host: &str,
        holds_here: Option<bool>,
    ) -> Option<crate::reconcile::OwnerView> {
        use crate::reconcile::OwnerView;
        let holds = |h: &str| {
            inner.guests.get(h).and_then(|m| m.get(uuid)).is_some_and(|g| lifeboat_proto::holds_disk(g.state))
        };
        if inner.conflicts.contains_key(uuid) || inner.quarantined.contains(uuid) {
            return Some(OwnerView::Unsure);
        }
        if let Some(o) = inner.owners.get(uuid) {
            // A move that never completed and whose job has ended (failed):
            // the target was recorded before it ran the guest, and the
            // source may still run it. Neither is sure: no lease, no stop.
            if !o.complete && !inner.in_job.contains_key(uuid) {
                return Some(OwnerView::Unsure);
            }
            return (o.host != host).then(|| OwnerView::Other { host: o.host.clone(), recorded: true });
        }
        let (first, _) = inner.desired.get(uuid)?;
        if first == host {
            return None;
        }
        if !Self::fresh(inner, first) {
            return Some(OwnerView::Unsure);
        }
        // The first host no longer runs it: the one copy that holds its disks
        // is the guest (a hand migration); a copy that does not stays a
        // non-owner, so only one host ever holds the lease.
        if !holds(first) && holds_here.unwrap_or_else(|| holds(host)) {
            return None;
        }
        Some(OwnerView::Other { host: first.clone(), recorded: false })
    }

    /// Owner of a guest reported by `host`, for showing and for desired
    /// state: `host` itself, the other owner, or (unsure) the first host.
    fn owner_of<'a>(inner: &'a Inner, uuid: &str, host: &'a str) -> &'a str {
        use crate::reconcile::OwnerView;
        match Self::owner_view(inner, uuid, host) {
            None => host,
            Some(OwnerView::Other { .. } | OwnerView::Unsure) => inner
                .owners
                .get(uuid)
                .map(|o| o.host.as_str())
                .or_else(|| inner.desired.get(uuid).map(|d| d.0.as_str()))
                .unwrap_or(host),
        }
    }

    /// Checks the ownership a host's report claims (Lifeboat's metadata in
    /// the definition: owner and generation) against the database. A claim
    /// newer than the record means the database is behind the hosts (it was
    /// restored from an older backup, say): generations only move forward,
    /// so the newest claim wins and is recorded, unless the recorded owner
    /// still runs the guest, which is a conflict: no lease, start or stop
    /// for that guest anywhere, and an alarm.
    fn check_claims(inner: &mut Inner, host: &str, guests: &[&Guest]) -> Result<(), StoreError> {
        if Self::suspect(inner, host) {
            return Ok(());
        }
        for g in guests {
            if g.owner_host != host || g.owner_generation == 0 {
                continue;
            }
            let recorded = inner.owners.get(&g.uuid).map_or(0, |o| o.generation);
            if g.owner_generation <= recorded {
                continue;
            }
            // A generation no Lifeboat ever wrote (it counts moves from 1):
            // a hand-edited or hostile definition claims nothing.
            if i64::try_from(g.owner_generation).is_err() {
                warn!(host, uuid = %g.uuid, generation = g.owner_generation, "ignoring an ownership claim out of range");
                continue;
            }
            let current = inner
                .owners
                .get(&g.uuid)
                .map(|o| o.host.clone())
                .or_else(|| inner.desired.get(&g.uuid).map(|d| d.0.clone()));
            let held_there = current.as_deref().filter(|c| *c != host).is_some_and(|c| {
                Self::fresh(inner, c)
                    && inner
                        .guests
                        .get(c)
                        .and_then(|m| m.get(&g.uuid))
                        .is_some_and(|x| lifeboat_proto::holds_disk(x.state))
            });
            if held_there {
                let c = current.unwrap_or_default();
                let detail = format!(
                    "{} ({}): {host} holds a definition owned by {host} with generation {}, newer than the database's record \
                     (generation {recorded}, owner {c}), while {c} runs it: Lifeboat grants no lease and starts or stops nothing \
                     for it until one copy is gone; find out which copy is current (`lifeboat vms show {}`, `virsh list` on both)",
                    g.name, g.uuid, g.owner_generation, g.name
                );
                if inner.conflicts.insert(g.uuid.clone(), host.to_string()).is_none() {
                    Self::raise_locked(inner, host, "ownership-conflict", &detail)?;
                }
                continue;
            }
            inner.conflicts.remove(&g.uuid);
            let row = crate::store::OwnerRow {
                uuid: g.uuid.clone(),
                host: host.to_string(),
                generation: g.owner_generation,
                from_host: current.clone().unwrap_or_default(),
                job: String::new(),
                complete: true,
            };
            let a = AuditRow::by_controller(
                "ownership.rebuilt",
                host,
                &g.name,
                format!(
                    "{} ({}) is defined on {host} as owned by {host} with generation {}, newer than the database's (generation \
                     {recorded}{}): the database is behind the hosts; recorded {host} as its owner",
                    g.name,
                    g.uuid,
                    g.owner_generation,
                    current.as_deref().map(|c| format!(", owner {c}")).unwrap_or_default()
                ),
            );
            inner.store.set_owner(&row, &a)?;
            if let Some(old) = inner.owners.insert(g.uuid.clone(), row) {
                if let Some(v) = inner.owners_by_host.get_mut(&old.host) {
                    v.retain(|u| u != &g.uuid);
                }
            }
            inner.owners_by_host.entry(host.to_string()).or_default().push(g.uuid.clone());
            let detail = format!(
                "the database is older than what {host} reports (restored from an older backup?): ownership of the guests \
                 {host} holds with newer generations was taken from their definitions (highest generation wins); see \
                 `lifeboat log --host {host}` (ownership.rebuilt)"
            );
            Self::raise_locked(inner, host, "store-behind-hosts", &detail)?;
            for e in inner.hosts.values_mut() {
                e.dirty = true;
            }
        }
        Ok(())
    }

    /// What the desired state of `g` becomes, if it changes.
    fn desired_change(inner: &Inner, host: &str, g: &Guest, from_event: bool) -> Option<&'static str> {
        if Self::owner_view_as(inner, &g.uuid, host, Some(lifeboat_proto::holds_disk(g.state))).is_some() {
            return None;
        }
        let st = GuestState::try_from(g.state).unwrap_or(GuestState::Unspecified);
        let want = match st {
            GuestState::Running | GuestState::Paused | GuestState::Blocked => Some("running"),
            GuestState::Shutoff
                if from_event && matches!(g.state_reason.as_str(), "shutdown" | "destroyed" | "saved") =>
            {
                Some("stopped")
            }
            GuestState::Shutoff if !inner.desired.contains_key(&g.uuid) => Some("stopped"),
            _ => None,
        }?;
        match inner.desired.get(&g.uuid) {
            Some((h, w)) if h == host && w == want => None,
            _ => Some(want),
        }
    }

    fn note_desired(inner: &mut Inner, host: &str, g: &Guest, from_event: bool) -> Result<(), StoreError> {
        if let Some(w) = Self::desired_change(inner, host, g, from_event) {
            inner.store.set_desired_many(&[(g.uuid.as_str(), host, w)])?;
            inner.desired.insert(g.uuid.clone(), (host.to_string(), w.to_string()));
        }
        Ok(())
    }

    fn recount(inner: &mut Inner, host_id: &str) {
        let kib = inner.guests.get(host_id).map(running_kib).unwrap_or(0);
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.running_kib = kib;
        }
    }

    /// Ends a session (if it is still the current one).
    pub fn close_session(&self, host_id: &str, sid: SessionId) {
        let mut inner = self.lock();
        if let Some(e) = inner.hosts.get_mut(host_id) {
            if e.session.as_ref().map(|s| s.generation) == Some(sid.0) {
                e.session = None;
                let seen = e.last_heard_ms().unwrap_or(0);
                let _ = inner.store.touch_hosts(&[(host_id.to_string(), seen)]);
            }
        }
    }

    fn current<'a>(inner: &'a mut Inner, host_id: &str, sid: SessionId) -> Option<&'a mut HostEntry> {
        inner.hosts.get_mut(host_id).filter(|e| e.session.as_ref().map(|s| s.generation) == Some(sid.0))
    }

    /// The cell a session's reader task stores "heard now" into, without
    /// the registry lock (`None` if the session was superseded).
    pub fn heard_cell(&self, host_id: &str, sid: SessionId) -> Option<Arc<AtomicI64>> {
        Self::current(&mut self.lock(), host_id, sid).map(|e| e.heard.clone())
    }

    fn set_host_info(inner: &mut Inner, host_id: &str, mut info: HostInfo, now: i64) -> Result<(), StoreError> {
        // The authenticated id wins over whatever the message says.
        info.host_id = host_id.to_string();
        inner.store.upsert_host(&info, now)?;
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.row.info = info;
            e.row.last_seen_ms = now;
        }
        Ok(())
    }

    /// A full inventory: replaces the host's facts and all its guests.
    /// An inventory with an invalid guest is refused whole (nothing is
    /// written); the returned list is always empty (kept for callers).
    pub fn apply_inventory(
        &self,
        host_id: &str,
        sid: SessionId,
        inv: Inventory,
    ) -> Result<Vec<String>, ControllerError> {
        let now = now_unix_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(vec![]);
        }
        let skipped = Vec::new();
        if let Some(m) = inv.guests.iter().find_map(|g| valid_guest(g).err()) {
            return Err(ControllerError::InvalidArgument(format!("inventory refused whole: {m}")));
        }
        let guests: Vec<Guest> = inv.guests;
        if let Some(h) = inv.host {
            Self::set_host_info(&mut inner, host_id, h, now)?;
        }
        let encoded: Vec<Vec<u8>> = guests.iter().map(prost::Message::encode_to_vec).collect();
        let hashes: Vec<u64> = encoded.iter().map(|b| guest_hash(b)).collect();
        let (upserts, deletes) = {
            let old = inner.guests.get(host_id);
            let upserts: Vec<(&str, &str, &[u8])> = guests
                .iter()
                .zip(&encoded)
                .zip(&hashes)
                .filter(|((g, _), h)| old.and_then(|m| m.get(&g.uuid)).is_none_or(|e| e.hash != **h))
                .map(|((g, b), _)| (g.uuid.as_str(), g.name.as_str(), b.as_slice()))
                .collect();
            let new: std::collections::HashSet<&str> = guests.iter().map(|g| g.uuid.as_str()).collect();
            let deletes: Vec<String> =
                old.map(|m| m.keys().filter(|u| !new.contains(u.as_str())).cloned().collect()).unwrap_or_default();
            (upserts, deletes)
        };
        // A managed guest gone from its owner is kept, not deleted. An
        // agent whose libvirt is not connected reports what it last knew,
        // and a host two agents claim may be answered by the other machine:
        // neither proves an absence, so those guests stay as they were.
        let kept: Vec<String> = deletes.iter().filter(|u| Self::keeps_when_gone(&inner, host_id, u)).cloned().collect();
        let unsure = inner.hosts.get(host_id).is_some_and(|e| !e.row.info.libvirt_error.is_empty())
            || Self::suspect(&inner, host_id);
        let (held, kept) = if unsure { (kept, Vec::new()) } else { (Vec::new(), kept) };
        let dels: Vec<&str> = deletes.iter().filter(|u| !held.contains(u)).map(String::as_str).collect();
        Self::mark_gone(&mut inner, host_id, &kept, now, "absent from its complete inventory")?;
        inner.store.write_guests(host_id, &upserts, &dels, now)?;
        let back: Vec<(String, String, i32)> =
            guests.iter().map(|g| (g.uuid.clone(), g.name.clone(), g.state)).collect();
        let claims: Vec<&Guest> = guests.iter().filter(|g| g.owner_host == host_id && g.owner_generation > 0).collect();
        Self::check_claims(&mut inner, host_id, &claims)?;
        // New guests' desired state, in one transaction (200,000 guests
        // arriving must not mean 200,000 synced writes).
        let changes: Vec<(&str, &str, &'static str)> = guests
            .iter()
            // New guests, and guests first reported elsewhere that now run here only.
            .filter(|g| inner.desired.get(&g.uuid).is_none_or(|d| d.0 != host_id))
            .filter_map(|g| Self::desired_change(&inner, host_id, g, false).map(|w| (g.uuid.as_str(), host_id, w)))
            .collect();
        inner.store.set_desired_many(&changes)?;
        for (u, h, w) in changes {
            inner.desired.insert(u.to_string(), (h.to_string(), w.to_string()));
        }
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.inventory_seen = true;
            e.dirty = true;
        }
        let mut old = inner.guests.remove(host_id).unwrap_or_default();
        let mut map: BTreeMap<String, GuestEntry> = guests
            .into_iter()
            .zip(hashes)
            .map(|(g, h)| {
                let uuid = g.uuid.clone();
                // Unchanged guests keep their entry (and its update time).
                let e = match old.remove(&uuid) {
                    Some(o) if o.hash == h => o,
                    _ => GuestEntry::new(g, h, now),
                };
                (uuid, e)
            })
            .collect();
        for u in held {
            if let Some(e) = old.remove(&u) {
                map.insert(u, e);
            }
        }
        inner.guests.insert(host_id.to_string(), map);
        Self::recount(&mut inner, host_id);
        for (uuid, name, state) in back {
            Self::note_back(&mut inner, host_id, &uuid, &name, state)?;
        }
        Ok(skipped)
    }

    /// Host facts changed.
    pub fn apply_host(&self, host_id: &str, sid: SessionId, info: HostInfo) -> Result<(), ControllerError> {
        let now = now_unix_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        Self::set_host_info(&mut inner, host_id, info, now)?;
        Ok(())
    }

    /// One guest appeared or changed.
    pub fn apply_guest(&self, host_id: &str, sid: SessionId, g: Guest) -> Result<(), ControllerError> {
        valid_guest(&g).map_err(ControllerError::InvalidArgument)?;
        let now = now_unix_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        let b = prost::Message::encode_to_vec(&g);
        let h = guest_hash(&b);
        // Libvirt autostart switched on (with virsh, say) for a guest that
        // Lifeboat starts: worth a line in the action log, since Lifeboat
        // switches it off again at the next lease renewal.
        let autostart_on = g.autostart
            && Self::owner_of(&inner, &g.uuid, host_id) == host_id
            && inner.hosts.get(host_id).is_some_and(|e| e.leases_sent.is_some())
            && inner.guests.get(host_id).and_then(|m| m.get(&g.uuid)).is_some_and(|e| !e.guest().autostart);
        inner.store.write_guests(host_id, &[(&g.uuid, &g.name, &b)], &[], now)?;
        Self::check_claims(&mut inner, host_id, &[&g])?;
        if autostart_on {
            let detail = format!(
                "libvirt autostart of {} ({}) on {host_id} was switched on outside Lifeboat; Lifeboat switches it off at the next lease renewal (it decides what starts)",
                g.name, g.uuid
            );
            // The guest's update is stored already; a lost log line must not undo it.
            if let Err(e) =
                inner.store.audit(&AuditRow::by_controller("guest.autostart_enabled", host_id, &g.name, detail))
            {
                warn!(host = %host_id, guest = %g.name, "writing the audit log failed: {e}");
            }
        }
        Self::note_desired(&mut inner, host_id, &g, true)?;
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.dirty = true;
        }
        let (uuid, name, state) = (g.uuid.clone(), g.name.clone(), g.state);
        inner.guests.entry(host_id.to_string()).or_default().insert(g.uuid.clone(), GuestEntry::new(g, h, now));
        Self::recount(&mut inner, host_id);
        Self::note_back(&mut inner, host_id, &uuid, &name, state)?;
        Ok(())
    }

    /// One guest was undefined.
    pub fn remove_guest(&self, host_id: &str, sid: SessionId, uuid: &str) -> Result<(), ControllerError> {
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        // A managed guest undefined on its owner outside Lifeboat is kept;
        // a host two agents claim proves no absence (it stays as it was).
        if Self::keeps_when_gone(&inner, host_id, uuid) {
            if Self::suspect(&inner, host_id) {
                return Ok(());
            }
            Self::mark_gone(&mut inner, host_id, &[uuid.to_string()], now_unix_ms(), "undefined there")?;
        }
        inner.store.delete_guest(host_id, uuid)?;
        if let Some(m) = inner.guests.get_mut(host_id) {
            m.remove(uuid);
        }
        Self::recount(&mut inner, host_id);
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.dirty = true;
        }
        Ok(())
    }

    fn record(&self, inner: &Inner, e: &HostEntry, now: i64) -> HostRecord {
        let guests = inner.guests.get(&e.row.info.host_id);
        let guest_count = guests.map(|g| g.len()).unwrap_or(0) as u32;
        let running_count =
            guests.map(|g| g.values().filter(|g| g.state == GuestState::Running as i32).count()).unwrap_or(0) as u32;
        HostRecord {
            info: Some(e.row.info.clone()),
            status: e.row.status.as_str().into(),
            liveness: self.liveness_of(e, now).as_str().into(),
            session_open: e.session.is_some(),
            last_seen_unix_ms: e.last_heard_ms().unwrap_or(e.row.last_seen_ms),
            first_seen_unix_ms: e.row.first_seen_ms,
            guest_count,
            running_count,
            status_reason: e.row.status_reason.clone(),
            alarms: inner
                .alarms
                .iter()
                .filter(|a| a.0 == e.row.info.host_id)
                .map(|a| format!("{}: {}", a.1, a.2))
                .collect(),
            stale_definitions: guests
                .map(|g| {
                    g.keys().filter(|u| Self::owner_of(inner, u, &e.row.info.host_id) != e.row.info.host_id).count()
                })
                .unwrap_or(0) as u32,
            // From the store's reservations: the admin service fills it in.
            reserved_memory_kib: 0,
            ..Default::default()
        }
    }

    /// All hosts.
    pub fn list_hosts(&self) -> Vec<HostRecord> {
        let now = now_unix_ms();
        let inner = self.lock();
        inner.hosts.values().map(|e| self.record(&inner, e, now)).collect()
    }

    fn resolve<'a>(inner: &'a Inner, host: &str) -> Result<&'a HostEntry, ControllerError> {
        if let Some(e) = inner.hosts.get(host) {
            return Ok(e);
        }
        let by_name: Vec<&HostEntry> = inner.hosts.values().filter(|e| e.row.info.hostname == host).collect();
        match by_name.as_slice() {
            [one] => Ok(one),
            _ => Err(ControllerError::UnknownHost { host: host.into(), known: inner.hosts.keys().cloned().collect() }),
        }
    }

    /// One host, by id or (unique) hostname.
    pub fn get_host(&self, host: &str) -> Result<HostRecord, ControllerError> {
        let now = now_unix_ms();
        let inner = self.lock();
        let e = Self::resolve(&inner, host)?;
        Ok(self.record(&inner, e, now))
    }

    /// Every guest (or one host's, or the ones named `vm`), in order of host,
    /// name and UUID: all pages of [`Registry::list_guests_page`].
    pub fn list_guests(
        &self,
        host: Option<&str>,
        vm: Option<&str>,
        with_definitions: bool,
    ) -> Result<Vec<GuestRecord>, ControllerError> {
        Ok(self.list_guests_page(host, vm, with_definitions, None, usize::MAX)?.0)
    }

    /// Up to `limit` guests after `after`, in order of host, name and UUID,
    /// and where the next page starts (`None` = no more). Takes the registry
    /// lock per 100 hosts: listing 200,000 guests must not stop everything
    /// else meanwhile.
    pub fn list_guests_page(
        &self,
        host: Option<&str>,
        vm: Option<&str>,
        with_definitions: bool,
        after: Option<&GuestCursor>,
        limit: usize,
    ) -> Result<(Vec<GuestRecord>, Option<GuestCursor>), ControllerError> {
        use std::ops::Bound;
        let limit = limit.max(1);
        let now = now_unix_ms();
        let only = match host {
            Some(h) => Some(Self::resolve(&self.lock(), h)?.row.info.host_id.clone()),
            None => None,
        };
        let past = |id: &str, name: &str, uuid: &str| {
            after.is_none_or(|c| (id, name, uuid) > (c.0.as_str(), c.1.as_str(), c.2.as_str()))
        };
        let mut out: Vec<GuestRecord> = Vec::new();
        // Hosts are visited from the cursor's host on, a chunk per lock hold.
        let mut from = match (&only, after) {
            (Some(h), _) => Bound::Included(h.clone()),
            (None, Some(c)) => Bound::Included(c.0.clone()),
            (None, None) => Bound::Unbounded,
        };
        loop {
            let inner = self.lock();
            let ids: Vec<String> = inner
                .hosts
                .range::<String, _>((from.clone(), Bound::Unbounded))
                .map(|(k, _)| k.clone())
                .take_while(|k| only.as_ref().is_none_or(|h| h == k))
                .take(LOCK_CHUNK)
                .collect();
            let Some(last) = ids.last() else { break };
            from = Bound::Excluded(last.clone());
            for id in ids.iter().map(String::as_str) {
                let live = inner.hosts.get(id).map(|e| self.liveness_of(e, now)).unwrap_or(Liveness::Unreachable);
                let none = BTreeMap::new();
                let m = inner.guests.get(id).unwrap_or(&none);
                // Reported guests and guests missing on this host, in one
                // (name, UUID) order so the page cursor holds for both.
                let mut v: Vec<(&str, &str, Listed<'_>)> = m
                    .iter()
                    .filter(|(u, g)| vm.is_none_or(|vm| &*g.name == vm || u.as_str() == vm) && past(id, &g.name, u))
                    .map(|(u, g)| (&*g.name, u.as_str(), Listed::Seen(g)))
                    .chain(
                        Self::missing_rows_of(&inner, id, vm, &past)
                            .into_iter()
                            .map(|r| (r.guest.name.as_str(), r.guest.uuid.as_str(), Listed::Gone(r))),
                    )
                    .collect();
                if v.is_empty() {
                    continue;
                }
                v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                let mut definitions: BTreeMap<String, String> =
                    if with_definitions && v.iter().any(|x| matches!(x.2, Listed::Seen(_))) {
                        inner.store.guests_of(id)?.into_iter().map(|g| (g.uuid, g.definition_xml)).collect()
                    } else {
                        BTreeMap::new()
                    };
                for (_, uuid, item) in v {
                    if out.len() == limit {
                        let next = out.last().and_then(|r| {
                            r.guest.as_ref().map(|g| (r.host_id.clone(), g.name.clone(), g.uuid.clone()))
                        });
                        return Ok((out, next));
                    }
                    let g = match item {
                        Listed::Seen(g) => g,
                        Listed::Gone(r) => {
                            out.push(Self::missing_record(&inner, r, live, with_definitions));
                            continue;
                        }
                    };
                    let owner = Self::owner_of(&inner, uuid, id).to_string();
                    let desired = match inner.desired.get(uuid) {
                        Some((h, st)) if h == id && owner == id => st.clone(),
                        _ => String::new(),
                    };
                    let mut guest = g.guest();
                    if let Some(d) = definitions.remove(&guest.uuid) {
                        guest.definition_xml = d;
                    }
                    out.push(GuestRecord {
                        guest: Some(guest),
                        host_id: id.to_string(),
                        updated_unix_ms: g.updated_ms,
                        host_liveness: live.as_str().into(),
                        desired_state: desired,
                        owner_host: owner,
                        ..Default::default()
                    });
                }
            }
        }
        Ok((out, None))
    }

    /// How many guests are in each reported state.
    pub fn guest_state_counts(&self) -> BTreeMap<i32, u64> {
        let inner = self.lock();
        let mut out = BTreeMap::new();
        for g in inner.guests.values().flat_map(|m| m.values()) {
            let n: &mut u64 = out.entry(g.state).or_insert(0);
            *n = n.saturating_add(1);
        }
        out
    }

    /// Runs `f` with the database, under the registry's lock.
    pub fn db<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.lock().store)
    }

    /// Every host as the planner sees it, with the (slim) guest lists of
    /// only the hosts named in `with_guests`: copying 200,000 guests for
    /// every plan would cost more than the plan. Silence is counted from the
    /// last message, but never from before this controller started (a
    /// restart must not make a host look silent for longer than we know).
    pub fn host_views_for(&self, with_guests: &[&str]) -> Vec<crate::migrate::plan::HostView> {
        let now = now_unix_ms();
        let inner = self.lock();
        inner
            .hosts
            .values()
            .map(|e| self.view(&inner, e, now, with_guests.contains(&e.row.info.host_id.as_str())))
            .collect()
    }

    /// One host as the planner sees it, with its guests.
    pub fn host_view(&self, host_id: &str) -> Option<crate::migrate::plan::HostView> {
        let now = now_unix_ms();
        let inner = self.lock();
        inner.hosts.get(host_id).map(|e| self.view(&inner, e, now, true))
    }

    /// Fills in the guest lists of `ids` in views made by [`Registry::host_views_for`].
    pub fn fill_guests(&self, views: &mut [crate::migrate::plan::HostView], ids: &[String]) {
        let inner = self.lock();
        for v in views.iter_mut().filter(|v| ids.contains(&v.id)) {
            v.guests = inner.guests.get(&v.id).map(|m| m.values().map(GuestEntry::guest).collect()).unwrap_or_default();
        }
    }

    fn view(&self, inner: &Inner, e: &HostEntry, now: i64, with_guests: bool) -> crate::migrate::plan::HostView {
        let live = self.liveness_of(e, now);
        let last = e.last_heard_ms().unwrap_or(e.row.last_seen_ms).max(self.started_ms);
        let guests = inner.guests.get(&e.row.info.host_id);
        crate::migrate::plan::HostView {
            id: e.row.info.host_id.clone(),
            status: e.row.status,
            liveness: live,
            silent_ms: match live {
                Liveness::Reachable => None,
                Liveness::Unreachable => Some(now.saturating_sub(last).max(0) as u64),
            },
            memory_total_kib: e.row.info.memory_total_kib,
            running_memory_kib: e.running_kib,
            lock_manager: e.row.info.lock_manager.clone(),
            guests: if with_guests {
                guests.map(|m| m.values().map(GuestEntry::guest).collect()).unwrap_or_default()
            } else {
                Vec::new()
            },
        }
    }

    /// A host's liveness, silence counted from when it was last heard but
    /// never from before this controller started: see [`liveness_since_start`].
    fn liveness_of(&self, e: &HostEntry, now: i64) -> Liveness {
        liveness_since_start(now, e.last_heard_ms(), self.started_ms, self.timing)
    }

    /// Whether the host is REACHABLE right now.
    pub fn is_reachable(&self, host_id: &str) -> bool {
        let now = now_unix_ms();
        let inner = self.lock();
        inner.hosts.get(host_id).is_some_and(|e| self.liveness_of(e, now) == Liveness::Reachable)
    }

    /// A guest as `host`'s agent last reported it (without its definition),
    /// if it reported it: how a step whose answer was lost is re-read.
    pub fn reported_guest(&self, host: &str, uuid: &str) -> Option<Guest> {
        self.lock().guests.get(host).and_then(|m| m.get(uuid)).map(GuestEntry::guest)
    }

    /// Whether the host's last reports hold the guest (no copy of it made).
    pub fn has_reported(&self, host: &str, uuid: &str) -> bool {
        self.lock().guests.get(host).is_some_and(|m| m.contains_key(uuid))
    }

    /// How many guests the host's last reports hold.
    pub fn reported_count(&self, host: &str) -> usize {
        self.lock().guests.get(host).map_or(0, BTreeMap::len)
    }

    /// Whether the host has an open agent session.
    pub fn has_session(&self, host_id: &str) -> bool {
        self.lock().hosts.get(host_id).is_some_and(|e| e.session.is_some())
    }

    /// Sends a command to a host's agent over its session and waits for
    /// the result.
    pub async fn call(&self, host_id: &str, kind: Kind, timeout: Duration) -> Result<CommandResult, ControllerError> {
        let (tx, mut ended) = {
            let inner = self.lock();
            let e = inner.hosts.get(host_id).ok_or_else(|| ControllerError::UnknownHost {
                host: host_id.into(),
                known: inner.hosts.keys().cloned().collect(),
            })?;
            if Self::suspect(&inner, host_id) {
                return Err(ControllerError::AgentUnavailable(format!(
                    "two agents claim to be '{host_id}' (duplicate-agent alarm): no command is sent to it until the second agent \
                     is found and the alarm cleared (`lifeboat alarms`, then `lifeboat alarms clear --host {host_id} --kind duplicate-agent`)"
                )));
            }
            match &e.session {
                Some(s) => (s.tx.clone(), s.superseded.subscribe()),
                None => {
                    return Err(ControllerError::AgentUnavailable(format!(
                        "host '{host_id}' has no open agent session"
                    )));
                }
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let (otx, orx) = tokio::sync::oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), (host_id.to_string(), otx));
        let msg = ControllerMessage {
            msg: Some(controller_message::Msg::Command(Command { id: id.clone(), kind: Some(kind) })),
        };
        let sent = tx.send(Box::new(msg)).await.is_ok();
        let r = if !sent {
            Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' closed")))
        } else {
            // A session replaced or closed meanwhile never answers: fail at
            // once, so the caller retries on the new session instead of
            // waiting out the timeout (seen after a healed partition).
            tokio::select! {
                r = tokio::time::timeout(timeout, orx) => match r {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(_)) => Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' closed"))),
                    Err(_) => Err(ControllerError::AgentUnavailable(format!("'{host_id}' did not answer within {timeout:?}"))),
                },
                _ = ended.wait_for(|s| *s) => {
                    Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' was replaced or closed before it answered")))
                }
            }
        };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        r
    }

    /// A command result arrived.
    pub fn complete(&self, r: CommandResult) {
        if let Some((_, tx)) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.id) {
            let _ = tx.send(r);
        }
    }

    /// A command result arrived from `host`'s session: it completes only a
    /// command sent to `host`. `Some(false)`: the id awaits another host's
    /// answer (nothing done); `None`: no command awaits it (answered, timed
    /// out, or never sent; nothing done).
    pub fn complete_from(&self, host: &str, r: CommandResult) -> Option<bool> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get(&r.id) {
            None => None,
            Some((h, _)) if h != host => Some(false),
            Some(_) => {
                if let Some((_, tx)) = pending.remove(&r.id) {
                    let _ = tx.send(r);
                }
                Some(true)
            }
        }
    }

    /// Sets a host's status (checks are the caller's).
    pub fn set_status(
        &self,
        host_id: &str,
        status: HostStatus,
        reason: &str,
        actor: &str,
    ) -> Result<(), ControllerError> {
        let mut inner = self.lock();
        let Some(e) = inner.hosts.get(host_id) else {
            return Err(ControllerError::UnknownHost {
                host: host_id.into(),
                known: inner.hosts.keys().cloned().collect(),
            });
        };
        let old = e.row.status.clone();
        let a = crate::store::AuditRow {
            actor: actor.into(),
            action: "host.status".into(),
            host: host_id.into(),
            detail: format!(
                "{old} -> {status}{}",
                if reason.is_empty() { String::new() } else { format!(": {reason}") }
            ),
            ..Default::default()
        };
        inner.store.set_status(host_id, status.as_str(), reason, Some(&a))?;
        let e = inner.hosts.get_mut(host_id).expect("checked");
        e.row.status = status;
        e.row.status_reason = reason.into();
        e.dirty = true;
        Ok(())
    }

    /// Records the boot id a host has as it is fenced.
    pub fn mark_fenced(&self, host_id: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let boot = inner.hosts.get(host_id).map(|e| e.row.info.boot_id.clone()).unwrap_or_default();
        inner.store.set_fenced_boot_id(host_id, &boot)?;
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.row.fenced_boot_id = boot;
        }
        Ok(())
    }

    /// The host's status.
    pub fn status_of(&self, host_id: &str) -> Option<HostStatus> {
        self.lock().hosts.get(host_id).map(|e| e.row.status)
    }

    /// One reconcile pass over the connected hosts that may need action:
    /// those whose state changed since the last pass, whose leases are due
    /// for renewal, or that wait for their boot start; every connected host
    /// when `full` (the periodic resync backstop). `decide` sees each host's
    /// snapshot outside the lock; snapshots are made and dropped a chunk at a
    /// time, so a full pass over 200,000 guests does not hold them all at once.
    pub fn reconcile_each<T>(
        &self,
        now_ms: i64,
        lease_ttl_ms: i64,
        full: bool,
        mut decide: impl FnMut(&crate::reconcile::HostSnapshot) -> T,
    ) -> Vec<T> {
        let wanted: Vec<String> = {
            let mut inner = self.lock();
            // Conflicting claims are judged again on what the hosts report
            // now: one copy gone ends the conflict (and may rebuild the record).
            let pending: Vec<(String, String)> = std::mem::take(&mut inner.conflicts).into_iter().collect();
            for (uuid, claimant) in pending {
                let Some(g) = inner.guests.get(&claimant).and_then(|m| m.get(&uuid)).map(GuestEntry::guest) else {
                    continue;
                };
                let g = Guest { uuid: uuid.clone(), ..g };
                if let Err(e) = Self::check_claims(&mut inner, &claimant, &[&g]) {
                    warn!(uuid = %uuid, "judging an ownership conflict again failed: {e}");
                    inner.conflicts.insert(uuid, claimant);
                }
            }
            let ids: Vec<String> = inner
                .hosts
                .iter()
                .filter(|(id, e)| e.session.is_some() && !Self::suspect(&inner, id))
                .filter(|(_, e)| {
                    full || e.dirty
                        || e.pending_boot_start
                        || e.leases_sent.as_ref().is_none_or(|(at, _)| now_ms.saturating_sub(*at) >= lease_ttl_ms / 3)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                if let Some(e) = inner.hosts.get_mut(id) {
                    e.dirty = false;
                }
            }
            ids
        };
        let mut out = Vec::with_capacity(wanted.len());
        let t0 = std::time::Instant::now();
        for chunk in wanted.chunks(LOCK_CHUNK) {
            let snaps: Vec<crate::reconcile::HostSnapshot> = {
                let inner = self.lock();
                chunk.iter().filter_map(|id| inner.hosts.get(id).map(|e| Self::snapshot(&inner, id, e))).collect()
            };
            out.extend(snaps.iter().map(&mut decide));
        }
        tracing::debug!(hosts = wanted.len(), full, took_ms = t0.elapsed().as_millis() as u64, "reconcile pass");
        out
    }

    fn snapshot(inner: &Inner, id: &String, e: &HostEntry) -> crate::reconcile::HostSnapshot {
        // Only what the reconciler reads, not definitions.
        let guests: Vec<Guest> = inner
            .guests
            .get(id)
            .map(|m| {
                m.iter()
                    .map(|(u, g)| Guest {
                        uuid: u.clone(),
                        name: g.name.to_string(),
                        state: g.state,
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let reported = |u: &str| inner.guests.get(id).is_some_and(|m| m.contains_key(u));
        // A move's target holds the lease of a guest not yet running there
        // only while its job runs (the job starts it); a move left unfinished
        // by a job that ended gives nobody a lease.
        let owned_here: Vec<&crate::store::OwnerRow> = inner
            .owners_by_host
            .get(id)
            .map(|v| {
                v.iter()
                    .filter_map(|u| inner.owners.get(u))
                    .filter(|o| o.complete || inner.in_job.contains_key(&o.uuid))
                    .filter(|o| !inner.quarantined.contains(&o.uuid))
                    .collect()
            })
            .unwrap_or_default();
        let in_job: BTreeSet<String> =
            inner.in_job.iter().filter(|(_, j)| &j.1 == id && &j.2 != id).map(|(u, _)| u.clone()).collect();
        let claimed: BTreeSet<String> =
            inner.in_job.iter().filter(|(_, j)| &j.1 == id && &j.2 == id).map(|(u, _)| u.clone()).collect();
        // A status that did not read was quarantined at load (the host came
        // back MAINTENANCE): what is in memory is always a known status.
        let status = e.row.status;
        crate::reconcile::HostSnapshot {
            host: id.clone(),
            status,
            inventory_seen: e.inventory_seen,
            pending_boot_start: e.pending_boot_start,
            leases_sent: e.leases_sent.clone(),
            owners: guests
                .iter()
                .filter_map(|g| Self::owner_view(inner, &g.uuid, id).map(|o| (g.uuid.clone(), o)))
                .collect(),
            // Desired state and copies elsewhere are read only for a boot start.
            desired: if e.pending_boot_start {
                guests
                    .iter()
                    .filter_map(|g| {
                        inner.desired.get(&g.uuid).filter(|d| &d.0 == id).map(|d| (g.uuid.clone(), d.1.clone()))
                    })
                    .collect()
            } else {
                BTreeMap::new()
            },
            elsewhere: if e.pending_boot_start {
                guests
                    .iter()
                    .filter(|g| {
                        inner.guests.iter().any(|(h, m)| {
                            h != id && m.get(&g.uuid).is_some_and(|x| lifeboat_proto::holds_disk(x.state))
                        })
                    })
                    .map(|g| g.uuid.clone())
                    .collect()
            } else {
                BTreeSet::new()
            },
            generations: guests
                .iter()
                .filter_map(|g| inner.owners.get(&g.uuid).map(|o| (g.uuid.clone(), o.generation)))
                .chain(owned_here.iter().map(|o| (o.uuid.clone(), o.generation)))
                .collect(),
            owned_unreported: owned_here
                .iter()
                .filter(|o| !reported(&o.uuid))
                .map(|o| (o.uuid.clone(), String::new()))
                .collect(),
            in_job,
            claimed,
            guests,
        }
    }

    /// Why the reconciler must not act now, if it must not: during the
    /// startup grace (twice the detection time) agents reconnect and report
    /// what runs where, and before that the database's view may be old; a
    /// database restored from a backup (`store-restored` alarm) holds until
    /// every host not OFFLINE has reported, and then clears its alarm.
    pub fn hold(&self, now_ms: i64) -> Option<String> {
        let grace = self.startup_grace_ms();
        if self.in_startup_grace(now_ms) {
            return Some(format!("startup grace: {grace} ms for agents to reconnect and report"));
        }
        self.restore_hold()
    }

    /// The part of [`Registry::hold`] that outlasts the startup grace: a
    /// restored database waiting for every host not OFFLINE to report
    /// (clears its alarm once they have).
    pub fn restore_hold(&self) -> Option<String> {
        let mut inner = self.lock();
        let restored: Vec<(String, String)> =
            inner.alarms.iter().filter(|a| a.1 == "store-restored").map(|a| (a.0.clone(), a.2.clone())).collect();
        if restored.is_empty() {
            return None;
        }
        let waiting: Vec<String> = inner
            .hosts
            .iter()
            .filter(|(_, e)| e.row.status != HostStatus::Offline && !(e.session.is_some() && e.inventory_seen))
            .map(|(id, _)| id.clone())
            .collect();
        if !waiting.is_empty() {
            return Some(format!(
                "the database was restored from a backup: no lease, start or stop until these hosts have reported what they run \
                 (or are declared OFFLINE): {}",
                waiting.join(", ")
            ));
        }
        for (host, detail) in restored {
            let why = "every host not OFFLINE has reported since the restore; ownership is rebuilt from their reports";
            if let Err(e) = Self::clear_by_cause_locked(&mut inner, &host, "store-restored", &detail, why) {
                warn!("clearing the store-restored alarm failed: {e}");
                return Some(format!("clearing the store-restored alarm failed: {e}"));
            }
        }
        None
    }

    /// Whether the controller started less than the startup grace ago.
    pub fn in_startup_grace(&self, now_ms: i64) -> bool {
        now_ms.saturating_sub(self.started_ms) < self.startup_grace_ms()
    }

    /// How long after its start the controller waits before it decides
    /// anything from what agents report: twice the detection time.
    pub fn startup_grace_ms(&self) -> i64 {
        i64::from(self.timing.unreachable_after_ms).saturating_mul(2)
    }

    fn clear_by_cause_locked(
        inner: &mut Inner,
        host: &str,
        kind: &str,
        detail: &str,
        why: &str,
    ) -> Result<(), StoreError> {
        if inner.store.clear_alarm(host, kind, detail)? > 0 {
            inner.store.audit(&AuditRow::by_controller(
                "alarm.cleared",
                host,
                "",
                format!("{kind} alarm cleared: {why} ({detail})"),
            ))?;
        }
        inner.alarms.retain(|a| !(a.0 == host && a.1 == kind && a.2 == detail));
        Ok(())
    }

    /// Clears one alarm because its cause is gone (audited with `why`).
    pub fn clear_alarm_by_cause(&self, host: &str, kind: &str, detail: &str, why: &str) -> Result<(), StoreError> {
        Self::clear_by_cause_locked(&mut self.lock(), host, kind, detail, why)
    }

    /// Marks the guests of a job as in it: (uuid, source, target) each. From
    /// now on the reconciler leaves them alone on their source (no lease
    /// renewal, no stop, no start); the job does every step itself.
    pub fn set_in_job(&self, job: &str, moves: &[(String, String, String)]) {
        let mut inner = self.lock();
        for (u, src, dst) in moves {
            inner.in_job.insert(u.clone(), (job.to_string(), src.clone(), dst.clone()));
            if let Some(e) = inner.hosts.get_mut(src) {
                e.dirty = true;
            }
        }
    }

    /// The job ended: its guests are the reconciler's again.
    pub fn clear_in_job(&self, job: &str) {
        let mut inner = self.lock();
        let hosts: Vec<String> = inner.in_job.values().filter(|j| j.0 == job).map(|j| j.1.clone()).collect();
        inner.in_job.retain(|_, j| j.0 != job);
        for h in hosts {
            if let Some(e) = inner.hosts.get_mut(&h) {
                e.dirty = true;
            }
        }
    }

    /// The leases a host should hold now, as the reconciler would grant
    /// them: (uuid, name, generation) of every guest it owns, except guests
    /// an active job moves away from it.
    pub fn lease_set(&self, host: &str) -> Vec<(String, String, u64)> {
        let inner = self.lock();
        let Some(e) = inner.hosts.get(host) else { return Vec::new() };
        let mut snap = Self::snapshot(&inner, &host.to_string(), e);
        drop(inner);
        snap.inventory_seen = true;
        snap.leases_sent = None;
        snap.pending_boot_start = false;
        crate::reconcile::decide(&snap, 0, 1)
            .into_iter()
            .find_map(|a| match a {
                crate::reconcile::Action::GrantLeases { leases, .. } => Some(leases),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Which of `uuids` another host than `source` reports holding their
    /// disks, among the hosts that talk to us now: UUID → those hosts.
    pub fn held_elsewhere(&self, source: &str, uuids: &[String]) -> BTreeMap<String, Vec<String>> {
        let mut held = self.holders(uuids);
        let now = now_unix_ms();
        let inner = self.lock();
        let talks = |h: &String| {
            h.as_str() != source && inner.hosts.get(h).is_some_and(|e| self.liveness_of(e, now) == Liveness::Reachable)
        };
        held.retain(|_, hosts| {
            hosts.retain(talks);
            !hosts.is_empty()
        });
        held
    }

    /// Ownership generation of a guest (0 = never moved by Lifeboat).
    pub fn owner_generation(&self, uuid: &str) -> u64 {
        self.lock().owners.get(uuid).map(|o| o.generation).unwrap_or(0)
    }

    /// Records that leases were sent.
    pub fn leases_sent(&self, host: &str, at: i64, uuids: Vec<String>) {
        if let Some(e) = self.lock().hosts.get_mut(host) {
            e.leases_sent = Some((at, uuids));
        }
    }

    /// The boot start was done (or is no longer wanted).
    pub fn boot_start_done(&self, host: &str) {
        if let Some(e) = self.lock().hosts.get_mut(host) {
            e.pending_boot_start = false;
        }
    }

    /// Logs liveness transitions; returns hosts whose liveness changed.
    pub fn check_liveness(&self) -> Vec<(String, Liveness)> {
        let now = now_unix_ms();
        let mut inner = self.lock();
        let timing = self.timing;
        let started = self.started_ms;
        let mut changed = Vec::new();
        for (id, e) in inner.hosts.iter_mut() {
            let l = liveness_since_start(now, e.last_heard_ms(), started, timing);
            if l != e.reported {
                e.reported = l;
                match l {
                    Liveness::Unreachable => warn!(
                        host = %id,
                        silent_ms = now.saturating_sub(e.last_heard_ms().unwrap_or(now)),
                        "host UNREACHABLE: no message within {} ms",
                        timing.unreachable_after_ms
                    ),
                    Liveness::Reachable => info!(host = %id, "host REACHABLE"),
                }
                changed.push((id.clone(), l));
            }
        }
        changed
    }

    /// Empties the database's write-ahead log (every 30 s from
    /// [`watch_liveness`]): SQLite's own checkpoints copy it but leave the
    /// file at its largest size, which a small disk may not have twice.
    /// A failure is logged and tried again next time.
    pub fn checkpoint(&self) {
        match self.lock().store.checkpoint() {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("WAL checkpoint incomplete: a reader still needs part of it; tried again in 30 s")
            }
            Err(e) => warn!("WAL checkpoint failed: {e}; tried again in 30 s"),
        }
    }

    /// Persists last-heard times, a chunk of hosts per lock hold.
    pub fn flush(&self) -> Result<(), StoreError> {
        let seen: Vec<(String, i64)> =
            self.lock().hosts.iter().filter_map(|(id, e)| e.last_heard_ms().map(|t| (id.clone(), t))).collect();
        let t0 = std::time::Instant::now();
        for chunk in seen.chunks(LOCK_CHUNK) {
            self.lock().store.touch_hosts(chunk)?;
        }
        tracing::debug!(hosts = seen.len(), took_ms = t0.elapsed().as_millis() as u64, "last-seen times persisted");
        Ok(())
    }
}

/// Liveness with the controller's startup grace: silence is counted from
/// the later of the last message and the controller's start, so no host
/// reads UNREACHABLE before the controller has been up for the detection
/// time (its agent had no chance to reconnect: a host heard a moment before
/// a restart is not silent). Only the reading waits: a forced migration's
/// "source silent" check counts from the same instant, so it can pass later
/// because of a restart, never sooner.
pub fn liveness_since_start(now_ms: i64, last_heard_ms: Option<i64>, started_ms: i64, timing: Timing) -> Liveness {
    liveness(now_ms, Some(last_heard_ms.unwrap_or(started_ms).max(started_ms)), timing)
}

/// What the waiting-guest bookkeeping (`crate::waiting`) reads.
impl Registry {
    /// Whether `host` owns `uuid` as the reconciler sees it: no recorded
    /// owner elsewhere, no unfinished move, no conflict, no other first host.
    pub fn owns(&self, host: &str, uuid: &str) -> bool {
        Self::owner_view(&self.lock(), uuid, host).is_none()
    }

    /// Which hosts last reported each of `uuids` holding its disks, whether
    /// they talk now or not (a silent host's last report counts: it may
    /// still run the guest).
    pub fn holders(&self, uuids: &[String]) -> BTreeMap<String, Vec<String>> {
        let inner = self.lock();
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (h, m) in &inner.guests {
            for u in uuids {
                if m.get(u).is_some_and(|g| lifeboat_proto::holds_disk(g.state)) {
                    out.entry(u.clone()).or_default().push(h.clone());
                }
            }
        }
        out
    }

    /// Whether the host's agent sent an inventory in its current session.
    pub fn inventory_fresh(&self, host: &str) -> bool {
        self.lock().hosts.get(host).is_some_and(|e| e.session.is_some() && e.inventory_seen)
    }

    /// Marks a host for the reconciler's next pass.
    pub fn touch(&self, host: &str) {
        if let Some(e) = self.lock().hosts.get_mut(host) {
            e.dirty = true;
        }
    }
}

/// Background task: liveness transitions every 250 ms, last-heard times
/// persisted every 30 s (they are shown, not decided on: silence is never
/// counted from before the controller started).
pub async fn watch_liveness(reg: Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        // A late tick means the runtime could not run tasks: heartbeats
        // waited too. Worth a line in the log when it is long.
        let late = last.elapsed().saturating_sub(Duration::from_millis(250));
        if late > Duration::from_millis(100) {
            warn!(late_ms = late.as_millis() as u64, "the controller's runtime stalled");
        }
        reg.check_liveness();
        last = tokio::time::Instant::now();
        n = n.wrapping_add(1);
        if n.checked_rem(120) == Some(0) {
            if let Err(e) = reg.flush() {
                warn!("persisting last-seen times failed: {e}");
            }
            reg.checkpoint();
        }
    }
}

/// `s` with control characters escaped (`\u{1b}`), for texts read from a
/// database row that may hold anything.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Rows that could not be read at a start.
impl Registry {
    /// Moves each bad row to the quarantine table and raises a
    /// `row-quarantined` alarm naming its table and key, what it blocks and
    /// what the operator can do. Fail closed: the guest a row concerns is
    /// blocked (no lease, start or stop) while the row is in quarantine, and a
    /// host whose row is quarantined comes back as MAINTENANCE.
    fn quarantine_bad_rows(store: &mut Store, bad: &[crate::store::BadRow]) -> Result<(), StoreError> {
        for b in bad {
            let host_reason = format!("its database row could not be read ({}); it is in quarantine", b.reason);
            let id = store.quarantine(b, &host_reason)?;
            let blocked = if b.table == "hosts" {
                format!("Host {} is MAINTENANCE (it takes no guests) until an operator sets its status.", b.host)
            } else {
                format!(
                    "Guest {} is not leased, started, stopped or moved anywhere while the row is in quarantine.",
                    b.uuid
                )
            };
            let alarm_host = if b.host.is_empty() { "controller" } else { b.host.as_str() };
            let detail = format!(
                "a row of table {} (key {}) could not be read: {}. It was moved to the quarantine table (id {id}) and the \
                 rest of the database loaded. {blocked} What to do: look at it with `sqlite3 <database> \"SELECT * FROM \
                 quarantine WHERE id = {id}\"`; put a corrected row back (or restore a backup), delete the quarantine row, \
                 restart the controller, then clear this alarm (`lifeboat alarms clear --host {alarm_host} --kind row-quarantined`)",
                b.table,
                printable(&b.key),
                printable(&b.reason)
            );
            tracing::error!(table = b.table, quarantine_id = id, "ALARM: {detail}");
            if store.raise_alarm(alarm_host, "row-quarantined", &detail)? {
                store.audit(&AuditRow::by_controller("alarm.row-quarantined", alarm_host, "", detail))?;
            }
        }
        Ok(())
    }

    /// Whether guest `uuid` is blocked by a row in quarantine.
    pub fn is_quarantined(&self, uuid: &str) -> bool {
        self.lock().quarantined.contains(uuid)
    }
}

/// Alarms that one recurring cause keeps up to date.
impl Registry {
    /// Raises `kind` for `host`, or, when one is active, replaces its detail:
    /// one alarm per host and kind, showing the latest occurrence.
    pub fn raise_or_refresh_alarm(&self, host: &str, kind: &str, detail: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.store.refresh_alarm(host, kind, detail)? {
            if let Some(a) = inner.alarms.iter_mut().find(|a| a.0 == host && a.1 == kind) {
                a.2 = detail.to_string();
            }
            return Ok(());
        }
        Self::raise_locked(&mut inner, host, kind, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(uuid: &str, name: &str) -> Guest {
        Guest { uuid: uuid.into(), name: name.into(), ..Default::default() }
    }

    #[test]
    fn an_inventory_with_an_invalid_guest_is_refused_whole() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        reg.apply_inventory("h", sid, Inventory { host: None, guests: vec![g("u0", "vm0")], more: false }).unwrap();
        let inv = Inventory { host: None, guests: vec![g("u1", "vm1"), g("", "broken"), g("u3", "vm3")], more: false };
        let e = reg.apply_inventory("h", sid, inv).unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
        let names: Vec<String> =
            reg.list_guests(None, None, false).unwrap().into_iter().map(|r| r.guest.unwrap().name).collect();
        assert_eq!(names, ["vm0"]);
        assert!(reg.apply_guest("h", sid, g("", "x")).is_err());
    }

    #[test]
    fn definitions_stay_in_the_database_and_unchanged_guests_are_not_rewritten() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let with_def = |u: &str, n: &str, state: i32| Guest {
            definition_xml: format!("<domain><name>{n}</name></domain>"),
            state,
            ..g(u, n)
        };
        let inv = |gs: Vec<Guest>| Inventory { host: None, guests: gs, more: false };
        reg.apply_inventory("h", sid, inv(vec![with_def("u1", "vm1", 1), with_def("u2", "vm2", 1)])).unwrap();
        let listed = reg.list_guests(None, None, false).unwrap();
        assert!(listed.iter().all(|r| r.guest.as_ref().unwrap().definition_xml.is_empty()));
        let full = reg.list_guests(Some("h"), Some("vm2"), true).unwrap();
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].guest.as_ref().unwrap().definition_xml, "<domain><name>vm2</name></domain>");
        let t1 = reg.list_guests(None, Some("u1"), false).unwrap()[0].updated_unix_ms;
        std::thread::sleep(Duration::from_millis(5));
        // vm1 unchanged, vm2 changed, u3 new; nothing else.
        reg.apply_inventory(
            "h",
            sid,
            inv(vec![with_def("u1", "vm1", 1), with_def("u2", "vm2", 6), with_def("u3", "vm3", 1)]),
        )
        .unwrap();
        let rows = reg.db(|s| s.guests()).unwrap();
        let updated = |u: &str| rows.iter().find(|r| r.guest.uuid == u).unwrap().updated_ms;
        assert_eq!(updated("u1"), t1, "an unchanged guest is not written again");
        assert!(updated("u2") > t1 && updated("u3") > t1);
        assert_eq!(rows.iter().find(|r| r.guest.uuid == "u2").unwrap().guest.state, 6);
        reg.apply_inventory("h", sid, inv(vec![with_def("u3", "vm3", 1)])).unwrap();
        let rows = reg.db(|s| s.guests()).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.guest.uuid.as_str()).collect::<Vec<_>>(),
            ["u3"],
            "guests gone from the inventory leave the guests table"
        );
        // ...but managed guests gone from their owner are kept as missing,
        // definitions included (vm1, in no state Lifeboat records a desired
        // state for, was never managed).
        drop(rows);
        let listed = reg.list_guests(None, None, true).unwrap();
        let shown: Vec<(&str, bool, &str)> = listed
            .iter()
            .map(|r| {
                (r.guest.as_ref().unwrap().name.as_str(), r.missing, r.guest.as_ref().unwrap().definition_xml.as_str())
            })
            .collect();
        assert_eq!(
            shown,
            [("vm2", true, "<domain><name>vm2</name></domain>"), ("vm3", false, "<domain><name>vm3</name></domain>")]
        );
    }

    #[test]
    fn autostart_switched_on_outside_lifeboat_is_logged_once_leases_were_sent() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let on = |a: bool| Guest { autostart: a, ..g("u1", "vm1") };
        let logged = || {
            reg.db(|s| s.read_audit(&crate::store::AuditFilter::default()))
                .unwrap()
                .into_iter()
                .filter(|a| a.action == "guest.autostart_enabled")
                .count()
        };
        reg.apply_inventory("h", sid, Inventory { host: None, guests: vec![on(false)], more: false }).unwrap();
        // Before Lifeboat manages the host (no leases yet): nothing to say.
        reg.apply_guest("h", sid, on(true)).unwrap();
        assert_eq!(logged(), 0);
        reg.apply_guest("h", sid, on(false)).unwrap();
        reg.leases_sent("h", 1, vec!["u1".into()]);
        reg.apply_guest("h", sid, on(true)).unwrap();
        assert_eq!(logged(), 1);
        // Still on (another change of the same guest): not logged again.
        reg.apply_guest("h", sid, Guest { state: 1, ..on(true) }).unwrap();
        assert_eq!(logged(), 1);
        let row = reg.db(|s| s.read_audit(&crate::store::AuditFilter::default())).unwrap().pop().unwrap();
        assert_eq!((row.host.as_str(), row.vm.as_str()), ("h", "vm1"));
        assert!(row.detail.contains("outside Lifeboat"), "{}", row.detail);
    }

    #[test]
    fn pages_of_guests_cover_every_guest_once_in_order() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        // 250 hosts (more than one lock chunk), some without guests.
        for h in 0..250 {
            let host = format!("h{h:03}");
            let sid = reg.open_session(&host, "boot", tx.clone()).unwrap();
            let guests = (0..(h % 4)).map(|i| g(&format!("u-{h}-{i}"), &format!("vm{}", 9 - i))).collect();
            reg.apply_inventory(&host, sid, Inventory { host: None, guests, more: false }).unwrap();
        }
        let all = reg.list_guests(None, None, false).unwrap();
        assert_eq!(all.len(), (0..250).map(|h| h % 4).sum::<usize>());
        let key = |r: &GuestRecord| {
            let g = r.guest.as_ref().unwrap();
            (r.host_id.clone(), g.name.clone(), g.uuid.clone())
        };
        assert!(all.windows(2).all(|w| key(&w[0]) < key(&w[1])), "in order of host, name and UUID");
        for limit in [1, 7, 100, all.len(), all.len() + 1] {
            let (mut paged, mut after, mut pages) = (Vec::new(), None, 0);
            loop {
                let (page, next) = reg.list_guests_page(None, None, false, after.as_ref(), limit).unwrap();
                assert!(page.len() <= limit);
                pages += 1;
                paged.extend(page.iter().map(key));
                match next {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            assert_eq!(paged, all.iter().map(key).collect::<Vec<_>>(), "page size {limit}");
            assert_eq!(pages, all.len().div_ceil(limit).max(1), "no empty last page (size {limit})");
        }
        // One host's guests, in pages.
        let (p1, c1) = reg.list_guests_page(Some("h003"), None, false, None, 2).unwrap();
        let (p2, c2) = reg.list_guests_page(Some("h003"), None, false, c1.as_ref(), 2).unwrap();
        assert_eq!(
            p1.iter().chain(&p2).map(|r| r.guest.as_ref().unwrap().name.as_str()).collect::<Vec<_>>(),
            ["vm7", "vm8", "vm9"]
        );
        assert!(p2.iter().all(|r| r.host_id == "h003") && c2.is_none());
    }

    #[test]
    fn a_superseded_session_cannot_change_anything() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let old = reg.open_session("h", "boot", tx.clone()).unwrap();
        let new = reg.open_session("h", "boot", tx).unwrap();
        reg.apply_guest("h", old, g("u1", "stale")).unwrap();
        assert!(reg.list_guests(None, None, false).unwrap().is_empty());
        reg.apply_guest("h", new, g("u1", "fresh")).unwrap();
        assert_eq!(reg.list_guests(Some("h"), None, false).unwrap().len(), 1);
        reg.close_session("h", old);
        assert!(reg.list_hosts()[0].session_open, "closing the old session leaves the new one open");
    }

    #[test]
    fn a_takeover_closes_the_old_session_and_two_live_agents_at_two_addresses_raise_one_alarm() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let a: std::net::SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let (_, first) = reg.open_session_from("h", "boot", tx.clone(), Some(a)).unwrap();
        assert!(!*first.borrow());
        // The same address again (a redial after a broken stream): no alarm.
        let (_, second) =
            reg.open_session_from("h", "boot", tx.clone(), Some("10.0.0.1:4001".parse().unwrap())).unwrap();
        assert!(*first.borrow(), "the superseded session is told to close");
        assert!(reg.active_alarms().is_empty());
        // Another address while the first still talks: both named, once.
        let (_, third) = reg.open_session_from("h", "boot", tx.clone(), Some(b)).unwrap();
        assert!(*second.borrow());
        let _ = reg.open_session_from("h", "boot", tx.clone(), Some("10.0.0.1:4002".parse().unwrap())).unwrap();
        assert!(*third.borrow());
        let alarms = reg.active_alarms();
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert_eq!(alarms[0].1, "duplicate-agent");
        assert!(alarms[0].2.contains("10.0.0.1") && alarms[0].2.contains("10.0.0.9"), "{}", alarms[0].2);
    }

    #[test]
    fn one_uuid_has_one_owner_and_a_newer_claim_rebuilds_an_older_record() {
        use crate::reconcile::OwnerView;
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let running = |u: &str, n: &str| Guest { state: GuestState::Running as i32, ..g(u, n) };
        let inv = |gs: Vec<Guest>| Inventory { host: None, guests: gs, more: false };
        let sa = reg.open_session("a", "boot", tx.clone()).unwrap();
        let sb = reg.open_session("b", "boot", tx.clone()).unwrap();
        reg.apply_inventory("a", sa, inv(vec![running("u1", "vm1")])).unwrap();
        // A second copy on b while a runs it: b does not own it.
        reg.apply_inventory("b", sb, inv(vec![running("u1", "vm1")])).unwrap();
        let view = |h: &str| Registry::owner_view(&reg.lock(), "u1", h);
        assert_eq!(view("a"), None);
        assert_eq!(view("b"), Some(OwnerView::Other { host: "a".into(), recorded: false }));
        assert!(reg.lease_set("b").is_empty(), "no lease for the second copy");
        assert_eq!(reg.lease_set("a").len(), 1);
        // a stops it and undefines it (a hand migration): b's copy is the guest now.
        reg.apply_inventory("a", sa, inv(vec![])).unwrap();
        assert_eq!(view("b"), None);
        // a silent first host: nobody can tell.
        let sc = reg.open_session("c", "boot", tx.clone()).unwrap();
        reg.apply_inventory("c", sc, inv(vec![running("u2", "vm2")])).unwrap();
        reg.close_session("c", sc);
        reg.apply_inventory("b", sb, inv(vec![running("u1", "vm1"), running("u2", "vm2")])).unwrap();
        assert_eq!(Registry::owner_view(&reg.lock(), "u2", "b"), Some(OwnerView::Unsure));
        // A claim newer than the record (a restored database): rebuilt, alarmed, audited.
        let claimed = Guest { owner_host: "b".into(), owner_generation: 3, ..running("u3", "vm3") };
        reg.apply_guest("b", sb, claimed).unwrap();
        assert_eq!(reg.owner_generation("u3"), 3);
        assert!(reg.active_alarms().iter().any(|a| a.1 == "store-behind-hosts" && a.0 == "b"));
        let log = reg.db(|s| s.read_audit(&crate::store::AuditFilter::default())).unwrap();
        assert!(log.iter().any(|a| a.action == "ownership.rebuilt" && a.vm == "vm3"));
        // A generation out of range claims nothing, and the report is stored whole.
        let absurd = Guest { owner_host: "b".into(), owner_generation: u64::MAX, ..running("u9", "vm9") };
        let still = Guest { owner_host: "b".into(), owner_generation: 3, ..running("u3", "vm3") };
        reg.apply_inventory("b", sb, inv(vec![running("u1", "vm1"), running("u2", "vm2"), still, absurd])).unwrap();
        assert_eq!(reg.owner_generation("u9"), 0);
        assert_eq!(reg.list_guests(Some("b"), None, false).unwrap().len(), 4);
        // A newer claim while the recorded owner runs it: a conflict, nobody gets a lease.
        let sd = reg.open_session("d", "boot", tx).unwrap();
        reg.apply_inventory(
            "d",
            sd,
            inv(vec![Guest { owner_host: "d".into(), owner_generation: 4, ..running("u3", "vm3") }]),
        )
        .unwrap();
        assert_eq!(reg.owner_generation("u3"), 3, "not taken from a running owner");
        assert!(reg.active_alarms().iter().any(|a| a.1 == "ownership-conflict"));
        assert!(!reg.lease_set("b").iter().any(|l| l.0 == "u3") && !reg.lease_set("d").iter().any(|l| l.0 == "u3"));
    }

    #[test]
    fn no_host_reads_unreachable_before_the_controller_was_up_for_the_detection_time() {
        let t = Timing { unreachable_after_ms: 3000, ..Timing::default() };
        let started = 100_000;
        // Never heard since the start: silent from the start, not from long ago.
        assert_eq!(liveness_since_start(started + 500, None, started, t), Liveness::Reachable);
        assert_eq!(liveness_since_start(started + 3000, None, started, t), Liveness::Reachable);
        assert_eq!(liveness_since_start(started + 3001, None, started, t), Liveness::Unreachable);
        // Heard before the start (a persisted or stale time) counts from the start too.
        assert_eq!(liveness_since_start(started + 500, Some(started - 60_000), started, t), Liveness::Reachable);
        // Heard since the start: the ordinary rule.
        assert_eq!(liveness_since_start(started + 9000, Some(started + 6000), started, t), Liveness::Reachable);
        assert_eq!(liveness_since_start(started + 9001, Some(started + 6000), started, t), Liveness::Unreachable);
    }

    #[test]
    fn after_a_restart_a_host_silent_for_long_is_neither_unreachable_nor_silent_for_the_planner_until_the_detection_time()
     {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        {
            let reg = Registry::load(Store::open(&db).unwrap(), Timing::default()).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            let sid = reg.open_session("h", "boot", tx).unwrap();
            // Last heard an hour before this controller stops.
            reg.heard_cell("h", sid).unwrap().store(now_unix_ms() - 3_600_000, Ordering::Relaxed);
            reg.close_session("h", sid);
        }
        let reg = Registry::load(Store::open(&db).unwrap(), Timing::default()).unwrap();
        let v = reg.host_view("h").unwrap();
        assert_eq!(v.liveness, Liveness::Reachable, "the startup grace");
        assert_eq!(v.silent_ms, None, "a forced migration's 'source silent' cannot pass now");
        assert!(reg.is_reachable("h"));
        assert_eq!(reg.list_hosts()[0].liveness, "REACHABLE");
    }

    #[test]
    fn the_reconciler_holds_through_the_startup_grace_and_a_restore_until_every_host_reported() {
        let store = Store::open_in_memory().unwrap();
        store.raise_alarm("controller", "store-restored", "restored from b.db").unwrap();
        let t = Timing { heartbeat_interval_ms: 100, unreachable_after_ms: 300 };
        let reg = Registry::load(store, t).unwrap();
        let now = now_unix_ms();
        assert!(reg.hold(now).unwrap().contains("startup grace"));
        let (tx, _rx) = mpsc::channel(1);
        let sa = reg.open_session("a", "boot", tx.clone()).unwrap();
        let _sb = reg.open_session("b", "boot", tx).unwrap();
        reg.apply_inventory("a", sa, Inventory::default()).unwrap();
        let later = now + 1000;
        let why = reg.hold(later).unwrap();
        assert!(why.contains("restored") && why.contains('b') && !why.contains("a,"), "{why}");
        reg.set_status("b", HostStatus::Offline, "gone", "test").unwrap();
        assert_eq!(reg.hold(later), None, "every host not OFFLINE reported");
        assert!(reg.active_alarms().is_empty(), "the alarm is cleared by its cause");
    }

    #[tokio::test]
    async fn a_host_two_agents_claim_is_sent_nothing_and_its_reports_judge_nothing() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let running = |u: &str, n: &str| Guest { state: GuestState::Running as i32, ..g(u, n) };
        let inv = |gs: Vec<Guest>| Inventory { host: None, guests: gs, more: false };
        let sb = reg.open_session("b", "boot", tx.clone()).unwrap();
        reg.apply_inventory("b", sb, inv(vec![running("ub", "vm-b1")])).unwrap();
        let (_, _) = reg.open_session_from("a", "boot", tx.clone(), Some("10.0.0.1:1".parse().unwrap())).unwrap();
        // An impostor with a's certificate on b's machine reports b's guest as a's.
        let (impostor, _) =
            reg.open_session_from("a", "boot", tx.clone(), Some("10.0.0.2:1".parse().unwrap())).unwrap();
        reg.apply_inventory("a", impostor, inv(vec![running("ub", "vm-b1")])).unwrap();
        assert!(reg.active_alarms().iter().any(|a| a.0 == "a" && a.1 == "duplicate-agent"));
        let decided = reg.reconcile_each(now_unix_ms(), 30_000, true, |snap| {
            (snap.host.clone(), crate::reconcile::decide(snap, 1, 30_000))
        });
        assert!(decided.iter().all(|(h, _)| h != "a"), "nothing is decided for a suspect host");
        assert!(
            !decided.iter().flat_map(|(_, a)| a).any(|a| matches!(a, crate::reconcile::Action::StopStale { .. })),
            "no stop anywhere from what a suspect host reports: {decided:?}"
        );
        let e = reg.call("a", Kind::Resync(Default::default()), Duration::from_millis(100)).await.unwrap_err();
        assert!(e.to_string().contains("duplicate-agent"), "{e}");
    }

    #[test]
    fn one_host_holds_the_lease_of_a_guest_never_moved_and_an_unfinished_move_leases_nobody() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let st = |u: &str, running: bool| Guest {
            state: if running { GuestState::Running as i32 } else { GuestState::Shutoff as i32 },
            ..g(u, "vm1")
        };
        let inv = |gs: Vec<Guest>| Inventory { host: None, guests: gs, more: false };
        let sa = reg.open_session("a", "boot", tx.clone()).unwrap();
        let sb = reg.open_session("b", "boot", tx.clone()).unwrap();
        reg.apply_inventory("a", sa, inv(vec![st("u1", false)])).unwrap();
        reg.apply_inventory("b", sb, inv(vec![st("u1", false)])).unwrap();
        let leased = |h: &str| reg.lease_set(h).iter().any(|l| l.0 == "u1");
        assert!(leased("a") && !leased("b"), "two shut-off copies: only the first host's is leased");
        // b runs it now (a hand migration): b alone holds the lease.
        reg.apply_guest("b", sb, st("u1", true)).unwrap();
        assert!(leased("b") && !leased("a"), "the one running copy is the guest");
        // An unfinished move whose job ended: nobody is leased, nothing is stopped.
        let row = crate::store::OwnerRow {
            uuid: "u1".into(),
            host: "a".into(),
            generation: 1,
            from_host: "b".into(),
            job: "j".into(),
            complete: false,
        };
        reg.db(|s| s.set_owner(&row, &AuditRow::by_controller("test", "a", "vm1", String::new()))).unwrap();
        reg.refresh_owners().unwrap();
        assert!(!leased("a") && !leased("b"));
        assert_eq!(Registry::owner_view(&reg.lock(), "u1", "b"), Some(crate::reconcile::OwnerView::Unsure));
        // While its job runs, the target holds it.
        reg.set_in_job("j", &[("u1".into(), "b".into(), "a".into())]);
        assert!(leased("a") && !leased("b"));
    }

    #[test]
    fn a_changed_memory_total_reaches_the_planners_view_and_the_store() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let info = |mib: u64| HostInfo { host_id: "h".into(), memory_total_kib: mib * 1024, ..Default::default() };
        reg.apply_inventory("h", sid, Inventory { host: Some(info(4096)), guests: vec![], more: false }).unwrap();
        assert_eq!(reg.host_view("h").unwrap().memory_total_kib, 4096 * 1024);
        // The agent re-read its memory (hot-added) and sent its host facts.
        reg.apply_host("h", sid, info(8192)).unwrap();
        assert_eq!(reg.host_view("h").unwrap().memory_total_kib, 8192 * 1024, "plans use the new total");
        assert_eq!(reg.host_views_for(&[])[0].memory_total_kib, 8192 * 1024);
        assert_eq!(reg.db(|s| s.host("h")).unwrap().unwrap().info.memory_total_kib, 8192 * 1024, "and it is stored");
    }

    #[test]
    fn guests_reporting_u64_max_memory_saturate_the_running_figure_instead_of_panicking_or_wrapping() {
        let reg = Registry::load(Store::open_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let huge = |u: &str| Guest {
            uuid: u.into(),
            name: format!("vm-{u}"),
            state: GuestState::Running as i32,
            memory_kib: u64::MAX,
            ..Default::default()
        };
        let info = HostInfo { host_id: "h".into(), memory_total_kib: 4096 * 1024, ..Default::default() };
        let inv = Inventory { host: Some(info), guests: vec![huge("u1"), huge("u2"), huge("u3")], more: false };
        reg.apply_inventory("h", sid, inv).unwrap();
        let v = reg.host_view("h").unwrap();
        assert_eq!(v.guests.len(), 3, "the whole inventory was applied");
        assert_eq!(v.running_memory_kib, u64::MAX, "a full host, not an empty one");
        assert_eq!(crate::migrate::plan::available_memory_kib(&v, 0), 0);
    }

    #[test]
    fn bad_rows_are_quarantined_with_an_alarm_the_rest_loads_and_their_guests_get_no_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        {
            let reg = Registry::load(Store::open(&path).unwrap(), Timing::default()).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            let sa = reg.open_session("a", "boot", tx.clone()).unwrap();
            let _sb = reg.open_session("b", "boot", tx).unwrap();
            let run = |u: &str, n: &str| Guest { state: GuestState::Running as i32, memory_kib: 1024, ..g(u, n) };
            let inv = Inventory {
                host: None,
                guests: vec![run("u1", "vm1"), run("u2", "vm2"), run("u3", "vm3"), run("u4", "vm4")],
                more: false,
            };
            reg.apply_inventory("a", sa, inv).unwrap();
            assert_eq!(reg.lease_set("a").len(), 4);
            reg.flush().unwrap();
        }
        {
            // What the tester did by hand, and worse: a guest that overflows,
            // a blob that does not decode, an owner row with a negative
            // generation, a desired state that is no state, a host whose
            // facts do not decode.
            let c = rusqlite::Connection::open(&path).unwrap();
            let huge = Guest { state: GuestState::Running as i32, memory_kib: u64::MAX, ..g("u1", "vm1") };
            c.execute("UPDATE guests SET data = ?1 WHERE uuid = 'u1'", [prost::Message::encode_to_vec(&huge)]).unwrap();
            c.execute("UPDATE guests SET data = x'ffffffff' WHERE uuid = 'u2'", []).unwrap();
            c.execute("INSERT INTO owners (uuid, host, generation, from_host, job, complete) VALUES ('u3', 'a', -5, '', '', 1)", []).unwrap();
            c.execute("UPDATE desired SET state = 'sideways' WHERE uuid = 'u4'", []).unwrap();
            c.execute("UPDATE hosts SET info = x'ff' WHERE host_id = 'b'", []).unwrap();
        }
        let reg = Registry::load(Store::open(&path).unwrap(), Timing::default()).unwrap();
        let q = reg.db(|s| s.quarantined()).unwrap();
        let keys: Vec<(String, String)> = q.iter().map(|q| (q.table.clone(), q.key.clone())).collect();
        assert_eq!(keys.len(), 5, "{keys:?}");
        for k in [("hosts", "b"), ("owners", "u3"), ("desired", "u4"), ("guests", "a/u1"), ("guests", "a/u2")] {
            assert!(keys.contains(&(k.0.to_string(), k.1.to_string())), "{k:?} not quarantined: {keys:?}");
        }
        let alarms: Vec<_> = reg.active_alarms().into_iter().filter(|a| a.1 == "row-quarantined").collect();
        assert_eq!(alarms.len(), 5, "{alarms:?}");
        assert!(
            alarms.iter().any(|a| a.2.contains("table owners (key u3)") && a.2.contains("not leased, started")),
            "{alarms:?}"
        );
        assert_eq!(reg.status_of("b"), Some(HostStatus::Maintenance));
        let (tx, _rx) = mpsc::channel(1);
        let sa = reg.open_session("a", "boot2", tx).unwrap();
        // The host reports its guests again: still no lease for the blocked ones.
        let run = |u: &str, n: &str| Guest { state: GuestState::Running as i32, memory_kib: 1024, ..g(u, n) };
        let inv = Inventory {
            host: None,
            guests: vec![run("u1", "vm1"), run("u2", "vm2"), run("u3", "vm3"), run("u4", "vm4")],
            more: false,
        };
        reg.apply_inventory("a", sa, inv).unwrap();
        assert!(reg.lease_set("a").is_empty(), "{:?}", reg.lease_set("a"));
        // A second start on the same database loads cleanly, the guests still blocked.
        drop(reg);
        let reg = Registry::load(Store::open(&path).unwrap(), Timing::default()).unwrap();
        assert_eq!(reg.db(|s| s.quarantined()).unwrap().len(), 5);
        assert!(["u1", "u2", "u3", "u4"].iter().all(|u| reg.is_quarantined(u)));
    }

    #[test]
    fn a_host_status_that_does_not_read_is_quarantined_and_the_host_comes_back_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        {
            let reg = Registry::load(Store::open(&path).unwrap(), Timing::default()).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            let _s = reg.open_session("b", "boot", tx).unwrap();
            assert_eq!(reg.status_of("b"), Some(HostStatus::Available));
            reg.flush().unwrap();
        }
        for bad in ["'available'", "'DEAD'", "NULL", "7"] {
            let c = rusqlite::Connection::open(&path).unwrap();
            // NOT NULL: a NULL cannot be written, the others can.
            if c.execute(&format!("UPDATE hosts SET status = {bad} WHERE host_id = 'b'"), []).is_err() {
                continue;
            }
            drop(c);
            let reg = Registry::load(Store::open(&path).unwrap(), Timing::default()).unwrap();
            assert_eq!(reg.status_of("b"), Some(HostStatus::Maintenance), "{bad}: never AVAILABLE");
            let q = reg.db(|s| s.quarantined()).unwrap();
            let last = q.last().unwrap();
            assert_eq!((last.table.as_str(), last.key.as_str()), ("hosts", "b"), "{bad}");
            assert!(last.reason.contains("status"), "{bad}: {}", last.reason);
            let alarms: Vec<_> = reg.active_alarms().into_iter().filter(|a| a.1 == "row-quarantined").collect();
            assert!(alarms.iter().any(|a| a.0 == "b" && a.2.contains("table hosts (key b)")), "{bad}: {alarms:?}");
        }
    }
}
