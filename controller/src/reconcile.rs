//! The level-triggered reconciler: every pass compares what each connected
//! host reports with what Lifeboat wants, and acts on the differences:
//! renew start leases for the guests a host owns, stop a copy of a guest
//! that runs on a host that does not own it, and after a normal reboot start
//! the guests that should run (this replaces libvirt autostart).
//! [`decide`] is pure; [`run`] carries the actions out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::v1::{GrantLeases, Guest, GuestState, Lease, StartGuest, StopGuest, command::Kind};
use tracing::{info, warn};

use crate::model::HostStatus;
use crate::registry::Registry;
use crate::store::AuditRow;

/// What the reconciler sees of one connected host.
#[derive(Debug, Clone)]
pub struct HostSnapshot {
    /// Host id.
    pub host: String,
    /// Operators' status.
    pub status: HostStatus,
    /// An inventory arrived in this session.
    pub inventory_seen: bool,
    /// Came back from a normal reboot; guests that should run are not started yet.
    pub pending_boot_start: bool,
    /// When leases were last sent this session, and for which guests.
    pub leases_sent: Option<(i64, Vec<String>)>,
    /// Guests the host reports.
    pub guests: Vec<Guest>,
    /// Recorded owner per reported guest (a guest without a record is the
    /// reporting host's).
    pub owners: BTreeMap<String, String>,
    /// Desired state per guest this host owns (filled in for a boot start).
    pub desired: BTreeMap<String, String>,
    /// Guests recorded as owned by this host that it does not report (yet):
    /// (uuid, name). A move writes the owner before the define.
    pub owned_unreported: Vec<(String, String)>,
    /// Ownership generation per guest (0 = never moved by Lifeboat).
    pub generations: BTreeMap<String, u64>,
}

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
    },
    /// A guest runs on a host that does not own it: stop it, raise an alarm.
    StopStale {
        /// Host running the stale copy.
        host: String,
        /// Guest.
        uuid: String,
        /// Name.
        name: String,
        /// Recorded owner.
        owner: String,
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
}

fn running(g: &Guest) -> bool {
    matches!(GuestState::try_from(g.state).unwrap_or(GuestState::Unspecified), GuestState::Running | GuestState::Paused | GuestState::Blocked)
}

/// Decides what to do for one host. Pure.
pub fn decide(s: &HostSnapshot, now_ms: i64, lease_ttl_ms: i64) -> Vec<Action> {
    let mut out = Vec::new();
    let owned: Vec<&Guest> = s.guests.iter().filter(|g| s.owners.get(&g.uuid).is_none_or(|o| o == &s.host)).collect();
    for g in s.guests.iter().filter(|g| running(g)) {
        if let Some(o) = s.owners.get(&g.uuid).filter(|o| *o != &s.host) {
            out.push(Action::StopStale { host: s.host.clone(), uuid: g.uuid.clone(), name: g.name.clone(), owner: o.clone() });
        }
    }
    if s.status == HostStatus::Offline || !s.inventory_seen {
        return out;
    }
    let mut uuids: Vec<String> = owned.iter().map(|g| g.uuid.clone()).chain(s.owned_unreported.iter().map(|o| o.0.clone())).collect();
    uuids.sort();
    let due = match &s.leases_sent {
        None => true,
        Some((at, set)) => now_ms - at >= lease_ttl_ms / 3 || set != &uuids,
    };
    if due {
        let generation = |u: &str| s.generations.get(u).copied().unwrap_or(0);
        let mut leases: Vec<(String, String, u64)> =
            owned.iter().map(|g| (g.uuid.clone(), g.name.clone(), generation(&g.uuid))).collect();
        leases.extend(s.owned_unreported.iter().map(|(u, n)| (u.clone(), n.clone(), generation(u))));
        out.push(Action::GrantLeases { host: s.host.clone(), leases, issued_ms: now_ms });
    }
    if s.pending_boot_start && s.leases_sent.is_some() {
        if matches!(s.status, HostStatus::Available | HostStatus::NotAccepting) {
            for g in &owned {
                let want_running = s.desired.get(&g.uuid).is_some_and(|d| d == "running");
                if want_running && !running(g) {
                    out.push(Action::StartForBoot { host: s.host.clone(), uuid: g.uuid.clone(), name: g.name.clone() });
                }
            }
        }
        out.push(Action::BootStartDone { host: s.host.clone() });
    }
    out
}

/// Runs the reconciler forever: a pass every 500 ms over the hosts whose
/// state changed or whose leases are due, and over every connected host
/// every 30 s (the resync backstop of a level-triggered loop).
pub async fn run(reg: Arc<Registry>, lease_ttl_ms: i64) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut pass = 0u64;
    loop {
        tick.tick().await;
        let now = crate::now_ms();
        let full = pass % 60 == 0;
        pass += 1;
        // Snapshots and decisions are plain CPU work (a full pass over 10,000
        // hosts takes tens of ms): off the async workers, which carry the
        // agents' heartbeats.
        let r = reg.clone();
        let decided = tokio::task::spawn_blocking(move || {
            let mut decided = r.reconcile_each(now, lease_ttl_ms, full, |snap| decide(snap, now, lease_ttl_ms));
            decided.retain(|a| !a.is_empty());
            decided
        })
        .await
        .unwrap_or_default();
        for actions in decided {
            let reg = reg.clone();
            // Each host's actions run in order; hosts do not wait for each other.
            tokio::spawn(async move {
                for a in actions {
                    act(&reg, a, lease_ttl_ms).await;
                }
            });
        }
    }
}

