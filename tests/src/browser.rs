//! A headless Chromium for browser tests in the lab (`lab/lab.sh`).
//!
//! The lab's namespaces have no route from the root namespace, so Debian's
//! `chromedriver` runs inside a lab namespace (normally the controller's,
//! `lb-ctl`) with `ip netns exec`, and Chromium, its child, reaches the lab
//! addresses directly. The test process talks WebDriver (fantoccini) to it
//! through a small forwarder: a listener on the root namespace's 127.0.0.1
//! whose thread has joined the lab namespace and connects to chromedriver's
//! loopback port there. Chromium trusts exactly the lab controller's key
//! (`--ignore-certificate-errors-spki-list`), not every certificate, so
//! pages are a secure context as they would be for an operator whose browser
//! trusts the Lifeboat CA. The helper is blocking: it owns a current-thread
//! tokio runtime. Dropping it closes the session and kills chromedriver and
//! every Chromium process of its profile.

use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Debian's Chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// chromedriver's port on the lab namespace's loopback (one browser per lab).
const DRIVER_PORT: u16 = 9515;
/// How long chromedriver and Chromium may take to give a session.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long one WebDriver command may take before the test fails.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Set to `1` to also write screenshots to `docs/dashboard/`.
pub const DOCS_SCREENSHOTS_ENV: &str = "LIFEBOAT_DOCS_SCREENSHOTS";

/// Starts a [`Browser`] in `$lab`'s controller namespace, or prints
/// `SKIPPED: <why>` and returns from the calling test when Chromium or
/// ChromeDriver is not installed (under `CI=true` it panics instead).
#[macro_export]
macro_rules! browser_or_skip {
    ($lab:expr) => {
        match $crate::browser::unavailable() {
            Some(why) => {
                $crate::lab::skip_or_fail(&why);
                return;
            }
            None => $crate::browser::Browser::start(&$lab),
        }
    };
}

/// Why browser tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    for (bin, pkg) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} is missing: install Debian's {pkg} (scripts/install-deps.sh)"));
        }
    }
    None
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo").to_path_buf()
}

/// `target/dashboard-artifacts` (under `CARGO_TARGET_DIR` when set): screenshots
/// and chromedriver's log.
pub fn artifacts_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => repo_dir().join(d),
        None => repo_dir().join("target"),
    };
    target.join("dashboard-artifacts")
}

/// The base64 SHA-256 of the certificate's SubjectPublicKeyInfo, the form
/// Chromium's `--ignore-certificate-errors-spki-list` takes (openssl CLI,
/// which the lab needs anyway).
pub fn spki_sha256(cert: &Path) -> Result<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "set -e; openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform DER \
             | openssl dgst -sha256 -binary | openssl base64 -A",
        )
        .arg("spki")
        .arg(cert)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || hash.len() != 44 {
        return Err(format!(
            "cannot hash the public key of {}: {}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(hash)
}

/// A root-namespace `127.0.0.1` port forwarded to a port on a network
/// namespace's loopback.
struct Forwarder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    fn start(netns: &str, port: u16) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let ns = File::open(Path::new("/run/netns").join(netns))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name(format!("fwd-{netns}")).spawn(move || {
            // setns changes the calling thread only: sockets this thread creates
            // from here on live in `netns`; the listener stays in the root one.
            if let Err(e) = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(io::Error::from(e)));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                // Not listening yet: dropping the client looks like a refused connection.
                if let Ok(upstream) = TcpStream::connect(("127.0.0.1", port)) {
                    pipe(client, upstream);
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Forwarder { addr, stop, thread: Some(thread) }),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("setns into {netns}: {e}"))),
            Err(_) => Err(io::Error::other("the forwarder thread ended before it joined the namespace")),
        }
    }
}

