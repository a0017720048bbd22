//! The forced-migration planner. Pure: every input (hosts, guests, power
//! reading, path visibility seen by each candidate target) is gathered by
//! the caller; this module only decides and explains.

use std::collections::{BTreeMap, BTreeSet};

use lifeboat_proto::v1::{Check, Disk, Guest, GuestPlan, GuestState, MigrateRequest, MigrationPlan, PathCheck};
use sha2::{Digest, Sha256};

use crate::domain::PowerEvidence;
use crate::domain::host::{HostStatus, Liveness};
use crate::fence::PowerState;

pub use crate::domain::view::HostView;

/// Who owns a guest, from the owners table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// Owning host.
    pub host: String,
    /// Generation of the ownership.
    pub generation: u64,
    /// Host it was moved from.
    pub from_host: String,
    /// Whether that move completed.
    pub complete: bool,
    /// Job that moved it.
    pub job: String,
}

/// The source's power as far as the controller can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerReading {
    /// No BMC is configured for the source.
    NoBmc,
    /// The BMC answered (or could not: `Unknown`).
    Bmc(PowerState),
}

/// Everything the planner needs.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The operator's request.
    pub req: MigrateRequest,
    /// Every host, the source included.
    pub hosts: Vec<HostView>,
    /// The source's guests as last reported.
    pub source_guests: Vec<Guest>,
    /// Ownership records by UUID.
    pub owners: BTreeMap<String, Ownership>,
    /// Power reading of the source.
    pub power: PowerReading,
    /// An operation already running on the source (job id).
    pub active_job: Option<String>,
    /// The silence a forced migration needs, ms.
    pub grace_ms: u64,
    /// What each candidate host's agent said about each path: host → path.
    pub visibility: BTreeMap<String, BTreeMap<String, PathSeen>>,
    /// Memory kept free on every host for the hypervisor itself, KiB.
    pub memory_reserve_kib: u64,
    /// Kinds of the source's active alarms.
    pub source_alarms: Vec<String>,
    /// Source guests that another reachable host reports holding their
    /// disks: UUID → those hosts. Such a guest runs elsewhere already.
    pub held_elsewhere: BTreeMap<String, Vec<String>>,
    /// Source guests another operation acts on now (a `vms restore` of it,
    /// say): UUID → that operation's id. Such a guest is left alone.
    pub in_other_job: BTreeMap<String, String>,
    /// Memory held by the moves under way of every unfinished job (from
    /// the store); see [`held_by_reservations`] for which count.
    pub reservations: Vec<Reservation>,
    /// The source's guests whose desired state is running (they are
    /// started on their target even if reported shut off now: a host that
    /// rebooted mid-job left them off).
    pub desired_running: BTreeSet<String>,
}

/// Memory a move under way holds on its target until the guest runs there
/// or the move (or its job) ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The job the move belongs to.
    pub job: String,
    /// Guest UUID.
    pub uuid: String,
    /// Guest name.
    pub name: String,
    /// Where it goes.
    pub target: String,
    /// Memory held there, KiB.
    pub memory_kib: u64,
}

/// The reservations that count against each target: all of them, except a
/// move whose guest its target already reports running (its memory is in
/// the target's running figure then, and must not be counted twice). A
/// target whose guests are not in `hosts` counts every reservation on it.
pub fn held_by_reservations<'a>(
    reservations: &'a [Reservation],
    hosts: &[HostView],
) -> BTreeMap<String, Vec<&'a Reservation>> {
    let mut out: BTreeMap<String, Vec<&Reservation>> = BTreeMap::new();
    for r in reservations {
        let runs_there = hosts
            .iter()
            .find(|h| h.id == r.target)
            .is_some_and(|h| h.guests.iter().any(|g| g.uuid == r.uuid && is_running(g.state)));
        if !runs_there {
            out.entry(r.target.clone()).or_default().push(r);
        }
    }
    out
}

/// Total KiB of some reservations.
fn reserved_kib(held: &[&Reservation]) -> u64 {
    held.iter().fold(0u64, |a, r| a.saturating_add(r.memory_kib))
}

