//! `debvisor-objects`: the etcd schema, the store layer, the node lease, the generic reactor
//! and the cluster objects: Node and Network (with their planners), the Domain spec and its
//! planner; Ceph comes with its own issue.

#[macro_use]
mod macros;

pub mod domain;
pub mod domain_plan;
pub mod lease;
pub mod network;
pub mod network_plan;
pub mod node;
pub mod placement;
pub mod reactor;
pub mod schema;
pub mod store;

pub use reactor::{
    Action, Entry, KeyEntry, Kind, ObjectError, Reactor, ReactorOptions, ReconcileError, Reconciler,
};
pub use store::{Kv, Store, StoreError, StoreOptions, TxnBuilder};
