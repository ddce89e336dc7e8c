//! `debvisor-daemon`: the per-node daemon of a DebVisor KVM cluster and its CLI.
//!
//! The crate is arranged in rooms by role; an arrow may only point down this list's groups
//! (the CLI and the drivers never import the daemon's life or the reactors):
//!
//! - **the daemon's life** — [`daemon`] (runs the stages, the run loop, shutdown),
//!   [`guard`] (the process that releases the primary's duties if the daemon dies),
//!   [`stages`] (one file per startup stage), [`keepalive`], [`registration`],
//!   [`owned_keys`] (the node's own keys, repaired level-triggered), [`peers`] (round-trip
//!   times to peers), [`signals`],
//!   [`notify`], [`journal`], [`logging`];
//! - **reactors** — [`reactors`]: the host side of each object kind (domain, network, Ceph
//!   objects, Ceph monitor, drain);
//! - **the CLI** — [`ctl`]: `debvisorctl`, which talks to etcd only;
//! - **drivers** — [`hypervisor`] (libvirt), [`ceph`] (ceph/rbd CLI), [`dnsmasq`],
//!   [`services`] (supervised processes, systemd units), [`hostinfo`] (host facts),
//!   [`hostnet`] (the node's own networks through `netconf`), [`securefs`] (private
//!   directories and files no other local user can plant or redirect), [`statelock`] (one
//!   daemon per state directory): they import nothing
//!   above;
//! - **configuration** — [`config`]: `/etc/debvisor/debvisord.yaml`, shared by all.

pub mod config;

pub mod ceph;
pub mod dnsmasq;
pub mod fencer;
pub mod hostinfo;
pub mod hostnet;
pub mod hypervisor;
pub mod securefs;
pub mod services;
pub mod statelock;

pub mod ctl;

pub mod reactors;

pub mod config_sync;
pub mod daemon;
pub mod guard;
pub mod journal;
pub mod keepalive;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod owned_keys;
pub mod peers;
pub mod registration;
pub mod signals;
pub mod stages;
pub mod vmstats;
