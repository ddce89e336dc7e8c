//! What the host looks like: a snapshot of links, their addresses and the default routes.
//!
//! [`Observed`] is what [`crate::HostNet::observe`] returns and what the pure planner
//! ([`crate::plan()`]) compares the config against. It is plain data so that planner tests can
//! build any host state by hand.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// `IFA_PROTO` value marking an address as one of this node's configured addresses (shown by
/// `ip addr` as `proto 219`). The kernel stores it with the address, so ownership survives a
/// daemon restart; the planner only ever removes addresses carrying it.
pub const NODE_ADDR_PROTO: u8 = 219;
/// `IFA_PROTO` value of a floating address taken by [`crate::take_floating`] (`proto 220`).
pub const FLOATING_ADDR_PROTO: u8 = 220;
/// `IFA_PROTO` value of a client network's gateway on its bridge (`proto 221`), held by the
/// primary like a floating address but owned by the network's reconciler: the host-network
/// planner never removes it, so its drift check cannot strip a gateway it does not know of.
pub const GATEWAY_ADDR_PROTO: u8 = 221;

/// Who put an address on a link, as far as we can tell from its `IFA_PROTO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrOwner {
    /// Added by us as a node address ([`NODE_ADDR_PROTO`]).
    Node,
    /// Added by us as a floating address ([`FLOATING_ADDR_PROTO`]).
    Floating,
    /// Added by us as a client network's gateway ([`GATEWAY_ADDR_PROTO`]).
    Gateway,
    /// Anything else: the kernel (link-local), an operator, DHCP, … — never removed by us.
    Foreign,
}

impl AddrOwner {
    /// Held only by the primary (a floating address or a client network's gateway): what a
    /// dying primary's guardian removes and what no two nodes may hold at once.
    pub fn primary_only(self) -> bool {
        matches!(self, AddrOwner::Floating | AddrOwner::Gateway)
    }

    /// The `IFA_PROTO` to write for an address we add.
    pub fn proto(self) -> Option<u8> {
        match self {
            AddrOwner::Node => Some(NODE_ADDR_PROTO),
            AddrOwner::Floating => Some(FLOATING_ADDR_PROTO),
            AddrOwner::Gateway => Some(GATEWAY_ADDR_PROTO),
            AddrOwner::Foreign => None,
        }
    }

    /// The owner implied by an `IFA_PROTO` read back from the kernel.
    pub fn from_proto(proto: Option<u8>) -> AddrOwner {
        match proto {
            Some(NODE_ADDR_PROTO) => AddrOwner::Node,
            Some(FLOATING_ADDR_PROTO) => AddrOwner::Floating,
            Some(GATEWAY_ADDR_PROTO) => AddrOwner::Gateway,
            _ => AddrOwner::Foreign,
        }
    }
}

/// One address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrState {
    /// Address and prefix length.
    pub cidr: IpNet,
    /// Who configured it.
    pub owner: AddrOwner,
}

/// VLAN details of a `vlan` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanInfo {
    /// 802.1Q id.
    pub id: u16,
    /// Name of the link it sits on (`None` if the parent is in another namespace).
    pub parent: Option<String>,
}

/// A VXLAN link: what to create, and what is read back from an existing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Interface name (≤ 15 bytes).
    pub name: String,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// Underlay device the tunnel endpoint uses (`dev`).
    pub dev: Option<String>,
    /// UDP destination port (4789 is the IANA port; the kernel default is 8472).
    pub dstport: u16,
    /// Local tunnel endpoint address.
    pub local: Option<IpAddr>,
    /// Outer TTL (`None`: kernel default, inherit 0 = 64).
    pub ttl: Option<u8>,
    /// Multicast group for flooding (BUM traffic) to the other endpoints; `None` for a
    /// point-to-point or local-only VXLAN.
    pub group: Option<IpAddr>,
}

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Kernel interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`bridge`, `vlan`, `vxlan`, `veth`, …); `None` for a plain
    /// physical device.
    pub kind: Option<String>,
    /// Current MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Name of the bridge (or bond) it is enslaved to.
    pub master: Option<String>,
    /// Hardware address, when it has one.
    pub mac: Option<Vec<u8>>,
    /// VLAN details for `vlan` links.
    pub vlan: Option<VlanInfo>,
    /// VXLAN details for `vxlan` links.
    pub vxlan: Option<VxlanSpec>,
    /// Addresses on this link (IPv4 and IPv6, including link-local ones).
    pub addresses: Vec<AddrState>,
}

impl LinkState {
    /// A link as just created by us: down, no addresses.
    pub fn new(index: u32, name: &str, kind: Option<&str>, mtu: u32) -> LinkState {
        LinkState {
            index,
            name: name.to_owned(),
            kind: kind.map(str::to_owned),
            mtu,
            up: false,
            master: None,
            mac: None,
            vlan: None,
            vxlan: None,
            addresses: Vec::new(),
        }
    }

    /// Is `cidr` (exact address and prefix) on this link?
    pub fn has_address(&self, cidr: &IpNet) -> bool {
        self.addresses.iter().any(|a| a.cidr == *cidr)
    }
}

/// A default route (`0.0.0.0/0` or `::/0`) in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    /// IPv6 (`::/0`) rather than IPv4.
    pub ipv6: bool,
    /// Next hop, if it is a gateway route.
    pub gateway: Option<IpAddr>,
    /// Output interface name.
    pub link: Option<String>,
    /// Route metric (`RTA_PRIORITY`; IPv4 default 0, IPv6 default 1024).
    pub metric: u32,
}

impl fmt::Display for DefaultRoute {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("default")?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(l) = &self.link {
            write!(f, " dev {l}")?;
        }
        write!(f, " metric {}", self.metric)
    }
}

/// Snapshot of the host's links (by name), their addresses, and the default routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// All links of the namespace, by name.
    pub links: BTreeMap<String, LinkState>,
    /// Default routes of the main table, IPv4 and IPv6.
    pub default_routes: Vec<DefaultRoute>,
}

impl Observed {
    /// The link called `name`, if present.
    pub fn link(&self, name: &str) -> Option<&LinkState> {
        self.links.get(name)
    }

    /// Add a link to the snapshot (builder style, for tests of planners).
    pub fn with_link(mut self, link: LinkState) -> Observed {
        self.links.insert(link.name.clone(), link);
        self
    }
}

/// The metric the kernel gives a default route added without one.
pub(crate) fn default_metric(ipv6: bool) -> u32 {
    if ipv6 {
        1024
    } else {
        0
    }
}
