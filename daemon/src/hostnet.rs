//! Host networking of this node: the configured host networks (cluster, storage, upstream)
//! made real through netconf, the primary's floating addresses, and the facts client
//! networks build on (VXLAN underlay, MTU, cluster prefixes for the firewall).

use debvisor_netconf::{
    ensure, release_floating, take_floating, top_link, Change, HostNet, HostNetwork, NetconfError,
    NetworkingConfig,
};
use debvisor_objects::network_plan::HostContext;

/// The host networks by name, in a fixed order.
pub fn named(cfg: &NetworkingConfig) -> Vec<(&'static str, &HostNetwork)> {
    [
        ("cluster", cfg.host_networks.cluster.as_ref()),
        ("storage", cfg.host_networks.storage.as_ref()),
        ("upstream", cfg.host_networks.upstream.as_ref()),
    ]
    .into_iter()
    .filter_map(|(n, h)| h.map(|h| (n, h)))
    .collect()
}

/// Make the host networks match the config and hold (or release) the floating addresses.
/// Returns every change made; an empty list means the host already matched.
pub async fn ensure_host(
    host: &impl HostNet,
    cfg: &NetworkingConfig,
    primary: bool,
) -> Result<Vec<Change>, NetconfError> {
    if named(cfg).is_empty() {
        return Ok(Vec::new());
    }
    let mut changes = ensure(host, &cfg.host_networks).await?;
    for (name, net) in named(cfg) {
        if net.floating.is_none() {
            continue;
        }
        let c = if primary {
            take_floating(host, name, net).await?
        } else {
            release_floating(host, name, net).await?
        };
        changes.extend(c);
    }
    Ok(changes)
}

/// What client networks need from this node's host networking.
pub fn host_context(cfg: &NetworkingConfig, primary: bool) -> HostContext {
    let cluster = cfg.host_networks.cluster.as_ref();
    let local = cluster.and_then(|c| {
        let cidrs = c.cidrs();
        cidrs
            .iter()
            .find(|a| a.addr().is_ipv4())
            .or(cidrs.first())
            .map(|a| a.addr())
    });
    HostContext {
        primary,
        vxlan_dev: cluster.map(top_link),
        vxlan_local: local,
        underlay_mtu: cluster.and_then(|c| c.mtu).map(u32::from).unwrap_or(1500),
        vlan_dev: cluster.map(|c| c.device.clone()),
    }
}

/// The cluster network prefixes (the firewall lets cluster services in from them).
pub fn cluster_cidrs(cfg: &NetworkingConfig) -> Vec<debvisor_firewall::Cidr> {
    cfg.host_networks
        .cluster
        .as_ref()
        .map(|c| {
            c.cidrs()
                .iter()
                .filter_map(|a| debvisor_firewall::Cidr::new(a.addr(), a.prefix_len()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A short description of the configured host networks for the stage log line.
pub fn describe(cfg: &NetworkingConfig) -> String {
    let n = named(cfg);
    if n.is_empty() {
        return "no host networks configured".into();
    }
    n.iter()
        .map(|(name, h)| format!("{name}={}", top_link(h)))
        .collect::<Vec<_>>()
        .join(" ")
}
