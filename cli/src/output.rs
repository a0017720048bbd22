//! Tables for people, JSON with stable field names for scripts
//! (documented in docs/cli.md).

use lifeboat_proto::v1::{Guest, GuestRecord, GuestState, HostRecord, WhoAmIResponse};
use serde::Serialize;

use crate::Format;

/// A host, as `--output json` prints it.
#[derive(Serialize)]
pub struct HostJson {
    host_id: String,
    hostname: String,
    status: String,
    liveness: String,
    session_open: bool,
    last_seen_unix_ms: i64,
    first_seen_unix_ms: i64,
    boot_id: String,
    libvirt_version: String,
    hypervisor_type: String,
    hypervisor_version: String,
    libvirt_uri: String,
    libvirt_error: String,
    agent_version: String,
    cpus: u32,
    cpu_model: String,
    memory_total_mib: u64,
    memory_free_mib: u64,
    lock_manager: String,
    guests_on_boot: String,
    guest_count: u32,
    running_count: u32,
    status_reason: String,
    alarms: Vec<String>,
    stale_definitions: u32,
    reserved_memory_mib: u64,
    waiting_guests: u32,
}

/// A disk, as `--output json` prints it.
#[derive(Serialize)]
pub struct DiskJson {
    target: String,
    source_type: String,
    source: String,
    device: String,
    shareable: bool,
    readonly: bool,
}

/// A NIC, as `--output json` prints it.
#[derive(Serialize)]
pub struct NicJson {
    mac: String,
    kind: String,
    source: String,
    model: String,
}

/// A guest, as `--output json` prints it.
#[derive(Serialize)]
pub struct VmJson {
    uuid: String,
    name: String,
    host_id: String,
    host_liveness: String,
    state: String,
    state_reason: String,
    persistent: bool,
    autostart: bool,
    managed_save: bool,
    vcpus: u32,
    memory_mib: u64,
    disks: Vec<DiskJson>,
    nics: Vec<NicJson>,
    error: String,
    updated_unix_ms: i64,
    desired_state: String,
    owner_host: String,
    owner_generation: u64,
    /// Gone from its owner outside Lifeboat; its last definition is kept.
    missing: bool,
    missing_since_unix_ms: i64,
    waiting_reason: String,
    waiting_since_unix_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    definition_xml: Option<String>,
}

/// State name used in JSON and tables.
pub fn state_name(s: i32) -> &'static str {
    match GuestState::try_from(s).unwrap_or(GuestState::Unspecified) {
        GuestState::Unspecified => "unknown",
        GuestState::Nostate => "nostate",
        GuestState::Running => "running",
        GuestState::Blocked => "blocked",
        GuestState::Paused => "paused",
        GuestState::Shutdown => "shutdown",
        GuestState::Shutoff => "shutoff",
        GuestState::Crashed => "crashed",
        GuestState::Pmsuspended => "pmsuspended",
    }
}

fn host_json(h: &HostRecord) -> HostJson {
    let i = h.info.clone().unwrap_or_default();
    HostJson {
        host_id: i.host_id,
        hostname: i.hostname,
        status: h.status.clone(),
        liveness: h.liveness.clone(),
        session_open: h.session_open,
        last_seen_unix_ms: h.last_seen_unix_ms,
        first_seen_unix_ms: h.first_seen_unix_ms,
        boot_id: i.boot_id,
        libvirt_version: i.libvirt_version,
        hypervisor_type: i.hypervisor_type,
        hypervisor_version: i.hypervisor_version,
        libvirt_uri: i.libvirt_uri,
        libvirt_error: i.libvirt_error,
        agent_version: i.agent_version,
        cpus: i.cpus,
        cpu_model: i.cpu_model,
        memory_total_mib: i.memory_total_kib / 1024,
        memory_free_mib: i.memory_free_kib / 1024,
        lock_manager: i.lock_manager,
        guests_on_boot: i.guests_on_boot,
        guest_count: h.guest_count,
        running_count: h.running_count,
        status_reason: h.status_reason.clone(),
        alarms: h.alarms.clone(),
        stale_definitions: h.stale_definitions,
        reserved_memory_mib: h.reserved_memory_kib / 1024,
        waiting_guests: h.waiting_guests,
    }
}

