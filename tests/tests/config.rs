//! Configuration, files and secrets, end to end: the real binaries'
//! `--check-config` on each bad configuration (exit 2, the problem named)
//! and on a good one (exit 0); `init` then a start; database, WAL and backup
//! files owner-only; a viewer's definitions without graphics passwords.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};
use lifeboat_e2e::{Agent, Controller, Pki, agent_config, wait_for};
use lifeboat_proto::v1::ListGuestsRequest;

/// A binary of this workspace (`cargo build --bins`); None (test skipped)
/// when it is not built, a failure under CI.
fn bin(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug").join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{} is not built (cargo build --bins)", p.display());
    eprintln!("SKIPPED: {} is not built (cargo build --bins)", p.display());
    None
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("run binary");
    (status.code(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Ctl {
    exe: PathBuf,
    dir: PathBuf,
}

impl Ctl {
    fn write(&self, name: &str, listen: &str, db: &Path, ca: &Path, cert: &Path, key: &Path) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(
            &p,
            format!("listen = \"{listen}\"\ndatabase = {db:?}\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n"),
        )
        .unwrap();
        p
    }

    fn run(&self, cfg: &Path, args: &[&str]) -> (Option<i32>, String, String) {
        run(Command::new(&self.exe).arg("--config").arg(cfg).args(args).env_remove("LIFEBOAT_CONTROLLER_CONFIG"))
    }

    /// `--check-config` must exit 2 with every one of `want` in its message.
    fn refuses(&self, case: &str, cfg: &Path, want: &[&str]) {
        let (code, out, err) = self.run(cfg, &["--check-config"]);
        println!("{case}: exit {code:?}: {}", err.trim());
        assert_eq!(code, Some(2), "{case}: {out}{err}");
        for w in want {
            assert!(err.contains(w), "{case}: '{w}' not in: {err}");
        }
        assert!(!out.contains("configuration OK"), "{case}: {out}");
    }
}

#[test]
fn controller_check_config_names_each_problem_and_init_then_start_works() {
    let Some(exe) = bin("lifeboat-controller") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pki");
    Pki::new(&p);
    let other = tmp.path().join("other-ca");
    Pki::new(&other);
    pki::issue(&p, &p, &Leaf::Client("ann".into(), Role::Operator)).unwrap();
    pki::issue(&p, &p, &Leaf::Agent("host-a".into())).unwrap();
    let ctl = Ctl { exe, dir: tmp.path().to_path_buf() };
    let dbdir = tmp.path().join("var");
    std::fs::create_dir(&dbdir).unwrap();
    let db = dbdir.join("controller.db");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (ca, cert, key) = (p.join("ca.pem"), p.join("controller.pem"), p.join("controller.key"));
    let good = ctl.write("good.toml", &listen, &db, &ca, &cert, &key);

    // No database yet: a start and a check refuse and say how to create one; neither creates it.
    ctl.refuses("database missing", &good, &["does not exist", "init", "typo"]);
    let (code, _, err) = ctl.run(&good, &[]);
    assert_eq!(code, Some(2), "a start never creates an empty database: {err}");
    assert!(!db.exists());
    let (code, out, err) = ctl.run(&good, &["init"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(mode(&db), 0o600, "init creates the database owner-only");
    let (code, _, err) = ctl.run(&good, &["init"]);
    assert!(code == Some(2) && err.contains("already exists"), "init never overwrites: {err}");
    let (code, out, err) = ctl.run(&good, &["--check-config"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("configuration OK"), "{out}");

    // Each problem, one at a time.
    let typo = tmp.path().join("vra/controller.db");
    ctl.refuses(
        "database directory missing",
        &ctl.write("c1.toml", &listen, &typo, &ca, &cert, &key),
        &["vra", "does not exist"],
    );
    assert!(!typo.parent().unwrap().exists());
    ctl.refuses(
        "database is a directory",
        &ctl.write("c2.toml", &listen, &dbdir, &ca, &cert, &key),
        &["is a directory"],
    );
    ctl.refuses(
        "key of another certificate",
        &ctl.write("c3.toml", &listen, &db, &ca, &cert, &p.join("agent-host-a.key")),
        &["does not belong to certificate"],
    );
    ctl.refuses(
        "operator's certificate as the controller's",
        &ctl.write("c4.toml", &listen, &db, &ca, &p.join("client-ann.pem"), &p.join("client-ann.key")),
        &["operator 'ann'", "needs a controller certificate"],
    );
    ctl.refuses(
        "agent's certificate as the controller's",
        &ctl.write("c5.toml", &listen, &db, &ca, &p.join("agent-host-a.pem"), &p.join("agent-host-a.key")),
        &["agent certificate of host 'host-a'"],
    );
    ctl.refuses(
        "certificate of another CA",
        &ctl.write("c6.toml", &listen, &db, &other.join("ca.pem"), &cert, &key),
        &["not signed by this CA"],
    );
    {
        let held = std::net::TcpListener::bind(&listen).unwrap();
        ctl.refuses("port in use", &good, &[&format!("listen = \"{listen}\""), "already running"]);
        drop(held);
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    ctl.refuses("key readable by others", &good, &[&format!("chmod 600 {}", key.display()), "0644"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A start: the real binary serves, its files are owner-only, and so is a backup.
    let mut child = Command::new(&ctl.exe)
        .arg("--config")
        .arg(&good)
        .env_remove("LIFEBOAT_CONTROLLER_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(&listen).is_err() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the controller exited at start: {s}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the controller does not listen on {listen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let backup = tmp.path().join("backup.db");
    let (code, out, err) = ctl.run(&good, &["backup", "--out", backup.to_str().unwrap()]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(code, Some(0), "{out}{err}");
    for f in [
        db.clone(),
        dbdir.join("controller.db-wal"),
        dbdir.join("controller.db-shm"),
        dbdir.join("controller.db.lock"),
        backup,
    ] {
        if f.exists() {
            assert_eq!(mode(&f), 0o600, "{} must be owner-only", f.display());
            println!("{}: {:o}", f.display(), mode(&f));
        }
    }
    assert!(dbdir.join("controller.db-wal").exists(), "WAL mode: the WAL was checked");
}

#[test]
fn agent_check_config_and_start_exit_2_on_each_problem() {
    let Some(exe) = bin("lifeboat-agent") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let a = pki.agent("host-a");
    let agent = |name: &str, text: String, args: &[&str]| {
        let cfg = tmp.path().join(name);
        std::fs::write(&cfg, text).unwrap();
        run(Command::new(&exe).arg("--config").arg(&cfg).args(args).env_remove("LIFEBOAT_AGENT_CONFIG"))
    };
    let url = format!("https://127.0.0.1:{}", free_port());
    let (code, out, err) =
        agent("good.toml", agent_config("host-a", "test:///default", &url, &a, ""), &["check-config"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("configuration OK (host id host-a)"), "{out}");

    let mut missing = a.clone();
    missing.cert = tmp.path().join("pki/agent-missing.pem");
    for args in [&["check-config"][..], &[][..]] {
        let (code, _, err) = agent("missing.toml", agent_config("host-a", "test:///default", &url, &missing, ""), args);
        assert_eq!(code, Some(2), "missing certificate, {args:?}: {err}");
        assert!(err.contains("cannot read certificate") && err.contains("agent-missing.pem"), "{err}");
    }
    let (code, _, err) =
        agent("other-host.toml", agent_config("host-b", "test:///default", &url, &a, ""), &["check-config"]);
    assert!(
        code == Some(2) && err.contains("host 'host-a'") && err.contains("--agent host-b"),
        "another host's certificate: {err}"
    );
    let (code, _, err) =
        agent("ctl.toml", agent_config("host-a", "test:///default", &url, &pki.controller(), ""), &["check-config"]);
    assert!(code == Some(2) && err.contains("controller's certificate"), "the controller's certificate: {err}");
    std::fs::set_permissions(&a.key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, err) = agent("mode.toml", agent_config("host-a", "test:///default", &url, &a, ""), &[]);
    assert!(code == Some(2) && err.contains("chmod 600"), "key readable by the group, at start: {err}");
}

fn fixture_with_graphics_password(dir: &Path) -> String {
    let src = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/host-a.xml")).unwrap();
    let with = src.replacen(
        "<interface type='bridge'><mac address='52:54:00:00:0a:01'/>",
        "<graphics type='vnc' port='-1' autoport='yes' passwd='vnc-s3cret'/><interface type='bridge'><mac address='52:54:00:00:0a:01'/>",
        1,
    );
    assert_ne!(src, with, "fixture changed: vm-a1 has no interface to put graphics before");
    let p = dir.join("host-a-graphics.xml");
    std::fs::write(&p, with).unwrap();
    format!("test://{}", p.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_definitions_without_graphics_passwords() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let c = Controller::start(&pki, &tmp.path().join("c.db"), 0, 1000, 3000).await;
    let agent = Agent::start(&agent_config(
        "host-a",
        &fixture_with_graphics_password(tmp.path()),
        &c.url(),
        &pki.agent("host-a"),
        "",
    ));
    let operator = c.admin(&pki.client("olga", Role::Operator)).await;
    let mut viewer = c.admin(&pki.client("vic", Role::Viewer)).await;
    let req = || ListGuestsRequest { vm: "vm-a1".into(), with_definitions: true, ..Default::default() };
    let (op_def, _) = wait_for(Duration::from_secs(10), "vm-a1 with its definition", || {
        let mut operator = operator.clone();
        async move {
            let gs = operator.list_guests(req()).await.ok()?.into_inner().guests;
            gs.into_iter().filter_map(|g| g.guest).map(|g| g.definition_xml).find(|d| !d.is_empty())
        }
    })
    .await;
    // The stored definition is whole (a migration defines the guest from it)...
    assert!(
        op_def.contains("passwd='vnc-s3cret'") || op_def.contains("passwd=\"vnc-s3cret\""),
        "the agent reads with the secure flag: {op_def}"
    );
    // ...and a viewer gets it without the password.
    let gs = viewer.list_guests(req()).await.unwrap().into_inner().guests;
    let v_def = gs.into_iter().filter_map(|g| g.guest).map(|g| g.definition_xml).next().unwrap();
    assert!(!v_def.contains("vnc-s3cret") && !v_def.contains("passwd"), "viewer got: {v_def}");
    assert!(v_def.contains("<graphics type=") && v_def.contains("<name>vm-a1</name>"), "the rest stays: {v_def}");
    // The CLI as a viewer: `vms show --xml` prints the definition without the password.
    if let Some(cli) = bin("lifeboat") {
        let vic = pki.client("vic", Role::Viewer);
        let (code, out, err) = run(Command::new(cli)
            .args(["--controller-url", &c.url(), "--ca"])
            .arg(&vic.ca)
            .arg("--cert")
            .arg(&vic.cert)
            .arg("--key")
            .arg(&vic.key)
            .args(["vms", "show", "vm-a1", "--xml"])
            .env_remove("LIFEBOAT_CONFIG"));
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("<graphics") && !out.contains("passwd") && !out.contains("vnc-s3cret"), "{out}");
    }
    agent.stop().await;
    c.stop().await;
}
