//! The Domain object's host side: executes the pure plan of `objects::domain_plan` through
//! libvirt and the store — the run lock won by transaction before any start, the RBD lock
//! check of its Ceph volumes before a start (`ceph::start_check`), status reports
//! written only when they change, crash restarts with backoff, live migration with its
//! handover, and the periodic resync that spots crashes, orphans and foreign domains.
//!
//! The invariant: a domain is started here only while this node holds the VM's lease-bound
//! lock, and a domain of ours running here while another live node holds the lock is stopped.
//! An invalid VM (bad XML, metadata, state …, or XML this node's `domains.xml_policy` refuses)
//! gets an `invalid` status naming the field and nothing is done on the host for it — a
//! running guest keeps running.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debvisor_objects::domain::{self, key_revision, DesiredState, Vm, VmField, VmKind};
use debvisor_objects::domain_plan::{self, Local, LocalState, Situation, Step};
use debvisor_objects::lease::LeaseState;
use debvisor_objects::node::{DaemonState, NodeKind};
use debvisor_objects::reactor::{backoff, KeyEntry};
use debvisor_objects::store::TxnBuilder;
use debvisor_objects::xml_policy::check_policy;
use debvisor_objects::{Action, Entry, ObjectError, Reactor, ReconcileError, Reconciler, Store};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::ceph::{check_rbd_start, CephCli};
use crate::config::{DomainsConfig, SelfFenceAction};
use crate::hypervisor::{
    DomainEvent, DomainInfo, DomainState, ErrorKind, HypervisorError, Libvirt, Lifecycle,
    MigrateOptions,
};
use crate::reactors::fence_evidence::{self, RecordSeen};
use crate::reactors::removals::{GuardConfig, RemovalGuard, Verdict};

/// Longest crash-restart delay (also the longest wait between RBD lock checks).
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// First wait before checking a refused VM's RBD locks again (doubles up to the maximum).
const RBD_RECHECK: Duration = Duration::from_secs(2);

/// What this node remembers about one VM between reconciles (never written anywhere).
#[derive(Debug, Default)]
struct Runtime {
    /// Mod revision of the `state` key the counters below belong to: a new request resets
    /// them (an operator setting `start` again retries a failed VM).
    state_rev: i64,
    /// When we sent the ACPI shutdown.
    shutdown_since: Option<Instant>,
    /// Failed starts and crashes, within `failure_window`.
    failures: VecDeque<Instant>,
    /// Earliest next start after a failure.
    next_start: Option<Instant>,
    /// The last failure's description (goes into the `fail` status).
    last_failure: Option<String>,
    /// We started it (or found it running) and did not stop it: a stop now is a crash.
    expect_running: bool,
    /// `restart`: the guest went down since the request.
    restart_done: bool,
    /// A live migration for this request failed.
    live_failed: bool,
    /// The local state the last reconcile saw (resync enqueues on a difference).
    observed: Option<DomainState>,
    /// Last status written: (state, reason, error) and its `since`.
    status: Option<(String, String, Option<String>, String)>,
    /// The store revision that write committed at, and when (trusted over a snapshot that
    /// has not seen it for [`OWN_WRITE_LAG`] only: a restored store may go back in time).
    status_written: Option<(i64, Instant)>,
    /// Starts refused by the RBD lock check in a row (backoff of the next check).
    rbd_refusals: u32,
    /// The last refusal's error (logged once per distinct refusal).
    rbd_refusal: Option<String>,
    /// Warned that RBD disks start unchecked (Ceph disabled).
    rbd_unchecked_warned: bool,
}

impl Runtime {
    /// Forget failures older than `window`; the count of those left.
    fn failures_within(&mut self, window: Duration, now: Instant) -> u32 {
        while self
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.failures.pop_front();
        }
        self.failures.len() as u32
    }
}

/// Everything the Domain reconciler needs on this node.
pub struct DomainHost {
    node: String,
    store: Store,
    hv: Libvirt,
    lease: Arc<AtomicI64>,
    cfg: DomainsConfig,
    /// Whether this node is the primary now: it writes `invalid` statuses of VMs whose
    /// target cannot be read.
    role: crate::reactors::role::RoleView,
    /// Node records (migration URIs of targets).
    nodes: Arc<Reactor<NodeKind>>,
    runtime: Mutex<HashMap<String, Runtime>>,
    migrations: Semaphore,
    /// Domains on this host that are not ours: uuid → name (health, logs).
    foreign: Mutex<BTreeMap<String, String>>,
    /// DebVisor marks read from domains on this host: uuid → the node that defined it and
    /// the digest of the etcd XML it was defined from (`None`: no mark, someone else's
    /// domain). Read once per domain; forgotten on every libvirt event of the domain that
    /// may change its definition or identity ([`keeps_definition`] says which do not), on
    /// a relist after lost events, and when we define or undefine it. A start then costs
    /// no XML read.
    marks: Mutex<HashMap<String, Option<domain::Mark>>>,
    /// Removals of VMs that vanished from etcd wait here for evidence (see `removals`).
    guard: Mutex<RemovalGuard>,
    /// Foreign domains whose VM keys were deleted, already logged.
    foreign_removals: Mutex<std::collections::HashSet<String>>,
    /// Running orphans already warned about.
    orphans: Mutex<std::collections::HashSet<String>>,
    /// The Ceph driver when Ceph is enabled: RBD lock check before a start.
    ceph: Option<Arc<CephCli>>,
    /// Extra addresses this node's Ceph clients appear as (`ceph.client_addresses`).
    ceph_client_addresses: Vec<IpAddr>,
    /// The node lease as its keeper sees it: starts happen only while it is good for at
    /// least `start_margin` more (`None`: no check, for tools and tests of the planner).
    lease_state: Option<watch::Receiver<LeaseState>>,
    /// The self-fence margin.
    start_margin: Duration,
    /// What a self-fence does with the guests.
    fence_action: SelfFenceAction,
    /// The guests were self-fenced: nothing starts until the lease is good again.
    self_fenced: AtomicBool,
    /// What the last resync made of `daemon_state = fenced` (stops and lines once each).
    fence: Mutex<FenceFollow>,
    /// The leases this node registered with lately (the evidence a fence record must
    /// match); `None`: no history, so no fence record is evidence.
    lease_history: Option<LeaseHistory>,
    /// Fired on every libvirt domain event: the stats sampler samples soon after, so the
    /// allocation follows starts and stops faster than its interval.
    changed: Arc<tokio::sync::Notify>,
    /// The libvirt event subscription is up: lifecycle changes enqueue their VM at once, so
    /// the full resync may run on its slow interval; while down it runs on every tick.
    events_live: AtomicBool,
}

/// Reads this node's lease history (kept by registration in the state dir).
pub type LeaseHistory = Arc<dyn Fn() -> Result<Vec<i64>, String> + Send + Sync>;

/// How this node followed `daemon_state = fenced` so far.
#[derive(Debug, Default)]
struct FenceFollow {
    /// The node cache said `fenced` at the last resync (the readmission is logged once).
    fenced: bool,
    /// The guests were stopped for this fence, on evidence (once per fence).
    stopped: bool,
    /// Reasons the guests were kept although fenced, already logged (one line each).
    held: std::collections::BTreeSet<String>,
}

/// How long a key snapshot may lag behind our own status write (the watch brings it back
/// within milliseconds; a store restored to an older revision must not be trusted longer).
const OWN_WRITE_LAG: Duration = Duration::from_secs(5);

