//! The daemon's life: staged startup, the run loop (keepalive tick, lease watch, signals)
//! and the graceful shutdown.
//!
//! Stages run in the fixed order of [`Stage::ALL`]; each is logged with its name, outcome
//! and duration and reported as sd_notify `STATUS=`. No stage sleeps for a fixed time.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_objects::domain::VmKind;
use debvisor_objects::lease::{self, LeaseState};
use debvisor_objects::node::{
    DaemonState, DomainState as DomainStateValue, NodeInfo, NodeKind, NodeReconciler,
};
use debvisor_objects::{Reactor, ReactorOptions, Store};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ceph::CephCli;
use crate::config::{Config, NodeMode, OnShutdown, ServiceBackend};
use crate::hypervisor::Libvirt;
use crate::keepalive::{Keepalive, TickOutcome};
use crate::reactors::ceph_objects::{CephObjects, CephReactors};
use crate::reactors::domain::{DomainHost, DomainReconciler};
use crate::reactors::network::{FirewallSync, NetworkHost, NetworkReconciler};
use crate::registration::{self, LocalState, RegisterError};
use crate::services::{ProcessSpec, Supervised};
use crate::signals::{self, Signal};
use crate::{logging, notify};
use debvisor_firewall::Nft;
use debvisor_netconf::Netlink;
use debvisor_objects::network::NetworkKind;
use std::path::PathBuf;

/// The startup stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Config,
    Directories,
    Logging,
    HostNetworking,
    Sysctl,
    CoordinatorServices,
    StoreConnection,
    TerminationHandling,
    SelfRegistration,
    HypervisorCheck,
    Firewall,
    Objects,
    Keepalive,
}

impl Stage {
    /// Every stage in startup order.
    pub const ALL: [Stage; 13] = [
        Stage::Config,
        Stage::Directories,
        Stage::Logging,
        Stage::HostNetworking,
        Stage::Sysctl,
        Stage::CoordinatorServices,
        Stage::StoreConnection,
        Stage::TerminationHandling,
        Stage::SelfRegistration,
        Stage::HypervisorCheck,
        Stage::Firewall,
        Stage::Objects,
        Stage::Keepalive,
    ];

    /// The `stage=` field value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Config => "config",
            Stage::Directories => "directories",
            Stage::Logging => "logging",
            Stage::HostNetworking => "host-networking",
            Stage::Sysctl => "sysctl",
            Stage::CoordinatorServices => "coordinator-services",
            Stage::StoreConnection => "store-connection",
            Stage::TerminationHandling => "termination-handling",
            Stage::SelfRegistration => "self-registration",
            Stage::HypervisorCheck => "hypervisor-check",
            Stage::Firewall => "firewall",
            Stage::Objects => "objects",
            Stage::Keepalive => "keepalive",
        }
    }
}

/// Log a finished stage and report it to systemd.
fn stage_done(node: &str, stage: Stage, started: Instant, outcome: &str, detail: &str) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    info!(node = %node, stage = stage.name(), outcome, duration_ms = format!("{ms:.1}"), detail, "stage complete");
    notify::status(&format!("stage {}: {outcome}", stage.name()));
}

fn stage_failed(node: &str, stage: Stage, started: Instant, err: &str) -> ExitCode {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    error!(node = %node, stage = stage.name(), outcome = "failed", duration_ms = format!("{ms:.1}"), error = %err, "stage failed; exiting");
    notify::status(&format!("stage {} failed: {err}", stage.name()));
    ExitCode::from(1)
}

/// Connect and probe with backoff until `deadline`; each attempt is logged.
pub async fn connect_store(cfg: &Config, deadline: Duration) -> Result<Store, String> {
    let opts = cfg.store_options();
    let until = Instant::now() + deadline;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let res = match Store::connect(&opts).await {
            Ok(store) => store.probe().await.map(|rev| (store, rev)),
            Err(e) => Err(e),
        };
        let err = match res {
            Ok((store, rev)) => {
                info!(node = %cfg.node_name(), stage = Stage::StoreConnection.name(), attempt, revision = rev,
                    endpoints = %opts.endpoints.join(","), "store answered");
                return Ok(store);
            }
            Err(e) => e,
        };
        // A bad local file (TLS key, password) will not fix itself.
        if matches!(err, debvisor_objects::StoreError::File { .. }) {
            return Err(err.to_string());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no etcd answered at {} within {:?} ({attempt} attempts); last error: {err}",
                opts.endpoints.join(","),
                deadline
            ));
        }
        let wait = debvisor_objects::reactor::backoff(
            Duration::from_millis(250),
            Duration::from_secs(5),
            attempt,
        )
        .min(left);
        warn!(node = %cfg.node_name(), stage = Stage::StoreConnection.name(), attempt, error = %err,
            retry_in_ms = wait.as_millis() as u64, endpoints = %opts.endpoints.join(","), "store not reachable yet; retrying");
        tokio::time::sleep(wait).await;
    }
}

