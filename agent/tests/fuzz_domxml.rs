//! Property tests of the domain XML parser (`lifeboat_agent::domxml::parse`):
//! arbitrary text, token soup, and mutations of the real definitions in
//! `fuzz/corpus/domxml/` (truncation, byte flips, huge values, deep nesting,
//! entities, out-of-range numbers). Properties: never panics; what it returns
//! is bounded by the input; a memory size too large for u64 KiB is refused,
//! never wrapped; errors are short.

#[path = "../../fuzz/harness.rs"]
mod harness;

use lifeboat_agent::domxml::{self, DomainFacts};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Longest error text the parser may return, whatever the input.
const MAX_ERROR: usize = 400;

fn seeds() -> Vec<String> {
    harness::corpus("domxml").into_iter().map(|(_, b)| String::from_utf8(b).expect("corpus XML is UTF-8")).collect()
}

/// The bound every successful parse must respect: everything reported comes
/// from the input (plus a few bytes of formatting per device).
fn check_bounded(xml: &str, f: &DomainFacts) -> Result<(), TestCaseError> {
    let items = f.disks.len() + f.nics.len();
    prop_assert!(items <= xml.len() / 7, "{items} devices from {} bytes", xml.len());
    let mut text = f.uuid.len() + f.name.len() + f.owner.as_ref().map_or(0, |(h, _)| h.len());
    for d in &f.disks {
        text += d.target.len() + d.source_type.len() + d.source.len() + d.device.len();
    }
    for n in &f.nics {
        text += n.mac.len() + n.kind.len() + n.source.len() + n.model.len();
    }
    // defaults ("file", "disk", "hostdev", "?:") are at most 8 bytes per device
    prop_assert!(text <= xml.len() + 8 * items * 4, "{text} bytes of facts from {} bytes of XML", xml.len());
    Ok(())
}

fn check(xml: &str) -> Result<(), TestCaseError> {
    match domxml::parse(xml) {
        Ok(f) => check_bounded(xml, &f),
        Err(e) => {
            prop_assert!(!e.is_empty());
            prop_assert!(e.len() <= MAX_ERROR, "error of {} bytes: {}...", e.len(), &e[..e.floor_char_boundary(200)]);
            prop_assert!(!e.chars().any(|c| c.is_control() && c != '\n'), "control character in error {e:?}");
            Ok(())
        }
    }
}

/// Pieces of domain XML, to build documents that get past the tokenizer.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<domain type='kvm'>".to_string()),
        Just("</domain>".to_string()),
        Just("<name>".to_string()),
        Just("</name>".to_string()),
        Just("<uuid>".to_string()),
        Just("</uuid>".to_string()),
        Just("<memory unit='".to_string()),
        Just("<vcpu>".to_string()),
        Just("</vcpu>".to_string()),
        Just("</memory>".to_string()),
        Just("'>".to_string()),
        Just("<devices>".to_string()),
        Just("</devices>".to_string()),
        Just("<disk type='network'><source protocol='rbd' name='".to_string()),
        Just("'/></disk>".to_string()),
        Just("<interface type='direct'><source dev='".to_string()),
        Just("'/></interface>".to_string()),
        Just("<metadata><lb:owner xmlns:lb='https://lifeboat.example/xmlns/owner/1' host='h' generation='".to_string()),
        Just("'/></metadata>".to_string()),
        Just("<![CDATA[".to_string()),
        Just("]]>".to_string()),
        Just("<!DOCTYPE domain [<!ENTITY a 'aaaaaaaa'>]>".to_string()),
        Just("&a;".to_string()),
        Just("&amp;".to_string()),
        Just("&#0;".to_string()),
        Just("&#x1b;".to_string()),
        Just("<?xml version='1.0'?>".to_string()),
        Just("<!-- c -->".to_string()),
        prop_oneof![Just("KiB"), Just("b"), Just("KB"), Just("MB"), Just("GB"), Just("T"), Just("furlong")]
            .prop_map(str::to_string),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    /// A value of this many bytes inside the first attribute after the offset.
    HugeAttr(usize, usize),
    /// Elements nested this deep after the offset.
    Nest(usize, usize),
    /// A DTD with entities (a "billion laughs" tower) before the root.
    Entities(u8),
    /// `<memory unit=UNIT>VALUE</memory>` replaces the first `<memory>`.
    Memory(String, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let unit = prop_oneof![
        Just("b"),
        Just("bytes"),
        Just("KB"),
        Just("k"),
        Just("KiB"),
        Just("MB"),
        Just("M"),
        Just("MiB"),
        Just("GB"),
        Just("G"),
        Just("GiB"),
        Just("T"),
        Just("TiB"),
        Just(""),
        Just("PiB"),
        Just("kib")
    ]
    .prop_map(str::to_string);
    let value = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u32..64).prop_map(|s| (1u64 << s).to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just(" 42 ".to_string()),
        "[0-9]{0,30}",
        "\\PC{0,20}",
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(p, x)| Mutation::Flip(p, x)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        (any::<usize>(), prop_oneof![1usize..1000, Just(100_000usize), Just(1_000_000usize)])
            .prop_map(|(p, n)| Mutation::HugeAttr(p, n)),
        (any::<usize>(), prop_oneof![1usize..100, Just(5_000usize), Just(50_000usize)])
            .prop_map(|(p, n)| Mutation::Nest(p, n)),
        (1u8..12).prop_map(Mutation::Entities),
        (unit, value).prop_map(|(u, v)| Mutation::Memory(u, v)),
    ]
}

