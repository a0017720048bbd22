//! The election: one etcd lease per controller process, kept alive every
//! quarter of its TTL, and a campaign on `{prefix}leader` whose value is the
//! process's advertise URL. The winner gets a [`Leadership`] whose epoch is
//! its election key's create revision. Followers read who leads with
//! [`leader_url`] / [`watch_leader`].
//!
//! Architecture invariant: a renewal counts only when etcd answered the
//! keepalive with a TTL above zero, and it counts from the time the
//! keepalive was SENT: etcd extends the lease when it receives it, so the
//! local deadline (the TTL less 500 ms, at least two thirds of it) always ends before etcd's.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, LeaderKey, ResignOptions, WatchOptions};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Leadership;

/// How long one etcd request of the election may take before it counts as
/// failed (a keepalive, a leader read, a resign).
pub const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a follower reads who leads.
pub const LEADER_POLL: Duration = Duration::from_millis(300);

/// Why the election could not go on.
#[derive(Debug, Error)]
pub enum ElectionError {
    /// An etcd request failed.
    #[error("etcd: {what}: {source}")]
    Etcd {
        /// What was being done.
        what: &'static str,
        /// etcd's error.
        source: etcd_client::Error,
    },
    /// A file of the etcd TLS configuration cannot be read.
    #[error("etcd TLS: cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The lease this process campaigns with is gone (expired or revoked).
    #[error("the etcd lease of this controller is gone: {0}")]
    LeaseGone(String),
    /// etcd did not answer in time.
    #[error("etcd did not answer {0} within the timeout")]
    Timeout(&'static str),
    /// etcd answered without the election key.
    #[error("etcd's campaign answer names no leader key")]
    NoLeaderKey,
}

/// Connects to the `[store]` endpoints with its TLS settings.
pub async fn connect(
    endpoints: &[String],
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Client, ElectionError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(ETCD_REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(ca) = ca {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| ElectionError::TlsFile { path: p.to_path_buf(), source })
        };
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        if let (Some(c), Some(k)) = (cert, key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        opts = opts.with_tls(tls);
    }
    Client::connect(endpoints, Some(opts)).await.map_err(|source| ElectionError::Etcd { what: "connecting", source })
}

/// The election name under a key prefix.
pub fn election_name(prefix: &str) -> String {
    format!("{prefix}leader")
}

/// The lease TTL etcd is asked for: whole seconds, rounded up.
pub fn lease_ttl_secs(leader_ttl: Duration) -> i64 {
    i64::try_from(leader_ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1)
}

/// The local deadline: the leader TTL less half a second (at least two
/// thirds of it). It runs from the SEND time of the last answered
/// keepalive, and etcd runs the lease from when it received it (later), so
/// this process stops commanding at least half a second before its lease
/// can expire and anyone else can be elected. The more of the TTL it keeps,
/// the longer an etcd hiccup it rides out: losing etcd's raft leader stalls
/// renewals for an election timeout or two (1-2 s with etcd's defaults).
pub fn local_deadline(leader_ttl: Duration) -> Duration {
    leader_ttl.saturating_sub(Duration::from_millis(500)).max(leader_ttl * 2 / 3)
}

#[derive(Debug, Default)]
struct Renewals {
    /// Send time of the last keepalive etcd answered with TTL > 0.
    last: Option<Instant>,
}

/// One controller's candidacy: its lease, kept alive from creation, and the
/// leadership once won.
pub struct Campaign {
    client: Client,
    name: String,
    value: String,
    leader_ttl: Duration,
    lease: i64,
    renewals: Arc<Mutex<Renewals>>,
    won: Arc<OnceLock<Arc<Leadership>>>,
    won_key: Mutex<Option<LeaderKey>>,
    gone: watch::Receiver<Option<String>>,
    keeper: tokio::task::JoinHandle<()>,
    key_watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The revision the won key's watch last started from (0: none yet).
    watched_from: Arc<std::sync::atomic::AtomicI64>,
}

impl Drop for Campaign {
    fn drop(&mut self) {
        self.keeper.abort();
        if let Some(w) = self.key_watch.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.abort();
        }
    }
}

