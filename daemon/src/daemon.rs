//! The daemon's life: runs the startup stages in order (see [`crate::stages`]), then the run
//! loop (keepalive tick, lease watch, signals) and the graceful shutdown.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_netconf::Netlink;
use debvisor_objects::lease::{self, LeaseState};
use debvisor_objects::node::{DaemonState, DomainState as DomainStateValue, NodeInfo};
use debvisor_objects::witness::StoreMark;
use debvisor_objects::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, NodeMode, OnShutdown};
use crate::guard::{Beat, Guardian, Heartbeat};
use crate::hypervisor::Libvirt;
use crate::keepalive::{Keepalive, TickOutcome};
use crate::owned_keys::OwnKeys;
use crate::reactors::election::{CoordinatorCell, Election, ElectionConfig};
use crate::reactors::network::FirewallSync;
use crate::reactors::role::RoleSender;
use crate::registration::{self, LocalState, RegisterError};
use crate::services::Supervised;
use crate::signals::Signal;
use crate::stages::objects::{self, Objects};
use crate::stages::self_registration::Registered;
use crate::stages::{self, Outcome, Stage, StageClock, StageResult};
use crate::{logging, notify};

/// Everything the run loop and the shutdown need.
struct Running {
    cfg: Config,
    store: Store,
    local: LocalState,
    node_id: String,
    lease: Arc<AtomicI64>,
    lease_state: watch::Receiver<LeaseState>,
    lease_tx: watch::Sender<LeaseState>,
    lease_cancel: CancellationToken,
    objects: Objects,
    /// Whether this node is the primary now (fed by the election).
    role: RoleSender,
    /// Stops the election (a primary relinquishes first) …
    election_stop: CancellationToken,
    /// … and fires when it is done.
    election_done: CancellationToken,
    libvirt: Libvirt,
    services: Vec<Supervised>,
    log: logging::LogHandle,
    config_path: PathBuf,
    info: NodeInfo,
    /// The node's own keys, compared with etcd and repaired on every tick.
    own: OwnKeys,
    /// The store mark last saved to the state dir, and when.
    mark_saved: Option<(StoreMark, Instant)>,
    /// The guardian's heartbeat (clustered coordinators).
    guard: Option<Heartbeat>,
    /// The node's drain bookkeeping, one for the resync tick's passes and the drain on
    /// stop (so a VM that cannot move is reported once, not once by each).
    drain: Arc<crate::reactors::drain::Drain>,
}

/// Runs the stages after logging: times each, logs and reports it, and on a failure stops
/// the services started so far and gives the exit code.
struct Startup {
    node: String,
    services: Vec<Supervised>,
}

impl Startup {
    /// Run one stage; its value on success, the exit code on failure.
    async fn stage<T>(
        &self,
        stage: Stage,
        work: impl Future<Output = StageResult<T>>,
    ) -> Result<T, ExitCode> {
        let clock = StageClock::start(stage);
        match work.await {
            Ok(done) => {
                clock.done(&self.node, done.outcome, &done.detail);
                Ok(done.value)
            }
            Err(e) => {
                stages::coordinator_services::stop(&self.services).await;
                Err(clock.failed(&self.node, &e))
            }
        }
    }
}

/// Run the daemon with the config at `config_path`; returns the process exit code.
pub async fn run(config_path: &Path) -> ExitCode {
    let booted = match start(config_path).await {
        Ok(b) => b,
        Err(code) => return code,
    };
    match start_objects(booted).await {
        Ok((r, signals, keepalive)) => run_loop(r, signals, keepalive).await,
        Err(code) => code,
    }
}

/// What the stages up to the firewall hand to the objects stage.
struct Booted {
    cfg: Config,
    log: logging::LogHandle,
    config_path: PathBuf,
    role: RoleSender,
    netlink: Arc<Netlink>,
    services: Vec<Supervised>,
    store: Store,
    signals: mpsc::UnboundedReceiver<Signal>,
    reg: Registered,
    libvirt: Libvirt,
    info: NodeInfo,
    firewall: Option<FirewallSync>,
}

