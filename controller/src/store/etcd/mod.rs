//! The etcd backend: etcd holds the decided state; each controller keeps a
//! local SQLite cache of it (same schema as the SQLite backend) that is
//! rebuilt from etcd at every start ([`Replica`]), follows etcd's watch
//! while the controller is a follower, and once it leads is changed only by
//! its own writes ([`EtcdRepos`]).
//!
//! Key layout: `{prefix}v1/{table}/{primary key, percent-encoded,
//! '/'-joined}` (one key per row, value: the protobuf [`codec::Row`]),
//! `{prefix}schema` (the schema version, decimal), `{prefix}leader/...`
//! (election keys).
//!
//! Architecture invariant: one store-thread call is one local SQLite
//! transaction and at most ONE etcd transaction carrying every row it
//! changed, guarded by the leadership key's create revision (the fencing
//! epoch) and the schema version. If etcd does not confirm it, the local
//! transaction rolls back and the caller gets an error: the cache never
//! holds a write etcd does not. An etcd error whose outcome is unknown, or a
//! failed guard, also ends leadership (the process restarts and rebuilds its
//! cache from etcd).

pub mod codec;
pub mod ops;
mod replica;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use rusqlite::types::Value;
use thiserror::Error;

pub use replica::{Replica, RowsRevision};

/// Whether `prefix` holds Lifeboat data (its schema key): a controller
/// never starts on a prefix without it, as it never starts on a missing
/// SQLite file (`init` or `etcd-import` writes it).
pub async fn initialized(client: &Client, prefix: &str) -> Result<bool, EtcdError> {
    let mut c = client.clone();
    Ok(replica::check_schema(&mut c, prefix).await?.0.is_some())
}

use super::SCHEMA_VERSION;
use super::sqlite::SqliteRepos;
use crate::ha::Leadership;
use crate::ports::{
    AlarmRepo, AuditRepo, GuestRepo, HostRepo, JobRepo, Maintenance, OwnershipRepo, QuarantineRepo, RepoError,
    RepoResult, Repositories,
};
use codec::Table;

/// An etcd backend failure.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// The local cache (SQLite) failed.
    #[error("etcd cache: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The cache's store failed.
    #[error("etcd cache: {0}")]
    Store(#[from] super::StoreError),
    /// etcd failed or refused a request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd: no answer within {0} ms")]
    Timeout(u128),
    /// The data in etcd does not fit this controller's schema.
    #[error("etcd data: {0}")]
    Schema(String),
    /// The data in etcd was written by a newer Lifeboat.
    #[error("etcd data schema version {found} is newer than this controller understands ({understood})")]
    TooNew {
        /// The version found.
        found: i64,
        /// The newest version this controller understands.
        understood: i64,
    },
    /// A write refused before it reached etcd, or an operation refused.
    #[error("{0}")]
    Refused(String),
    /// This controller lost its leadership during the write (or before it
    /// was sent): it restarts as a follower. The caller is told whether the
    /// write may have reached etcd.
    #[error(
        "this controller lost its leadership ({why}); {}",
        if *outcome_unknown {
            "the change may or may not have been made: check `lifeboat hosts list`, `lifeboat jobs list` and \
             `lifeboat log` once a leader is elected, before trying again"
        } else {
            "nothing was changed: run the command again once a leader is elected"
        }
    )]
    LostLeadership {
        /// Why (etcd's answer, or none within the budget).
        why: String,
        /// Whether an attempt of the write may have been applied.
        outcome_unknown: bool,
    },
    /// The configuration or a file it names does not work.
    #[error("etcd configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<EtcdError> for RepoError {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::TooNew { found, understood } => RepoError::TooNew { found, understood },
            e @ EtcdError::LostLeadership { .. } => RepoError::LostLeadership(e.to_string()),
            e => RepoError::Backend { write_failure: true, source: Box::new(e) },
        }
    }
}