/// "64 MiB reserved by job mig-1 (vm-1, vm-2); 32 MiB by job mig-2 (vm-3)".
pub fn reserved_note(held: &[&Reservation]) -> String {
    let mut by_job: BTreeMap<&str, (u64, Vec<&str>)> = BTreeMap::new();
    for r in held {
        let e = by_job.entry(r.job.as_str()).or_default();
        e.0 = e.0.saturating_add(r.memory_kib);
        e.1.push(r.name.as_str());
    }
    by_job
        .iter()
        .enumerate()
        .map(|(i, (job, (kib, names)))| {
            format!("{} MiB {}by job {job} ({})", kib / 1024, if i == 0 { "reserved " } else { "" }, names.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The reason a guest that fits on no eligible target for memory alone is
/// not moved. Starts with "no capacity" (what [`finish`] and the job's
/// report look for).
pub const NO_CAPACITY: &str = "no capacity";

/// What a candidate target's agent answered about one disk path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathSeen {
    /// The path exists there.
    pub visible: bool,
    /// Why it is not visible (or why it could not be checked).
    pub error: String,
    /// The storage identity the target gives it (as `Disk.storage`).
    pub storage: String,
    /// The path relative to that storage (as `Disk.storage_path`).
    pub storage_path: String,
}

impl PathSeen {
    /// A path whose check failed as a whole (agent error, timeout).
    pub fn failed(why: impl Into<String>) -> Self {
        PathSeen { error: why.into(), ..Default::default() }
    }
}

impl From<PathCheck> for PathSeen {
    fn from(p: PathCheck) -> Self {
        PathSeen { visible: p.visible, error: p.error, storage: p.storage, storage_path: p.storage_path }
    }
}

/// Storage kinds that several hosts can reach (docs/migrate.md, "Shared
/// storage"); the agent reports everything else as `local:` or
/// `unidentified:`, and a kind not listed here counts as not shared.
pub const SHARED_STORAGE_KINDS: [&str; 17] = [
    "marker",
    "wwn",
    "scsi",
    "mpath",
    "eui",
    "lvm",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "ceph",
    "glusterfs",
    "lustre",
    "beegfs",
    "gpfs",
    "gfs2",
    "ocfs2",
];

/// Whether a storage identity (`<kind>:<id>`) names storage that other
/// hosts can reach. Empty, `local:…`, `unidentified:…`, unknown or
/// malformed values are not shared.
pub fn is_shared_storage(storage: &str) -> bool {
    storage.split_once(':').is_some_and(|(kind, id)| !id.is_empty() && SHARED_STORAGE_KINDS.contains(&kind))
}

/// `storage` with the relative path, for check details.
fn on_storage(storage: &str, rel: &str) -> String {
    if rel.is_empty() { storage.to_string() } else { format!("{storage} ({rel})") }
}

/// Why the source's report of a disk does not let it move, if it does not.
fn source_disk_problem(source: &str, d: &Disk) -> Option<String> {
    if d.storage.is_empty() {
        return Some(format!(
            "{source}'s agent reported no storage identity for {} (an agent older than this check)",
            d.source
        ));
    }
    if is_shared_storage(&d.storage) {
        return None;
    }
    Some(format!("{source} reported {} on {}", d.source, d.storage))
}

/// Whether two disks are the same disk: the same path, or the same shared
/// storage and relative path.
fn same_disk(a: &Disk, b: &Disk) -> bool {
    a.source == b.source
        || (is_shared_storage(&a.storage) && a.storage == b.storage && a.storage_path == b.storage_path)
}

/// Memory a host can still give to guests: physical memory minus the
/// memory of the guests running there and the hypervisor's reserve.
pub fn available_memory_kib(h: &HostView, reserve_kib: u64) -> u64 {
    h.memory_total_kib.saturating_sub(h.running_memory_kib).saturating_sub(reserve_kib)
}

/// Whether a guest in this state holds its memory (running, paused, blocked).
pub fn is_running(state: i32) -> bool {
    matches!(
        GuestState::try_from(state).unwrap_or(GuestState::Unspecified),
        GuestState::Running | GuestState::Paused | GuestState::Blocked
    )
}

/// Memory of the running guests in `guests`, KiB.
pub fn running_memory_kib(guests: &[Guest]) -> u64 {
    // Saturating: agent-reported figures; a wrapped sum would make a full host look empty.
    guests.iter().filter(|g| is_running(g.state)).fold(0u64, |a, g| a.saturating_add(g.memory_kib))
}

/// Fewest hosts whose disk visibility is checked when there are more
/// reachable hosts than that; see [`visibility_hosts`].
pub const VISIBILITY_SAMPLE: usize = 16;

use crate::domain::checks::{CheckId, check, check_on};

/// Disk sources a target must see (local paths; network disks need no check).
pub fn guest_paths(g: &Guest) -> Vec<String> {
    g.disks.iter().map(|d| d.source.clone()).filter(|s| s.starts_with('/')).collect()
}

/// The hosts whose disk visibility the caller must gather. With up to
/// `max(VISIBILITY_SAMPLE, guests + 8)` reachable hosts besides the source:
/// all of them (to tell local storage from a target's blind spot). With
/// more (a large cluster): the eligible targets with the most available
/// memory, as many as that, since placement picks among those first —
/// asking 10,000 agents for every plan would make planning slow without
/// changing where the guests go.
pub fn visibility_hosts(req: &MigrateRequest, hosts: &[HostView], guests: usize, reserve_kib: u64) -> Vec<String> {
    let limit = VISIBILITY_SAMPLE.max(guests.saturating_add(8));
    let reachable: Vec<&HostView> =
        hosts.iter().filter(|h| h.id != req.source && h.liveness == Liveness::Reachable).collect();
    if reachable.len() <= limit {
        return reachable.into_iter().map(|h| h.id.clone()).collect();
    }
    let mut c = candidates(req, hosts);
    c.sort_by(|a, b| {
        available_memory_kib(b, reserve_kib).cmp(&available_memory_kib(a, reserve_kib)).then(a.id.cmp(&b.id))
    });
    c.into_iter().take(limit).map(|h| h.id.clone()).collect()
}

fn candidates<'a>(req: &MigrateRequest, hosts: &'a [HostView]) -> Vec<&'a HostView> {
    hosts
        .iter()
        .filter(|h| h.id != req.source && h.liveness == Liveness::Reachable)
        .filter(|h| if req.target.is_empty() { h.status == HostStatus::Available } else { h.id == req.target })
        .collect()
}

/// Makes the plan.
pub fn plan(input: &PlanInput) -> MigrationPlan {
    let req = &input.req;
    let mut pre = Vec::new();
    let source = input.hosts.iter().find(|h| h.id == req.source);
    let known: Vec<&str> = input.hosts.iter().map(|h| h.id.as_str()).collect();
    let mut out = MigrationPlan { source: req.source.clone(), ..Default::default() };
    set_evidence(&mut out, PowerEvidence::None);

    // The request itself.
    let Some(source) = source else {
        pre.push(check(
            CheckId::SourceHostKnown,
            false,
            format!("unknown host '{}' (known hosts: {})", req.source, known.join(", ")),
            "name a host from `lifeboat hosts list`",
        ));
        out.preconditions = pre;
        out.summary = "refused: unknown source host".into();
        return finish(out, input);
    };
    if !req.target.is_empty() {
        if req.target == req.source {
            pre.push(check(
                CheckId::TargetDiffers,
                false,
                format!("--to {} is the failed host itself", req.target),
                "name another host with --to, or leave --to out",
            ));
        } else {
            match input.hosts.iter().find(|h| h.id == req.target) {
                None => pre.push(check(
                    CheckId::TargetHostKnown,
                    false,
                    format!("unknown target host '{}' (known hosts: {})", req.target, known.join(", ")),
                    "name a host from `lifeboat hosts list`",
                )),
                Some(t) => {
                    let status_ok = matches!(t.status, HostStatus::Available | HostStatus::NotAccepting);
                    pre.push(check(
                        CheckId::TargetAccepts,
                        status_ok,
                        format!("target {} is {}", t.id, t.status),
                        "only an AVAILABLE or (named explicitly) NOT_ACCEPTING host can receive guests; `lifeboat hosts set-status`",
                    ));
                    pre.push(check(
                        CheckId::TargetReachable,
                        t.liveness == Liveness::Reachable,
                        format!("target {} is {}", t.id, t.liveness.as_str()),
                        "bring the target's agent back, or choose another target",
                    ));
                }
            }
        }
    }

    if req.planned_move {
        pre.push(check(
            CheckId::SourceConnected,
            source.silent_ms.is_none(),
            if source.silent_ms.is_none() {
                format!("{} is connected: its agent will stop each guest first", source.id)
            } else {
                format!("{} is not connected", source.id)
            },
            "a planned move needs the source's agent; for a failed host use `lifeboat migrate --force`",
        ));
        pre.push(check(
            CheckId::GuestsNamed,
            !req.vms.is_empty(),
            if req.vms.is_empty() { "no guest named".to_string() } else { format!("{} guest(s) named", req.vms.len()) },
            "name the guests to move with --vm",
        ));
        pre.push(check(
            CheckId::TargetNamed,
            !req.target.is_empty(),
            if req.target.is_empty() { "no target named".to_string() } else { format!("to {}", req.target) },
            "name the target with --to",
        ));
        set_evidence(&mut out, PowerEvidence::StoppedByAgent);
    }
    // The source must be silent: a host still talking to us is alive.
    let silent = match source.silent_ms {
        None => check(
            CheckId::SourceSilent,
            false,
            format!("{} is still talking to the controller (REACHABLE); a host that talks is alive", source.id),
            "a running host is never force-migrated: if it is partitioned but alive, fix the network or stop its guests by hand",
        ),
        Some(ms) if ms < input.grace_ms => check(
            CheckId::SourceSilent,
            false,
            format!(
                "{} has been silent for {:.1} s, less than the required {:.1} s",
                source.id,
                ms as f64 / 1000.0,
                input.grace_ms as f64 / 1000.0
            ),
            "wait until the grace period has passed, then plan again",
        ),
        Some(ms) => check(
            CheckId::SourceSilent,
            true,
            format!(
                "{} silent for {:.1} s (grace {:.1} s)",
                source.id,
                ms as f64 / 1000.0,
                input.grace_ms as f64 / 1000.0
            ),
            "",
        ),
    };
    if !req.planned_move {
        pre.push(silent);
        // Power evidence.
        let (power_check, evidence) = power_check(req, &input.power, &source.id);
        pre.push(power_check);
        set_evidence(&mut out, evidence);
    }

    // Two agents that claim the source's identity: whichever talks, its
    // silence or its words prove nothing about the real host.
    let duplicate = input.source_alarms.iter().any(|k| k == "duplicate-agent");
    pre.push(check(
        CheckId::OneAgentPerHost,
        !duplicate,
        if duplicate {
            format!("a duplicate-agent alarm is active on {}: two agents claimed its identity, so its liveness cannot be trusted", source.id)
        } else {
            format!("no other agent claimed {}'s identity", source.id)
        },
        format!("find and stop the second agent (`lifeboat alarms` names both addresses), then `lifeboat alarms clear --host {} --kind duplicate-agent`", source.id),
    ));
    pre.push(match &input.active_job {
        Some(j) => check(
            CheckId::OneOperationPerHost,
            false,
            format!("job {j} on {} is still running", source.id),
            format!("wait for it (`lifeboat jobs watch {j}`) and plan again"),
        ),
        None => check(CheckId::OneOperationPerHost, true, "no other operation on this host", ""),
    });

    // Which guests.
    let mut guests: Vec<&Guest> = input.source_guests.iter().collect();
    if !req.vms.is_empty() {
        let mut picked = Vec::new();
        for v in &req.vms {
            match input.source_guests.iter().find(|g| &g.name == v || &g.uuid == v) {
                Some(g) => picked.push(g),
                None => pre.push(check(
                    CheckId::GuestKnown,
                    false,
                    format!("host {} has no guest '{v}'", source.id),
                    format!("see `lifeboat vms list --host {}`", source.id),
                )),
            }
        }
        guests = picked;
    }
    guests.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));

    // Per guest: target choice and checks, among the eligible hosts whose
    // disk visibility was gathered.
    let candidates: Vec<&HostView> =
        candidates(req, &input.hosts).into_iter().filter(|h| input.visibility.contains_key(&h.id)).collect();
    let reachable = input.hosts.iter().filter(|h| h.id != source.id && h.liveness == Liveness::Reachable).count();
    let nobody_sees = |paths: &[String]| {
        if input.visibility.len() >= reachable {
            format!("no other host sees {} on the same storage", paths.join(", "))
        } else {
            format!(
                "none of the {} hosts checked (of {reachable} reachable) sees {} on the same storage",
                input.visibility.len(),
                paths.join(", ")
            )
        }
    };
    // What (at most 3 of) the checked hosts reported for a path, for refusals.
    let elsewhere = |p: &str| {
        let mut seen: Vec<String> = input
            .visibility
            .iter()
            .take(3)
            .map(|(h, v)| match v.get(p) {
                Some(s) if s.visible && s.storage.is_empty() => format!("{h}: visible, no identity"),
                Some(s) if s.visible => format!("{h}: {}", on_storage(&s.storage, &s.storage_path)),
                Some(_) => format!("{h}: not visible"),
                None => format!("{h}: not checked"),
            })
            .collect();
        if input.visibility.len() > 3 {
            seen.push(format!("{} more hosts checked", input.visibility.len() - 3));
        }
        if seen.is_empty() { "no other host checked".to_string() } else { seen.join(", ") }
    };
    let mut reserved: BTreeMap<String, u64> = BTreeMap::new();
    let held = held_by_reservations(&input.reservations, &input.hosts);
    let held_on = |t: &str| held.get(t).map(|v| v.as_slice()).unwrap_or(&[]);
    let mut claimed_names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let lock = if source.lock_manager.is_empty() {
        format!("none: {} has no qemu lock_manager; only Lifeboat's power proof prevents a second copy", source.id)
    } else {
        format!("lock manager '{}' on {}", source.lock_manager, source.id)
    };
    for g in guests {
        let mut gp = GuestPlan {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            last_state: lifeboat_proto::state_name(g.state).into(),
            last_autostart: g.autostart,
            managed_save: g.managed_save,
            memory_kib: g.memory_kib,
            disks: g.disks.iter().map(|d| d.source.clone()).filter(|s| !s.is_empty()).collect(),
            priority: g.priority,
            lock_protection: lock.clone(),
            ..Default::default()
        };
        let was_running = is_running(g.state);
        gp.start = !req.no_start && (was_running || input.desired_running.contains(&g.uuid));
        if let Some(job) = input.in_other_job.get(&g.uuid) {
            gp.reason = format!("{job} acts on it now");
            gp.checks.push(check(
                CheckId::InNoOtherOperation,
                false,
                format!(
                    "{} ({}) is being acted on by {job}: two operations on one guest could start it twice",
                    g.name, g.uuid
                ),
                "wait until that operation has ended (`lifeboat jobs list`, `lifeboat log`), then plan again",
            ));
            out.guests.push(gp);
            continue;
        }
        if let Some(o) = input.owners.get(&g.uuid).filter(|o| o.host != source.id) {
            if o.complete || o.from_host != source.id {
                gp.movable = false;
                gp.reason = format!("already moved to {} (job {}, generation {})", o.host, o.job, o.generation);
                gp.checks.push(check(CheckId::OwnedBySource, false, gp.reason.clone(), "nothing to do for this guest"));
                out.guests.push(gp);
                continue;
            }
            // An unfinished earlier move: finish it on the same target.
            gp.movable = true;
            gp.target = o.host.clone();
            gp.reason = format!("finishing the unfinished move of job {} to {}", o.job, o.host);
            let t = input.hosts.iter().find(|h| h.id == o.host);
            let reach = t.is_some_and(|t| t.liveness == Liveness::Reachable);
            gp.checks.push(check(
                CheckId::TargetReachable,
                reach,
                format!("{} must answer to finish the move", o.host),
                "bring that host's agent back",
            ));
            gp.movable = reach;
            gp.cleanup = cleanup_note(&source.id, g);
            out.guests.push(gp);
            continue;
        }
        if let Some(holders) = input.held_elsewhere.get(&g.uuid) {
            gp.reason = format!("already holds its disks on {}", holders.join(", "));
            gp.checks.push(check(
                CheckId::RunsNowhereElse,
                false,
                format!("{} ({}) is reported running (or holding its disks) on {}: a copy started here would be a second one", g.name, g.uuid, holders.join(", ")),
                "nothing to move: it runs there; if that copy is not wanted, stop it there first",
            ));
            out.guests.push(gp);
            continue;
        }
        if !g.error.is_empty() && g.definition_xml.is_empty() {
            gp.checks.push(check(
                CheckId::DefinitionKnown,
                false,
                format!("the agent could not read the definition: {}", g.error),
                "the definition is needed to recreate the guest",
            ));
            gp.reason = "definition unknown".into();
            out.guests.push(gp);
            continue;
        }
        if g.managed_save {
            gp.checks.push(check(
                CheckId::ManagedSave,
                true,
                format!(
                    "a managed-save image exists on {}; it stays there and the guest cold-boots on the target",
                    source.id
                ),
                "",
            ));
        }
        let paths = guest_paths(g);
        let disks: Vec<&Disk> = g.disks.iter().filter(|d| d.source.starts_with('/')).collect();
        // The source's own report says which storage each disk is on; only
        // a disk on shared storage can be found again from another host.
        let mut problems: Vec<String> = disks
            .iter()
            .filter_map(|d| source_disk_problem(&source.id, d).map(|why| format!("{why} ({})", elsewhere(&d.source))))
            .collect();
        // A storage pool volume names no path: which storage backs the pool
        // on each host (a local directory, an LVM group) cannot be compared.
        problems.extend(g.disks.iter().filter(|d| d.source_type == "volume").map(|d| {
            format!(
                "{} is a storage pool volume ({}): the storage behind a pool cannot be identified across hosts",
                d.target, d.source
            )
        }));
        let storage_ok = problems.is_empty();
        if !storage_ok {
            let local = disks.iter().any(|d| d.storage.starts_with("local:"));
            gp.checks.push(check(
                CheckId::DisksOnSharedStorage,
                false,
                problems.join("; "),
                "a guest on local disks cannot move; if the storage is shared, put a .lifeboat-storage-id marker on it \
                 (docs/migrate.md) or use /dev/disk/by-id/wwn-… device paths (a pool volume: the path behind it), and let \
                 the source report again",
            ));
            gp.reason = format!(
                "{}: {}",
                if local { "local storage" } else { "storage not shown to be shared" },
                problems.join("; ")
            );
        }
        // Per path on `host`: Ok(evidence) when it is the source's disk, else why not.
        let same_there = |host: &str, d: &Disk| -> Result<String, String> {
            let p = &d.source;
            match input.visibility.get(host).and_then(|v| v.get(p)) {
                None => Err(format!("{p} (not checked)")),
                Some(s) if !s.visible => {
                    Err(format!("{p} ({})", if s.error.is_empty() { "not visible" } else { &s.error }))
                }
                Some(s) if s.storage == d.storage && s.storage_path == d.storage_path => {
                    Ok(format!("{p} on {}", on_storage(&s.storage, &s.storage_path)))
                }
                Some(s) => Err(format!(
                    "{p} is on {} there but on {} on {}",
                    if s.storage.is_empty() {
                        "no identified storage".to_string()
                    } else {
                        on_storage(&s.storage, &s.storage_path)
                    },
                    on_storage(&d.storage, &d.storage_path),
                    source.id
                )),
            }
        };
        let mut best: Option<(&HostView, u64)> = None;
        // Targets that pass every check but memory: (target, KiB free there).
        let mut short: Vec<(&HostView, u64)> = Vec::new();
        // Each candidate's checks, with the candidate they are about.
        let mut per_target: Vec<(&str, Check)> = Vec::new();
        let sees_all = |host: &str| storage_ok && disks.iter().all(|d| same_there(host, d).is_ok());
        let seen_elsewhere: Vec<&str> = input.visibility.keys().map(|h| h.as_str()).filter(|h| sees_all(h)).collect();
        let seen_by_any = paths.is_empty() || !seen_elsewhere.is_empty();
        for t in candidates.iter().filter(|_| storage_ok) {
            let (seen, missing): (Vec<_>, Vec<_>) = disks.iter().map(|d| same_there(&t.id, d)).partition(|r| r.is_ok());
            let seen: Vec<String> = seen.into_iter().filter_map(Result::ok).collect();
            let missing: Vec<String> = missing.into_iter().filter_map(Result::err).collect();
            let others = reserved_kib(held_on(&t.id));
            let ours = *reserved.get(&t.id).unwrap_or(&0);
            let free = available_memory_kib(t, input.memory_reserve_kib).saturating_sub(others).saturating_sub(ours);
            let conflict = t
                .guests
                .iter()
                .find(|x| x.uuid == g.uuid || x.name == g.name)
                .map(|x| format!("{} already has a guest '{}' ({})", t.id, x.name, x.uuid));
            // Another guest there on one of these disks would write to it too.
            let in_use: Vec<String> = t
                .guests
                .iter()
                .filter(|x| x.uuid != g.uuid)
                .flat_map(|x| {
                    disks.iter().filter_map(move |d| {
                        x.disks
                            .iter()
                            .filter(|xd| xd.source.starts_with('/'))
                            .find(|xd| {
                                same_disk(d, xd) && !(d.shareable && xd.shareable) && !(d.readonly && xd.readonly)
                            })
                            .map(|xd| format!("'{}' ({}) uses {} as {}", x.name, x.uuid, d.source, xd.source))
                    })
                })
                .collect();
            let name_taken = claimed_names.get(&t.id).is_some_and(|n| n.contains(&g.name));
            let disks_ok = missing.is_empty();
            let mem_ok = free >= g.memory_kib;
            let conflict_ok = conflict.is_none() && !name_taken;
            let in_use_ok = in_use.is_empty();
            per_target.push((t.id.as_str(), check_on(
                CheckId::SameDisks,
                &t.id,
                disks_ok,
                if !disks_ok {
                    format!("{} does not see the disks of {}: {}", t.id, source.id, missing.join("; "))
                } else if seen.is_empty() {
                    format!("{}: no local disks to check", t.id)
                } else {
                    format!("{} sees {} like {}", t.id, seen.join(", "), source.id)
                },
                "the target must reach the same shared storage (same identity and path); see docs/migrate.md, \"Shared storage\"",
            )));
            per_target.push((t.id.as_str(), check_on(
                CheckId::Memory,
                &t.id,
                mem_ok,
                memory_detail(g.memory_kib, free, t, input.memory_reserve_kib, held_on(&t.id), ours),
                "free memory on the target or choose another; moves of other jobs hold their memory until their guests run",
            )));
            per_target.push((
                t.id.as_str(),
                check_on(
                    CheckId::NoConflict,
                    &t.id,
                    conflict_ok,
                    conflict.unwrap_or_else(|| {
                        if name_taken {
                            format!("another guest named {} is planned there", g.name)
                        } else {
                            format!("no guest with this UUID or name on {}", t.id)
                        }
                    }),
                    "remove the conflicting definition on the target (`virsh undefine`) if it is stale",
                ),
            ));
            per_target.push((t.id.as_str(), check_on(
                CheckId::DisksFree,
                &t.id,
                in_use_ok,
                if in_use_ok { format!("no other guest on {} uses these disks", t.id) } else { format!("on {}: {}", t.id, in_use.join("; ")) },
                "two guests must not write to one disk: remove the other guest's definition if it is stale, or mark both disks <shareable/>",
            )));
            if disks_ok && mem_ok && conflict_ok && in_use_ok && best.is_none_or(|(_, f)| free > f) {
                best = Some((t, free));
            }
            if disks_ok && !mem_ok && conflict_ok && in_use_ok {
                short.push((t, free));
            }
        }
        match best {
            Some((t, free)) => {
                gp.movable = true;
                gp.target = t.id.clone();
                gp.reason = if req.target.is_empty() {
                    format!("most available memory among eligible hosts ({} MiB)", free / 1024)
                } else {
                    "named with --to".into()
                };
                let ours = reserved.entry(t.id.clone()).or_default();
                *ours = ours.saturating_add(g.memory_kib);
                claimed_names.entry(t.id.clone()).or_default().insert(g.name.clone());
                gp.reserved_note = reserved_note(held_on(&t.id));
                gp.checks = per_target.into_iter().filter(|(h, _)| *h == t.id).map(|(_, c)| c).collect();
                gp.cleanup = cleanup_note(&source.id, g);
            }
            None if !storage_ok => gp.movable = false,
            None => {
                gp.movable = false;
                if candidates.is_empty() {
                    gp.reason = "no reachable target host accepts guests".into();
                    gp.checks.push(check(
                        CheckId::TargetAvailable,
                        false,
                        "no AVAILABLE, REACHABLE host other than the source",
                        "bring a host back or set one AVAILABLE",
                    ));
                } else if !seen_by_any && req.target.is_empty() {
                    gp.reason = nobody_sees(&paths);
                } else if let Some((t, free)) = short.iter().max_by_key(|(t, f)| (*f, std::cmp::Reverse(t.id.clone())))
                {
                    let notes: Vec<String> = short
                        .iter()
                        .filter(|(t, _)| !held_on(&t.id).is_empty())
                        .map(|(t, _)| format!("on {}: {}", t.id, reserved_note(held_on(&t.id))))
                        .collect();
                    gp.reserved_note = notes.join("; ");
                    gp.reason = format!(
                        "{NO_CAPACITY}: needs {} MiB, the most left on an eligible target is {} MiB on {}{}",
                        g.memory_kib / 1024,
                        free / 1024,
                        t.id,
                        if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) }
                    );
                } else {
                    gp.reason = "no target passes every check".into();
                }
                gp.checks.extend(per_target.into_iter().map(|(_, c)| c));
                if !req.target.is_empty() && seen_by_any && !sees_all(&req.target) {
                    pre.push(check(
                        CheckId::TargetSeesDisks,
                        false,
                        format!(
                            "target {} does not see the disks of {} ({}) on their storage, but {} does",
                            req.target,
                            g.name,
                            paths.join(", "),
                            seen_elsewhere.join(", ")
                        ),
                        "choose a target on the same shared storage, or leave --to out",
                    ));
                } else if !seen_by_any {
                    gp.reason = nobody_sees(&paths);
                }
            }
        }
        if !req.vms.is_empty() && !gp.movable {
            pre.push(check(
                CheckId::NamedGuestMovable,
                false,
                format!("{} cannot move: {}", g.name, gp.reason),
                "see the guest's checks in the plan",
            ));
        }
        out.guests.push(gp);
    }
    out.preconditions = pre;
    finish(out, input)
}

