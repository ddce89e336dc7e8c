//! Host-networking stage until the rtnetlink driver lands: check that every configured
//! device exists in this network namespace and say what is configured. Nothing is changed.

use debvisor_netconf::{HostNetwork, NetworkingConfig};

/// Verify the configured host networks; `Err` names the missing device and the network.
pub fn check(cfg: &NetworkingConfig) -> Result<String, String> {
    let nets: [(&str, &Option<HostNetwork>); 3] = [
        ("cluster", &cfg.host_networks.cluster),
        ("storage", &cfg.host_networks.storage),
        ("upstream", &cfg.host_networks.upstream),
    ];
    let mut seen = Vec::new();
    for (name, net) in nets {
        let Some(n) = net else { continue };
        if !std::path::Path::new("/sys/class/net")
            .join(&n.device)
            .exists()
        {
            return Err(format!(
                "networking.host_networks.{name}.device: interface {:?} does not exist",
                n.device
            ));
        }
        seen.push(format!("{name}={}", n.device));
    }
    Ok(if seen.is_empty() {
        "no host networks configured".to_string()
    } else {
        format!("devices present: {} (addresses/bridges are applied by the netconf driver, not yet built)", seen.join(" "))
    })
}
