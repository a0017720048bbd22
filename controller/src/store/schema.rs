//! The schema and its upgrades, as `rusqlite_migration` migrations: the
//! database's `user_version` is the number of migrations applied, so a
//! database written by any earlier Lifeboat (versions 1 to 6) is brought to
//! [`super::SCHEMA_VERSION`] in one transaction, and one written by a newer
//! Lifeboat is refused before anything is touched.
//!
//! Architecture invariant: a migration, once released, is never edited (a
//! database that ran it would differ from a fresh one); a change is a new
//! migration appended at the end, and `SCHEMA_VERSION` follows the count.
//! The SQL text is kept byte for byte as earlier releases wrote it, because
//! SQLite stores it in `sqlite_master` and a test compares that text.

use rusqlite_migration::{M, Migrations};

/// Every migration, oldest first; migration `i` (0-based) brings a database
/// from version `i` to version `i + 1`.
static MIGRATIONS: &[M<'static>] = &[
    // Version 1.
    M::up(
        "CREATE TABLE hosts (
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
                 CREATE INDEX guests_by_uuid ON guests(uuid);",
    ),
    // Version 2.
    M::up(
        "CREATE TABLE jobs (
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
                    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;",
    ),
    // Version 3.
    M::up(
        "ALTER TABLE hosts ADD COLUMN status_reason TEXT NOT NULL DEFAULT '';
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
                 );",
    ),
    // Version 4.
    // Moves created before this version carried no memory figure:
    // they count as 0 KiB reserved, which only matters for a job
    // still under way across the upgrade.
    M::up(
        "ALTER TABLE moves ADD COLUMN memory_kib INTEGER NOT NULL DEFAULT 0;
                 CREATE INDEX moves_by_state ON moves(state);",
    ),
    // Version 5.
    // Guests that disappeared from their owner outside Lifeboat,
    // kept with their last report (definition included) until they
    // are defined again or an operator forgets them.
    M::up(
        "CREATE TABLE IF NOT EXISTS missing (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    name TEXT NOT NULL,
                    data BLOB NOT NULL,
                    since_ms INTEGER NOT NULL
                 );",
    ),
    // Version 6.
    M::up(
        "CREATE TABLE IF NOT EXISTS waiting (
                    uuid TEXT PRIMARY KEY,
                    host TEXT NOT NULL,
                    name TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    since_ms INTEGER NOT NULL,
                    job TEXT NOT NULL
                 );",
    ),
    // Version 7.
    // Rows that could not be read at a start, moved aside whole so
    // the rest loads (see `Store::quarantine`); `uuid` names the
    // guest they concern, which stays blocked while the row is here.
    M::up(
        "CREATE TABLE IF NOT EXISTS quarantine (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    at_ms INTEGER NOT NULL,
                    source_table TEXT NOT NULL,
                    row_key TEXT NOT NULL,
                    uuid TEXT NOT NULL,
                    host TEXT NOT NULL,
                    reason TEXT NOT NULL,
                    row_text TEXT NOT NULL,
                    data BLOB
                 );",
    ),
];

/// The migrations, for [`Migrations::to_latest`].
pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::from_slice(MIGRATIONS)
}

/// How many migrations there are: the schema version they lead to.
#[cfg(test)]
pub(crate) fn latest_version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::super::{SCHEMA_VERSION, Store, StoreError, legacy_schema};

    /// The schema as SQLite keeps it: every object with its SQL text.
    fn master(path: &std::path::Path) -> Vec<(String, String, String, Option<String>)> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn user_version(path: &std::path::Path) -> i64 {
        Connection::open(path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn the_migrations_are_valid_and_lead_to_the_schema_version() {
        super::migrations().validate().unwrap();
        assert_eq!(i64::try_from(super::latest_version()).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_fresh_database_and_one_from_every_older_version_match_what_earlier_releases_made() {
        let dir = tempfile::tempdir().unwrap();
        // The reference: a database built by the hand-written code of earlier releases.
        let reference = dir.path().join("legacy.db");
        legacy_schema::upgrade_to(&Connection::open(&reference).unwrap(), SCHEMA_VERSION).unwrap();
        assert_eq!(user_version(&reference), SCHEMA_VERSION);
        let want = master(&reference);
        assert!(want.len() > 10, "{want:?}");

        for from in 0..=SCHEMA_VERSION {
            let path = dir.path().join(format!("v{from}.db"));
            {
                let c = Connection::open(&path).unwrap();
                legacy_schema::upgrade_to(&c, from).unwrap();
                if from >= 1 {
                    c.execute(
                        "INSERT INTO hosts (host_id, info, first_seen_ms, last_seen_ms) VALUES ('a', x'', 1, 2)",
                        [],
                    )
                    .unwrap();
                }
            }
            assert_eq!(user_version(&path), from);
            let s = Store::open(&path).unwrap();
            if from >= 1 {
                let h = s.host("a").unwrap().expect("the row written before the upgrade is kept");
                assert_eq!((h.first_seen_ms, h.last_seen_ms), (1, 2));
            }
            drop(s);
            assert_eq!(user_version(&path), SCHEMA_VERSION, "from version {from}");
            assert_eq!(master(&path), want, "from version {from}");
            // Opening again changes nothing.
            drop(Store::open(&path).unwrap());
            assert_eq!(master(&path), want, "reopened, from version {from}");
        }
    }

    #[test]
    fn a_database_from_a_newer_lifeboat_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE future (x INTEGER); PRAGMA user_version = 8;")
            .unwrap();
        let before = master(&path);
        let e = Store::open(&path).err().expect("refused");
        assert!(matches!(e, StoreError::TooNew(8)), "{e}");
        assert!(e.to_string().contains("newer than this controller understands (7)"), "{e}");
        assert_eq!(user_version(&path), 8);
        assert_eq!(master(&path), before);
    }
}
