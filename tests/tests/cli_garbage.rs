//! The real `lifeboat` binary fed garbage: bad arguments, bad certificates
//! against a real in-process controller, and hostile texts stored in the
//! controller's database. Every case ends with a clear message and a
//! documented exit code, never 101 (panic) or 141 (SIGPIPE), and no raw
//! control character ever reaches the terminal.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lifeboat_common::identity::Role;
use lifeboat_common::tls::TlsFiles;
use lifeboat_e2e::{Controller, Pki};
use lifeboat_proto::v1::HostInfo;

/// The CLI binary; built by `cargo build -p lifeboat-cli` (scripts/test.sh).
fn cli() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lifeboat");
    assert!(p.exists(), "{} is not built: run `cargo build -p lifeboat-cli` first", p.display());
    p
}

/// One run: exit code, stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    raw_stdout: Vec<u8>,
}

fn run_with(tls: Option<(&str, &TlsFiles)>, args: &[&str]) -> Run {
    let mut cmd = Command::new(cli());
    cmd.env_remove("LIFEBOAT_CONFIG")
        .env_remove("LIFEBOAT_CONTROLLER")
        .env_remove("LIFEBOAT_CA")
        .env_remove("LIFEBOAT_CERT")
        .env_remove("LIFEBOAT_KEY")
        .env_remove("LIFEBOAT_SERVER_NAME")
        .env("LIFEBOAT_CONFIG", "/nonexistent/lifeboat-cli.toml")
        .stdin(Stdio::null());
    if let Some((url, t)) = tls {
        // An empty config file: no /etc/lifeboat/cli.toml of this machine.
        cmd.env_remove("LIFEBOAT_CONFIG");
        let empty = t.ca.parent().unwrap().join("empty-cli.toml");
        std::fs::write(&empty, "").unwrap();
        cmd.arg("--config").arg(&empty);
        cmd.args(["--controller-url", url, "--ca"]).arg(&t.ca).arg("--cert").arg(&t.cert).arg("--key").arg(&t.key);
    }
    let out = cmd.args(args).output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        raw_stdout: out.stdout,
    }
}

