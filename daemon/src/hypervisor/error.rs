//! The hypervisor error: every failure names the operation, the domain (UUID, and name when
//! known) and carries libvirt's own message, so a VM's `status.error` is actionable as is.

use std::fmt;
use std::time::Duration;

use thiserror::Error;
use virt::error::{ErrorDomain, ErrorNumber};

use super::types::Op;

/// Which domain an operation concerned, as far as known when it failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainRef {
    /// Canonical UUID (absent for `list`).
    pub uuid: Option<String>,
    /// libvirt name, once looked up (or read from the XML being defined).
    pub name: Option<String>,
}

impl DomainRef {
    /// A domain known by UUID only (yet).
    pub fn uuid(uuid: &str) -> DomainRef {
        DomainRef {
            uuid: Some(uuid.to_string()),
            name: None,
        }
    }

    /// No particular domain (`list`, `stats` of all).
    pub fn none() -> DomainRef {
        DomainRef::default()
    }
}

/// Renders as ` domain 'name' (uuid)`, with a leading space, or nothing.
impl fmt::Display for DomainRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name, &self.uuid) {
            (Some(n), Some(u)) => write!(f, " domain '{n}' ({u})"),
            (Some(n), None) => write!(f, " domain '{n}'"),
            (None, Some(u)) => write!(f, " domain {u}"),
            (None, None) => Ok(()),
        }
    }
}

/// A coarse class of failure, so callers can branch without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No such domain.
    NotFound,
    /// The definition was refused (XML, schema, unsupported configuration).
    InvalidDefinition,
    /// Not possible in the domain's current state (libvirt `operation invalid`).
    InvalidOperation,
    /// The driver does not support it (e.g. migration with the test driver).
    Unsupported,
    /// The connection to libvirtd failed or broke; the next call reconnects.
    Connection,
    /// libvirt did not answer in time.
    Timeout,
    /// The input was refused before libvirt was called.
    InvalidInput,
    /// Anything else libvirt reported.
    Other,
}

impl ErrorKind {
    /// Classify a libvirt error.
    pub fn of(e: &virt::error::Error) -> ErrorKind {
        match e.code() {
            ErrorNumber::NoDomain => ErrorKind::NotFound,
            ErrorNumber::XmlError
            | ErrorNumber::XmlDetail
            | ErrorNumber::XmlInvalidSchema
            | ErrorNumber::ConfigUnsupported
            | ErrorNumber::OsType
            | ErrorNumber::DomExist => ErrorKind::InvalidDefinition,
            ErrorNumber::OperationInvalid => ErrorKind::InvalidOperation,
            ErrorNumber::NoSupport | ErrorNumber::ArgumentUnsupported => ErrorKind::Unsupported,
            ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::Rpc
            | ErrorNumber::AuthFailed
            | ErrorNumber::AuthCancelled
            | ErrorNumber::AuthUnavailable => ErrorKind::Connection,
            _ if matches!(e.domain(), ErrorDomain::Rpc | ErrorDomain::Remote) => {
                ErrorKind::Connection
            }
            _ => ErrorKind::Other,
        }
    }
}

/// Why a hypervisor call failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HypervisorError {
    /// The connection itself failed (`probe`: libvirtd unreachable, refused…).
    #[error("libvirt {uri}: {message}")]
    Libvirt {
        /// Connection URI.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// `probe` got no answer in time.
    #[error("libvirt {uri}: no answer within {timeout:?}")]
    Timeout {
        /// Connection URI.
        uri: String,
        /// The limit.
        timeout: Duration,
    },
    /// A domain operation failed in libvirt.
    #[error("libvirt {uri}: {op}{domain}: {message}")]
    Domain {
        /// Connection URI.
        uri: String,
        /// What was attempted.
        op: Op,
        /// On which domain.
        domain: DomainRef,
        /// Coarse class.
        kind: ErrorKind,
        /// libvirt's message (or ours, for checks done here).
        message: String,
    },
    /// A domain operation got no answer in time. The libvirt call may still complete in the
    /// background: re-read the domain before acting on the outcome.
    #[error("libvirt {uri}: {op}{domain}: no answer within {timeout:?}")]
    DomainTimeout {
        /// Connection URI.
        uri: String,
        /// What was attempted.
        op: Op,
        /// On which domain.
        domain: DomainRef,
        /// The limit.
        timeout: Duration,
    },
    /// A UUID argument is not in canonical form; libvirt was not called.
    #[error(
        "{op}: invalid domain UUID {value:?}: expected 36 characters, lower-case hex 8-4-4-4-12"
    )]
    InvalidUuid {
        /// What was attempted.
        op: Op,
        /// The value given.
        value: String,
    },
    /// A domain name is not acceptable; libvirt was not called.
    #[error("{op}: invalid domain name {value:?}: 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.', not starting with '-' or '.'")]
    InvalidName {
        /// What was attempted.
        op: Op,
        /// The value given.
        value: String,
    },
    /// The XML was refused before libvirt was called (not well-formed, no UUID…).
    #[error("{op}: invalid domain XML: {message}")]
    InvalidXml {
        /// What was attempted.
        op: Op,
        /// Why.
        message: String,
    },
}

impl HypervisorError {
    /// The coarse class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HypervisorError::Libvirt { .. } => ErrorKind::Connection,
            HypervisorError::Timeout { .. } | HypervisorError::DomainTimeout { .. } => {
                ErrorKind::Timeout
            }
            HypervisorError::Domain { kind, .. } => *kind,
            HypervisorError::InvalidUuid { .. }
            | HypervisorError::InvalidName { .. }
            | HypervisorError::InvalidXml { .. } => ErrorKind::InvalidInput,
        }
    }

    /// Is this "no such domain"?
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// The operation that failed, when the error is about one.
    pub fn op(&self) -> Option<Op> {
        match self {
            HypervisorError::Domain { op, .. }
            | HypervisorError::DomainTimeout { op, .. }
            | HypervisorError::InvalidUuid { op, .. }
            | HypervisorError::InvalidName { op, .. }
            | HypervisorError::InvalidXml { op, .. } => Some(*op),
            HypervisorError::Libvirt { .. } | HypervisorError::Timeout { .. } => None,
        }
    }
}
