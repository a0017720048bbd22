//! Fencing drivers against a REAL Redfish BMC emulator (sushy-tools, fake
//! driver), one emulator per test on 127.0.0.1 with a random port, HTTPS with
//! a throwaway CA and basic authentication.
//!
//! sushy-tools lives in a venv (`scripts/install-deps.sh` makes it at
//! `/opt/lifeboat-lab/venv`, or `$LAB_VENV`). Without it these tests print
//! why and pass, except under CI (`CI` set), where they fail: CI installs it.
//!
//! The fake driver applies a power change 1–11 s after the request, and only
//! when the system is read: the drivers' poll loops drive it, so the slow tests
//! take up to ~12 s each.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lifeboat_common::pki::{self, Leaf};
use lifeboat_controller::fence::{BmcConfig, FenceEvent, Fencer, PowerState};

const USER: &str = "lifeboat";
const PASSWORD: &str = "Fence-Test-Pw-41";

fn venv() -> PathBuf {
    PathBuf::from(std::env::var("LAB_VENV").unwrap_or_else(|_| "/opt/lifeboat-lab/venv".into()))
}

/// Some(reason) when the emulator (or the agent) is not installed: the test is
/// skipped, except under CI where that is a failure.
fn missing(what: &[&Path]) -> Option<String> {
    let gone: Vec<String> = what.iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    if gone.is_empty() {
        return None;
    }
    let reason = format!("{} missing (run scripts/install-deps.sh as root)", gone.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("under CI the fencing tests must run, but {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    Some(reason)
}

fn sushy_missing() -> bool {
    let v = venv();
    missing(&[&v.join("bin/sushy-emulator"), &v.join("bin/python")]).is_some()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Options of one emulator.
#[derive(Default)]
struct EmuOpts {
    starts_off: bool,
    disable_power_off: bool,
}

/// One sushy-emulator process with its own CA, certificate, htpasswd and state dir.
struct Emulator {
    dir: tempfile::TempDir,
    port: u16,
    uuid: String,
    child: Child,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    fn start(opts: EmuOpts) -> Emulator {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // throwaway CA + server certificate (SANs include 127.0.0.1)
        pki::init(d).unwrap();
        let (cert, key) = pki::issue(d, d, &Leaf::Controller(vec![])).unwrap();
        // htpasswd with a bcrypt hash (sushy accepts nothing else); cost 4 keeps requests fast
        let out = Command::new(venv().join("bin/python"))
            .args([
                "-c",
                "import bcrypt,sys; print(bcrypt.hashpw(sys.argv[1].encode(), bcrypt.gensalt(rounds=4)).decode())",
                PASSWORD,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "bcrypt: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(d.join("htpasswd"), format!("{USER}:{}", String::from_utf8(out.stdout).unwrap())).unwrap();
        write_private(&d.join("good.cred"), &format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"\n"));
        write_private(&d.join("bad.cred"), &format!("username = \"{USER}\"\npassword = \"not-the-password\"\n"));
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut last_log = String::new();
        // One emulator starts at a time: two tests picking the same free port
        // before either listens would otherwise both see it answer, and one
        // would talk to the other's emulator (until that one is gone).
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        for _attempt in 0..3 {
            let port = free_port();
            let state_dir = d.join(format!("state-{port}"));
            let conf = d.join("emulator.conf");
            std::fs::write(
                &conf,
                format!(
                    "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
                     SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
                     SUSHY_EMULATOR_SSL_CERT = '{cert}'\n\
                     SUSHY_EMULATOR_SSL_KEY = '{key}'\n\
                     SUSHY_EMULATOR_AUTH_FILE = '{auth}'\n\
                     SUSHY_EMULATOR_STATE_DIR = '{state}'\n\
                     SUSHY_EMULATOR_FAKE_DRIVER = True\n\
                     SUSHY_EMULATOR_DISABLE_POWER_OFF = {disable}\n\
                     SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '{uuid}', 'name': 'test-host', 'power_state': '{power}', \
                     'nics': [{{'mac': '52:54:00:aa:bb:cc', 'ip': '127.0.0.2'}}]}}]\n",
                    cert = cert.display(),
                    key = key.display(),
                    auth = d.join("htpasswd").display(),
                    state = state_dir.display(),
                    disable = if opts.disable_power_off { "True" } else { "False" },
                    power = if opts.starts_off { "Off" } else { "On" },
                ),
            )
            .unwrap();
            let log_path = d.join(format!("emulator-{port}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(venv().join("bin/sushy-emulator"))
                .arg("--config")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Emulator { dir, port, uuid, child };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log.clear();
                    std::fs::File::open(&log_path).unwrap().read_to_string(&mut last_log).unwrap();
                    break; // port taken meanwhile? try another one
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        panic!("sushy-emulator did not start:\n{last_log}");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn redfish(&self, cred: &str, timeout_s: u64) -> BmcConfig {
        BmcConfig::Redfish {
            url: format!("https://127.0.0.1:{}", self.port),
            system_id: self.uuid.clone(),
            credentials_file: self.path(cred),
            ca: Some(self.path("ca.pem")),
            power_off_timeout_s: timeout_s,
            poll_interval_ms: 200,
        }
    }

    fn fence_redfish(&self, password: &str, timeout_s: u64) -> BmcConfig {
        let options: BTreeMap<String, String> = [
            ("ip", "127.0.0.1".to_string()),
            ("ipport", self.port.to_string()),
            ("username", USER.to_string()),
            ("password", password.to_string()),
            ("ssl_insecure", "1".to_string()),
            ("systems_uri", format!("/redfish/v1/Systems/{}", self.uuid)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        BmcConfig::FenceAgent {
            agent: "fence_redfish".into(),
            options,
            env: BTreeMap::new(),
            power_off_timeout_s: timeout_s,
            poll_interval_ms: 500,
        }
    }
}

fn fencer(cfg: &BmcConfig) -> Fencer {
    Fencer::new("test-host", cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn dump(log: &[FenceEvent]) -> String {
    log.iter().map(|e| format!("  {} {} -> {}\n", e.at_ms, e.request, e.answer)).collect()
}

/// No event may carry a password.
fn assert_no_password(log: &[FenceEvent]) {
    for e in log {
        for secret in [PASSWORD, "not-the-password"] {
            assert!(!e.request.contains(secret) && !e.answer.contains(secret), "password in the log: {e:?}");
        }
    }
}

fn unknown_reason(s: PowerState, log: &[FenceEvent]) -> String {
    match s {
        PowerState::Unknown(r) => {
            eprintln!("Unknown: {r}");
            r
        }
        other => panic!("expected Unknown, got {other:?}\n{}", dump(log)),
    }
}

#[tokio::test]
async fn redfish_reads_on_then_powers_off() {
    if sushy_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts::default());
    let f = fencer(&emu.redfish("good.cred", 30));
    let mut log = Vec::new();
    assert_eq!(f.power_state(&mut log).await, PowerState::On, "{}", dump(&log));
    let t = Instant::now();
    let s = f.power_off(&mut log).await;
    let took = t.elapsed();
    eprintln!("redfish power_off -> {s:?} in {took:?}\n{}", dump(&log));
    assert_eq!(s, PowerState::Off, "{}", dump(&log));
    assert_eq!(f.power_state(&mut log).await, PowerState::Off);
    assert!(
        log.iter()
            .any(|e| e.request.starts_with("POST ") && e.request.contains("ForceOff") && e.answer.contains("HTTP 204")),
        "{}",
        dump(&log)
    );
    assert!(log.iter().any(|e| e.request.starts_with("GET ") && e.answer.contains("PowerState=On")), "{}", dump(&log));
    // already off: a read says so, nothing is sent
    let before = log.len();
    assert_eq!(f.power_off(&mut log).await, PowerState::Off);
    assert!(!log[before..].iter().any(|e| e.request.starts_with("POST")), "{}", dump(&log));
    assert_no_password(&log);
    assert!(took < Duration::from_secs(25), "power_off took {took:?}");
}

#[tokio::test]
async fn redfish_powers_on() {
    if sushy_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts { starts_off: true, ..Default::default() });
    let f = fencer(&emu.redfish("good.cred", 30));
    let mut log = Vec::new();
    assert_eq!(f.power_state(&mut log).await, PowerState::Off);
    let t = Instant::now();
    let s = f.power_on(&mut log).await;
    eprintln!("redfish power_on -> {s:?} in {:?}", t.elapsed());
    assert_eq!(s, PowerState::On, "{}", dump(&log));
    assert_no_password(&log);
}

#[tokio::test]
async fn redfish_power_off_refused_is_not_off() {
    if sushy_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts { disable_power_off: true, ..Default::default() });
    let f = fencer(&emu.redfish("good.cred", 10));
    let mut log = Vec::new();
    let t = Instant::now();
    let r = unknown_reason(f.power_off(&mut log).await, &log);
    assert!(
        r.contains("refused ForceOff") && r.contains("HTTP 400") && r.contains("SUSHY_EMULATOR_DISABLE_POWER_OFF"),
        "{r}"
    );
    assert!(r.contains("read On"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(5), "a refusal must not wait for the timeout");
    assert_eq!(f.power_state(&mut log).await, PowerState::On);
    assert_no_password(&log);
}

#[tokio::test]
async fn redfish_wrong_password_is_unknown() {
    if sushy_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts::default());
    let bad = fencer(&emu.redfish("bad.cred", 10));
    let mut log = Vec::new();
    let r = unknown_reason(bad.power_state(&mut log).await, &log);
    let cred = emu.path("bad.cred").display().to_string();
    assert!(r.contains("rejected the credentials") && r.contains(&cred) && r.contains("HTTP 401"), "{r}");
    let r = unknown_reason(bad.power_off(&mut log).await, &log);
    assert!(r.contains("rejected the credentials"), "{r}");
    assert_no_password(&log);
    // nothing happened to the system: it still reads On with the right password,
    // and keeps reading On (no pending power change)
    let good = fencer(&emu.redfish("good.cred", 10));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(good.power_state(&mut log).await, PowerState::On);
    // an unreadable credentials file at run time is Unknown too
    std::fs::remove_file(emu.path("good.cred")).unwrap();
    let r = unknown_reason(good.power_state(&mut log).await, &log);
    assert!(r.contains("cannot read credentials file") && r.contains("good.cred"), "{r}");
}

#[tokio::test]
async fn redfish_unreachable_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path()).unwrap();
    write_private(&dir.path().join("c.cred"), "username = \"a\"\npassword = \"b-secret\"\n");
    let port = free_port(); // nobody listens there any more
    let cfg = BmcConfig::Redfish {
        url: format!("https://127.0.0.1:{port}"),
        system_id: "1".into(),
        credentials_file: dir.path().join("c.cred"),
        ca: Some(dir.path().join("ca.pem")),
        power_off_timeout_s: 2,
        poll_interval_ms: 200,
    };
    let f = fencer(&cfg);
    let mut log = Vec::new();
    let r = unknown_reason(f.power_state(&mut log).await, &log);
    assert!(
        r.contains(&format!("BMC https://127.0.0.1:{port} unreachable"))
            && r.to_lowercase().contains("connection refused"),
        "{r}"
    );
    let t = Instant::now();
    let r = unknown_reason(f.power_off(&mut log).await, &log);
    assert!(r.contains("unreachable"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(5), "bounded by power_off_timeout_s: {:?}", t.elapsed());
    assert!(log.iter().all(|e| !e.answer.contains("b-secret")));
}

#[tokio::test]
async fn redfish_untrusted_certificate_is_unknown() {
    if sushy_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts::default());
    let other = tempfile::tempdir().unwrap();
    pki::init(other.path()).unwrap();
    let mut cfg = emu.redfish("good.cred", 10);
    if let BmcConfig::Redfish { ca, .. } = &mut cfg {
        *ca = Some(other.path().join("ca.pem"));
    }
    let mut log = Vec::new();
    let r = unknown_reason(fencer(&cfg).power_state(&mut log).await, &log);
    assert!(r.starts_with("TLS with BMC") && r.contains("ca.pem"), "{r}");
    // no `ca`: the system roots do not know the throwaway CA either
    if let BmcConfig::Redfish { ca, .. } = &mut cfg {
        *ca = None;
    }
    let r = unknown_reason(fencer(&cfg).power_state(&mut log).await, &log);
    assert!(r.starts_with("TLS with BMC") && r.contains("system's root certificates"), "{r}");
    // a wrong system id is named
    let mut cfg = emu.redfish("good.cred", 10);
    if let BmcConfig::Redfish { system_id, .. } = &mut cfg {
        *system_id = "no-such-system".into();
    }
    let r = unknown_reason(fencer(&cfg).power_state(&mut log).await, &log);
    assert!(r.contains("no system 'no-such-system'") && r.contains("HTTP 404"), "{r}");
}

#[test]
fn config_errors_name_host_file_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path()).unwrap();
    let cred = dir.path().join("h.cred");
    write_private(&cred, "username = \"a\"\npassword = \"b\"\n");
    let base = |url: &str, cred: PathBuf, ca: Option<PathBuf>| BmcConfig::Redfish {
        url: url.into(),
        system_id: "1".into(),
        credentials_file: cred,
        ca,
        power_off_timeout_s: 30,
        poll_interval_ms: 500,
    };
    let err = |cfg: BmcConfig| Fencer::new("host-q", &cfg).err().expect("must be refused").to_string();
    assert!(Fencer::new("host-q", &base("https://10.1.2.3", cred.clone(), Some(dir.path().join("ca.pem")))).is_ok());

    let e = err(base("http://10.1.2.3", cred.clone(), None));
    assert!(e.contains("host-q") && e.contains("use https"), "{e}");
    let e = err(base("https://10.1.2.3", dir.path().join("missing.cred"), None));
    assert!(e.contains("host-q") && e.contains("missing.cred") && e.contains("cannot read"), "{e}");
    std::fs::write(dir.path().join("bad.cred"), "username = \"a\"\npasswd = \"zzz-secret\"\n").unwrap();
    let e = err(base("https://10.1.2.3", dir.path().join("bad.cred"), None));
    assert!(e.contains("bad.cred") && !e.contains("zzz-secret"), "{e}");
    std::fs::write(dir.path().join("bad-ca.pem"), "not a certificate\n").unwrap();
    let e = err(base("https://10.1.2.3", cred.clone(), Some(dir.path().join("bad-ca.pem"))));
    assert!(e.contains("bad-ca.pem") && e.contains("CERTIFICATE"), "{e}");
    let e = err(base("https://10.1.2.3", cred.clone(), Some(dir.path().join("none.pem"))));
    assert!(e.contains("none.pem"), "{e}");

    let agent = |name: &str| BmcConfig::FenceAgent {
        agent: name.into(),
        options: BTreeMap::new(),
        env: BTreeMap::new(),
        power_off_timeout_s: 30,
        poll_interval_ms: 500,
    };
    let e = err(agent("fence_does_not_exist"));
    assert!(e.contains("host-q") && e.contains("fence_does_not_exist") && e.contains("not found"), "{e}");
    let e = err(agent("/nonexistent/fence_x"));
    assert!(e.contains("/nonexistent/fence_x"), "{e}");
}

fn fence_redfish_missing() -> bool {
    let found = ["/usr/sbin/fence_redfish", "/sbin/fence_redfish", "/usr/bin/fence_redfish"]
        .iter()
        .any(|p| Path::new(p).exists());
    if found {
        return false;
    }
    missing(&[Path::new("/usr/sbin/fence_redfish")]).is_some()
}

#[tokio::test]
async fn fence_agent_redfish_status_and_off() {
    if sushy_missing() || fence_redfish_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts::default());
    let f = fencer(&emu.fence_redfish(PASSWORD, 40));
    let mut log = Vec::new();
    assert_eq!(f.power_state(&mut log).await, PowerState::On, "{}", dump(&log));
    let t = Instant::now();
    let s = f.power_off(&mut log).await;
    let took = t.elapsed();
    eprintln!("fence_redfish power_off -> {s:?} in {took:?}\n{}", dump(&log));
    assert_eq!(s, PowerState::Off, "{}", dump(&log));
    assert_eq!(f.power_state(&mut log).await, PowerState::Off);
    assert!(
        log.iter().any(|e| e.request.starts_with("fence_redfish action=off") && e.request.contains("password=***")),
        "{}",
        dump(&log)
    );
    assert!(
        log.iter().any(|e| e.request.starts_with("fence_redfish action=status") && e.answer.starts_with("exit 2")),
        "{}",
        dump(&log)
    );
    assert_no_password(&log);

    // a wrong password: the agent fails, the state is Unknown (never Off)
    let bad = fencer(&emu.fence_redfish("not-the-password", 10));
    let r = unknown_reason(bad.power_state(&mut log).await, &log);
    assert!(r.contains("fence_redfish") && r.contains("exit code 1"), "{r}");
    assert_no_password(&log);
}

#[tokio::test]
async fn fence_agent_redfish_verifies_the_bmc_certificate_with_the_ca_from_env() {
    if sushy_missing() || fence_redfish_missing() {
        return;
    }
    let emu = Emulator::start(EmuOpts::default());
    let verified = |env: BTreeMap<String, String>| {
        let BmcConfig::FenceAgent { agent, mut options, power_off_timeout_s, poll_interval_ms, .. } =
            emu.fence_redfish(PASSWORD, 10)
        else {
            unreachable!()
        };
        options.remove("ssl_insecure");
        options.insert("ssl_secure".into(), "1".into());
        fencer(&BmcConfig::FenceAgent { agent, options, env, power_off_timeout_s, poll_interval_ms })
    };
    // The emulator's certificate is signed by the test CA, which the system
    // does not trust: without it the agent cannot verify the BMC (Unknown).
    let mut log = Vec::new();
    let r = unknown_reason(verified(BTreeMap::new()).power_state(&mut log).await, &log);
    assert!(r.contains("fence_redfish"), "{r}");
    let ca = emu.path("ca.pem").to_str().unwrap().to_string();
    let env: BTreeMap<String, String> = [("REQUESTS_CA_BUNDLE".to_string(), ca.clone())].into_iter().collect();
    let mut log = Vec::new();
    assert_eq!(verified(env).power_state(&mut log).await, PowerState::On, "{}", dump(&log));
    assert!(log.iter().all(|e| !e.request.contains(&ca)), "the environment is not logged: {}", dump(&log));
    assert_no_password(&log);

    // A name that is not a portable variable name is refused at load.
    let bad: BTreeMap<String, String> = [("A=B".to_string(), "x".to_string())].into_iter().collect();
    let BmcConfig::FenceAgent { agent, options, .. } = emu.fence_redfish(PASSWORD, 10) else { unreachable!() };
    let e = Fencer::new(
        "host-q",
        &BmcConfig::FenceAgent { agent, options, env: bad, power_off_timeout_s: 10, poll_interval_ms: 500 },
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("env 'A=B'"), "{e}");
}

#[tokio::test]
async fn fence_agent_unreachable_is_unknown() {
    if fence_redfish_missing() {
        return;
    }
    let port = free_port();
    let options: BTreeMap<String, String> = [
        ("ip", "127.0.0.1".to_string()),
        ("ipport", port.to_string()),
        ("username", "x".to_string()),
        ("password", "y-secret".to_string()),
        ("ssl_insecure", "1".to_string()),
        ("systems_uri", "/redfish/v1/Systems/1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let f = fencer(&BmcConfig::FenceAgent {
        agent: "fence_redfish".into(),
        options,
        env: BTreeMap::new(),
        power_off_timeout_s: 5,
        poll_interval_ms: 200,
    });
    let mut log = Vec::new();
    let r = unknown_reason(f.power_state(&mut log).await, &log);
    assert!(r.contains("exit code 1"), "{r}");
    let r = unknown_reason(f.power_off(&mut log).await, &log);
    assert!(r.contains("action=off"), "{r}");
    assert!(log.iter().all(|e| !e.request.contains("y-secret") && !e.answer.contains("y-secret")));
}

#[tokio::test]
async fn redfish_silent_bmc_times_out() {
    // accepts TCP connections and never answers (a hung BMC)
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(4) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path()).unwrap();
    write_private(&dir.path().join("c.cred"), "username = \"a\"\npassword = \"b\"\n");
    let cfg = BmcConfig::Redfish {
        url: format!("https://127.0.0.1:{port}"),
        system_id: "1".into(),
        credentials_file: dir.path().join("c.cred"),
        ca: Some(dir.path().join("ca.pem")),
        power_off_timeout_s: 1,
        poll_interval_ms: 200,
    };
    let mut log = Vec::new();
    let t = Instant::now();
    let r = unknown_reason(fencer(&cfg).power_state(&mut log).await, &log);
    let took = t.elapsed();
    assert!(r.contains("did not answer in time"), "{r}");
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(11), "{took:?}");
    drop(holder);
}

