//! Stage `host-networking`: the node's own networks (cluster, storage, upstream) through
//! rtnetlink, and the floating addresses on the primary.

use std::sync::Arc;

use debvisor_netconf::Netlink;

use super::{Done, StageResult};
use crate::config::Config;
use crate::hostnet;

/// Bring the host networks to the configured state; hands on the netlink handle.
pub async fn run(cfg: &Config, primary: bool) -> StageResult<Arc<Netlink>> {
    let netlink = Arc::new(Netlink::current().map_err(|e| e.to_string())?);
    let changes = hostnet::ensure_host(&*netlink, &cfg.networking, primary)
        .await
        .map_err(|e| e.to_string())?;
    let detail = format!(
        "{}; {} changes",
        hostnet::describe(&cfg.networking),
        changes.len()
    );
    Ok(Done::ok(netlink, detail))
}
