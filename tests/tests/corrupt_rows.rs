//! Stored values that do not read make the controller refuse, never guess:
//! a host whose stored status is not a status is quarantined at start (an
//! alarm names the row), comes back MAINTENANCE, and is never a target.

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Controller, Pki};
use lifeboat_proto::v1::{HostInfo, ListAlarmsRequest, ListHostsRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_host_status_is_quarantined_and_the_host_is_no_target() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let db = dir.path().join("db.sqlite");
    {
        let mut s = lifeboat_controller::store::Store::open(&db).unwrap();
        let info = HostInfo { host_id: "host-x".into(), hostname: "x".into(), ..Default::default() };
        s.upsert_host(&info, lifeboat_common::now_unix_ms()).unwrap();
        // Lower case: what a hand edit or a bad restore would leave; the
        // lenient operator parse would take it, a stored value must not.
        s.set_status("host-x", "available", "hand edit", None).unwrap();
    }
    let c = Controller::start(&pki, &db, 0, 200, 2_000).await;
    let mut adm = c.admin(&pki.client("viewer", Role::Viewer)).await;
    let hosts = adm.list_hosts(ListHostsRequest::default()).await.unwrap().into_inner().hosts;
    let x = hosts.iter().find(|h| h.info.as_ref().is_some_and(|i| i.host_id == "host-x")).expect("host listed");
    assert_eq!(x.status, "MAINTENANCE", "never AVAILABLE: {x:?}");
    let alarms = adm.list_alarms(ListAlarmsRequest::default()).await.unwrap().into_inner().alarms;
    let q: Vec<_> = alarms.iter().filter(|a| a.kind == "row-quarantined" && a.host == "host-x").collect();
    assert_eq!(q.len(), 1, "{alarms:?}");
    assert!(q[0].detail.contains("table hosts (key host-x)"), "{}", q[0].detail);
    c.stop().await;
    let store = lifeboat_controller::store::Store::open(&db).unwrap();
    let quarantined = store.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].reason.contains("unknown host status \"available\""), "{}", quarantined[0].reason);
    assert_eq!(
        store.host("host-x").unwrap().unwrap().status,
        lifeboat_controller::domain::host::HostStatus::Maintenance
    );
}
