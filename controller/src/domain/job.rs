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
    /// Left behind: the plan could not move this guest (local disks, no
    /// target with room, unknown definition...); the error says why. Only
    /// ever written when the job is created, and never acted on.
    NotMoved,
}

impl MoveState {
    /// Every state.
    pub const ALL: [MoveState; 8] = [
        MoveState::Pending,
        MoveState::Defining,
        MoveState::Defined,
        MoveState::Starting,
        MoveState::Running,
        MoveState::DefinedStopped,
        MoveState::Failed,
        MoveState::NotMoved,
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
            MoveState::NotMoved => "NOT_MOVED",
        }
    }

    /// Whether the move is over (successfully or not).
    pub fn is_terminal(self) -> bool {
        matches!(self, MoveState::Running | MoveState::DefinedStopped | MoveState::Failed | MoveState::NotMoved)
    }

    /// Whether the move reached its goal.
    pub fn is_success(self) -> bool {
        matches!(self, MoveState::Running | MoveState::DefinedStopped)
    }

    /// Whether the guest was left where it was (the move failed, or was
    /// never attempted because the plan could not place it).
    pub fn is_left_behind(self) -> bool {
        matches!(self, MoveState::Failed | MoveState::NotMoved)
    }

    /// Whether `self → to` is allowed. Staying in the same state is allowed
    /// for the in-flight states (a resumed step repeats itself). Nothing
    /// enters NOT_MOVED (a row is created in it) and nothing leaves it.
    pub fn valid_transition(self, to: MoveState) -> bool {
        use MoveState::*;
        match (self, to) {
            (Pending, Defining) | (Pending, Failed) => true,
            (Defining, Defining) | (Defining, Defined) | (Defining, Failed) => true,
            (Defined, Starting) | (Defined, DefinedStopped) | (Defined, Failed) => true,
            (Starting, Starting) | (Starting, Running) | (Starting, Failed) => true,
            (Pending, _) | (Defining, _) | (Defined, _) | (Starting, _) => false,
            (Running, _) | (DefinedStopped, _) | (Failed, _) | (NotMoved, _) => false,
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
    /// Some moves failed or were never attempted; the job's error says what
    /// finishes the rest (the same command again, or, when the source talks
    /// again, a planned move per target).
    Partial,
    /// Nothing was moved (e.g. power-off not confirmed).
    Failed,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 6] = [
        JobState::Created,
        JobState::Fencing,
        JobState::Moving,
        JobState::Succeeded,
        JobState::Partial,
        JobState::Failed,
    ];

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

/// Kind of alarm raised on a job's source host when the job leaves guests
/// behind (moves that failed or were never attempted).
pub const GUESTS_NOT_MOVED: &str = "guests-not-moved";

/// Guests named one by one in a job's error text and its alarm; the rest
/// are counted (every one is listed by `lifeboat jobs show`).
const LISTED: usize = 10;

/// Longest reason quoted per guest in a job's error text, in characters.
const REASON_CHARS: usize = 300;

/// One guest's move, as a job's outcome sees it.
#[derive(Debug, Clone, Copy)]
pub struct MoveOutcome<'a> {
    /// Guest name.
    pub name: &'a str,
    /// Where its move ended.
    pub state: MoveState,
    /// Why it failed or was not moved.
    pub error: &'a str,
    /// The target the plan chose (may be empty for a guest not moved).
    pub target: &'a str,
    /// Whether the guest waits to run again on the source (see `crate::waiting`).
    pub waits: bool,
    /// The host its move recorded as new owner when that move is left
    /// unfinished (see `crate::waiting::unfinished`): only an operator's
    /// `lifeboat move` to that host finishes it; it starts nowhere by itself.
    pub unfinished: Option<&'a str>,
}

/// How a job ends once every move it carries out is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// SUCCEEDED (every guest moved), FAILED (none moved) or PARTIAL.
    pub state: JobState,
    /// The job's error: each guest left behind, why, and what to do next
    /// (empty on success).
    pub error: String,
    /// The detail of the job's final audit entry.
    pub detail: String,
    /// The detail of the [`GUESTS_NOT_MOVED`] alarm to raise on the source,
    /// when guests were left behind.
    pub alarm: Option<String>,
}

