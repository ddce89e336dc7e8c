//! The Network object: client networks under `networks/<vni>/…` — bridged (VLAN `<vni>` on
//! the configured bridge device) and managed (VXLAN `<vni>` on the cluster device, with
//! gateway addresses and DHCP/DNS on the primary) — parsed and validated into a spec that the
//! host side plans from. A bad spec marks that network in error with the field named and
//! changes nothing on the host for it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::reactor::{KeyEntry, Kind, ObjectError};

/// Prefix of all network keys.
pub const NETWORKS_PREFIX: &str = "networks/";

/// Highest VXLAN network identifier (24 bits).
pub const VNI_MAX: u32 = 16_777_215;

/// Key of a network's spec (`networks/<vni>/spec`), written by the operator.
pub fn spec_key(vni: u32) -> String {
    format!("{NETWORKS_PREFIX}{vni}/spec")
}

/// Key of a DHCP reservation (`networks/<vni>/reservations/<mac>`), written by the operator.
pub fn reservation_key(vni: u32, mac: &str) -> String {
    format!("{NETWORKS_PREFIX}{vni}/reservations/{mac}")
}

/// Key of an ACL rule (`networks/<vni>/acl/<in|out>/<order>`), written by the operator.
pub fn acl_key(vni: u32, dir: Direction, order: u32) -> String {
    format!("{NETWORKS_PREFIX}{vni}/acl/{dir}/{order}")
}

/// Key of a node's status for a network (`networks/<vni>/status/<node>`), written by that node.
pub fn status_key(vni: u32, node: &str) -> String {
    format!("{NETWORKS_PREFIX}{vni}/status/{node}")
}

/// Key of a DHCP lease (`networks/<vni>/leases/<mac>`), written by the primary.
pub fn lease_key(vni: u32, mac: &str) -> String {
    format!("{NETWORKS_PREFIX}{vni}/leases/{mac}")
}

/// Bridged or managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    /// VLAN `<vni>` on the configured bridge device, plus a bridge. No gateway, no DHCP.
    Bridged,
    /// VXLAN `<vni>` over the cluster network, plus a bridge, gateway and DHCP on the primary.
    Managed,
}

/// An IPv4 or IPv6 prefix, e.g. `10.1.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    /// Network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

fn mask_v4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask_v6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Prefix {
    /// Does the prefix contain `ip`?
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(n) == u32::from(a) & mask_v4(self.len),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(n) == u128::from(a) & mask_v6(self.len),
            _ => false,
        }
    }

    /// Do two prefixes share any address?
    pub fn overlaps(&self, other: &Prefix) -> bool {
        let shorter = if self.len <= other.len { self } else { other };
        let longer = if self.len <= other.len { other } else { self };
        shorter.contains(longer.addr)
    }

    /// Is this an IPv6 prefix?
    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a prefix like 10.0.0.0/24"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let len: u8 = l
            .parse()
            .map_err(|_| format!("{l:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} exceeds {max}"));
        }
        let net = match addr {
            IpAddr::V4(v) => IpAddr::from((u32::from(v) & mask_v4(len)).to_be_bytes()),
            IpAddr::V6(v) => IpAddr::from((u128::from(v) & mask_v6(len)).to_be_bytes()),
        };
        if net != addr {
            return Err(format!("{s} has host bits set (network is {net}/{len})"));
        }
        Ok(Prefix { addr, len })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// DHCPv4 settings of a managed network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSpec {
    /// Serve DHCPv4.
    #[serde(default)]
    pub enabled: bool,
    /// First address of the dynamic range.
    #[serde(default)]
    pub start: Option<String>,
    /// Last address of the dynamic range.
    #[serde(default)]
    pub end: Option<String>,
}