async fn act(reg: &Registry, a: Action, lease_ttl_ms: i64) {
    let timeout = Duration::from_secs(20);
    match a {
        Action::GrantLeases { host, leases, issued_ms } => {
            let now = crate::now_ms();
            let uuids = {
                let mut u: Vec<String> = leases.iter().map(|l| l.0.clone()).collect();
                u.sort();
                u
            };
            // Mark first, so the next pass does not send the same again meanwhile.
            reg.leases_sent(&host, now, uuids);
            let cmd = GrantLeases {
                leases: leases.into_iter().map(|(uuid, name, generation)| Lease { uuid, name, generation }).collect(),
                expires_unix_ms: now + lease_ttl_ms,
                merge: false,
                issued_unix_ms: issued_ms,
            };
            match reg.call(&host, Kind::GrantLeases(cmd), timeout).await {
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
                        let _ = reg.db(|s| s.audit(&AuditRow::by_controller("guest.autostart_disabled", &host, name, detail)));
                    }
                }
                Ok(r) => warn!(%host, "granting leases failed: {}", r.error),
                Err(e) => warn!(%host, "granting leases failed: {e}"),
            }
        }
        Action::StopStale { host, uuid, name, owner } => {
            let detail = format!("{name} ({uuid}) is running on {host}, but Lifeboat recorded {owner} as its owner: stopping the copy on {host}");
            let _ = reg.raise_alarm(&host, "stale-copy-running", &detail);
            let r = reg.call(&host, Kind::StopGuest(StopGuest { uuid: uuid.clone(), reason: detail.clone() }), timeout).await;
            let outcome = match r {
                Ok(r) if r.ok => format!("stopped ({})", r.outcome),
                Ok(r) => format!("stop failed: {}", r.error),
                Err(e) => format!("stop failed: {e}"),
            };
            warn!(%host, guest = %name, "stale copy: {outcome}");
            let _ = reg.db(|s| s.audit(&AuditRow::by_controller("guest.stopped_stale", &host, &name, format!("{detail}: {outcome}"))));
        }
        Action::StartForBoot { host, uuid, name } => {
            let r = reg.call(&host, Kind::StartGuest(StartGuest { uuid: uuid.clone() }), timeout).await;
            let outcome = match r {
                Ok(r) if r.ok => format!("started ({})", r.outcome),
                Ok(r) => format!("start failed: {}", r.error),
                Err(e) => format!("start failed: {e}"),
            };
            info!(%host, guest = %name, "after reboot: {outcome}");
            let _ = reg.db(|s| {
                s.audit(&AuditRow::by_controller("guest.boot_start", &host, &name, format!("{host} rebooted; {name} ({uuid}) should run: {outcome}")))
            });
        }
        Action::BootStartDone { host } => reg.boot_start_done(&host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            guests: vec![g("1", true), g("2", false), g("3", true)],
            owners: [("1", "a"), ("2", "a"), ("3", "b")].iter().map(|(u, h)| (u.to_string(), h.to_string())).collect(),
            desired: [("1", "running"), ("2", "running")].iter().map(|(u, d)| (u.to_string(), d.to_string())).collect(),
            owned_unreported: vec![],
            generations: [("1".to_string(), 3u64)].into_iter().collect(),
        }
    }

    #[test]
    fn leases_cover_owned_guests_only_and_are_renewed() {
        let a = decide(&snap(), 1000, 30_000);
        assert!(a.contains(&Action::StopStale { host: "a".into(), uuid: "3".into(), name: "vm-3".into(), owner: "b".into() }));
        let leases = a.iter().find_map(|x| if let Action::GrantLeases { leases, .. } = x { Some(leases.clone()) } else { None }).unwrap();
        assert_eq!(leases.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(leases[0].2, 3, "a lease carries the ownership generation");
        let mut s = snap();
        s.leases_sent = Some((1000, vec!["1".into(), "2".into()]));
        assert!(!decide(&s, 5000, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })));
        assert!(decide(&s, 11_001, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })), "renewed at a third of the TTL");
    }

    #[test]
    fn a_rebooted_host_starts_what_should_run_after_its_leases() {
        let mut s = snap();
        s.pending_boot_start = true;
        assert!(!decide(&s, 1, 30_000).iter().any(|x| matches!(x, Action::StartForBoot { .. })), "leases first");
        s.leases_sent = Some((1, vec!["1".into(), "2".into()]));
        let a = decide(&s, 2, 30_000);
        assert_eq!(
            a.iter().filter(|x| matches!(x, Action::StartForBoot { .. })).collect::<Vec<_>>(),
            [&Action::StartForBoot { host: "a".into(), uuid: "2".into(), name: "vm-2".into() }]
        );
        assert!(a.contains(&Action::BootStartDone { host: "a".into() }));
        s.status = HostStatus::Maintenance;
        assert!(!decide(&s, 2, 30_000).iter().any(|x| matches!(x, Action::StartForBoot { .. })), "quarantine starts nothing");
    }

    #[test]
    fn an_offline_host_gets_no_leases() {
        let mut s = snap();
        s.status = HostStatus::Offline;
        assert!(!decide(&s, 1, 30_000).iter().any(|x| matches!(x, Action::GrantLeases { .. })));
    }
}
