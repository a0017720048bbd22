//! Tables for people, JSON with stable field names for scripts
//! (documented in docs/cli.md).

use std::borrow::Cow;

use lifeboat_proto::v1::{Guest, GuestRecord, HostRecord, WhoAmIResponse};
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

/// State name used in JSON and tables (the one mapping, in the proto crate).
pub use lifeboat_proto::state_name;

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
        nics: g
            .nics
            .into_iter()
            .map(|n| NicJson { mac: n.mac, kind: n.kind, source: n.source, model: n.model })
            .collect(),
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

/// Prints `v` as pretty JSON (serde escapes every control character).
pub fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => emit_raw(&text),
        Err(e) => err!("lifeboat: cannot encode the answer as JSON: {e}"),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    for l in render_table(header, &rows) {
        out!("{l}");
    }
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let d = lifeboat_common::now_unix_ms().saturating_sub(ms).max(0) / 1000;
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
        (
            "Lock manager",
            if j.lock_manager.is_empty() { "none (qemu.conf lock_manager unset)".into() } else { j.lock_manager },
        ),
        ("libvirt-guests on boot", j.guests_on_boot),
        ("Agent", j.agent_version),
        ("libvirt error", if j.libvirt_error.is_empty() { "-".into() } else { j.libvirt_error }),
    ];
    for (k, v) in kv {
        out!("{}{}", pad(k, 24), clean(&v));
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
        let c = |v: &str| clean(v).into_owned();
        out!("Name           {}", c(&j.name));
        out!("UUID           {}", c(&j.uuid));
        out!("Host           {} ({})", c(&j.host_id), c(&j.host_liveness));
        out!("State          {}", c(&state_cell(&j)));
        if j.missing {
            out!(
                "Missing        since {}: gone from {} outside Lifeboat; its last definition is kept.\n               \
                 `lifeboat vms restore {} --reason ...` defines it again (--to HOST, --start); `lifeboat vms forget` drops it",
                crate::migrate::fmt_time(j.missing_since_unix_ms),
                c(&j.host_id),
                c(&j.uuid)
            );
        }
        out!("Persistent     {}", j.persistent);
        out!("Autostart      {}", j.autostart);
        out!("Managed save   {}", j.managed_save);
        out!("vCPUs/memory   {} / {} MiB", j.vcpus, j.memory_mib);
        for d in &j.disks {
            let shareable = if d.shareable { " shareable" } else { "" };
            out!("Disk {}{} {} ({}){shareable}", pad(&c(&d.target), 10), c(&d.source_type), c(&d.source), c(&d.device));
        }
        for n in &j.nics {
            out!("NIC {}{} {} {}", pad(&c(&n.mac), 11), c(&n.kind), c(&n.source), c(&n.model));
        }
        if !j.error.is_empty() {
            out!("Error          {}", c(&j.error));
        }
        if !j.desired_state.is_empty() {
            out!("Desired        {} (owner {})", c(&j.desired_state), c(&j.owner_host));
        }
        if !j.waiting_reason.is_empty() {
            out!("WAITING        since {}: {}", ago(j.waiting_since_unix_ms), c(&j.waiting_reason));
            out!(
                "               starts on {} once it is healthy and cleaned up, or now: lifeboat vms start {} --reason TEXT",
                c(&j.host_id),
                c(&j.name)
            );
        }
        if xml {
            out!("{}", clean_lines(j.definition_xml.as_deref().unwrap_or_default()));
        }
        out!();
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
    out!(
        "forgot {} ({}), missing on {}: its definition ({} bytes, sha256 {}) is dropped",
        clean(&r.name),
        clean(&r.uuid),
        clean(&r.host),
        r.definition_bytes,
        clean(&r.definition_sha256)
    );
}

/// A dashboard sign-in link (`lifeboat dashboard login`).
pub fn dashboard_login(fmt: crate::Format, url: &str, r: &lifeboat_proto::v1::DashboardLogin) {
    if fmt == Format::Json {
        return print_json(&serde_json::json!({
            "url": url, "name": r.name, "role": r.role, "expires_unix_ms": r.expires_unix_ms
        }));
    }
    out!("{}", clean(url));
    out!("This link works once, within 60 s; it signs you in as {} ({}).", clean(&r.name), clean(&r.role));
}

/// `dashboard end-sessions`.
pub fn dashboard_sessions_ended(fmt: crate::Format, r: &lifeboat_proto::v1::EndDashboardSessionsResponse) {
    if fmt == Format::Json {
        return print_json(&serde_json::json!({"sessions": r.sessions, "links": r.links}));
    }
    out!("Ended {} dashboard session(s) and {} unused sign-in link(s).", r.sessions, r.links);
}

/// `whoami`.
pub fn whoami(fmt: crate::Format, r: &WhoAmIResponse) {
    if fmt == Format::Json {
        return print_json(&serde_json::json!({"name": r.name, "role": r.role}));
    }
    out!("{} ({})", clean(&r.name), clean(&r.role));
}

// ---------------------------------------------------------------------------
// Output hygiene: every text that came from outside (agents, the controller's
// answers) passes through `clean` before it reaches a terminal, and every
// line reaches stdout through `emit` (a closed pipe ends the CLI quietly).
// ---------------------------------------------------------------------------

