//! One daemon per state directory: an exclusive `flock(2)` on `<state_dir>/debvisord.lock`,
//! taken before the daemon does anything else and held for its whole life.
//!
//! Two daemons on one state directory would share its node id, lease file, pid files and
//! embedded etcd, and fight over them (each revoking the other's lease). The lock makes a
//! second one exit at once, naming the PID that holds it. It also proves a previous daemon
//! is gone: the kernel drops a `flock` with the last descriptor of its holder (the file is
//! opened close-on-exec, so no helper inherits it), so whoever holds the lock knows every
//! earlier daemon of this state dir is dead, and only then may it adopt processes they left
//! running ([`crate::services`] asks [`held`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use thiserror::Error;

/// Name of the lock file inside `paths.state_dir`.
pub const LOCK_FILE: &str = "debvisord.lock";

/// Why the state directory could not be locked.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds the lock: another daemon runs on this state directory.
    #[error("another debvisord (pid {}) is running on state directory {dir} (it holds {lock}); refusing to start a second daemon on it", holder_text(.holder))]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's PID, when it could be found.
        holder: Option<u32>,
    },
    /// The lock file could not be opened, checked or locked.
    #[error("{path}: {reason}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

fn holder_text(holder: &Option<u32>) -> String {
    holder.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateLock {
    /// The locked descriptor: the lock lives exactly as long as it stays open.
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Lock `state_dir` (which must exist) for this process, or say who holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |reason: String| LockError::Io {
            path: path.clone(),
            reason,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io(format!("cannot open the lock file: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| io(format!("cannot stat the lock file: {e}")))?;
        let (uid, _) = crate::securefs::us();
        if !meta.file_type().is_file() || meta.uid() != uid || meta.nlink() != 1 {
            return Err(io(format!(
                "is not a plain file of ours (uid {}, {} links); refusing to use it",
                meta.uid(),
                meta.nlink()
            )));
        }
        // SAFETY: flock(2) on a descriptor we own; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(format!("cannot lock: {e}")));
            }
            return Err(LockError::Held {
                dir: state_dir.to_path_buf(),
                lock: path.clone(),
                holder: holder(&mut file, meta.ino()),
            });
        }
        // Ours now: record our PID for the next one that tries (and for operators).
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()));
        written.map_err(|e| io(format!("cannot write our pid: {e}")))?;
        Ok(StateLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the lock until the process ends, and make [`held`] answer with it.
    pub fn hold_for_life(self) -> &'static StateLock {
        HELD.get_or_init(|| self)
    }
}

static HELD: OnceLock<StateLock> = OnceLock::new();

/// The state-dir lock this process holds for life, if it took one (the daemon does, before
/// anything else): proof that no earlier daemon of this state dir is alive.
pub fn held() -> Option<&'static StateLock> {
    HELD.get()
}

/// The PID holding the lock on the file of inode `ino`: `/proc/locks` first (the kernel's
/// view; the PID written in the file may be a dead predecessor's until the holder wrote its
/// own), the file's contents otherwise.
fn holder(file: &mut File, ino: u64) -> Option<u32> {
    let from_kernel = std::fs::read_to_string("/proc/locks")
        .ok()
        .and_then(|t| lock_holder(&t, ino));
    from_kernel.or_else(|| {
        let mut s = String::new();
        file.rewind().ok()?;
        file.read_to_string(&mut s).ok()?;
        s.trim().parse().ok().filter(|p| *p > 0)
    })
}

/// The PID of the `FLOCK … WRITE` lock on inode `ino` in the text of `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF`). Matched on the inode alone: on
/// overlay file systems the device shown is the underlying one, not `stat`'s.
fn lock_holder(proc_locks: &str, ino: u64) -> Option<u32> {
    proc_locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1:" "FLOCK" "ADVISORY" "WRITE" pid dev:ino start end ("->" marks a waiter).
        if f.get(1) == Some(&"->") {
            return None;
        }
        if f.len() < 6 || f[1] != "FLOCK" || f[3] != "WRITE" {
            return None;
        }
        let file_ino: u64 = f[5].rsplit(':').next()?.parse().ok()?;
        (file_ino == ino).then(|| f[4].parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_matched_by_inode() {
        let text = "1: POSIX  ADVISORY  WRITE 10 08:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:2d:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 5000 00:2d:77 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 11 00:2d:78 0 EOF\n";
        assert_eq!(lock_holder(text, 77), Some(4242));
        assert_eq!(lock_holder(text, 78), None);
        assert_eq!(lock_holder(text, 79), None);
    }

    #[test]
    fn a_second_lock_on_the_same_dir_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateLock::acquire(dir.path()).expect("first lock");
        let written = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(written.trim(), std::process::id().to_string());
        // Another open file description of the same file conflicts, as another process's
        // would.
        match StateLock::acquire(dir.path()) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        let again = StateLock::acquire(dir.path()).expect("free after drop");
        let e = StateLock::acquire(dir.path()).expect_err("held");
        assert!(
            e.to_string().contains(&format!(
                "another debvisord (pid {}) is running on state directory",
                std::process::id()
            )),
            "{e}"
        );
        drop(again);
    }

    #[test]
    fn a_planted_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(LOCK_FILE)).expect("symlink");
        let e = StateLock::acquire(dir.path()).expect_err("refused");
        assert!(matches!(e, LockError::Io { .. }), "{e}");
    }
}
