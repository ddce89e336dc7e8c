//! [`ClusterBuilder`]: what a [`Cluster`] is made of, and how it is brought up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::bmc::{self, bmc_addr, Bmc, BmcSpec};
use super::boot::{NodeParts, PowerState};
use super::checker::Checker;
use super::etcd::{EtcdCluster, MAX_MEMBERS};
use super::node::Node;
use super::runs::{Runs, Watched};
use super::sampler::{self, SamplerConfig};
use super::switch::{Switch, BRIDGE};
use super::{arp, node_addr, Cluster, MAX_NODES, SWITCH_ADDR};
use crate::ceph::CephCluster;
use crate::daemon::DaemonBuilder;
use crate::error::{HarnessError, IoContext, Result};
use crate::libvirt::random_uuid;
use crate::libvirt_pair::IsolatedLibvirt;
use crate::netns::NetNs;
use crate::rbd_guest::define_ceph_secret;

/// The default floating address of the cluster host network.
pub const DEFAULT_FLOATING: &str = "192.0.2.100/24";
/// The BMC password file in the cluster's temp dir.
pub(super) const BMC_PASSWORD_FILE: &str = "bmc.password";

/// How a [`Cluster`] is built; start with [`Cluster::builder`]. Defaults: 3 nodes (all
/// coordinators), 3 etcd members, keepalive interval 1 s and lease TTL 3 s, floating address
/// [`DEFAULT_FLOATING`], hypervisor `test:///default`, nodes started in index order all at
/// once, 60 s for each to reach `run`, the checker sampling every 75 ms; no BMCs, no run
/// recorder, no Ceph.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    etcd_members: usize,
    coordinators: Option<Vec<usize>>,
    keepalive_interval: Duration,
    lease_ttl: Duration,
    floating: Option<String>,
    env: Vec<(String, String)>,
    yaml: String,
    node_env: BTreeMap<usize, Vec<(String, String)>>,
    node_yaml: BTreeMap<usize, String>,
    isolated_libvirt: bool,
    start_order: Vec<usize>,
    deferred: BTreeSet<usize>,
    wait_each: bool,
    run_timeout: Duration,
    checker: bool,
    checker_period: Duration,
    arp_window: Duration,
    bmcs: bool,
    bmc_port_key: bool,
    track_runs: bool,
    ceph: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            nodes: 3,
            etcd_members: 3,
            coordinators: None,
            keepalive_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(3),
            floating: Some(DEFAULT_FLOATING.to_owned()),
            env: Vec::new(),
            yaml: String::new(),
            node_env: BTreeMap::new(),
            node_yaml: BTreeMap::new(),
            isolated_libvirt: false,
            start_order: Vec::new(),
            deferred: BTreeSet::new(),
            wait_each: false,
            run_timeout: Duration::from_secs(60),
            checker: true,
            checker_period: Duration::from_millis(75),
            arp_window: Duration::from_millis(25),
            bmcs: false,
            bmc_port_key: true,
            track_runs: false,
            ceph: false,
        }
    }
}

