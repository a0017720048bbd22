//! libvirt's state and reason numbers as Lifeboat's states and names (pure).

use lifeboat_proto::v1::GuestState;

/// libvirt `virDomainState` → [`GuestState`].
pub fn guest_state(st: i32) -> GuestState {
    match st {
        0 => GuestState::Nostate,
        1 => GuestState::Running,
        2 => GuestState::Blocked,
        3 => GuestState::Paused,
        4 => GuestState::Shutdown,
        5 => GuestState::Shutoff,
        6 => GuestState::Crashed,
        7 => GuestState::Pmsuspended,
        _ => GuestState::Unspecified,
    }
}

/// The reason's name, as `virsh domstate --reason` prints it.
pub fn reason_name(st: i32, reason: i32) -> String {
    let names: &[&str] = match st {
        1 => &[
            "unknown",
            "booted",
            "migrated",
            "restored",
            "from snapshot",
            "unpaused",
            "migration canceled",
            "save canceled",
            "event wakeup",
            "crashed",
            "post-copy",
            "post-copy failed",
        ],
        3 => &[
            "unknown",
            "user",
            "migrating",
            "saving",
            "dumping",
            "I/O error",
            "watchdog",
            "from snapshot",
            "shutting down",
            "creating snapshot",
            "crashed",
            "starting up",
            "post-copy",
            "post-copy failed",
            "api error",
        ],
        4 => &["unknown", "user"],
        5 => &["unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from snapshot", "daemon"],
        6 => &["unknown", "panicked"],
        _ => &["unknown"],
    };
    usize::try_from(reason)
        .ok()
        .and_then(|r| names.get(r))
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("reason {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_reasons_map() {
        assert_eq!(guest_state(1), GuestState::Running);
        assert_eq!(guest_state(5), GuestState::Shutoff);
        assert_eq!(guest_state(42), GuestState::Unspecified);
        assert_eq!(reason_name(5, 2), "destroyed");
        assert_eq!(reason_name(1, 1), "booted");
        assert_eq!(reason_name(1, 99), "reason 99");
    }
}
