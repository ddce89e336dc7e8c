//! A multi-node cluster in network namespaces, for election, fencing and takeover tests.
//!
//! Layout (every name carries the test's PID, so tests run in parallel):
//!
//! ```text
//!   switch ns: bridge `sw` 192.0.2.254/24
//!     ├─ port c1 ── node ns c1: eth0 192.0.2.1/24, debvisord (clustered), [libvirtd]
//!     ├─ port c2 ── node ns c2: eth0 192.0.2.2/24, …
//!     ├─ …          (1 to 5 nodes)
//!     ├─ port e1 ── etcd ns e1: eth0 192.0.2.201/24, etcd member e1
//!     └─ …          (1 to 3 members)
//! ```
//!
//! Each daemon has `node.mode: clustered`, `node.coordinators` (all nodes by default), the
//! cluster host network on `eth0` with its address and the shared floating address
//! (192.0.2.100/24 by default), the store endpoints of every etcd member, keepalive 1 s /
//! lease 3 s. The node's address is configured by the harness before the daemon starts (so a
//! node, its libvirtd and a restarted daemon find the network up); the daemon's
//! host-networking stage finds it in place.
//!
//! Faults are calls on a [`Node`] (`kill9`, `sigterm`, `stop`/`cont`, `cut_link`/`heal_link`,
//! `cut_etcd`/`heal_etcd`, `flap_link`, `restart`) or on the etcd cluster (`kill_member`,
//! `restart_member`, `cut_member`); each returns the [`std::time::Instant`] it was applied,
//! for benchmarks. The [`Checker`] samples the invariants in the background from the moment
//! the cluster is built.
//!
//! Dropping the [`Cluster`] stops the checker, shuts every daemon down (SIGTERM to all at
//! once, SIGKILL after 3 s), kills the libvirtds and etcd members by PID, deletes every
//! namespace (killing what still runs inside, e.g. dnsmasq) and removes the temp directory —
//! also when the test panics. Namespaces of a test process killed outright are swept by the
//! next one ([`crate::netns::sweep_stale`]).
//!
//! With `.bmcs(true)` every node has a fake BMC ([`Bmc`]: openipmi's `ipmi_sim` on the
//! switch at `192.0.2.(150 + N)`, port 623) whose power off kills everything in the node's
//! namespace (daemon, libvirtd, qemu, dnsmasq) and takes its network down, and whose power
//! on boots it again (libvirtd, then the daemon with the same state dir); each daemon is
//! told its BMC (`fencing.ipmi.*`). With `.track_runs(true)` (isolated libvirtds) the
//! [`Runs`] recorder follows where every VM runs, from libvirt events, domain lists and the
//! BMCs' power offs, and finds any moment a VM ran on two nodes at once. With `.ceph(true)`
//! a one-host Ceph runs in the switch namespace at `192.0.2.254` ([`Cluster::ceph`]), every
//! daemon has `ceph.enabled` against it and every libvirtd its cephx secret, so a guest's
//! RBD disk ([`Cluster::rbd_disk_xml`]) opens on whichever node it runs.
//!
//! Files: `builder` (options, bring-up), `switch` (the bridge and ports), `etcd` (the etcd
//! members), `node` (a node and its faults), `flap` (link flapping), `checker` (invariants,
//! violations), `sampler` (the checker's thread), `arp` (wire probes), `procs` (dnsmasq in
//! `/proc`), `guest` (DHCP guests), `bmc` (the fake BMCs), `power` (the supervisor a BMC
//! powers, and power off), `boot` (the harness's side of power on and off), `runs` (the run
//! recorder), `runlog` (its interval logic).

