//! Stage `objects`: build the Node, Network, Domain and Ceph objects — each a reactor that
//! lists its etcd prefix, watches it and reconciles the host — and the tasks that serve them
//! (libvirt events, the firewall worker, the Ceph monitor); the stage is done when every
//! reactor has completed its initial sync.

use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use debvisor_netconf::Netlink;
use debvisor_objects::domain::VmKind;
use debvisor_objects::fencing::{AfterFence, FencingPolicy};
use debvisor_objects::lease::LeaseState;
use debvisor_objects::network::NetworkKind;
use debvisor_objects::node::{NodeInfo, NodeKind, NodeReconciler, StatusThresholds};
use debvisor_objects::reactor::{Kind, Reconciler};
use debvisor_objects::{Reactor, ReactorOptions, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ceph::CephCli;
use crate::config::{Config, FenceAction, NodeMode};
use crate::fencer::Ipmi;
use crate::hypervisor::Libvirt;
use crate::keepalive::Keepalive;
use crate::reactors::ceph_monitor::{CephMonitor, CephMonitorView};
use crate::reactors::ceph_objects::{CephObjects, CephReactors};
use crate::reactors::domain::{spawn_event_listener, DomainHost, DomainReconciler};
use crate::reactors::duties;
use crate::reactors::fencing::Fencing;
use crate::reactors::network::{FirewallSync, NetworkHost, NetworkReconciler};
use crate::reactors::role::RoleSender;
use crate::vmstats::{Sampler, SamplerConfig};

/// Longest wait for the client networks to follow a role change.
const DUTY_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the primary's fencing executor looks at the cluster view.
const FENCING_TICK: Duration = Duration::from_millis(250);

/// Where dnsmasq is run from for managed networks.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// What the objects are built from: the results of the earlier stages.
pub struct Inputs<'a> {
    /// The configuration.
    pub cfg: &'a Config,
    /// The store.
    pub store: &'a Store,
    /// The host's netlink handle.
    pub netlink: Arc<Netlink>,
    /// The firewall, when enabled.
    pub firewall: Option<FirewallSync>,
    /// The libvirt driver.
    pub libvirt: &'a Libvirt,
    /// The node lease (replaced on re-registration).
    pub lease: Arc<AtomicI64>,
    /// `info` as registered.
    pub registered_info: NodeInfo,
    /// `info` after the hypervisor check.
    pub info: NodeInfo,
    /// Whether this node is the primary now (fed by the election).
    pub role: RoleSender,
    /// The node lease as its keeper sees it (`valid_until`): the start guard and the
    /// self-fence follow it.
    pub lease_state: watch::Receiver<LeaseState>,
}

/// The objects of this node and the tasks that serve them.
pub struct Objects {
    /// Every node of the cluster.
    pub nodes: Arc<Reactor<NodeKind>>,
    /// Client networks.
    pub networks: Arc<Reactor<NetworkKind>>,
    /// VMs.
    pub vms: Arc<Reactor<VmKind>>,
    /// The Domain object's host side.
    pub domains: Arc<DomainHost>,
    /// The Network object's host side.
    pub net_host: Arc<NetworkHost>,
    /// The Ceph driver when `ceph.enabled` (the Ceph objects, the collector and the Domain
    /// object's RBD lock hygiene share it).
    pub ceph: Option<Arc<CephCli>>,
    /// The pool and volume reactors when `ceph` is `Some`.
    pub ceph_objects: Option<Arc<CephReactors>>,
    /// The Ceph monitor's summary and pass duration when `ceph` is `Some` (`/metrics`).
    pub ceph_monitor: Option<CephMonitorView>,
    /// Cancels the tasks that serve the objects (and the run loop's tickers) at shutdown.
    pub tasks: CancellationToken,
}