fn vm_json(r: &GuestRecord, with_xml: bool) -> VmJson {
    let g: Guest = r.guest.clone().unwrap_or_default();
    VmJson {
        state: state_name(g.state).into(),
        uuid: g.uuid,
        name: g.name,
        host_id: r.host_id.clone(),
        host_liveness: r.host_liveness.clone(),
        state_reason: g.state_reason,
        persistent: g.persistent,
        autostart: g.autostart,
        managed_save: g.managed_save,
        vcpus: g.vcpus,
        memory_mib: g.memory_kib / 1024,
        disks: g
            .disks
            .into_iter()
            .map(|d| DiskJson {
                target: d.target,
                source_type: d.source_type,
                source: d.source,
                device: d.device,
                shareable: d.shareable,
                readonly: d.readonly,
            })
            .collect(),
        nics: g.nics.into_iter().map(|n| NicJson { mac: n.mac, kind: n.kind, source: n.source, model: n.model }).collect(),
        error: g.error,
        updated_unix_ms: r.updated_unix_ms,
        desired_state: r.desired_state.clone(),
        owner_host: r.owner_host.clone(),
        owner_generation: g.owner_generation,
        missing: r.missing,
        missing_since_unix_ms: r.missing_since_unix_ms,
        waiting_reason: r.waiting_reason.clone(),
        waiting_since_unix_ms: r.waiting_since_unix_ms,
        definition_xml: with_xml.then_some(g.definition_xml),
    }
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let d = (lifeboat_common::now_unix_ms() - ms).max(0) / 1000;
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        _ => format!("{}h ago", d / 3600),
    }
}

/// `hosts list`.
pub fn hosts(fmt: crate::Format, hs: &[HostRecord]) {
    if fmt == Format::Json {
        return print_json(&hs.iter().map(host_json).collect::<Vec<_>>());
    }
    let rows = hs
        .iter()
        .map(|h| {
            let j = host_json(h);
            vec![
                j.host_id,
                j.hostname,
                if j.alarms.is_empty() { j.status } else { format!("{} ALARM", j.status) },
                j.liveness,
                ago(j.last_seen_unix_ms),
                format!("{}/{}", j.running_count, j.guest_count),
                format!("{}/{}", j.memory_free_mib, j.memory_total_mib),
                if j.libvirt_error.is_empty() { j.libvirt_version } else { format!("ERROR: {}", j.libvirt_error) },
            ]
        })
        .collect();
    table(&["HOST", "HOSTNAME", "STATUS", "LIVENESS", "LAST SEEN", "RUNNING/VMS", "FREE/TOTAL MiB", "LIBVIRT"], rows);
}

/// `hosts show`.
pub fn host(fmt: crate::Format, h: &HostRecord) {
    let j = host_json(h);
    if fmt == Format::Json {
        return print_json(&j);
    }
    let kv = [
        ("Host id", j.host_id),
        ("Hostname", j.hostname),
        ("Status", if j.status_reason.is_empty() { j.status } else { format!("{} ({})", j.status, j.status_reason) }),
        ("Alarms", if j.alarms.is_empty() { "-".into() } else { j.alarms.join("; ") }),
        ("Stale definitions", j.stale_definitions.to_string()),
        ("Waiting guests", j.waiting_guests.to_string()),
        ("Liveness", j.liveness),
        ("Session open", j.session_open.to_string()),
        ("Last seen", ago(j.last_seen_unix_ms)),
        ("Boot id", j.boot_id),
        ("Guests", format!("{} ({} running)", j.guest_count, j.running_count)),
        ("CPUs", format!("{} ({})", j.cpus, j.cpu_model)),
        ("Memory", format!("{} MiB free of {} MiB", j.memory_free_mib, j.memory_total_mib)),
        ("Reserved memory", format!("{} MiB (moves under way, not yet running here)", j.reserved_memory_mib)),
        ("libvirt", format!("{} at {}", j.libvirt_version, j.libvirt_uri)),
        ("Hypervisor", format!("{} {}", j.hypervisor_type, j.hypervisor_version)),
        ("Lock manager", if j.lock_manager.is_empty() { "none (qemu.conf lock_manager unset)".into() } else { j.lock_manager }),
        ("libvirt-guests on boot", j.guests_on_boot),
        ("Agent", j.agent_version),
        ("libvirt error", if j.libvirt_error.is_empty() { "-".into() } else { j.libvirt_error }),
    ];
    for (k, v) in kv {
        println!("{k:<24}{v}");
    }
}