/// One address family of a network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilySpec {
    /// The network prefix (`10.1.0.0/24`, `fd00:1::/64`).
    pub network: String,
    /// Gateway address inside the network, held by the primary on the bridge.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// `networks/<vni>/spec` as the operator writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpecRaw {
    #[serde(default)]
    pub description: String,
    #[serde(rename = "type")]
    pub kind: NetworkType,
    /// Requested MTU (managed: clamped to the cluster MTU − 50).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// DNS domain served by dnsmasq.
    #[serde(default)]
    pub domain: Option<String>,
    /// Name servers handed out by DHCP.
    #[serde(default)]
    pub name_servers: Vec<String>,
    #[serde(default)]
    pub ipv4: Option<FamilySpec>,
    #[serde(default)]
    pub ipv6: Option<FamilySpec>,
    #[serde(default)]
    pub dhcp4: DhcpSpec,
}

/// `networks/<vni>/reservations/<mac>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationRaw {
    pub ip: String,
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Inbound (towards guests) or outbound (from guests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

/// What an ACL rule does and which protocol it matches: the firewall's own types, so the
/// etcd value and the nft rule cannot disagree.
pub use debvisor_firewall::{AclAction, AclProto};

/// `networks/<vni>/acl/<dir>/<order>`: one ACL rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRaw {
    pub action: AclAction,
    #[serde(default)]
    pub proto: Option<AclProto>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub destination: Option<String>,
    /// Destination port or range `a-b` (tcp/udp only).
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A validated ACL rule with its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Acl {
    pub order: u32,
    pub rule: AclRaw,
    pub source: Option<Prefix>,
    pub destination: Option<Prefix>,
    pub ports: Option<(u16, u16)>,
}

/// A validated DHCP reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub ip: IpAddr,
    pub hostname: Option<String>,
}

/// A validated address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub network: Prefix,
    pub gateway: Option<IpAddr>,
}

/// A network ready to plan from: every field checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub vni: u32,
    pub description: String,
    pub kind: NetworkType,
    pub mtu: Option<u32>,
    pub domain: Option<String>,
    pub name_servers: Vec<IpAddr>,
    pub ipv4: Option<Family>,
    pub ipv6: Option<Family>,
    /// DHCPv4 dynamic range, when DHCP is on.
    pub dhcp4: Option<(IpAddr, IpAddr)>,
    pub reservations: Vec<Reservation>,
    /// Ordered by `order`.
    pub acl_in: Vec<Acl>,
    /// Ordered by `order`.
    pub acl_out: Vec<Acl>,
}

impl Network {
    /// Name of the network's bridge on every node (`dvbr<vni>`, ≤ 15 chars).
    pub fn bridge_name(&self) -> String {
        format!("dvbr{}", self.vni)
    }

    /// Name of the VXLAN or VLAN link under the bridge (`dvvx<vni>` / `dvvl<vni>`).
    pub fn link_name(&self) -> String {
        match self.kind {
            NetworkType::Managed => format!("dvvx{}", self.vni),
            NetworkType::Bridged => format!("dvvl{}", self.vni),
        }
    }
}

/// Normalize and check a MAC address (`AA-BB-…` and `AA:BB:…` accepted).
pub fn parse_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!("{s:?} is not a MAC address like 52:54:00:12:34:56"));
    }
    let mac = parts.join(":").to_ascii_lowercase();
    let first = u8::from_str_radix(&mac[0..2], 16).map_err(|e| e.to_string())?;
    if first & 1 == 1 {
        return Err(format!("{s:?} is a multicast MAC address"));
    }
    Ok(mac)
}

fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a port or range a-b"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a port or range a-b"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: ports must be 1-65535 with start ≤ end"));
    }
    Ok((a, b))
}

