//! Files and directories the daemon creates, made so that another local user cannot plant,
//! redirect or read them: every directory gets an explicit mode and our owner (repaired when
//! it pre-exists with another), files are written to a temporary name and renamed into
//! place, and files are opened without following symlinks and only trusted when they are
//! plain files of ours.
//!
//! The guarantees hold inside directories made by [`private_dir`]: nobody but us can create
//! or rename entries there, so what is checked stays true until we change it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

/// Why a file or directory could not be made safe.
#[derive(Debug, Error)]
pub enum SecureFsError {
    /// A system call failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The path exists but must not be used (a symlink, not a directory, …).
    #[error("{path}: {reason}; refusing to use it")]
    Refused { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SecureFsError + '_ {
    move |source| SecureFsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Our effective user and group: the owner every file we trust must have.
pub fn us() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Make `path` a directory owned by us with exactly `mode` (e.g. `0o750`, `0o700` for etcd).
/// Missing parents are created with the default mode. An existing directory with another
/// owner or mode is repaired through a descriptor opened without following symlinks (so a
/// swapped-in link cannot redirect the chown/chmod); a non-directory, or a symlink not owned
/// by us, is refused (a symlink of ours, e.g. the state dir moved to another disk, is
/// followed and its target made private).
/// Returns one note per repair, for the caller to log.
pub fn private_dir(path: &Path, mode: u32) -> Result<Vec<String>, SecureFsError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | flags)
            .open(path)
    };
    let dir = match open(libc::O_NOFOLLOW) {
        Ok(d) => d,
        // With O_DIRECTORY, Linux answers ENOTDIR for a symlink too.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let link = std::fs::symlink_metadata(path).map_err(io_err(path))?;
            if !link.is_symlink() {
                return Err(SecureFsError::Refused {
                    path: path.to_path_buf(),
                    reason: "is not a directory".into(),
                });
            }
            // A symlink we own was put there by root (e.g. the state on another disk); one
            // of anybody else is not followed.
            if link.uid() != us().0 {
                return Err(SecureFsError::Refused {
                    path: path.to_path_buf(),
                    reason: format!("is a symbolic link owned by uid {}", link.uid()),
                });
            }
            open(0).map_err(io_err(path))?
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = dir.metadata().map_err(io_err(path))?;
    let (uid, gid) = us();
    let mut notes = Vec::new();
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid)).map_err(io_err(path))?;
        notes.push(format!(
            "{}: owner {}:{} repaired to {uid}:{gid}",
            path.display(),
            meta.uid(),
            meta.gid()
        ));
    }
    // After a chown the kernel may have cleared set-id bits: compare with what we want anyway.
    if meta.mode() & 0o7777 != mode || !notes.is_empty() {
        let before = meta.mode() & 0o7777;
        dir.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
        if before != mode {
            notes.push(format!(
                "{}: mode {before:04o} repaired to {mode:04o}",
                path.display()
            ));
        }
    }
    Ok(notes)
}

/// Why a file is not trusted: `None` when it is a regular file of ours with one link.
fn distrust(meta: &std::fs::Metadata) -> Option<String> {
    let (uid, _) = us();
    if meta.file_type().is_symlink() {
        Some("is a symbolic link".into())
    } else if !meta.file_type().is_file() {
        Some("is not a regular file".into())
    } else if meta.uid() != uid {
        Some(format!("is owned by uid {}, not by us", meta.uid()))
    } else if meta.nlink() != 1 {
        Some(format!("has {} hard links", meta.nlink()))
    } else {
        None
    }
}

