//! `networking:` section of `debvisord.yaml`: host networks and sysctl settings.
//!
//! The types are plain data (strings as written by the operator); [`NetworkingConfig::validate`]
//! checks them and [`parse_cidr`] parses the address strings for the code that applies them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

/// `networking:` — host networking of this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkingConfig {
    /// The node's own networks; each entry is optional.
    pub host_networks: HostNetworks,
    /// Kernel settings applied at startup.
    pub sysctl: SysctlConfig,
    /// The network namespace (`/run/netns/<name>`, as `ip netns add` makes it) the daemon
    /// must run in: started anywhere else it refuses to touch the network. The developer
    /// configuration sets it, so that its bridges, VXLANs, dnsmasq and firewall never land
    /// on the host. Unset: wherever it is started.
    pub require_netns: Option<String>,
}

/// `networking.host_networks:` — the node's cluster, storage and upstream networks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostNetworks {
    /// Network the daemons and etcd talk over.
    pub cluster: Option<HostNetwork>,
    /// Network of the storage (Ceph) traffic.
    pub storage: Option<HostNetwork>,
    /// Network towards the outside world (client network uplinks, floating gateway).
    pub upstream: Option<HostNetwork>,
}

impl HostNetworks {
    /// The configured entries with their names (`cluster`, `storage`, `upstream`).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &HostNetwork)> {
        [
            ("cluster", &self.cluster),
            ("storage", &self.storage),
            ("upstream", &self.upstream),
        ]
        .into_iter()
        .filter_map(|(n, h)| h.as_ref().map(|h| (n, h)))
    }
}

/// One host network: an underlying device, optionally a VLAN on it and a bridge over it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HostNetwork {
    /// Underlying interface (`eth0`, `bond0`); required.
    pub device: String,
    /// 802.1Q VLAN id on `device` (1..=4094).
    pub vlan: Option<u16>,
    /// Bridge created on top of the device (or VLAN); addresses go on it when set.
    pub bridge: Option<String>,
    /// MTU (576..=9216); unset leaves the device's MTU alone.
    pub mtu: Option<u16>,
    /// Addresses in CIDR notation (`10.0.0.11/24`, `fd00::11/64`).
    pub addresses: Vec<String>,
    /// Default gateway; must lie inside one of `addresses`.
    pub gateway: Option<String>,
    /// Floating address (CIDR) held by the primary coordinator.
    pub floating: Option<String>,
}

/// `networking.sysctl:` — kernel settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SysctlConfig {
    /// Apply sysctl settings at all.
    pub apply: bool,
    /// Enable IPv4/IPv6 forwarding (needed for routed client networks).
    pub forwarding: bool,
    /// Apply the hardening set (no redirects, no source routing, rp_filter, …).
    pub hardening: bool,
    /// Additional `key: value` settings (`net.ipv4.conf.all.rp_filter: 1`).
    #[serde(deserialize_with = "scalar_map")]
    pub extra: BTreeMap<String, String>,
}

impl Default for SysctlConfig {
    fn default() -> Self {
        SysctlConfig {
            apply: true,
            forwarding: true,
            hardening: true,
            extra: BTreeMap::new(),
        }
    }
}

/// Accept `key: 1` as well as `key: "1"` for sysctl values.
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Scalar(String);
    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string or an integer")
                }
                fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_owned()))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let m = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// Parse an address with its prefix length (`10.0.0.11/24`, `fd00::1/64`; a bare address is
/// refused) into an [`IpNet`] that keeps the host bits: the node's own address, on its network.
///
/// A helper rather than `str::parse::<IpNet>()` because ipnet's parse error ("invalid IP address
/// syntax") names neither the input nor the expected form, and validation reports this message
/// to the operator next to the field.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse().map_err(|_| {
        format!(
            "{s:?} is not an address/prefix (e.g. 10.0.0.1/24 or fd00::1/64; \
             the prefix length is at most 32 for IPv4, 128 for IPv6)"
        )
    })
}

/// Check a Linux interface name: 1..=15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("must not be empty".into())
    } else if name.len() > 15 {
        Err(format!("{name:?} is longer than 15 characters"))
    } else if name == "." || name == ".." {
        Err(format!("{name:?} is not a valid interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Err(format!("{name:?} contains '/', ':' or whitespace"))
    } else {
        Ok(())
    }
}

/// Check a sysctl key: charset `[a-z0-9_.-]`, below `net.`, `kernel.` or `vm.`, no empty part.
pub fn check_sysctl_key(key: &str) -> Result<(), String> {
    let charset = key
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if !charset || key.split('.').any(str::is_empty) {
        Err(format!(
            "{key:?} is not a sysctl key (a-z, 0-9, '_', '-', dot-separated)"
        ))
    } else if !["net.", "kernel.", "vm."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        Err(format!("{key:?} must start with net., kernel. or vm."))
    } else {
        Ok(())
    }
}

impl NetworkingConfig {
    /// Check every field; returns `(field path, reason)` pairs, `path` being this section's path.
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, net) in self.host_networks.iter() {
            net.validate(&format!("{path}.host_networks.{name}"), &mut out);
        }
        if let Some(ns) = &self.require_netns {
            if ns.is_empty()
                || ns == "."
                || ns == ".."
                || ns.len() > 255
                || ns.contains(['/', '\0'])
                || ns.contains(char::is_whitespace)
            {
                out.push((
                    format!("{path}.require_netns"),
                    format!(
                        "{ns:?} is not a network namespace name (a file name under /run/netns)"
                    ),
                ));
            }
        }
        for (k, v) in &self.sysctl.extra {
            let p = format!("{path}.sysctl.extra.{k}");
            if let Err(e) = check_sysctl_key(k) {
                out.push((p.clone(), e));
            }
            if v.trim().is_empty() || v.contains(['\n', '\r']) {
                out.push((p, format!("{v:?} is not a single-line, non-empty value")));
            }
        }
        out
    }
}

