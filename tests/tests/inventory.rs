//! In-process end-to-end tests: real controller (tonic + mutual TLS +
//! SQLite) and real agents against libvirt's test driver, one node file per
//! simulated host. No root needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, wait_for};
use lifeboat_proto::v1::{
    AgentMessage, GetHostRequest, GuestRecord, GuestState, Hello, ListGuestsRequest, ListHostsRequest, agent_message,
    agent_session_client::AgentSessionClient,
};
use tonic::transport::Endpoint;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    format!("test://{}", p.display())
}

async fn guests(c: &Controller, pki: &Pki, host: &str) -> Vec<GuestRecord> {
    let mut a = c.admin(&pki.client("viewer", Role::Viewer)).await;
    a.list_guests(ListGuestsRequest { host: host.into(), with_definitions: true, ..Default::default() })
        .await
        .map(|r| r.into_inner().guests)
        .unwrap_or_default()
}

fn by_name<'a>(gs: &'a [GuestRecord], name: &str) -> Option<&'a lifeboat_proto::v1::Guest> {
    gs.iter().filter_map(|g| g.guest.as_ref()).find(|g| g.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_guest_of_every_host_reaches_the_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 1000, 3000).await;
    let a = Agent::start(&agent_config("host-a", &fixture("host-a.xml"), &c.url(), &pki.agent("host-a"), ""));
    let b = Agent::start(&agent_config("host-b", &fixture("host-b.xml"), &c.url(), &pki.agent("host-b"), ""));
    let (all, took) = wait_for(Duration::from_secs(10), "5 guests", || async {
        let g = guests(&c, &pki, "").await;
        (g.len() == 5).then_some(g)
    })
    .await;
    println!("inventory of 2 hosts visible after {took:?}");
    let a1 = by_name(&all, "vm-a1").unwrap();
    assert_eq!(a1.state, GuestState::Running as i32);
    assert_eq!(a1.uuid, "11111111-0000-4000-8000-00000000a001");
    assert_eq!(a1.memory_kib, 64 * 1024);
    assert_eq!(a1.disks[0].source, "/srv/shared/vm-a1.img");
    assert!(a1.disks[0].shareable);
    assert_eq!(a1.nics[0].mac, "52:54:00:00:0a:01");
    assert_eq!(a1.nics[0].source, "br0");
    assert!(a1.definition_xml.contains("<uuid>11111111-0000-4000-8000-00000000a001</uuid>"));
    assert!(a1.persistent && a1.error.is_empty());
    // Definitions live in the controller's database, not in its memory:
    // a plain listing leaves them out; one guest can be asked for.
    let mut v = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let plain = v.list_guests(ListGuestsRequest::default()).await.unwrap().into_inner().guests;
    assert_eq!(plain.len(), 5);
    assert!(plain.iter().all(|g| g.guest.as_ref().unwrap().definition_xml.is_empty()));
    assert_eq!(by_name(&plain, "vm-a1").unwrap().disks[0].source, "/srv/shared/vm-a1.img", "everything else is listed");
    let one = v
        .list_guests(ListGuestsRequest { vm: "vm-a1".into(), with_definitions: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .guests;
    assert_eq!(one.len(), 1);
    assert!(one[0].guest.as_ref().unwrap().definition_xml.contains("<name>vm-a1</name>"));
    // Pages: two guests at a time, in order, every guest once, no empty last page.
    let mut req = ListGuestsRequest { page_size: 2, ..Default::default() };
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let r = v.list_guests(req.clone()).await.unwrap().into_inner();
        pages += 1;
        assert!(r.guests.len() <= 2);
        paged.extend(r.guests.into_iter().map(|g| (g.host_id, g.guest.unwrap().name)));
        if r.next_page_token.is_empty() {
            break;
        }
        req.page_token = r.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<(String, String)> =
        plain.iter().map(|g| (g.host_id.clone(), g.guest.as_ref().unwrap().name.clone())).collect();
    expected.sort();
    assert_eq!(paged, expected);
    let bad =
        v.list_guests(ListGuestsRequest { page_token: "nonsense".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("page_token"), "{}", bad.message());
    let a2 = by_name(&all, "vm-a2").unwrap();
    assert_eq!(a2.state, GuestState::Shutoff as i32);
    assert!(!a2.managed_save);
    assert!(by_name(&all, "vm-a3").unwrap().managed_save);
    let b2 = by_name(&all, "vm-b2").unwrap();
    assert!(!b2.persistent, "vm-b2 is transient");
    for g in &all {
        let expect = if g.guest.as_ref().unwrap().name.starts_with("vm-a") { "host-a" } else { "host-b" };
        assert_eq!(g.host_id, expect);
    }
    // Host facts.
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let h = adm.get_host(GetHostRequest { host: "host-a".into() }).await.unwrap().into_inner();
    let info = h.info.unwrap();
    assert_eq!(info.cpus, 4);
    assert!(!info.libvirt_version.is_empty() && info.libvirt_error.is_empty());
    assert_eq!(h.liveness, "REACHABLE");
    assert_eq!((h.guest_count, h.running_count), (3, 1));
    // Unknown host: NotFound naming the known ones.
    let e = adm.get_host(GetHostRequest { host: "host-z".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("host-a") && e.message().contains("host-z"), "{}", e.message());
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_guest_shows_within_one_second() {
    // test:///default is shared by every connection in this process, so
    // this test changes the guest behind the agent's back like virsh would.
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 1000, 3000).await;
    let mut cfg = agent_config("host-d", "test:///default", &c.url(), &pki.agent("host-d"), "");
    cfg = cfg.replace("resync_interval_s = 2", "resync_interval_s = 600");
    let a = Agent::start(&cfg);
    wait_for(Duration::from_secs(10), "default guest", || async {
        let g = guests(&c, &pki, "host-d").await;
        by_name(&g, "test").filter(|g| g.state == GuestState::Running as i32).map(|_| ())
    })
    .await;
    let t = tokio::task::spawn_blocking(|| {
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        let d = conn.lookup_domain_by_name("test").unwrap();
        d.destroy().unwrap();
        conn
    })
    .await
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(5), "shutoff seen", || async {
        let g = guests(&c, &pki, "host-d").await;
        by_name(&g, "test").filter(|g| g.state == GuestState::Shutoff as i32).map(|_| ())
    })
    .await;
    println!("destroy visible after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Undefine outside Lifeboat: the guest is gone from its owner, and kept
    // as missing with its last definition.
    tokio::task::spawn_blocking(move || {
        let d = t.lookup_domain_by_name("test").unwrap();
        d.undefine().unwrap();
    })
    .await
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(5), "guest missing", || async {
        let g = guests(&c, &pki, "host-d").await;
        g.iter().find(|r| r.guest.as_ref().is_some_and(|x| x.name == "test")).filter(|r| r.missing).map(|_| ())
    })
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_is_unreachable_and_a_restart_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let db = tmp.path().join("c.db");
    let c = Controller::start(&pki, &db, 0, 1000, 3000).await;
    let a = Agent::start(&agent_config("host-a", &fixture("host-a.xml"), &c.url(), &pki.agent("host-a"), ""));
    wait_for(Duration::from_secs(10), "3 guests", || async {
        (guests(&c, &pki, "host-a").await.len() == 3).then_some(())
    })
    .await;
    a.stop().await;
    let adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let (_, took) = wait_for(Duration::from_secs(8), "host-a unreachable", || {
        let mut adm = adm.clone();
        async move {
            let h = adm.get_host(GetHostRequest { host: "host-a".into() }).await.ok()?.into_inner();
            (h.liveness == "UNREACHABLE").then_some(())
        }
    })
    .await;
    println!("silence detected after {took:?}");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    let port = c.addr.port();
    c.stop().await;
    // A fresh controller on the same database knows every host and guest.
    let started = std::time::Instant::now();
    let c2 = Controller::start(&pki, &db, port, 1000, 3000).await;
    let mut adm = c2.admin(&pki.client("viewer", Role::Viewer)).await;
    let hosts = adm.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts;
    assert_eq!(hosts.len(), 1);
    // The startup grace: its agent had no chance to reconnect yet.
    assert_eq!(hosts[0].liveness, "REACHABLE", "not UNREACHABLE before the controller was up for the detection time");
    assert!(!hosts[0].session_open);
    assert_eq!(hosts[0].info.as_ref().unwrap().cpus, 4);
    let (_, _) = wait_for(Duration::from_secs(6), "host-a unreachable after the grace", || {
        let mut adm = adm.clone();
        async move {
            let h = adm.get_host(GetHostRequest { host: "host-a".into() }).await.ok()?.into_inner();
            (h.liveness == "UNREACHABLE").then_some(())
        }
    })
    .await;
    let took = started.elapsed();
    println!("not heard since the restart: UNREACHABLE {took:?} after it");
    assert!(took >= Duration::from_millis(3000) && took <= Duration::from_secs(5), "took {took:?}");
    let g = guests(&c2, &pki, "host-a").await;
    assert_eq!(g.len(), 3);
    assert!(by_name(&g, "vm-a1").unwrap().definition_xml.contains("vm-a1"));
    c2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_another_hosts_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 1000, 3000).await;
    lifeboat_common::tls::install_crypto_provider();
    let m = pki.agent("host-b").load().unwrap();
    let ch = Endpoint::from_shared(c.url())
        .unwrap()
        .tls_config(m.client_config("lifeboat-controller"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let hello =
        AgentMessage { msg: Some(agent_message::Msg::Hello(Hello { host_id: "host-a".into(), ..Default::default() })) };
    let r = AgentSessionClient::new(ch).session(tokio_stream::iter(vec![hello])).await;
    let e = r.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("host-b") && e.message().contains("host-a"), "{}", e.message());
    // A real agent configured that way never shows up either.
    let mut cfg = agent_config("host-a", &fixture("host-a.xml"), &c.url(), &pki.agent("host-b"), "");
    cfg = cfg.replace("resync_interval_s = 2", "resync_interval_s = 1");
    let a = Agent::start(&cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    assert!(adm.list_hosts(ListHostsRequest {}).await.unwrap().into_inner().hosts.is_empty());
    // An agent certificate cannot use the admin API; a viewer can.
    let mut as_agent = c.admin(&pki.agent("host-b")).await;
    let e = as_agent.list_hosts(ListHostsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_libvirt_is_reported_and_the_agent_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 1000, 3000).await;
    let sock = tmp.path().join("no-libvirt-sock");
    let uri = format!("qemu+unix:///system?socket={}", sock.display());
    let a = Agent::start(&agent_config("host-x", &uri, &c.url(), &pki.agent("host-x"), ""));
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let (err, _) = wait_for(Duration::from_secs(10), "libvirt error reported", || {
        let mut adm = adm.clone();
        async move {
            let h = adm.get_host(GetHostRequest { host: "host-x".into() }).await.ok()?.into_inner();
            let e = h.info?.libvirt_error;
            e.contains("unreachable").then_some(e)
        }
    })
    .await;
    assert!(err.contains(&sock.display().to_string()), "{err}");
    // Still alive: heartbeats continue.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let h = adm.get_host(GetHostRequest { host: "host-x".into() }).await.unwrap().into_inner();
    assert_eq!(h.liveness, "REACHABLE");
    a.stop().await;
    c.stop().await;
}

#[test]
fn a_malformed_agent_config_names_file_and_problem() {
    let e =
        lifeboat_agent::config::AgentConfig::parse("[controller]\nurl = 5\n", Path::new("/etc/lifeboat/agent.toml"))
            .unwrap_err()
            .to_string();
    assert!(e.contains("/etc/lifeboat/agent.toml") && e.contains("url"), "{e}");
}
