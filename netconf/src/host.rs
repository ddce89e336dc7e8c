//! The effectful side: a small trait over the host's network stack.
//!
//! Every `ensure_*` is idempotent: when the host already is as asked it returns
//! [`Outcome::Unchanged`] and does nothing, so callers can run them on every resync tick.
//! [`crate::Netlink`] implements it with rtnetlink; [`crate::MemoryHost`] in memory for tests
//! of planners and state machines.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{AddrOwner, DefaultRoute, Observed, VxlanSpec};
use crate::NetconfError;

/// What an idempotent operation did: nothing, or a change from the given previous value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// The host already was as asked.
    Unchanged,
    /// Something was changed; the value is what it was before.
    Changed(T),
}

impl<T> Outcome<T> {
    /// Was anything changed?
    pub fn changed(&self) -> bool {
        matches!(self, Outcome::Changed(_))
    }
}

/// Host networking operations, all idempotent and all naming the interface in their errors.
///
/// Futures are `Send` so the daemon can drive them from any tokio task.
pub trait HostNet: Send + Sync {
    /// Snapshot of links, addresses and default routes.
    fn observe(&self) -> impl Future<Output = Result<Observed, NetconfError>> + Send;

    /// A bridge called `name` exists (created down if missing). An existing link of another
    /// kind with that name is a [`NetconfError::Conflict`].
    fn ensure_bridge(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// An 802.1Q link `name` with id `id` on `parent` exists (created down if missing).
    /// On a kernel without 8021q this fails with an errno of `EOPNOTSUPP`
    /// ([`NetconfError::is_unsupported`]).
    fn ensure_vlan(
        &self,
        name: &str,
        parent: &str,
        id: u16,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// A VXLAN link as `spec` exists (created down if missing). An existing one with other
    /// attributes is a [`NetconfError::Conflict`]: VNI, port and endpoint cannot be changed
    /// in place, the caller decides whether to delete and recreate it.
    fn ensure_vxlan(
        &self,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// `link` is administratively up.
    fn ensure_up(
        &self,
        link: &str,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// `link` has MTU `mtu`; the previous MTU is returned when changed.
    fn ensure_mtu(
        &self,
        link: &str,
        mtu: u32,
    ) -> impl Future<Output = Result<Outcome<u32>, NetconfError>> + Send;

    /// `link` is enslaved to `master`; the previous master (if any) is returned when changed.
    fn ensure_master(
        &self,
        link: &str,
        master: &str,
    ) -> impl Future<Output = Result<Outcome<Option<String>>, NetconfError>> + Send;

    /// `addr` is on `link`, marked with `owner` (IPv6 addresses skip DAD: `nodad`).
    fn ensure_address(
        &self,
        link: &str,
        addr: IpNet,
        owner: AddrOwner,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// `addr` is not on `link` (whoever added it: ownership is the caller's decision).
    fn remove_address(
        &self,
        link: &str,
        addr: IpNet,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// The main table's default route of `gateway`'s family goes via `gateway` on `link`
    /// (replacing the one with the kernel's default metric); returns the replaced route.
    fn ensure_default_route(
        &self,
        link: &str,
        gateway: IpAddr,
    ) -> impl Future<Output = Result<Outcome<Option<DefaultRoute>>, NetconfError>> + Send;

    /// `link` does not exist.
    fn delete_link(
        &self,
        link: &str,
    ) -> impl Future<Output = Result<Outcome<()>, NetconfError>> + Send;

    /// Tell the segment of `link` that `addr` is here now: gratuitous ARP (IPv4) or an
    /// unsolicited neighbour advertisement (IPv6), so peers update their caches at once
    /// instead of after their entries expire. The first announcement is sent before this
    /// returns (its failure is the error); implementations may repeat it in the background
    /// while the address stays on the link ([`crate::Netlink`] does, see
    /// [`crate::ANNOUNCE_REPEATS`]), since a link that has just come up drops the first frames.
    fn announce(
        &self,
        link: &str,
        addr: IpNet,
    ) -> impl Future<Output = Result<(), NetconfError>> + Send;
}
