//! Mutations of TOML configuration files shared by the `fuzz_config_*`
//! property tests of the controller and the agent (included with `#[path]`).

#![allow(dead_code)]

use proptest::prelude::*;

/// One change to a configuration text.
#[derive(Debug, Clone)]
pub enum Edit {
    /// `key = VALUE` appended to the top level (before the first table) or to a table.
    Set {
        table: Option<String>,
        key: String,
        value: String,
    },
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, String),
    /// The line of this index removed.
    DropLine(usize),
    /// The line of this index repeated.
    DupLine(usize),
}

/// TOML values of every type and of extreme sizes.
pub fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("4294967295".to_string()),
        Just("4294967296".to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"\"".to_string()),
        Just("\"0.0.0.0:0\"".to_string()),
        Just("\"[::1]:99999\"".to_string()),
        Just("\"http://x\"".to_string()),
        Just("\"https://\"".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
        (1usize..4).prop_map(|n| format!("\"{}\"", "x".repeat(n * 30_000))),
        Just("\"a\\u0000b\\u001b[2J\"".to_string()),
        Just("[1, \"two\", 3.0]".to_string()),
        "\\PC{0,20}",
    ]
}

/// Keys the file knows (`known`) plus unknown ones.
pub fn key(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(known).prop_map(str::to_string),
        1 => "[a-z_]{1,20}",
        1 => Just("\"quoted key\"".to_string()),
    ]
}

/// Edits of a file whose tables and keys are `tables` / `known`.
pub fn edit(tables: &'static [&'static str], known: &'static [&'static str]) -> impl Strategy<Value = Edit> {
    let table = proptest::option::of(proptest::sample::select(tables).prop_map(str::to_string));
    prop_oneof![
        4 => (table, key(known), value()).prop_map(|(table, key, value)| Edit::Set { table, key, value }),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), 1u8..=255).prop_map(|(p, x)| Edit::Flip(p, x)),
        1 => (any::<usize>(), "[\\[\\]=\"'#{}\n ,.a-z0-9]{1,8}").prop_map(|(p, s)| Edit::Insert(p, s)),
        1 => any::<usize>().prop_map(Edit::DropLine),
        1 => any::<usize>().prop_map(Edit::DupLine),
    ]
}

/// Applies an edit; `Set` adds the line at the top level or at the end of the table.
pub fn apply(text: &mut String, e: &Edit) {
    match e {
        Edit::Set { table: None, key, value } => {
            let line = format!("{key} = {value}\n");
            match text.find("\n[") {
                Some(i) => text.insert_str(i + 1, &line),
                None => text.push_str(&line),
            }
        }
        Edit::Set { table: Some(t), key, value } => {
            let header = format!("[{t}]");
            let line = format!("{key} = {value}\n");
            match text.find(&header) {
                Some(i) => {
                    let after = i + header.len();
                    let next = text[after..].find("\n[").map_or(text.len(), |j| after + j + 1);
                    if !text[..next].ends_with('\n') {
                        text.insert(next, '\n');
                        text.insert_str(next + 1, &line);
                    } else {
                        text.insert_str(next, &line);
                    }
                }
                None => text.push_str(&format!("\n{header}\n{line}")),
            }
        }
        Edit::Truncate(p) => {
            let i = text.floor_char_boundary(p % (text.len() + 1));
            text.truncate(i);
        }
        Edit::Flip(p, x) => {
            if text.is_empty() {
                return;
            }
            let mut b = std::mem::take(text).into_bytes();
            let i = p % b.len();
            b[i] ^= x;
            *text = String::from_utf8_lossy(&b).into_owned();
        }
        Edit::Insert(p, s) => {
            let i = text.floor_char_boundary(p % (text.len() + 1));
            text.insert_str(i, s);
        }
        Edit::DropLine(n) | Edit::DupLine(n) => {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.is_empty() {
                return;
            }
            let i = n % lines.len();
            if matches!(e, Edit::DropLine(_)) {
                lines.remove(i);
            } else {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            *text = lines.join("\n") + "\n";
        }
    }
}

/// The key a lone `Set` edit of a key that must not be there (unknown) or a
/// value that cannot be right (wrong type) is about, when the refusal must name it.
pub fn single_set(edits: &[Edit]) -> Option<(&Option<String>, &String, &String)> {
    match edits {
        [Edit::Set { table, key, value }] => Some((table, key, value)),
        _ => None,
    }
}

/// Arbitrary text that looks like TOML often enough to reach the checks.
pub fn toml_soup(known: &'static [&'static str], tables: &'static [&'static str]) -> impl Strategy<Value = String> {
    let line = prop_oneof![
        (key(known), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        proptest::sample::select(tables).prop_map(|t| format!("[{t}]")),
        "[ -~]{0,30}",
        any::<String>(),
    ];
    prop_oneof![any::<String>(), proptest::collection::vec(line, 0..20).prop_map(|l| l.join("\n"))]
}

/// Whether `value` is one well-formed TOML value.
pub fn is_toml_value(value: &str) -> bool {
    toml::from_str::<toml::Table>(&format!("v = {value}\n")).is_ok()
}
