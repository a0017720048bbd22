//! The admin API's enum fields, read strictly. Decisions key on them; the
//! string fields beside them are what is shown (and what `-o json` prints).
//! A number this CLI does not know (a newer controller), or none at all,
//! reads as `None`: it decides nothing and shows as "unknown".

use lifeboat_proto::v1::{
    CleanupAction, CleanupItem, JobRecord, JobState, MigrationPlan, MoveRecord, MoveState, PowerEvidence,
};

/// What an unknown enum value shows as.
pub const UNKNOWN: &str = "unknown";

/// A wire enum number as `T`; 0 (unspecified) and unknown numbers are `None`.
fn known<T: TryFrom<i32> + PartialEq>(n: i32, unspecified: T) -> Option<T> {
    T::try_from(n).ok().filter(|v| *v != unspecified)
}

/// The job's state, when it is one this CLI knows.
pub fn job_state(j: &JobRecord) -> Option<JobState> {
    known(j.job_state, JobState::Unspecified)
}

/// Whether a job in this state is over (SUCCEEDED, PARTIAL, FAILED).
pub fn is_terminal(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Partial | JobState::Failed)
}

/// Whether the job is known to be over; a state that does not read is not.
pub fn job_over(j: &JobRecord) -> bool {
    job_state(j).is_some_and(is_terminal)
}

/// The job's state as shown: its name, or "unknown".
pub fn job_state_shown(j: &JobRecord) -> &str {
    if job_state(j).is_some() { &j.state } else { UNKNOWN }
}

/// The move's state, when it is one this CLI knows.
pub fn move_state(m: &MoveRecord) -> Option<MoveState> {
    known(m.move_state, MoveState::Unspecified)
}

/// The move's state as shown: its name, or "unknown".
pub fn move_state_shown(m: &MoveRecord) -> &str {
    if move_state(m).is_some() { &m.state } else { UNKNOWN }
}

/// The guest runs (or was left defined and stopped) on its target.
pub fn moved(m: &MoveRecord) -> bool {
    matches!(move_state(m), Some(MoveState::Running | MoveState::DefinedStopped))
}

/// The guest stayed on its source: the move failed, or the plan could not move it.
pub fn left_behind(m: &MoveRecord) -> bool {
    matches!(move_state(m), Some(MoveState::Failed | MoveState::NotMoved))
}

/// The plan is a planned move (the source's agent stops the guest).
pub fn is_planned_move(p: &MigrationPlan) -> bool {
    known(p.evidence, PowerEvidence::Unspecified) == Some(PowerEvidence::StoppedByAgent)
}

/// The cleanup item's action, when it is one this CLI knows.
pub fn cleanup_action(i: &CleanupItem) -> Option<CleanupAction> {
    known(i.cleanup_action, CleanupAction::Unspecified)
}

/// The cleanup item's action as shown: its name, or "unknown".
pub fn cleanup_action_shown(i: &CleanupItem) -> &str {
    if cleanup_action(i).is_some() { &i.action } else { UNKNOWN }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_numbers_decide_nothing_and_show_unknown() {
        for n in [0, 7, 99, -1, i32::MAX] {
            let j = JobRecord { state: "SUCCEEDED".into(), job_state: n, ..Default::default() };
            assert_eq!(job_state(&j), None, "{n}");
            assert!(!job_over(&j));
            assert_eq!(job_state_shown(&j), "unknown");
        }
        for n in [0, 9, 1000] {
            let m = MoveRecord { state: "RUNNING".into(), move_state: n, ..Default::default() };
            assert!(!moved(&m) && !left_behind(&m));
            assert_eq!(move_state_shown(&m), "unknown");
            let i = CleanupItem { action: "failed".into(), cleanup_action: n + 10, ..Default::default() };
            assert_eq!((cleanup_action(&i), cleanup_action_shown(&i)), (None, "unknown"));
        }
        let p = MigrationPlan { power_evidence: "stopped-by-agent".into(), evidence: 77, ..Default::default() };
        assert!(!is_planned_move(&p));
    }

    #[test]
    fn the_enum_fields_stay_out_of_the_json_output() {
        use lifeboat_proto::v1::{Check, HostRecord};
        let keys = |v: serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        let j = JobRecord {
            job_state: 4,
            job_kind: 1,
            evidence: 3,
            moves: vec![MoveRecord::default()],
            ..Default::default()
        };
        let v = serde_json::to_value(&j).unwrap();
        assert!(keys(v["moves"][0].clone()).iter().all(|k| k != "move_state"));
        let k = keys(v);
        assert!(!k.iter().any(|k| ["job_state", "job_kind", "evidence"].contains(&k.as_str())), "{k:?}");
        assert_eq!(
            keys(serde_json::to_value(Check { id: 9, ..Default::default() }).unwrap()),
            ["detail", "name", "ok", "remedy"]
        );
        let k = keys(serde_json::to_value(CleanupItem::default()).unwrap());
        assert!(!k.contains(&"cleanup_action".to_string()), "{k:?}");
        let k = keys(serde_json::to_value(MigrationPlan::default()).unwrap());
        assert!(!k.contains(&"evidence".to_string()) && k.contains(&"power_evidence".to_string()), "{k:?}");
        let k = keys(serde_json::to_value(HostRecord::default()).unwrap());
        assert!(!k.contains(&"host_status".to_string()), "{k:?}");
    }

    #[test]
    fn known_numbers_decide_and_show_their_names() {
        let j = JobRecord { state: "PARTIAL".into(), job_state: JobState::Partial as i32, ..Default::default() };
        assert!(job_over(&j));
        assert_eq!(job_state_shown(&j), "PARTIAL");
        let j = JobRecord { state: "MOVING".into(), job_state: JobState::Moving as i32, ..Default::default() };
        assert!(!job_over(&j));
        let m = MoveRecord { state: "NOT_MOVED".into(), move_state: MoveState::NotMoved as i32, ..Default::default() };
        assert!(left_behind(&m) && !moved(&m));
        assert_eq!(move_state_shown(&m), "NOT_MOVED");
        let p = MigrationPlan { evidence: PowerEvidence::StoppedByAgent as i32, ..Default::default() };
        assert!(is_planned_move(&p));
    }
}
