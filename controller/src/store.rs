//! SQLite persistence of hosts and guests. Every change the registry makes
//! is written here before it is acknowledged, so a restart loses nothing.

use std::path::Path;

use lifeboat_proto::v1::{Guest, HostInfo};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

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
    /// The database was written by a newer Lifeboat.
    #[error("database schema version {0} is newer than this controller understands ({SCHEMA_VERSION})")]
    TooNew(i64),
}

/// Current schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// A stored host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// Facts last reported.
    pub info: HostInfo,
    /// Operators' status name.
    pub status: String,
    /// When first seen.
    pub first_seen_ms: i64,
    /// When last heard from (persisted lazily).
    pub last_seen_ms: i64,
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

/// The database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database and migrates its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v > SCHEMA_VERSION {
            return Err(StoreError::TooNew(v));
        }
        if v < 1 {
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
        Ok(Store { conn })
    }

    /// Inserts or updates a host's facts (status and first-seen kept).
    pub fn upsert_host(&self, info: &HostInfo, now_ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO hosts (host_id, info, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(host_id) DO UPDATE SET info = excluded.info, last_seen_ms = excluded.last_seen_ms",
            params![info.host_id, info.encode_to_vec(), now_ms],
        )?;
        Ok(())
    }

    /// Records when hosts were last heard from.
    pub fn touch_hosts(&mut self, seen: &[(String, i64)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("UPDATE hosts SET last_seen_ms = ?2 WHERE host_id = ?1 AND last_seen_ms < ?2")?;
            for (h, t) in seen {
                st.execute(params![h, t])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces every guest of a host with `guests`, in one transaction.
    pub fn replace_guests(&mut self, host_id: &str, guests: &[Guest], now_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM guests WHERE host_id = ?1", params![host_id])?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO guests (host_id, uuid, name, data, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for g in guests {
                st.execute(params![host_id, g.uuid, g.name, g.encode_to_vec(), now_ms])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Inserts or updates one guest.
    pub fn upsert_guest(&self, host_id: &str, g: &Guest, now_ms: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO guests (host_id, uuid, name, data, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(host_id, uuid) DO UPDATE SET name = excluded.name, data = excluded.data, updated_ms = excluded.updated_ms",
            params![host_id, g.uuid, g.name, g.encode_to_vec(), now_ms],
        )?;
        Ok(())
    }

    /// Deletes one guest of a host.
    pub fn delete_guest(&self, host_id: &str, uuid: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM guests WHERE host_id = ?1 AND uuid = ?2", params![host_id, uuid])?;
        Ok(())
    }

    /// Sets a host's status.
    pub fn set_status(&self, host_id: &str, status: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("UPDATE hosts SET status = ?2 WHERE host_id = ?1", params![host_id, status])? > 0)
    }

    /// One host.
    pub fn host(&self, host_id: &str) -> Result<Option<HostRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT info, status, first_seen_ms, last_seen_ms FROM hosts WHERE host_id = ?1",
                params![host_id],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?
            .map(|(b, status, first_seen_ms, last_seen_ms)| {
                Ok(HostRow { info: decode_host(&b)?, status, first_seen_ms, last_seen_ms })
            })
            .transpose()
    }

    /// All hosts.
    pub fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        let mut st = self.conn.prepare("SELECT info, status, first_seen_ms, last_seen_ms FROM hosts ORDER BY host_id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (b, status, first_seen_ms, last_seen_ms) = row?;
            out.push(HostRow { info: decode_host(&b)?, status, first_seen_ms, last_seen_ms });
        }
        Ok(out)
    }

    /// All guests.
    pub fn guests(&self) -> Result<Vec<GuestRow>, StoreError> {
        let mut st = self.conn.prepare("SELECT host_id, data, updated_ms FROM guests ORDER BY host_id, name")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (host_id, b, updated_ms) = row?;
            let guest = Guest::decode(&b[..]).map_err(|e| StoreError::Corrupt { table: "guests", message: e.to_string() })?;
            out.push(GuestRow { host_id, guest, updated_ms });
        }
        Ok(out)
    }
}

fn decode_host(b: &[u8]) -> Result<HostInfo, StoreError> {
    HostInfo::decode(b).map_err(|e| StoreError::Corrupt { table: "hosts", message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            s.replace_guests("a", &[guest("u1", "vm1"), guest("u2", "vm2")], 6).unwrap();
            s.delete_guest("a", "u2").unwrap();
            s.set_status("a", "MAINTENANCE").unwrap();
            s.touch_hosts(&[("a".into(), 99)]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let h = s.host("a").unwrap().unwrap();
        assert_eq!((h.info.hostname.as_str(), h.status.as_str(), h.first_seen_ms, h.last_seen_ms), ("ha", "MAINTENANCE", 5, 99));
        let g = s.guests().unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].guest.name, "vm1");
    }

    #[test]
    fn unknown_host_is_none() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.host("nope").unwrap().is_none());
    }
}
