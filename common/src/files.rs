//! Files that must stay private: the process umask, owner-only modes for
//! keys and databases, and checks that do not change anything (for
//! `--check-config`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::unistd::AccessFlags;

/// Sets the process umask to 077, so that every file the process creates
/// (database, WAL, lock, backup, logs, state) is owner-only unless it is
/// chmodded on purpose. Call first thing in `main`.
pub fn set_private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// The permission bits (`0o7777`) of `path`, following symlinks.
pub fn mode(path: &Path) -> std::io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Whether a mode lets anyone but the owner read, write or run the file.
pub fn is_shared(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Sets `path` to mode 0600 if it exists and is readable or writable by
/// group or others. A missing file is not an error (the WAL and SHM files
/// of a database come and go).
pub fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    match mode(path) {
        Ok(m) if is_shared(m) => fs::set_permissions(path, fs::Permissions::from_mode(0o600)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether this process may create and write files in directory `dir`
/// (`access(2)` with W_OK|X_OK: the effective user, root included, and a
/// read-only mount answer correctly), without creating anything.
pub fn dir_is_writable(dir: &Path) -> bool {
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
}

/// Whether this process may write `file` (`access(2)` with W_OK).
pub fn file_is_writable(file: &Path) -> bool {
    access(file, AccessFlags::W_OK)
}

fn access(path: &Path, how: AccessFlags) -> bool {
    // A path with a NUL byte cannot be passed to access(2): not writable.
    nix::unistd::access(path, how).is_ok()
}

/// The real user id of this process (`getuid(2)`).
pub fn real_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrict_to_owner_fixes_shared_modes_and_ignores_missing_files() {
        let d = std::env::temp_dir().join(format!("lb-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let f = d.join("db");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(is_shared(mode(&f).unwrap()));
        restrict_to_owner(&f).unwrap();
        assert_eq!(mode(&f).unwrap(), 0o600);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o400)).unwrap();
        restrict_to_owner(&f).unwrap();
        assert_eq!(mode(&f).unwrap(), 0o400, "an owner-only mode is left alone");
        restrict_to_owner(&d.join("db-wal")).unwrap();
        assert!(dir_is_writable(&d));
        assert!(!dir_is_writable(&d.join("missing")));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_real_uid_owns_the_files_this_process_creates_and_the_open_files_limit_reads() {
        use std::os::unix::fs::MetadataExt;
        let f = std::env::temp_dir().join(format!("lb-uid-{}", std::process::id()));
        fs::write(&f, b"x").unwrap();
        // Tests do not run setuid: the effective uid (the owner) is the real one.
        assert_eq!(fs::metadata(&f).unwrap().uid(), real_uid());
        assert!(file_is_writable(&f));
        fs::remove_file(&f).unwrap();
        assert!(!file_is_writable(&f), "a missing file is not writable");
        crate::raise_open_files_limit();
        assert!(crate::open_files_limit().is_some_and(|n| n > 0));
    }
}