/// Build and start every object; hands on the keepalive that reports them.
pub fn spawn(i: Inputs<'_>) -> (Objects, Keepalive) {
    let cfg = i.cfg;
    let node = cfg.node_name().to_string();
    let store = i.store;
    let primary = i.role.get().primary;
    let ceph = cfg
        .ceph
        .enabled
        .then(|| Arc::new(CephCli::from_config(&cfg.ceph)));
    let net_host = Arc::new(NetworkHost::new(
        node.clone(),
        store.clone(),
        i.netlink.clone(),
        crate::hostnet::host_context(&cfg.networking, primary),
        i.firewall,
        cfg.paths.run_dir.clone(),
        cfg.paths.state_dir.clone(),
        PathBuf::from(DNSMASQ),
    ));
    let tasks = CancellationToken::new();
    net_host.spawn_firewall_worker(tasks.clone());
    let networks = reactor(NetworkKind, NetworkReconciler(net_host.clone()), store, 1);
    let nodes = reactor(NodeKind, NodeReconciler::default(), store, 1);
    let lease_state = i.lease_state.clone();
    let domains = domain_host(
        DomainInputs {
            cfg,
            store,
            libvirt: i.libvirt,
            lease: &i.lease,
            lease_state: &lease_state,
            role: &i.role,
        },
        &nodes,
        &ceph,
        &tasks,
    );
    let vms = reactor(VmKind, DomainReconciler(domains.clone()), store, 8);
    spawn_event_listener(domains.clone(), vms.clone(), tasks.clone());
    let (sampler, stats) = Sampler::new(
        store.clone(),
        node.clone(),
        i.lease.clone(),
        i.libvirt.clone(),
        domains.clone(),
        SamplerConfig {
            sample_interval: cfg.domains.stats_sample_interval,
            write_interval: cfg.domains.stats_write_interval,
            budget: cfg.domains.stats_writes_per_tick as usize,
        },
    );
    sampler.spawn(domains.changes(), tasks.clone());
    let keepalive = Keepalive::new(
        store.clone(),
        node.clone(),
        i.lease,
        i.libvirt.clone(),
        i.registered_info,
        i.info,
    )
    .with_domains(domains.clone())
    .with_stats(stats);
    let (ceph_objects, ceph_monitor, keepalive) =
        spawn_ceph(cfg, store, &ceph, &i.role, &tasks, keepalive);
    spawn_duties(
        cfg,
        i.netlink,
        &net_host,
        &networks,
        &ceph_objects,
        &i.role,
        &tasks,
    );
    spawn_fencing(cfg, store, &nodes, &vms, &ceph, &i.role, &tasks);
    let peers = spawn_status_and_peers(cfg, store, &nodes, &i.role, &tasks);
    let keepalive = keepalive.with_peers(peers);
    let objects = Objects {
        nodes,
        networks,
        vms,
        domains,
        net_host,
        ceph,
        ceph_objects,
        ceph_monitor,
        tasks,
    };
    (objects, keepalive)
}

/// A reactor of `kind` with `workers` reconcilers (1: the default options), stopped by its
/// own shutdown.
fn reactor<K: Kind, R: Reconciler<K>>(
    kind: K,
    reconciler: R,
    store: &Store,
    workers: usize,
) -> Arc<Reactor<K>> {
    let opts = if workers > 1 {
        ReactorOptions {
            workers,
            ..ReactorOptions::default()
        }
    } else {
        ReactorOptions::default()
    };
    Arc::new(Reactor::spawn(
        kind,
        reconciler,
        store.clone(),
        opts,
        CancellationToken::new(),
    ))
}

