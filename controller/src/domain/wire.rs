//! The domain's enums as the admin API's enums (`JobRecord.job_state`, ...).
//! Each wire enum has an "unspecified" 0 that no domain value maps to.

use lifeboat_proto::v1;

use super::host::HostStatus;
use super::job::{JobState, MoveState};
use super::{JobKind, PowerEvidence, UnknownValue};

impl JobState {
    /// The wire value (`JobRecord.job_state`).
    pub fn to_wire(self) -> v1::JobState {
        match self {
            JobState::Created => v1::JobState::Created,
            JobState::Fencing => v1::JobState::Fencing,
            JobState::Moving => v1::JobState::Moving,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Partial => v1::JobState::Partial,
            JobState::Failed => v1::JobState::Failed,
        }
    }

    /// The value with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<JobState, UnknownValue> {
        JobState::ALL
            .iter()
            .copied()
            .find(|v| v.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("job state", &n.to_string()))
    }
}

impl MoveState {
    /// The wire value (`MoveRecord.move_state`).
    pub fn to_wire(self) -> v1::MoveState {
        match self {
            MoveState::Pending => v1::MoveState::Pending,
            MoveState::Defining => v1::MoveState::Defining,
            MoveState::Defined => v1::MoveState::Defined,
            MoveState::Starting => v1::MoveState::Starting,
            MoveState::Running => v1::MoveState::Running,
            MoveState::DefinedStopped => v1::MoveState::DefinedStopped,
            MoveState::Failed => v1::MoveState::Failed,
            MoveState::NotMoved => v1::MoveState::NotMoved,
        }
    }

    /// The value with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<MoveState, UnknownValue> {
        MoveState::ALL
            .iter()
            .copied()
            .find(|v| v.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("move state", &n.to_string()))
    }
}

impl HostStatus {
    /// The wire value (`HostRecord.host_status`).
    pub fn to_wire(self) -> v1::HostStatus {
        match self {
            HostStatus::Available => v1::HostStatus::Available,
            HostStatus::NotAccepting => v1::HostStatus::NotAccepting,
            HostStatus::Maintenance => v1::HostStatus::Maintenance,
            HostStatus::Offline => v1::HostStatus::Offline,
        }
    }

    /// The value with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<HostStatus, UnknownValue> {
        HostStatus::ALL
            .iter()
            .copied()
            .find(|v| v.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("host status", &n.to_string()))
    }
}

impl JobKind {
    /// The wire value (`JobRecord.job_kind`).
    pub fn to_wire(self) -> v1::JobKind {
        match self {
            JobKind::Migrate => v1::JobKind::Migrate,
            JobKind::Move => v1::JobKind::Move,
        }
    }

    /// The value with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<JobKind, UnknownValue> {
        JobKind::ALL
            .iter()
            .copied()
            .find(|v| v.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("job kind", &n.to_string()))
    }
}

impl PowerEvidence {
    /// The wire value (`JobRecord.evidence`, `MigrationPlan.evidence`).
    pub fn to_wire(self) -> v1::PowerEvidence {
        match self {
            PowerEvidence::None => v1::PowerEvidence::None,
            PowerEvidence::StoppedByAgent => v1::PowerEvidence::StoppedByAgent,
            PowerEvidence::BmcOff => v1::PowerEvidence::BmcOff,
            PowerEvidence::BmcFence => v1::PowerEvidence::BmcFence,
            PowerEvidence::Attestation => v1::PowerEvidence::Attestation,
        }
    }

    /// The value with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<PowerEvidence, UnknownValue> {
        PowerEvidence::ALL
            .iter()
            .copied()
            .find(|v| v.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("power evidence", &n.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every domain value has its own wire value, none is "unspecified", and
    /// the wire enum has no value the domain lacks: the wire name is the
    /// domain name under the enum's prefix.
    fn one_to_one(prefix: &str, pairs: &[(String, i32, &str)], wire_values: usize) {
        let numbers: BTreeSet<i32> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(numbers.len(), pairs.len(), "{prefix}: a wire value used twice");
        assert!(!numbers.contains(&0), "{prefix}: a value maps to unspecified");
        assert_eq!(wire_values, pairs.len() + 1, "{prefix}: the wire enum has values the domain lacks");
        for (name, _, wire_name) in pairs {
            let want = if name.is_empty() { "NONE".to_string() } else { name.to_uppercase().replace('-', "_") };
            assert_eq!(*wire_name, format!("{prefix}{want}"));
        }
    }

    fn count<T>(f: impl Fn(i32) -> Option<T>) -> usize {
        (0..100).filter(|n| f(*n).is_some()).count()
    }

    #[test]
    fn wire_enums_match_the_domain_one_to_one() {
        let p: Vec<_> =
            JobState::ALL.iter().map(|s| (s.as_str().into(), s.to_wire() as i32, s.to_wire().as_str_name())).collect();
        one_to_one("JOB_STATE_", &p, count(|n| v1::JobState::try_from(n).ok()));
        let p: Vec<_> =
            MoveState::ALL.iter().map(|s| (s.as_str().into(), s.to_wire() as i32, s.to_wire().as_str_name())).collect();
        one_to_one("MOVE_STATE_", &p, count(|n| v1::MoveState::try_from(n).ok()));
        let p: Vec<_> = HostStatus::ALL
            .iter()
            .map(|s| (s.as_str().into(), s.to_wire() as i32, s.to_wire().as_str_name()))
            .collect();
        one_to_one("HOST_STATUS_", &p, count(|n| v1::HostStatus::try_from(n).ok()));
        let p: Vec<_> =
            JobKind::ALL.iter().map(|s| (s.as_str().into(), s.to_wire() as i32, s.to_wire().as_str_name())).collect();
        one_to_one("JOB_KIND_", &p, count(|n| v1::JobKind::try_from(n).ok()));
        let p: Vec<_> = PowerEvidence::ALL
            .iter()
            .map(|s| (s.as_str().into(), s.to_wire() as i32, s.to_wire().as_str_name()))
            .collect();
        one_to_one("POWER_EVIDENCE_", &p, count(|n| v1::PowerEvidence::try_from(n).ok()));
    }

    #[test]
    fn wire_numbers_read_back_and_unknown_ones_refuse() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_wire(s.to_wire() as i32), Ok(s));
        }
        for s in MoveState::ALL {
            assert_eq!(MoveState::from_wire(s.to_wire() as i32), Ok(s));
        }
        for s in HostStatus::ALL {
            assert_eq!(HostStatus::from_wire(s.to_wire() as i32), Ok(s));
        }
        for s in JobKind::ALL {
            assert_eq!(JobKind::from_wire(s.to_wire() as i32), Ok(*s));
        }
        for s in PowerEvidence::ALL {
            assert_eq!(PowerEvidence::from_wire(s.to_wire() as i32), Ok(*s));
        }
        for n in [0, -1, 99, i32::MAX] {
            assert_eq!(JobState::from_wire(n).unwrap_err().what, "job state");
            assert_eq!(MoveState::from_wire(n).unwrap_err().what, "move state");
            assert_eq!(HostStatus::from_wire(n).unwrap_err().what, "host status");
            assert_eq!(JobKind::from_wire(n).unwrap_err().what, "job kind");
            assert_eq!(PowerEvidence::from_wire(n).unwrap_err().what, "power evidence");
        }
    }
}
