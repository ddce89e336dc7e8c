//! `debvisorctl`: operate a DebVisor cluster through etcd only. Nothing here talks to a
//! daemon, libvirt or Ceph, and nothing imports the daemon's life, stages or reactors: the
//! CLI shares the daemon's configuration and the `objects` schema and parsers, no more.
//!
//! - [`node`]: `status`, `node show|flush|unflush`;
//! - [`vm`]: `vm …` (define, state changes, migration, undefine);
//! - [`network`]: `network …` (client networks, DHCP reservations, ACLs);
//! - [`ceph`]: `ceph …` (pools, volumes, snapshots, templates, status);
//! - [`output`]: tables and the `--output` choice; [`wait`]: `--wait`, following keys.

pub mod ceph;
pub mod network;
pub mod node;
pub mod output;
pub mod vm;
pub mod wait;

use debvisor_objects::Store;

use crate::config::Config;

pub use node::{check_node_name, node_json, node_text, nodes, status_table, NodeRow};
pub use output::{table, Output};
pub use wait::{parse_duration, Failure, WaitArgs};

/// Connect once (no retry: an operator wants the error now).
pub async fn connect(cfg: &Config) -> Result<Store, String> {
    let store = Store::connect(&cfg.store_options())
        .await
        .map_err(|e| e.to_string())?;
    store.probe().await.map_err(|e| {
        format!(
            "cannot reach etcd at {}: {e}",
            cfg.store.endpoints.join(",")
        )
    })?;
    Ok(store)
}
