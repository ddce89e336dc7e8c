//! A deterministic model of a DebVisor cluster that drives the REAL fencing state machine
//! (`FenceBook`, `may_start`, `must_self_fence`) and the REAL recovery planner
//! (`recovery::plan`), and checks the safety invariants after every step.
//!
//! Time is simulated: an `Instant` taken once as the base plus millisecond offsets, advanced
//! in steps of [`STEP`]; nothing reads the clock again, so every run is the same.
//!
//! # The model
//!
//! - **etcd** is the source of truth: leases (server side: expire a TTL after the last
//!   renewal received), per node `alive` (bound to the node's lease) and `daemon_state`, per VM `node`,
//!   `owner`, `lock` (bound to the owner's lease), `state` and metadata, and the primary's
//!   election key (bound to the primary's lease). It is always available to the nodes that
//!   can reach it (quorum is not modelled). A write either lands whole (its guard held),
//!   writes nothing (its guard failed), or fails before it is evaluated (the node cannot
//!   reach etcd, or a scheduled write fault).
//! - **a node** has a host (powered on/off by its BMC, or crashed: hung with power on), a
//!   daemon (running, frozen by SIGSTOP, killed, stopped cleanly), a link to etcd, a BMC
//!   (works, unreachable, or power-off fails) and guests. The running daemon renews its
//!   lease every TTL/3 while it reaches etcd; its `valid_until` is the send time of its last
//!   good renewal + TTL (a renewal whose reply is lost extends the lease on the server but not
//!   `valid_until`). It self-fences (destroys every guest) when [`fencing::must_self_fence`]
//!   says so (policy `self_fence`), starts a guest only after it won the VM's lock with its
//!   current lease and only while [`fencing::may_start`] holds, destroys a guest whose VM is
//!   assigned elsewhere or whose lock another node (or an older lease) holds, adopts a guest
//!   whose lock is absent (left by a clean stop), and destroys every guest once it sees its
//!   own `daemon_state = fenced`. On (re)registration it writes `alive` and — unless it is
//!   `fenced` — `daemon_state = run`.
//! - **the guardian** (modelled simply): every daemon step heartbeats it the deadline
//!   `valid_until − margin`; while the daemon is frozen or killed, the guardian destroys the
//!   guests when that deadline passes. A clean stop says goodbye first (it is disarmed).
//! - **a clean stop** is today's `shutdown()`: goodbye to the guardian, relinquish the
//!   primary role, write `shutdown`, write `stop`, revoke the lease; guests are left running.
//!   With [`StopContract::SelfFenceUnlessStopped`] a daemon that could not record `stop`
//!   destroys its guests before revoking; with
//!   [`StopContract::SelfFenceUnlessShutdownRecorded`] only one that could not even record
//!   `shutdown` does (enough since the book treats `shutdown` as outside the self-fence
//!   bound) — the daemon-side fixes this simulator suggests.
//! - **the primary** is the holder of the election key; it is elected among nodes that can
//!   act, reach etcd, hold a live lease and are `run`. It ticks its `FenceBook` every
//!   simulated second on its view of etcd (a cached, possibly stale view when it cannot
//!   reach etcd), demotes itself (`reset()`) a margin before its lease could expire or when
//!   its key is gone, and a handover resets the old book; the new book starts from etcd.
//! - **the executor** applies the decisions as the brief describes: `DeclareDead` → write
//!   `daemon_state = dead` guarded on `alive` absent and `daemon_state ≠ stop`; `Fence` →
//!   IPMI power off and confirm (takes [`Timing::fence`]) then `fence_done`; `MarkFenced` →
//!   `daemon_state = fenced`; `Recover` → `recovery::plan` then per VM a transaction guarded
//!   on the VM's lock absent, the dead node's `alive` absent and its `daemon_state = fenced`
//!   (writes `node = target`, `state = start`); when the plan moves nothing, `recovered()`.
//!   A fence in flight completes even if its primary lost the role (its report goes to the
//!   reset book, which ignores it); it is abandoned if the primary's host or daemon died.
//!
//! What is not modelled: etcd quorum loss, clock drift between nodes, libvirt latency (a
//! start or destroy is instantaneous), operator migrations, a BMC that lies.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use debvisor_objects::domain::{DesiredState, LockHolder, Metadata, Vm};
use debvisor_objects::fencing::{
    self, AfterFence, Decision, FenceBook, FencedBy, FencingPolicy, NodeFacts,
};
use debvisor_objects::node::{DaemonState, DomainState, Health, MemoryStats, NodeRecord};
use debvisor_objects::recovery::{self, Recovery};

/// Simulated milliseconds since the base instant.
pub type Ms = u64;

/// One simulation step.
pub const STEP: Ms = 250;
/// The primary ticks its book every simulated second.
pub const TICK: Ms = 1000;

/// Seconds (as in scenario tables) to simulated milliseconds.
pub fn s(secs: f64) -> Ms {
    (secs * 1000.0).round() as Ms
}

/// Lease and fence timings.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Node lease TTL; renewals every TTL/3.
    pub ttl: Ms,
    /// Self-fence margin = `may_start` margin = the primary's demote margin.
    pub margin: Ms,
    /// IPMI power off + confirmation Off.
    pub fence: Ms,
    /// An unreachable BMC answers nothing for this long before the fence fails.
    pub bmc_timeout: Ms,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: 9000,
            margin: 2000,
            fence: 2000,
            bmc_timeout: 5000,
        }
    }
}

/// The fencing policy the scenarios start from: grace 5 s (≥ margin + destroy time), one
/// fence at a time, 3 per 300 s, recover after a confirmed fence, not after a failed one.
pub fn default_policy() -> FencingPolicy {
    FencingPolicy {
        enabled: true,
        grace: Duration::from_secs(5),
        max_concurrent: 1,
        window: Duration::from_secs(300),
        max_per_window: 3,
        successful_fence: AfterFence::Migrate,
        failed_fence: AfterFence::None,
        self_fence: true,
    }
}

/// What a daemon does on a clean stop when it could not record `stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopContract {
    /// Today's `shutdown()`: guests are left running whatever was written.
    AsToday,
    /// Guests are left running only when `stop` was recorded; otherwise the daemon
    /// destroys them before revoking its lease.
    SelfFenceUnlessStopped,
    /// Guests are left running when `shutdown` (or `stop`) was recorded: the primary then
    /// knows the node stopped cleanly or may have left guests; otherwise the daemon
    /// destroys them before revoking its lease.
    SelfFenceUnlessShutdownRecorded,
}

/// The host's BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bmc {
    /// Powers off and confirms Off.
    Ok,
    /// Does not answer (the fence fails after the BMC timeout).
    Unreachable,
    /// Answers, but the power off is not confirmed (the fence fails).
    Fails,
}

/// The daemon process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Running,
    /// SIGSTOP: does nothing; the guardian self-fences at its deadline.
    Frozen,
    /// SIGKILL: gone; the guardian self-fences at its deadline.
    Killed,
    /// Stopped cleanly (guardian disarmed).
    Stopped,
    /// The host is off or crashed.
    Down,
}

/// Writes a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    DeclareDead,
    MarkFenced,
    Move,
    Lock,
    Register,
    Shutdown,
    Stop,
    Revoke,
    Any,
}

/// A scheduled event.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev {
    /// The host crashes (hangs with power on): guests and daemon gone.
    Crash(String),
    /// The host is powered off (PDU, operator).
    PowerOff(String),
    /// The host boots (operator power on, reset of a crashed host).
    PowerOn(String),
    /// SIGKILL of the daemon (guests keep running until the guardian's deadline).
    KillDaemon(String),
    /// The daemon is started again (after a kill or a clean stop).
    StartDaemon(String),
    /// SIGSTOP.
    Freeze(String),
    /// SIGCONT.
    Thaw(String),
    /// The node can no longer reach etcd (nor its peers).
    Cut(String),
    /// The node reaches etcd again.
    Heal(String),
    /// The node's BMC changes.
    Bmc(String, Bmc),
    /// The next `count` writes of `kind` by `actor` fail before they are evaluated.
    WriteFault {
        actor: String,
        kind: WriteKind,
        count: u32,
    },
    /// The primary role moves to this node (`debvisorctl node primary NAME`).
    HandOver(String),
    /// An operator readmits a fenced node: `daemon_state` → `run` if it is alive, else
    /// `stop` (out, boots normally).
    Readmit(String),
    /// A graceful stop of the daemon.
    CleanStop(String),
    /// An operator sets a VM's desired state.
    VmState(String, DesiredState),
    /// Latency of the node's lease renewals to the server.
    Latency(String, Ms),
    /// Replies to the node's renewals are lost (the server still renews).
    ReplyLoss(String, bool),
}