/// Widest a table cell is drawn, in terminal columns (the full value is in
/// `show` and in JSON).
pub const CELL_MAX: usize = 48;
/// Widest the last cell of a table row is drawn (it is not padded).
pub const LAST_CELL_MAX: usize = 160;

/// Characters that are invisible or reorder text: bidi embeddings,
/// overrides and isolates, marks, zero-width characters and line separators.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
    )
}

fn escape_into(out: &mut String, c: char) {
    use std::fmt::Write;
    let code = u32::from(c);
    // Writing into a String cannot fail.
    let _ = if code < 0x80 { write!(out, "\\x{code:02x}") } else { write!(out, "\\u{{{code:04x}}}") };
}

fn sanitize(s: &str, keep_lines: bool) -> Cow<'_, str> {
    let bad = |c: char| (c.is_control() && !(keep_lines && matches!(c, '\n' | '\t'))) || invisible(c);
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().saturating_add(16));
    for c in s.chars() {
        if bad(c) { escape_into(&mut out, c) } else { out.push(c) }
    }
    Cow::Owned(out)
}

/// `s` safe for a terminal on one line: control characters (C0, DEL, C1,
/// newlines and tabs too) and invisible or reordering characters (bidi
/// overrides, zero-width) are shown escaped: `\x1b`, `\x00`, `\u{009b}`,
/// `\u{202e}`. Everything else is unchanged.
pub fn clean(s: &str) -> Cow<'_, str> {
    sanitize(s, false)
}

/// Like [`clean`], but keeps newlines and tabs: for multi-line texts (a
/// libvirt definition, a refusal listing every failed check).
pub fn clean_lines(s: &str) -> Cow<'_, str> {
    sanitize(s, true)
}

/// Display width in terminal columns (CJK characters take two).
pub fn width(s: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(s)
}

/// `s` cut to at most `max` columns, ending with `…` when cut.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if width(s) <= max {
        return Cow::Borrowed(s);
    }
    if max == 0 {
        return Cow::Owned(String::new());
    }
    // Widths are measured on whole prefixes, not summed per character: a
    // variation selector or a joiner changes the width of what precedes it.
    // At most 4 characters per column are tried, so this stays cheap on a
    // string of 100,000 zero-width marks.
    let room = max.saturating_sub(1);
    let mut end = 0usize;
    for (i, c) in s.char_indices().take(max.saturating_mul(4).saturating_add(8)) {
        let next = i.saturating_add(c.len_utf8());
        if width(&s[..next]) > room {
            break;
        }
        end = next;
    }
    let mut out = format!("{}…", &s[..end]);
    while width(&out) > max {
        // Drop one more character before the ellipsis.
        out.pop();
        if out.pop().is_none() {
            break;
        }
        out.push('…');
    }
    Cow::Owned(out)
}

/// `s` followed by spaces up to `cols` columns (no `{:width$}`: a width
/// from data must never reach the formatter).
pub fn pad(s: &str, cols: usize) -> String {
    let fill = cols.saturating_sub(width(s));
    let mut out = String::with_capacity(s.len().saturating_add(fill));
    out.push_str(s);
    out.extend(std::iter::repeat_n(' ', fill));
    out
}

/// Renders a table: cells cleaned, cut to [`CELL_MAX`] columns
/// ([`LAST_CELL_MAX`] for the last), padded by display width. Rows with
/// fewer cells than the header are drawn with empty cells.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let n = header.len();
    let cell = |r: &[String], i: usize| -> String {
        let max = if i.saturating_add(1) == n { LAST_CELL_MAX } else { CELL_MAX };
        r.get(i).map(|c| truncate(&clean(c), max).into_owned()).unwrap_or_default()
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| (0..n).map(|i| cell(r, i)).collect()).collect();
    let mut w: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for r in &cells {
        for (wi, c) in w.iter_mut().zip(r) {
            *wi = (*wi).max(width(c));
        }
    }
    let line = |r: Vec<String>| -> String {
        let s: Vec<String> = r.iter().zip(&w).map(|(c, wi)| pad(c, *wi)).collect();
        s.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(cells.into_iter().map(line));
    out
}

/// Writes one line of text output to stdout, passed through
/// [`clean_lines`] as a last net (fields are cleaned one by one before, so a
/// newline inside a value cannot forge a line). A reader that went away
/// (`| head`) ends the CLI quietly with exit 0; any other write error ends
/// it with exit 1 and a message. Never a panic, never SIGPIPE.
pub fn emit(args: std::fmt::Arguments<'_>) {
    let line = std::fmt::format(args);
    emit_raw(&clean_lines(&line));
}

/// Writes one line to stdout as is: JSON, whose encoder escapes control
/// characters itself and must stay exact.
pub fn emit_raw(line: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(line.as_bytes()).and_then(|()| o.write_all(b"\n")) {
        stdout_failed(&e);
    }
}

