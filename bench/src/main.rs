//! `lifeboat-loadgen`: measures a real `lifeboat-controller` process under
//! the load of N simulated agents.
//!
//! Every simulated agent has its own certificate and its own mutual-TLS
//! HTTP/2 connection, says Hello, sends a full inventory (host facts and
//! guests with realistic definition XML), keeps a standby connection to
//! every other controller as the agent does, then heartbeats at the interval
//! the controller asks for, sends a steady trickle of guest changes, and
//! answers the controller's commands as a healthy host would (every path
//! visible, every command carried out). The tool then measures, on the
//! controller process: CPU and RSS while it holds the load, the heartbeat
//! round trip (send → `HeartbeatAck`), the time to notice a host that went
//! silent, the time to plan the evacuation of one host, and the time of
//! `lifeboat vms list --output json` over every guest (the real CLI).
//!
//! It prints one JSON object with the figures (and a readable summary on
//! stderr). It is a benchmark, not a test: it asserts nothing but that the
//! controller answered correctly.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lifeboat_common::identity::Role;
use lifeboat_common::pki::{self, Authority, Leaf};
use lifeboat_proto::v1::{
    AgentMessage, CommandResult, Disk, GetHostRequest, Guest, GuestChanged, GuestState, Heartbeat, Hello, HostInfo,
    Inventory, ListHostsRequest, MigrateRequest, Nic, PathCheck, admin_client::AdminClient, agent_message,
    agent_session_client::AgentSessionClient, command, controller_message,
};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// jemalloc, as the controller: the load generator stands for 10,000 other
/// machines, and glibc malloc made it spend about a tenth of its CPU, on the
/// controller's cores, in `_int_malloc` during a failover (perf).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "lifeboat-loadgen", about = "Load a real lifeboat-controller with N simulated agents and measure it")]
struct Args {
    /// Simulated hosts (one agent session each).
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Guests per host.
    #[arg(long, default_value_t = 20)]
    guests_per_host: usize,
    /// The controller binary to start.
    #[arg(long, default_value = "target/release/lifeboat-controller")]
    controller_bin: PathBuf,
    /// The CLI binary (for `vms list --output json`).
    #[arg(long, default_value = "target/release/lifeboat")]
    cli_bin: PathBuf,
    /// Seconds of steady load over which CPU and heartbeat latency are measured.
    #[arg(long, default_value_t = 30)]
    measure_s: u64,
    /// Seconds of steady load before measuring.
    #[arg(long, default_value_t = 10)]
    warmup_s: u64,
    /// Guest changes each host sends per minute (the trickle).
    #[arg(long, default_value_t = 1.0)]
    changes_per_host_per_min: f64,
    /// The controller's force_grace_ms (silence a plan needs; must exceed the
    /// default lease TTL of 30 s).
    #[arg(long, default_value_t = 35000)]
    grace_ms: u64,
    /// The controller's heartbeat_interval_ms (its default).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// The controller's unreachable_after_ms, the detection time (its default).
    #[arg(long, default_value_t = 3000)]
    unreachable_ms: u32,
    /// How many times to plan the evacuation of the silent host.
    #[arg(long, default_value_t = 20)]
    plan_runs: usize,
    /// Simultaneous TLS handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Do not keep standby connections to the other controllers (as agents
    /// before they kept them; with --etcd).
    #[arg(long)]
    no_standby: bool,
    /// Processes the simulated agents run in (0: as few as this process's
    /// open-files limit allows; each agent needs one file per connection).
    #[arg(long, default_value_t = 0)]
    agent_processes: usize,
    /// Internal: run as one of those processes, with the agents this file
    /// names (commands on stdin, counters on stdout).
    #[arg(long, hide = true)]
    worker: Option<PathBuf>,
    /// Working directory (default: a new temporary directory, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Open every simulated agent from 127.0.0.1 (as before issue #16) instead
    /// of one loopback address per agent (127.1.X.Y), as real hosts have.
    #[arg(long)]
    one_source_address: bool,
    /// Keep the decided state in a real etcd (one member, started here)
    /// with `--controllers` controllers sharing it; measures a failover too.
    #[arg(long)]
    etcd: bool,
    /// Controllers sharing the etcd (with --etcd).
    #[arg(long, default_value_t = 2)]
    controllers: usize,
    /// Turn the web dashboard on at 127.0.0.1:PORT and time its pages and
    /// live streams with curl over real TLS (0 = off; not with --etcd).
    #[arg(long, default_value_t = 0)]
    dashboard_port: u16,
}

/// The figures, printed as JSON.
#[derive(Serialize, Default, Debug)]
struct Report {
    hosts: usize,
    guests: usize,
    definition_bytes: usize,
    /// The same definition packed for the wire (DEFLATE).
    definition_packed_bytes: usize,
    heartbeat_interval_ms: u32,
    unreachable_after_ms: u32,
    connect_all_s: f64,
    inventory_stored_s: f64,
    measure_s: f64,
    controller_cpu_pct: f64,
    loadgen_cpu_pct: f64,
    controller_rss_mib: f64,
    controller_peak_rss_mib: f64,
    heartbeats_measured: usize,
    session_reconnects: usize,
    heartbeat_rtt_p50_ms: f64,
    heartbeat_rtt_p99_ms: f64,
    heartbeat_rtt_max_ms: f64,
    changes_sent_per_s: f64,
    silent_detect_ms: f64,
    plan_ms_p50: f64,
    plan_ms_max: f64,
    plan_movable: usize,
    vms_list_ms: f64,
    vms_list_guests: usize,
    vms_list_bytes: usize,
    /// `sqlite` or `etcd`.
    backend: String,
    /// etcd: database file size at the end of the steady window (bytes).
    etcd_db_bytes: u64,
    /// etcd: of which in use.
    etcd_db_in_use_bytes: u64,
    /// etcd: puts + deletes per second over the steady window.
    etcd_writes_per_s: f64,
    /// etcd: transactions per second over the steady window.
    etcd_txns_per_s: f64,
    /// Failover: leader SIGKILLed → a standby answers as leader (s).
    failover_elected_s: f64,
    /// Failover: leader SIGKILLed → every agent has a session with the new leader (s).
    failover_reconnected_s: f64,
    /// Failover: leader SIGKILLed → every agent got a lease grant from the new leader (s).
    failover_leases_s: f64,
    /// Dashboard (`--dashboard-port`): time to first byte of `/hosts`, p50 over 20 requests
    /// (each a new TLS connection, as curl makes it) (ms).
    dashboard_hosts_ttfb_ms_p50: f64,
    /// Dashboard: the slowest of those 20 (ms).
    dashboard_hosts_ttfb_ms_max: f64,
    /// Dashboard: bytes of one `/hosts` page.
    dashboard_hosts_bytes: u64,
    /// Dashboard: time to first byte of `/guests?state=running&q=vm-0004`, p50 over 20 (ms).
    dashboard_guests_ttfb_ms_p50: f64,
    /// Dashboard: the slowest of those 20 (ms).
    dashboard_guests_ttfb_ms_max: f64,
    /// Dashboard: bytes of one filtered guests page.
    dashboard_guests_bytes: u64,
    /// Dashboard: `/live?view=hosts` streams opened for the measure window.
    dashboard_streams: usize,
    /// Dashboard: of those, still open at its end with events received.
    dashboard_streams_alive: usize,
    /// Dashboard: controller VmRSS before the streams were opened (MiB).
    dashboard_rss_before_mib: f64,
    /// Dashboard: controller VmRSS at the end of the measure window, the streams open (MiB).
    dashboard_rss_with_streams_mib: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Load,
    Done,
}

/// State shared by all simulated agents.
struct Shared {
    /// Every controller's URL (one with SQLite).
    urls: Vec<String>,
    /// One loopback address per agent (false: all from 127.0.0.1).
    own_address: bool,
    /// Keep standby connections to the controllers a session is not on.
    standby: bool,
    /// µs since `base` when the leader was killed (0: not yet).
    killed_at_us: AtomicI64,
    /// Agents whose session was opened after the kill.
    reconnected_after_kill: AtomicUsize,
    /// Agents that got a lease grant after the kill.
    leased_after_kill: AtomicUsize,
    ca_pem: String,
    guests_per_host: usize,
    change_every: Duration,
    base: Instant,
    measuring: AtomicBool,
    rtts_us: Mutex<Vec<u32>>,
    /// Index of the host that went silent (usize::MAX = none).
    silenced: AtomicUsize,
    /// When the silenced host sent its last heartbeat (µs since `base`).
    last_hb_us: AtomicI64,
    connected: AtomicUsize,
    reconnects: AtomicUsize,
    inventories: AtomicUsize,
    changes: AtomicU64,
    heartbeat_ms: AtomicU64,
    phase: tokio::sync::watch::Receiver<Phase>,
    connect_gate: Semaphore,
}