fn embedded_etcd_spec(cfg: &Config) -> ProcessSpec {
    let e = &cfg.store.embedded;
    let node = cfg.node_name();
    let client = format!("http://127.0.0.1:{}", e.client_port);
    let peer = format!("http://127.0.0.1:{}", e.peer_port);
    ProcessSpec {
        name: "etcd".into(),
        program: e.binary.clone(),
        args: vec![
            "--name".into(),
            node.into(),
            "--data-dir".into(),
            cfg.embedded_data_dir().display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("{node}={peer}"),
            "--log-level".into(),
            "warn".into(),
        ],
        log_file: cfg.paths.state_dir.join("etcd.log"),
        pid_file: cfg.paths.run_dir.join("etcd.pid"),
    }
}

fn base_info(cfg: &Config, node_id: &str) -> NodeInfo {
    let mut info = crate::keepalive::refresh_info(&NodeInfo::default(), None);
    info.version = env!("CARGO_PKG_VERSION").to_string();
    info.fqdn = cfg.node.fqdn.clone();
    info.rack = cfg.node.rack.clone();
    info.node_id = node_id.to_string();
    info.libvirt_uri = Some(cfg.hypervisor.published_uri().to_string());
    info
}

/// Whether coordinator units (etcd, Ceph) are started through systemd (`services.backend`).
fn units_by_systemd(cfg: &Config) -> bool {
    match cfg.services.backend {
        ServiceBackend::Systemd => true,
        ServiceBackend::Process => false,
        ServiceBackend::Auto => crate::services::systemd_is_pid1(),
    }
}

/// Everything the run loop and the shutdown need.
struct Running {
    cfg: Config,
    store: Store,
    local: LocalState,
    node_id: String,
    lease: Arc<AtomicI64>,
    lease_state: watch::Receiver<LeaseState>,
    lease_cancel: CancellationToken,
    nodes: Arc<Reactor<NodeKind>>,
    networks: Arc<Reactor<NetworkKind>>,
    vms: Arc<Reactor<VmKind>>,
    domains: Arc<DomainHost>,
    net_host: Arc<NetworkHost>,
    netlink: Arc<Netlink>,
    primary: bool,
    /// Taken by the run loop, which moves it into the ticker task.
    keepalive: Option<Keepalive>,
    /// Cancels the ticker task at shutdown.
    tasks: CancellationToken,
    libvirt: Libvirt,
    /// The Ceph driver when `ceph.enabled` (the Ceph objects, the collector and the Domain
    /// object's RBD lock hygiene share it).
    ceph: Option<Arc<CephCli>>,
    /// The pool and volume reactors when `ceph` is `Some`.
    ceph_objects: Option<CephReactors>,
    services: Vec<Supervised>,
    log: logging::LogHandle,
    config_path: std::path::PathBuf,
    info: NodeInfo,
}

