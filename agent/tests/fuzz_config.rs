//! Property tests of the agent's configuration parser (`AgentConfig::parse`):
//! arbitrary text and mutations of the packaged `packaging/config/agent.toml`
//! and `fuzz/corpus/config-agent/`. Properties: never panics; a refusal names
//! the file, and for a single changed key, that key; an accepted file has an
//! https controller URL and a usable host id setting.

#[path = "../../fuzz/harness.rs"]
mod harness;
#[path = "../../fuzz/config_mutations.rs"]
mod mutations;

use std::path::Path;

use lifeboat_agent::config::AgentConfig;
use proptest::prelude::*;

const TABLES: &[&str] = &["controller"];
const KEYS: &[&str] = &[
    "host_id",
    "machine_id_file",
    "boot_id_file",
    "libvirt_uri",
    "autostart_dir",
    "qemu_conf",
    "libvirt_guests_conf",
    "state_dir",
    "resync_interval_s",
    "metrics_listen",
    "url",
    "server_name",
    "ca",
    "cert",
    "key",
];

fn seeds() -> Vec<String> {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/agent.toml");
    let mut out = vec![std::fs::read_to_string(packaged).unwrap()];
    out.extend(harness::corpus("config-agent").into_iter().map(|(_, b)| String::from_utf8(b).unwrap()));
    out
}

fn check(text: &str) -> Result<bool, TestCaseError> {
    match AgentConfig::parse(text, Path::new("/etc/lifeboat/fuzzed.toml")) {
        Ok(cfg) => {
            prop_assert!(!cfg.controller.urls().is_empty());
            prop_assert!(cfg.controller.urls().iter().all(|u| u.starts_with("https://")));
            prop_assert!(cfg.resync_interval_s >= 1);
            prop_assert!(cfg.host_id.as_ref().is_none_or(|h| !h.trim().is_empty()));
            Ok(true)
        }
        Err(e) => {
            let m = e.to_string();
            prop_assert!(m.contains("/etc/lifeboat/fuzzed.toml"), "refusal does not name the file: {m}");
            Ok(false)
        }
    }
}

#[test]
fn fuzz_config_agent_text() {
    harness::run("config_agent_text", 128, mutations::toml_soup(KEYS, TABLES), |t| check(&t).map(|_| ()));
}

#[test]
fn fuzz_config_agent_mutations() {
    let seeds = seeds();
    for s in &seeds {
        AgentConfig::parse(s, Path::new("seed.toml")).unwrap_or_else(|e| panic!("seed does not parse: {e}"));
    }
    let strategy = (0..seeds.len(), proptest::collection::vec(mutations::edit(TABLES, KEYS), 1..4));
    harness::run("config_agent_mutations", 128, strategy, |(i, edits)| {
        let mut text = seeds[i].clone();
        for e in &edits {
            mutations::apply(&mut text, e);
        }
        let accepted = check(&text)?;
        if let (false, Some((_, key, value))) = (accepted, mutations::single_set(&edits)) {
            // a syntax error is reported where the parser noticed it, not at the key
            if !mutations::is_toml_value(value) {
                return Ok(());
            }
            let m = AgentConfig::parse(&text, Path::new("f.toml")).unwrap_err().to_string();
            let bare = key.trim_matches('"');
            prop_assert!(m.contains(bare), "refusal after setting `{key}` does not name it: {m}");
        }
        Ok(())
    });
}
