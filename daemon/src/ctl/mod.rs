//! `debvisorctl`: operate a DebVisor cluster through etcd only. Nothing here talks to a
//! daemon, libvirt or Ceph, and nothing imports the daemon's life, stages or reactors: the
//! CLI shares the daemon's configuration and the `objects` schema and parsers, no more.
//!
//! - [`node`]: `status`, `node show|flush|unflush`;
//! - [`vm`]: `vm …` (define, state changes, migration, undefine);
//! - [`network`]: `network …` (client networks, DHCP reservations, ACLs);
//! - [`ceph`]: `ceph …` (pools, volumes, snapshots, templates, status);
//! - [`output`]: tables and the `--output` choice; [`wait`]: `--wait`, following keys;
//! - [`client`]: where the CLI finds etcd (flags, `DEBVISORCTL_*`, `ctl.yaml`, a node's
//!   config); [`errors`]: one-line errors with the likely cause.

pub mod ceph;
pub mod client;
pub mod cluster;
pub mod config_sync;
pub mod errors;
pub mod network;
pub mod node;
pub mod output;
pub mod vm;
pub mod wait;

use debvisor_objects::{Store, StoreOptions};

use crate::config::Config;
pub use errors::etcd_error;

pub use node::{check_node_name, node_json, node_text, nodes, status_table, NodeRow};
pub use output::{table, Output};
pub use wait::{parse_duration, Failure, WaitArgs};

/// Connect once with a daemon configuration's store settings.
pub async fn connect(cfg: &Config) -> Result<Store, String> {
    connect_with(&cfg.store_options()).await
}

/// Connect once (no retry: an operator wants the error now); the error is one line with
/// the likely cause (the full chain with `-v`).
pub async fn connect_with(opts: &StoreOptions) -> Result<Store, String> {
    let endpoints = opts.endpoints.join(",");
    let store = Store::connect(opts)
        .await
        .map_err(|e| errors::unreachable(&endpoints, &e, errors::verbose()))?;
    store
        .probe()
        .await
        .map_err(|e| errors::unreachable(&endpoints, &e, errors::verbose()))?;
    Ok(store)
}
