//! Lifeboat's wire protocol: generated gRPC types and services.

#![forbid(unsafe_code)]
#![allow(missing_docs)]

/// Version 1 of the protocol (`lifeboat.v1`).
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}

/// The gRPC response metadata key in which a controller that is not the
/// leader names the leader's URL (empty value: no leader is known). Such a
/// controller answers every call with `UNAVAILABLE` and the message
/// "not the leader; leader is URL" (or "...; no leader is elected: ...");
/// agents and the CLI then try that URL (when it is one of their configured
/// addresses) and otherwise the next configured address.
pub const LEADER_METADATA: &str = "lifeboat-leader";

/// The gRPC request metadata key in which an agent that lost its leader
/// (its session broke and dialling that controller again failed) names the
/// epoch of the leader it lost (decimal), on its session calls until a new
/// session is welcomed. A follower that still names that leader (or none)
/// holds such a call until it leads itself and serves it, or another
/// controller is elected (refused naming it), instead of refusing it at
/// once: the agent's TLS handshake is then done while the old leader's
/// etcd lease runs out, not after. The value only decides how long the
/// caller's own call waits.
pub const LOST_LEADER_METADATA: &str = "lifeboat-lost-epoch";

/// Whether a guest in this state may be running and so holds its disks open:
/// every libvirt state except shut-off. Paused, blocked, crashed (qemu may be
/// preserved), shutting down, pm-suspended and states Lifeboat cannot name
/// all keep (or may keep) a qemu process with the disks open. The one rule
/// for "may this copy write its disks", used by the agent (stop, cleanup)
/// and the controller (stale copies, planning, reconciling). Fails closed:
/// an unknown number counts as holding.
pub fn holds_disk(state: i32) -> bool {
    v1::GuestState::try_from(state) != Ok(v1::GuestState::Shutoff)
}

/// The one lowercase name of a guest state, as operators read it (CLI tables
/// and JSON, agent messages, controller plans): libvirt's own names
/// (`running`, `paused`, `pmsuspended`, ...), and `unknown` for
/// `GUEST_STATE_UNSPECIFIED` and for any number Lifeboat cannot name.
pub fn state_name(state: i32) -> &'static str {
    use v1::GuestState as S;
    match S::try_from(state).unwrap_or(S::Unspecified) {
        S::Unspecified => "unknown",
        S::Nostate => "nostate",
        S::Running => "running",
        S::Blocked => "blocked",
        S::Paused => "paused",
        S::Shutdown => "shutdown",
        S::Shutoff => "shutoff",
        S::Crashed => "crashed",
        S::Pmsuspended => "pmsuspended",
    }
}

/// Encoded size an inventory page aims for: a page holds guests until
/// adding one more would pass this, and always at least one guest. With
/// packed definitions (see [`pack_definition`]) a guest is 1–2 KB, so a
/// page holds one to three guests and still fits the controller's 4 KiB
/// stream window and its 8 KiB read buffer (a window of data plus the
/// message in progress). Fewer pages are less work per inventory: 10,000
/// agents reconnecting at once send 200,000 guests.
pub const INVENTORY_PAGE_BYTES: usize = 3 * 1024;

/// Largest definition a packed one may inflate to. libvirt definitions are a
/// few KiB; the limit stops a compression bomb from taking the controller's
/// memory.
pub const MAX_DEFINITION_BYTES: u64 = 4 * 1024 * 1024;

/// Why a packed definition could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// Not valid DEFLATE (zlib) data.
    #[error("definition_deflate of guest {uuid} is not valid zlib data: {reason}")]
    Corrupt {
        /// The guest.
        uuid: String,
        /// What the decoder said.
        reason: String,
    },
    /// Inflates to more than [`MAX_DEFINITION_BYTES`].
    #[error("definition_deflate of guest {uuid} inflates to more than {MAX_DEFINITION_BYTES} bytes")]
    TooLarge {
        /// The guest.
        uuid: String,
    },
    /// Inflates to bytes that are not UTF-8 text.
    #[error("definition_deflate of guest {uuid} is not UTF-8 text")]
    NotText {
        /// The guest.
        uuid: String,
    },
    /// Both forms are set, and they may disagree.
    #[error("guest {uuid} carries both definition_xml and definition_deflate; send one")]
    Both {
        /// The guest.
        uuid: String,
    },
}

