//! The harness error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while setting up or driving test components.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An etcd request failed.
    #[error("{context}: {source}")]
    Etcd {
        /// What the harness was doing.
        context: String,
        /// The underlying client error.
        #[source]
        source: etcd_client::Error,
    },
    /// A daemon-side store (`debvisor_objects::Store`) could not connect.
    #[error("{context}: {source}")]
    Store {
        /// What the harness was doing.
        context: String,
        /// The store's error.
        #[source]
        source: debvisor_objects::StoreError,
    },
    /// etcd did not come up (exited early or never answered).
    #[error("etcd failed to start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    EtcdStart {
        /// Why the start is considered failed.
        reason: String,
        /// The etcd log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// An external command (e.g. `ip netns add`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {timeout:?} waiting for {what}\n--- last lines ---\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        timeout: Duration,
        /// The last output lines of the process concerned.
        tail: String,
    },
    /// The process exited while the harness was waiting for something else.
    #[error("process exited ({status}) while waiting for {what}\n--- last lines ---\n{tail}")]
    Exited {
        /// What was awaited.
        what: String,
        /// The exit status.
        status: String,
        /// The last output lines of the process.
        tail: String,
    },
    /// The operation does not fit the current state (e.g. launching a running etcd).
    #[error("invalid state: {0}")]
    State(String),
}

/// `Result` with [`HarnessError`] as the default error.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Attach a context string to an I/O error.
pub(crate) trait IoContext<T> {
    /// Wrap the error in [`HarnessError::Io`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| HarnessError::Io {
            context: context(),
            source,
        })
    }
}

/// Attach a context string to an etcd error.
pub(crate) trait EtcdContext<T> {
    /// Wrap the error in [`HarnessError::Etcd`] with the given context.
    fn etcd_ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> EtcdContext<T> for std::result::Result<T, etcd_client::Error> {
    fn etcd_ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| HarnessError::Etcd {
            context: context(),
            source,
        })
    }
}

/// The last `n` lines of `lines`, joined with newlines.
pub(crate) fn tail_of(lines: &[String], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// The last `n` lines of a text file (lossy UTF-8); a note if it cannot be read.
pub(crate) fn file_tail(path: &std::path::Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            tail_of(&lines, n)
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
