//! The copies checker: while a lab is up, a background thread counts every
//! 200 ms how many qemu processes run each guest UUID across all lab hosts
//! and records every UUID seen running twice or more. One UUID in two places
//! is the one thing Lifeboat must never allow, so every lab test checks it,
//! not only the tests that look for it.
//!
//! The count comes straight from `/proc` (the same rule as `lab.sh copies`:
//! a process whose command line has `-uuid UUID`, not a zombie), read in
//! this process: no fork per sample. A qemu whose host's init is dead does
//! not count: that host's power is cut, its processes are only being torn
//! down by the kernel.
//!
//! A test that makes a second copy on purpose says so first with an
//! allowance ([`Checker::allow_two`]) and ends it with
//! [`Checker::end_allowance`], which fails if the second copy still runs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the checker samples.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// One running qemu process of a guest (one copy of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// Root-namespace PID.
    pub pid: u32,
    /// The lab host it runs in (`?` when it is in none of them).
    pub host: String,
}

/// A UUID seen with two or more copies (outside an allowance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Guest UUID.
    pub uuid: String,
    /// First sample that saw it, since the checker started.
    pub first: Duration,
    /// Last sample that saw it.
    pub last: Duration,
    /// How many samples saw it.
    pub samples: u64,
    /// The most copies seen at once.
    pub max_copies: usize,
    /// Where the copies ran when it was first seen (`host:pid`).
    pub where_first: Vec<String>,
}

/// What the checker saw of one allowed double run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedRun {
    /// Samples that saw two copies within the allowance.
    pub samples: u64,
    /// First such sample, since the checker started.
    pub first: Option<Duration>,
    /// Last such sample.
    pub last: Option<Duration>,
}

/// The pure bookkeeping: samples in, violations out. No I/O.
#[derive(Debug, Default)]
pub struct Book {
    /// Samples taken.
    pub samples: u64,
    /// Per UUID, until when two copies are allowed (an offset since start).
    allow: HashMap<String, Duration>,
    /// What was seen of each allowance.
    allowed: HashMap<String, AllowedRun>,
    /// Violations by UUID.
    violations: BTreeMap<String, Violation>,
    /// Samples that could not be taken, with the first reason.
    pub errors: u64,
    /// The first reason a sample failed.
    pub first_error: Option<String>,
    /// The longest time a sample took.
    pub slowest: Duration,
    /// The time all samples took together.
    pub busy: Duration,
}

impl Book {
    /// Records one sample taken at `at` (since start): every UUID with its
    /// running copies.
    pub fn record(&mut self, at: Duration, running: &HashMap<String, Vec<Qemu>>) {
        self.samples += 1;
        for (uuid, copies) in running {
            if copies.len() < 2 {
                continue;
            }
            let allowed = copies.len() == 2 && self.allow.get(uuid).is_some_and(|until| at <= *until);
            if allowed {
                let a = self.allowed.entry(uuid.clone()).or_default();
                a.samples += 1;
                a.first.get_or_insert(at);
                a.last = Some(at);
                continue;
            }
            let v = self.violations.entry(uuid.clone()).or_insert_with(|| Violation {
                uuid: uuid.clone(),
                first: at,
                last: at,
                samples: 0,
                max_copies: 0,
                where_first: copies.iter().map(|c| format!("{}:{}", c.host, c.pid)).collect(),
            });
            v.samples += 1;
            v.last = at;
            v.max_copies = v.max_copies.max(copies.len());
        }
    }

    /// Records a sample that failed.
    pub fn record_error(&mut self, why: String) {
        self.errors += 1;
        self.first_error.get_or_insert(why);
    }

    /// Allows two copies of `uuid` until `until` (since start).
    pub fn allow(&mut self, uuid: &str, until: Duration) {
        self.allow.insert(uuid.to_ascii_lowercase(), until);
        self.allowed.entry(uuid.to_ascii_lowercase()).or_default();
    }