/// Decides how a job ends from its moves: SUCCEEDED only when every guest
/// of the job reached its target; FAILED when none did; PARTIAL otherwise.
/// A guest the plan could not place (NOT_MOVED) counts as left behind just
/// like a failed move: for a forced migration it runs nowhere while the
/// source stays off. `planned` is a planned move (`lifeboat move`), whose
/// source is alive. `source_talking`: the source of a forced migration
/// talks to the controller again (it came back mid-job): re-running the
/// forced migration would be refused, so the advice is a planned move of
/// each guest left (`lifeboat move`), or letting them wait on the source.
pub fn job_outcome(
    job_id: &str,
    source: &str,
    planned: bool,
    source_talking: bool,
    moves: &[MoveOutcome<'_>],
) -> JobOutcome {
    let talking = source_talking && !planned;
    let total = moves.len();
    let moved = moves.iter().filter(|m| m.state.is_success()).count();
    let left: Vec<&MoveOutcome<'_>> = moves.iter().filter(|m| !m.state.is_success()).collect();
    let summary = format!("{moved} of {total} guest(s) moved");
    if left.is_empty() {
        return JobOutcome { state: JobState::Succeeded, error: String::new(), detail: summary, alarm: None };
    }
    let mut listed: Vec<String> = left
        .iter()
        .take(LISTED)
        .map(|m| {
            let what = match m.state {
                MoveState::NotMoved => "not moved",
                MoveState::Failed => "move failed",
                other => return format!("{} (still {other})", m.name),
            };
            let why = if m.error.is_empty() { "no reason recorded".to_string() } else { clip(m.error, REASON_CHARS) };
            if let Some(t) = m.unfinished {
                return format!(
                    "{} ({what}: {why}; unfinished move to {t}: nobody's until it is finished, not started by itself)",
                    m.name
                );
            }
            let place = match (planned || talking, m.state, m.waits) {
                (true, MoveState::NotMoved, _) if planned => format!("; still on {source}, untouched"),
                (true, _, true) => format!("; stopped on {source}, waits to start there again"),
                (true, _, false) => format!("; stopped on {source}, running nowhere"),
                (false, _, true) => format!("; waits for {source} to return"),
                (false, _, false) => String::new(),
            };
            format!("{} ({what}: {why}{place})", m.name)
        })
        .collect();
    if left.len() > LISTED {
        listed.push(format!("and {} more (`lifeboat jobs show {job_id}` lists every one)", left.len() - LISTED));
    }
    let list = listed.join(", ");
    let failed = left.iter().any(|m| m.state != MoveState::NotMoved);
    let not_moved = left.iter().any(|m| m.state == MoveState::NotMoved);
    // Nothing moved but nothing failed either (every guest recorded NOT_MOVED,
    // e.g. no capacity anywhere): the job did all it could and reports them.
    let (state, lead) = match (moved, failed) {
        (0, true) => (JobState::Failed, "no guest could be moved"),
        (0, false) => (JobState::Partial, "no guest could be moved"),
        _ => (JobState::Partial, ""),
    };
    let head = match (planned, talking, lead.is_empty()) {
        (_, true, true) => {
            format!("{source} is talking to the controller again: {} guest(s) not moved off it", left.len())
        }
        (_, true, false) => {
            format!("{lead}: {source} is talking to the controller again: {} guest(s) not moved off it", left.len())
        }
        (false, false, true) => {
            format!("{} guest(s) left behind, running nowhere while {source} stays off", left.len())
        }
        (false, false, false) => format!("{lead}: {} guest(s) run nowhere while {source} stays off", left.len()),
        (true, _, true) => format!("{} guest(s) not moved off {source}", left.len()),
        (true, _, false) => format!("{lead}: {} guest(s) not moved off {source}", left.len()),
    };
    let mut next = Vec::new();
    if talking {
        // One planned move per target, for the guests named above.
        let mut by_target: Vec<(&str, Vec<&str>)> = Vec::new();
        for m in left.iter().take(LISTED) {
            let t = m.unfinished.unwrap_or(if m.target.is_empty() { "TARGET" } else { m.target });
            match by_target.iter_mut().find(|(x, _)| *x == t) {
                Some((_, v)) => v.push(m.name),
                None => by_target.push((t, vec![m.name])),
            }
        }
        let cmds: Vec<String> = by_target
            .iter()
            .map(|(t, vms)| {
                let vms: String = vms.iter().map(|v| format!("--vm {v} ")).collect();
                format!("`lifeboat move {vms}--from {source} --to {t} --yes`")
            })
            .collect();
        let rest = if left.len() > LISTED {
            format!(" (and likewise the rest: `lifeboat jobs show {job_id}`)")
        } else {
            String::new()
        };
        let placeholder =
            if by_target.iter().any(|(t, _)| *t == "TARGET") { " (TARGET: a host of your choice)" } else { "" };
        next.push(format!(
            "{source} talks, so a forced migration would be refused: move them with a planned move, {}{placeholder}{rest}; a guest whose desired state is running is started on its target",
            cmds.join(", ")
        ));
        if left.iter().any(|m| m.waits && m.unfinished.is_none()) {
            next.push(format!(
                "or leave the guests that wait on {source}{}: they start there by themselves after `lifeboat cleanup {source} --yes` and `lifeboat hosts set-status {source} AVAILABLE --reason TEXT` (`lifeboat vms list` shows them WAITING)",
                if left.iter().any(|m| m.unfinished.is_some()) { " (not those with an unfinished move: only the move above finishes them)" } else { "" }
            ));
        }
    } else {
        if failed {
            next.push(if planned {
                format!("fix each failed move's cause and re-run the same `lifeboat move --from {source}` (it finishes only what is left)")
            } else {
                format!("fix each failed move's cause and re-run the same `lifeboat migrate --force --from {source}` (it finishes only what is left)")
            });
            let unfinished: Vec<String> = left
                .iter()
                .take(LISTED)
                .filter_map(|m| {
                    m.unfinished.map(|t| format!("`lifeboat move --vm {} --from {source} --to {t} --yes`", m.name))
                })
                .collect();
            if !planned && !unfinished.is_empty() {
                next.push(format!(
                    "if {source} talks again first, that is refused: finish each unfinished move with a planned move instead, {}",
                    unfinished.join(", ")
                ));
            }
        }
        if not_moved {
            next.push(if planned {
                "a guest not moved stays where it is; free what its checks name and move it again".to_string()
            } else {
                format!("a guest not moved needs its disks visible from another host and a target with room (then migrate again), or {source} repaired and brought back (a guest that waits starts there by itself once it is healthy and cleaned up)")
            });
        }
    }
    next.push(format!("then `lifeboat alarms clear --host {source} --kind {GUESTS_NOT_MOVED} --reason TEXT`"));
    let error = format!("{head}: {list}. Next: {}", next.join("; "));
    let alarm = format!(
        "job {job_id} left {} of {total} guest(s) of {source} {}: {list}",
        left.len(),
        if planned || talking { "not moved" } else { "running nowhere" }
    );
    JobOutcome { state, detail: format!("{summary}; {error}"), error, alarm: Some(alarm) }
}

/// `s` cut to at most `max` characters, marked when cut.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
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

/// Something the engine observed about a move while carrying out the
/// action its state owes (see [`MoveState::owed`]). The engine turns each
/// observation into the next state with [`step`]; the text that explains it
/// (an agent's answer, who talks) travels beside it, not in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveEvent {
    /// The source of a forced move is silent (or the move is planned): the move may go on.
    SourceSilent,
    /// The source of a forced move talks to the controller again: a host that talks is alive.
    SourceTalks,
    /// The target defined the guest (or reports it defined at this move's generation).
    Defined,
    /// The target refused or never answered the define.
    DefineFailed,
    /// The move is to start the guest on its target.
    StartWanted,
    /// The move leaves the guest defined and stopped on its target.
    NoStartWanted,
    /// A check before the start refused it (ownership moved on; a planned
    /// move's source no longer confirms the guest shut off).
    StartRefused,
    /// The target runs the guest at this move's generation.
    Started,
    /// The target refused or never answered the start, and does not report it running.
    StartFailed,
    /// The job was stopped (another move of it made an invalid transition):
    /// this move carries nothing further out.
    JobStopped,
}

