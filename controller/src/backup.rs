//! Online, consistent backups of the controller's database and restores,
//! with SQLite's backup API (a snapshot taken while the controller runs).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use thiserror::Error;

/// Backup or restore failures, each naming the file.
#[derive(Debug, Error)]
pub enum BackupError {
    /// SQLite error on a file.
    #[error("{path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file is not a healthy Lifeboat database.
    #[error("{path} is not a usable Lifeboat controller database: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Refused to overwrite or to touch a database in use.
    #[error("{0}")]
    Refused(String),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a database holds (printed after backup and restore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Schema version.
    pub schema: i64,
    /// Rows per table: hosts, guests, jobs, moves, audit.
    pub counts: Vec<(String, i64)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "schema {}", self.schema)?;
        for (t, n) in &self.counts {
            write!(f, ", {n} {t}")?;
        }
        Ok(())
    }
}

fn sq(path: &Path) -> impl FnOnce(rusqlite::Error) -> BackupError + '_ {
    move |source| BackupError::Sqlite { path: path.to_path_buf(), source }
}

/// Checks integrity and schema, and counts what is inside.
pub fn verify(path: &Path) -> Result<Summary, BackupError> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq(path))?;
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| BackupError::Invalid { path: path.into(), reason: e.to_string() })?;
    if ok != "ok" {
        return Err(BackupError::Invalid { path: path.into(), reason: format!("integrity check: {ok}") });
    }
    let schema: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sq(path))?;
    if !(1..=crate::store::SCHEMA_VERSION).contains(&schema) {
        return Err(BackupError::Invalid {
            path: path.into(),
            reason: format!(
                "schema version {schema}; this controller understands 1..={}",
                crate::store::SCHEMA_VERSION
            ),
        });
    }
    let mut counts = Vec::new();
    for t in ["hosts", "guests", "jobs", "moves", "audit"] {
        let n: i64 = c.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0)).unwrap_or(0);
        counts.push((t.to_string(), n));
    }
    Ok(Summary { schema, counts })
}

/// Writes a consistent copy of the live database `db` to `out` (refuses to
/// overwrite unless `force`), then verifies the copy.
pub fn backup(db: &Path, out: &Path, force: bool) -> Result<Summary, BackupError> {
    if out.exists() && !force {
        return Err(BackupError::Refused(format!("{} exists; refusing to overwrite it (use --force)", out.display())));
    }
    if !db.exists() {
        return Err(BackupError::Refused(format!("the database {} does not exist", db.display())));
    }
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq(db))?;
    src.busy_timeout(std::time::Duration::from_secs(10)).map_err(sq(db))?;
    let tmp = out.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    // The copy holds what the database holds (definitions with their
    // graphics passwords): owner-only from its first byte, whatever the umask.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| BackupError::Io { path: tmp.clone(), source })?;
    }
    src.backup(rusqlite::MAIN_DB, &tmp, None::<fn(rusqlite::backup::Progress)>).map_err(sq(&tmp))?;
    restrict_db_files(&tmp).map_err(|source| BackupError::Io { path: tmp.clone(), source })?;
    let summary = verify(&tmp)?;
    std::fs::rename(&tmp, out).map_err(|source| BackupError::Io { path: out.into(), source })?;
    Ok(summary)
}

/// Sets the database file, its WAL and SHM files and its lock file to mode
/// 0600 where group or others could read them (files made before the
/// controller set its umask, or by another tool). Missing files are fine.
pub fn restrict_db_files(db: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        lifeboat_common::files::restrict_to_owner(Path::new(&p))?;
    }
    Ok(())
}

/// The lock file a running controller holds for its database.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the database's lock (held for the life of the returned file).
pub fn lock(db: &Path) -> Result<std::fs::File, BackupError> {
    let p = lock_path(db);
    if let Some(d) = p.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|source| BackupError::Io { path: p.clone(), source })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(_) => Err(BackupError::Refused(format!(
            "the database {} is in use by a running controller (lock {} is held)",
            db.display(),
            p.display()
        ))),
    }
}