    /// Ends an allowance; returns what was seen during it.
    pub fn end_allowance(&mut self, uuid: &str) -> AllowedRun {
        let u = uuid.to_ascii_lowercase();
        self.allow.remove(&u);
        self.allowed.remove(&u).unwrap_or_default()
    }

    /// Every violation so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.violations.values().cloned().collect()
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        format!(
            "copies checker: {} samples (every {:?}, mean {:?}, slowest {:?}), {} UUID(s) seen running twice, {} failed sample(s)",
            self.samples,
            INTERVAL,
            self.busy / u32::try_from(self.samples.max(1)).unwrap_or(u32::MAX),
            self.slowest,
            self.violations.len(),
            self.errors
        )
    }

    /// The failure text, if anything was seen twice or could not be read.
    pub fn failure(&self) -> Option<String> {
        if self.violations.is_empty() && self.errors == 0 {
            return None;
        }
        let mut s = self.summary();
        for v in self.violations.values() {
            s.push_str(&format!(
                "\n  {} ran {} times at once: first at +{:?} on [{}], last at +{:?}, in {} sample(s)",
                v.uuid,
                v.max_copies,
                v.first,
                v.where_first.join(", "),
                v.last,
                v.samples
            ));
        }
        if let Some(e) = &self.first_error {
            s.push_str(&format!("\n  a sample failed: {e}"));
        }
        Some(s)
    }
}

/// The UUID after `-uuid` in a NUL-separated command line, lower case.
pub fn uuid_of_cmdline(cmdline: &[u8]) -> Option<String> {
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"-uuid" {
            return args.next().map(|u| String::from_utf8_lossy(u).to_ascii_lowercase());
        }
    }
    None
}

/// The state letter of `/proc/PID/stat` (after the command name).
pub fn state_of_stat(stat: &str) -> Option<char> {
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| state_of_stat(&s))
        .is_some_and(|c| !matches!(c, 'Z' | 'X' | 'x'))
}

/// A lab host's identity on this machine, from its directory.
#[derive(Debug, Clone)]
pub struct HostDir {
    /// Host name.
    pub name: String,
    /// Its `<hostdir>`.
    pub dir: PathBuf,
}

/// A host's PID namespace, if its init runs (`init.pid` = "PID STARTTIME").
fn live_pidns(dir: &Path) -> Option<String> {
    let init = std::fs::read_to_string(dir.join("init.pid")).ok()?;
    let pid: u32 = init.split_whitespace().next()?.parse().ok()?;
    if !running(pid) {
        return None;
    }
    Some(std::fs::read_to_string(dir.join("pidns")).ok()?.trim().to_string())
}

/// One pass over `/proc`: every guest UUID with its running qemu processes.
/// Processes in a host whose init is dead are left out.
pub fn scan(hosts: &[HostDir]) -> Result<HashMap<String, Vec<Qemu>>, String> {
    let mut found: HashMap<String, Vec<u32>> = HashMap::new();
    for e in std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let e = e.map_err(|e| format!("/proc: {e}"))?;
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process that exits meanwhile simply is not counted.
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let Some(uuid) = uuid_of_cmdline(&cmdline) else { continue };
        if running(pid) {
            found.entry(uuid).or_default().push(pid);
        }
    }
    let mut out = HashMap::with_capacity(found.len());
    // Hosts are resolved only for the rare UUID seen more than once.
    let mut live: Option<Vec<(String, String)>> = None;
    for (uuid, pids) in found {
        let copies: Vec<Qemu> = if pids.len() < 2 {
            pids.into_iter().map(|pid| Qemu { pid, host: String::new() }).collect()
        } else {
            let live = live.get_or_insert_with(|| {
                hosts.iter().filter_map(|h| live_pidns(&h.dir).map(|ns| (ns, h.name.clone()))).collect()
            });
            let mut c = Vec::new();
            for pid in pids {
                let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/pid")) else { continue };
                let ns = ns.to_string_lossy().into_owned();
                match live.iter().find(|(n, _)| *n == ns) {
                    Some((_, host)) => c.push(Qemu { pid, host: host.clone() }),
                    // In a lab host whose power is cut: being torn down, not running.
                    None if hosts.iter().any(|h| pidns_of_dead_host(&h.dir, &ns)) => {}
                    None => c.push(Qemu { pid, host: "?".into() }),
                }
            }
            c
        };
        out.insert(uuid, copies);
    }
    Ok(out)
}