/// Run the daemon with the config at `config_path`; returns the process exit code.
pub async fn run(config_path: &Path) -> ExitCode {
    // Stage 1-2 happen before logging exists: time them and log them once it does.
    let t_config = Instant::now();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cfg = match crate::config::load(config_path, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "debvisord: stage config failed: {}: {e}",
                config_path.display()
            );
            return ExitCode::from(2);
        }
    };
    let d_config = t_config.elapsed();
    let t_dirs = Instant::now();
    let mut dir_err = None;
    for d in [&cfg.paths.state_dir, &cfg.paths.run_dir] {
        if let Err(e) = std::fs::create_dir_all(d) {
            dir_err = Some(format!("{}: {e}", d.display()));
        }
    }
    let d_dirs = t_dirs.elapsed();

    let t = Instant::now();
    let log = match logging::init(&cfg.logging) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("debvisord: stage logging failed: {e}");
            return ExitCode::from(2);
        }
    };
    let node = cfg.node_name().to_string();
    info!(node = %node, version = env!("CARGO_PKG_VERSION"), config = %config_path.display(), pid = std::process::id(), "debvisord starting");
    info!(node = %node, stage = Stage::Config.name(), outcome = "ok", duration_ms = format!("{:.1}", d_config.as_secs_f64() * 1000.0),
        detail = format!("mode={} endpoints={}", cfg.node.mode.as_str(), cfg.store.endpoints.join(",")), "stage complete");
    if let Some(e) = dir_err {
        return stage_failed(&node, Stage::Directories, t_dirs, &e);
    }
    info!(node = %node, stage = Stage::Directories.name(), outcome = "ok", duration_ms = format!("{:.1}", d_dirs.as_secs_f64() * 1000.0),
        detail = format!("state={} run={}", cfg.paths.state_dir.display(), cfg.paths.run_dir.display()), "stage complete");
    stage_done(
        &node,
        Stage::Logging,
        t,
        "ok",
        &format!("target={} level={}", log.target, cfg.logging.level),
    );

    // Host networking: cluster/storage/upstream through rtnetlink, floating addresses on the
    // primary (a standalone node always is one; the election decides in a cluster).
    let t = Instant::now();
    let primary = cfg.node.mode == NodeMode::Standalone;
    let netlink = match Netlink::current() {
        Ok(n) => Arc::new(n),
        Err(e) => return stage_failed(&node, Stage::HostNetworking, t, &e.to_string()),
    };
    match crate::hostnet::ensure_host(&*netlink, &cfg.networking, primary).await {
        Ok(changes) => stage_done(
            &node,
            Stage::HostNetworking,
            t,
            "ok",
            &format!(
                "{}; {} changes",
                crate::hostnet::describe(&cfg.networking),
                changes.len()
            ),
        ),
        Err(e) => return stage_failed(&node, Stage::HostNetworking, t, &e.to_string()),
    }

    let t = Instant::now();
    if cfg.networking.sysctl.apply {
        let wanted = debvisor_netconf::sysctl::plan(&cfg.networking.sysctl);
        match debvisor_netconf::sysctl::apply(Path::new("/proc/sys"), &wanted) {
            Ok(changes) => {
                for c in &changes {
                    info!(node = %node, stage = Stage::Sysctl.name(), key = %c.key, before = %c.before, after = %c.after, "sysctl changed");
                }
                stage_done(
                    &node,
                    Stage::Sysctl,
                    t,
                    "ok",
                    &format!("{} keys verified, {} changed", wanted.len(), changes.len()),
                );
            }
            Err(e) => return stage_failed(&node, Stage::Sysctl, t, &e.to_string()),
        }
    } else {
        stage_done(
            &node,
            Stage::Sysctl,
            t,
            "skipped",
            "networking.sysctl.apply is false",
        );
    }

    let t = Instant::now();
    let mut services = Vec::new();
    let mut svc_detail = Vec::new();
    if cfg.node.mode == NodeMode::Standalone && cfg.store.embedded.enabled {
        if let Err(e) = std::fs::create_dir_all(cfg.embedded_data_dir()) {
            return stage_failed(
                &node,
                Stage::CoordinatorServices,
                t,
                &format!("{}: {e}", cfg.embedded_data_dir().display()),
            );
        }
        match Supervised::start(embedded_etcd_spec(&cfg)).await {
            Ok(s) => {
                svc_detail.push(format!(
                    "embedded etcd pid {} on 127.0.0.1:{}",
                    s.pid().unwrap_or(0),
                    cfg.store.embedded.client_port
                ));
                services.push(s);
            }
            Err(e) => return stage_failed(&node, Stage::CoordinatorServices, t, &e.to_string()),
        }
    }
    if cfg.is_coordinator() && !cfg.services.coordinator_units.is_empty() {
        if units_by_systemd(&cfg) {
            for unit in &cfg.services.coordinator_units {
                if let Err(e) =
                    crate::services::systemctl("start", unit, Duration::from_secs(90)).await
                {
                    return stage_failed(&node, Stage::CoordinatorServices, t, &e.to_string());
                }
                svc_detail.push(format!("{unit} started"));
            }
        } else {
            warn!(node = %node, stage = Stage::CoordinatorServices.name(), units = ?cfg.services.coordinator_units,
                "coordinator units configured but systemd is not PID 1; not started");
        }
    }
    let ceph_units = cfg.ceph_coordinator_units();
    // A Ceph unit that failed makes the stage `degraded` (found by `OUTCOME=degraded`).
    let mut ceph_unit_failed = false;
    if cfg.is_coordinator() && cfg.ceph.enabled && !ceph_units.is_empty() {
        if units_by_systemd(&cfg) {
            // A Ceph unit that does not start costs storage, not the node: VMs still run.
            for unit in &ceph_units {
                match crate::services::systemctl("start", unit, Duration::from_secs(90)).await {
                    Ok(()) => svc_detail.push(format!("{unit} started")),
                    Err(e) => {
                        warn!(node = %node, stage = Stage::CoordinatorServices.name(), unit = %unit, error = %e,
                            "ceph unit did not start; continuing without it");
                        svc_detail.push(format!("{unit} failed to start (warning: {e})"));
                        ceph_unit_failed = true;
                    }
                }
            }
        } else {
            svc_detail.push("ceph units not started: systemd is not PID 1".into());
        }
    }
    let svc_outcome = if svc_detail.is_empty() {
        "skipped"
    } else if ceph_unit_failed {
        "degraded"
    } else {
        "ok"
    };
    let svc_detail = if svc_detail.is_empty() {
        "no coordinator services for this node".to_string()
    } else {
        svc_detail.join(", ")
    };
    stage_done(
        &node,
        Stage::CoordinatorServices,
        t,
        svc_outcome,
        &svc_detail,
    );

    let t = Instant::now();
    let store = match connect_store(&cfg, cfg.store.startup_deadline).await {
        Ok(s) => s,
        Err(e) => {
            stop_services(&services).await;
            return stage_failed(&node, Stage::StoreConnection, t, &e);
        }
    };
    stage_done(
        &node,
        Stage::StoreConnection,
        t,
        "ok",
        &cfg.store.endpoints.join(","),
    );

    let t = Instant::now();
    let signals = match signals::install() {
        Ok(rx) => rx,
        Err(e) => return stage_failed(&node, Stage::TerminationHandling, t, &e.to_string()),
    };
    stage_done(
        &node,
        Stage::TerminationHandling,
        t,
        "ok",
        "SIGTERM/SIGINT: graceful shutdown; SIGHUP: reload log level",
    );

    let t = Instant::now();
    let local = LocalState::new(&cfg.paths.state_dir);
    let node_id = match local.node_id() {
        Ok(id) => id,
        Err(e) => return stage_failed(&node, Stage::SelfRegistration, t, &e.to_string()),
    };
    let info = base_info(&cfg, &node_id);
    let data = registration::data(
        &cfg,
        info.clone(),
        DaemonState::Init,
        &node_id,
        &crate::hostinfo::now_rfc3339(),
    );
    let lease_id = match registration::register(&store, &local, &data).await {
        Ok(l) => l,
        Err(e) => {
            stop_services(&services).await;
            return stage_failed(&node, Stage::SelfRegistration, t, &e.to_string());
        }
    };
    info!(node = %node, from = "stop", to = "init", reason = "registered", "daemon_state changed");
    let lease_cancel = CancellationToken::new();
    let lease_state = lease::spawn_keeper(
        store.clone(),
        node.clone(),
        lease_id,
        cfg.keepalive.lease_ttl,
        lease_cancel.clone(),
    );
    stage_done(
        &node,
        Stage::SelfRegistration,
        t,
        "ok",
        &format!(
            "lease {lease_id:x} ttl {:?}, node_id {node_id}",
            cfg.keepalive.lease_ttl
        ),
    );

    let t = Instant::now();
    let libvirt = Libvirt::new(&cfg.hypervisor.uri, cfg.hypervisor.timeout)
        .with_validation(cfg.hypervisor.validate_xml);
    let registered_info = info.clone();
    let info = match libvirt.probe().await {
        Ok(p) => {
            stage_done(
                &node,
                Stage::HypervisorCheck,
                t,
                "ok",
                &format!(
                    "{} libvirt {} ({} running, {} defined)",
                    cfg.hypervisor.uri, p.version, p.running, p.defined
                ),
            );
            let mut i = info;
            i.libvirt_version = Some(p.version);
            i
        }
        Err(e) => {
            // Not fatal: the node keeps its lease and reports libvirt=false in its health.
            warn!(node = %node, stage = Stage::HypervisorCheck.name(), error = %e, "libvirt not reachable; continuing degraded");
            stage_done(&node, Stage::HypervisorCheck, t, "degraded", &e.to_string());
            info
        }
    };

    let t = Instant::now();
    let firewall = if cfg.firewall.enabled {
        let sync = FirewallSync::new(
            cfg.firewall.clone(),
            crate::hostnet::cluster_cidrs(&cfg.networking),
            Nft::new(),
        );
        // The first ruleset already carries every network in etcd, so restarting the daemon
        // never drops guest traffic between the base table and the network chains.
        let nets = match crate::reactors::network::network_rules_from_store(&store, primary).await {
            Ok(n) => n,
            Err(e) => {
                warn!(node = %node, stage = Stage::Firewall.name(), error = %e, "cannot list networks; base ruleset only");
                Vec::new()
            }
        };
        let n = nets.len();
        match sync.sync(nets).await {
            Ok(changed) => stage_done(
                &node,
                Stage::Firewall,
                t,
                "ok",
                &format!(
                    "table inet debvisor with {n} networks ({})",
                    if changed {
                        "applied"
                    } else {
                        "already in place"
                    }
                ),
            ),
            Err(e) => {
                // Keep running: the resync tick retries, and the error names nft's complaint.
                error!(node = %node, stage = Stage::Firewall.name(), error = %e, "firewall not applied; retrying on every resync");
                stage_done(&node, Stage::Firewall, t, "degraded", &e);
            }
        }
        Some(sync)
    } else {
        stage_done(
            &node,
            Stage::Firewall,
            t,
            "skipped",
            "firewall.enabled is false",
        );
        None
    };

    let t = Instant::now();
    let ceph = cfg
        .ceph
        .enabled
        .then(|| Arc::new(CephCli::from_config(&cfg.ceph)));
    let net_host = Arc::new(NetworkHost::new(
        node.clone(),
        store.clone(),
        netlink.clone(),
        crate::hostnet::host_context(&cfg.networking, primary),
        firewall,
        cfg.paths.run_dir.clone(),
        cfg.paths.state_dir.clone(),
        PathBuf::from("/usr/sbin/dnsmasq"),
    ));
    let tasks = CancellationToken::new();
    net_host.spawn_firewall_worker(tasks.clone());
    let networks = Arc::new(Reactor::spawn(
        NetworkKind,
        NetworkReconciler(net_host.clone()),
        store.clone(),
        ReactorOptions::default(),
        CancellationToken::new(),
    ));
    let nodes = Arc::new(Reactor::spawn(
        NodeKind,
        NodeReconciler::default(),
        store.clone(),
        ReactorOptions::default(),
        CancellationToken::new(),
    ));
    let lease = Arc::new(AtomicI64::new(lease_id));
    let domains = Arc::new(
        DomainHost::new(
            node.clone(),
            store.clone(),
            libvirt.clone(),
            lease.clone(),
            cfg.domains.clone(),
            primary,
            nodes.clone(),
        )
        .with_ceph(ceph.clone(), cfg.ceph.client_addresses.clone()),
    );
    let vms = Arc::new(Reactor::spawn(
        VmKind,
        DomainReconciler(domains.clone()),
        store.clone(),
        ReactorOptions {
            workers: 8,
            ..ReactorOptions::default()
        },
        CancellationToken::new(),
    ));
    crate::reactors::domain::spawn_event_listener(domains.clone(), vms.clone(), tasks.clone());
    let keepalive = Keepalive::new(
        store.clone(),
        node.clone(),
        lease.clone(),
        libvirt.clone(),
        registered_info,
        info.clone(),
    )
    .with_domains(domains.clone(), cfg.domains.stats_writes_per_tick as usize);
    // Ceph health and state on its own timer, off the keepalive and lease path.
    let keepalive = match &ceph {
        Some(_) => {
            // Its own handle: the monitor reports a timeout once per outage, not per call.
            let cli = Arc::new(CephCli::from_config(&cfg.ceph).with_quiet_timeouts());
            let (mon, rx) = crate::reactors::ceph_monitor::CephMonitor::new(
                cli,
                store.clone(),
                node.clone(),
                primary,
            );
            mon.spawn(cfg.ceph.interval, tasks.clone());
            keepalive.with_ceph(rx)
        }
        None => keepalive,
    };
    let mut r = Running {
        cfg,
        store,
        local,
        node_id,
        lease,
        lease_state,
        lease_cancel,
        nodes,
        networks,
        vms,
        domains,
        net_host,
        netlink,
        primary,
        keepalive: Some(keepalive),
        tasks,
        libvirt,
        ceph,
        ceph_objects: None,
        services,
        log,
        config_path: config_path.to_path_buf(),
        info,
    };
    r.ceph_objects = r.ceph.as_ref().map(|c| {
        let objects = CephObjects::new(
            node.clone(),
            r.store.clone(),
            c.clone(),
            r.primary,
            r.cfg.ceph.interval,
        );
        CephReactors::spawn(Arc::new(objects), r.tasks.clone())
    });
    let mut signals = signals;
    tokio::select! {
        _ = async {
            r.nodes.wait_synced().await;
            r.networks.wait_synced().await;
            r.vms.wait_synced().await;
            if let Some(c) = &r.ceph_objects {
                c.wait_synced().await;
            }
        } => {}
        sig = signals.recv() => {
            info!(node = %node, signal = ?sig, "termination requested during startup");
            return shutdown(r, DaemonState::Init).await;
        }
    }
    stage_done(
        &node,
        Stage::Objects,
        t,
        "ok",
        &format!(
            "synced: {} nodes, {} networks, {} vms{}",
            r.nodes.list().len(),
            r.networks.list().len(),
            r.vms.list().len(),
            r.ceph_objects
                .as_ref()
                .map(|c| format!(", {}", c.describe()))
                .unwrap_or_default()
        ),
    );
    r.net_host.firewall_ready().await;

    let t = Instant::now();
    if let Some(ka) = r.keepalive.as_mut() {
        ka.tick().await;
    }
    if let Err(e) = registration::set_daemon_state(
        &r.store,
        &node,
        DaemonState::Init,
        DaemonState::Run,
        "every object completed its initial sync",
    )
    .await
    {
        warn!(node = %node, error = %e, "daemon_state run not written; will retry on the next tick");
    }
    stage_done(
        &node,
        Stage::Keepalive,
        t,
        "ok",
        &format!("tick every {:?}", r.cfg.keepalive.interval),
    );
    notify::ready(&format!("run: node {node}"));
    run_loop(r, signals).await
}