/// Event constructors with `&str` names.
pub mod ev {
    use super::*;
    pub fn crash(n: &str) -> Ev {
        Ev::Crash(n.into())
    }
    pub fn power_off(n: &str) -> Ev {
        Ev::PowerOff(n.into())
    }
    pub fn power_on(n: &str) -> Ev {
        Ev::PowerOn(n.into())
    }
    pub fn kill(n: &str) -> Ev {
        Ev::KillDaemon(n.into())
    }
    pub fn start(n: &str) -> Ev {
        Ev::StartDaemon(n.into())
    }
    pub fn freeze(n: &str) -> Ev {
        Ev::Freeze(n.into())
    }
    pub fn thaw(n: &str) -> Ev {
        Ev::Thaw(n.into())
    }
    pub fn cut(n: &str) -> Ev {
        Ev::Cut(n.into())
    }
    pub fn heal(n: &str) -> Ev {
        Ev::Heal(n.into())
    }
    pub fn bmc(n: &str, b: Bmc) -> Ev {
        Ev::Bmc(n.into(), b)
    }
    pub fn fault(actor: &str, kind: WriteKind, count: u32) -> Ev {
        Ev::WriteFault {
            actor: actor.into(),
            kind,
            count,
        }
    }
    pub fn hand_over(n: &str) -> Ev {
        Ev::HandOver(n.into())
    }
    pub fn readmit(n: &str) -> Ev {
        Ev::Readmit(n.into())
    }
    pub fn stop(n: &str) -> Ev {
        Ev::CleanStop(n.into())
    }
    pub fn vm_state(uuid: &str, st: DesiredState) -> Ev {
        Ev::VmState(uuid.into(), st)
    }
    pub fn latency(n: &str, ms: Ms) -> Ev {
        Ev::Latency(n.into(), ms)
    }
    pub fn reply_loss(n: &str, on: bool) -> Ev {
        Ev::ReplyLoss(n.into(), on)
    }
}

/// A lease on the server.
#[derive(Debug, Clone)]
pub struct Lease {
    pub node: String,
    pub expires: Ms,
}

/// A node's keys in etcd.
#[derive(Debug, Clone, Default)]
pub struct NodeKeys {
    /// The lease `alive` is bound to, while it exists.
    pub alive: Option<i64>,
    pub daemon_state: Option<DaemonState>,
    /// The node publishes a BMC.
    pub bmc: bool,
    /// When `alive` vanished (the model's truth, for the grace check).
    pub alive_gone_at: Option<Ms>,
    /// When `daemon_state` became `fenced`.
    pub fenced_at: Option<Ms>,
}

/// A VM's keys in etcd.
#[derive(Debug, Clone)]
pub struct VmKeys {
    pub node: Option<String>,
    pub owner: Option<String>,
    /// (holder, lease, revision).
    pub lock: Option<(String, i64, i64)>,
    pub state: DesiredState,
    pub meta: Metadata,
    pub mem: u64,
}

/// The store.
#[derive(Debug, Clone, Default)]
pub struct Etcd {
    pub rev: i64,
    pub leases: BTreeMap<i64, Lease>,
    pub next_lease: i64,
    pub nodes: BTreeMap<String, NodeKeys>,
    pub vms: BTreeMap<String, VmKeys>,
    /// The election key: (primary, its lease).
    pub primary: Option<(String, i64)>,
    faults: Vec<(String, WriteKind, u32)>,
}

impl Etcd {
    fn grant(&mut self, node: &str, expires: Ms) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                node: node.to_string(),
                expires,
            },
        );
        id
    }

    /// Revoke or expire `id`: every key bound to it goes.
    fn drop_lease(&mut self, id: i64, t: Ms) {
        self.leases.remove(&id);
        self.rev += 1;
        for k in self.nodes.values_mut() {
            if k.alive == Some(id) {
                k.alive = None;
                k.alive_gone_at = Some(t);
            }
        }
        for v in self.vms.values_mut() {
            if v.lock.as_ref().is_some_and(|l| l.1 == id) {
                v.lock = None;
            }
        }
        if self.primary.as_ref().is_some_and(|p| p.1 == id) {
            self.primary = None;
        }
    }

    /// Does `node` hold any lease the server still keeps?
    pub fn has_live_lease(&self, node: &str) -> bool {
        self.leases.values().any(|l| l.node == node)
    }

    /// Consume a matching write fault: true when this write fails.
    fn fault(&mut self, actor: &str, kind: WriteKind) -> bool {
        for f in &mut self.faults {
            if f.0 == actor && (f.1 == kind || f.1 == WriteKind::Any) && f.2 > 0 {
                f.2 -= 1;
                return true;
            }
        }
        false
    }

    fn set_state(&mut self, node: &str, st: DaemonState, t: Ms) {
        if let Some(k) = self.nodes.get_mut(node) {
            if st == DaemonState::Fenced && k.daemon_state != Some(DaemonState::Fenced) {
                k.fenced_at = Some(t);
            }
            k.daemon_state = Some(st);
            self.rev += 1;
        }
    }
}

/// A guest (qemu process) on a host.
#[derive(Debug, Clone)]
pub struct Guest {
    pub started: Ms,
    /// Left running by a clean stop (its lock went with the revoked lease).
    pub orphan: bool,
}

/// A node of the model.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub name: String,
    pub power: bool,
    pub crashed: bool,
    pub daemon: Daemon,
    pub etcd_link: bool,
    pub bmc: Bmc,
    pub mem: u64,
    /// The lease the daemon uses.
    pub lease: Option<i64>,
    pub valid_until: Option<Ms>,
    pub next_renew: Ms,
    /// The guardian's deadline (None: disarmed).
    pub guardian: Option<Ms>,
    pub guests: BTreeMap<String, Guest>,
    /// This daemon believes it is the primary (its epoch).
    pub primary: Option<u64>,
    /// The primary's cached view of etcd.
    pub view: Option<BTreeMap<String, NodeKeys>>,
    pub latency: Ms,
    pub reply_loss: bool,
    /// The host was powered off by a confirmed IPMI fence (until it is readmitted).
    pub fenced_off: bool,
}

impl SimNode {
    fn host_up(&self) -> bool {
        self.power && !self.crashed
    }
    fn acts(&self) -> bool {
        self.host_up() && self.daemon == Daemon::Running
    }
}

/// A fence in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    pub node: String,
    pub by: String,
    pub epoch: u64,
    pub due: Ms,
    /// The IPMI result once it happened: (ok, reason).
    pub result: Option<(bool, String)>,
}

/// A VM of the initial cluster.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub uuid: String,
    pub node: String,
    pub mem: u64,
    pub state: DesiredState,
    pub meta: Metadata,
}

/// Model options.
#[derive(Debug, Clone)]
pub struct ModelOpts {
    pub stop_contract: StopContract,
}

impl Default for ModelOpts {
    fn default() -> Self {
        ModelOpts {
            stop_contract: StopContract::AsToday,
        }
    }
}

/// A scenario: cluster, policy, timed events.
#[derive(Debug, Clone)]
pub struct Setup {
    pub nodes: Vec<(String, bool, u64)>,
    pub vms: Vec<VmSpec>,
    pub policy: FencingPolicy,
    pub timing: Timing,
    pub opts: ModelOpts,
    pub events: Vec<(Ms, Ev)>,
    /// Preferred primary at start (else the first eligible by name).
    pub first_primary: Option<String>,
}

