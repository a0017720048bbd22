//! Test harness: a real controller (tonic, mutual TLS, SQLite) on
//! 127.0.0.1:0 and real agents against libvirt's test driver, all in one
//! process; plus helpers for the multi-host lab (`lab/lab.sh`).

#![forbid(unsafe_code)]

pub mod browser;
pub mod lab;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Leaf};
use lifeboat_common::tls::TlsFiles;
use lifeboat_proto::v1::admin_client::AdminClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// A CA and certificates in a temporary directory.
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
}

impl Pki {
    /// Creates a CA with a controller certificate.
    pub fn new(dir: &Path) -> Self {
        pki::init(dir).expect("CA");
        pki::issue(dir, dir, &Leaf::Controller(vec![])).expect("controller cert");
        Pki { dir: dir.to_path_buf() }
    }

    /// Issues (once) and returns an agent certificate for `host`.
    pub fn agent(&self, host: &str) -> TlsFiles {
        let cert = self.dir.join(format!("agent-{host}.pem"));
        if !cert.exists() {
            pki::issue(&self.dir, &self.dir, &Leaf::Agent(host.into())).expect("agent cert");
        }
        TlsFiles { ca: self.dir.join("ca.pem"), cert, key: self.dir.join(format!("agent-{host}.key")) }
    }

    /// Issues (once) and returns a client certificate.
    pub fn client(&self, name: &str, role: Role) -> TlsFiles {
        let cert = self.dir.join(format!("client-{name}.pem"));
        if !cert.exists() {
            pki::issue(&self.dir, &self.dir, &Leaf::Client(name.into(), role)).expect("client cert");
        }
        TlsFiles { ca: self.dir.join("ca.pem"), cert, key: self.dir.join(format!("client-{name}.key")) }
    }

    /// The controller's certificate files.
    pub fn controller(&self) -> TlsFiles {
        TlsFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("controller.pem"),
            key: self.dir.join("controller.key"),
        }
    }
}

/// A controller running in this process.
pub struct Controller {
    /// Its address.
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Controller {
    /// Starts a controller on 127.0.0.1:`port` (0 = any) with `db`.
    pub async fn start(pki: &Pki, db: &Path, port: u16, hb_ms: u32, unreachable_ms: u32) -> Self {
        Self::start_with(pki, db, port, hb_ms, unreachable_ms, "").await
    }

    /// Like [`Controller::start`], with extra top-level config lines.
    pub async fn start_with(pki: &Pki, db: &Path, port: u16, hb_ms: u32, unreachable_ms: u32, extra: &str) -> Self {
        Self::start_limited(pki, db, port, hb_ms, unreachable_ms, extra, None).await
    }

    /// Like [`Controller::start_with`], with the given connection limits
    /// (`None`: those of this process's descriptor limit).
    pub async fn start_limited(
        pki: &Pki,
        db: &Path,
        port: u16,
        hb_ms: u32,
        unreachable_ms: u32,
        extra: &str,
        limits: Option<lifeboat_controller::conn::Limits>,
    ) -> Self {
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = {db:?}\nheartbeat_interval_ms = {hb_ms}\nunreachable_after_ms = {unreachable_ms}\n{extra}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.controller().ca,
            pki.controller().cert,
            pki.controller().key
        );
        let cfg = lifeboat_controller::config::ControllerConfig::parse(&text, Path::new("test.toml")).expect("config");
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let limits = limits.unwrap_or_else(lifeboat_controller::conn::Limits::for_this_process);
        let task = tokio::spawn(lifeboat_controller::serve_with_limits(cfg, limits, listener, async {
            let _ = rx.await;
        }));
        Controller { addr, stop: Some(tx), task: Some(task) }
    }

    /// The URL agents and clients use.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops it and waits until it has flushed its database.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// An admin client with the given certificate.
    pub async fn admin(&self, tls: &TlsFiles) -> AdminClient<Channel> {
        lifeboat_common::tls::install_crypto_provider();
        let m = tls.load().expect("client tls");
        let ch = Endpoint::from_shared(self.url())
            .unwrap()
            .tls_config(m.client_config(pki::CONTROLLER_NAME))
            .unwrap()
            .connect()
            .await
            .expect("connect admin");
        AdminClient::new(ch)
    }
}

