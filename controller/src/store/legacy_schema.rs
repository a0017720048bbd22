//! Test fixture: the hand-written schema upgrade code Lifeboat used before
//! `rusqlite_migration` (schema versions 1 to 7), verbatim, to build databases
//! at every older version and compare them with what the migrations make.

use rusqlite::Connection;

/// Brings `conn` from its `user_version` up to `to` the way earlier releases did.
pub(super) fn upgrade_to(conn: &Connection, to: i64) -> rusqlite::Result<()> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v < 1 && to >= 1 {
        conn.execute_batch(
            "BEGIN;
                 CREATE TABLE hosts (
                    host_id TEXT PRIMARY KEY,
                    info BLOB NOT NULL,
                    status TEXT NOT NULL DEFAULT 'AVAILABLE',
                    first_seen_ms INTEGER NOT NULL,
                    last_seen_ms INTEGER NOT NULL
                 );
                 CREATE TABLE guests (
                    host_id TEXT NOT NULL REFERENCES hosts(host_id),
                    uuid TEXT NOT NULL,
                    name TEXT NOT NULL,
                    data BLOB NOT NULL,
                    updated_ms INTEGER NOT NULL,
                    PRIMARY KEY (host_id, uuid)
                 );
                 CREATE INDEX guests_by_uuid ON guests(uuid);
                 PRAGMA user_version = 1;
                 COMMIT;",
        )?;
    }
    if v < 2 && to >= 2 {
        conn.execute_batch(
            "BEGIN;
                 CREATE TABLE jobs (
                    id TEXT PRIMARY KEY,
                    kind TEXT NOT NULL,
                    source TEXT NOT NULL,
                    state TEXT NOT NULL,
                    operator TEXT NOT NULL,
                    plan_id TEXT NOT NULL,
                    power_evidence TEXT NOT NULL,
                    request BLOB NOT NULL,
                    parallel INTEGER NOT NULL,
                    created_ms INTEGER NOT NULL,
                    updated_ms INTEGER NOT NULL,
                    error TEXT NOT NULL DEFAULT ''
                 );
                 -- One operation at a time per host, enforced by the database.
                 CREATE UNIQUE INDEX one_active_job_per_host ON jobs(source)
                    WHERE state NOT IN ('SUCCEEDED', 'PARTIAL', 'FAILED');
                 CREATE TABLE moves (
                    job_id TEXT NOT NULL REFERENCES jobs(id),
                    uuid TEXT NOT NULL,
                    name TEXT NOT NULL,
                    source TEXT NOT NULL,
                    target TEXT NOT NULL,
                    generation INTEGER NOT NULL,
                    state TEXT NOT NULL,
                    start INTEGER NOT NULL,
                    definition_xml TEXT NOT NULL,
                    error TEXT NOT NULL DEFAULT '',
                    priority INTEGER NOT NULL DEFAULT 0,
                    updated_ms INTEGER NOT NULL,
                    PRIMARY KEY (job_id, uuid)
                 );
                 CREATE INDEX moves_by_source ON moves(source);
                 CREATE TABLE owners (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    generation INTEGER NOT NULL,
                    from_host TEXT NOT NULL,
                    job TEXT NOT NULL,
                    complete INTEGER NOT NULL
                 );
                 CREATE TABLE audit (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    at_ms INTEGER NOT NULL,
                    actor TEXT NOT NULL,
                    action TEXT NOT NULL,
                    host TEXT NOT NULL,
                    vm TEXT NOT NULL,
                    job TEXT NOT NULL,
                    detail TEXT NOT NULL
                 );
                 CREATE INDEX audit_by_time ON audit(at_ms);
                 -- The audit log is append-only.
                 CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
                    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
                 CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
                    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
                 PRAGMA user_version = 2;
                 COMMIT;",
        )?;
    }
    if v < 3 && to >= 3 {
        conn.execute_batch(
            "BEGIN;
                 ALTER TABLE hosts ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
                 ALTER TABLE hosts ADD COLUMN fenced_boot_id TEXT NOT NULL DEFAULT '';
                 ALTER TABLE moves ADD COLUMN cleaned_ms INTEGER NOT NULL DEFAULT 0;
                 CREATE TABLE desired (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    state TEXT NOT NULL,
                    updated_ms INTEGER NOT NULL
                 );
                 CREATE TABLE alarms (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    at_ms INTEGER NOT NULL,
                    host TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    detail TEXT NOT NULL,
                    cleared_ms INTEGER NOT NULL DEFAULT 0
                 );
                 PRAGMA user_version = 3;
                 COMMIT;",
        )?;
    }
    if v < 4 && to >= 4 {
        conn.execute_batch(
            "BEGIN;
                 ALTER TABLE moves ADD COLUMN memory_kib INTEGER NOT NULL DEFAULT 0;
                 CREATE INDEX moves_by_state ON moves(state);
                 PRAGMA user_version = 4;
                 COMMIT;",
        )?;
    }
    if v < 5 && to >= 5 {
        conn.execute_batch(
            "BEGIN;
                 CREATE TABLE IF NOT EXISTS missing (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    name TEXT NOT NULL,
                    data BLOB NOT NULL,
                    since_ms INTEGER NOT NULL
                 );
                 PRAGMA user_version = 5;
                 COMMIT;",
        )?;
    }
    if v < 6 && to >= 6 {
        conn.execute_batch(
            "BEGIN;
                 CREATE TABLE IF NOT EXISTS waiting (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    name TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    since_ms INTEGER NOT NULL,
                    job TEXT NOT NULL
                 );
                 PRAGMA user_version = 6;
                 COMMIT;",
        )?;
    }
    if v < 7 && to >= 7 {
        conn.execute_batch(
            "BEGIN;
                 CREATE TABLE IF NOT EXISTS quarantine (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    at_ms INTEGER NOT NULL,
                    source_table TEXT NOT NULL,
                    row_key TEXT NOT NULL,
                    uuid TEXT NOT NULL,
                    host TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    row_text TEXT NOT NULL,
                    data BLOB
                 );
                 PRAGMA user_version = 7;
                 COMMIT;",
        )?;
    }
    Ok(())
}