/// The plan steps that stop, remove or overwrite the host's domain: each is preceded by a
/// fresh look at the domain's mark ([`DomainHost::ours_before`]). Its name, and whether the
/// remembered mark decides when libvirt cannot describe the domain (a destroy: it must not
/// keep a guest running against the plan, the split-brain guard). A define is one only when
/// a domain was there (`domain_seen`): the start path of a new VM pays no extra call.
fn changes_domain(step: &Step, domain_seen: bool) -> Option<(&'static str, bool)> {
    match step {
        Step::Define if domain_seen => Some(("define", false)),
        Step::Shutdown => Some(("shutdown", false)),
        Step::Destroy => Some(("destroy", true)),
        Step::Undefine => Some(("undefine", false)),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn local_state(s: DomainState) -> LocalState {
    match s {
        DomainState::Shutoff => LocalState::ShutOff,
        DomainState::Crashed => LocalState::Crashed,
        DomainState::Paused | DomainState::PmSuspended => LocalState::Paused,
        DomainState::Running
        | DomainState::Blocked
        | DomainState::ShuttingDown
        | DomainState::NoState => LocalState::Running,
    }
}

fn host_err(e: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::Host(e.to_string())
}

impl DomainHost {
    /// A Domain host for node `node`.
    pub fn new(
        node: String,
        store: Store,
        hv: Libvirt,
        lease: Arc<AtomicI64>,
        cfg: DomainsConfig,
        role: crate::reactors::role::RoleView,
        nodes: Arc<Reactor<NodeKind>>,
    ) -> DomainHost {
        let permits = cfg.migration_max_concurrent.max(1) as usize;
        let guard = RemovalGuard::new(GuardConfig {
            percent: cfg.removal_hold_percent,
            min: cfg.removal_hold_min,
            window: cfg.removal_window,
            settle: cfg.removal_settle,
        });
        DomainHost {
            node,
            store,
            hv,
            lease,
            cfg,
            role,
            nodes,
            runtime: Mutex::new(HashMap::new()),
            migrations: Semaphore::new(permits),
            foreign: Mutex::new(BTreeMap::new()),
            marks: Mutex::new(HashMap::new()),
            guard: Mutex::new(guard),
            foreign_removals: Mutex::new(Default::default()),
            orphans: Mutex::new(Default::default()),
            ceph: None,
            ceph_client_addresses: Vec::new(),
            lease_state: None,
            start_margin: Duration::ZERO,
            fence_action: SelfFenceAction::Destroy,
            self_fenced: AtomicBool::new(false),
            fence: Mutex::new(FenceFollow::default()),
            lease_history: None,
            changed: Arc::default(),
            events_live: AtomicBool::new(false),
        }
    }

    /// Is the libvirt event subscription up? Without it a domain that changes behind our
    /// back is only seen by a full resync, so the host resync runs one on every tick.
    pub fn events_live(&self) -> bool {
        self.events_live.load(Ordering::SeqCst)
    }

    /// Notified on every libvirt domain event (for the stats sampler).
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    /// Read this node's lease history with `history` when a fence record needs checking:
    /// without it `daemon_state = fenced` never stops a guest.
    pub fn with_lease_history(mut self, history: LeaseHistory) -> Self {
        self.lease_history = Some(history);
        self
    }

    /// Start guests only while `lease` is good for at least `margin` more, and self-fence
    /// with `action`.
    pub fn with_lease(
        mut self,
        lease: watch::Receiver<LeaseState>,
        margin: Duration,
        action: SelfFenceAction,
    ) -> Self {
        self.lease_state = Some(lease);
        self.start_margin = margin;
        self.fence_action = action;
        self
    }

    /// May this node start a guest right now (lease good for the margin, not self-fenced,
    /// not fenced)? Asked right before the libvirt call.
    fn may_start(&self) -> Result<(), &'static str> {
        if self.view_says_fenced() {
            return Err("this node is fenced: nothing starts until `debvisorctl node readmit`");
        }
        if self.self_fenced.load(Ordering::SeqCst) {
            return Err("self-fenced: waiting until this node's lease is good again");
        }
        let Some(lease) = &self.lease_state else {
            return Ok(());
        };
        let until = lease.borrow().valid_until();
        if debvisor_objects::fencing::may_start(Instant::now(), until, self.start_margin, false) {
            Ok(())
        } else {
            Err("this node's lease is not good for long enough (store unreachable?): waiting")
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Has this node self-fenced its guests (and not yet seen its lease good again)?
    pub fn is_self_fenced(&self) -> bool {
        self.self_fenced.load(Ordering::SeqCst)
    }

    /// Self-fence: destroy (or pause) every running guest of ours on this host, one log line
    /// each; nothing starts again until [`DomainHost::lift_self_fence`]. Needs no etcd.
    /// Returns the guests stopped.
    pub async fn self_fence(&self, why: &str) -> usize {
        self.self_fenced.store(true, Ordering::SeqCst);
        self.stop_guests(why).await
    }

    /// Destroy (or pause) every running guest of ours here, one log line each.
    async fn stop_guests(&self, why: &str) -> usize {
        let list = match self.hv.list().await {
            Ok(l) => l,
            Err(e) => {
                error!(node = %self.node, error = %e, reason = why, "self-fence: cannot list the guests");
                return 0;
            }
        };
        let mut stopped = 0;
        for d in list.iter().filter(|d| d.state.is_active()) {
            match self.mark_of(&d.uuid).await {
                Ok(Some(_)) => {}
                _ => continue,
            }
            self.with_rt(&d.uuid, |rt| rt.expect_running = false);
            let r = match self.fence_action {
                SelfFenceAction::Destroy => self.hv.destroy(&d.uuid).await,
                SelfFenceAction::Pause => self.hv.suspend(&d.uuid).await,
            };
            match r {
                Ok(_) => {
                    stopped += 1;
                    warn!(vm = %d.name, uuid = %d.uuid, node = %self.node, action = ?self.fence_action, reason = why, "self-fence: guest stopped");
                }
                Err(e) => {
                    error!(vm = %d.name, uuid = %d.uuid, node = %self.node, error = %e, reason = why, "self-fence: guest NOT stopped")
                }
            }
        }
        stopped
    }

    /// Does the node cache say this node is `fenced` (also before the first resync)?
    fn view_says_fenced(&self) -> bool {
        self.nodes
            .get(&self.node)
            .and_then(|e| e.parsed.as_ref().ok().map(|n| n.daemon_state))
            .flatten()
            == Some(DaemonState::Fenced)
    }

    /// The facts [`fence_evidence::judge`] decides on, from the node cache, the lease, the
    /// lease history and the store witness.
    fn fence_verdict(&self) -> fence_evidence::Verdict {
        let entry = self.nodes.get(&self.node);
        let rec = entry.as_ref().and_then(|e| e.parsed.as_ref().ok());
        let fenced = rec.and_then(|n| n.daemon_state) == Some(DaemonState::Fenced);
        if !fenced {
            return fence_evidence::Verdict::NotFenced;
        }
        let problem = rec.and_then(|n| n.problems.iter().find(|p| p.field == "fence"));
        let record = match (rec.and_then(|n| n.fence.as_ref()), problem) {
            (Some(r), _) => RecordSeen::Parsed(r),
            (None, Some(p)) => RecordSeen::Unparsed(&p.reason),
            (None, None) => RecordSeen::Missing,
        };
        let current_lease = self.lease.load(Ordering::SeqCst);
        let state = self.lease_state.as_ref().map(|l| *l.borrow());
        let current_good =
            fence_evidence::lease_good(state.as_ref(), current_lease, Instant::now());
        let history = match &self.lease_history {
            Some(read) => read(),
            None => Err("this daemon keeps no lease history".to_string()),
        };
        let replaced = self.store.store_change().map(|c| c.reason);
        fence_evidence::judge(&fence_evidence::Facts {
            node: &self.node,
            fenced,
            record,
            current_lease,
            current_good,
            history: history.as_deref().map_err(String::as_str),
            store_replaced: replaced.as_deref(),
        })
    }

    /// Follow this node's `daemon_state`: while it is `fenced` (the primary's verdict) no
    /// guest starts; any guest of ours still running is stopped only on evidence (see
    /// `fence_evidence`), else kept with one warning per reason; readmission lifts it.
    async fn follow_fenced(&self) {
        let verdict = self.fence_verdict();
        let stop = {
            let mut f = lock(&self.fence);
            match verdict {
                fence_evidence::Verdict::NotFenced => {
                    if f.fenced {
                        info!(node = %self.node, "this node was readmitted: guests may start here again");
                    }
                    *f = FenceFollow::default();
                    None
                }
                fence_evidence::Verdict::Hold { reason } => {
                    f.fenced = true;
                    if !f.held.contains(&reason) {
                        warn!(node = %self.node, reason = %reason, "daemon_state says this node is fenced, without evidence: its guests keep running (nothing starts here until `debvisorctl node readmit {}`)", self.node);
                        f.held.insert(reason);
                    }
                    None
                }
                fence_evidence::Verdict::Stop { lease } => {
                    f.fenced = true;
                    (!std::mem::replace(&mut f.stopped, true)).then_some(lease)
                }
            }
        };
        if let Some(lease) = stop {
            error!(node = %self.node, lease = format!("{lease:x}"), "this node is fenced: the primary saw its lease expire and recovered its guests elsewhere; nothing runs here until `debvisorctl node readmit {}`", self.node);
            self.stop_guests("this node is fenced").await;
        }
    }

    /// The lease is good again: guests may start (their reconciles bring them back).
    pub fn lift_self_fence(&self) -> bool {
        self.self_fenced.swap(false, Ordering::SeqCst)
    }

    /// Check RBD disks' locks through `ceph` before every start here (the split-brain guard
    /// on volumes); `client_addresses` also count as this node's Ceph client addresses.
    pub fn with_ceph(mut self, ceph: Option<Arc<CephCli>>, client_addresses: Vec<IpAddr>) -> Self {
        self.ceph = ceph;
        self.ceph_client_addresses = client_addresses;
        self
    }

    /// The RBD lock check before a start: `None` to go ahead, `Some(delay)` when the start is
    /// refused (status and log written; check again after `delay`).
    async fn rbd_gate(
        &self,
        vm: &Vm,
        keys: &BTreeMap<String, KeyEntry>,
    ) -> Result<Option<Duration>, ReconcileError> {
        let uuid = vm.uuid.as_str();
        let Some(ceph) = &self.ceph else {
            let rbd = crate::ceph::rbd_disks(&vm.xml)
                .map(|d| !d.is_empty())
                .unwrap_or(false);
            if rbd
                && !self.with_rt(uuid, |rt| {
                    std::mem::replace(&mut rt.rbd_unchecked_warned, true)
                })
            {
                warn!(vm = %vm.name, uuid, node = %self.node, "vm has RBD disks but ceph is disabled: starting without the RBD lock check");
            }
            return Ok(None);
        };
        let records: Vec<_> = self
            .nodes
            .list()
            .into_iter()
            .filter_map(|(_, e)| e.parsed.as_ref().ok().cloned())
            .collect();
        let addrs = crate::ceph::start_check::node_addrs(
            &self.node,
            crate::ceph::start_check::local_addrs(&self.ceph_client_addresses),
            records.iter().map(|r| r.as_ref()),
        );
        match check_rbd_start(ceph.as_ref(), &vm.xml, &addrs).await {
            Ok(checked) => {
                for (image, released) in checked.iter().filter(|(_, n)| *n > 0) {
                    info!(vm = %vm.name, uuid, node = %self.node, volume = %image, released, "stale RBD locks of this node released before the start");
                }
                let was = self.with_rt(uuid, |rt| {
                    rt.rbd_refusals = 0;
                    rt.rbd_refusal.take()
                });
                if was.is_some() {
                    info!(vm = %vm.name, uuid, node = %self.node, volumes = checked.len(), "RBD volumes free again; starting");
                }
                Ok(None)
            }
            Err(r) => {
                let (n, first) = self.with_rt(uuid, |rt| {
                    rt.rbd_refusals = rt.rbd_refusals.saturating_add(1);
                    let first = rt.rbd_refusal.as_deref() != Some(r.error.as_str());
                    rt.rbd_refusal = Some(r.error.clone());
                    (rt.rbd_refusals, first)
                });
                let delay = backoff(RBD_RECHECK, MAX_RESTART_BACKOFF, n);
                if first {
                    warn!(vm = %vm.name, uuid, node = %self.node, volume = %r.volume, error = %r.error, "vm start refused by the RBD lock check; retrying");
                }
                self.report(
                    uuid,
                    &vm.name,
                    keys,
                    "starting",
                    "start refused: RBD volume held elsewhere or unchecked; retrying",
                    Some(r.error),
                )
                .await?;
                Ok(Some(delay))
            }
        }
    }

    /// Domains on this host that the daemon did not create, by UUID (names as values).
    pub fn foreign(&self) -> BTreeMap<String, String> {
        lock(&self.foreign).clone()
    }

    /// The node whose DebVisor mark the domain `uuid` carries (`None`: not ours), read once
    /// and remembered until the domain changes.
    async fn mark_of(&self, uuid: &str) -> Result<Option<String>, ReconcileError> {
        Ok(self.mark(uuid).await?.map(|m| m.node))
    }

    /// The DebVisor mark of the domain `uuid` (`None`: none), read once and remembered.
    async fn mark(&self, uuid: &str) -> Result<Option<domain::Mark>, ReconcileError> {
        if let Some(m) = lock(&self.marks).get(uuid) {
            return Ok(m.clone());
        }
        self.read_mark(uuid).await.map_err(host_err)
    }

    /// The mark of the domain `uuid` as libvirt describes it now, remembered.
    async fn read_mark(&self, uuid: &str) -> Result<Option<domain::Mark>, HypervisorError> {
        let mark = domain::read_mark(&self.hv.xml(uuid).await?);
        lock(&self.marks).insert(uuid.to_string(), mark.clone());
        Ok(mark)
    }

    /// The domain changed on this host (libvirt event): read its mark again when needed.
    pub fn forget_mark(&self, uuid: &str) {
        lock(&self.marks).remove(uuid);
    }

    /// libvirt's events may have been lost: read every mark again when needed.
    fn forget_marks(&self) {
        lock(&self.marks).clear();
    }

    /// The domain `uuid`'s mark read from libvirt now, not from the remembered one (which
    /// lags a definition replaced on the host until its libvirt event is handled), and
    /// remembered. `None`: the domain is gone.
    async fn mark_now(&self, uuid: &str) -> Result<Option<Option<domain::Mark>>, ReconcileError> {
        match self.read_mark(uuid).await {
            Ok(mark) => Ok(Some(mark)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.forget_mark(uuid);
                Ok(None)
            }
            Err(e) => Err(host_err(e)),
        }
    }

    /// Right before a call that stops, removes or overwrites the host's domain `uuid`: is it
    /// still one of ours ([`Self::mark_now`])? `false` (logged when the domain is someone
    /// else's): the step is skipped and the VM planned again from the host; a domain that is
    /// gone has nothing to stop or remove.
    async fn still_ours(&self, uuid: &str, name: &str, step: &str) -> Result<bool, ReconcileError> {
        match self.mark_now(uuid).await? {
            Some(Some(_)) => Ok(true),
            Some(None) => {
                warn!(vm = %name, uuid, node = %self.node, step,
                    "the host's domain is no longer ours (its definition was replaced); step skipped, planning again");
                Ok(false)
            }
            None => {
                debug!(vm = %name, uuid, step, "domain gone before the step; planning again");
                Ok(false)
            }
        }
    }

    /// [`Self::still_ours`] right before the plan's step `what`; with `remembered_decides`,
    /// a describe that fails falls back to the remembered mark (see [`changes_domain`]).
    async fn ours_before(
        &self,
        uuid: &str,
        name: &str,
        (what, remembered_decides): (&str, bool),
    ) -> Result<bool, ReconcileError> {
        match self.still_ours(uuid, name, what).await {
            Err(e) if remembered_decides => {
                let remembered = matches!(lock(&self.marks).get(uuid), Some(Some(_)));
                debug!(vm = %name, uuid, step = what, error = %e, remembered, "domain not described before the step; the remembered mark decides");
                if remembered {
                    Ok(true)
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    }

    /// An operator confirmed the held removals (`debvisorctl node confirm-removals`): the
    /// store is accepted as it is and every held removal is carried out.
    pub fn confirm_removals(&self, vms: &Reactor<VmKind>) -> usize {
        self.store.accept_store_change();
        let released = lock(&self.guard).release();
        for uuid in &released {
            vms.enqueue(uuid);
        }
        released.len()
    }

    /// What the node reports in `health.removals_held`: held removals, or a replaced store
    /// for which nothing is held yet.
    pub fn removals_held(&self) -> Option<debvisor_objects::node::HeldRemovals> {
        lock(&self.guard).report().or_else(|| {
            self.store
                .store_change()
                .map(|c| debvisor_objects::node::HeldRemovals {
                    count: 0,
                    reason: format!("store replaced: {}", c.reason),
                    since: c.since,
                    names: Vec::new(),
                })
        })
    }

    /// Are removals that would destroy host state on hold (replaced store or tripped guard)?
    fn removals_on_hold(&self) -> bool {
        self.store.store_change().is_some() || lock(&self.guard).is_tripped()
    }

    /// UUIDs of the VMs in etcd whose domain exists on this host (per-VM stats).
    pub fn managed(&self) -> std::collections::HashSet<String> {
        lock(&self.runtime)
            .iter()
            .filter(|(_, rt)| rt.observed.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn with_rt<T>(&self, uuid: &str, f: impl FnOnce(&mut Runtime) -> T) -> T {
        let mut m = lock(&self.runtime);
        f(m.entry(uuid.to_string()).or_default())
    }

    /// Write `status` when (state, reason, error) differ from the last write; guarded on the
    /// VM's `xml` so a deleted VM is not resurrected by its report.
    async fn report(
        &self,
        uuid: &str,
        name: &str,
        keys: &BTreeMap<String, KeyEntry>,
        state: &str,
        reason: &str,
        error: Option<String>,
    ) -> Result<(), ReconcileError> {
        let (prev, written) = self.with_rt(uuid, |rt| (rt.status.clone(), rt.status_written));
        if let Some((s, _, e, _)) = &prev {
            // Same state and error, in memory and in etcd: keep the reason of the transition
            // readable (a later pass's generic reason must not overwrite "guest ignored
            // ACPI …"). A status deleted or forged in etcd is written again. A snapshot whose
            // status is older than our own last write has not seen it yet: memory is right.
            let snapshot_behind = written.is_some_and(|(rev, at)| {
                at.elapsed() < OWN_WRITE_LAG
                    && keys
                        .get(VmField::Status.suffix())
                        .is_some_and(|k| k.mod_revision < rev)
            });
            if s == state
                && *e == error
                && (snapshot_behind || self.status_in_store_is(keys, state, error.as_deref()))
            {
                return Ok(());
            }
        }
        let since = match &prev {
            Some((s, _, _, since)) if s == state => since.clone(),
            _ => crate::hostinfo::now_rfc3339(),
        };
        let value = json!({
            "state": state, "since": since, "reason": reason, "error": error, "node": self.node,
        })
        .to_string();
        let Some((guard_key, guard)) = keys
            .get(VmField::Xml.suffix())
            .map(|k| (VmField::Xml, k))
            .or_else(|| {
                keys.iter()
                    .find_map(|(k, v)| VmField::from_suffix(k).map(|f| (f, v)))
            })
        else {
            return Ok(());
        };
        let t = TxnBuilder::new()
            .mod_revision_is(&domain::vm_key(uuid, guard_key), guard.mod_revision)
            .put(&domain::vm_key(uuid, VmField::Status), value);
        let resp = self.store.txn(t).await?;
        if !resp.succeeded() {
            debug!(vm = %name, uuid, "status not written: the VM changed meanwhile");
            return Ok(());
        }
        let from = prev.as_ref().map(|p| p.0.as_str()).unwrap_or("-");
        if from != state {
            match &error {
                Some(e) => {
                    warn!(vm = %name, uuid, node = %self.node, from, to = state, reason, error = %e, "vm state changed")
                }
                None => {
                    info!(vm = %name, uuid, node = %self.node, from, to = state, reason, "vm state changed")
                }
            }
        } else {
            debug!(vm = %name, uuid, state, reason, "vm status updated");
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.with_rt(uuid, |rt| {
            rt.status = Some((state.into(), reason.into(), error, since));
            rt.status_written = Some((revision, Instant::now()));
        });
        Ok(())
    }

    /// A VM meant to be here whose `status` in etcd is not what this node last wrote
    /// (deleted or forged): reconcile it, which writes the status again.
    fn status_needs_repair(&self, rt: &Runtime, entry: &Entry<Vm>) -> bool {
        let Some((state, _, error, _)) = &rt.status else {
            return false;
        };
        let here = entry
            .parsed
            .as_ref()
            .is_ok_and(|vm| vm.node.as_deref() == Some(self.node.as_str()));
        here && !self.status_in_store_is(&entry.keys, state, error.as_deref())
    }

    /// Does the `status` key (as the reactor last saw it) say `state`/`error`, from us?
    fn status_in_store_is(
        &self,
        keys: &BTreeMap<String, KeyEntry>,
        state: &str,
        error: Option<&str>,
    ) -> bool {
        keys.get(VmField::Status.suffix())
            .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.value).ok())
            .is_some_and(|v| {
                v["state"] == state
                    && v["error"].as_str() == error
                    && v["node"] == self.node.as_str()
            })
    }

    /// An invalid VM: report the field once, touch nothing on the host.
    async fn reconcile_invalid(
        &self,
        uuid: &str,
        keys: &BTreeMap<String, KeyEntry>,
        err: &ObjectError,
    ) -> Result<Action, ReconcileError> {
        let target = keys
            .get(VmField::Node.suffix())
            .and_then(|k| std::str::from_utf8(&k.value).ok())
            .map(str::trim)
            .filter(|n| debvisor_objects::schema::valid_node_name(n));
        let here = if domain::valid_uuid(uuid) {
            self.hv.get(uuid).await.ok().flatten().is_some()
        } else {
            false
        };
        let mine = match target {
            Some(t) => t == self.node,
            None => self.role.is_primary(),
        };
        if !(mine || here) {
            return Ok(Action::AwaitChange);
        }
        let error = format!("{}: {}", err.field, err.reason);
        let reason = if here {
            "definition invalid; the domain on this host is left as it is"
        } else {
            "definition invalid; nothing done"
        };
        self.report(uuid, uuid, keys, "invalid", reason, Some(error))
            .await?;
        Ok(Action::AwaitChange)
    }

    /// Is the host's definition the one etcd asks for (our mark carries its digest)?
    async fn xml_current(&self, vm: &Vm) -> bool {
        match self.mark(&vm.uuid).await {
            Ok(Some(m)) => m.digest == domain::xml_digest(&vm.xml),
            _ => false,
        }
    }

    async fn local(&self, vm: &Vm) -> Result<(Option<DomainInfo>, Option<Local>), ReconcileError> {
        let info = self.hv.get(&vm.uuid).await.map_err(host_err)?;
        let local = match &info {
            None => None,
            Some(i) => {
                let state = local_state(i.state);
                let running = matches!(state, LocalState::Running | LocalState::Paused);
                let ours = self.mark_of(&vm.uuid).await?.is_some();
                Some(Local {
                    state,
                    persistent: i.persistent,
                    // Only consulted before a (re)start; a running guest keeps its config.
                    xml_current: running || (ours && i.persistent && self.xml_current(vm).await),
                    ours,
                })
            }
        };
        Ok((info, local))
    }

    /// Send the run lock alongside the first look at the host: the plan asks for it
    /// whatever a domain of ours reports ([`domain_plan::locks_first`]), and the host's
    /// domain with this UUID is not known to be someone else's (then the plan refuses and a
    /// lock won early is given back; the remembered mark keeps that from repeating).
    fn locks_first(&self, vm: &Vm) -> bool {
        !matches!(lock(&self.marks).get(&vm.uuid), Some(None))
            && domain_plan::locks_first(&self.situation(vm, None))
    }

    /// What the planner looks at for `vm` with the host's view `local`: the VM's runtime
    /// record (shutdown, failures, restart, live migration) and this node's lease and limits.
    fn situation<'a>(&'a self, vm: &'a Vm, local: Option<Local>) -> Situation<'a> {
        let (shutdown_elapsed, failed_starts, restart_done, live_failed) =
            self.with_rt(&vm.uuid, |rt| {
                (
                    rt.shutdown_since.map(|t| t.elapsed()),
                    rt.failures_within(self.cfg.failure_window, Instant::now()),
                    rt.restart_done,
                    rt.live_failed,
                )
            });
        Situation {
            vm: Some(vm),
            local,
            me: &self.node,
            my_lease: self.lease.load(Ordering::SeqCst),
            shutdown_elapsed,
            shutdown_timeout: self.cfg.shutdown_timeout,
            failed_starts,
            max_failed_starts: self.cfg.max_failed_starts,
            restart_done,
            live_failed,
        }
    }

    /// Give back a run lock won before the host was seen, when the plan made with the host's
    /// view did not want it (or the look failed): the lock deleted and `owner` put back as
    /// it was, guarded on the lock's revision.
    async fn give_back_early_lock(&self, vm: &Vm, revision: i64, why: &str) {
        let uuid = vm.uuid.as_str();
        let owner_key = domain::vm_key(uuid, VmField::Owner);
        let mut t = TxnBuilder::new()
            .mod_revision_is(&domain::vm_key(uuid, VmField::Lock), revision)
            .delete(&domain::vm_key(uuid, VmField::Lock));
        t = match &vm.owner {
            Some(o) => t.put(&owner_key, o.clone()),
            None => t.delete(&owner_key),
        };
        match self.store.txn(t).await {
            Ok(r) if r.succeeded() => {
                info!(vm = %vm.name, uuid, node = %self.node, reason = why, "early run lock given back")
            }
            Ok(_) => {
                debug!(vm = %vm.name, uuid, "early run lock changed meanwhile; not given back")
            }
            Err(e) => {
                warn!(vm = %vm.name, uuid, node = %self.node, error = %e, reason = why, "early run lock not given back (the plan releases it on the next reconcile)")
            }
        }
    }

    /// Record a crash or failed start; returns the failures in the window.
    fn record_failure(&self, uuid: &str, what: String) -> (u32, Duration) {
        let window = self.cfg.failure_window;
        let base = self.cfg.restart_backoff;
        self.with_rt(uuid, |rt| {
            let now = Instant::now();
            rt.failures.push_back(now);
            let n = rt.failures_within(window, now);
            let delay = backoff(base * 2, MAX_RESTART_BACKOFF, n);
            rt.next_start = Some(now + delay);
            rt.last_failure = Some(what);
            (n, delay)
        })
    }

    async fn reconcile_vm(
        &self,
        vm: &Vm,
        keys: &BTreeMap<String, KeyEntry>,
    ) -> Result<Action, ReconcileError> {
        let me = self.node.as_str();
        let uuid = vm.uuid.as_str();
        let state_rev = key_revision(keys, VmField::State);
        self.with_rt(uuid, |rt| {
            if rt.state_rev != state_rev {
                let keep_expect = rt.expect_running;
                *rt = Runtime {
                    state_rev,
                    expect_running: keep_expect,
                    status: rt.status.take(),
                    status_written: rt.status_written,
                    observed: rt.observed,
                    ..Runtime::default()
                };
            }
        });
        let mut vm = vm.clone();
        // What the host said, kept across a round that only wrote etcd (the lock won): the
        // start right after needs no second look (a start of a running domain is a no-op).
        let mut host_view: Option<(Option<DomainInfo>, Option<Local>)> = None;
        // The run lock sent together with the first look at the host, when the plan asks
        // for it whatever the host says (`locks_first`): its outcome, for the plan's step.
        let mut early_lock: Option<Option<(i64, i64)>> = None;
        // At most a few plan → act rounds per reconcile (lock won → start at once).
        for round in 0..4 {
            let (info, local) = match host_view.take() {
                Some(v) => v,
                None if round == 0 && self.locks_first(&vm) => {
                    let (view, won) = tokio::join!(self.local(&vm), self.acquire_lock(&vm, keys));
                    let won = won?;
                    match view {
                        Ok(view) => {
                            early_lock = Some(won);
                            view
                        }
                        Err(e) => {
                            // The host could not be seen: hold no lock while retrying.
                            if let Some((revision, _)) = won {
                                self.give_back_early_lock(&vm, revision, "host not readable")
                                    .await;
                            }
                            return Err(e);
                        }
                    }
                }
                None => self.local(&vm).await?,
            };
            let running = local
                .as_ref()
                .is_some_and(|l| matches!(l.state, LocalState::Running | LocalState::Paused));
            let lock_ours = vm
                .lock
                .as_ref()
                .is_some_and(|l| l.node == me && l.lease == self.lease.load(Ordering::SeqCst));
            let wants_run = vm.node.as_deref() == Some(me) && vm.state.runs();
            if lock_ours && vm.owner.as_deref() != Some(me) {
                self.repair_owner(&mut vm).await?;
            }
            // Crash detection: it ran here under our lock and stopped without us.
            let crashed = self.with_rt(uuid, |rt| {
                rt.observed = info.as_ref().map(|i| i.state);
                if running {
                    rt.expect_running = true;
                    None
                } else {
                    rt.shutdown_since = None;
                    if vm.state == DesiredState::Restart {
                        rt.restart_done = true;
                    }
                    let was = std::mem::take(&mut rt.expect_running);
                    (was && wants_run && lock_ours)
                        .then(|| info.as_ref().map(|i| i.reason.clone()).unwrap_or_default())
                }
            });
            if let Some(reason) = crashed {
                let reason = if reason.is_empty() {
                    "domain vanished".to_string()
                } else {
                    reason
                };
                let (n, delay) =
                    self.record_failure(uuid, format!("stopped unexpectedly ({reason})"));
                warn!(vm = %vm.name, uuid, node = %me, reason = %reason, failures = n, restart_in_ms = delay.as_millis() as u64, "vm stopped unexpectedly; restarting after backoff");
            }
            let (next_start, last_failure) =
                self.with_rt(uuid, |rt| (rt.next_start, rt.last_failure.clone()));
            let sit = self.situation(&vm, local.clone());
            let failed = sit.failed_starts;
            let plan = domain_plan::plan_vm(&sit);
            debug!(vm = %vm.name, uuid, steps = ?plan.steps, "plan");
            if !plan.steps.contains(&Step::AcquireLock) {
                if let Some(Some((revision, _))) = early_lock.take() {
                    // Won before the host was seen, and the host says no (a domain that is
                    // not ours carries the UUID): give the lock back at once.
                    self.give_back_early_lock(&vm, revision, "the host's domain is not ours")
                        .await;
                }
            }
            let mut replan = false;
            for step in &plan.steps {
                if let Some(check) = changes_domain(step, local.is_some()) {
                    if !self.ours_before(uuid, &vm.name, check).await? {
                        replan = true;
                        break;
                    }
                }
                match step {
                    Step::Report { state, reason } => {
                        let reason = if *state == "fail" {
                            match &last_failure {
                                Some(f) => format!("{reason}; last: {f}"),
                                None => reason.clone(),
                            }
                        } else {
                            reason.clone()
                        };
                        self.report(uuid, &vm.name, keys, state, &reason, None)
                            .await?;
                    }
                    Step::AcquireLock => {
                        let won = match early_lock.take() {
                            Some(won) => won,
                            None => self.acquire_lock(&vm, keys).await?,
                        };
                        match won {
                            Some((lockrev, lease)) => {
                                // The lease the transaction bound the lock to: a lease
                                // renewed meanwhile makes the lock not ours (re-planned).
                                vm.lock = Some(domain::LockHolder {
                                    node: me.to_string(),
                                    lease,
                                    revision: lockrev,
                                });
                                vm.owner = Some(me.to_string());
                                host_view = Some((info.clone(), local.clone()));
                                replan = true;
                            }
                            // Someone else changed the VM: its watch event brings us back.
                            None => return Ok(Action::AwaitChange),
                        }
                        break;
                    }
                    Step::ReleaseLock => self.release_lock(&vm, None).await?,
                    Step::Handover => {
                        self.release_lock(&vm, vm.node.as_deref()).await?;
                    }
                    Step::Define => {
                        let marked = domain::mark_xml(&vm.xml, me).map_err(host_err)?;
                        if let Err(e) = self.hv.define(&marked).await {
                            if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
                                // libvirt away, not the definition's fault: retry later.
                                return Err(host_err(e));
                            }
                            let msg = e.to_string();
                            self.report(
                                uuid,
                                &vm.name,
                                keys,
                                "fail",
                                "libvirt refused the definition",
                                Some(format!("xml: {msg}")),
                            )
                            .await?;
                            return Ok(Action::AwaitChange);
                        }
                        lock(&self.marks).insert(
                            uuid.to_string(),
                            Some(domain::Mark {
                                node: me.to_string(),
                                digest: domain::xml_digest(&vm.xml),
                            }),
                        );
                        info!(vm = %vm.name, uuid, node = %me, "domain defined from etcd");
                    }
                    Step::Start => {
                        if let Some(at) = next_start {
                            let now = Instant::now();
                            if at > now {
                                self.report(
                                    uuid,
                                    &vm.name,
                                    keys,
                                    "starting",
                                    &format!(
                                        "restart {} of {} after: {}",
                                        failed + 1,
                                        self.cfg.max_failed_starts,
                                        last_failure.clone().unwrap_or_default()
                                    ),
                                    None,
                                )
                                .await?;
                                return Ok(Action::RequeueAfter(at - now));
                            }
                        }
                        if let Some(delay) = self.rbd_gate(&vm, keys).await? {
                            return Ok(Action::RequeueAfter(delay));
                        }
                        // Right before the libvirt call: the lease, not a cached lock.
                        if let Err(why) = self.may_start() {
                            self.report(uuid, &vm.name, keys, "starting", why, None)
                                .await?;
                            return Ok(Action::RequeueAfter(Duration::from_secs(1)));
                        }
                        match self.hv.start(uuid).await {
                            Ok(_) => {
                                self.with_rt(uuid, |rt| {
                                    rt.expect_running = true;
                                    rt.next_start = None;
                                });
                                info!(vm = %vm.name, uuid, node = %me, lock_revision = vm.lock.as_ref().map(|l| l.revision).unwrap_or(0), "domain started");
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::Connection | ErrorKind::Timeout
                                ) =>
                            {
                                // libvirt away: not a failure of the guest.
                                return Err(host_err(e));
                            }
                            Err(e) => {
                                let (n, delay) =
                                    self.record_failure(uuid, format!("start failed: {e}"));
                                warn!(vm = %vm.name, uuid, node = %me, error = %e, failures = n, retry_in_ms = delay.as_millis() as u64, "domain start failed");
                                replan = true;
                                break;
                            }
                        }
                    }
                    Step::Shutdown => {
                        self.hv.shutdown(uuid).await.map_err(host_err)?;
                        self.with_rt(uuid, |rt| {
                            rt.shutdown_since = Some(Instant::now());
                            rt.expect_running = false;
                        });
                        info!(vm = %vm.name, uuid, node = %me, timeout_s = self.cfg.shutdown_timeout.as_secs(), "ACPI shutdown sent");
                    }
                    Step::Destroy => {
                        self.with_rt(uuid, |rt| rt.expect_running = false);
                        self.hv.destroy(uuid).await.map_err(host_err)?;
                        info!(vm = %vm.name, uuid, node = %me, "domain destroyed");
                    }
                    Step::Undefine => {
                        self.hv.undefine(uuid).await.map_err(host_err)?;
                        self.forget_mark(uuid);
                        info!(vm = %vm.name, uuid, node = %me, "definition removed from this host");
                    }
                    Step::LiveMigrate => {
                        self.live_migrate(&vm).await?;
                        replan = true;
                        break;
                    }
                    Step::Retarget => {
                        let last = vm.last_node.clone().unwrap_or_default();
                        let t = TxnBuilder::new()
                            .mod_revision_is(
                                &domain::vm_key(uuid, VmField::Node),
                                key_revision(keys, VmField::Node),
                            )
                            .put(&domain::vm_key(uuid, VmField::Node), last.clone());
                        if self.store.txn(t).await?.succeeded() {
                            info!(vm = %vm.name, uuid, node = %me, target = %last, "unmigrate: target set back to the last node");
                        }
                        return Ok(Action::AwaitChange);
                    }
                    Step::Settle => {
                        let mut t = TxnBuilder::new()
                            .mod_revision_is(&domain::vm_key(uuid, VmField::State), state_rev)
                            .put(&domain::vm_key(uuid, VmField::State), "start");
                        if vm.state == DesiredState::Unmigrate {
                            t = t.delete(&domain::vm_key(uuid, VmField::LastNode));
                        }
                        if self.store.txn(t).await?.succeeded() {
                            info!(vm = %vm.name, uuid, node = %me, from = %vm.state, "request complete; state back to start");
                        }
                    }
                }
            }
            if !replan {
                return Ok(match plan.recheck {
                    Some(d) => Action::RequeueAfter(d),
                    None => Action::AwaitChange,
                });
            }
        }
        Ok(Action::RequeueAfter(Duration::from_millis(100)))
    }

    /// We hold the VM's lock but `owner` names another node or none (deleted or forged):
    /// write it back, guarded on our lock.
    async fn repair_owner(&self, vm: &mut Vm) -> Result<(), ReconcileError> {
        let Some(l) = &vm.lock else { return Ok(()) };
        let uuid = vm.uuid.clone();
        let t = TxnBuilder::new()
            .mod_revision_is(&domain::vm_key(&uuid, VmField::Lock), l.revision)
            .put(&domain::vm_key(&uuid, VmField::Owner), self.node.clone());
        if self.store.txn(t).await?.succeeded() {
            info!(vm = %vm.name, uuid = %uuid, node = %self.node, from = vm.owner.as_deref().unwrap_or("(missing)"),
                "owner repaired: this node holds the VM's lock");
            vm.owner = Some(self.node.clone());
        }
        Ok(())
    }

    /// Win the run lock (absent, or stale/ours by revision) and become owner. On success the
    /// lock key's revision — the fencing token — and the lease the lock was bound to.
    async fn acquire_lock(
        &self,
        vm: &Vm,
        keys: &BTreeMap<String, KeyEntry>,
    ) -> Result<Option<(i64, i64)>, ReconcileError> {
        let uuid = &vm.uuid;
        let lock_key = domain::vm_key(uuid, VmField::Lock);
        let lease = self.lease.load(Ordering::SeqCst);
        let mut t = match &vm.lock {
            None => TxnBuilder::new().absent(&lock_key),
            Some(l) => TxnBuilder::new().mod_revision_is(&lock_key, l.revision),
        };
        // Still the target, and the same request.
        t = t
            .mod_revision_is(
                &domain::vm_key(uuid, VmField::Node),
                key_revision(keys, VmField::Node),
            )
            .mod_revision_is(
                &domain::vm_key(uuid, VmField::State),
                key_revision(keys, VmField::State),
            )
            .put_leased(&lock_key, self.node.clone(), lease)
            .put(&domain::vm_key(uuid, VmField::Owner), self.node.clone());
        let resp = self.store.txn(t).await?;
        if !resp.succeeded() {
            debug!(vm = %vm.name, uuid, "lock not won: the VM changed meanwhile");
            return Ok(None);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        info!(vm = %vm.name, uuid, node = %self.node, lease = format!("{lease:x}"), fencing_token = revision, "run lock acquired");
        Ok(Some((revision, lease)))
    }

    /// Drop our lock; with `handover_to`, also make that node the owner and (unless this is
    /// an unmigrate) us its `last_node`.
    async fn release_lock(&self, vm: &Vm, handover_to: Option<&str>) -> Result<(), ReconcileError> {
        let Some(l) = &vm.lock else { return Ok(()) };
        let uuid = &vm.uuid;
        let mut t = TxnBuilder::new()
            .mod_revision_is(&domain::vm_key(uuid, VmField::Lock), l.revision)
            .delete(&domain::vm_key(uuid, VmField::Lock));
        if let Some(to) = handover_to {
            t = t.put(&domain::vm_key(uuid, VmField::Owner), to.to_string());
            // An unmigrate returns the VM to its last node, which stays recorded until the
            // VM runs there (the target then clears it).
            if vm.state != DesiredState::Unmigrate {
                t = t.put(&domain::vm_key(uuid, VmField::LastNode), self.node.clone());
            }
        }
        if self.store.txn(t).await?.succeeded() {
            match handover_to {
                Some(to) => {
                    info!(vm = %vm.name, uuid, node = %self.node, to = %to, "lock released; ownership handed over")
                }
                None => info!(vm = %vm.name, uuid, node = %self.node, "lock released"),
            }
        }
        Ok(())
    }

    /// Live-migrate to the target node's published libvirt URI; on success hand the VM over.
    /// A failure marks this request `live_failed` (the plan then falls back or fails).
    async fn live_migrate(&self, vm: &Vm) -> Result<(), ReconcileError> {
        let uuid = vm.uuid.as_str();
        let target = vm.node.clone().unwrap_or_default();
        let uri = self
            .nodes
            .get(&target)
            .and_then(|e| e.parsed.as_ref().ok().cloned())
            .and_then(|n| n.info.as_ref().and_then(|i| i.libvirt_uri.clone()));
        let fail = |msg: String| {
            self.with_rt(uuid, |rt| {
                rt.live_failed = true;
                rt.last_failure = Some(msg.clone());
            });
            warn!(vm = %vm.name, uuid, node = %self.node, target = %target, error = %msg, "live migration failed");
        };
        let Some(uri) = uri else {
            fail(format!("node {target} publishes no libvirt URI"));
            return Ok(());
        };
        let _permit = self.migrations.acquire().await.map_err(host_err)?;
        let opts = MigrateOptions {
            live: true,
            max_downtime_ms: Some(
                vm.metadata
                    .migration_max_downtime
                    .unwrap_or(self.cfg.migration_max_downtime.as_millis() as u64),
            ),
            timeout: self.cfg.migration_timeout,
            ..MigrateOptions::default()
        };
        let t0 = Instant::now();
        info!(vm = %vm.name, uuid, node = %self.node, target = %target, uri = %uri, "live migration started");
        match self.hv.migrate(uuid, &uri, opts).await {
            Ok(()) => {
                self.with_rt(uuid, |rt| rt.expect_running = false);
                info!(vm = %vm.name, uuid, node = %self.node, target = %target, duration_ms = t0.elapsed().as_millis() as u64, "live migration done");
                self.release_lock(vm, Some(&target)).await?;
                Ok(())
            }
            Err(e) => {
                fail(e.to_string());
                Ok(())
            }
        }
    }

    /// A VM deleted from etcd: take its domain down and remove it from this host — only if
    /// DebVisor defined it, and only on evidence (see `removals`): after the settle time,
    /// unless too many VMs vanished at once or the store was found replaced.
    async fn reconcile_deleted(&self, uuid: &str) -> Result<Action, ReconcileError> {
        lock(&self.runtime).remove(uuid);
        if !domain::valid_uuid(uuid) {
            return Ok(Action::AwaitChange);
        }
        let Some(info) = self.hv.get(uuid).await.map_err(host_err)? else {
            self.forget_removal(uuid);
            return self.clean_reports(uuid).await;
        };
        if self.mark_of(uuid).await?.is_none() {
            if lock(&self.foreign_removals).insert(uuid.to_string()) {
                warn!(vm = %info.name, uuid, node = %self.node, "keys of a VM removed from etcd named a domain DebVisor did not define; the domain is left alone");
            }
            return self.clean_reports(uuid).await;
        }
        let change = self.store.store_change().map(|c| c.reason);
        let remaining = self.managed().len();
        let (verdict, was_held) = {
            let mut g = lock(&self.guard);
            let was = g.is_tripped();
            let v = g.judge(
                uuid,
                &info.name,
                remaining,
                change.as_deref(),
                Instant::now(),
                &crate::hostinfo::now_rfc3339(),
            );
            (v, was)
        };
        match verdict {
            Verdict::Wait(d) => {
                debug!(vm = %info.name, uuid, wait_ms = d.as_millis() as u64, "vm removed from etcd; waiting to see the whole burst");
                return Ok(Action::RequeueAfter(d));
            }
            Verdict::Hold => {
                if !was_held {
                    if let Some(h) = lock(&self.guard).report() {
                        error!(node = %self.node, held = h.count, reason = %h.reason,
                            "removals from etcd held: no guest is destroyed until an operator confirms with `debvisorctl node confirm-removals` (or the VMs' keys come back)");
                    }
                }
                info!(vm = %info.name, uuid, node = %self.node, "vm removed from etcd; removal held, the domain is left as it is");
                return Ok(Action::AwaitChange);
            }
            Verdict::Proceed => {}
        }
        // The verdict may have waited: the domain must still be ours right now.
        if !self.still_ours(uuid, &info.name, "removal").await? {
            return Ok(Action::RequeueAfter(Duration::from_millis(100)));
        }
        self.clean_reports(uuid).await?;
        if info.state.is_active() {
            self.hv.destroy(uuid).await.map_err(host_err)?;
            // The check above read the running guest's XML; the definition `undefine`
            // removes may have been replaced under it.
            if !self.still_ours(uuid, &info.name, "removal").await? {
                return Ok(Action::RequeueAfter(Duration::from_millis(100)));
            }
        }
        self.hv.undefine(uuid).await.map_err(host_err)?;
        self.forget_mark(uuid);
        info!(vm = %info.name, uuid, node = %self.node, "vm removed from etcd; domain destroyed and undefined here");
        Ok(Action::AwaitChange)
    }

    /// Reports written just before a deletion would otherwise linger as a half VM.
    async fn clean_reports(&self, uuid: &str) -> Result<Action, ReconcileError> {
        let t = TxnBuilder::new()
            .absent(&domain::vm_key(uuid, VmField::Xml))
            .delete(&domain::vm_key(uuid, VmField::Status))
            .delete(&domain::vm_key(uuid, VmField::Stats))
            .delete(&domain::vm_stats_key(uuid));
        self.store.txn(t).await?;
        Ok(Action::AwaitChange)
    }

    /// The VM is in etcd again (or was never ours to remove): no removal is pending for it.
    fn forget_removal(&self, uuid: &str) {
        lock(&self.guard).forget(uuid);
        lock(&self.foreign_removals).remove(uuid);
    }

    /// The cheap part of the host resync, on every keepalive tick: follow this node's
    /// `daemon_state = fenced` (guests stopped only on evidence). No libvirt call unless a
    /// fence with evidence stops the guests, so its cost does not grow with the VM count.
    pub async fn follow_fence(&self) {
        self.follow_fenced().await;
    }

    /// The VMs whose `status` changed in the watch since the last call (our own writes
    /// included) and is no longer what this node last wrote (deleted or forged): enqueued,
    /// so their reconcile writes it again. Per keepalive tick; O(changed statuses).
    pub fn repair_changed_statuses(&self, vms: &Reactor<VmKind>) {
        for id in vms.take_report_changes() {
            let Some(entry) = vms.get(&id) else { continue };
            let repair = lock(&self.runtime)
                .get(id.as_str())
                .is_some_and(|rt| self.status_needs_repair(rt, &entry));
            if repair {
                debug!(node = %self.node, uuid = %id, "status in etcd is not what this node wrote; reconciling");
                vms.enqueue(&id);
            }
        }
    }

    /// The full resync (at start, every `domains.resync_interval`, and after a libvirt
    /// `Resync` event): the fence as in [`DomainHost::follow_fence`], then one list of the
    /// host's domains; enqueue the VMs whose local state changed since their last reconcile
    /// (events missed), that were never reconciled, that wait for a restart, or whose status
    /// in etcd needs repair; note foreign domains; remove shut-off orphans (ours, gone from
    /// etcd). One libvirt list plus O(VMs) work: off the keepalive tick, since libvirt
    /// lifecycle events and the VM watch enqueue the VMs that change.
    pub async fn resync(&self, vms: &Reactor<VmKind>) {
        self.follow_fenced().await;
        let list = match self.hv.list().await {
            Ok(l) => l,
            // libvirt away: the driver logged the outage once; not a line per tick.
            Err(e) if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) => {
                debug!(node = %self.node, error = %e, "domain resync: libvirt list failed");
                return;
            }
            Err(e) => {
                warn!(node = %self.node, error = %e, "domain resync: libvirt list failed");
                return;
            }
        };
        debug!(node = %self.node, domains = list.len(), "full VM resync");
        // Marks of domains gone from the host (a transient one stops without an undefine).
        let listed: std::collections::HashSet<&str> =
            list.iter().map(|d| d.uuid.as_str()).collect();
        lock(&self.marks).retain(|u, _| listed.contains(u.as_str()));
        let known: HashMap<String, Arc<Entry<Vm>>> = vms.list().into_iter().collect();
        let mut local: HashMap<&str, &DomainInfo> = HashMap::new();
        let mut foreign = BTreeMap::new();
        for d in &list {
            local.insert(d.uuid.as_str(), d);
            if known.contains_key(&d.uuid) {
                continue;
            }
            let known_mark = lock(&self.marks).contains_key(&d.uuid);
            let Ok(mark) = self.mark_of(&d.uuid).await else {
                continue;
            };
            // Ours only if this node defined it: another daemon sharing this libvirtd (or a
            // node that migrated it here) owns its own marks.
            let ours = mark.as_deref() == Some(self.node.as_str());
            if !ours && !known_mark {
                info!(node = %self.node, vm = %d.name, uuid = %d.uuid, state = %d.state, "foreign domain (not defined by this node) left alone");
            }
            if !ours {
                foreign.insert(d.uuid.clone(), d.name.clone());
            } else if lock(&self.guard).knows(&d.uuid) {
                // Its removal is waiting or held: the guard has spoken for it.
            } else if d.state.is_active() {
                if lock(&self.orphans).insert(d.uuid.clone()) {
                    warn!(node = %self.node, vm = %d.name, uuid = %d.uuid, "domain defined by debvisor but no longer in etcd is running; left running (define it again or destroy it by hand)");
                }
            } else if self.removals_on_hold() {
                // A replaced store or a mass removal is no evidence: keep the definition.
            } else {
                // Read again right before removing it: defined by this node, still.
                match self.mark_now(&d.uuid).await {
                    Ok(Some(Some(m))) if m.node == self.node => {}
                    _ => continue,
                }
                match self.hv.undefine(&d.uuid).await {
                    Ok(_) => {
                        info!(node = %self.node, vm = %d.name, uuid = %d.uuid, "stale definition of a VM no longer in etcd removed")
                    }
                    Err(e) => {
                        warn!(node = %self.node, vm = %d.name, uuid = %d.uuid, error = %e, "stale definition not removed")
                    }
                }
                self.forget_mark(&d.uuid);
            }
        }
        *lock(&self.foreign) = foreign;
        let stale: Vec<String> = {
            let rt = lock(&self.runtime);
            known
                .iter()
                .filter(|(id, entry)| {
                    let now = local.get(id.as_str()).map(|d| d.state);
                    match rt.get(id.as_str()) {
                        None => true,
                        Some(r) => {
                            r.observed != now
                                || r.next_start.is_some()
                                || self.status_needs_repair(r, entry)
                        }
                    }
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in stale {
            vms.enqueue(&id);
        }
    }
}

/// The Domain reconciler for the reactor.
pub struct DomainReconciler(pub Arc<DomainHost>);

impl Reconciler<VmKind> for DomainReconciler {
    async fn reconcile(
        &self,
        id: &str,
        entry: Option<Arc<Entry<Vm>>>,
    ) -> Result<Action, ReconcileError> {
        let Some(entry) = entry else {
            return self.0.reconcile_deleted(id).await;
        };
        self.0.forget_removal(id);
        match &entry.parsed {
            Err(e) => self.0.reconcile_invalid(id, &entry.keys, e).await,
            // Refused by this node's `domains.xml_policy`: like a parse error, before any
            // host step.
            Ok(vm) => match check_policy(&vm.xml, &self.0.cfg.xml_policy) {
                Err(e) => self.0.reconcile_invalid(id, &entry.keys, &e).await,
                Ok(()) => self.0.reconcile_vm(vm, &entry.keys).await,
            },
        }
    }
}

/// Does a libvirt lifecycle event leave a domain's definition and identity as they were
/// (a boot, a pause, a stop), so a remembered mark stays true? Anything else (defined,
/// undefined, started by a migration or a restore) has the mark read again.
fn keeps_definition(e: &Lifecycle) -> bool {
    match e {
        Lifecycle::Started { reason } => reason == "booted",
        Lifecycle::Suspended { .. }
        | Lifecycle::Resumed { .. }
        | Lifecycle::ShuttingDown { .. }
        | Lifecycle::Stopped { .. } => true,
        _ => false,
    }
}

/// Lifecycle events → reconcile the VM at once; a `Resync` event → a full resync. Runs until
/// `cancel`; resubscribes when the event stream ends.
pub fn spawn_event_listener(
    host: Arc<DomainHost>,
    vms: Arc<Reactor<VmKind>>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut subscribed_before = false;
        loop {
            let mut rx = match host.hv.events().await {
                Ok(rx) => {
                    host.events_live.store(true, Ordering::SeqCst);
                    if std::mem::replace(&mut subscribed_before, true) {
                        // Subscribed again: what changed while no stream was open was not
                        // reported; the full resync finds it.
                        host.forget_marks();
                        host.resync(&vms).await;
                    }
                    rx
                }
                Err(e) => {
                    host.events_live.store(false, Ordering::SeqCst);
                    warn!(node = %host.node, error = %e, "libvirt events unavailable; relying on the resync tick");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    }
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => return,
                    ev = rx.recv() => ev,
                };
                let Some(ev) = ev else {
                    // Events from the end of this stream to the next subscription are lost:
                    // the host resync lists on every tick until then.
                    host.events_live.store(false, Ordering::SeqCst);
                    break;
                };
                host.changed.notify_one();
                match &ev {
                    DomainEvent::Lifecycle { uuid, event, .. } if !keeps_definition(event) => {
                        host.forget_mark(uuid)
                    }
                    DomainEvent::Lifecycle { .. } => {}
                    DomainEvent::Resync { .. } => host.forget_marks(),
                }
                match ev.uuid() {
                    Some(uuid) if vms.get(uuid).is_some() => {
                        debug!(uuid, event = ?ev, "libvirt event");
                        vms.enqueue(uuid);
                    }
                    Some(_) => {}
                    None => host.resync(&vms).await,
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::StopReason;

    #[test]
    fn only_events_that_keep_the_definition_keep_a_mark() {
        let started = |r: &str| Lifecycle::Started { reason: r.into() };
        assert!(keeps_definition(&started("booted")));
        for r in ["migrated", "restored", "from_snapshot", "wakeup"] {
            assert!(!keeps_definition(&started(r)), "{r}");
        }
        assert!(keeps_definition(&Lifecycle::Stopped {
            reason: StopReason::Destroyed
        }));
        assert!(keeps_definition(&Lifecycle::Suspended {
            reason: "paused".into()
        }));
        assert!(!keeps_definition(&Lifecycle::Defined { updated: true }));
        assert!(!keeps_definition(&Lifecycle::Defined { updated: false }));
        assert!(!keeps_definition(&Lifecycle::Undefined));
    }
}
