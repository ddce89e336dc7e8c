//! Errors of the Ceph driver: each names the command and the object it was about.

use std::time::Duration;

/// `errno` values the `ceph`/`rbd` tools exit with that callers act on.
const ENOENT: i32 = 2;
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;
const ENOTEMPTY: i32 = 39;

/// Why a Ceph operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    /// A pool, image, snapshot or lock name was refused before any command ran.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// `pool`, `image`, `snapshot`, `lock id`, …
        what: &'static str,
        /// The refused value.
        name: String,
        /// Why.
        reason: String,
    },
    /// The tool could not be started.
    #[error("`{command}` for {object}: cannot run: {source}")]
    Spawn {
        /// The command line (tool and arguments, without credentials).
        command: String,
        /// The object concerned (`pool rbd`, `image rbd/vm1`, `cluster`).
        object: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tool did not finish in time and was killed.
    #[error("`{command}` for {object} timed out after {timeout:?} (killed)")]
    Timeout {
        /// The command line.
        command: String,
        /// The object concerned.
        object: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// The tool exited non-zero.
    #[error("`{command}` for {object} failed (exit {}): {stderr}", code.map_or("signal".to_string(), |c| c.to_string()))]
    Failed {
        /// The command line.
        command: String,
        /// The object concerned.
        object: String,
        /// Exit code (an errno for `ceph`/`rbd`); `None` when killed by a signal.
        code: Option<i32>,
        /// The tool's stderr, trimmed (progress noise removed).
        stderr: String,
    },
    /// Something a step needs is not there (e.g. the snapshot a clone is made from).
    #[error("{object} does not exist")]
    Missing {
        /// The missing object (`snapshot rbd/base@golden`).
        object: String,
    },
    /// The tool succeeded but its output did not parse.
    #[error("`{command}` for {object}: unexpected output: {reason}")]
    Parse {
        /// The command line.
        command: String,
        /// The object concerned.
        object: String,
        /// The parser's complaint.
        reason: String,
    },
}

impl CephError {
    fn code(&self) -> Option<i32> {
        match self {
            CephError::Failed { code, .. } => *code,
            _ => None,
        }
    }

    fn stderr_has(&self, needle: &str) -> bool {
        matches!(self, CephError::Failed { stderr, .. } if stderr.contains(needle))
    }

    /// The object (pool, image, snapshot) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, CephError::Missing { .. })
            || self.code() == Some(ENOENT)
            || self.stderr_has("does not exist")
            || self.stderr_has("No such file or directory")
    }

    /// The object already exists.
    pub fn is_exists(&self) -> bool {
        self.code() == Some(EEXIST) || self.stderr_has("already exists")
    }

    /// The object is in use (clones of a snapshot, watchers of an image, snapshots left).
    pub fn is_busy(&self) -> bool {
        matches!(self.code(), Some(EBUSY) | Some(ENOTEMPTY))
    }

    /// The call ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, CephError::Timeout { .. })
    }
}