/// No byte a terminal would obey: C0 (except newline), DEL, C1, bidi controls.
fn assert_terminal_safe(what: &str, text: &str) {
    let bad: Vec<char> = text
        .chars()
        .filter(|c| {
            (c.is_control() && !matches!(c, '\n' | '\t'))
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    assert!(bad.is_empty(), "{what}: raw control characters {bad:?} in:\n{text}");
}

fn assert_no_crash(what: &str, r: &Run) {
    assert!(r.code.is_some(), "{what}: killed by a signal (SIGPIPE?)\nstderr: {}", r.stderr);
    assert!(!matches!(r.code, Some(101) | Some(141) | Some(70)), "{what}: exit {:?}\n{}{}", r.code, r.stdout, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
    assert_terminal_safe(what, &r.stdout);
    assert_terminal_safe(what, &r.stderr);
}

/// Arguments the CLI must refuse itself, before connecting: exit 2 with the
/// argument named and its accepted form.
#[test]
fn garbage_arguments_are_usage_errors() {
    let long = "v".repeat(100_000);
    let reason_long = "r".repeat(2049);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["log", "--since", "999999999999999d"], "--since"),
        (vec!["log", "--since=-5d"], "--since"),
        (vec!["log", "--since", "+5d"], "--since"),
        (vec!["log", "--since", "0s"], "--since"),
        (vec!["log", "--since", "5w"], "--since"),
        (vec!["log", "--since", "99999999999999999999999999s"], "--since"),
        (vec!["log", "--since", "1969-01-01T00:00:00Z"], "--since"),
        (vec!["log", "--since", ""], "--since"),
        (vec!["log", "--host", ""], "--host"),
        (vec!["log", "--vm", " "], "--vm"),
        (vec!["log", "--job", "\t"], "--job"),
        (vec!["vms", "list", "--host", ""], "--host"),
        (vec!["vms", "list", "--host", "   "], "--host"),
        (vec!["vms", "list", "--host", "a\u{1b}[2Jb"], "--host"),
        (vec!["vms", "show", ""], "<VM>"),
        (vec!["vms", "show", &long], "<VM>"),
        (vec!["vms", "show", "vm", "--host", ""], "--host"),
        (vec!["vms", "start", "vm", "--reason", ""], "--reason"),
        (vec!["vms", "start", "vm", "--reason", &reason_long], "--reason"),
        (vec!["vms", "restore", "vm", "--reason", "x\u{202e}y"], "--reason"),
        (vec!["vms", "restore", "vm", "--to", "", "--reason", "r"], "--to"),
        (vec!["vms", "forget", "vm\u{7}", "--reason", "r"], "<VM>"),
        (vec!["hosts", "show", ""], "<HOST>"),
        (vec!["hosts", "set-status", "host-a", "EXPLODED"], "<STATUS>"),
        (vec!["hosts", "set-status", "host-a", "OFFLINE", "--reason", ""], "--reason"),
        (vec!["--timeout", "0", "hosts", "list"], "--timeout"),
        (vec!["--timeout=-1", "hosts", "list"], "--timeout"),
        (vec!["--timeout", "86400", "hosts", "list"], "--timeout"),
        (vec!["--timeout", "18446744073709551616", "hosts", "list"], "--timeout"),
        (vec!["--controller-url", "", "hosts", "list"], "--controller-url"),
        (vec!["--controller-url", "http://c:7443", "hosts", "list"], "--controller-url"),
        (vec!["--server-name", "", "hosts", "list"], "--server-name"),
        (vec!["migrate", "--force", "--from", ""], "--from"),
        (vec!["migrate", "--force", "--from", "a", "--vm", ""], "--vm"),
        (vec!["migrate", "--force", "--from", "a", "--parallel", "0"], "--parallel"),
        (vec!["migrate", "--force", "--from", "a", "--parallel", "65"], "--parallel"),
        (vec!["migrate", "--force", "--from", "a", "--plan-id", " "], "--plan-id"),
        (vec!["move", "--vm", "v", "--from", "a", "--to", ""], "--to"),
        (vec!["cleanup", ""], "<HOST>"),
        (vec!["alarms", "clear", "--host", "h", "--kind", ""], "--kind"),
        (vec!["jobs", "show", ""], "<ID>"),
        (vec!["jobs", "watch", " "], "<ID>"),
        (vec!["jobs", "list", "--host", ""], "--host"),
        (vec!["certs", "issue", "--ca-dir", "/nonexistent", "--agent", ""], "--agent"),
        (vec!["dashboard"], "login"),
        (vec!["dashboard", "logon"], "logon"),
        (vec!["dashboard", "login", "extra"], "extra"),
        (vec!["dashboard", "login", "--output", "yaml"], "--output"),
        (vec!["dashboard", "login", "--timeout", "0"], "--timeout"),
        (vec!["dashboard", "login", "--token", "x"], "--token"),
        (vec!["dashboard", "end-sessions"], "--name"),
        (vec!["dashboard", "end-sessions", "--name", ""], "--name"),
        (vec!["dashboard", "end-sessions", "--name", "a\u{7}b"], "--name"),
        (vec!["dashboard", "end-sessions", "--name", "olga", "--all"], "--all"),
        (vec!["dashboard", "end-sessions", "--all", "extra"], "extra"),
    ];
    for (args, flag) in &cases {
        let r = run_with(None, args);
        let what = format!(
            "lifeboat {}",
            args.iter().map(|a| a.chars().take(40).collect::<String>()).collect::<Vec<_>>().join(" ")
        );
        assert_no_crash(&what, &r);
        assert_eq!(r.code, Some(2), "{what}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{what}: the message names {flag}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{what}: {}", r.stdout);
        assert!(
            r.stderr.len() < 4096,
            "{what}: a bounded message, not the 100,000-char value: {} bytes",
            r.stderr.len()
        );
    }
    // The ESC typed in an argument is shown escaped in clap's own message.
    let r = run_with(None, &["vms", "list", "--host", "a\u{1b}[2Jb"]);
    assert!(r.stderr.contains("\\x1b[2Jb"), "{}", r.stderr);
    // `migrate --to` the failed host itself, a check of the CLI's own.
    let r =
        run_with(None, &["--controller-url", "https://127.0.0.1:1", "migrate", "--force", "--from", "a", "--to", "a"]);
    assert_no_crash("migrate --to itself", &r);
    assert_ne!(r.code, Some(0));
}

/// Nothing to connect to: exit 3 with a message, also with the shortest
/// timeout, and the help and completions through a closed pipe end quietly.
#[test]
fn unreachable_controller_and_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let olga = pki.client("olga", Role::Operator);
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("https://127.0.0.1:{port}");
    let r = run_with(Some((&url, &olga)), &["--timeout", "1", "hosts", "list"]);
    assert_no_crash("unreachable", &r);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("cannot reach the controller"), "{}", r.stderr);

    // `lifeboat generate completions bash | head -1`: the reader leaves at once.
    for _ in 0..5 {
        let mut child = Command::new(cli())
            .args(["generate", "completions", "bash"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "a closed stdout ends quietly: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{stderr}");
    }
}