/// Whether `ns` is the namespace recorded for a host whose init is not running.
fn pidns_of_dead_host(dir: &Path, ns: &str) -> bool {
    std::fs::read_to_string(dir.join("pidns")).is_ok_and(|n| n.trim() == ns) && live_pidns(dir).is_none()
}

struct Shared {
    start: Instant,
    hosts: Vec<HostDir>,
    book: Mutex<Book>,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sample(&self) {
        let t = Instant::now();
        let r = scan(&self.hosts);
        let at = t.duration_since(self.start);
        let mut b = self.book();
        match r {
            Ok(running) => b.record(at, &running),
            Err(e) => b.record_error(e),
        }
        b.slowest = b.slowest.max(t.elapsed());
        b.busy += t.elapsed();
    }
}

/// The running checker; stop it with [`Checker::stop`].
pub struct Checker {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checker {
    /// Takes a first sample, then samples every [`INTERVAL`] on a thread.
    pub fn start(hosts: Vec<HostDir>) -> Checker {
        let shared = Arc::new(Shared { start: Instant::now(), hosts, book: Mutex::new(Book::default()) });
        shared.sample();
        let (tx, rx) = mpsc::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("copies-checker".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(INTERVAL) {
                    s.sample();
                }
            })
            .expect("spawn the copies checker");
        Checker { shared, stop: Some(tx), thread: Some(thread) }
    }

    /// Allows two copies of `uuid` for `for_at_most` from now.
    pub fn allow_two(&self, uuid: &str, for_at_most: Duration) {
        let until = self.shared.start.elapsed() + for_at_most;
        self.shared.book().allow(uuid, until);
    }

    /// Ends the allowance of `uuid` after a fresh sample. Panics if two
    /// copies still run now; returns what was seen during the allowance.
    pub fn end_allowance(&self, uuid: &str) -> AllowedRun {
        let now = scan(&self.shared.hosts).unwrap_or_else(|e| panic!("copies checker: {e}"));
        let at = self.shared.start.elapsed();
        let n = now.get(&uuid.to_ascii_lowercase()).map_or(0, Vec::len);
        let seen = {
            let mut b = self.shared.book();
            b.record(at, &now);
            b.end_allowance(uuid)
        };
        assert!(n <= 1, "the allowed double run of {uuid} has not ended: {n} copies run now ({now:?})");
        seen
    }

    /// The running copies of `uuid` now (with their hosts).
    pub fn where_runs(&self, uuid: &str) -> Vec<Qemu> {
        let all = scan(&self.shared.hosts).unwrap_or_else(|e| panic!("copies checker: {e}"));
        let mut c = all.get(&uuid.to_ascii_lowercase()).cloned().unwrap_or_default();
        if c.len() == 1 {
            // Single copies are not resolved by `scan`: do it here.
            let ns = std::fs::read_link(format!("/proc/{}/ns/pid", c[0].pid))
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            c[0].host = self
                .shared
                .hosts
                .iter()
                .find(|h| live_pidns(&h.dir).is_some_and(|n| n == ns))
                .map_or("?".into(), |h| h.name.clone());
        }
        c
    }

    /// The hosts it samples.
    pub fn hosts(&self) -> Vec<HostDir> {
        self.shared.hosts.clone()
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.shared.book().samples
    }

    /// The summary line and, if anything was seen twice, the failure text.
    pub fn report(&self) -> (String, Option<String>) {
        let b = self.shared.book();
        (b.summary(), b.failure())
    }

