//! Property tests of the `lifeboat` binary's argument and config-file
//! parsing: generated argv (subcommands, flags, empty, huge, non-UTF-8 and
//! control-character values) and mutated CLI config files, run against the
//! real binary pointed at https://127.0.0.1:1 (nothing listens: every call
//! that gets past parsing ends "unreachable"). Properties: the process exits
//! by itself with a code (no signal, no 101 panic, no 134 abort), within a
//! bound, and never prints "panicked"; a config refusal names the file.
//!
//! `certs` and `generate man` write files where argv says: they are not
//! generated here (the CLI garbage test covers them).

#[path = "../../fuzz/harness.rs"]
mod harness;
#[path = "../../fuzz/config_mutations.rs"]
mod mutations;

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};
use proptest::prelude::*;

/// Longest a CLI run may take (its own `--timeout` is at most 3 s here, and nothing listens).
const MAX_RUN: Duration = Duration::from_secs(20);

/// A scratch directory with a CA and an operator certificate, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lifeboat-fuzz-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        pki::init(&dir).unwrap();
        pki::issue(&dir, &dir, &Leaf::Client("fuzz".into(), Role::Operator)).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn connection(&self) -> Vec<OsString> {
        [
            "--controller-url".into(),
            "https://127.0.0.1:1".into(),
            "--ca".into(),
            self.path("ca.pem").into_os_string(),
            "--cert".into(),
            self.path("client-fuzz.pem").into_os_string(),
            "--key".into(),
            self.path("client-fuzz.key").into_os_string(),
        ]
        .into()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    took: Duration,
}

fn lifeboat(args: &[OsString], cwd: &Path) -> Run {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lifeboat");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
    });
    let mut stderr = Vec::new();
    let _ = err.read_to_end(&mut stderr);
    let _ = reader.join();
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
    Run {
        code: status.code(),
        signal: status.signal(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn check_run(r: &Run) -> Result<(), TestCaseError> {
    prop_assert!(r.took < MAX_RUN, "hung: {r:?}");
    prop_assert!(r.signal.is_none(), "killed by signal {:?}: {}", r.signal, r.stderr);
    prop_assert!(!matches!(r.code, Some(101 | 134 | 139 | 141)), "exit {:?}: {}", r.code, r.stderr);
    prop_assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    Ok(())
}

/// One argv word.
fn word() -> impl Strategy<Value = OsString> {
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
        "help",
        "generate",
        "completions",
        "bash",
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
        "--output",
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
        "--destroy-running",
        "--help",
        "-h",
        "--version",
        "--",
        "-",
        "--controller-url",
        "--server-name",
        "--config",
    ];
    prop_oneof![
        4 => proptest::sample::select(COMMANDS).prop_map(OsString::from),
        4 => proptest::sample::select(FLAGS).prop_map(OsString::from),
        1 => prop_oneof![Just("json"), Just("table"), Just("yaml")].prop_map(OsString::from),
        2 => prop_oneof![
            Just("0".to_string()), Just("-1".to_string()), Just("3".to_string()),
            Just("999999999999999d".to_string()), Just("-5d".to_string()), Just("5m".to_string()),
            Just("18446744073709551616".to_string()), Just("1h30m".to_string()),
            Just("2026-12-06T04:00:00Z".to_string()), Just("9999-99-99T99:99:99Z".to_string()),
            any::<u64>().prop_map(|n| n.to_string()), any::<i64>().prop_map(|n| format!("{n}s")),
        ].prop_map(OsString::from),
        1 => Just(OsString::new()),
        1 => (1usize..4).prop_map(|n| OsString::from("x".repeat(n * 40_000))),
        1 => Just(OsString::from("vm\u{1b}[2J\u{7}\r\n")),
        1 => Just(OsString::from("../../etc/passwd")),
        1 => proptest::collection::vec(1u8..=255, 0..12).prop_map(OsString::from_vec),
        1 => "\\PC{0,16}".prop_map(OsString::from),
        1 => ("--[a-z-]{1,12}", "[ -~]{0,10}").prop_map(|(f, v)| OsString::from(format!("{f}={v}"))),
    ]
}

#[test]
fn fuzz_cli_args() {
    let scratch = Scratch::new("args");
    let conn = scratch.connection();
    let strategy = (0u8..3, proptest::collection::vec(word(), 0..7));
    harness::run("cli_args", 32, strategy, |(base, words)| {
        let mut args: Vec<OsString> = match base {
            // a complete connection: parsing errors, else "unreachable"
            0 => conn.clone(),
            // nothing: missing-connection errors
            1 => vec![],
            // a connection that cannot load: usage errors
            _ => vec!["--ca".into(), "/nonexistent/ca.pem".into()],
        };
        args.extend(["--timeout".into(), "3".into()]);
        args.extend(words);
        check_run(&lifeboat(&args, &scratch.0))
    });
}

#[test]
fn fuzz_cli_config() {
    let scratch = Scratch::new("config");
    let seeds: Vec<String> = harness::corpus("config-cli")
        .into_iter()
        .map(|(_, b)| {
            String::from_utf8(b)
                .unwrap()
                .replace("https://controller.example:7443", "https://127.0.0.1:1")
                .replace("/etc/lifeboat/pki/ca.pem", &scratch.path("ca.pem").to_string_lossy())
                .replace("/etc/lifeboat/pki/client-alice.pem", &scratch.path("client-fuzz.pem").to_string_lossy())
                .replace("/etc/lifeboat/pki/client-alice.key", &scratch.path("client-fuzz.key").to_string_lossy())
        })
        .collect();
    const TABLES: &[&str] = &["controller"];
    const KEYS: &[&str] = &["controller", "server_name", "ca", "cert", "key"];
    let file = scratch.path("cli.toml");
    // the seeds themselves get as far as the (absent) controller: exit 3
    for s in &seeds {
        std::fs::write(&file, s).unwrap();
        let r = lifeboat(
            &["--config".into(), file.clone().into(), "--timeout".into(), "3".into(), "whoami".into()],
            &scratch.0,
        );
        assert_eq!(r.code, Some(3), "seed config: {r:?}");
    }
    let strategy = (0..seeds.len(), proptest::collection::vec(mutations::edit(TABLES, KEYS), 1..4));
    harness::run("cli_config", 32, strategy, |(i, edits)| {
        let mut text = seeds[i].clone();
        for e in &edits {
            mutations::apply(&mut text, e);
        }
        std::fs::write(&file, &text).unwrap();
        let args: Vec<OsString> =
            vec!["--config".into(), file.clone().into(), "--timeout".into(), "3".into(), "whoami".into()];
        let r = lifeboat(&args, &scratch.0);
        check_run(&r)?;
        if r.stderr.contains("invalid CLI config") || r.stderr.contains("cannot read CLI config") {
            prop_assert_eq!(r.code, Some(2), "{:?}", r);
            prop_assert!(r.stderr.contains(&*file.to_string_lossy()), "refusal does not name the file: {}", r.stderr);
        }
        Ok(())
    });
}