/// Copies both ways between `a` and `b` until each side has closed.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        }
    };
    let _ = std::thread::Builder::new().name("fwd-up".into()).spawn(one_way(a, b2));
    let _ = std::thread::Builder::new().name("fwd-down".into()).spawn(one_way(b, a2));
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// PIDs (not zombies) whose command line contains `needle`.
fn pids_with_arg(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(needle)
        })
        .filter(|pid| {
            // "PID (comm) S ...": the state follows the last ')'.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        })
        .collect()
}

/// A headless Chromium session inside a lab namespace (see the module docs).
/// Every method panics with what it was doing when the browser fails: they
/// are test steps.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Option<Child>,
    forwarder: Option<Forwarder>,
    profile: Option<tempfile::TempDir>,
    artifacts: PathBuf,
    /// How long [`Browser::start`] took (chromedriver up and a session open).
    pub started_in: Duration,
}

impl Browser {
    /// Starts chromedriver and Chromium in the lab controller's namespace,
    /// trusting the lab controller's certificate (its key).
    pub fn start(lab: &crate::lab::Lab) -> Browser {
        let netns = lab.paths.get("CONTROLLER_NETNS").cloned().unwrap_or_else(|| "lb-ctl".into());
        let cert = lab.path("PKI_DIR").join("controller.pem");
        Self::start_in(&netns, &cert)
    }