/// Replaces the database `db` with the backup `from`. The controller must
/// be stopped (its lock free); the backup is verified first.
pub fn restore(from: &Path, db: &Path) -> Result<Summary, BackupError> {
    verify(from)?;
    let _guard = lock(db).map_err(|e| BackupError::Refused(format!("{e}; stop the controller before restoring")))?;
    let mut dst = Connection::open(db).map_err(sq(db))?;
    dst.restore(rusqlite::MAIN_DB, from, None::<fn(rusqlite::backup::Progress)>).map_err(sq(db))?;
    drop(dst);
    mark_restored(from, db)?;
    restrict_db_files(db).map_err(|source| BackupError::Io { path: db.into(), source })?;
    verify(db)
}

/// Host name of the alarms the controller raises about itself.
pub const CONTROLLER_ALARM_HOST: &str = "controller";

/// Marks a restored database: a backup is older than what the hosts have
/// seen since (guests moved, generations raised), so the controller that
/// starts on it must not grant leases or start anything from it before the
/// hosts have reported. The `store-restored` alarm holds the reconciler
/// until every host not OFFLINE has reported, then clears itself.
fn mark_restored(from: &Path, db: &Path) -> Result<(), BackupError> {
    let store =
        crate::store::Store::open(db).map_err(|e| BackupError::Invalid { path: db.into(), reason: e.to_string() })?;
    let detail = format!(
        "the database was restored from {}: it may be older than what the hosts run (guests moved since, newer \
         ownership generations). Until every host not OFFLINE has reported, Lifeboat grants no lease and starts or stops \
         nothing; ownership is then rebuilt from the hosts' reports (highest generation wins). A host that is gone for good: \
         declare it OFFLINE (`lifeboat hosts set-status HOST OFFLINE`)",
        from.display()
    );
    let io = |e: crate::store::StoreError| BackupError::Invalid { path: db.into(), reason: e.to_string() };
    store.raise_alarm(CONTROLLER_ALARM_HOST, "store-restored", &detail).map_err(io)?;
    store
        .audit(&crate::store::AuditRow::by_controller("store.restored", CONTROLLER_ALARM_HOST, "", detail))
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_refuses_to_overwrite_and_restore_refuses_a_running_controller() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("c.db");
        let s = crate::store::Store::open(&db).unwrap();
        s.audit(&crate::store::AuditRow { actor: "a".into(), action: "x".into(), ..Default::default() }).unwrap();
        let out = d.path().join("b.db");
        let sum = backup(&db, &out, false).unwrap();
        assert!(sum.counts.contains(&("audit".into(), 1)), "{sum}");
        assert_eq!(
            lifeboat_common::files::mode(&out).unwrap(),
            0o600,
            "a backup holds secrets: owner-only whatever the umask"
        );
        assert!(matches!(backup(&db, &out, false), Err(BackupError::Refused(_))));
        let held = lock(&db).unwrap();
        let e = restore(&out, &db).unwrap_err().to_string();
        assert!(e.contains("stop the controller"), "{e}");
        drop(held);
        restore(&out, &db).unwrap();
        let s = crate::store::Store::open(&db).unwrap();
        let alarms = s.alarms(false).unwrap();
        assert!(
            alarms.iter().any(|a| a.3 == "store-restored" && a.4.contains("b.db")),
            "a restored database holds until hosts report: {alarms:?}"
        );
        std::fs::write(d.path().join("junk.db"), b"not a database at all, clearly").unwrap();
        assert!(matches!(
            verify(&d.path().join("junk.db")),
            Err(BackupError::Invalid { .. } | BackupError::Sqlite { .. })
        ));
    }

    #[test]
    fn a_database_from_a_newer_lifeboat_is_not_a_backup_this_controller_can_restore() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE future (x INTEGER); PRAGMA user_version = 8;")
            .unwrap();
        let b = verify(&path).unwrap_err();
        assert!(b.to_string().contains("schema version 8"), "{b}");
        let fresh = dir.path().join("fresh.db");
        drop(crate::store::Store::open(&fresh).unwrap());
        assert!(verify(&fresh).is_ok());
    }
}