/// The memory check's detail: what is left on `t` for the guest, and
/// what took the rest.
fn memory_detail(needs: u64, free: u64, t: &HostView, reserve: u64, held: &[&Reservation], ours: u64) -> String {
    let mut parts = vec![
        format!("{} MiB physical", t.memory_total_kib / 1024),
        format!("{} MiB running guests", t.running_memory_kib / 1024),
        format!("{} MiB reserve", reserve / 1024),
    ];
    if !held.is_empty() {
        parts.push(reserved_note(held));
    }
    if ours > 0 {
        parts.push(format!("{} MiB placed earlier in this plan", ours / 1024));
    }
    format!("needs {} MiB; {} MiB available ({})", needs / 1024, free / 1024, parts.join(" - "))
}

fn cleanup_note(source: &str, g: &Guest) -> String {
    format!(
        "`lifeboat cleanup {source}` will undefine '{}' ({}) on {source}; its disks are never touched",
        g.name, g.uuid
    )
}

/// Sets the plan's power evidence (enum, and its name as shown).
fn set_evidence(out: &mut MigrationPlan, e: PowerEvidence) {
    out.power_evidence = e.as_str().into();
    out.evidence = e.to_wire() as i32;
}

fn power_check(req: &MigrateRequest, power: &PowerReading, source: &str) -> (Check, PowerEvidence) {
    const NAME: CheckId = CheckId::SourcePoweredOff;
    if req.attest_powered_off {
        if req.attest_reason.trim().is_empty() {
            return (
                check(
                    NAME,
                    false,
                    "--attest-powered-off needs --reason TEXT: the attestation is recorded in the audit log",
                    "add --reason \"how you verified it is off\"",
                ),
                PowerEvidence::None,
            );
        }
        if req.fence {
            return (
                check(NAME, false, "--fence and --attest-powered-off exclude each other", "use one of them"),
                PowerEvidence::None,
            );
        }
        if let PowerReading::Bmc(PowerState::On) = power {
            return (
                check(
                    NAME,
                    false,
                    format!("{source}'s BMC reads On: an attestation cannot contradict it"),
                    "use --fence to power it off through the BMC",
                ),
                PowerEvidence::None,
            );
        }
        return (
            check(NAME, true, format!("operator attests {source} is powered off: {}", req.attest_reason.trim()), ""),
            PowerEvidence::Attestation,
        );
    }
    match power {
        PowerReading::NoBmc => (
            check(
                NAME,
                false,
                format!("no BMC is configured for {source}: its power state is unknown"),
                "configure [bmc.HOST] in the controller, or verify it is off yourself and use --attest-powered-off --reason TEXT",
            ),
            PowerEvidence::None,
        ),
        PowerReading::Bmc(PowerState::Off) => {
            (check(NAME, true, format!("{source}'s BMC reads Off"), ""), PowerEvidence::BmcOff)
        }
        PowerReading::Bmc(PowerState::On) if req.fence => (
            check(
                NAME,
                true,
                format!(
                    "{source}'s BMC reads On: it will be powered off (ForceOff) and must read Off before any guest moves"
                ),
                "",
            ),
            PowerEvidence::BmcFence,
        ),
        PowerReading::Bmc(PowerState::On) => (
            check(
                NAME,
                false,
                format!("{source}'s BMC reads On: the host may still run its guests"),
                "add --fence to power it off through the BMC",
            ),
            PowerEvidence::None,
        ),
        PowerReading::Bmc(PowerState::Unknown(why)) => (
            check(
                NAME,
                false,
                format!("{source}'s power state is UNKNOWN: {why}"),
                "fix the BMC access, or verify the host is off yourself and use --attest-powered-off --reason TEXT",
            ),
            PowerEvidence::None,
        ),
    }
}