fn family(field: &str, f: &FamilySpec, v6: bool) -> Result<Family, ObjectError> {
    let network: Prefix = f
        .network
        .parse()
        .map_err(|e: String| ObjectError::new(format!("spec.{field}.network"), e))?;
    if network.is_v6() != v6 {
        return Err(ObjectError::new(
            format!("spec.{field}.network"),
            format!("{network} is not an {field} prefix"),
        ));
    }
    let gateway = match &f.gateway {
        None => None,
        Some(g) => {
            let ip: IpAddr = g.parse().map_err(|_| {
                ObjectError::new(
                    format!("spec.{field}.gateway"),
                    format!("{g:?} is not an IP address"),
                )
            })?;
            if !network.contains(ip) || ip == network.addr {
                return Err(ObjectError::new(
                    format!("spec.{field}.gateway"),
                    format!("{ip} is not a host address inside {network}"),
                ));
            }
            Some(ip)
        }
    };
    Ok(Family { network, gateway })
}

fn json<T: for<'de> Deserialize<'de>>(field: &str, v: &[u8]) -> Result<T, ObjectError> {
    serde_json::from_slice(v).map_err(|e| ObjectError::new(field, format!("invalid JSON: {e}")))
}

fn acl(field: &str, order: u32, raw: AclRaw) -> Result<Acl, ObjectError> {
    let prefix = |which: &str, v: &Option<String>| -> Result<Option<Prefix>, ObjectError> {
        v.as_ref()
            .map(|s| {
                s.parse::<Prefix>()
                    .map_err(|e| ObjectError::new(format!("{field}.{which}"), e))
            })
            .transpose()
    };
    let source = prefix("source", &raw.source)?;
    let destination = prefix("destination", &raw.destination)?;
    if let (Some(s), Some(d)) = (source, destination) {
        if s.is_v6() != d.is_v6() {
            return Err(ObjectError::new(
                field,
                "source and destination are of different address families",
            ));
        }
    }
    let ports = match &raw.port {
        None => None,
        Some(p) => {
            if !matches!(raw.proto, Some(AclProto::Tcp) | Some(AclProto::Udp)) {
                return Err(ObjectError::new(
                    format!("{field}.port"),
                    "a port needs proto tcp or udp",
                ));
            }
            Some(parse_ports(p).map_err(|e| ObjectError::new(format!("{field}.port"), e))?)
        }
    };
    if let Some(d) = &raw.description {
        if d.len() > 128 || d.chars().any(|c| c.is_control() || c == '"') {
            return Err(ObjectError::new(
                format!("{field}.description"),
                "at most 128 printable characters, no quotes",
            ));
        }
    }
    Ok(Acl {
        order,
        rule: raw,
        source,
        destination,
        ports,
    })
}

