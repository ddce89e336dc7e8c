//! Stage `host-networking`: the node's own networks (cluster, storage, upstream) through
//! rtnetlink, and the floating addresses on the primary. With `networking.require_netns`
//! it first makes sure the daemon runs in that network namespace, and fails otherwise
//! before anything touches the network.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use debvisor_netconf::Netlink;

use super::{Done, StageResult};
use crate::config::Config;
use crate::hostnet;

/// Bring the host networks to the configured state; hands on the netlink handle.
pub async fn run(cfg: &Config, primary: bool) -> StageResult<Arc<Netlink>> {
    if let Some(ns) = &cfg.networking.require_netns {
        check_netns(ns)?;
    }
    let netlink = Arc::new(Netlink::current().map_err(|e| e.to_string())?);
    let changes = hostnet::ensure_host(&*netlink, &cfg.networking, primary)
        .await
        .map_err(|e| e.to_string())?;
    let mut detail = format!(
        "{}; {} changes",
        hostnet::describe(&cfg.networking),
        changes.len()
    );
    if let Some(ns) = &cfg.networking.require_netns {
        detail.push_str(&format!("; in network namespace {ns}"));
    }
    Ok(Done::ok(netlink, detail))
}

/// Is this process in network namespace `/run/netns/<name>`? An error names the namespace
/// and how to start the daemon in it.
fn check_netns(name: &str) -> Result<(), String> {
    let path = format!("/run/netns/{name}");
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let ours = id("/proc/self/ns/net").map_err(|e| format!("/proc/self/ns/net: {e}"))?;
    match id(&path) {
        Ok(want) if want == ours => Ok(()),
        Ok(_) => Err(format!(
            "networking.require_netns: this daemon must run inside network namespace {name} but runs \
             outside it; refusing to create bridges, VXLANs, dnsmasq or firewall rules here \
             (start it with `ip netns exec {name} debvisord …`, as scripts/dev-run.sh does)"
        )),
        Err(e) => Err(format!(
            "networking.require_netns: network namespace {name} does not exist ({path}: {e}); \
             refusing to touch this one (create it with `ip netns add {name}`, as \
             scripts/dev-run.sh does)"
        )),
    }
}
