//! Host facts read from local files (no libvirt): boot id, hostname, the
//! qemu driver's lock manager, what libvirt-guests does at boot.

use std::path::{Path, PathBuf};

/// Reads a one-line file, trimmed; `None` when unreadable or empty.
pub fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The kernel's hostname in this UTS namespace.
pub fn hostname() -> String {
    read_trimmed(Path::new("/proc/sys/kernel/hostname")).unwrap_or_default()
}

/// Value of a `key = "value"` setting in a libvirt-style config file
/// (qemu.conf syntax: `#` comments, optional quotes).
pub fn conf_value(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((k, v)) = line.split_once('=') else { continue };
        if k.trim() == key {
            found = Some(v.trim().trim_matches('"').trim_matches('\'').to_string());
        }
    }
    found
}

/// The qemu driver's `lock_manager` ("" = none configured).
pub fn lock_manager(qemu_conf: &Path) -> String {
    std::fs::read_to_string(qemu_conf).ok().and_then(|t| conf_value(&t, "lock_manager")).unwrap_or_default()
}

/// What libvirt-guests would do with guests at boot: "start" or "ignore"
/// from the first existing file (its default is "start"); "absent" when
/// no libvirt-guests configuration exists.
pub fn guests_on_boot(files: &[PathBuf]) -> String {
    for f in files {
        if let Ok(t) = std::fs::read_to_string(f) {
            return match conf_value(&t, "ON_BOOT").as_deref() {
                Some("ignore") => "ignore".into(),
                Some("start") | None => "start".into(),
                Some(other) => format!("unknown ({other})"),
            };
        }
    }
    "absent".into()
}

/// How often the agent re-reads the host's memory total.
pub const MEMORY_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a newly read memory total (KiB) must be reported: it differs
/// from the one reported. A zero reading (libvirt gave nothing) is never
/// reported over a known figure.
pub fn memory_total_changed(reported_kib: u64, read_kib: u64) -> bool {
    read_kib != 0 && read_kib != reported_kib
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_ignore_comments_and_quotes() {
        let t = "#lock_manager = \"lockd\"\nuser = \"root\"\nlock_manager = \"sanlock\" # yes\n";
        assert_eq!(conf_value(t, "lock_manager").as_deref(), Some("sanlock"));
        assert_eq!(conf_value("#lock_manager = \"lockd\"\n", "lock_manager"), None);
    }

    #[test]
    fn only_a_real_change_of_the_memory_total_is_reported() {
        assert!(memory_total_changed(8 << 20, 16 << 20));
        assert!(memory_total_changed(0, 8 << 20), "the first figure");
        assert!(!memory_total_changed(8 << 20, 8 << 20));
        assert!(!memory_total_changed(8 << 20, 0), "libvirt answered nothing");
    }

    #[test]
    fn libvirt_guests_defaults_to_start() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("libvirt-guests");
        assert_eq!(guests_on_boot(std::slice::from_ref(&f)), "absent");
        std::fs::write(&f, "# ON_BOOT=ignore\n").unwrap();
        assert_eq!(guests_on_boot(std::slice::from_ref(&f)), "start");
        std::fs::write(&f, "ON_BOOT=ignore\n").unwrap();
        assert_eq!(guests_on_boot(std::slice::from_ref(&f)), "ignore");
    }
}
