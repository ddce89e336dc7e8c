//! The cluster's L2 segment: a namespace holding one bridge, and veth ports plugging other
//! namespaces (nodes, etcd members) into it.

use std::net::Ipv4Addr;

use crate::error::Result;
use crate::netns::NetNs;

/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "sw";

/// A namespace with bridge [`BRIDGE`] at `.254` of the cluster subnet; every node and etcd
/// member has a veth port on it. Taking a port down (in this namespace) cuts that peer off the
/// wire while its own end stays configured, as a pulled cable would.
#[derive(Debug)]
pub struct Switch {
    ns: NetNs,
    addr: Ipv4Addr,
}

impl Switch {
    /// Create the namespace and its bridge with address `addr`/24.
    pub fn create(addr: Ipv4Addr) -> Result<Switch> {
        let ns = NetNs::create("dvcl-sw")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        // Ports forward at once (no STP listening/learning delay).
        ns.ip(&[
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", BRIDGE])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Switch { ns, addr })
    }

    /// The switch namespace (the checker and the etcd helpers run their sockets here).
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The switch's own address on the bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Plug `peer` in: a veth whose end in `peer` is `eth0` with `addr`/24 (up) and whose end
    /// here is `port`, enslaved to the bridge and up.
    pub fn attach(&self, peer: &NetNs, port: &str, addr: Ipv4Addr) -> Result<()> {
        // Created inside `peer` with the other end directly in the switch namespace: the
        // names never touch the host's namespace, so parallel tests cannot collide.
        peer.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.ns.name(),
        ])?;
        self.ns.ip(&["link", "set", port, "master", BRIDGE, "up"])?;
        peer.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        peer.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Set switch port `port` down (`up == false`) or up.
    pub fn set_port(&self, port: &str, up: bool) -> Result<()> {
        set_port_in(self.ns.name(), port, up)
    }
}

/// Set port `port` of the switch in namespace `switch_ns` down or up (for threads that hold
/// only the names, e.g. a link flapper).
pub(crate) fn set_port_in(switch_ns: &str, port: &str, up: bool) -> Result<()> {
    crate::netns::ip(&[
        "-n",
        switch_ns,
        "link",
        "set",
        port,
        if up { "up" } else { "down" },
    ])
}
