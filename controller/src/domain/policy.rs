//! Floor 1 (domain, pure): the registry's rules, as functions of plain values:
//! what a returning host means, when a host reads UNREACHABLE after a
//! controller restart, which reported guests are acceptable, what the
//! duplicate-agent alarm says, and the figures kept per host.
//!
//! Architecture invariant: every function here is a function of its
//! arguments (the clock is an argument); the registry only gathers the
//! arguments under its lock and stores the results.

use std::collections::BTreeMap;
use std::net::IpAddr;

use lifeboat_proto::v1::{GrantLeases, Guest, GuestState, Lease};

use crate::domain::host::{HostStatus, Liveness, Timing, liveness};

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

/// Decides what a returning host means.
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

/// The `duplicate-agent` alarm's text: the same for both orders of the two
/// addresses, so agents that keep taking the session from each other raise
/// it once.
pub fn duplicate_agent_detail(host: &str, a: IpAddr, b: IpAddr) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!(
        "two agents claim to be {host} (certificate CN={host}): one connected from {lo}, the other from {hi}, while the first \
         was still talking; each new session closes the other. One of them is not {host}: find it (a cloned host, a copied \
         certificate) and stop it; revoke the certificate if it was copied. Until then {host}'s liveness cannot be trusted: \
         it is never force-migrated while this alarm is active"
    )
}

/// Why a reported guest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidGuest {
    /// The guest has no UUID.
    #[error("guest '{name}' has no UUID")]
    NoUuid {
        /// Its name as reported.
        name: String,
    },
    /// The guest has no name.
    #[error("guest {uuid} has no name")]
    NoName {
        /// Its UUID as reported.
        uuid: String,
    },
}

/// Whether a reported guest can be kept: it has a UUID and a name.
pub fn valid_guest(g: &Guest) -> Result<(), InvalidGuest> {
    if g.uuid.trim().is_empty() {
        return Err(InvalidGuest::NoUuid { name: g.name.clone() });
    }
    if g.name.trim().is_empty() {
        return Err(InvalidGuest::NoName { uuid: g.uuid.clone() });
    }
    Ok(())
}

/// Liveness of a host after a controller (re)start: silence counts from
/// the later of the last message and the controller's start, so no host
/// reads UNREACHABLE before the controller has been up for the detection
/// time (its agent had no chance to reconnect: a host heard a moment before
/// a restart is not silent). Only the reading waits: a forced migration's
/// "source silent" check counts from the same instant, so it can pass later
/// because of a restart, never sooner.
pub fn liveness_since_start(now_ms: i64, last_heard_ms: Option<i64>, started_ms: i64, timing: Timing) -> Liveness {
    liveness(now_ms, Some(last_heard_ms.unwrap_or(started_ms).max(started_ms)), timing)
}

/// UUIDs by owning host, from (host, uuid) pairs.
pub fn by_host<'a>(owners: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (host, uuid) in owners {
        m.entry(host.to_string()).or_default().push(uuid.to_string());
    }
    m
}

/// Whether a guest in `state` runs (running, paused or blocked): its memory
/// is taken on its host and its desired state is "running". Narrower than
/// [`lifeboat_proto::holds_disk`] (which also counts crashed, shutting down
/// and unknown states, to protect disks); the same rule as
/// `crate::migrate::plan::is_running`.
pub fn runs(state: i32) -> bool {
    matches!(
        GuestState::try_from(state).unwrap_or(GuestState::Unspecified),
        GuestState::Running | GuestState::Paused | GuestState::Blocked
    )
}

/// Memory of the running guests of one host, KiB, from (state, memory KiB) pairs.
pub fn running_kib(guests: impl IntoIterator<Item = (i32, u64)>) -> u64 {
    // Saturating: the figures come from the agent, and an overflow must neither
    // panic under the registry lock nor wrap to a host that looks empty.
    guests.into_iter().filter(|(state, _)| runs(*state)).fold(0u64, |a, (_, kib)| a.saturating_add(kib))
}

/// What the desired state of a guest reported by `host` becomes, if it
/// changes: "running" while it runs; "stopped" when it was shut off on
/// purpose (an event saying so) or when nothing was recorded for it yet.
/// `current` is its recorded (host, desired state). The caller has checked
/// that `host` owns the guest (a non-owner's report changes nothing).
pub fn desired_change(
    host: &str,
    state: i32,
    state_reason: &str,
    from_event: bool,
    current: Option<(&str, &str)>,
) -> Option<&'static str> {
    let want = match GuestState::try_from(state).unwrap_or(GuestState::Unspecified) {
        GuestState::Running | GuestState::Paused | GuestState::Blocked => Some("running"),
        GuestState::Shutoff if from_event && matches!(state_reason, "shutdown" | "destroyed" | "saved") => {
            Some("stopped")
        }
        GuestState::Shutoff if current.is_none() => Some("stopped"),
        _ => None,
    }?;
    match current {
        Some((h, w)) if h == host && w == want => None,
        _ => Some(want),
    }
}

