//! The controller's in-memory view of hosts and guests, written through to
//! the repositories ([`Repos`]) before any change is acknowledged.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lifeboat_proto::v1::{
    Command, CommandResult, ControllerMessage, Guest, GuestRecord, GuestState, HostInfo, HostRecord, Inventory,
    command::Kind, controller_message,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::domain::host::{HostStatus, Liveness, Timing};
use crate::domain::policy::{by_host, duplicate_agent_detail, running_kib, valid_guest};
use crate::domain::view::{HostView, OwnerView};
use crate::error::ControllerError;
use crate::ports::{
    AuditRow, BadRow, Clock, DesiredChange, GuestWrite, HostRow, MissingRow, OwnerRow, RepoError, RepoResult, Repos,
    Repositories, SystemClock,
};

mod bus;
mod inventory;
mod listing;
mod missing;
mod sessions;
mod view;
mod writes;

pub use bus::SessionId;
use bus::{CommandBus, SessionHandle};
pub use listing::{GuestFilter, HostFilter, HostPage};
pub use missing::missing_detail;
use view::{GuestEntry, HostEntry, Listed};

pub use crate::domain::policy::{ReturnEvent, classify_return, liveness_since_start};

struct Inner {
    /// The registry's clock (see [`Registry::now_ms`]), for code that holds the lock.
    clock: Arc<dyn Clock>,
    /// The repositories: every write goes to the store thread first, and
    /// memory follows only once it is stored.
    repos: Repos,
    /// Silence after which a host is UNREACHABLE (from [`Timing`]).
    unreachable_after_ms: u32,
    hosts: BTreeMap<String, HostEntry>,
    guests: BTreeMap<String, BTreeMap<String, GuestEntry>>,
    next_generation: u64,
    /// Ownership records by UUID (cache of the owners table).
    owners: BTreeMap<String, OwnerRow>,
    /// Bumped by every change to `owners` in memory: an async refresh whose
    /// snapshot was read before a later change must not overwrite it.
    owners_version: u64,
    /// Bumped by every change to `alarms` in memory (see `owners_version`).
    alarms_version: u64,
    /// Bumped by every change to a host's status in memory (see `owners_version`).
    status_version: u64,
    /// Bumped by every change a dashboard page may show (hosts, guests,
    /// owners, statuses, alarms, sessions, liveness): the live updates'
    /// "something changed" (`Registry::view_version`).
    view_version: std::sync::atomic::AtomicU64,
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
    missing: BTreeMap<String, MissingRow>,
    /// Guests with a row in quarantine (a guest, owner, desired-state or
    /// missing row that could not be read): nobody knows who owns them, so
    /// no lease, start or stop anywhere while the row is there.
    quarantined: BTreeSet<String>,
}

impl Inner {
    /// Runs `f` on the store thread and waits for it. The registry's own
    /// writes go through here: the agent intake path runs on blocking
    /// threads (`spawn_blocking`), and memory changes only after the write.
    fn db<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R> + Send + 'static,
    ) -> RepoResult<R> {
        self.repos.call_blocking(f)
    }
}

/// Hosts and guests, in memory and in the database.
pub struct Registry {
    started_ms: i64,
    /// The one clock of the controller's application floor: every
    /// decision that reads the time asks it, so tests set the time.
    clock: Arc<dyn Clock>,
    repos: Repos,
    inner: Mutex<Inner>,
    timing: Timing,
    /// Commands awaiting their result.
    bus: CommandBus,
    /// Lease grants decided as sessions opened, for the reconciler to send
    /// ([`Registry::grant_at_open`]).
    open_grants: OpenGrants,
}

/// Lease grants decided when a session opened: the reconciler enables them
/// with its lease TTL and sends what is queued here.
#[derive(Default)]
struct OpenGrants {
    /// The lease TTL (ms); 0: not enabled, sessions open without a grant.
    ttl_ms: std::sync::atomic::AtomicI64,
    queue: Mutex<Vec<crate::domain::reconcile::Action>>,
    ready: tokio::sync::Notify,
}

/// Grants queued at session opens past which more are left to the next
/// pass (they are decided again there).
const OPEN_GRANTS_MAX: usize = 100_000;

/// Hosts handled per hold of the registry lock by passes over every host,
/// so that no pass holds it long with 10,000 hosts.
const LOCK_CHUNK: usize = 100;

/// Where a page of guests ends: (host id, guest name, UUID) of its last guest.
pub type GuestCursor = (String, String, String);

impl Registry {
    /// Loads everything from the store. A row that cannot be read does not
    /// stop the load: it is quarantined (see [`Registry::quarantine_bad_rows`])
    /// and the rest loads.
    ///
    /// Start-up work, not on an async worker: it blocks on the store thread.
    pub fn load(repos: Repos, timing: Timing) -> Result<Self, RepoError> {
        Self::load_with_clock(repos, timing, Arc::new(SystemClock))
    }

