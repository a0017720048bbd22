//! Everything an agent sends, bounded and validated before any of it reaches
//! the registry (docs/security.md, "Agent input"). A message that breaks any
//! rule is refused whole: nothing of it is stored. Pure: no lock, no I/O; the
//! session's reader (rpc/agent.rs) calls it and sends the agent a `Refused`.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::HashSet;

use lifeboat_proto::v1::{
    CommandResult, Disk, Guest, GuestChanged, GuestRemoved, GuestState, Heartbeat, Hello, HostInfo, Inventory, Nic,
};

/// Largest gRPC message the agent service decodes (bytes). An honest page is
/// at most 3 KiB or one guest (lifeboat_proto::INVENTORY_PAGE_BYTES) and a
/// guest with its packed definition a few KiB; 4 MiB leaves room for the
/// largest legal guest (a definition that does not compress at all).
pub const MAX_AGENT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest definition one guest's packed definition may inflate to (bytes).
/// libvirt definitions are 2–20 KiB; 256 KiB is ten times the largest seen
/// (many disks and host devices) and bounds a compression bomb per guest.
pub const MAX_DEFINITION_BYTES: u64 = 256 * 1024;

/// Most guests one inventory may carry, over all its pages. A host runs
/// hundreds of guests at most; the figure only bounds memory and work.
pub const MAX_INVENTORY_GUESTS: usize = 100_000;

/// Most pages one inventory may take. The agent puts at least one guest on
/// every page, so an honest inventory has at most one page per guest (plus
/// one for the host facts of an empty host).
pub const MAX_INVENTORY_PAGES: usize = MAX_INVENTORY_GUESTS + 1;

/// Most bytes all definitions of one inventory may inflate to. 64 MiB holds
/// 10,000 guests of 6 KiB: far more than a host runs, and what the
/// controller holds in memory at most per session while the pages arrive.
pub const MAX_INVENTORY_DEFINITION_BYTES: u64 = 64 * 1024 * 1024;

/// Inflated definition bytes one session may send per minute (inventories and
/// `GuestChanged` together; a token bucket of this size refilled over a
/// minute). Two largest inventories a minute: an honest agent resyncs every
/// 30 s and sends only what changed in between; a flood of changes cannot
/// keep the controller inflating and writing.
pub const SESSION_DEFINITION_BYTES_PER_MINUTE: u64 = 2 * MAX_INVENTORY_DEFINITION_BYTES;

/// Bytes of guest data (encoded, without definitions) a session may send a
/// minute, inventories and `GuestChanged` together: two of the largest
/// inventories. With [`SESSION_DEFINITION_BYTES_PER_MINUTE`] it bounds how
/// fast one agent can make the controller write.
pub const SESSION_GUEST_BYTES_PER_MINUTE: u64 = 2 * MAX_INVENTORY_BYTES;

/// Paths a `storage` text may quote with its reason ("unidentified: cannot
/// see PATH: ERROR").
pub const MAX_STORAGE_TEXT_BYTES: usize = MAX_PATH_BYTES + MAX_ERROR_BYTES;

/// Longest guest name, host id or owner host (bytes). libvirt keeps a
/// definition in `<name>.xml`, and a file name has at most 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Largest encoded size of one guest without its definition (names, disks,
/// NICs, texts): an honest guest is a few hundred bytes, one with 256 disks
/// on long paths some 100 KiB.
pub const MAX_GUEST_BYTES: usize = 256 * 1024;

/// Largest encoded size of one inventory's guests without their
/// definitions (what a session holds while pages arrive, besides the
/// definitions' [`MAX_INVENTORY_DEFINITION_BYTES`]).
pub const MAX_INVENTORY_BYTES: u64 = 64 * 1024 * 1024;

/// Longest short text (versions, boot id, hostname, CPU model, state reason,
/// NIC fields, disk target and kind, storage kind; bytes).
pub const MAX_TEXT_BYTES: usize = 1024;

/// Longest path (disk source, storage id, storage path; bytes): Linux's PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest error text (guest error, libvirt error, command error; bytes).
pub const MAX_ERROR_BYTES: usize = 4096;

/// Most disks or NICs of one guest. QEMU guests have a few; 256 is more
/// than a PCI bus holds.
pub const MAX_DEVICES_PER_GUEST: usize = 256;

/// Most paths one command result may list (CheckPaths answers about a
/// guest's disks).
pub const MAX_RESULT_PATHS: usize = 4096;

/// Largest memory figure (KiB) a guest or host may report: 1 TiB KiB = 1 PiB.
/// 100,000 guests of this size still add up without overflow.
pub const MAX_MEMORY_KIB: u64 = 1 << 40;

/// Most vCPUs a guest may report (KVM allows 4096 today).
pub const MAX_VCPUS: u32 = 16_384;

/// Most CPUs a host may report.
pub const MAX_HOST_CPUS: u32 = 1 << 20;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {field}: {reason}")]
pub struct Refusal {
    /// Which message: "Hello", "Inventory", "GuestChanged", "GuestRemoved",
    /// "HostInfo", "CommandResult", "Heartbeat", "message".
    pub kind: &'static str,
    /// Which field, e.g. `guest[3].name` or `host.hostname`.
    pub field: String,
    /// What is wrong and what the operator can do.
    pub reason: String,
}

impl Refusal {
    fn new(kind: &'static str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Refusal { kind, field: field.into(), reason: reason.into() }
    }

    /// The same refusal for the field under `prefix` (`guest[3].` +
    /// `name`): names are built only for a refusal, not for every field
    /// that passes (every guest of every inventory and of every load).
    fn under(mut self, prefix: &str) -> Self {
        self.field.insert_str(0, prefix);
        self
    }

    /// `kind field`, as sent in `Refused.what`.
    pub fn what(&self) -> String {
        format!("{} {}", self.kind, self.field)
    }
}

/// Characters never accepted in text from agents: control characters (C0,
/// DEL, C1: a terminal obeys them) and the bidirectional overrides and
/// isolates (they make a name display as another).
fn forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{feff}')
}

