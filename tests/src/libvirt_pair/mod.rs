//! Isolated libvirtd instances on one machine, for real live migration in tests.
//!
//! Each [`IsolatedLibvirt`] is a foreground `libvirtd` (we hold its PID) inside a network
//! namespace the test created and a mount + UTS namespace of its own: temp directories are
//! bind-mounted over `/run/libvirt`, `/var/lib/libvirt`, `/etc/libvirt`, `/var/log/libvirt`
//! and `/var/cache/libvirt`, it has its own `host_uuid` and hostname, and it listens on TCP
//! (no auth) at its namespace address. Two of them look like two hosts to libvirt, so a
//! peer-to-peer migration really moves the guest's qemu process from one to the other.
//!
//! Tests reach an instance from the host through its unix socket
//! ([`IsolatedLibvirt::local_uri`]); instances reach each other over TCP
//! ([`IsolatedLibvirt::peer_uri`]). qemu logs to files
//! (`stdio_handler = "file"`), so no virtlogd is needed; cgroups and security drivers are off
//! so two instances never share host state.
//!
//! Drop destroys every domain, kills the instance's qemu processes (found by its pid files)
//! and libvirtd by PID, and removes its temp directory. [`sweep_stale`] removes what a killed
//! test process left behind.
//!
//! Typical use (root; the constructors block, so call them through `spawn_blocking` in
//! async tests):
//!
//! ```text
//! let pair = LibvirtPair::start()?;
//! let lv_a = pair.a.libvirt(timeout);            // driver on A's socket, PIDs from A's pid files
//! lv_a.migrate(uuid, &pair.b.peer_uri(), opts);  // A's libvirtd reaches B over the veth
//! // a debvisord for node A: hypervisor.uri = pair.a.local_uri(),
//! //                         hypervisor.peer_uri = pair.a.peer_uri()
//! ```
//!
//! Modules: `instance` (one libvirtd), `config` (its configuration), `procs` (process and
//! pid-file helpers), `sweep` (leftovers of killed test processes); this file wires
//! instances into a [`LibvirtPair`], a [`LibvirtCluster`] or a lone [`LibvirtSolo`].

mod config;
mod instance;
mod procs;
mod sweep;

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::{HarnessError, Result};
use crate::netns::NetNs;

pub use instance::IsolatedLibvirt;
pub use procs::{netns_inode, process_netns_inode};
pub use sweep::sweep_stale;

/// libvirtd's TCP port (`listen_tcp`).
pub const LIBVIRT_TCP_PORT: u16 = 16509;
/// The /24 a [`LibvirtPair`] (A is `.1`, B is `.2`) or a [`LibvirtCluster`] lives in. Each
/// has namespaces of its own, so those of parallel tests do not collide.
pub const PAIR_SUBNET: [u8; 3] = [10, 231, 0];
/// An address in [`PAIR_SUBNET`] that no instance has: migrating there fails.
pub const PAIR_UNREACHABLE: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 99);
/// Prefix of instance temp directories: `dvlv-<test pid>-<label>-…`.
const DIR_PREFIX: &str = "dvlv-";
/// Prefix of the pair's network namespaces (`lvmig-<test pid>-<n>`).
const NETNS_PREFIX: &str = "lvmig";
/// Directories an instance gets a private copy of: (name under its temp dir, mount point).
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("etc", "/etc/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];
/// How long an instance gets to answer after being spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Drop waits for libvirt to destroy the domains before killing by PID.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(30);

/// Two [`IsolatedLibvirt`] instances, `a` at `10.231.0.1` and `b` at `10.231.0.2`, each
/// in its own network namespace, wired by a veth pair. Dropping it stops both instances,
/// then deletes the namespaces.
pub struct LibvirtPair {
    /// The first instance (label `a`).
    pub a: IsolatedLibvirt,
    /// The second instance (label `b`).
    pub b: IsolatedLibvirt,
    // Dropped after the instances (field order).
    ns_a: NetNs,
    ns_b: NetNs,
}

impl LibvirtPair {
    /// Create the namespaces and the veth between them, then start both instances.
    /// Leftovers of killed test processes are swept first ([`sweep_stale`]).
    pub fn start() -> Result<LibvirtPair> {
        sweep_stale();
        let ns_a = NetNs::create(NETNS_PREFIX)?;
        let ns_b = NetNs::create(NETNS_PREFIX)?;
        let [x, y, z] = PAIR_SUBNET;
        let addr_a = Ipv4Addr::new(x, y, z, 1);
        let addr_b = Ipv4Addr::new(x, y, z, 2);
        // Created directly inside the namespaces: the names never touch the host's.
        ns_a.ip(&[
            "link",
            "add",
            "mig0",
            "type",
            "veth",
            "peer",
            "name",
            "mig0",
            "netns",
            ns_b.name(),
        ])?;
        for (ns, addr) in [(&ns_a, addr_a), (&ns_b, addr_b)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "mig0"])?;
            ns.ip(&["link", "set", "mig0", "up"])?;
        }
        let a = IsolatedLibvirt::start("a", &ns_a, addr_a)?;
        let b = IsolatedLibvirt::start("b", &ns_b, addr_b)?;
        Ok(LibvirtPair { a, b, ns_a, ns_b })
    }

    /// The namespace of `a`.
    pub fn netns_a(&self) -> &NetNs {
        &self.ns_a
    }

    /// The namespace of `b`.
    pub fn netns_b(&self) -> &NetNs {
        &self.ns_b
    }

    /// A peer URI in the pair's subnet where nothing listens (no host at that address).
    pub fn unreachable_peer_uri(&self) -> String {
        format!("qemu+tcp://{PAIR_UNREACHABLE}/system")
    }
}

