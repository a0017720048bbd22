//! The controller's modules import each other in one direction only: no
//! module imports one that imports it back (A -> B -> A, or a longer ring),
//! and the pure floor (`domain`) references no other module of the crate and
//! no I/O crate (tokio, rusqlite, tonic).
//!
//! Modules are the top-level ones (`registry`, `reconcile`, ...) and the
//! submodules of `registry` and `domain` (`registry::session`,
//! `domain::view`, ...). An edge is a `crate::<module>[::<sub>]` path (a
//! `use` or an inline path) in a file of another module; tests count too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules whose submodules are nodes of their own.
const SPLIT: &[&str] = &["registry", "domain"];

/// Edges that still close a ring, each with the change that removes it. The
/// cycle check leaves them out; [`every_excused_edge_still_exists`] fails once
/// one is gone, so the list only shrinks. Empty is the goal.
const EXCUSED: &[(&str, &str, &str)] = &[];

/// Crates the pure floor must not name.
const IO_CRATES: &[&str] = &["tokio", "rusqlite", "tonic"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The node a source file belongs to (`None`: the crate root, main.rs).
fn node_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    let top = parts.first()?.clone();
    if top == "lib" || top == "main" {
        return None;
    }
    if SPLIT.contains(&top.as_str()) && parts.len() >= 2 && parts[1] != "mod" {
        return Some(format!("{top}::{}", parts[1]));
    }
    Some(top)
}

/// Drops `//` comments (doc comments included): a path named in prose is not an import.
fn strip_comments(text: &str) -> String {
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// Modules named by `crate::` paths in `text`, including inside grouped
/// `use crate::{a::x, b};` imports. Items of the crate root (`crate::now_ms`)
/// are not modules: only names in `modules` count.
fn referenced(
    text: &str,
    modules: &BTreeSet<String>,
    split_subs: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut add = |path: &str| {
        let top = ident_at(path);
        if !modules.contains(top) {
            return;
        }
        let rest = &path[top.len()..];
        let sub = rest.strip_prefix("::").map(ident_at).unwrap_or("");
        match split_subs.get(top) {
            Some(subs) if subs.contains(sub) => found.insert(format!("{top}::{sub}")),
            _ => found.insert(top.to_string()),
        };
    };
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `lifeboat_crate::`
        }
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                add(item.trim());
            }
        } else {
            add(after);
        }
    }
    found
}

struct Graph {
    edges: BTreeMap<String, BTreeSet<String>>,
    /// Where each edge was seen: (from, to) -> a file.
    seen_in: BTreeMap<(String, String), String>,
}

fn graph() -> Graph {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut split_subs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut modules = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let Some(n) = node_of(rel) else { continue };
        match n.split_once("::") {
            Some((top, sub)) => {
                split_subs.entry(top.to_string()).or_default().insert(sub.to_string());
                modules.insert(top.to_string());
            }
            None => {
                modules.insert(n);
            }
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut seen_in = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let Some(from) = node_of(rel) else { continue };
        let text = strip_comments(&std::fs::read_to_string(f).expect("readable source"));
        for to in referenced(&text, &modules, &split_subs) {
            if to == from {
                continue;
            }
            seen_in.entry((from.clone(), to.clone())).or_insert_with(|| rel.display().to_string());
            edges.entry(from.clone()).or_default().insert(to);
        }
        edges.entry(from).or_default();
    }
    Graph { edges, seen_in }
}

/// One cycle, if any: the modules in order, the first repeated at the end.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|s| s == n).expect("open node is on the stack");
                let mut ring = stack[start..].to_vec();
                ring.push(n.to_string());
                return Some(ring);
            }
            None => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in edges.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(n, edges, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

/// The graph with every `top::sub` node merged into `top`.
fn collapse(edges: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |n: &str| n.split("::").next().unwrap_or(n).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in edges {
        let f = top(from);
        let entry = out.entry(f.clone()).or_default();
        entry.extend(tos.iter().map(|t| top(t)).filter(|t| t != &f));
    }
    out
}

fn describe(g: &Graph, ring: &[String]) -> String {
    ring.windows(2)
        .map(|w| {
            let at = g.seen_in.get(&(w[0].clone(), w[1].clone())).map(String::as_str).unwrap_or("?");
            format!("{} -> {} (in {at})", w[0], w[1])
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph();
    assert!(g.edges.contains_key("registry") && g.edges.contains_key("reconcile"), "modules not found");
    let mut edges = g.edges.clone();
    for (from, to, _) in EXCUSED {
        if let Some(tos) = edges.get_mut(*from) {
            tos.remove(*to);
        }
    }
    if let Some(ring) = find_cycle(&edges) {
        panic!("import cycle: {}", describe(&g, &ring));
    }
    // The same with each split module's parts as one module: `registry::listing`
    // naming `crate::reconcile` is `registry` importing `reconcile`.
    let whole = collapse(&edges);
    if let Some(ring) = find_cycle(&whole) {
        panic!("import cycle between top-level modules: {}", ring.join(" -> "));
    }
}

#[test]
fn every_excused_edge_still_exists() {
    let g = graph();
    for (from, to, fix) in EXCUSED {
        assert!(
            g.edges.get(*from).is_some_and(|t| t.contains(*to)),
            "{from} -> {to} is gone ({fix}): remove it from EXCUSED"
        );
    }
}

#[test]
fn the_domain_floor_names_no_other_module_and_no_io_crate() {
    let g = graph();
    let mut bad = Vec::new();
    for (from, tos) in &g.edges {
        if from != "domain" && !from.starts_with("domain::") {
            continue;
        }
        for to in tos {
            if to != "domain" && !to.starts_with("domain::") {
                bad.push(format!("{from} -> crate::{to} (in {})", g.seen_in[&(from.clone(), to.clone())]));
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&src_dir().join("domain"), &mut files);
    assert!(!files.is_empty(), "no domain files found");
    for f in &files {
        let text = strip_comments(&std::fs::read_to_string(f).expect("readable source"));
        for c in IO_CRATES {
            let needle = format!("{c}::");
            let named = text.match_indices(&needle).any(|(i, _)| {
                !text[..i].chars().next_back().is_some_and(|p| p.is_ascii_alphanumeric() || p == '_' || p == ':')
            });
            if named {
                bad.push(format!("{} names {c}", f.display()));
            }
        }
    }
    assert!(bad.is_empty(), "the domain floor must stay pure: {bad:?}");
}

#[test]
fn the_cycle_finder_finds_a_ring_and_accepts_a_line() {
    let e = |pairs: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    let ring = find_cycle(&e(&[("a", "b"), ("b", "c"), ("c", "a")])).expect("a ring");
    assert_eq!(ring.first(), ring.last());
    assert_eq!(ring.len(), 4);
    assert!(find_cycle(&e(&[("a", "b"), ("b", "c"), ("a", "c")])).is_none());
    let subs: BTreeMap<String, BTreeSet<String>> =
        [("registry".to_string(), ["session".to_string()].into_iter().collect())].into_iter().collect();
    let modules = ["registry", "store"].iter().map(|s| s.to_string()).collect();
    let text =
        "use crate::{registry::session::SessionId, store};\nlet x = crate::registry::Registry::load(crate::now_ms());";
    let r = referenced(text, &modules, &subs);
    assert_eq!(r, ["registry", "registry::session", "store"].iter().map(|s| s.to_string()).collect());
}