    /// [`Registry::load`] with the clock every time-based decision reads
    /// (liveness, leases, holds, attempts): tests pass a
    /// [`crate::ports::ManualClock`] and move time instead of sleeping.
    pub fn load_with_clock(repos: Repos, timing: Timing, clock: Arc<dyn Clock>) -> Result<Self, RepoError> {
        let (host_rows, bad_hosts) = repos.call_blocking(|r| r.hosts().all_checked())?;
        // Read again only when quarantining changed the table.
        let host_rows = if bad_hosts.is_empty() {
            host_rows
        } else {
            Self::quarantine_bad_rows(&repos, bad_hosts)?;
            repos.call_blocking(|r| r.hosts().all_checked())?.0
        };
        let mut hosts = BTreeMap::new();
        for row in host_rows {
            hosts.insert(row.info.host_id.clone(), HostEntry::new(row));
        }
        let (owner_rows, mut bad) = repos.call_blocking(|r| r.ownership().owners_checked())?;
        let owners: BTreeMap<String, OwnerRow> = owner_rows.into_iter().map(|o| (o.uuid.clone(), o)).collect();
        let owners_by_host = by_host(owners.values().map(|o| (o.host.as_str(), o.uuid.as_str())));
        let (desired, b) = repos.call_blocking(|r| r.ownership().desired_checked())?;
        let desired: BTreeMap<String, (String, String)> =
            desired.into_iter().map(|(u, d)| (u, (d.host, d.state))).collect();
        bad.extend(b);
        let (missing_rows, b) = repos.call_blocking(|r| r.ownership().missing_checked())?;
        bad.extend(b);
        let missing = missing_rows.into_iter().map(|r| (r.guest.uuid.clone(), r)).collect();
        // The guests are built on the store thread, one row at a time (no
        // full copy of 200,000 reports), and handed back whole.
        let (guests, b) = repos.call_blocking(|r| {
            let mut guests: BTreeMap<String, BTreeMap<String, GuestEntry>> = BTreeMap::new();
            let bad = r.guests().each_checked(
                &mut |g| crate::intake::check_stored_guest(g).map_err(|r| r.to_string()),
                &mut |g| {
                    // A row written before definitions had digests gets one
                    // from its text: unequal to what the agent sends, so its
                    // next inventory writes it once more, with the digest.
                    let uuid = g.guest.uuid.clone();
                    let entry = GuestEntry::new(g.guest, g.updated_ms);
                    guests.entry(g.host_id).or_default().insert(uuid, entry);
                },
            )?;
            Ok((guests, bad))
        })?;
        bad.extend(b);
        Self::quarantine_bad_rows(&repos, bad)?;
        let quarantined: BTreeSet<String> = repos
            .call_blocking(|r| r.quarantine().list())?
            .into_iter()
            .map(|q| q.uuid)
            .filter(|u| !u.is_empty())
            .collect();
        let alarms =
            repos.call_blocking(|r| r.alarms().list(false))?.into_iter().map(|a| (a.host, a.kind, a.detail)).collect();
        for (h, m) in &guests {
            if let Some(e) = hosts.get_mut(h) {
                e.running_kib = running_kib(m.values().map(|g| (g.state, g.memory_kib)));
            }
        }
        let mut in_job = BTreeMap::new();
        // Read as stored text: a job row that does not read still holds its
        // guests (the engine raises `job-corrupt` and does not run it).
        for (job, uuid, source, target) in repos.call_blocking(|r| r.jobs().active_guests())? {
            in_job.insert(uuid, (job, source, target));
        }
        Ok(Registry {
            started_ms: clock.now_ms(),
            clock: clock.clone(),
            repos: repos.clone(),
            inner: Mutex::new(Inner {
                clock,
                repos,
                unreachable_after_ms: timing.unreachable_after_ms,
                hosts,
                guests,
                next_generation: 1,
                owners,
                owners_version: 0,
                alarms_version: 0,
                status_version: 0,
                view_version: std::sync::atomic::AtomicU64::new(0),
                owners_by_host,
                desired,
                alarms,
                in_job,
                conflicts: BTreeMap::new(),
                missing,
                quarantined,
            }),
            timing,
            bus: CommandBus::default(),
            open_grants: OpenGrants::default(),
        })
    }

