//! Reactors: the host side of each object kind. Each one executes the pure plans of
//! `debvisor_objects` against the host through the drivers (libvirt, rtnetlink, nft, Ceph,
//! dnsmasq) and reports back into the keys its node owns.
//!
//! - [`domain`]: VMs on this node (lock, start/stop, migration, crash restarts, stats);
//! - [`network`]: client networks (bridges, VXLAN, gateways, dnsmasq, firewall chains);
//! - [`ceph_objects`]: Ceph pools, volumes and snapshots (primary only);
//! - [`ceph_monitor`]: Ceph health and observed state on its own timer;
//! - [`drain`]: the node's `domain_state` flush/unflush;
//! - [`removals`]: the evidence a removal from etcd needs before a guest is destroyed;
//! - [`self_fence`]: guests stopped a margin before the node's lease could expire;
//! - [`fence_evidence`]: the evidence a node needs before it stops its guests for
//!   `daemon_state = fenced`;
//! - [`role`]: whether this node is the primary now, followed by every primary-only duty;
//! - [`election`]: the primary-coordinator election and the `coordinator_state` machine;
//! - [`node_status`]: the primary's OK/DEGRADED/DOWN verdict on every node;
//! - [`duties`]: the primary-only duties that follow the role (floating addresses, gateways
//!   and dnsmasq, Ceph).

pub mod ceph_monitor;
pub mod ceph_objects;
pub mod domain;
pub mod drain;
pub mod duties;
pub mod election;
pub mod fence_evidence;
pub mod fencing;
pub mod network;
pub mod node_status;
pub mod removals;
pub mod role;
pub mod self_fence;