impl MoveEvent {
    /// Every event.
    pub const ALL: [MoveEvent; 10] = [
        MoveEvent::SourceSilent,
        MoveEvent::SourceTalks,
        MoveEvent::Defined,
        MoveEvent::DefineFailed,
        MoveEvent::StartWanted,
        MoveEvent::NoStartWanted,
        MoveEvent::StartRefused,
        MoveEvent::Started,
        MoveEvent::StartFailed,
        MoveEvent::JobStopped,
    ];
}

/// What the engine does after a move's step. The record effects are written
/// with the new state in one transaction; the action effects are carried out
/// only after that write (and are owed again by the state after a crash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveEffect {
    /// Record: the target owns the guest at the move's generation, unfinished.
    RecordOwner,
    /// Record: the target owns the guest at the move's generation, finished.
    CompleteOwner,
    /// Record: the event's text is the move's error.
    RecordError,
    /// Record: an audit entry with this action; its detail is the event's text.
    Audit(&'static str),
    /// Action: check whether a forced move's source talks again.
    CheckSource,
    /// Action: send the definition to the target.
    SendDefine,
    /// Action: decide from the move whether the guest is to be started.
    ChooseStart,
    /// Action: re-check the source and the ownership, then grant the start
    /// lease and start the guest on the target.
    SendStart,
    /// Action: undefine the guest's stale definition on a planned move's
    /// (living) source, storage untouched.
    UndefineOnSource,
}

impl MoveEffect {
    /// Whether this effect is carried out (after the write) rather than written.
    pub fn is_action(self) -> bool {
        matches!(
            self,
            MoveEffect::CheckSource
                | MoveEffect::SendDefine
                | MoveEffect::ChooseStart
                | MoveEffect::SendStart
                | MoveEffect::UndefineOnSource
        )
    }
}

/// Audit action of a move whose ownership was recorded.
pub const AUDIT_MOVE_RECORDED: &str = "move.recorded";
/// Audit action of a guest defined on its target.
pub const AUDIT_GUEST_DEFINED: &str = "guest.defined";
/// Audit action of a move that left its guest defined and stopped.
pub const AUDIT_MOVE_DONE: &str = "move.done";
/// Audit action of a guest running on its target.
pub const AUDIT_GUEST_RUNNING: &str = "guest.running";
/// Audit action of a failed move.
pub const AUDIT_MOVE_FAILED: &str = "move.failed";

/// Alarm kind: a job met a transition its state machine does not allow and
/// was stopped (never retried); the detail names the job, guest, state and event.
pub const JOB_INVALID_TRANSITION: &str = "job-invalid-transition";

/// An event that the state it met does not allow: the engine stops the job
/// (alarm [`JOB_INVALID_TRANSITION`]) instead of retrying the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition: {event} in state {from}")]
pub struct InvalidTransition {
    /// The state the job or move was in.
    pub from: &'static str,
    /// The event it met (its name).
    pub event: &'static str,
}

impl MoveEvent {
    /// The event's name (logs, alarms).
    pub fn name(self) -> &'static str {
        match self {
            MoveEvent::SourceSilent => "SourceSilent",
            MoveEvent::SourceTalks => "SourceTalks",
            MoveEvent::Defined => "Defined",
            MoveEvent::DefineFailed => "DefineFailed",
            MoveEvent::StartWanted => "StartWanted",
            MoveEvent::NoStartWanted => "NoStartWanted",
            MoveEvent::StartRefused => "StartRefused",
            MoveEvent::Started => "Started",
            MoveEvent::StartFailed => "StartFailed",
            MoveEvent::JobStopped => "JobStopped",
        }
    }
}

impl MoveState {
    /// The action a move in this state owes: what the step that entered it
    /// asked for, carried out again when a job resumes here (every action is
    /// check-then-act). A planned move that ended well still undefines its
    /// source's copy; every other ended move owes nothing.
    pub fn owed(self, kind: super::JobKind) -> Option<MoveEffect> {
        match self {
            MoveState::Pending => Some(MoveEffect::CheckSource),
            MoveState::Defining => Some(MoveEffect::SendDefine),
            MoveState::Defined => Some(MoveEffect::ChooseStart),
            MoveState::Starting => Some(MoveEffect::SendStart),
            MoveState::Running | MoveState::DefinedStopped if kind == super::JobKind::Move => {
                Some(MoveEffect::UndefineOnSource)
            }
            MoveState::Running | MoveState::DefinedStopped | MoveState::Failed | MoveState::NotMoved => None,
        }
    }
}