    /// The same registry writing through `repos` from now on, its start
    /// (and so its start-up grace) counted from now: for a registry loaded
    /// ahead through a read-only store ([`crate::store::etcd::Replica::reader`])
    /// whose rows are known unchanged since. Only before it is shared.
    pub fn rebind(mut self, repos: Repos) -> Self {
        self.started_ms = self.clock.now_ms();
        self.repos = repos.clone();
        self.inner.get_mut().unwrap_or_else(|p| p.into_inner()).repos = repos;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Now, by the registry's clock (ms since the epoch).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The registry's clock, for tasks that outlive a borrow of it.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Timing settings.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Number of known hosts.
    pub fn host_count(&self) -> usize {
        self.lock().hosts.len()
    }

    /// The repositories, for the application floor (engine, operations,
    /// reconciler, RPC): async code awaits them, nothing holds the backend.
    pub fn repos(&self) -> &Repos {
        &self.repos
    }

    fn raise_locked(inner: &mut Inner, host: &str, kind: &str, detail: &str) -> RepoResult<()> {
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        let raised = inner.db(move |r| {
            let new = r.alarms().raise(&h, &k, &d)?;
            if new {
                r.audit().append(&AuditRow::by_controller(&format!("alarm.{k}"), &h, "", d))?;
            }
            Ok(new)
        })?;
        if raised {
            tracing::error!(host, kind, "ALARM: {detail}");
            inner.alarms.push((host.into(), kind.into(), detail.into()));
            inner.alarms_version = inner.alarms_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Raises an alarm (logged at ERROR, stored, audited) unless already active.
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::raise_alarm`].
    pub fn raise_alarm_blocking(&self, host: &str, kind: &str, detail: &str) -> RepoResult<()> {
        Self::raise_locked(&mut self.lock(), host, kind, detail)
    }

    /// Re-reads active alarms from the store.
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::reload_alarms`].
    pub fn reload_alarms_blocking(&self) -> RepoResult<()> {
        let mut inner = self.lock();
        let a = inner.db(|r| r.alarms().list(false))?.into_iter().map(|a| (a.host, a.kind, a.detail)).collect();
        inner.alarms = a;
        inner.alarms_version = inner.alarms_version.wrapping_add(1);
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Active alarms.
    pub fn active_alarms(&self) -> Vec<(String, String, String)> {
        self.lock().alarms.clone()
    }

    /// Re-reads ownership records (after a move step changed them).
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::refresh_owners`].
    pub fn refresh_owners_blocking(&self) -> RepoResult<()> {
        let mut inner = self.lock();
        let owners: BTreeMap<String, OwnerRow> =
            inner.db(|r| r.ownership().owners())?.into_iter().map(|o| (o.uuid.clone(), o)).collect();
        inner.owners_by_host = by_host(owners.values().map(|o| (o.host.as_str(), o.uuid.as_str())));
        inner.owners = owners;
        inner.owners_version = inner.owners_version.wrapping_add(1);
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for e in inner.hosts.values_mut() {
            e.dirty = true;
        }
        Ok(())
    }

    /// Whether what `host` reports now is known: its agent is connected and
    /// sent a full inventory in this session.
    fn fresh(inner: &Inner, host: &str) -> bool {
        let now = inner.clock.now_ms();
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
    fn owner_view(inner: &Inner, uuid: &str, host: &str) -> Option<OwnerView> {
        Self::owner_view_as(inner, uuid, host, None)
    }

    /// [`Registry::owner_view`] with whether `host`'s copy holds its disks
    /// given (`None`: as last reported).
    fn owner_view_as(inner: &Inner, uuid: &str, host: &str, holds_here: Option<bool>) -> Option<OwnerView> {
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

    /// Sets a host's status (checks are the caller's).
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::set_status`].
    pub fn set_status_blocking(
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
        let old = e.row.status;
        let a = AuditRow {
            actor: actor.into(),
            action: "host.status".into(),
            host: host_id.into(),
            detail: format!(
                "{old} -> {status}{}",
                if reason.is_empty() { String::new() } else { format!(": {reason}") }
            ),
            ..Default::default()
        };
        let (h, why) = (host_id.to_string(), reason.to_string());
        inner.db(move |r| r.hosts().set_status(&h, status, &why, Some(&a)))?;
        let e = inner.hosts.get_mut(host_id).expect("checked");
        e.row.status = status;
        e.row.status_reason = reason.into();
        e.dirty = true;
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        inner.status_version = inner.status_version.wrapping_add(1);
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Records the boot id a host has as it is fenced.
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::mark_fenced`].
    pub fn mark_fenced_blocking(&self, host_id: &str) -> RepoResult<()> {
        let mut inner = self.lock();
        let boot = inner.hosts.get(host_id).map(|e| e.row.info.boot_id.clone()).unwrap_or_default();
        let (h, b) = (host_id.to_string(), boot.clone());
        inner.db(move |r| r.hosts().set_fenced_boot_id(&h, &b))?;
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
        mut decide: impl FnMut(&crate::domain::view::HostSnapshot) -> T,
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
            let snaps: Vec<crate::domain::view::HostSnapshot> = {
                let inner = self.lock();
                chunk.iter().filter_map(|id| inner.hosts.get(id).map(|e| Self::snapshot(&inner, id, e))).collect()
            };
            out.extend(snaps.iter().map(&mut decide));
        }
        tracing::debug!(
            hosts = wanted.len(),
            full,
            took_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "reconcile pass"
        );
        out
    }

    fn snapshot(inner: &Inner, id: &String, e: &HostEntry) -> crate::domain::view::HostSnapshot {
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
        let owned_here: Vec<&OwnerRow> = inner
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
        crate::domain::view::HostSnapshot {
            host: id.clone(),
            status,
            inventory_seen: e.inventory_seen,
            pending_boot_start: e.pending_boot_start,
            leases_sent: e.leases_sent.clone(),
            uninventoried_since_ms: e.uninventoried_since_ms,
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

    fn clear_by_cause_locked(inner: &mut Inner, host: &str, kind: &str, detail: &str, why: &str) -> RepoResult<()> {
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        let a = AuditRow::by_controller("alarm.cleared", host, "", format!("{kind} alarm cleared: {why} ({detail})"));
        inner.db(move |r| {
            if r.alarms().clear_one(&h, &k, &d)? > 0 {
                r.audit().append(&a)?;
            }
            Ok(())
        })?;
        inner.alarms.retain(|a| !(a.0 == host && a.1 == kind && a.2 == detail));
        inner.alarms_version = inner.alarms_version.wrapping_add(1);
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Clears one alarm because its cause is gone (audited with `why`).
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::clear_alarm_by_cause`].
    pub fn clear_alarm_by_cause_blocking(&self, host: &str, kind: &str, detail: &str, why: &str) -> RepoResult<()> {
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
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        crate::domain::reconcile::decide(&snap, 0, 1)
            .into_iter()
            .find_map(|a| match a {
                crate::domain::reconcile::Action::GrantLeases { leases, .. } => Some(leases),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Which of `uuids` another host than `source` reports holding their
    /// disks, among the hosts that talk to us now: UUID → those hosts.
    pub fn held_elsewhere(&self, source: &str, uuids: &[String]) -> BTreeMap<String, Vec<String>> {
        let mut held = self.holders(uuids);
        let now = self.now_ms();
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

    /// Records that leases were sent: the set of a decision issued at
    /// `issued_ms`. A decision issued before the one recorded does not
    /// replace it (the agent keeps the newer one: see `agent/src/lease.rs`).
    pub fn leases_sent(&self, host: &str, at: i64, set: Vec<(String, u64)>, issued_ms: i64) {
        if let Some(e) = self.lock().hosts.get_mut(host)
            && issued_ms >= e.leases_issued_ms
        {
            e.leases_sent = Some((at, set));
            e.leases_issued_ms = issued_ms;
        }
    }

    /// From now on each session that opens is granted its leases at once
    /// (decided under the registry lock as it opens, exactly as a
    /// reconciler pass would decide them then; sent by whoever calls
    /// [`Registry::take_open_grants`]), instead of at the next pass: with
    /// 10,000 sessions opening after a failover, a pass waited seconds for
    /// the lock the openings and their inventories held.
    pub fn grant_at_open(&self, lease_ttl_ms: i64) {
        self.open_grants.ttl_ms.store(lease_ttl_ms.max(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for, then takes, the grants decided as sessions opened.
    pub async fn take_open_grants(&self) -> Vec<crate::domain::reconcile::Action> {
        loop {
            let notified = self.open_grants.ready.notified();
            let taken = std::mem::take(&mut *self.open_grants.queue.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return taken;
            }
            notified.await;
        }
    }

    /// Under the lock, as `host`'s session opens: its lease grant, if one
    /// is due, marked sent and queued for [`Registry::take_open_grants`].
    /// Nothing while a restored store waits for the hosts' reports or while
    /// two agents claim the host (as the reconciler).
    fn decide_grant_at_open(&self, inner: &mut Inner, host: &str, now_ms: i64) {
        let ttl = self.open_grants.ttl_ms.load(std::sync::atomic::Ordering::Relaxed);
        if ttl <= 0 || Self::suspect(inner, host) || inner.alarms.iter().any(|a| a.1 == "store-restored") {
            return;
        }
        let Some(e) = inner.hosts.get(host) else { return };
        let snap = Self::snapshot(inner, &host.to_string(), e);
        let grant = crate::domain::reconcile::decide(&snap, now_ms, ttl)
            .into_iter()
            .find(|a| matches!(a, crate::domain::reconcile::Action::GrantLeases { .. }));
        let Some(grant) = grant else { return };
        let mut queue = self.open_grants.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= OPEN_GRANTS_MAX {
            return;
        }
        if let (crate::domain::reconcile::Action::GrantLeases { leases, issued_ms, .. }, Some(e)) =
            (&grant, inner.hosts.get_mut(host))
        {
            // Marked first, so a pass does not decide the same again meanwhile.
            e.leases_sent = Some((now_ms, crate::domain::reconcile::lease_set(leases)));
            e.leases_issued_ms = *issued_ms;
        }
        queue.push(grant);
        drop(queue);
        self.open_grants.ready.notify_one();
    }

    /// The boot start was done (or is no longer wanted).
    pub fn boot_start_done(&self, host: &str) {
        if let Some(e) = self.lock().hosts.get_mut(host) {
            e.pending_boot_start = false;
        }
    }

    /// Logs liveness transitions; returns hosts whose liveness changed.
    pub fn check_liveness(&self) -> Vec<(String, Liveness)> {
        let now = self.now_ms();
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
        if !changed.is_empty() {
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        changed
    }

    /// A number that changes whenever something a dashboard page shows may
    /// have changed (it only moves forward, wrapping).
    pub fn view_version(&self) -> u64 {
        self.lock().view_version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Registry::checkpoint`], blocking on the store thread.
    pub fn checkpoint_blocking(&self) {
        match self.repos.call_blocking(|r| r.maintenance().checkpoint()) {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("WAL checkpoint incomplete: a reader still needs part of it; tried again in 30 s")
            }
            Err(e) => warn!("WAL checkpoint failed: {e}; tried again in 30 s"),
        }
    }

    /// Persists last-heard times, a chunk of hosts per lock hold.
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::flush`].
    pub fn flush_blocking(&self) -> RepoResult<()> {
        let seen: Vec<(String, i64)> =
            self.lock().hosts.iter().filter_map(|(id, e)| e.last_heard_ms().map(|t| (id.clone(), t))).collect();
        let t0 = std::time::Instant::now();
        for chunk in seen.chunks(LOCK_CHUNK) {
            let chunk = chunk.to_vec();
            self.repos.call_blocking(move |r| r.hosts().touch(&chunk))?;
        }
        tracing::debug!(
            hosts = seen.len(),
            took_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "last-seen times persisted"
        );
        Ok(())
    }
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
            warn!(late_ms = u64::try_from(late.as_millis()).unwrap_or(u64::MAX), "the controller's runtime stalled");
        }
        reg.check_liveness();
        last = tokio::time::Instant::now();
        n = n.wrapping_add(1);
        if n.checked_rem(120) == Some(0) {
            if let Err(e) = reg.flush().await {
                warn!("persisting last-seen times failed: {e}");
            }
            reg.checkpoint().await;
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
    fn quarantine_bad_rows(repos: &Repos, bad: Vec<BadRow>) -> RepoResult<()> {
        for b in bad {
            let host_reason = format!("its database row could not be read ({}); it is in quarantine", b.reason);
            let row = b.clone();
            let id = repos.call_blocking(move |r| r.quarantine().quarantine(&row, &host_reason))?;
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
            let host = alarm_host.to_string();
            repos.call_blocking(move |r| {
                if r.alarms().raise(&host, "row-quarantined", &detail)? {
                    r.audit().append(&AuditRow::by_controller("alarm.row-quarantined", &host, "", detail))?;
                }
                Ok(())
            })?;
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
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::raise_or_refresh_alarm`].
    pub fn raise_or_refresh_alarm_blocking(&self, host: &str, kind: &str, detail: &str) -> RepoResult<()> {
        let mut inner = self.lock();
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        if inner.db(move |r| r.alarms().refresh(&h, &k, &d))? {
            if let Some(a) = inner.alarms.iter_mut().find(|a| a.0 == host && a.1 == kind) {
                a.2 = detail.to_string();
            }
            inner.alarms_version = inner.alarms_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        Self::raise_locked(&mut inner, host, kind, detail)
    }
}

#[cfg(test)]
mod tests {
    use lifeboat_common::now_unix_ms;
    use std::sync::atomic::Ordering;

    use super::*;

    fn g(uuid: &str, name: &str) -> Guest {
        Guest { uuid: uuid.into(), name: name.into(), ..Default::default() }
    }

    #[test]
    fn an_inventory_with_an_invalid_guest_is_refused_whole() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let rows = reg.repos().call_blocking(move |r| r.guests().all()).unwrap();
        let updated = |u: &str| rows.iter().find(|r| r.guest.uuid == u).unwrap().updated_ms;
        assert_eq!(updated("u1"), t1, "an unchanged guest is not written again");
        assert!(updated("u2") > t1 && updated("u3") > t1);
        assert_eq!(rows.iter().find(|r| r.guest.uuid == "u2").unwrap().guest.state, 6);
        reg.apply_inventory("h", sid, inv(vec![with_def("u3", "vm3", 1)])).unwrap();
        let rows = reg.repos().call_blocking(move |r| r.guests().all()).unwrap();
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
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let on = |a: bool| Guest { autostart: a, ..g("u1", "vm1") };
        let logged = || {
            reg.repos()
                .call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default()))
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
        reg.leases_sent("h", 1, vec![("u1".into(), 0)], 1);
        reg.apply_guest("h", sid, on(true)).unwrap();
        assert_eq!(logged(), 1);
        // Still on (another change of the same guest): not logged again.
        reg.apply_guest("h", sid, Guest { state: 1, ..on(true) }).unwrap();
        assert_eq!(logged(), 1);
        let row = reg
            .repos()
            .call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default()))
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!((row.host.as_str(), row.vm.as_str()), ("h", "vm1"));
        assert!(row.detail.contains("outside Lifeboat"), "{}", row.detail);
    }

    #[test]
    fn pages_of_guests_cover_every_guest_once_in_order() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let log = reg.repos().call_blocking(move |r| r.audit().read(&crate::ports::AuditFilter::default())).unwrap();
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
    fn after_a_restart_a_host_silent_for_long_is_neither_unreachable_nor_silent_for_the_planner_until_the_detection_time()
     {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        {
            let reg =
                Registry::load(crate::store::sqlite::SqliteRepos::start(&db).unwrap(), Timing::default()).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            let sid = reg.open_session("h", "boot", tx).unwrap();
            // Last heard an hour before this controller stops.
            reg.heard_cell("h", sid).unwrap().store(now_unix_ms() - 3_600_000, Ordering::Relaxed);
            reg.close_session("h", sid);
        }
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&db).unwrap(), Timing::default()).unwrap();
        let v = reg.host_view("h").unwrap();
        assert_eq!(v.liveness, Liveness::Reachable, "the startup grace");
        assert_eq!(v.silent_ms, None, "a forced migration's 'source silent' cannot pass now");
        assert!(reg.is_reachable("h"));
        assert_eq!(reg.list_hosts()[0].liveness, "REACHABLE");
    }

    #[test]
    fn the_reconciler_holds_through_the_startup_grace_and_a_restore_until_every_host_reported() {
        let store = crate::store::Store::open_in_memory().unwrap();
        store.raise_alarm("controller", "store-restored", "restored from b.db").unwrap();
        let t = Timing { heartbeat_interval_ms: 100, unreachable_after_ms: 300 };
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start_on(store).unwrap(), t).unwrap();
        let now = now_unix_ms();
        assert!(reg.hold(now).unwrap().contains("startup grace"));
        let (tx, _rx) = mpsc::channel(1);
        let sa = reg.open_session("a", "boot", tx.clone()).unwrap();
        let _sb = reg.open_session("b", "boot", tx).unwrap();
        reg.apply_inventory("a", sa, Inventory::default()).unwrap();
        let later = now + 1000;
        let why = reg.hold(later).unwrap();
        assert!(why.contains("restored") && why.contains('b') && !why.contains("a,"), "{why}");
        reg.set_status_blocking("b", HostStatus::Offline, "gone", "test").unwrap();
        assert_eq!(reg.hold(later), None, "every host not OFFLINE reported");
        assert!(reg.active_alarms().is_empty(), "the alarm is cleared by its cause");
    }

    #[tokio::test]
    async fn a_host_two_agents_claim_is_sent_nothing_and_its_reports_judge_nothing() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
            (snap.host.clone(), crate::domain::reconcile::decide(snap, 1, 30_000))
        });
        assert!(decided.iter().all(|(h, _)| h != "a"), "nothing is decided for a suspect host");
        assert!(
            !decided
                .iter()
                .flat_map(|(_, a)| a)
                .any(|a| matches!(a, crate::domain::reconcile::Action::StopStale { .. })),
            "no stop anywhere from what a suspect host reports: {decided:?}"
        );
        let e = reg.call("a", Kind::CheckPaths(Default::default()), Duration::from_millis(100)).await.unwrap_err();
        assert!(e.to_string().contains("duplicate-agent"), "{e}");
    }

    #[test]
    fn one_host_holds_the_lease_of_a_guest_never_moved_and_an_unfinished_move_leases_nobody() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        let row = crate::ports::OwnerRow {
            uuid: "u1".into(),
            host: "a".into(),
            generation: 1,
            from_host: "b".into(),
            job: "j".into(),
            complete: false,
        };
        reg.repos()
            .call_blocking(move |r| {
                r.ownership().set_owner(&row, &AuditRow::by_controller("test", "a", "vm1", String::new()))
            })
            .unwrap();
        reg.refresh_owners_blocking().unwrap();
        assert!(!leased("a") && !leased("b"));
        assert_eq!(Registry::owner_view(&reg.lock(), "u1", "b"), Some(OwnerView::Unsure));
        // While its job runs, the target holds it.
        reg.set_in_job("j", &[("u1".into(), "b".into(), "a".into())]);
        assert!(leased("a") && !leased("b"));
    }

    #[test]
    fn a_changed_memory_total_reaches_the_planners_view_and_the_store() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        let info = |mib: u64| HostInfo { host_id: "h".into(), memory_total_kib: mib * 1024, ..Default::default() };
        reg.apply_inventory("h", sid, Inventory { host: Some(info(4096)), guests: vec![], more: false }).unwrap();
        assert_eq!(reg.host_view("h").unwrap().memory_total_kib, 4096 * 1024);
        // The agent re-read its memory (hot-added) and sent its host facts.
        reg.apply_host("h", sid, info(8192)).unwrap();
        assert_eq!(reg.host_view("h").unwrap().memory_total_kib, 8192 * 1024, "plans use the new total");
        assert_eq!(reg.host_views_for(&[])[0].memory_total_kib, 8192 * 1024);
        assert_eq!(
            reg.repos().call_blocking(move |r| r.hosts().get("h")).unwrap().unwrap().info.memory_total_kib,
            8192 * 1024,
            "and it is stored"
        );
    }

    #[test]
    fn guests_reporting_u64_max_memory_saturate_the_running_figure_instead_of_panicking_or_wrapping() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
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
        assert_eq!(v.memory_total_kib.saturating_sub(v.running_memory_kib), 0, "no memory left for the planner");
    }

    #[test]
    fn bad_rows_are_quarantined_with_an_alarm_the_rest_loads_and_their_guests_get_no_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        {
            let reg =
                Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
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
            reg.flush_blocking().unwrap();
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
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
        let q = reg.repos().call_blocking(move |r| r.quarantine().list()).unwrap();
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
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
        assert_eq!(reg.repos().call_blocking(move |r| r.quarantine().list()).unwrap().len(), 5);
        assert!(["u1", "u2", "u3", "u4"].iter().all(|u| reg.is_quarantined(u)));
    }

    #[test]
    fn a_host_status_that_does_not_read_is_quarantined_and_the_host_comes_back_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lifeboat.db");
        {
            let reg =
                Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
            let (tx, _rx) = mpsc::channel(1);
            let _s = reg.open_session("b", "boot", tx).unwrap();
            assert_eq!(reg.status_of("b"), Some(HostStatus::Available));
            reg.flush_blocking().unwrap();
        }
        for bad in ["'available'", "'DEAD'", "NULL", "7"] {
            let c = rusqlite::Connection::open(&path).unwrap();
            // NOT NULL: a NULL cannot be written, the others can.
            if c.execute(&format!("UPDATE hosts SET status = {bad} WHERE host_id = 'b'"), []).is_err() {
                continue;
            }
            drop(c);
            let reg =
                Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
            assert_eq!(reg.status_of("b"), Some(HostStatus::Maintenance), "{bad}: never AVAILABLE");
            let q = reg.repos().call_blocking(move |r| r.quarantine().list()).unwrap();
            let last = q.last().unwrap();
            assert_eq!((last.table.as_str(), last.key.as_str()), ("hosts", "b"), "{bad}");
            assert!(last.reason.contains("status"), "{bad}: {}", last.reason);
            let alarms: Vec<_> = reg.active_alarms().into_iter().filter(|a| a.1 == "row-quarantined").collect();
            assert!(alarms.iter().any(|a| a.0 == "b" && a.2.contains("table hosts (key b)")), "{bad}: {alarms:?}");
        }
    }

    #[test]
    fn a_reconnected_host_is_leased_from_the_stored_view_until_three_lease_lives_pass_without_an_inventory() {
        use crate::domain::reconcile::{Action, decide};
        let clock = crate::ports::ManualClock::new(1_000_000);
        let repos = crate::store::sqlite::SqliteRepos::start_in_memory().unwrap();
        let reg = Registry::load_with_clock(repos, Timing::default(), Arc::new(clock.clone())).unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let running = Guest { state: GuestState::Running as i32, ..g("u1", "vm1") };
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        reg.apply_inventory("h", sid, Inventory { host: None, guests: vec![running.clone()], more: false }).unwrap();
        let ttl = 30_000;
        let grants = || {
            let now = reg.now_ms();
            reg.reconcile_each(now, ttl, true, |snap| decide(snap, now, ttl))
                .into_iter()
                .flatten()
                .filter_map(|a| match a {
                    Action::GrantLeases { leases, early, .. } => Some((leases, early)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let leased = vec![("u1".to_string(), "vm1".to_string(), 0u64)];
        assert_eq!(grants(), [(leased.clone(), false)], "after the inventory");
        // The agent reconnects: granted at once from the stored view.
        reg.close_session("h", sid);
        clock.advance(1_000);
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        assert_eq!(grants(), [(leased.clone(), true)], "before the new session's inventory");
        // Reconnecting again and again does not start the count again.
        clock.advance(3 * ttl - 1);
        reg.close_session("h", sid);
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        assert_eq!(grants(), [(leased.clone(), true)]);
        clock.advance(1);
        reg.close_session("h", sid);
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        assert_eq!(grants(), [], "three lease lives without an inventory: the leases lapse");
        // An inventory applied: leased again, and the count starts over.
        reg.apply_inventory("h", sid, Inventory { host: None, guests: vec![running], more: false }).unwrap();
        assert_eq!(grants(), [(leased.clone(), false)]);
        reg.close_session("h", sid);
        let _sid = reg.open_session("h", "boot", tx).unwrap();
        assert_eq!(grants(), [(leased, true)]);
    }

    #[tokio::test]
    async fn a_session_that_opens_is_granted_at_once_a_pass_then_sends_nothing_more_and_an_older_decision_changes_no_record()
     {
        use crate::domain::reconcile::{Action, decide};
        let clock = crate::ports::ManualClock::new(1_000_000);
        let repos = crate::store::sqlite::SqliteRepos::start_in_memory().unwrap();
        let reg = Registry::load_with_clock(repos, Timing::default(), Arc::new(clock.clone())).unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let running = Guest { state: GuestState::Running as i32, ..g("u1", "vm1") };
        let ttl = 30_000;
        // Not enabled (no reconciler): a session opens with no grant queued.
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        reg.apply_inventory("h", sid, Inventory { host: None, guests: vec![running], more: false }).unwrap();
        assert!(reg.open_grants.queue.lock().unwrap().is_empty());
        reg.grant_at_open(ttl);
        reg.close_session("h", sid);
        clock.advance(1_000);
        let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
        let taken = tokio::time::timeout(Duration::from_secs(5), reg.take_open_grants()).await.unwrap();
        let leased = vec![("u1".to_string(), "vm1".to_string(), 0u64)];
        match taken.as_slice() {
            [Action::GrantLeases { host, leases, issued_ms, early: true }] => {
                assert_eq!((host.as_str(), leases, *issued_ms), ("h", &leased, reg.now_ms()));
            }
            other => panic!("one early grant for h, decided as it opened: {other:?}"),
        }
        // Marked sent: the pass that follows decides no second grant.
        let now = reg.now_ms();
        let again: Vec<Action> =
            reg.reconcile_each(now, ttl, true, |snap| decide(snap, now, ttl)).into_iter().flatten().collect();
        assert!(!again.iter().any(|a| matches!(a, Action::GrantLeases { .. })), "{again:?}");
        // A pass's decision issued before the open's does not replace its record.
        reg.leases_sent("h", now + 5, vec![], now - 1);
        assert_eq!(
            reg.lock().hosts["h"].leases_sent.as_ref().map(|(_, s)| s.clone()),
            Some(vec![("u1".to_string(), 0)])
        );
        reg.leases_sent("h", now + 5, vec![], now + 1);
        assert_eq!(reg.lock().hosts["h"].leases_sent.as_ref().map(|(_, s)| s.clone()), Some(vec![]));
        // While two agents claim the host, or a restored store waits for the
        // hosts' reports, nothing is granted as a session opens.
        let (dtx, _drx) = mpsc::channel(16);
        let sd = reg.open_session("d", "boot", dtx.clone()).unwrap();
        let run2 = Guest { state: GuestState::Running as i32, ..g("u2", "vm2") };
        reg.apply_inventory("d", sd, Inventory { host: None, guests: vec![run2], more: false }).unwrap();
        reg.close_session("d", sd);
        reg.open_grants.queue.lock().unwrap().clear();
        Registry::raise_locked(&mut reg.lock(), "d", "duplicate-agent", "two agents").unwrap();
        let _sd = reg.open_session("d", "boot", dtx).unwrap();
        assert!(reg.open_grants.queue.lock().unwrap().is_empty(), "no grant to a host two agents claim");
        reg.close_session("h", sid);
        Registry::raise_locked(&mut reg.lock(), "h", "store-restored", "restored").unwrap();
        let _sid = reg.open_session("h", "boot", tx).unwrap();
        assert!(reg.open_grants.queue.lock().unwrap().is_empty(), "no grant from a restored store");
    }

    #[test]
    fn liveness_and_the_startup_grace_follow_the_injected_clock_without_sleeping() {
        let clock = crate::ports::ManualClock::new(1_000_000);
        let t = Timing { heartbeat_interval_ms: 1000, unreachable_after_ms: 3000 };
        let repos = crate::store::sqlite::SqliteRepos::start_in_memory().unwrap();
        let reg = Registry::load_with_clock(repos, t, Arc::new(clock.clone())).unwrap();
        assert_eq!(reg.now_ms(), 1_000_000);
        let (tx, _rx) = mpsc::channel(1);
        let _sid = reg.open_session("h", "boot", tx).unwrap();
        assert!(reg.is_reachable("h"));
        assert!(reg.in_startup_grace(reg.now_ms()));
        let _ = reg.check_liveness();
        clock.advance(3000);
        assert!(reg.is_reachable("h"), "silent for exactly the detection time: still reachable");
        clock.advance(1);
        assert!(!reg.is_reachable("h"), "one ms past the detection time: unreachable, with no sleep");
        assert_eq!(reg.check_liveness(), vec![("h".to_string(), Liveness::Unreachable)]);
        clock.advance(i64::from(u32::MAX));
        assert!(!reg.in_startup_grace(reg.now_ms()));
    }

    #[tokio::test]
    async fn an_owner_refresh_read_before_a_later_change_does_not_overwrite_it() {
        use std::future::Future;
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let row = |host: &str, generation: u64| OwnerRow {
            uuid: "u1".into(),
            host: host.into(),
            generation,
            from_host: String::new(),
            job: "j".into(),
            complete: true,
        };
        let (r1, a) = (row("a", 1), AuditRow::default());
        reg.repos().call_blocking(move |r| r.ownership().set_owner(&r1, &a)).unwrap();
        // Hold the store thread so the first refresh surely waits for its answer.
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let held = reg.repos().call(move |_| {
            let _ = gate.recv();
            Ok(())
        });
        // The first refresh asks for its snapshot (generation 1) and waits.
        let mut first = Box::pin(reg.refresh_owners());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(first.as_mut().poll(&mut cx).is_pending());
        open.send(()).unwrap();
        held.await.unwrap();
        // A later write (generation 2) reaches memory first.
        let (r2, a) = (row("b", 2), AuditRow::default());
        reg.repos().call_blocking(move |r| r.ownership().set_owner(&r2, &a)).unwrap();
        reg.refresh_owners_blocking().unwrap();
        assert_eq!(reg.owner_row("u1").map(|o| o.generation), Some(2));
        // The older snapshot arrives: it must not hand the guest back to a.
        first.await.unwrap();
        assert_eq!(reg.owner_row("u1").map(|o| (o.host, o.generation)), Some(("b".to_string(), 2)));
    }

    /// Holds the store thread until the returned sender sends (or drops), so a
    /// test can order what the store runs against what memory shows.
    fn hold_store(reg: &Registry) -> (std::sync::mpsc::Sender<()>, impl std::future::Future<Output = RepoResult<()>>) {
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let held = reg.repos().call(move |_| {
            let _ = gate.recv();
            Ok(())
        });
        (open, held)
    }

    #[tokio::test]
    async fn an_alarm_reload_read_before_a_later_alarm_does_not_drop_it() {
        use std::future::Future;
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (open, held) = hold_store(&reg);
        let mut reload = Box::pin(reg.reload_alarms());
        let waker = futures::task::noop_waker();
        assert!(reload.as_mut().poll(&mut std::task::Context::from_waker(&waker)).is_pending());
        open.send(()).unwrap();
        held.await.unwrap();
        // Raised after the reload's list was read, before it is applied.
        reg.raise_alarm_blocking("y", "duplicate-agent", "two agents claim y").unwrap();
        reload.await.unwrap();
        assert!(
            reg.active_alarms().iter().any(|a| a.0 == "y" && a.1 == "duplicate-agent"),
            "memory keeps the alarm the store holds: {:?}",
            reg.active_alarms()
        );
    }

    #[tokio::test]
    async fn a_status_write_overtaken_in_memory_shows_what_the_store_holds() {
        use std::future::Future;
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let _sid = reg.open_session("h", "boot", tx).unwrap();
        let (open, held) = hold_store(&reg);
        let mut operator = Box::pin(reg.set_status("h", HostStatus::NotAccepting, "testing", "alice"));
        let waker = futures::task::noop_waker();
        assert!(operator.as_mut().poll(&mut std::task::Context::from_waker(&waker)).is_pending());
        open.send(()).unwrap();
        held.await.unwrap();
        // Stored after the operator's write, and in memory before it wakes.
        reg.set_status_blocking("h", HostStatus::Maintenance, "returned", "controller").unwrap();
        operator.await.unwrap();
        assert_eq!(reg.status_of("h"), Some(HostStatus::Maintenance), "memory follows the store's order");
        let stored = reg.repos().call_blocking(|r| r.hosts().get("h")).unwrap().unwrap();
        assert_eq!(stored.status, HostStatus::Maintenance);
    }
}