/// One guest's start lease, merged into what the host holds (revokes
/// nothing), issued at `now_ms` and valid for `ttl_ms`: what every start
/// sends first, so the host's start guard lets exactly this generation start.
pub fn merged_lease_at(uuid: &str, name: &str, generation: u64, ttl_ms: i64, now_ms: i64) -> GrantLeases {
    GrantLeases {
        leases: vec![Lease { uuid: uuid.into(), name: name.into(), generation }],
        expires_unix_ms: now_ms.saturating_add(ttl_ms),
        merge: true,
        issued_unix_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_follows_a_running_guest_and_a_deliberate_stop() {
        let run = GuestState::Running as i32;
        let off = GuestState::Shutoff as i32;
        let crashed = GuestState::Crashed as i32;
        assert_eq!(desired_change("a", run, "", false, None), Some("running"));
        assert_eq!(desired_change("a", run, "", false, Some(("a", "running"))), None);
        assert_eq!(desired_change("a", run, "", false, Some(("b", "running"))), Some("running"), "moved here");
        assert_eq!(desired_change("a", off, "", false, None), Some("stopped"), "first seen off");
        assert_eq!(desired_change("a", off, "", false, Some(("a", "running"))), None, "off, not on purpose");
        assert_eq!(desired_change("a", off, "crashed", true, Some(("a", "running"))), None);
        assert_eq!(desired_change("a", off, "shutdown", true, Some(("a", "running"))), Some("stopped"));
        assert_eq!(desired_change("a", crashed, "", false, None), None, "a crashed guest decides nothing");
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
    fn a_return_from_offline_is_not_a_reboot_and_a_same_boot_id_says_it_never_powered_off() {
        let off = HostStatus::Offline.as_str();
        let e = classify_return(off, "b1", "b1", "b1");
        assert_eq!(e, ReturnEvent { returned_from_offline: true, same_boot_id: true, rebooted: false });
        assert!(!classify_return(off, "b1", "b1", "b2").same_boot_id);
        assert!(!classify_return(off, "b1", "", "").same_boot_id, "an unknown boot id proves nothing");
        let avail = HostStatus::Available.as_str();
        assert_eq!(classify_return(avail, "b1", "", "b2"), ReturnEvent { rebooted: true, ..Default::default() });
        assert_eq!(classify_return(avail, "b1", "", "b1"), ReturnEvent::default());
        assert_eq!(classify_return(avail, "", "", "b2"), ReturnEvent::default(), "first boot id seen");
        assert_eq!(classify_return(avail, "b1", "", ""), ReturnEvent::default(), "no boot id reported");
    }

    #[test]
    fn the_duplicate_agent_text_is_the_same_for_both_orders() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(duplicate_agent_detail("h", a, b), duplicate_agent_detail("h", b, a));
        assert!(duplicate_agent_detail("h", b, a).contains("from 10.0.0.1, the other from 10.0.0.2"));
    }

    #[test]
    fn a_guest_without_uuid_or_name_is_invalid() {
        let g = |uuid: &str, name: &str| Guest { uuid: uuid.into(), name: name.into(), ..Default::default() };
        assert_eq!(valid_guest(&g(" ", "vm")), Err(InvalidGuest::NoUuid { name: "vm".into() }));
        assert_eq!(valid_guest(&g("u", "")), Err(InvalidGuest::NoName { uuid: "u".into() }));
        assert_eq!(valid_guest(&g("u", "vm")), Ok(()));
        assert_eq!(InvalidGuest::NoUuid { name: "vm".into() }.to_string(), "guest 'vm' has no UUID");
    }

    #[test]
    fn running_memory_counts_guests_holding_their_disks_and_saturates() {
        let run = GuestState::Running as i32;
        let off = GuestState::Shutoff as i32;
        let paused = GuestState::Paused as i32;
        assert_eq!(running_kib([(run, 5), (off, 7), (paused, 11)]), 16);
        assert_eq!(running_kib([(run, u64::MAX), (run, 1)]), u64::MAX);
        assert_eq!(running_kib([(off, u64::MAX), (off, 1)]), 0);
        assert_eq!(running_kib([(i32::MAX, 3)]), 0, "an unknown state holds no disk");
    }

    #[test]
    fn owners_group_by_host() {
        let m = by_host([("a", "u1"), ("b", "u2"), ("a", "u3")]);
        assert_eq!(m["a"], vec!["u1".to_string(), "u3".to_string()]);
        assert_eq!(m["b"], vec!["u2".to_string()]);
    }

    #[test]
    fn a_merged_lease_revokes_nothing_and_expires_after_its_ttl() {
        let g = merged_lease_at("u", "vm", 3, 1000, 5000);
        assert!(g.merge);
        assert_eq!((g.issued_unix_ms, g.expires_unix_ms), (5000, 6000));
        assert_eq!(g.leases, vec![Lease { uuid: "u".into(), name: "vm".into(), generation: 3 }]);
        assert_eq!(merged_lease_at("u", "vm", 3, i64::MAX, 5000).expires_unix_ms, i64::MAX);
    }
}
