//! The RPMs built by `scripts/build-rpms.sh`: metadata, file lists, modes,
//! `%config(noreplace)`, scriptlets, systemd units, and the libvirt qemu hook
//! (the start guard, and chaining to a hook that was installed before ours).
//!
//! The first test to get here builds the packages once (release binaries are
//! reused when fresh) into `target/packaging-test/dist`; every test shares them.
//! Packages are installed only into scratch roots (`rpm --root`), never into
//! this machine. Needs root (rpm's scriptlets run chrooted) and rpmbuild
//! (`scripts/install-deps.sh` installs Debian's `rpm`); without them each test
//! prints `SKIPPED: reason`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

const PACKAGES: [&str; 3] = ["lifeboat", "lifeboat-agent", "lifeboat-controller"];

/// What every test shares: the packages and one root they are all installed in
/// (without scriptlets), to read the installed files from.
struct Built {
    version: String,
    rpms: BTreeMap<&'static str, PathBuf>,
    /// Database for `rpm -qp` queries (so they never touch this machine's).
    query_db: PathBuf,
    /// All three packages installed with `--noscripts`.
    extracted: PathBuf,
    scratch: PathBuf,
}

enum Setup {
    Ready(Built),
    Skip(String),
    Failed(String),
}

static SETUP: OnceLock<Setup> = OnceLock::new();

macro_rules! built_or_skip {
    () => {
        match setup() {
            Setup::Ready(b) => b,
            Setup::Skip(why) => {
                eprintln!("SKIPPED: {why}");
                return;
            }
            Setup::Failed(m) => panic!("{m}"),
        }
    };
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => workspace().join(d),
        None => workspace().join("target"),
    }
}

fn euid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file())).unwrap_or(false)
}

fn workspace_version() -> String {
    let text = fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    let mut in_pkg = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_pkg = l == "[workspace.package]";
        } else if in_pkg && l.starts_with("version") {
            return l.split('"').nth(1).expect("quoted version").to_string();
        }
    }
    panic!("no version in [workspace.package]");
}

fn setup() -> &'static Setup {
    SETUP.get_or_init(|| {
        if euid() != 0 {
            return Setup::Skip(
                "not root: installing the RPMs into scratch roots runs their scriptlets chrooted (CI runs as root)"
                    .into(),
            );
        }
        for p in ["rpmbuild", "rpm"] {
            if !in_path(p) {
                return Setup::Skip(format!(
                    "{p} is missing (Debian: apt-get install rpm, or scripts/install-deps.sh)"
                ));
            }
        }
        match build() {
            Ok(b) => Setup::Ready(b),
            Err(m) => Setup::Failed(m),
        }
    })
}

fn build() -> Result<Built, String> {
    let scratch = target_dir().join("packaging-test");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let dist = scratch.join("dist");
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(workspace().join("scripts/build-rpms.sh"))
        .arg("--out")
        .arg(&dist)
        .current_dir(workspace())
        .output()
        .map_err(|e| format!("cannot run scripts/build-rpms.sh: {e}"))?;
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("scripts/build-rpms.sh failed ({}):\n{log}", out.status));
    }
    eprintln!("packaging: scripts/build-rpms.sh took {:.1}s", t.elapsed().as_secs_f64());
    let version = workspace_version();
    let rpm_version = version.replace('-', "~");
    let mut rpms = BTreeMap::new();
    for p in PACKAGES {
        let f = dist.join(format!("{p}-{rpm_version}-1.x86_64.rpm"));
        if !f.is_file() {
            return Err(format!("build-rpms.sh did not write {}:\n{log}", f.display()));
        }
        eprintln!("packaging: {} is {} bytes", f.display(), f.metadata().map(|m| m.len()).unwrap_or(0));
        rpms.insert(p, f);
    }
    let query_db = scratch.join("query-rpmdb");
    fs::create_dir_all(&query_db).map_err(|e| e.to_string())?;
    let extracted = scratch.join("extracted");
    fs::create_dir_all(&extracted).map_err(|e| e.to_string())?;
    let out = Command::new("rpm")
        .arg("--root")
        .arg(&extracted)
        .args(["--dbpath", "/var/lib/rpm", "-i", "--nodeps", "--noscripts"])
        .args(rpms.values())
        .output()
        .map_err(|e| format!("cannot run rpm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "rpm -i --noscripts into {} failed: {}",
            extracted.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Built { version, rpms, query_db, extracted, scratch })
}

impl Built {
    fn rpm(&self, p: &str) -> &Path {
        &self.rpms[p]
    }

    /// `rpm -qp ARGS PACKAGE`, stdout.
    fn query(&self, p: &str, args: &[&str]) -> String {
        let mut c = Command::new("rpm");
        c.arg("--dbpath").arg(&self.query_db).arg("-qp").args(args).arg(self.rpm(p));
        ok(&mut c)
    }

    fn tempdir(&self, prefix: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(prefix).tempdir_in(&self.scratch).expect("tempdir")
    }

    fn file(&self, path: &str) -> PathBuf {
        self.extracted.join(path.trim_start_matches('/'))
    }
}

fn ok(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn run_with_stdin(c: &mut Command, stdin: &[u8]) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    // Write from a thread: the child may exit without reading everything.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = writer.join();
    out
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o7777
}

fn write_exec(p: &Path, text: &str, mode: u32) {
    fs::write(p, text).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn domain_xml(name: &str, uuid: &str, metadata: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  {metadata}\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices/>\n</domain>"
    )
}

fn unmanaged_xml() -> String {
    domain_xml("vm-pkg", "3b0c8f1e-4c55-4c1b-9a7e-0c1d2e3f4a5b", "")
}

fn managed_xml() -> String {
    domain_xml(
        "vm-owned",
        "7d2f3a4b-5c6d-4e7f-8a9b-0c1d2e3f4a5c",
        "<metadata><lb:owner xmlns:lb='https://lifeboat.example/xmlns/owner/1' host='elsewhere' generation='3'/></metadata>",
    )
}

// ------------------------------------------------------------------------------------
// Metadata, file lists, modes, config flags, scriptlets (rpm -qp)

