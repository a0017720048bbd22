//! Storage identity: which storage a disk path is on, so that "the target
//! sees the same path" is never taken for "the target sees the same disk".
//!
//! An identity is `<kind>:<id>` plus the path relative to that storage's
//! root. Sources, first match wins:
//! 1. a marker file [`MARKER_FILE`] holding a UUID, in an ancestor directory
//!    of the disk on the same filesystem (same `st_dev`) as the disk;
//! 2. a network or cluster filesystem from `/proc/self/mountinfo`;
//! 3. for block devices, a global id from `/dev/disk/by-id` (WWN, SCSI NAA
//!    id, multipath WWID, NVMe EUI, LVM UUID);
//! 4. anything else is `local:<fstype>` or `unidentified:<why>`: not shared.
//!
//! The pure parts (mountinfo parsing, choosing an id) do no I/O. The probe
//! itself runs on a worker thread and is waited for with a timeout, so a hung
//! mount cannot stop the libvirt actor.

use std::fs::{self, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use lifeboat_proto::v1::{Disk, PathCheck};

/// Name of the marker file that identifies a shared storage: one line with a
/// UUID, created once on the storage itself (never copied to another one).
pub const MARKER_FILE: &str = ".lifeboat-storage-id";

/// Kind of a storage that is not shared (a local filesystem).
pub const LOCAL: &str = "local";

/// Kind of a storage that could not be identified.
pub const UNIDENTIFIED: &str = "unidentified";

/// Where the agent looks for block devices' global ids.
const BY_ID_DIR: &str = "/dev/disk/by-id";

/// The kernel's mount table of this process's mount namespace.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Most paths one check answers (more are refused, not truncated).
pub const MAX_PATHS: usize = 10_000;

/// Longest path accepted (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// How long a guest read waits for its disks' identities.
const DISK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a path check waits (the controller waits 10 s for the answer).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Probe workers that may exist at once; more exist only while some hang in
/// the kernel (a dead NFS server), and then no new one is started.
const MAX_WORKERS: usize = 4;

/// How long the mount table and the by-id links are reused.
const CACHE_TTL: Duration = Duration::from_secs(1);

/// A storage identity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// `<kind>:<id>`, e.g. `marker:5b0c…`, `nfs4:filer:/export/vms`,
    /// `wwn:0x5000c500a1b2c3d4`, `local:ext4`, `unidentified:<why>`.
    pub storage: String,
    /// The path relative to the storage's root ("" for a whole device and
    /// for storage that is not shared).
    pub rel: String,
}

impl Identity {
    fn shared(storage: String, rel: String) -> Self {
        Identity { storage, rel }
    }

    fn local(fstype: &str) -> Self {
        Identity { storage: format!("{LOCAL}:{fstype}"), rel: String::new() }
    }

