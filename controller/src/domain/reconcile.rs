//! Floor 1 (domain, pure): the reconciler's decisions. [`decide`] and
//! [`decide_waiting`] read a [`HostSnapshot`] (a copy the in-memory view
//! made) and return [`Action`]s; `crate::reconcile` carries them out.
//!
//! Architecture invariant: deciding needs no registry, store, session or
//! clock (the time is an argument); the same snapshot gives the same actions.

use std::collections::BTreeMap;

use lifeboat_proto::holds_disk;
use lifeboat_proto::v1::Guest;

use crate::domain::host::HostStatus;
use crate::domain::view::{HostSnapshot, OwnerView};

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the host the leases of the guests it owns.
    GrantLeases {
        /// Host.
        host: String,
        /// (uuid, name, generation).
        leases: Vec<(String, String, u64)>,
        /// When this was decided (the snapshot's time).
        issued_ms: i64,
        /// Decided before the host's inventory of this session arrived
        /// (from the stored view).
        early: bool,
    },
    /// A guest holds its disk on a host that does not own it: stop it, raise an alarm.
    StopStale {
        /// Host running the stale copy.
        host: String,
        /// Guest.
        uuid: String,
        /// Name.
        name: String,
        /// Owner.
        owner: String,
        /// Alarm kind: `stale-copy-running` (a moved guest's old copy) or
        /// `split-brain` (a second copy of a guest that runs on its owner).
        alarm: &'static str,
    },
    /// After a normal reboot: start a guest that should run.
    StartForBoot {
        /// Host.
        host: String,
        /// Guest.
        uuid: String,
        /// Name.
        name: String,
    },
    /// The boot start is decided (started what should run, or nothing to do).
    BootStartDone {
        /// Host.
        host: String,
    },
    /// A waiting guest's host is healthy again: start it there.
    StartWaiting {
        /// Host (its owner).
        host: String,
        /// Guest.
        uuid: String,
        /// Name.
        name: String,
        /// Its ownership generation when this was decided: the start goes
        /// ahead only while it is unchanged.
        generation: u64,
    },
    /// A guest no longer waits: it runs on its owner, or belongs elsewhere now.
    EndWaiting {
        /// The host it waited on.
        host: String,
        /// Guest.
        uuid: String,
        /// Why it no longer waits.
        why: String,
    },
}

/// What the reconciler decides for the guests waiting on one host (see
/// `crate::waiting`). Pure. A waiting guest is started only when the host
/// is healthy (a fresh inventory, AVAILABLE or NOT_ACCEPTING, so cleanup is
/// done: `hosts set-status` refuses those while stale definitions remain),
/// when the host owns it, no job moves it, the host was sent its lease in
/// this session, it does not hold its disks there already, and no other
/// host reports it holding them (`holders`: every host's last report). It
/// stops waiting once it holds its disks on its owner, or when a completed
/// move made another host its owner. (Rows whose ownership record names
/// another host are judged before, by `crate::waiting::judge`, for hosts
/// that do not report the guest too: ended when complete, skipped when an
/// unfinished move, which nothing here starts.)
pub fn decide_waiting(
    s: &HostSnapshot,
    waiting: &[(String, String)],
    holders: &BTreeMap<String, Vec<String>>,
) -> Vec<Action> {
    let mut out = Vec::new();
    for (uuid, name) in waiting {
        if s.in_job.contains(uuid) || s.claimed.contains(uuid) {
            continue;
        }
        if let Some(OwnerView::Other { host, recorded: true }) = s.owners.get(uuid) {
            out.push(Action::EndWaiting {
                host: s.host.clone(),
                uuid: uuid.clone(),
                why: format!("{host} owns it now"),
            });
            continue;
        }
        if s.owners.contains_key(uuid) || !s.inventory_seen {
            continue;
        }
        let Some(g) = s.guests.iter().find(|g| &g.uuid == uuid) else { continue };
        if holds_disk(g.state) {
            out.push(Action::EndWaiting {
                host: s.host.clone(),
                uuid: uuid.clone(),
                why: format!("it runs on {} again", s.host),
            });
            continue;
        }
        let healthy = matches!(s.status, HostStatus::Available | HostStatus::NotAccepting);
        let leased = s.leases_sent.as_ref().is_some_and(|(_, set)| set.iter().any(|(u, _)| u == uuid));
        let elsewhere = holders.get(uuid).is_some_and(|h| h.iter().any(|h| h != &s.host));
        if healthy && leased && !elsewhere {
            let generation = s.generations.get(uuid).copied().unwrap_or(0);
            out.push(Action::StartWaiting { host: s.host.clone(), uuid: uuid.clone(), name: name.clone(), generation });
        }
    }
    out
}

