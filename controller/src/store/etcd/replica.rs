//! The local cache of the etcd data: loaded whole at start (paged range
//! gets at one revision), then kept current by a watch from the next
//! revision until [`Replica::promote`] hands it to the leader's store
//! thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;

use super::codec::{self, Table};
use super::{EtcdError, EtcdRepos, WRITE_TIMEOUT, WriteLimits, rows_prefix, schema_key};
use crate::ha::Leadership;
use crate::ports::Repos;
use crate::store::sqlite::SqliteRepos;
use crate::store::{SCHEMA_VERSION, Store};

/// Keys fetched per range request while loading.
const PAGE: i64 = 2000;

/// How long [`Replica::promote`] waits for the watch to reach etcd's
/// current revision.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The end of the range of keys starting with `p`.
pub(crate) fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(crate) struct Cache {
    pub(crate) store: Store,
    pub(crate) tables: Vec<Table>,
    pub(crate) hashes: HashMap<String, [u8; 32]>,
    /// Rows etcd holds that did not decode (not in the cache).
    pub(crate) refused: u64,
    /// Keys whose latest value in etcd is not in the cache (did not decode
    /// or apply), with why: promotion is refused while any is left.
    pub(crate) bad: std::collections::BTreeMap<String, String>,
}

/// The key a promotion writes to learn that the watch has delivered
/// everything before it (inside the watched range; never a row).
pub(crate) fn sync_key(prefix: &str) -> String {
    format!("{}_sync", rows_prefix(prefix))
}

impl Cache {
    /// Applies one put or delete read from etcd; a key or value that does
    /// not decode is logged, counted and left out (never a panic).
    pub(crate) fn apply(&mut self, prefix: &str, key: &[u8], value: Option<&[u8]>, now_ms: i64) {
        if key == sync_key(prefix).as_bytes() {
            return;
        }
        let Some((t, pk)) = codec::parse_key(prefix, &self.tables, key) else {
            self.refuse(key, "the key does not name a row of a known table");
            return;
        };
        let k = String::from_utf8_lossy(key).into_owned();
        let conn = self.store.conn();
        let r = match value {
            Some(v) => codec::apply_put(conn, t, &pk, v, now_ms).map(|()| Some(codec::digest(v))),
            None => codec::apply_delete(conn, t, &pk).map(|()| None),
        };
        match r {
            Ok(Some(h)) => {
                self.bad.remove(&k);
                self.hashes.insert(k, h);
            }
            Ok(None) => {
                self.bad.remove(&k);
                self.hashes.remove(&k);
            }
            Err(why) => {
                // A digest no value has: the leader's next write of this key
                // is sent (and replaces the bad value), its delete too.
                self.hashes.insert(k, [0; 32]);
                self.refuse(key, &why);
            }
        }
    }

    fn refuse(&mut self, key: &[u8], why: &str) {
        self.bad.insert(String::from_utf8_lossy(key).into_owned(), why.to_string());
        self.refused += 1;
        super::count_refused_row();
        tracing::error!(key = %String::from_utf8_lossy(key), why, "etcd row not applied to the cache");
    }
}

/// Which revision the cache has applied, and why following stopped.
#[derive(Debug, Clone, Default)]
struct Progress {
    applied: i64,
    /// The revision of the last row put or delete applied (the sync key
    /// and empty answers do not count): unchanged means the cache's rows
    /// are unchanged.
    rows: i64,
    failed: Option<String>,
    /// The value of the last sync-key event the watch delivered.
    synced: Option<Vec<u8>>,
}

/// The revision of the last row change the cache applied; it outlives the
/// [`Replica`] (its last value stays readable after promotion).
#[derive(Debug, Clone)]
pub struct RowsRevision(watch::Receiver<Progress>);

impl RowsRevision {
    /// The revision of the last row put or delete applied so far.
    pub fn get(&self) -> i64 {
        self.0.borrow().rows
    }
}

/// The local cache of the etcd data (a SQLite file, same schema as the
/// SQLite backend), kept current by a watch. Never the source of truth.
pub struct Replica {
    client: Client,
    prefix: String,
    path: PathBuf,
    cache: Arc<Mutex<Option<Cache>>>,
    progress: watch::Receiver<Progress>,
    requests: Option<etcd_client::WatchRequestSender>,
    task: Option<tokio::task::JoinHandle<()>>,
    loaded_rev: i64,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("prefix", &self.prefix).field("path", &self.path).finish()
    }
}

