//! Pure parsing of libvirt domain XML into the facts Lifeboat reports.
//! No I/O here; errors say what is wrong with the document.

use lifeboat_proto::v1::{Disk, Nic};

/// XML namespace of Lifeboat's ownership element in a domain's `<metadata>`.
pub const OWNER_NS: &str = "https://lifeboat.example/xmlns/owner/1";

/// What Lifeboat reads from a domain definition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainFacts {
    /// `<uuid>`.
    pub uuid: String,
    /// `<name>`.
    pub name: String,
    /// `<vcpu>`.
    pub vcpus: u32,
    /// `<memory>` in KiB.
    pub memory_kib: u64,
    /// Every `<disk>`.
    pub disks: Vec<Disk>,
    /// Every `<interface>`.
    pub nics: Vec<Nic>,
    /// Lifeboat ownership from `<metadata>`: (host, generation).
    pub owner: Option<(String, u64)>,
    /// Evacuation priority from `<metadata><lb:priority value='N'/>`.
    pub priority: i32,
}

fn to_kib(value: u64, unit: &str) -> Result<u64, String> {
    // (multiplier, divisor): exact integer arithmetic, checked so that a size
    // too large for u64 KiB is refused instead of wrapping to a small one
    let (mul, div): (u64, u64) = match unit {
        "b" | "bytes" => (1, 1024),
        "KB" => (1000, 1024),
        "k" | "KiB" => (1, 1),
        "MB" => (1_000_000, 1024),
        "M" | "MiB" => (1024, 1),
        "GB" => (1_000_000_000, 1024),
        "G" | "GiB" => (1024 * 1024, 1),
        "T" | "TiB" => (1024 * 1024 * 1024, 1),
        other => return Err(format!("unknown memory unit '{}'", quote(other))),
    };
    let kib = u128::from(value) * u128::from(mul) / u128::from(div);
    u64::try_from(kib).map_err(|_| format!("<memory> {value} {unit} is too large (over 2^64 KiB)"))
}

/// Deepest element nesting accepted. libvirt writes definitions about 6 deep;
/// roxmltree parses recursively (about 5 KiB of stack per level in a debug
/// build), so a deeper document is refused before it can exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// Longest input value quoted in an error message.
const QUOTE_MAX: usize = 64;

/// A value from the document for an error message: at most [`QUOTE_MAX`]
/// characters, control characters escaped.
fn quote(v: &str) -> String {
    clip(v, QUOTE_MAX)
}

