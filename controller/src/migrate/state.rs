//! The job and move state machines, as explicit enums with an exhaustive
//! `valid_transition`. Pure: no I/O.

use std::fmt;
use std::str::FromStr;

/// One guest's move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveState {
    /// Recorded with the job; nothing done yet.
    Pending,
    /// Ownership written to the target; define sent (or about to be).
    Defining,
    /// Defined on the target (autostart off, ownership metadata).
    Defined,
    /// Start sent (or about to be).
    Starting,
    /// Running on the target, verified.
    Running,
    /// Defined on the target and left stopped (`--no-start`, or it was off).
    DefinedStopped,
    /// Failed; the error says where.
    Failed,
}

impl MoveState {
    /// Every state.
    pub const ALL: [MoveState; 7] = [
        MoveState::Pending,
        MoveState::Defining,
        MoveState::Defined,
        MoveState::Starting,
        MoveState::Running,
        MoveState::DefinedStopped,
        MoveState::Failed,
    ];

    /// Database and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveState::Pending => "PENDING",
            MoveState::Defining => "DEFINING",
            MoveState::Defined => "DEFINED",
            MoveState::Starting => "STARTING",
            MoveState::Running => "RUNNING",
            MoveState::DefinedStopped => "DEFINED_STOPPED",
            MoveState::Failed => "FAILED",
        }
    }

    /// Whether the move is over (successfully or not).
    pub fn is_terminal(self) -> bool {
        matches!(self, MoveState::Running | MoveState::DefinedStopped | MoveState::Failed)
    }

    /// Whether the move reached its goal.
    pub fn is_success(self) -> bool {
        matches!(self, MoveState::Running | MoveState::DefinedStopped)
    }

    /// Whether `self → to` is allowed. Staying in the same state is allowed
    /// for the in-flight states (a resumed step repeats itself).
    pub fn valid_transition(self, to: MoveState) -> bool {
        use MoveState::*;
        match (self, to) {
            (Pending, Defining) | (Pending, Failed) => true,
            (Defining, Defining) | (Defining, Defined) | (Defining, Failed) => true,
            (Defined, Starting) | (Defined, DefinedStopped) | (Defined, Failed) => true,
            (Starting, Starting) | (Starting, Running) | (Starting, Failed) => true,
            (Pending, _) | (Defining, _) | (Defined, _) | (Starting, _) => false,
            (Running, _) | (DefinedStopped, _) | (Failed, _) => false,
        }
    }
}

/// A forced-migration job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Written; nothing done yet.
    Created,
    /// Proving the source is off (BMC or attestation).
    Fencing,
    /// Defining and starting guests on targets.
    Moving,
    /// Every move succeeded.
    Succeeded,
    /// Some moves failed; re-running the command finishes the rest.
    Partial,
    /// Nothing was moved (e.g. power-off not confirmed).
    Failed,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] =
        [JobState::Created, JobState::Fencing, JobState::Moving, JobState::Succeeded, JobState::Partial, JobState::Failed];

    /// Database and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "CREATED",
            JobState::Fencing => "FENCING",
            JobState::Moving => "MOVING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Partial => "PARTIAL",
            JobState::Failed => "FAILED",
        }
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Partial | JobState::Failed)
    }

    /// Whether `self → to` is allowed.
    pub fn valid_transition(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Created, Fencing) | (Created, Failed) => true,
            (Fencing, Moving) | (Fencing, Failed) => true,
            (Moving, Succeeded) | (Moving, Partial) | (Moving, Failed) => true,
            (Created, _) | (Fencing, _) | (Moving, _) => false,
            (Succeeded, _) | (Partial, _) | (Failed, _) => false,
        }
    }
}

macro_rules! parse_and_display {
    ($t:ty, $what:literal) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t>::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| format!("unknown {} '{s}'", $what))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
parse_and_display!(MoveState, "move state");
parse_and_display!(JobState, "job state");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_walks_forward_only() {
        use MoveState::*;
        let happy = [Pending, Defining, Defined, Starting, Running];
        for w in happy.windows(2) {
            assert!(w[0].valid_transition(w[1]), "{} -> {}", w[0], w[1]);
        }
        assert!(Defined.valid_transition(DefinedStopped));
        for t in MoveState::ALL {
            assert!(!Running.valid_transition(t), "nothing leaves RUNNING");
            assert!(!Failed.valid_transition(t), "nothing leaves FAILED");
        }
        assert!(!Pending.valid_transition(Starting), "no start before define");
        assert!(!Pending.valid_transition(Running));
        assert!(!Defining.valid_transition(Starting));
        assert!(Defining.valid_transition(Defining), "a resumed define repeats");
    }

    #[test]
    fn a_job_never_moves_before_fencing() {
        use JobState::*;
        assert!(!Created.valid_transition(Moving));
        assert!(Created.valid_transition(Fencing) && Fencing.valid_transition(Moving));
        for t in JobState::ALL {
            assert!(!Succeeded.valid_transition(t));
            assert!(!Failed.valid_transition(t));
            assert!(!Partial.valid_transition(t));
        }
        assert!(!Fencing.valid_transition(Succeeded), "success only after moving");
    }

    #[test]
    fn names_round_trip() {
        for s in MoveState::ALL {
            assert_eq!(s.as_str().parse::<MoveState>().unwrap(), s);
        }
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        assert!("NOPE".parse::<JobState>().is_err());
    }
}