/// Connects to the etcd cluster at `endpoints` (the `[store]` section's
/// `endpoints`, `ca`, `cert`, `key`): TLS when a CA or a client certificate
/// is named. Call it from inside a multi-thread tokio runtime.
pub async fn connect(
    endpoints: &[String],
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Client, EtcdError> {
    if endpoints.is_empty() {
        return Err(EtcdError::Config("[store] endpoints is empty".into()));
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if ca.is_some() || cert.is_some() {
        let read = |what: &str, p: &Path| {
            std::fs::read(p).map_err(|e| EtcdError::Config(format!("cannot read {what} {}: {e}", p.display())))
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read("ca", ca)?));
        }
        match (cert, key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read("cert", c)?, read("key", k)?))
            }
            (None, None) => {}
            _ => return Err(EtcdError::Config("[store] cert and key go together".into())),
        }
        opts = opts.with_tls(tls);
    }
    Ok(Client::connect(endpoints, Some(opts)).await?)
}

/// The key holding the schema version.
pub fn schema_key(prefix: &str) -> String {
    format!("{prefix}schema")
}

/// The prefix of the election keys.
pub fn leader_prefix(prefix: &str) -> String {
    format!("{prefix}leader")
}

/// The prefix of the row keys.
pub fn rows_prefix(prefix: &str) -> String {
    format!("{prefix}v1/")
}

/// Upper bounds (ms) of the write latency buckets of [`EtcdStats`].
pub const LATENCY_BUCKETS_MS: [u64; 11] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500];

/// Counters of the etcd writes of this process (for the metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdStats {
    /// etcd transactions sent (each store call that changed replicated rows).
    pub txns: u64,
    /// Of those, refused or failed (error, timeout, guard failed).
    pub failures: u64,
    /// Store calls whose changes were all already in etcd (nothing sent).
    pub skipped: u64,
    /// Keys put and deleted.
    pub ops: u64,
    /// Bytes of values put.
    pub bytes: u64,
    /// Latency of sent transactions: counts per bucket of
    /// [`LATENCY_BUCKETS_MS`], the last one counting everything slower.
    pub latency_buckets: [u64; 12],
    /// Sum of the latencies (µs).
    pub latency_sum_us: u64,
    /// The last transaction's latency (µs).
    pub last_latency_us: u64,
    /// Rows read from etcd that did not decode (not applied to the cache).
    pub refused_rows: u64,
    /// Writes sent again after a transport failure (a member down).
    pub resends: u64,
}

struct Counters {
    txns: AtomicU64,
    failures: AtomicU64,
    skipped: AtomicU64,
    ops: AtomicU64,
    bytes: AtomicU64,
    buckets: [AtomicU64; 12],
    sum_us: AtomicU64,
    last_us: AtomicU64,
    refused_rows: AtomicU64,
    resends: AtomicU64,
}

static COUNTERS: Counters = Counters {
    txns: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    skipped: AtomicU64::new(0),
    ops: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    buckets: [const { AtomicU64::new(0) }; 12],
    sum_us: AtomicU64::new(0),
    last_us: AtomicU64::new(0),
    refused_rows: AtomicU64::new(0),
    resends: AtomicU64::new(0),
};

/// The etcd write counters of this process so far.
pub fn stats() -> EtcdStats {
    let c = &COUNTERS;
    let mut latency_buckets = [0; 12];
    for (o, b) in latency_buckets.iter_mut().zip(&c.buckets) {
        *o = b.load(Ordering::Relaxed);
    }
    EtcdStats {
        txns: c.txns.load(Ordering::Relaxed),
        failures: c.failures.load(Ordering::Relaxed),
        skipped: c.skipped.load(Ordering::Relaxed),
        ops: c.ops.load(Ordering::Relaxed),
        bytes: c.bytes.load(Ordering::Relaxed),
        latency_buckets,
        latency_sum_us: c.sum_us.load(Ordering::Relaxed),
        last_latency_us: c.last_us.load(Ordering::Relaxed),
        refused_rows: c.refused_rows.load(Ordering::Relaxed),
        resends: c.resends.load(Ordering::Relaxed),
    }
}

fn record_latency(d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let ms = us / 1000;
    let i = LATENCY_BUCKETS_MS.iter().position(|b| ms < *b).unwrap_or(LATENCY_BUCKETS_MS.len());
    COUNTERS.buckets[i].fetch_add(1, Ordering::Relaxed);
    COUNTERS.sum_us.fetch_add(us, Ordering::Relaxed);
    COUNTERS.last_us.store(us, Ordering::Relaxed);
}