/// Parse and validate one network from its keys (relative to `networks/<vni>/`).
/// Keys the network does not own (`status/…`, `leases/…`) are ignored here.
pub fn parse_network(id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Network, ObjectError> {
    let vni: u32 = id
        .parse()
        .map_err(|_| ObjectError::new("vni", format!("{id:?} is not a number")))?;
    if vni == 0 || vni > VNI_MAX {
        return Err(ObjectError::new(
            "vni",
            format!("{vni} is outside 1..={VNI_MAX}"),
        ));
    }
    let spec = keys
        .get("spec")
        .ok_or_else(|| ObjectError::new("spec", "missing"))?;
    let raw: NetworkSpecRaw = json("spec", &spec.value)?;
    if raw.kind == NetworkType::Bridged && vni > 4094 {
        return Err(ObjectError::new(
            "vni",
            format!("{vni}: a bridged network is a VLAN id, 1..=4094"),
        ));
    }
    if let Some(m) = raw.mtu {
        if !(576..=9216).contains(&m) {
            return Err(ObjectError::new(
                "spec.mtu",
                format!("{m} is outside 576..=9216"),
            ));
        }
    }
    if raw.description.len() > 256 {
        return Err(ObjectError::new(
            "spec.description",
            "longer than 256 characters",
        ));
    }
    if let Some(d) = &raw.domain {
        if !valid_dns_name(d) {
            return Err(ObjectError::new(
                "spec.domain",
                format!("{d:?} is not a DNS name"),
            ));
        }
    }
    let mut name_servers = Vec::new();
    for (i, ns) in raw.name_servers.iter().enumerate() {
        name_servers.push(ns.parse::<IpAddr>().map_err(|_| {
            ObjectError::new(
                format!("spec.name_servers[{i}]"),
                format!("{ns:?} is not an IP address"),
            )
        })?);
    }
    let ipv4 = raw
        .ipv4
        .as_ref()
        .map(|f| family("ipv4", f, false))
        .transpose()?;
    let ipv6 = raw
        .ipv6
        .as_ref()
        .map(|f| family("ipv6", f, true))
        .transpose()?;
    if raw.kind == NetworkType::Bridged
        && (ipv4.as_ref().and_then(|f| f.gateway).is_some()
            || ipv6.as_ref().and_then(|f| f.gateway).is_some()
            || raw.dhcp4.enabled)
    {
        return Err(ObjectError::new(
            "spec.type",
            "a bridged network has no gateway or DHCP (use managed)",
        ));
    }
    let dhcp4 = if raw.dhcp4.enabled {
        let v4 = ipv4
            .as_ref()
            .ok_or_else(|| ObjectError::new("spec.dhcp4.enabled", "DHCPv4 needs spec.ipv4"))?;
        if v4.gateway.is_none() {
            return Err(ObjectError::new(
                "spec.dhcp4.enabled",
                "DHCPv4 needs spec.ipv4.gateway (dnsmasq listens there)",
            ));
        }
        let mut ends = Vec::new();
        for (name, v) in [("start", &raw.dhcp4.start), ("end", &raw.dhcp4.end)] {
            let f = format!("spec.dhcp4.{name}");
            let s = v
                .as_ref()
                .ok_or_else(|| ObjectError::new(&f, "required when DHCPv4 is enabled"))?;
            let ip: IpAddr = s
                .parse()
                .map_err(|_| ObjectError::new(&f, format!("{s:?} is not an IP address")))?;
            if !v4.network.contains(ip) {
                return Err(ObjectError::new(
                    &f,
                    format!("{ip} is outside {}", v4.network),
                ));
            }
            ends.push(ip);
        }
        if ends[0] > ends[1] {
            return Err(ObjectError::new("spec.dhcp4.start", "start is after end"));
        }
        Some((ends[0], ends[1]))
    } else {
        None
    };

    let mut reservations = Vec::new();
    let mut acl_in = Vec::new();
    let mut acl_out = Vec::new();
    for (sub, e) in keys {
        if let Some(mac_raw) = sub.strip_prefix("reservations/") {
            let field = format!("reservations/{mac_raw}");
            let mac = parse_mac(mac_raw).map_err(|r| ObjectError::new(&field, r))?;
            let r: ReservationRaw = json(&field, &e.value)?;
            let ip: IpAddr = r.ip.parse().map_err(|_| {
                ObjectError::new(
                    format!("{field}.ip"),
                    format!("{:?} is not an IP address", r.ip),
                )
            })?;
            let inside = ipv4
                .as_ref()
                .map(|f| f.network.contains(ip))
                .unwrap_or(false)
                || ipv6
                    .as_ref()
                    .map(|f| f.network.contains(ip))
                    .unwrap_or(false);
            if !inside {
                return Err(ObjectError::new(
                    format!("{field}.ip"),
                    format!("{ip} is outside the network"),
                ));
            }
            if let Some(h) = &r.hostname {
                if !valid_dns_name(h) || h.contains('.') {
                    return Err(ObjectError::new(
                        format!("{field}.hostname"),
                        format!("{h:?} is not a host name"),
                    ));
                }
            }
            let special = [&ipv4, &ipv6]
                .into_iter()
                .flatten()
                .any(|f| f.gateway == Some(ip) || f.network.addr == ip);
            if special {
                return Err(ObjectError::new(
                    format!("{field}.ip"),
                    format!("{ip} is the network's gateway or network address"),
                ));
            }
            if let Some(held) = reservations.iter().find(|x: &&Reservation| x.ip == ip) {
                return Err(ObjectError::new(
                    format!("{field}.ip"),
                    format!("{ip} is already reserved for MAC {}", held.mac),
                ));
            }
            reservations.push(Reservation {
                mac,
                ip,
                hostname: r.hostname,
            });
        } else if let Some(rest) = sub.strip_prefix("acl/") {
            let field = format!("acl/{rest}");
            let (dir, order) = rest
                .split_once('/')
                .ok_or_else(|| ObjectError::new(&field, "expected acl/<in|out>/<order>"))?;
            let order: u32 = order.parse().map_err(|_| {
                ObjectError::new(&field, format!("order {order:?} is not a number"))
            })?;
            let rule: AclRaw = json(&field, &e.value)?;
            let a = acl(&field, order, rule)?;
            match dir {
                "in" => acl_in.push(a),
                "out" => acl_out.push(a),
                _ => {
                    return Err(ObjectError::new(
                        &field,
                        format!("direction {dir:?} is not in or out"),
                    ))
                }
            }
        }
    }
    acl_in.sort_by_key(|a| a.order);
    acl_out.sort_by_key(|a| a.order);
    Ok(Network {
        vni,
        description: raw.description,
        kind: raw.kind,
        mtu: raw.mtu,
        domain: raw.domain,
        name_servers,
        ipv4,
        ipv6,
        dhcp4,
        reservations,
        acl_in,
        acl_out,
    })
}

/// Networks whose prefixes overlap another network's: returns (vni, other vni, prefix).
/// A cross-object check the reconciler applies on top of [`parse_network`].
pub fn overlapping<'a>(nets: impl IntoIterator<Item = &'a Network>) -> Vec<(u32, u32, Prefix)> {
    let mut prefixes: Vec<(u32, Prefix)> = Vec::new();
    for n in nets {
        for f in [&n.ipv4, &n.ipv6].into_iter().flatten() {
            prefixes.push((n.vni, f.network));
        }
    }
    let mut out = Vec::new();
    for (i, (va, pa)) in prefixes.iter().enumerate() {
        for (vb, pb) in prefixes.iter().skip(i + 1) {
            if va != vb && pa.overlaps(pb) {
                out.push((*va.max(vb), *va.min(vb), *pa));
            }
        }
    }
    out
}