impl Setup {
    /// `n` nodes `a`, `b`, … with a BMC and 16 GiB each, no VMs, the default policy.
    pub fn new(n: usize) -> Setup {
        Setup {
            nodes: (0..n)
                .map(|i| (((b'a' + i as u8) as char).to_string(), true, 16384))
                .collect(),
            vms: Vec::new(),
            policy: default_policy(),
            timing: Timing::default(),
            opts: ModelOpts::default(),
            events: Vec::new(),
            first_primary: None,
        }
    }

    /// A VM meant to run (`start`) on `node`.
    pub fn vm(self, uuid: &str, node: &str, mem: u64) -> Setup {
        self.vm_with(uuid, node, mem, DesiredState::Start, |_| {})
    }

    /// A VM with a desired state and metadata.
    pub fn vm_with(
        mut self,
        uuid: &str,
        node: &str,
        mem: u64,
        state: DesiredState,
        meta: impl FnOnce(&mut Metadata),
    ) -> Setup {
        let mut m = Metadata::default();
        meta(&mut m);
        self.vms.push(VmSpec {
            uuid: uuid.into(),
            node: node.into(),
            mem,
            state,
            meta: m,
        });
        self
    }

    pub fn policy(mut self, f: impl FnOnce(&mut FencingPolicy)) -> Setup {
        f(&mut self.policy);
        self
    }

    pub fn timing(mut self, f: impl FnOnce(&mut Timing)) -> Setup {
        f(&mut self.timing);
        self
    }

    pub fn contract(mut self, c: StopContract) -> Setup {
        self.opts.stop_contract = c;
        self
    }

    /// `node` publishes no BMC.
    pub fn no_bmc(mut self, node: &str) -> Setup {
        for n in &mut self.nodes {
            if n.0 == node {
                n.1 = false;
            }
        }
        self
    }

    pub fn primary(mut self, node: &str) -> Setup {
        self.first_primary = Some(node.into());
        self
    }

    /// An event at `secs`.
    pub fn at(mut self, secs: f64, e: Ev) -> Setup {
        self.events.push((s(secs), e));
        self
    }

    /// Build and run until `secs`; panics with the trace on the first violation.
    pub fn run(self, name: &str, secs: f64) -> Sim {
        let mut sim = Sim::new(name, self);
        if let Err(v) = sim.run(s(secs)) {
            panic!("{}", sim.trace(&v));
        }
        sim
    }

    /// Build and run until `secs`, expecting a violation: returns it (panics if none).
    pub fn run_expecting_violation(self, name: &str, secs: f64) -> (Sim, String) {
        let mut sim = Sim::new(name, self);
        match sim.run(s(secs)) {
            Ok(()) => panic!(
                "{}",
                sim.trace("expected an invariant violation, the run was clean")
            ),
            Err(v) => (sim, v),
        }
    }
}

/// The simulated cluster.
pub struct Sim {
    pub name: String,
    pub t: Ms,
    pub base: Instant,
    pub policy: FencingPolicy,
    pub timing: Timing,
    pub opts: ModelOpts,
    pub nodes: BTreeMap<String, SimNode>,
    pub books: BTreeMap<String, FenceBook>,
    pub etcd: Etcd,
    pub inflight: Vec<InFlight>,
    pub epoch: u64,
    pub events: Vec<(Ms, Ev)>,
    pub applied: Vec<(Ms, Ev)>,
    /// Everything that happened.
    pub log: Vec<(Ms, String)>,
    /// The primary's decisions (except the repeated `Recover`) and their outcomes.
    pub story: Vec<(Ms, String)>,
    /// Fences started: (time, primary, epoch, node).
    pub fences: Vec<(Ms, String, u64, String)>,
    pub violations: Vec<String>,
    first_primary: Option<String>,
    /// Recover outcomes already told (to tell a blocked recovery once).
    told: BTreeMap<String, String>,
    /// Nodes marked fenced without IPMI, per primary epoch.
    marked: BTreeSet<(u64, String)>,
    /// Counters for coverage of randomized runs.
    pub stats: BTreeMap<&'static str, u64>,
}

impl Sim {
    pub fn new(name: &str, setup: Setup) -> Sim {
        let mut etcd = Etcd::default();
        let mut nodes = BTreeMap::new();
        let mut books = BTreeMap::new();
        let ttl = setup.timing.ttl;
        for (n, bmc, mem) in &setup.nodes {
            let id = etcd.grant(n, ttl);
            etcd.nodes.insert(
                n.clone(),
                NodeKeys {
                    alive: Some(id),
                    daemon_state: Some(DaemonState::Run),
                    bmc: *bmc,
                    alive_gone_at: None,
                    fenced_at: None,
                },
            );
            nodes.insert(
                n.clone(),
                SimNode {
                    name: n.clone(),
                    power: true,
                    crashed: false,
                    daemon: Daemon::Running,
                    etcd_link: true,
                    bmc: Bmc::Ok,
                    mem: *mem,
                    lease: Some(id),
                    valid_until: Some(ttl),
                    next_renew: ttl / 3,
                    guardian: Some(ttl - setup.timing.margin),
                    guests: BTreeMap::new(),
                    primary: None,
                    view: None,
                    latency: 0,
                    reply_loss: false,
                    fenced_off: false,
                },
            );
            books.insert(n.clone(), FenceBook::new(setup.policy.clone()));
        }
        for v in &setup.vms {
            etcd.vms.insert(
                v.uuid.clone(),
                VmKeys {
                    node: Some(v.node.clone()),
                    owner: None,
                    lock: None,
                    state: v.state,
                    meta: v.meta.clone(),
                    mem: v.mem,
                },
            );
        }
        let mut events = setup.events;
        events.sort_by_key(|e| e.0);
        Sim {
            name: name.to_string(),
            t: 0,
            base: Instant::now(),
            policy: setup.policy,
            timing: setup.timing,
            opts: setup.opts,
            nodes,
            books,
            etcd,
            inflight: Vec::new(),
            epoch: 0,
            events,
            applied: Vec::new(),
            log: Vec::new(),
            story: Vec::new(),
            fences: Vec::new(),
            violations: Vec::new(),
            first_primary: setup.first_primary,
            told: BTreeMap::new(),
            marked: BTreeSet::new(),
            stats: BTreeMap::new(),
        }
    }

    fn at(&self, ms: Ms) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn note(&mut self, msg: String) {
        self.log.push((self.t, msg));
    }