/// The stages from config to firewall, in order; the exit code of the first that fails.
async fn start(config_path: &Path) -> Result<Booted, ExitCode> {
    use stages::*;
    let (cfg, log) = before_logging(config_path)?;
    let mut s = Startup {
        node: cfg.node_name().to_string(),
        services: Vec::new(),
    };
    // A standalone node is always the primary; the election decides in a cluster (a
    // clustered node starts as a secondary).
    let role = RoleSender::new(cfg.node.mode == NodeMode::Standalone);
    let primary = role.get().primary;
    let netlink = s
        .stage(Stage::HostNetworking, host_networking::run(&cfg, primary))
        .await?;
    s.stage(Stage::Sysctl, async { sysctl::run(&cfg) }).await?;
    s.services = s
        .stage(Stage::CoordinatorServices, coordinator_services::run(&cfg))
        .await?;
    let store = s
        .stage(Stage::StoreConnection, store_connection::run(&cfg))
        .await?;
    let signals = s
        .stage(Stage::TerminationHandling, async {
            termination_handling::run()
        })
        .await?;
    let reg = s
        .stage(
            Stage::SelfRegistration,
            self_registration::run(&cfg, &store),
        )
        .await?;
    let checked = hypervisor_check::run(&cfg, reg.info.clone());
    let (libvirt, info) = s.stage(Stage::HypervisorCheck, checked).await?;
    let firewall = s
        .stage(Stage::Firewall, firewall::run(&cfg, &store, primary))
        .await?;
    Ok(Booted {
        cfg,
        log,
        config_path: config_path.to_path_buf(),
        role,
        netlink,
        services: s.services,
        store,
        signals,
        reg,
        libvirt,
        info,
        firewall,
    })
}

/// config → directories → logging: the first two run before logging exists, so they are
/// timed here and logged once it does; a config or logging failure goes to stderr (exit 2).
fn before_logging(config_path: &Path) -> Result<(Config, logging::LogHandle), ExitCode> {
    let t_config = Instant::now();
    let cfg = stages::config::run(config_path).map_err(|e| {
        eprintln!("debvisord: stage config failed: {e}");
        ExitCode::from(2)
    })?;
    let config = StageClock::ran(Stage::Config, t_config.elapsed());
    let t_dirs = Instant::now();
    let dirs = stages::directories::run(&cfg);
    let directories = StageClock::ran(Stage::Directories, t_dirs.elapsed());
    let clock = StageClock::start(Stage::Logging);
    let (log, detail) = stages::logging::run(&cfg).map_err(|e| {
        eprintln!("debvisord: stage logging failed: {e}");
        ExitCode::from(2)
    })?;
    let node = cfg.node_name();
    info!(node = %node, version = env!("CARGO_PKG_VERSION"), config = %config_path.display(), pid = std::process::id(), "debvisord starting");
    config.done(node, Outcome::Ok, &stages::config::detail(&cfg));
    match dirs {
        Ok(d) => directories.done(node, Outcome::Ok, &d),
        Err(e) => return Err(directories.failed(node, &e)),
    }
    clock.done(node, Outcome::Ok, &detail);
    Ok((cfg, log))
}

