//! The etcd backend against a real etcd (`lifeboat_common::etcd_test`).

use std::path::Path;
use std::time::Duration;

use etcd_client::GetOptions;
use lifeboat_common::etcd_test::Etcd;
use lifeboat_proto::v1::{Guest, HostInfo};
use prost::Message;

use super::*;
use crate::ports::{AuditFilter, AuditRow, DesiredChange, GuestWrite, OwnerRow, Repos};
use crate::store::Store;

const P: &str = "/t/";

async fn etcd() -> Option<(Etcd, Client)> {
    let e = Etcd::start_or_skip()?;
    let c = Client::connect([e.url()], None).await.unwrap();
    Some((e, c))
}

async fn leader(c: &mut Client, prefix: &str) -> Arc<Leadership> {
    let key = format!("{prefix}leader/test");
    let r = super::resend(|| {
        let (mut c, key) = (c.clone(), key.clone());
        async move { c.put(key, "http://me", None).await }
    })
    .await
    .unwrap();
    let rev = r.header().unwrap().revision();
    Arc::new(Leadership::new(
        key.into_bytes(),
        u64::try_from(rev).unwrap(),
        Duration::from_secs(600),
        tokio::time::Instant::now(),
    ))
}

async fn leading(c: &Client, dir: &Path) -> (Repos, Arc<Leadership>) {
    let replica = Replica::open(c.clone(), P, &dir.join("leader.db")).await.unwrap();
    let l = leader(&mut c.clone(), P).await;
    (replica.promote(l.clone()).await.unwrap(), l)
}

async fn revision(c: &mut Client) -> i64 {
    c.get("nothing", None).await.unwrap().header().unwrap().revision()
}

async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    // The sync key a promotion writes is not a row.
    r.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).filter(|k| !k.ends_with("/_sync")).collect()
}

fn host(id: &str) -> HostInfo {
    HostInfo { host_id: id.into(), ..Default::default() }
}

fn audit(detail: &str) -> AuditRow {
    AuditRow::by_controller("test", "h1", "", detail.into())
}

fn owner(uuid: &str, host: &str, generation: u64) -> OwnerRow {
    OwnerRow {
        uuid: uuid.into(),
        host: host.into(),
        generation,
        from_host: String::new(),
        job: String::new(),
        complete: true,
    }
}