impl HostNetwork {
    /// The parsed `addresses` (invalid entries skipped; see [`NetworkingConfig::validate`]).
    pub fn cidrs(&self) -> Vec<IpNet> {
        self.addresses
            .iter()
            .filter_map(|a| parse_cidr(a).ok())
            .collect()
    }

    fn validate(&self, path: &str, out: &mut Vec<(String, String)>) {
        let mut push = |field: &str, reason: String| out.push((format!("{path}.{field}"), reason));
        if let Err(e) = check_ifname(&self.device) {
            push("device", e);
        }
        if let Some(v) = self.vlan.filter(|v| !(1..=4094).contains(v)) {
            push("vlan", format!("must be between 1 and 4094, got {v}"));
        }
        if let Some(Err(e)) = self.bridge.as_deref().map(check_ifname) {
            push("bridge", e);
        }
        if let Some(m) = self.mtu.filter(|m| !(576..=9216).contains(m)) {
            push("mtu", format!("must be between 576 and 9216, got {m}"));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if let Err(e) = parse_cidr(a) {
                push(&format!("addresses[{i}]"), e);
            }
        }
        if let Some(g) = &self.gateway {
            match g.parse::<IpAddr>() {
                Err(_) => push("gateway", format!("{g:?} is not an IP address")),
                Ok(ip) if !self.cidrs().iter().any(|c| c.contains(&ip)) => push(
                    "gateway",
                    format!(
                        "{g} is not inside any network of addresses {:?}",
                        self.addresses
                    ),
                ),
                Ok(_) => {}
            }
        }
        if let Some(Err(e)) = self.floating.as_deref().map(parse_cidr) {
            push("floating", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> HostNetwork {
        HostNetwork {
            device: "eth0".into(),
            addresses: vec!["10.0.0.11/24".into(), "fd00::11/64".into()],
            gateway: Some("10.0.0.1".into()),
            ..Default::default()
        }
    }

    fn issues(n: HostNetwork) -> Vec<(String, String)> {
        let mut c = NetworkingConfig::default();
        c.host_networks.cluster = Some(n);
        c.validate("networking")
    }

    #[test]
    fn valid_network_passes() {
        assert!(issues(net()).is_empty());
        assert!(NetworkingConfig::default().validate("n").is_empty());
    }

    #[test]
    fn cidr_parsing_and_containment() {
        let c: IpNet = "10.0.0.11/24".parse().unwrap();
        assert!(c.contains(&"10.0.0.254".parse::<IpAddr>().unwrap()));
        assert!(!c.contains(&"10.0.1.1".parse::<IpAddr>().unwrap()));
        assert!(!c.contains(&"fd00::1".parse::<IpAddr>().unwrap()));
        let z: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(z.contains(&"1.2.3.4".parse::<IpAddr>().unwrap()));
        let v6: IpNet = "fd00::11/64".parse().unwrap();
        assert!(v6.contains(&"fd00::1".parse::<IpAddr>().unwrap()));
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::/129",
            "x/24",
            "10.0.0.1/-1",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
            assert!(parse_cidr(bad).is_err_and(|e| e.contains(&format!("{bad:?}"))));
        }
        // The node's own address: host bits are kept, not truncated to the network.
        assert_eq!(
            parse_cidr("10.0.0.11/24").unwrap().to_string(),
            "10.0.0.11/24"
        );
    }

    #[test]
    fn bad_fields_are_reported_with_paths() {
        let n = HostNetwork {
            device: "averyveryverylongname".into(),
            vlan: Some(5000),
            bridge: Some("br/0".into()),
            mtu: Some(100),
            addresses: vec!["10.0.0.300/24".into()],
            gateway: Some("192.168.1.1".into()),
            floating: Some("nope".into()),
        };
        let paths: Vec<String> = issues(n).into_iter().map(|(p, _)| p).collect();
        let want = [
            "device",
            "vlan",
            "bridge",
            "mtu",
            "addresses[0]",
            "gateway",
            "floating",
        ];
        for w in want {
            assert!(
                paths.contains(&format!("networking.host_networks.cluster.{w}")),
                "{w}: {paths:?}"
            );
        }
    }

    #[test]
    fn interface_names() {
        assert!(check_ifname("eth0.100").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", "0123456789abcdef"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sysctl_keys() {
        assert!(check_sysctl_key("net.ipv4.conf.all.rp_filter").is_ok());
        assert!(check_sysctl_key("vm.swappiness").is_ok());
        for bad in ["fs.file-max", "net..x", "net.IPv4", "net/ipv4", "net."] {
            assert!(check_sysctl_key(bad).is_err(), "{bad}");
        }
    }
}