#[test]
fn metadata_of_the_three_packages() {
    let b = built_or_skip!();
    let rpm_version = b.version.replace('-', "~");
    for p in PACKAGES {
        let q = b.query(
            p,
            &["--queryformat", "%{NAME}|%{VERSION}|%{RELEASE}|%{ARCH}|%{LICENSE}|%{PAYLOADCOMPRESSOR}|%{SUMMARY}"],
        );
        let f: Vec<&str> = q.split('|').collect();
        assert_eq!(&f[..6], &[p, rpm_version.as_str(), "1", "x86_64", "Apache-2.0", "xz"], "{p}: {q}");
        assert!(f[6].starts_with("Lifeboat") && f[6].len() > 30, "{p}: summary '{}'", f[6]);
        let desc = b.query(p, &["--queryformat", "%{DESCRIPTION}"]);
        assert!(desc.contains("KVM guests running again") && desc.len() > 200, "{p}: description:\n{desc}");
    }
    // Explicit requirements carry RHEL package names; the rest are generated (sonames).
    let req = b.query("lifeboat-agent", &["--requires"]);
    let req: BTreeSet<&str> = req.lines().map(str::trim).collect();
    for r in ["libvirt-daemon-driver-qemu", "coreutils", "/bin/sh"] {
        assert!(req.contains(r), "lifeboat-agent does not require {r}: {req:?}");
    }
    // libvirt-libs on RHEL, through the generated soname requirement (not named explicitly).
    assert!(req.iter().any(|r| r.starts_with("libvirt.so.0(")), "no generated libvirt.so.0 requirement: {req:?}");
    for p in PACKAGES {
        let req = b.query(p, &["--requires"]);
        for line in req.lines() {
            // Debian package names would be wrong on RHEL (libvirt0, libc6, ...).
            assert!(
                !["libvirt0", "libc6", "libgcc-s1", "systemd-sysv"].contains(&line.trim()),
                "{p} requires the Debian package {line}"
            );
        }
        // The highest glibc symbol version decides the oldest RHEL that can run it.
        let glibc = req
            .lines()
            .filter_map(|l| l.trim().strip_prefix("libc.so.6(GLIBC_"))
            .filter_map(|v| v.strip_suffix(")(64bit)"))
            .map(|v| v.split('.').map(|n| n.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>())
            .max()
            .expect("a generated glibc requirement");
        let shown = glibc.iter().map(u32::to_string).collect::<Vec<_>>().join(".");
        eprintln!("packaging: {p} needs glibc >= {shown} (RHEL 9 has 2.34, RHEL 8 has 2.28)");
        // The packages are built on Debian 12 (glibc 2.36) for RHEL 9: a symbol newer than
        // RHEL 9's glibc would make them uninstallable there.
        assert!(glibc <= vec![2, 34], "{p} needs glibc {shown}, newer than RHEL 9's 2.34");
    }
    for p in ["lifeboat", "lifeboat-controller"] {
        let req = b.query(p, &["--requires"]);
        assert!(!req.contains("libvirt"), "{p} must not need libvirt: {req}");
    }
}

/// path -> (mode as rpm prints it, user, group, flags)
fn file_table(b: &Built, p: &str) -> BTreeMap<String, (String, String, String, String)> {
    b.query(
        p,
        &[
            "--queryformat",
            "[%{FILENAMES}\t%{FILEMODES:octal}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\n]",
        ],
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.len(), 5, "{l}");
        (f[0].to_string(), (f[1].to_string(), f[2].to_string(), f[3].to_string(), f[4].to_string()))
    })
    .collect()
}

#[test]
fn file_lists_modes_and_config_flags() {
    let b = built_or_skip!();
    // (path, mode, flags): "cn" = %config(noreplace), "d" = %doc.
    let agent: &[(&str, &str, &str)] = &[
        ("/etc/lifeboat", "40755", ""),
        ("/etc/lifeboat/agent.toml", "100640", "cn"),
        ("/etc/lifeboat/pki", "40700", ""),
        ("/usr/bin/lifeboat-agent", "100755", ""),
        ("/usr/lib/systemd/system/lifeboat-agent.service", "100644", ""),
        ("/usr/libexec/lifeboat", "40755", ""),
        ("/usr/libexec/lifeboat/qemu-hook", "100755", ""),
        ("/usr/libexec/lifeboat/qemu-hook-setup", "100755", ""),
        ("/usr/share/doc/lifeboat-agent", "40755", ""),
        ("/usr/share/doc/lifeboat-agent/README.md", "100644", "d"),
        ("/usr/share/doc/lifeboat-agent/packaging.md", "100644", "d"),
        ("/usr/share/doc/lifeboat-agent/return.md", "100644", "d"),
        ("/var/lib/lifeboat", "40700", ""),
    ];
    let controller: &[(&str, &str, &str)] = &[
        ("/etc/lifeboat", "40755", ""),
        ("/etc/lifeboat/controller.toml", "100640", "cn"),
        ("/etc/lifeboat/pki", "40700", ""),
        ("/usr/bin/lifeboat-controller", "100755", ""),
        ("/usr/lib/systemd/system/lifeboat-controller.service", "100644", ""),
        ("/usr/share/doc/lifeboat-controller", "40755", ""),
        ("/usr/share/doc/lifeboat-controller/README.md", "100644", "d"),
        ("/usr/share/doc/lifeboat-controller/migrate.md", "100644", "d"),
        ("/usr/share/doc/lifeboat-controller/operations.md", "100644", "d"),
        ("/usr/share/doc/lifeboat-controller/examples", "40755", ""),
        ("/usr/share/doc/lifeboat-controller/examples/controller-etcd.toml", "100644", "d"),
        ("/usr/share/doc/lifeboat-controller/examples/etcd.conf.yml", "100644", "d"),
        ("/var/lib/lifeboat", "40700", ""),
    ];
    for (p, want) in [("lifeboat-agent", agent), ("lifeboat-controller", controller)] {
        let got = file_table(b, p);
        let want_map: BTreeMap<String, (String, String, String, String)> = want
            .iter()
            .map(|(f, m, fl)| (f.to_string(), (m.to_string(), "root".into(), "root".into(), fl.to_string())))
            .collect();
        assert_eq!(got, want_map, "{p}: files (path -> mode, user, group, flags)");
    }
    let cli = file_table(b, "lifeboat");
    for f in [
        "/usr/bin/lifeboat",
        "/usr/share/man/man1/lifeboat.1.gz",
        "/usr/share/bash-completion/completions/lifeboat",
        "/usr/share/zsh/site-functions/_lifeboat",
        "/usr/share/doc/lifeboat/cli.md",
    ] {
        assert!(cli.contains_key(f), "lifeboat lacks {f}: {:?}", cli.keys());
    }
    for (f, (m, u, g, fl)) in &cli {
        assert_eq!((u.as_str(), g.as_str()), ("root", "root"), "{f}");
        let want = if f == "/usr/bin/lifeboat" {
            "100755"
        } else if f == "/usr/share/doc/lifeboat" {
            "40755"
        } else {
            "100644"
        };
        assert_eq!(m, want, "{f} mode");
        assert!(!fl.contains('c'), "{f} must not be a config file");
        assert!(
            f.starts_with("/usr/bin/")
                || f.starts_with("/usr/share/man/man1/lifeboat")
                || f.starts_with("/usr/share/doc/lifeboat")
                || f.contains("completions/lifeboat")
                || f.ends_with("/_lifeboat"),
            "unexpected file {f} in lifeboat"
        );
    }

    // The same, as the plain listings show it.
    assert_eq!(b.query("lifeboat-agent", &["--configfiles"]).trim(), "/etc/lifeboat/agent.toml");
    assert_eq!(b.query("lifeboat-controller", &["--configfiles"]).trim(), "/etc/lifeboat/controller.toml");
    assert_eq!(b.query("lifeboat", &["--configfiles"]).trim(), "");
    let list = b.query("lifeboat-agent", &["--list"]);
    assert_eq!(list.lines().count(), agent.len(), "{list}");
    // --dump: path size mtime digest mode owner group isconfig isdoc rdev symlink
    for line in b.query("lifeboat-agent", &["--dump"]).lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let want_cfg = if f[0] == "/etc/lifeboat/agent.toml" { "1" } else { "0" };
        assert_eq!(f[7], want_cfg, "isconfig in: {line}");
        if f[0] == "/etc/lifeboat/pki" || f[0] == "/var/lib/lifeboat" {
            assert_eq!(f[4], "040700", "{line}");
        }
    }
}

