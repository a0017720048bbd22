//! Code shared by Lifeboat's binaries: certificate identities and roles,
//! the small PKI behind `lifeboat certs`, TLS configuration loading and
//! logging setup.

#![forbid(unsafe_code)]

pub mod etcd_test;
pub mod files;
pub mod identity;
pub mod logging;
pub mod pki;
pub mod tls;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git revision the binaries were built from.
pub const GIT_REV: &str = env!("LIFEBOAT_GIT_REV");

/// What every binary prints for `--version`: version and git revision.
pub const VERSION_LONG: &str = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("LIFEBOAT_GIT_REV"), ")");

/// An error with its sources, `: `-joined, skipping a source whose text the
/// message already contains (tonic and hyper repeat themselves).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Raises the soft limit on open files to the hard limit. The controller
/// keeps one connection per agent (10,000 hosts need far more than the usual
/// soft limit of 1024), and so does a load generator simulating them.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        // Best effort, as before: a refused raise leaves the soft limit, which the callers report.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The current soft limit on open files (`RLIMIT_NOFILE`), if it can be read.
pub fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft)
}
