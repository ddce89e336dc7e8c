//! `debvisor-netconf`: host networking of a DebVisor node (rtnetlink, sysctl) and its config.
//!
//! No etcd in here: the daemon reads the config and drives these calls.
//!
//! * [`plan()`] — pure: config + [`Observed`] host → [`Action`]s (unit-tested, no I/O).
//! * [`apply()`] / [`ensure()`] — run actions through a [`HostNet`], log and return
//!   [`Change`]s (what was, what is now).
//! * [`Netlink`] — the real [`HostNet`] over rtnetlink, optionally inside a network namespace.
//! * [`take_floating()`] / [`release_floating()`] — the primary's floating addresses, announced
//!   by gratuitous ARP / unsolicited neighbour advertisement.
//! * [`sysctl`] — kernel parameters.

pub mod announce;
mod apply;
pub mod config;
mod error;
mod host;
mod memory;
mod model;
mod netlink;
mod plan;
pub mod sysctl;

pub use apply::{apply, ensure, release_floating, take_floating, Change};
pub use config::*;
pub use error::NetconfError;
pub use host::{HostNet, Outcome};
pub use memory::MemoryHost;
pub use model::{
    AddrOwner, AddrState, DefaultRoute, LinkState, Observed, VlanInfo, VxlanSpec,
    FLOATING_ADDR_PROTO, GATEWAY_ADDR_PROTO, NODE_ADDR_PROTO,
};
pub use netlink::{Netlink, ANNOUNCE_REPEATS, DEFAULT_TIMEOUT};
pub use plan::{plan, top_link, vlan_name, Action};