/// `domains.on_shutdown: flush`: drain this node before the daemon stops, bounded by
/// `domains.flush_timeout`; past it the daemon stops anyway and says what stayed.
async fn flush_before_stop(r: &Running) {
    let node = r.cfg.node_name().to_string();
    let drain = crate::reactors::drain::Drain::new(node.clone(), r.store.clone());
    if let Err(e) = drain
        .advance(
            DomainStateValue::Ready,
            DomainStateValue::Flush,
            "on_shutdown: flush",
        )
        .await
    {
        warn!(node = %node, error = %e, "on_shutdown flush: cannot request the drain; guests stay here");
        return;
    }
    let deadline = Instant::now() + r.cfg.domains.flush_timeout;
    loop {
        match drain.pass(&r.nodes, &r.vms).await {
            Ok(Some(DomainStateValue::Flushed)) => {
                info!(node = %node, "on_shutdown flush complete");
                return;
            }
            Ok(_) => {}
            Err(e) => warn!(node = %node, error = %e, "on_shutdown flush: drain pass failed"),
        }
        if Instant::now() >= deadline {
            warn!(node = %node, timeout_s = r.cfg.domains.flush_timeout.as_secs(), "on_shutdown flush did not finish in time; stopping with guests still here");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn stop_services(services: &[Supervised]) {
    for s in services {
        s.stop(Duration::from_secs(10)).await;
    }
}

/// The keepalive tick in its own task, so a slow tick (libvirt, store) never delays
/// signal handling; each outcome goes to the run loop.
fn spawn_ticker(
    mut ka: Keepalive,
    interval: Duration,
    cancel: CancellationToken,
) -> mpsc::Receiver<TickOutcome> {
    let (tx, rx) = mpsc::channel(4);
    let watchdog = notify::watchdog_enabled();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if watchdog {
                notify::watchdog();
            }
            let outcome = ka.tick().await;
            if tx.send(outcome).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Host-side resync on the keepalive tick, in its own task: host-network drift, the
/// firewall (a deleted rule comes back), and client networks deleted while we were away.
fn spawn_host_resync(r: &Running) {
    let cfg = r.cfg.networking.clone();
    let netlink = r.netlink.clone();
    let primary = r.primary;
    let net_host = r.net_host.clone();
    let networks = r.networks.clone();
    let vms = r.vms.clone();
    let nodes = r.nodes.clone();
    let domains = r.domains.clone();
    let drain = crate::reactors::drain::Drain::new(r.cfg.node_name().to_string(), r.store.clone());
    let cancel = r.tasks.clone();
    let interval = r.cfg.keepalive.interval;
    let node = r.cfg.node_name().to_string();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match crate::hostnet::ensure_host(&*netlink, &cfg, primary).await {
                Ok(changes) if !changes.is_empty() => {
                    info!(node = %node, changes = changes.len(), "host network drift corrected")
                }
                Ok(_) => {}
                Err(e) => warn!(node = %node, error = %e, "host networking resync failed"),
            }
            domains.resync(&vms).await;
            if let Err(e) = drain.pass(&nodes, &vms).await {
                warn!(node = %node, error = %e, "drain pass failed; retrying on the next tick");
            }
            net_host.resync_firewall().await;
            for vni in net_host.host_vnis().await {
                let id = vni.to_string();
                if networks.get(&id).is_none() {
                    info!(node = %node, network = vni, "bridge of a network no longer in etcd found; removing it");
                    networks.enqueue(&id);
                }
            }
        }
    });
}

async fn run_loop(mut r: Running, mut signals: mpsc::UnboundedReceiver<Signal>) -> ExitCode {
    let node = r.cfg.node_name().to_string();
    spawn_host_resync(&r);
    let Some(keepalive) = r.keepalive.take() else {
        error!(node = %node, "keepalive missing; internal error");
        return shutdown(r, DaemonState::Run).await;
    };
    let mut ticks = spawn_ticker(keepalive, r.cfg.keepalive.interval, r.tasks.clone());
    // False while daemon_state=run may be missing in the store (after an outage or a failed
    // re-registration); rewritten on the next successful tick.
    let mut state_written = true;
    loop {
        let lost = tokio::select! {
            sig = signals.recv() => match sig {
                Some(Signal::Terminate(name)) => {
                    info!(node = %node, signal = name, "termination requested; shutting down gracefully");
                    return shutdown(r, DaemonState::Run).await;
                }
                Some(Signal::Reload) => {
                    reload(&r);
                    false
                }
                None => false,
            },
            changed = r.lease_state.changed() => {
                changed.is_ok() && matches!(*r.lease_state.borrow(), LeaseState::Lost { .. })
            }
            outcome = ticks.recv() => {
                let Some(outcome) = outcome else {
                    error!(node = %node, "keepalive task ended; shutting down");
                    return shutdown(r, DaemonState::Run).await;
                };
                r.nodes.resync();
                r.networks.resync();
                if outcome == TickOutcome::StoreUnreachable {
                    state_written = false;
                } else if outcome == TickOutcome::Written && !state_written {
                    state_written = registration::ensure_daemon_state(&r.store, &node, DaemonState::Run, "store reachable again").await.is_ok();
                }
                outcome == TickOutcome::NotRegistered
            }
        };
        if lost {
            match reregister(&mut r).await {
                Ok(()) => state_written = true,
                Err(RegisterError::Duplicate { .. }) => {
                    error!(node = %node, "another daemon took this node name while our lease was lost; stopping");
                    return shutdown(r, DaemonState::Run).await;
                }
                Err(e) => {
                    state_written = false;
                    warn!(node = %node, error = %e, "re-registration failed; retrying on the next tick");
                }
            }
        }
    }
}

/// The lease is gone (etcd expired it, or `alive` was taken away): register again.
async fn reregister(r: &mut Running) -> Result<(), RegisterError> {
    let node = r.cfg.node_name().to_string();
    let old = r.lease.load(Ordering::SeqCst);
    warn!(node = %node, old_lease = format!("{old:x}"), "node lease lost; re-registering");
    r.lease_cancel.cancel();
    let info = crate::keepalive::refresh_info(&r.info, r.info.libvirt_version.clone());
    let data = registration::data(
        &r.cfg,
        info.clone(),
        DaemonState::Run,
        &r.node_id,
        &crate::hostinfo::now_rfc3339(),
    );
    let lease_id = registration::register(&r.store, &r.local, &data).await?;
    r.lease.store(lease_id, Ordering::SeqCst);
    r.lease_cancel = CancellationToken::new();
    r.lease_state = lease::spawn_keeper(
        r.store.clone(),
        node.clone(),
        lease_id,
        r.cfg.keepalive.lease_ttl,
        r.lease_cancel.clone(),
    );
    info!(node = %node, lease = format!("{lease_id:x}"), daemon_state = "run", "re-registered with a fresh lease");
    Ok(())
}

fn reload(r: &Running) {
    let node = r.cfg.node_name();
    let env: Vec<(String, String)> = std::env::vars().collect();
    match crate::config::load(&r.config_path, &env) {
        Ok(c) => match r.log.set_level(&c.logging.level) {
            Ok(()) => {
                info!(node = %node, log_level = %c.logging.level, "SIGHUP: log level reloaded")
            }
            Err(e) => warn!(node = %node, error = %e, "SIGHUP: log level not changed"),
        },
        Err(e) => warn!(node = %node, error = %e, "SIGHUP: configuration invalid; nothing changed"),
    }
}

/// Graceful shutdown, bounded in time: `shutdown` → objects stopped → `stop` → lease revoked
/// → our services stopped. Guests and networks are left as they are.
async fn shutdown(r: Running, from: DaemonState) -> ExitCode {
    notify::stopping();
    let node = r.cfg.node_name().to_string();
    let flush = r.cfg.domains.on_shutdown == OnShutdown::Flush && from == DaemonState::Run;
    let mut budget = r.cfg.store.request_timeout * 3 + Duration::from_secs(15);
    if flush {
        budget += r.cfg.domains.flush_timeout;
    }
    let work = async {
        if flush {
            flush_before_stop(&r).await;
        }
        let _ = registration::set_daemon_state(
            &r.store,
            &node,
            from,
            DaemonState::Shutdown,
            "termination requested",
        )
        .await;
        r.vms.shutdown().await;
        r.nodes.shutdown().await;
        r.networks.shutdown().await;
        if let Some(c) = &r.ceph_objects {
            c.shutdown().await;
        }
        r.net_host.stop_all().await;
        let _ = registration::set_daemon_state(
            &r.store,
            &node,
            DaemonState::Shutdown,
            DaemonState::Stop,
            "objects stopped",
        )
        .await;
        r.lease_cancel.cancel();
        let lease = r.lease.load(Ordering::SeqCst);
        match r.store.lease_revoke(lease).await {
            Ok(()) => {
                r.local.clear_lease();
                info!(node = %node, lease = format!("{lease:x}"), "lease revoked; peers see this node gone");
            }
            Err(e) => {
                warn!(node = %node, error = %e, "cannot revoke lease; it expires after its TTL")
            }
        }
        r.libvirt.close().await;
        stop_services(&r.services).await;
    };
    match tokio::time::timeout(budget, work).await {
        Ok(()) => {
            info!(node = %node, "debvisord stopped");
            ExitCode::SUCCESS
        }
        Err(_) => {
            error!(node = %node, budget_ms = budget.as_millis() as u64, "graceful shutdown exceeded its time budget; exiting");
            crate::services::terminate_owned_now();
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_are_unique_and_ordered() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert_eq!(names.first(), Some(&"config"));
        assert_eq!(names.last(), Some(&"keepalive"));
    }
}