    fn unidentified(why: impl AsRef<str>) -> Self {
        Identity { storage: format!("{UNIDENTIFIED}:{}", why.as_ref()), rel: String::new() }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Device number of the filesystem (`major:minor`).
    pub dev: (u32, u32),
    /// The directory of the filesystem mounted here (not `/` for a bind
    /// mount of a subdirectory or an NFS export's subdirectory).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type (`nfs4`, `ext4`, `fuse.glusterfs`, ...).
    pub fstype: String,
    /// Mount source (`filer:/export/vms`, `/dev/sda1`, ...).
    pub source: String,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`. Any malformed line fails the whole table:
/// a mount table read wrongly could name the wrong filesystem.
pub fn parse_mountinfo(text: &str) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| format!("mountinfo line {}: {what}", n + 1);
        let f: Vec<&str> = line.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-").ok_or_else(|| bad("no ' - ' separator"))?;
        if sep < 6 || f.len() < sep + 3 {
            return Err(bad("too few fields"));
        }
        let (maj, min) = f[2].split_once(':').ok_or_else(|| bad("device is not major:minor"))?;
        let dev = (maj.parse().map_err(|_| bad("bad major"))?, min.parse().map_err(|_| bad("bad minor"))?);
        out.push(Mount {
            dev,
            root: unescape(f[3]),
            mount_point: unescape(f[4]),
            fstype: unescape(f[sep + 1]),
            source: unescape(f[sep + 2]),
        });
    }
    Ok(out)
}

/// The mount that holds `path` (absolute, symlinks resolved): the longest
/// mount point above it; among equal ones the last, which is mounted over
/// the others.
pub fn find_mount<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts.iter().filter(|m| path.starts_with(&m.mount_point)) {
        if best.is_none_or(|b| {
            Path::new(&m.mount_point).components().count() >= Path::new(&b.mount_point).components().count()
        }) {
            best = Some(m);
        }
    }
    best
}

/// How a filesystem type is identified across hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsKind {
    /// Network filesystem: identified by its mount source (the server).
    Network(&'static str),
    /// Cluster filesystem on a shared block device: by that device's id.
    Cluster(&'static str),
}

/// Filesystem types that several hosts can mount at once, with the kind
/// they are reported as.
fn fs_kind(fstype: &str) -> Option<FsKind> {
    use FsKind::*;
    Some(match fstype {
        "nfs" => Network("nfs"),
        "nfs4" => Network("nfs4"),
        "cifs" => Network("cifs"),
        "smb3" => Network("smb3"),
        "ceph" | "fuse.ceph-fuse" | "fuse.ceph" => Network("ceph"),
        "glusterfs" | "fuse.glusterfs" => Network("glusterfs"),
        "lustre" => Network("lustre"),
        "beegfs" => Network("beegfs"),
        "gpfs" => Network("gpfs"),
        "gfs2" => Cluster("gfs2"),
        "ocfs2" => Cluster("ocfs2"),
        _ => return None,
    })
}

/// Whether a mount source names the server (`filer:/export`, `//srv/share`,
/// `10.0.0.1@tcp:/fs`, `admin@fsid.fs=/`), rather than a word that another
/// cluster could use too (`ceph-fuse`, `beegfs_nodev`, `gpfs0`).
fn source_names_server(source: &str) -> bool {
    source.contains(':') || source.starts_with("//") || source.contains('=')
}

/// The id a block device is known by across hosts, from the names of the
/// `/dev/disk/by-id` links that resolve to it. Generic names (`ata-…`,
/// `scsi-0QEMU…`, `virtio-…`: serials that can repeat) do not count.
pub fn device_id<S: AsRef<str>>(links: &[S]) -> Option<String> {
    // In order of preference; the first kind found wins, the smallest name
    // within it (the choice must not depend on directory order).
    const KINDS: [(&str, &str); 5] = [
        ("dm-uuid-mpath-", "mpath"),
        ("wwn-", "wwn"),
        ("scsi-3", "scsi"),
        ("nvme-eui.", "eui"),
        ("dm-uuid-LVM-", "lvm"),
    ];
    for (prefix, kind) in KINDS {
        let best = links.iter().filter_map(|l| l.as_ref().strip_prefix(prefix)).filter(|id| !id.is_empty()).min();
        if let Some(id) = best {
            // scsi-3… keeps its "3" (the NAA designator type).
            let id = if kind == "scsi" { format!("3{id}") } else { id.to_string() };
            return Some(format!("{kind}:{id}"));
        }
    }
    None
}

/// Whether `path` is a kernel device name (`/dev/sdb`, `/dev/vdb`,
/// `/dev/nvme0n1`, `/dev/dm-3`): such a name can mean another disk on
/// another host, or after a rescan.
pub fn is_kernel_device_name(path: &Path) -> bool {
    path.parent() == Some(Path::new("/dev"))
}

/// Reads a marker's content: one hyphenated UUID (lowercased).
pub fn parse_marker(content: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(content).map_err(|_| "is not text".to_string())?.trim();
    if s.len() != 36 {
        return Err(format!("does not hold a UUID (like 5b0c3f9e-…): '{}'", s.chars().take(40).collect::<String>()));
    }
    let u = uuid::Uuid::parse_str(s).map_err(|e| format!("does not hold a UUID: {e}"))?;
    if u.is_nil() {
        return Err("holds the nil UUID".into());
    }
    Ok(u.hyphenated().to_string())
}

/// `dev_t` from major and minor, as glibc's `makedev`.
pub fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

/// `path` relative to `base`, without a leading slash.
fn relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The identity a mount table entry gives `canon` (the file's resolved
/// path, on device `dev`). `device` finds a block device's id (cluster
/// filesystems).
fn mount_identity(
    m: &Mount,
    canon: &Path,
    dev: u64,
    device: impl FnOnce(u64) -> Result<Option<String>, String>,
) -> Identity {
    let Some(kind) = fs_kind(&m.fstype) else {
        return Identity::local(&m.fstype);
    };
    if makedev(m.dev.0, m.dev.1) != dev {
        // A file whose device is not the mount's: the table is not what we think.
        return Identity::unidentified(format!(
            "{} is a {} mount but {} is on another device",
            m.mount_point,
            m.fstype,
            canon.display()
        ));
    }
    let under = relative(canon, Path::new(&m.mount_point));
    let rel = Path::new(&m.root).join(&under);
    let rel = rel.to_string_lossy().trim_start_matches('/').to_string();
    match kind {
        FsKind::Network(k) if source_names_server(&m.source) => Identity::shared(format!("{k}:{}", m.source), rel),
        FsKind::Network(k) => Identity::unidentified(format!(
            "the {k} mount source '{}' does not name the storage; put a {MARKER_FILE} on it",
            m.source
        )),
        FsKind::Cluster(k) => match device(dev) {
            Ok(Some(id)) => Identity::shared(format!("{k}:{id}"), rel),
            Ok(None) => Identity::unidentified(format!(
                "the {k} device {} has no WWN or SCSI id in {BY_ID_DIR}; put a {MARKER_FILE} on it",
                m.source
            )),
            Err(e) => Identity::unidentified(e),
        },
    }
}

/// What one probe keeps between paths: the mount table and by-id links,
/// each read at most once per [`CACHE_TTL`].
#[derive(Default)]
pub struct Cache {
    mounts: Option<(Instant, Result<Vec<Mount>, String>)>,
    by_id: Option<(Instant, Result<Vec<ByIdLink>, String>)>,
}

/// A `/dev/disk/by-id` link: its name and the block device it resolves to.
type ByIdLink = (String, u64);

impl Cache {
    fn mounts(&mut self) -> Result<&[Mount], String> {
        if self.mounts.as_ref().is_none_or(|(t, _)| t.elapsed() > CACHE_TTL) {
            let r = fs::read_to_string(MOUNTINFO)
                .map_err(|e| format!("cannot read {MOUNTINFO}: {e}"))
                .and_then(|t| parse_mountinfo(&t));
            self.mounts = Some((Instant::now(), r));
        }
        match &self.mounts.as_ref().expect("just set").1 {
            Ok(m) => Ok(m),
            Err(e) => Err(e.clone()),
        }
    }

    /// The by-id link names resolving to block device `rdev`.
    fn links_to(&mut self, rdev: u64) -> Result<Vec<String>, String> {
        if self.by_id.as_ref().is_none_or(|(t, _)| t.elapsed() > CACHE_TTL) {
            self.by_id = Some((Instant::now(), read_by_id(Path::new(BY_ID_DIR))));
        }
        match &self.by_id.as_ref().expect("just set").1 {
            Ok(l) => Ok(l.iter().filter(|(_, r)| *r == rdev).map(|(n, _)| n.clone()).collect()),
            Err(e) => Err(e.clone()),
        }
    }

    fn device_id(&mut self, rdev: u64) -> Result<Option<String>, String> {
        Ok(device_id(&self.links_to(rdev)?))
    }
}

/// The links in a by-id directory with the block device each resolves to.
fn read_by_id(dir: &Path) -> Result<Vec<ByIdLink>, String> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        // No by-id directory (no udev, a container): no device has an id.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        // A dangling link (a device just removed) names nothing.
        if let Ok(m) = fs::metadata(e.path())
            && m.file_type().is_block_device()
        {
            out.push((e.file_name().to_string_lossy().into_owned(), m.rdev()));
        }
    }
    Ok(out)
}

/// The nearest marker above `canon` on device `dev`: (its directory, UUID).
/// A marker that exists but cannot be read or parsed is an error, never
/// skipped.
fn find_marker(canon: &Path, dev: u64) -> Result<Option<(PathBuf, String)>, String> {
    let mut dir = canon.parent();
    while let Some(d) = dir {
        let dm = fs::metadata(d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
        if dm.dev() != dev {
            // The filesystem ends here: a marker further up is another storage's.
            break;
        }
        let m = d.join(MARKER_FILE);
        match fs::symlink_metadata(&m) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("marker {} unreadable: {e}", m.display())),
            Ok(mm) if !mm.file_type().is_file() || mm.dev() != dev => {
                return Err(format!("marker {} is not a regular file on the disk's filesystem", m.display()));
            }
            Ok(_) => {
                let mut buf = Vec::new();
                fs::File::open(&m)
                    .and_then(|f| f.take(256).read_to_end(&mut buf))
                    .map_err(|e| format!("marker {} unreadable: {e}", m.display()))?;
                let id = parse_marker(&buf).map_err(|e| format!("marker {} {e}", m.display()))?;
                return Ok(Some((d.to_path_buf(), id)));
            }
        }
        dir = d.parent();
    }
    Ok(None)
}