/// At most `max` characters of `v`, control characters escaped.
fn clip(v: &str, max: usize) -> String {
    let mut out: String = v.chars().take(max).flat_map(char::escape_debug).collect();
    if v.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

/// Refuses documents nested deeper than [`MAX_DEPTH`]. Counts conservatively
/// (never less than the real depth): start tags outside comments, CDATA,
/// processing instructions and attribute values add one, end tags remove one.
fn check_depth(xml: &str) -> Result<(), String> {
    let b = xml.as_bytes();
    let mut depth: usize = 0;
    let mut i = 0;
    let skip_to = |from: usize, end: &[u8]| -> Option<usize> {
        b.get(from..)?.windows(end.len()).position(|w| w == end).map(|p| from + p + end.len())
    };
    while let Some(p) = b.get(i..).and_then(|r| r.iter().position(|&c| c == b'<')) {
        let lt = i + p;
        let rest = &b[lt..];
        let next = if rest.starts_with(b"<!--") {
            skip_to(lt + 4, b"-->")
        } else if rest.starts_with(b"<![CDATA[") {
            skip_to(lt + 9, b"]]>")
        } else if rest.starts_with(b"<?") {
            skip_to(lt + 2, b"?>")
        } else if rest.starts_with(b"<!") || rest.starts_with(b"</") {
            if rest.starts_with(b"</") {
                depth = depth.saturating_sub(1);
            }
            skip_to(lt + 2, b">")
        } else {
            // a start tag: find its '>' outside quoted attribute values
            let mut quote_char: Option<u8> = None;
            let mut end = None;
            for (k, &c) in rest.iter().enumerate().skip(1) {
                match quote_char {
                    Some(q) if c == q => quote_char = None,
                    Some(_) => {}
                    None if c == b'"' || c == b'\'' => quote_char = Some(c),
                    None if c == b'>' => {
                        end = Some(k);
                        break;
                    }
                    None => {}
                }
            }
            end.map(|k| {
                if rest[k - 1] != b'/' {
                    depth += 1;
                }
                lt + k + 1
            })
        };
        if depth > MAX_DEPTH {
            return Err(format!("domain XML is nested deeper than {MAX_DEPTH} elements"));
        }
        match next {
            Some(n) => i = n,
            // unterminated: the parser reports it
            None => break,
        }
    }
    Ok(())
}

/// Parses a domain definition.
pub fn parse(xml: &str) -> Result<DomainFacts, String> {
    check_depth(xml)?;
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| format!("domain XML is malformed: {}", clip(&e.to_string(), 200)))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("root element is <{}>, expected <domain>", quote(root.tag_name().name())));
    }
    let child = |name: &str| root.children().find(|n| n.has_tag_name(name));
    let text = |name: &str| child(name).and_then(|n| n.text()).map(|s| s.trim().to_string());
    let mut f = DomainFacts {
        uuid: text("uuid").ok_or("domain XML has no <uuid>")?,
        name: text("name").ok_or("domain XML has no <name>")?,
        ..Default::default()
    };
    if let Some(v) = text("vcpu") {
        f.vcpus = v.parse().map_err(|_| format!("<vcpu> '{}' is not a number", quote(&v)))?;
    }
    if let Some(m) = child("memory") {
        let v = m.text().unwrap_or("").trim();
        let n: u64 = v.parse().map_err(|_| format!("<memory> '{}' is not a number", quote(v)))?;
        f.memory_kib = to_kib(n, m.attribute("unit").unwrap_or("KiB"))?;
    }
    if let Some(md) = child("metadata") {
        if let Some(o) =
            md.children().find(|n| n.tag_name().namespace() == Some(OWNER_NS) && n.tag_name().name() == "owner")
        {
            let host = o.attribute("host").unwrap_or("").to_string();
            let generation = o.attribute("generation").unwrap_or("0");
            let generation: u64 = generation
                .parse()
                .map_err(|_| format!("Lifeboat owner generation '{}' is not a number", quote(generation)))?;
            f.owner = Some((host, generation));
        }
        if let Some(p) =
            md.children().find(|n| n.tag_name().namespace() == Some(OWNER_NS) && n.tag_name().name() == "priority")
        {
            let v = p.attribute("value").unwrap_or("0");
            f.priority = v.parse().map_err(|_| format!("Lifeboat priority '{}' is not a number", quote(v)))?;
        }
    }
    if let Some(devices) = child("devices") {
        for d in devices.children().filter(|n| n.has_tag_name("disk")) {
            let source_type = d.attribute("type").unwrap_or("file").to_string();
            let src = d.children().find(|n| n.has_tag_name("source"));
            let source = match src {
                None => String::new(),
                Some(s) => match source_type.as_str() {
                    "file" => s.attribute("file").unwrap_or("").to_string(),
                    "block" => s.attribute("dev").unwrap_or("").to_string(),
                    "dir" => s.attribute("dir").unwrap_or("").to_string(),
                    "network" => {
                        format!("{}:{}", s.attribute("protocol").unwrap_or("?"), s.attribute("name").unwrap_or(""))
                    }
                    "volume" => {
                        format!("{}/{}", s.attribute("pool").unwrap_or("?"), s.attribute("volume").unwrap_or(""))
                    }
                    _ => String::new(),
                },
            };
            let target = d
                .children()
                .find(|n| n.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"))
                .unwrap_or("")
                .to_string();
            f.disks.push(Disk {
                target,
                source_type,
                source,
                device: d.attribute("device").unwrap_or("disk").to_string(),
                shareable: d.children().any(|n| n.has_tag_name("shareable")),
                readonly: d.children().any(|n| n.has_tag_name("readonly")),
                // Storage identity needs I/O: `storage::fill_disks` adds it.
                ..Default::default()
            });
        }
        for i in devices.children().filter(|n| n.has_tag_name("interface")) {
            let kind = i.attribute("type").unwrap_or("").to_string();
            let attr_of = |tag: &str, attr: &str| {
                i.children().find(|n| n.has_tag_name(tag)).and_then(|n| n.attribute(attr)).unwrap_or("").to_string()
            };
            let source = match kind.as_str() {
                "bridge" => attr_of("source", "bridge"),
                "network" => attr_of("source", "network"),
                "direct" => attr_of("source", "dev"),
                "hostdev" => "hostdev".to_string(),
                _ => attr_of("source", "bridge"),
            };
            f.nics.push(Nic { mac: attr_of("mac", "address"), kind, source, model: attr_of("model", "type") });
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm'>
  <name>vm1</name><uuid>6f1c9c1e-8a3a-4b53-9a8e-3f3b8c1f0a01</uuid>
  <memory unit='MiB'>32</memory><vcpu placement='static'>2</vcpu>
  <devices>
    <disk type='file' device='disk'><source file='/shared/vm1.img'/><target dev='vda' bus='virtio'/><shareable/></disk>
    <disk type='block' device='lun'><source dev='/dev/mapper/mp1'/><target dev='sda'/></disk>
    <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdb'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:01'/><source bridge='br0'/><model type='virtio'/></interface>
    <interface type='network'><mac address='52:54:00:aa:bb:02'/><source network='default'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn reads_disks_nics_and_sizes() {
        let f = parse(XML).unwrap();
        assert_eq!(f.name, "vm1");
        assert_eq!(f.vcpus, 2);
        assert_eq!(f.memory_kib, 32 * 1024);
        let srcs: Vec<_> = f.disks.iter().map(|d| d.source.as_str()).collect();
        assert_eq!(srcs, ["/shared/vm1.img", "/dev/mapper/mp1", "rbd:pool/img", ""]);
        assert!(f.disks[0].shareable && f.disks[3].readonly);
        assert_eq!(f.disks[3].device, "cdrom");
        assert_eq!(f.nics[0].source, "br0");
        assert_eq!(f.nics[1].mac, "52:54:00:aa:bb:02");
        assert_eq!(f.nics[1].source, "default");
    }

    #[test]
    fn reads_lifeboat_ownership() {
        let xml = XML.replace(
            "<devices>",
            &format!("<metadata><lb:owner xmlns:lb='{OWNER_NS}' host='host-b' generation='7'/></metadata><devices>"),
        );
        assert_eq!(parse(&xml).unwrap().owner, Some(("host-b".into(), 7)));
        assert_eq!(parse(XML).unwrap().owner, None);
    }

    #[test]
    fn malformed_xml_is_an_error_not_a_panic() {
        assert!(parse("<domain><name>x</name>").unwrap_err().contains("malformed"));
        assert!(parse("<network/>").unwrap_err().contains("expected <domain>"));
        assert!(parse("<domain><name>x</name></domain>").unwrap_err().contains("<uuid>"));
        let bad_mem = XML.replace("unit='MiB'>32", "unit='furlong'>32");
        assert!(parse(&bad_mem).unwrap_err().contains("furlong"));
    }

    #[test]
    fn sizes_beyond_u64_kib_are_refused_not_wrapped() {
        let mem = |unit: &str, v: &str| parse(&XML.replace("unit='MiB'>32", &format!("unit='{unit}'>{v}")));
        assert_eq!(mem("KiB", &u64::MAX.to_string()).unwrap().memory_kib, u64::MAX);
        assert!(mem("MiB", &u64::MAX.to_string()).unwrap_err().contains("too large"));
        assert!(mem("TiB", "17179869184").unwrap_err().contains("too large"));
        assert_eq!(mem("KB", &u64::MAX.to_string()).unwrap().memory_kib, 18014398509481983999);
        assert!(mem("GB", &u64::MAX.to_string()).unwrap_err().contains("too large"));
        assert_eq!(mem("b", &u64::MAX.to_string()).unwrap().memory_kib, u64::MAX / 1024);
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = |n: usize| XML.replace("<devices>", &format!("<devices>{}{}", "<x>".repeat(n), "</x>".repeat(n)));
        assert!(parse(&deep(MAX_DEPTH - 3)).is_ok());
        assert!(parse(&deep(100_000)).unwrap_err().contains("nested deeper"));
        // markup inside attribute values, comments and CDATA does not count
        let quoted = XML.replace(
            "<devices>",
            &format!(
                "<devices><x a='{}'/><!--{}--><![CDATA[{}]]>",
                "/>>".repeat(500),
                "<y>".repeat(500),
                "<y>".repeat(500)
            ),
        );
        assert!(parse(&quoted).is_ok());
    }

    #[test]
    fn errors_quote_at_most_a_short_escaped_value() {
        let e = parse(&XML.replace("<vcpu placement='static'>2", &format!("<vcpu>\u{1b}[2J{}", "9".repeat(10_000))))
            .unwrap_err();
        assert!(e.len() < 200 && !e.contains('\u{1b}'), "{e}");
    }
}