/// The schema version etcd holds (`None`: no schema key), refused when it
/// is not this controller's.
pub(crate) async fn check_schema(client: &mut Client, prefix: &str) -> Result<(Option<i64>, i64), EtcdError> {
    let r = super::resend(|| {
        let mut c = client.clone();
        async move { c.get(schema_key(prefix), None).await }
    })
    .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    let Some(kv) = r.kvs().first() else { return Ok((None, rev)) };
    let v = std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .ok_or_else(|| EtcdError::Schema(format!("{} does not hold a schema version", schema_key(prefix))))?;
    if v > SCHEMA_VERSION {
        return Err(EtcdError::TooNew { found: v, understood: SCHEMA_VERSION });
    }
    if v != SCHEMA_VERSION {
        return Err(EtcdError::Schema(format!(
            "{} is {v}; this controller reads only schema {SCHEMA_VERSION} in etcd",
            schema_key(prefix)
        )));
    }
    Ok((Some(v), rev))
}

/// Whether any row key exists under the prefix.
pub(crate) async fn has_rows(client: &mut Client, prefix: &str) -> Result<bool, EtcdError> {
    let p = rows_prefix(prefix);
    let r = super::resend(|| {
        let mut c = client.clone();
        let p = p.clone();
        async move {
            c.get(p.as_bytes(), Some(GetOptions::new().with_range(prefix_end(p.as_bytes())).with_count_only())).await
        }
    })
    .await?;
    Ok(r.count() > 0)
}

