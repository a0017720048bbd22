//! The libvirt actor: one dedicated thread owns the `virt` connection and
//! makes every libvirt call. Other code talks to it through [`Actor`] and
//! receives [`Update`]s.
//!
//! Architecture invariant: only this module touches `virt`.
//!
//! Change detection is level-triggered: domain lifecycle events and changes
//! in the autostart link directory only trigger a re-read; a full rescan
//! every `resync_interval` is the backstop; each re-read is compared with
//! what was last reported and only differences are sent.

mod autostart_watch;
mod commands;
#[allow(unsafe_code)]
mod ffi;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use lifeboat_proto::v1::{Command, CommandResult, Guest, GuestState, HostInfo, Inventory};
use tokio::sync::mpsc as tmpsc;
use tracing::{debug, info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use crate::config::AgentConfig;
use crate::{domxml, hostfacts};

/// What the actor reports.
#[derive(Debug, Clone)]
pub enum Update {
    /// Everything: host and all guests (on request).
    Inventory(Inventory),
    /// A guest appeared or changed.
    Changed(Guest),
    /// A guest is gone.
    Removed {
        /// Its UUID.
        uuid: String,
        /// Its last known name.
        name: String,
    },
    /// Host facts changed (e.g. libvirt became (un)reachable).
    Host(HostInfo),
}

/// Values the actor shares without messages.
#[derive(Debug, Default)]
pub struct Shared {
    /// Free host memory in KiB, refreshed every few seconds.
    pub memory_free_kib: AtomicU64,
    /// When the actor loop last went round (ms since the epoch): a stuck
    /// libvirt call stops it, and the systemd watchdog then stops being fed.
    pub last_tick_ms: std::sync::atomic::AtomicI64,
}

/// Settings for the actor.
#[derive(Debug, Clone)]
pub struct ActorConfig {
    /// Stable host id.
    pub host_id: String,
    /// libvirt URI.
    pub uri: String,
    /// Boot id file.
    pub boot_id_file: PathBuf,
    /// Autostart link directory.
    pub autostart_dir: PathBuf,
    /// qemu.conf.
    pub qemu_conf: PathBuf,
    /// libvirt-guests config candidates.
    pub libvirt_guests_conf: Vec<PathBuf>,
    /// Full rescan period.
    pub resync_interval: Duration,
    /// How often to look at the autostart directory.
    pub autostart_poll: Duration,
    /// Agent state directory (leases).
    pub state_dir: PathBuf,
}

impl ActorConfig {
    /// From the agent configuration.
    pub fn from_agent(cfg: &AgentConfig, host_id: String) -> Self {
        ActorConfig {
            host_id,
            uri: cfg.libvirt_uri.clone(),
            boot_id_file: cfg.boot_id_file.clone(),
            autostart_dir: cfg.autostart_dir.clone(),
            qemu_conf: cfg.qemu_conf.clone(),
            libvirt_guests_conf: cfg.libvirt_guests_conf.clone(),
            resync_interval: Duration::from_secs(cfg.resync_interval_s),
            autostart_poll: Duration::from_millis(200),
            state_dir: cfg.state_dir.clone(),
        }
    }
}

enum Request {
    Snapshot,
    Event(ffi::DomainEvent),
    Command(Command, tokio::sync::oneshot::Sender<CommandResult>),
    /// Something in the autostart directory changed (inotify).
    AutostartChanged,
    Shutdown,
}

/// Handle to the actor thread.
#[derive(Clone)]
pub struct Actor {
    tx: mpsc::Sender<Request>,
}

impl Actor {
    /// Asks for a full [`Update::Inventory`] on the update channel.
    pub fn request_snapshot(&self) {
        let _ = self.tx.send(Request::Snapshot);
    }
    /// Carries out a controller command on the actor thread.
    pub async fn command(&self, cmd: Command) -> CommandResult {
        let id = cmd.id.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Request::Command(cmd, tx)).is_err() {
            return CommandResult { id, ok: false, error: "libvirt actor stopped".into(), ..Default::default() };
        }
        rx.await.unwrap_or_else(|_| CommandResult {
            id,
            ok: false,
            error: "libvirt actor dropped the command".into(),
            ..Default::default()
        })
    }

    /// Stops the thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Request::Shutdown);
    }
}

/// Capacity of the update channel; on overflow the actor sends a full
/// inventory once there is room again, so nothing is lost.
pub const UPDATE_CAPACITY: usize = 4096;

static EVENT_LOOP: Once = Once::new();

fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            warn!("cannot register libvirt's event loop, relying on polling: {e}");
            return;
        }
        thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        warn!("libvirt event loop: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .expect("spawn libvirt event thread");
    });
}

/// Starts the actor thread. Returns its handle and the update stream.
pub fn spawn(cfg: ActorConfig, shared: Arc<Shared>) -> std::io::Result<(Actor, tmpsc::Receiver<Update>)> {
    start_event_loop();
    let (tx, rx) = mpsc::channel();
    let (utx, urx) = tmpsc::channel(UPDATE_CAPACITY);
    let self_tx = tx.clone();
    let watched = Arc::new(AtomicBool::new(false));
    autostart_watch::spawn(cfg.autostart_dir.clone(), tx.clone(), &watched);
    thread::Builder::new().name("libvirt".into()).spawn(move || {
        let mut st = ActorState::new(cfg, shared, utx, self_tx, watched);
        st.run(rx);
    })?;
    Ok((Actor { tx }, urx))
}

struct Conn {
    conn: Connect,
    callback: Option<i32>,
}

struct ActorState {
    cfg: ActorConfig,
    shared: Arc<Shared>,
    out: tmpsc::Sender<Update>,
    self_tx: mpsc::Sender<Request>,
    conn: Option<Conn>,
    known: BTreeMap<String, Guest>,
    host: HostInfo,
    autostart_links: Option<BTreeSet<String>>,
    /// True while inotify watches the autostart directory (no polling then).
    autostart_watched: Arc<AtomicBool>,
    overflowed: bool,
    next_connect: Instant,
    connect_backoff: Duration,
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    matches!(e.code(), Enum::Known(ErrorNumber::NoDomain))
}

impl ActorState {
    fn new(
        cfg: ActorConfig,
        shared: Arc<Shared>,
        out: tmpsc::Sender<Update>,
        self_tx: mpsc::Sender<Request>,
        autostart_watched: Arc<AtomicBool>,
    ) -> Self {
        let host = HostInfo {
            host_id: cfg.host_id.clone(),
            libvirt_uri: cfg.uri.clone(),
            agent_version: lifeboat_common::VERSION.to_string(),
            libvirt_error: "not connected yet".into(),
            ..Default::default()
        };
        ActorState {
            cfg,
            shared,
            out,
            self_tx,
            conn: None,
            known: BTreeMap::new(),
            host,
            autostart_links: None,
            autostart_watched,
            overflowed: false,
            next_connect: Instant::now(),
            connect_backoff: Duration::from_millis(500),
        }
    }

    fn emit(&mut self, u: Update) {
        if self.overflowed {
            return;
        }
        if let Err(tmpsc::error::TrySendError::Full(_)) = self.out.try_send(u) {
            warn!("update channel full; a full inventory will follow");
            self.overflowed = true;
        }
    }

