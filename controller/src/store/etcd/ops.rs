//! Operations on the etcd data: a one-shot import of a SQLite database (the
//! upgrade path), an export of Lifeboat's keys at one revision (a backup),
//! and a restore of an export. Import and restore write only into an EMPTY
//! prefix while no leader is elected, in batches (so not atomically); the
//! schema key is written last, so a controller refuses a prefix whose import
//! or restore did not finish (rows without a schema key). Restored keys get
//! new, higher etcd revisions: the next leader's epoch is higher than any
//! before, so agents' epochs keep rising.

use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use rusqlite::{Connection, OpenFlags};

use super::codec;
use super::replica::{Cache, check_schema, prefix_end};
use super::{EtcdError, leader_prefix, rows_prefix, schema_key};
use crate::store::{SCHEMA_VERSION, Store};

/// First line of an export file.
const MAGIC: &[u8] = b"LIFEBOAT-ETCD-EXPORT 1\n";

/// Keys written per etcd transaction (under etcd's default --max-txn-ops, 128).
const BATCH_OPS: usize = 100;

/// Bytes of values written per etcd transaction (under etcd's default
/// --max-request-bytes, 1.5 MiB).
const BATCH_BYTES: usize = 1024 * 1024;

/// Largest export file read (bytes).
const MAX_EXPORT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// One key of an export, relative to the prefix.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportKv {
    /// The key without the prefix (`schema`, `v1/...`).
    #[prost(string, tag = "1")]
    pub key: String,
    /// Its value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// An export file's body (after [`MAGIC`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Export {
    /// The etcd revision the keys were read at.
    #[prost(int64, tag = "1")]
    pub revision: i64,
    /// The schema version of the rows.
    #[prost(int64, tag = "2")]
    pub schema: i64,
    /// Every key.
    #[prost(message, repeated, tag = "3")]
    pub kvs: Vec<ExportKv>,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSummary {
    /// Row keys read or written.
    pub keys: usize,
    /// etcd transactions written (import, restore) or the revision read (export).
    pub revision_or_txns: i64,
}

/// Refuses unless the prefix holds nothing and no leader is elected.
async fn require_empty(client: &mut Client, prefix: &str) -> Result<(), EtcdError> {
    let lp = leader_prefix(prefix);
    let r = client.get(lp.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only())).await?;
    if r.count() > 0 {
        return Err(EtcdError::Refused(format!(
            "refused: a controller is elected under {lp} (stop every controller of this prefix first)"
        )));
    }
    let r = client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only())).await?;
    if r.count() > 0 {
        return Err(EtcdError::Refused(format!(
            "refused: {} keys already exist under {prefix}; import and restore write only into an empty prefix \
             (delete it with `etcdctl del --prefix {prefix}` after an export, or use another prefix)",
            r.count()
        )));
    }
    Ok(())
}

/// Writes `kvs` (full keys) in batches, each guarded by "no leader elected,
/// no schema key yet", then the schema key; the number of transactions.
async fn write_batches(client: &mut Client, prefix: &str, kvs: Vec<(String, Vec<u8>)>) -> Result<i64, EtcdError> {
    let guard = || {
        vec![
            Compare::create_revision(leader_prefix(prefix), CompareOp::Equal, 0).with_prefix(),
            Compare::create_revision(schema_key(prefix), CompareOp::Equal, 0),
        ]
    };
    let mut txns = 0;
    let mut batch: Vec<TxnOp> = Vec::new();
    let mut bytes = 0;
    let mut it = kvs.into_iter().peekable();
    while let Some((k, v)) = it.next() {
        bytes += k.len() + v.len();
        batch.push(TxnOp::put(k, v, None));
        let last = it.peek().is_none();
        let full = it.peek().is_some_and(|(k, v)| batch.len() >= BATCH_OPS || bytes + k.len() + v.len() > BATCH_BYTES);
        if last || full {
            let r = client.txn(Txn::new().when(guard()).and_then(std::mem::take(&mut batch))).await?;
            txns += 1;
            bytes = 0;
            if !r.succeeded() {
                return Err(EtcdError::Refused(format!(
                    "stopped after {txns} transactions: a controller was elected or {} appeared meanwhile; the \
                     prefix holds a partial copy (no schema key): delete it and run again",
                    schema_key(prefix)
                )));
            }
        }
    }
    let r = client
        .txn(Txn::new().when(guard()).and_then([TxnOp::put(schema_key(prefix), SCHEMA_VERSION.to_string(), None)]))
        .await?;
    if !r.succeeded() {
        return Err(EtcdError::Refused("a controller was elected before the schema key was written".into()));
    }
    Ok(txns + 1)
}