/// `vms list`.
pub fn vms(fmt: crate::Format, gs: &[GuestRecord]) {
    if fmt == Format::Json {
        return print_json(&gs.iter().map(|g| vm_json(g, false)).collect::<Vec<_>>());
    }
    let rows = gs
        .iter()
        .map(|r| {
            let j = vm_json(r, false);
            let state = state_cell(&j);
            vec![
                j.name,
                j.host_id.clone(),
                state,
                if j.desired_state.is_empty() { "-".into() } else { j.desired_state.clone() },
                if j.autostart { "yes".into() } else { "no".into() },
                j.vcpus.to_string(),
                j.memory_mib.to_string(),
                j.disks.iter().map(|d| d.source.clone()).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(","),
                j.uuid,
                {
                    let mut note = Vec::new();
                    if !j.waiting_reason.is_empty() {
                        note.push(format!("WAITING since {}", ago(j.waiting_since_unix_ms)));
                    }
                    if j.missing {
                        note.push("missing on its owner: `lifeboat vms restore` or `lifeboat vms forget`".to_string());
                    } else if j.owner_host != j.host_id && !j.owner_host.is_empty() {
                        note.push(format!("stale: owned by {}", j.owner_host));
                    }
                    if j.host_liveness != "REACHABLE" {
                        note.push("host unreachable".to_string());
                    }
                    note.join("; ")
                },
            ]
        })
        .collect();
    table(&["NAME", "HOST", "STATE", "DESIRED", "AUTOSTART", "VCPUS", "MiB", "DISKS", "UUID", "NOTE"], rows);
}

/// The STATE cell: MISSING with since when, or the reported state.
fn state_cell(j: &VmJson) -> String {
    if j.missing {
        format!("MISSING (since {}, last {})", ago(j.missing_since_unix_ms), j.state)
    } else {
        format!("{} ({})", j.state, j.state_reason)
    }
}

/// `vms show`.
pub fn vm_detail(fmt: crate::Format, gs: &[GuestRecord], xml: bool) {
    if fmt == Format::Json {
        return print_json(&gs.iter().map(|g| vm_json(g, true)).collect::<Vec<_>>());
    }
    for r in gs {
        let j = vm_json(r, true);
        println!("Name           {}", j.name);
        println!("UUID           {}", j.uuid);
        println!("Host           {} ({})", j.host_id, j.host_liveness);
        println!("State          {}", state_cell(&j));
        if j.missing {
            println!(
                "Missing        since {}: gone from {} outside Lifeboat; its last definition is kept.\n               \
                 `lifeboat vms restore {} --reason ...` defines it again (--to HOST, --start); `lifeboat vms forget` drops it",
                crate::migrate::fmt_time(j.missing_since_unix_ms),
                j.host_id,
                j.uuid
            );
        }
        println!("Persistent     {}", j.persistent);
        println!("Autostart      {}", j.autostart);
        println!("Managed save   {}", j.managed_save);
        println!("vCPUs/memory   {} / {} MiB", j.vcpus, j.memory_mib);
        for d in &j.disks {
            println!("Disk {:<10}{} {} ({}){}", d.target, d.source_type, d.source, d.device, if d.shareable { " shareable" } else { "" });
        }
        for n in &j.nics {
            println!("NIC {:<11}{} {} {}", n.mac, n.kind, n.source, n.model);
        }
        if !j.error.is_empty() {
            println!("Error          {}", j.error);
        }
        if !j.desired_state.is_empty() {
            println!("Desired        {} (owner {})", j.desired_state, j.owner_host);
        }
        if !j.waiting_reason.is_empty() {
            println!("WAITING        since {}: {}", ago(j.waiting_since_unix_ms), j.waiting_reason);
            println!("               starts on {} once it is healthy and cleaned up, or now: lifeboat vms start {} --reason TEXT", j.host_id, j.name);
        }
        if xml {
            println!("{}", j.definition_xml.unwrap_or_default());
        }
        println!();
    }
}

/// `vms forget`.
pub fn forgotten(fmt: crate::Format, r: &lifeboat_proto::v1::ForgetGuestResponse) {
    if fmt == Format::Json {
        return print_json(&serde_json::json!({
            "uuid": r.uuid, "name": r.name, "host": r.host,
            "definition_bytes": r.definition_bytes, "definition_sha256": r.definition_sha256,
        }));
    }
    println!(
        "forgot {} ({}), missing on {}: its definition ({} bytes, sha256 {}) is dropped",
        r.name, r.uuid, r.host, r.definition_bytes, r.definition_sha256
    );
}

/// `whoami`.
pub fn whoami(fmt: crate::Format, r: &WhoAmIResponse) {
    if fmt == Format::Json {
        return print_json(&serde_json::json!({"name": r.name, "role": r.role}));
    }
    println!("{} ({})", r.name, r.role);
}
