//! Driving the multi-host lab (`lab/lab.sh`) from tests.
//!
//! Every [`Lab`] runs the copies checker ([`copies`]) while it is up: a test
//! fails if any guest UUID was ever seen running twice, whatever it tested.
//! Every [`Lab`] also runs the end-of-test check: each guest running when
//! the lab came up (or noted with [`Lab::note_running`]) must run exactly
//! once when the test ends, or be listed as waiting with a reason by
//! `lifeboat vms list --output json`, or be excused by the test
//! ([`Lab::excuse`]). It runs when the lab is dropped, so no test can
//! forget it. Under `CI=true` a lab that cannot run fails the test instead
//! of skipping.

pub mod copies;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

static LAB_LOCK: Mutex<()> = Mutex::new(());
/// Held (flock) by the test process whose lab is up.
const MACHINE_LOCK: &str = "/run/lifeboat-lab-tests.lock";

/// Brings up a lab of `$hosts` hosts with `$guests` guests each, or prints
/// `SKIPPED: <why>` and returns from the calling test. Under `CI=true` a lab
/// that cannot run panics with the reason instead: CI must not pass by
/// skipping.
#[macro_export]
macro_rules! lab_or_skip {
    ($hosts:expr, $guests:expr) => {
        match $crate::lab::Lab::up($hosts, $guests) {
            Ok(l) => l,
            Err(why) => {
                $crate::lab::skip_or_fail(&why);
                return;
            }
        }
    };
}

