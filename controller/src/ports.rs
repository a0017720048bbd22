//! Floor 2 of the controller: the ports. One repository trait per aggregate
//! (hosts, guests, ownership, jobs with their moves and waiting guests,
//! alarms, audit, quarantine), the [`Repositories`] bundle that hands them
//! out, and the [`Clock`]. Nothing here knows SQLite or etcd: the SQLite
//! adapter is `store::sqlite`, a replicated backend implements the same
//! traits, and nothing above this floor changes.
//!
//! The traits are synchronous and take `&mut self`: every implementation
//! lives on the one store thread of [`Repos`] (see [`thread`]), which runs
//! the calls one at a time in the order they were sent, away from the async
//! workers. So they need `Send` (to move onto that thread) but not `Sync`.
//!
//! Architecture invariant: a write that must be atomic with another (a job
//! with its moves and its audit entry, an owner with its audit entry, a
//! status with its audit entry, ...) is ONE method, one transaction in the
//! backend; callers never compose atomicity from two calls.
//!
//! Architecture invariant: a value that cannot be read is
//! [`RepoError::Corrupt`], never a default; a backend that cannot write says
//! so with [`RepoError::is_write_failure`].

pub mod clock;
pub mod rows;
pub mod thread;

use std::collections::BTreeMap;

use lifeboat_proto::v1::{Guest, HostInfo};
use thiserror::Error;

pub use clock::{Clock, ManualClock, SystemClock};
pub use thread::Repos;

use crate::domain::host::HostStatus;
use crate::domain::job::{JobState, MoveState};
pub use rows::{
    AuditFilter, AuditRow, BadRow, GuestRow, HostRow, JobRow, MissingRow, MoveRow, OwnerRow, QuarantineRow,
    ReservationRow, WaitingRow,
};

/// A repository failure, whatever the backend.
#[derive(Debug, Error)]
pub enum RepoError {
    /// The backend failed a read or a write (SQLite error, etcd error).
    #[error("{source}")]
    Backend {
        /// Whether the backend refused or failed a write (full disk,
        /// read-only, I/O, locked, no quorum): it passes when the backend
        /// can be written again.
        write_failure: bool,
        /// The backend's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored record does not decode or holds an unknown value: it refuses.
    #[error("{0}")]
    Corrupt(String),
    /// Another operation on the host is still running.
    #[error("another operation on host '{host}' is still running: job {job}")]
    Busy {
        /// Host.
        host: String,
        /// The running job.
        job: String,
    },
    /// The stored data was written by a newer Lifeboat.
    #[error("database schema version {found} is newer than this controller understands ({understood})")]
    TooNew {
        /// The version found.
        found: i64,
        /// The newest version this controller understands.
        understood: i64,
    },
    /// This controller lost its leadership during a write (etcd backend):
    /// the message says whether the write may have been applied.
    #[error("{0}")]
    LostLeadership(String),
    /// The store thread has stopped (shut down, or it could not start).
    #[error("the store has stopped")]
    Stopped,
    /// The closure given to [`Repos::call`] panicked; the store thread goes
    /// on serving the next caller (a transaction under way rolled back).
    #[error("a storage call panicked: {0}")]
    Panicked(String),
    /// A storage call was made from inside a storage call (it would wait on
    /// itself); the closure already has the repositories.
    #[error("a storage call was made from inside a storage call")]
    Reentrant,
}

impl RepoError {
    /// Whether the backend refused or failed a write: it passes when the
    /// backend can be written again. Anything else is a record that cannot
    /// be used, or a store that is gone.
    pub fn is_write_failure(&self) -> bool {
        matches!(self, RepoError::Backend { write_failure: true, .. } | RepoError::LostLeadership(_))
    }

    /// Whether the write failed because this controller lost its leadership.
    pub fn lost_leadership(&self) -> bool {
        matches!(self, RepoError::LostLeadership(_))
    }

    /// Whether this is a record that does not read.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, RepoError::Corrupt(_))
    }
}

/// Result of a repository call.
pub type RepoResult<T> = Result<T, RepoError>;

/// An alarm as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmRow {
    /// Identifier.
    pub id: i64,
    /// When it was raised (ms since the epoch).
    pub at_ms: i64,
    /// The host it concerns.
    pub host: String,
    /// Its kind (`bmc_unreachable`, ...).
    pub kind: String,
    /// What happened.
    pub detail: String,
    /// When it was cleared (ms), 0 while active.
    pub cleared_ms: i64,
}

/// An alarm cleared by [`AlarmRepo::clear_audited`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClearedAlarm {
    /// Identifier.
    pub id: i64,
    /// When it was raised (ms).
    pub at_ms: i64,
    /// What happened.
    pub detail: String,
}

