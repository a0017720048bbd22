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
    let factor: u64 = match unit {
        "b" | "bytes" => return Ok(value / 1024),
        "KB" => return Ok(value * 1000 / 1024),
        "k" | "KiB" => 1,
        "MB" => return Ok(value * 1_000_000 / 1024),
        "M" | "MiB" => 1024,
        "GB" => return Ok(value * 1_000_000_000 / 1024),
        "G" | "GiB" => 1024 * 1024,
        "T" | "TiB" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown memory unit '{other}'")),
    };
    Ok(value * factor)
}

/// Parses a domain definition.
pub fn parse(xml: &str) -> Result<DomainFacts, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML is malformed: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(format!("root element is <{}>, expected <domain>", root.tag_name().name()));
    }
    let child = |name: &str| root.children().find(|n| n.has_tag_name(name));
    let text = |name: &str| child(name).and_then(|n| n.text()).map(|s| s.trim().to_string());
    let mut f = DomainFacts {
        uuid: text("uuid").ok_or("domain XML has no <uuid>")?,
        name: text("name").ok_or("domain XML has no <name>")?,
        ..Default::default()
    };
    if let Some(v) = text("vcpu") {
        f.vcpus = v.parse().map_err(|_| format!("<vcpu> '{v}' is not a number"))?;
    }
    if let Some(m) = child("memory") {
        let v = m.text().unwrap_or("").trim();
        let n: u64 = v.parse().map_err(|_| format!("<memory> '{v}' is not a number"))?;
        f.memory_kib = to_kib(n, m.attribute("unit").unwrap_or("KiB"))?;
    }
    if let Some(md) = child("metadata") {
        if let Some(o) = md.children().find(|n| n.tag_name().namespace() == Some(OWNER_NS) && n.tag_name().name() == "owner") {
            let host = o.attribute("host").unwrap_or("").to_string();
            let generation = o.attribute("generation").unwrap_or("0");
            let generation: u64 =
                generation.parse().map_err(|_| format!("Lifeboat owner generation '{generation}' is not a number"))?;
            f.owner = Some((host, generation));
        }
        if let Some(p) = md.children().find(|n| n.tag_name().namespace() == Some(OWNER_NS) && n.tag_name().name() == "priority") {
            let v = p.attribute("value").unwrap_or("0");
            f.priority = v.parse().map_err(|_| format!("Lifeboat priority '{v}' is not a number"))?;
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
                    "network" => format!(
                        "{}:{}",
                        s.attribute("protocol").unwrap_or("?"),
                        s.attribute("name").unwrap_or("")
                    ),
                    "volume" => format!("{}/{}", s.attribute("pool").unwrap_or("?"), s.attribute("volume").unwrap_or("")),
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
}