/// The host name controller-wide alarms are raised under (as `backup`).
const CONTROLLER_ALARM_HOST: &str = "controller";

/// Marks data copied in from a file as possibly older than what the hosts
/// run (the `store-restored` alarm and an audit entry, as a SQLite
/// restore): the first leader grants no lease and starts or stops nothing
/// until every host not OFFLINE has reported.
fn mark_restored(store: &Store, what: &str, from: &Path) -> Result<(), EtcdError> {
    let detail = format!(
        "the etcd data was {what} {}: it may be older than what the hosts run (guests moved since, newer \
         ownership generations). Until every host not OFFLINE has reported, Lifeboat grants no lease and starts or \
         stops nothing; ownership is then rebuilt from the hosts' reports (highest generation wins). A host that is \
         gone for good: declare it OFFLINE (`lifeboat hosts set-status HOST OFFLINE`)",
        from.display()
    );
    store.raise_alarm(CONTROLLER_ALARM_HOST, "store-restored", &detail)?;
    store.audit(&crate::store::AuditRow::by_controller("store.restored", CONTROLLER_ALARM_HOST, "", detail))?;
    Ok(())
}

/// Every row of `store`, encoded as keys under `prefix`.
fn encode_all(store: &Store, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
    let mut kvs = Vec::new();
    for t in codec::tables(store.conn())? {
        kvs.extend(codec::encode_table(store.conn(), prefix, &t)?);
    }
    Ok(kvs)
}

/// Writes the schema key into an empty prefix (no leader elected): a new
/// installation, as `init` creates an empty SQLite database. A controller
/// never starts on a prefix without it (a typo in `prefix` must not look
/// like a new, empty pool).
pub async fn init(client: &mut Client, prefix: &str) -> Result<OpSummary, EtcdError> {
    require_empty(client, prefix).await?;
    let txns = write_batches(client, prefix, Vec::new()).await?;
    Ok(OpSummary { keys: 0, revision_or_txns: txns })
}

/// Copies a SQLite database (of this controller's schema) into an empty
/// prefix. Not atomic: re-runnable only after emptying the prefix.
pub async fn import(client: &mut Client, prefix: &str, db: &Path) -> Result<OpSummary, EtcdError> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v != SCHEMA_VERSION {
        return Err(EtcdError::Refused(format!(
            "refused: {} has schema version {v}, this controller imports {SCHEMA_VERSION} (start this version's \
             controller on it once with the SQLite backend to upgrade it, then import)",
            db.display()
        )));
    }
    require_empty(client, prefix).await?;
    drop(conn);
    // A scratch copy takes the store-restored mark: the file may be an old
    // backup rather than the database of a controller just stopped.
    let scratch = Store::open_in_memory()?;
    scratch.conn().pragma_update(None, "foreign_keys", "OFF")?;
    scratch.conn().execute("ATTACH DATABASE ?1 AS src", [db.to_string_lossy().as_ref()])?;
    // One transaction: every table is read from the same snapshot.
    scratch.conn().execute_batch("BEGIN")?;
    for t in codec::tables(scratch.conn())? {
        let q = codec::quote(&t.name);
        scratch.conn().execute(&format!("INSERT INTO main.{q} SELECT * FROM src.{q}"), [])?;
    }
    scratch.conn().execute_batch("COMMIT")?;
    scratch.conn().execute("DETACH DATABASE src", [])?;
    mark_restored(&scratch, "imported from", db)?;
    let kvs = encode_all(&scratch, prefix)?;
    let keys = kvs.len();
    let txns = write_batches(client, prefix, kvs).await?;
    Ok(OpSummary { keys, revision_or_txns: txns })
}