impl Campaign {
    /// Grants this process's lease (TTL `leader_ttl`, rounded up to whole
    /// seconds) and starts keeping it alive every quarter of `leader_ttl`.
    pub async fn start(
        client: Client,
        prefix: &str,
        advertise_url: &str,
        leader_ttl: Duration,
    ) -> Result<Campaign, ElectionError> {
        let sent = Instant::now();
        let grant =
            tokio::time::timeout(ETCD_REQUEST_TIMEOUT, client.lease_client().grant(lease_ttl_secs(leader_ttl), None))
                .await
                .map_err(|_| ElectionError::Timeout("the lease grant"))?
                .map_err(|source| ElectionError::Etcd { what: "granting the leader lease", source })?;
        let lease = grant.id();
        let renewals = Arc::new(Mutex::new(Renewals { last: Some(sent) }));
        let won: Arc<OnceLock<Arc<Leadership>>> = Arc::new(OnceLock::new());
        let (gone_tx, gone) = watch::channel(None);
        let keeper =
            tokio::spawn(keep_alive(client.clone(), lease, leader_ttl / 6, renewals.clone(), won.clone(), gone_tx));
        info!(
            lease = format!("{lease:x}"),
            ttl_ms = u64::try_from(leader_ttl.as_millis()).unwrap_or(u64::MAX),
            "leader lease granted"
        );
        Ok(Campaign {
            client,
            name: election_name(prefix),
            value: advertise_url.to_string(),
            leader_ttl,
            lease,
            renewals,
            won,
            won_key: Mutex::new(None),
            gone,
            keeper,
            key_watch: Mutex::new(None),
            watched_from: Arc::default(),
        })
    }

    /// The revision the won key's watch last started from (0 before it
    /// started): after a fresh read of the key, never its create revision.
    pub fn key_watched_from(&self) -> i64 {
        self.watched_from.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The etcd lease id.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Waits until this process leads (or its lease is gone). The
    /// leadership's deadline runs from the last answered keepalive.
    pub async fn campaign(&self) -> Result<Arc<Leadership>, ElectionError> {
        let mut gone = self.gone.clone();
        let mut election = self.client.election_client();
        let resp = tokio::select! {
            r = election.campaign(self.name.clone(), self.value.clone(), self.lease) => {
                r.map_err(|source| ElectionError::Etcd { what: "campaigning", source })?
            }
            why = gone.wait_for(|g| g.is_some()) => {
                let why = why.ok().and_then(|g| g.clone()).unwrap_or_else(|| "keepalive stopped".into());
                return Err(ElectionError::LeaseGone(why));
            }
        };
        let key = resp.leader().cloned().ok_or(ElectionError::NoLeaderKey)?;
        let epoch = u64::try_from(key.rev()).map_err(|_| ElectionError::NoLeaderKey)?;
        let renewed_at = self.renewals.lock().unwrap_or_else(|p| p.into_inner()).last.unwrap_or_else(Instant::now);
        let l = Arc::new(Leadership::new(key.key().to_vec(), epoch, local_deadline(self.leader_ttl), renewed_at));
        if let Some(why) = self.gone.borrow().clone() {
            l.lose(&why);
        }
        let _ = self.won.set(l.clone());
        *self.won_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        *self.key_watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(watch_key(
            self.client.clone(),
            key.key().to_vec(),
            key.rev(),
            l.clone(),
            self.watched_from.clone(),
        )));
        info!(epoch, key = %String::from_utf8_lossy(key.key()), "this controller leads");
        Ok(l)
    }

    /// Gives leadership (if won) and the lease back, so that a standby
    /// leads at once instead of after the TTL (clean shutdown). Best effort:
    /// errors are logged; the lease expires by itself anyway.
    pub async fn resign(&self) {
        if let Some(l) = self.won.get() {
            l.lose("resigned (shutting down)");
        }
        let key = self.won_key.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(key) = key {
            let mut e = self.client.election_client();
            match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, e.resign(Some(ResignOptions::new().with_leader(key))))
                .await
            {
                Ok(Ok(_)) => info!("resigned the leadership"),
                Ok(Err(e)) => warn!("resigning the leadership failed: {e}"),
                Err(_) => warn!("resigning the leadership timed out"),
            }
        }
        self.keeper.abort();
        let mut l = self.client.lease_client();
        match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, l.revoke(self.lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("revoking the leader lease failed: {e}"),
            Err(_) => warn!("revoking the leader lease timed out"),
        }
    }
}