/// Whether this runs under CI (`CI=true`, as CI systems set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A lab test cannot run: prints `SKIPPED: <why>`, or panics under CI.
pub fn skip_or_fail(why: &str) {
    if in_ci() {
        panic!("the lab test cannot run, and CI=true forbids skipping: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// A running lab; torn down when dropped. While it is up, the copies
/// checker runs; dropping the lab fails the test if any UUID ran twice.
pub struct Lab {
    script: PathBuf,
    checker: Option<copies::Checker>,
    _guard: MutexGuard<'static, ()>,
    // Field order matters: dropped after the lab is torn down (Drop runs
    // first), so the next test process only brings up its lab after this one's is gone.
    _machine_lock: std::fs::File,
    /// `lab.sh paths` output.
    pub paths: HashMap<String, String>,
    /// Guests that must run exactly once at the end: UUID → name.
    expected: Mutex<BTreeMap<String, String>>,
    /// Guests a test deliberately leaves not running: UUID or name → why.
    excused: Mutex<BTreeMap<String, String>>,
    /// When `lab.sh up` returned (its controller started before that).
    up_at: Instant,
}

/// The lab controller's startup grace: twice its detection time (3 s).
/// Until it has passed, the controller grants leases but stops and starts nothing.
pub const STARTUP_GRACE: Duration = Duration::from_secs(6);

/// How long the end-of-test check waits for every guest to settle (a
/// waiting guest being started, a stop in flight) before it fails.
const END_CHECK_WAIT: Duration = Duration::from_secs(30);

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo").to_path_buf()
}

/// Why the lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let uid = lifeboat_common::files::real_uid();
    if uid != 0 {
        return Some("the lab needs root: network/PID/mount namespaces and privileged libvirtd".into());
    }
    for bin in ["/usr/sbin/libvirtd", "/usr/bin/qemu-system-x86_64", "/usr/bin/tini"] {
        if !std::path::Path::new(bin).exists() {
            return Some(format!("{bin} is missing: run scripts/install-deps.sh"));
        }
    }
    let bins = repo_dir().join("target/debug");
    for b in ["lifeboat", "lifeboat-agent", "lifeboat-controller"] {
        if !bins.join(b).exists() {
            return Some(format!("{} is not built: run cargo build --workspace --bins", bins.join(b).display()));
        }
    }
    None
}

impl Lab {
    /// Whether the lab has BMC emulators; prints why a test skips if not
    /// (panics instead under `CI=true`).
    pub fn has_bmcs(&self) -> bool {
        if self.paths.contains_key("HOST_A_BMC_URL") {
            true
        } else {
            skip_or_fail("the lab has no BMC emulator (sushy-tools venv missing: run scripts/install-deps.sh)");
            false
        }
    }

    /// Brings up a fresh lab, or returns why it cannot (the caller skips).
    pub fn up(hosts: u32, guests: u32) -> Result<Lab, String> {
        Self::up_with(hosts, guests, &[])
    }

    /// [`Lab::up`] with more `lab.sh up` options (e.g. `--controller-fs-mib 24`).
    pub fn up_with(hosts: u32, guests: u32, options: &[&str]) -> Result<Lab, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        let guard = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // The lab's namespaces and addresses are fixed, one lab per machine:
        // test processes of other checkouts (or other test binaries) wait here.
        let machine_lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(MACHINE_LOCK)
            .map_err(|e| format!("cannot open {MACHINE_LOCK}: {e}"))?;
        machine_lock.lock().map_err(|e| format!("cannot lock {MACHINE_LOCK}: {e}"))?;
        let mut lab = Lab {
            script: repo_dir().join("lab/lab.sh"),
            checker: None,
            _guard: guard,
            _machine_lock: machine_lock,
            paths: HashMap::new(),
            expected: Mutex::default(),
            excused: Mutex::default(),
            up_at: Instant::now(),
        };
        let t = Instant::now();
        let (h, g) = (hosts.to_string(), guests.to_string());
        let mut args = vec!["up", "--hosts", h.as_str(), "--guests", g.as_str()];
        args.extend_from_slice(options);
        lab.ok(&args);
        lab.up_at = Instant::now();
        println!("lab up ({hosts} hosts x {guests} guests) in {:?}", t.elapsed());
        let out = lab.ok(&["paths"]);
        lab.paths = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
            .collect();
        let hosts = lab
            .paths
            .get("HOSTS")
            .map(|h| h.split(',').filter(|h| !h.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|h| copies::HostDir {
                name: h.to_string(),
                dir: lab.path(&format!("HOST_{}_DIR", h.trim_start_matches("host-").to_uppercase())),
            })
            .collect();
        lab.checker = Some(copies::Checker::start(hosts));
        lab.note_running();
        Ok(lab)
    }

    /// Notes every guest running now: each must run exactly once when the
    /// test ends, or wait with a reason, or be excused. Called when the lab
    /// comes up; call it again after defining and starting more guests.
    pub fn note_running(&self) {
        let mut e = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        for (name, uuid, where_) in self.guests() {
            if !where_.is_empty() {
                e.insert(uuid, name);
            }
        }
    }

    /// Excuses a guest (name or UUID) the test deliberately leaves not
    /// running (stopped, undefined, left on a host that stays off) from the
    /// end-of-test check; `why` is printed at the end.
    pub fn excuse(&self, vm: &str, why: &str) {
        self.excused.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.to_string(), why.to_string());
    }

    /// `lab.sh guests`: (name, uuid, hosts where a qemu of it runs).
    pub fn guests(&self) -> Vec<(String, String, Vec<String>)> {
        let out = self.run(&["guests"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (name, uuid, where_) = (w.next()?, w.next()?, w.next()?);
                let hosts = if where_ == "-" { Vec::new() } else { where_.split(',').map(String::from).collect() };
                Some((name.to_string(), uuid.to_string(), hosts))
            })
            .collect()
    }

    /// The end-of-test check, once: what is wrong now (empty: all good),
    /// and what was accepted (waiting or excused guests).
    fn end_check_once(&self) -> (Vec<String>, Vec<String>) {
        let expected = self.expected.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let excused = self.excused.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let running = match copies::scan(&self.checker().hosts()) {
            Ok(r) => r,
            Err(e) => return (vec![format!("cannot read the running guests: {e}")], Vec::new()),
        };
        let mut vms: Option<Result<Vec<Value>, String>> = None;
        let (mut wrong, mut accepted) = (Vec::new(), Vec::new());
        for (uuid, name) in &expected {
            let n = running.get(&uuid.to_ascii_lowercase()).map_or(0, Vec::len);
            if n == 1 {
                continue;
            }
            if n > 1 {
                wrong.push(format!("{name} ({uuid}) runs {n} times"));
                continue;
            }
            if let Some(why) = excused.get(uuid).or_else(|| excused.get(name)) {
                accepted.push(format!("{name}: not running, excused by the test: {why}"));
                continue;
            }
            let listed = vms.get_or_insert_with(|| {
                self.cli_json(&["vms", "list"]).map(|v| v.as_array().cloned().unwrap_or_default())
            });
            let waiting = match listed {
                Ok(list) => list
                    .iter()
                    .filter(|v| v["uuid"] == uuid.as_str())
                    .filter_map(|v| {
                        v["waiting_reason"]
                            .as_str()
                            .filter(|r| !r.is_empty())
                            .map(|r| format!("on {}: {r}", v["host_id"].as_str().unwrap_or("?")))
                    })
                    .next(),
                Err(e) => {
                    wrong.push(format!("{name} ({uuid}) runs nowhere and `vms list` failed: {e}"));
                    continue;
                }
            };
            match waiting {
                Some(w) => accepted.push(format!("{name}: waiting {w}")),
                None => wrong.push(format!(
                    "{name} ({uuid}) ran when the lab came up, runs nowhere now and is not listed as waiting (excuse it with lab.excuse if the test means it)"
                )),
            }
        }
        (wrong, accepted)
    }

    /// Runs the end-of-test check until it passes or [`END_CHECK_WAIT`]
    /// has passed; returns the failure text, if any.
    fn end_check(&self) -> Option<String> {
        let t = Instant::now();
        loop {
            let (wrong, accepted) = self.end_check_once();
            if wrong.is_empty() {
                let n = self.expected.lock().unwrap_or_else(|p| p.into_inner()).len();
                println!(
                    "end-of-test check: {n} guest(s) that ran at the start: each runs once, or: {}",
                    if accepted.is_empty() { "-".into() } else { accepted.join("; ") }
                );
                return None;
            }
            if t.elapsed() > END_CHECK_WAIT {
                return Some(format!("end-of-test check failed after {END_CHECK_WAIT:?}:\n  {}", wrong.join("\n  ")));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the controller `up` started is past its startup grace, so
    /// that a test timing a stop or an alarm does not time the grace instead.
    pub fn past_startup_grace(&self) {
        let until = self.up_at + STARTUP_GRACE + Duration::from_millis(500);
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
    }

    fn checker(&self) -> &copies::Checker {
        self.checker.as_ref().expect("the copies checker runs while the lab is up")
    }

    /// Panics if any guest UUID was seen running twice (outside an
    /// allowance) since the lab came up, or if a sample failed.
    pub fn assert_never_two(&self) {
        let (summary, failure) = self.checker().report();
        println!("{summary}");
        if let Some(f) = failure {
            panic!("{f}");
        }
    }

    /// Allows two copies of `uuid` for at most `for_at_most`: for a test that
    /// makes a second copy ON PURPOSE. End it with [`Lab::end_allowance`].
    pub fn allow_two(&self, uuid: &str, for_at_most: Duration) {
        self.checker().allow_two(uuid, for_at_most);
    }

    /// Ends an allowance: panics if two copies of `uuid` still run; returns
    /// what the checker saw of the double run meanwhile.
    pub fn end_allowance(&self, uuid: &str) -> copies::AllowedRun {
        self.checker().end_allowance(uuid)
    }

    /// Where the running copies of `uuid` are now (host and PID), from /proc.
    pub fn running_copies(&self, uuid: &str) -> Vec<copies::Qemu> {
        self.checker().where_runs(uuid)
    }

    /// Runs `lab.sh ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(&self.script)
            .args(args)
            .env("LIFEBOAT_BIN_DIR", repo_dir().join("target/debug"))
            .output()
            .expect("run lab.sh")
    }

    /// Runs `lab.sh ARGS` and panics with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        if !o.status.success() {
            panic!(
                "lab.sh {} failed ({}):\n{}\n{}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        o
    }

    /// `lifeboat ARGS --output json` as the lab's admin, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut a = vec!["cli"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--output", "json"]);
        let o = self.run(&a);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("bad JSON from CLI: {e}"))
    }

    /// `lifeboat ARGS --output json` as the lab's admin: the exit code and the
    /// parsed JSON, whatever the exit code (`jobs show` of a PARTIAL job
    /// prints it and exits 1).
    pub fn cli_json_exit(&self, args: &[&str]) -> Result<(i32, Value), String> {
        let mut a = vec!["cli"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--output", "json"]);
        let o = self.run(&a);
        let v = serde_json::from_slice(&o.stdout).map_err(|e| {
            format!(
                "bad JSON from CLI ({e}): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })?;
        Ok((o.status.code().unwrap_or(-1), v))
    }

    /// `lifeboat ARGS` as the lab's admin; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["cli"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `lifeboat ARGS` with the certificate of `role`.
    pub fn cli_as(&self, role: &str, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["cli-as", role];
        a.extend_from_slice(args);
        let o = self.run(&a);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// How many qemu processes run this UUID across all hosts.
    pub fn copies(&self, uuid: &str) -> u32 {
        String::from_utf8_lossy(&self.ok(&["copies", uuid]).stdout).trim().parse().expect("copies prints a number")
    }

    /// Names of the guests defined on a host, per its own libvirtd.
    pub fn defined(&self, host: &str) -> Vec<String> {
        let out = self.virsh(host, &["list", "--all", "--name"]);
        out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    }

    /// `lifeboat vms list --output json`, as a vector (empty on error).
    pub fn vms(&self) -> Vec<Value> {
        self.cli_json(&["vms", "list"]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    /// One guest's JSON by name (first match).
    pub fn vm(&self, name: &str) -> Option<Value> {
        self.vms().into_iter().find(|v| v["name"] == name)
    }

    /// One host's JSON.
    pub fn host(&self, host: &str) -> Option<Value> {
        self.cli_json(&["hosts", "show", host]).ok()
    }

    /// `virsh` on a host, must succeed.
    pub fn virsh(&self, host: &str, args: &[&str]) -> String {
        let mut a = vec!["virsh", host];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&self.ok(&a).stdout).into_owned()
    }

    /// A path printed by `lab.sh paths`.
    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.paths.get(key).unwrap_or_else(|| panic!("lab.sh paths has no {key}: {:?}", self.paths)))
    }

    /// Polls `f` every 50 ms until it returns true; returns the time taken.
    pub fn wait(&self, limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
        let t = Instant::now();
        loop {
            if f() {
                return t.elapsed();
            }
            if t.elapsed() > limit {
                panic!("timed out after {limit:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Before the lab goes down, and only for a test that passed so far.
        let end = if std::thread::panicking() || self.checker.is_none() { None } else { self.end_check() };
        let report = self.checker.as_mut().map(|c| {
            c.stop();
            c.report()
        });
        if std::env::var_os("LIFEBOAT_LAB_KEEP").is_none() {
            let _ = self.run(&["down"]);
        }
        match report {
            None => {}
            Some((summary, None)) => println!("{summary}"),
            // A panic while the test already panics would abort the run.
            Some((_, Some(f))) if std::thread::panicking() => eprintln!("{f}"),
            Some((_, Some(f))) => panic!("{f}"),
        }
        if let Some(f) = end {
            panic!("{f}");
        }
    }
}