/// What the simulated agents are told (also sent to agent processes).
#[derive(Serialize, serde::Deserialize)]
struct SimConfig {
    urls: Vec<String>,
    own_address: bool,
    standby: bool,
    ca_pem: String,
    guests_per_host: usize,
    change_every_us: u64,
    connect_concurrency: usize,
}

impl Shared {
    fn new(c: SimConfig, base: Instant, heartbeat_ms: u64, phase: tokio::sync::watch::Receiver<Phase>) -> Self {
        Shared {
            urls: c.urls,
            own_address: c.own_address,
            standby: c.standby,
            killed_at_us: AtomicI64::new(0),
            reconnected_after_kill: AtomicUsize::new(0),
            leased_after_kill: AtomicUsize::new(0),
            ca_pem: c.ca_pem,
            guests_per_host: c.guests_per_host,
            change_every: Duration::from_micros(c.change_every_us),
            base,
            measuring: AtomicBool::new(false),
            rtts_us: Mutex::new(Vec::new()),
            silenced: AtomicUsize::new(usize::MAX),
            last_hb_us: AtomicI64::new(0),
            connected: AtomicUsize::new(0),
            reconnects: AtomicUsize::new(0),
            inventories: AtomicUsize::new(0),
            changes: AtomicU64::new(0),
            heartbeat_ms: AtomicU64::new(heartbeat_ms),
            phase,
            connect_gate: Semaphore::new(c.connect_concurrency.max(1)),
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn host_id(i: usize) -> String {
    format!("sim-{i:05}")
}

fn guest_uuid(i: usize, j: usize) -> String {
    format!("{i:08x}-{j:04x}-4000-8000-{:012x}", splitmix((i * 1000 + j) as u64) & 0xffff_ffff_ffff)
}

/// A definition shaped like `virsh dumpxml --inactive --security-info` of a
/// typical q35 RHEL guest (about 4.5 KB).
fn definition(name: &str, uuid: &str, i: usize, j: usize) -> String {
    let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff, j & 0xff);
    let mut ports = String::new();
    for p in 1..=10 {
        ports.push_str(&format!(
            "    <controller type='pci' index='{p}' model='pcie-root-port'>\n      <model name='pcie-root-port'/>\n      <target chassis='{p}' port='0x{:x}'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x{:x}'/>\n    </controller>\n",
            0x0f + p,
            p - 1
        ));
    }
    format!(
        r#"<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://redhat.com/rhel/9.4"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-rhel9.4.0'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/libexec/qemu-kvm</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/shared/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/shared/images/{name}-data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
{ports}    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <interface type='bridge'>
      <mac address='{mac}'/>
      <source bridge='br0'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='s3cr3t-{j}'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='virtio' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>
    </video>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>
    </rng>
  </devices>
</domain>
"#
    )
}

/// The storage identity of the simulated hosts' shared /shared (a marker).
const SIM_STORAGE: &str = "marker:5b0c3f9e-1111-4222-8333-444455556666";

fn guest(i: usize, j: usize, running: bool) -> Guest {
    let name = format!("vm-{i:05}-{j:02}");
    let uuid = guest_uuid(i, j);
    let definition_xml = definition(&name, &uuid, i, j);
    Guest {
        disks: [("vda", ""), ("vdb", "-data")]
            .iter()
            .map(|(target, suffix)| Disk {
                target: (*target).into(),
                source_type: "file".into(),
                source: format!("/shared/images/{name}{suffix}.qcow2"),
                device: "disk".into(),
                storage: SIM_STORAGE.into(),
                storage_path: format!("images/{name}{suffix}.qcow2"),
                ..Default::default()
            })
            .collect(),
        nics: vec![Nic {
            mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", (i >> 8) & 0xff, i & 0xff, j & 0xff),
            kind: "bridge".into(),
            source: "br0".into(),
            model: "virtio".into(),
        }],
        uuid,
        name,
        state: if running { GuestState::Running as i32 } else { GuestState::Shutoff as i32 },
        state_reason: if running { "booted".into() } else { "shutdown".into() },
        persistent: true,
        vcpus: 4,
        memory_kib: 4 * 1024 * 1024,
        definition_xml,
        ..Default::default()
    }
}

fn host_info(i: usize) -> HostInfo {
    HostInfo {
        host_id: host_id(i),
        hostname: format!("{}.lab.example", host_id(i)),
        boot_id: format!("boot-{:016x}", splitmix(i as u64)),
        libvirt_version: "10.0.0".into(),
        hypervisor_type: "QEMU".into(),
        hypervisor_version: "8.2.0".into(),
        cpus: 64,
        cpu_model: "x86_64".into(),
        memory_total_kib: 512 * 1024 * 1024,
        memory_free_kib: 300 * 1024 * 1024,
        guests_on_boot: "ignore".into(),
        agent_version: "loadgen".into(),
        libvirt_uri: "qemu:///system".into(),
        ..Default::default()
    }
}

fn answer(c: lifeboat_proto::v1::Command) -> CommandResult {
    let mut r = CommandResult { id: c.id, ok: true, outcome: "done".into(), ..Default::default() };
    if let Some(command::Kind::CheckPaths(p)) = c.kind {
        // Every simulated host mounts the same marked storage at /shared.
        r.paths = p
            .paths
            .into_iter()
            .map(|path| {
                let storage_path = path.strip_prefix("/shared/").unwrap_or_default().to_string();
                PathCheck { path, visible: true, error: String::new(), storage: SIM_STORAGE.into(), storage_path }
            })
            .collect();
    }
    r
}

/// `d` scaled by a random factor in 2/3..4/3, as the agent's backoff
/// jitter: agents that lost the same controller do not dial in lockstep.
fn jittered(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = u32::try_from(std::collections::hash_map::RandomState::new().build_hasher().finish() % 1000).unwrap_or(0);
    d.mul_f64(2.0 / 3.0 + f64::from(r) / 1500.0)
}

/// One simulated agent: connects (with retries) and runs its session until
/// the phase is Done.
async fn sim_agent(i: usize, sh: Arc<Shared>, cert_pem: String, key_pem: String) {
    let mut delay = Duration::from_millis(200);
    let mut st = AgentState {
        url: 0,
        reconnected: false,
        leased: false,
        guests: None,
        welcomed: None,
        ended: None,
        lost: None,
        dial_failed: false,
        standby: Arc::new(Standby { current: AtomicUsize::new(usize::MAX), ..Default::default() }),
    };
    if sh.standby && sh.urls.len() > 1 {
        tokio::spawn(keep_standby(i, sh.clone(), st.standby.clone(), cert_pem.clone(), key_pem.clone()));
    }
    loop {
        if *sh.phase.borrow() == Phase::Done {
            return;
        }
        match session(i, &sh, &cert_pem, &key_pem, &mut st).await {
            Ok(()) => return,
            Err(e) => {
                if *sh.phase.borrow() == Phase::Done {
                    return;
                }
                if sh.silenced.load(Ordering::Relaxed) == i {
                    // A hung host does not dial again.
                    let mut phase = sh.phase.clone();
                    let _ = phase.wait_for(|p| *p == Phase::Done).await;
                    return;
                }
                // As the agent's `Redial`: after an established session the
                // same controller is dialled again first; if that dial
                // fails, the agent lost that leader and says so to followers.
                let welcomed = st.welcomed.take();
                let ended = std::mem::replace(&mut st.ended, welcomed);
                if welcomed.is_some() {
                    st.lost = None;
                } else if let Some(e) = ended
                    && st.dial_failed
                {
                    st.lost = Some(e);
                }
                if welcomed.is_some() {
                    // The same controller again.
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    if sh.killed_at_us.load(Ordering::Relaxed) == 0 {
                        eprintln!("loadgen: {} session: {e:#}; retrying", host_id(i));
                    }
                } else if let Some(leader) = leader_hint(&e, &sh.urls) {
                    // A follower named the leader: dial it next, after the
                    // same backoff as any failed attempt, as the agent does
                    // (a leader still loading names itself: dialling it
                    // again at once is a storm of handshakes it refuses).
                    st.url = leader;
                } else {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    if sh.killed_at_us.load(Ordering::Relaxed) == 0 {
                        eprintln!("loadgen: {} session: {e:#}; retrying", host_id(i));
                    }
                    st.url = (st.url + 1) % sh.urls.len().max(1);
                }
                if welcomed.is_some() {
                    delay = Duration::from_millis(100);
                }
                tokio::time::sleep(jittered(delay)).await;
                // The agent's own backoff: 0.1 s doubling to 1 s, starting
                // over after a session that got its Welcome.
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A new mutual-TLS connection from agent `i` to `url` (one of the
/// `connect_concurrency` handshakes at a time).
async fn dial(i: usize, sh: &Shared, url: String, cert_pem: &str, key_pem: &str) -> anyhow::Result<Channel> {
    let _permit = sh.connect_gate.acquire().await?;
    let tls = ClientTlsConfig::new()
        .domain_name(pki::CONTROLLER_NAME)
        .ca_certificate(Certificate::from_pem(&sh.ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem));
    Endpoint::from_shared(url)?
        .local_address(sh.own_address.then(|| source_address(i)))
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .context("connect")
}

/// One simulated agent's standby connections, as the agent keeps them
/// (`agent::session::Standby`): one to every controller its session is not
/// on, made again before the controller's idle timeout closes it.
#[derive(Default)]
struct Standby {
    /// Controller index → its connection (if one is kept) and when it is
    /// next due (made again, or a failed dial tried again).
    warm: Mutex<std::collections::HashMap<usize, (Option<Channel>, Instant)>>,
    /// The controller of the last established session (usize::MAX: none yet).
    current: AtomicUsize,
}

impl Standby {
    /// An attempt at controller `k` begins (as the agent's `Standby::take`):
    /// its connection, if kept, is handed out, and none is made to it
    /// while the attempt (a call a follower holds) or its session lasts.
    fn take(&self, k: usize) -> Option<Channel> {
        self.current.store(k, Ordering::Relaxed);
        self.warm.lock().unwrap_or_else(|p| p.into_inner()).remove(&k).and_then(|(c, _)| c)
    }
}

/// Keeps agent `i`'s standby connections until the run is done.
async fn keep_standby(i: usize, sh: Arc<Shared>, st: Arc<Standby>, cert_pem: String, key_pem: String) {
    let mut phase = sh.phase.clone();
    loop {
        let wait = jittered(STANDBY_CHECK);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = phase.wait_for(|p| *p == Phase::Done) => return,
        }
        let current = st.current.load(Ordering::Relaxed);
        if current == usize::MAX || sh.silenced.load(Ordering::Relaxed) == i {
            continue;
        }
        for (k, url) in sh.urls.iter().enumerate() {
            let fresh = |st: &Standby| {
                st.warm.lock().unwrap_or_else(|p| p.into_inner()).get(&k).is_some_and(|(_, due)| Instant::now() < *due)
            };
            if k == st.current.load(Ordering::Relaxed) || fresh(&st) {
                continue;
            }
            let made = dial(i, &sh, url.clone(), &cert_pem, &key_pem).await;
            if k == st.current.load(Ordering::Relaxed) {
                continue;
            }
            let mut warm = st.warm.lock().unwrap_or_else(|p| p.into_inner());
            match made {
                // Made again after 140 to 240 s at random (the agent's
                // `standby_again`: 180 to 240 s), not all in the same minute.
                Ok(ch) => {
                    warm.insert(k, (Some(ch), Instant::now() + jittered(STANDBY_REFRESH * 7 / 8).min(STANDBY_REFRESH)));
                }
                // As the agent: tried again a minute later (± a third),
                // keeping a connection it still has.
                Err(_) => {
                    let kept = warm.remove(&k).and_then(|(c, _)| c);
                    warm.insert(k, (kept, Instant::now() + jittered(STANDBY_RETRY)));
                }
            }
        }
    }
}

/// How often a simulated agent looks at its standby connections.
const STANDBY_CHECK: Duration = Duration::from_secs(10);
/// A standby connection is made again before it is this old (the
/// controller closes a connection idle for 300 s).
const STANDBY_REFRESH: Duration = Duration::from_secs(240);
/// A failed standby dial is tried again after this (± a third).
const STANDBY_RETRY: Duration = Duration::from_secs(60);

async fn session(i: usize, sh: &Shared, cert_pem: &str, key_pem: &str, st: &mut AgentState) -> anyhow::Result<()> {
    let url = sh.urls.get(st.url).or(sh.urls.first()).context("no controller URL")?.clone();
    st.dial_failed = true;
    // A standby connection to this controller, as the agent keeps them: no
    // handshake now. If it broke meanwhile, tonic dials again on the call.
    let warm = st.standby.take(st.url);
    let channel: Channel = match warm {
        Some(ch) => ch,
        None => dial(i, sh, url, cert_pem, key_pem).await?,
    };
    st.dial_failed = false;
    let mut client = AgentSessionClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let send = |m: agent_message::Msg| AgentMessage { msg: Some(m) };
    tx.send(send(agent_message::Msg::Hello(Hello {
        host_id: host_id(i),
        agent_version: "loadgen".into(),
        boot_id: host_info(i).boot_id,
    })))
    .await?;
    let opened_us = i64::try_from(sh.base.elapsed().as_micros()).unwrap_or(i64::MAX);
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(v) = st.lost.and_then(|e| e.to_string().parse().ok()) {
        call.metadata_mut().insert(lifeboat_proto::LOST_LEADER_METADATA, v);
    }
    let mut inbound = client.session(call).await?.into_inner();
    let welcome = match inbound.message().await?.and_then(|m| m.msg) {
        Some(controller_message::Msg::Welcome(w)) => w,
        other => bail!("expected Welcome, got {other:?}"),
    };
    sh.connected.fetch_add(1, Ordering::Relaxed);
    st.welcomed = Some(welcome.epoch);

    let killed = sh.killed_at_us.load(Ordering::Relaxed);
    if killed != 0 && opened_us >= killed && !st.reconnected {
        st.reconnected = true;
        sh.reconnected_after_kill.fetch_add(1, Ordering::Relaxed);
    }
    let hb_ms = u64::from(welcome.heartbeat_interval_ms.max(100));
    sh.heartbeat_ms.store(hb_ms, Ordering::Relaxed);
    // Definitions packed as the agent sends them, once per simulated agent
    // and kept across its sessions with their current states: a real agent
    // reports what runs now (which the controller already holds), and it
    // packs on its own CPU, not on the 2 cores this measures.
    let guests = st.guests.get_or_insert_with(|| {
        (0..sh.guests_per_host)
            .map(|j| {
                let mut g = guest(i, j, j % 4 != 0);
                lifeboat_proto::pack_definition(&mut g);
                g
            })
            .collect()
    });
    let inv = Inventory { host: Some(host_info(i)), guests: guests.clone(), more: false };
    for page in lifeboat_proto::inventory_pages(inv, lifeboat_proto::INVENTORY_PAGE_BYTES) {
        tx.send(send(agent_message::Msg::Inventory(page))).await?;
    }
    sh.inventories.fetch_add(1, Ordering::Relaxed);

    let seed = splitmix(i as u64 ^ 0x5eed);
    let hb_phase = Duration::from_micros(seed % (hb_ms * 1000));
    let change_phase =
        Duration::from_micros((seed >> 20) % u64::try_from(sh.change_every.as_micros()).unwrap_or(u64::MAX).max(1));
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + hb_phase, Duration::from_millis(hb_ms));
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut change = tokio::time::interval_at(tokio::time::Instant::now() + change_phase, sh.change_every);
    change.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut phase = sh.phase.clone();
    let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    let mut next_change = 0usize;
    loop {
        let silent = sh.silenced.load(Ordering::Relaxed) == i;
        tokio::select! {
            _ = hb.tick() => {
                if silent { continue; }
                seq += 1;
                let now = Instant::now();
                pending.push_back((seq, now));
                if pending.len() > 64 { pending.pop_front(); }
                if i == 0 {
                    sh.last_hb_us.store(i64::try_from(now.duration_since(sh.base).as_micros()).unwrap_or(i64::MAX), Ordering::Relaxed);
                }
                tx.send(send(agent_message::Msg::Heartbeat(Heartbeat { seq, sent_unix_ms: lifeboat_common::now_unix_ms(), memory_free_kib: 300 * 1024 * 1024 }))).await?;
            }
            _ = change.tick() => {
                if silent { continue; }
                let j = next_change % guests.len().max(1);
                next_change += 1;
                if let Some(g) = guests.get_mut(j) {
                    let running = g.state == GuestState::Running as i32;
                    g.state = if running { GuestState::Paused as i32 } else { GuestState::Running as i32 };
                    g.state_reason = if running { "user".into() } else { "unpaused".into() };
                    tx.send(send(agent_message::Msg::GuestChanged(GuestChanged { guest: Some(g.clone()) }))).await?;
                    sh.changes.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = inbound.message() => {
                let Some(m) = m? else { bail!("the controller ended the session") };
                match m.msg {
                    Some(controller_message::Msg::HeartbeatAck(a)) => {
                        while let Some((s, at)) = pending.front().copied() {
                            if s > a.seq { break; }
                            pending.pop_front();
                            if s == a.seq && sh.measuring.load(Ordering::Relaxed) {
                                let us = u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX);
                                sh.rtts_us.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                            }
                        }
                    }
                    Some(controller_message::Msg::Command(c))
                        if !silent => {
                            if st.reconnected && !st.leased && matches!(c.kind, Some(command::Kind::GrantLeases(_))) {
                                st.leased = true;
                                sh.leased_after_kill.fetch_add(1, Ordering::Relaxed);
                            }
                            tx.send(send(agent_message::Msg::CommandResult(answer(c)))).await?;
                        }
                    _ => {}
                }
            }
            _ = phase.changed() => {
                if *phase.borrow() == Phase::Done { return Ok(()); }
            }
        }
    }
}

/// What one simulated agent keeps across its sessions.
struct AgentState {
    /// Index of the controller URL it dials.
    url: usize,
    /// Has opened a session since the leader was killed.
    reconnected: bool,
    /// Has been granted leases since the leader was killed.
    leased: bool,
    /// Its guests (definitions packed), as last reported.
    guests: Option<Vec<Guest>>,
    /// The last session got its Welcome, at this epoch (the backoff starts
    /// over, and the same controller is dialled again first).
    welcomed: Option<u64>,
    /// The epoch of the session that ended before this attempt.
    ended: Option<u64>,
    /// The epoch of the leader this agent lost (named to followers).
    lost: Option<u64>,
    /// The last attempt failed to connect (TCP or TLS).
    dial_failed: bool,
    /// Standby connections to the other controllers.
    standby: Arc<Standby>,
}

/// Agent `i`'s own loopback address (127.1.X.Y, Y in 1..=250), so that no
/// two simulated hosts share a source address, as on a real network.
fn source_address(i: usize) -> std::net::IpAddr {
    let x = u8::try_from((i / 250) % 256).unwrap_or(0);
    let y = u8::try_from(i % 250 + 1).unwrap_or(1);
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 1, x, y))
}

/// The index in `urls` of the leader a follower named in its refusal
/// (`UNAVAILABLE` with `lifeboat-leader` metadata), if it is one of them.
fn leader_hint(e: &anyhow::Error, urls: &[String]) -> Option<usize> {
    let st = e.chain().find_map(|c| c.downcast_ref::<tonic::Status>())?;
    if st.code() != tonic::Code::Unavailable {
        return None;
    }
    let leader = st.metadata().get(lifeboat_proto::LEADER_METADATA)?.to_str().ok()?;
    urls.iter().position(|u| u == leader)
}

/// A counter or gauge from etcd's `/metrics` (plain HTTP on its client port).
fn etcd_metric(client_url: &str, name: &str) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let hostport = client_url.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(hostport)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
    let mut body = String::new();
    c.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse::<f64>().ok()))
        .with_context(|| format!("etcd metric {name} not found"))
}

fn clock_ticks() -> f64 {
    // Linux always answers _SC_CLK_TCK (100 on every usual kernel); 100 if it did not.
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
    // A tick rate is a few hundred at most: exact in f64.
    #[allow(clippy::cast_precision_loss)]
    let ticks = ticks as f64;
    ticks
}

/// utime + stime of a process, in seconds.
fn proc_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f[11].parse()?;
    let st: f64 = f[12].parse()?;
    Ok((ut + st) / clock_ticks())
}

