//! A real etcd server for tests (Debian's `etcd-server`): one member on
//! 127.0.0.1 with free ports and a fresh data directory, killed and removed
//! when dropped. Not for production code.
//!
//! When `etcd` is not installed, [`Etcd::start_or_skip`] prints
//! `SKIPPED: <why>` and returns `None`; under `CI=true` it panics instead,
//! because CI must not pass by skipping (`scripts/install-deps.sh` installs
//! etcd).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether this runs under CI (`CI=true` or `CI=1`).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A running single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    keep_log: Option<PathBuf>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd, or returns `None` after printing why it cannot (panics
    /// under CI).
    pub fn start_or_skip() -> Option<Etcd> {
        match Etcd::start() {
            Ok(e) => Some(e),
            Err(why) if under_ci() => panic!("cannot start etcd under CI: {why}"),
            Err(why) => {
                println!("SKIPPED: {why}");
                None
            }
        }
    }

    /// Starts etcd in a fresh data directory and waits until it answers.
    pub fn start() -> Result<Etcd, String> {
        let which = Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !which.is_ok_and(|s| s.success()) {
            return Err("etcd is not installed (Debian: apt-get install etcd-server; scripts/install-deps.sh)".into());
        }
        let base = std::env::temp_dir();
        let n = std::process::id();
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let mut dir = base.join(format!("lifeboat-etcd-{n}-{stamp}"));
        let mut i = 0;
        while dir.exists() {
            i += 1;
            dir = base.join(format!("lifeboat-etcd-{n}-{stamp}-{i}"));
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut e = Etcd { child: None, dir, client_port: 0, peer_port: 0, keep_log: None };
        // A free port found here may be taken by a parallel test before etcd
        // binds it: try fresh ports a few times.
        let mut last = String::new();
        for _ in 0..5 {
            e.client_port = free_port().map_err(|e| e.to_string())?;
            e.peer_port = free_port().map_err(|e| e.to_string())?;
            let _ = std::fs::remove_dir_all(e.dir.join("data"));
            match e.spawn() {
                Ok(()) => return Ok(e),
                Err(why) if why.contains("address already in use") => last = why,
                Err(why) => return Err(why),
            }
        }
        Err(last)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", "t0", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t0={peer}"), "--initial-cluster-state", "new"])
            // Lifeboat writes one guarded transaction per change set; its
            // operations guide asks for these limits (docs/operations.md).
            .args(["--max-txn-ops", "10000", "--max-request-bytes", "10485760"])
            .args(["--quota-backend-bytes", "4294967296"])
            // Profiles at /debug/pprof on the client URL (127.0.0.1 only):
            // what a stalled member was doing can be asked.
            .arg("--enable-pprof")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        self.child = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_ok() {
                // The port opens a little before the member serves.
                std::thread::sleep(Duration::from_millis(300));
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!("etcd exited ({st}): {tail}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("etcd did not open its client port within 20 s".into())
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Copies etcd's own log to `to` when this is dropped (the data
    /// directory, log included, is removed then).
    pub fn keep_log(&mut self, to: PathBuf) {
        self.keep_log = Some(to);
    }

    /// Kills the server (SIGKILL); its data stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed server again on the same ports and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if let Some(to) = &self.keep_log {
            let _ = std::fs::copy(self.dir.join("etcd.log"), to);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_etcd_answers_on_its_port_and_stops_when_killed() {
        let Some(mut e) = Etcd::start_or_skip() else { return };
        let addr = e.url().trim_start_matches("http://").to_string();
        assert!(std::net::TcpStream::connect(&addr).is_ok());
        e.kill();
        assert!(std::net::TcpStream::connect(&addr).is_err());
        e.restart().unwrap();
        assert!(std::net::TcpStream::connect(&addr).is_ok());
    }
}