/// A guest's desired state as stored: the host it belongs on and the state
/// it should be in there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The host.
    pub host: String,
    /// The state (`running`, `stopped`, ...).
    pub state: String,
}

/// One desired-state change for [`OwnershipRepo::set_desired_many`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredChange<'a> {
    /// The guest.
    pub uuid: &'a str,
    /// The host it belongs on.
    pub host: &'a str,
    /// The state it should be in.
    pub state: &'a str,
}

/// One guest to write with [`GuestRepo::write`]: its report, encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestWrite<'a> {
    /// The guest.
    pub uuid: &'a str,
    /// Its name.
    pub name: &'a str,
    /// The encoded `Guest` report.
    pub data: &'a [u8],
}

/// Hosts: their facts, status and fencing record.
pub trait HostRepo: Send {
    /// Inserts or updates a host's facts (status and first-seen kept).
    fn upsert(&mut self, info: &HostInfo, now_ms: i64) -> RepoResult<()>;
    /// Records when each host was last heard from, in one transaction.
    fn touch(&mut self, seen: &[(String, i64)]) -> RepoResult<()>;
    /// Sets a host's status and reason with its audit entry, atomically;
    /// whether the host exists.
    fn set_status(
        &mut self,
        host: &str,
        status: HostStatus,
        reason: &str,
        audit: Option<&AuditRow>,
    ) -> RepoResult<bool>;
    /// Records the boot the host was fenced in.
    fn set_fenced_boot_id(&mut self, host: &str, boot_id: &str) -> RepoResult<()>;
    /// One host, `None` when unknown.
    fn get(&mut self, host: &str) -> RepoResult<Option<HostRow>>;
    /// Every host; a row that does not read fails the call.
    fn all(&mut self) -> RepoResult<Vec<HostRow>>;
    /// Every host that reads, and the rows that do not (for quarantine).
    fn all_checked(&mut self) -> RepoResult<(Vec<HostRow>, Vec<BadRow>)>;
}

