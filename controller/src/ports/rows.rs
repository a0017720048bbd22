//! The rows the repositories read and write: plain values, whatever the
//! backend. A field holding a state is an enum; a stored value that does
//! not decode to one never becomes a row (it is a corrupt row instead).

use lifeboat_proto::v1::{Guest, HostInfo};

use crate::domain::host::HostStatus;
use crate::domain::job::{JobState, MoveState};
use crate::domain::{JobKind, PowerEvidence};

/// A durable job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// What the job does.
    pub kind: JobKind,
    /// Source host.
    pub source: String,
    /// Its state.
    pub state: JobState,
    /// Operator (certificate name).
    pub operator: String,
    /// Plan id carried out.
    pub plan_id: String,
    /// How the source is proven off.
    pub power_evidence: PowerEvidence,
    /// The request (protobuf bytes of `MigrateRequest`).
    pub request: Vec<u8>,
    /// Guests moved at once.
    pub parallel: u32,
    /// Created, ms.
    pub created_ms: i64,
    /// Last change, ms.
    pub updated_ms: i64,
    /// Why it failed.
    pub error: String,
}

/// One guest's move.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveRow {
    /// Job.
    pub job_id: String,
    /// Guest UUID.
    pub uuid: String,
    /// Guest name.
    pub name: String,
    /// From.
    pub source: String,
    /// To.
    pub target: String,
    /// Ownership generation this move creates.
    pub generation: u64,
    /// Its state.
    pub state: MoveState,
    /// Start on the target.
    pub start: bool,
    /// The definition to create.
    pub definition_xml: String,
    /// Why it failed.
    pub error: String,
    /// Evacuation order.
    pub priority: i32,
    /// Last change, ms.
    pub updated_ms: i64,
    /// The guest's memory, KiB: what the move reserves on its target until
    /// the guest runs there or the move ends (see `JobRepo::reservations`).
    pub memory_kib: u64,
}

/// Memory a move holds on its target while it is under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRow {
    /// The job the move belongs to.
    pub job_id: String,
    /// Guest UUID.
    pub uuid: String,
    /// Guest name.
    pub name: String,
    /// The host the guest goes to.
    pub target: String,
    /// Memory held there, KiB.
    pub memory_kib: u64,
}

/// An audit log entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditRow {
    /// Sequence number (assigned on insert).
    pub seq: i64,
    /// When, ms.
    pub at_ms: i64,
    /// Who (operator name, or "controller").
    pub actor: String,
    /// What, e.g. `bmc.request`.
    pub action: String,
    /// Host concerned.
    pub host: String,
    /// Guest concerned.
    pub vm: String,
    /// Job concerned.
    pub job: String,
    /// Details.
    pub detail: String,
}

impl AuditRow {
    /// An entry about what the controller itself noticed or did.
    pub fn by_controller(action: &str, host: &str, vm: &str, detail: String) -> Self {
        AuditRow {
            actor: "controller".into(),
            action: action.into(),
            host: host.into(),
            vm: vm.into(),
            detail,
            ..Default::default()
        }
    }
}

/// A guest that could not move and waits to run again on its own host
/// (desired state running, still owned by `host`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WaitingRow {
    /// Guest UUID.
    pub uuid: String,
    /// Its host (owner), where it will be started.
    pub host: String,
    /// Guest name.
    pub name: String,
    /// Why it could not move (the move's error).
    pub reason: String,
    /// Since when it waits, ms (kept when a later job records it again).
    pub since_ms: i64,
    /// The job that left it behind.
    pub job: String,
}

/// Filter for reading the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this host.
    pub host: Option<String>,
    /// Only this guest (name or UUID).
    pub vm: Option<String>,
    /// Only this job.
    pub job: Option<String>,
    /// Only entries at or after this time.
    pub since_ms: Option<i64>,
    /// At most this many (newest kept).
    pub limit: Option<u32>,
}

/// Who owns a guest now.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerRow {
    /// Guest UUID.
    pub uuid: String,
    /// Owning host.
    pub host: String,
    /// Generation.
    pub generation: u64,
    /// Moved from.
    pub from_host: String,
    /// Moving job.
    pub job: String,
    /// Whether the move completed.
    pub complete: bool,
}

/// A stored host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// Facts last reported.
    pub info: HostInfo,
    /// Operators' status.
    pub status: HostStatus,
    /// When first seen.
    pub first_seen_ms: i64,
    /// When last heard from (persisted lazily).
    pub last_seen_ms: i64,
    /// Why the status was set.
    pub status_reason: String,
    /// Boot id the host had when it was fenced for a forced migration.
    pub fenced_boot_id: String,
}

/// A stored guest.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestRow {
    /// Host it is defined on.
    pub host_id: String,
    /// Everything reported.
    pub guest: Guest,
    /// When last changed.
    pub updated_ms: i64,
}

/// A guest kept after it disappeared from its owner outside Lifeboat.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingRow {
    /// Host it went missing on.
    pub host: String,
    /// Its last report, definition included.
    pub guest: Guest,
    /// Since when, ms.
    pub since_ms: i64,
}

/// A stored row that could not be read, as found at a start.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// Table it was in.
    pub table: &'static str,
    /// Its SQLite rowid there.
    pub rowid: i64,
    /// Its key, as far as it could be read ("host/uuid", "uuid", "host").
    pub key: String,
    /// The guest it concerns ("" for a host row).
    pub uuid: String,
    /// The host it concerns ("" when unreadable).
    pub host: String,
    /// What is wrong with it.
    pub reason: String,
    /// Its columns as text (blobs as their length).
    pub row_text: String,
    /// Its blob column, kept for recovery.
    pub data: Option<Vec<u8>>,
}

/// A row moved to the quarantine table.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineRow {
    /// Quarantine id.
    pub id: i64,
    /// Table it came from.
    pub table: String,
    /// Its key there.
    pub key: String,
    /// The guest it concerns ("" for none).
    pub uuid: String,
    /// The host it concerns ("" for none).
    pub host: String,
    /// Why it was quarantined.
    pub reason: String,
}