/// Ceph health and state on its own timer, off the keepalive and lease path, and the pool
/// and volume reactors; the keepalive reports the monitor's summary.
fn spawn_ceph(
    cfg: &Config,
    store: &Store,
    ceph: &Option<Arc<CephCli>>,
    role: &RoleSender,
    tasks: &CancellationToken,
    mut keepalive: Keepalive,
) -> (
    Option<Arc<CephReactors>>,
    Option<CephMonitorView>,
    Keepalive,
) {
    let node = cfg.node_name().to_string();
    let primary = role.get().primary;
    let mut view = None;
    if ceph.is_some() {
        // Its own handle: the monitor reports a timeout once per outage, not per call.
        let cli = Arc::new(CephCli::from_config(&cfg.ceph).with_quiet_timeouts());
        let (mon, rx) = CephMonitor::new(cli, store.clone(), node.clone(), primary);
        let mon = mon.with_role(role.view());
        view = Some(CephMonitorView {
            health: rx.clone(),
            last_duration: mon.duration_handle(),
        });
        mon.spawn(cfg.ceph.interval, tasks.clone());
        keepalive = keepalive.with_ceph(rx);
    }
    let ceph_objects = ceph.as_ref().map(|c| {
        let objects = CephObjects::new(
            node.clone(),
            store.clone(),
            c.clone(),
            primary,
            cfg.ceph.interval,
        );
        Arc::new(CephReactors::spawn(Arc::new(objects), tasks.clone()))
    });
    (ceph_objects, view, keepalive)
}

/// The primary-only duties that a takeover waits for.
fn spawn_duties(
    cfg: &Config,
    netlink: Arc<Netlink>,
    net_host: &Arc<NetworkHost>,
    networks: &Arc<Reactor<NetworkKind>>,
    ceph_objects: &Option<Arc<CephReactors>>,
    role: &RoleSender,
    tasks: &CancellationToken,
) {
    duties::spawn_host_networks(
        cfg.node_name().to_string(),
        netlink,
        cfg.networking.clone(),
        cfg.keepalive.interval,
        role.duty("host-networks"),
        tasks.clone(),
    );
    duties::spawn_networks(
        net_host.clone(),
        networks.clone(),
        DUTY_SETTLE,
        role.duty("networks"),
        tasks.clone(),
    );
    duties::spawn_ceph(ceph_objects.clone(), role.duty("ceph"), tasks.clone());
}

/// What the Domain object's host side is built from.
struct DomainInputs<'a> {
    cfg: &'a Config,
    store: &'a Store,
    libvirt: &'a Libvirt,
    lease: &'a Arc<AtomicI64>,
    lease_state: &'a watch::Receiver<LeaseState>,
    role: &'a RoleSender,
}

/// The Domain object's host side: with the lease check on a clustered node, and its
/// self-fence when fencing is on.
fn domain_host(
    i: DomainInputs<'_>,
    nodes: &Arc<Reactor<NodeKind>>,
    ceph: &Option<Arc<CephCli>>,
    tasks: &CancellationToken,
) -> Arc<DomainHost> {
    let cfg = i.cfg;
    let mut host = DomainHost::new(
        cfg.node_name().to_string(),
        i.store.clone(),
        i.libvirt.clone(),
        i.lease.clone(),
        cfg.domains.clone(),
        i.role.view(),
        nodes.clone(),
    )
    .with_ceph(ceph.clone(), cfg.ceph.client_addresses.clone())
    .with_lease_history({
        let local = Arc::new(crate::registration::LocalState::new(&cfg.paths.state_dir));
        Arc::new(move || local.lease_history())
    });
    if cfg.node.mode == NodeMode::Clustered {
        // Starts only while the lease is good for the margin (another node may recover
        // this node's VMs once it expires).
        host = host.with_lease(
            i.lease_state.clone(),
            cfg.self_fence_margin(),
            cfg.fencing.self_fence_action,
        );
    }
    let domains = Arc::new(host);
    if cfg.self_fence_active() {
        crate::reactors::self_fence::spawn(
            domains.clone(),
            i.lease_state.clone(),
            cfg.self_fence_margin(),
            tasks.clone(),
        );
    }
    domains
}