/// An `openssl ca` signed certificate for `name` with the given validity.
fn openssl_client(pki_dir: &Path, name: &str, start: &str, end: &str) -> TlsFiles {
    let d = pki_dir.join(format!("ossl-{name}"));
    std::fs::create_dir_all(d.join("new")).unwrap();
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("serial"), "1000\n").unwrap();
    let conf = format!(
        "[ca]\ndefault_ca = lb\n[lb]\ndir = {dir}\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/new\nserial = $dir/serial\n\
         default_md = sha256\npolicy = any\nunique_subject = no\ncopy_extensions = none\nx509_extensions = leaf\n\
         [any]\norganizationName = optional\norganizationalUnitName = optional\ncommonName = supplied\n\
         [leaf]\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = clientAuth\n",
        dir = d.display()
    );
    std::fs::write(d.join("ca.cnf"), conf).unwrap();
    let key = d.join("client.key");
    let csr = d.join("client.csr");
    let cert = d.join("client.pem");
    let ok = |c: &mut Command| {
        let out = c.output().unwrap_or_else(|e| panic!("openssl is needed for this test: {e}"));
        assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj"])
        .arg(format!("/O=lifeboat/OU=operator/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    ok(Command::new("openssl")
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(d.join("ca.cnf"))
        .args(["-startdate", start, "-enddate", end, "-cert"])
        .arg(pki_dir.join("ca.pem"))
        .arg("-keyfile")
        .arg(pki_dir.join("ca.key"))
        .arg("-in")
        .arg(&csr)
        .arg("-out")
        .arg(&cert));
    TlsFiles { ca: pki_dir.join("ca.pem"), cert, key }
}

/// Every certificate failure exits 4 with a TLS message, every time (the
/// bug was intermittent: SIGPIPE, exit 141, no output, in most runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_failures_exit_4_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let c = Controller::start(&pki, &dir.path().join("db.sqlite"), 0, 200, 2_000).await;
    let url = c.url();
    let olga = pki.client("olga", Role::Operator);

    // The good certificate works (so the failures below are the certificates').
    let good = {
        let (url, olga) = (url.clone(), olga.clone());
        tokio::task::spawn_blocking(move || run_with(Some((&url, &olga)), &["whoami"])).await.unwrap()
    };
    assert_eq!(good.code, Some(0), "{}{}", good.stdout, good.stderr);
    // A sign-in link from a controller whose dashboard is off: refused, and the message says what to set.
    let off = {
        let (url, olga) = (url.clone(), olga.clone());
        tokio::task::spawn_blocking(move || run_with(Some((&url, &olga)), &["dashboard", "login", "-o", "json"]))
            .await
            .unwrap()
    };
    assert_no_crash("dashboard login (dashboard off)", &off);
    assert_ne!(off.code, Some(0), "{}{}", off.stdout, off.stderr);
    assert!(off.stdout.is_empty() && off.stderr.contains("[dashboard] enabled = true"), "{}", off.stderr);

    // Expired: signed by the right CA, valid only in 2020.
    let expired = openssl_client(dir.path(), "old", "20200101000000Z", "20200201000000Z");
    // Foreign: a client certificate of another installation's CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::new(other_dir.path());
    let foreign_client = TlsFiles { ca: olga.ca.clone(), ..other.client("mallory", Role::Admin) };
    // Foreign CA bundle: we do not trust the controller's certificate.
    let foreign_ca = TlsFiles { ca: other.controller().ca, ..olga.clone() };

    let cases: Vec<(&str, TlsFiles, Vec<&str>, &str)> = vec![
        ("expired client certificate", expired, vec![], "certificate"),
        ("client certificate of a foreign CA", foreign_client, vec![], "certificate"),
        ("controller certificate from a foreign CA", foreign_ca, vec![], "not trusted"),
        ("wrong server name", olga.clone(), vec!["--server-name", "not-the-controller.example"], "not trusted"),
    ];
    let mut codes = Vec::new();
    for (what, tls, extra, needle) in &cases {
        for i in 0..10 {
            let (url, tls, extra) = (url.clone(), tls.clone(), extra.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            let r = tokio::task::spawn_blocking(move || {
                let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
                args.extend(["hosts", "list"]);
                run_with(Some((&url, &tls)), &args)
            })
            .await
            .unwrap();
            let what = format!("{what} (run {i})");
            assert_no_crash(&what, &r);
            assert_eq!(r.code, Some(4), "{what}: exit {:?}: {}", r.code, r.stderr);
            assert!(r.stderr.contains("certificate rejected") && r.stderr.contains(needle), "{what}: {}", r.stderr);
            if i == 0 {
                println!("{what}: {}", r.stderr.trim_end());
            }
            codes.push(r.stderr.contains("closed the connection right after"));
        }
    }
    let closed = codes.iter().filter(|c| **c).count();
    println!(
        "{} certificate failures, all exit 4 ({closed} seen as a closed connection, the rest as a TLS alert or error)",
        codes.len()
    );
    c.stop().await;
}

/// Minimal protobuf encoding of a `Guest` (the test crate has no prost):
/// a hostile row as a compromised agent's old report would have left it.
fn guest_bytes(uuid: &str, name: &str, state_reason: &str, disk_source: &str, error: &str) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(u8::try_from(v & 0x7f).unwrap() | 0x80);
            v >>= 7;
        }
        out.push(u8::try_from(v).unwrap());
    }
    fn bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
        varint(out, (field << 3) | 2);
        varint(out, u64::try_from(b.len()).unwrap());
        out.extend_from_slice(b);
    }
    let mut disk = Vec::new();
    bytes(&mut disk, 1, b"vda");
    bytes(&mut disk, 2, b"file");
    bytes(&mut disk, 3, disk_source.as_bytes());
    bytes(&mut disk, 4, b"disk");
    let mut g = Vec::new();
    bytes(&mut g, 1, uuid.as_bytes());
    bytes(&mut g, 2, name.as_bytes());
    varint(&mut g, 3 << 3);
    varint(&mut g, 5); // shutdown: any state; the texts are what matter
    bytes(&mut g, 4, state_reason.as_bytes());
    varint(&mut g, 8 << 3);
    varint(&mut g, 2);
    varint(&mut g, 9 << 3);
    varint(&mut g, 1_048_576);
    bytes(&mut g, 10, &disk);
    bytes(&mut g, 13, error.as_bytes());
    g
}