/// Moves a guest's `definition_xml` into `definition_deflate` (what an agent
/// sends). A guest without a definition is left as it is.
pub fn pack_definition(g: &mut v1::Guest) {
    use std::io::Write;
    if g.definition_xml.is_empty() {
        return;
    }
    let mut z =
        flate2::write::ZlibEncoder::new(Vec::with_capacity(g.definition_xml.len() / 3), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    z.write_all(g.definition_xml.as_bytes()).expect("compress into memory");
    g.definition_deflate = z.finish().expect("compress into memory");
    g.definition_xml = String::new();
}

/// Restores `definition_xml` from `definition_deflate` (what the controller
/// does on arrival); a guest without a packed definition is left as it is.
pub fn unpack_definition(g: &mut v1::Guest) -> Result<(), DefinitionError> {
    use std::io::Read;
    if g.definition_deflate.is_empty() {
        return Ok(());
    }
    if !g.definition_xml.is_empty() {
        return Err(DefinitionError::Both { uuid: g.uuid.clone() });
    }
    let mut out = Vec::with_capacity(g.definition_deflate.len() * 4);
    flate2::read::ZlibDecoder::new(g.definition_deflate.as_slice())
        .take(MAX_DEFINITION_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| DefinitionError::Corrupt { uuid: g.uuid.clone(), reason: e.to_string() })?;
    if out.len() as u64 > MAX_DEFINITION_BYTES {
        return Err(DefinitionError::TooLarge { uuid: g.uuid.clone() });
    }
    g.definition_xml = String::from_utf8(out).map_err(|_| DefinitionError::NotText { uuid: g.uuid.clone() })?;
    g.definition_deflate = Vec::new();
    Ok(())
}

/// Inflates a packed definition (zlib), reading at most `limit + 1` bytes
/// of output however large the input claims to be: `Ok(None)` when it
/// inflates to more than `limit` bytes. The controller's intake gives each
/// guest the smaller of its per-definition limit and what is left of the
/// inventory's and the session's budgets.
pub fn inflate_limited(deflated: &[u8], limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let guess = deflated.len().saturating_mul(4).min(usize::try_from(limit).unwrap_or(usize::MAX)).min(1 << 20);
    let mut out = Vec::with_capacity(guess);
    flate2::read::ZlibDecoder::new(deflated).take(limit.saturating_add(1)).read_to_end(&mut out)?;
    Ok((u64::try_from(out.len()).unwrap_or(u64::MAX) <= limit).then_some(out))
}

/// Splits an inventory into pages of about `page_bytes` each (see
/// [`v1::Inventory::more`]); the host facts travel on the first page.
pub fn inventory_pages(inv: v1::Inventory, page_bytes: usize) -> Vec<v1::Inventory> {
    use prost::Message;
    let mut pages = vec![v1::Inventory { host: inv.host, guests: Vec::new(), more: false }];
    let mut size = 0usize;
    for g in inv.guests {
        let len = g.encoded_len();
        let last = pages.last_mut().expect("one page at least");
        if !last.guests.is_empty() && size + len > page_bytes {
            pages.push(v1::Inventory { host: None, guests: vec![g], more: false });
            size = len;
        } else {
            last.guests.push(g);
            size += len;
        }
    }
    let n = pages.len();
    for p in &mut pages[..n - 1] {
        p.more = true;
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shut_off_releases_the_disks() {
        use v1::GuestState as S;
        for s in
            [S::Running, S::Blocked, S::Paused, S::Shutdown, S::Crashed, S::Pmsuspended, S::Nostate, S::Unspecified]
        {
            assert!(holds_disk(s as i32), "{s:?}");
        }
        assert!(!holds_disk(S::Shutoff as i32));
        assert!(holds_disk(99), "a state Lifeboat cannot name fails closed");
    }

    #[test]
    fn removed_commands_from_an_older_controller_decode_as_no_kind() {
        use prost::Message;
        // Command { id: "x", resync (field 2): {} } and { id: "y", set_autostart (field 6): {uuid: "u"} }.
        let resync = v1::Command::decode(&[0x0a, 0x01, b'x', 0x12, 0x00][..]).unwrap();
        assert_eq!((resync.id.as_str(), resync.kind), ("x", None));
        let autostart = v1::Command::decode(&[0x0a, 0x01, b'y', 0x32, 0x03, 0x0a, 0x01, b'u'][..]).unwrap();
        assert_eq!((autostart.id.as_str(), autostart.kind), ("y", None));
        // Welcome { heartbeat_interval_ms: 1000, resync_interval_s (field 2): 30 }: the old field is skipped.
        let w = v1::Welcome::decode(&[0x08, 0xe8, 0x07, 0x10, 30][..]).unwrap();
        assert_eq!(w.heartbeat_interval_ms, 1000);
    }

    #[test]
    fn every_state_has_one_lowercase_name_and_unknown_numbers_read_unknown() {
        use v1::GuestState as S;
        let all = [
            S::Unspecified,
            S::Nostate,
            S::Running,
            S::Blocked,
            S::Paused,
            S::Shutdown,
            S::Shutoff,
            S::Crashed,
            S::Pmsuspended,
        ];
        for s in all {
            // The name is the protobuf name without its prefix, lowercase (UNSPECIFIED reads "unknown").
            let want = s.as_str_name().trim_start_matches("GUEST_STATE_").to_ascii_lowercase();
            let want = if s == S::Unspecified { "unknown".to_string() } else { want };
            assert_eq!(state_name(s as i32), want, "{s:?}");
        }
        assert_eq!(state_name(99), "unknown");
        assert_eq!(state_name(-1), "unknown");
    }

    #[test]
    fn pages_keep_every_guest_in_order_and_mark_all_but_the_last() {
        let g = |i: usize| v1::Guest { uuid: format!("u{i}"), definition_xml: "x".repeat(5000), ..Default::default() };
        let inv = v1::Inventory {
            host: Some(v1::HostInfo { host_id: "h".into(), ..Default::default() }),
            guests: (0..20).map(g).collect(),
            more: false,
        };
        let pages = inventory_pages(inv, INVENTORY_PAGE_BYTES);
        assert!(pages.len() > 1);
        assert!(pages[0].host.is_some() && pages[1..].iter().all(|p| p.host.is_none()));
        assert!(pages[..pages.len() - 1].iter().all(|p| p.more) && !pages.last().unwrap().more);
        let uuids: Vec<String> = pages.iter().flat_map(|p| p.guests.iter().map(|g| g.uuid.clone())).collect();
        assert_eq!(uuids, (0..20).map(|i| format!("u{i}")).collect::<Vec<_>>());
        assert!(pages.iter().all(|p| prost::Message::encoded_len(p) <= INVENTORY_PAGE_BYTES + 5100));
        let empty = inventory_pages(v1::Inventory::default(), INVENTORY_PAGE_BYTES);
        assert_eq!(empty.len(), 1);
        assert!(!empty[0].more);
        let huge = inventory_pages(
            v1::Inventory {
                guests: vec![v1::Guest { definition_xml: "y".repeat(100_000), ..Default::default() }],
                ..Default::default()
            },
            1000,
        );
        assert_eq!(huge.len(), 1, "a guest larger than a page gets a page of its own");
    }

    #[test]
    fn packed_definitions_round_trip_and_bad_ones_are_named() {
        let xml =
            format!("<domain type='kvm'><name>vm1</name>{}</domain>", "<disk type='file' device='disk'/>".repeat(100));
        let mut g = v1::Guest { uuid: "u1".into(), definition_xml: xml.clone(), ..Default::default() };
        pack_definition(&mut g);
        assert!(g.definition_xml.is_empty());
        assert!(
            !g.definition_deflate.is_empty() && g.definition_deflate.len() < xml.len() / 4,
            "{} bytes",
            g.definition_deflate.len()
        );
        unpack_definition(&mut g).unwrap();
        assert_eq!(g.definition_xml, xml);
        assert!(g.definition_deflate.is_empty());
        // Plain definitions (and guests without one) pass through.
        let mut plain = v1::Guest { uuid: "u2".into(), definition_xml: "<domain/>".into(), ..Default::default() };
        unpack_definition(&mut plain).unwrap();
        assert_eq!(plain.definition_xml, "<domain/>");
        let mut none = v1::Guest::default();
        pack_definition(&mut none);
        assert!(none.definition_deflate.is_empty());

        let mut corrupt =
            v1::Guest { uuid: "u3".into(), definition_deflate: b"not zlib".to_vec(), ..Default::default() };
        let e = unpack_definition(&mut corrupt).unwrap_err().to_string();
        assert!(e.contains("u3") && e.contains("not valid zlib"), "{e}");
        assert!(corrupt.definition_xml.is_empty());

        let mut bomb = v1::Guest {
            uuid: "u4".into(),
            definition_xml: " ".repeat(usize::try_from(MAX_DEFINITION_BYTES).unwrap() + 1),
            ..Default::default()
        };
        pack_definition(&mut bomb);
        assert!(bomb.definition_deflate.len() < 10_000);
        assert!(matches!(unpack_definition(&mut bomb), Err(DefinitionError::TooLarge { .. })));

        let mut binary = v1::Guest { uuid: "u5".into(), ..Default::default() };
        binary.definition_xml = "x".into();
        pack_definition(&mut binary);
        let mut bad = binary.definition_deflate.clone();
        bad.clear();
        let mut z = flate2::write::ZlibEncoder::new(bad, flate2::Compression::default());
        std::io::Write::write_all(&mut z, &[0xff, 0xfe, 0x00]).unwrap();
        binary.definition_deflate = z.finish().unwrap();
        assert!(matches!(unpack_definition(&mut binary), Err(DefinitionError::NotText { .. })));

        let mut both = v1::Guest {
            uuid: "u6".into(),
            definition_xml: "<domain/>".into(),
            definition_deflate: vec![1],
            ..Default::default()
        };
        assert!(matches!(unpack_definition(&mut both), Err(DefinitionError::Both { .. })));
    }
}