/// A bounded text field without forbidden characters (may be empty).
pub fn check_text(kind: &'static str, field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.len() > max {
        return Err(Refusal::new(kind, field, format!("{} bytes long, more than the limit of {max}", value.len())));
    }
    if let Some((i, c)) = value.char_indices().find(|(_, c)| forbidden(*c)) {
        return Err(Refusal::new(
            kind,
            field,
            format!(
                "contains the control or formatting character U+{:04X} at byte {i}; only printable text is accepted",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// An error text: as [`check_text`], except that line feeds and tabs are
/// allowed (libvirt's errors carry QEMU's stderr, which has several lines;
/// refusing them would turn an honest failure report into a timeout). Every
/// other control character is refused; display escapes what remains.
pub fn check_error_text(kind: &'static str, field: &str, value: &str) -> Result<(), Refusal> {
    if value.len() > MAX_ERROR_BYTES {
        return Err(Refusal::new(
            kind,
            field,
            format!("{} bytes long, more than the limit of {MAX_ERROR_BYTES}", value.len()),
        ));
    }
    let mut rest = value.split(['\n', '\t']);
    rest.try_for_each(|part| check_text(kind, field, part, MAX_ERROR_BYTES))
}

/// A name (guest, host): non-empty, at most [`MAX_NAME_BYTES`], no control
/// character (C0, DEL, C1) and no `/` (libvirt refuses it too). Everything
/// else libvirt accepts in a name is accepted — blanks at either end,
/// right-to-left marks in Hebrew or Arabic names, a BOM pasted in — because
/// refusing a name libvirt took would refuse its host's whole inventory, and
/// with it every lease renewal there; the CLI shows such characters escaped.
pub fn check_name(kind: &'static str, field: &str, value: &str) -> Result<(), Refusal> {
    if value.is_empty() {
        return Err(Refusal::new(kind, field, "empty; a name is required"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Refusal::new(
            kind,
            field,
            format!("{} bytes long, more than the limit of {MAX_NAME_BYTES}", value.len()),
        ));
    }
    if let Some((i, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(Refusal::new(
            kind,
            field,
            format!("contains the control character U+{:04X} at byte {i}; a name must be printable", u32::from(c)),
        ));
    }
    if value.contains('/') {
        return Err(Refusal::new(kind, field, "contains '/', which libvirt does not allow in a name"));
    }
    Ok(())
}

/// A UUID in canonical form: 36 characters, lowercase hexadecimal with
/// hyphens, as libvirt reports it. Any other spelling is refused rather than
/// rewritten, so one guest can never appear under two keys.
pub fn check_uuid(kind: &'static str, field: &str, value: &str) -> Result<(), Refusal> {
    let canonical = uuid::Uuid::try_parse(value).ok().map(|u| u.hyphenated().to_string());
    if canonical.as_deref() != Some(value) {
        let shown: String = value.chars().take(40).map(|c| if forbidden(c) { '?' } else { c }).collect();
        return Err(Refusal::new(
            kind,
            field,
            format!("'{shown}' is not a UUID in canonical form (36 lowercase hexadecimal characters with hyphens)"),
        ));
    }
    Ok(())
}

fn check_max_u64(kind: &'static str, field: &str, value: u64, max: u64) -> Result<(), Refusal> {
    if value > max {
        return Err(Refusal::new(kind, field, format!("{value} is more than the limit of {max}")));
    }
    Ok(())
}

fn check_max_u32(kind: &'static str, field: &str, value: u32, max: u32) -> Result<(), Refusal> {
    check_max_u64(kind, field, u64::from(value), u64::from(max))
}

/// `Hello`: the host id is the certificate's (checked by the session); the
/// rest is bounded text.
pub fn check_hello(h: &Hello) -> Result<(), Refusal> {
    check_name("Hello", "host_id", &h.host_id)?;
    check_text("Hello", "agent_version", &h.agent_version, MAX_TEXT_BYTES)?;
    check_text("Hello", "boot_id", &h.boot_id, MAX_TEXT_BYTES)
}

/// `Heartbeat`: only the free-memory figure is read.
pub fn check_heartbeat(h: &Heartbeat) -> Result<(), Refusal> {
    check_max_u64("Heartbeat", "memory_free_kib", h.memory_free_kib, MAX_MEMORY_KIB)
}

/// Host facts (`HostInfo`, or the host of an inventory: `kind`/`prefix`).
pub fn check_host_info(kind: &'static str, prefix: &str, h: &HostInfo) -> Result<(), Refusal> {
    let f = |n: &str| format!("{prefix}{n}");
    if !h.host_id.is_empty() {
        check_name(kind, &f("host_id"), &h.host_id)?;
    }
    for (n, v) in [
        ("hostname", &h.hostname),
        ("boot_id", &h.boot_id),
        ("libvirt_version", &h.libvirt_version),
        ("hypervisor_type", &h.hypervisor_type),
        ("hypervisor_version", &h.hypervisor_version),
        ("cpu_model", &h.cpu_model),
        ("lock_manager", &h.lock_manager),
        ("guests_on_boot", &h.guests_on_boot),
        ("agent_version", &h.agent_version),
        ("libvirt_uri", &h.libvirt_uri),
    ] {
        check_text(kind, &f(n), v, MAX_TEXT_BYTES)?;
    }
    check_error_text(kind, &f("libvirt_error"), &h.libvirt_error)?;
    check_max_u32(kind, &f("cpus"), h.cpus, MAX_HOST_CPUS)?;
    check_max_u64(kind, &f("memory_total_kib"), h.memory_total_kib, MAX_MEMORY_KIB)?;
    check_max_u64(kind, &f("memory_free_kib"), h.memory_free_kib, MAX_MEMORY_KIB)
}

/// A disk's fields, named without a prefix (see [`Refusal::under`]).
fn check_disk(kind: &'static str, d: &Disk) -> Result<(), Refusal> {
    for (n, v) in [("target", &d.target), ("source_type", &d.source_type), ("device", &d.device)] {
        check_text(kind, n, v, MAX_TEXT_BYTES)?;
    }
    for (n, v) in [("source", &d.source), ("storage_path", &d.storage_path)] {
        check_text(kind, n, v, MAX_PATH_BYTES)?;
    }
    check_text(kind, "storage", &d.storage, MAX_STORAGE_TEXT_BYTES)?;
    Ok(())
}

/// A NIC's fields, named without a prefix (see [`Refusal::under`]).
fn check_nic(kind: &'static str, n: &Nic) -> Result<(), Refusal> {
    for (name, v) in [("mac", &n.mac), ("kind", &n.kind), ("source", &n.source), ("model", &n.model)] {
        check_text(kind, name, v, MAX_TEXT_BYTES)?;
    }
    Ok(())
}

/// Every field of a guest except its definition (see [`unpack_guest`]),
/// as an agent sends it: `definition_digest` is the controller's own.
pub fn check_guest(kind: &'static str, prefix: &str, g: &Guest) -> Result<(), Refusal> {
    check_uuid(kind, &format!("{prefix}uuid"), &g.uuid)?;
    if !g.definition_digest.is_empty() {
        return Err(Refusal::new(
            kind,
            format!("{prefix}definition_digest"),
            "is set by the controller when it takes a guest in; an agent leaves it empty",
        ));
    }
    check_guest_rest(kind, prefix, g)
}

/// The length of a [`definition_digest`] (SHA-256).
pub const DIGEST_BYTES: usize = 32;

/// The digest of a guest's definition as it arrived: SHA-256 over a tag and
/// the packed bytes (`definition_deflate`), or over another tag and the
/// text when it came unpacked; empty without a definition. The same bytes
/// always inflate to the same text, so an equal digest is an equal
/// definition (the tags keep a packed and a plain one apart).
pub fn definition_digest(g: &Guest) -> Vec<u8> {
    use sha2::Digest;
    let (tag, bytes): (&[u8], &[u8]) = if !g.definition_deflate.is_empty() {
        (b"lifeboat definition deflate\0", &g.definition_deflate)
    } else if !g.definition_xml.is_empty() {
        (b"lifeboat definition xml\0", g.definition_xml.as_bytes())
    } else {
        return Vec::new();
    };
    let mut h = sha2::Sha256::new();
    h.update(tag);
    h.update(bytes);
    h.finalize().to_vec()
}

/// A reported guest as the registry keeps and compares it: every field but
/// the definition, which its digest stands for (computed here when the
/// guest has none). Returns that encoding and its hash; `g` is left as it
/// was, its digest set.
pub fn reported_key(g: &mut Guest) -> (Vec<u8>, u64) {
    use std::hash::{Hash, Hasher};
    if g.definition_digest.len() != DIGEST_BYTES {
        g.definition_digest = definition_digest(g);
    }
    let xml = std::mem::take(&mut g.definition_xml);
    let packed = std::mem::take(&mut g.definition_deflate);
    let encoded = prost::Message::encode_to_vec(&*g);
    g.definition_xml = xml;
    g.definition_deflate = packed;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encoded.hash(&mut h);
    (encoded, h.finish())
}

/// A guest read back from the database: as [`check_guest`], except that
/// its UUID need only be bounded printable text (rows written before UUIDs
/// were checked stay readable; the row's key is that text).
pub fn check_stored_guest(g: &Guest) -> Result<(), Refusal> {
    if g.uuid.is_empty() {
        return Err(Refusal::new("stored guest", "uuid", "empty"));
    }
    check_text("stored guest", "uuid", &g.uuid, MAX_NAME_BYTES)?;
    if !g.definition_digest.is_empty() && g.definition_digest.len() != DIGEST_BYTES {
        return Err(Refusal::new(
            "stored guest",
            "definition_digest",
            format!("{} bytes, not a SHA-256 digest ({DIGEST_BYTES} bytes)", g.definition_digest.len()),
        ));
    }
    check_guest_rest("stored guest", "", g)
}

/// Encoded size of a guest without its definition.
pub fn guest_bytes(g: &Guest) -> usize {
    prost::Message::encoded_len(g).saturating_sub(g.definition_deflate.len()).saturating_sub(g.definition_xml.len())
}

fn check_guest_rest(kind: &'static str, prefix: &str, g: &Guest) -> Result<(), Refusal> {
    let f = |n: &str| format!("{prefix}{n}");
    let size = guest_bytes(g);
    if size > MAX_GUEST_BYTES {
        return Err(Refusal::new(
            kind,
            prefix.trim_end_matches('.').to_string(),
            format!("{size} bytes without its definition, more than the limit of {MAX_GUEST_BYTES}"),
        ));
    }
    let at = |r: Result<(), Refusal>| r.map_err(|e| e.under(prefix));
    at(check_name(kind, "name", &g.name))?;
    if GuestState::try_from(g.state).is_err() {
        return Err(Refusal::new(kind, f("state"), format!("{} is not a guest state this controller knows", g.state)));
    }
    at(check_text(kind, "state_reason", &g.state_reason, MAX_TEXT_BYTES))?;
    at(check_max_u32(kind, "vcpus", g.vcpus, MAX_VCPUS))?;
    at(check_max_u64(kind, "memory_kib", g.memory_kib, MAX_MEMORY_KIB))?;
    for (what, n) in [("disks", g.disks.len()), ("nics", g.nics.len())] {
        if n > MAX_DEVICES_PER_GUEST {
            return Err(Refusal::new(
                kind,
                f(what),
                format!("{n} entries, more than the limit of {MAX_DEVICES_PER_GUEST}"),
            ));
        }
    }
    for (i, d) in g.disks.iter().enumerate() {
        check_disk(kind, d).map_err(|e| e.under(&format!("{prefix}disks[{i}].")))?;
    }
    for (i, n) in g.nics.iter().enumerate() {
        check_nic(kind, n).map_err(|e| e.under(&format!("{prefix}nics[{i}].")))?;
    }
    at(check_error_text(kind, "error", &g.error))?;
    if !g.owner_host.is_empty() {
        at(check_name(kind, "owner_host", &g.owner_host))?;
    }
    // An owner_generation beyond what SQLite stores (hand-edited metadata)
    // is no refusal: the registry ignores such a claim (`check_claims`).
    if !g.definition_xml.is_empty() && !g.definition_deflate.is_empty() {
        return Err(Refusal::new(
            kind,
            f("definition_deflate"),
            "both definition_xml and definition_deflate are set; send one",
        ));
    }
    Ok(())
}

/// Restores a guest's packed definition within `limit` bytes (the smaller of
/// [`MAX_DEFINITION_BYTES`] and what is left of the caller's budgets) and
/// returns its inflated size. A definition sent unpacked counts the same.
/// One that does not inflate, is too large or is not UTF-8 refuses the
/// message (a definition Lifeboat cannot read would make the guest
/// unmovable; the agent's libvirt has the real one).
pub fn unpack_guest(kind: &'static str, prefix: &str, g: &mut Guest, limit: u64) -> Result<u64, Refusal> {
    let field = format!("{prefix}definition_deflate");
    let limit = limit.min(MAX_DEFINITION_BYTES);
    let too_large = |what: &str| {
        Refusal::new(
            kind,
            field.clone(),
            format!(
                "{what} more than {limit} bytes (per definition at most {MAX_DEFINITION_BYTES}; per inventory \
                 {MAX_INVENTORY_DEFINITION_BYTES}; per session {SESSION_DEFINITION_BYTES_PER_MINUTE} a minute)"
            ),
        )
    };
    if !g.definition_xml.is_empty() {
        let n = u64::try_from(g.definition_xml.len()).unwrap_or(u64::MAX);
        if n > limit {
            return Err(too_large("definition_xml is"));
        }
        if let Some(i) = g.definition_xml.find('\0') {
            return Err(Refusal::new(
                kind,
                format!("{prefix}definition_xml"),
                format!("the definition contains NUL at byte {i}"),
            ));
        }
        return Ok(n);
    }
    if g.definition_deflate.is_empty() {
        return Ok(0);
    }
    let out = lifeboat_proto::inflate_limited(&g.definition_deflate, limit)
        .map_err(|e| Refusal::new(kind, field.clone(), format!("not valid zlib data: {e}")))?
        .ok_or_else(|| too_large("inflates to"))?;
    let n = u64::try_from(out.len()).unwrap_or(u64::MAX);
    g.definition_xml = String::from_utf8(out)
        .map_err(|_| Refusal::new(kind, field.clone(), "inflates to bytes that are not UTF-8 text"))?;
    g.definition_deflate = Vec::new();
    if let Some(i) = g.definition_xml.find('\0') {
        return Err(Refusal::new(kind, field, format!("the definition contains NUL at byte {i}")));
    }
    Ok(n)
}

/// `GuestRemoved`: a canonical UUID and a bounded name (the session checks
/// that the host reported that guest).
pub fn check_removed(r: &GuestRemoved) -> Result<(), Refusal> {
    check_uuid("GuestRemoved", "uuid", &r.uuid)?;
    check_text("GuestRemoved", "name", &r.name, MAX_NAME_BYTES)
}

/// `CommandResult`: bounded texts, UUIDs, a valid guest (the session checks
/// that the command was sent to this host).
pub fn check_command_result(r: &CommandResult) -> Result<(), Refusal> {
    const K: &str = "CommandResult";
    check_uuid(K, "id", &r.id)?;
    check_error_text(K, "error", &r.error)?;
    check_text(K, "outcome", &r.outcome, MAX_TEXT_BYTES)?;
    if r.paths.len() > MAX_RESULT_PATHS {
        return Err(Refusal::new(
            K,
            "paths",
            format!("{} entries, more than the limit of {MAX_RESULT_PATHS}", r.paths.len()),
        ));
    }
    for (i, p) in r.paths.iter().enumerate() {
        check_text(K, &format!("paths[{i}].path"), &p.path, MAX_PATH_BYTES)?;
        check_error_text(K, &format!("paths[{i}].error"), &p.error)?;
        check_text(K, &format!("paths[{i}].storage"), &p.storage, MAX_STORAGE_TEXT_BYTES)?;
        check_text(K, &format!("paths[{i}].storage_path"), &p.storage_path, MAX_PATH_BYTES)?;
    }
    for (field, list) in [
        ("autostart_disabled", &r.autostart_disabled),
        ("stale_generation", &r.stale_generation),
        ("lease_unreadable", &r.lease_unreadable),
    ] {
        if list.len() > MAX_INVENTORY_GUESTS {
            return Err(Refusal::new(
                K,
                field,
                format!("{} entries, more than the limit of {MAX_INVENTORY_GUESTS}", list.len()),
            ));
        }
        for (i, u) in list.iter().enumerate() {
            check_uuid(K, &format!("{field}[{i}]"), u)?;
        }
    }
    if let Some(g) = &r.guest {
        check_guest(K, "guest.", g)?;
        if !g.definition_deflate.is_empty()
            || g.definition_xml.len() > usize::try_from(MAX_DEFINITION_BYTES).unwrap_or(usize::MAX)
        {
            let mut copy = g.clone();
            unpack_guest(K, "guest.", &mut copy, MAX_DEFINITION_BYTES)?;
        }
    }
    Ok(())
}

/// Inflated definition bytes a session may still send: a token bucket of
/// [`SESSION_DEFINITION_BYTES_PER_MINUTE`] refilled evenly over a minute.
#[derive(Debug, Clone)]
pub struct Budget {
    tokens: u64,
    last_ms: i64,
    per_minute: u64,
}

impl Budget {
    /// A full bucket of definition bytes at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self::with_rate(now_ms, SESSION_DEFINITION_BYTES_PER_MINUTE)
    }

    /// A full bucket of `per_minute` bytes at `now_ms`.
    pub fn with_rate(now_ms: i64, per_minute: u64) -> Self {
        Budget { tokens: per_minute, last_ms: now_ms, per_minute }
    }

    /// What is left at `now_ms`.
    pub fn available(&mut self, now_ms: i64) -> u64 {
        let elapsed = u128::try_from(now_ms.saturating_sub(self.last_ms)).unwrap_or(0);
        let refill = elapsed.saturating_mul(u128::from(self.per_minute)) / 60_000;
        if refill > 0 {
            let t = u128::from(self.tokens).saturating_add(refill).min(u128::from(self.per_minute));
            self.tokens = u64::try_from(t).unwrap_or(self.per_minute);
            self.last_ms = now_ms;
        }
        self.tokens
    }

    /// Takes `n` bytes (at most what is left).
    pub fn spend(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }
}

/// An inventory whose pages are arriving.
#[derive(Debug)]
struct Gathering {
    inv: Inventory,
    pages: usize,
    definition_bytes: u64,
    guest_bytes: u64,
    uuids: HashSet<String>,
    /// What the registry held for this host when the inventory began
    /// (UUID → [`reported_key`] hash).
    known: Known,
}

/// The registry's [`reported_key`] hashes of one host's guests, by UUID.
pub type Known = std::collections::HashMap<String, u64>;

/// One session's intake: the inventory in progress (at most one), the
/// pages of a refused inventory still to discard, and the byte budget.
#[derive(Debug)]
pub struct SessionIntake {
    gathering: Option<Gathering>,
    /// Pages of a refused inventory are dropped until its last page.
    discarding: bool,
    budget: Budget,
    /// Guest bytes (encoded, without definitions) a minute.
    guest_budget: Budget,
}

/// What one inventory page led to.
#[derive(Debug)]
pub enum Page {
    /// More pages follow.
    Pending,
    /// The last page of an inventory refused earlier: it was dropped.
    Discarded,
    /// The whole inventory, validated, definitions restored.
    Complete(Box<Inventory>),
}

impl SessionIntake {
    /// A new session's intake at `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        SessionIntake {
            gathering: None,
            discarding: false,
            budget: Budget::new(now_ms),
            guest_budget: Budget::with_rate(now_ms, SESSION_GUEST_BYTES_PER_MINUTE),
        }
    }

    /// Whether pages of a refused inventory are being dropped.
    pub fn discarding(&self) -> bool {
        self.discarding
    }

    /// Adds one inventory page. A page that breaks a rule refuses the whole
    /// inventory: what was gathered is dropped, and so are its remaining
    /// pages, up to and including the one with `more = false`.
    ///
    /// `known` gives, once per inventory (at its first page), the hash
    /// ([`reported_key`]) of each guest the registry holds for this host,
    /// by UUID: a guest whose key hashes the same is unchanged, and its
    /// definition is kept packed and not inflated (the registry drops it, or
    /// inflates it after all with [`unpack_guest`] if its entry changed
    /// meanwhile). Every other definition is restored and checked here.
    pub fn page(&mut self, page: Inventory, now_ms: i64, known: &dyn Fn() -> Known) -> Result<Page, Refusal> {
        if self.discarding {
            if !page.more {
                self.discarding = false;
                return Ok(Page::Discarded);
            }
            return Ok(Page::Pending);
        }
        let more = page.more;
        match self.gather(page, now_ms, known) {
            Ok(p) => Ok(p),
            Err(e) => {
                self.gathering = None;
                self.discarding = more;
                Err(e)
            }
        }
    }

    fn gather(&mut self, mut page: Inventory, now_ms: i64, known: &dyn Fn() -> Known) -> Result<Page, Refusal> {
        const K: &str = "Inventory";
        let mut acc = self.gathering.take().unwrap_or_else(|| Gathering {
            inv: Inventory::default(),
            pages: 0,
            definition_bytes: 0,
            guest_bytes: 0,
            uuids: HashSet::new(),
            known: known(),
        });
        acc.pages = acc.pages.saturating_add(1);
        if acc.pages > MAX_INVENTORY_PAGES {
            return Err(Refusal::new(K, "more", format!("more than {MAX_INVENTORY_PAGES} pages in one inventory")));
        }
        let total = acc.inv.guests.len().saturating_add(page.guests.len());
        if total > MAX_INVENTORY_GUESTS {
            return Err(Refusal::new(
                K,
                "guests",
                format!("more than {MAX_INVENTORY_GUESTS} guests in one inventory; the whole inventory is refused"),
            ));
        }
        if let Some(h) = &page.host {
            check_host_info(K, "host.", h)?;
        }
        let first = acc.inv.guests.len();
        for (i, g) in page.guests.iter_mut().enumerate() {
            let prefix = format!("guests[{}].", first.saturating_add(i));
            check_guest(K, &prefix, g)?;
            self.charge(K, &prefix, guest_bytes(g), &mut acc.guest_bytes, now_ms)?;
            if !acc.uuids.insert(g.uuid.clone()) {
                return Err(Refusal::new(
                    K,
                    format!("{prefix}uuid"),
                    format!("{} appears twice in one inventory", g.uuid),
                ));
            }
            g.definition_digest = definition_digest(g);
            // Unchanged (a reconnect, or every agent after a failover): the
            // packed bytes are what was checked and stored before.
            if !g.definition_deflate.is_empty() && acc.known.get(&g.uuid).is_some_and(|h| *h == reported_key(g).1) {
                let n = u64::try_from(g.definition_deflate.len()).unwrap_or(u64::MAX);
                acc.definition_bytes = acc.definition_bytes.saturating_add(n);
                continue;
            }
            let left =
                MAX_INVENTORY_DEFINITION_BYTES.saturating_sub(acc.definition_bytes).min(self.budget.available(now_ms));
            let n = unpack_guest(K, &prefix, g, left)?;
            self.budget.spend(n);
            acc.definition_bytes = acc.definition_bytes.saturating_add(n);
        }
        if page.host.is_some() {
            acc.inv.host = page.host;
        }
        acc.inv.guests.append(&mut page.guests);
        if page.more {
            self.gathering = Some(acc);
            return Ok(Page::Pending);
        }
        // Judged again on what the registry holds now: this session's own
        // messages between the pages (a removal, a change) or the controller
        // may have changed an entry since the first page. A guest that is no
        // longer unchanged is restored and checked here, within this
        // inventory's and this session's budgets, like any other.
        if acc.pages > 1 && acc.inv.guests.iter().any(|g| !g.definition_deflate.is_empty()) {
            let now_known = known();
            for (i, g) in acc.inv.guests.iter_mut().enumerate() {
                if g.definition_deflate.is_empty() || now_known.get(&g.uuid).is_some_and(|h| *h == reported_key(g).1) {
                    continue;
                }
                let packed = u64::try_from(g.definition_deflate.len()).unwrap_or(u64::MAX);
                acc.definition_bytes = acc.definition_bytes.saturating_sub(packed);
                let left = MAX_INVENTORY_DEFINITION_BYTES
                    .saturating_sub(acc.definition_bytes)
                    .min(self.budget.available(now_ms));
                let n = unpack_guest(K, &format!("guests[{i}]."), g, left)?;
                self.budget.spend(n);
                acc.definition_bytes = acc.definition_bytes.saturating_add(n);
            }
        }
        Ok(Page::Complete(Box::new(acc.inv)))
    }

    /// Takes `n` guest bytes from the session's budget and, for an
    /// inventory, from its total (`acc`).
    fn charge(
        &mut self,
        kind: &'static str,
        prefix: &str,
        n: usize,
        acc: &mut u64,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let total = acc.saturating_add(n);
        if total > MAX_INVENTORY_BYTES {
            return Err(Refusal::new(
                kind,
                prefix.trim_end_matches('.').to_string(),
                format!("the inventory's guests pass {MAX_INVENTORY_BYTES} bytes without their definitions"),
            ));
        }
        if n > self.guest_budget.available(now_ms) {
            return Err(Refusal::new(
                kind,
                prefix.trim_end_matches('.').to_string(),
                format!(
                    "this session sent more than {SESSION_GUEST_BYTES_PER_MINUTE} bytes of guest data in a minute; send less often"
                ),
            ));
        }
        self.guest_budget.spend(n);
        *acc = total;
        Ok(())
    }

    /// A `GuestChanged`: the guest, validated, its definition restored.
    pub fn guest_changed(&mut self, c: GuestChanged, now_ms: i64) -> Result<Guest, Refusal> {
        const K: &str = "GuestChanged";
        let mut g = c.guest.ok_or_else(|| Refusal::new(K, "guest", "missing"))?;
        check_guest(K, "guest.", &g)?;
        self.charge(K, "guest.", guest_bytes(&g), &mut 0, now_ms)?;
        g.definition_digest = definition_digest(&g);
        let n = unpack_guest(K, "guest.", &mut g, self.budget.available(now_ms))?;
        self.budget.spend(n);
        Ok(g)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const U: &str = "6f1c7e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn guest(uuid: &str) -> Guest {
        Guest {
            uuid: uuid.into(),
            name: "vm1".into(),
            state: GuestState::Running as i32,
            memory_kib: 1024,
            vcpus: 1,
            ..Default::default()
        }
    }

    fn packed(xml: &str) -> Guest {
        let mut g = guest(U);
        g.definition_xml = xml.into();
        lifeboat_proto::pack_definition(&mut g);
        g
    }

    #[test]
    fn a_guest_found_unchanged_at_the_first_page_is_restored_if_its_entry_changed_before_the_last() {
        let xml = "<domain/>".repeat(40);
        let mut g = Guest { definition_xml: xml.clone(), ..guest(&uuid(1)) };
        lifeboat_proto::pack_definition(&mut g);
        let hash = reported_key(&mut g.clone()).1;
        let run = |changed_at_the_end: bool, budget_gone: bool| {
            let calls = std::cell::Cell::new(0);
            let known = || {
                calls.set(calls.get() + 1);
                if calls.get() > 1 && changed_at_the_end { Known::new() } else { Known::from([(uuid(1), hash)]) }
            };
            let mut s = SessionIntake::new(0);
            if budget_gone {
                s.budget.spend(u64::MAX);
            }
            let first = s.page(Inventory { host: None, guests: vec![g.clone()], more: true }, 0, &known);
            assert!(matches!(first, Ok(Page::Pending)), "kept packed at the first page, whatever the budget");
            let last = s.page(Inventory { host: None, guests: vec![guest(&uuid(2))], more: false }, 0, &known);
            assert_eq!(calls.get(), 2, "asked once at the start and once at the end");
            last
        };
        match run(false, false) {
            Ok(Page::Complete(inv)) => {
                assert!(inv.guests[0].definition_xml.is_empty() && !inv.guests[0].definition_deflate.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match run(true, false) {
            Ok(Page::Complete(inv)) => {
                assert_eq!(inv.guests[0].definition_xml, xml, "restored and checked once its entry changed");
                assert!(inv.guests[0].definition_deflate.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // Restoring it draws on the session's budget like any other: none left, refused.
        let e = run(true, true).unwrap_err();
        assert_eq!(e.field, "guests[0].definition_deflate");
    }

    #[test]
    fn a_definition_digest_is_the_controllers_own_and_an_agent_that_sends_one_is_refused() {
        let mut g = guest(U);
        g.definition_digest = vec![0; DIGEST_BYTES];
        let e = check_guest("Inventory", "guests[0].", &g).unwrap_err();
        assert_eq!(e.field, "guests[0].definition_digest");
        let mut s = SessionIntake::new(0);
        let e = s.guest_changed(GuestChanged { guest: Some(g.clone()) }, 0).expect_err("refused from an agent");
        assert_eq!(e.field, "guest.definition_digest");
        // Stored: a SHA-256 or nothing.
        assert!(check_stored_guest(&g).is_ok());
        g.definition_digest = vec![1; 5];
        assert_eq!(check_stored_guest(&g).unwrap_err().field, "definition_digest");
        // The intake sets it from what arrived, before restoring the text.
        let mut packed = Guest { definition_xml: "<domain/>".repeat(40), ..guest(U) };
        lifeboat_proto::pack_definition(&mut packed);
        let want = definition_digest(&packed);
        assert_eq!(want.len(), DIGEST_BYTES);
        let got = s.guest_changed(GuestChanged { guest: Some(packed) }, 0).unwrap();
        assert_eq!(got.definition_digest, want);
        assert_eq!(got.definition_xml, "<domain/>".repeat(40));
        assert!(definition_digest(&guest(U)).is_empty(), "no definition, no digest");
    }

    #[test]
    fn names_at_the_limit_pass_one_past_refuses_naming_the_field() {
        assert!(check_name("GuestChanged", "guest.name", &"a".repeat(MAX_NAME_BYTES)).is_ok());
        let e = check_name("GuestChanged", "guest.name", &"a".repeat(MAX_NAME_BYTES + 1)).unwrap_err();
        assert_eq!(e.what(), "GuestChanged guest.name");
        assert!(e.reason.contains("256 bytes") && e.reason.contains("255"), "{e}");
        for bad in ["", "a\u{1b}[2J", "a\0b", "a/b", "a\u{85}", "a\tb", "a\nb"] {
            assert!(check_name("K", "f", bad).is_err(), "{bad:?} accepted");
        }
        // What libvirt accepts and an honest host may have: refusing it would
        // refuse the host's whole inventory (the CLI escapes what displays oddly).
        for good in [
            "vm-1",
            "日本語のゲスト",
            "db; rm -rf",
            "a b",
            " a",
            "web01 ",
            "\u{5e9}\u{5e8}\u{5ea}\u{200f}",
            "\u{feff}vm",
            "a\u{202e}b",
        ] {
            assert!(check_name("K", "f", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn uuids_must_be_canonical() {
        assert!(check_uuid("K", "uuid", U).is_ok());
        for bad in ["../../x", "", &U.to_uppercase(), &U.replace('-', ""), &format!("{{{U}}}"), "u1"] {
            let e = check_uuid("K", "uuid", bad).unwrap_err();
            assert_eq!(e.field, "uuid");
        }
    }

    #[test]
    fn texts_and_numbers_at_their_limits() {
        assert!(check_text("K", "f", &"x".repeat(MAX_TEXT_BYTES), MAX_TEXT_BYTES).is_ok());
        assert!(check_text("K", "f", &"x".repeat(MAX_TEXT_BYTES + 1), MAX_TEXT_BYTES).is_err());
        let mut g = guest(U);
        g.memory_kib = MAX_MEMORY_KIB;
        g.vcpus = MAX_VCPUS;
        assert!(check_guest("Inventory", "guests[0].", &g).is_ok());
        g.memory_kib = u64::MAX;
        assert_eq!(check_guest("Inventory", "guests[0].", &g).unwrap_err().field, "guests[0].memory_kib");
        g.memory_kib = 1;
        g.vcpus = MAX_VCPUS + 1;
        assert_eq!(check_guest("Inventory", "guests[0].", &g).unwrap_err().field, "guests[0].vcpus");
        g.vcpus = 1;
        g.state = 99;
        assert_eq!(check_guest("Inventory", "guests[0].", &g).unwrap_err().field, "guests[0].state");
        g.state = 2;
        g.owner_generation = u64::MAX;
        assert!(check_guest("K", "", &g).is_ok(), "an absurd claim is ignored by the registry, not a refusal");
        g.owner_generation = 1;
        g.disks = vec![Disk::default(); MAX_DEVICES_PER_GUEST + 1];
        assert_eq!(check_guest("K", "", &g).unwrap_err().field, "disks");
        g.disks = vec![Disk { source: "/x\u{7}".into(), ..Default::default() }];
        assert_eq!(check_guest("K", "", &g).unwrap_err().field, "disks[0].source");
        let h = HostInfo { hostname: "h\u{1b}]0;owned\u{7}".into(), ..Default::default() };
        assert_eq!(check_host_info("HostInfo", "", &h).unwrap_err().field, "hostname");
        let h = HostInfo { memory_total_kib: MAX_MEMORY_KIB + 1, ..Default::default() };
        assert_eq!(check_host_info("HostInfo", "", &h).unwrap_err().field, "memory_total_kib");
        assert!(check_heartbeat(&Heartbeat { memory_free_kib: u64::MAX, ..Default::default() }).is_err());
        assert!(check_error_text("K", "error", "qemu: line 1\n\tline 2").is_ok());
        assert!(check_error_text("K", "error", "qemu\r\n").is_err());
        assert!(check_error_text("K", "error", "x\u{1b}[2J").is_err());
        assert!(check_error_text("K", "error", &"e".repeat(MAX_ERROR_BYTES + 1)).is_err());
        assert!(
            check_hello(&Hello { host_id: "h".into(), agent_version: "1\n".into(), boot_id: String::new() }).is_err()
        );
    }

    #[test]
    fn definitions_are_bounded_and_a_bomb_stops_at_the_limit() {
        let limit = usize::try_from(MAX_DEFINITION_BYTES).unwrap();
        let mut at = packed(&"x".repeat(limit));
        assert_eq!(unpack_guest("K", "", &mut at, u64::MAX).unwrap(), MAX_DEFINITION_BYTES);
        let mut past = packed(&" ".repeat(limit + 1));
        let e = unpack_guest("GuestChanged", "guest.", &mut past, u64::MAX).unwrap_err();
        assert_eq!(e.field, "guest.definition_deflate");
        let mut bomb = packed(&" ".repeat(64 << 20));
        assert!(bomb.definition_deflate.len() < 100_000);
        let t = std::time::Instant::now();
        assert!(unpack_guest("K", "", &mut bomb, u64::MAX).is_err());
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let mut garbage = guest(U);
        garbage.definition_deflate = b"garbage".to_vec();
        assert!(unpack_guest("K", "", &mut garbage, u64::MAX).unwrap_err().reason.contains("zlib"));
        let mut nul = guest(U);
        nul.definition_xml = "<domain>\0</domain>".into();
        assert_eq!(unpack_guest("K", "", &mut nul.clone(), u64::MAX).unwrap_err().field, "definition_xml");
        lifeboat_proto::pack_definition(&mut nul);
        assert_eq!(unpack_guest("K", "", &mut nul, u64::MAX).unwrap_err().field, "definition_deflate");
    }

    fn uuid(i: usize) -> String {
        format!("00000000-0000-4000-8000-{i:012x}")
    }

    #[test]
    fn a_refused_inventory_is_discarded_up_to_its_last_page() {
        let mut s = SessionIntake::new(0);
        let page = |gs: Vec<Guest>, more| Inventory { host: None, guests: gs, more };
        assert!(matches!(s.page(page(vec![guest(&uuid(1))], true), 0, &Known::new), Ok(Page::Pending)));
        let mut bad = guest(&uuid(2));
        bad.name = "x\u{1b}".into();
        let e = s.page(page(vec![bad], true), 0, &Known::new).unwrap_err();
        assert_eq!(e.field, "guests[1].name");
        assert!(s.discarding());
        assert!(matches!(s.page(page(vec![guest(&uuid(3))], true), 0, &Known::new), Ok(Page::Pending)));
        assert!(matches!(s.page(page(vec![guest(&uuid(4))], false), 0, &Known::new), Ok(Page::Discarded)));
        // The next inventory starts afresh and holds only its own guests.
        match s.page(page(vec![guest(&uuid(5))], false), 0, &Known::new) {
            Ok(Page::Complete(inv)) => assert_eq!(inv.guests.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inventory_limits_guests_duplicates_and_bytes() {
        let mut s = SessionIntake::new(0);
        let dup = Inventory { host: None, guests: vec![guest(&uuid(1)), guest(&uuid(1))], more: false };
        let e = s.page(dup, 0, &Known::new).unwrap_err();
        assert_eq!(e.field, "guests[1].uuid");
        assert!(e.reason.contains("twice"));
        let many = Inventory {
            host: None,
            guests: (0..=MAX_INVENTORY_GUESTS).map(uuid).map(|u| guest(&u)).collect(),
            more: false,
        };
        assert_eq!(s.page(many, 0, &Known::new).unwrap_err().field, "guests");
        let exact = Inventory {
            host: None,
            guests: (0..MAX_INVENTORY_GUESTS).map(uuid).map(|u| guest(&u)).collect(),
            more: false,
        };
        assert!(matches!(s.page(exact, 0, &Known::new), Ok(Page::Complete(_))));
        // Per inventory: 64 MiB of definitions is 256 definitions at the limit; one more refuses.
        let mut s = SessionIntake::new(0);
        let big = "x".repeat(usize::try_from(MAX_DEFINITION_BYTES).unwrap());
        let n = usize::try_from(MAX_INVENTORY_DEFINITION_BYTES / MAX_DEFINITION_BYTES).unwrap();
        let defs = |k: usize| -> Vec<Guest> {
            (0..k)
                .map(|i| {
                    let mut g = guest(&uuid(i));
                    g.definition_xml = big.clone();
                    lifeboat_proto::pack_definition(&mut g);
                    g
                })
                .collect()
        };
        assert!(matches!(
            s.page(Inventory { host: None, guests: defs(n), more: false }, 0, &Known::new),
            Ok(Page::Complete(_))
        ));
        let mut s = SessionIntake::new(0);
        let e = s.page(Inventory { host: None, guests: defs(n + 1), more: false }, 0, &Known::new).unwrap_err();
        assert_eq!(e.field, format!("guests[{n}].definition_deflate"));
    }

    #[test]
    fn the_session_budget_refills_over_a_minute() {
        let mut b = Budget::new(0);
        b.spend(SESSION_DEFINITION_BYTES_PER_MINUTE);
        assert_eq!(b.available(0), 0);
        assert_eq!(b.available(30_000), SESSION_DEFINITION_BYTES_PER_MINUTE / 2);
        assert_eq!(b.available(600_000), SESSION_DEFINITION_BYTES_PER_MINUTE);
        assert_eq!(b.available(i64::MIN), SESSION_DEFINITION_BYTES_PER_MINUTE);
        let mut s = SessionIntake::new(0);
        s.budget.spend(SESSION_DEFINITION_BYTES_PER_MINUTE);
        let e = s.guest_changed(GuestChanged { guest: Some(packed("<domain/>")) }, 0).unwrap_err();
        assert_eq!(e.what(), "GuestChanged guest.definition_deflate");
        assert!(s.guest_changed(GuestChanged { guest: Some(packed("<domain/>")) }, 1_000).is_ok());
    }

    #[test]
    fn guest_data_without_definitions_is_bounded_per_guest_per_inventory_and_per_minute() {
        use lifeboat_proto::v1::Disk;
        // One guest: 256 disks with 1 KiB paths pass; with 4 KiB paths it is
        // over MAX_GUEST_BYTES although every field is within its own limit.
        let with_disks = |len: usize| {
            let d = Disk { source: format!("/{}", "p".repeat(len)), ..Default::default() };
            Guest { disks: vec![d; MAX_DEVICES_PER_GUEST], ..guest(U) }
        };
        assert!(check_guest("GuestChanged", "guest.", &with_disks(900)).is_ok());
        let e = check_guest("GuestChanged", "guest.", &with_disks(4000)).unwrap_err();
        assert_eq!(e.what(), "GuestChanged guest", "{e}");
        assert!(e.reason.contains(&MAX_GUEST_BYTES.to_string()), "{e}");
        // A session sending large guests: refused once the minute's guest
        // bytes are spent, accepted again after the refill.
        let mut s = SessionIntake::new(0);
        s.guest_budget.spend(SESSION_GUEST_BYTES_PER_MINUTE);
        let e = s.guest_changed(GuestChanged { guest: Some(with_disks(900)) }, 0).unwrap_err();
        assert!(e.reason.contains("a minute"), "{e}");
        assert!(s.guest_changed(GuestChanged { guest: Some(with_disks(900)) }, 30_000).is_ok());
        // An inventory: pages of large guests stop at MAX_INVENTORY_BYTES.
        let mut s = SessionIntake::new(0);
        let per = u64::try_from(guest_bytes(&with_disks(900))).unwrap();
        let fit = usize::try_from(MAX_INVENTORY_BYTES / per).unwrap();
        let mut refused = None;
        for i in 0..fit + 2 {
            let g = Guest { uuid: format!("00000000-0000-4000-8000-{i:012x}"), ..with_disks(900) };
            match s.page(Inventory { host: None, guests: vec![g], more: true }, 0, &Known::new) {
                Ok(_) => {}
                Err(e) => {
                    refused = Some((i, e));
                    break;
                }
            }
        }
        let (i, e) = refused.expect("an inventory past MAX_INVENTORY_BYTES is refused");
        assert_eq!(i, fit, "{e}");
        assert!(e.reason.contains("without their definitions"), "{e}");
    }

    #[test]
    fn command_results_are_checked() {
        let ok = CommandResult { id: U.into(), ok: true, outcome: "done".into(), ..Default::default() };
        assert!(check_command_result(&ok).is_ok());
        let bad = CommandResult { autostart_disabled: vec!["../x".into()], ..ok.clone() };
        assert_eq!(check_command_result(&bad).unwrap_err().field, "autostart_disabled[0]");
        let bad = CommandResult { guest: Some(Guest { memory_kib: u64::MAX, ..guest(U) }), ..ok };
        assert_eq!(check_command_result(&bad).unwrap_err().field, "guest.memory_kib");
        assert!(check_removed(&GuestRemoved { uuid: "../../x".into(), name: String::new() }).is_err());
    }
}