mod arp;
mod bmc;
mod boot;
mod builder;
mod checker;
mod etcd;
mod flap;
mod guest;
mod node;
pub mod power;
mod procs;
mod runlog;
mod runs;
mod sampler;
mod switch;
mod testkit;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use bmc::{bmc_addr, require_ipmi_sim, Bmc, Power, BMC_HOST_BASE, BMC_USER, IPMI_PORT};
pub use boot::{PowerEvent, PowerEventKind};
pub use builder::{ClusterBuilder, CEPH_INTERVAL, DEFAULT_FLOATING};
pub use checker::{Checker, CheckerStats, Holding, Violation, ViolationKind};
pub use etcd::{EtcdCluster, MAX_MEMBERS};
pub use flap::Flap;
pub use guest::{DhcpGuest, DhcpLease};
pub use node::{Node, CUT_TABLE};
pub use power::NodeProcess;
pub use procs::DnsmasqProc;
pub use runlog::{
    DoubleRun, DoubleRuns, Evidence, Observation, RunInterval, RunLog, Seen, LIST_EVENT_GRACE,
};
pub use runs::{event_runs, state_runs, RunStats, Runs, LIST_PERIOD};
pub use switch::{Switch, BRIDGE};
pub use testkit::{pid_alive, Leftovers};

use crate::error::{HarnessError, Result};

/// Most nodes in a cluster.
pub const MAX_NODES: usize = 5;
/// The switch's address (on its bridge).
pub const SWITCH_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// Address of the first etcd member; the others follow.
pub const ETCD_HOST_BASE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 201);
/// The daemons' etcd key prefix (with the trailing slash).
pub const KEY_PREFIX: &str = "/debvisor/";

/// Address of node `i` (0-based): `192.0.2.<i + 1>`.
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, (i + 1) as u8)
}

/// Lock `m`, also when a panicking thread poisoned it (the harness must still tear down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Poll `f` every 25 ms until it returns `Some`, or fail with [`HarnessError::Timeout`]
/// naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                timeout,
                tail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A running cluster (see the module documentation); build it with [`Cluster::builder`].
#[derive(Debug)]
pub struct Cluster {
    checker: Option<Checker>,
    runs: Option<Runs>,
    nodes: Vec<Node>,
    /// The cluster's Ceph ([`ClusterBuilder::ceph`]); dropped after the nodes (their guests
    /// gone), before the switch namespace it runs in.
    ceph: Option<crate::CephCluster>,
    /// UUID of the libvirt secret holding its key on every node's libvirtd.
    ceph_secret: Option<String>,
    etcd: EtcdCluster,
    switch: Switch,
    floating: Option<Ipv4Addr>,
    keepalive_interval: Duration,
    lease_ttl: Duration,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A builder with the defaults (3 nodes, 3 etcd members; see [`ClusterBuilder`]).
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Node `i` (0-based: `node(0)` is `c1`).
    ///
    /// # Panics
    /// If there is no node `i`.
    #[track_caller]
    pub fn node(&self, i: usize) -> &Node {
        match self.nodes.get(i) {
            Some(n) => n,
            None => panic!("no node {i}: the cluster has {}", self.nodes.len()),
        }
    }

    /// Every node, in index order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node_named(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    /// The node that has a link with MAC `mac` (`aa:bb:…`), e.g. the server of a
    /// [`DhcpLease`].
    pub fn node_of_mac(&self, mac: &str) -> Option<&Node> {
        let mac = mac.to_ascii_lowercase();
        self.nodes.iter().find(|n| {
            n.exec_ok("ip", &["-j", "link", "show"])
                .ok()
                .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
                .is_some_and(|v| {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .any(|l| l["address"].as_str() == Some(mac.as_str()))
                })
        })
    }

    /// The etcd cluster.
    pub fn etcd(&self) -> &EtcdCluster {
        &self.etcd
    }

    /// The switch.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The invariant checker.
    ///
    /// # Panics
    /// If the cluster was built with `.checker(false)`.
    #[track_caller]
    pub fn checker(&self) -> &Checker {
        match &self.checker {
            Some(c) => c,
            None => panic!("the cluster was built without a checker"),
        }
    }