/// Keeps `lease` alive: one keepalive every `every`, each awaited before
/// the next. A keepalive answered with TTL > 0 renews the leadership from its
/// send time; TTL 0 means the lease is gone: leadership is lost and the loop
/// ends. Stream errors and timeouts reconnect and go on; the local deadline
/// decides when that has taken too long.
async fn keep_alive(
    client: Client,
    lease: i64,
    every: Duration,
    renewals: Arc<Mutex<Renewals>>,
    won: Arc<OnceLock<Arc<Leadership>>>,
    gone: watch::Sender<Option<String>>,
) {
    let every = every.max(Duration::from_millis(100));
    let lost = |why: String| {
        warn!("{why}");
        if let Some(l) = won.get() {
            l.lose(&why);
        }
        let _ = gone.send(Some(why));
    };
    let renew = |sent: Instant| {
        renewals.lock().unwrap_or_else(|p| p.into_inner()).last = Some(sent);
        if let Some(l) = won.get() {
            l.renewed(sent);
        }
    };
    loop {
        let mut lc = client.lease_client();
        // Opening the stream sends the first keepalive and reads its answer.
        let mut sent = Instant::now();
        let (mut keeper, mut stream) = match tokio::time::timeout(every, lc.keep_alive(lease)).await {
            Ok(Ok(x)) => {
                renew(sent);
                x
            }
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("not found") => {
                return lost(format!("etcd says lease {lease:x} no longer exists (expired or revoked)"));
            }
            Ok(Err(e)) => {
                // Often a dead etcd member the client picked: try again at
                // once (the next pick is likely a live one).
                warn!("leader lease keepalive stream failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                warn!("leader lease keepalive stream: etcd did not answer; retrying");
                continue;
            }
        };
        loop {
            tokio::time::sleep_until(sent + every).await;
            sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(every, stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => renew(sent),
                Ok(Ok(Some(_))) => {
                    return lost(format!("etcd says lease {lease:x} no longer exists (expired or revoked)"));
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    warn!("leader lease keepalive unanswered; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Loses `l` when its election key is deleted or replaced (revoked lease,
/// an operator deleting it, another process's write).
async fn watch_key(
    client: Client,
    key: Vec<u8>,
    rev: i64,
    l: Arc<Leadership>,
    watched_from: Arc<std::sync::atomic::AtomicI64>,
) {
    let mut wc = client.watch_client();
    let mut kv = client.kv_client();
    loop {
        // Read the key, then watch from after that read: a deletion in
        // between is never missed. Never from the key's creation: a standby
        // campaigns long before it wins, and etcd would replay every write
        // since (minutes or days of the pool's rows) to this watch, stalling
        // every other request, the new leader's keepalives among them.
        match key_watch_start(&mut kv, &key, rev).await {
            KeyRead::Holds { from } => {
                watched_from.store(from, std::sync::atomic::Ordering::Relaxed);
                let opts = WatchOptions::new().with_start_revision(from);
                if let Ok(mut stream) = wc.watch(key.clone(), Some(opts)).await {
                    while let Ok(Some(resp)) = stream.message().await {
                        if resp.canceled() {
                            break;
                        }
                        for ev in resp.events() {
                            let replaced = ev.kv().is_some_and(|kv| kv.create_revision() != rev);
                            if ev.event_type() == EventType::Delete || replaced {
                                l.lose("the leadership key was deleted or replaced in etcd");
                                return;
                            }
                        }
                    }
                }
            }
            KeyRead::Gone => {
                l.lose("the leadership key was deleted or replaced in etcd");
                return;
            }
            // etcd unreachable: the renewals decide, through the local deadline.
            KeyRead::Unknown => {}
        }
        if !l.holds() {
            return;
        }
        // The stream broke (a member restarted, or etcd compacted past it).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a read of the leadership key found.
#[derive(Debug, PartialEq, Eq)]
enum KeyRead {
    /// Still this leadership's key: watch it from `from` (just after the
    /// revision of the read).
    Holds { from: i64 },
    /// Deleted, or created again by someone else.
    Gone,
    /// etcd did not answer (or answered without a revision).
    Unknown,
}

/// Reads the leadership `key` (created at revision `rev`) to learn where
/// its watch starts.
async fn key_watch_start(kv: &mut etcd_client::KvClient, key: &[u8], rev: i64) -> KeyRead {
    let Ok(r) = kv.get(key.to_vec(), None).await else { return KeyRead::Unknown };
    if r.kvs().first().is_none_or(|kv| kv.create_revision() != rev) {
        return KeyRead::Gone;
    }
    match r.header() {
        Some(h) => KeyRead::Holds { from: h.revision().saturating_add(1) },
        None => KeyRead::Unknown,
    }
}

/// Who leads, as etcd's election says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderHint {
    /// Not read yet.
    Unknown,
    /// The leader's advertise URL and its epoch (the leadership key's
    /// create revision).
    Leader(String, u64),
    /// No controller is elected.
    NoLeader,
    /// etcd cannot be read: why.
    EtcdError(String),
}

/// Reads the current leader's advertise URL from the election `name`.
pub async fn leader_url(client: &Client, name: &str) -> LeaderHint {
    let mut e = client.election_client();
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, e.leader(name)).await {
        Err(_) => LeaderHint::EtcdError("etcd did not answer in time".into()),
        Ok(Err(err)) => {
            let text = err.to_string();
            if text.contains("no leader") { LeaderHint::NoLeader } else { LeaderHint::EtcdError(text) }
        }
        Ok(Ok(r)) => match r.kv() {
            None => LeaderHint::NoLeader,
            Some(kv) => match (std::str::from_utf8(kv.value()), u64::try_from(kv.create_revision())) {
                (Ok(u), Ok(epoch)) if !u.is_empty() && u.len() <= 256 => LeaderHint::Leader(u.to_string(), epoch),
                _ => LeaderHint::EtcdError("the leader key's value is not a URL".into()),
            },
        },
    }
}

/// Reads who leads every [`LEADER_POLL`] until the task is aborted.
pub fn watch_leader(client: Client, name: String) -> (watch::Receiver<LeaderHint>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(LeaderHint::Unknown);
    let task = tokio::spawn(async move {
        loop {
            let h = leader_url(&client, &name).await;
            tx.send_if_modified(|old| {
                if *old != h {
                    info!(leader = ?h, "leader as etcd names it");
                    *old = h;
                    true
                } else {
                    false
                }
            });
            tokio::time::sleep(LEADER_POLL).await;
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::etcd_test::Etcd;

    // The default leader_ttl: shorter ones lapse on a loaded 2-core CI machine.
    const TTL: Duration = Duration::from_millis(3000);

    async fn client(etcd: &Etcd) -> Client {
        Client::connect([etcd.url()], None).await.unwrap()
    }

    #[test]
    fn the_lease_is_whole_seconds_rounded_up_and_the_deadline_two_thirds() {
        assert_eq!(lease_ttl_secs(Duration::from_millis(3000)), 3);
        assert_eq!(lease_ttl_secs(Duration::from_millis(2001)), 3);
        assert_eq!(local_deadline(Duration::from_millis(3000)), Duration::from_millis(2500));
        assert_eq!(local_deadline(Duration::from_millis(1200)), Duration::from_millis(800));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leads_the_other_is_redirected_and_takes_over_only_after_the_first_stopped_holding() {
        let Some(etcd) = Etcd::start_or_skip() else { return };
        let a = Campaign::start(client(&etcd).await, "/t/", "https://a:7443", TTL).await.unwrap();
        let la = a.campaign().await.unwrap();
        assert!(la.holds());
        let b = Arc::new(Campaign::start(client(&etcd).await, "/t/", "https://b:7443", TTL).await.unwrap());
        let bw = tokio::spawn({
            let b = b.clone();
            async move {
                let l = b.campaign().await.unwrap();
                (l, Instant::now())
            }
        });
        // The follower's gate names A.
        let (hint, poll) = watch_leader(client(&etcd).await, election_name("/t/"));
        let mut h = hint.clone();
        let named = tokio::time::timeout(Duration::from_secs(3), h.wait_for(|h| *h != LeaderHint::Unknown))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert_eq!(named, LeaderHint::Leader("https://a:7443".into(), la.epoch()));
        let s = crate::ha::gate::refusal_for(&named);
        assert_eq!(s.metadata().get(lifeboat_proto::LEADER_METADATA).unwrap(), "https://a:7443");
        // Renewals keep A leading well past its deadline and TTL.
        tokio::time::sleep(TTL + Duration::from_millis(500)).await;
        assert!(la.holds(), "renewed every TTL/6");
        assert!(!bw.is_finished(), "B waits while A renews");
        // A freezes (its keepalives stop, as when its process stops or loses etcd).
        a.keeper.abort();
        let frozen = Instant::now();
        let (lb, b_won) = tokio::time::timeout(TTL + Duration::from_secs(2), bw).await.expect("B leads").unwrap();
        let took = b_won - frozen;
        println!("failover after the leader froze: {} ms", took.as_millis());
        assert!(took <= TTL + Duration::from_secs(1), "B leads within leader_ttl + 1 s ({took:?})");
        assert!(la.expires_at() <= b_won, "A stopped holding before B's epoch existed");
        assert!(!la.holds());
        assert!(lb.epoch() > la.epoch(), "epochs only move forward");
        let mut h = hint.clone();
        tokio::time::timeout(
            Duration::from_secs(2),
            h.wait_for(|h| *h == LeaderHint::Leader("https://b:7443".into(), lb.epoch())),
        )
        .await
        .unwrap()
        .unwrap();
        poll.abort();
        drop(a);
    }

    /// A campaigns and leads; B campaigns behind it (its key written, its
    /// campaign waiting in the returned task).
    async fn a_leads_b_waits(
        etcd: &Etcd,
    ) -> (Campaign, Arc<Leadership>, Arc<Campaign>, tokio::task::JoinHandle<Arc<Leadership>>) {
        let a = Campaign::start(client(etcd).await, "/t/", "https://a:7443", TTL).await.unwrap();
        let la = a.campaign().await.unwrap();
        let b = Arc::new(Campaign::start(client(etcd).await, "/t/", "https://b:7443", TTL).await.unwrap());
        let bw = tokio::spawn({
            let b = b.clone();
            async move { b.campaign().await.unwrap() }
        });
        (a, la, b, bw)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resigning_leader_hands_over_at_once_and_a_revoked_lease_loses_leadership() {
        let Some(etcd) = Etcd::start_or_skip() else { return };
        let (a, la, b, bw) = a_leads_b_waits(&etcd).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        a.resign().await;
        assert!(!la.holds(), "resigned: never leads again");
        let lb = tokio::time::timeout(Duration::from_secs(1), bw).await.expect("B leads at once").unwrap();
        println!("handover after resign: {} ms", t0.elapsed().as_millis());
        assert!(lb.holds());
        // Someone revokes B's lease: its election key goes, and B stops leading.
        let mut lc = client(&etcd).await.lease_client();
        lc.revoke(b.lease()).await.unwrap();
        let why = tokio::time::timeout(Duration::from_secs(2), lb.lost()).await.expect("noticed within 2 s");
        assert!(!lb.holds());
        assert!(why.contains("lease") || why.contains("leadership key"), "{why}");
        assert_eq!(leader_url(&client(&etcd).await, &election_name("/t/")).await, LeaderHint::NoLeader);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_leader_watches_its_key_from_now_not_from_when_it_began_to_campaign() {
        let Some(etcd) = Etcd::start_or_skip() else { return };
        let (a, la, b, bw) = a_leads_b_waits(&etcd).await;
        // B's key is written now; the pool's writes go on while it waits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut kv = client(&etcd).await.kv_client();
        let mut last = 0;
        for i in 0..50 {
            last = kv.put(format!("/t/rows/{i}"), vec![7u8; 1024], None).await.unwrap().header().unwrap().revision();
        }
        a.resign().await;
        let lb = tokio::time::timeout(Duration::from_secs(2), bw).await.expect("B leads").unwrap();
        assert!(lb.revision() < last, "B's key predates the writes");
        // Its watch starts after them: etcd does not replay what B waited through.
        let t0 = Instant::now();
        while b.key_watched_from() == 0 && t0.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let from = b.key_watched_from();
        assert!(from > last, "B's key watched from {from}; the writes it waited through ended at {last}");
        match key_watch_start(&mut kv, lb.key(), lb.revision()).await {
            KeyRead::Holds { from } => assert!(from > last, "watch from {from}, the writes ended at {last}"),
            other => panic!("B's key should hold: {other:?}"),
        }
        // Deleted and created again by another: gone, and B stops leading.
        assert!(lb.holds());
        kv.delete(lb.key().to_vec(), None).await.unwrap();
        kv.put(lb.key().to_vec(), "https://c:7443", None).await.unwrap();
        assert_eq!(key_watch_start(&mut kv, lb.key(), lb.revision()).await, KeyRead::Gone);
        let why = tokio::time::timeout(Duration::from_secs(2), lb.lost()).await.expect("noticed within 2 s");
        assert!(why.contains("leadership key"), "{why}");
        assert_eq!(key_watch_start(&mut kv, b"/t/nothing-here", lb.revision()).await, KeyRead::Gone);
        drop(la);
    }
}