    fn tell(&mut self, msg: String) {
        self.log.push((self.t, format!("» {msg}")));
        self.story.push((self.t, msg));
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn violate(&mut self, msg: String) {
        let line = format!("t={} {msg}", fmt_t(self.t));
        if !self.violations.contains(&line) {
            self.log.push((self.t, format!("!! {msg}")));
            self.violations.push(line);
        }
    }

    /// Can `n` reach etcd now (host up, daemon running, link up)?
    pub fn connected(&self, n: &str) -> bool {
        self.nodes.get(n).is_some_and(|x| x.acts() && x.etcd_link)
    }

    /// Run until `until` (inclusive); the first violation ends the run.
    pub fn run(&mut self, until: Ms) -> Result<(), String> {
        while self.t <= until {
            self.step();
            self.check();
            if !self.violations.is_empty() {
                return Err(self.violations.join("\n"));
            }
            self.t += STEP;
        }
        self.t -= STEP;
        Ok(())
    }

    fn step(&mut self) {
        let t = self.t;
        // 1. Scheduled events.
        while self.events.first().is_some_and(|e| e.0 <= t) {
            let (_, e) = self.events.remove(0);
            self.applied.push((t, e.clone()));
            self.note(format!("event {e:?}"));
            self.apply_event(e);
        }
        // 2. The server expires leases.
        let expired: Vec<i64> = self
            .etcd
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= t)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let who = self.etcd.leases[&id].node.clone();
            self.note(format!("server: lease {id} of {who} expired"));
            self.etcd.drop_lease(id, t);
        }
        // 3. IPMI actions that are due.
        self.ipmi();
        // 4. Nodes.
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in &names {
            self.node_step(n);
        }
        // 5. The primary.
        self.primary_step();
    }

    // ---------------------------------------------------------------- events

    fn lose_primary(&mut self, n: &str, why: &str) {
        let Some(node) = self.nodes.get_mut(n) else {
            return;
        };
        if node.primary.take().is_some() {
            node.view = None;
            if let Some(b) = self.books.get_mut(n) {
                b.reset();
            }
            self.tell(format!("demoted {n} ({why})"));
        }
    }

    fn host_down(&mut self, n: &str, power: bool, why: &str) {
        self.lose_primary(n, why);
        let node = self.nodes.get_mut(n).expect("node");
        if !power {
            node.power = false;
        } else {
            node.crashed = true;
        }
        node.daemon = Daemon::Down;
        node.guests.clear();
        node.lease = None;
        node.valid_until = None;
        node.guardian = None;
        // The process died with its memory: a new book when it comes back.
        self.books
            .insert(n.to_string(), FenceBook::new(self.policy.clone()));
    }

    fn apply_event(&mut self, e: Ev) {
        match e {
            Ev::Crash(n) => self.host_down(&n, true, "host crashed"),
            Ev::PowerOff(n) => self.host_down(&n, false, "host powered off"),
            Ev::PowerOn(n) => {
                let node = self.nodes.get_mut(&n).expect("node");
                if node.host_up() {
                    return;
                }
                node.power = true;
                node.crashed = false;
                node.daemon = Daemon::Running;
                node.lease = None;
                node.valid_until = None;
                node.guardian = None;
                node.guests.clear();
            }
            Ev::KillDaemon(n) => {
                self.lose_primary(&n, "daemon killed");
                let node = self.nodes.get_mut(&n).expect("node");
                if matches!(node.daemon, Daemon::Running | Daemon::Frozen) {
                    node.daemon = Daemon::Killed;
                }
                self.books
                    .insert(n.clone(), FenceBook::new(self.policy.clone()));
            }
            Ev::StartDaemon(n) => {
                let node = self.nodes.get_mut(&n).expect("node");
                if node.host_up() && matches!(node.daemon, Daemon::Killed | Daemon::Stopped) {
                    node.daemon = Daemon::Running;
                    node.lease = None;
                    node.valid_until = None;
                }
            }
            Ev::Freeze(n) => {
                let node = self.nodes.get_mut(&n).expect("node");
                if node.daemon == Daemon::Running {
                    node.daemon = Daemon::Frozen;
                }
            }
            Ev::Thaw(n) => {
                let node = self.nodes.get_mut(&n).expect("node");
                if node.daemon == Daemon::Frozen {
                    node.daemon = Daemon::Running;
                }
            }
            Ev::Cut(n) => self.nodes.get_mut(&n).expect("node").etcd_link = false,
            Ev::Heal(n) => self.nodes.get_mut(&n).expect("node").etcd_link = true,
            Ev::Bmc(n, b) => self.nodes.get_mut(&n).expect("node").bmc = b,
            Ev::WriteFault { actor, kind, count } => self.etcd.faults.push((actor, kind, count)),
            Ev::HandOver(n) => self.hand_over(&n),
            Ev::Readmit(n) => {
                let k = self.etcd.nodes.get(&n).expect("node keys");
                if k.daemon_state == Some(DaemonState::Fenced) {
                    let st = if k.alive.is_some() {
                        DaemonState::Run
                    } else {
                        DaemonState::Stop
                    };
                    self.etcd.set_state(&n, st, self.t);
                    self.nodes.get_mut(&n).expect("node").fenced_off = false;
                    self.tell(format!("readmit {n} ({st})"));
                }
            }
            Ev::CleanStop(n) => self.clean_stop(&n),
            Ev::VmState(uuid, st) => {
                if let Some(v) = self.etcd.vms.get_mut(&uuid) {
                    v.state = st;
                }
            }
            Ev::Latency(n, ms) => self.nodes.get_mut(&n).expect("node").latency = ms,
            Ev::ReplyLoss(n, on) => self.nodes.get_mut(&n).expect("node").reply_loss = on,
        }
    }

    fn hand_over(&mut self, to: &str) {
        let Some(node) = self.nodes.get(to) else {
            return;
        };
        let Some(lease) = node.lease else {
            return;
        };
        if !self.connected(to)
            || !self.etcd.leases.contains_key(&lease)
            || self.etcd.nodes[to].daemon_state != Some(DaemonState::Run)
        {
            self.note(format!("hand over to {to}: not eligible"));
            return;
        }
        if let Some((old, _)) = self.etcd.primary.clone() {
            if old == to {
                return;
            }
            self.lose_primary(&old, "handover");
        }
        self.elect(to, lease);
    }

    fn elect(&mut self, n: &str, lease: i64) {
        self.epoch += 1;
        self.etcd.primary = Some((n.to_string(), lease));
        let ep = self.epoch;
        let node = self.nodes.get_mut(n).expect("node");
        node.primary = Some(ep);
        node.view = None;
        self.tell(format!("primary {n}"));
    }

    /// Today's graceful shutdown (see the module doc).
    fn clean_stop(&mut self, n: &str) {
        let t = self.t;
        let node = self.nodes.get(n).expect("node");
        if node.daemon != Daemon::Running || !node.host_up() {
            return;
        }
        // Goodbye to the guardian.
        self.nodes.get_mut(n).expect("node").guardian = None;
        // Relinquish the primary role.
        if self.nodes[n].primary.is_some() {
            self.lose_primary(n, "clean stop");
            if self.connected(n) && self.etcd.primary.as_ref().is_some_and(|p| p.0 == n) {
                self.etcd.primary = None;
            }
        }
        let connected = self.connected(n);
        let mut stop_recorded = false;
        let mut shutdown_recorded = false;
        let from = self.etcd.nodes[n].daemon_state;
        if from == Some(DaemonState::Run) && connected && !self.etcd.fault(n, WriteKind::Shutdown) {
            self.etcd.set_state(n, DaemonState::Shutdown, t);
            shutdown_recorded = true;
            if !self.etcd.fault(n, WriteKind::Stop) {
                self.etcd.set_state(n, DaemonState::Stop, t);
                stop_recorded = true;
            }
        }
        self.count("clean stop");
        if !stop_recorded {
            self.count(if shutdown_recorded {
                "clean stop: `shutdown` only"
            } else {
                "clean stop: nothing recorded"
            });
            self.note(format!(
                "clean stop {n}: `stop` not recorded (from {from:?})"
            ));
            let destroy = match self.opts.stop_contract {
                StopContract::AsToday => false,
                StopContract::SelfFenceUnlessStopped => true,
                StopContract::SelfFenceUnlessShutdownRecorded => !shutdown_recorded,
            };
            if destroy {
                let node = self.nodes.get_mut(n).expect("node");
                let gone: Vec<String> = node.guests.keys().cloned().collect();
                node.guests.clear();
                self.note(format!(
                    "clean stop {n}: destroys its guests {gone:?} (stop unrecorded)"
                ));
            }
        }
        let lease = self.nodes[n].lease;
        if let Some(id) = lease {
            if connected && !self.etcd.fault(n, WriteKind::Revoke) {
                self.etcd.drop_lease(id, t);
            }
        }
        let node = self.nodes.get_mut(n).expect("node");
        node.daemon = Daemon::Stopped;
        node.lease = None;
        node.valid_until = None;
        for g in node.guests.values_mut() {
            g.orphan = true;
        }
        self.books
            .insert(n.to_string(), FenceBook::new(self.policy.clone()));
        self.tell(format!("clean stop {n}"));
    }

    // ---------------------------------------------------------------- nodes

    fn node_step(&mut self, n: &str) {
        let node = &self.nodes[n];
        if !node.host_up() {
            return;
        }
        match node.daemon {
            Daemon::Running => self.daemon_step(n),
            Daemon::Frozen | Daemon::Killed | Daemon::Stopped => self.guardian_step(n),
            Daemon::Down => {}
        }
    }

    fn guardian_step(&mut self, n: &str) {
        let t = self.t;
        let self_fence = self.policy.self_fence;
        let node = self.nodes.get_mut(n).expect("node");
        if let Some(dl) = node.guardian {
            if t >= dl && self_fence {
                node.guardian = None;
                if !node.guests.is_empty() {
                    let gone: Vec<String> = node.guests.keys().cloned().collect();
                    node.guests.clear();
                    self.note(format!("guardian of {n} self-fences {gone:?}"));
                    self.count("guardian self-fence");
                }
            }
        }
    }

    fn register(&mut self, n: &str) {
        let t = self.t;
        if self.etcd.fault(n, WriteKind::Register) {
            self.note(format!("{n}: registration write failed"));
            return;
        }
        let lat = self.nodes[n].latency;
        let ttl = self.timing.ttl;
        let id = self.etcd.grant(n, t + lat + ttl);
        let k = self.etcd.nodes.get_mut(n).expect("keys");
        k.alive = Some(id);
        k.alive_gone_at = None;
        let fenced = k.daemon_state == Some(DaemonState::Fenced);
        if !fenced {
            self.etcd.set_state(n, DaemonState::Run, t);
            // Back in service without a readmission (the mark never landed).
            self.nodes.get_mut(n).expect("node").fenced_off = false;
        }
        self.etcd.rev += 1;
        let node = self.nodes.get_mut(n).expect("node");
        node.lease = Some(id);
        node.valid_until = Some(t + ttl);
        node.next_renew = t + ttl / 3;
        self.note(format!(
            "{n}: registered with lease {id} (fenced: {fenced})"
        ));
    }

    fn daemon_step(&mut self, n: &str) {
        let t = self.t;
        let ttl = self.timing.ttl;
        let margin = self.timing.margin;
        let connected = self.connected(n);
        // 1. The lease.
        let node = &self.nodes[n];
        if let Some(id) = node.lease {
            if t >= node.next_renew {
                let (lat, reply_loss) = (node.latency, node.reply_loss);
                self.nodes.get_mut(n).expect("node").next_renew = t + ttl / 3;
                if connected {
                    match self.etcd.leases.get_mut(&id) {
                        Some(l) if l.expires > t + lat => {
                            l.expires = t + lat + ttl;
                            if !reply_loss {
                                self.nodes.get_mut(n).expect("node").valid_until = Some(t + ttl);
                            }
                        }
                        _ => {
                            let node = self.nodes.get_mut(n).expect("node");
                            node.lease = None;
                            node.valid_until = None;
                            self.note(format!("{n}: lease {id} lost"));
                        }
                    }
                }
            }
        }
        if self.nodes[n].lease.is_none() && connected {
            self.register(n);
        }
        // 2. Heartbeat to the guardian.
        let node = self.nodes.get_mut(n).expect("node");
        node.guardian = Some(
            node.valid_until
                .map(|v| v.saturating_sub(margin))
                .unwrap_or(t),
        );
        // 3. Self-fence.
        let valid_until = node
            .valid_until
            .map(|v| self.base + Duration::from_millis(v));
        if self.policy.self_fence
            && fencing::must_self_fence(self.at(t), valid_until, Duration::from_millis(margin))
        {
            let node = self.nodes.get_mut(n).expect("node");
            if !node.guests.is_empty() {
                let gone: Vec<String> = node.guests.keys().cloned().collect();
                node.guests.clear();
                self.note(format!("{n}: self-fences {gone:?}"));
                self.count("self-fence");
            }
        }
        // 4. Domains.
        if connected {
            self.domains(n);
        }
    }

    fn lock_txn(&mut self, n: &str, uuid: &str, lease: i64) -> bool {
        if self.etcd.fault(n, WriteKind::Lock) {
            self.note(format!("{n}: lock write for {uuid} failed"));
            return false;
        }
        if !self.etcd.leases.contains_key(&lease) {
            // etcd refuses a key bound to a lease it no longer has: the node learns its
            // lease is gone.
            let node = self.nodes.get_mut(n).expect("node");
            node.lease = None;
            node.valid_until = None;
            self.note(format!("{n}: lease {lease} lost (lock of {uuid} refused)"));
            return false;
        }
        self.etcd.rev += 1;
        let rev = self.etcd.rev;
        let v = self.etcd.vms.get_mut(uuid).expect("vm");
        if v.lock.is_some() {
            return false;
        }
        v.lock = Some((n.to_string(), lease, rev));
        v.owner = Some(n.to_string());
        true
    }

    fn release(&mut self, n: &str, uuid: &str) {
        if let Some(v) = self.etcd.vms.get_mut(uuid) {
            if v.lock.as_ref().is_some_and(|l| l.0 == n) {
                v.lock = None;
                self.etcd.rev += 1;
            }
        }
    }

    fn destroy(&mut self, n: &str, uuid: &str, why: &str) {
        self.nodes.get_mut(n).expect("node").guests.remove(uuid);
        self.note(format!("{n}: destroys {uuid} ({why})"));
    }

    fn domains(&mut self, n: &str) {
        let t = self.t;
        let margin = Duration::from_millis(self.timing.margin);
        if self.etcd.nodes[n].daemon_state == Some(DaemonState::Fenced) {
            let gone: Vec<String> = self.nodes[n].guests.keys().cloned().collect();
            for g in gone {
                self.destroy(n, &g, "this node is fenced");
            }
            return;
        }
        let Some(lease) = self.nodes[n].lease else {
            return;
        };
        // Guests running here.
        let here: Vec<String> = self.nodes[n].guests.keys().cloned().collect();
        for uuid in here {
            let Some(vm) = self.etcd.vms.get(&uuid).cloned() else {
                self.destroy(n, &uuid, "VM deleted");
                continue;
            };
            if vm.node.as_deref() != Some(n) || !vm.state.runs() {
                self.destroy(n, &uuid, "assigned elsewhere or not meant to run");
                self.release(n, &uuid);
                continue;
            }
            match &vm.lock {
                Some((h, l, _)) if h == n && *l == lease => {}
                Some((h, l, _)) => {
                    let why = format!("split-brain guard: lock held by {h} lease {l}");
                    self.destroy(n, &uuid, &why);
                }
                None => {
                    if self.lock_txn(n, &uuid, lease) {
                        if let Some(g) = self.nodes.get_mut(n).expect("node").guests.get_mut(&uuid)
                        {
                            g.orphan = false;
                        }
                        self.note(format!("{n}: adopts {uuid}"));
                    }
                }
            }
        }
        // VMs to run here.
        let mine: Vec<(String, VmKeys)> = self
            .etcd
            .vms
            .iter()
            .filter(|(_, v)| v.node.as_deref() == Some(n))
            .map(|(u, v)| (u.clone(), v.clone()))
            .collect();
        for (uuid, vm) in mine {
            if self.nodes[n].guests.contains_key(&uuid) {
                continue;
            }
            if !vm.state.runs() {
                self.release(n, &uuid);
                continue;
            }
            if vm.lock.is_none() && !self.lock_txn(n, &uuid, lease) {
                continue;
            }
            let held = self.etcd.vms[&uuid]
                .lock
                .as_ref()
                .is_some_and(|l| l.0 == n && l.1 == lease);
            let valid_until = self.nodes[n]
                .valid_until
                .map(|v| self.base + Duration::from_millis(v));
            let fenced = self.etcd.nodes[n].daemon_state == Some(DaemonState::Fenced);
            if held && fencing::may_start(self.at(t), valid_until, margin, fenced) {
                if fenced {
                    self.violate(format!("inv4: {n} starts {uuid} while fenced"));
                }
                self.nodes.get_mut(n).expect("node").guests.insert(
                    uuid.clone(),
                    Guest {
                        started: t,
                        orphan: false,
                    },
                );
                self.note(format!("{n}: starts {uuid} under lease {lease}"));
                self.count("guest start");
            }
        }
        // Locks held here for VMs that went elsewhere.
        let stale: Vec<String> = self
            .etcd
            .vms
            .iter()
            .filter(|(u, v)| {
                v.lock.as_ref().is_some_and(|l| l.0 == n)
                    && v.node.as_deref() != Some(n)
                    && !self.nodes[n].guests.contains_key(*u)
            })
            .map(|(u, _)| u.clone())
            .collect();
        for u in stale {
            self.release(n, &u);
        }
    }

    // ---------------------------------------------------------------- IPMI

    fn ipmi(&mut self) {
        let t = self.t;
        for i in 0..self.inflight.len() {
            let f = self.inflight[i].clone();
            if f.result.is_some() || f.due > t {
                continue;
            }
            let issuer = &self.nodes[&f.by];
            if !issuer.host_up() || !matches!(issuer.daemon, Daemon::Running | Daemon::Frozen) {
                continue; // abandoned below, at report time
            }
            let target = &self.nodes[&f.node];
            let result = match target.bmc {
                Bmc::Ok => {
                    if self
                        .etcd
                        .nodes
                        .get(&f.node)
                        .is_some_and(|k| k.daemon_state == Some(DaemonState::Stop))
                        && target.daemon == Daemon::Stopped
                    {
                        self.violate(format!(
                            "inv4: IPMI powers off {}, a cleanly stopped node",
                            f.node
                        ));
                    }
                    self.host_down(&f.node, false, "fenced over IPMI");
                    self.nodes.get_mut(&f.node).expect("node").fenced_off = true;
                    self.count("ipmi power off");
                    (true, String::new())
                }
                Bmc::Unreachable => {
                    if t < f.due + self.timing.bmc_timeout - self.timing.fence {
                        continue;
                    }
                    (false, "BMC unreachable".to_string())
                }
                Bmc::Fails => (false, "power off not confirmed".to_string()),
            };
            self.note(format!("IPMI {} → {:?}", f.node, result));
            self.inflight[i].result = Some(result);
        }
    }

    // ---------------------------------------------------------------- primary

    fn primary_step(&mut self) {
        let t = self.t;
        let margin = self.timing.margin;
        // Demotions.
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in &names {
            let node = &self.nodes[n];
            if node.primary.is_none() || !node.acts() {
                continue;
            }
            let lease_ok = node.valid_until.is_some_and(|v| t + margin < v);
            let key_ok = !node.etcd_link
                || (node.lease.is_some()
                    && self.etcd.primary == Some((n.clone(), node.lease.unwrap_or(0))));
            if !lease_ok {
                self.lose_primary(n, "lease deadline");
            } else if !key_ok {
                self.lose_primary(n, "election key gone");
            }
        }
        // A demoted primary that reaches etcd again resigns.
        if let Some((p, _)) = self.etcd.primary.clone() {
            if self.nodes[&p].primary.is_none() && self.connected(&p) {
                self.etcd.primary = None;
                self.note(format!("{p} resigns"));
            }
        }
        // Election.
        if self.etcd.primary.is_none() {
            let mut order: Vec<String> = names.clone();
            if let Some(f) = self.first_primary.take() {
                order.retain(|x| *x != f);
                order.insert(0, f);
            }
            let winner = order.into_iter().find_map(|n| {
                let node = &self.nodes[&n];
                let lease = node.lease?;
                let ok = self.connected(&n)
                    && self.etcd.leases.contains_key(&lease)
                    && node.valid_until.is_some_and(|v| t + margin < v)
                    && node.primary.is_none()
                    && self.etcd.nodes[&n].daemon_state == Some(DaemonState::Run);
                ok.then_some((n, lease))
            });
            if let Some((n, lease)) = winner {
                self.elect(&n, lease);
            }
        }
        // Fence reports.
        let mut i = 0;
        while i < self.inflight.len() {
            let f = self.inflight[i].clone();
            let issuer = &self.nodes[&f.by];
            if !issuer.host_up() || matches!(issuer.daemon, Daemon::Killed | Daemon::Stopped) {
                self.note(format!("fence of {} abandoned ({} is gone)", f.node, f.by));
                self.inflight.remove(i);
                continue;
            }
            let Some((ok, reason)) = f.result.clone() else {
                i += 1;
                continue;
            };
            if issuer.daemon != Daemon::Running {
                i += 1;
                continue;
            }
            self.inflight.remove(i);
            self.tell(if ok {
                format!("fence {} ok", f.node)
            } else {
                format!("fence {} failed: {reason}", f.node)
            });
            let ds = self
                .books
                .get_mut(&f.by)
                .expect("book")
                .fence_done(&f.node, ok, &reason);
            let facts = self.facts_of(&f.by);
            self.apply(&f.by, ds, &facts, false);
        }
        // The tick.
        if t % TICK == 0 {
            let p = names
                .iter()
                .find(|n| self.nodes[*n].primary.is_some() && self.nodes[*n].acts())
                .cloned();
            if let Some(p) = p {
                if self.connected(&p) {
                    let view = self.etcd.nodes.clone();
                    self.nodes.get_mut(&p).expect("node").view = Some(view);
                }
                if self.nodes[&p].view.is_some() {
                    let facts = self.facts_of(&p);
                    let now = self.at(t);
                    let ds = self.books.get_mut(&p).expect("book").tick(now, &facts);
                    self.apply(&p, ds, &facts, true);
                }
            }
        }
    }

    fn facts_of(&self, p: &str) -> Vec<NodeFacts> {
        let empty = BTreeMap::new();
        let view = self.nodes[p].view.as_ref().unwrap_or(&empty);
        view.iter()
            .map(|(n, k)| NodeFacts {
                name: n.clone(),
                alive: k.alive.is_some(),
                daemon_state: k.daemon_state,
                bmc: k.bmc,
            })
            .collect()
    }

    fn apply(&mut self, p: &str, ds: Vec<Decision>, facts: &[NodeFacts], from_tick: bool) {
        let t = self.t;
        for d in ds {
            self.note(format!("{p} decides {}", fmt_decision(&d)));
            if !matches!(d, Decision::Recover { .. }) {
                self.tell(fmt_decision(&d));
            }
            match d {
                Decision::DeclareDead { node } => {
                    self.count("declare dead");
                    if !self.connected(p) || self.etcd.fault(p, WriteKind::DeclareDead) {
                        self.note(format!("write dead {node}: failed"));
                        continue;
                    }
                    let grace = self.policy.grace.as_millis() as Ms;
                    let k = self.etcd.nodes.get(&node).cloned().unwrap_or_default();
                    if k.alive.is_none() && k.daemon_state != Some(DaemonState::Stop) {
                        if let Some(g) = k.alive_gone_at {
                            if t < g + grace {
                                self.violate(format!(
                                    "inv5: {node} declared dead {} ms after its alive vanished (grace {grace} ms)",
                                    t - g
                                ));
                            }
                        }
                        self.etcd.set_state(&node, DaemonState::Dead, t);
                    } else {
                        self.note(format!("write dead {node}: guard failed"));
                    }
                }
                Decision::Fence { node } => {
                    self.count("fence");
                    self.check_fence(p, &node, facts);
                    let ep = self.nodes[p].primary.unwrap_or(0);
                    self.fences.push((t, p.to_string(), ep, node.clone()));
                    self.inflight.push(InFlight {
                        node,
                        by: p.to_string(),
                        epoch: ep,
                        due: t + self.timing.fence,
                        result: None,
                    });
                }
                Decision::Skip { reason, .. } => {
                    if reason.contains("partition") {
                        self.count("skip: partition guard");
                    } else {
                        self.count("skip: caps");
                    }
                }
                Decision::MarkFenced { node, by } => {
                    self.count(match by {
                        FencedBy::Ipmi => "mark fenced (ipmi)",
                        FencedBy::SelfFence => "mark fenced (self-fence)",
                        FencedBy::Record => "mark fenced (record)",
                    });
                    let ep = self.nodes[p].primary.unwrap_or(0);
                    if by == FencedBy::SelfFence
                        && from_tick
                        && self.marked.insert((ep, node.clone()))
                    {
                        // Fenced without IPMI (no BMC, fencing disabled): the partition
                        // guard holds for it too.
                        let dead = looks_dead(facts);
                        if dead * 2 >= facts.len() {
                            self.violate(format!(
                                "inv3: {node} marked fenced (no IPMI) while {dead} of {} nodes look dead",
                                facts.len()
                            ));
                        }
                    }
                    // The mark at the fence report: the host is off.
                    if by == FencedBy::Ipmi && !from_tick && self.nodes[&node].power {
                        self.violate(format!(
                            "inv2: {node} marked fenced by IPMI but its host is powered on"
                        ));
                    }
                    if !self.connected(p) || self.etcd.fault(p, WriteKind::MarkFenced) {
                        self.note(format!("write fenced {node}: failed"));
                        continue;
                    }
                    // A mark written again (the first did not land) is issued from the
                    // primary's view, which may be stale; what it must never do is land on
                    // a node back in service since its fence (powered on and registered
                    // `run`): the power off no longer covers what that node runs.
                    if by == FencedBy::Ipmi
                        && self.nodes[&node].power
                        && !self.nodes[&node].fenced_off
                    {
                        self.violate(format!(
                            "inv2: a fenced mark by IPMI lands on {node}, back in service since its fence"
                        ));
                    }
                    self.etcd.set_state(&node, DaemonState::Fenced, t);
                }
                Decision::FenceFailed { .. } => self.count("fence failed"),
                Decision::Recover { node } => self.recover(p, &node),
                Decision::Cleared { .. } => self.count("cleared"),
            }
        }
    }

    /// Invariant 3 (and 4: a cleanly stopped node is never fenced) at a fence decision.
    fn check_fence(&mut self, p: &str, node: &str, facts: &[NodeFacts]) {
        let t = self.t;
        let ep = self.nodes[p].primary.unwrap_or(0);
        let in_flight = self
            .inflight
            .iter()
            .filter(|f| f.by == p && f.epoch == ep)
            .count()
            + 1;
        if in_flight > self.policy.max_concurrent {
            self.violate(format!(
                "inv3: {p} starts a fence of {node} with {in_flight} in flight (max_concurrent {})",
                self.policy.max_concurrent
            ));
        }
        let window = self.policy.window.as_millis() as Ms;
        let recent = self
            .fences
            .iter()
            .filter(|f| f.1 == p && f.2 == ep && f.0 + window > t)
            .count()
            + 1;
        if recent > self.policy.max_per_window {
            self.violate(format!(
                "inv3: {p} starts fence #{recent} within {window} ms (max_per_window {})",
                self.policy.max_per_window
            ));
        }
        let looks_dead = looks_dead(facts);
        if looks_dead * 2 >= facts.len() {
            self.violate(format!(
                "inv3: fence of {node} while {looks_dead} of {} nodes look dead",
                facts.len()
            ));
        }
        if facts
            .iter()
            .any(|f| f.name == node && f.daemon_state == Some(DaemonState::Stop))
            || (self.nodes[node].daemon == Daemon::Stopped
                && self.etcd.nodes[node].daemon_state == Some(DaemonState::Stop))
        {
            self.violate(format!("inv4: fence of {node}, a cleanly stopped node"));
        }
        let grace = self.policy.grace.as_millis() as Ms;
        if let Some(k) = self.nodes[p].view.as_ref().and_then(|v| v.get(node)) {
            match k.alive_gone_at {
                Some(g) if t >= g + grace => {}
                Some(g) => {
                    self.count("fence before grace");
                    self.note(format!(
                        "note: fence of {node} {} ms after its alive vanished (grace {grace} ms)",
                        t - g
                    ));
                }
                None => {}
            }
        }
    }

    fn health(&self, n: &str) -> Health {
        let node = &self.nodes[n];
        let used: u64 = node
            .guests
            .keys()
            .filter_map(|u| self.etcd.vms.get(u).map(|v| v.mem))
            .sum();
        Health {
            libvirt: true,
            memory: MemoryStats {
                total_mib: node.mem,
                used_mib: used,
                free_mib: node.mem.saturating_sub(used),
            },
            ..Health::default()
        }
    }

    /// The VMs as the planner sees them.
    pub fn vm_records(&self) -> Vec<Vm> {
        self.etcd
            .vms
            .iter()
            .map(|(u, v)| Vm {
                uuid: u.clone(),
                name: u.clone(),
                xml: format!(
                    "<domain type='kvm'><name>{u}</name><memory unit='MiB'>{}</memory><vcpu>1</vcpu></domain>",
                    v.mem
                ),
                state: v.state,
                node: v.node.clone(),
                metadata: v.meta.clone(),
                owner: v.owner.clone(),
                lock: v.lock.as_ref().map(|(n, l, r)| LockHolder {
                    node: n.clone(),
                    lease: *l,
                    revision: *r,
                }),
                last_node: None,
                flushed_from: None,
            })
            .collect()
    }

    /// The nodes as the planner sees them.
    pub fn node_records(&self) -> Vec<NodeRecord> {
        self.etcd
            .nodes
            .iter()
            .map(|(n, k)| NodeRecord {
                name: n.clone(),
                alive: k.alive.is_some(),
                alive_lease: k.alive.unwrap_or(0),
                daemon_state: k.daemon_state,
                domain_state: Some(DomainState::Ready),
                health: Some(self.health(n)),
                ..NodeRecord::default()
            })
            .collect()
    }

    fn recover(&mut self, p: &str, dead: &str) {
        let t = self.t;
        if !self.connected(p) {
            self.tell_once(dead, format!("recover {dead}: etcd unreachable"));
            return;
        }
        let plan = recovery::plan(dead, &self.vm_records(), &self.node_records());
        let moves: Vec<(String, String)> = plan
            .iter()
            .filter_map(|r| match r {
                Recovery::Move { uuid, target } => Some((uuid.clone(), target.clone())),
                Recovery::Leave { .. } => None,
            })
            .collect();
        if moves.is_empty() {
            self.books.get_mut(p).expect("book").recovered(dead);
            let left: Vec<String> = plan
                .iter()
                .filter_map(|r| match r {
                    Recovery::Leave { uuid, reason } => Some(format!("{uuid}: {reason}")),
                    Recovery::Move { .. } => None,
                })
                .collect();
            self.told.remove(dead);
            if left.is_empty() {
                self.tell(format!("recovered {dead}"));
            } else {
                self.tell(format!("recovered {dead} (left {})", left.join("; ")));
            }
            return;
        }
        for (uuid, target) in moves {
            if self.etcd.fault(p, WriteKind::Move) {
                self.tell_once(dead, format!("recover {dead}: move write failed"));
                continue;
            }
            let k = self.etcd.nodes.get(dead).cloned().unwrap_or_default();
            let vm = self.etcd.vms[&uuid].clone();
            let mut blocked = Vec::new();
            if let Some(l) = &vm.lock {
                blocked.push(format!("{uuid} locked by {}", l.0));
            }
            if k.alive.is_some() {
                blocked.push(format!("{dead} alive"));
            }
            if k.daemon_state != Some(DaemonState::Fenced) {
                blocked.push(format!("{dead} is {:?}", k.daemon_state));
            }
            if !blocked.is_empty() {
                self.tell_once(
                    dead,
                    format!("recover {dead} blocked: {}", blocked.join(", ")),
                );
                continue;
            }
            // Invariant 2.
            let node = &self.nodes[dead];
            let bound = self.policy.failed_fence == AfterFence::Migrate
                && self.policy.self_fence
                && !self.etcd.has_live_lease(dead);
            // Powered off by a confirmed fence and not readmitted since (a fenced node runs
            // nothing: invariant 4).
            let confirmed = node.fenced_off;
            if !confirmed && !bound {
                self.violate(format!(
                    "inv2: {uuid} recovered from {dead}, neither powered off by a fence nor past the self-fence bound (live lease: {})",
                    self.etcd.has_live_lease(dead)
                ));
            }
            let running: Vec<String> = self
                .nodes
                .iter()
                .filter(|(_, x)| x.guests.contains_key(&uuid))
                .map(|(n, _)| n.clone())
                .collect();
            if !running.is_empty() {
                self.violate(format!(
                    "inv2: {uuid} recovered from {dead} while its guest still runs on {running:?}"
                ));
            }
            let from = vm.node.clone().unwrap_or_default();
            let v = self.etcd.vms.get_mut(&uuid).expect("vm");
            v.node = Some(target.clone());
            v.state = DesiredState::Start;
            self.etcd.rev += 1;
            self.told.remove(dead);
            if from != target {
                self.count("move");
                self.tell(format!("move {uuid} {from}->{target}"));
            }
            let _ = t;
        }
    }

    fn tell_once(&mut self, key: &str, msg: String) {
        if self.told.get(key) != Some(&msg) {
            self.told.insert(key.to_string(), msg.clone());
            self.tell(msg);
        } else {
            self.note(msg);
        }
    }

    // ---------------------------------------------------------------- invariants

    fn check(&mut self) {
        let t = self.t;
        let mut found = Vec::new();
        // 1. No VM runs on two nodes; no VM is held (guest or lock) by two live nodes.
        for (uuid, vm) in &self.etcd.vms {
            let on: Vec<&String> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.guests.contains_key(uuid))
                .map(|(n, _)| n)
                .collect();
            if on.len() > 1 {
                found.push(format!("inv1: {uuid} runs on {on:?}"));
            }
            let mut holders: BTreeSet<&String> = on.iter().copied().collect();
            if let Some((h, _, _)) = &vm.lock {
                holders.insert(h);
            }
            if holders.len() > 1 {
                found.push(format!(
                    "inv1: {uuid} is held by {holders:?} (guest or lock)"
                ));
            }
            // A running guest is covered by its node's lock under a live lease (with
            // self-fence; a clean stop's orphans excepted).
            if self.policy.self_fence {
                for n in &on {
                    let g = &self.nodes[*n].guests[uuid];
                    if g.orphan {
                        continue;
                    }
                    let covered = vm.lock.as_ref().is_some_and(|(h, l, _)| {
                        h == *n && self.etcd.leases.get(l).is_some_and(|x| x.node == **n)
                    });
                    if !covered {
                        found.push(format!(
                            "inv1: {uuid} runs on {n} without its lock under a live lease (lock {:?})",
                            vm.lock
                        ));
                    }
                }
            }
        }
        // 4. A fenced node runs no guest (once it could see the mark).
        for (n, k) in &self.etcd.nodes {
            if k.daemon_state != Some(DaemonState::Fenced) {
                continue;
            }
            let node = &self.nodes[n];
            if node.guests.is_empty() || k.fenced_at.is_some_and(|f| t < f + STEP) {
                continue;
            }
            if self.connected(n) {
                found.push(format!(
                    "inv4: {n} is fenced and runs {:?}",
                    node.guests.keys().collect::<Vec<_>>()
                ));
            } else if !self.policy.self_fence {
                found.push(format!(
                    "inv4: {n} is fenced, powered on and runs {:?} without self-fence",
                    node.guests.keys().collect::<Vec<_>>()
                ));
            }
        }
        for f in found {
            self.violate(f);
        }
    }

    // ---------------------------------------------------------------- reading

    /// The story without times (after the start).
    pub fn story(&self) -> Vec<String> {
        self.story
            .iter()
            .filter(|(t, _)| *t > 0)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// When `line` was first told (seconds).
    pub fn when(&self, line: &str) -> Option<f64> {
        self.story
            .iter()
            .find(|(_, l)| l == line)
            .map(|(t, _)| *t as f64 / 1000.0)
    }

    /// The node running `uuid`'s guest.
    pub fn runs(&self, uuid: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|(_, n)| n.guests.contains_key(uuid))
            .map(|(n, _)| n.clone())
    }

    /// The VM's `node` key.
    pub fn assigned(&self, uuid: &str) -> Option<String> {
        self.etcd.vms.get(uuid).and_then(|v| v.node.clone())
    }

    /// A node's `daemon_state`.
    pub fn state(&self, n: &str) -> Option<DaemonState> {
        self.etcd.nodes.get(n).and_then(|k| k.daemon_state)
    }

    /// The current primary (election key).
    pub fn primary_now(&self) -> Option<String> {
        self.etcd.primary.as_ref().map(|p| p.0.clone())
    }

    /// Fail with the trace.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{}", self.trace(msg))
    }

    /// The story equals `want` exactly.
    pub fn expect_story(&self, want: &[&str]) {
        let got = self.story();
        if got != want {
            self.fail(&format!(
                "story mismatch\n  want: {want:#?}\n  got:  {got:#?}"
            ));
        }
    }

    /// `want` appears in the story in this order (other lines may come between).
    pub fn expect_in_order(&self, want: &[&str]) {
        let got = self.story();
        let mut it = got.iter();
        for w in want {
            if !it.any(|g| g == w) {
                self.fail(&format!(
                    "story lacks {w:?} (in order {want:?})\n  got: {got:#?}"
                ));
            }
        }
    }

    /// No story line contains `needle`.
    pub fn expect_never(&self, needle: &str) {
        if let Some(l) = self.story().iter().find(|l| l.contains(needle)) {
            self.fail(&format!(
                "story has {l:?}, expected nothing with {needle:?}"
            ));
        }
    }

    /// `cond` holds, else fail with `what` and the trace.
    pub fn expect(&self, cond: bool, what: &str) {
        if !cond {
            self.fail(what);
        }
    }

    /// A readable dump: events, the log's last lines, the model state.
    pub fn trace(&self, msg: &str) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\n==== scenario {:?} at t={}: {msg}",
            self.name,
            fmt_t(self.t)
        );
        let _ = writeln!(o, "---- events applied");
        for (t, e) in &self.applied {
            let _ = writeln!(o, "  {:>8} {e:?}", fmt_t(*t));
        }
        let _ = writeln!(o, "---- story (decisions and outcomes)");
        for (t, l) in &self.story {
            let _ = writeln!(o, "  {:>8} {l}", fmt_t(*t));
        }
        let _ = writeln!(o, "---- log (last 120 lines)");
        let from = self.log.len().saturating_sub(120);
        for (t, l) in &self.log[from..] {
            let _ = writeln!(o, "  {:>8} {l}", fmt_t(*t));
        }
        let _ = writeln!(o, "---- model");
        let _ = writeln!(o, "  primary key: {:?}", self.etcd.primary);
        for (n, x) in &self.nodes {
            let k = &self.etcd.nodes[n];
            let _ = writeln!(
                o,
                "  {n}: power={} crashed={} daemon={:?} link={} bmc={:?} lease={:?} valid_until={:?} primary={:?} guests={:?} | etcd alive={:?} state={:?} bmc={}",
                x.power,
                x.crashed,
                x.daemon,
                x.etcd_link,
                x.bmc,
                x.lease,
                x.valid_until,
                x.primary,
                x.guests.keys().collect::<Vec<_>>(),
                k.alive,
                k.daemon_state,
                k.bmc
            );
        }
        for (id, l) in &self.etcd.leases {
            let _ = writeln!(o, "  lease {id}: {} expires {}", l.node, fmt_t(l.expires));
        }
        for (u, v) in &self.etcd.vms {
            let _ = writeln!(
                o,
                "  vm {u}: node={:?} owner={:?} lock={:?} state={} mem={} protected={} autostart={} limit={:?}",
                v.node, v.owner, v.lock, v.state, v.mem, v.meta.protected, v.meta.autostart, v.meta.node_limit
            );
        }
        let _ = writeln!(o, "  fences in flight: {:?}", self.inflight);
        o
    }
}

/// Nodes that look dead in `facts`: no `alive`, neither stopped cleanly nor fenced.
pub fn looks_dead(facts: &[NodeFacts]) -> usize {
    facts
        .iter()
        .filter(|f| {
            !f.alive
                && !matches!(
                    f.daemon_state,
                    Some(DaemonState::Stop) | Some(DaemonState::Fenced)
                )
        })
        .count()
}

/// `12.250s`.
pub fn fmt_t(t: Ms) -> String {
    format!("{}.{:03}s", t / 1000, t % 1000)
}

/// A decision as a story line.
pub fn fmt_decision(d: &Decision) -> String {
    match d {
        Decision::DeclareDead { node } => format!("DeclareDead {node}"),
        Decision::Fence { node } => format!("Fence {node}"),
        Decision::Skip { node, reason } => format!("Skip {node}: {reason}"),
        Decision::MarkFenced { node, by } => format!("MarkFenced {node} by {by:?}"),
        Decision::FenceFailed { node, reason } => format!("FenceFailed {node}: {reason}"),
        Decision::Recover { node } => format!("Recover {node}"),
        Decision::Cleared { node } => format!("Cleared {node}"),
    }
}

/// A small xorshift64 PRNG (deterministic, no crate).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `pct`%.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}
