//! Hosts: liveness, timing and the operators' statuses. Pure: no I/O.

use std::fmt;
use std::str::FromStr;

/// Timing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Heartbeat interval agents use.
    pub heartbeat_interval_ms: u32,
    /// Silence after which a host is UNREACHABLE.
    pub unreachable_after_ms: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { heartbeat_interval_ms: 1000, unreachable_after_ms: 3000 }
    }
}

/// Whether we hear from a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from within the detection time.
    Reachable,
    /// Silent longer than the detection time (or never heard since the
    /// controller started, once it has been up for the detection time). Unreachable is not dead: it proves nothing
    /// about the host's power.
    Unreachable,
}

impl Liveness {
    /// Name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Reachable => "REACHABLE",
            Liveness::Unreachable => "UNREACHABLE",
        }
    }
}

/// Liveness from the last time anything arrived from the host.
pub fn liveness(now_ms: i64, last_heard_ms: Option<i64>, timing: Timing) -> Liveness {
    match last_heard_ms {
        Some(t) if now_ms.saturating_sub(t) <= i64::from(timing.unreachable_after_ms) => Liveness::Reachable,
        _ => Liveness::Unreachable,
    }
}

/// The operators' host statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostStatus {
    /// A target for new and migrated guests.
    Available,
    /// No automatic placement; may be named as a target explicitly.
    NotAccepting,
    /// Nothing is placed there; its guests are to be moved away.
    Maintenance,
    /// Declared dead; its guests are to be recreated elsewhere.
    Offline,
}

impl HostStatus {
    /// Every status.
    pub const ALL: [HostStatus; 4] =
        [HostStatus::Available, HostStatus::NotAccepting, HostStatus::Maintenance, HostStatus::Offline];

    /// Name used in the API, CLI and database.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Available => "AVAILABLE",
            HostStatus::NotAccepting => "NOT_ACCEPTING",
            HostStatus::Maintenance => "MAINTENANCE",
            HostStatus::Offline => "OFFLINE",
        }
    }
}

impl HostStatus {
    /// The status with exactly this name (stored and wire values): no
    /// trimming, no case folding. Anything else is unknown and refuses.
    pub fn from_name(s: &str) -> Result<HostStatus, super::UnknownValue> {
        HostStatus::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| super::UnknownValue::new("host status", s))
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HostStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase().replace('-', "_");
        HostStatus::ALL.into_iter().find(|h| h.as_str() == up).ok_or_else(|| {
            format!("unknown host status '{s}' (expected AVAILABLE, NOT_ACCEPTING, MAINTENANCE or OFFLINE)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_boundaries() {
        let t = Timing::default();
        assert_eq!(liveness(10_000, Some(7_000), t), Liveness::Reachable);
        assert_eq!(liveness(10_000, Some(6_999), t), Liveness::Unreachable);
        assert_eq!(liveness(10_000, None, t), Liveness::Unreachable);
    }

    #[test]
    fn statuses_round_trip() {
        for s in HostStatus::ALL {
            assert_eq!(s.as_str().parse::<HostStatus>().unwrap(), s);
        }
        assert_eq!("not-accepting".parse::<HostStatus>().unwrap(), HostStatus::NotAccepting);
        assert!("dead".parse::<HostStatus>().unwrap_err().contains("AVAILABLE"));
        for s in HostStatus::ALL {
            assert_eq!(HostStatus::from_name(s.as_str()), Ok(s));
        }
        for bad in ["available", " AVAILABLE", "NOT-ACCEPTING", "", "DEAD"] {
            assert_eq!(HostStatus::from_name(bad).unwrap_err().what, "host status", "{bad:?}");
        }
    }
}