/// A duration as the daemon's config takes it (`3s`, `1500ms`).
fn config_duration(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl ClusterBuilder {
    /// Number of nodes, 1 to [`MAX_NODES`] (named `c1`…, at `192.0.2.1`…).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Number of etcd members: 1 to 3 (`e1`…, at `192.0.2.201`…).
    pub fn etcd_members(mut self, n: usize) -> Self {
        self.etcd_members = n;
        self
    }

    /// The nodes listed in `node.coordinators`, by index (default: all).
    pub fn coordinators(mut self, indices: &[usize]) -> Self {
        self.coordinators = Some(indices.to_vec());
        self
    }

    /// `keepalive.interval` and `keepalive.lease_ttl` of every daemon.
    pub fn keepalive(mut self, interval: Duration, lease_ttl: Duration) -> Self {
        self.keepalive_interval = interval;
        self.lease_ttl = lease_ttl;
        self
    }

    /// The floating address of the cluster host network (CIDR), `None` for none.
    pub fn floating(mut self, cidr: Option<&str>) -> Self {
        self.floating = cidr.map(str::to_owned);
        self
    }

    /// An environment variable for every daemon (after the harness's, so it overrides them).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// YAML for every daemon's config file. The harness's own settings travel as environment
    /// variables (which win over the file), so any section may appear here.
    pub fn yaml(mut self, yaml: &str) -> Self {
        self.yaml.push_str(yaml);
        if !self.yaml.ends_with('\n') {
            self.yaml.push('\n');
        }
        self
    }

    /// An environment variable for node `i` only (after every other).
    pub fn node_env(mut self, i: usize, key: &str, value: &str) -> Self {
        self.node_env
            .entry(i)
            .or_default()
            .push((key.to_owned(), value.to_owned()));
        self
    }

    /// YAML for node `i` only, appended after the common YAML (do not repeat a top-level
    /// key of it: duplicate keys are errors).
    pub fn node_yaml(mut self, i: usize, yaml: &str) -> Self {
        let y = self.node_yaml.entry(i).or_default();
        y.push_str(yaml);
        if !y.ends_with('\n') {
            y.push('\n');
        }
        self
    }

    /// Give every node its own isolated libvirtd (in the node's namespace, listening on the
    /// node's address) instead of `test:///default`, for tests with real guests.
    pub fn isolated_libvirt(mut self, yes: bool) -> Self {
        self.isolated_libvirt = yes;
        self
    }

    /// Start these nodes first, in this order; the others follow in index order.
    pub fn start_order(mut self, order: &[usize]) -> Self {
        self.start_order = order.to_vec();
        self
    }

    /// Do not start these nodes' daemons at build time ([`super::Node::start`] later).
    pub fn defer_start(mut self, indices: &[usize]) -> Self {
        self.deferred.extend(indices.iter().copied());
        self
    }

    /// Wait for each node to reach `run` before starting the next (default: start all, then
    /// wait for all).
    pub fn wait_each(mut self, yes: bool) -> Self {
        self.wait_each = yes;
        self
    }

    /// How long each node may take to reach `run` at build time.
    pub fn run_timeout(mut self, timeout: Duration) -> Self {
        self.run_timeout = timeout;
        self
    }

    /// Run the invariant checker (default: yes).
    pub fn checker(mut self, yes: bool) -> Self {
        self.checker = yes;
        self
    }

    /// Time between the starts of two checker samples.
    pub fn checker_period(mut self, period: Duration) -> Self {
        self.checker_period = period;
        self
    }

    /// Give every node a fake BMC ([`super::Bmc`]: `ipmi_sim` on the switch, powering the
    /// node) and tell each daemon its BMC (`fencing.ipmi.host`, `.user`, `.password_file`,
    /// `.port` with [`ClusterBuilder::bmc_port_key`]; given before
    /// [`ClusterBuilder::env`] and [`ClusterBuilder::node_env`], which may override them).
    pub fn bmcs(mut self, yes: bool) -> Self {
        self.bmcs = yes;
        self
    }

    /// Shorthand for `.bmcs(true)`.
    pub fn with_bmcs(self) -> Self {
        self.bmcs(true)
    }

    /// Also give each daemon `fencing.ipmi.port` (`DEBVISOR_FENCING_IPMI_PORT=623`, see
    /// [`super::IPMI_PORT`]) with [`ClusterBuilder::bmcs`]. Off by default: a daemon built
    /// without that key refuses the variable, and 623 is its default anyway.
    pub fn bmc_port_key(mut self, yes: bool) -> Self {
        self.bmc_port_key = yes;
        self
    }

    /// Record where every VM runs ([`super::Runs`], from the nodes' libvirtds; needs
    /// [`ClusterBuilder::isolated_libvirt`]).
    pub fn track_runs(mut self, yes: bool) -> Self {
        self.track_runs = yes;
        self
    }

    /// A one-host Ceph ([`crate::CephCluster`], one memstore OSD) in the switch namespace,
    /// bound to the switch's address, so every node reaches it over the cluster network:
    /// each daemon gets `ceph.enabled` with its conf and `client.admin` keyring
    /// (`ceph.interval` [`CEPH_INTERVAL`], no coordinator units; given before
    /// [`ClusterBuilder::env`], which may override them), and each isolated libvirtd the
    /// cephx key as libvirt secret [`Cluster::ceph_secret`] (for
    /// [`Cluster::rbd_disk_xml`]). Needs [`ClusterBuilder::isolated_libvirt`]; the caller
    /// checks [`crate::ceph_installed`] first. Started beside the nodes' libvirtds.
    pub fn ceph(mut self, yes: bool) -> Self {
        self.ceph = yes;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HarnessError::State(m));
        if self.track_runs && !self.isolated_libvirt {
            return bad("track_runs needs isolated_libvirt".into());
        }
        if self.ceph && !self.isolated_libvirt {
            return bad("ceph needs isolated_libvirt (its secret lives in each libvirtd)".into());
        }
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return bad(format!("1 to {MAX_NODES} nodes, not {}", self.nodes));
        }
        if !(1..=MAX_MEMBERS).contains(&self.etcd_members) {
            return bad(format!(
                "1 to {MAX_MEMBERS} etcd members, not {}",
                self.etcd_members
            ));
        }
        let indices = self
            .coordinators
            .iter()
            .flatten()
            .chain(&self.start_order)
            .chain(&self.deferred)
            .chain(self.node_env.keys())
            .chain(self.node_yaml.keys());
        for i in indices {
            if *i >= self.nodes {
                return bad(format!("node index {i} out of range (0..{})", self.nodes));
            }
        }
        let unique: BTreeSet<_> = self.start_order.iter().collect();
        if unique.len() != self.start_order.len() {
            return bad(format!("start order {:?} repeats a node", self.start_order));
        }
        Ok(())
    }

    /// The daemon of node `i`.
    fn daemon(
        &self,
        i: usize,
        cluster: &Cluster,
        ns: &NetNs,
        lv: Option<&IsolatedLibvirt>,
    ) -> DaemonBuilder {
        let name = node_name(i);
        let coordinators: Vec<String> = match &self.coordinators {
            Some(c) => c.iter().map(|&i| node_name(i)).collect(),
            None => (0..self.nodes).map(node_name).collect(),
        };
        let mut b = DaemonBuilder::new(&name)
            .netns(ns.name())
            .endpoints(&cluster.etcd.endpoints())
            .state_dir(cluster.dir.path().join(&name).join("state"))
            .env("DEBVISOR_NODE_MODE", "clustered")
            .env("DEBVISOR_NODE_COORDINATORS", &coordinators.join(","))
            .env(
                "DEBVISOR_KEEPALIVE_INTERVAL",
                &config_duration(self.keepalive_interval),
            )
            .env(
                "DEBVISOR_KEEPALIVE_LEASE_TTL",
                &config_duration(self.lease_ttl),
            )
            .env("DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_DEVICE", "eth0")
            .env(
                "DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_ADDRESSES",
                &format!("{}/24", node_addr(i)),
            );
        if let Some(f) = &self.floating {
            b = b.env("DEBVISOR_NETWORKING_HOST_NETWORKS_CLUSTER_FLOATING", f);
        }
        if let Some(lv) = lv {
            b = b
                .env("DEBVISOR_HYPERVISOR_URI", &lv.local_uri())
                .env("DEBVISOR_HYPERVISOR_PEER_URI", &lv.peer_uri());
        }
        if self.bmcs {
            let file = cluster.dir.path().join(BMC_PASSWORD_FILE);
            for (k, v) in bmc::daemon_env(bmc_addr(i), &file, self.bmc_port_key) {
                b = b.env(&k, &v);
            }
        }
        if let Some(ceph) = &cluster.ceph {
            for (k, v) in ceph_env(ceph) {
                b = b.env(k, &v);
            }
        }
        for (k, v) in self
            .env
            .iter()
            .chain(self.node_env.get(&i).into_iter().flatten())
        {
            b = b.env(k, v);
        }
        let yaml = format!(
            "{}{}",
            self.yaml,
            self.node_yaml.get(&i).map(String::as_str).unwrap_or("")
        );
        if !yaml.trim().is_empty() {
            b = b.yaml(&yaml);
        }
        b
    }

    /// Bring the cluster up: switch, etcd (with a leader), node namespaces (and libvirtds),
    /// the checker, then the daemons in start order, each awaited in `run`. Whatever was
    /// already created is torn down if a step fails.
    pub fn build(self) -> Result<Cluster> {
        self.validate()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("dvcl-{}-", std::process::id()))
            .tempdir()
            .ctx(|| "creating the cluster temp dir".to_owned())?;
        let switch = Switch::create(SWITCH_ADDR)?;
        // Ceph comes up beside etcd and the libvirtds (it takes the longest).
        let pending_ceph = self.ceph.then(|| PendingCeph::start(switch.netns().name()));
        let token = format!(
            "dvcl-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let etcd = EtcdCluster::start(&switch, self.etcd_members, &token)?;
        let floating = match &self.floating {
            Some(f) => Some(
                f.split('/')
                    .next()
                    .and_then(|a| a.parse::<Ipv4Addr>().ok())
                    .ok_or_else(|| {
                        HarnessError::State(format!("floating address {f:?} is not IPv4 CIDR"))
                    })?,
            ),
            None => None,
        };
        let mut cluster = Cluster {
            checker: None,
            runs: None,
            nodes: Vec::new(),
            etcd,
            switch,
            floating,
            keepalive_interval: self.keepalive_interval,
            lease_ttl: self.lease_ttl,
            ceph: None,
            ceph_secret: None,
            dir,
        };
        let mut hosts = Vec::new();
        for i in 0..self.nodes {
            let name = node_name(i);
            let addr = node_addr(i);
            let ns = NetNs::create(&format!("dvcl-{name}"))?;
            cluster.switch.attach(&ns, &name, addr)?;
            let libvirt = if self.isolated_libvirt {
                Some(Arc::new(IsolatedLibvirt::start(&name, &ns, addr)?))
            } else {
                None
            };
            // The libvirtd before its namespace, should the build fail now (tuple field order).
            hosts.push((name, addr, libvirt, ns));
        }
        if let Some(p) = pending_ceph {
            let ceph = p.join()?;
            let (key, uuid) = (ceph.client_key()?, random_uuid());
            for lv in hosts.iter().filter_map(|h| h.2.as_ref()) {
                define_ceph_secret(&lv.local_uri(), &key, &uuid)?;
            }
            cluster.ceph = Some(ceph);
            cluster.ceph_secret = Some(uuid);
        }
        for (i, (name, addr, libvirt, ns)) in hosts.into_iter().enumerate() {
            let ns_inode = crate::libvirt_pair::netns_inode(&ns)?;
            let node_dir = cluster.dir.path().join(&name);
            std::fs::create_dir_all(node_dir.join("state"))
                .ctx(|| format!("creating {}", node_dir.display()))?;
            let builder = self.daemon(i, &cluster, &ns, libvirt.as_deref());
            cluster.nodes.push(Node {
                index: i,
                name,
                addr,
                builder,
                daemon: Arc::new(Mutex::new(None)),
                stopped: Arc::new(AtomicBool::new(false)),
                etcd_cut: AtomicBool::new(false),
                guests: AtomicUsize::new(0),
                switch_ns: cluster.switch.netns().name().to_owned(),
                etcd_addrs: (0..cluster.etcd.len())
                    .filter_map(|m| cluster.etcd.addr(m).ok())
                    .collect(),
                dir: node_dir,
                ns_inode,
                bmc: None,
                libvirt,
                ns,
            });
        }
        if self.track_runs {
            cluster.runs = Some(Runs::start(watched(&cluster.nodes))?);
        }
        if self.bmcs {
            start_bmcs(&mut cluster, self.bmc_port_key)?;
        }
        if self.checker {
            let checker = Checker::new();
            cluster.checker = Some(checker.clone());
            let cfg = SamplerConfig {
                nodes: cluster
                    .nodes
                    .iter()
                    .map(|n| (n.name.clone(), n.ns.name().to_owned()))
                    .collect(),
                switch_ns: cluster.switch.netns().name().to_owned(),
                switch_mac: switch_mac(&cluster.switch)?,
                switch_addr: SWITCH_ADDR,
                floating: floating.into_iter().map(Into::into).collect(),
                endpoints: cluster.etcd.endpoints(),
                period: self.checker_period,
                arp_window: self.arp_window,
            };
            sampler::start(cfg, &checker)?;
        }
        let mut order: Vec<usize> = self.start_order.clone();
        order.extend((0..self.nodes).filter(|i| !self.start_order.contains(i)));
        order.retain(|i| !self.deferred.contains(i));
        for &i in &order {
            cluster.nodes[i].start()?;
            if self.wait_each {
                cluster.nodes[i].wait_run(self.run_timeout)?;
            }
        }
        if !self.wait_each {
            for &i in &order {
                cluster.nodes[i].wait_run(self.run_timeout)?;
            }
        }
        Ok(cluster)
    }
}