/// The Network kind for the reactor.
pub struct NetworkKind;

impl Kind for NetworkKind {
    type Object = Network;
    const NAME: &'static str = "network";
    fn prefix(&self) -> &str {
        NETWORKS_PREFIX
    }
    fn parse(&self, id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Network, ObjectError> {
        parse_network(id, keys)
    }
    /// The operator's keys; `status/<node>` and `leases/<mac>` are reports.
    fn relevant(&self, sub: &str) -> bool {
        sub == "spec" || sub.starts_with("reservations/") || sub.starts_with("acl/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, KeyEntry> {
        KeyEntry::object(pairs)
    }

    const MANAGED: &str = r#"{"type":"managed","description":"tenant a","mtu":1450,"domain":"a.example",
        "name_servers":["10.1.0.1"],"ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"},
        "ipv6":{"network":"fd00:1::/64","gateway":"fd00:1::1"},
        "dhcp4":{"enabled":true,"start":"10.1.0.100","end":"10.1.0.199"}}"#;

    #[test]
    fn parses_a_managed_network_with_reservations_and_ordered_acls() {
        let n = parse_network(
            "100",
            &keys(&[
                ("spec", MANAGED),
                (
                    "reservations/52-54-00-AA-BB-CC",
                    r#"{"ip":"10.1.0.50","hostname":"web"}"#,
                ),
                (
                    "acl/in/20",
                    r#"{"action":"drop","proto":"tcp","port":"23"}"#,
                ),
                (
                    "acl/in/10",
                    r#"{"action":"accept","proto":"tcp","port":"22","source":"10.0.0.0/8"}"#,
                ),
                ("acl/out/5", r#"{"action":"accept"}"#),
                ("status/node1", r#"{"anything":"ignored"}"#),
                ("leases/52:54:00:aa:bb:cc", r#"{"ip":"10.1.0.50"}"#),
            ]),
        )
        .expect("valid");
        assert_eq!(n.vni, 100);
        assert_eq!(n.bridge_name(), "dvbr100");
        assert_eq!(n.link_name(), "dvvx100");
        assert_eq!(n.reservations[0].mac, "52:54:00:aa:bb:cc");
        assert_eq!(
            n.acl_in.iter().map(|a| a.order).collect::<Vec<_>>(),
            vec![10, 20],
            "numeric order"
        );
        assert_eq!(n.acl_in[0].ports, Some((22, 22)));
        assert_eq!(
            n.dhcp4.map(|(s, _)| s.to_string()),
            Some("10.1.0.100".into())
        );
        assert!(
            n.bridge_name().len() <= 15
                && format!("dvbr{VNI_MAX}").len() <= 15
                && format!("dvvx{VNI_MAX}").len() <= 15
        );
    }

    #[test]
    fn acl_order_is_numeric_not_lexical() {
        let n = parse_network(
            "7",
            &keys(&[
                ("spec", r#"{"type":"bridged"}"#),
                ("acl/in/100", r#"{"action":"drop"}"#),
                ("acl/in/9", r#"{"action":"accept"}"#),
            ]),
        )
        .expect("valid");
        assert_eq!(
            n.acl_in.iter().map(|a| a.order).collect::<Vec<_>>(),
            vec![9, 100]
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let m = |spec: &str| vec![("spec".to_string(), spec.to_string())];
        type Case<'a> = (&'a str, Vec<(String, String)>, &'a str);
        let cases: Vec<Case> = vec![
            ("0", m(r#"{"type":"managed"}"#), "vni"),
            ("16777216", m(r#"{"type":"managed"}"#), "vni"),
            ("abc", m(r#"{"type":"managed"}"#), "vni"),
            ("5000", m(r#"{"type":"bridged"}"#), "vni"),
            ("1", vec![], "spec"),
            ("1", m("not json"), "spec"),
            ("1", m(r#"{"type":"routed"}"#), "spec"),
            ("1", m(r#"{"type":"managed","color":"red"}"#), "spec"),
            ("1", m(r#"{"type":"managed","mtu":100}"#), "spec.mtu"),
            (
                "1",
                m(r#"{"type":"managed","domain":"bad domain"}"#),
                "spec.domain",
            ),
            (
                "1",
                m(r#"{"type":"managed","name_servers":["x"]}"#),
                "spec.name_servers[0]",
            ),
            (
                "1",
                m(r#"{"type":"managed","ipv4":{"network":"10.1.0.1/24"}}"#),
                "spec.ipv4.network",
            ),
            (
                "1",
                m(r#"{"type":"managed","ipv4":{"network":"fd00::/64"}}"#),
                "spec.ipv4.network",
            ),
            (
                "1",
                m(r#"{"type":"managed","ipv4":{"network":"10.1.0.0/24","gateway":"10.2.0.1"}}"#),
                "spec.ipv4.gateway",
            ),
            (
                "1",
                m(r#"{"type":"managed","ipv6":{"network":"fd00::/64","gateway":"fd01::1"}}"#),
                "spec.ipv6.gateway",
            ),
            (
                "1",
                m(r#"{"type":"bridged","ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"}}"#),
                "spec.type",
            ),
            (
                "1",
                m(r#"{"type":"managed","dhcp4":{"enabled":true}}"#),
                "spec.dhcp4.enabled",
            ),
            (
                "1",
                m(
                    r#"{"type":"managed","ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"},"dhcp4":{"enabled":true,"start":"10.1.0.9"}}"#,
                ),
                "spec.dhcp4.end",
            ),
            (
                "1",
                m(
                    r#"{"type":"managed","ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"},"dhcp4":{"enabled":true,"start":"10.1.0.9","end":"10.9.0.1"}}"#,
                ),
                "spec.dhcp4.end",
            ),
        ];
        for (id, kv, field) in cases {
            let k: BTreeMap<String, KeyEntry> = kv
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        KeyEntry {
                            value: v.into_bytes(),
                            mod_revision: 1,
                            lease: 0,
                        },
                    )
                })
                .collect();
            let e = parse_network(id, &k).expect_err(field);
            assert_eq!(e.field, field, "{id}: {e}");
        }
        let base = |extra: (&str, &str)| keys(&[("spec", MANAGED), extra]);
        for (k, v, field) in [
            (
                "reservations/zz:zz",
                r#"{"ip":"10.1.0.5"}"#,
                "reservations/zz:zz",
            ),
            (
                "reservations/01:00:5e:00:00:01",
                r#"{"ip":"10.1.0.5"}"#,
                "reservations/01:00:5e:00:00:01",
            ),
            (
                "reservations/52:54:00:00:00:01",
                r#"{"ip":"10.9.0.5"}"#,
                "reservations/52:54:00:00:00:01.ip",
            ),
            (
                "reservations/52:54:00:00:00:01",
                r#"{"ip":"10.1.0.5","hostname":"a b"}"#,
                "reservations/52:54:00:00:00:01.hostname",
            ),
            ("acl/in/x", r#"{"action":"drop"}"#, "acl/in/x"),
            ("acl/sideways/1", r#"{"action":"drop"}"#, "acl/sideways/1"),
            ("acl/in/1", r#"{"action":"maybe"}"#, "acl/in/1"),
            (
                "acl/in/1",
                r#"{"action":"drop","port":"22"}"#,
                "acl/in/1.port",
            ),
            (
                "acl/in/1",
                r#"{"action":"drop","proto":"tcp","port":"0"}"#,
                "acl/in/1.port",
            ),
            (
                "acl/in/1",
                r#"{"action":"drop","source":"10.0.0.1/8"}"#,
                "acl/in/1.source",
            ),
            (
                "acl/in/1",
                r#"{"action":"drop","source":"10.0.0.0/8","destination":"fd00::/8"}"#,
                "acl/in/1",
            ),
        ] {
            let e = parse_network("100", &base((k, v))).expect_err(k);
            assert_eq!(e.field, field, "{k}: {e}");
        }
    }

    #[test]
    fn overlaps_are_found_across_networks() {
        let a = parse_network(
            "1",
            &keys(&[(
                "spec",
                r#"{"type":"managed","ipv4":{"network":"10.1.0.0/16"}}"#,
            )]),
        )
        .expect("a");
        let b = parse_network(
            "2",
            &keys(&[(
                "spec",
                r#"{"type":"managed","ipv4":{"network":"10.1.5.0/24"}}"#,
            )]),
        )
        .expect("b");
        let c = parse_network(
            "3",
            &keys(&[(
                "spec",
                r#"{"type":"managed","ipv4":{"network":"10.2.0.0/24"}}"#,
            )]),
        )
        .expect("c");
        let o = overlapping([&a, &b, &c]);
        assert_eq!(o.len(), 1);
        assert_eq!((o[0].0, o[0].1), (2, 1));
    }

    #[test]
    fn prefixes() {
        let p: Prefix = "10.1.0.0/24".parse().expect("prefix");
        assert!(p.contains("10.1.0.77".parse().expect("ip")));
        assert!(!p.contains("10.1.1.1".parse().expect("ip")));
        assert!("10.1.0.0/33".parse::<Prefix>().is_err());
        assert!("10.1.0.1/24".parse::<Prefix>().is_err());
        assert!("::/0".parse::<Prefix>().is_ok());
    }
}