/// For how many lease lives (`lease_ttl_ms`) a host's leases are renewed
/// from the stored view while its inventory has not been applied: long
/// enough for 10,000 inventories to be taken in after a failover on a busy
/// machine, short enough that a host whose inventory cannot be read is soon
/// left without leases.
pub const EARLY_LEASE_LIVES: i64 = 3;

/// What a grant of `leases` (uuid, name, generation) is remembered as: its
/// (uuid, generation) pairs, sorted.
pub fn lease_set(leases: &[(String, String, u64)]) -> Vec<(String, u64)> {
    let mut set: Vec<(String, u64)> = leases.iter().map(|l| (l.0.clone(), l.2)).collect();
    set.sort();
    set
}

/// Decides what to do for one host. Pure.
pub fn decide(s: &HostSnapshot, now_ms: i64, lease_ttl_ms: i64) -> Vec<Action> {
    let mut out = Vec::new();
    let mine = |g: &&Guest| !s.owners.contains_key(&g.uuid) && !s.in_job.contains(&g.uuid);
    let owned: Vec<&Guest> = s.guests.iter().filter(mine).collect();
    // Stale copies are judged only on what the host reports in this session:
    // the list from before (the database's) may name copies long gone.
    if s.inventory_seen {
        for g in s.guests.iter().filter(|g| holds_disk(g.state) && !s.in_job.contains(&g.uuid)) {
            if let Some(OwnerView::Other { host, recorded }) = s.owners.get(&g.uuid) {
                out.push(Action::StopStale {
                    host: s.host.clone(),
                    uuid: g.uuid.clone(),
                    name: g.name.clone(),
                    owner: host.clone(),
                    alarm: if *recorded { "stale-copy-running" } else { "split-brain" },
                });
            }
        }
    }
    if s.status == HostStatus::Offline {
        return out;
    }
    // Leases are granted before this session's inventory arrives, from what
    // the store last recorded for the host (its guests, moves, ownership):
    // after a failover or a restart the leader renews every connected host's
    // leases at once, not after all their inventories. The inventory changes
    // the set only for guests defined or undefined there since (a new one
    // waits for it; one gone holds a lease it cannot use until the inventory
    // replaces the set) and for generations it shows the store is behind on.
    // Stops and starts wait for the inventory, and so does a host the store
    // knows no guest of (no empty grant the inventory would replace at once).
    // A host whose inventory has not been applied within three lease lives
    // of its first session without one (refused, never sent; reconnecting
    // does not start the count again) gets no more: its leases lapse.
    let early = !s.inventory_seen;
    if early && now_ms.saturating_sub(s.uninventoried_since_ms) >= lease_ttl_ms.saturating_mul(EARLY_LEASE_LIVES) {
        return out;
    }
    let generation = |u: &str| s.generations.get(u).copied().unwrap_or(0);
    let unreported = s.owned_unreported.iter().filter(|o| !s.in_job.contains(&o.0));
    let mut leases: Vec<(String, String, u64)> =
        owned.iter().map(|g| (g.uuid.clone(), g.name.clone(), generation(&g.uuid))).collect();
    leases.extend(unreported.map(|(u, n)| (u.clone(), n.clone(), generation(u))));
    let set = lease_set(&leases);
    let due = match &s.leases_sent {
        None => !early || !set.is_empty(),
        Some((at, sent)) => now_ms - at >= lease_ttl_ms / 3 || sent != &set,
    };
    if due {
        out.push(Action::GrantLeases { host: s.host.clone(), leases, issued_ms: now_ms, early });
    }
    if !s.inventory_seen {
        return out;
    }
    if s.pending_boot_start && s.leases_sent.is_some() {
        if matches!(s.status, HostStatus::Available | HostStatus::NotAccepting) {
            for g in &owned {
                let want_running = s.desired.get(&g.uuid).is_some_and(|d| d == "running");
                if want_running && !holds_disk(g.state) && !s.elsewhere.contains(&g.uuid) {
                    out.push(Action::StartForBoot { host: s.host.clone(), uuid: g.uuid.clone(), name: g.name.clone() });
                }
            }
        }
        out.push(Action::BootStartDone { host: s.host.clone() });
    }
    out
}