/// Writes every Lifeboat key under `prefix` (rows and schema, not the
/// election keys) at one revision into `to` (refuses an existing file).
pub async fn export(client: &mut Client, prefix: &str, to: &Path) -> Result<OpSummary, EtcdError> {
    if to.exists() {
        return Err(EtcdError::Refused(format!("refused: {} exists", to.display())));
    }
    let (schema, _) = check_schema(client, prefix).await?;
    let Some(schema) = schema else {
        return Err(EtcdError::Refused(format!("refused: no {} (nothing to export)", schema_key(prefix))));
    };
    let p = rows_prefix(prefix);
    let end = prefix_end(p.as_bytes());
    let mut start = p.into_bytes();
    let mut out = Export { revision: 0, schema, kvs: Vec::new() };
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(2000);
        if out.revision > 0 {
            opts = opts.with_revision(out.revision);
        }
        let r = client.get(start.clone(), Some(opts)).await?;
        if out.revision == 0 {
            out.revision = r.header().map_or(0, |h| h.revision());
        }
        for kv in r.kvs() {
            if kv.key() == super::replica::sync_key(prefix).as_bytes() {
                continue;
            }
            let k = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(prefix))
                .ok_or_else(|| EtcdError::Schema("a key under the prefix is not UTF-8".into()))?;
            out.kvs.push(ExportKv { key: k.to_string(), value: kv.value().to_vec() });
        }
        match r.kvs().last() {
            Some(last) if r.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    let mut bytes = MAGIC.to_vec();
    prost::Message::encode(&out, &mut bytes).map_err(|e| EtcdError::Schema(e.to_string()))?;
    let tmp = to.with_extension("partial");
    std::fs::write(&tmp, &bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)?;
    Ok(OpSummary { keys: out.kvs.len(), revision_or_txns: out.revision })
}

/// Restores an export into an EMPTY prefix while no leader is elected.
/// Every row is checked first (decoded into a scratch cache): a file with
/// one bad row writes nothing.
pub async fn restore(client: &mut Client, prefix: &str, from: &Path) -> Result<OpSummary, EtcdError> {
    let len = std::fs::metadata(from)?.len();
    if len > MAX_EXPORT_BYTES {
        return Err(EtcdError::Refused(format!("refused: {} is larger than {MAX_EXPORT_BYTES} bytes", from.display())));
    }
    let bytes = std::fs::read(from)?;
    let body = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| EtcdError::Refused(format!("refused: {} is not a Lifeboat etcd export", from.display())))?;
    let ex: Export = prost::Message::decode(body)
        .map_err(|e| EtcdError::Refused(format!("refused: {} does not decode: {e}", from.display())))?;
    if ex.schema > SCHEMA_VERSION {
        return Err(EtcdError::TooNew { found: ex.schema, understood: SCHEMA_VERSION });
    }
    if ex.schema != SCHEMA_VERSION {
        return Err(EtcdError::Refused(format!(
            "refused: the export has schema {}, this controller restores {SCHEMA_VERSION}",
            ex.schema
        )));
    }
    let scratch = Store::open_in_memory()?;
    scratch.conn().pragma_update(None, "foreign_keys", "OFF")?;
    let tables = codec::tables(scratch.conn())?;
    let mut cache = Cache { store: scratch, tables, hashes: Default::default(), refused: 0, bad: Default::default() };
    for kv in ex.kvs {
        if kv.key == "schema" {
            continue;
        }
        let full = format!("{prefix}{}", kv.key);
        cache.apply(prefix, full.as_bytes(), Some(&kv.value), 0);
        if cache.refused > 0 {
            return Err(EtcdError::Refused(format!(
                "refused: the export's key {} does not decode (nothing written)",
                kv.key
            )));
        }
    }
    mark_restored(&cache.store, "restored from", from)?;
    let kvs = encode_all(&cache.store, prefix)?;
    require_empty(client, prefix).await?;
    let keys = kvs.len();
    let txns = write_batches(client, prefix, kvs).await?;
    Ok(OpSummary { keys, revision_or_txns: txns })
}