fn self_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    use nix::sys::time::TimeValLike;
    // getrusage(RUSAGE_SELF) cannot fail on Linux; 0 s if it did.
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| (u.user_time().num_microseconds() + u.system_time().num_microseconds()) as f64 / 1e6)
        .unwrap_or(0.0)
}

/// (VmRSS, VmHWM) in MiB.
fn proc_rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // p is a fraction (0..=1), so the rounded index is within 0..len: no truncation.
    #[allow(clippy::cast_possible_truncation)]
    let idx = (((sorted.len() as f64 - 1.0) * p).round() as usize).min(sorted.len() - 1);
    f64::from(sorted[idx]) / 1000.0
}

struct ControllerProc {
    child: Child,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        // Our own child, not yet reaped (so its pid is not reused); a pid beyond i32 cannot be.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls every URL with `WhoAmI` until one answers (followers refuse):
/// that controller leads. Returns its index and the seconds waited.
async fn find_leader(urls: &[String], dir: &Path, within: Duration) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    loop {
        for (k, u) in urls.iter().enumerate() {
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                let mut a = admin(u, dir).await?;
                a.who_am_i(lifeboat_proto::v1::WhoAmIRequest {}).await?;
                anyhow::Ok(())
            })
            .await;
            if matches!(ok, Ok(Ok(()))) {
                return Ok((k, t.elapsed().as_secs_f64()));
            }
        }
        if t.elapsed() > within {
            bail!("no controller answered as leader within {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin(url: &str, dir: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .domain_name(pki::CONTROLLER_NAME)
        .ca_certificate(Certificate::from_pem(std::fs::read(dir.join("ca.pem"))?))
        .identity(Identity::from_pem(
            std::fs::read(dir.join("client-bench.pem"))?,
            std::fs::read(dir.join("client-bench.key"))?,
        ));
    let ch = Endpoint::from_shared(url.to_string())?.tls_config(tls)?.connect().await?;
    Ok(AdminClient::new(ch).max_decoding_message_size(1 << 30))
}

/// Plans `req` `runs` times on a runtime of its own (call from a plain
/// thread); returns each plan's time (ms, in order) and how many guests the
/// last plan could move.
fn plan_runs(url: &str, pki: &Path, req: &MigrateRequest, runs: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut adm = admin(url, pki).await?;
        let mut plan_ms = Vec::new();
        let mut movable = 0;
        for _ in 0..runs {
            let p0 = Instant::now();
            let p = adm.plan_migration(req.clone()).await?.into_inner();
            plan_ms.push(p0.elapsed().as_secs_f64() * 1000.0);
            movable = p.guests.iter().filter(|g| g.movable).count();
            if !p.executable {
                bail!("the plan is not executable: {}", p.summary);
            }
        }
        Ok((plan_ms, movable))
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// First-byte times (ms) and sizes of the two timed pages.
struct Pages {
    hosts: Vec<f64>,
    hosts_bytes: u64,
    guests: Vec<f64>,
    guests_bytes: u64,
}

/// The dashboard, reached with curl (real TLS, the loadgen's CA, the
/// controller's certificate name resolved to loopback).
struct Dashboard {
    pki: PathBuf,
    port: u16,
    jar: PathBuf,
}

impl Dashboard {
    fn origin(&self) -> String {
        format!("https://{}:{}", pki::CONTROLLER_NAME, self.port)
    }

    fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.arg("--silent")
            .arg("--show-error")
            .arg("--cacert")
            .arg(self.pki.join("ca.pem"))
            .arg("--resolve")
            .arg(format!("{}:{}:127.0.0.1", pki::CONTROLLER_NAME, self.port))
            .stdin(Stdio::null());
        c
    }

    /// Redeems a sign-in link's token; the session cookie lands in the jar.
    fn sign_in(&self, token: &str) -> anyhow::Result<()> {
        let out = self
            .curl()
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Origin: {}", self.origin()))
            .arg("-c")
            .arg(&self.jar)
            .arg("--data-urlencode")
            .arg(format!("token={token}"))
            .arg(format!("{}/login", self.origin()))
            .output()
            .context("running curl")?;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        if code != "303" || !std::fs::read_to_string(&self.jar).unwrap_or_default().contains("__Host-lifeboat") {
            bail!("dashboard sign-in: HTTP {code}, {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Signs in, then times `/hosts` and a filtered guests page 20 times each.
    fn pages(&self, token: &str) -> anyhow::Result<Pages> {
        self.sign_in(token)?;
        let (hosts, hosts_bytes) = self.ttfb_ms("/hosts", 20, "data-host=")?;
        let (guests, guests_bytes) = self.ttfb_ms("/guests?state=running&q=vm-0004", 20, "id=\"guests\"")?;
        Ok(Pages { hosts, hosts_bytes, guests, guests_bytes })
    }

    /// `runs` GETs of `path`: each one's time to first byte (ms), and the
    /// page's size; the page must be a 200 containing `needle`.
    fn ttfb_ms(&self, path: &str, runs: usize, needle: &str) -> anyhow::Result<(Vec<f64>, u64)> {
        let body = self.jar.with_extension("page");
        let mut times = Vec::with_capacity(runs);
        let mut bytes = 0;
        for _ in 0..runs {
            let out = self
                .curl()
                .arg("-o")
                .arg(&body)
                .args(["-w", "%{http_code} %{time_starttransfer} %{size_download}", "-b"])
                .arg(&self.jar)
                .arg(format!("{}{path}", self.origin()))
                .output()
                .context("running curl")?;
            let w = String::from_utf8_lossy(&out.stdout).to_string();
            let mut f = w.split_whitespace();
            let (code, t, size) = (f.next(), f.next().and_then(|t| t.parse::<f64>().ok()), f.next());
            let page = std::fs::read_to_string(&body).unwrap_or_default();
            match (code, t) {
                (Some("200"), Some(t)) if page.contains(needle) => times.push(t * 1000.0),
                _ => bail!("dashboard GET {path}: {w} {}", String::from_utf8_lossy(&out.stderr)),
            }
            bytes = size.and_then(|s| s.parse().ok()).unwrap_or(0);
        }
        Ok((times, bytes))
    }

    /// The same dashboard with another cookie jar (another signed-in page set).
    fn with_jar(&self, jar: PathBuf) -> Dashboard {
        Dashboard { pki: self.pki.clone(), port: self.port, jar }
    }

    /// A `/live?view=hosts` stream written to `out`, for at most `max_s`.
    fn live(&self, out: &Path, max_s: u64) -> anyhow::Result<Child> {
        self.curl()
            .arg("-N")
            .arg("--max-time")
            .arg(max_s.to_string())
            .arg("-o")
            .arg(out)
            .arg("-b")
            .arg(&self.jar)
            .arg(format!("{}/live?view=hosts", self.origin()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running curl")
    }
}

fn log(t0: Instant, msg: impl AsRef<str>) {
    eprintln!("loadgen [{:7.1}s] {}", t0.elapsed().as_secs_f64(), msg.as_ref());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.worker {
        lifeboat_common::tls::install_crypto_provider();
        lifeboat_common::raise_open_files_limit();
        return worker(spec).await;
    }
    if args.hosts == 0 || args.guests_per_host == 0 {
        bail!("--hosts and --guests-per-host must be at least 1");
    }
    if args.dashboard_port != 0 && args.etcd {
        bail!("--dashboard-port needs one controller: leave out --etcd");
    }
    let t0 = Instant::now();
    lifeboat_common::tls::install_crypto_provider();
    lifeboat_common::raise_open_files_limit();
    // A session and a standby connection per agent, and the controllers'
    // own (children inherit the limit): raise the hard limit too (root
    // may), else spread the agents over as many processes as it takes.
    let per_agent = if args.etcd && args.controllers > 1 && !args.no_standby { 2 } else { 1 };
    let want = u64::try_from(args.hosts).unwrap_or(u64::MAX).saturating_mul(per_agent).saturating_add(1024);
    let processes = {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        let limit =
            if soft >= want || setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() { want } else { soft };
        let usable = limit.saturating_sub(1024).max(per_agent);
        let needed = usize::try_from(want.saturating_sub(1024).div_ceil(usable)).unwrap_or(usize::MAX).max(1);
        if args.agent_processes == 0 { needed } else { args.agent_processes }
    };
    let tmp;
    let dir = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let pki_dir = dir.join("pki");
    let _ = std::fs::remove_dir_all(&pki_dir);
    pki::init(&pki_dir)?;
    pki::issue(&pki_dir, &pki_dir, &Leaf::Controller(vec![]))?;
    pki::issue(&pki_dir, &pki_dir, &Leaf::Client("bench".into(), Role::Admin))?;
    let ca = Arc::new(Authority::load(&pki_dir)?);
    let n = args.hosts;
    let certs: Vec<(String, String)> = std::thread::scope(|s| {
        let workers = 2usize;
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let ca = ca.clone();
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % workers == w)
                        .map(|i| {
                            let c = ca.issue_pem(&Leaf::Agent(host_id(i))).expect("agent certificate");
                            (i, c.cert_pem, c.key_pem)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, String, String)> =
            handles.into_iter().flat_map(|h| h.join().expect("cert thread")).collect();
        all.sort_by_key(|c| c.0);
        all.into_iter().map(|(_, c, k)| (c, k)).collect()
    });
    log(t0, format!("{n} agent certificates issued"));

    // With --etcd: one real etcd member and several controllers sharing it.
    let etcd = if args.etcd {
        let mut e = lifeboat_common::etcd_test::Etcd::start().map_err(|e| anyhow::anyhow!("starting etcd: {e}"))?;
        // Kept beside the controllers' logs: a stalled etcd explains itself there.
        e.keep_log(dir.join("etcd.log"));
        log(t0, format!("etcd at {}", e.url()));
        Some(e)
    } else {
        None
    };
    let count = if args.etcd { args.controllers.max(1) } else { 1 };
    let mut ctls: Vec<ControllerProc> = Vec::new();
    let mut urls = Vec::new();
    for k in 0..count {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("https://127.0.0.1:{port}");
        let cfg_path = dir.join(format!("controller-{k}.toml"));
        let db = dir.join(format!("controller-{k}.db"));
        for ext in ["", "-wal", "-shm", ".lock"] {
            let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
        }
        let store = match &etcd {
            Some(e) => {
                let cache = dir.join(format!("cache-{k}"));
                std::fs::create_dir_all(&cache)?;
                format!(
                    "[store]\nbackend = \"etcd\"\nendpoints = [{:?}]\nadvertise_url = {url:?}\ncache_dir = {cache:?}\n",
                    e.url()
                )
            }
            None => String::new(),
        };
        let store = if args.dashboard_port == 0 {
            store
        } else {
            format!("{store}[dashboard]\nenabled = true\nlisten = \"127.0.0.1:{}\"\n", args.dashboard_port)
        };
        std::fs::write(
            &cfg_path,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndatabase = {db:?}\nforce_grace_ms = {}\nheartbeat_interval_ms = {}\nunreachable_after_ms = {}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{store}",
                args.grace_ms,
                args.heartbeat_ms,
                args.unreachable_ms,
                pki_dir.join("ca.pem"),
                pki_dir.join("controller.pem"),
                pki_dir.join("controller.key"),
            ),
        )?;
        // A start never creates the database: a new one is made with `init`
        // (with etcd, the first controller's `init` writes the schema key).
        if k == 0 {
            // (with etcd: `init` writes the schema key into the empty prefix)
            let init = Command::new(&args.controller_bin).arg("--config").arg(&cfg_path).arg("init").output()?;
            if !init.status.success() {
                bail!("lifeboat-controller init: {}", String::from_utf8_lossy(&init.stderr));
            }
        }
        let log_path = dir.join(format!("controller-{k}.log"));
        let child = Command::new(&args.controller_bin)
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", std::env::var("LOADGEN_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .with_context(|| format!("starting {}", args.controller_bin.display()))?;
        let mut ctl = ControllerProc { child };
        let ready = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = ctl.child.try_wait() {
                bail!("the controller exited ({st}): {}", std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            if ready.elapsed() > Duration::from_secs(30) {
                bail!("the controller did not listen within 30 s; see {}", log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        log(t0, format!("controller {k} pid {} listening on {url}", ctl.child.id()));
        ctls.push(ctl);
        urls.push(url);
    }
    let (mut lead, elected) = find_leader(&urls, &pki_dir, Duration::from_secs(60)).await?;
    let mut url = urls[lead].clone();
    let mut pid = ctls[lead].child.id();
    log(t0, format!("controller {lead} (pid {pid}) leads, {:.1} s after the last one listened", elected));

    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Load);
    let sh = Arc::new(Shared::new(
        SimConfig {
            urls: urls.clone(),
            own_address: !args.one_source_address,
            standby: !args.no_standby,
            ca_pem: std::fs::read_to_string(pki_dir.join("ca.pem"))?,
            guests_per_host: args.guests_per_host,
            change_every_us: u64::try_from(
                Duration::from_secs_f64(60.0 / args.changes_per_host_per_min.max(0.001)).as_micros(),
            )
            .unwrap_or(u64::MAX),
            connect_concurrency: args.connect_concurrency.max(1),
        },
        Instant::now(),
        1000,
        phase_rx,
    ));
    let mut rep = Report {
        hosts: n,
        guests: n * args.guests_per_host,
        definition_bytes: guest(0, 0, true).definition_xml.len(),
        definition_packed_bytes: {
            let mut g = guest(0, 0, true);
            lifeboat_proto::pack_definition(&mut g);
            g.definition_deflate.len()
        },
        ..Default::default()
    };
    let start_connect = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let fleet = if processes > 1 {
        log(t0, format!("the {n} simulated agents run in {processes} processes (open-files limit)"));
        Some(Fleet::start(&args, &dir, &sh, certs, processes).await?)
    } else {
        for (i, (c, k)) in certs.into_iter().enumerate() {
            tasks.push(tokio::spawn(sim_agent(i, sh.clone(), c, k)));
        }
        None
    };
    let mut last = 0;
    while sh.inventories.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = sh.connected.load(Ordering::Relaxed);
        if c / 1000 != last / 1000 {
            log(t0, format!("{c} sessions open"));
        }
        last = c;
        if start_connect.elapsed() > Duration::from_secs(1800) {
            bail!("only {c} of {n} agents connected within 30 min");
        }
    }
    rep.connect_all_s = start_connect.elapsed().as_secs_f64();
    log(t0, format!("all {n} sessions open, inventories sent ({:.1} s)", rep.connect_all_s));

    let mut adm = admin(&url, &pki_dir).await?;
    let want = u32::try_from(args.guests_per_host).context("--guests-per-host is too large")?;
    loop {
        let hosts = adm.list_hosts(ListHostsRequest {}).await?.into_inner().hosts;
        let done = hosts.iter().filter(|h| h.session_open && h.guest_count == want).count();
        if done == n {
            break;
        }
        if start_connect.elapsed() > Duration::from_secs(3600) {
            bail!("the controller holds only {done} of {n} inventories after an hour");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rep.inventory_stored_s = start_connect.elapsed().as_secs_f64();
    log(
        t0,
        format!(
            "the controller holds all {} guests ({:.1} s after the first connect)",
            rep.guests, rep.inventory_stored_s
        ),
    );

    let mut streams = Vec::new();
    let mut dashboard = None;
    if args.dashboard_port != 0 {
        let login = adm.create_dashboard_login(lifeboat_proto::v1::CreateDashboardLoginRequest {}).await?.into_inner();
        let d = Dashboard { pki: pki_dir.clone(), port: args.dashboard_port, jar: dir.join("dashboard-cookies.txt") };
        let (d, pages) = tokio::task::spawn_blocking(move || d.pages(&login.token).map(|p| (d, p))).await??;
        let Pages { hosts, hosts_bytes, guests, guests_bytes } = pages;
        rep.dashboard_hosts_ttfb_ms_p50 = median(&hosts);
        rep.dashboard_hosts_ttfb_ms_max = hosts.iter().copied().fold(0.0, f64::max);
        rep.dashboard_hosts_bytes = hosts_bytes;
        rep.dashboard_guests_ttfb_ms_p50 = median(&guests);
        rep.dashboard_guests_ttfb_ms_max = guests.iter().copied().fold(0.0, f64::max);
        rep.dashboard_guests_bytes = guests_bytes;
        log(
            t0,
            format!(
                "dashboard: /hosts first byte p50 {:.1} ms max {:.1} ms ({} bytes); guests page p50 {:.1} ms max {:.1} ms",
                rep.dashboard_hosts_ttfb_ms_p50,
                rep.dashboard_hosts_ttfb_ms_max,
                rep.dashboard_hosts_bytes,
                rep.dashboard_guests_ttfb_ms_p50,
                rep.dashboard_guests_ttfb_ms_max
            ),
        );
        dashboard = Some(d);
    }

    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    // After the warm-up, so that "before" is the steady size and not the inventories' peak.
    if let Some(d) = &dashboard {
        rep.dashboard_rss_before_mib = proc_rss_mib(pid)?.0;
        // 20 open pages as 5 sign-ins of 4 pages each: a controller allows
        // 4 live pages per session (and 10 sessions per name).
        for session in 0..5 {
            let login =
                adm.create_dashboard_login(lifeboat_proto::v1::CreateDashboardLoginRequest {}).await?.into_inner();
            let ds = d.with_jar(dir.join(format!("dashboard-cookies-{session}.txt")));
            let ds = tokio::task::spawn_blocking(move || ds.sign_in(&login.token).map(|()| ds)).await??;
            for page in 0..4 {
                let k = session * 4 + page;
                streams.push(ds.live(&dir.join(format!("live-{k}.txt")), args.measure_s + 60)?);
            }
        }
        rep.dashboard_streams = streams.len();
    }
    log(t0, format!("measuring steady load for {} s", args.measure_s));
    let etcd_writes = |e: &lifeboat_common::etcd_test::Etcd| -> anyhow::Result<(f64, f64)> {
        let w = etcd_metric(&e.url(), "etcd_mvcc_put_total")? + etcd_metric(&e.url(), "etcd_mvcc_delete_total")?;
        Ok((w, etcd_metric(&e.url(), "etcd_mvcc_txn_total")?))
    };
    let etcd0 = etcd.as_ref().map(etcd_writes).transpose()?;
    let cpu0 = proc_cpu_s(pid)?;
    let self0 = self_cpu_s();
    let ch0 = sh.changes.load(Ordering::Relaxed);
    let m0 = Instant::now();
    sh.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.measure_s)).await;
    sh.measuring.store(false, Ordering::Relaxed);
    let wall = m0.elapsed().as_secs_f64();
    rep.measure_s = wall;
    rep.controller_cpu_pct = (proc_cpu_s(pid)? - cpu0) / wall * 100.0;
    rep.loadgen_cpu_pct = (self_cpu_s() - self0) / wall * 100.0;
    rep.changes_sent_per_s = (sh.changes.load(Ordering::Relaxed) - ch0) as f64 / wall;
    rep.backend = if args.etcd { "etcd".into() } else { "sqlite".into() };
    if let (Some(e), Some((w0, t0x))) = (etcd.as_ref(), etcd0) {
        let (w1, t1x) = etcd_writes(e)?;
        rep.etcd_writes_per_s = (w1 - w0) / wall;
        rep.etcd_txns_per_s = (t1x - t0x) / wall;
        // Whole bytes of a file size: exact in f64 far beyond any etcd quota.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            rep.etcd_db_bytes = etcd_metric(&e.url(), "etcd_mvcc_db_total_size_in_bytes")? as u64;
            rep.etcd_db_in_use_bytes = etcd_metric(&e.url(), "etcd_mvcc_db_total_size_in_use_in_bytes")? as u64;
        }
        log(
            t0,
            format!(
                "etcd: {:.1} writes/s, {:.1} txns/s at steady state; database {:.1} MiB ({:.1} MiB in use)",
                rep.etcd_writes_per_s,
                rep.etcd_txns_per_s,
                rep.etcd_db_bytes as f64 / 1048576.0,
                rep.etcd_db_in_use_bytes as f64 / 1048576.0
            ),
        );
    }
    let (rss, _) = proc_rss_mib(pid)?;
    rep.controller_rss_mib = rss;
    if !streams.is_empty() {
        rep.dashboard_rss_with_streams_mib = rss;
        for (k, mut s) in streams.drain(..).enumerate() {
            let open = matches!(s.try_wait(), Ok(None));
            let got = std::fs::read_to_string(dir.join(format!("live-{k}.txt"))).unwrap_or_default();
            if open && got.contains("event: summary") {
                rep.dashboard_streams_alive += 1;
            }
            let _ = s.kill();
            let _ = s.wait();
        }
        log(
            t0,
            format!(
                "dashboard: {} of {} live streams open to the end; controller RSS {:.0} MiB before, {:.0} MiB with them",
                rep.dashboard_streams_alive,
                rep.dashboard_streams,
                rep.dashboard_rss_before_mib,
                rep.dashboard_rss_with_streams_mib
            ),
        );
        if rep.dashboard_streams_alive != rep.dashboard_streams {
            bail!("only {} of {} dashboard live streams lasted", rep.dashboard_streams_alive, rep.dashboard_streams);
        }
    }
    {
        if let Some(f) = &fleet {
            f.rtts_collected(Duration::from_secs(30)).await?;
        }
        let mut v = std::mem::take(&mut *sh.rtts_us.lock().unwrap_or_else(|p| p.into_inner()));
        v.sort_unstable();
        rep.heartbeats_measured = v.len();
        rep.heartbeat_rtt_p50_ms = pct(&v, 0.50);
        rep.heartbeat_rtt_p99_ms = pct(&v, 0.99);
        rep.heartbeat_rtt_max_ms = v.last().map(|x| f64::from(*x) / 1000.0).unwrap_or(0.0);
    }
    rep.heartbeat_interval_ms = u32::try_from(sh.heartbeat_ms.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
    log(
        t0,
        format!(
            "steady: controller CPU {:.1} %, RSS {:.0} MiB, heartbeat RTT p50 {:.2} ms p99 {:.2} ms ({} samples)",
            rep.controller_cpu_pct,
            rep.controller_rss_mib,
            rep.heartbeat_rtt_p50_ms,
            rep.heartbeat_rtt_p99_ms,
            rep.heartbeats_measured
        ),
    );

    // Failover: SIGKILL the leader; time until a standby leads, every agent
    // has a session with it, and every agent got a lease grant from it.
    if args.etcd && ctls.len() > 1 {
        let k0 = Instant::now();
        sh.killed_at_us
            .store(i64::try_from(sh.base.elapsed().as_micros()).unwrap_or(i64::MAX).max(1), Ordering::Relaxed);
        let _ = ctls[lead].child.kill();
        let _ = ctls[lead].child.wait();
        let alive: Vec<String> = urls.iter().enumerate().filter(|(k, _)| *k != lead).map(|(_, u)| u.clone()).collect();
        let (k_alive, _) = find_leader(&alive, &pki_dir, Duration::from_secs(120)).await?;
        rep.failover_elected_s = k0.elapsed().as_secs_f64();
        lead = urls.iter().position(|u| *u == alive[k_alive]).context("leader URL")?;
        url = urls[lead].clone();
        pid = ctls[lead].child.id();
        log(t0, format!("failover: controller {lead} leads {:.2} s after the kill", rep.failover_elected_s));
        // How the reconnections and lease grants progress, a line a second.
        let progress = tokio::spawn({
            let sh = sh.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let (r, l) = (
                        sh.reconnected_after_kill.load(Ordering::Relaxed),
                        sh.leased_after_kill.load(Ordering::Relaxed),
                    );
                    log(t0, format!("failover +{:.1} s: {r} reconnected, {l} leased", k0.elapsed().as_secs_f64()));
                    if l >= n {
                        return;
                    }
                }
            }
        });
        while sh.reconnected_after_kill.load(Ordering::Relaxed) < n {
            if k0.elapsed() > Duration::from_secs(600) {
                bail!(
                    "only {} of {n} agents reconnected within 10 min",
                    sh.reconnected_after_kill.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rep.failover_reconnected_s = k0.elapsed().as_secs_f64();
        while sh.leased_after_kill.load(Ordering::Relaxed) < n {
            if k0.elapsed() > Duration::from_secs(600) {
                bail!("only {} of {n} agents got leases within 10 min", sh.leased_after_kill.load(Ordering::Relaxed));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rep.failover_leases_s = k0.elapsed().as_secs_f64();
        progress.abort();
        log(
            t0,
            format!(
                "failover: all {n} agents reconnected after {:.2} s, all leases renewed after {:.2} s",
                rep.failover_reconnected_s, rep.failover_leases_s
            ),
        );
        adm = admin(&url, &pki_dir).await?;
    }

    // `lifeboat vms list --output json` over every guest, with the real CLI.
    // (on a blocking thread: parsing 200 MB of JSON must not stall the
    // simulated agents' heartbeats)
    let (cli_bin, env_url, pki2) = (args.cli_bin.clone(), url.clone(), pki_dir.clone());
    let (ms, bytes, count) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, usize, usize)> {
        let cli0 = Instant::now();
        let out = Command::new(&cli_bin)
            .args(["vms", "list", "--output", "json"])
            .env("LIFEBOAT_CONTROLLER", &env_url)
            .env("LIFEBOAT_CA", pki2.join("ca.pem"))
            .env("LIFEBOAT_CERT", pki2.join("client-bench.pem"))
            .env("LIFEBOAT_KEY", pki2.join("client-bench.key"))
            .env("LIFEBOAT_SERVER_NAME", pki::CONTROLLER_NAME)
            .output()
            .with_context(|| format!("running {}", cli_bin.display()))?;
        let ms = cli0.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!("`lifeboat vms list --output json` failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).context("vms list output is not JSON")?;
        Ok((ms, out.stdout.len(), listed.as_array().map(|a| a.len()).unwrap_or(0)))
    })
    .await??;
    rep.vms_list_ms = ms;
    rep.vms_list_bytes = bytes;
    rep.vms_list_guests = count;
    log(
        t0,
        format!(
            "vms list --output json: {} guests, {} bytes, {:.0} ms",
            rep.vms_list_guests, rep.vms_list_bytes, rep.vms_list_ms
        ),
    );
    if rep.vms_list_guests != rep.guests {
        bail!("vms list showed {} guests, expected {}", rep.vms_list_guests, rep.guests);
    }

    // A host goes silent (its stream stays open, nothing arrives: a hung host).
    sh.silenced.store(0, Ordering::Relaxed);
    let detect_ms = loop {
        let h = adm.get_host(GetHostRequest { host: host_id(0) }).await?.into_inner();
        if h.liveness == "UNREACHABLE" {
            let now_us = i64::try_from(sh.base.elapsed().as_micros()).unwrap_or(i64::MAX);
            break (now_us - sh.last_hb_us.load(Ordering::Relaxed)) as f64 / 1000.0;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    rep.silent_detect_ms = detect_ms;
    rep.unreachable_after_ms = args.unreachable_ms;
    log(t0, format!("silent host noticed {:.0} ms after its last heartbeat", detect_ms));

    // Plan the evacuation of that host, once the controller has heard
    // nothing from it for longer than the grace.
    loop {
        let h = adm.get_host(GetHostRequest { host: host_id(0) }).await?.into_inner();
        if lifeboat_common::now_unix_ms() - h.last_seen_unix_ms > args.grace_ms as i64 + 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let req = MigrateRequest {
        source: host_id(0),
        attest_powered_off: true,
        attest_reason: "loadgen: simulated host, powered off by definition".into(),
        ..Default::default()
    };
    // The plans are asked from a thread of their own with its own runtime and
    // connection, as an operator's `lifeboat migrate --plan` would be: on the
    // load generator's runtime the answer would wait behind 10,000 simulated
    // agents' tasks, which is not the controller's time.
    let (plan_url, plan_pki, runs) = (url.clone(), pki_dir.clone(), args.plan_runs.max(1));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(plan_runs(&plan_url, &plan_pki, &req, runs));
    });
    let (mut plan_ms, movable) =
        done_rx.await.map_err(|_| anyhow::anyhow!("the planning thread ended without an answer"))??;
    rep.plan_movable = movable;
    let in_order: Vec<String> = plan_ms.iter().map(|m| format!("{m:.1}")).collect();
    log(t0, format!("plan runs in order (ms): {}", in_order.join(" ")));
    plan_ms.sort_by(|a, b| a.total_cmp(b));
    rep.plan_ms_p50 = plan_ms[plan_ms.len() / 2];
    rep.plan_ms_max = *plan_ms.last().unwrap_or(&0.0);
    log(
        t0,
        format!(
            "plan: p50 {:.1} ms, max {:.1} ms, {} guests movable",
            rep.plan_ms_p50, rep.plan_ms_max, rep.plan_movable
        ),
    );

    rep.session_reconnects = sh.reconnects.load(Ordering::Relaxed);
    let (_, hwm) = proc_rss_mib(pid)?;
    rep.controller_peak_rss_mib = hwm;
    let _ = phase_tx.send(Phase::Done);
    drop(ctls);
    drop(etcd);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    if let Some(f) = fleet {
        f.finish(Duration::from_secs(10)).await;
    }
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

/// What one agent process is given (`--worker FILE`, JSON).
#[derive(Serialize, serde::Deserialize)]
struct WorkerSpec {
    /// Index of its first agent; its agents are `first..first + certs.len()`.
    first: usize,
    /// Each agent's certificate and key (PEM).
    certs: Vec<(String, String)>,
    /// What every simulated agent is told.
    sim: SimConfig,
    /// The main process's `base`, in µs since the Unix epoch: times said
    /// between the processes count from it.
    base_unix_us: i64,
}

/// The counters an agent process reports, a line of JSON every 100 ms.
#[derive(Serialize, serde::Deserialize, Default, Clone, Copy)]
struct WorkerStatus {
    connected: usize,
    inventories: usize,
    reconnects: usize,
    changes: u64,
    heartbeat_ms: u64,
    reconnected: usize,
    leased: usize,
    last_hb_us: i64,
}

/// A line an agent process writes.
#[derive(Serialize, serde::Deserialize)]
enum WorkerLine {
    Status(WorkerStatus),
    /// The heartbeat round trips measured while `measure 1` held.
    Rtts(Vec<u32>),
}

fn unix_us() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Simulated agents in other processes of this binary (`--worker`), when
/// one process cannot hold all their connections (its open-files limit).
/// A bridge task mirrors their counters into the main process's [`Shared`]
/// and sends them what the main process changes there (measuring, the
/// silenced host, the kill, the end), so the measuring code is the same.
struct Fleet {
    children: Vec<tokio::process::Child>,
    bridge: tokio::task::JoinHandle<()>,
    rtts_replies: Arc<AtomicUsize>,
    /// Replies expected once measuring ends.
    rtts_wanted: Arc<AtomicUsize>,
}

impl Fleet {
    async fn start(
        args: &Args,
        dir: &Path,
        sh: &Arc<Shared>,
        certs: Vec<(String, String)>,
        processes: usize,
    ) -> anyhow::Result<Fleet> {
        use tokio::io::AsyncBufReadExt;
        let n = certs.len();
        let base_unix_us = unix_us() - i64::try_from(sh.base.elapsed().as_micros()).unwrap_or(0);
        let exe = std::env::current_exe().context("the load generator's own path")?;
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let statuses = Arc::new(Mutex::new(vec![WorkerStatus::default(); processes]));
        let rtts_replies = Arc::new(AtomicUsize::new(0));
        let mut certs = certs.into_iter();
        for w in 0..processes {
            let (first, end) = (w * n / processes, (w + 1) * n / processes);
            let spec = WorkerSpec {
                first,
                certs: certs.by_ref().take(end - first).collect(),
                sim: SimConfig {
                    urls: sh.urls.clone(),
                    ca_pem: sh.ca_pem.clone(),
                    guests_per_host: sh.guests_per_host,
                    change_every_us: u64::try_from(sh.change_every.as_micros()).unwrap_or(u64::MAX),
                    own_address: sh.own_address,
                    standby: sh.standby,
                    connect_concurrency: args.connect_concurrency.div_ceil(processes).max(1),
                },
                base_unix_us,
            };
            let path = dir.join(format!("agents-{w}.json"));
            std::fs::write(&path, serde_json::to_vec(&spec)?)?;
            let mut child = tokio::process::Command::new(&exe)
                .arg("--worker")
                .arg(&path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting agent process {w}"))?;
            stdins.push(child.stdin.take().context("agent process stdin")?);
            let stdout = child.stdout.take().context("agent process stdout")?;
            let (statuses, replies, sh) = (statuses.clone(), rtts_replies.clone(), sh.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    match serde_json::from_str::<WorkerLine>(&l) {
                        Ok(WorkerLine::Status(st)) => {
                            if let Some(slot) = statuses.lock().unwrap_or_else(|p| p.into_inner()).get_mut(w) {
                                *slot = st;
                            }
                        }
                        Ok(WorkerLine::Rtts(v)) => {
                            sh.rtts_us.lock().unwrap_or_else(|p| p.into_inner()).extend(v);
                            replies.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => eprintln!("loadgen: agent process {w} wrote {l:?}: {e}"),
                    }
                }
            });
            children.push(child);
        }
        let rtts_wanted = Arc::new(AtomicUsize::new(0));
        let bridge = tokio::spawn(bridge(sh.clone(), stdins, statuses, rtts_wanted.clone()));
        Ok(Fleet { children, bridge, rtts_replies, rtts_wanted })
    }

    /// Waits until every agent process sent the round trips it measured.
    async fn rtts_collected(&self, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        while self.rtts_replies.load(Ordering::SeqCst) < self.rtts_wanted.load(Ordering::SeqCst)
            || self.rtts_wanted.load(Ordering::SeqCst) == 0
        {
            if Instant::now() > until {
                bail!("the agent processes did not send their heartbeat round trips within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn finish(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            for c in &mut self.children {
                let _ = c.wait().await;
            }
        })
        .await;
        self.bridge.abort();
    }
}

/// Mirrors the agent processes' counters into `sh` and sends them what
/// changed in it, every 20 ms.
async fn bridge(
    sh: Arc<Shared>,
    mut stdins: Vec<tokio::process::ChildStdin>,
    statuses: Arc<Mutex<Vec<WorkerStatus>>>,
    rtts_wanted: Arc<AtomicUsize>,
) {
    use tokio::io::AsyncWriteExt;
    let (mut measuring, mut silenced, mut killed, mut done) = (false, usize::MAX, 0i64, false);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sum = {
            let v = statuses.lock().unwrap_or_else(|p| p.into_inner());
            v.iter().fold(WorkerStatus::default(), |a, b| WorkerStatus {
                connected: a.connected + b.connected,
                inventories: a.inventories + b.inventories,
                reconnects: a.reconnects + b.reconnects,
                changes: a.changes + b.changes,
                heartbeat_ms: a.heartbeat_ms.max(b.heartbeat_ms),
                reconnected: a.reconnected + b.reconnected,
                leased: a.leased + b.leased,
                last_hb_us: a.last_hb_us.max(b.last_hb_us),
            })
        };
        sh.connected.store(sum.connected, Ordering::Relaxed);
        sh.inventories.store(sum.inventories, Ordering::Relaxed);
        sh.reconnects.store(sum.reconnects, Ordering::Relaxed);
        sh.changes.store(sum.changes, Ordering::Relaxed);
        if sum.heartbeat_ms > 0 {
            sh.heartbeat_ms.store(sum.heartbeat_ms, Ordering::Relaxed);
        }
        sh.reconnected_after_kill.store(sum.reconnected, Ordering::Relaxed);
        sh.leased_after_kill.store(sum.leased, Ordering::Relaxed);
        sh.last_hb_us.store(sum.last_hb_us, Ordering::Relaxed);
        let mut say = Vec::new();
        let m = sh.measuring.load(Ordering::Relaxed);
        if m != measuring {
            measuring = m;
            if !m {
                rtts_wanted.fetch_add(stdins.len(), Ordering::SeqCst);
            }
            say.push(format!("measure {}", u8::from(m)));
        }
        let s = sh.silenced.load(Ordering::Relaxed);
        if s != silenced {
            silenced = s;
            say.push(format!("silence {s}"));
        }
        let k = sh.killed_at_us.load(Ordering::Relaxed);
        if k != killed {
            killed = k;
            say.push(format!("kill {k}"));
        }
        if !done && *sh.phase.borrow() == Phase::Done {
            done = true;
            say.push("done".into());
        }
        if say.is_empty() {
            continue;
        }
        let text = say.join("\n") + "\n";
        for w in &mut stdins {
            let _ = w.write_all(text.as_bytes()).await;
            let _ = w.flush().await;
        }
        if done {
            return;
        }
    }
}

/// `--worker FILE`: runs the agents FILE names until told `done`.
async fn worker(spec: &Path) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let spec: WorkerSpec = serde_json::from_slice(&std::fs::read(spec)?)?;
    let behind = Duration::from_micros(u64::try_from(unix_us().saturating_sub(spec.base_unix_us)).unwrap_or(0));
    let now = Instant::now();
    let base = now.checked_sub(behind).unwrap_or(now);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Load);
    let sh = Arc::new(Shared::new(spec.sim, base, 0, phase_rx));
    let tasks: Vec<_> = spec
        .certs
        .into_iter()
        .enumerate()
        .map(|(k, (c, key))| tokio::spawn(sim_agent(spec.first + k, sh.clone(), c, key)))
        .collect();
    let mut out = tokio::io::stdout();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let line = |l: &WorkerLine| serde_json::to_string(l).map(|t| t + "\n");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let st = WorkerStatus {
                    connected: sh.connected.load(Ordering::Relaxed),
                    inventories: sh.inventories.load(Ordering::Relaxed),
                    reconnects: sh.reconnects.load(Ordering::Relaxed),
                    changes: sh.changes.load(Ordering::Relaxed),
                    heartbeat_ms: sh.heartbeat_ms.load(Ordering::Relaxed),
                    reconnected: sh.reconnected_after_kill.load(Ordering::Relaxed),
                    leased: sh.leased_after_kill.load(Ordering::Relaxed),
                    last_hb_us: sh.last_hb_us.load(Ordering::Relaxed),
                };
                out.write_all(line(&WorkerLine::Status(st))?.as_bytes()).await?;
                out.flush().await?;
            }
            l = lines.next_line() => {
                // The main process is gone (or said so): end.
                let Some(l) = l? else { break };
                let (verb, arg) = l.split_once(' ').unwrap_or((l.as_str(), ""));
                match verb {
                    "measure" => {
                        let on = arg == "1";
                        sh.measuring.store(on, Ordering::Relaxed);
                        if !on {
                            let v = std::mem::take(&mut *sh.rtts_us.lock().unwrap_or_else(|p| p.into_inner()));
                            out.write_all(line(&WorkerLine::Rtts(v))?.as_bytes()).await?;
                            out.flush().await?;
                        }
                    }
                    "silence" => sh.silenced.store(arg.parse().unwrap_or(usize::MAX), Ordering::Relaxed),
                    "kill" => sh.killed_at_us.store(arg.parse().unwrap_or(0), Ordering::Relaxed),
                    "done" => break,
                    other => bail!("unknown command {other:?} from the main process"),
                }
            }
        }
    }
    let _ = phase_tx.send(Phase::Done);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(())
}