    /// The run recorder (where each VM runs, double runs).
    ///
    /// # Panics
    /// If the cluster was built without `.track_runs(true)`.
    #[track_caller]
    pub fn runs(&self) -> &Runs {
        match &self.runs {
            Some(r) => r,
            None => panic!("the cluster was built without .track_runs(true)"),
        }
    }

    /// The BMC of node `i` (0-based; see [`Bmc`]: `address()`, `port()`, `user()`,
    /// `password_file()`, `power_off()`, `power_on()`, `power()`).
    ///
    /// # Panics
    /// If there is no node `i` or the cluster was built without `.bmcs(true)`.
    #[track_caller]
    pub fn bmc(&self, i: usize) -> &Bmc {
        self.node(i).bmc()
    }

    /// The file with the BMCs' password (mode 0600; exists when built with `.bmcs(true)`).
    pub fn bmc_password_file(&self) -> std::path::PathBuf {
        self.dir.path().join(builder::BMC_PASSWORD_FILE)
    }

    /// The cluster's Ceph, in the switch namespace at [`SWITCH_ADDR`]: its `ceph`/`rbd`
    /// helpers run there.
    ///
    /// # Panics
    /// If the cluster was built without `.ceph(true)`.
    #[track_caller]
    pub fn ceph(&self) -> &crate::CephCluster {
        match &self.ceph {
            Some(c) => c,
            None => panic!("the cluster was built without .ceph(true)"),
        }
    }

    /// UUID of the libvirt `ceph` secret defined on every node's libvirtd (built with
    /// `.ceph(true)`).
    ///
    /// # Panics
    /// If the cluster was built without `.ceph(true)`.
    #[track_caller]
    pub fn ceph_secret(&self) -> &str {
        match &self.ceph_secret {
            Some(s) => s,
            None => panic!("the cluster was built without .ceph(true)"),
        }
    }

    /// The `<disk>` element of RBD volume `pool/image` of the cluster's Ceph as guest device
    /// `dev`, valid on every node (mon by the switch's address, cephx through
    /// [`Cluster::ceph_secret`]); add it with [`crate::rbd_guest::with_devices`].
    #[track_caller]
    pub fn rbd_disk_xml(&self, pool: &str, image: &str, dev: &str) -> String {
        crate::rbd_guest::rbd_disk_xml(self.ceph(), self.ceph_secret(), pool, image, dev)
    }

    /// The floating address of the cluster host network, if configured.
    pub fn floating(&self) -> Option<Ipv4Addr> {
        self.floating
    }

    /// The daemons' keepalive interval.
    pub fn keepalive_interval(&self) -> Duration {
        self.keepalive_interval
    }

    /// The daemons' lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The cluster's temp directory (node state dirs live in `<dir>/<node>/state`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGKILL etcd member `i` (0-based); see [`EtcdCluster::kill_member`].
    pub fn kill_member(&self, i: usize) -> Result<Instant> {
        self.etcd.kill_member(i)
    }

    /// Restart etcd member `i` and wait until it is back; see
    /// [`EtcdCluster::restart_member`].
    pub fn restart_member(&self, i: usize) -> Result<Instant> {
        self.etcd.restart_member(i)
    }