/// Flushes stdout at the end, with [`emit`]'s handling of errors.
pub fn flush() {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().flush() {
        stdout_failed(&e);
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    warn(format_args!("lifeboat: cannot write the output: {e}"));
    std::process::exit(1);
}

/// Writes one line to stderr; an unwritable stderr is ignored (nothing
/// else could report it).
pub fn warn(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| e.write_all(b"\n"));
}

/// `println!` through [`emit`].
macro_rules! out {
    () => { $crate::output::emit(format_args!("")) };
    ($($t:tt)*) => { $crate::output::emit(format_args!($($t)*)) };
}
pub(crate) use out;

/// `eprintln!` through [`warn`].
macro_rules! err {
    ($($t:tt)*) => { $crate::output::warn(format_args!($($t)*)) };
}
pub(crate) use err;

#[cfg(test)]
mod hygiene_tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(clean("vm-01"), "vm-01");
        assert!(matches!(clean("数据库"), Cow::Borrowed(_)));
        assert_eq!(clean("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(clean("nul\0"), "nul\\x00");
        assert_eq!(clean("del\u{7f}"), "del\\x7f");
        assert_eq!(clean("csi\u{9b}31m"), "csi\\u{009b}31m");
        assert_eq!(clean("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(clean("i\u{2066}x\u{2069}"), "i\\u{2066}x\\u{2069}");
        assert_eq!(clean("zw\u{200b}sp\u{feff}"), "zw\\u{200b}sp\\u{feff}");
        assert_eq!(clean("two\nlines\ttab\r"), "two\\x0alines\\x09tab\\x0d");
        assert_eq!(clean_lines("two\nlines\ttab\r\u{1b}"), "two\nlines\ttab\\x0d\\x1b");
        assert_eq!(clean(""), "");
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let s = clean(c.encode_utf8(&mut [0; 4])).into_owned();
            assert!(s.starts_with('\\') && s.chars().all(|c| !c.is_control()), "{c:?} -> {s:?}");
        }
    }

    #[test]
    fn widths_truncation_and_padding() {
        assert_eq!(width("数据库"), 6);
        assert_eq!(pad("数据", 6), "数据  ");
        assert_eq!(pad("toolong", 3), "toolong");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("数据库服务器", 5), "数据…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abc", 0), "");
        assert_eq!(width(&truncate(&"x".repeat(100_000), CELL_MAX)), CELL_MAX);
    }

    #[test]
    fn tables_align_by_display_width_and_never_panic() {
        let huge = "n".repeat(100_000);
        let rows = vec![
            vec!["数据库-01".to_string(), "host-a".into(), "running".into()],
            vec!["web\u{1b}[2J".to_string(), "h\u{202e}b".into(), "shutoff".into()],
            vec![huge.clone(), String::new(), huge.clone()],
            vec![String::new()],
            vec![],
        ];
        let lines = render_table(&["NAME", "HOST", "STATE"], &rows);
        assert_eq!(lines.len(), 6);
        for l in &lines {
            assert!(!l.chars().any(|c| c.is_control() || c == '\u{202e}'), "{l:?}");
            assert!(width(l) <= CELL_MAX * 2 + LAST_CELL_MAX + 4, "{}", width(l));
        }
        // The HOST column starts at the same display column on every row.
        let host_col = |l: &str, host: &str| width(&l[..l.find(host).unwrap()]);
        let c0 = host_col(&lines[0], "HOST");
        assert_eq!(host_col(&lines[1], "host-a"), c0);
        assert_eq!(host_col(&lines[2], "h\\u{202e}b"), c0);
        assert!(lines[2].contains("web\\x1b[2J"));
        assert!(lines[3].contains('…'));
        assert_eq!(c0, CELL_MAX + 2, "the 100,000-char name is cut to {CELL_MAX} columns");
        assert_eq!(render_table(&["A"], &[]), ["A"]);
    }
}

#[cfg(test)]
mod hygiene_props {
    use super::*;
    use proptest::prelude::*;

    fn unsafe_char(c: char) -> bool {
        c.is_control() || invisible(c)
    }

    proptest! {
        #[test]
        fn clean_leaves_nothing_a_terminal_obeys(s in any::<String>()) {
            let c = clean(&s);
            prop_assert!(!c.chars().any(unsafe_char), "{:?}", c);
            let l = clean_lines(&s);
            prop_assert!(!l.chars().any(|c| unsafe_char(c) && !matches!(c, '\n' | '\t')));
            if !s.chars().any(unsafe_char) {
                prop_assert_eq!(c.as_ref(), s.as_str());
            }
        }

        #[test]
        fn truncate_and_tables_stay_in_bounds(
            rows in proptest::collection::vec(proptest::collection::vec(any::<String>(), 0..5), 0..6),
            max in 0usize..80,
        ) {
            for r in &rows {
                for c in r {
                    prop_assert!(width(&truncate(c, max)) <= max);
                }
            }
            let lines = render_table(&["A", "BB", "CCC", "D"], &rows);
            prop_assert_eq!(lines.len(), rows.len() + 1);
            for l in &lines {
                prop_assert!(!l.chars().any(unsafe_char));
                prop_assert!(width(l) <= 3 * (CELL_MAX + 2) + LAST_CELL_MAX);
            }
        }
    }
}
