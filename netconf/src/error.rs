//! Errors of the host-networking driver. Every variant names the interface (or network) and
//! the operation, so a log line alone tells an operator what failed where.

use std::io;

use thiserror::Error;

/// Why a host-networking operation failed.
#[derive(Debug, Error)]
pub enum NetconfError {
    /// An interface name was rejected before any netlink call (empty, > 15 bytes, `/`, …).
    #[error("{op}: invalid interface name: {reason}")]
    InvalidName { op: &'static str, reason: String },

    /// The kernel (or a socket call) refused the operation; `source` carries the errno.
    #[error("{op} {link}: {source}")]
    Os {
        op: &'static str,
        link: String,
        source: io::Error,
    },

    /// rtnetlink failed without an errno (unexpected or undecodable message).
    #[error("{op} {link}: netlink: {message}")]
    Protocol {
        op: &'static str,
        link: String,
        message: String,
    },

    /// The interface the operation needs does not exist.
    #[error("{op} {link}: no such interface")]
    NoSuchLink { op: &'static str, link: String },

    /// The interface exists but is not what was asked for (wrong kind, VLAN id, VNI, …).
    /// We never delete and recreate someone's interface behind their back.
    #[error("{op} {link}: {reason}")]
    Conflict {
        op: &'static str,
        link: String,
        reason: String,
    },

    /// The netlink worker did not answer in time.
    #[error("{op} {link}: timed out after {secs} s")]
    Timeout {
        op: &'static str,
        link: String,
        secs: u64,
    },

    /// The network namespace could not be entered, or the worker thread not started.
    #[error("network namespace {netns}: {reason}")]
    Namespace { netns: String, reason: String },

    /// The worker thread behind a [`crate::Netlink`] has stopped (it panicked or was dropped).
    #[error("{op} {link}: the netlink worker for {netns} has stopped")]
    WorkerGone {
        op: &'static str,
        link: String,
        netns: String,
    },

    /// The planner could not make a host network match its config (missing physical device,
    /// a name already used by an interface of another kind, conflicting networks). Nothing
    /// was changed for that network.
    #[error("host network {network}, {link}: {reason}")]
    Blocked {
        network: String,
        link: String,
        reason: String,
    },

    /// A configured value could not be parsed (the config should have been validated first).
    #[error("host network {network}: {reason}")]
    Config { network: String, reason: String },
}

impl NetconfError {
    /// The errno behind this error, when the kernel gave one (e.g. `EOPNOTSUPP` for a link
    /// kind this kernel lacks).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetconfError::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Did the kernel say it does not know this kind of link (module missing: no 802.1Q,
    /// bonding, …)? Callers use this to report "unsupported here" rather than a failure.
    pub fn is_unsupported(&self) -> bool {
        self.raw_os_error() == Some(libc::EOPNOTSUPP)
    }
}

/// The errno inside an rtnetlink error, if it is a kernel NACK.
pub(crate) fn nl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// Wrap an rtnetlink error with the operation and the interface it was about.
pub(crate) fn nl_err(op: &'static str, link: &str, e: rtnetlink::Error) -> NetconfError {
    match nl_errno(&e) {
        Some(code) => NetconfError::Os {
            op,
            link: link.to_owned(),
            source: io::Error::from_raw_os_error(code),
        },
        None => NetconfError::Protocol {
            op,
            link: link.to_owned(),
            message: e.to_string(),
        },
    }
}

/// Check an interface name the kernel would accept, before sending it anywhere.
pub(crate) fn check_name(op: &'static str, name: &str) -> Result<(), NetconfError> {
    crate::config::check_ifname(name).map_err(|reason| NetconfError::InvalidName { op, reason })
}
