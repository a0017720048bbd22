//! Arbitrary agent messages through the controller's real entry points (the
//! session's intake and page gathering, then the registry on a real
//! database): nothing panics, a refused message changes nothing, and the
//! database loads again afterwards without a row to quarantine.
//! `PROPTEST_CASES` sets the number of cases (32 by default, for CI).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Messages accepted and refused over the whole run: both must happen, or
/// the strategy tests only one side.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);

use lifeboat_controller::domain::host::Timing;
use lifeboat_controller::intake::{MAX_MEMORY_KIB, SessionIntake};
use lifeboat_controller::registry::Registry;
use lifeboat_controller::rpc::agent::{MessageError, handle_message};
use lifeboat_controller::store::sqlite::SqliteRepos;
use lifeboat_proto::v1::{
    AgentMessage, CommandResult, Disk, Guest, GuestChanged, GuestRemoved, Heartbeat, Hello, HostInfo, Inventory, Nic,
    agent_message::Msg,
};
use proptest::prelude::*;

const UUIDS: [&str; 4] = [
    "6f1c7e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
    "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002",
    "00000000-0000-4000-8000-000000000003",
];
/// Reported by the other host.
const OTHERS: &str = "00000000-0000-4000-8000-0000000000ff";

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9-]{0,11}",
        1 => ".{0,12}",
        1 => Just(String::new()),
        1 => Just("x\u{1b}[2J\u{7}".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("n".repeat(300)),
        1 => Just("p".repeat(5000)),
    ]
}

fn uuid() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(&UUIDS[..]).prop_map(String::from),
        1 => Just(OTHERS.to_string()),
        1 => Just("../../x".to_string()),
        1 => Just(UUIDS[0].to_uppercase()),
        1 => text(),
    ]
}

fn memory() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..(1 << 24),
        Just(MAX_MEMORY_KIB),
        Just(MAX_MEMORY_KIB + 1),
        Just(u64::MAX),
        any::<u64>()
    ]
}

/// Packed definitions: an honest one, a compression bomb, garbage, none.
fn deflated() -> impl Strategy<Value = (String, Vec<u8>)> {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    let bomb = BOMB
        .get_or_init(|| {
            let mut g = Guest { definition_xml: " ".repeat(8 << 20), ..Default::default() };
            lifeboat_proto::pack_definition(&mut g);
            g.definition_deflate
        })
        .clone();
    let mut honest = Guest { definition_xml: "<domain><name>vm</name></domain>".into(), ..Default::default() };
    lifeboat_proto::pack_definition(&mut honest);
    prop_oneof![
        3 => Just((String::new(), honest.definition_deflate)),
        1 => Just((String::new(), bomb)),
        1 => Just((String::new(), b"garbage".to_vec())),
        1 => Just(("<domain/>".to_string(), Vec::new())),
        1 => Just(("<domain/>".to_string(), b"both".to_vec())),
        1 => Just((String::new(), Vec::new())),
    ]
}

fn guest() -> impl Strategy<Value = Guest> {
    (
        (uuid(), text(), -2i32..10, memory(), prop_oneof![0u32..8, any::<u32>()]),
        (deflated(), text(), any::<u64>(), any::<i32>()),
        (proptest::collection::vec(text(), 0..3), proptest::collection::vec(text(), 0..2), text()),
    )
        .prop_map(
            |(
                (uuid, name, state, memory_kib, vcpus),
                ((xml, deflate), owner_host, owner_generation, priority),
                (disks, nics, error),
            )| Guest {
                uuid,
                name,
                state,
                memory_kib,
                vcpus,
                definition_xml: xml,
                definition_deflate: deflate,
                owner_host,
                owner_generation: if owner_generation % 3 == 0 { owner_generation % 5 } else { owner_generation },
                priority,
                disks: disks
                    .into_iter()
                    .map(|s| Disk { source: s, target: "vda".into(), ..Default::default() })
                    .collect(),
                nics: nics.into_iter().map(|m| Nic { mac: m, ..Default::default() }).collect(),
                error,
                ..Default::default()
            },
        )
}

fn host_info() -> impl Strategy<Value = HostInfo> {
    (text(), text(), memory(), any::<u32>(), text()).prop_map(|(hostname, v, memory_total_kib, cpus, err)| HostInfo {
        host_id: "h".into(),
        hostname,
        libvirt_version: v,
        memory_total_kib,
        cpus,
        libvirt_error: if err.len() % 2 == 0 { String::new() } else { err },
        ..Default::default()
    })
}

