//! Property test of the `lifeboat` binary against a REAL controller (in this
//! process, mutual TLS, one agent on libvirt's test driver): generated argv
//! reaches the code that runs after connecting (`log --since`, `vms list
//! --host`, `jobs watch`, `hosts set-status`, ...). Properties: the process
//! exits by itself with a code, never 101/134/139/141 or a signal, never
//! prints "panicked", within a bound; the controller still answers afterwards.
//!
//! Needs the CLI binary built (`cargo build -p lifeboat-cli`; scripts/fuzz.sh
//! and scripts/test.sh do): without it the test fails and says so.
//! `LIFEBOAT_CLI_BIN=PATH` runs another build of the CLI instead.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, wait_for};
use lifeboat_proto::v1::ListHostsRequest;
use proptest::prelude::*;

const MAX_RUN: Duration = Duration::from_secs(20);

fn words() -> impl Strategy<Value = Vec<OsString>> {
    const COMMANDS: &[&str] = &[
        "hosts",
        "list",
        "show",
        "set-status",
        "vms",
        "restore",
        "forget",
        "start",
        "whoami",
        "migrate",
        "move",
        "cleanup",
        "alarms",
        "clear",
        "jobs",
        "watch",
        "log",
        "dashboard",
        "login",
        "end-sessions",
        "help",
        "host-a",
        "vm-a1",
        "vm-a2",
        "11111111-0000-4000-8000-00000000a001",
        "AVAILABLE",
        "MAINTENANCE",
        "OFFLINE",
        "NOT_ACCEPTING",
    ];
    const FLAGS: &[&str] = &[
        "--vm",
        "--from",
        "--to",
        "--since",
        "--timeout",
        "-o",
        "--parallel",
        "--plan-id",
        "--reason",
        "--host",
        "--job",
        "--yes",
        "--plan",
        "--force",
        "--fence",
        "--all",
        "--no-wait",
        "--no-start",
        "--attest-powered-off",
        "--help",
        "--",
    ];
    let word = prop_oneof![
        4 => proptest::sample::select(COMMANDS).prop_map(OsString::from),
        4 => proptest::sample::select(FLAGS).prop_map(OsString::from),
        1 => prop_oneof![Just("json"), Just("table")].prop_map(OsString::from),
        3 => prop_oneof![
            Just("0".to_string()), Just("-1".to_string()), Just("999999999999999d".to_string()),
            Just("-5d".to_string()), Just("5m".to_string()), Just("18446744073709551616s".to_string()),
            Just("2026-12-06T04:00:00Z".to_string()), Just("9999-12-31T23:59:59Z".to_string()),
            Just("0000-01-01T00:00:00Z".to_string()), Just("1d2h".to_string()),
            any::<u64>().prop_map(|n| format!("{n}s")), any::<i64>().prop_map(|n| format!("{n}d")),
            any::<u32>().prop_map(|n| n.to_string()),
        ].prop_map(OsString::from),
        1 => Just(OsString::new()),
        1 => (1usize..3).prop_map(|n| OsString::from("x".repeat(n * 40_000))),
        1 => Just(OsString::from("vm\u{1b}[2J\u{7}\r\n")),
        1 => proptest::collection::vec(1u8..=255, 0..12).prop_map(OsString::from_vec),
        1 => "\\PC{0,16}".prop_map(OsString::from),
    ];
    proptest::collection::vec(word, 1..7)
}

/// A value for a command's argument: real names, odd times, garbage.
fn value() -> impl Strategy<Value = OsString> {
    prop_oneof![
        2 => prop_oneof![
            Just("host-a"), Just("vm-a1"), Just("11111111-0000-4000-8000-00000000a001"), Just("OFFLINE"),
            Just("MAINTENANCE"), Just("AVAILABLE"), Just("split-brain"), Just("nope"),
        ].prop_map(OsString::from),
        6 => prop_oneof![
            Just("999999999999999d".to_string()), Just("-5d".to_string()), Just("0s".to_string()),
            Just("18446744073709551616s".to_string()), Just("9223372036854775807s".to_string()),
            Just("9999-12-31T23:59:59Z".to_string()), Just("0000-01-01T00:00:00Z".to_string()),
            Just("2026-02-30T00:00:00Z".to_string()), Just("1d2h".to_string()),
            any::<u64>().prop_map(|n| format!("{n}s")), any::<u64>().prop_map(|n| format!("{n}d")),
            any::<i64>().prop_map(|n| format!("{n}m")), any::<u32>().prop_map(|n| n.to_string()),
        ].prop_map(OsString::from),
        1 => Just(OsString::new()),
        1 => (1usize..3).prop_map(|n| OsString::from("x".repeat(n * 40_000))),
        1 => Just(OsString::from("vm\u{1b}[2J\u{7}\r\n")),
        1 => Just(OsString::from("../../x")),
        1 => proptest::collection::vec(1u8..=255, 0..12).prop_map(OsString::from_vec),
        1 => "\\PC{0,16}".prop_map(OsString::from),
    ]
}