    fn run(&mut self, rx: mpsc::Receiver<Request>) {
        let mut last_resync = Instant::now();
        let mut last_alive_check = Instant::now();
        let mut last_memory_check = Instant::now();
        loop {
            self.shared.last_tick_ms.store(lifeboat_common::now_unix_ms(), Ordering::Relaxed);
            if self.conn.is_none() && Instant::now() >= self.next_connect {
                self.connect();
            }
            // Watched by inotify: wake once a second (the libvirt liveness
            // check needs 2 s); else poll the directory.
            let watched = self.autostart_watched.load(Ordering::SeqCst);
            let mut wait = if watched { Duration::from_secs(1) } else { self.cfg.autostart_poll };
            if self.conn.is_none() {
                wait = wait
                    .min(self.next_connect.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(10));
            }
            let mut autostart_event = false;
            match rx.recv_timeout(wait) {
                Ok(Request::AutostartChanged) => autostart_event = true,
                Ok(Request::Snapshot) => {
                    self.overflowed = false;
                    self.rescan(false);
                    let inv = Inventory {
                        host: Some(self.host.clone()),
                        guests: self.known.values().cloned().collect(),
                        more: false,
                    };
                    self.emit(Update::Inventory(inv));
                }
                Ok(Request::Command(cmd, reply)) => self.command(cmd, reply),
                Ok(Request::Event(ev)) => {
                    debug!(uuid = %ev.uuid, event = ev.event, "libvirt domain event");
                    self.refresh_one(&ev.uuid);
                }
                Ok(Request::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.disconnect();
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.overflowed && self.out.capacity() > UPDATE_CAPACITY / 2 {
                self.overflowed = false;
                let _ = self.self_tx.send(Request::Snapshot);
            }
            if (autostart_event || !watched) && self.autostart_dir_changed() {
                debug!("autostart links changed; re-reading autostart");
                self.refresh_autostart();
            }
            if last_alive_check.elapsed() >= Duration::from_secs(2) {
                last_alive_check = Instant::now();
                self.check_alive();
            }
            if last_resync.elapsed() >= self.cfg.resync_interval {
                last_resync = Instant::now();
                self.rescan(true);
            }
            if last_memory_check.elapsed() >= hostfacts::MEMORY_REFRESH {
                last_memory_check = Instant::now();
                self.refresh_memory();
            }
        }
    }

    fn set_libvirt_error(&mut self, err: String) {
        if self.host.libvirt_error != err {
            self.host.libvirt_error = err;
            let h = self.host.clone();
            self.emit(Update::Host(h));
        }
    }

    fn connect(&mut self) {
        match Connect::open(Some(&self.cfg.uri)) {
            Ok(conn) => {
                let _ = conn.set_keep_alive(5, 3);
                let (etx, erx) = mpsc::channel::<ffi::DomainEvent>();
                let fwd = self.self_tx.clone();
                // The libvirt event thread sends into etx; forward into our queue.
                thread::Builder::new()
                    .name("libvirt-event-fwd".into())
                    .spawn(move || {
                        for ev in erx {
                            if fwd.send(Request::Event(ev)).is_err() {
                                break;
                            }
                        }
                    })
                    .ok();
                let callback = match ffi::register_lifecycle(&conn, etx) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        warn!("libvirt domain events unavailable ({e}); relying on polling");
                        None
                    }
                };
                info!(uri = %self.cfg.uri, "connected to libvirt");
                crate::metrics::get().libvirt_connected.store(true, Ordering::Relaxed);
                self.conn = Some(Conn { conn, callback });
                self.connect_backoff = Duration::from_millis(500);
                self.refresh_host_static();
                self.host.libvirt_error.clear();
                let h = self.host.clone();
                self.emit(Update::Host(h));
                self.rescan(true);
            }
            Err(e) => {
                let msg = format!("libvirt unreachable at {}: {}", self.cfg.uri, e.message());
                if self.host.libvirt_error != msg {
                    warn!("{msg}; retrying");
                }
                self.set_libvirt_error(msg);
                self.next_connect = Instant::now() + self.connect_backoff;
                self.connect_backoff = (self.connect_backoff * 2).min(Duration::from_secs(10));
            }
        }
    }

    fn disconnect(&mut self) {
        crate::metrics::get().libvirt_connected.store(false, Ordering::Relaxed);
        if let Some(mut c) = self.conn.take() {
            if let Some(id) = c.callback.take() {
                ffi::deregister(&c.conn, id);
            }
            drop(c);
        }
    }

    fn check_alive(&mut self) {
        let alive = match &self.conn {
            Some(c) => c.conn.is_alive().unwrap_or(false),
            None => return,
        };
        if !alive {
            warn!("libvirt connection lost; reconnecting");
            self.disconnect();
            self.set_libvirt_error(format!("libvirt connection to {} lost", self.cfg.uri));
            self.next_connect = Instant::now();
        } else if let Some(c) = &self.conn
            && let Ok(free) = c.conn.free_memory()
        {
            let kib = free / 1024;
            self.shared.memory_free_kib.store(kib, Ordering::Relaxed);
            self.host.memory_free_kib = kib;
        }
    }

    /// Re-reads the host's memory (memory can be hot-added, or a host
    /// booted with less); the controller plans with the total, so a changed
    /// total is reported at once. A reconnect to libvirt reads it too.
    fn refresh_memory(&mut self) {
        let Some(c) = &self.conn else { return };
        let Ok(ni) = c.conn.node_info() else { return };
        if hostfacts::memory_total_changed(self.host.memory_total_kib, ni.memory) {
            info!(from_kib = self.host.memory_total_kib, to_kib = ni.memory, "host memory changed; reporting it");
            self.host.memory_total_kib = ni.memory;
            if let Ok(free) = c.conn.free_memory() {
                self.host.memory_free_kib = free / 1024;
                self.shared.memory_free_kib.store(free / 1024, Ordering::Relaxed);
            }
            let h = self.host.clone();
            self.emit(Update::Host(h));
        }
    }