/// Hostile texts written straight into the controller's database (the
/// controller refuses them from agents now; older rows may hold them): every
/// table and text view shows them escaped, aligned, and never panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_texts_in_the_database_are_shown_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let db = dir.path().join("db.sqlite");
    // A guest row with control characters does not load: it is quarantined
    // (fail closed) and its alarm is what the CLI shows. Names libvirt
    // accepts with invisible formatting characters load and are shown escaped.
    let esc_name = "evil\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{202e}gpj.exe";
    let bidi_name = "evil\u{202e}gpj.exe\u{200f}";
    let huge_name = "g".repeat(255);
    let cjk_name = "数据库服务器-01";
    let host = "host-x";
    {
        let mut s = lifeboat_controller::store::Store::open(&db).unwrap();
        let info = HostInfo {
            host_id: host.into(),
            hostname: "node\u{1b}[31m\u{0}\u{202e}1".into(),
            libvirt_version: "10.0\u{1b}[2J".into(),
            agent_version: "9\u{9b}1m".into(),
            cpu_model: "cpu\u{1b}c".into(),
            boot_id: "b\u{1b}[H".into(),
            ..Default::default()
        };
        s.upsert_host(&info, lifeboat_common::now_unix_ms()).unwrap();
        let rows = [
            (
                "6f1c2c9e-0000-4000-8000-000000000001",
                bidi_name.to_string(),
                guest_bytes(
                    "6f1c2c9e-0000-4000-8000-000000000001",
                    bidi_name,
                    "r",
                    "/img/vm.qcow2",
                    "e AAAA\n\tqemu said",
                ),
            ),
            (
                "6f1c2c9e-0000-4000-8000-000000000004",
                esc_name.to_string(),
                guest_bytes(
                    "6f1c2c9e-0000-4000-8000-000000000004",
                    esc_name,
                    "r\u{1b}[1m",
                    "/img/\u{1b}[2J.qcow2",
                    "e\u{1b}]52;c;AAAA\u{7}",
                ),
            ),
            (
                "6f1c2c9e-0000-4000-8000-000000000002",
                huge_name.clone(),
                guest_bytes("6f1c2c9e-0000-4000-8000-000000000002", &huge_name, "", &"/d".repeat(2_000), ""),
            ),
            (
                "6f1c2c9e-0000-4000-8000-000000000003",
                cjk_name.to_string(),
                guest_bytes("6f1c2c9e-0000-4000-8000-000000000003", cjk_name, "", "/img/db.qcow2", ""),
            ),
        ];
        let up: Vec<(&str, &str, &[u8])> = rows.iter().map(|(u, n, b)| (*u, n.as_str(), b.as_slice())).collect();
        s.write_guests(host, &up, &[], lifeboat_common::now_unix_ms()).unwrap();
        s.raise_alarm(host, "kind\u{1b}[5m", "detail \u{1b}[2J\u{202e} and \u{85} next-line").unwrap();
        s.audit(&lifeboat_controller::store::AuditRow::by_controller(
            "act\u{1b}[1m",
            host,
            esc_name,
            format!("audit \u{1b}]0;title\u{7} \n forged line {huge_name}"),
        ))
        .unwrap();
    }
    let c = Controller::start(&pki, &db, 0, 200, 2_000).await;
    let url = c.url();
    let olga = pki.client("olga", Role::Operator);
    let run = |args: &'static [&'static str]| {
        let (url, olga) = (url.clone(), olga.clone());
        tokio::task::spawn_blocking(move || run_with(Some((&url, &olga)), args))
    };

    let list = run(&["vms", "list"]).await.unwrap();
    assert_no_crash("vms list", &list);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    println!("vms list:\n{}", list.stdout);
    assert!(list.stdout.contains("evil\\u{202e}gpj.exe\\u{200f}"), "{}", list.stdout);
    assert!(
        !list.stdout.contains("pwned"),
        "the row with control characters is quarantined, not listed: {}",
        list.stdout
    );
    assert!(list.stdout.contains(cjk_name), "{}", list.stdout);
    assert!(list.stdout.contains('…'), "the 255-byte name is cut: {}", list.stdout);
    assert!(list.stdout.len() < 4096, "{} bytes", list.stdout.len());
    // Aligned by display width: the HOST column starts at the same column on every row.
    let width = |s: &str| s.chars().map(|c| if ('\u{4e00}'..='\u{9fff}').contains(&c) { 2 } else { 1 }).sum::<usize>();
    let cols: Vec<usize> = list
        .stdout
        .lines()
        .map(|l| width(&l[..l.find(if l.starts_with("NAME") { "HOST" } else { host }).unwrap()]))
        .collect();
    assert!(cols.len() == 4 && cols.iter().all(|c| *c == cols[0]), "{cols:?}\n{}", list.stdout);

    let json = run(&["vms", "list", "-o", "json"]).await.unwrap();
    assert_eq!(json.code, Some(0), "{}", json.stderr);
    assert!(!json.raw_stdout.contains(&0x1b), "JSON escapes control characters itself");
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert!(names.contains(&bidi_name) && names.contains(&huge_name.as_str()), "JSON stays exact");
    assert!(!names.contains(&esc_name), "quarantined rows are not listed");

    for args in [
        &["vms", "show", "6f1c2c9e-0000-4000-8000-000000000001"][..],
        &["vms", "show", "6f1c2c9e-0000-4000-8000-000000000002"],
        &["hosts", "list"],
        &["hosts", "show", "host-x"],
        &["log"],
        &["log", "--since", "1h"],
        &["alarms", "--all"],
        &["jobs", "list"],
    ] {
        let r = run(args).await.unwrap();
        let what = args.join(" ");
        assert_no_crash(&what, &r);
        assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
        println!("{what}: {} bytes", r.stdout.len());
        if matches!(args[0], "hosts" | "log" | "alarms") {
            println!("{}", r.stdout.chars().take(1500).collect::<String>());
        }
    }
    let show = run(&["vms", "show", "6f1c2c9e-0000-4000-8000-000000000001"]).await.unwrap();
    assert!(
        show.stdout.contains("evil\\u{202e}gpj.exe\\u{200f}") && show.stdout.contains("e AAAA\\x0a\\x09qemu said"),
        "{}",
        show.stdout
    );
    let show = run(&["vms", "show", "6f1c2c9e-0000-4000-8000-000000000002"]).await.unwrap();
    assert!(show.stdout.contains(&huge_name), "show prints the full name");
    let hosts = run(&["hosts", "list"]).await.unwrap();
    assert!(
        hosts.stdout.contains("node\\x1b[31m\\x00\\u{202e}1") && hosts.stdout.contains("10.0\\x1b[2J"),
        "{}",
        hosts.stdout
    );
    let log = run(&["log"]).await.unwrap();
    assert!(log.stdout.contains("audit \\x1b]0;title\\x07 \\x0a forged line"), "{}", log.stdout);
    assert!(!log.stdout.lines().any(|l| l.starts_with(" forged line")), "a newline in a detail cannot forge a line");
    let alarms = run(&["alarms", "--all"]).await.unwrap();
    assert!(alarms.stdout.contains("detail \\x1b[2J\\u{202e} and \\u{0085} next-line"), "{}", alarms.stdout);
    assert!(alarms.stdout.contains("row-quarantined") && !alarms.raw_stdout.contains(&0x1b), "{}", alarms.stdout);

    // `vms show -o json` into a closed pipe: ends quietly.
    let mut child = Command::new(cli())
        .env("LIFEBOAT_CONFIG", dir.path().join("empty-cli.toml"))
        .args(["--controller-url", &url, "--ca"])
        .arg(&olga.ca)
        .arg("--cert")
        .arg(&olga.cert)
        .arg("--key")
        .arg(&olga.key)
        .args(["vms", "show", "6f1c2c9e-0000-4000-8000-000000000002", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    c.stop().await;
}
