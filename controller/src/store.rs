//! SQLite persistence of hosts and guests. Every change the registry makes
//! is written here before it is acknowledged, so a restart loses nothing.

use std::collections::BTreeMap;
use std::path::Path;

use lifeboat_proto::v1::{Guest, HostInfo};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

pub mod etcd;
mod schema;
pub mod sqlite;

#[cfg(test)]
mod legacy_schema;

use crate::domain::host::HostStatus;

pub use crate::ports::rows::{
    AuditFilter, AuditRow, BadRow, GuestRow, HostRow, JobRow, MissingRow, MoveRow, OwnerRow, QuarantineRow,
    ReservationRow, WaitingRow,
};

mod sql_enums;
use sql_enums::col;

/// One alarm as stored: id, raised at (ms), host, kind, detail, cleared at (ms; 0 while active).
pub type AlarmTuple = (i64, i64, String, String, String, i64);

/// Desired states by guest UUID: (host, state).
pub type DesiredMap = BTreeMap<String, (String, String)>;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored blob does not decode.
    #[error("corrupt record in {table}: {message}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Decoder message.
        message: String,
    },
    /// A stored value is not one its column's type knows: the row is not
    /// used (never read as a default).
    #[error("corrupt row in {table} ({key}): column {column} holds {value:?}, not a value this controller knows")]
    CorruptValue {
        /// Table.
        table: &'static str,
        /// The row's key ("job id", "job id/uuid", "host id").
        key: String,
        /// Column.
        column: &'static str,
        /// The value as found (cut to 64 characters).
        value: String,
    },
    /// Another operation on the host is still running.
    #[error("another operation on host '{host}' is still running: job {job}")]
    Busy {
        /// Host.
        host: String,
        /// The running job.
        job: String,
    },
    /// The database was written by a newer Lifeboat.
    #[error("database schema version {0} is newer than this controller understands ({SCHEMA_VERSION})")]
    TooNew(i64),
    /// A schema migration could not be defined or applied (not a SQLite
    /// failure: those stay [`StoreError::Sqlite`]).
    #[error("schema migration: {0}")]
    Migration(#[source] rusqlite_migration::Error),
}

impl StoreError {
    /// Whether SQLite refused or failed a statement (full disk, read-only,
    /// I/O, locked): it passes when the database can be written again.
    /// Anything else is a record that cannot be used.
    pub fn is_write_failure(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(..)))
    }

    /// A migration error, as [`StoreError::Sqlite`] when SQLite failed a
    /// statement (so a full disk during an upgrade stays a write failure).
    fn from_migration(e: rusqlite_migration::Error) -> Self {
        match e {
            rusqlite_migration::Error::RusqliteError { err, .. } => StoreError::Sqlite(err),
            other => StoreError::Migration(other),
        }
    }
}

/// How long a move that became RUNNING keeps holding its memory on its
/// target (ms), unless the target reports the guest running sooner: until
/// then the target's running figure may not include it yet.
pub const RUNNING_HOLD_MS: i64 = 120_000;

/// Size the write-ahead log is truncated to after a checkpoint (bytes).
pub const WAL_SIZE_LIMIT_BYTES: i64 = 4 * 1024 * 1024;

/// Current schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 7;