fn message() -> impl Strategy<Value = AgentMessage> {
    let m = prop_oneof![
        1 => any::<u64>().prop_map(|f| Msg::Heartbeat(Heartbeat { seq: 1, sent_unix_ms: 0, memory_free_kib: f })),
        6 => (proptest::option::of(host_info()), proptest::collection::vec(guest(), 0..4), any::<bool>())
            .prop_map(|(host, guests, more)| Msg::Inventory(Inventory { host, guests, more })),
        4 => guest().prop_map(|g| Msg::GuestChanged(GuestChanged { guest: Some(g) })),
        2 => (uuid(), text()).prop_map(|(uuid, name)| Msg::GuestRemoved(GuestRemoved { uuid, name })),
        2 => host_info().prop_map(Msg::Host),
        1 => (uuid(), proptest::option::of(guest())).prop_map(|(id, guest)| Msg::CommandResult(CommandResult { id, guest, ok: true, ..Default::default() })),
        1 => Just(Msg::Hello(Hello { host_id: "h".into(), ..Default::default() })),
    ];
    prop_oneof![20 => m.prop_map(Some), 1 => Just(None)].prop_map(|msg| AgentMessage { msg })
}

/// What a refused message must leave as it was: the guests (definitions
/// included, from the database), the hosts' facts, desired states, alarms.
fn snapshot(reg: &Registry) -> String {
    let guests = reg.list_guests(None, None, true).unwrap();
    let hosts: Vec<_> = reg.list_hosts().into_iter().map(|h| (h.info, h.status, h.guest_count)).collect();
    let desired = reg.repos().call_blocking(|r| r.ownership().desired()).unwrap();
    format!("{guests:?}\n{hosts:?}\n{desired:?}\n{:?}", reg.active_alarms())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

/// One sequence of messages from host "h" (and one honest inventory from
/// "other" first).
fn run_case(msgs: Vec<AgentMessage>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lifeboat.db");
    let reg = Registry::load(SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    let sid = reg.open_session("h", "boot", tx.clone()).unwrap();
    let other = reg.open_session("other", "boot", tx).unwrap();
    let theirs = Guest { uuid: OTHERS.into(), name: "theirs".into(), state: 2, memory_kib: 1024, ..Default::default() };
    let first = AgentMessage { msg: Some(Msg::Inventory(Inventory { host: None, guests: vec![theirs], more: false })) };
    handle_message(&reg, "other", other, &mut SessionIntake::new(0), first, 0).unwrap();
    let mut intake = SessionIntake::new(0);
    for (i, msg) in msgs.into_iter().enumerate() {
        let before = snapshot(&reg);
        let now = i64::try_from(i).unwrap() * 1000;
        match handle_message(&reg, "h", sid, &mut intake, msg, now) {
            Ok(()) => {
                ACCEPTED.fetch_add(1, Ordering::Relaxed);
            }
            Err(MessageError::Refused(r)) => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                prop_assert!(!r.field.is_empty() && !r.reason.is_empty(), "{r:?}");
                prop_assert_eq!(snapshot(&reg), before, "refused ({}) yet something changed", r);
            }
            Err(MessageError::Failed(e)) => prop_assert!(false, "a message passed the intake but failed: {e}"),
        }
    }
    let again = Registry::load(SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
    let q = again.repos().call_blocking(|r| r.quarantine().list()).unwrap();
    prop_assert!(q.is_empty(), "accepted input left rows that do not load: {q:?}");
    prop_assert!(again.list_guests(None, Some("theirs"), false).unwrap().len() == 1);
    Ok(())
}

#[test]
fn fuzz_agent_messages() {
    // The strategy's types nest deeply: a debug build needs more than a
    // test thread's 2 MiB of stack to build and shrink them.
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(|| {
            let mut runner =
                proptest::test_runner::TestRunner::new(ProptestConfig { cases: cases(), ..ProptestConfig::default() });
            if let Err(e) = runner.run(&proptest::collection::vec(message(), 1..12), run_case) {
                panic!("{e}");
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let (a, r) = (ACCEPTED.load(Ordering::Relaxed), REFUSED.load(Ordering::Relaxed));
    assert!(a > 0 && r > 0, "accepted {a}, refused {r}: the strategy must produce both");
}