#[test]
fn scriptlets() {
    let b = built_or_skip!();
    let q = |p: &str, tag: &str| b.query(p, &["--queryformat", &format!("%{{{tag}}}")]);
    for p in ["lifeboat-agent", "lifeboat-controller"] {
        let post = q(p, "POSTIN");
        let preun = q(p, "PREUN");
        let postun = q(p, "POSTUN");
        for (name, s) in [("%post", &post), ("%preun", &preun), ("%postun", &postun)] {
            assert!(s != "(none)" && !s.trim().is_empty(), "{p} has no {name}");
            // No unexpanded macros (e.g. %systemd_post where the macro does not exist).
            assert!(!s.contains('%'), "{p} {name} has an unexpanded macro:\n{s}");
            // systemctl only where systemd runs.
            for l in s.lines().filter(|l| l.trim_start().starts_with("systemctl ")) {
                assert!(l.trim_end().ends_with("|| :"), "{p} {name}: unguarded systemctl: {l}");
            }
            assert!(
                !s.contains("systemctl") || s.contains("[ -d /run/systemd/system ] && command -v systemctl"),
                "{p} {name} calls systemctl without checking that systemd runs:\n{s}"
            );
            // Syntax, with dash (stricter than bash).
            let out = run_with_stdin(Command::new("sh").arg("-n").arg("-c").arg(s), b"");
            assert!(out.status.success(), "{p} {name}: sh -n: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(preun.contains("if [ \"$1\" -eq 0 ]; then"), "{p} %preun must act only on erase:\n{preun}");
        assert!(post.contains("daemon-reload") && postun.contains("daemon-reload"));
        assert!(postun.contains("try-restart"), "{p} %postun should restart the service on upgrade");
        assert_eq!(q(p, "PREIN"), "(none)");
        assert_eq!(q(p, "POSTINPROG"), "/bin/sh");
    }
    let post = q("lifeboat-agent", "POSTIN");
    let preun = q("lifeboat-agent", "PREUN");
    assert!(post.contains("/usr/libexec/lifeboat/qemu-hook-setup install || :"), "{post}");
    assert!(preun.contains("/usr/libexec/lifeboat/qemu-hook-setup remove || :"), "{preun}");
    assert!(!q("lifeboat-controller", "POSTIN").contains("qemu-hook"));
    // The CLI has no scriptlets.
    assert_eq!(b.query("lifeboat", &["--scripts"]).trim(), "");
    // The plain listing shows them too.
    let all = b.query("lifeboat-agent", &["--scripts"]);
    for s in ["postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"] {
        assert!(all.contains(s), "{all}");
    }
}

// ------------------------------------------------------------------------------------
// Installed files: units, configs, CLI man pages and completions

/// `[Section]` -> [(key, value)], in order.
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section = String::new();
    for (n, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        assert!(!l.ends_with('\\'), "line {}: continuation lines are not expected: {raw}", n + 1);
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            out.entry(section.clone()).or_default();
            continue;
        }
        let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {raw}", n + 1));
        assert!(!section.is_empty(), "line {}: outside any section: {raw}", n + 1);
        out.entry(section.clone()).or_default().push((k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values(u: &BTreeMap<String, Vec<(String, String)>>, section: &str, key: &str) -> Vec<String> {
    u.get(section).map(|kv| kv.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()).unwrap_or_default()
}

fn unit_list(u: &BTreeMap<String, Vec<(String, String)>>, section: &str, key: &str) -> BTreeSet<String> {
    unit_values(u, section, key).iter().flat_map(|v| v.split_whitespace().map(str::to_string)).collect()
}

fn unit_one(u: &BTreeMap<String, Vec<(String, String)>>, section: &str, key: &str) -> String {
    let v = unit_values(u, section, key);
    assert_eq!(v.len(), 1, "[{section}] {key}: {v:?}");
    v[0].clone()
}

#[test]
fn systemd_units() {
    let b = built_or_skip!();
    let agent_text = fs::read_to_string(b.file("/usr/lib/systemd/system/lifeboat-agent.service")).unwrap();
    let ctl_text = fs::read_to_string(b.file("/usr/lib/systemd/system/lifeboat-controller.service")).unwrap();

    let a = parse_unit(&agent_text);
    let known: BTreeSet<&str> = ["Unit", "Service", "Install"].into();
    assert!(a.keys().all(|k| known.contains(k.as_str())), "{:?}", a.keys());
    assert_eq!(unit_one(&a, "Service", "Type"), "notify");
    assert_eq!(unit_one(&a, "Service", "WatchdogSec"), "30");
    assert_eq!(unit_one(&a, "Service", "Restart"), "on-failure");
    assert_eq!(unit_one(&a, "Service", "ExecStart"), "/usr/bin/lifeboat-agent --config /etc/lifeboat/agent.toml");
    let after = unit_list(&a, "Unit", "After");
    for u in ["libvirtd.service", "virtqemud.service"] {
        assert!(after.contains(u), "agent: After= lacks {u}: {after:?}");
    }
    // Deliberately not Wants=libvirtd.service: virtqemud.service (libvirt's modular daemons,
    // RHEL 9's default) has Conflicts=libvirtd.service, so wanting libvirtd would stop it.
    assert!(!unit_list(&a, "Unit", "Wants").contains("libvirtd.service"), "see packaging/README.md");
    assert!(!unit_list(&a, "Unit", "Requires").iter().any(|u| u.starts_with("libvirtd") || u.starts_with("virtqemud")));
    assert_eq!(unit_one(&a, "Install", "WantedBy"), "multi-user.target");

    let c = parse_unit(&ctl_text);
    assert!(c.keys().all(|k| known.contains(k.as_str())), "{:?}", c.keys());
    assert_eq!(unit_one(&c, "Service", "Type"), "simple");
    // Always: exit status 3 = lost leadership (etcd backend), restart as a follower at once;
    // never give up; status 2 (configuration refused) is not retried.
    assert_eq!(unit_one(&c, "Service", "Restart"), "always");
    assert_eq!(unit_one(&c, "Service", "RestartSec"), "1s");
    assert_eq!(unit_one(&c, "Service", "RestartPreventExitStatus"), "2");
    assert_eq!(unit_one(&c, "Unit", "StartLimitIntervalSec"), "0");
    assert_eq!(
        unit_one(&c, "Service", "ExecStart"),
        "/usr/bin/lifeboat-controller --config /etc/lifeboat/controller.toml"
    );
    assert_eq!(
        unit_one(&c, "Service", "LimitNOFILE"),
        "65536",
        "one socket per agent: 10,000 hosts need more than 1024 files"
    );
    assert_eq!(unit_one(&c, "Install", "WantedBy"), "multi-user.target");

    // systemd's own check, in a root holding this machine's units, ours and our binaries
    // (it checks that ExecStart is executable, and that every dependency resolves).
    if !in_path("systemd-analyze") {
        eprintln!(
            "packaging: systemd-analyze verify not run: systemd-analyze is missing (apt-get install systemd); checked the unit text only"
        );
        return;
    }
    let host_units = Path::new("/usr/lib/systemd/system");
    if !host_units.join("multi-user.target").exists() {
        eprintln!(
            "packaging: systemd-analyze verify not run: this machine has no systemd units in {}; checked the unit text only",
            host_units.display()
        );
        return;
    }
    let root = b.tempdir("verify-");
    let units = root.path().join("usr/lib/systemd/system");
    fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    fs::create_dir_all(&units).unwrap();
    ok(Command::new("cp").arg("-a").arg(format!("{}/.", host_units.display())).arg(&units));
    // A control unit: if even this fails, verify cannot work here.
    fs::write(
        units.join("lifeboat-control.service"),
        "[Unit]\nDescription=control\n[Service]\nExecStart=/usr/bin/lifeboat-agent --version\n",
    )
    .unwrap();
    for bin in ["lifeboat-agent", "lifeboat-controller"] {
        fs::copy(b.file(&format!("/usr/bin/{bin}")), root.path().join("usr/bin").join(bin)).unwrap();
    }
    let verify = |unit: &str| {
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(format!("/usr/lib/systemd/system/{unit}"))
            .output()
            .expect("systemd-analyze")
    };
    let control = verify("lifeboat-control.service");
    if !control.status.success() {
        eprintln!(
            "packaging: systemd-analyze verify cannot run here (a trivial unit fails: {}); checked the unit text only",
            String::from_utf8_lossy(&control.stderr).trim()
        );
        return;
    }
    for unit in ["lifeboat-agent.service", "lifeboat-controller.service"] {
        fs::copy(b.file(&format!("/usr/lib/systemd/system/{unit}")), units.join(unit)).unwrap();
        let out = verify(unit);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // verify exits 0 on "ignoring" warnings: any message about our unit is a failure.
        assert!(out.status.success() && !text.contains("lifeboat"), "systemd-analyze verify {unit}:\n{text}");
        eprintln!("packaging: systemd-analyze verify {unit}: OK");
    }
}

#[test]
fn shipped_configs_are_valid() {
    let b = built_or_skip!();
    let dir = b.tempdir("configs-");
    let pki = dir.path().join("pki");
    let cli = b.file("/usr/bin/lifeboat");
    ok(Command::new(&cli).args(["certs", "init"]).arg(dir.path().join("ca")));
    ok(Command::new(&cli)
        .args(["certs", "issue", "--ca-dir"])
        .arg(dir.path().join("ca"))
        .arg("--out")
        .arg(&pki)
        .args(["--agent", "pkg-test"]));
    ok(Command::new(&cli)
        .args(["certs", "issue", "--ca-dir"])
        .arg(dir.path().join("ca"))
        .arg("--out")
        .arg(&pki)
        .args(["--controller", "--san", "localhost"]));
    fs::copy(dir.path().join("ca/ca.pem"), pki.join("ca.pem")).unwrap();
    fs::rename(pki.join("agent-pkg-test.pem"), pki.join("agent.pem")).unwrap();
    fs::rename(pki.join("agent-pkg-test.key"), pki.join("agent.key")).unwrap();
    let repoint = |text: &str| text.replace("/etc/lifeboat/pki/", &format!("{}/", pki.display()));

    // agent.toml exactly as shipped, with its certificate paths pointed at test certificates
    // and the host id of the test certificate.
    let agent = fs::read_to_string(b.file("/etc/lifeboat/agent.toml")).unwrap();
    assert!(agent.contains("[controller]") && agent.contains("url = \"https://"), "{agent}");
    let cfg = dir.path().join("agent.toml");
    fs::write(&cfg, format!("host_id = \"pkg-test\"\n{}", repoint(&agent))).unwrap();
    let out = ok(Command::new(b.file("/usr/bin/lifeboat-agent")).arg("--config").arg(&cfg).arg("check-config"));
    assert!(out.contains("configuration OK"), "{out}");

    let ctl = fs::read_to_string(b.file("/etc/lifeboat/controller.toml")).unwrap();
    let cfg = dir.path().join("controller.toml");
    fs::write(&cfg, repoint(&ctl).replace("/var/lib/lifeboat/", &format!("{}/", dir.path().display()))).unwrap();
    // A start never creates the database: check-config names `init` until it exists.
    let out = Command::new(b.file("/usr/bin/lifeboat-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("does not exist") && err.contains("init"), "{err}");
    ok(Command::new(b.file("/usr/bin/lifeboat-controller")).arg("--config").arg(&cfg).arg("init"));
    let out = ok(Command::new(b.file("/usr/bin/lifeboat-controller")).arg("--config").arg(&cfg).arg("--check-config"));
    assert!(out.contains("configuration OK"), "{out}");

    // The start guard reads agent.toml as shipped (nothing configured yet): it must parse, so
    // that guests Lifeboat never leased still start on a host where the agent is installed
    // but not configured. (Its host id comes from /etc/machine-id.)
    let machine_id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    if machine_id.trim().is_empty() {
        eprintln!("packaging: /etc/machine-id is empty here: guard with the unmodified agent.toml not checked");
        return;
    }
    let out = run_with_stdin(
        Command::new(b.file("/usr/bin/lifeboat-agent"))
            .arg("--config")
            .arg(b.file("/etc/lifeboat/agent.toml"))
            .args(["guard", "vm-pkg", "prepare", "begin", "-"]),
        unmanaged_xml().as_bytes(),
    );
    assert!(
        out.status.success(),
        "guard with the shipped agent.toml refused an unmanaged guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The high-availability examples shipped in the controller package's docs: the controller
/// configuration parses with `[store] backend = "etcd"` (TLS to etcd, an advertise_url, timings
/// that pass the failover check), and the etcd member carries the flags Lifeboat needs.
/// Needs no RPM: it reads the files in packaging/.
#[test]
fn ha_example_configs() {
    use lifeboat_controller::config::{Backend, ControllerConfig};
    let p = workspace().join("packaging/config/controller-etcd.toml");
    let text = fs::read_to_string(&p).unwrap();
    let cfg = ControllerConfig::parse(&text, &p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.store.backend, Backend::Etcd);
    assert_eq!(cfg.store.endpoints.len(), 3, "three etcd members");
    assert!(cfg.store.endpoints.iter().all(|e| e.starts_with("https://")), "{:?}", cfg.store.endpoints);
    assert!(cfg.store.ca.is_some() && cfg.store.cert.is_some() && cfg.store.key.is_some(), "TLS to etcd");
    assert!(cfg.store.advertise_url.as_deref().is_some_and(|u| u.starts_with("https://")));
    let etcd = fs::read_to_string(workspace().join("packaging/config/etcd.conf.yml")).unwrap();
    for line in [
        "max-txn-ops: 10000",
        "max-request-bytes: 10485760",
        "quota-backend-bytes:",
        "auto-compaction-retention:",
        "client-cert-auth: true",
    ] {
        assert!(etcd.lines().any(|l| l.trim_start().starts_with(line)), "etcd.conf.yml lacks {line}");
    }
}

#[test]
fn cli_man_pages_and_completions_are_generated() {
    let b = built_or_skip!();
    let man1 = b.file("/usr/share/man/man1");
    let page = |name: &str| {
        let out = Command::new("gzip").arg("-dc").arg(man1.join(format!("{name}.1.gz"))).output().expect("gzip");
        assert!(out.status.success(), "{name}.1.gz: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let root = page("lifeboat");
    assert!(root.contains(".TH lifeboat"), "{root}");
    // One page per subcommand of the CLI as built.
    let help = ok(Command::new(b.file("/usr/bin/lifeboat")).arg("--help"));
    let subcommands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("Commands: in --help")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(subcommands.len() >= 5, "{help}");
    for c in &subcommands {
        let p = page(&format!("lifeboat-{c}"));
        assert!(p.contains(&format!(".TH lifeboat-{c}")), "lifeboat-{c}.1:\n{p}");
    }
    let bash = b.file("/usr/share/bash-completion/completions/lifeboat");
    let text = fs::read_to_string(&bash).unwrap();
    assert!(text.contains("complete ") && text.contains("lifeboat"), "{text}");
    ok(Command::new("bash").arg("-n").arg(&bash));
    for c in &subcommands {
        assert!(text.contains(c), "bash completion does not know '{c}'");
    }
    let zsh = fs::read_to_string(b.file("/usr/share/zsh/site-functions/_lifeboat")).unwrap();
    assert!(zsh.starts_with("#compdef lifeboat"), "{}", &zsh[..zsh.len().min(200)]);
    // Completing in a real bash: `lifeboat ho<TAB>` offers hosts.
    let script = format!(
        "source {}; COMP_WORDS=(lifeboat ho); COMP_CWORD=1; COMP_LINE='lifeboat ho'; COMP_POINT=11; _lifeboat lifeboat ho lifeboat; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let out = ok(Command::new("bash").arg("-c").arg(script));
    assert!(out.lines().any(|l| l == "hosts"), "bash completion of 'lifeboat ho': {out:?}");
}

// ------------------------------------------------------------------------------------
// The qemu hook and its setup helper, in scratch directories (paths overridden by the
// environment variables the scripts document for tests).

/// A hook directory with a pre-existing hook that records its arguments and stdin.
struct HookDir {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    log: PathBuf,
}

const ORIGINAL_HOOK: &str = "#!/bin/sh\n# an administrator's own qemu hook\nprintf '%s\\n' \"$@\" > \"$LOG/args\"\ncat > \"$LOG/stdin\"\necho chained-stdout\nexit \"${CHAINED_EXIT:-0}\"\n";

fn hook_dir(b: &Built, with_original: bool) -> HookDir {
    let tmp = b.tempdir("hooks-");
    let dir = tmp.path().join("hooks");
    let log = tmp.path().join("log");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&log).unwrap();
    if with_original {
        write_exec(&dir.join("qemu"), ORIGINAL_HOOK, 0o750);
    }
    HookDir { _tmp: tmp, dir, log }
}

fn hook_setup(b: &Built, h: &HookDir, action: &str) -> Output {
    Command::new(b.file("/usr/libexec/lifeboat/qemu-hook-setup"))
        .arg(action)
        .env("LIFEBOAT_HOOK_DIR", &h.dir)
        .env("LIFEBOAT_QEMU_HOOK", b.file("/usr/libexec/lifeboat/qemu-hook"))
        .output()
        .unwrap()
}

#[test]
fn hook_setup_chains_an_existing_hook_and_restores_it() {
    let b = built_or_skip!();
    let h = hook_dir(b, true);
    let qemu = h.dir.join("qemu");
    let chained = h.dir.join("qemu.lifeboat-chained");
    let before = fs::read(&qemu).unwrap();
    let ino = fs::metadata(&qemu).unwrap().ino();

    let out = hook_setup(b, &h, "install");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("qemu.lifeboat-chained") && said.contains("restart libvirtd"), "{said}");
    assert_eq!(fs::read_link(&qemu).unwrap(), b.file("/usr/libexec/lifeboat/qemu-hook"));
    assert_eq!(fs::read(&chained).unwrap(), before);
    assert_eq!(mode(&chained), 0o750);
    assert_eq!(fs::metadata(&chained).unwrap().ino(), ino, "the original is renamed, not copied");

    // Again (an upgrade's %post): nothing changes, the chained hook stays.
    let out = hook_setup(b, &h, "install");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already installed"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("restart"), "no restart needed when nothing changed");
    assert_eq!(fs::read(&chained).unwrap(), before);
    let status = String::from_utf8(hook_setup(b, &h, "status").stdout).unwrap();
    assert!(status.contains("installed:") && status.contains("chained hook"), "{status}");

    let out = hook_setup(b, &h, "remove");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!chained.exists());
    assert!(!qemu.is_symlink());
    assert_eq!(fs::read(&qemu).unwrap(), before, "original restored byte for byte");
    assert_eq!(mode(&qemu), 0o750, "original's mode restored");
    assert_eq!(fs::metadata(&qemu).unwrap().ino(), ino);
    let names: Vec<_> = fs::read_dir(&h.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "nothing left behind: {names:?}");
}

#[test]
fn hook_setup_edge_cases() {
    let b = built_or_skip!();
    // No hook before: ours alone; removal leaves no hook.
    let h = hook_dir(b, false);
    assert!(hook_setup(b, &h, "install").status.success());
    assert!(h.dir.join("qemu").is_symlink() && !h.dir.join("qemu.lifeboat-chained").exists());
    assert!(hook_setup(b, &h, "remove").status.success());
    assert!(fs::read_dir(&h.dir).unwrap().next().is_none());
    // The hook directory does not exist yet.
    let h = hook_dir(b, false);
    fs::remove_dir(&h.dir).unwrap();
    assert!(hook_setup(b, &h, "install").status.success());
    assert!(h.dir.join("qemu").is_symlink());

    // The hand-installed guard of README.md is replaced, not chained (it would run twice).
    let h = hook_dir(b, false);
    write_exec(
        &h.dir.join("qemu"),
        "#!/bin/sh\nexec /usr/bin/lifeboat-agent --config /etc/lifeboat/agent.toml guard \"$@\"\n",
        0o755,
    );
    let out = hook_setup(b, &h, "install");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hand-installed"));
    assert!(h.dir.join("qemu").is_symlink() && !h.dir.join("qemu.lifeboat-chained").exists());

    // Someone else's hook AND a chained one: nothing is touched, the helper says why.
    let h = hook_dir(b, true);
    write_exec(&h.dir.join("qemu.lifeboat-chained"), "#!/bin/sh\nexit 0\n", 0o755);
    let out = hook_setup(b, &h, "install");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT installing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(h.dir.join("qemu")).unwrap(), ORIGINAL_HOOK);
    // Removing when the hook is not ours leaves both alone.
    let out = hook_setup(b, &h, "remove");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read_to_string(h.dir.join("qemu")).unwrap(), ORIGINAL_HOOK);
    assert!(h.dir.join("qemu.lifeboat-chained").exists());

    // A symlink as the original hook is kept as a symlink (same target).
    let h = hook_dir(b, false);
    std::os::unix::fs::symlink("/opt/vendor/hook", h.dir.join("qemu")).unwrap();
    assert!(hook_setup(b, &h, "install").status.success());
    assert_eq!(fs::read_link(h.dir.join("qemu.lifeboat-chained")).unwrap(), Path::new("/opt/vendor/hook"));
    assert!(hook_setup(b, &h, "remove").status.success());
    assert_eq!(fs::read_link(h.dir.join("qemu")).unwrap(), Path::new("/opt/vendor/hook"));

    // Removing when ours was removed by hand but the chained one is still there: restored.
    let h = hook_dir(b, true);
    assert!(hook_setup(b, &h, "install").status.success());
    fs::remove_file(h.dir.join("qemu")).unwrap();
    assert!(hook_setup(b, &h, "remove").status.success());
    assert_eq!(fs::read_to_string(h.dir.join("qemu")).unwrap(), ORIGINAL_HOOK);

    let out = hook_setup(b, &h, "bogus");
    assert_eq!(out.status.code(), Some(2));
}

/// Runs the packaged hook script as libvirt would (4 arguments, XML on stdin).
fn call_hook(
    b: &Built,
    h: &HookDir,
    agent: &Path,
    config: &Path,
    args: [&str; 4],
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Output {
    let mut c = Command::new(b.file("/usr/libexec/lifeboat/qemu-hook"));
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LIFEBOAT_AGENT_BIN", agent)
        .env("LIFEBOAT_AGENT_CONFIG", config)
        .env("LIFEBOAT_HOOK_DIR", &h.dir)
        .env("LOG", &h.log)
        .env("TMPDIR", h.log.parent().unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    run_with_stdin(&mut c, stdin)
}

/// A config for the real agent binary: the shipped agent.toml with this test's host id and
/// state directory.
fn guard_config(b: &Built, h: &HookDir) -> PathBuf {
    let state = h.log.parent().unwrap().join("state");
    fs::create_dir_all(&state).unwrap();
    let shipped = fs::read_to_string(b.file("/etc/lifeboat/agent.toml")).unwrap();
    let cfg = h.log.parent().unwrap().join("agent.toml");
    fs::write(&cfg, format!("host_id = \"pkg-test\"\nstate_dir = \"{}\"\n{shipped}", state.display())).unwrap();
    cfg
}

#[test]
fn hook_runs_the_real_guard_then_the_chained_hook_with_the_same_args_and_stdin() {
    let b = built_or_skip!();
    let h = hook_dir(b, true);
    assert!(hook_setup(b, &h, "install").status.success());
    let agent = b.file("/usr/bin/lifeboat-agent");
    let cfg = guard_config(b, &h);
    let hook = h.dir.join("qemu"); // the symlink, as libvirt runs it
    assert!(hook.is_symlink());

    // A guest Lifeboat never leased: the guard allows, the original hook runs with the same
    // arguments and exactly the same stdin (large, no trailing newline).
    let mut xml = unmanaged_xml().into_bytes();
    xml.extend(std::iter::repeat_n(b' ', 300_000));
    xml.extend(b"<!-- end -->");
    let out = call_hook(b, &h, &agent, &cfg, ["vm-pkg", "prepare", "begin", "-"], &xml, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(h.log.join("args")).unwrap(), "vm-pkg\nprepare\nbegin\n-\n");
    assert!(fs::read(h.log.join("stdin")).unwrap() == xml, "the chained hook got other stdin");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "chained-stdout\n", "stdout is the chained hook's only");

    // The chained hook's exit status is the hook's.
    let out = call_hook(
        b,
        &h,
        &agent,
        &cfg,
        ["vm-pkg", "start", "begin", "-"],
        unmanaged_xml().as_bytes(),
        &[("CHAINED_EXIT", "7")],
    );
    assert_eq!(out.status.code(), Some(7));

    // A managed guest without a lease here: refused by the guard, the original never runs.
    fs::remove_file(h.log.join("args")).unwrap();
    let out = call_hook(b, &h, &agent, &cfg, ["vm-owned", "prepare", "begin", "-"], managed_xml().as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Lifeboat start guard: refusing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!h.log.join("args").exists(), "the chained hook ran after a refusal");

    // Operations that do not start a guest pass through to the original with their stdin.
    let out = call_hook(b, &h, &agent, &cfg, ["vm-owned", "release", "end", "-"], managed_xml().as_bytes(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(h.log.join("args")).unwrap(), "vm-owned\nrelease\nend\n-\n");
    assert_eq!(fs::read(h.log.join("stdin")).unwrap(), managed_xml().as_bytes());

    // No temporary files left behind.
    let tmp = h.log.parent().unwrap();
    let left: Vec<_> = fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lifeboat-qemu-hook"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A chained hook that is not executable is not run (like libvirt would not have run it).
    fs::set_permissions(h.dir.join("qemu.lifeboat-chained"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::remove_file(h.log.join("args")).unwrap();
    let out = call_hook(b, &h, &agent, &cfg, ["vm-pkg", "prepare", "begin", "-"], unmanaged_xml().as_bytes(), &[]);
    assert!(out.status.success());
    assert!(!h.log.join("args").exists());

    // No chained hook: the guard alone decides.
    let h = hook_dir(b, false);
    assert!(hook_setup(b, &h, "install").status.success());
    let cfg = guard_config(b, &h);
    let out = call_hook(b, &h, &agent, &cfg, ["vm-pkg", "prepare", "begin", "-"], unmanaged_xml().as_bytes(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = call_hook(b, &h, &agent, &cfg, ["vm-owned", "prepare", "begin", "-"], managed_xml().as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(1));
    // An unreadable config fails closed for starts, and never fails other operations.
    let missing = h.dir.join("missing.toml");
    let out = call_hook(b, &h, &agent, &missing, ["vm-pkg", "prepare", "begin", "-"], unmanaged_xml().as_bytes(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let out =
        call_hook(b, &h, &agent, &missing, ["vm-pkg", "reconnect", "begin", "-"], unmanaged_xml().as_bytes(), &[]);
    assert!(
        out.status.success(),
        "reconnect must never fail (libvirt would kill the guest): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hook_plumbing_with_a_stand_in_guard() {
    let b = built_or_skip!();
    let h = hook_dir(b, true);
    assert!(hook_setup(b, &h, "install").status.success());
    // A stand-in for lifeboat-agent that records what it got, prints on stdout (which must
    // not reach libvirt) and exits with $GUARD_EXIT.
    let fake = h.log.parent().unwrap().join("fake-agent");
    write_exec(
        &fake,
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$LOG/guard-args\"\ncat > \"$LOG/guard-stdin\"\necho guard-stdout\nexit \"${GUARD_EXIT:-0}\"\n",
        0o755,
    );
    let cfg = Path::new("/etc/lifeboat/agent.toml");
    let xml = managed_xml();
    let out = call_hook(b, &h, &fake, cfg, ["vm-x", "migrate", "begin", "-"], xml.as_bytes(), &[]);
    assert!(out.status.success());
    assert_eq!(
        fs::read_to_string(h.log.join("guard-args")).unwrap(),
        "--config\n/etc/lifeboat/agent.toml\nguard\nvm-x\nmigrate\nbegin\n-\n"
    );
    assert_eq!(fs::read(h.log.join("guard-stdin")).unwrap(), xml.as_bytes());
    assert_eq!(fs::read(h.log.join("stdin")).unwrap(), xml.as_bytes());
    // For migrate and restore libvirt reads a changed domain XML from the hook's stdout: only
    // the chained hook may write there.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "chained-stdout\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("guard-stdout"));
    // The guard's exit status, whatever it is, is the hook's; the original does not run.
    fs::remove_file(h.log.join("args")).unwrap();
    for code in ["1", "2", "42"] {
        let out =
            call_hook(b, &h, &fake, cfg, ["vm-x", "prepare", "begin", "-"], xml.as_bytes(), &[("GUARD_EXIT", code)]);
        assert_eq!(out.status.code(), Some(code.parse().unwrap()));
        assert!(!h.log.join("args").exists());
    }
    // No place for the copy of stdin (TMPDIR unusable): starts fail closed, other operations
    // still reach the original hook with the original stdin.
    let bad = [("TMPDIR", "/nonexistent/lifeboat")];
    let out = call_hook(b, &h, &fake, cfg, ["vm-x", "prepare", "begin", "-"], xml.as_bytes(), &bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fail closed"));
    assert!(!h.log.join("args").exists());
    let out = call_hook(b, &h, &fake, cfg, ["vm-x", "stopped", "end", "-"], xml.as_bytes(), &bad);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(h.log.join("stdin")).unwrap(), xml.as_bytes());
}

// ------------------------------------------------------------------------------------
// The real thing: rpm installs, upgrades and erases the agent in a scratch root, with its
// scriptlets running chrooted; libvirt's hook is then run there exactly as libvirt runs it.

/// A root with just what the scriptlets, the hook and the agent binary need (this
/// machine's sh, coreutils and shared libraries), and /etc/libvirt/hooks.
fn minimal_root(b: &Built) -> tempfile::TempDir {
    let root = b.tempdir("root-");
    let r = root.path();
    for d in ["usr/bin", "usr/lib", "usr/lib64", "etc/libvirt/hooks", "dev", "tmp", "var/lib/rpm", "run"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    for (link, to) in [("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(to, r.join(link)).unwrap();
    }
    ok(Command::new("mknod").args(["-m", "666"]).arg(r.join("dev/null")).args(["c", "1", "3"]));
    let mut bins: Vec<PathBuf> = ["sh", "cat", "mv", "ln", "rm", "mkdir", "readlink", "mktemp"]
        .iter()
        .map(|p| {
            let path =
                std::env::split_paths(&std::env::var_os("PATH").unwrap()).map(|d| d.join(p)).find(|f| f.is_file());
            path.unwrap_or_else(|| panic!("{p} not found"))
        })
        .collect();
    bins.push(b.file("/usr/bin/lifeboat-agent")); // only for its libraries
    for bin in &bins {
        let name = bin.file_name().unwrap();
        if name != "lifeboat-agent" {
            fs::copy(bin, r.join("usr/bin").join(name)).unwrap();
        }
        let ldd = ok(Command::new("ldd").arg(bin));
        for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
            let dest = r.join(lib.trim_start_matches('/'));
            if !dest.exists() {
                fs::create_dir_all(dest.parent().unwrap()).unwrap();
                fs::copy(lib, &dest).unwrap_or_else(|e| panic!("{lib}: {e}"));
            }
        }
    }
    fs::write(r.join("etc/machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    root
}

fn rpm_in(root: &Path, args: &[&str], pkgs: &[&Path]) -> Output {
    Command::new("rpm")
        .arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm"])
        .args(args)
        .args(pkgs)
        .output()
        .expect("rpm")
}

fn rpm_ok(root: &Path, args: &[&str], pkgs: &[&Path]) -> String {
    let out = rpm_in(root, args, pkgs);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rpm {args:?} failed:\n{text}");
    text
}

/// libvirt's call, inside the root: /etc/libvirt/hooks/qemu with the XML on stdin.
fn libvirt_calls_hook(root: &Path, args: [&str; 4], xml: &[u8]) -> Output {
    run_with_stdin(
        Command::new("chroot")
            .arg(root)
            .arg("/etc/libvirt/hooks/qemu")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C"),
        xml,
    )
}

#[test]
fn rpm_install_upgrade_erase_with_scriptlets_keeps_the_existing_hook() {
    let b = built_or_skip!();
    let t = Instant::now();
    let root = minimal_root(b);
    let r = root.path();
    let hooks = r.join("etc/libvirt/hooks");
    let original = "#!/bin/sh\n# site hook: logs every call\nprintf '%s\\n' \"$@\" > /tmp/orig-args\ncat > /tmp/orig-stdin\nexit 0\n";
    write_exec(&hooks.join("qemu"), original, 0o700);
    let agent_rpm = b.rpm("lifeboat-agent");

    // Install, scriptlets included.
    let said = rpm_ok(r, &["-i", "--nodeps"], &[agent_rpm]);
    assert!(said.contains("moved the existing hook") && said.contains("restart libvirtd"), "{said}");
    assert_eq!(fs::read_link(hooks.join("qemu")).unwrap(), Path::new("/usr/libexec/lifeboat/qemu-hook"));
    assert_eq!(fs::read_to_string(hooks.join("qemu.lifeboat-chained")).unwrap(), original);
    assert_eq!(mode(&hooks.join("qemu.lifeboat-chained")), 0o700);
    for (p, m) in [
        ("usr/bin/lifeboat-agent", 0o755),
        ("etc/lifeboat/agent.toml", 0o640),
        ("etc/lifeboat/pki", 0o700),
        ("var/lib/lifeboat", 0o700),
        ("usr/libexec/lifeboat/qemu-hook", 0o755),
        ("usr/lib/systemd/system/lifeboat-agent.service", 0o644),
    ] {
        assert_eq!(mode(&r.join(p)), m, "{p}");
    }
    let v = rpm_in(r, &["-V", "--nodeps", "lifeboat-agent"], &[]);
    assert!(v.status.success(), "rpm -V: {}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));

    // libvirt calls the hook (production paths, shipped config; machine id from the root):
    // an unmanaged guest starts and the site hook sees the same call and the same XML.
    let xml = unmanaged_xml();
    let out = libvirt_calls_hook(r, ["vm-pkg", "prepare", "begin", "-"], xml.as_bytes());
    assert!(out.status.success(), "hook in the root: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(r.join("tmp/orig-args")).unwrap(), "vm-pkg\nprepare\nbegin\n-\n");
    assert_eq!(fs::read_to_string(r.join("tmp/orig-stdin")).unwrap(), xml);
    // A guest owned by Lifeboat without a lease on this host is refused; the site hook does not run.
    fs::remove_file(r.join("tmp/orig-args")).unwrap();
    let out = libvirt_calls_hook(r, ["vm-owned", "prepare", "begin", "-"], managed_xml().as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Lifeboat start guard: refusing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!r.join("tmp/orig-args").exists());

    // The administrator edits agent.toml; then an upgrade (the same package again: new %post
    // with 2, old %preun/%postun with 1) keeps the edit and the chained hook.
    let cfg = r.join("etc/lifeboat/agent.toml");
    let edited = format!("host_id = \"kvm01\"\n{}", fs::read_to_string(&cfg).unwrap());
    fs::write(&cfg, &edited).unwrap();
    let said = rpm_ok(r, &["-U", "--replacepkgs", "--nodeps"], &[agent_rpm]);
    assert!(said.contains("already installed"), "{said}");
    assert_eq!(fs::read_to_string(&cfg).unwrap(), edited, "%config(noreplace) kept the edit");
    assert_eq!(fs::read_link(hooks.join("qemu")).unwrap(), Path::new("/usr/libexec/lifeboat/qemu-hook"));
    assert_eq!(fs::read_to_string(hooks.join("qemu.lifeboat-chained")).unwrap(), original);
    let out = libvirt_calls_hook(r, ["vm-pkg", "started", "begin", "-"], xml.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(r.join("tmp/orig-args")).unwrap(), "vm-pkg\nstarted\nbegin\n-\n");

    // The controller and the CLI install next to it (shared /etc/lifeboat, /var/lib/lifeboat).
    rpm_ok(r, &["-i", "--nodeps"], &[b.rpm("lifeboat-controller"), b.rpm("lifeboat")]);
    assert_eq!(mode(&r.join("etc/lifeboat/controller.toml")), 0o640);
    // %post created the empty database at the shipped path (a start never does), owner-only.
    assert_eq!(mode(&r.join("var/lib/lifeboat/controller.db")), 0o600, "%post runs lifeboat-controller init");
    assert!(r.join("usr/share/man/man1/lifeboat.1.gz").is_file());
    rpm_ok(r, &["-e", "--nodeps"], &[Path::new("lifeboat-controller"), Path::new("lifeboat")]);
    assert!(
        r.join("etc/lifeboat/agent.toml").exists() && r.join("var/lib/lifeboat").is_dir(),
        "shared directories stay with the agent"
    );

    // Erase: the original hook is back, byte for byte, with its mode.
    let said = rpm_ok(r, &["-e", "--nodeps"], &[Path::new("lifeboat-agent")]);
    assert!(said.contains("restored the previous hook"), "{said}");
    assert!(!hooks.join("qemu").is_symlink());
    assert_eq!(fs::read_to_string(hooks.join("qemu")).unwrap(), original);
    assert_eq!(mode(&hooks.join("qemu")), 0o700);
    assert!(!hooks.join("qemu.lifeboat-chained").exists());
    assert!(!r.join("usr/bin/lifeboat-agent").exists() && !r.join("usr/libexec/lifeboat").exists());
    assert_eq!(
        fs::read_to_string(r.join("etc/lifeboat/agent.toml.rpmsave")).unwrap(),
        edited,
        "an edited config is saved on erase"
    );

    // Without a hook before: install creates ours, erase removes it.
    let root = minimal_root(b);
    let r = root.path();
    rpm_ok(r, &["-i", "--nodeps"], &[agent_rpm]);
    assert!(r.join("etc/libvirt/hooks/qemu").is_symlink());
    rpm_ok(r, &["-e", "--nodeps"], &[Path::new("lifeboat-agent")]);
    assert!(fs::read_dir(r.join("etc/libvirt/hooks")).unwrap().next().is_none());
    eprintln!("packaging: rpm install/upgrade/erase in scratch roots took {:.1}s", t.elapsed().as_secs_f64());
}

// ------------------------------------------------------------------------------------
// The hook script from the source tree, without packages (no root or rpmbuild needed):
// what it does when the agent binary cannot run.

/// A scratch hook directory (optionally with an administrator's hook chained) and a log
/// directory, for the source tree's hook script.
fn source_hook_dir(with_chained: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hooks");
    let log = tmp.path().join("log");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&log).unwrap();
    if with_chained {
        write_exec(&dir.join("qemu.lifeboat-chained"), ORIGINAL_HOOK, 0o755);
    }
    (tmp, dir, log)
}

/// Runs packaging/libvirt/qemu-hook as libvirt would, with `agent` as the agent binary.
fn call_source_hook(dir: &Path, log: &Path, agent: &Path, args: [&str; 4], stdin: &[u8]) -> Output {
    let mut c = Command::new(workspace().join("packaging/libvirt/qemu-hook"));
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LIFEBOAT_AGENT_BIN", agent)
        .env("LIFEBOAT_AGENT_CONFIG", "/nonexistent/agent.toml")
        .env("LIFEBOAT_HOOK_DIR", dir)
        .env("LOG", log)
        .env("TMPDIR", log);
    run_with_stdin(&mut c, stdin)
}

const STARTS: [&str; 3] = ["prepare", "migrate", "restore"];
const NOT_STARTS: [&str; 6] = ["start", "started", "stopped", "release", "reconnect", "attach"];

#[test]
fn hook_without_a_runnable_agent_refuses_starts_and_nothing_else() {
    let xml = managed_xml();
    for with_chained in [false, true] {
        let (tmp, dir, log) = source_hook_dir(with_chained);
        let not_exec = tmp.path().join("lifeboat-agent-0644");
        fs::write(&not_exec, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
        let agents = [tmp.path().join("no-such-agent"), not_exec, tmp.path().to_path_buf()];
        for agent in &agents {
            for op in STARTS {
                let _ = fs::remove_file(log.join("args"));
                let out = call_source_hook(&dir, &log, agent, ["vm-x", op, "begin", "-"], xml.as_bytes());
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{op} with agent {}: {err}", agent.display());
                assert!(
                    err.contains("missing or not executable") && err.contains("fail closed") && err.contains(op),
                    "{err}"
                );
                assert!(!log.join("args").exists(), "the chained hook ran after a refusal");
            }
            for op in NOT_STARTS {
                let _ = fs::remove_file(log.join("args"));
                let out = call_source_hook(&dir, &log, agent, ["vm-x", op, "begin", "-"], xml.as_bytes());
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{op} with agent {} must not fail (on reconnect libvirt would kill the guest): {}",
                    agent.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                if with_chained {
                    assert_eq!(fs::read_to_string(log.join("args")).unwrap(), format!("vm-x\n{op}\nbegin\n-\n"));
                    assert_eq!(
                        fs::read(log.join("stdin")).unwrap(),
                        xml.as_bytes(),
                        "the chained hook gets libvirt's stdin"
                    );
                    assert_eq!(String::from_utf8_lossy(&out.stdout), "chained-stdout\n");
                }
            }
        }
        if with_chained {
            // The chained hook's own failure is still its own to report.
            let mut c = Command::new(workspace().join("packaging/libvirt/qemu-hook"));
            c.args(["vm-x", "stopped", "end", "-"])
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("LIFEBOAT_AGENT_BIN", tmp.path().join("no-such-agent"))
                .env("LIFEBOAT_HOOK_DIR", &dir)
                .env("LOG", &log)
                .env("CHAINED_EXIT", "5");
            assert_eq!(run_with_stdin(&mut c, b"").status.code(), Some(5));
        }
    }
}

#[test]
fn hook_runs_the_guard_only_for_starts() {
    // An agent that cannot run (exit 127, as the shell reports a binary whose libraries are
    // missing): starts are refused with its status, every other operation passes.
    let (tmp, dir, log) = source_hook_dir(false);
    let broken = tmp.path().join("broken-agent");
    write_exec(&broken, "#!/bin/sh\necho ran > \"$LOG/guard-ran\"\nexit 127\n", 0o755);
    for op in STARTS {
        let out = call_source_hook(&dir, &log, &broken, ["vm-x", op, "begin", "-"], managed_xml().as_bytes());
        assert_eq!(out.status.code(), Some(127), "{op}");
    }
    fs::remove_file(log.join("guard-ran")).unwrap();
    for op in NOT_STARTS {
        let out = call_source_hook(&dir, &log, &broken, ["vm-x", op, "begin", "-"], managed_xml().as_bytes());
        assert_eq!(out.status.code(), Some(0), "{op}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!log.join("guard-ran").exists(), "the guard ran for an operation that starts nothing");
    // An operation a newer libvirt may add is not refused either.
    let out = call_source_hook(&dir, &log, &broken, ["vm-x", "frobnicate", "begin", "-"], b"");
    assert_eq!(out.status.code(), Some(0));
}
