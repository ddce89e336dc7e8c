//! `debvisor-daemon`: the per-node daemon of a DebVisor KVM cluster and its CLI.

pub mod ceph;
pub mod cephmon;
pub mod cephobj;
pub mod config;
pub mod ctl;
pub mod ctl_ceph;
pub mod ctl_network;
pub mod ctl_vm;
pub mod daemon;
pub mod dnsmasq;
pub mod drain;
pub mod hostinfo;
pub mod hostnet;
pub mod hypervisor;
pub mod journal;
pub mod keepalive;
pub mod logging;
pub mod netobj;
pub mod notify;
pub mod registration;
pub mod services;
pub mod signals;
pub mod vmobj;