    fn refresh_host_static(&mut self) {
        let Some(c) = &self.conn else { return };
        let h = &mut self.host;
        h.hostname = hostfacts::hostname();
        h.boot_id = hostfacts::read_trimmed(&self.cfg.boot_id_file).unwrap_or_default();
        h.libvirt_version = c.conn.lib_version().map(version_string).unwrap_or_default();
        h.hypervisor_type = c.conn.driver_type().unwrap_or_default();
        h.hypervisor_version = c.conn.hyp_version().map(version_string).unwrap_or_default();
        if let Ok(ni) = c.conn.node_info() {
            h.cpus = ni.cpus;
            h.cpu_model = ni.model;
            h.memory_total_kib = ni.memory;
        }
        if let Ok(free) = c.conn.free_memory() {
            h.memory_free_kib = free / 1024;
            self.shared.memory_free_kib.store(free / 1024, Ordering::Relaxed);
        }
        h.lock_manager = hostfacts::lock_manager(&self.cfg.qemu_conf);
        h.guests_on_boot = hostfacts::guests_on_boot(&self.cfg.libvirt_guests_conf);
    }

    fn autostart_dir_changed(&mut self) -> bool {
        let now: Option<BTreeSet<String>> = std::fs::read_dir(&self.cfg.autostart_dir)
            .ok()
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect());
        let changed = self.autostart_links.is_some() && now != self.autostart_links;
        self.autostart_links = now;
        changed && self.conn.is_some()
    }

    /// Re-reads every domain; with `emit_diffs`, reports what changed.
    fn rescan(&mut self, emit_diffs: bool) {
        let Some(c) = &self.conn else { return };
        let doms = match c.conn.list_all_domains(0) {
            Ok(d) => d,
            Err(e) => {
                warn!("listing domains failed: {e}");
                self.check_alive();
                return;
            }
        };
        // Three listings answer persistent / autostart / managed save for
        // every guest at once (instead of three calls per guest); only the
        // state and the definition are read per guest.
        let bulk = Bulk::read(&c.conn);
        let mut fresh = BTreeMap::new();
        for d in &doms {
            match read_guest_with(d, Some(&bulk)) {
                Ok(g) => {
                    fresh.insert(g.uuid.clone(), g);
                }
                Err(e) if is_no_domain(&e) => {}
                Err(e) => warn!("reading a domain failed: {e}"),
            }
        }
        crate::metrics::get().guests.store(fresh.len() as i64, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.known, fresh);
        if emit_diffs {
            let removed: Vec<Guest> = old.values().filter(|g| !self.known.contains_key(&g.uuid)).cloned().collect();
            let changed: Vec<Guest> = self.known.values().filter(|g| old.get(&g.uuid) != Some(*g)).cloned().collect();
            for g in removed {
                self.emit(Update::Removed { uuid: g.uuid, name: g.name });
            }
            for g in changed {
                self.emit(Update::Changed(g));
            }
        }
    }

    /// After a change in the autostart link directory: one listing of the
    /// autostart guests, and a full re-read of each guest whose flag differs
    /// from what was last reported. Falls back to a full rescan when the
    /// listing fails.
    fn refresh_autostart(&mut self) {
        let Some(c) = &self.conn else { return };
        let on = match uuids(&c.conn, sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART) {
            Ok(on) => on,
            Err(e) => {
                debug!("listing autostart guests failed ({e}); rescanning");
                self.rescan(true);
                return;
            }
        };
        let differ: Vec<String> =
            self.known.values().filter(|g| g.autostart != on.contains(&g.uuid)).map(|g| g.uuid.clone()).collect();
        for u in differ {
            self.refresh_one(&u);
        }
    }

    fn refresh_one(&mut self, uuid: &str) {
        let Some(c) = &self.conn else { return };
        let res = c.conn.lookup_domain_by_uuid_string(uuid).and_then(|d| read_guest(&d));
        match res {
            Ok(g) => {
                if self.known.get(uuid) != Some(&g) {
                    self.known.insert(uuid.to_string(), g.clone());
                    self.emit(Update::Changed(g));
                }
            }
            Err(e) if is_no_domain(&e) => {
                if let Some(g) = self.known.remove(uuid) {
                    self.emit(Update::Removed { uuid: g.uuid, name: g.name });
                }
            }
            Err(e) => warn!(%uuid, "re-reading domain failed: {e}"),
        }
    }
}

/// UUIDs of the domains one filtered listing returns.
fn uuids(conn: &Connect, flags: sys::virConnectListAllDomainsFlags) -> Result<BTreeSet<String>, virt::error::Error> {
    conn.list_all_domains(flags)?.iter().map(|d| d.uuid_string()).collect()
}