pub(crate) fn count_refused_row() {
    COUNTERS.refused_rows.fetch_add(1, Ordering::Relaxed);
}

/// Limits a write is checked against before it is sent (etcd's own
/// `--max-txn-ops` and `--max-request-bytes`); `None`: let etcd decide.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteLimits {
    /// etcd's `--max-txn-ops` (its default: 128).
    pub max_txn_ops: Option<usize>,
    /// etcd's `--max-request-bytes` (its default: 1.5 MiB).
    pub max_request_bytes: Option<usize>,
}

/// How long a write waits for etcd before it fails (and leadership ends:
/// the outcome is unknown).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// One attempt of a write waits this long before it is sent again (to
/// another member when the client's member died).
const RESEND_AFTER: Duration = Duration::from_millis(600);

/// Runs an idempotent etcd request (a read, a watch), sending it again on a
/// transport failure for up to [`WRITE_TIMEOUT`]: with one member down,
/// the client's balancer still picks it now and then, and such a request
/// fails at once instead of going to a live member.
pub(crate) async fn resend<T, Fut>(mut f: impl FnMut() -> Fut) -> Result<T, etcd_client::Error>
where
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
    loop {
        match f().await {
            Err(e) if resendable(&e) && tokio::time::Instant::now() < deadline => {
                COUNTERS.resends.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// Whether an etcd error is a transport failure worth sending again
/// (etcd's own refusals, such as too many operations, are final).
fn resendable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(st) => {
            matches!(st.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded)
                && !st.message().contains("too many operations")
                && !st.message().contains("too large")
        }
        _ => false,
    }
}

/// The temp table and triggers that record which rows a call changed.
fn install_capture(conn: &rusqlite::Connection, tables: &[Table]) -> Result<(), EtcdError> {
    let mut sql = String::from("CREATE TEMP TABLE IF NOT EXISTS lb_changes (tbl TEXT NOT NULL, pk TEXT NOT NULL);\n");
    for t in tables {
        let q = codec::quote(&t.name);
        let lit = t.name.replace('\'', "''");
        let pk = |row: &str| {
            let cols: Vec<String> = t.pk.iter().map(|c| format!("{row}.{}", codec::quote(c))).collect();
            format!("INSERT INTO temp.lb_changes VALUES ('{lit}', json_array({}));", cols.join(", "))
        };
        let tn = t.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        sql.push_str(&format!(
            "CREATE TEMP TRIGGER IF NOT EXISTS lb_ins_{tn} AFTER INSERT ON main.{q} BEGIN {} END;\n\
             CREATE TEMP TRIGGER IF NOT EXISTS lb_upd_{tn} AFTER UPDATE ON main.{q} BEGIN {} {} END;\n\
             CREATE TEMP TRIGGER IF NOT EXISTS lb_del_{tn} AFTER DELETE ON main.{q} BEGIN {} END;\n",
            pk("NEW"),
            pk("OLD"),
            pk("NEW"),
            pk("OLD")
        ));
    }
    conn.execute_batch(&sql)?;
    Ok(())
}

fn pk_values(json: &str) -> Result<Vec<Value>, EtcdError> {
    let parts: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| EtcdError::Schema(format!("captured key {json}: {e}")))?;
    parts
        .into_iter()
        .map(|p| match p {
            serde_json::Value::String(s) => Ok(Value::Text(s)),
            serde_json::Value::Number(n) => {
                n.as_i64().map(Value::Integer).ok_or_else(|| EtcdError::Schema(format!("captured key {json}")))
            }
            _ => Err(EtcdError::Schema(format!("captured key {json} is not text or an integer"))),
        })
        .collect()
}

/// One key to write: its value, or `None` to delete it.
type Change = (String, Option<Vec<u8>>);

/// The repositories over the cache of a leading controller: every call is
/// one local transaction whose changed rows go to etcd in one guarded
/// transaction at commit (see the module doc).
pub struct EtcdRepos {
    inner: SqliteRepos,
    client: Client,
    rt: tokio::runtime::Handle,
    prefix: String,
    tables: Vec<Table>,
    hashes: HashMap<String, [u8; 32]>,
    leadership: Option<Arc<Leadership>>,
    limits: WriteLimits,
    timeout: Duration,
    /// The value of `{prefix}seq` this writer last wrote or read (`None`:
    /// not read yet). Every write compares it and puts the next, so an
    /// attempt that etcd applies late (after a re-send went through) fails
    /// its compare instead of putting older values back.
    seq: Option<u64>,
}