fn kernel_name(path: &Path) -> Identity {
    Identity::unidentified(format!(
        "{} is a kernel device name, which can mean another disk on another host; use a /dev/disk/by-id/wwn-… (or multipath) path",
        path.display()
    ))
}

/// Identifies the storage of `path`, which exists (`meta` is its metadata,
/// links followed).
fn identify(path: &Path, meta: &Metadata, cache: &mut Cache) -> Identity {
    if is_kernel_device_name(path) {
        return kernel_name(path);
    }
    let canon = match fs::canonicalize(path) {
        Ok(c) => c,
        Err(e) => return Identity::unidentified(format!("cannot resolve {}: {e}", path.display())),
    };
    let ft = meta.file_type();
    if ft.is_block_device() {
        return match cache.device_id(meta.rdev()) {
            Ok(Some(id)) => Identity::shared(id, String::new()),
            Ok(None) => Identity::unidentified(format!(
                "block device {} has no WWN, SCSI, multipath, EUI or LVM id in {BY_ID_DIR}",
                path.display()
            )),
            Err(e) => Identity::unidentified(e),
        };
    }
    if !ft.is_file() && !ft.is_dir() {
        return Identity::unidentified(format!("{} is not a file, directory or block device", path.display()));
    }
    match find_marker(&canon, meta.dev()) {
        Ok(Some((dir, id))) => return Identity::shared(format!("marker:{id}"), relative(&canon, &dir)),
        Ok(None) => {}
        Err(e) => return Identity::unidentified(e),
    }
    let mounts = match cache.mounts() {
        Ok(m) => m.to_vec(),
        Err(e) => return Identity::unidentified(e),
    };
    match find_mount(&mounts, &canon) {
        Some(m) => mount_identity(m, &canon, meta.dev(), |dev| cache.device_id(dev)),
        None => Identity::unidentified(format!("{} is in no mount of {MOUNTINFO}", canon.display())),
    }
}

