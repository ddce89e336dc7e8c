//! `debvisor-objects`: the etcd schema, the store layer, the node lease, the generic reactor
//! and the cluster objects: Node and Network (with their planners), the Domain spec and its
//! planner with the domain-XML policy nodes apply before defining a VM (`xml_policy`), and
//! Ceph's desired state (pools, volumes, snapshots, templates) with its planner.

#[macro_use]
mod macros;

pub mod ceph;
pub mod ceph_plan;
pub mod cluster_config;
pub mod domain;
pub mod domain_plan;
pub mod drain;
pub mod fencing;
pub mod histogram;
pub mod lease;
pub mod network;
pub mod network_plan;
pub mod node;
pub mod placement;
pub mod reactor;
pub mod recovery;
pub mod schema;
pub mod store;
pub mod witness;
pub mod xml_policy;

pub use reactor::{
    Action, Entry, KeyEntry, Kind, ObjectError, Reactor, ReactorOptions, ReconcileError, Reconciler,
};
pub use store::{Kv, Store, StoreError, StoreOptions, TxnBuilder};