    /// Stops the thread (idempotent).
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies(hosts: &[&str]) -> Vec<Qemu> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Qemu { pid: 100 + u32::try_from(i).unwrap(), host: (*h).into() })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_copy_each_is_no_violation() {
        let mut b = Book::default();
        let mut r = HashMap::new();
        r.insert("u1".to_string(), copies(&["host-a"]));
        r.insert("u2".to_string(), copies(&["host-b"]));
        b.record(ms(0), &r);
        b.record(ms(200), &r);
        assert_eq!(b.samples, 2);
        assert!(b.failure().is_none());
    }

    #[test]
    fn two_copies_are_recorded_once_with_where_and_when() {
        let mut b = Book::default();
        let mut r = HashMap::new();
        r.insert("u1".to_string(), copies(&["host-a", "host-b"]));
        b.record(ms(400), &r);
        r.insert("u1".to_string(), copies(&["host-a", "host-b", "host-c"]));
        b.record(ms(600), &r);
        let v = b.violations();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].first, v[0].last, v[0].samples, v[0].max_copies), (ms(400), ms(600), 2, 3));
        assert_eq!(v[0].where_first, vec!["host-a:100", "host-b:101"]);
        let f = b.failure().unwrap();
        assert!(f.contains("u1 ran 3 times at once") && f.contains("host-a:100, host-b:101"), "{f}");
    }

    #[test]
    fn an_allowance_covers_two_copies_until_it_expires_and_never_three() {
        let mut b = Book::default();
        b.allow("U1", ms(1000));
        let mut r = HashMap::new();
        r.insert("u1".to_string(), copies(&["host-a", "host-b"]));
        b.record(ms(200), &r);
        b.record(ms(1000), &r);
        assert!(b.failure().is_none(), "allowed");
        b.record(ms(1200), &r);
        assert_eq!(b.violations()[0].first, ms(1200), "expired allowance");
        let seen = b.end_allowance("u1");
        assert_eq!((seen.samples, seen.first, seen.last), (2, Some(ms(200)), Some(ms(1000))));

        let mut b = Book::default();
        b.allow("u2", ms(1000));
        let mut r = HashMap::new();
        r.insert("u2".to_string(), copies(&["a", "b", "c"]));
        b.record(ms(100), &r);
        assert_eq!(b.violations().len(), 1, "three copies are never allowed");
    }

    #[test]
    fn an_ended_allowance_allows_nothing() {
        let mut b = Book::default();
        b.allow("u1", ms(10_000));
        b.end_allowance("u1");
        let mut r = HashMap::new();
        r.insert("u1".to_string(), copies(&["host-a", "host-b"]));
        b.record(ms(200), &r);
        assert_eq!(b.violations().len(), 1);
    }

    #[test]
    fn a_failed_sample_fails_the_check() {
        let mut b = Book::default();
        b.record_error("/proc: permission denied".into());
        let f = b.failure().unwrap();
        assert!(f.contains("1 failed sample") && f.contains("permission denied"), "{f}");
    }

    #[test]
    fn cmdline_and_stat_parsing() {
        let c = b"/usr/bin/qemu-system-x86_64\0-name\0guest=vm-a1\0-uuid\0ABCD-1\0-smp\x001\0";
        assert_eq!(uuid_of_cmdline(c).as_deref(), Some("abcd-1"));
        assert_eq!(uuid_of_cmdline(b"/usr/sbin/libvirtd\0-d\0"), None);
        assert_eq!(uuid_of_cmdline(b"qemu\0-uuid"), None, "no value");
        assert_eq!(state_of_stat("1234 (qemu-system-x86) S 1 2 3"), Some('S'));
        assert_eq!(state_of_stat("1234 (a) b) Z 1 2 3"), Some('Z'), "a ) in the name");
        assert_eq!(state_of_stat("garbage"), None);
    }

    #[test]
    fn a_scan_of_this_machine_works() {
        // No lab needed: whatever runs here, the scan reads /proc without error.
        let r = scan(&[]).expect("scan /proc");
        assert!(r.values().all(|c| !c.is_empty()));
    }
}