/// Guests as their hosts report them (with their definitions).
pub trait GuestRepo: Send {
    /// Writes one host's inventory change (upserts and deletes) in one
    /// transaction.
    fn write(&mut self, host: &str, upserts: &[GuestWrite<'_>], deletes: &[&str], now_ms: i64) -> RepoResult<()>;
    /// One host's guests.
    fn of_host(&mut self, host: &str) -> RepoResult<Vec<Guest>>;
    /// Deletes one guest of a host.
    fn delete(&mut self, host: &str, uuid: &str) -> RepoResult<()>;
    /// Every guest of every host.
    fn all(&mut self) -> RepoResult<Vec<GuestRow>>;
    /// Every guest, one at a time (no full copy).
    fn each(&mut self, f: &mut dyn FnMut(GuestRow)) -> RepoResult<()>;
    /// Every guest that decodes and passes `check`, one at a time; the rows
    /// that do not are returned (for quarantine).
    fn each_checked(
        &mut self,
        check: &mut dyn FnMut(&Guest) -> Result<(), String>,
        f: &mut dyn FnMut(GuestRow),
    ) -> RepoResult<Vec<BadRow>>;
}

/// Ownership: which host owns each guest (generations only move forward),
/// desired states, guests gone missing, restores.
pub trait OwnershipRepo: Send {
    /// Every owner record.
    fn owners(&mut self) -> RepoResult<Vec<OwnerRow>>;
    /// Every owner record that reads, and the rows that do not.
    fn owners_checked(&mut self) -> RepoResult<(Vec<OwnerRow>, Vec<BadRow>)>;
    /// Records an owner with its audit entry, atomically.
    fn set_owner(&mut self, owner: &OwnerRow, audit: &AuditRow) -> RepoResult<()>;
    /// Desired states by guest.
    fn desired(&mut self) -> RepoResult<BTreeMap<String, Desired>>;
    /// Desired states that read, and the rows that do not.
    fn desired_checked(&mut self) -> RepoResult<(BTreeMap<String, Desired>, Vec<BadRow>)>;
    /// Sets several desired states in one transaction.
    fn set_desired_many(&mut self, changes: &[DesiredChange<'_>]) -> RepoResult<()>;
    /// Moves a guest's stored row of `host` to the missing guests (its last
    /// report kept whole) with its audit entry, atomically; false, writing
    /// nothing, when the host has no row for it.
    fn mark_missing(&mut self, host: &str, uuid: &str, since_ms: i64, audit: &AuditRow) -> RepoResult<bool>;
    /// Guests marked missing.
    fn missing(&mut self) -> RepoResult<Vec<MissingRow>>;
    /// Missing marks that read, and the rows that do not.
    fn missing_checked(&mut self) -> RepoResult<(Vec<MissingRow>, Vec<BadRow>)>;
    /// Clears a missing mark (and with `forget` the guest's records) with its
    /// audit entry, atomically; whether there was one.
    fn clear_missing(&mut self, uuid: &str, forget: bool, audit: &AuditRow) -> RepoResult<bool>;
    /// Records the owner and desired state of a restored guest with its audit
    /// entry, atomically.
    fn record_restore_owner(&mut self, owner: &OwnerRow, desired: &str, audit: &AuditRow) -> RepoResult<()>;
}

/// Jobs with their moves, the guests they leave waiting, and the memory
/// their moves reserve.
pub trait JobRepo: Send {
    /// Creates a job with its moves and audit entry, atomically;
    /// [`RepoError::Busy`] when the host already has an active job.
    fn create(&mut self, job: &JobRow, moves: &[MoveRow], audit: &AuditRow) -> RepoResult<()>;
    /// Sets a job's state and error with its audit entry, atomically.
    fn set_state(&mut self, id: &str, state: JobState, error: &str, audit: Option<&AuditRow>) -> RepoResult<()>;
    /// Ends a job, records the guests it leaves waiting and ends the waiting
    /// of the guests it moved, atomically.
    fn end_with_waiting(
        &mut self,
        id: &str,
        state: JobState,
        error: &str,
        audit: Option<&AuditRow>,
        waiting: &[WaitingRow],
        moved: &[String],
    ) -> RepoResult<()>;
    /// Sets a move's state, with the owner record and audit entry it
    /// carries, atomically (the placement change is durable before it is made).
    fn set_move(
        &mut self,
        job: &str,
        uuid: &str,
        state: MoveState,
        error: &str,
        owner: Option<&OwnerRow>,
        audit: Option<&AuditRow>,
    ) -> RepoResult<()>;
    /// One job, `None` when unknown.
    fn get(&mut self, id: &str) -> RepoResult<Option<JobRow>>;
    /// The newest jobs, of one host or all, at most `limit`.
    fn list(&mut self, host: Option<&str>, limit: u32) -> RepoResult<Vec<JobRow>>;
    /// Jobs not yet ended.
    fn active(&mut self) -> RepoResult<Vec<JobRow>>;
    /// Jobs not yet ended that read, and the rows that do not (a [`BadRow`]
    /// keyed by the job id, its source as host): one corrupt row hides no
    /// other, and a bad row is never run nor guessed.
    fn active_checked(&mut self) -> RepoResult<(Vec<JobRow>, Vec<BadRow>)>;
    /// The guests of jobs not yet ended (job id, uuid, source, target), read
    /// as stored text: a job or move whose state does not read still holds
    /// its guests.
    fn active_guests(&mut self) -> RepoResult<Vec<(String, String, String, String)>>;
    /// The moves a job carries out (without the guests left behind), in
    /// evacuation order.
    fn moves(&mut self, job: &str) -> RepoResult<Vec<MoveRow>>;
    /// Every row of a job, the guests left behind included.
    fn all_moves(&mut self, job: &str) -> RepoResult<Vec<MoveRow>>;
    /// Completed moves away from `host`, with when each was cleaned (0: not yet).
    fn moves_from(&mut self, host: &str) -> RepoResult<Vec<(MoveRow, i64)>>;
    /// Marks a move's leftover on its source cleaned, with its audit entry, atomically.
    fn mark_cleaned(&mut self, job: &str, uuid: &str, audit: &AuditRow) -> RepoResult<()>;
    /// Memory that moves under way reserve on their targets; a move that
    /// became RUNNING holds its memory for a while after, measured from `now_ms`.
    fn reservations(&mut self, now_ms: i64) -> RepoResult<Vec<ReservationRow>>;
    /// Guests waiting to be started.
    fn waiting(&mut self) -> RepoResult<Vec<WaitingRow>>;
    /// Ends one guest's waiting with its audit entry, atomically; whether it
    /// was still waiting.
    fn end_waiting(&mut self, waiting: &WaitingRow, audit: &AuditRow) -> RepoResult<bool>;
}

/// Alarms.
pub trait AlarmRepo: Send {
    /// Raises an alarm unless the same one is active; whether it is new.
    fn raise(&mut self, host: &str, kind: &str, detail: &str) -> RepoResult<bool>;
    /// Replaces the detail (and time) of a host's active alarm of one kind,
    /// so a recurring cause keeps one alarm; whether one was active.
    fn refresh(&mut self, host: &str, kind: &str, detail: &str) -> RepoResult<bool>;
    /// Active alarms, and cleared ones too with `include_cleared`.
    fn list(&mut self, include_cleared: bool) -> RepoResult<Vec<AlarmRow>>;
    /// Clears a host's active alarms of one kind; how many.
    fn clear(&mut self, host: &str, kind: &str) -> RepoResult<usize>;
    /// Clears one active alarm (host, kind and detail); how many.
    fn clear_one(&mut self, host: &str, kind: &str, detail: &str) -> RepoResult<usize>;
    /// Clears a host's active alarms of one kind and, when any was active,
    /// appends `audit`, atomically; the alarms cleared (none: nothing written).
    fn clear_audited(&mut self, host: &str, kind: &str, audit: &AuditRow) -> RepoResult<Vec<ClearedAlarm>>;
}

/// The append-only audit log.
pub trait AuditRepo: Send {
    /// Appends one entry.
    fn append(&mut self, entry: &AuditRow) -> RepoResult<()>;
    /// Entries matching `filter`.
    fn read(&mut self, filter: &AuditFilter) -> RepoResult<Vec<AuditRow>>;
}

/// Rows that could not be read, moved aside whole so the rest loads.
pub trait QuarantineRepo: Send {
    /// Moves a bad row into quarantine; its identifier.
    fn quarantine(&mut self, row: &BadRow, host_reason: &str) -> RepoResult<i64>;
    /// Rows in quarantine.
    fn list(&mut self) -> RepoResult<Vec<QuarantineRow>>;
}

/// Upkeep of the backend itself.
pub trait Maintenance: Send {
    /// Copies the write-ahead log into the database and truncates it (or the
    /// backend's equivalent); false when a reader still needed part of it.
    fn checkpoint(&mut self) -> RepoResult<bool>;
    /// Makes the backend refuse writes (tests of write failures) or accept them again.
    fn set_read_only(&mut self, on: bool) -> RepoResult<()>;
}

/// Every repository of one backend. The store thread owns one of these;
/// callers reach it through [`Repos`].
pub trait Repositories: Send {
    /// Hosts.
    fn hosts(&mut self) -> &mut dyn HostRepo;
    /// Guests.
    fn guests(&mut self) -> &mut dyn GuestRepo;
    /// Ownership, desired states, missing guests.
    fn ownership(&mut self) -> &mut dyn OwnershipRepo;
    /// Jobs, moves, waiting guests, reservations.
    fn jobs(&mut self) -> &mut dyn JobRepo;
    /// Alarms.
    fn alarms(&mut self) -> &mut dyn AlarmRepo;
    /// The audit log.
    fn audit(&mut self) -> &mut dyn AuditRepo;
    /// Quarantined rows.
    fn quarantine(&mut self) -> &mut dyn QuarantineRepo;
    /// Backend upkeep.
    fn maintenance(&mut self) -> &mut dyn Maintenance;

    /// Opens the one outer transaction a store-thread call runs in (the
    /// store's own transactions nest in it as savepoints). The default does
    /// nothing: each SQLite method commits on its own. A replicated backend
    /// (etcd) opens a local transaction here so a call's changes reach the
    /// replicated store as one atomic write, or not at all.
    fn begin(&mut self) -> RepoResult<()> {
        Ok(())
    }

    /// Ends a call that returned `Ok`: makes its changes durable (for etcd:
    /// one guarded etcd transaction, then the local commit). An error here
    /// becomes the call's error, and the call's changes are rolled back.
    fn commit(&mut self) -> RepoResult<()> {
        Ok(())
    }

    /// Ends a call that failed or panicked: nothing it changed stays.
    fn rollback(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_handle_is_shared_across_tasks_and_every_port_is_usable_as_a_trait_object() {
        fn shared<T: Send + Sync + Clone + 'static>() {}
        shared::<Repos>();
        shared::<Arc<dyn Clock>>();
        fn object<T: ?Sized + Send>(_: Option<Box<T>>) {}
        object::<dyn Repositories>(None);
        object::<dyn HostRepo>(None);
        object::<dyn GuestRepo>(None);
        object::<dyn OwnershipRepo>(None);
        object::<dyn JobRepo>(None);
        object::<dyn AlarmRepo>(None);
        object::<dyn AuditRepo>(None);
        object::<dyn QuarantineRepo>(None);
        object::<dyn Maintenance>(None);
        let e = RepoError::Backend { write_failure: true, source: "disk full".into() };
        assert!(e.is_write_failure() && !e.is_corrupt());
        assert!(RepoError::Corrupt("jobs row j1: unknown job state \"X\"".into()).is_corrupt());
        assert!(!RepoError::Stopped.is_write_failure());
    }
}