/// `lifeboat-controller --check-config` makes the same BMC checks as a start:
/// a bad `[bmc.HOST]` section fails it, naming the host and what is wrong.
#[test]
fn check_config_refuses_a_bad_bmc_section() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki::init(d).unwrap();
    let (cert, key) = pki::issue(d, d, &Leaf::Controller(vec![])).unwrap();
    let check = |bmc: &str| {
        let cfg = d.join("controller.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"{db}\"\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{bmc}",
                db = d.join("c.db").display(),
                ca = d.join("ca.pem").display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        if !d.join("c.db").exists() {
            let out = Command::new(env!("CARGO_BIN_EXE_lifeboat-controller"))
                .arg("--config")
                .arg(&cfg)
                .arg("init")
                .output()
                .unwrap();
            assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_lifeboat-controller"))
            .arg("--config")
            .arg(&cfg)
            .arg("--check-config")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let agent = |name: &str, env: &str| {
        format!(
            "[bmc.kvm03]\ndriver = \"fence_agent\"\nagent = \"{name}\"\noptions = {{ ip = \"10.0.0.3\" }}\nenv = {{ {env} }}\n"
        )
    };
    let (code, out) = check(&agent("/bin/true", "REQUESTS_CA_BUNDLE = \"/etc/lifeboat/bmc/ca.pem\""));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration OK"), "{out}");
    let (code, out) = check(&agent("/bin/true", "\"A=B\" = \"x\""));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("kvm03") && out.contains("env 'A=B'"), "{out}");
    let (code, out) = check(&agent("/nonexistent/fence_x", ""));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("kvm03") && out.contains("/nonexistent/fence_x"), "{out}");
    let (code, out) = check(&format!(
        "[bmc.kvm01]\ndriver = \"redfish\"\nurl = \"https://10.0.0.1\"\nsystem_id = \"1\"\ncredentials_file = \"{}\"\n",
        d.join("missing.cred").display()
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("kvm01") && out.contains("missing.cred"), "{out}");
}
