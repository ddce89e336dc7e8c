//! The hypervisor driver: the effectful side of the Domain object, and the keepalive's
//! libvirt check.
//!
//! - [`Hypervisor`]: the small async trait the Domain executor drives. Every operation is
//!   idempotent where that makes sense (`define` replaces by UUID, `undefine`, `shutdown`
//!   and `destroy` of an absent domain are [`Outcome::Unchanged`], `start` of an active one
//!   too), validates UUIDs and names before libvirt is called, and fails with a
//!   [`HypervisorError`] naming the operation, the domain and libvirt's message.
//! - [`Libvirt`]: the real implementation over `virt` 0.4.3 (blocking calls on threads of
//!   their own under timeouts, one shared connection that is abandoned when it times out or
//!   breaks and closed only after its last call, calls refused while libvirt does not answer
//!   until a probe does; lifecycle events through the raw event API on their own threads and
//!   connections). Also [`Libvirt::probe`] for the keepalive. The `conn` module explains why
//!   call connections run without libvirt's keepalive.
//! - [`MemoryHypervisor`]: an in-memory implementation, only for unit-testing the Domain
//!   planner and state machine; real behaviour is tested against libvirt itself.

mod conn;
mod error;
mod events;
mod libvirt;
mod memory;
mod stats;
mod types;
mod xml;

use std::future::Future;

use tokio::sync::mpsc;

pub use error::{DomainRef, ErrorKind, HypervisorError};
pub use events::{ensure_event_loop, EVENT_QUEUE};
pub use libvirt::{
    qemu_pid, Libvirt, MAX_CONCURRENT_CALLS, MAX_CONCURRENT_PROBES, MIN_SLOW_CALL_TIMEOUT,
    PROBE_TIMEOUT, QEMU_SYSTEM_RUN_DIR,
};
pub use memory::MemoryHypervisor;
pub use types::{
    DomainEvent, DomainInfo, DomainState, DomainStats, Lifecycle, MigrateOptions, Op, Outcome,
    StopReason,
};
pub use xml::{check_name, check_uuid, parse_domain_xml, XmlDomain};

/// What a libvirt probe found (the keepalive's health check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// libvirt library version, `major.minor.micro`.
    pub version: String,
    /// Running domains.
    pub running: u32,
    /// Defined, not running domains.
    pub defined: u32,
}

/// Domain operations on one host, as the Domain object needs them.
///
/// UUIDs are canonical lower-case strings (see [`check_uuid`]); anything else is refused
/// with [`HypervisorError::InvalidUuid`] before the hypervisor is called. Futures are `Send`
/// so the daemon can drive them from any tokio task.
pub trait Hypervisor: Send + Sync {
    /// Every domain on this host, ours and foreign.
    fn list(&self) -> impl Future<Output = Result<Vec<DomainInfo>, HypervisorError>> + Send;

    /// One domain, or `None` if no domain has this UUID.
    fn get(
        &self,
        uuid: &str,
    ) -> impl Future<Output = Result<Option<DomainInfo>, HypervisorError>> + Send;

    /// Define a persistent domain from `xml`, replacing the definition with the same UUID
    /// (a running domain picks it up at its next start). The XML must carry a `<uuid>` and a
    /// valid `<name>`. Returns the UUID.
    fn define(&self, xml: &str) -> impl Future<Output = Result<String, HypervisorError>> + Send;

    /// Remove the persistent definition. Absent or transient: `Unchanged`. A running domain
    /// keeps running (as a transient one) until it is stopped.
    fn undefine(&self, uuid: &str)
        -> impl Future<Output = Result<Outcome, HypervisorError>> + Send;

    /// Boot a defined domain. Already active: `Unchanged`. Absent: a `NotFound` error.
    fn start(&self, uuid: &str) -> impl Future<Output = Result<Outcome, HypervisorError>> + Send;

    /// Ask the guest to power off (ACPI power button). It may ignore it; the caller
    /// destroys after its timeout. Not active or absent: `Unchanged`.
    fn shutdown(&self, uuid: &str)
        -> impl Future<Output = Result<Outcome, HypervisorError>> + Send;

    /// Power off now. Not active or absent: `Unchanged`.
    fn destroy(&self, uuid: &str) -> impl Future<Output = Result<Outcome, HypervisorError>> + Send;

    /// The domain's current XML.
    fn xml(&self, uuid: &str) -> impl Future<Output = Result<String, HypervisorError>> + Send;

    /// Counters of one domain.
    fn stats(
        &self,
        uuid: &str,
    ) -> impl Future<Output = Result<DomainStats, HypervisorError>> + Send;

    /// Counters of every domain, in as few hypervisor calls as possible (keepalive).
    fn all_stats(&self) -> impl Future<Output = Result<Vec<DomainStats>, HypervisorError>> + Send;

    /// Migrate a running domain peer-to-peer to `dest_uri` (persistent there, undefined
    /// here): `VIR_MIGRATE_PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE`, plus `LIVE` if asked.
    fn migrate(
        &self,
        uuid: &str,
        dest_uri: &str,
        opts: MigrateOptions,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Subscribe to lifecycle events of all domains. Dropping the receiver ends the
    /// subscription.
    fn events(
        &self,
    ) -> impl Future<Output = Result<mpsc::Receiver<DomainEvent>, HypervisorError>> + Send;
}