/// One step of a move: from its state and what the engine observed, the
/// next state and what to do. Pure. Every result passes
/// [`MoveState::valid_transition`]; anything else is [`InvalidTransition`].
pub fn step(
    kind: super::JobKind,
    current: MoveState,
    event: MoveEvent,
) -> Result<(MoveState, Vec<MoveEffect>), InvalidTransition> {
    use MoveEffect::*;
    use MoveEvent as E;
    use MoveState as S;
    let failed = || (S::Failed, vec![RecordError, Audit(AUDIT_MOVE_FAILED)]);
    let (next, mut effects) = match (current, event) {
        (S::Pending, E::SourceSilent) => (S::Defining, vec![RecordOwner, Audit(AUDIT_MOVE_RECORDED)]),
        (S::Pending, E::SourceTalks) if kind == super::JobKind::Migrate => failed(),
        (S::Defining, E::Defined) => (S::Defined, vec![Audit(AUDIT_GUEST_DEFINED)]),
        (S::Defining, E::DefineFailed) => failed(),
        (S::Defined, E::StartWanted) => (S::Starting, vec![]),
        (S::Defined, E::NoStartWanted) => (S::DefinedStopped, vec![CompleteOwner, Audit(AUDIT_MOVE_DONE)]),
        (S::Starting, E::SourceTalks) if kind == super::JobKind::Migrate => failed(),
        (S::Starting, E::StartRefused | E::StartFailed) => failed(),
        (S::Starting, E::Started) => (S::Running, vec![CompleteOwner, Audit(AUDIT_GUEST_RUNNING)]),
        (S::Pending | S::Defining | S::Defined | S::Starting, E::JobStopped) => failed(),
        (from, event) => return Err(InvalidTransition { from: from.as_str(), event: event.name() }),
    };
    if !current.valid_transition(next) {
        return Err(InvalidTransition { from: current.as_str(), event: event.name() });
    }
    effects.extend(next.owed(kind));
    Ok((next, effects))
}

/// Something the engine observed about a job while carrying out what its
/// state owes (see [`JobState::owed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobEvent {
    /// The job is picked up to be carried out.
    Begin,
    /// The source is proven off (BMC Off, or attested), or a planned move's
    /// source stopped every guest.
    SourceOff,
    /// The source could not be proven off (or a planned move's stop failed).
    FencingFailed,
    /// Every move ended, and every guest of the job reached its target.
    AllMoved,
    /// Every move ended; some guests were left behind (see [`job_outcome`]).
    SomeLeft,
    /// Every move ended; none moved and at least one move failed.
    NoneMoved,
}

impl JobEvent {
    /// Every event.
    pub const ALL: [JobEvent; 6] = [
        JobEvent::Begin,
        JobEvent::SourceOff,
        JobEvent::FencingFailed,
        JobEvent::AllMoved,
        JobEvent::SomeLeft,
        JobEvent::NoneMoved,
    ];

    /// The event's name (logs, alarms).
    pub fn name(self) -> &'static str {
        match self {
            JobEvent::Begin => "Begin",
            JobEvent::SourceOff => "SourceOff",
            JobEvent::FencingFailed => "FencingFailed",
            JobEvent::AllMoved => "AllMoved",
            JobEvent::SomeLeft => "SomeLeft",
            JobEvent::NoneMoved => "NoneMoved",
        }
    }

    /// The event that ends a job in `state`, as [`job_outcome`] decided it.
    pub fn ending(state: JobState) -> JobEvent {
        match state {
            JobState::Succeeded => JobEvent::AllMoved,
            JobState::Partial => JobEvent::SomeLeft,
            // A job outcome is only ever one of the three ends; anything else
            // is no end at all and meets no transition.
            JobState::Failed | JobState::Created | JobState::Fencing | JobState::Moving => JobEvent::NoneMoved,
        }
    }
}

/// What the engine does after a job's step. Record effects are written with
/// the new state in one transaction; [`JobEffect::RaiseNotMovedAlarm`] is
/// raised just before that write (idempotent: a resumed job raises the same
/// alarm once); actions are carried out after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobEffect {
    /// Record: the event's text is the job's error.
    RecordError,
    /// Record: an audit entry with this action.
    Audit(&'static str),
    /// Record: the guests a planned move stopped before it failed wait to
    /// start again on its source.
    WaitStoppedOnSource,
    /// Record: the guests left behind wait (for the source, or for a planned
    /// move); the moved ones no longer do.
    SettleWaiting,
    /// Before the write: raise the [`GUESTS_NOT_MOVED`] alarm on the source.
    RaiseNotMovedAlarm,
    /// Measure the recovery time of a forced migration that moved everything.
    ObserveRecovery,
    /// Action: prove the source off (or stop a planned move's guests on it).
    Fence,
    /// Action: carry out every move.
    RunMoves,
}

impl JobState {
    /// The action a job in this state owes (see [`MoveState::owed`]).
    pub fn owed(self) -> Option<JobEffect> {
        match self {
            JobState::Fencing => Some(JobEffect::Fence),
            JobState::Moving => Some(JobEffect::RunMoves),
            JobState::Created | JobState::Succeeded | JobState::Partial | JobState::Failed => None,
        }
    }
}