/// A real command line with generated values.
fn command() -> impl Strategy<Value = Vec<OsString>> {
    let v = value;
    let t = |w: &[&str]| w.iter().map(OsString::from).collect::<Vec<_>>();
    let with = move |mut a: Vec<OsString>, vs: Vec<OsString>| {
        // each "@" takes the next value
        let mut vs = vs.into_iter();
        for w in a.iter_mut() {
            if w == "@" {
                *w = vs.next().unwrap_or_default();
            }
        }
        a
    };
    let templates: Vec<Vec<OsString>> = vec![
        t(&["log", "--since", "@"]),
        t(&["log", "--host", "@", "--vm", "@", "--job", "@"]),
        t(&["log", "--since", "@", "-o", "json"]),
        t(&["log", "--vm", "@", "--since", "@"]),
        t(&["vms", "list", "--host", "@"]),
        t(&["vms", "list", "-o", "json"]),
        t(&["vms", "show", "@"]),
        t(&["vms", "restore", "--reason", "@", "@"]),
        t(&["vms", "forget", "--reason", "@", "@"]),
        t(&["vms", "start", "--reason", "@", "@"]),
        t(&["hosts", "list"]),
        t(&["hosts", "show", "@"]),
        t(&["hosts", "set-status", "@", "@", "--reason", "@"]),
        t(&["jobs", "list"]),
        t(&["jobs", "show", "@"]),
        t(&["jobs", "watch", "@"]),
        t(&["alarms"]),
        t(&["alarms", "clear", "--host", "@", "--kind", "@"]),
        t(&["cleanup", "@", "--plan"]),
        t(&["migrate", "--from", "@", "--plan", "--parallel", "@"]),
        t(&["move", "--vm", "@", "--from", "@", "--to", "@", "--plan"]),
        t(&["whoami", "--timeout", "@"]),
        t(&["dashboard", "login"]),
        t(&["dashboard", "login", "-o", "json", "--timeout", "@"]),
        t(&["dashboard", "login", "@"]),
        t(&["dashboard", "@", "login"]),
        t(&["dashboard", "end-sessions", "--name", "@"]),
        t(&["dashboard", "end-sessions", "--all", "@"]),
    ];
    (proptest::sample::select(templates), proptest::collection::vec(v(), 3)).prop_map(move |(a, vs)| with(a, vs))
}

#[test]
fn fuzz_cli_live() {
    // LIFEBOAT_CLI_BIN: another build of the CLI (e.g. a branch's) against this controller
    let cli = std::env::var_os("LIFEBOAT_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lifeboat"));
    assert!(cli.exists(), "{} is missing: run `cargo build -p lifeboat-cli` first", cli.display());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/host-a.xml");
    let (c, agent) = rt.block_on(async {
        let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 200, 2000).await;
        let uri = format!("test://{}", fixture.display());
        let a = Agent::start(&agent_config("host-a", &uri, &c.url(), &pki.agent("host-a"), ""));
        (c, a)
    });
    let op = pki.client("fuzz", Role::Operator);
    let admin = rt.block_on(c.admin(&op));
    let hosts = |mut a: lifeboat_proto::v1::admin_client::AdminClient<tonic::transport::Channel>| {
        rt.block_on(async move { a.list_hosts(ListHostsRequest::default()).await.map(|r| r.into_inner().hosts.len()) })
    };
    rt.block_on(wait_for(Duration::from_secs(20), "host-a registered", || {
        let mut a = admin.clone();
        async move {
            a.list_hosts(ListHostsRequest::default()).await.ok().filter(|r| !r.get_ref().hosts.is_empty()).map(|_| ())
        }
    }));
    let base: Vec<OsString> = vec![
        "--controller-url".into(),
        c.url().into(),
        "--ca".into(),
        op.ca.clone().into_os_string(),
        "--cert".into(),
        op.cert.clone().into_os_string(),
        "--key".into(),
        op.key.clone().into_os_string(),
        "--timeout".into(),
        "5".into(),
    ];
    let argv = prop_oneof![3 => command(), 1 => words()];
    harness::run("cli_live", 24, argv, |words| {
        let started = Instant::now();
        let mut child = Command::new(&cli)
            .args(&base)
            .args(&words)
            .current_dir(tmp.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lifeboat");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).ok();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > MAX_RUN {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = started.elapsed();
        if std::env::var_os("FUZZ_VERBOSE").is_some() {
            eprintln!("{words:?} -> {:?} {}", status.code(), stderr.trim_end());
        }
        prop_assert!(took < MAX_RUN, "hung ({took:?}): {stderr}");
        prop_assert!(status.signal().is_none(), "killed by signal {:?}: {stderr}", status.signal());
        prop_assert!(!matches!(status.code(), Some(101 | 134 | 139 | 141)), "exit {:?}: {stderr}", status.code());
        prop_assert!(!stderr.contains("panicked"), "panic: {stderr}");
        Ok(())
    });
    assert_eq!(hosts(admin.clone()).expect("controller still answers"), 1);
    rt.block_on(async {
        agent.stop().await;
        c.stop().await;
    });
}