/// The write-sequence key under `prefix`.
pub fn seq_key(prefix: &str) -> String {
    format!("{prefix}seq")
}

impl std::fmt::Debug for EtcdRepos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRepos").field("prefix", &self.prefix).field("keys", &self.hashes.len()).finish()
    }
}

impl EtcdRepos {
    /// Sets the limits writes are checked against before they are sent.
    pub fn set_limits(&mut self, limits: WriteLimits) {
        self.limits = limits;
    }

    fn conn(&self) -> &rusqlite::Connection {
        self.inner.store().conn()
    }

    /// The keys (and their new values) this call changed, unchanged values
    /// left out.
    fn changes(&self) -> Result<BTreeMap<String, Option<Vec<u8>>>, EtcdError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT DISTINCT tbl, pk FROM temp.lb_changes")?;
        let captured: Vec<(String, String)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut out = BTreeMap::new();
        for (tbl, pk) in captured {
            let t = self
                .tables
                .iter()
                .find(|t| t.name == tbl)
                .ok_or_else(|| EtcdError::Schema(format!("captured a change of unknown table {tbl}")))?;
            let pk = pk_values(&pk)?;
            let key = codec::key(&self.prefix, &t.name, &pk)?;
            match codec::encode_row(conn, t, &pk)? {
                Some(v) => {
                    if self.hashes.get(&key) != Some(&codec::digest(&v)) {
                        out.insert(key, Some(v));
                    }
                }
                None => {
                    if self.hashes.contains_key(&key) {
                        out.insert(key, None);
                    }
                }
            }
        }
        Ok(out)
    }

    fn check_limits(&self, changes: &[Change]) -> Result<(), EtcdError> {
        if let Some(max) = self.limits.max_txn_ops
            && changes.len() + 2 > max
        {
            return Err(EtcdError::Refused(format!(
                "write refused: it changes {} keys in one etcd transaction, more than etcd's --max-txn-ops ({max}) \
                 allows; raise --max-txn-ops on every etcd member",
                changes.len()
            )));
        }
        if let Some(max) = self.limits.max_request_bytes {
            let bytes: usize = changes.iter().map(|(k, v)| k.len() * 2 + v.as_ref().map_or(0, Vec::len) + 16).sum();
            if bytes > max {
                return Err(EtcdError::Refused(format!(
                    "write refused: about {bytes} bytes in one etcd transaction, more than etcd's \
                     --max-request-bytes ({max}) allows; raise --max-request-bytes on every etcd member"
                )));
            }
        }
        Ok(())
    }

    /// Sends the changes as one etcd transaction guarded by the leadership
    /// and the schema; on success the digests are updated.
    fn send(&mut self, changes: Vec<Change>) -> Result<(), EtcdError> {
        let Some(lead) = self.leadership.clone() else {
            return Err(EtcdError::Refused("write refused: this cache is a read-only replica (no leadership)".into()));
        };
        if !lead.holds() {
            return Err(EtcdError::LostLeadership {
                why: "its epoch is fenced or its etcd lease lapsed; it restarts as a follower".into(),
                outcome_unknown: false,
            });
        }
        self.check_limits(&changes)?;
        let mut ops = Vec::with_capacity(changes.len());
        let mut bytes = 0u64;
        for (k, v) in &changes {
            match v {
                Some(v) => {
                    bytes += u64::try_from(v.len()).unwrap_or(u64::MAX);
                    ops.push(TxnOp::put(k.as_bytes(), v.clone(), None));
                }
                None => ops.push(TxnOp::delete(k.as_bytes(), None)),
            }
        }
        let seq = match self.seq {
            Some(n) => n,
            None => self.read_seq()?,
        };
        let skey = seq_key(&self.prefix);
        let seq_guard = if seq == 0 {
            Compare::version(skey.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(skey.clone(), CompareOp::Equal, seq.to_string())
        };
        ops.push(TxnOp::put(skey, (seq + 1).to_string(), None));
        let txn = Txn::new()
            .when([
                Compare::create_revision(lead.key(), CompareOp::Equal, lead.revision()),
                Compare::value(schema_key(&self.prefix), CompareOp::Equal, SCHEMA_VERSION.to_string()),
                seq_guard,
            ])
            .and_then(ops);
        let mut kv = self.client.kv_client();
        let started = Instant::now();
        let timeout = self.timeout;
        // One etcd member down must change nothing: a transport failure (a
        // dead member's connection, a member that does not answer) is sent
        // again, to whichever member the client picks, until the write's
        // budget is spent. Sending the same guarded transaction twice is
        // harmless: it puts the same values and deletes the same keys, and
        // its guard still requires this leadership.
        let holder = lead.clone();
        let r = self.rt.block_on(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let attempt = left.min(RESEND_AFTER);
                match tokio::time::timeout(attempt, kv.txn(txn.clone())).await {
                    Ok(Ok(resp)) => return Ok(Ok(resp)),
                    Ok(Err(e)) if !resendable(&e) => return Ok(Err(e)),
                    last => {
                        if tokio::time::Instant::now() + Duration::from_millis(50) >= deadline || !holder.holds() {
                            return match last {
                                Ok(Err(e)) => Ok(Err(e)),
                                _ => Err(()),
                            };
                        }
                        COUNTERS.resends.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        record_latency(started.elapsed());
        COUNTERS.txns.fetch_add(1, Ordering::Relaxed);
        let failed = |e: EtcdError| {
            COUNTERS.failures.fetch_add(1, Ordering::Relaxed);
            e
        };
        match r {
            Err(_) => {
                let why = format!("etcd write outcome unknown: no answer within {} ms", timeout.as_millis());
                lead.lose(&why);
                Err(failed(EtcdError::LostLeadership { why, outcome_unknown: true }))
            }
            Ok(Err(e)) => {
                let text = e.to_string();
                if text.contains("too many operations") {
                    return Err(failed(EtcdError::Refused(format!(
                        "write refused by etcd: {} keys in one transaction exceed its --max-txn-ops; raise \
                         --max-txn-ops on every etcd member ({text})",
                        changes.len()
                    ))));
                }
                if text.contains("too large") {
                    return Err(failed(EtcdError::Refused(format!(
                        "write refused by etcd: the transaction exceeds its --max-request-bytes; raise \
                         --max-request-bytes on every etcd member ({text})"
                    ))));
                }
                let why = format!("etcd write failed, outcome unknown: {text}");
                lead.lose(&why);
                Err(failed(EtcdError::LostLeadership { why, outcome_unknown: true }))
            }
            Ok(Ok(resp)) if !resp.succeeded() && self.applied_before(&lead, seq) => {
                // A re-sent attempt failed its compare because an earlier
                // attempt of this same write went through.
                drop(resp);
                self.written(changes, bytes, seq);
                Ok(())
            }
            Ok(Ok(resp)) if !resp.succeeded() => {
                let why = format!(
                    "etcd refused the write: the leadership key {} no longer has create revision {} (another \
                     controller leads) or {} is not {SCHEMA_VERSION}",
                    String::from_utf8_lossy(lead.key()),
                    lead.revision(),
                    schema_key(&self.prefix)
                );
                lead.lose(&why);
                Err(failed(EtcdError::LostLeadership { why, outcome_unknown: false }))
            }
            Ok(Ok(_)) => {
                self.written(changes, bytes, seq);
                Ok(())
            }
        }
    }

    /// Bookkeeping after etcd took write number `seq + 1`.
    fn written(&mut self, changes: Vec<Change>, bytes: u64, seq: u64) {
        self.seq = Some(seq + 1);
        COUNTERS.ops.fetch_add(u64::try_from(changes.len()).unwrap_or(u64::MAX), Ordering::Relaxed);
        COUNTERS.bytes.fetch_add(bytes, Ordering::Relaxed);
        for (k, v) in changes {
            match v {
                Some(v) => {
                    self.hashes.insert(k, codec::digest(&v));
                }
                None => {
                    self.hashes.remove(&k);
                }
            }
        }
    }

    /// The write sequence etcd holds now (0: never written).
    fn read_seq(&self) -> Result<u64, EtcdError> {
        let key = seq_key(&self.prefix);
        let client = self.client.clone();
        let r = self.rt.block_on(async move {
            tokio::time::timeout(
                WRITE_TIMEOUT,
                resend(|| {
                    let (mut c, k) = (client.clone(), key.clone());
                    async move { c.get(k, None).await }
                }),
            )
            .await
        });
        let r = r.map_err(|_| EtcdError::Timeout(WRITE_TIMEOUT.as_millis()))??;
        match r.kvs().first() {
            None => Ok(0),
            Some(kv) => std::str::from_utf8(kv.value()).ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                EtcdError::Schema(format!("{} does not hold a write sequence number", seq_key(&self.prefix)))
            }),
        }
    }

    /// Whether write number `seq + 1` is in etcd under this leadership
    /// (an earlier attempt of a re-sent write went through).
    fn applied_before(&self, lead: &Leadership, seq: u64) -> bool {
        let (client, lkey) = (self.client.clone(), lead.key().to_vec());
        let held = self.rt.block_on(async move {
            let mut c = client;
            tokio::time::timeout(WRITE_TIMEOUT, c.get(lkey, None)).await
        });
        let still_ours =
            matches!(held, Ok(Ok(r)) if r.kvs().first().is_some_and(|kv| kv.create_revision() == lead.revision()));
        still_ours && matches!(self.read_seq(), Ok(n) if n == seq + 1)
    }

    fn commit_inner(&mut self) -> Result<(), EtcdError> {
        let changes = self.changes()?;
        let captured: i64 = self.conn().query_row("SELECT count(*) FROM temp.lb_changes", [], |r| r.get(0))?;
        if changes.is_empty() {
            if captured > 0 {
                COUNTERS.skipped.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.send(changes.into_iter().collect())?;
        }
        let conn = self.conn();
        let local = conn.execute("DELETE FROM temp.lb_changes", []).and_then(|_| conn.execute_batch("COMMIT"));
        if let Err(e) = local {
            // etcd holds the write but the cache does not: only a restart
            // (which rebuilds the cache from etcd) makes them agree again.
            if let Some(l) = &self.leadership {
                l.lose(&format!("the local cache failed to commit a write etcd accepted: {e}"));
            }
            return Err(e.into());
        }
        Ok(())
    }
}

impl Maintenance for EtcdRepos {
    fn checkpoint(&mut self) -> RepoResult<bool> {
        // Inside a call's transaction a checkpoint cannot run; the cache is
        // rebuilt from etcd at every start and SQLite's automatic
        // checkpoints keep its WAL bounded.
        if !self.conn().is_autocommit() {
            return Ok(true);
        }
        self.inner.checkpoint()
    }
    fn set_read_only(&mut self, on: bool) -> RepoResult<()> {
        self.inner.set_read_only(on)
    }
}

impl Repositories for EtcdRepos {
    fn hosts(&mut self) -> &mut dyn HostRepo {
        &mut self.inner
    }
    fn guests(&mut self) -> &mut dyn GuestRepo {
        &mut self.inner
    }
    fn ownership(&mut self) -> &mut dyn OwnershipRepo {
        &mut self.inner
    }
    fn jobs(&mut self) -> &mut dyn JobRepo {
        &mut self.inner
    }
    fn alarms(&mut self) -> &mut dyn AlarmRepo {
        &mut self.inner
    }
    fn audit(&mut self) -> &mut dyn AuditRepo {
        &mut self.inner
    }
    fn quarantine(&mut self) -> &mut dyn QuarantineRepo {
        &mut self.inner
    }
    fn maintenance(&mut self) -> &mut dyn Maintenance {
        self
    }

    fn begin(&mut self) -> RepoResult<()> {
        let conn = self.conn();
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK").map_err(EtcdError::from)?;
        }
        conn.execute_batch("BEGIN; DELETE FROM temp.lb_changes;").map_err(EtcdError::from)?;
        Ok(())
    }

    fn commit(&mut self) -> RepoResult<()> {
        Ok(self.commit_inner()?)
    }

    fn rollback(&mut self) {
        let conn = self.conn();
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests;