/// The objects stage (every reactor synced), then the keepalive stage; the daemon is then
/// `run` and ready. A termination requested while the objects sync ends the daemon here.
async fn start_objects(
    b: Booted,
) -> Result<(Running, mpsc::UnboundedReceiver<Signal>, Keepalive), ExitCode> {
    let node = b.cfg.node_name().to_string();
    let clock = StageClock::start(Stage::Objects);
    let lease = Arc::new(AtomicI64::new(b.reg.lease_id));
    let firewall_repairs = b.firewall.as_ref().map(FirewallSync::drift_repairs_handle);
    let (objects, mut keepalive) = objects::spawn(objects::Inputs {
        cfg: &b.cfg,
        store: &b.store,
        netlink: b.netlink.clone(),
        firewall: b.firewall,
        libvirt: &b.libvirt,
        lease: lease.clone(),
        registered_info: b.reg.info.clone(),
        info: b.info.clone(),
        role: b.role.clone(),
        lease_state: b.reg.lease_state.clone(),
    });
    let mut signals = b.signals;
    let coordinator: CoordinatorCell = Arc::new(std::sync::Mutex::new(
        registration::coordinator_state(&b.cfg),
    ));
    let own = OwnKeys::new(
        &node,
        b.cfg.node.mode.as_str(),
        b.cfg.node.fqdn.clone(),
        coordinator.clone(),
        keepalive.info_handle(),
    );
    let drain = Arc::new(crate::reactors::drain::Drain::new(
        node.clone(),
        b.store.clone(),
    ));
    let r = Running {
        cfg: b.cfg,
        store: b.store,
        local: b.reg.local,
        node_id: b.reg.node_id,
        lease,
        lease_state: b.reg.lease_state,
        lease_tx: b.reg.lease_tx,
        lease_cancel: b.reg.lease_cancel,
        objects,
        role: b.role,
        election_stop: CancellationToken::new(),
        election_done: CancellationToken::new(),
        libvirt: b.libvirt,
        services: b.services,
        log: b.log,
        config_path: b.config_path,
        info: b.info,
        own,
        mark_saved: None,
        guard: None,
        drain,
    };
    tokio::select! {
        detail = r.objects.synced() => clock.done(&node, Outcome::Ok, &detail),
        sig = signals.recv() => {
            info!(node = %node, signal = ?sig, "termination requested during startup");
            return Err(shutdown(r, Some(DaemonState::Init)).await);
        }
    }
    r.objects.net_host.firewall_ready().await;
    let clock = StageClock::start(Stage::Keepalive);
    let done = stages::keepalive::run(&r.cfg, &r.store, &mut keepalive).await;
    clock.done(&node, done.outcome, &done.detail);
    notify::ready(&format!("run: node {node}"));
    let mut r = r;
    r.guard = start_guardian(&r);
    start_election(&r, coordinator);
    start_metrics(&r, &keepalive, firewall_repairs);
    start_config_sync(&r);
    Ok((r, signals, keepalive))
}

/// The cluster config (`config/blob`) applied here at runtime, on the keepalive interval.
fn start_config_sync(r: &Running) {
    let cfg = &r.cfg;
    crate::config_sync::ConfigSync {
        node: cfg.node_name().to_string(),
        store: r.store.clone(),
        log: r.log.clone(),
        base_level: cfg.logging.level.clone(),
        sysctl_apply: cfg.networking.sysctl.apply,
        standalone: cfg.node.mode == NodeMode::Standalone,
        proc_sys: std::path::PathBuf::from("/proc/sys"),
    }
    .spawn(cfg.keepalive.interval, r.objects.tasks.clone());
}

/// `GET /metrics` (`metrics.listen`) from `run` on, until the objects stop.
fn start_metrics(
    r: &Running,
    keepalive: &Keepalive,
    firewall_repairs: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    let m = &r.cfg.metrics;
    let Some(addr) = m
        .enabled
        .then(|| m.listen.parse::<std::net::SocketAddr>().ok())
        .flatten()
    else {
        return;
    };
    let sources = crate::metrics::Sources {
        node: r.cfg.node_name().to_string(),
        nodes: r.objects.nodes.clone(),
        vms: r.objects.vms.clone(),
        networks: r.objects.networks.clone(),
        stats: keepalive.stats_handle(),
        store: r.store.metrics(),
        keepalive_txn: keepalive.txn_latency_handle(),
        firewall_repairs,
        ceph: r.objects.ceph_monitor.clone(),
        role: r.role.view(),
    };
    tokio::spawn(crate::metrics::serve(
        addr,
        sources,
        r.objects.tasks.clone(),
    ));
}

