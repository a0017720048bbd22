//! Property tests of the controller's configuration parser
//! (`ControllerConfig::parse`): arbitrary text and mutations of the packaged
//! `packaging/config/controller.toml` and `fuzz/corpus/config-controller/`.
//! Properties: never panics; a refusal names the file, and for a single
//! changed key, that key; every BMC section of an accepted file builds or is
//! refused by `Fencer::new` without panicking.

#[path = "../../fuzz/harness.rs"]
mod harness;
#[path = "../../fuzz/config_mutations.rs"]
mod mutations;

use std::path::Path;

use lifeboat_controller::config::ControllerConfig;
use lifeboat_controller::fence::Fencer;
use proptest::prelude::*;

const TABLES: &[&str] = &["tls", "bmc.kvm01", "bmc.kvm02", "bmc.\"odd host\""];
const KEYS: &[&str] = &[
    "listen",
    "database",
    "heartbeat_interval_ms",
    "unreachable_after_ms",
    "force_grace_ms",
    "metrics_listen",
    "lease_ttl_ms",
    "host_memory_reserve_mib",
    "ca",
    "cert",
    "key",
    "driver",
    "url",
    "system_id",
    "credentials_file",
    "power_off_timeout_s",
    "poll_interval_ms",
    "agent",
    "options",
    "env",
];

fn seeds() -> Vec<String> {
    let packaged = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/controller.toml");
    let mut out = vec![std::fs::read_to_string(packaged).unwrap()];
    out.extend(harness::corpus("config-controller").into_iter().map(|(_, b)| String::from_utf8(b).unwrap()));
    out
}

fn check(text: &str) -> Result<Option<ControllerConfig>, TestCaseError> {
    let path = Path::new("/etc/lifeboat/fuzzed.toml");
    match ControllerConfig::parse(text, path) {
        Ok(cfg) => {
            for (host, bmc) in &cfg.bmc {
                // files do not exist: a refusal, never a panic
                let _ = Fencer::new(host, bmc);
            }
            Ok(Some(cfg))
        }
        Err(e) => {
            let m = e.to_string();
            prop_assert!(m.contains("/etc/lifeboat/fuzzed.toml"), "refusal does not name the file: {m}");
            Ok(None)
        }
    }
}

#[test]
fn fuzz_config_controller_text() {
    harness::run("config_controller_text", 128, mutations::toml_soup(KEYS, TABLES), |t| check(&t).map(|_| ()));
}

#[test]
fn fuzz_config_controller_mutations() {
    let seeds = seeds();
    for s in &seeds {
        ControllerConfig::parse(s, Path::new("seed.toml")).unwrap_or_else(|e| panic!("seed does not parse: {e}"));
    }
    let strategy = (0..seeds.len(), proptest::collection::vec(mutations::edit(TABLES, KEYS), 1..4));
    harness::run("config_controller_mutations", 128, strategy, |(i, edits)| {
        let mut text = seeds[i].clone();
        for e in &edits {
            mutations::apply(&mut text, e);
        }
        let accepted = check(&text)?;
        if let (None, Some((table, key, value))) = (&accepted, mutations::single_set(&edits)) {
            // a syntax error is reported where the parser noticed it, not at the key
            if !mutations::is_toml_value(value) {
                return Ok(());
            }
            let m = ControllerConfig::parse(&text, Path::new("f.toml")).unwrap_err().to_string();
            let bare = key.trim_matches('"');
            // a BMC section the edit created may be refused for what it lacks (`driver`)
            // A `[bmc.X]` section is refused as a whole, naming its table line: it is an
            // internally tagged enum (`driver`), and serde reports a bad value inside one
            // without the key. A section the edit created may lack `driver`.
            let names_table = table.as_ref().is_some_and(|t| t.starts_with("bmc.") && m.contains(&format!("[{t}]")));
            prop_assert!(m.contains(bare) || names_table, "refusal after setting `{key}` does not name it: {m}");
        }
        Ok(())
    });
}