/// Byte offsets on a char boundary keep the document UTF-8.
fn at(doc: &str, p: usize) -> usize {
    doc.floor_char_boundary(p % (doc.len() + 1))
}

fn apply(doc: &mut String, m: &Mutation) {
    match m {
        Mutation::Truncate(p) => doc.truncate(at(doc, *p)),
        Mutation::Flip(p, x) => {
            if doc.is_empty() {
                return;
            }
            let mut bytes = std::mem::take(doc).into_bytes();
            let i = p % bytes.len();
            bytes[i] ^= x;
            *doc = String::from_utf8_lossy(&bytes).into_owned();
        }
        Mutation::Insert(p, b) => {
            let i = at(doc, *p);
            doc.insert_str(i, &String::from_utf8_lossy(b));
        }
        Mutation::HugeAttr(p, n) => {
            let from = at(doc, *p);
            if let Some(q) = doc[from..].find("='") {
                doc.insert_str(from + q + 2, &"x".repeat(*n));
            }
        }
        Mutation::Nest(p, n) => {
            let from = at(doc, *p);
            // inside an element's content: just after the next '>'
            if let Some(q) = doc[from..].find('>') {
                let nest = format!("{}{}", "<disk>".repeat(*n), "</disk>".repeat(*n));
                doc.insert_str(from + q + 1, &nest);
            }
        }
        Mutation::Entities(levels) => {
            let mut dtd = String::from("<!DOCTYPE domain [<!ENTITY e0 'lol'>");
            for l in 1..=*levels {
                dtd.push_str(&format!("<!ENTITY e{l} '{}'>", format!("&e{};", l - 1).repeat(10)));
            }
            dtd.push_str("]>");
            doc.insert_str(0, &dtd);
            if let Some(q) = doc.find("<name>") {
                doc.insert_str(q + 6, &format!("&e{levels};"));
            }
        }
        Mutation::Memory(unit, value) => {
            if let (Some(a), Some(b)) = (doc.find("<memory"), doc.find("</memory>"))
                && a < b
            {
                doc.replace_range(a..b, &format!("<memory unit='{unit}'>{value}"));
            }
        }
    }
}

/// KiB of `value` `unit` by exact arithmetic, or None when it does not fit a u64.
fn expected_kib(value: &str, unit: &str) -> Option<Option<u64>> {
    let v: u128 = value.trim().parse::<u64>().ok()?.into();
    let kib = match unit {
        "b" | "bytes" => v / 1024,
        "KB" => v * 1000 / 1024,
        "k" | "KiB" => v,
        "MB" => v * 1_000_000 / 1024,
        "M" | "MiB" => v << 10,
        "GB" => v * 1_000_000_000 / 1024,
        "G" | "GiB" => v << 20,
        "T" | "TiB" => v << 30,
        _ => return None,
    };
    Some(u64::try_from(kib).ok())
}

#[test]
fn fuzz_domxml_arbitrary_text() {
    let strategy = prop_oneof![any::<String>(), proptest::collection::vec(token(), 0..60).prop_map(|t| t.concat()),];
    harness::run("domxml_arbitrary_text", 128, strategy, |xml| check(&xml));
}

#[test]
fn fuzz_domxml_corpus_mutations() {
    let seeds = seeds();
    for s in &seeds {
        let f = domxml::parse(s).unwrap_or_else(|e| panic!("corpus definition does not parse: {e}\n{s}"));
        assert!(!f.uuid.is_empty() && !f.name.is_empty());
    }
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(mutation(), 1..4));
    harness::run("domxml_corpus_mutations", 128, strategy, |(i, ms)| {
        let mut doc = seeds[i].clone();
        for m in &ms {
            apply(&mut doc, m);
        }
        check(&doc)?;
        // A lone <memory> change is judged exactly: right value or a refusal, never a wrapped number.
        if let [Mutation::Memory(unit, value)] = ms.as_slice() {
            match (expected_kib(value, unit), domxml::parse(&doc)) {
                (Some(Some(kib)), Ok(f)) => prop_assert_eq!(f.memory_kib, kib),
                (Some(Some(kib)), Err(e)) => prop_assert!(false, "{value} {unit} = {kib} KiB refused: {e}"),
                (Some(None), Ok(f)) => {
                    prop_assert!(false, "{value} {unit} overflows u64 KiB but read as {}", f.memory_kib)
                }
                (Some(None), Err(e)) => prop_assert!(e.contains("memory"), "{e}"),
                (None, Ok(f)) => {
                    prop_assert!(false, "unusable <memory unit='{unit}'>{value}</memory> read as {} KiB", f.memory_kib)
                }
                (None, Err(_)) => {}
            }
        }
        Ok(())
    });
}

#[test]
fn corpus_holds_real_and_odd_definitions() {
    let seeds = seeds();
    assert!(seeds.len() >= 5, "only {} seeds", seeds.len());
    let facts: Vec<DomainFacts> = seeds.iter().map(|s| domxml::parse(s).unwrap()).collect();
    let kinds: std::collections::BTreeSet<&str> =
        facts.iter().flat_map(|f| f.disks.iter().map(|d| d.source_type.as_str())).collect();
    for k in ["file", "block", "network", "volume", "dir"] {
        assert!(kinds.contains(k), "no <disk type='{k}'> in the corpus: {kinds:?}");
    }
    assert!(facts.iter().any(|f| f.owner.is_some()), "no Lifeboat ownership metadata in the corpus");
}