/// One [`IsolatedLibvirt`] at `10.231.0.1` (on a veth whose ends both stay inside) in a network namespace
/// of its own, for tests that misbehave with a libvirtd (freeze it, kill it) without a
/// peer and without touching anyone else's. Dropping it stops the instance, then deletes
/// the namespace.
pub struct LibvirtSolo {
    /// The instance.
    pub lv: IsolatedLibvirt,
    // Dropped after the instance (field order).
    ns: NetNs,
}

impl LibvirtSolo {
    /// Create the namespace and start an instance labelled `label`. Leftovers of killed
    /// test processes are swept first ([`sweep_stale`]).
    pub fn start(label: &str) -> Result<LibvirtSolo> {
        sweep_stale();
        let ns = NetNs::create(NETNS_PREFIX)?;
        let [x, y, z] = PAIR_SUBNET;
        let addr = Ipv4Addr::new(x, y, z, 1);
        // A veth with both ends inside (this kernel may lack the dummy driver).
        ns.ip(&[
            "link", "add", "mig0", "type", "veth", "peer", "name", "mig1",
        ])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "mig0"])?;
        ns.ip(&["link", "set", "mig1", "up"])?;
        ns.ip(&["link", "set", "mig0", "up"])?;
        let lv = IsolatedLibvirt::start(label, &ns, addr)?;
        Ok(LibvirtSolo { lv, ns })
    }

    /// The instance's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }
}

/// Most instances in a [`LibvirtCluster`] (addresses `.1` to `.50` of [`PAIR_SUBNET`]).
pub const CLUSTER_MAX: usize = 50;

/// `count` [`IsolatedLibvirt`] instances labelled `n0`, `n1`, … at `10.231.0.1`, `.2`, …,
/// each in its own network namespace, all on one bridge in a further namespace (for
/// drain/placement tests with more than two hosts). Dropping it stops every instance, then
/// deletes the namespaces.
pub struct LibvirtCluster {
    nodes: Vec<IsolatedLibvirt>,
    // Dropped after the instances (field order).
    node_ns: Vec<NetNs>,
    bridge_ns: NetNs,
}

impl LibvirtCluster {
    /// Create the bridge namespace, one namespace per node wired to the bridge by a veth,
    /// and start the instances (2 to [`CLUSTER_MAX`]).
    pub fn start(count: usize) -> Result<LibvirtCluster> {
        if !(2..=CLUSTER_MAX).contains(&count) {
            return Err(HarnessError::State(format!(
                "a libvirt cluster has 2 to {CLUSTER_MAX} nodes, not {count}"
            )));
        }
        sweep_stale();
        let bridge_ns = NetNs::create(NETNS_PREFIX)?;
        bridge_ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge_ns.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = LibvirtCluster {
            nodes: Vec::new(),
            node_ns: Vec::new(),
            bridge_ns,
        };
        let [x, y, z] = PAIR_SUBNET;
        for i in 0..count {
            let ns = NetNs::create(NETNS_PREFIX)?;
            let port = format!("p{i}");
            ns.ip(&[
                "link",
                "add",
                "mig0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                cluster.bridge_ns.name(),
            ])?;
            cluster
                .bridge_ns
                .ip(&["link", "set", &port, "master", "br0", "up"])?;
            // `i < CLUSTER_MAX`, so the host part fits.
            let addr = Ipv4Addr::new(x, y, z, i as u8 + 1);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "mig0"])?;
            ns.ip(&["link", "set", "mig0", "up"])?;
            cluster.node_ns.push(ns);
        }
        for (i, ns) in cluster.node_ns.iter().enumerate() {
            let addr = Ipv4Addr::new(x, y, z, i as u8 + 1);
            let node = IsolatedLibvirt::start(&format!("n{i}"), ns, addr)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// The instances, in label order (`n0` first).
    pub fn nodes(&self) -> &[IsolatedLibvirt] {
        &self.nodes
    }

    /// The namespace of node `i`.
    pub fn netns(&self, i: usize) -> Option<&NetNs> {
        self.node_ns.get(i)
    }

    /// A peer URI in the cluster's subnet where nothing listens.
    pub fn unreachable_peer_uri(&self) -> String {
        format!("qemu+tcp://{PAIR_UNREACHABLE}/system")
    }
}