/// Checks one path: visible or not, and on which storage.
pub fn probe(path: &str, cache: &mut Cache) -> PathCheck {
    let mut c = PathCheck { path: path.to_string(), ..Default::default() };
    if !path.starts_with('/') {
        c.error = "not a local path; cannot check".into();
        return c;
    }
    if path.len() > MAX_PATH_LEN {
        c.path = path.chars().take(64).collect::<String>() + "…";
        c.error = format!("path longer than {MAX_PATH_LEN} bytes");
        return c;
    }
    match fs::metadata(path) {
        Ok(meta) => {
            let id = identify(Path::new(path), &meta, cache);
            c.visible = true;
            c.storage = id.storage;
            c.storage_path = id.rel;
        }
        Err(e) => c.error = e.to_string(),
    }
    c
}

type Job = (Vec<String>, mpsc::Sender<Vec<PathCheck>>);

/// Probe workers alive (a hung one stays counted until the kernel lets go).
static WORKERS: AtomicUsize = AtomicUsize::new(0);

/// The current worker's queue; `None` before the first probe and after a
/// worker was given up on.
static PROBER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

fn spawn_worker() -> Result<mpsc::Sender<Job>, String> {
    if WORKERS.load(Ordering::SeqCst) >= MAX_WORKERS {
        return Err(format!("{MAX_WORKERS} earlier storage probes still hang (a dead network mount?)"));
    }
    let (tx, rx) = mpsc::channel::<Job>();
    WORKERS.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new().name("storage-probe".into()).spawn(move || {
        let mut cache = Cache::default();
        for (paths, reply) in rx {
            let _ = reply.send(paths.iter().map(|p| probe(p, &mut cache)).collect());
        }
        WORKERS.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = spawned {
        WORKERS.fetch_sub(1, Ordering::SeqCst);
        return Err(format!("cannot start a storage probe: {e}"));
    }
    Ok(tx)
}

/// Probes `paths` on the worker thread, waiting at most `timeout`. A worker
/// that does not answer in time is given up on (left to finish or hang);
/// the next call starts another.
fn probe_all(paths: Vec<String>, timeout: Duration) -> Result<Vec<PathCheck>, String> {
    let mut slot = PROBER.lock().unwrap_or_else(|p| p.into_inner());
    let tx = match slot.take() {
        Some(tx) => tx,
        None => spawn_worker()?,
    };
    let (rtx, rrx) = mpsc::channel();
    if tx.send((paths, rtx)).is_err() {
        return Err("the storage probe stopped".into());
    }
    match rrx.recv_timeout(timeout) {
        Ok(r) => {
            *slot = Some(tx);
            Ok(r)
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "storage probe did not answer; a mount may hang"
            );
            Err(format!("the storage probe did not answer within {} s (a hung mount?)", timeout.as_secs()))
        }
    }
}

/// Answers a CheckPaths command: visibility and storage of every path.
pub fn check_paths(paths: &[String]) -> Vec<PathCheck> {
    if paths.len() > MAX_PATHS {
        return vec![PathCheck {
            path: String::new(),
            error: format!("{} paths asked, at most {MAX_PATHS} are checked at once", paths.len()),
            ..Default::default()
        }];
    }
    match probe_all(paths.to_vec(), CHECK_TIMEOUT) {
        Ok(r) => r,
        Err(e) => paths.iter().map(|p| PathCheck { path: p.clone(), error: e.clone(), ..Default::default() }).collect(),
    }
}

/// Fills in `storage` and `storage_path` of every disk with an absolute
/// source. A disk that cannot be seen is `unidentified:<why>`.
pub fn fill_disks(disks: &mut [Disk]) {
    let paths: Vec<String> = disks.iter().map(|d| d.source.clone()).filter(|s| s.starts_with('/')).collect();
    if paths.is_empty() {
        return;
    }
    let checks = probe_all(paths, DISK_TIMEOUT);
    let mut checks = match checks {
        Ok(c) => c.into_iter(),
        Err(e) => {
            for d in disks.iter_mut().filter(|d| d.source.starts_with('/')) {
                d.storage = Identity::unidentified(&e).storage;
            }
            return;
        }
    };
    for d in disks.iter_mut().filter(|d| d.source.starts_with('/')) {
        let Some(c) = checks.next() else { break };
        if c.visible {
            d.storage = c.storage;
            d.storage_path = c.storage_path;
        } else if is_kernel_device_name(Path::new(&d.source)) {
            d.storage = kernel_name(Path::new(&d.source)).storage;
        } else {
            d.storage = Identity::unidentified(format!("cannot see {}: {}", d.source, c.error)).storage;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
61 27 0:52 / /var/lib/libvirt/images rw,relatime shared:30 - nfs4 filer:/export/vms rw,vers=4.2
62 27 0:53 /vms /srv/vm\\040images rw,relatime - nfs4 filer:/export rw,vers=4.2
63 27 253:4 / /cluster rw,relatime - gfs2 /dev/mapper/san-gfs rw,locktable=c:fs
64 27 0:55 / /ceph rw,relatime - fuse.ceph-fuse ceph-fuse rw
65 27 0:56 / /var/lib/libvirt/images rw,relatime - xfs /dev/sdb1 rw
";

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let m = parse_mountinfo(MOUNTINFO_SAMPLE).unwrap();
        assert_eq!(m.len(), 7);
        assert_eq!(m[2].fstype, "nfs4");
        assert_eq!(m[2].source, "filer:/export/vms");
        assert_eq!(m[2].dev, (0, 52));
        assert_eq!(m[3].mount_point, "/srv/vm images", "\\040 is a space");
        assert_eq!(m[3].root, "/vms");
        assert!(parse_mountinfo("27 1 254:0 / / rw ext4 /dev/vda rw").unwrap_err().contains("separator"));
        assert!(parse_mountinfo("27 1 x / / rw - ext4 /dev/vda rw").unwrap_err().contains("major:minor"));
        assert!(parse_mountinfo("27 1 1:2 / - ext4 /dev/vda").unwrap_err().contains("too few"));
    }

    #[test]
    fn finds_the_mount_holding_a_path() {
        let m = parse_mountinfo(MOUNTINFO_SAMPLE).unwrap();
        let at = |p: &str| find_mount(&m, Path::new(p)).unwrap().mount_point.clone();
        assert_eq!(at("/etc/passwd"), "/");
        assert_eq!(at("/srv/vm images/a.img"), "/srv/vm images");
        assert_eq!(
            find_mount(&m, Path::new("/var/lib/libvirt/images/a.img")).unwrap().fstype,
            "xfs",
            "the later mount is on top"
        );
        assert_eq!(at("/var/lib/libvirtx/a.img"), "/", "a mount point matches whole components only");
    }

    #[test]
    fn network_filesystems_are_identified_by_source_root_and_path() {
        let m = parse_mountinfo(MOUNTINFO_SAMPLE).unwrap();
        let none = |_| -> Result<Option<String>, String> { panic!("no device lookup for a network fs") };
        let id = mount_identity(&m[2], Path::new("/var/lib/libvirt/images/sub/vm1.img"), makedev(0, 52), none);
        assert_eq!(id, Identity { storage: "nfs4:filer:/export/vms".into(), rel: "sub/vm1.img".into() });
        let id = mount_identity(&m[3], Path::new("/srv/vm images/vm1.img"), makedev(0, 53), none);
        assert_eq!(
            id,
            Identity { storage: "nfs4:filer:/export".into(), rel: "vms/vm1.img".into() },
            "the root field counts"
        );
        let id = mount_identity(&m[2], Path::new("/var/lib/libvirt/images/vm1.img"), makedev(0, 99), none);
        assert!(id.storage.starts_with("unidentified:") && id.storage.contains("another device"), "{id:?}");
        let id = mount_identity(&m[5], Path::new("/ceph/vm1.img"), makedev(0, 55), none);
        assert!(
            id.storage.starts_with("unidentified:") && id.storage.contains(MARKER_FILE),
            "a generic source: {id:?}"
        );
        let id = mount_identity(&m[1], Path::new("/var/lib/libvirt/images/x.img"), makedev(254, 0), none);
        assert_eq!(id, Identity { storage: "local:ext4".into(), rel: String::new() });
    }

    #[test]
    fn cluster_filesystems_are_identified_by_their_device() {
        let m = parse_mountinfo(MOUNTINFO_SAMPLE).unwrap();
        let dev = makedev(253, 4);
        let id = mount_identity(&m[4], Path::new("/cluster/vm1.img"), dev, |d| {
            assert_eq!(d, dev);
            Ok(Some("wwn:0x600a0b80".into()))
        });
        assert_eq!(id, Identity { storage: "gfs2:wwn:0x600a0b80".into(), rel: "vm1.img".into() });
        let id = mount_identity(&m[4], Path::new("/cluster/vm1.img"), dev, |_| Ok(None));
        assert!(id.storage.starts_with("unidentified:"), "{id:?}");
    }

    #[test]
    fn block_devices_need_a_global_id() {
        assert_eq!(
            device_id(&["ata-Samsung_SSD_1", "wwn-0x5000c500a1b2c3d4", "scsi-35000c500a1b2c3d4"]).unwrap(),
            "wwn:0x5000c500a1b2c3d4"
        );
        assert_eq!(device_id(&["wwn-0x600a", "dm-uuid-mpath-3600a", "dm-name-mpatha"]).unwrap(), "mpath:3600a");
        assert_eq!(device_id(&["scsi-0QEMU_QEMU_HARDDISK_drive-scsi0", "scsi-3600a"]).unwrap(), "scsi:3600a");
        assert_eq!(device_id(&["nvme-eui.0025388b91b2c3d4", "nvme-Samsung_1"]).unwrap(), "eui:0025388b91b2c3d4");
        assert_eq!(device_id(&["dm-name-vg-lv", "dm-uuid-LVM-abcDEF"]).unwrap(), "lvm:abcDEF");
        assert_eq!(device_id(&["wwn-0xb", "wwn-0xa"]).unwrap(), "wwn:0xa", "independent of directory order");
        assert_eq!(device_id(&["ata-WDC_1", "virtio-abc", "scsi-0QEMU_QEMU", "scsi-SATA_x", "dm-name-x"]), None);
        assert_eq!(device_id::<&str>(&[]), None);
        for p in ["/dev/sdb", "/dev/vdb", "/dev/nvme0n1", "/dev/dm-3", "/dev/loop0"] {
            assert!(is_kernel_device_name(Path::new(p)), "{p}");
        }
        for p in ["/dev/disk/by-id/wwn-0x1", "/dev/mapper/mpatha", "/dev/vg0/lv1", "/shared/dev"] {
            assert!(!is_kernel_device_name(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn markers_hold_a_uuid() {
        assert_eq!(
            parse_marker(b"5B0C3F9E-1111-4222-8333-444455556666\n").unwrap(),
            "5b0c3f9e-1111-4222-8333-444455556666"
        );
        assert!(parse_marker(b"").is_err());
        assert!(parse_marker(b"shared").is_err());
        assert!(parse_marker(b"00000000-0000-0000-0000-000000000000").unwrap_err().contains("nil"));
        assert!(parse_marker(b"5b0c3f9e11114222833344445555666600000").is_err());
        assert!(parse_marker(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn makedev_matches_the_kernel_encoding() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = fs::metadata(tmp.path()).unwrap().dev();
        let mounts = parse_mountinfo(&fs::read_to_string(MOUNTINFO).unwrap()).unwrap();
        let canon = fs::canonicalize(tmp.path()).unwrap();
        let m = find_mount(&mounts, &canon).unwrap();
        assert_eq!(makedev(m.dev.0, m.dev.1), dev, "{m:?}");
        assert_eq!(makedev(254, 0), 0xfe00);
        assert_eq!(makedev(259, 65536), (259 << 8) | (0x10000 << 12));
    }

    #[test]
    fn a_marker_names_the_storage_and_the_relative_path() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        fs::create_dir_all(shared.join("sub")).unwrap();
        fs::write(shared.join(MARKER_FILE), "5b0c3f9e-1111-4222-8333-444455556666\n").unwrap();
        let disk = shared.join("sub/vm1.img");
        fs::write(&disk, b"").unwrap();
        let local = tmp.path().join("local.img");
        fs::write(&local, b"").unwrap();
        let mut cache = Cache::default();
        let c = probe(&disk.display().to_string(), &mut cache);
        assert!(c.visible, "{c:?}");
        assert_eq!(c.storage, "marker:5b0c3f9e-1111-4222-8333-444455556666");
        assert_eq!(c.storage_path, "sub/vm1.img");
        // Through a symlink: the same storage and relative path.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        let c2 = probe(&link.join("sub/vm1.img").display().to_string(), &mut cache);
        assert_eq!((c2.storage, c2.storage_path), (c.storage, c.storage_path));
        // Outside the marked directory: whatever the mount table says, which
        // in a test's temporary directory is no shared storage.
        let c = probe(&local.display().to_string(), &mut cache);
        assert!(c.visible);
        assert!(c.storage.starts_with("local:") || c.storage.starts_with("unidentified:"), "{c:?}");
        // A broken marker refuses instead of being skipped.
        fs::write(shared.join(MARKER_FILE), "shared storage\n").unwrap();
        let c = probe(&disk.display().to_string(), &mut cache);
        assert!(c.storage.starts_with("unidentified:marker ") && c.storage.contains("UUID"), "{c:?}");
        // Invisible and non-absolute paths.
        let c = probe(&tmp.path().join("missing.img").display().to_string(), &mut cache);
        assert!(!c.visible && c.storage.is_empty() && !c.error.is_empty());
        assert!(!probe("rbd:pool/img", &mut cache).visible);
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert!(probe(&long, &mut cache).error.contains("longer"));
    }

    #[test]
    fn disks_get_identities_through_the_worker() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(MARKER_FILE), "5b0c3f9e-1111-4222-8333-444455556666").unwrap();
        let img = tmp.path().join("a.img");
        fs::write(&img, b"").unwrap();
        let mut disks = vec![
            Disk { source: img.display().to_string(), ..Default::default() },
            Disk { source: "rbd:pool/img".into(), ..Default::default() },
            Disk { source: "/dev/sdb".into(), ..Default::default() },
            Disk { source: tmp.path().join("gone.img").display().to_string(), ..Default::default() },
        ];
        fill_disks(&mut disks);
        assert_eq!(disks[0].storage, "marker:5b0c3f9e-1111-4222-8333-444455556666");
        assert_eq!(disks[0].storage_path, "a.img");
        assert_eq!(disks[1].storage, "", "network disks are not identified here");
        assert!(disks[2].storage.starts_with("unidentified:/dev/sdb is a kernel device name"), "{:?}", disks[2]);
        assert!(disks[3].storage.starts_with("unidentified:cannot see"), "{:?}", disks[3]);
        let checks = check_paths(&[img.display().to_string()]);
        assert_eq!(checks[0].storage, disks[0].storage);
        assert!(check_paths(&vec![String::new(); MAX_PATHS + 1])[0].error.contains("at most"));
    }
}
