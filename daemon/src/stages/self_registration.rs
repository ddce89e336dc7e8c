//! Stage `self-registration`: claim the node name with a lease-bound `alive` key, write the
//! node's static keys (`daemon_state` = `init`), and start the task that keeps the lease
//! alive. Another live daemon holding the name stops this one.

use debvisor_objects::lease::{self, LeaseState};
use debvisor_objects::node::{DaemonState, NodeInfo};
use debvisor_objects::Store;
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Done, StageResult};
use crate::config::Config;
use crate::registration::{self, LocalState};

/// What registration hands on: the node's identity, its lease and what was registered.
pub struct Registered {
    /// The state dir's identity files.
    pub local: LocalState,
    /// The stable node id.
    pub node_id: String,
    /// The node lease.
    pub lease_id: i64,
    /// The lease keepers' view of the node lease, for the daemon's whole life.
    pub lease_state: watch::Receiver<LeaseState>,
    /// Where the lease keepers publish (a keeper started after re-registration too).
    pub lease_tx: watch::Sender<LeaseState>,
    /// Stops the lease keeper.
    pub lease_cancel: CancellationToken,
    /// The `info` written at registration.
    pub info: NodeInfo,
}

/// Register this node; hands on the lease and identity.
pub async fn run(cfg: &Config, store: &Store) -> StageResult<Registered> {
    let node = cfg.node_name();
    let local = LocalState::new(&cfg.paths.state_dir);
    let node_id = local.node_id().map_err(|e| e.to_string())?;
    let info = base_info(cfg, &node_id);
    let data = registration::data(
        cfg,
        info.clone(),
        DaemonState::Init,
        &node_id,
        &crate::hostinfo::now_rfc3339(),
    );
    let granted = Instant::now();
    let lease_id = registration::register(store, &local, &data, None)
        .await
        .map_err(|e| e.to_string())?;
    info!(node = %node, from = "stop", to = "init", reason = "registered", "daemon_state changed");
    let lease_cancel = CancellationToken::new();
    let (lease_tx, lease_state) = watch::channel(LeaseState::Lost { id: 0 });
    lease::spawn_keeper(
        store.clone(),
        node.to_string(),
        lease_id,
        cfg.keepalive.lease_ttl,
        granted,
        lease_tx.clone(),
        lease_cancel.clone(),
    );
    let detail = format!(
        "lease {lease_id:x} ttl {:?}, node_id {node_id}",
        cfg.keepalive.lease_ttl
    );
    Ok(Done::ok(
        Registered {
            local,
            node_id,
            lease_id,
            lease_state,
            lease_tx,
            lease_cancel,
            info,
        },
        detail,
    ))
}

/// The node's `info` before the hypervisor check adds libvirt's version.
fn base_info(cfg: &Config, node_id: &str) -> NodeInfo {
    let mut info = crate::keepalive::refresh_info(&NodeInfo::default(), None);
    info.version = env!("CARGO_PKG_VERSION").to_string();
    info.fqdn = cfg.node.fqdn.clone();
    info.rack = cfg.node.rack.clone();
    info.node_id = node_id.to_string();
    info.libvirt_uri = Some(cfg.hypervisor.published_uri().to_string());
    info.cluster_address = cfg
        .networking
        .host_networks
        .cluster
        .as_ref()
        .and_then(|c| c.addresses.first())
        .map(|a| a.split('/').next().unwrap_or(a).to_string());
    info
}