/// What a whole rescan asks once for all guests: persistent / autostart /
/// managed save from three filtered listings, states from one stats call.
struct Bulk {
    flags: Option<BulkFlags>,
    states: BTreeMap<String, (i32, i32)>,
}

struct BulkFlags {
    persistent: BTreeSet<String>,
    autostart: BTreeSet<String>,
    managed_save: BTreeSet<String>,
}

impl Bulk {
    /// Whatever fails is asked per guest instead.
    fn read(conn: &Connect) -> Bulk {
        let flags = (|| {
            Ok::<_, virt::error::Error>(BulkFlags {
                persistent: uuids(conn, sys::VIR_CONNECT_LIST_DOMAINS_PERSISTENT)?,
                autostart: uuids(conn, sys::VIR_CONNECT_LIST_DOMAINS_AUTOSTART)?,
                managed_save: uuids(conn, sys::VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)?,
            })
        })();
        let flags = flags.map_err(|e| debug!("filtered domain listing failed ({e}); asking per guest")).ok();
        let states = ffi::all_states(conn).unwrap_or_else(|e| {
            debug!("domain stats failed ({e}); asking per guest");
            BTreeMap::new()
        });
        Bulk { flags, states }
    }
}

/// Reads one domain. Only a vanished domain is an error; any other failure
/// is recorded in `Guest::error` with the rest still filled in.
fn read_guest(d: &Domain) -> Result<Guest, virt::error::Error> {
    read_guest_with(d, None)
}

/// [`read_guest`], with the state and persistent / autostart / managed save
/// taken from `bulk` where it has them.
fn read_guest_with(d: &Domain, bulk: Option<&Bulk>) -> Result<Guest, virt::error::Error> {
    let uuid = d.uuid_string()?;
    let name = d.name()?;
    let (st, reason) = match bulk.and_then(|b| b.states.get(&uuid)) {
        Some(s) => *s,
        None => ffi::get_state(d)?,
    };
    let mut errors = Vec::new();
    let (persistent, autostart, managed_save) = match bulk.and_then(|b| b.flags.as_ref()) {
        Some(b) => {
            let persistent = b.persistent.contains(&uuid);
            (persistent, persistent && b.autostart.contains(&uuid), persistent && b.managed_save.contains(&uuid))
        }
        None => {
            let persistent = d.is_persistent().unwrap_or_else(|e| {
                errors.push(format!("persistent: {}", e.message()));
                true
            });
            let autostart = if persistent { d.autostart().unwrap_or(false) } else { false };
            (persistent, autostart, persistent && d.has_managed_save(0).unwrap_or(false))
        }
    };
    let mut g = Guest {
        uuid,
        name,
        state: state::guest_state(st) as i32,
        state_reason: state::reason_name(st, reason),
        persistent,
        autostart,
        managed_save,
        ..Default::default()
    };
    let flags =
        if persistent { sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE } else { sys::VIR_DOMAIN_XML_SECURE };
    match d.xml_desc(flags) {
        Ok(xml) => {
            match domxml::parse(&xml) {
                Ok(f) => {
                    if f.vcpus > 0 {
                        g.vcpus = f.vcpus;
                    }
                    if f.memory_kib > 0 {
                        g.memory_kib = f.memory_kib;
                    }
                    g.disks = f.disks;
                    // On a worker thread with a timeout: a hung mount cannot stop the actor.
                    crate::storage::fill_disks(&mut g.disks);
                    g.nics = f.nics;
                    g.priority = f.priority;
                    if let Some((h, gen_)) = f.owner {
                        g.owner_host = h;
                        g.owner_generation = gen_;
                    }
                }
                Err(e) => errors.push(e),
            }
            g.definition_xml = xml;
        }
        Err(e) if is_no_domain(&e) => return Err(e),
        Err(e) => errors.push(format!("definition unreadable: {}", e.message())),
    }
    // The definition gives vCPUs and memory; ask libvirt only without it.
    if (g.vcpus == 0 || g.memory_kib == 0)
        && let Ok(info) = d.info()
    {
        if g.vcpus == 0 {
            g.vcpus = info.nr_virt_cpu;
        }
        if g.memory_kib == 0 {
            g.memory_kib = info.max_mem;
        }
    }
    if g.state == GuestState::Unspecified as i32 {
        errors.push(format!("unknown libvirt state {st}"));
    }
    g.error = errors.join("; ");
    Ok(g)
}
