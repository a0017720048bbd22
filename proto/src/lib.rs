//! Lifeboat's wire protocol: generated gRPC types and services.

#![allow(missing_docs)]

/// Version 1 of the protocol (`lifeboat.v1`).
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}

/// Encoded size an inventory page aims for: a page holds guests until
/// adding one more would pass this, and always at least one guest.
pub const INVENTORY_PAGE_BYTES: usize = 6 * 1024;

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
    fn pages_keep_every_guest_in_order_and_mark_all_but_the_last() {
        let g = |i: usize| v1::Guest { uuid: format!("u{i}"), definition_xml: "x".repeat(5000), ..Default::default() };
        let inv = v1::Inventory { host: Some(v1::HostInfo { host_id: "h".into(), ..Default::default() }), guests: (0..20).map(g).collect(), more: false };
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
        let huge = inventory_pages(v1::Inventory { guests: vec![v1::Guest { definition_xml: "y".repeat(100_000), ..Default::default() }], ..Default::default() }, 1000);
        assert_eq!(huge.len(), 1, "a guest larger than a page gets a page of its own");
    }
}