    /// Starts chromedriver and Chromium in network namespace `netns`; Chromium
    /// accepts the certificates whose public key is that of `trusted_cert`.
    pub fn start_in(netns: &str, trusted_cert: &Path) -> Browser {
        let t = Instant::now();
        let artifacts = artifacts_dir();
        std::fs::create_dir_all(&artifacts).expect("create target/dashboard-artifacts");
        let spki = spki_sha256(trusted_cert).unwrap_or_else(|e| panic!("{e}"));
        let profile = tempfile::Builder::new().prefix("lifeboat-chromium-").tempdir().expect("chromium profile dir");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let forwarder = Forwarder::start(netns, DRIVER_PORT)
            .unwrap_or_else(|e| panic!("cannot forward to {netns}:127.0.0.1:{DRIVER_PORT}: {e}"));
        let log = artifacts.join("chromedriver.log");
        let driver = Command::new("ip")
            .args(["netns", "exec", netns, CHROMEDRIVER])
            .arg(format!("--port={DRIVER_PORT}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Drop signals chromedriver and Chromium together.
            .process_group(0)
            .spawn()
            .expect("spawn ip netns exec chromedriver");
        let mut me = Browser {
            rt,
            client: None,
            driver: Some(driver),
            forwarder: Some(forwarder),
            profile: Some(profile),
            artifacts,
            started_in: Duration::ZERO,
        };
        let profile_dir = me.profile.as_ref().map(|p| p.path().display().to_string()).unwrap_or_default();
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-extensions",
                    "--window-size=1366,900", "--force-device-scale-factor=1", "--hide-scrollbars",
                    "--lang=en-US", format!("--user-data-dir={profile_dir}"),
                    format!("--ignore-certificate-errors-spki-list={spki}"),
                ],
            }),
        );
        let url = format!("http://{}", me.forwarder.as_ref().map(|f| f.addr).expect("forwarder"));
        let deadline = Instant::now() + START_LIMIT;
        let client = loop {
            let attempt = me.rt.block_on(async {
                tokio::time::timeout(
                    START_LIMIT,
                    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                        .capabilities(caps.clone())
                        .connect(&url),
                )
                .await
            });
            match attempt {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if Instant::now() < deadline => {
                    if let Some(status) = me.driver.as_mut().and_then(|d| d.try_wait().ok().flatten()) {
                        panic!(
                            "chromedriver in {netns} exited ({status}) before a session opened: {e}; log {}",
                            log.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Err(e)) => panic!("no WebDriver session after {START_LIMIT:?}: {e}; log {}", log.display()),
                Err(_) => panic!("opening a WebDriver session took over {START_LIMIT:?}; log {}", log.display()),
            }
        };
        me.client = Some(client);
        me.started_in = t.elapsed();
        me
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the browser session is open")
    }

    /// Runs one WebDriver step, panicking with `what` on error or after [`CALL_LIMIT`].
    fn run<T, E: std::fmt::Display>(&self, what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> T {
        match self.rt.block_on(async { tokio::time::timeout(CALL_LIMIT, f).await }) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("browser: {what}: {e}"),
            Err(_) => panic!("browser: {what}: no answer within {CALL_LIMIT:?}"),
        }
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&self, url: &str) {
        // Never print a sign-in token: it is a credential for 60 s.
        let shown = url.split_once('?').map_or(url, |(p, _)| p);
        self.run(&format!("open {shown}"), self.client().goto(url));
    }

    /// Opens `url`; a navigation the browser refuses (an untrusted
    /// certificate, say) is an `Err` with WebDriver's reason.
    pub fn try_goto(&self, url: &str) -> Result<(), String> {
        match self.rt.block_on(async { tokio::time::timeout(CALL_LIMIT, self.client().goto(url)).await }) {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_LIMIT:?}")),
        }
    }

    /// The page's URL now.
    pub fn url(&self) -> String {
        self.run("read the URL", self.client().current_url()).to_string()
    }

    /// Waits until an element matches `selector`; returns how long it took.
    pub fn wait_css(&self, selector: &str, timeout: Duration) -> Duration {
        let t = Instant::now();
        let wait =
            self.client().wait().at_most(timeout).every(Duration::from_millis(25)).for_element(Locator::Css(selector));
        match self.rt.block_on(async { tokio::time::timeout(timeout + CALL_LIMIT, wait).await }) {
            Ok(Ok(_)) => t.elapsed(),
            Ok(Err(e)) => panic!("browser: waiting {timeout:?} for {selector}: {e}; {}", self.diagnose()),
            Err(_) => panic!("browser: waiting {timeout:?} for {selector}: no answer; {}", self.diagnose()),
        }
    }

    /// What the page shows now, for a failure message: its URL and the
    /// start of its text; also saves `target/dashboard-artifacts/failure.png`.
    pub fn diagnose(&self) -> String {
        let Some(c) = self.client.as_ref() else { return "no browser session".into() };
        let (url, text, png) = self.rt.block_on(async {
            let limit = Duration::from_secs(5);
            let url = tokio::time::timeout(limit, c.current_url()).await.ok().and_then(Result::ok);
            let text =
                tokio::time::timeout(limit, c.execute("return document.body ? document.body.innerText : '';", vec![]))
                    .await
                    .ok()
                    .and_then(Result::ok);
            let png = tokio::time::timeout(limit, c.screenshot()).await.ok().and_then(Result::ok);
            (url, text, png)
        });
        if let Some(png) = png {
            let _ = std::fs::write(self.artifacts.join("failure.png"), png);
        }
        let text = text.as_ref().and_then(Value::as_str).unwrap_or("?").chars().take(600).collect::<String>();
        // The query may hold a sign-in token: the path is enough.
        let url = url.map(|mut u| {
            u.set_query(None);
            u.to_string()
        });
        format!("the page is {} and reads: {text:?} (screenshot failure.png)", url.as_deref().unwrap_or("?"))
    }

    /// Polls the JavaScript expression `expr` every 25 ms until it is truthy;
    /// returns how long it took, panics naming `what` after `timeout`.
    pub fn wait_js(&self, timeout: Duration, what: &str, expr: &str) -> Duration {
        let t = Instant::now();
        let script = format!("return !!({expr});");
        loop {
            if self.exec_js(&script, vec![]) == json!(true) {
                return t.elapsed();
            }
            if t.elapsed() > timeout {
                panic!("browser: timed out after {timeout:?} waiting for {what} ({expr}); {}", self.diagnose());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// How many elements match `selector` now.
    pub fn count(&self, selector: &str) -> usize {
        self.run(&format!("find all {selector}"), self.client().find_all(Locator::Css(selector))).len()
    }

    fn find(&self, selector: &str) -> fantoccini::elements::Element {
        self.run(&format!("find {selector}"), self.client().find(Locator::Css(selector)))
    }

    /// The rendered text of the first element matching `selector`.
    pub fn text(&self, selector: &str) -> String {
        let e = self.find(selector);
        self.run(&format!("text of {selector}"), e.text())
    }

    /// An attribute of the first element matching `selector`.
    pub fn attr(&self, selector: &str, name: &str) -> Option<String> {
        let e = self.find(selector);
        self.run(&format!("attribute {name} of {selector}"), e.attr(name))
    }

    /// A computed CSS property of the first element matching `selector`
    /// (colours read `rgb(r, g, b)` / `rgba(r, g, b, a)`).
    pub fn css_value(&self, selector: &str, property: &str) -> String {
        let e = self.find(selector);
        self.run(&format!("CSS {property} of {selector}"), e.css_value(property))
    }

    /// Clicks the first element matching `selector`.
    pub fn click(&self, selector: &str) {
        let e = self.find(selector);
        self.run(&format!("click {selector}"), e.click());
    }

    /// Clears the input matching `selector` and types `text` into it.
    pub fn fill(&self, selector: &str, text: &str) {
        let e = self.find(selector);
        self.run(&format!("clear {selector}"), e.clear());
        self.run(&format!("type into {selector}"), e.send_keys(text));
    }

    /// Chooses the option with `value` in the `<select>` matching `selector`.
    pub fn select(&self, selector: &str, value: &str) {
        let e = self.find(selector);
        self.run(&format!("select {value} in {selector}"), e.select_by_value(value));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page
    /// and returns what it returns.
    pub fn exec_js(&self, script: &str, args: Vec<Value>) -> Value {
        self.run("run JavaScript", self.client().execute(script, args))
    }

    /// Runs `script` in the page and returns the value it passes to its
    /// callback, the last of `arguments`.
    pub fn exec_async_js(&self, script: &str, args: Vec<Value>) -> Value {
        self.run("run asynchronous JavaScript", self.client().execute_async(script, args))
    }

    /// The page's HTML now.
    pub fn source(&self) -> String {
        self.run("read the page source", self.client().source())
    }

    /// Saves a PNG of the viewport as `target/dashboard-artifacts/<name>.png`
    /// (and `docs/dashboard/<name>.png` when `LIFEBOAT_DOCS_SCREENSHOTS=1`);
    /// returns the first path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "screenshot name {name:?}: letters, digits, - and _ only"
        );
        let png = self.run(&format!("screenshot {name}"), self.client().screenshot());
        assert!(png.starts_with(b"\x89PNG"), "the screenshot {name} is not a PNG");
        let path = self.artifacts.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if std::env::var(DOCS_SCREENSHOTS_ENV).is_ok_and(|v| v == "1") {
            let docs = repo_dir().join("docs/dashboard");
            std::fs::create_dir_all(&docs).expect("create docs/dashboard");
            std::fs::write(docs.join(format!("{name}.png")), &png).expect("write docs/dashboard screenshot");
        }
        println!("screenshot {} ({} bytes)", path.display(), png.len());
        path
    }

    /// Closes the session and stops chromedriver and Chromium; returns the
    /// PIDs of any process of this browser still running afterwards (none
    /// expected).
    pub fn close(mut self) -> Vec<i32> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Vec<i32> {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), c.close()).await });
        }
        if let Some(mut d) = self.driver.take() {
            let group = i32::try_from(d.id()).ok().map(Pid::from_raw);
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(g) = group {
                let _ = killpg(g, Signal::SIGKILL);
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        self.forwarder = None;
        let mut left = Vec::new();
        if let Some(profile) = self.profile.take() {
            // Chromium processes that left the group: found by their profile path.
            let needle = profile.path().display().to_string();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                left = pids_with_arg(&needle);
                if left.is_empty() || Instant::now() > deadline {
                    break;
                }
                for pid in &left {
                    let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(profile);
        }
        left
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let left = self.shut_down();
        if !left.is_empty() {
            eprintln!("browser: processes still running after the browser was closed: {left:?}");
        }
    }
}