/// The node status deriver (primary) and the peer round-trip prober (every node); the
/// prober's handle for the keepalive.
fn spawn_status_and_peers(
    cfg: &Config,
    store: &Store,
    nodes: &Arc<Reactor<NodeKind>>,
    role: &RoleSender,
    tasks: &CancellationToken,
) -> crate::peers::PeersRx {
    let node = cfg.node_name().to_string();
    let ns = &cfg.node_status;
    crate::reactors::node_status::spawn(
        store.clone(),
        nodes.clone(),
        node.clone(),
        role.view(),
        StatusThresholds {
            memory_percent: ns.memory_percent,
            load_percent_per_cpu: ns.load_percent_per_cpu,
            stale_after: cfg.keepalive.interval * ns.stale_ticks,
            rtt: ns.rtt,
        },
        cfg.keepalive.interval,
        tasks.clone(),
    );
    crate::peers::spawn(
        node,
        nodes.clone(),
        cfg.keepalive.interval,
        ns.rtt_peers_per_tick as usize,
        (ns.rtt * 2).max(std::time::Duration::from_millis(500)),
        tasks.clone(),
    )
}

/// The primary's fencing executor (it acts only while this node is primary).
fn spawn_fencing(
    cfg: &Config,
    store: &Store,
    nodes: &Arc<Reactor<NodeKind>>,
    vms: &Arc<Reactor<VmKind>>,
    ceph: &Option<Arc<CephCli>>,
    role: &RoleSender,
    tasks: &CancellationToken,
) {
    let f = &cfg.fencing;
    let after = |a: FenceAction| match a {
        FenceAction::Migrate => AfterFence::Migrate,
        FenceAction::None => AfterFence::None,
    };
    let policy = FencingPolicy {
        enabled: f.enabled,
        grace: cfg.fence_grace(),
        max_concurrent: f.max_concurrent as usize,
        window: f.window,
        max_per_window: f.max_per_window as usize,
        successful_fence: after(f.successful_fence),
        failed_fence: after(f.failed_fence),
        self_fence: cfg.self_fence_active(),
    };
    let call_timeout = (f.timeout / 4).clamp(Duration::from_secs(2), Duration::from_secs(10));
    crate::reactors::fencing::spawn(
        Fencing {
            store: store.clone(),
            nodes: nodes.clone(),
            vms: vms.clone(),
            me: cfg.node_name().to_string(),
            role: role.view(),
            policy,
            ipmi: f
                .ipmi
                .password_file
                .as_ref()
                .map(|p| Ipmi::new(p, call_timeout)),
            timeout: f.timeout,
            power_on_after: f.power_on_after,
            ceph: ceph.clone(),
            // Its tick is the rounding of the grace: cheap (the node cache, etcd only on a
            // decision), so short.
            interval: FENCING_TICK.min(cfg.keepalive.interval),
        },
        tasks.clone(),
    );
}

impl Objects {
    /// Wait until every reactor has completed its initial list; returns the stage detail.
    pub async fn synced(&self) -> String {
        self.nodes.wait_synced().await;
        self.networks.wait_synced().await;
        self.vms.wait_synced().await;
        if let Some(c) = &self.ceph_objects {
            c.wait_synced().await;
        }
        format!(
            "synced: {} nodes, {} networks, {} vms{}",
            self.nodes.list().len(),
            self.networks.list().len(),
            self.vms.list().len(),
            self.ceph_objects
                .as_ref()
                .map(|c| format!(", {}", c.describe()))
                .unwrap_or_default()
        )
    }

    /// Stop every reactor (each finishes its running reconcile) and the host side's
    /// processes of the networks; guests and networks stay as they are.
    pub async fn shutdown(&self) {
        self.vms.shutdown().await;
        self.nodes.shutdown().await;
        self.networks.shutdown().await;
        if let Some(c) = &self.ceph_objects {
            c.shutdown().await;
        }
        self.net_host.stop_all().await;
    }
}