/// One step of a job: from its state and what the engine observed, the next
/// state and what to do. Pure; every result passes [`JobState::valid_transition`].
pub fn job_step(
    kind: super::JobKind,
    current: JobState,
    event: JobEvent,
) -> Result<(JobState, Vec<JobEffect>), InvalidTransition> {
    use JobEffect::*;
    use JobEvent as E;
    use JobState as S;
    let (next, mut effects) = match (current, event) {
        (S::Created, E::Begin) => (S::Fencing, vec![]),
        (S::Fencing, E::SourceOff) => (S::Moving, vec![]),
        (S::Fencing, E::FencingFailed) => {
            let mut e = vec![RecordError, Audit("job.failed")];
            if kind == super::JobKind::Move {
                e.push(WaitStoppedOnSource);
            }
            (S::Failed, e)
        }
        (S::Moving, E::AllMoved) => {
            let mut e = vec![Audit("job.succeeded"), SettleWaiting];
            if kind == super::JobKind::Migrate {
                e.push(ObserveRecovery);
            }
            (S::Succeeded, e)
        }
        (S::Moving, E::SomeLeft) => {
            (S::Partial, vec![RaiseNotMovedAlarm, RecordError, Audit("job.partial"), SettleWaiting])
        }
        (S::Moving, E::NoneMoved) => {
            (S::Failed, vec![RaiseNotMovedAlarm, RecordError, Audit("job.failed"), SettleWaiting])
        }
        (from, event) => return Err(InvalidTransition { from: from.as_str(), event: event.name() }),
    };
    if !current.valid_transition(next) {
        return Err(InvalidTransition { from: current.as_str(), event: event.name() });
    }
    effects.extend(next.owed());
    Ok((next, effects))
}

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
    fn not_moved_is_terminal_and_only_ever_created() {
        use MoveState::*;
        for t in MoveState::ALL {
            assert!(!NotMoved.valid_transition(t), "nothing leaves NOT_MOVED (-> {t})");
            assert!(!t.valid_transition(NotMoved), "nothing enters NOT_MOVED ({t} ->)");
        }
        assert!(NotMoved.is_terminal() && !NotMoved.is_success() && NotMoved.is_left_behind());
        assert!(Failed.is_left_behind() && !Running.is_left_behind() && !Pending.is_left_behind());
        assert_eq!("NOT_MOVED".parse::<MoveState>().unwrap(), NotMoved);
    }

    fn mv(name: &'static str, state: MoveState, error: &'static str) -> MoveOutcome<'static> {
        MoveOutcome { name, state, error, target: "host-b", waits: false, unfinished: None }
    }

    #[test]
    fn a_job_that_leaves_guests_behind_is_partial_and_names_them() {
        use MoveState::*;
        let all = [mv("vm-1", Running, ""), mv("vm-2", DefinedStopped, "")];
        let o = job_outcome("mig-1", "host-a", false, false, &all);
        assert_eq!((o.state, o.error.as_str(), o.alarm), (JobState::Succeeded, "", None));

        let some = [mv("vm-1", Running, ""), mv("vm-local", NotMoved, "local storage: no other host sees /l.img")];
        let o = job_outcome("mig-1", "host-a", false, false, &some);
        assert_eq!(o.state, JobState::Partial, "{o:?}");
        assert!(o.error.contains("vm-local (not moved: local storage: no other host sees /l.img)"), "{}", o.error);
        assert!(o.error.contains("running nowhere while host-a stays off"), "{}", o.error);
        assert!(o.error.contains("lifeboat alarms clear --host host-a --kind guests-not-moved"), "{}", o.error);
        assert!(!o.error.contains("re-run"), "no failed move to retry: {}", o.error);
        assert!(!o.error.contains("vm-1"), "a moved guest is not left behind: {}", o.error);
        let alarm = o.alarm.unwrap();
        assert!(alarm.contains("job mig-1") && alarm.contains("vm-local") && alarm.contains("1 of 2"), "{alarm}");
        assert!(o.detail.starts_with("1 of 2 guest(s) moved"), "{}", o.detail);

        let failed = [mv("vm-1", Running, ""), mv("vm-2", Failed, "define on host-b failed: boom")];
        let o = job_outcome("mig-1", "host-a", false, false, &failed);
        assert_eq!(o.state, JobState::Partial);
        assert!(
            o.error.contains("vm-2 (move failed: define on host-b failed: boom)")
                && o.error.contains("re-run the same `lifeboat migrate --force --from host-a`"),
            "{}",
            o.error
        );
    }

    #[test]
    fn a_job_that_moves_nothing_fails_and_a_planned_move_says_where_guests_are() {
        use MoveState::*;
        let none = [mv("vm-2", Failed, "start on host-b failed"), mv("vm-local", NotMoved, "local storage")];
        let o = job_outcome("mig-2", "host-a", false, false, &none);
        assert_eq!(o.state, JobState::Failed);
        assert!(o.error.starts_with("no guest could be moved: 2 guest(s) run nowhere"), "{}", o.error);
        assert!(o.alarm.is_some());

        let no_room =
            [mv("vm-3", NotMoved, "no capacity: needs 32 MiB"), mv("vm-4", NotMoved, "no capacity: needs 32 MiB")];
        let o = job_outcome("mig-4", "host-a", false, false, &no_room);
        assert_eq!(o.state, JobState::Partial, "nothing failed: every guest is reported");
        assert!(
            o.error.starts_with("no guest could be moved: 2 guest(s) run nowhere")
                && o.error.contains("vm-3 (not moved: no capacity"),
            "{}",
            o.error
        );
        assert!(o.alarm.is_some());

        let planned = [
            mv("m-1", Running, ""),
            mv("m-2", NotMoved, "no target passes every check"),
            mv("m-3", Failed, "define failed"),
        ];
        let o = job_outcome("mig-3", "host-b", true, false, &planned);
        assert_eq!(o.state, JobState::Partial);
        assert!(
            o.error.contains("m-2 (not moved: no target passes every check; still on host-b, untouched)"),
            "{}",
            o.error
        );
        assert!(
            o.error.contains("m-3 (move failed: define failed; stopped on host-b, running nowhere)"),
            "{}",
            o.error
        );
        assert!(o.error.contains("lifeboat move --from host-b"), "{}", o.error);
    }

    #[test]
    fn a_source_that_talks_again_gets_a_planned_move_per_target_never_a_rerun() {
        use MoveState::*;
        let talking = "host-a is talking to the controller again; not defining vm-3 elsewhere";
        let moves = [
            mv("vm-1", Running, ""),
            MoveOutcome {
                name: "vm-2",
                state: Failed,
                error: talking,
                target: "host-b",
                waits: true,
                unfinished: None,
            },
            MoveOutcome {
                name: "vm-3",
                state: Failed,
                error: talking,
                target: "host-c",
                waits: true,
                unfinished: None,
            },
            MoveOutcome {
                name: "vm-4",
                state: Failed,
                error: talking,
                target: "host-b",
                waits: false,
                unfinished: None,
            },
        ];
        let o = job_outcome("mig-5", "host-a", false, true, &moves);
        assert_eq!(o.state, JobState::Partial, "{o:?}");
        assert!(
            o.error.starts_with("host-a is talking to the controller again: 3 guest(s) not moved off it"),
            "{}",
            o.error
        );
        assert!(o.error.contains("vm-2 (move failed: host-a is talking"), "{}", o.error);
        assert!(o.error.contains("stopped on host-a, waits to start there again"), "{}", o.error);
        assert!(
            o.error.contains("vm-4 (move failed") && o.error.contains("stopped on host-a, running nowhere"),
            "{}",
            o.error
        );
        assert!(o.error.contains("`lifeboat move --vm vm-2 --vm vm-4 --from host-a --to host-b --yes`"), "{}", o.error);
        assert!(o.error.contains("`lifeboat move --vm vm-3 --from host-a --to host-c --yes`"), "{}", o.error);
        assert!(
            o.error.contains("`lifeboat cleanup host-a --yes`") && o.error.contains("set-status host-a AVAILABLE"),
            "{}",
            o.error
        );
        assert!(!o.error.contains("re-run"), "a re-run is refused while the source talks: {}", o.error);
        assert!(!o.error.contains("migrate --force"), "{}", o.error);
        assert!(o.alarm.unwrap().contains("not moved: vm-2"));

        // Silent source: the old advice stands; a planned move ignores `talking`.
        let o = job_outcome("mig-5", "host-a", false, false, &moves);
        assert!(o.error.contains("re-run the same `lifeboat migrate --force --from host-a`"), "{}", o.error);
        assert!(o.error.contains("vm-2 (move failed: host-a is talking to the controller again; not defining vm-3 elsewhere; waits for host-a to return)"), "{}", o.error);
        let o = job_outcome("mig-6", "host-a", true, true, &moves);
        assert!(o.error.contains("re-run the same `lifeboat move --from host-a`"), "{}", o.error);

        // Nothing moved before the source came back: FAILED, same advice.
        let o = job_outcome("mig-7", "host-a", false, true, &moves[1..]);
        assert_eq!(o.state, JobState::Failed);
        assert!(o.error.starts_with("no guest could be moved: host-a is talking"), "{}", o.error);
    }

    #[test]
    fn an_unfinished_move_is_finished_by_a_planned_move_to_its_recorded_target_and_a_placeholder_says_so() {
        use MoveState::*;
        let timed_out = "start on host-b timed out";
        let moves = [
            mv("vm-1", Running, ""),
            MoveOutcome {
                name: "vm-2",
                state: Failed,
                error: timed_out,
                target: "host-b",
                waits: true,
                unfinished: Some("host-b"),
            },
            MoveOutcome {
                name: "vm-3",
                state: NotMoved,
                error: "no capacity",
                target: "",
                waits: true,
                unfinished: None,
            },
        ];
        // Source silent: the re-run stands, and the planned move for when it talks first.
        let o = job_outcome("mig-8", "host-a", false, false, &moves);
        assert!(o.error.contains("vm-2 (move failed: start on host-b timed out; unfinished move to host-b: nobody's until it is finished, not started by itself)"), "{}", o.error);
        assert!(o.error.contains("re-run the same `lifeboat migrate --force --from host-a`"), "{}", o.error);
        assert!(o.error.contains("if host-a talks again first, that is refused: finish each unfinished move with a planned move instead, `lifeboat move --vm vm-2 --from host-a --to host-b --yes`"), "{}", o.error);
        // Source talks: the planned move to the recorded target; a never-placed guest gets a placeholder said to be one.
        let o = job_outcome("mig-8", "host-a", false, true, &moves);
        assert!(o.error.contains("`lifeboat move --vm vm-2 --from host-a --to host-b --yes`"), "{}", o.error);
        assert!(
            o.error
                .contains("`lifeboat move --vm vm-3 --from host-a --to TARGET --yes` (TARGET: a host of your choice)"),
            "{}",
            o.error
        );
        assert!(!o.error.contains("--to HOST"), "{}", o.error);
        assert!(o.error.contains("or leave the guests that wait on host-a (not those with an unfinished move: only the move above finishes them)"), "{}", o.error);
        assert!(
            o.error.contains("`lifeboat cleanup host-a --yes`"),
            "a cleanup without --yes only prints its plan: {}",
            o.error
        );
        assert!(!o.error.contains("re-run"), "{}", o.error);
        // Only an unfinished move: nothing starts by itself, so no 'leave them' advice.
        let o = job_outcome("mig-9", "host-a", false, true, &moves[..2]);
        assert!(!o.error.contains("or leave the guests"), "{}", o.error);
    }

    #[test]
    fn a_long_list_of_guests_left_behind_stays_bounded() {
        let names: Vec<String> = (0..500).map(|i| format!("vm-{i:03}")).collect();
        let long = "x".repeat(5000);
        let moves: Vec<MoveOutcome<'_>> = names
            .iter()
            .map(|n| MoveOutcome {
                name: n,
                state: MoveState::NotMoved,
                error: &long,
                target: "",
                waits: false,
                unfinished: None,
            })
            .collect();
        let mut with_one = moves.clone();
        with_one.push(MoveOutcome {
            name: "ok",
            state: MoveState::Running,
            error: "",
            target: "host-b",
            waits: false,
            unfinished: None,
        });
        let o = job_outcome("mig-4", "host-a", false, false, &with_one);
        assert_eq!(o.state, JobState::Partial);
        assert!(o.error.contains("and 490 more (`lifeboat jobs show mig-4`"), "{}", &o.error[o.error.len() - 300..]);
        assert!(o.error.len() < 5_000, "{} bytes", o.error.len());
        assert!(o.alarm.unwrap().len() < 5_000);
        assert_eq!(clip("héllo", 2), "hé...");
        assert_eq!(clip("hé", 2), "hé");
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

#[cfg(test)]
mod step_tests {
    use super::*;
    use crate::domain::JobKind;
    use MoveEffect::*;

    /// Fails to compile when an event is added and not listed here, and
    /// fails the test when `ALL` misses it.
    fn move_event_index(e: MoveEvent) -> usize {
        match e {
            MoveEvent::SourceSilent => 0,
            MoveEvent::SourceTalks => 1,
            MoveEvent::Defined => 2,
            MoveEvent::DefineFailed => 3,
            MoveEvent::StartWanted => 4,
            MoveEvent::NoStartWanted => 5,
            MoveEvent::StartRefused => 6,
            MoveEvent::Started => 7,
            MoveEvent::StartFailed => 8,
            MoveEvent::JobStopped => 9,
        }
    }

    fn job_event_index(e: JobEvent) -> usize {
        match e {
            JobEvent::Begin => 0,
            JobEvent::SourceOff => 1,
            JobEvent::FencingFailed => 2,
            JobEvent::AllMoved => 3,
            JobEvent::SomeLeft => 4,
            JobEvent::NoneMoved => 5,
        }
    }

    fn state_index(s: MoveState) -> usize {
        match s {
            MoveState::Pending => 0,
            MoveState::Defining => 1,
            MoveState::Defined => 2,
            MoveState::Starting => 3,
            MoveState::Running => 4,
            MoveState::DefinedStopped => 5,
            MoveState::Failed => 6,
            MoveState::NotMoved => 7,
        }
    }

    fn job_state_index(s: JobState) -> usize {
        match s {
            JobState::Created => 0,
            JobState::Fencing => 1,
            JobState::Moving => 2,
            JobState::Succeeded => 3,
            JobState::Partial => 4,
            JobState::Failed => 5,
        }
    }

    #[test]
    fn every_variant_is_in_all() {
        for (i, e) in MoveEvent::ALL.into_iter().enumerate() {
            assert_eq!(move_event_index(e), i, "{e:?}");
        }
        for (i, e) in JobEvent::ALL.into_iter().enumerate() {
            assert_eq!(job_event_index(e), i, "{e:?}");
        }
        for (i, s) in MoveState::ALL.into_iter().enumerate() {
            assert_eq!(state_index(s), i, "{s:?}");
        }
        for (i, s) in JobState::ALL.into_iter().enumerate() {
            assert_eq!(job_state_index(s), i, "{s:?}");
        }
    }

    type MoveRow = (JobKind, MoveState, MoveEvent, MoveState, &'static [MoveEffect]);

    const FAILED: &[MoveEffect] = &[RecordError, Audit(AUDIT_MOVE_FAILED)];

    /// Every allowed (kind, state, event); any pair not listed is an invalid transition.
    fn move_table() -> Vec<MoveRow> {
        use MoveEvent as E;
        use MoveState as S;
        let mut t: Vec<MoveRow> = Vec::new();
        for k in [JobKind::Migrate, JobKind::Move] {
            let stopped: &'static [MoveEffect] = if k == JobKind::Move {
                &[CompleteOwner, Audit(AUDIT_MOVE_DONE), UndefineOnSource]
            } else {
                &[CompleteOwner, Audit(AUDIT_MOVE_DONE)]
            };
            let running: &'static [MoveEffect] = if k == JobKind::Move {
                &[CompleteOwner, Audit(AUDIT_GUEST_RUNNING), UndefineOnSource]
            } else {
                &[CompleteOwner, Audit(AUDIT_GUEST_RUNNING)]
            };
            t.extend([
                (
                    k,
                    S::Pending,
                    E::SourceSilent,
                    S::Defining,
                    &[RecordOwner, Audit(AUDIT_MOVE_RECORDED), SendDefine][..],
                ),
                (k, S::Defining, E::Defined, S::Defined, &[Audit(AUDIT_GUEST_DEFINED), ChooseStart][..]),
                (k, S::Defining, E::DefineFailed, S::Failed, FAILED),
                (k, S::Defined, E::StartWanted, S::Starting, &[SendStart][..]),
                (k, S::Defined, E::NoStartWanted, S::DefinedStopped, stopped),
                (k, S::Starting, E::StartRefused, S::Failed, FAILED),
                (k, S::Starting, E::StartFailed, S::Failed, FAILED),
                (k, S::Starting, E::Started, S::Running, running),
            ]);
            for s in [S::Pending, S::Defining, S::Defined, S::Starting] {
                t.push((k, s, E::JobStopped, S::Failed, FAILED));
            }
        }
        // Only a forced move's source can "talk again": a planned move's source always talks.
        t.push((JobKind::Migrate, S::Pending, E::SourceTalks, S::Failed, FAILED));
        t.push((JobKind::Migrate, S::Starting, E::SourceTalks, S::Failed, FAILED));
        t
    }

    #[test]
    fn a_move_steps_exactly_as_the_table_says_for_every_state_and_event() {
        let table = move_table();
        let mut valid = 0;
        for kind in JobKind::ALL.iter().copied() {
            for from in MoveState::ALL {
                for event in MoveEvent::ALL {
                    let got = step(kind, from, event);
                    match table.iter().find(|r| (r.0, r.1, r.2) == (kind, from, event)) {
                        Some(&(_, _, _, to, effects)) => {
                            valid += 1;
                            assert_eq!(got, Ok((to, effects.to_vec())), "{kind} {from} {event:?}");
                            assert!(from.valid_transition(to), "{from} -> {to}");
                        }
                        None => assert_eq!(
                            got,
                            Err(InvalidTransition { from: from.as_str(), event: event.name() }),
                            "{kind} {from} {event:?}"
                        ),
                    }
                }
            }
        }
        assert_eq!(valid, table.len(), "every table row is a distinct (kind, state, event)");
    }

    #[test]
    fn a_move_step_asks_for_exactly_what_its_new_state_owes_after_a_crash() {
        // Written before carried out: a crash after the write resumes with the
        // state's owed action, which is the one the step asked for.
        for kind in JobKind::ALL.iter().copied() {
            for from in MoveState::ALL {
                for event in MoveEvent::ALL {
                    if let Ok((to, effects)) = step(kind, from, event) {
                        let actions: Vec<MoveEffect> = effects.iter().copied().filter(|e| e.is_action()).collect();
                        assert_eq!(actions, to.owed(kind).into_iter().collect::<Vec<_>>(), "{kind} {from} {event:?}");
                        assert_eq!(effects.last().copied().filter(|e| e.is_action()), to.owed(kind), "actions last");
                    }
                }
            }
        }
        assert_eq!(MoveState::Running.owed(JobKind::Migrate), None);
        assert_eq!(MoveState::NotMoved.owed(JobKind::Move), None);
        assert_eq!(MoveState::Failed.owed(JobKind::Move), None);
    }

    #[test]
    fn an_ended_move_takes_no_step_and_nothing_enters_not_moved() {
        for kind in JobKind::ALL.iter().copied() {
            for from in MoveState::ALL.into_iter().filter(|s| s.is_terminal()) {
                for event in MoveEvent::ALL {
                    assert!(step(kind, from, event).is_err(), "{kind} {from} {event:?}");
                }
            }
            for from in MoveState::ALL {
                for event in MoveEvent::ALL {
                    assert_ne!(step(kind, from, event).map(|r| r.0), Ok(MoveState::NotMoved));
                }
            }
        }
    }

    type JobTableRow = (JobKind, JobState, JobEvent, JobState, &'static [JobEffect]);

    fn job_table() -> Vec<JobTableRow> {
        use JobEffect::*;
        use JobEvent as E;
        use JobState as S;
        let mut t: Vec<JobTableRow> = Vec::new();
        for k in [JobKind::Migrate, JobKind::Move] {
            t.extend([
                (k, S::Created, E::Begin, S::Fencing, &[Fence][..]),
                (k, S::Fencing, E::SourceOff, S::Moving, &[RunMoves][..]),
                (
                    k,
                    S::Moving,
                    E::SomeLeft,
                    S::Partial,
                    &[RaiseNotMovedAlarm, RecordError, Audit("job.partial"), SettleWaiting][..],
                ),
                (
                    k,
                    S::Moving,
                    E::NoneMoved,
                    S::Failed,
                    &[RaiseNotMovedAlarm, RecordError, Audit("job.failed"), SettleWaiting][..],
                ),
            ]);
        }
        t.extend([
            (JobKind::Migrate, S::Fencing, E::FencingFailed, S::Failed, &[RecordError, Audit("job.failed")][..]),
            (
                JobKind::Move,
                S::Fencing,
                E::FencingFailed,
                S::Failed,
                &[RecordError, Audit("job.failed"), WaitStoppedOnSource][..],
            ),
            (
                JobKind::Migrate,
                S::Moving,
                E::AllMoved,
                S::Succeeded,
                &[Audit("job.succeeded"), SettleWaiting, ObserveRecovery][..],
            ),
            (JobKind::Move, S::Moving, E::AllMoved, S::Succeeded, &[Audit("job.succeeded"), SettleWaiting][..]),
        ]);
        t
    }

    #[test]
    fn a_job_steps_exactly_as_the_table_says_for_every_state_and_event() {
        let table = job_table();
        let mut valid = 0;
        for kind in JobKind::ALL.iter().copied() {
            for from in JobState::ALL {
                for event in JobEvent::ALL {
                    let got = job_step(kind, from, event);
                    match table.iter().find(|r| (r.0, r.1, r.2) == (kind, from, event)) {
                        Some(&(_, _, _, to, effects)) => {
                            valid += 1;
                            assert_eq!(got, Ok((to, effects.to_vec())), "{kind} {from} {event:?}");
                            assert!(from.valid_transition(to));
                            let actions: Vec<JobEffect> = effects
                                .iter()
                                .copied()
                                .filter(|e| matches!(e, JobEffect::Fence | JobEffect::RunMoves))
                                .collect();
                            assert_eq!(actions, to.owed().into_iter().collect::<Vec<_>>(), "owed after a crash");
                        }
                        None => {
                            assert_eq!(
                                got,
                                Err(InvalidTransition { from: from.as_str(), event: event.name() }),
                                "{kind} {from} {event:?}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(valid, table.len());
        // A finished job takes no step: is_terminal is what ends the engine's loop.
        for s in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(s.owed(), None);
        }
        for s in [JobState::Succeeded, JobState::Partial, JobState::Failed] {
            assert_eq!(job_step(JobKind::Migrate, JobState::Moving, JobEvent::ending(s)).unwrap().0, s);
        }
    }
}
