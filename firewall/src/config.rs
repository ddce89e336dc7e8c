//! `firewall:` section of `debvisord.yaml`: the node's own nftables table.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `firewall:` — what the node's nft table lets in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FirewallConfig {
    /// Install the ruleset at all.
    pub enabled: bool,
    /// SSH port allowed in.
    pub ssh_port: u16,
    /// Port of the DebVisor RPC service.
    pub rpc_port: u16,
    /// Allow `rpc_port` in.
    pub rpc_enabled: bool,
    /// etcd client port allowed from cluster nodes.
    pub etcd_client_port: u16,
    /// etcd peer port allowed from coordinators.
    pub etcd_peer_port: u16,
    /// libvirt live-migration port range, `start-end`.
    pub migration_ports: String,
    /// Prefix of logged drops (at most 127 characters).
    pub log_prefix: String,
    /// Rate limit of logged drops, `<n>/<second|minute|hour|day>`.
    pub log_rate: String,
    /// Additional allow rules.
    pub extra_allow: Vec<FirewallAllow>,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            enabled: false,
            ssh_port: 22,
            rpc_port: 9443,
            rpc_enabled: false,
            etcd_client_port: 2379,
            etcd_peer_port: 2380,
            migration_ports: "49152-49215".into(),
            log_prefix: "debvisor-drop: ".into(),
            log_rate: "5/second".into(),
            extra_allow: Vec::new(),
        }
    }
}

/// Transport protocol of an allow rule.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// One entry of `firewall.extra_allow`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FirewallAllow {
    /// `tcp` or `udp`.
    pub proto: Proto,
    /// A port (`8080`) or a range (`"6800-7300"`).
    pub port: PortRange,
    /// Only from this source network (CIDR); any source when unset.
    pub source: Option<String>,
    /// nft rule comment (at most 128 characters).
    pub comment: Option<String>,
}

/// An inclusive port range; a single port has `start == end`. Written `8080` or `"6800-7300"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (≥ `start`).
    pub end: u16,
}

impl PortRange {
    /// A single port (`start == end`).
    pub fn single(port: u16) -> PortRange {
        PortRange {
            start: port,
            end: port,
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port or a start-end port range");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let start: u16 = a.trim().parse().map_err(|_| bad())?;
        let end: u16 = b.trim().parse().map_err(|_| bad())?;
        if start == 0 {
            Err(format!("{s:?}: port 0 is not allowed"))
        } else if start > end {
            Err(format!("{s:?}: start is greater than end"))
        } else {
            Ok(PortRange { start, end })
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number or a \"start-end\" range")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Check a CIDR string (`10.0.0.0/24`, `fd00::/64`; host bits allowed, a bare address is not).
fn check_cidr(s: &str) -> Result<(), String> {
    match s.parse::<IpNet>() {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "{s:?} is not an address/prefix (e.g. 10.0.0.0/24; \
             the prefix length is at most 32 for IPv4, 128 for IPv6)"
        )),
    }
}

/// Check text that goes into an nft string (no quotes, no control characters, ≤ `max` chars).
fn check_nft_text(s: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        Err(format!("is longer than {max} characters"))
    } else if s.chars().any(|c| c == '"' || c.is_control()) {
        Err(format!("{s:?} contains '\"' or control characters"))
    } else {
        Ok(())
    }
}

impl FirewallConfig {
    /// The parsed `migration_ports` (`None` when invalid; see [`FirewallConfig::validate`]).
    pub fn migration_range(&self) -> Option<PortRange> {
        self.migration_ports.parse().ok()
    }

    /// Check every field; returns `(field path, reason)` pairs, `path` being this section's path.
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |field: &str, reason: String| out.push((format!("{path}.{field}"), reason));
        for (name, port) in [
            ("ssh_port", self.ssh_port),
            ("rpc_port", self.rpc_port),
            ("etcd_client_port", self.etcd_client_port),
            ("etcd_peer_port", self.etcd_peer_port),
        ] {
            if port == 0 {
                push(name, "must not be 0".into());
            }
        }
        if let Err(e) = self.migration_ports.parse::<PortRange>() {
            push("migration_ports", e);
        }
        if let Err(e) = check_nft_text(&self.log_prefix, 127) {
            push("log_prefix", e);
        }
        let rate_ok = self.log_rate.split_once('/').is_some_and(|(n, u)| {
            n.parse::<u32>().is_ok_and(|n| n > 0)
                && ["second", "minute", "hour", "day"].contains(&u)
        });
        if !rate_ok {
            push(
                "log_rate",
                format!("{:?} is not <n>/<second|minute|hour|day>", self.log_rate),
            );
        }
        for (i, a) in self.extra_allow.iter().enumerate() {
            if let Some(Err(e)) = a.source.as_deref().map(check_cidr) {
                push(&format!("extra_allow[{i}].source"), e);
            }
            if let Some(Err(e)) = a.comment.as_deref().map(|c| check_nft_text(c, 128)) {
                push(&format!("extra_allow[{i}].comment"), e);
            }
            if a.port.start == 0 {
                push(
                    &format!("extra_allow[{i}].port"),
                    "must be set and not 0".into(),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = FirewallConfig::default();
        assert!(c.validate("firewall").is_empty());
        assert_eq!(
            c.migration_range(),
            Some(PortRange {
                start: 49152,
                end: 49215
            })
        );
    }

    #[test]
    fn port_ranges() {
        assert_eq!("80".parse(), Ok(PortRange { start: 80, end: 80 }));
        assert_eq!("1-2".parse(), Ok(PortRange { start: 1, end: 2 }));
        for bad in ["0", "5-4", "a-b", "1-70000", "", "-"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let r: PortRange = serde_json::from_str("8080").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "8080");
        let r: PortRange = serde_json::from_str("\"6800-7300\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"6800-7300\"");
        assert!(serde_json::from_str::<PortRange>("\"9-1\"").is_err());
    }

    #[test]
    fn bad_fields_are_reported_with_paths() {
        let c = FirewallConfig {
            ssh_port: 0,
            migration_ports: "50000-49000".into(),
            log_prefix: "x".repeat(128),
            log_rate: "5/fortnight".into(),
            extra_allow: vec![FirewallAllow {
                port: PortRange { start: 1, end: 1 },
                source: Some("10.0.0.0/40".into()),
                comment: Some("a\"b".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let paths: Vec<String> = c.validate("firewall").into_iter().map(|(p, _)| p).collect();
        let want = [
            "ssh_port",
            "migration_ports",
            "log_prefix",
            "log_rate",
            "extra_allow[0].source",
            "extra_allow[0].comment",
        ];
        for w in want {
            assert!(paths.contains(&format!("firewall.{w}")), "{w}: {paths:?}");
        }
    }
}