/// The election, from `run` on: secondary → takeover → primary for a coordinator (always for
/// a standalone node), client for the others.
fn start_election(r: &Running, coordinator: CoordinatorCell) {
    let cfg = &r.cfg;
    let election = Election::new(
        cfg.node_name().to_string(),
        r.store.clone(),
        r.lease.clone(),
        r.lease_state.clone(),
        r.role.clone(),
        coordinator,
        r.objects.nodes.clone(),
        ElectionConfig {
            coordinator: cfg.is_coordinator(),
            standalone: cfg.node.mode == NodeMode::Standalone,
            demote_margin: cfg.keepalive.demote_margin(),
            duty_timeout: ELECTION_DUTY_TIMEOUT,
            handover_timeout: ELECTION_HANDOVER_TIMEOUT,
        },
    );
    election.spawn(r.election_stop.clone(), r.election_done.clone());
}

/// The guardian of a clustered coordinator or a node with self-fence: releases the
/// primary's duties, and stops the guests at the self-fence deadline, if this process dies
/// or freezes (`guard.rs`). `None` for other nodes.
fn start_guardian(r: &Running) -> Option<Heartbeat> {
    let cfg = &r.cfg;
    let fence = cfg.self_fence_active();
    if cfg.node.mode == NodeMode::Standalone || !(cfg.is_coordinator() || fence) {
        return None;
    }
    let node = cfg.node_name().to_string();
    let guardian = match Guardian::spawn(&r.config_path) {
        Ok(g) => g,
        Err(e) => {
            warn!(node = %node, error = %e, "guardian not started: if this daemon dies, its floating addresses and guests stay until the host is fenced");
            return None;
        }
    };
    info!(node = %node, pid = guardian.pid(), self_fence = fence, "guardian started");
    let (role, lease, margin, fence_margin) = (
        r.role.clone(),
        r.lease_state.clone(),
        cfg.keepalive.demote_margin(),
        cfg.self_fence_margin(),
    );
    let beat = Heartbeat::start(guardian, move || {
        let state = *lease.borrow();
        let left = |m: Duration| {
            state
                .valid_until()
                .map(|u| {
                    u.saturating_duration_since(Instant::now())
                        .saturating_sub(m)
                })
                .unwrap_or(Duration::ZERO)
        };
        Beat {
            primary: role.may_hold_duties(),
            lasts: left(margin),
            fence,
            guests_last: left(fence_margin),
            lease: state.id(),
        }
    });
    r.role.guard_promotions(beat.promotion_guard());
    Some(beat)
}

/// Longest wait for the primary duties to come up or go down.
const ELECTION_DUTY_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the other secondaries to step aside on a `node primary` request.
const ELECTION_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// `domains.on_shutdown: flush`: drain this node before the daemon stops, bounded by
/// `domains.flush_timeout`; past it the daemon stops anyway and says what stayed.
async fn flush_before_stop(r: &Running) {
    let node = r.cfg.node_name().to_string();
    let drain = r.drain.clone();
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
        // The drain may outlast the unit's TimeoutStopSec=: tell systemd it is still working
        // (what is left of the flush, plus the rest of the shutdown).
        notify::extend_timeout(
            deadline.saturating_duration_since(Instant::now())
                + shutdown_budget(&r.cfg, false)
                + EXIT_SLACK,
        );
        match drain.pass(&r.objects.nodes, &r.objects.vms).await {
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

/// The keepalive tick in its own task, so a slow tick (libvirt, store) never delays
/// signal handling, and a busy run loop (a drain on stop) never delays the keepalive; each
/// outcome goes to the run loop.
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
            // Never wait for the run loop: while it drains the node on stop it reads no
            // outcomes, and the node's keepalive must go on meanwhile. A full queue drops
            // this outcome; the next tick brings a fresh one.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(outcome) {
                return;
            }
        }
    });
    rx
}