impl Replica {
    /// Builds a fresh cache at `cache_path` (an old file is deleted) from
    /// everything under `prefix` at one revision, then follows etcd's watch.
    /// Refuses when etcd's schema is not this controller's, or etcd holds
    /// rows without a schema key (an unfinished import or restore).
    pub async fn open(client: Client, prefix: &str, cache_path: &Path) -> Result<Replica, EtcdError> {
        let mut client = client;
        let (schema, _) = check_schema(&mut client, prefix).await?;
        if schema.is_none() && has_rows(&mut client, prefix).await? {
            return Err(EtcdError::Schema(format!(
                "etcd holds rows under {} but no {}: an import or restore did not finish; empty the prefix and run \
                 it again",
                rows_prefix(prefix),
                schema_key(prefix)
            )));
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = cache_path.as_os_str().to_owned();
            p.push(suffix);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let store = Store::open(cache_path)?;
        // Rows arrive in key order (guests before their hosts): the cache
        // follows etcd, it does not judge it.
        store.conn().pragma_update(None, "foreign_keys", "OFF")?;
        // A cache: rebuilt at every start, so no fsync per write.
        store.conn().pragma_update(None, "synchronous", "OFF")?;
        let tables = codec::tables(store.conn())?;
        let mut cache = Cache { store, tables, hashes: HashMap::new(), refused: 0, bad: Default::default() };

        let now = crate::now_ms();
        let p = rows_prefix(prefix);
        let end = prefix_end(p.as_bytes());
        let mut start = p.clone().into_bytes();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let r = super::resend(|| {
                let (mut c, start, opts) = (client.clone(), start.clone(), opts.clone());
                async move { c.get(start, Some(opts)).await }
            })
            .await?;
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
            }
            cache.store.conn().execute_batch("BEGIN")?;
            for kv in r.kvs() {
                cache.apply(prefix, kv.key(), Some(kv.value()), now);
            }
            cache.store.conn().execute_batch("COMMIT")?;
            match r.kvs().last() {
                Some(last) if r.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }

        let (requests, mut stream) = super::resend(|| {
            let (mut c, p, end) = (client.clone(), p.clone(), end.clone());
            async move {
                c.watch(
                    p.as_bytes(),
                    Some(WatchOptions::new().with_range(end).with_start_revision(rev + 1).with_progress_notify()),
                )
                .await
            }
        })
        .await?
        .split();
        let cache = Arc::new(Mutex::new(Some(cache)));
        let (tx, progress) = watch::channel(Progress { applied: rev, rows: rev, failed: None, synced: None });
        let sync = sync_key(prefix).into_bytes();
        let task = tokio::spawn({
            let cache = cache.clone();
            let prefix = prefix.to_string();
            async move {
                let why = loop {
                    let msg = match stream.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => break "the etcd watch ended".to_string(),
                        Err(e) => break format!("the etcd watch failed: {e}"),
                    };
                    if msg.canceled() || msg.compact_revision() > 0 {
                        break format!("the etcd watch was cancelled (compacted at {})", msg.compact_revision());
                    }
                    // Applied up to the events' own revisions: a header's
                    // revision (a created or progress response, a catch-up
                    // batch) may run ahead of events still to come. One pass
                    // applies the events and notes the revision of the last
                    // event, of the last row event (the sync key is no row),
                    // and the last sync value.
                    let (mut at, mut rows_at, mut synced) = (0, None::<i64>, None);
                    if !msg.events().is_empty() {
                        let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
                        let Some(c) = guard.as_mut() else { return };
                        let now = crate::now_ms();
                        let _ = c.store.conn().execute_batch("BEGIN");
                        for ev in msg.events() {
                            let Some(kv) = ev.kv() else { continue };
                            at = at.max(kv.mod_revision());
                            if kv.key() == sync.as_slice() {
                                synced = Some(kv.value().to_vec());
                            } else {
                                rows_at = Some(rows_at.map_or(kv.mod_revision(), |r| r.max(kv.mod_revision())));
                            }
                            match ev.event_type() {
                                EventType::Put => c.apply(&prefix, kv.key(), Some(kv.value()), now),
                                EventType::Delete => c.apply(&prefix, kv.key(), None, now),
                            }
                        }
                        if let Err(e) = c.store.conn().execute_batch("COMMIT") {
                            break format!("the cache failed to apply a watch event: {e}");
                        }
                    }
                    tx.send_modify(|p| {
                        p.applied = p.applied.max(at);
                        if let Some(r) = rows_at {
                            p.rows = p.rows.max(r);
                        }
                        if synced.is_some() {
                            p.synced = synced;
                        }
                    });
                };
                tracing::error!(why, "the cache stopped following etcd");
                tx.send_modify(|p| p.failed = Some(why));
            }
        });
        Ok(Replica {
            client,
            prefix: prefix.to_string(),
            path: cache_path.to_path_buf(),
            cache,
            progress,
            requests: Some(requests),
            task: Some(task),
            loaded_rev: rev,
        })
    }

    /// The etcd revision the cache was loaded at.
    pub fn loaded_revision(&self) -> i64 {
        self.loaded_rev
    }

    /// The etcd revision the cache has applied everything up to.
    pub fn applied_revision(&self) -> i64 {
        self.progress.borrow().applied
    }

    /// What tells whether the cache's rows changed: see [`RowsRevision`].
    pub fn rows_revision(&self) -> RowsRevision {
        RowsRevision(self.progress.clone())
    }

    /// The cache's rows through a second, read-only connection, for a load
    /// that must not hold up the watch (a speculative registry load): a
    /// store thread whose every write fails. Read the [`RowsRevision`]
    /// before the first read: the rows read are then the rows at that
    /// revision if it has not moved since.
    pub fn reader(&self) -> Result<Repos, EtcdError> {
        let store = Store::open_read_only(&self.path)?;
        Repos::start(Box::new(SqliteRepos::new(store))).map_err(|e| EtcdError::Refused(e.to_string()))
    }

    /// Why the cache stopped following etcd (watch ended, failed or
    /// compacted past), once it has: a follower should then restart (its
    /// promotion would be refused anyway).
    pub fn stopped_following(&self) -> Option<String> {
        self.progress.borrow().failed.clone()
    }

    /// Rows etcd holds that did not decode (not in the cache).
    pub fn refused_rows(&self) -> u64 {
        self.read(|c| c.refused).unwrap_or(0)
    }

    /// Runs `f` on the cache (reads: followers, export, tests).
    pub fn with_store<R>(&self, f: impl FnOnce(&Store) -> R) -> Option<R> {
        self.read(|c| f(&c.store))
    }

    fn read<R>(&self, f: impl FnOnce(&Cache) -> R) -> Option<R> {
        let g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(f)
    }

    /// Waits until the cache has applied everything etcd held when this was
    /// called: writes the sync key (a fresh value) and waits until the watch
    /// delivers that write. A watch delivers in revision order, so once it
    /// has, every earlier write is in the cache. (Revisions in response
    /// headers do not tell: a created or progress response, or a catch-up
    /// batch, can carry a revision ahead of events still to come.)
    pub async fn catch_up(&mut self) -> Result<i64, EtcdError> {
        check_schema(&mut self.client, &self.prefix).await?;
        let nonce = format!("{}-{}", std::process::id(), crate::now_ms()).into_bytes();
        let key = sync_key(&self.prefix);
        super::resend(|| {
            let (mut c, k, v) = (self.client.clone(), key.clone(), nonce.clone());
            async move { c.put(k, v, None).await }
        })
        .await?;
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        loop {
            let p = self.progress.borrow_and_update().clone();
            if let Some(why) = p.failed {
                return Err(EtcdError::Refused(format!("the cache cannot catch up: {why}")));
            }
            if p.synced.as_deref() == Some(nonce.as_slice()) {
                return Ok(p.applied);
            }
            let wait = tokio::time::timeout_at(deadline, self.progress.changed()).await;
            match wait {
                Err(_) => {
                    return Err(EtcdError::Refused(format!(
                        "the cache did not receive its own sync write through the watch within {} s (at revision {})",
                        CATCH_UP.as_secs(),
                        self.applied_revision()
                    )));
                }
                Ok(Err(_)) => return Err(EtcdError::Refused("the cache stopped following etcd".into())),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Keys whose latest value in etcd is not in the cache, with why.
    pub fn bad_keys(&self) -> Vec<(String, String)> {
        self.read(|c| c.bad.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// Stops following etcd and hands the cache to a store thread whose
    /// writes go to etcd guarded by `leadership` (see [`EtcdRepos`]).
    /// First catches up to etcd's current revision (at least the one this
    /// controller won at); writes the schema key when the prefix is new.
    /// Call from inside a multi-thread tokio runtime: the store thread
    /// blocks on its handle.
    pub async fn promote(self, leadership: Arc<Leadership>) -> Result<Repos, EtcdError> {
        self.promote_with(leadership, WriteLimits::default()).await
    }

    /// [`Replica::promote`], with writes checked against `limits` before
    /// they are sent.
    pub async fn promote_with(mut self, leadership: Arc<Leadership>, limits: WriteLimits) -> Result<Repos, EtcdError> {
        let caught_up = self.catch_up().await?;
        // What cannot be read refuses: a leader must not act on an older
        // copy of a row (an ownership generation, a move) than etcd holds.
        let bad = self.bad_keys();
        if !bad.is_empty() {
            let shown: Vec<String> = bad.iter().take(5).map(|(k, why)| format!("{k} ({why})")).collect();
            leadership.lose("etcd holds rows this controller cannot read");
            return Err(EtcdError::Refused(format!(
                "promotion refused: {} etcd key(s) do not decode, so the local copy would act on older values: {}; \
                 export (etcd-export), then repair or delete each key with etcdctl; every controller refuses to lead \
                 until then",
                bad.len(),
                shown.join("; ")
            )));
        }
        let (mut repos, _) = self.take_repos(Some(leadership.clone()), caught_up).await?;
        let mut client = repos.client.clone();
        let (schema, _) = check_schema(&mut client, &repos.prefix).await?;
        if schema.is_none() {
            let txn = Txn::new()
                .when([
                    Compare::create_revision(leadership.key(), CompareOp::Equal, leadership.revision()),
                    Compare::create_revision(schema_key(&repos.prefix), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(schema_key(&repos.prefix), SCHEMA_VERSION.to_string(), None)]);
            let r = super::resend(|| {
                let (mut c, txn) = (client.clone(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await?;
            // A resend after the first attempt went through finds the schema
            // key there: that is success, if this leadership still stands.
            let written = r.succeeded() || {
                let (now, _) = check_schema(&mut client, &repos.prefix).await?;
                let key = super::resend(|| {
                    let mut c = client.clone();
                    let k = leadership.key().to_vec();
                    async move { c.get(k, None).await }
                })
                .await?;
                now.is_some() && key.kvs().first().is_some_and(|kv| kv.create_revision() == leadership.revision())
            };
            if !written {
                leadership.lose("the leadership key changed while the schema key was written");
                return Err(EtcdError::Refused(
                    "promotion refused: leadership lost while writing the schema key".into(),
                ));
            }
        }
        repos.limits = limits;
        Repos::start(Box::new(repos)).map_err(|e| EtcdError::Refused(e.to_string()))
    }

    /// A store thread over the cache with no leadership: reads only, every
    /// write refused (tools, tests).
    pub async fn read_only(mut self) -> Result<Repos, EtcdError> {
        let at = self.catch_up().await?;
        let (repos, _) = self.take_repos(None, at).await?;
        Repos::start(Box::new(repos)).map_err(|e| EtcdError::Refused(e.to_string()))
    }

    /// Hands the cache over once it has caught up to revision `at` (the
    /// caller ran [`Replica::catch_up`] once, not here again).
    async fn take_repos(
        &mut self,
        leadership: Option<Arc<Leadership>>,
        at: i64,
    ) -> Result<(EtcdRepos, i64), EtcdError> {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.requests = None;
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| EtcdError::Refused("the cache was already handed over".into()))?;
        let conn = cache.store.conn();
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        super::install_capture(conn, &cache.tables)?;
        let repos = EtcdRepos {
            inner: SqliteRepos::new(cache.store),
            client: self.client.clone(),
            rt: tokio::runtime::Handle::current(),
            prefix: self.prefix.clone(),
            tables: cache.tables,
            hashes: cache.hashes,
            leadership,
            limits: WriteLimits::default(),
            timeout: WRITE_TIMEOUT,
            seq: None,
        };
        Ok((repos, at))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