/// An agent running in this process.
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Agent configuration text for tests.
pub fn agent_config(host_id: &str, uri: &str, url: &str, tls: &TlsFiles, extra: &str) -> String {
    let state = tls.ca.parent().expect("pki dir").join(format!("state-{host_id}"));
    format!(
        "host_id = \"{host_id}\"\nlibvirt_uri = \"{uri}\"\nautostart_dir = \"/nonexistent/autostart\"\nresync_interval_s = 2\nstate_dir = {state:?}\n{extra}\n[controller]\nurl = \"{url}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca, tls.cert, tls.key
    )
}

impl Agent {
    /// Starts an agent from configuration text.
    pub fn start(config_text: &str) -> Self {
        let cfg = lifeboat_agent::config::AgentConfig::parse(config_text, Path::new("agent-test.toml"))
            .expect("agent config");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(lifeboat_agent::run_until(cfg, async {
            let _ = rx.await;
        }));
        Agent { stop: Some(tx), task: Some(task) }
    }

    /// Stops it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `limit`.
/// Returns the value and how long it took.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return (v, start.elapsed());
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the controller lists `n` guests (every agent's inventory arrived).
pub async fn wait_guest_count(op: &AdminClient<Channel>, n: usize) {
    wait_for(Duration::from_secs(10), "inventory", || {
        let mut op = op.clone();
        async move {
            let listed =
                op.list_guests(lifeboat_proto::v1::ListGuestsRequest::default()).await.ok()?.into_inner().guests.len();
            (listed == n).then_some(())
        }
    })
    .await;
}

/// A guest for a libvirt test-driver node file: 32 MiB, one file disk, one
/// bridged NIC; `runstate` as libvirt's state number (1 running, 5 shut off).
pub fn test_domain(name: &str, uuid: &str, disk: &str, mac: &str, runstate: u32) -> String {
    format!(
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>32</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>\
         <disk type='file' device='disk'><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <interface type='bridge'><mac address='{mac}'/><source bridge='br0'/></interface></devices>\
         <test:runstate>{runstate}</test:runstate></domain>"
    )
}

/// A test-driver node file (one simulated host) holding `domains`.
pub fn test_node(domains: &[String]) -> String {
    format!(
        "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads><mhz>2000</mhz>\
         <model>x86_64</model></cpu><memory>8388608</memory>{}</node>",
        domains.join("")
    )
}

/// Waits (at most `limit`) until job `id` has ended; returns it and the time taken.
pub async fn wait_job_end(
    admin: &AdminClient<Channel>,
    id: &str,
    limit: Duration,
) -> (lifeboat_proto::v1::JobRecord, Duration) {
    wait_for(limit, &format!("job {id} to end"), || {
        let mut a = admin.clone();
        let id = id.to_string();
        async move {
            let j = a.get_job(lifeboat_proto::v1::GetJobRequest { id }).await.ok()?.into_inner();
            ["SUCCEEDED", "PARTIAL", "FAILED"].contains(&j.state.as_str()).then_some(j)
        }
    })
    .await
}

/// A forced migration of `source` the operator attests is powered off,
/// carried out as planned (`--yes`).
pub fn attested_migration(source: &str) -> lifeboat_proto::v1::MigrateRequest {
    lifeboat_proto::v1::MigrateRequest {
        source: source.into(),
        attest_powered_off: true,
        attest_reason: format!("test: {source} is off"),
        yes: true,
        ..Default::default()
    }
}

/// Sends `req` until the controller accepts it (the source must first be
/// silent for the grace), and returns the job it started.
pub async fn start_migration_when_accepted(
    op: &AdminClient<Channel>,
    req: &lifeboat_proto::v1::MigrateRequest,
) -> lifeboat_proto::v1::JobRecord {
    wait_for(Duration::from_secs(10), "migration started", || {
        let mut op = op.clone();
        let req = req.clone();
        async move { op.start_migration(req).await.ok().map(|j| j.into_inner()) }
    })
    .await
    .0
}

/// Waits until every guest's desired state is "running" (learned from the
/// running guests).
pub async fn wait_desired_running(op: &AdminClient<Channel>) {
    wait_for(Duration::from_secs(10), "desired state", || {
        let mut op = op.clone();
        async move {
            let g = op.list_guests(lifeboat_proto::v1::ListGuestsRequest::default()).await.ok()?.into_inner().guests;
            g.iter().all(|g| g.desired_state == "running").then_some(())
        }
    })
    .await;
}

/// Builds (once per test process) the workspace's binaries and returns the
/// path of `name` (`lifeboat-controller`, `lifeboat`, `lifeboat-agent`), for
/// tests that need a real process (signals, exit codes, its own file table).
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?.to_path_buf();
        let out = std::process::Command::new(env!("CARGO"))
            // The same command as scripts/test.sh's first build, so under CI this
            // finds everything built; `-p` selections unify features differently
            // and would build a second copy of every dependency.
            .args(["build", "--workspace", "--locked", "--bins"])
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if !out.status.success() {
            return Err(format!("cargo build failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
            Some(d) => root.join(d),
            None => root.join("target"),
        };
        Ok(target.join("debug"))
    });
    match dir {
        Ok(d) => d.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// A `lifeboat-controller` process (the real binary) on 127.0.0.1.
pub struct ControllerProcess {
    /// The child process.
    pub child: std::process::Child,
    /// Its gRPC address.
    pub addr: std::net::SocketAddr,
    /// Its metrics address.
    pub metrics: std::net::SocketAddr,
    /// The file its stderr (the log) goes to.
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl ControllerProcess {
    /// Starts the binary with `db` and certificates from `pki`; returns once
    /// it answers an admin call (or panics after 20 s).
    pub async fn start(pki: &Pki, db: &Path, hb_ms: u32, unreachable_ms: u32) -> Self {
        Self::start_with_nofile(pki, db, hb_ms, unreachable_ms, None).await
    }

    /// Like [`ControllerProcess::start`], with `RLIMIT_NOFILE` (soft and
    /// hard) set to `nofile` for the process.
    pub async fn start_with_nofile(pki: &Pki, db: &Path, hb_ms: u32, unreachable_ms: u32, nofile: Option<u32>) -> Self {
        let (port, mport) = (free_port(), free_port());
        let dir = db.parent().expect("db dir");
        let cfg = dir.join(format!("controller-{port}.toml"));
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\ndatabase = {db:?}\nheartbeat_interval_ms = {hb_ms}\nunreachable_after_ms = {unreachable_ms}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            pki.controller().ca,
            pki.controller().cert,
            pki.controller().key
        );
        std::fs::write(&cfg, text).expect("write config");
        let log = dir.join(format!("controller-{port}.log"));
        // A start never creates a database (a typo must not serve an empty
        // one): a new one is made with `init`, as an operator does.
        if !db.exists() {
            let out = std::process::Command::new(workspace_binary("lifeboat-controller"))
                .arg("--config")
                .arg(&cfg)
                .arg("init")
                .output()
                .expect("run lifeboat-controller init");
            assert!(out.status.success(), "lifeboat-controller init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut cmd = match nofile {
            None => std::process::Command::new(workspace_binary("lifeboat-controller")),
            Some(n) => {
                let mut c = std::process::Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(workspace_binary("lifeboat-controller"));
                c
            }
        };
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn lifeboat-controller");
        let me = ControllerProcess {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            metrics: ([127, 0, 0, 1], mport).into(),
            log,
        };
        let client = pki.client("probe", Role::Viewer);
        wait_for(Duration::from_secs(20), "the controller process to answer", || {
            let url = me.url();
            let client = client.clone();
            async move {
                let m = client.load().ok()?;
                let ch = Endpoint::from_shared(url)
                    .ok()?
                    .tls_config(m.client_config(pki::CONTROLLER_NAME))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                AdminClient::new(ch).who_am_i(lifeboat_proto::v1::WhoAmIRequest::default()).await.ok().map(|_| ())
            }
        })
        .await;
        me
    }

    /// The URL agents and clients use.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The log written so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The metrics exposition, read over plain HTTP.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.expect("metrics connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.expect("metrics request");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("metrics read");
        out
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let st =
            std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(st.success(), "kill -TERM failed");
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the metric sample `name{labels}` in `text`, or 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample).and_then(|rest| rest.trim().split(' ').next()).and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}