/// The Ceph of a cluster being built, started on a thread of its own; dropped unjoined (the
/// build failed) it still waits for the thread, so the cluster it made is torn down.
struct PendingCeph(Option<std::thread::JoinHandle<Result<CephCluster>>>);

impl PendingCeph {
    /// Start a one-OSD Ceph in namespace `switch_ns`, bound to the switch's address.
    fn start(switch_ns: &str) -> PendingCeph {
        let ns = switch_ns.to_owned();
        PendingCeph(Some(std::thread::spawn(move || {
            CephCluster::start_in(&ns, SWITCH_ADDR.into(), 1)
        })))
    }

    /// Wait for the cluster.
    fn join(mut self) -> Result<CephCluster> {
        match self.0.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(HarnessError::State(
                "the thread starting Ceph panicked".into(),
            )),
            None => Err(HarnessError::State("Ceph was already joined".into())),
        }
    }
}

impl Drop for PendingCeph {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// How often each daemon of a cluster with Ceph asks Ceph how it is (`ceph.interval`): far
/// apart, every pass is a few `ceph` CLI calls per node on a small CI machine.
pub const CEPH_INTERVAL: &str = "60s";

/// The daemon settings of a cluster's Ceph ([`ClusterBuilder::ceph`]).
fn ceph_env(ceph: &CephCluster) -> Vec<(&'static str, String)> {
    vec![
        ("DEBVISOR_CEPH_ENABLED", "true".into()),
        ("DEBVISOR_CEPH_CONF", ceph.conf_path().display().to_string()),
        ("DEBVISOR_CEPH_CLIENT", ceph.client().into()),
        (
            "DEBVISOR_CEPH_KEYRING",
            ceph.keyring_path().display().to_string(),
        ),
        ("DEBVISOR_CEPH_INTERVAL", CEPH_INTERVAL.into()),
        ("DEBVISOR_CEPH_COORDINATOR_UNITS", String::new()),
    ]
}

/// What the run recorder watches of each node (those with an isolated libvirtd).
fn watched(nodes: &[Node]) -> Vec<Watched> {
    nodes
        .iter()
        .filter_map(|n| {
            let lv = n.libvirt.as_ref()?;
            Some(Watched {
                node: n.name.clone(),
                uri: lv.local_uri(),
                qemu_run_dir: lv.qemu_run_dir(),
            })
        })
        .collect()
}

/// Write the BMC password file, then start every node's BMC (its first power on: the
/// builder boots the node itself).
fn start_bmcs(cluster: &mut Cluster, port_key: bool) -> Result<()> {
    let password = bmc::random_password();
    let file = cluster.dir.path().join(BMC_PASSWORD_FILE);
    bmc::write_password_file(&file, &password)?;
    let switch_ns = cluster.switch.netns().name().to_owned();
    let runs = cluster.runs.clone();
    for n in &mut cluster.nodes {
        let parts = NodeParts {
            ns: n.ns.name().to_owned(),
            ns_inode: n.ns_inode,
            addr: n.addr,
            builder: n.builder.clone(),
            daemon: n.daemon.clone(),
            stopped: n.stopped.clone(),
            libvirt: n.libvirt.clone(),
        };
        let state = Arc::new(PowerState::new(&n.name, runs.clone()));
        let spec = BmcSpec {
            index: n.index,
            switch_ns: &switch_ns,
            password: &password,
            password_file: &file,
            dir: n.dir.join("bmc"),
            port_key,
        };
        n.bmc = Some(Bmc::start(spec, state, parts)?);
    }
    Ok(())
}

/// Name of node `i` (0-based): `c1`, `c2`, ….
pub(crate) fn node_name(i: usize) -> String {
    format!("c{}", i + 1)
}

/// The MAC of the switch bridge (`ip -j link show`).
fn switch_mac(switch: &Switch) -> Result<arp::Mac> {
    let out = switch
        .netns()
        .exec_cmd("ip", &["-j", "link", "show", "dev", BRIDGE])
        .output()
        .ctx(|| "ip -j link show".to_owned())?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| HarnessError::State(format!("ip -j link show {BRIDGE}: {e}")))?;
    v[0]["address"]
        .as_str()
        .and_then(arp::parse_mac)
        .ok_or_else(|| HarnessError::State(format!("no MAC for {BRIDGE} in {v}")))
}