    /// The value at `/debvisor/<key>`, if present.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        self.etcd.get(key)
    }

    /// Keys (relative to `/debvisor/`) and values under `/debvisor/<prefix>`.
    pub fn etcd_get_prefix(&self, prefix: &str) -> Result<BTreeMap<String, String>> {
        self.etcd.get_prefix(prefix)
    }

    /// Put `value` at `/debvisor/<key>`.
    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        self.etcd.put(key, value)
    }

    /// Put every `(key, value)` under `/debvisor/` in one transaction.
    pub fn etcd_put_all(&self, pairs: &[(&str, &str)]) -> Result<()> {
        self.etcd.put_all(pairs)
    }

    /// Delete every key under `/debvisor/<prefix>`; how many were deleted.
    pub fn etcd_delete_prefix(&self, prefix: &str) -> Result<i64> {
        self.etcd.delete_prefix(prefix)
    }

    /// `coordinator_state` of every node that has one, by node name.
    pub fn coordinator_states(&self) -> Result<BTreeMap<String, String>> {
        self.node_field("coordinator_state")
    }

    /// The node holding a lease whose `coordinator_state` is `primary` in etcd (`None`: no
    /// primary; a node whose lease expired is dead, its last state is stale). An error if
    /// several are.
    pub fn primary(&self) -> Result<Option<String>> {
        let alive = self.alive_nodes()?;
        let primaries: Vec<String> = self
            .coordinator_states()?
            .into_iter()
            .filter(|(n, s)| s == "primary" && alive.contains(n))
            .map(|(n, _)| n)
            .collect();
        match primaries.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.clone())),
            many => Err(HarnessError::State(format!(
                "several nodes are primary in etcd: {many:?}"
            ))),
        }
    }

    /// The nodes whose `alive` key exists (their lease is live), sorted.
    pub fn alive_nodes(&self) -> Result<Vec<String>> {
        Ok(self.node_field("alive")?.into_keys().collect())
    }

    /// `daemon_state` of node `name` in etcd.
    pub fn daemon_state(&self, name: &str) -> Result<Option<String>> {
        self.etcd_get(&format!("nodes/{name}/daemon_state"))
    }

    /// `nodes/<node>/<field>` of every node that has it, by node name.
    fn node_field(&self, field: &str) -> Result<BTreeMap<String, String>> {
        let suffix = format!("/{field}");
        Ok(self
            .etcd_get_prefix("nodes/")?
            .into_iter()
            .filter_map(|(k, v)| {
                let node = k.strip_prefix("nodes/")?.strip_suffix(&suffix)?;
                (!node.contains('/')).then(|| (node.to_owned(), v))
            })
            .collect())
    }

    /// PIDs of every process the cluster started and that runs now: daemons, libvirtds,
    /// BMCs (`ipmi_sim` and the supervisor), etcd members, Ceph daemons (for tests checking
    /// that nothing survives the drop).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.nodes.iter().filter_map(Node::pid).collect();
        pids.extend(
            self.nodes
                .iter()
                .filter_map(|n| n.libvirt().filter(|l| l.is_running()))
                .map(|l| l.libvirtd_pid()),
        );
        pids.extend(
            self.nodes
                .iter()
                .filter_map(Node::try_bmc)
                .flat_map(Bmc::pids),
        );
        pids.extend(self.etcd.pids());
        pids.extend(self.ceph.iter().flat_map(crate::CephCluster::pids));
        pids
    }

    /// Names of every namespace of the cluster (switch, nodes, etcd members).
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.switch.netns().name().to_owned()];
        names.extend(self.nodes.iter().map(|n| n.netns().name().to_owned()));
        names.extend(
            (0..self.etcd.len())
                .filter_map(|i| self.etcd.netns(i).ok().map(|ns| ns.name().to_owned())),
        );
        names
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The checker first: its sockets live in the namespaces about to go.
        if let Some(c) = &self.checker {
            c.stop();
        }
        if let Some(r) = &self.runs {
            r.stop();
        }
        // The BMCs next, so none powers a node on (or off) under the teardown.
        for n in &self.nodes {
            if let Some(b) = &n.bmc {
                b.shutdown();
            }
        }
        // All daemons at once (a daemon cut from etcd may take its whole grace period).
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                // SAFETY: kill(2) of our own daemons (SIGCONT first: a frozen one cannot
                // handle SIGTERM).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGCONT);
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            n.stopped.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && self.nodes.iter().any(Node::is_running) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for n in &self.nodes {
            if let Some(pid) = n.pid() {
                // SAFETY: kill(2) of our own daemon that did not stop within 3 s.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        // Fields drop next: nodes (SIGKILL what still runs, libvirtds, namespaces), Ceph, etcd
        // members and their namespaces, the switch, the temp dir.
    }
}