/// The database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database and migrates its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// Opens an existing database for reading only (a second connection
    /// beside its writer, WAL mode): every write through it fails. Its
    /// schema must be this controller's (nothing is migrated).
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        use rusqlite::OpenFlags;
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v != SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                table: "user_version",
                message: format!("schema {v}, not this controller's {SCHEMA_VERSION}"),
            });
        }
        Ok(Store { conn })
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The WAL is truncated back to this size after a checkpoint (it would
        // otherwise keep its largest size for good), so the database
        // directory needs the database plus a few MiB: see docs/operations.md.
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::TooNew(v));
        }
        // One transaction for every pending migration: an upgrade that
        // fails (full disk) leaves the database at its old version.
        schema::migrations().to_latest(&mut conn).map_err(StoreError::from_migration)?;
        Ok(Store { conn })
    }

    /// Inserts or updates a host's facts (status and first-seen kept).
    pub fn upsert_host(&mut self, info: &HostInfo, now_ms: i64) -> Result<(), StoreError> {
        self.observed(|conn| {
            conn.execute(
                "INSERT INTO hosts (host_id, info, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(host_id) DO UPDATE SET info = excluded.info, last_seen_ms = excluded.last_seen_ms",
                params![info.host_id, info.encode_to_vec(), now_ms],
            )?;
            Ok(())
        })
    }

    /// Runs `f` with observed state (what agents report): committed without
    /// waiting for the disk (`synchronous = NORMAL` in WAL mode). A power
    /// loss may drop the last observations; agents report everything again
    /// when they reconnect. Ownership, jobs, moves, desired state and the
    /// audit log are always written with `synchronous = FULL`.
    fn observed<R>(&mut self, f: impl FnOnce(&mut Connection) -> Result<R, StoreError>) -> Result<R, StoreError> {
        // Inside a backend's outer transaction (etcd cache) the safety level
        // cannot change, and that outer transaction decides durability.
        if !self.conn.is_autocommit() {
            return f(&mut self.conn);
        }
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let r = f(&mut self.conn);
        let back = self.conn.pragma_update(None, "synchronous", "FULL");
        let r = r?;
        back?;
        Ok(r)
    }

    /// Copies the write-ahead log into the database and truncates it to
    /// nothing (`wal_checkpoint(TRUNCATE)`), so the WAL does not keep the
    /// disk space of a burst of writes. `true` when the WAL was emptied,
    /// `false` when a reader still needed part of it (tried again later).
    pub fn checkpoint(&self) -> Result<bool, StoreError> {
        let (busy, log, copied): (i64, i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(busy == 0 && log == copied)
    }

    /// Makes every later write fail (`PRAGMA query_only`) or allows writes
    /// again. The controller never sets it; tests use it to make writes
    /// fail as a full disk does, with SQLite's own error.
    pub fn set_read_only(&self, on: bool) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "query_only", on)?;
        Ok(())
    }

    /// Runs one SQL statement as is: tests use it to damage a row as a
    /// bad disk or a hand edit would.
    #[cfg(test)]
    pub(crate) fn execute_raw(&self, sql: &str) -> Result<usize, StoreError> {
        Ok(self.conn.execute(sql, [])?)
    }

    /// The connection (backends built over the SQLite cache, e.g. etcd).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Records when hosts were last heard from (observed state).
    pub fn touch_hosts(&mut self, seen: &[(String, i64)]) -> Result<(), StoreError> {
        self.observed(|conn| {
            let tx = conn.savepoint()?;
            {
                let mut st =
                    tx.prepare_cached("UPDATE hosts SET last_seen_ms = ?2 WHERE host_id = ?1 AND last_seen_ms < ?2")?;
                for (h, t) in seen {
                    st.execute(params![h, t])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Writes the guests of a host that changed and deletes those that are
    /// gone, in one transaction (observed state). `upserts` are encoded
    /// `Guest` messages with their UUID and name.
    pub fn write_guests(
        &mut self,
        host_id: &str,
        upserts: &[(&str, &str, &[u8])],
        deletes: &[&str],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.observed(|conn| {
            let tx = conn.savepoint()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM guests WHERE host_id = ?1 AND uuid = ?2")?;
                for u in deletes {
                    del.execute(params![host_id, u])?;
                }
                let mut up = tx.prepare_cached(
                    "INSERT INTO guests (host_id, uuid, name, data, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(host_id, uuid) DO UPDATE SET name = excluded.name, data = excluded.data, updated_ms = excluded.updated_ms",
                )?;
                for (uuid, name, data) in upserts {
                    up.execute(params![host_id, uuid, name, data, now_ms])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The guests of one host as last reported, definitions included.
    pub fn guests_of(&self, host_id: &str) -> Result<Vec<Guest>, StoreError> {
        let mut st = self.conn.prepare_cached("SELECT data FROM guests WHERE host_id = ?1 ORDER BY name")?;
        let rows = st.query_map(params![host_id], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for b in rows {
            out.push(
                Guest::decode(&b?[..]).map_err(|e| StoreError::Corrupt { table: "guests", message: e.to_string() })?,
            );
        }
        Ok(out)
    }

    /// Deletes one guest of a host.
    pub fn delete_guest(&mut self, host_id: &str, uuid: &str) -> Result<(), StoreError> {
        self.write_guests(host_id, &[], &[uuid], crate::now_ms())
    }

    /// Sets a host's status (and why), with an audit entry, atomically.
    pub fn set_status(
        &mut self,
        host_id: &str,
        status: &str,
        reason: &str,
        audit: Option<&AuditRow>,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "UPDATE hosts SET status = ?2, status_reason = ?3 WHERE host_id = ?1",
            params![host_id, status, reason],
        )?;
        if let Some(a) = audit {
            insert_audit(&tx, a)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Records the boot id a host had when it was fenced.
    pub fn set_fenced_boot_id(&self, host_id: &str, boot_id: &str) -> Result<(), StoreError> {
        self.conn.execute("UPDATE hosts SET fenced_boot_id = ?2 WHERE host_id = ?1", params![host_id, boot_id])?;
        Ok(())
    }

    /// Desired states: uuid → (host, state).
    pub fn desired(&self) -> Result<BTreeMap<String, (String, String)>, StoreError> {
        let mut st = self.conn.prepare("SELECT uuid, host, state FROM desired")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets the desired state of several guests, in one transaction.
    pub fn set_desired_many(&mut self, rows: &[(&str, &str, &str)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tx = self.conn.savepoint()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO desired (uuid, host, state, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(uuid) DO UPDATE SET host = excluded.host, state = excluded.state, updated_ms = excluded.updated_ms",
            )?;
            let now = crate::now_ms();
            for (uuid, host, state) in rows {
                st.execute(params![uuid, host, state, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Raises an alarm unless the same one is active; returns whether it is new.
    pub fn raise_alarm(&self, host: &str, kind: &str, detail: &str) -> Result<bool, StoreError> {
        let active: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM alarms WHERE host = ?1 AND kind = ?2 AND detail = ?3 AND cleared_ms = 0",
                params![host, kind, detail],
                |r| r.get(0),
            )
            .optional()?;
        if active.is_some() {
            return Ok(false);
        }
        self.conn.execute(
            "INSERT INTO alarms (at_ms, host, kind, detail) VALUES (?1, ?2, ?3, ?4)",
            params![crate::now_ms(), host, kind, detail],
        )?;
        Ok(true)
    }

    /// Replaces the detail of a host's active alarm of one kind (and its
    /// time), so that a recurring cause keeps one alarm up to date instead
    /// of raising one per occurrence. Returns whether one was active.
    pub fn refresh_alarm(&self, host: &str, kind: &str, detail: &str) -> Result<bool, StoreError> {
        let n = self.conn.execute(
            "UPDATE alarms SET detail = ?3, at_ms = ?4 WHERE host = ?1 AND kind = ?2 AND cleared_ms = 0",
            params![host, kind, detail, crate::now_ms()],
        )?;
        Ok(n > 0)
    }

    /// Alarms: (id, at, host, kind, detail, cleared).
    pub fn alarms(&self, include_cleared: bool) -> Result<Vec<AlarmTuple>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, at_ms, host, kind, detail, cleared_ms FROM alarms WHERE (?1 OR cleared_ms = 0) ORDER BY id",
        )?;
        let rows = st.query_map(params![include_cleared], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Clears a host's active alarms of one kind.
    pub fn clear_alarms(&self, host: &str, kind: &str) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE alarms SET cleared_ms = ?3 WHERE host = ?1 AND kind = ?2 AND cleared_ms = 0",
            params![host, kind, crate::now_ms()],
        )?)
    }

    /// Clears a host's active alarms of one kind and, when any was active,
    /// appends `audit` in the same transaction. Returns the alarms cleared
    /// as (id, at, detail); none cleared writes nothing.
    pub fn clear_alarms_audited(
        &mut self,
        host: &str,
        kind: &str,
        audit: &AuditRow,
    ) -> Result<Vec<(i64, i64, String)>, StoreError> {
        let tx = self.conn.savepoint()?;
        let active: Vec<(i64, i64, String)> = {
            let mut st = tx.prepare(
                "SELECT id, at_ms, detail FROM alarms WHERE host = ?1 AND kind = ?2 AND cleared_ms = 0 ORDER BY id",
            )?;
            let rows = st.query_map(params![host, kind], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if active.is_empty() {
            return Ok(active);
        }
        tx.execute(
            "UPDATE alarms SET cleared_ms = ?3 WHERE host = ?1 AND kind = ?2 AND cleared_ms = 0",
            params![host, kind, crate::now_ms()],
        )?;
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(active)
    }

    /// Completed moves away from `host`: (move, cleaned_ms).
    pub fn moves_from(&self, host: &str) -> Result<Vec<(MoveRow, i64)>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {MOVE_COLUMNS}, cleaned_ms FROM moves
             WHERE source = ?1 AND state IN ('RUNNING', 'DEFINED_STOPPED') ORDER BY updated_ms"
        ))?;
        let mut rows = st.query(params![host])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push((move_from_row(r)?, r.get(13)?));
        }
        Ok(out)
    }

    /// Records that a move's stale definition was removed, with an audit entry.
    pub fn mark_cleaned(&mut self, job_id: &str, uuid: &str, audit: &AuditRow) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "UPDATE moves SET cleaned_ms = ?3 WHERE job_id = ?1 AND uuid = ?2",
            params![job_id, uuid, crate::now_ms()],
        )?;
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }

    /// One host.
    pub fn host(&self, host_id: &str) -> Result<Option<HostRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT info, status, first_seen_ms, last_seen_ms, status_reason, fenced_boot_id FROM hosts WHERE host_id = ?1",
                params![host_id],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, col(r, 1, "hosts", host_id, "status"), r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?
            .map(|(b, status, first_seen_ms, last_seen_ms, status_reason, fenced_boot_id)| {
                Ok(HostRow { info: decode_host(&b)?, status: status?, first_seen_ms, last_seen_ms, status_reason, fenced_boot_id })
            })
            .transpose()
    }

    /// All hosts.
    pub fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT info, status, first_seen_ms, last_seen_ms, status_reason, fenced_boot_id, host_id FROM hosts ORDER BY host_id",
        )?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let (b, first_seen_ms, last_seen_ms, status_reason, fenced_boot_id, host_id): (
                Vec<u8>,
                _,
                _,
                _,
                _,
                String,
            ) = (r.get(0)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
            out.push(HostRow {
                info: decode_host(&b)?,
                status: col(r, 1, "hosts", &host_id, "status")?,
                first_seen_ms,
                last_seen_ms,
                status_reason,
                fenced_boot_id,
            });
        }
        Ok(out)
    }

    /// All guests.
    pub fn guests(&self) -> Result<Vec<GuestRow>, StoreError> {
        let mut out = Vec::new();
        self.each_guest(|g| out.push(g))?;
        Ok(out)
    }

    /// Calls `f` with every guest, one row at a time (the caller keeps what
    /// it needs, so the whole table is never in memory at once).
    pub fn each_guest(&self, mut f: impl FnMut(GuestRow)) -> Result<(), StoreError> {
        let mut st = self.conn.prepare("SELECT host_id, data, updated_ms FROM guests ORDER BY host_id, name")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let host_id: String = r.get(0)?;
            let b: Vec<u8> = r.get(1)?;
            let guest =
                Guest::decode(&b[..]).map_err(|e| StoreError::Corrupt { table: "guests", message: e.to_string() })?;
            f(GuestRow { host_id, guest, updated_ms: r.get(2)? });
        }
        Ok(())
    }
}

impl Store {
    /// Creates a job with its moves and first audit entry, atomically.
    /// Fails with [`StoreError::Busy`] when another job on the same source
    /// is still active.
    pub fn create_job(&mut self, job: &JobRow, moves: &[MoveRow], audit: &AuditRow) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let active: Option<String> = tx
            .query_row(
                "SELECT id FROM jobs WHERE source = ?1 AND state NOT IN ('SUCCEEDED','PARTIAL','FAILED')",
                params![job.source],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = active {
            return Err(StoreError::Busy { host: job.source.clone(), job: id });
        }
        tx.execute(
            "INSERT INTO jobs (id, kind, source, state, operator, plan_id, power_evidence, request, parallel, created_ms, updated_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                job.id, job.kind, job.source, job.state, job.operator, job.plan_id, job.power_evidence, job.request,
                job.parallel, job.created_ms, job.updated_ms, job.error
            ],
        )?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO moves (job_id, uuid, name, source, target, generation, state, start, definition_xml, error, priority, updated_ms, memory_kib)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?;
            for m in moves {
                let memory = i64::try_from(m.memory_kib).map_err(|_| StoreError::Corrupt {
                    table: "moves",
                    message: format!("memory {} KiB of {} out of range", m.memory_kib, m.name),
                })?;
                st.execute(params![
                    m.job_id,
                    m.uuid,
                    m.name,
                    m.source,
                    m.target,
                    m.generation as i64,
                    m.state,
                    m.start,
                    m.definition_xml,
                    m.error,
                    m.priority,
                    m.updated_ms,
                    memory
                ])?;
            }
        }
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a job's state (and error), with an audit entry, atomically.
    pub fn set_job_state(
        &mut self,
        id: &str,
        state: &str,
        error: &str,
        audit: Option<&AuditRow>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "UPDATE jobs SET state = ?2, error = ?3, updated_ms = ?4 WHERE id = ?1",
            params![id, state, error, crate::now_ms()],
        )?;
        if let Some(a) = audit {
            insert_audit(&tx, a)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Ends a job (state, error, audit entry) and, in the same transaction,
    /// records the guests it leaves waiting (a guest already waiting keeps
    /// its since-time) and ends the waiting of the guests it moved.
    pub fn end_job_with_waiting(
        &mut self,
        id: &str,
        state: &str,
        error: &str,
        audit: Option<&AuditRow>,
        waiting: &[WaitingRow],
        moved: &[String],
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "UPDATE jobs SET state = ?2, error = ?3, updated_ms = ?4 WHERE id = ?1",
            params![id, state, error, crate::now_ms()],
        )?;
        for w in waiting {
            tx.execute(
                "INSERT INTO waiting (uuid, host, name, reason, since_ms, job) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(uuid) DO UPDATE SET
                    since_ms = CASE WHEN waiting.host = excluded.host THEN waiting.since_ms ELSE excluded.since_ms END,
                    host = excluded.host, name = excluded.name, reason = excluded.reason, job = excluded.job",
                params![w.uuid, w.host, w.name, w.reason, w.since_ms, w.job],
            )?;
        }
        for u in moved {
            tx.execute("DELETE FROM waiting WHERE uuid = ?1", params![u])?;
        }
        if let Some(a) = audit {
            insert_audit(&tx, a)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every waiting guest, oldest first.
    pub fn waiting(&self) -> Result<Vec<WaitingRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT uuid, host, name, reason, since_ms, job FROM waiting ORDER BY since_ms, uuid")?;
        let rows = st.query_map([], |r| {
            Ok(WaitingRow {
                uuid: r.get(0)?,
                host: r.get(1)?,
                name: r.get(2)?,
                reason: r.get(3)?,
                since_ms: r.get(4)?,
                job: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A guest stops waiting (it runs, or moved): the row goes, with its
    /// audit entry, atomically. Returns whether it was waiting.
    pub fn end_waiting(&mut self, w: &WaitingRow, audit: &AuditRow) -> Result<bool, StoreError> {
        let tx = self.conn.savepoint()?;
        // Only the wait that was judged: a job that ended meanwhile may have
        // written a new one for the same guest (another host or job).
        let n = tx.execute(
            "DELETE FROM waiting WHERE uuid = ?1 AND host = ?2 AND job = ?3",
            params![w.uuid, w.host, w.job],
        )?;
        if n > 0 {
            insert_audit(&tx, audit)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Sets a move's state; optionally records ownership in the same
    /// transaction (so the placement change is durable before it is made).
    pub fn set_move(
        &mut self,
        job_id: &str,
        uuid: &str,
        state: &str,
        error: &str,
        owner: Option<&OwnerRow>,
        audit: Option<&AuditRow>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "UPDATE moves SET state = ?3, error = ?4, updated_ms = ?5 WHERE job_id = ?1 AND uuid = ?2",
            params![job_id, uuid, state, error, crate::now_ms()],
        )?;
        if let Some(o) = owner {
            upsert_owner(&tx, o)?;
        }
        if let Some(a) = audit {
            insert_audit(&tx, a)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every ownership record.
    pub fn owners(&self) -> Result<Vec<OwnerRow>, StoreError> {
        let mut st = self.conn.prepare("SELECT uuid, host, generation, from_host, job, complete FROM owners")?;
        let rows = st.query_map([], |r| {
            Ok(OwnerRow {
                uuid: r.get(0)?,
                host: r.get(1)?,
                generation: r.get::<_, i64>(2)? as u64,
                from_host: r.get(3)?,
                job: r.get(4)?,
                complete: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Jobs, newest first, optionally of one source host.
    pub fn jobs(&self, host: Option<&str>, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR source = ?1) ORDER BY created_ms DESC, id LIMIT ?2"
        ))?;
        let mut rows = st.query(params![host, limit])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(job_from_row(r)?);
        }
        Ok(out)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let mut st = self.conn.prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?;
        let mut rows = st.query(params![id])?;
        rows.next()?.map(job_from_row).transpose()
    }

    /// Jobs not yet finished.
    pub fn active_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state NOT IN ('SUCCEEDED','PARTIAL','FAILED') ORDER BY created_ms"
        ))?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(job_from_row(r)?);
        }
        Ok(out)
    }

    /// Jobs not yet finished, and the ones whose row does not read (a
    /// [`BadRow`] with the job id as key and its source as host): one
    /// corrupt row hides no other. A bad row is never run nor guessed.
    pub fn active_jobs_checked(&self) -> Result<(Vec<JobRow>, Vec<BadRow>), StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {JOB_COLUMNS}, rowid FROM jobs WHERE state NOT IN ('SUCCEEDED','PARTIAL','FAILED') ORDER BY created_ms"
        ))?;
        let mut rows = st.query([])?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        while let Some(r) = rows.next()? {
            match job_from_row(r) {
                Ok(j) => good.push(j),
                Err(e @ StoreError::CorruptValue { .. }) => {
                    // A source that does not read either: "" holds every source (fail closed).
                    let (key, host): (String, String) = (r.get(0)?, r.get(2).unwrap_or_default());
                    bad.push(BadRow {
                        table: "jobs",
                        rowid: r.get(12)?,
                        key: key.chars().take(128).collect(),
                        uuid: String::new(),
                        host,
                        reason: e.to_string(),
                        row_text: String::new(),
                        data: None,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok((good, bad))
    }

    /// The guests of unfinished jobs (job id, uuid, source, target), every
    /// move row but the ones left behind, read as stored text: a job or move
    /// whose state does not read still holds its guests.
    pub fn active_job_guests(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT m.job_id, m.uuid, m.source, m.target FROM moves m JOIN jobs j ON j.id = m.job_id
             WHERE j.state NOT IN ('SUCCEEDED','PARTIAL','FAILED') AND m.state != 'NOT_MOVED' ORDER BY j.created_ms",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The moves a job carries out, in evacuation order: every row except
    /// the guests recorded as left behind (`NOT_MOVED`), which nothing
    /// ever acts on.
    pub fn moves(&self, job_id: &str) -> Result<Vec<MoveRow>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {MOVE_COLUMNS} FROM moves WHERE job_id = ?1 AND state != 'NOT_MOVED' ORDER BY priority DESC, name"
        ))?;
        let mut rows = st.query(params![job_id])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(move_from_row(r)?);
        }
        Ok(out)
    }

    /// The memory held by moves under way: every move of an unfinished job
    /// that has not yet run (PENDING, DEFINING, DEFINED, STARTING), and every
    /// move that became RUNNING within [`RUNNING_HOLD_MS`] (whatever its
    /// job's state): its target counts the guest only from its next report,
    /// and the planner drops the reservation once the target reports it
    /// running. A move that stopped defined, failed or was not moved holds
    /// nothing, nor does any other move of an ended job. Ordered by target,
    /// then job.
    /// `now_ms` is the caller's clock (the registry's): the RUNNING hold
    /// window is measured from it.
    pub fn reservations(&self, now_ms: i64) -> Result<Vec<ReservationRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT m.job_id, m.uuid, m.name, m.target, m.memory_kib FROM moves m JOIN jobs j ON j.id = m.job_id
             WHERE (m.state IN ('PENDING', 'DEFINING', 'DEFINED', 'STARTING')
                    AND j.state NOT IN ('SUCCEEDED', 'PARTIAL', 'FAILED'))
                OR (m.state = 'RUNNING' AND m.updated_ms >= ?1)
             ORDER BY m.target, j.created_ms, m.job_id, m.name",
        )?;
        let rows = st.query_map(params![now_ms.saturating_sub(RUNNING_HOLD_MS)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, uuid, name, target, memory) = row?;
            let memory_kib = u64::try_from(memory).map_err(|_| StoreError::Corrupt {
                table: "moves",
                message: format!("move of {name} in job {job_id} reserves {memory} KiB, a negative amount"),
            })?;
            out.push(ReservationRow { job_id, uuid, name, target, memory_kib });
        }
        Ok(out)
    }

    /// Every row of a job, the guests left behind (`NOT_MOVED`) included:
    /// what a report of the job shows. Evacuation order.
    pub fn job_moves(&self, job_id: &str) -> Result<Vec<MoveRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {MOVE_COLUMNS} FROM moves WHERE job_id = ?1 ORDER BY priority DESC, name"))?;
        let mut rows = st.query(params![job_id])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(move_from_row(r)?);
        }
        Ok(out)
    }

    /// Appends to the audit log.
    pub fn audit(&self, a: &AuditRow) -> Result<(), StoreError> {
        insert_audit(&self.conn, a)
    }

    /// Reads the audit log, oldest first.
    pub fn read_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT seq, at_ms, actor, action, host, vm, job, detail FROM (
                SELECT * FROM audit
                WHERE (?1 IS NULL OR host = ?1) AND (?2 IS NULL OR vm = ?2 OR detail LIKE '%' || ?2 || '%')
                  AND (?3 IS NULL OR job = ?3) AND (?4 IS NULL OR at_ms >= ?4)
                ORDER BY seq DESC LIMIT ?5
             ) ORDER BY seq",
        )?;
        let rows = st.query_map(params![f.host, f.vm, f.job, f.since_ms, f.limit.unwrap_or(100_000)], |r| {
            Ok(AuditRow {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                host: r.get(4)?,
                vm: r.get(5)?,
                job: r.get(6)?,
                detail: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The columns [`job_from_row`] reads, in order.
const JOB_COLUMNS: &str =
    "id, kind, source, state, operator, plan_id, power_evidence, request, parallel, created_ms, updated_ms, error";

/// The columns [`move_from_row`] reads, in order.
const MOVE_COLUMNS: &str = "job_id, uuid, name, source, target, generation, state, start, definition_xml, error, priority, updated_ms, memory_kib";

fn move_from_row(r: &rusqlite::Row<'_>) -> Result<MoveRow, StoreError> {
    let (job_id, uuid): (String, String) = (r.get(0)?, r.get(1)?);
    let key = format!("{job_id}/{uuid}");
    Ok(MoveRow {
        name: r.get(2)?,
        source: r.get(3)?,
        target: r.get(4)?,
        generation: r.get::<_, i64>(5)? as u64,
        state: col(r, 6, "moves", &key, "state")?,
        start: r.get(7)?,
        definition_xml: r.get(8)?,
        error: r.get(9)?,
        priority: r.get(10)?,
        updated_ms: r.get(11)?,
        memory_kib: {
            let v: i64 = r.get(12)?;
            u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(12, v))?
        },
        job_id,
        uuid,
    })
}

fn job_from_row(r: &rusqlite::Row<'_>) -> Result<JobRow, StoreError> {
    let id: String = r.get(0)?;
    // A column of the wrong type is a corrupt row too, named like a bad value
    // (so one such row does not fail every read of the active jobs).
    fn typed<T: rusqlite::types::FromSql>(
        r: &rusqlite::Row<'_>,
        i: usize,
        id: &str,
        column: &'static str,
    ) -> Result<T, StoreError> {
        r.get(i).map_err(|e| match e {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::CorruptValue {
                table: "jobs",
                key: id.chars().take(128).collect(),
                column,
                value: format!("{e}").chars().take(64).collect(),
            },
            e => StoreError::Sqlite(e),
        })
    }
    Ok(JobRow {
        kind: col(r, 1, "jobs", &id, "kind")?,
        source: typed(r, 2, &id, "source")?,
        state: col(r, 3, "jobs", &id, "state")?,
        operator: typed(r, 4, &id, "operator")?,
        plan_id: typed(r, 5, &id, "plan_id")?,
        power_evidence: col(r, 6, "jobs", &id, "power_evidence")?,
        request: typed(r, 7, &id, "request")?,
        parallel: typed(r, 8, &id, "parallel")?,
        created_ms: typed(r, 9, &id, "created_ms")?,
        updated_ms: typed(r, 10, &id, "updated_ms")?,
        error: typed(r, 11, &id, "error")?,
        id,
    })
}

/// Writes a guest's ownership record (move or rebuilt); a generation that
/// does not fit SQLite's integer is refused, never wrapped.
fn upsert_owner(conn: &Connection, o: &OwnerRow) -> Result<(), StoreError> {
    let generation = i64::try_from(o.generation).map_err(|_| StoreError::Corrupt {
        table: "owners",
        message: format!("ownership generation {} of {} is out of range", o.generation, o.uuid),
    })?;
    conn.execute(
        "INSERT INTO owners (uuid, host, generation, from_host, job, complete) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(uuid) DO UPDATE SET host = excluded.host, generation = excluded.generation,
            from_host = excluded.from_host, job = excluded.job, complete = excluded.complete",
        params![o.uuid, o.host, generation, o.from_host, o.job, o.complete],
    )?;
    Ok(())
}

fn insert_audit(conn: &Connection, a: &AuditRow) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at_ms, actor, action, host, vm, job, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![if a.at_ms > 0 { a.at_ms } else { crate::now_ms() }, a.actor, a.action, a.host, a.vm, a.job, a.detail],
    )?;
    Ok(())
}

fn decode_host(b: &[u8]) -> Result<HostInfo, StoreError> {
    HostInfo::decode(b).map_err(|e| StoreError::Corrupt { table: "hosts", message: e.to_string() })
}

/// Ownership and alarm writes of the safety rules (one UUID, one owner;
/// alarms cleared by their cause).
impl Store {
    /// Records a guest's owner outside a move (ownership rebuilt from what a
    /// host reports), with its audit entry, in one transaction.
    pub fn set_owner(&mut self, o: &OwnerRow, audit: &AuditRow) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        upsert_owner(&tx, o)?;
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }

    /// Clears one active alarm (host, kind and detail); returns how many rows changed.
    pub fn clear_alarm(&self, host: &str, kind: &str, detail: &str) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE alarms SET cleared_ms = ?4 WHERE host = ?1 AND kind = ?2 AND detail = ?3 AND cleared_ms = 0",
            params![host, kind, detail, crate::now_ms()],
        )?)
    }
}

/// The kept definitions of guests missing on their owner.
impl Store {
    /// Moves a guest's stored row from `guests` to `missing` (its last
    /// report, definition included, is kept) with its audit entry, in one
    /// transaction. Returns false, writing nothing, when the host has no
    /// stored row for it.
    pub fn mark_missing(
        &mut self,
        host_id: &str,
        uuid: &str,
        since_ms: i64,
        audit: &AuditRow,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.savepoint()?;
        let n = tx.execute(
            "INSERT INTO missing (uuid, host, name, data, since_ms)
                SELECT uuid, host_id, name, data, ?3 FROM guests WHERE host_id = ?1 AND uuid = ?2
             ON CONFLICT(uuid) DO UPDATE SET host = excluded.host, name = excluded.name, data = excluded.data,
                since_ms = excluded.since_ms",
            params![host_id, uuid, since_ms],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM guests WHERE host_id = ?1 AND uuid = ?2", params![host_id, uuid])?;
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(true)
    }

    /// Every missing guest. A row that does not decode is an error (the
    /// controller refuses to start rather than lose it silently).
    pub fn missing(&self) -> Result<Vec<MissingRow>, StoreError> {
        let mut st = self.conn.prepare("SELECT host, data, since_ms FROM missing ORDER BY host, name, uuid")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (host, b, since_ms) = row?;
            let guest =
                Guest::decode(&b[..]).map_err(|e| StoreError::Corrupt { table: "missing", message: e.to_string() })?;
            out.push(MissingRow { host, guest, since_ms });
        }
        Ok(out)
    }

    /// Drops a guest's missing mark (it is defined again, or forgotten),
    /// with its audit entry; `forget` also drops its desired state. Returns
    /// whether a mark was there (none: nothing written).
    pub fn clear_missing(&mut self, uuid: &str, forget: bool, audit: &AuditRow) -> Result<bool, StoreError> {
        let tx = self.conn.savepoint()?;
        if tx.execute("DELETE FROM missing WHERE uuid = ?1", params![uuid])? == 0 {
            return Ok(false);
        }
        if forget {
            tx.execute("DELETE FROM desired WHERE uuid = ?1", params![uuid])?;
        }
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records a missing guest's new owner before it is defined there
    /// (`lifeboat vms restore --to`, or a first ownership record for a
    /// guest never moved), with its desired state and audit entry.
    pub fn record_restore_owner(&mut self, o: &OwnerRow, desired: &str, audit: &AuditRow) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        upsert_owner(&tx, o)?;
        tx.execute(
            "INSERT INTO desired (uuid, host, state, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(uuid) DO UPDATE SET host = excluded.host, state = excluded.state, updated_ms = excluded.updated_ms",
            params![o.uuid, o.host, desired, crate::now_ms()],
        )?;
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }
}

/// A bad row keyed by the UUID in its first column, with its host in
/// the second and no blob.
fn bad_row_by_uuid(
    table: &'static str,
    rowid: i64,
    cols: &[&str],
    v: &[rusqlite::types::Value],
    reason: String,
) -> BadRow {
    let uuid = v.first().and_then(text).unwrap_or_default();
    BadRow {
        table,
        rowid,
        key: uuid.clone(),
        uuid,
        host: v.get(1).and_then(text).unwrap_or_default(),
        reason,
        row_text: row_text(cols, v),
        data: None,
    }
}

fn text(v: &rusqlite::types::Value) -> Option<String> {
    match v {
        rusqlite::types::Value::Text(t) => Some(t.clone()),
        _ => None,
    }
}

fn int(v: &rusqlite::types::Value) -> Option<i64> {
    match v {
        rusqlite::types::Value::Integer(i) => Some(*i),
        _ => None,
    }
}

fn blob(v: &rusqlite::types::Value) -> Option<Vec<u8>> {
    match v {
        rusqlite::types::Value::Blob(b) => Some(b.clone()),
        _ => None,
    }
}

fn row_text(cols: &[&str], vals: &[rusqlite::types::Value]) -> String {
    use rusqlite::types::Value;
    cols.iter()
        .zip(vals)
        .map(|(c, v)| match v {
            Value::Null => format!("{c}=NULL"),
            Value::Integer(i) => format!("{c}={i}"),
            Value::Real(r) => format!("{c}={r}"),
            Value::Text(t) => format!("{c}={t:?}"),
            Value::Blob(b) => format!("{c}=<{} bytes>", b.len()),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reading at a start that never fails on one bad row: each table's rows
/// are read as raw values and checked; a row that does not read is
/// returned as a [`BadRow`] for the caller to [`Store::quarantine`].
impl Store {
    fn raw_rows(&self, table: &str, cols: &[&str]) -> Result<Vec<(i64, Vec<rusqlite::types::Value>)>, StoreError> {
        let mut st = self.conn.prepare(&format!("SELECT rowid, {} FROM {table} ORDER BY rowid", cols.join(", ")))?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let mut vals = Vec::with_capacity(cols.len());
            for i in 1..=cols.len() {
                vals.push(r.get::<_, rusqlite::types::Value>(i)?);
            }
            out.push((id, vals));
        }
        Ok(out)
    }

    /// Every host, and the host rows that do not read.
    pub fn hosts_checked(&self) -> Result<(Vec<HostRow>, Vec<BadRow>), StoreError> {
        const COLS: [&str; 7] =
            ["host_id", "info", "status", "first_seen_ms", "last_seen_ms", "status_reason", "fenced_boot_id"];
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (rowid, v) in self.raw_rows("hosts", &COLS)? {
            let host = text(&v[0]).unwrap_or_default();
            let parsed = (|| -> Result<HostRow, String> {
                let id = text(&v[0]).filter(|h| !h.is_empty()).ok_or("host_id is not a non-empty text")?;
                let info = HostInfo::decode(&blob(&v[1]).ok_or("info is not a blob")?[..])
                    .map_err(|e| format!("info does not decode: {e}"))?;
                if info.host_id != id {
                    return Err(format!("info names host '{}', not '{id}'", info.host_id));
                }
                Ok(HostRow {
                    info,
                    status: text(&v[2])
                        .ok_or_else(|| "status is not text".to_string())
                        .and_then(|s| HostStatus::from_name(&s).map_err(|e| format!("status does not read: {e}")))?,
                    first_seen_ms: int(&v[3]).ok_or("first_seen_ms is not an integer")?,
                    last_seen_ms: int(&v[4]).ok_or("last_seen_ms is not an integer")?,
                    status_reason: text(&v[5]).ok_or("status_reason is not text")?,
                    fenced_boot_id: text(&v[6]).ok_or("fenced_boot_id is not text")?,
                })
            })();
            match parsed {
                Ok(h) => good.push(h),
                Err(reason) => bad.push(BadRow {
                    table: "hosts",
                    rowid,
                    key: host.clone(),
                    uuid: String::new(),
                    host,
                    reason,
                    row_text: row_text(&COLS, &v),
                    data: blob(&v[1]),
                }),
            }
        }
        Ok((good, bad))
    }

    /// Calls `f` with every guest that reads and passes `check`; returns the
    /// guest rows that do not.
    pub fn each_guest_checked(
        &self,
        mut check: impl FnMut(&Guest) -> Result<(), String>,
        mut f: impl FnMut(GuestRow),
    ) -> Result<Vec<BadRow>, StoreError> {
        const COLS: [&str; 5] = ["host_id", "uuid", "name", "data", "updated_ms"];
        let mut st = self
            .conn
            .prepare("SELECT rowid, host_id, uuid, name, data, updated_ms FROM guests ORDER BY host_id, name")?;
        let mut rows = st.query([])?;
        let mut bad = Vec::new();
        while let Some(r) = rows.next()? {
            let rowid: i64 = r.get(0)?;
            let mut v = Vec::with_capacity(COLS.len());
            for i in 1..=COLS.len() {
                v.push(r.get::<_, rusqlite::types::Value>(i)?);
            }
            let (host, uuid) = (text(&v[0]).unwrap_or_default(), text(&v[1]).unwrap_or_default());
            let parsed = (|| -> Result<GuestRow, String> {
                let host_id = text(&v[0]).ok_or("host_id is not text")?;
                let guest = Guest::decode(&blob(&v[3]).ok_or("data is not a blob")?[..])
                    .map_err(|e| format!("data does not decode: {e}"))?;
                if guest.uuid != uuid {
                    return Err(format!("data is guest '{}', not the row's uuid", guest.uuid.escape_debug()));
                }
                check(&guest)?;
                Ok(GuestRow { host_id, guest, updated_ms: int(&v[4]).ok_or("updated_ms is not an integer")? })
            })();
            match parsed {
                Ok(g) => f(g),
                Err(reason) => bad.push(BadRow {
                    table: "guests",
                    rowid,
                    key: format!("{host}/{uuid}"),
                    uuid,
                    host,
                    reason,
                    row_text: row_text(&COLS, &v),
                    data: blob(&v[3]),
                }),
            }
        }
        Ok(bad)
    }

    /// Every ownership record, and the rows that do not read (a negative
    /// generation, a value of the wrong type).
    pub fn owners_checked(&self) -> Result<(Vec<OwnerRow>, Vec<BadRow>), StoreError> {
        const COLS: [&str; 6] = ["uuid", "host", "generation", "from_host", "job", "complete"];
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (rowid, v) in self.raw_rows("owners", &COLS)? {
            let parsed = (|| -> Result<OwnerRow, String> {
                Ok(OwnerRow {
                    uuid: text(&v[0]).filter(|u| !u.is_empty()).ok_or("uuid is not a non-empty text")?,
                    host: text(&v[1]).filter(|h| !h.is_empty()).ok_or("host is not a non-empty text")?,
                    generation: int(&v[2])
                        .and_then(|g| u64::try_from(g).ok())
                        .ok_or("generation is not a non-negative integer")?,
                    from_host: text(&v[3]).ok_or("from_host is not text")?,
                    job: text(&v[4]).ok_or("job is not text")?,
                    complete: match int(&v[5]) {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err("complete is not 0 or 1".into()),
                    },
                })
            })();
            match parsed {
                Ok(o) => good.push(o),
                Err(reason) => bad.push(bad_row_by_uuid("owners", rowid, &COLS, &v, reason)),
            }
        }
        Ok((good, bad))
    }

    /// Desired states (uuid → (host, "running" | "stopped")), and the rows
    /// that do not read.
    pub fn desired_checked(&self) -> Result<(DesiredMap, Vec<BadRow>), StoreError> {
        const COLS: [&str; 3] = ["uuid", "host", "state"];
        let (mut good, mut bad) = (BTreeMap::new(), Vec::new());
        for (rowid, v) in self.raw_rows("desired", &COLS)? {
            let parsed = (|| -> Result<(String, String, String), String> {
                let uuid = text(&v[0]).filter(|u| !u.is_empty()).ok_or("uuid is not a non-empty text")?;
                let host = text(&v[1]).filter(|h| !h.is_empty()).ok_or("host is not a non-empty text")?;
                let state = text(&v[2])
                    .filter(|s| s == "running" || s == "stopped")
                    .ok_or("state is not 'running' or 'stopped'")?;
                Ok((uuid, host, state))
            })();
            match parsed {
                Ok((u, h, st)) => {
                    good.insert(u, (h, st));
                }
                Err(reason) => bad.push(bad_row_by_uuid("desired", rowid, &COLS, &v, reason)),
            }
        }
        Ok((good, bad))
    }

    /// Every missing guest, and the rows that do not read.
    pub fn missing_checked(&self) -> Result<(Vec<MissingRow>, Vec<BadRow>), StoreError> {
        const COLS: [&str; 4] = ["uuid", "host", "data", "since_ms"];
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (rowid, v) in self.raw_rows("missing", &COLS)? {
            let uuid = text(&v[0]).unwrap_or_default();
            let parsed = (|| -> Result<MissingRow, String> {
                let host = text(&v[1]).ok_or("host is not text")?;
                let guest = Guest::decode(&blob(&v[2]).ok_or("data is not a blob")?[..])
                    .map_err(|e| format!("data does not decode: {e}"))?;
                if guest.uuid != uuid {
                    return Err("data is another guest than the row's uuid".into());
                }
                Ok(MissingRow { host, guest, since_ms: int(&v[3]).ok_or("since_ms is not an integer")? })
            })();
            match parsed {
                Ok(m) => good.push(m),
                Err(reason) => bad.push(BadRow {
                    table: "missing",
                    rowid,
                    key: uuid.clone(),
                    uuid,
                    host: text(&v[1]).unwrap_or_default(),
                    reason,
                    row_text: row_text(&COLS, &v),
                    data: blob(&v[2]),
                }),
            }
        }
        good.sort_by(|a, b| (&a.host, &a.guest.name, &a.guest.uuid).cmp(&(&b.host, &b.guest.name, &b.guest.uuid)));
        Ok((good, bad))
    }

    /// Moves a bad row to the quarantine table (raw values kept) and, for a
    /// host row, puts a MAINTENANCE row with `reason` in its place (the
    /// host then takes no guests and is not reported AVAILABLE); one
    /// transaction. Returns the quarantine id.
    pub fn quarantine(&mut self, b: &BadRow, host_reason: &str) -> Result<i64, StoreError> {
        let tx = self.conn.savepoint()?;
        tx.execute(
            "INSERT INTO quarantine (at_ms, source_table, row_key, uuid, host, reason, row_text, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![crate::now_ms(), b.table, b.key, b.uuid, b.host, b.reason, b.row_text, b.data],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(&format!("DELETE FROM {} WHERE rowid = ?1", b.table), params![b.rowid])?;
        if b.table == "hosts" && !b.host.is_empty() {
            let info = HostInfo { host_id: b.host.clone(), ..Default::default() };
            tx.execute(
                "INSERT INTO hosts (host_id, info, status, first_seen_ms, last_seen_ms, status_reason) VALUES (?1, ?2, 'MAINTENANCE', ?3, 0, ?4)",
                params![b.host, info.encode_to_vec(), crate::now_ms(), host_reason],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Rows in quarantine.
    pub fn quarantined(&self) -> Result<Vec<QuarantineRow>, StoreError> {
        let mut st =
            self.conn.prepare("SELECT id, source_table, row_key, uuid, host, reason FROM quarantine ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(QuarantineRow {
                id: r.get(0)?,
                table: r.get(1)?,
                key: r.get(2)?,
                uuid: r.get(3)?,
                host: r.get(4)?,
                reason: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::{JobState, MoveState};
    use crate::domain::{JobKind, PowerEvidence};

    #[test]
    fn a_checkpoint_empties_the_wal_and_a_read_only_store_refuses_writes_with_sqlites_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        let s = Store::open(&db).unwrap();
        let wal = dir.path().join("c.db-wal");
        let limit: i64 = s.conn.pragma_query_value(None, "journal_size_limit", |r| r.get(0)).unwrap();
        assert_eq!(limit, WAL_SIZE_LIMIT_BYTES);
        for i in 0..200 {
            s.audit(&AuditRow::by_controller("test", "h", "", format!("entry {i} {}", "x".repeat(500)))).unwrap();
        }
        assert!(std::fs::metadata(&wal).unwrap().len() > 100_000, "the WAL grew");
        assert!(s.checkpoint().unwrap(), "nothing held it");
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0, "the WAL was truncated");
        assert_eq!(
            s.read_audit(&AuditFilter { limit: Some(1000), ..Default::default() }).unwrap().len(),
            200,
            "nothing lost"
        );

        s.set_read_only(true).unwrap();
        let e = s.audit(&AuditRow::by_controller("test", "h", "", "refused".into())).unwrap_err();
        assert!(e.to_string().contains("readonly"), "{e}");
        s.set_read_only(false).unwrap();
        s.audit(&AuditRow::by_controller("test", "h", "", "accepted".into())).unwrap();
    }

    fn guest(uuid: &str, name: &str) -> Guest {
        Guest { uuid: uuid.into(), name: name.into(), ..Default::default() }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.upsert_host(&HostInfo { host_id: "a".into(), hostname: "ha".into(), ..Default::default() }, 5).unwrap();
            let (g1, g2) = (guest("u1", "vm1").encode_to_vec(), guest("u2", "vm2").encode_to_vec());
            s.write_guests("a", &[("u1", "vm1", &g1), ("u2", "vm2", &g2)], &[], 6).unwrap();
            s.delete_guest("a", "u2").unwrap();
            s.set_status("a", "MAINTENANCE", "", None).unwrap();
            s.touch_hosts(&[("a".into(), 99)]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let h = s.host("a").unwrap().unwrap();
        assert_eq!(
            (h.info.hostname.as_str(), h.status.as_str(), h.first_seen_ms, h.last_seen_ms),
            ("ha", "MAINTENANCE", 5, 99)
        );
        let g = s.guests().unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].guest.name, "vm1");
    }

    #[test]
    fn one_active_job_per_host_and_an_append_only_audit_log() {
        let mut s = Store::open_in_memory().unwrap();
        let job = |id: &str, state: &str| JobRow {
            id: id.into(),
            kind: JobKind::Migrate,
            source: "a".into(),
            state: state.parse().unwrap(),
            operator: "ann".into(),
            plan_id: "p".into(),
            power_evidence: PowerEvidence::BmcOff,
            request: vec![],
            parallel: 4,
            created_ms: 1,
            updated_ms: 1,
            error: String::new(),
        };
        let a = AuditRow {
            actor: "ann".into(),
            action: "migrate.requested".into(),
            host: "a".into(),
            ..Default::default()
        };
        s.create_job(&job("j1", "CREATED"), &[], &a).unwrap();
        let e = s.create_job(&job("j2", "CREATED"), &[], &a).unwrap_err();
        assert!(e.to_string().contains("job j1"), "{e}");
        s.set_job_state("j1", "SUCCEEDED", "", None).unwrap();
        s.create_job(&job("j2", "CREATED"), &[], &a).unwrap();
        assert_eq!(s.read_audit(&AuditFilter::default()).unwrap().len(), 2);
        assert!(s.conn.execute("DELETE FROM audit", []).is_err());
        assert!(s.conn.execute("UPDATE audit SET detail = 'x'", []).is_err());
    }

    #[test]
    fn guests_left_behind_are_recorded_with_the_job_but_never_carried_out() {
        let mut s = Store::open_in_memory().unwrap();
        let job = JobRow {
            id: "j1".into(),
            kind: JobKind::Migrate,
            source: "a".into(),
            state: "CREATED".parse().unwrap(),
            operator: "ann".into(),
            plan_id: "p".into(),
            power_evidence: PowerEvidence::Attestation,
            request: vec![],
            parallel: 4,
            created_ms: 1,
            updated_ms: 1,
            error: String::new(),
        };
        let mv = |uuid: &str, name: &str, state: &str, error: &str| MoveRow {
            job_id: "j1".into(),
            uuid: uuid.into(),
            name: name.into(),
            source: "a".into(),
            target: if state == "NOT_MOVED" { String::new() } else { "b".into() },
            generation: if state == "NOT_MOVED" { 0 } else { 1 },
            state: state.parse().unwrap(),
            start: true,
            definition_xml: String::new(),
            error: error.into(),
            priority: 0,
            updated_ms: 1,
            memory_kib: 0,
        };
        let a = AuditRow {
            actor: "ann".into(),
            action: "migrate.requested".into(),
            host: "a".into(),
            ..Default::default()
        };
        let rows = [
            mv("u1", "vm-1", "PENDING", ""),
            mv("u2", "vm-local", "NOT_MOVED", "local storage: no other host sees /l.img"),
        ];
        s.create_job(&job, &rows, &a).unwrap();
        let carried: Vec<String> = s.moves("j1").unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(carried, ["vm-1"], "the engine never sees a NOT_MOVED row");
        let all = s.job_moves("j1").unwrap();
        assert_eq!(all.len(), 2);
        let local = all.iter().find(|m| m.name == "vm-local").unwrap();
        assert_eq!(
            (local.state.as_str(), local.error.as_str()),
            ("NOT_MOVED", "local storage: no other host sees /l.img")
        );
        assert!(s.moves_from("a").unwrap().is_empty(), "cleanup never names a guest left behind");
    }

    #[test]
    fn moves_under_way_of_unfinished_jobs_reserve_their_memory() {
        let mut s = Store::open_in_memory().unwrap();
        let job = |id: &str, source: &str| JobRow {
            id: id.into(),
            kind: JobKind::Migrate,
            source: source.into(),
            state: "MOVING".parse().unwrap(),
            operator: "ann".into(),
            plan_id: "p".into(),
            power_evidence: PowerEvidence::BmcOff,
            request: vec![],
            parallel: 4,
            created_ms: 1,
            updated_ms: 1,
            error: String::new(),
        };
        let mv = |job: &str, uuid: &str, state: &str, kib: u64| MoveRow {
            job_id: job.into(),
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            source: "a".into(),
            target: "c".into(),
            generation: 1,
            state: state.parse().unwrap(),
            start: true,
            definition_xml: String::new(),
            error: String::new(),
            priority: 0,
            updated_ms: 1,
            memory_kib: kib,
        };
        let a = AuditRow { actor: "ann".into(), action: "migrate.requested".into(), ..Default::default() };
        let states =
            ["PENDING", "DEFINING", "DEFINED", "STARTING", "RUNNING", "DEFINED_STOPPED", "FAILED", "NOT_MOVED"];
        let rows: Vec<MoveRow> =
            states.iter().enumerate().map(|(i, st)| mv("j1", &format!("u{i}"), st, 1024 << i)).collect();
        s.create_job(&job("j1", "a"), &rows, &a).unwrap();
        s.create_job(&job("j2", "b"), &[mv("j2", "x", "PENDING", 7)], &a).unwrap();
        let r = s.reservations(crate::now_ms()).unwrap();
        let held: Vec<(&str, &str, u64)> =
            r.iter().map(|r| (r.job_id.as_str(), r.uuid.as_str(), r.memory_kib)).collect();
        assert_eq!(
            held,
            [("j1", "u0", 1024), ("j1", "u1", 2048), ("j1", "u2", 4096), ("j1", "u3", 8192), ("j2", "x", 7)]
        );
        assert_eq!(s.job_moves("j1").unwrap()[0].memory_kib, 1024, "the figure is read back with the move");
        s.set_move("j1", "u0", "RUNNING", "", None, None).unwrap();
        s.set_job_state("j2", "PARTIAL", "", None).unwrap();
        let left: Vec<String> = s.reservations(crate::now_ms()).unwrap().into_iter().map(|r| r.uuid).collect();
        assert_eq!(
            left,
            ["u0", "u1", "u2", "u3"],
            "a guest that just started is held until its target reports it; an ended job's pending move holds nothing"
        );
        s.set_job_state("j1", "SUCCEEDED", "", None).unwrap();
        let left: Vec<String> = s.reservations(crate::now_ms()).unwrap().into_iter().map(|r| r.uuid).collect();
        assert_eq!(left, ["u0"], "also once its job ended");
        s.conn
            .execute(
                &format!("UPDATE moves SET updated_ms = {} WHERE uuid = 'u0'", crate::now_ms() - RUNNING_HOLD_MS - 1),
                [],
            )
            .unwrap();
        s.conn.execute("UPDATE jobs SET state = 'MOVING' WHERE id = 'j1'", []).unwrap();
        let left: Vec<String> = s.reservations(crate::now_ms()).unwrap().into_iter().map(|r| r.uuid).collect();
        assert_eq!(left, ["u1", "u2", "u3"], "a move that ran long ago and an ended job hold nothing");
        s.conn.execute("UPDATE moves SET memory_kib = -5 WHERE uuid = 'u1'", []).unwrap();
        let e = s.reservations(crate::now_ms()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { table: "moves", .. }) && e.to_string().contains("vm-u1"), "{e}");
    }

    #[test]
    fn clearing_alarms_is_audited_and_clearing_nothing_writes_nothing() {
        let mut s = Store::open_in_memory().unwrap();
        s.raise_alarm("a", "guests-not-moved", "job j1 left vm-local").unwrap();
        s.raise_alarm("a", "split-brain", "never powered off").unwrap();
        let a = AuditRow {
            actor: "olga".into(),
            action: "alarm.cleared".into(),
            host: "a".into(),
            detail: "checked".into(),
            ..Default::default()
        };
        assert!(s.clear_alarms_audited("a", "stale-copy-running", &a).unwrap().is_empty());
        assert!(s.clear_alarms_audited("b", "guests-not-moved", &a).unwrap().is_empty());
        assert!(s.read_audit(&AuditFilter::default()).unwrap().is_empty(), "nothing cleared, nothing audited");
        let cleared = s.clear_alarms_audited("a", "guests-not-moved", &a).unwrap();
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].2, "job j1 left vm-local");
        let active: Vec<String> = s.alarms(false).unwrap().into_iter().map(|x| x.3).collect();
        assert_eq!(active, ["split-brain"], "only the named kind is cleared");
        let log = s.read_audit(&AuditFilter::default()).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!((log[0].actor.as_str(), log[0].action.as_str()), ("olga", "alarm.cleared"));
        assert!(s.clear_alarms_audited("a", "guests-not-moved", &a).unwrap().is_empty(), "already cleared");
    }

    #[test]
    fn a_missing_guest_keeps_its_whole_row_and_a_mark_is_cleared_once() {
        let mut s = Store::open_in_memory().unwrap();
        s.upsert_host(&HostInfo { host_id: "a".into(), ..Default::default() }, 1).unwrap();
        let g =
            Guest { uuid: "u1".into(), name: "vm1".into(), definition_xml: "<domain/>".into(), ..Default::default() };
        s.write_guests("a", &[("u1", "vm1", &g.encode_to_vec())], &[], 2).unwrap();
        let a = AuditRow::by_controller("guest.missing", "a", "vm1", "gone".into());
        assert!(!s.mark_missing("a", "u-other", 5, &a).unwrap(), "no row, nothing kept");
        assert!(s.read_audit(&AuditFilter::default()).unwrap().is_empty());
        assert!(s.mark_missing("a", "u1", 5, &a).unwrap());
        assert!(s.guests().unwrap().is_empty());
        let m = s.missing().unwrap();
        assert_eq!(m, [MissingRow { host: "a".into(), guest: g, since_ms: 5 }]);
        s.set_desired_many(&[("u1", "a", "stopped")]).unwrap();
        let f = AuditRow::by_controller("guest.forgotten", "a", "vm1", "x".into());
        assert!(s.clear_missing("u1", true, &f).unwrap());
        assert!(!s.clear_missing("u1", true, &f).unwrap(), "already cleared");
        assert!(s.missing().unwrap().is_empty() && s.desired().unwrap().is_empty());
        assert_eq!(s.read_audit(&AuditFilter::default()).unwrap().len(), 2);
        s.conn.execute("INSERT INTO missing VALUES ('u2', 'a', 'vm2', x'ffff', 1)", []).unwrap();
        assert!(matches!(s.missing(), Err(StoreError::Corrupt { table: "missing", .. })), "a corrupt row refuses");
    }

    #[test]
    fn unknown_host_is_none() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.host("nope").unwrap().is_none());
    }

    #[test]
    fn a_stored_value_that_does_not_read_refuses_naming_the_row() {
        let mut s = Store::open_in_memory().unwrap();
        s.upsert_host(&HostInfo { host_id: "h1".into(), ..Default::default() }, 5).unwrap();
        let job = JobRow {
            id: "j1".into(),
            kind: JobKind::Move,
            source: "h1".into(),
            state: JobState::Moving,
            operator: "ann".into(),
            plan_id: "p".into(),
            power_evidence: PowerEvidence::StoppedByAgent,
            request: vec![],
            parallel: 1,
            created_ms: 1,
            updated_ms: 1,
            error: String::new(),
        };
        let mv = MoveRow {
            job_id: "j1".into(),
            uuid: "u1".into(),
            name: "vm1".into(),
            source: "h1".into(),
            target: "h2".into(),
            generation: 1,
            state: MoveState::Defining,
            start: true,
            definition_xml: String::new(),
            error: String::new(),
            priority: 0,
            updated_ms: 1,
            memory_kib: 1,
        };
        s.create_job(&job, std::slice::from_ref(&mv), &AuditRow::default()).unwrap();
        assert_eq!(s.job("j1").unwrap().unwrap(), job, "every value round-trips");
        assert_eq!(s.moves("j1").unwrap(), std::slice::from_ref(&mv));
        assert_eq!(s.host("h1").unwrap().unwrap().status, HostStatus::Available);
        let corrupt = |e: StoreError| match e {
            StoreError::CorruptValue { table, key, column, value } => (table, key, column, value),
            e => panic!("not CorruptValue: {e}"),
        };
        let cases: [(&str, &str, &str, &str, &str); 5] = [
            ("jobs", "kind", "'cleanup'", "j1", "cleanup"),
            ("jobs", "state", "'moving'", "j1", "moving"),
            ("jobs", "power_evidence", "'bmc'", "j1", "bmc"),
            ("moves", "state", "'DONE'", "j1/u1", "DONE"),
            ("hosts", "status", "'available'", "h1", "available"),
        ];
        for (table, column, bad, key, value) in cases {
            let good: String = s.conn.query_row(&format!("SELECT {column} FROM {table}"), [], |r| r.get(0)).unwrap();
            s.execute_raw(&format!("UPDATE {table} SET {column} = {bad}")).unwrap();
            let want = (table, key.to_string(), column, value.to_string());
            match table {
                "jobs" => {
                    assert_eq!(corrupt(s.job("j1").unwrap_err()), want);
                    assert_eq!(corrupt(s.jobs(None, 10).unwrap_err()), want);
                }
                "moves" => {
                    assert_eq!(corrupt(s.moves("j1").unwrap_err()), want);
                    assert_eq!(corrupt(s.job_moves("j1").unwrap_err()), want);
                }
                _ => {
                    assert_eq!(corrupt(s.host("h1").unwrap_err()), want);
                    assert_eq!(corrupt(s.hosts().unwrap_err()), want);
                    let (rows, bad) = s.hosts_checked().unwrap();
                    assert!(rows.is_empty() && bad.len() == 1, "{rows:?} {bad:?}");
                    assert!(bad[0].reason.contains("unknown host status \"available\""), "{}", bad[0].reason);
                }
            }
            // Not text at all (a blob keeps its type in a TEXT column) refuses too.
            s.execute_raw(&format!("UPDATE {table} SET {column} = x'07'")).unwrap();
            let e = if table == "jobs" {
                s.job("j1").unwrap_err()
            } else if table == "moves" {
                s.moves("j1").unwrap_err()
            } else {
                s.host("h1").unwrap_err()
            };
            assert_eq!(corrupt(e).3, "<Blob>");
            s.conn.execute(&format!("UPDATE {table} SET {column} = ?1"), [good]).unwrap();
        }
        assert_eq!(s.job("j1").unwrap().unwrap(), job, "restored, it reads again");
    }

    #[test]
    fn a_job_column_of_the_wrong_type_is_a_corrupt_row_and_hides_no_other_job() {
        let mut s = Store::open_in_memory().unwrap();
        for (id, source) in [("j-bad", "a"), ("j-ok", "b")] {
            let job = JobRow {
                id: id.into(),
                kind: JobKind::Migrate,
                source: source.into(),
                state: JobState::Moving,
                operator: "o".into(),
                plan_id: "p".into(),
                power_evidence: PowerEvidence::Attestation,
                request: Vec::new(),
                parallel: 1,
                created_ms: 1,
                updated_ms: 1,
                error: String::new(),
            };
            s.create_job(&job, &[], &AuditRow::default()).unwrap();
        }
        s.conn.execute("UPDATE jobs SET parallel = 'many', source = x'00' WHERE id = 'j-bad'", []).unwrap();
        let (good, bad) = s.active_jobs_checked().unwrap();
        assert_eq!(good.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j-ok"]);
        assert_eq!(bad.len(), 1);
        assert_eq!(
            (bad[0].key.as_str(), bad[0].host.as_str()),
            ("j-bad", ""),
            "an unreadable source holds every source"
        );
        let e = s.job("j-bad").unwrap_err();
        assert!(matches!(e, StoreError::CorruptValue { column: "source", .. }), "{e}");
    }
}