fn finish(mut out: MigrationPlan, input: &PlanInput) -> MigrationPlan {
    let movable = out.guests.iter().filter(|g| g.movable).count();
    let pre_ok = out.preconditions.iter().all(|c| c.ok);
    // A whole failed host whose guests fit nowhere now still gets a job: it
    // records each of them NOT_MOVED and raises the guests-not-moved alarm,
    // rather than leaving them down with nothing but a refused command.
    let no_room = out.guests.iter().filter(|g| !g.movable && g.reason.starts_with(NO_CAPACITY)).count();
    let report_only = movable == 0 && no_room > 0 && input.req.vms.is_empty() && !input.req.planned_move;
    if pre_ok && movable == 0 && !report_only && input.hosts.iter().any(|h| h.id == out.source) {
        out.preconditions.push(check(
            CheckId::SomethingToMove,
            false,
            format!("no guest of {} can move", out.source),
            "see each guest's reason",
        ));
    }
    out.executable = out.preconditions.iter().all(|c| c.ok) && (movable > 0 || report_only);
    let failed: Vec<&str> = out.preconditions.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
    out.summary = if out.executable {
        let mut s = format!("{movable} of {} guests will move from {}", out.guests.len(), out.source);
        if no_room > 0 {
            s.push_str(&format!(
                "; {no_room} do not fit ({NO_CAPACITY}) and will be recorded NOT_MOVED with the guests-not-moved alarm"
            ));
        }
        s
    } else {
        format!("refused: {}", failed.join(", "))
    };
    out.plan_id = plan_id(&out, &input.req);
    out
}