fn guest_bytes(uuid: &str, def: &str) -> Vec<u8> {
    Guest { uuid: uuid.into(), name: format!("vm-{uuid}"), definition_xml: def.into(), ..Default::default() }
        .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reaches_etcd_as_keys_and_a_second_replica_sees_it() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut follower = Replica::open(c.clone(), P, &dir.path().join("f.db")).await.unwrap();
    let (repos, _l) = leading(&c, dir.path()).await;
    repos.hosts(|h| h.upsert(&host("h1"), 5)).await.unwrap();
    repos.ownership(|o| o.set_owner(&owner("u1", "h1", 3), &audit("owner u1"))).await.unwrap();
    let k = keys(&mut c, P).await;
    for want in ["/t/schema", "/t/v1/hosts/h1", "/t/v1/owners/u1", "/t/v1/audit/1", "/t/leader/test"] {
        assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
    }
    follower.catch_up().await.unwrap();
    let seen = |r: &Replica| {
        r.with_store(|s| {
            (s.host("h1").unwrap().is_some(), s.owners().unwrap(), s.read_audit(&AuditFilter::default()).unwrap().len())
        })
        .unwrap()
    };
    let (h, owners, n) = seen(&follower);
    assert!(h && n == 1, "the follower's watch applied the leader's writes");
    assert_eq!(owners, vec![owner("u1", "h1", 3)]);
    let fresh = Replica::open(c.clone(), P, &dir.path().join("g.db")).await.unwrap();
    let (h, owners, n) = seen(&fresh);
    assert!(h && n == 1 && owners == vec![owner("u1", "h1", 3)], "a new replica loads them");
    assert_eq!(fresh.refused_rows(), 0);
    assert_eq!(follower.stopped_following(), None);
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_alone_and_an_unchanged_guest_write_nothing_to_etcd() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, _l) = leading(&c, dir.path()).await;
    let g = guest_bytes("u1", "<domain/>");
    let g2 = g.clone();
    repos
        .call(move |r| {
            r.hosts().upsert(&host("h1"), 5)?;
            r.guests().write("h1", &[GuestWrite { uuid: "u1", name: "vm-u1", data: &g2 }], &[], 5)
        })
        .await
        .unwrap();
    let before = revision(&mut c).await;
    repos.hosts(|h| h.touch(&[("h1".to_string(), 999)])).await.unwrap();
    let g2 = g.clone();
    repos
        .guests(move |r| r.write("h1", &[GuestWrite { uuid: "u1", name: "vm-u1", data: &g2 }], &[], 1000))
        .await
        .unwrap();
    assert_eq!(revision(&mut c).await, before, "a touch and an unchanged guest report write nothing");
    assert!(repos.call(|r| r.maintenance().checkpoint()).await.unwrap(), "the periodic checkpoint does not fail");
    let local = repos.hosts(|h| h.get("h1")).await.unwrap().unwrap();
    assert_eq!(local.last_seen_ms, 999, "the touch is kept in the cache");
    let changed = guest_bytes("u1", "<domain><name>x</name></domain>");
    repos
        .guests(move |r| r.write("h1", &[GuestWrite { uuid: "u1", name: "vm-u1", data: &changed }], &[], 1001))
        .await
        .unwrap();
    assert_eq!(revision(&mut c).await, before + 1, "a changed definition is one write");
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_lose_is_refused_and_the_cache_is_unchanged() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, l) = leading(&c, dir.path()).await;
    repos.hosts(|h| h.upsert(&host("h1"), 5)).await.unwrap();
    let before = revision(&mut c).await;
    l.lose("test");
    let e = repos.hosts(|h| h.upsert(&host("h2"), 5)).await.unwrap_err();
    assert!(e.lost_leadership() && e.is_write_failure(), "{e}");
    assert!(e.to_string().contains("lost its leadership") && e.to_string().contains("nothing was changed"), "{e}");
    let hosts: Vec<String> = repos.hosts(|h| h.all()).await.unwrap().into_iter().map(|h| h.info.host_id).collect();
    assert_eq!(hosts, ["h1"], "the refused write was rolled back");
    assert_eq!(revision(&mut c).await, before);
    // Reads still work.
    assert!(repos.hosts(|h| h.get("h1")).await.unwrap().is_some());
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_guard_fails_is_refused_rolled_back_and_leadership_is_lost() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, l) = leading(&c, dir.path()).await;
    repos.audit(|a| a.append(&audit("first"))).await.unwrap();
    // Another controller took over: the key was deleted and created again.
    c.delete("/t/leader/test", None).await.unwrap();
    c.put("/t/leader/test", "http://other", None).await.unwrap();
    let e = repos
        .call(|r| {
            r.ownership().set_owner(&owner("u1", "h1", 1), &audit("owner"))?;
            r.audit().append(&audit("second"))
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("leadership key"), "{e}");
    assert!(!l.holds(), "leadership is lost");
    let local = repos.audit(|a| a.read(&AuditFilter::default())).await.unwrap();
    assert_eq!(local.iter().map(|a| a.detail.as_str()).collect::<Vec<_>>(), ["first"]);
    assert!(repos.ownership(|o| o.owners()).await.unwrap().is_empty(), "both writes of the call rolled back");
    let k = keys(&mut c, "/t/v1/").await;
    assert_eq!(k, ["/t/v1/audit/1"]);
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_killed_a_write_is_refused_rolled_back_and_leadership_ends() {
    let Some((mut e, c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, l) = leading(&c, dir.path()).await;
    repos.audit(|a| a.append(&audit("first"))).await.unwrap();
    e.kill();
    let t = std::time::Instant::now();
    let err = repos.audit(|a| a.append(&audit("second"))).await.unwrap_err();
    assert!(err.to_string().contains("etcd") && err.is_write_failure(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(!l.holds(), "an unknown outcome ends leadership");
    let local = repos.audit(|a| a.read(&AuditFilter::default())).await.unwrap();
    assert_eq!(local.len(), 1, "rolled back");
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_endpoint_dead_every_write_goes_through_and_leadership_holds() {
    let Some((e, _)) = etcd().await else { return };
    // A member that is down: nothing listens on its port.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let c = Client::connect([dead, e.url()], None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repos, l) = leading(&c, dir.path()).await;
    for i in 0..30 {
        let r = repos.audit(move |a| a.append(&audit(&format!("w{i}")))).await;
        assert!(r.is_ok(), "write {i} with one member down: {r:?}");
    }
    assert!(l.holds(), "one member down changes nothing");
    let keys = super::resend(|| {
        let mut c = c.clone();
        async move { c.get("/t/v1/audit/", Some(etcd_client::GetOptions::new().with_prefix())).await }
    })
    .await
    .unwrap();
    assert_eq!(keys.kvs().len(), 30, "every row is in etcd once");
    println!("resends so far: {}", super::stats().resends);
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_does_not_decode_refuses_promotion_until_it_is_repaired() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    c.put("/t/schema", SCHEMA_VERSION.to_string(), None).await.unwrap();
    // Written after the follower loaded: it arrives through the watch.
    let r = Replica::open(c.clone(), P, &dir.path().join("a.db")).await.unwrap();
    c.put("/t/v1/owners/u1", vec![0xff, 0x00], None).await.unwrap();
    let l = leader(&mut c.clone(), P).await;
    let e = r.promote(l.clone()).await.unwrap_err().to_string();
    assert!(e.contains("do not decode") && e.contains("/t/v1/owners/u1"), "{e}");
    assert!(!l.holds(), "a refused promotion gives the leadership up");
    // Repaired (here: deleted): a new follower promotes.
    c.delete("/t/v1/owners/u1", None).await.unwrap();
    c.delete("/t/leader/test", None).await.unwrap();
    let r = Replica::open(c.clone(), P, &dir.path().join("b.db")).await.unwrap();
    let l = leader(&mut c.clone(), P).await;
    let repos = r.promote(l).await.unwrap();
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_value_in_etcd_is_not_applied_and_does_not_crash() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    // A valid row, encoded from a scratch store.
    let s = Store::open_in_memory().unwrap();
    let mut s = s;
    s.upsert_host(&host("h2"), 1).unwrap();
    let t = codec::tables(s.conn()).unwrap();
    let hosts = t.iter().find(|t| t.name == "hosts").unwrap();
    let good = codec::encode_table(s.conn(), P, hosts).unwrap();
    c.put("/t/schema", SCHEMA_VERSION.to_string(), None).await.unwrap();
    for (k, v) in good {
        c.put(k, v, None).await.unwrap();
    }
    c.put("/t/v1/hosts/h1", vec![0xff, 0xff, 0xff], None).await.unwrap();
    c.put("/t/v1/nope/x", "x", None).await.unwrap();
    let mut r = Replica::open(c.clone(), P, &dir.path().join("c.db")).await.unwrap();
    assert_eq!(r.refused_rows(), 2);
    assert_eq!(r.with_store(|s| s.hosts().unwrap().len()).unwrap(), 1);
    // Through the watch too: the row that does not decode stays out, the next one goes in.
    c.put("/t/v1/owners/u9", "garbage", None).await.unwrap();
    let mut other = Store::open_in_memory().unwrap();
    other.set_owner(&owner("u8", "h2", 2), &audit("x")).unwrap();
    let owners = t.iter().find(|t| t.name == "owners").unwrap();
    for (k, v) in codec::encode_table(other.conn(), P, owners).unwrap() {
        c.put(k, v, None).await.unwrap();
    }
    r.catch_up().await.unwrap();
    assert_eq!(r.refused_rows(), 3);
    assert_eq!(r.with_store(|s| s.owners().unwrap()).unwrap(), vec![owner("u8", "h2", 2)]);
    // A value whose key names another row is refused too.
    let (k8, v8) = codec::encode_table(other.conn(), P, owners).unwrap().remove(0);
    assert_eq!(k8, "/t/v1/owners/u8");
    c.put("/t/v1/owners/u7", v8, None).await.unwrap();
    r.catch_up().await.unwrap();
    assert_eq!(r.refused_rows(), 4);
    assert_eq!(r.with_store(|s| s.owners().unwrap().len()).unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_or_rows_without_a_schema_key_are_refused() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    c.put("/t/v1/audit/1", "x", None).await.unwrap();
    let e = Replica::open(c.clone(), P, &dir.path().join("a.db")).await.unwrap_err();
    assert!(e.to_string().contains("did not finish"), "{e}");
    c.put("/t/schema", (SCHEMA_VERSION + 1).to_string(), None).await.unwrap();
    let e = Replica::open(c.clone(), P, &dir.path().join("a.db")).await.unwrap_err();
    assert!(matches!(e, EtcdError::TooNew { .. }) && e.to_string().contains("newer"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_set_over_the_limits_is_refused_naming_the_etcd_flag_and_changes_nothing() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::open(c.clone(), P, &dir.path().join("a.db")).await.unwrap();
    let l = leader(&mut c, P).await;
    let limits = WriteLimits { max_txn_ops: Some(128), max_request_bytes: None };
    let repos = replica.promote_with(l.clone(), limits).await.unwrap();
    let many = |n: usize| {
        move |r: &mut dyn Repositories| {
            let uuids: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
            let ch: Vec<DesiredChange<'_>> =
                uuids.iter().map(|u| DesiredChange { uuid: u, host: "h1", state: "running" }).collect();
            r.ownership().set_desired_many(&ch)
        }
    };
    let e = repos.call(many(200)).await.unwrap_err();
    assert!(e.to_string().contains("--max-txn-ops"), "{e}");
    assert!(l.holds(), "a refused size is not a lost leadership");
    assert!(repos.ownership(|o| o.desired()).await.unwrap().is_empty());
    repos.call(many(100)).await.unwrap();
    assert_eq!(repos.ownership(|o| o.desired()).await.unwrap().len(), 100);
    repos.shutdown().await.unwrap();

    // etcd's own refusal (the test etcd runs with --max-txn-ops 10000) is named too.
    let dir2 = tempfile::tempdir().unwrap();
    let replica = Replica::open(c.clone(), P, &dir2.path().join("b.db")).await.unwrap();
    let repos = replica.promote(l.clone()).await.unwrap();
    let e = repos.call(many(10_050)).await.unwrap_err();
    assert!(e.to_string().contains("--max-txn-ops"), "{e}");
    assert_eq!(repos.ownership(|o| o.desired()).await.unwrap().len(), 100);
    repos.shutdown().await.unwrap();
}

/// 1,000 hosts with 20 guests each: imported, then loaded by a replica
/// (the time is printed; run with `--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_1000_hosts_with_20_guests_each_loads() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("src.db");
    {
        let mut s = Store::open(&db).unwrap();
        let def = format!("<domain><name>x</name>{}</domain>", "<disk/>".repeat(100));
        for h in 0..1000 {
            let id = format!("host-{h:04}");
            s.upsert_host(&host(&id), 1).unwrap();
            let gs: Vec<(String, Vec<u8>)> =
                (0..20).map(|g| (format!("{id}-g{g:02}"), guest_bytes(&format!("{id}-g{g:02}"), &def))).collect();
            let rows: Vec<(&str, &str, &[u8])> = gs.iter().map(|(u, b)| (u.as_str(), "vm", b.as_slice())).collect();
            s.write_guests(&id, &rows, &[], 1).unwrap();
        }
    }
    let t = std::time::Instant::now();
    let sum = ops::import(&mut c, P, &db).await.unwrap();
    let import = t.elapsed();
    // Every row, and the store-restored alarm with its audit entry.
    assert_eq!(sum.keys, 21_002);
    let t = std::time::Instant::now();
    let r = Replica::open(c.clone(), P, &dir.path().join("cache.db")).await.unwrap();
    let load = t.elapsed();
    let (hosts, guests) = r.with_store(|s| (s.hosts().unwrap().len(), s.guests().unwrap().len())).unwrap();
    assert_eq!((hosts, guests, r.refused_rows()), (1000, 20_000, 0));
    println!("1,000 hosts x 20 guests: import {import:?} ({} txns), replica load {load:?}", sum.revision_or_txns);
}

/// Latency of single-row writes through the store thread (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_latency() {
    let Some((_e, c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, _l) = leading(&c, dir.path()).await;
    let before = stats();
    let mut lat = Vec::new();
    for i in 0..200 {
        let t = std::time::Instant::now();
        repos.audit(move |a| a.append(&audit(&format!("{i}")))).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let after = stats();
    assert!(after.txns >= before.txns + 200, "{after:?}");
    println!(
        "etcd backend, one audit row per call: p50 {:?} p99 {:?} max {:?}; stats {after:?}",
        lat[100], lat[197], lat[199]
    );
    repos.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_restore_and_import_refuse_a_used_prefix_or_an_elected_leader() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repos, _l) = leading(&c, dir.path()).await;
    repos.hosts(|h| h.upsert(&host("h1"), 5)).await.unwrap();
    repos.ownership(|o| o.set_owner(&owner("u1", "h1", 7), &audit("owner"))).await.unwrap();
    repos.shutdown().await.unwrap();
    let file = dir.path().join("export.bin");
    let sum = ops::export(&mut c, P, &file).await.unwrap();
    assert_eq!(sum.keys, 3, "host, owner, audit (the schema travels in the header)");
    let e = ops::export(&mut c, P, &file).await.unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");

    // Restore: refused into a used prefix, and while a leader is elected.
    let e = ops::restore(&mut c, P, &file).await.unwrap_err();
    assert!(e.to_string().contains("elected"), "{e}");
    c.delete("/t/leader/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let e = ops::restore(&mut c, P, &file).await.unwrap_err();
    assert!(e.to_string().contains("already exist"), "{e}");
    let before = revision(&mut c).await;
    let sum = ops::restore(&mut c, "/r/", &file).await.unwrap();
    assert_eq!(sum.keys, 5, "the 3 rows, the store-restored alarm and its audit entry");
    assert!(revision(&mut c).await > before);
    let r = Replica::open(c.clone(), "/r/", &dir.path().join("r.db")).await.unwrap();
    assert_eq!(r.with_store(|s| s.owners().unwrap()).unwrap(), vec![owner("u1", "h1", 7)]);
    assert!(r.with_store(|s| s.host("h1").unwrap().is_some()).unwrap());
    // An older copy holds the first leader until the hosts have reported.
    let alarms = r.with_store(|s| s.alarms(false).unwrap()).unwrap();
    assert!(alarms.iter().any(|a| a.3 == "store-restored"), "{alarms:?}");

    // A damaged export writes nothing.
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 3);
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, &bytes).unwrap();
    let e = ops::restore(&mut c, "/s/", &bad).await.unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(keys(&mut c, "/s/").await.is_empty());

    // Import: refused into a used prefix, and while a leader is elected.
    let db = dir.path().join("src.db");
    let mut s = Store::open(&db).unwrap();
    s.upsert_host(&host("h9"), 1).unwrap();
    drop(s);
    let e = ops::import(&mut c, "/r/", &db).await.unwrap_err();
    assert!(e.to_string().contains("already exist"), "{e}");
    c.put("/i/leader/x", "someone", None).await.unwrap();
    let e = ops::import(&mut c, "/i/", &db).await.unwrap_err();
    assert!(e.to_string().contains("elected"), "{e}");
    let sum = ops::import(&mut c, "/j/", &db).await.unwrap();
    assert_eq!(sum.keys, 3, "the host, the store-restored alarm and its audit entry");
    assert_eq!(keys(&mut c, "/j/").await, ["/j/schema", "/j/v1/alarms/1", "/j/v1/audit/1", "/j/v1/hosts/h9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_follower_holds_every_write_of_the_old_leader_which_is_fenced() {
    let Some((_e, mut c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let follower = Replica::open(c.clone(), P, &dir.path().join("f.db")).await.unwrap();
    let (old, old_lead) = leading(&c, dir.path()).await;
    let g = guest_bytes("u1", "<domain/>");
    old.call(move |r| {
        r.hosts().upsert(&host("h1"), 5)?;
        r.guests().write("h1", &[GuestWrite { uuid: "u1", name: "vm-u1", data: &g }], &[], 5)
    })
    .await
    .unwrap();
    // Queued back to back, not awaited one by one: the follower must catch up on promotion.
    let pending: Vec<_> = (0..50).map(|i| old.audit(move |a| a.append(&audit(&format!("old {i}"))))).collect();
    for p in pending {
        p.await.unwrap();
    }
    old.guests(|g| g.delete("h1", "u1")).await.unwrap();
    // The old leader's lease expired: its key is gone, the follower wins with a new one.
    c.delete("/t/leader/test", None).await.unwrap();
    let r = c.put("/t/leader/b", "http://b", None).await.unwrap();
    let epoch = u64::try_from(r.header().unwrap().revision()).unwrap();
    assert!(epoch > old_lead.epoch());
    let new_lead = Arc::new(Leadership::new(
        b"/t/leader/b".to_vec(),
        epoch,
        Duration::from_secs(600),
        tokio::time::Instant::now(),
    ));
    let new = follower.promote(new_lead.clone()).await.unwrap();
    let all = AuditFilter { limit: Some(1000), ..Default::default() };
    let log = new.audit(move |a| a.read(&all)).await.unwrap();
    assert_eq!(log.len(), 50, "every write of the old leader is in the new leader's cache");
    assert!(new.guests(|g| g.all()).await.unwrap().is_empty(), "the delete was applied too");
    new.audit(|a| a.append(&audit("new"))).await.unwrap();
    let k = keys(&mut c, "/t/v1/audit/").await;
    assert_eq!(k.len(), 51, "the new leader's entry got a new sequence number, none overwritten: {k:?}");
    // The old leader still believes it leads (its local deadline has not passed): etcd fences it.
    assert!(old_lead.holds());
    let e = old.audit(|a| a.append(&audit("stale"))).await.unwrap_err();
    assert!(e.to_string().contains("leadership key"), "{e}");
    assert!(!old_lead.holds());
    assert_eq!(keys(&mut c, "/t/v1/audit/").await.len(), 51);
    assert!(new_lead.holds());
    old.shutdown().await.unwrap();
    new.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_beside_the_watch_reads_the_rows_refuses_writes_and_the_rows_revision_moves_only_with_rows() {
    let Some((_e, c)) = etcd().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut follower = Replica::open(c.clone(), P, &dir.path().join("f.db")).await.unwrap();
    let (repos, _l) = leading(&c, dir.path()).await;
    repos.hosts(|h| h.upsert(&host("h1"), 5)).await.unwrap();
    follower.catch_up().await.unwrap();
    let rows = follower.rows_revision();
    let at = rows.get();
    assert!(at > follower.loaded_revision(), "the host's put moved it");
    // A sync write (every catch-up and promotion makes one) is not a row.
    follower.catch_up().await.unwrap();
    assert_eq!(rows.get(), at);
    let reader = follower.reader().unwrap();
    async fn hosts(r: &Repos) -> crate::ports::RepoResult<usize> {
        r.call(|r| Ok(r.hosts().all_checked()?.0.len())).await
    }
    assert_eq!(hosts(&reader).await.unwrap(), 1);
    let refused = reader.hosts(|h| h.upsert(&host("h9"), 6)).await;
    assert!(refused.is_err(), "the reader cannot write the cache");
    // The leader writes on: the watch applies it beside the reader, and the
    // revision moves.
    repos.hosts(|h| h.upsert(&host("h2"), 6)).await.unwrap();
    follower.catch_up().await.unwrap();
    assert!(rows.get() > at);
    assert_eq!(hosts(&reader).await.unwrap(), 2);
    assert_eq!(follower.stopped_following(), None);
    // It stays readable once the replica is promoted (its last value).
    let last = rows.get();
    let l = leader(&mut c.clone(), P).await;
    let promoted = follower.promote(l).await.unwrap();
    assert_eq!(rows.get(), last);
    // Dropped, not shut down: a shutdown checkpoints, which it cannot.
    drop(reader);
    promoted.shutdown().await.unwrap();
    repos.shutdown().await.unwrap();
}