/// Open `path` for reading without following a symlink (and without blocking on a FIFO),
/// and only if it is a regular file of ours with a single link. `Ok(None)` when it does not
/// exist; `Err(Refused)` when it exists but is not trusted.
pub fn open_trusted(path: &Path) -> Result<Option<File>, SecureFsError> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SecureFsError::Refused {
                path: path.to_path_buf(),
                reason: "is a symbolic link".into(),
            })
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let meta = f.metadata().map_err(io_err(path))?;
    match distrust(&meta) {
        Some(reason) => Err(SecureFsError::Refused {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(Some(f)),
    }
}

/// The text of a trusted file (see [`open_trusted`]); `Ok(None)` when it does not exist.
pub fn read_trusted(path: &Path) -> Result<Option<String>, SecureFsError> {
    let Some(mut f) = open_trusted(path)? else {
        return Ok(None);
    };
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(io_err(path))?;
    Ok(Some(s))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `path` with `contents` and `mode`: written to a fresh temporary name in the same
/// directory (created with `O_EXCL`, so nothing planted is reused or followed), then renamed
/// over `path` (which replaces a symlink there instead of following it).
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SecureFsError> {
    let name = path
        .file_name()
        .ok_or_else(|| SecureFsError::Refused {
            path: path.to_path_buf(),
            reason: "has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // The umask may have taken bits away; the mode is what the caller asked for.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp))?;
        f.write_all(contents).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Remove `path` when it exists but is not a plain file of ours (a symlink, a FIFO, a
/// foreign or hard-linked file): the link itself is removed, never its target. Returns the
/// reason when something was removed, for the caller to log.
pub fn remove_untrusted(path: &Path) -> Result<Option<String>, SecureFsError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let Some(reason) = distrust(&meta) else {
        return Ok(None);
    };
    if meta.file_type().is_dir() {
        return Err(SecureFsError::Refused {
            path: path.to_path_buf(),
            reason: "is a directory".into(),
        });
    }
    std::fs::remove_file(path).map_err(io_err(path))?;
    Ok(Some(reason))
}

/// Make `path` a plain file of ours with `mode`, keeping its contents when it already is
/// one (an untrusted one is removed first, see [`remove_untrusted`]). Used for files another
/// program opens by name as root (dnsmasq's lease file), so that it opens ours.
/// Returns the reason when an untrusted file was removed.
pub fn ensure_file(path: &Path, mode: u32) -> Result<Option<String>, SecureFsError> {
    let removed = remove_untrusted(path)?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    if let Some(reason) = distrust(&meta) {
        return Err(SecureFsError::Refused {
            path: path.to_path_buf(),
            reason,
        });
    }
    if meta.mode() & 0o7777 != mode {
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
    }
    Ok(removed)
}

/// Open a log file for appending (created with `mode`), without following a symlink, and
/// only if it is a plain file of ours; its mode is set to `mode`.
pub fn open_log(path: &Path, mode: u32) -> Result<File, SecureFsError> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SecureFsError::Refused {
                path: path.to_path_buf(),
                reason: "is a symbolic link".into(),
            },
            _ => io_err(path)(e),
        })?;
    let meta = f.metadata().map_err(io_err(path))?;
    if let Some(reason) = distrust(&meta) {
        return Err(SecureFsError::Refused {
            path: path.to_path_buf(),
            reason,
        });
    }
    if meta.mode() & 0o7777 != mode {
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path))?;
    }
    // The descriptor is handed to a child as its stdout: clear O_NONBLOCK again.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn private_dir_creates_and_repairs_modes() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("a/b/state");
        assert!(private_dir(&d, 0o750).expect("create").is_empty());
        assert_eq!(mode_of(&d), 0o750);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let notes = private_dir(&d, 0o750).expect("repair");
        assert_eq!(mode_of(&d), 0o750);
        assert!(notes[0].contains("mode 1777 repaired to 0750"), "{notes:?}");
        let etcd = t.path().join("etcd");
        private_dir(&etcd, 0o700).expect("etcd dir");
        assert_eq!(mode_of(&etcd), 0o700);
    }

    #[test]
    fn private_dir_repairs_a_foreign_owner() {
        if us().0 != 0 {
            return; // chown needs root
        }
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("dnsmasq");
        std::fs::create_dir(&d).expect("mkdir");
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).expect("chown");
        let notes = private_dir(&d, 0o750).expect("repair");
        let m = std::fs::metadata(&d).expect("stat");
        assert_eq!((m.uid(), m.gid()), us());
        assert!(
            notes.iter().any(|n| n.contains("owner 65534:65534")),
            "{notes:?}"
        );
    }

    #[test]
    fn private_dir_refuses_a_symlink_and_a_file() {
        let t = tempfile::tempdir().expect("tempdir");
        let target = t.path().join("elsewhere");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = t.path().join("state");
        symlink(&target, &link).expect("symlink");
        if us().0 == 0 {
            // Someone else's symlink is not followed.
            std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).expect("lchown");
            let e = private_dir(&link, 0o750).expect_err("symlink refused");
            assert!(
                e.to_string().contains("symbolic link owned by uid 65534"),
                "{e}"
            );
            assert_eq!(mode_of(&target), 0o755, "the target is untouched");
            std::os::unix::fs::lchown(&link, Some(0), Some(0)).expect("lchown");
        }
        // Our own symlink (root moved the state elsewhere) is followed.
        private_dir(&link, 0o750).expect("our symlink");
        assert_eq!(mode_of(&target), 0o750);
        let file = t.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert!(private_dir(&file, 0o750).is_err());
    }

    #[test]
    fn write_file_replaces_a_planted_symlink_instead_of_following_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let secret = t.path().join("secret");
        std::fs::write(&secret, "root only\n").expect("write");
        let p = t.path().join("node_id");
        symlink(&secret, &p).expect("symlink");
        write_file(&p, b"abc\n", 0o640).expect("write");
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "root only\n"
        );
        assert!(std::fs::symlink_metadata(&p).expect("stat").is_file());
        assert_eq!(mode_of(&p), 0o640);
        assert_eq!(read_trusted(&p).expect("read").as_deref(), Some("abc\n"));
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(t.path()).expect("ls").count(), 2);
    }

    #[test]
    fn untrusted_files_are_neither_read_nor_followed() {
        let t = tempfile::tempdir().expect("tempdir");
        let secret = t.path().join("secret");
        std::fs::write(&secret, "root only\n").expect("write");
        let lease = t.path().join("100.leases");
        symlink(&secret, &lease).expect("symlink");
        assert!(read_trusted(&lease).is_err(), "a symlink is not read");
        assert!(
            open_log(&lease, 0o640).is_err(),
            "a log is not opened through a symlink"
        );
        let removed = ensure_file(&lease, 0o640).expect("ensure");
        assert!(removed.expect("removed").contains("symbolic link"));
        assert_eq!(
            std::fs::read_to_string(&secret).expect("read"),
            "root only\n"
        );
        assert_eq!(read_trusted(&lease).expect("read").as_deref(), Some(""));
        assert_eq!(mode_of(&lease), 0o640);

        let linked = t.path().join("101.leases");
        std::fs::hard_link(&secret, &linked).expect("hard link");
        assert!(
            read_trusted(&linked).is_err(),
            "a hard-linked file is not trusted"
        );
        assert!(remove_untrusted(&linked).expect("remove").is_some());
        assert!(secret.exists());

        if us().0 == 0 {
            let foreign = t.path().join("102.leases");
            std::fs::write(&foreign, "0 52:54:00:66:66:66 10.1.0.66 evil *\n").expect("write");
            std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).expect("chown");
            let e = read_trusted(&foreign).expect_err("foreign file");
            assert!(e.to_string().contains("uid 65534"), "{e}");
            ensure_file(&foreign, 0o640).expect("replaced");
            assert_eq!(read_trusted(&foreign).expect("read").as_deref(), Some(""));
        }
        assert_eq!(
            read_trusted(&t.path().join("absent")).expect("absent"),
            None
        );
    }
}