/// A short stable id over everything that matters in the plan: the same
/// inputs give the same id; any change in guests, targets, checks' outcome,
/// evidence kind or options gives another.
pub fn plan_id(p: &MigrationPlan, req: &MigrateRequest) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update(s.as_bytes());
        h.update([0]);
    };
    put(&p.source);
    put(&p.power_evidence);
    put(&req.target);
    put(&format!("{}{}{}{}{}", req.fence, req.attest_powered_off, req.no_start, req.parallel, req.planned_move));
    for c in &p.preconditions {
        put(&c.name);
        put(if c.ok { "ok" } else { "fail" });
    }
    for g in &p.guests {
        put(&g.uuid);
        put(&g.name);
        put(&g.target);
        put(if g.movable { "m" } else { "-" });
        put(if g.start { "s" } else { "-" });
        put(&g.disks.join(","));
        put(&g.memory_kib.to_string());
    }
    let d = h.finalize();
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
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

    /// The check is `id` about `target`.
    fn is_on(c: &Check, id: CheckId, target: &str) -> bool {
        CheckId::of(c) == Ok(id) && c.name == format!("{} {target}", id.label())
    }
    use lifeboat_proto::v1::Disk;

    const MARK: &str = "marker:5b0c3f9e-1111-4222-8333-444455556666";

    /// The identity an agent reports: /shared is marked, the rest is local.
    fn storage_of(path: &str) -> (String, String) {
        match path.strip_prefix("/shared/") {
            Some(rel) => (MARK.into(), rel.into()),
            None => ("local:ext4".into(), String::new()),
        }
    }

    fn seen(path: &str) -> PathSeen {
        let (storage, storage_path) = storage_of(path);
        PathSeen { visible: true, error: String::new(), storage, storage_path }
    }

    fn guest(name: &str, uuid: &str, disk: &str, running: bool) -> Guest {
        let (storage, storage_path) = storage_of(disk);
        Guest {
            uuid: uuid.into(),
            name: name.into(),
            state: if running { GuestState::Running as i32 } else { GuestState::Shutoff as i32 },
            memory_kib: 32 * 1024,
            disks: vec![Disk {
                source: disk.into(),
                target: "vda".into(),
                storage,
                storage_path,
                ..Default::default()
            }],
            definition_xml: format!("<domain><name>{name}</name><uuid>{uuid}</uuid></domain>"),
            persistent: true,
            ..Default::default()
        }
    }

    fn host(id: &str, silent: Option<u64>, free_mib: u64) -> HostView {
        HostView {
            id: id.into(),
            status: HostStatus::Available,
            liveness: if silent.is_some() { Liveness::Unreachable } else { Liveness::Reachable },
            silent_ms: silent,
            memory_total_kib: free_mib * 1024,
            running_memory_kib: 0,
            lock_manager: String::new(),
            guests: vec![],
        }
    }

    fn input() -> PlanInput {
        let mut vis = BTreeMap::new();
        for h in ["b", "c"] {
            let mut m = BTreeMap::new();
            m.insert("/shared/g1.img".to_string(), seen("/shared/g1.img"));
            m.insert("/shared/g2.img".to_string(), seen("/shared/g2.img"));
            m.insert("/local/g3.img".to_string(), PathSeen::failed("No such file or directory"));
            vis.insert(h.to_string(), m);
        }
        PlanInput {
            req: MigrateRequest { source: "a".into(), fence: true, ..Default::default() },
            hosts: vec![host("a", Some(60_000), 1000), host("b", None, 1000), host("c", None, 2000)],
            source_guests: vec![
                guest("g1", "u1", "/shared/g1.img", true),
                guest("g2", "u2", "/shared/g2.img", false),
                guest("g3", "u3", "/local/g3.img", true),
            ],
            owners: BTreeMap::new(),
            power: PowerReading::Bmc(PowerState::On),
            active_job: None,
            grace_ms: 30_000,
            visibility: vis,
            memory_reserve_kib: 0,
            source_alarms: vec![],
            held_elsewhere: BTreeMap::new(),
            in_other_job: BTreeMap::new(),
            reservations: vec![],
            desired_running: BTreeSet::new(),
        }
    }

    fn res(job: &str, name: &str, target: &str, mib: u64) -> Reservation {
        Reservation {
            job: job.into(),
            uuid: format!("u-{name}"),
            name: name.into(),
            target: target.into(),
            memory_kib: mib * 1024,
        }
    }

    #[test]
    fn other_jobs_reservations_are_subtracted_per_target() {
        let mut i = input();
        i.reservations = vec![res("mig-x", "r1", "c", 1000), res("mig-x", "r2", "c", 990)];
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert_eq!(g1.target, "b", "c has 10 MiB left after mig-x's moves: {g1:?}");
        assert_eq!(g1.reserved_note, "", "nothing is reserved on b");
        i.req.target = "c".into();
        i.req.vms = vec!["g1".into()];
        let p = plan(&i);
        assert!(!p.executable, "a named guest that does not fit refuses the plan");
        let g1 = &p.guests[0];
        let c = g1.checks.iter().find(|c| is_on(c, CheckId::Memory, "c")).unwrap();
        assert!(!c.ok, "{c:?}");
        assert_eq!(
            c.detail,
            "needs 32 MiB; 10 MiB available (2000 MiB physical - 0 MiB running guests - 0 MiB reserve - 1990 MiB reserved by job mig-x (r1, r2))"
        );
        assert!(
            g1.reason.starts_with("no capacity: needs 32 MiB, the most left on an eligible target is 10 MiB on c"),
            "{}",
            g1.reason
        );
        assert!(g1.reason.contains("on c: 1990 MiB reserved by job mig-x (r1, r2)"), "{}", g1.reason);
        let pre = p.preconditions.iter().find(|c| is(c, CheckId::NamedGuestMovable)).unwrap();
        assert!(pre.detail.contains("no capacity"), "{pre:?}");
    }

    #[test]
    fn a_reservation_whose_guest_runs_on_its_target_is_not_counted_twice() {
        let mut i = input();
        i.reservations = vec![res("mig-x", "r1", "c", 1990)];
        let p = plan(&i);
        assert_eq!(p.guests.iter().find(|g| g.name == "g1").unwrap().target, "b");
        let mut running = guest("r1", "u-r1", "/shared/r1.img", true);
        running.memory_kib = 1990 * 1024;
        i.hosts[2].guests.push(running);
        i.hosts[2].running_memory_kib = running_memory_kib(&i.hosts[2].guests);
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert_eq!(g1.target, "b", "counted once, by the inventory: c has 10 MiB");
        let c = g1.checks.iter().find(|c| is_on(c, CheckId::Memory, "c"));
        assert!(c.is_none(), "only the chosen target's checks are kept");
        i.hosts[2].running_memory_kib = 0;
        i.hosts[2].guests[0].state = GuestState::Shutoff as i32;
        assert_eq!(
            held_by_reservations(&i.reservations, &i.hosts).get("c").map(Vec::len),
            Some(1),
            "defined but not running: still held"
        );
        i.hosts[2].guests[0].state = GuestState::Running as i32;
        assert!(held_by_reservations(&i.reservations, &i.hosts).is_empty());
    }

    #[test]
    fn guests_that_fit_nowhere_are_not_moved_with_no_capacity_and_the_job_still_reports_them() {
        // Two hosts fail together; c has room for exactly two 32 MiB guests.
        let mut i = input();
        i.hosts = vec![host("a", Some(60_000), 1000), host("b", Some(60_000), 1000), host("c", None, 64)];
        i.visibility.remove("b");
        i.source_guests.truncate(2);
        i.source_guests[1].state = GuestState::Running as i32;
        let first = plan(&i);
        assert!(first.executable);
        assert!(first.guests.iter().all(|g| g.movable && g.target == "c"), "{:?}", first.guests);
        // The first job's moves are under way: they hold c's memory.
        let held: Vec<Reservation> =
            first.guests.iter().map(|g| res("mig-1", &g.name, "c", g.memory_kib / 1024)).collect();
        let mut j = i.clone();
        j.req.source = "b".into();
        j.hosts[1].guests = vec![];
        j.source_guests = vec![guest("h1", "v1", "/shared/g1.img", true), guest("h2", "v2", "/shared/g2.img", true)];
        j.reservations = held;
        let second = plan(&j);
        assert!(second.guests.iter().all(|g| !g.movable), "{:?}", second.guests);
        for g in &second.guests {
            assert!(
                g.reason.starts_with("no capacity: needs 32 MiB, the most left on an eligible target is 0 MiB on c"),
                "{}",
                g.reason
            );
            assert_eq!(g.reserved_note, "on c: 64 MiB reserved by job mig-1 (g1, g2)");
        }
        assert!(second.executable, "a job records them NOT_MOVED and alarms: {:?}", second.preconditions);
        assert_eq!(
            second.summary,
            "0 of 2 guests will move from b; 2 do not fit (no capacity) and will be recorded NOT_MOVED with the guests-not-moved alarm"
        );
        // Without the reservations both plans would have taken c's memory.
        j.reservations.clear();
        assert!(plan(&j).guests.iter().all(|g| g.movable && g.target == "c"));
        // Nothing fits and nothing else is wrong: still refused for a named guest.
        let mut k = j.clone();
        k.req.vms = vec!["h1".into()];
        k.reservations = first.guests.iter().map(|g| res("mig-1", &g.name, "c", 32)).collect();
        assert!(!plan(&k).executable);
    }

    #[test]
    fn a_guest_another_operation_acts_on_is_left_alone() {
        let mut i = input();
        let uuid = i.source_guests[0].uuid.clone();
        i.in_other_job.insert(uuid.clone(), "restore-x".into());
        let p = plan(&i);
        let g = p.guests.iter().find(|g| g.uuid == uuid).unwrap();
        assert!(!g.movable && g.target.is_empty(), "{g:?}");
        let c = g.checks.iter().find(|c| is(c, CheckId::InNoOtherOperation)).unwrap();
        assert!(!c.ok && c.detail.contains("restore-x"), "{c:?}");
        i.in_other_job.clear();
        assert!(plan(&i).guests.iter().find(|g| g.uuid == uuid).unwrap().movable);
    }

    #[test]
    fn reserved_notes_group_by_job() {
        let a = res("mig-1", "v1", "c", 64);
        let b = res("mig-1", "v2", "c", 64);
        let c = res("mig-2", "v3", "c", 32);
        assert_eq!(reserved_note(&[&a, &b, &c]), "128 MiB reserved by job mig-1 (v1, v2); 32 MiB by job mig-2 (v3)");
        assert_eq!(reserved_note(&[]), "");
    }

    #[test]
    fn places_shared_guests_and_lists_local_ones() {
        let p = plan(&input());
        assert!(p.executable, "{p:?}");
        assert_eq!(p.power_evidence, "bmc-fence");
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert_eq!(g1.target, "c", "most free memory");
        assert!(g1.start);
        let g2 = p.guests.iter().find(|g| g.name == "g2").unwrap();
        assert!(g2.movable && !g2.start, "a shut-off guest is defined, not started");
        let g3 = p.guests.iter().find(|g| g.name == "g3").unwrap();
        assert!(!g3.movable);
        assert!(g3.reason.contains("local storage") && g3.reason.contains("local:ext4"), "{}", g3.reason);
        assert!(g1.cleanup.contains("cleanup a"));
        let evidence = g1.checks.iter().find(|c| is_on(c, CheckId::SameDisks, "c")).unwrap();
        assert_eq!(evidence.detail, format!("c sees /shared/g1.img on {MARK} (g1.img) like a"));
    }

    #[test]
    fn a_talking_source_is_refused() {
        let mut i = input();
        i.hosts[0] = host("a", None, 1000);
        let p = plan(&i);
        assert!(!p.executable);
        let c = p.preconditions.iter().find(|c| is(c, CheckId::SourceSilent)).unwrap();
        assert!(!c.ok && c.detail.contains("alive"), "{c:?}");
        i.hosts[0] = host("a", Some(10_000), 1000);
        let p = plan(&i);
        assert!(!p.executable, "silent for less than the grace");
    }

    #[test]
    fn unknown_power_is_never_off() {
        let mut i = input();
        i.power = PowerReading::Bmc(PowerState::Unknown("BMC unreachable".into()));
        let p = plan(&i);
        assert!(!p.executable);
        let c = p.preconditions.iter().find(|c| is(c, CheckId::SourcePoweredOff)).unwrap();
        assert!(c.detail.contains("UNKNOWN") && c.remedy.contains("attest"), "{c:?}");
        i.req.fence = false;
        i.power = PowerReading::Bmc(PowerState::On);
        assert!(!plan(&i).executable, "On without --fence");
        i.power = PowerReading::NoBmc;
        assert!(!plan(&i).executable, "no BMC and no attestation");
        i.req.attest_powered_off = true;
        assert!(!plan(&i).executable, "attestation without a reason");
        i.req.attest_reason = "PDU outlet 7 switched off, checked on site".into();
        let p = plan(&i);
        assert!(p.executable);
        assert_eq!(p.power_evidence, "attestation");
        i.power = PowerReading::Bmc(PowerState::On);
        assert!(!plan(&i).executable, "attestation cannot contradict a BMC reading On");
    }

    #[test]
    fn bad_targets_and_guests_are_refused() {
        let mut i = input();
        i.req.target = "a".into();
        assert!(!plan(&i).executable);
        i.req.target = "zz".into();
        let p = plan(&i);
        assert!(p.preconditions.iter().any(|c| !c.ok && c.detail.contains("unknown target host 'zz'")));
        i.req.target = String::new();
        i.req.vms = vec!["nope".into()];
        let p = plan(&i);
        assert!(p.preconditions.iter().any(|c| !c.ok && c.detail.contains("no guest 'nope'")));
        i.req.vms = vec!["g3".into()];
        assert!(!plan(&i).executable, "a named guest that cannot move refuses the plan");
        i.req.source = "q".into();
        let p = plan(&i);
        assert!(!p.executable && p.preconditions[0].detail.contains("unknown host 'q'"));
    }

    #[test]
    fn a_target_that_cannot_see_the_disk_is_refused() {
        let mut i = input();
        i.req.target = "b".into();
        i.visibility.get_mut("b").unwrap().insert("/shared/g1.img".into(), PathSeen::failed("No such file"));
        let p = plan(&i);
        assert!(!p.executable);
        assert!(
            p.preconditions.iter().any(|c| !c.ok && c.detail.contains("does not see the disks")),
            "{:?}",
            p.preconditions
        );
    }

    #[test]
    fn a_placed_guest_carries_its_targets_checks_only_by_target_never_by_label_suffix() {
        // "host-b" ends with "b": a label-suffix filter would give g1 on b the checks of host-b too.
        let mut i = input();
        let mut hb = host("host-b", None, 500);
        hb.id = "host-b".into();
        i.hosts.push(hb);
        let vis = i.visibility["b"].clone();
        i.visibility.insert("host-b".into(), vis);
        i.hosts[2].memory_total_kib = 0;
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert_eq!(g1.target, "b", "{g1:?}");
        let ids: Vec<_> = g1.checks.iter().map(|c| (CheckId::of(c).unwrap(), c.name.as_str())).collect();
        assert_eq!(
            ids,
            [
                (CheckId::SameDisks, "same disks on b"),
                (CheckId::Memory, "memory on b"),
                (CheckId::NoConflict, "no conflict on b"),
                (CheckId::DisksFree, "disks free on b"),
            ]
        );
    }

    #[test]
    fn every_check_of_a_plan_has_an_id_and_the_evidence_enum_matches_its_name() {
        let mut inputs = vec![input()];
        let mut i = input();
        i.hosts[0].silent_ms = None;
        i.req.vms = vec!["nope".into()];
        i.req.target = "zz".into();
        inputs.push(i);
        let mut i = input();
        i.req = MigrateRequest {
            source: "a".into(),
            attest_powered_off: true,
            attest_reason: "pulled the plug".into(),
            ..Default::default()
        };
        i.power = PowerReading::NoBmc;
        inputs.push(i);
        let mut i = input();
        i.req.source = "unknown".into();
        inputs.push(i);
        for i in &inputs {
            let p = plan(i);
            let all = p.preconditions.iter().chain(p.guests.iter().flat_map(|g| g.checks.iter()));
            for c in all {
                let id = CheckId::of(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                assert!(c.name.starts_with(id.label()), "{c:?}");
            }
            let e = PowerEvidence::from_wire(p.evidence).unwrap();
            assert_eq!(e.as_str(), p.power_evidence);
        }
        assert_eq!(PowerEvidence::from_wire(plan(&inputs[0]).evidence), Ok(PowerEvidence::BmcFence));
        assert_eq!(PowerEvidence::from_wire(plan(&inputs[2]).evidence), Ok(PowerEvidence::Attestation));
        assert_eq!(PowerEvidence::from_wire(plan(&inputs[3]).evidence), Ok(PowerEvidence::None));
    }

    #[test]
    fn conflicts_memory_and_not_accepting_hosts() {
        let mut i = input();
        i.hosts[2].guests.push(guest("g1", "u1", "/shared/g1.img", false));
        let p = plan(&i);
        assert_eq!(p.guests.iter().find(|g| g.name == "g1").unwrap().target, "b", "c already has g1");
        i.hosts[1].memory_total_kib = 0;
        i.hosts[2].memory_total_kib = 0;
        let p = plan(&i);
        assert!(p.executable && p.guests.iter().all(|g| !g.movable), "nothing fits: a job only reports them");
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert!(
            g1.reason.starts_with("no capacity: needs 32 MiB, the most left on an eligible target is 0 MiB on b"),
            "{g1:?}"
        );
        i.req.vms = vec!["g1".into()];
        assert!(!plan(&i).executable, "a named guest that does not fit refuses");
        let mut i = input();
        i.hosts[1].status = HostStatus::NotAccepting;
        i.hosts[2].status = HostStatus::NotAccepting;
        assert!(!plan(&i).executable, "NOT_ACCEPTING is never chosen automatically");
        i.req.target = "b".into();
        let p = plan(&i);
        assert!(p.executable, "…but may be named: {:?}", p.preconditions);
        i.hosts[1].status = HostStatus::Maintenance;
        assert!(!plan(&i).executable);
    }

    #[test]
    fn available_memory_counts_running_guests_and_the_reserve() {
        let mut h = host("b", None, 1000);
        h.guests.push(guest("x", "ux", "/s/x.img", true));
        h.guests.push(guest("y", "uy", "/s/y.img", false));
        h.running_memory_kib = running_memory_kib(&h.guests);
        assert_eq!(h.running_memory_kib, 32 * 1024, "only the running guest counts");
        assert_eq!(available_memory_kib(&h, 100 * 1024), (1000 - 32 - 100) * 1024);
        assert_eq!(available_memory_kib(&h, 2000 * 1024), 0);
        // Agent-reported figures that overflow saturate: the host is full.
        for g in h.guests.iter_mut() {
            g.memory_kib = u64::MAX;
            g.state = GuestState::Running as i32;
        }
        assert!(h.guests.len() >= 2);
        h.running_memory_kib = running_memory_kib(&h.guests);
        assert_eq!(h.running_memory_kib, u64::MAX);
        assert_eq!(available_memory_kib(&h, 0), 0);
    }

    #[test]
    fn a_large_cluster_checks_the_targets_with_most_memory_only() {
        let mut hosts = vec![host("a", Some(60_000), 1000)];
        for n in 0..500u64 {
            let mut h = host(&format!("h{n:03}"), None, 1000 + n);
            if n % 7 == 0 {
                h.status = HostStatus::Maintenance;
            }
            hosts.push(h);
        }
        let req = MigrateRequest { source: "a".into(), ..Default::default() };
        let picked = visibility_hosts(&req, &hosts, 3, 0);
        assert_eq!(picked.len(), VISIBILITY_SAMPLE);
        assert_eq!(picked[0], "h499", "most available memory first");
        assert!(!picked.contains(&"h497".to_string()), "h497 is in MAINTENANCE");
        assert!(
            picked.contains(&"h481".to_string()) && !picked.contains(&"h480".to_string()),
            "the 16 AVAILABLE hosts with most memory"
        );
        assert!(
            picked.iter().all(|id| id != "a" && hosts.iter().any(|h| &h.id == id && h.status == HostStatus::Available))
        );
        assert_eq!(visibility_hosts(&req, &hosts, 100, 0).len(), 108, "the guests and 8 more when that is more");
        let small = &hosts[..10];
        assert_eq!(visibility_hosts(&req, small, 3, 0).len(), 9, "a small cluster checks every reachable host");
        // Only checked hosts are candidates, and a guest nobody checked sees
        // says how many hosts were checked.
        let mut vis = BTreeMap::new();
        for id in &picked {
            vis.insert(
                id.clone(),
                [("/shared/g.img".to_string(), PathSeen::failed("No such file"))].into_iter().collect(),
            );
        }
        let input = PlanInput {
            req: MigrateRequest { source: "a".into(), fence: true, ..Default::default() },
            hosts,
            source_guests: vec![guest("g", "ug", "/shared/g.img", true)],
            owners: BTreeMap::new(),
            power: PowerReading::Bmc(PowerState::Off),
            active_job: None,
            grace_ms: 30_000,
            visibility: vis,
            memory_reserve_kib: 0,
            source_alarms: vec![],
            held_elsewhere: BTreeMap::new(),
            in_other_job: BTreeMap::new(),
            reservations: vec![],
            desired_running: BTreeSet::new(),
        };
        let p = plan(&input);
        let g = &p.guests[0];
        assert!(!g.movable);
        assert!(g.reason.contains("none of the 16 hosts checked (of 500 reachable)"), "{}", g.reason);
        assert!(g.checks.len() <= 4 * VISIBILITY_SAMPLE, "checks are bounded by the sample, not the cluster");
    }

    #[test]
    fn a_planned_move_needs_a_connected_source_a_guest_and_a_target() {
        let mut i = input();
        i.req = MigrateRequest { source: "a".into(), planned_move: true, ..Default::default() };
        assert!(!plan(&i).executable, "source silent, nothing named");
        i.hosts[0] = host("a", None, 1000);
        i.req.vms = vec!["g1".into()];
        i.req.target = "b".into();
        let p = plan(&i);
        assert!(p.executable, "{:?}", p.preconditions);
        assert_eq!(p.power_evidence, "stopped-by-agent");
        assert_eq!(p.guests.len(), 1);
        assert_eq!(p.guests[0].target, "b");
    }

    #[test]
    fn a_guest_shut_off_whose_desired_state_is_running_is_started_on_its_target() {
        let mut i = input();
        i.req = MigrateRequest {
            source: "a".into(),
            planned_move: true,
            vms: vec!["g2".into()],
            target: "b".into(),
            ..Default::default()
        };
        i.hosts[0] = host("a", None, 1000);
        assert!(!plan(&i).guests[0].start, "shut off and desired stopped: defined, not started");
        i.desired_running.insert("u2".into());
        let p = plan(&i);
        assert!(
            p.executable && p.guests[0].start,
            "desired running: started (a source that rebooted mid-job left it off)"
        );
        i.req.no_start = true;
        assert!(!plan(&i).guests[0].start, "--no-start wins");
    }

    #[test]
    fn plan_ids_are_stable_and_change_with_the_plan() {
        let i = input();
        assert_eq!(plan(&i).plan_id, plan(&i).plan_id);
        let mut j = input();
        j.hosts[1].memory_total_kib = 5000 * 1024;
        assert_ne!(plan(&i).plan_id, plan(&j).plan_id, "g1 now goes to b");
        let mut k = input();
        k.req.no_start = true;
        assert_ne!(plan(&i).plan_id, plan(&k).plan_id);
    }

    #[test]
    fn priority_orders_placement_and_finished_moves_are_skipped() {
        let mut i = input();
        i.source_guests[1].priority = 10;
        let p = plan(&i);
        assert_eq!(p.guests[0].name, "g2");
        i.owners.insert(
            "u1".into(),
            Ownership { host: "b".into(), generation: 2, from_host: "a".into(), complete: true, job: "j1".into() },
        );
        i.owners.insert(
            "u2".into(),
            Ownership { host: "c".into(), generation: 2, from_host: "a".into(), complete: false, job: "j1".into() },
        );
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert!(!g1.movable && g1.reason.contains("already moved"));
        let g2 = p.guests.iter().find(|g| g.name == "g2").unwrap();
        assert!(g2.movable && g2.target == "c", "an unfinished move finishes on its target");
    }

    #[test]
    fn only_named_shared_kinds_are_shared() {
        for s in [MARK, "nfs4:filer:/export/vms", "wwn:0x5000c500a1b2c3d4", "mpath:3600a", "gfs2:wwn:0x1"] {
            assert!(is_shared_storage(s), "{s}");
        }
        for s in ["", "local:ext4", "unidentified:no id", "marker:", "marker", "tmpfs:x", "zfs:tank"] {
            assert!(!is_shared_storage(s), "{s}");
        }
    }

    #[test]
    fn the_same_path_on_other_storage_is_another_disk() {
        // A local disk whose path also exists on every target, as another file.
        let mut i = input();
        let p = "/var/lib/libvirt/images/localvm.img";
        i.source_guests = vec![guest("localvm", "ul", p, true)];
        for v in i.visibility.values_mut() {
            v.insert(p.into(), seen(p));
        }
        let pl = plan(&i);
        let g = &pl.guests[0];
        assert!(!g.movable && g.reason.starts_with("local storage"), "{g:?}");
        let c = g.checks.iter().find(|c| is(c, CheckId::DisksOnSharedStorage)).unwrap();
        assert_eq!(
            c.detail,
            "a reported /var/lib/libvirt/images/localvm.img on local:ext4 (b: local:ext4, c: local:ext4)"
        );
        assert!(c.remedy.contains(".lifeboat-storage-id"), "{c:?}");
        assert!(!pl.executable);

        // Shared on the source, but the target's path is on another storage.
        let mut i = input();
        i.req.target = "b".into();
        i.req.vms = vec!["g1".into()];
        let other =
            PathSeen { storage: "marker:99999999-1111-4222-8333-444455556666".into(), ..seen("/shared/g1.img") };
        i.visibility.get_mut("b").unwrap().insert("/shared/g1.img".into(), other);
        let pl = plan(&i);
        assert!(!pl.executable);
        let g = &pl.guests[0];
        let c = g.checks.iter().find(|c| is_on(c, CheckId::SameDisks, "b")).unwrap();
        assert!(
            !c.ok
                && c.detail
                    .contains("is on marker:99999999-1111-4222-8333-444455556666 (g1.img) there but on marker:5b0c"),
            "{c:?}"
        );
        let pre = pl.preconditions.iter().find(|c| is(c, CheckId::TargetSeesDisks)).unwrap();
        assert!(pre.detail.contains("but c does"), "{pre:?}");

        // The same storage under another relative path is another file too.
        let mut i = input();
        i.visibility
            .get_mut("b")
            .unwrap()
            .insert("/shared/g1.img".into(), PathSeen { storage_path: "old/g1.img".into(), ..seen("/shared/g1.img") });
        i.visibility.get_mut("c").unwrap().insert(
            "/shared/g1.img".into(),
            PathSeen { storage: String::new(), storage_path: String::new(), ..seen("/shared/g1.img") },
        );
        let g1 = plan(&i).guests.into_iter().find(|g| g.name == "g1").unwrap();
        assert!(!g1.movable, "{g1:?}");
        let c = g1.checks.iter().find(|c| is_on(c, CheckId::SameDisks, "c")).unwrap();
        assert!(c.detail.contains("on no identified storage there"), "an older target agent: {c:?}");
    }

    #[test]
    fn unidentified_and_unreported_source_disks_are_refused() {
        let mut i = input();
        i.source_guests[0].disks[0].source = "/dev/sdb".into();
        i.source_guests[0].disks[0].storage = "unidentified:/dev/sdb is a kernel device name".into();
        i.source_guests[1].disks[0].storage.clear();
        i.source_guests[1].disks[0].storage_path.clear();
        for v in i.visibility.values_mut() {
            v.insert(
                "/dev/sdb".into(),
                PathSeen {
                    visible: true,
                    storage: "unidentified:/dev/sdb is a kernel device name".into(),
                    ..Default::default()
                },
            );
        }
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert!(!g1.movable && g1.reason.starts_with("storage not shown to be shared"), "{g1:?}");
        assert!(g1.checks[0].detail.contains("/dev/sdb on unidentified:/dev/sdb is a kernel device name"), "{g1:?}");
        assert!(g1.checks[0].remedy.contains("by-id"), "{g1:?}");
        let g2 = p.guests.iter().find(|g| g.name == "g2").unwrap();
        assert!(!g2.movable && g2.checks[0].detail.contains("no storage identity for /shared/g2.img"), "{g2:?}");
    }

    #[test]
    fn a_disk_another_guest_uses_on_the_target_is_refused() {
        let mut i = input();
        // c (most memory) has another guest on g1's disk, under another path
        // but on the same storage and relative path.
        let mut other = guest("other", "uo", "/shared/g1.img", false);
        other.disks[0].source = "/mnt/shared/g1.img".into();
        i.hosts[2].guests.push(other);
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        assert_eq!(g1.target, "b", "c has the disk in use: {g1:?}");
        i.req.target = "c".into();
        let p = plan(&i);
        let g1 = p.guests.iter().find(|g| g.name == "g1").unwrap();
        let c = g1.checks.iter().find(|c| is_on(c, CheckId::DisksFree, "c")).unwrap();
        assert!(!c.ok && c.detail.contains("'other' (uo) uses /shared/g1.img as /mnt/shared/g1.img"), "{c:?}");
        // Both <shareable/>: allowed.
        i.hosts[2].guests[0].disks[0].shareable = true;
        i.source_guests[0].disks[0].shareable = true;
        let g1 = plan(&i).guests.into_iter().find(|g| g.name == "g1").unwrap();
        assert!(g1.movable && g1.target == "c", "{g1:?}");
    }

    #[test]
    fn a_duplicate_agent_or_a_guest_running_elsewhere_is_refused() {
        let mut i = input();
        i.source_alarms = vec!["duplicate-agent".into()];
        let p = plan(&i);
        assert!(!p.executable);
        let c = p.preconditions.iter().find(|c| is(c, CheckId::OneAgentPerHost)).unwrap();
        assert!(!c.ok && c.remedy.contains("duplicate-agent"), "{c:?}");
        let mut i = input();
        let uuid = i.source_guests[0].uuid.clone();
        i.held_elsewhere.insert(uuid.clone(), vec!["c".into()]);
        let p = plan(&i);
        let g = p.guests.iter().find(|g| g.uuid == uuid).unwrap();
        assert!(!g.movable && g.reason.contains("on c"), "{g:?}");
        assert!(g.checks.iter().any(|c| is(c, CheckId::RunsNowhereElse) && !c.ok));
    }

    #[test]
    fn a_storage_pool_volume_is_not_taken_for_shared_storage() {
        let mut i = input();
        let d = lifeboat_proto::v1::Disk {
            target: "vdb".into(),
            source_type: "volume".into(),
            source: "default/data.qcow2".into(),
            ..Default::default()
        };
        i.source_guests[0].disks.push(d);
        let p = plan(&i);
        let g = &p.guests.iter().find(|g| g.uuid == i.source_guests[0].uuid).unwrap();
        assert!(!g.movable, "{g:?}");
        let c = g.checks.iter().find(|c| is(c, CheckId::DisksOnSharedStorage)).unwrap();
        assert!(!c.ok && c.detail.contains("storage pool volume (default/data.qcow2)"), "{c:?}");
    }
}