/// Host-side resync on the keepalive tick, in its own task: the fence verdict, VM statuses
/// deleted or forged in etcd, drain passes, the firewall (a deleted rule comes back), and client networks deleted while we
/// were away — each O(1) in the VM count when nothing changes. The full VM resync (one
/// libvirt list and a describe per domain) runs at the first tick, then once
/// `domains.resync_interval` has passed, and on every tick while the libvirt event
/// subscription is down. (The host networks have their own task: `reactors::duties`.)
fn spawn_host_resync(r: &Running) {
    let net_host = r.objects.net_host.clone();
    let networks = r.objects.networks.clone();
    let vms = r.objects.vms.clone();
    let nodes = r.objects.nodes.clone();
    let domains = r.objects.domains.clone();
    let drain = r.drain.clone();
    let cancel = r.objects.tasks.clone();
    let interval = r.cfg.keepalive.interval;
    let full_every = r.cfg.domains.resync_interval;
    let node = r.cfg.node_name().to_string();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_full: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if full_resync_due(last_full, full_every, domains.events_live()) {
                domains.resync(&vms).await;
                last_full = Some(Instant::now());
            } else {
                domains.follow_fence().await;
            }
            domains.repair_changed_statuses(&vms);
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

/// Is the full VM resync due on this host-resync tick? At the first tick, while libvirt
/// events are not flowing (a change behind our back would go unseen), and once
/// `every` has passed since the last one.
fn full_resync_due(last: Option<Instant>, every: Duration, events_live: bool) -> bool {
    match last {
        None => true,
        Some(_) if !events_live => true,
        Some(at) => at.elapsed() >= every,
    }
}

/// The run loop: signals, the lease's state and the keepalive's outcomes, until shutdown.
async fn run_loop(
    mut r: Running,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    keepalive: Keepalive,
) -> ExitCode {
    let node = r.cfg.node_name().to_string();
    spawn_host_resync(&r);
    let mut ticks = spawn_ticker(keepalive, r.cfg.keepalive.interval, r.objects.tasks.clone());
    loop {
        let current = r.lease.load(Ordering::SeqCst);
        let lost = tokio::select! {
            sig = signals.recv() => match sig {
                Some(Signal::Terminate(name)) => {
                    info!(node = %node, signal = name, "termination requested; shutting down gracefully");
                    return shutdown(r, Some(DaemonState::Run)).await;
                }
                Some(Signal::Reload) => {
                    reload(&r);
                    false
                }
                None => false,
            },
            changed = r.lease_state.changed() => {
                // Only the loss of the lease we hold now; a stale report is no loss.
                changed.is_ok()
                    && matches!(*r.lease_state.borrow(), LeaseState::Lost { id } if id == current)
            }
            outcome = ticks.recv() => {
                let Some(outcome) = outcome else {
                    error!(node = %node, "keepalive task ended; shutting down");
                    shutdown(r, Some(DaemonState::Run)).await;
                    return ExitCode::from(1);
                };
                r.objects.nodes.resync();
                r.objects.networks.resync();
                match outcome {
                    TickOutcome::Written => {
                        after_tick(&mut r).await;
                        false
                    }
                    // A tick that ran on an older lease says nothing about the current one.
                    TickOutcome::NotRegistered { lease } => lease == current,
                    TickOutcome::StoreUnreachable => false,
                }
            }
        };
        if lost {
            match reregister(&mut r).await {
                Ok(()) => {}
                Err(RegisterError::Duplicate { .. }) => {
                    error!(node = %node, "another daemon took this node name while our lease was lost; stopping (exit 1)");
                    // The node's keys are the other daemon's now: leave them alone.
                    shutdown(r, None).await;
                    return ExitCode::from(1);
                }
                Err(e) => {
                    warn!(node = %node, error = %e, "re-registration failed; retrying on the next tick");
                }
            }
        }
    }
}

/// After a written tick: repair the node's own keys from the watch's view, act on an
/// operator's confirmation of held removals, and remember the store's identity.
async fn after_tick(r: &mut Running) {
    let node = r.cfg.node_name().to_string();
    if let Some(entry) = r.objects.nodes.get(&node) {
        if let Err(e) = r.own.repair(&r.store, &entry.keys).await {
            warn!(node = %node, error = %e, "own keys not checked; retrying on the next tick");
        }
        if r.own.confirm_requested(&entry.keys) {
            let vms = r.objects.domains.confirm_removals(&r.objects.vms);
            let nets = r.objects.net_host.release_held();
            for vni in &nets {
                r.objects.networks.enqueue(&vni.to_string());
            }
            info!(node = %node, vms, networks = nets.len(), "operator confirmed: held removals carried out, the store accepted as it is");
        }
    }
    save_store_mark(r);
}

/// Keep the store's identity in the state dir (at most every 30 s, or when the cluster
/// changed), so a restart against a store that went back is noticed at once.
fn save_store_mark(r: &mut Running) {
    let Some(mark) = r.store.mark() else { return };
    let due = match &r.mark_saved {
        None => true,
        Some((m, at)) => {
            m.cluster_id != mark.cluster_id
                || (m.revision != mark.revision && at.elapsed() >= Duration::from_secs(30))
        }
    };
    if !due {
        return;
    }
    match r.local.save_store_mark(&mark) {
        Ok(()) => r.mark_saved = Some((mark, Instant::now())),
        Err(e) => {
            warn!(node = %r.cfg.node_name(), error = %e, "cannot remember the store's identity")
        }
    }
}

/// The lease is gone (etcd expired it, or `alive` was taken away): register again.
async fn reregister(r: &mut Running) -> Result<(), RegisterError> {
    let node = r.cfg.node_name().to_string();
    let old = r.lease.load(Ordering::SeqCst);
    warn!(node = %node, old_lease = format!("{old:x}"), "node lease lost; re-registering");
    let info = crate::keepalive::refresh_info(&r.info, r.info.libvirt_version.clone());
    let data = registration::data(
        &r.cfg,
        info.clone(),
        DaemonState::Run,
        &r.node_id,
        &crate::hostinfo::now_rfc3339(),
    );
    let granted = Instant::now();
    let lease_id = registration::register(&r.store, &r.local, &data, Some(old)).await?;
    if lease_id == old {
        return Ok(());
    }
    r.lease_cancel.cancel();
    r.lease.store(lease_id, Ordering::SeqCst);
    r.lease_cancel = CancellationToken::new();
    lease::spawn_keeper(
        r.store.clone(),
        node.clone(),
        lease_id,
        r.cfg.keepalive.lease_ttl,
        granted,
        r.lease_tx.clone(),
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

/// What systemd is asked to wait beyond the shutdown budget: the exit itself (owned
/// processes signalled, the runtime stopped).
const EXIT_SLACK: Duration = Duration::from_secs(10);

/// How long a graceful shutdown may take before the daemon exits anyway: the store writes
/// and the handover (3 × `store.request_timeout` + 15 s), plus `domains.flush_timeout` when
/// it drains the node first.
fn shutdown_budget(cfg: &Config, flush: bool) -> Duration {
    let mut budget = cfg.store.request_timeout * 3 + Duration::from_secs(15);
    if flush {
        budget += cfg.domains.flush_timeout;
    }
    budget
}

/// Graceful shutdown, bounded in time: `shutdown` → objects stopped → `stop` → lease revoked
/// → our services stopped. Guests and networks are left as they are. `from` is the
/// `daemon_state` this daemon holds; `None` when the node's keys are no longer ours (another
/// daemon took the name): they are then not written.
async fn shutdown(mut r: Running, from: Option<DaemonState>) -> ExitCode {
    notify::stopping();
    let mut guard = r.guard.take();
    let fence = r.cfg.self_fence_active();
    let mut relinquished = false;
    let node = r.cfg.node_name().to_string();
    let flush = r.cfg.domains.on_shutdown == OnShutdown::Flush && from == Some(DaemonState::Run);
    let budget = shutdown_budget(&r.cfg, flush);
    // systemd waits at least as long as the budget (a drain re-extends while it runs).
    notify::extend_timeout(budget + EXIT_SLACK);
    let work = async {
        // A primary hands over first: another coordinator takes over before this one goes.
        r.election_stop.cancel();
        if tokio::time::timeout(
            ELECTION_DUTY_TIMEOUT + r.cfg.store.request_timeout * 3,
            r.election_done.cancelled(),
        )
        .await
        .is_err()
        {
            // The guardian then releases what may still be up when this process exits.
            warn!(node = %node, "election did not finish its relinquish in time; stopping anyway");
        } else {
            relinquished = true;
            if let Some(g) = guard.take_if(|_| !fence) {
                let _ = tokio::task::spawn_blocking(move || g.bye()).await;
            }
        }
        if flush {
            flush_before_stop(&r).await;
        }
        if let Some(from) = from {
            let _ = registration::set_daemon_state(
                &r.store,
                &node,
                from,
                DaemonState::Shutdown,
                "termination requested",
            )
            .await;
        }
        r.objects.shutdown().await;
        let stopped = match from {
            Some(_) => registration::set_daemon_state(
                &r.store,
                &node,
                DaemonState::Shutdown,
                DaemonState::Stop,
                "objects stopped",
            )
            .await
            .is_ok(),
            None => false,
        };
        // With self-fence, guests outlive this process only when the cluster knows the
        // stop was clean; otherwise the guardian keeps the self-fence bound.
        if let Some(g) = guard.take() {
            if stopped && relinquished {
                let _ = tokio::task::spawn_blocking(move || g.bye()).await;
            } else {
                warn!(node = %node, "stop not recorded: the guardian stops the guests at the lease deadline unless this node registers again");
                let _ = tokio::task::spawn_blocking(move || g.abandon()).await;
            }
        }
        r.lease_cancel.cancel();
        let lease = r.lease.load(Ordering::SeqCst);
        if fence && !stopped {
            // Revoking would end the lease before the guardian's deadline: let it expire.
            warn!(node = %node, lease = format!("{lease:x}"), "lease left to expire: the guests stop before it does");
        } else {
            revoke(&r, &node, lease).await;
        }
        if stopped {
            // The stop is recorded: `guard --after-exit` must not take this for a crash.
            r.local.clear_lease();
        }
        r.libvirt.close().await;
        stages::coordinator_services::stop(&r.services).await;
    };
    finish(work, budget, &node).await
}

/// Revoke the node lease: peers see this node gone at once.
async fn revoke(r: &Running, node: &str, lease: i64) {
    match r.store.lease_revoke(lease).await {
        Ok(()) => {
            r.local.clear_lease();
            info!(node = %node, lease = format!("{lease:x}"), "lease revoked; peers see this node gone");
        }
        Err(e) => {
            warn!(node = %node, error = %e, "cannot revoke lease; it expires after its TTL")
        }
    }
}

/// Run the shutdown `work` within `budget`: the exit code.
async fn finish(
    work: impl std::future::Future<Output = ()>,
    budget: Duration,
    node: &str,
) -> ExitCode {
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

    #[test]
    fn full_resync_first_then_on_its_interval_and_always_without_events() {
        let every = Duration::from_secs(30);
        assert!(full_resync_due(None, every, true), "the first tick lists");
        assert!(full_resync_due(None, every, false));
        let just = Instant::now();
        assert!(
            !full_resync_due(Some(just), every, true),
            "events up: not again yet"
        );
        assert!(
            full_resync_due(Some(just), every, false),
            "events down: every tick"
        );
        if let Some(long_ago) = Instant::now().checked_sub(Duration::from_secs(31)) {
            assert!(
                full_resync_due(Some(long_ago), every, true),
                "interval passed"
            );
        }
    }
}
