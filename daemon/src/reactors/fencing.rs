//! The primary's fencing executor: it feeds the cluster view to the pure [`FenceBook`] on
//! every tick and carries out its decisions — declare a node `dead` (re-checking `alive` in
//! the transaction), fence it over IPMI (in a task of its own, bounded), mark it `fenced`,
//! and recover its VMs ([`recovery::plan`]), each VM moved by a transaction guarded on its
//! lock being gone and the dead node being `fenced` and without `alive`. Every step is one
//! log line with `node=` (and `vm=`) and a `nodes/<node>/fence` record for
//! `debvisorctl status`. Off the primary it does nothing; losing the role resets the book
//! (a successor continues from etcd).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_objects::domain::{self, Vm, VmField, VmKind};
use debvisor_objects::fencing::{Decision, FenceBook, FencedBy, FencingPolicy, NodeFacts};
use debvisor_objects::node::{
    BmcInfo, DaemonState, DomainState, FenceRecord, NodeKind, NodeRecord,
};
use debvisor_objects::recovery::{self, Recovery};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::store::TxnBuilder;
use debvisor_objects::{Reactor, Store};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::role::RoleView;
use crate::ceph::CephCli;
use crate::fencer::Ipmi;

/// What the executor works with.
pub struct Fencing {
    /// The store.
    pub store: Store,
    /// Every node (facts, BMCs, addresses).
    pub nodes: Arc<Reactor<NodeKind>>,
    /// Every VM (what to recover).
    pub vms: Arc<Reactor<VmKind>>,
    /// This node (the primary when it acts).
    pub me: String,
    /// The role signal.
    pub role: RoleView,
    /// The decisions' policy.
    pub policy: FencingPolicy,
    /// The IPMI driver, when this node has the password file.
    pub ipmi: Option<Ipmi>,
    /// Bound of one fence (power off + status until Off).
    pub timeout: Duration,
    /// Power the node on again after a fence.
    pub power_on_after: bool,
    /// Ceph, to blocklist a fenced node's clients and break its RBD locks.
    pub ceph: Option<Arc<CephCli>>,
    /// Tick.
    pub interval: Duration,
}

/// What the executor remembers between ticks (reset with the role).
#[derive(Default)]
struct Memory {
    /// VMs of a fenced node left on purpose, logged once.
    left: BTreeSet<(String, String)>,
    /// When each node's `fenced` was last written.
    marked: std::collections::BTreeMap<String, Instant>,
}

/// The lease each node was last seen alive with (node cache), kept across role changes: the
/// lease a fence record names as the one that expired, the node's evidence that the record
/// is about it and not forged or from another life of the store.
type SeenLeases = std::collections::BTreeMap<String, i64>;

/// A fence's result: the node and the error, if any.
type FenceResult = (String, Result<Duration, String>);

/// Run the executor until `cancel`.
pub fn spawn(f: Fencing, cancel: CancellationToken) {
    tokio::spawn(async move {
        let (tx, mut rx) = mpsc::unbounded_channel::<FenceResult>();
        let mut book = FenceBook::new(f.policy.clone());
        let mut memory = Memory::default();
        let mut seen = SeenLeases::new();
        let mut was_primary = false;
        let mut tick = tokio::time::interval(f.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut results = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                Some(r) = rx.recv() => results.push(r),
            }
            while let Ok(r) = rx.try_recv() {
                results.push(r);
            }
            note_leases(&f.nodes, &mut seen);
            if !f.role.is_primary() {
                if was_primary {
                    info!(node = %f.me, "no longer primary: the fence book is left to the successor");
                    book.reset();
                    memory = Memory::default();
                }
                was_primary = false;
                continue;
            }
            was_primary = true;
            let mut decisions = Vec::new();
            for (node, r) in results {
                decisions.extend(f.fence_finished(&mut book, &node, r));
            }
            decisions.extend(book.tick(Instant::now(), &facts(&f.nodes)));
            let mut recovering = BTreeSet::new();
            for d in decisions {
                if let Decision::Recover { node } = &d {
                    if !recovering.insert(node.clone()) {
                        continue;
                    }
                }
                f.apply(d, &mut book, &mut memory, &seen, &tx).await;
            }
        }
    });
}

/// The facts the book decides on, from the node cache.
fn facts(nodes: &Reactor<NodeKind>) -> Vec<NodeFacts> {
    nodes
        .list()
        .into_iter()
        .filter_map(|(name, e)| {
            let n = e.parsed.as_ref().ok()?;
            Some(NodeFacts {
                name,
                alive: n.alive,
                daemon_state: n.daemon_state,
                bmc: n.bmc.is_some(),
            })
        })
        .collect()
}

/// Remember the lease of every node alive in the cache (the one a later fence record names).
fn note_leases(nodes: &Reactor<NodeKind>, seen: &mut SeenLeases) {
    for (name, e) in nodes.list() {
        if let Ok(n) = e.parsed.as_ref() {
            if n.alive && n.alive_lease != 0 {
                seen.insert(name, n.alive_lease);
            }
        }
    }
}

/// A BMC from etcd is checked before it reaches ipmitool's arguments.
fn check_bmc(b: &BmcInfo) -> Result<(), String> {
    let host_ok = b.host.parse::<IpAddr>().is_ok()
        || (!b.host.is_empty()
            && b.host.len() <= 253
            && !b.host.starts_with(['-', '.'])
            && b.host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.'));
    if !host_ok {
        return Err(format!(
            "bmc.host {:?} is not an address or host name",
            b.host
        ));
    }
    let user_ok = !b.user.is_empty()
        && b.user.len() <= 32
        && !b.user.starts_with('-')
        && b.user
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.@".contains(&c));
    if !user_ok {
        return Err(format!(
            "bmc.user {:?} is not a valid BMC user name",
            b.user
        ));
    }
    if b.port == 0 {
        return Err("bmc.port is 0".into());
    }
    Ok(())
}

impl Fencing {
    fn node(&self, name: &str) -> Option<Arc<NodeRecord>> {
        self.nodes.get(name)?.parsed.as_ref().ok().cloned()
    }

    /// The lease `node` was last seen alive with, as the record writes it (lowercase hex):
    /// the one seen by this primary, else the one an earlier primary's record names.
    fn lease_of(&self, node: &str, seen: &SeenLeases) -> Option<String> {
        match seen.get(node) {
            Some(l) => Some(format!("{l:x}")),
            None => self.node(node)?.fence.as_ref()?.lease.clone(),
        }
    }

    /// A fence task reported: log it and let the book decide what follows.
    fn fence_finished(
        &self,
        book: &mut FenceBook,
        node: &str,
        r: Result<Duration, String>,
    ) -> Vec<Decision> {
        match &r {
            Ok(took) => {
                warn!(node = %node, primary = %self.me, took_ms = took.as_millis() as u64, "fence confirmed: the BMC reports power off")
            }
            Err(e) => error!(node = %node, primary = %self.me, error = %e, "fence failed"),
        }
        let reason = r.as_ref().err().cloned().unwrap_or_default();
        book.fence_done(node, r.is_ok(), &reason)
    }

    /// Carry out one decision.
    async fn apply(
        &self,
        d: Decision,
        book: &mut FenceBook,
        memory: &mut Memory,
        seen: &SeenLeases,
        tx: &mpsc::UnboundedSender<FenceResult>,
    ) {
        match d {
            Decision::DeclareDead { node } => self.declare_dead(&node, seen).await,
            Decision::Skip { node, reason } => {
                warn!(node = %node, primary = %self.me, reason = %reason, "fence skipped");
                self.record(&node, "skipped", None, Some(&reason), seen)
                    .await;
            }
            Decision::Fence { node } => self.start_fence(&node, seen, tx).await,
            Decision::FenceFailed { node, reason } => {
                error!(node = %node, primary = %self.me, reason = %reason, "node not fenced; its VMs stay where they are until an operator acts");
                self.record(&node, "failed", None, Some(&reason), seen)
                    .await;
            }
            Decision::MarkFenced { node, by } => {
                // The book asks again while the cache does not show our write yet: one
                // write (and one line) per fence, again only if it did not land.
                let recent = memory
                    .marked
                    .get(&node)
                    .is_some_and(|t| t.elapsed() < self.interval * 4);
                if !recent {
                    memory.marked.insert(node.clone(), Instant::now());
                    self.mark_fenced(&node, by, seen).await;
                }
            }
            Decision::Recover { node } => {
                if self.recover(&node, &mut memory.left, seen).await {
                    book.recovered(&node);
                }
            }
            Decision::Cleared { node } => {
                info!(node = %node, primary = %self.me, "node alive again before it was fenced: no longer suspect");
                let _ = self
                    .store
                    .delete(&schema::node_key(&node, NodeField::Fence))
                    .await;
            }
        }
    }

    /// `nodes/<node>/fence` = the step, for operators, naming the lease seen expire (the
    /// node's evidence).
    async fn record(
        &self,
        node: &str,
        state: &str,
        by: Option<FencedBy>,
        reason: Option<&str>,
        seen: &SeenLeases,
    ) {
        let r = FenceRecord {
            state: state.to_string(),
            by: by.map(by_str).map(str::to_string),
            reason: reason.map(str::to_string),
            since: crate::hostinfo::now_rfc3339(),
            primary: self.me.clone(),
            lease: self.lease_of(node, seen),
        };
        let value = serde_json::to_string(&r).unwrap_or_default();
        if let Err(e) = self
            .store
            .put(&schema::node_key(node, NodeField::Fence), value)
            .await
        {
            warn!(node = %node, primary = %self.me, state, error = %e, "fence record not written");
        }
    }

    /// `daemon_state = dead`, only while `alive` is gone and it did not stop cleanly.
    async fn declare_dead(&self, node: &str, seen: &SeenLeases) {
        let state = schema::node_key(node, NodeField::DaemonState);
        let t = TxnBuilder::new()
            .absent(&schema::node_key(node, NodeField::Alive))
            .value_is_not(&state, DaemonState::Stop.as_str())
            .value_is_not(&state, DaemonState::Fenced.as_str())
            .put(&state, DaemonState::Dead.as_str());
        match self.store.txn(t).await {
            Ok(r) if r.succeeded() => {
                let lease = self.lease_of(node, seen);
                error!(node = %node, primary = %self.me, lease = lease.as_deref().unwrap_or("unknown"), grace_ms = self.policy.grace.as_millis() as u64, "node declared dead: its lease expired and it did not stop cleanly");
                self.record(node, "dead", None, Some("lease expired"), seen)
                    .await;
            }
            Ok(_) => {
                info!(node = %node, primary = %self.me, "not declared dead: it is alive again or stopped cleanly")
            }
            Err(e) => {
                warn!(node = %node, primary = %self.me, error = %e, "dead state not written; the next tick tries again")
            }
        }
    }

    /// Power the node off in a task of its own; the result comes back on `tx`.
    async fn start_fence(
        &self,
        node: &str,
        seen: &SeenLeases,
        tx: &mpsc::UnboundedSender<FenceResult>,
    ) {
        let bmc = self.node(node).and_then(|n| n.bmc.clone());
        let plan = match (&self.ipmi, bmc) {
            (None, _) => {
                Err("this primary has no fencing.ipmi.password_file to fence with".to_string())
            }
            (_, None) => Err("the node publishes no BMC".to_string()),
            (Some(ipmi), Some(b)) => check_bmc(&b).map(|()| (ipmi.clone(), b)),
        };
        let (ipmi, bmc) = match plan {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send((node.to_string(), Err(e)));
                return;
            }
        };
        warn!(node = %node, primary = %self.me, bmc = %bmc.host, port = bmc.port, "fence started: IPMI power off");
        self.record(node, "fencing", None, None, seen).await;
        let (node, tx) = (node.to_string(), tx.clone());
        let timeout = self.timeout;
        tokio::spawn(async move {
            let r = ipmi.fence(&bmc, timeout).await.map_err(|e| e.to_string());
            let _ = tx.send((node, r));
        });
    }

    /// With `fencing.power_on_after`: power a node fenced over IPMI on again, once its VMs
    /// run elsewhere. Not earlier: recovery is guarded on the node's `alive` key being
    /// absent, and a node booted back would register (fenced, no guests) and hold every
    /// recovery up until it went down again.
    fn power_on_after_recovery(&self, node: &str, rec: &NodeRecord) {
        if !self.power_on_after {
            return;
        }
        let by_ipmi = rec
            .fence
            .as_ref()
            .and_then(|f| f.by.as_deref())
            .is_some_and(|b| b == by_str(FencedBy::Ipmi));
        if !by_ipmi {
            info!(node = %node, primary = %self.me, "fenced node not powered on again: it was not powered off over IPMI");
            return;
        }
        let (Some(ipmi), Some(bmc)) = (self.ipmi.clone(), rec.bmc.clone()) else {
            return;
        };
        if let Err(e) = check_bmc(&bmc) {
            warn!(node = %node, primary = %self.me, error = %e, "fenced node not powered on again");
            return;
        }
        let (node, me) = (node.to_string(), self.me.clone());
        tokio::spawn(async move {
            match ipmi.power_on(&bmc).await {
                Ok(()) => {
                    info!(node = %node, primary = %me, "fenced node powered on again after its VMs were recovered (it stays fenced until readmitted)")
                }
                Err(e) => {
                    warn!(node = %node, primary = %me, error = %e, "fenced node not powered on again")
                }
            }
        });
    }

    /// `daemon_state = fenced`: out until an operator readmits it.
    async fn mark_fenced(&self, node: &str, by: FencedBy, seen: &SeenLeases) {
        let t = TxnBuilder::new().put(
            &schema::node_key(node, NodeField::DaemonState),
            DaemonState::Fenced.as_str(),
        );
        match self.store.txn(t).await {
            Ok(_) => {
                warn!(node = %node, primary = %self.me, by = by_str(by), "node fenced: it stays out until `debvisorctl node readmit`");
                self.record(node, "fenced", Some(by), None, seen).await;
            }
            Err(e) => {
                warn!(node = %node, primary = %self.me, error = %e, "fenced state not written; the next tick writes it again")
            }
        }
    }

    /// One pass of recovery; true when nothing is left to move.
    async fn recover(
        &self,
        dead: &str,
        left: &mut BTreeSet<(String, String)>,
        seen: &SeenLeases,
    ) -> bool {
        let Some(rec) = self.node(dead) else {
            return true;
        };
        if rec.alive || rec.daemon_state != Some(DaemonState::Fenced) {
            return false; // the guards would refuse; the book sees it next tick
        }
        let vms: Vec<Vm> = self
            .vms
            .list()
            .into_iter()
            .filter_map(|(_, e)| e.parsed.as_ref().ok().map(|v| (**v).clone()))
            .collect();
        let nodes: Vec<NodeRecord> = self
            .nodes
            .list()
            .into_iter()
            .filter_map(|(_, e)| e.parsed.as_ref().ok().map(|n| (**n).clone()))
            .collect();
        let plan = recovery::plan(dead, &vms, &nodes);
        let moves = plan
            .iter()
            .filter(|r| matches!(r, Recovery::Move { .. }))
            .count();
        if moves == 0 {
            self.recovery_done(dead, &rec, seen).await;
            return true;
        }
        self.set_domain_state(dead, &rec, DomainState::FenceFlush)
            .await;
        let ips: Vec<IpAddr> = rec
            .info
            .as_ref()
            .map(|i| {
                i.addresses
                    .iter()
                    .filter_map(|a| crate::ceph::start_check::ip_of(a))
                    .collect()
            })
            .unwrap_or_default();
        for r in plan {
            match r {
                Recovery::Move { uuid, target } => {
                    if let Some(vm) = vms.iter().find(|v| v.uuid == uuid) {
                        self.move_vm(dead, vm, &target, &ips).await;
                    }
                }
                Recovery::Leave { uuid, reason } => {
                    if left.insert((dead.to_string(), uuid.clone())) {
                        let name = vms.iter().find(|v| v.uuid == uuid).map(|v| v.name.as_str());
                        warn!(node = %dead, vm = name.unwrap_or("-"), uuid = %uuid, reason = %reason, "VM of the fenced node not recovered");
                    }
                }
            }
        }
        false
    }

    /// Every VM moved (or left on purpose): the record says so, the drain state too.
    async fn recovery_done(&self, dead: &str, rec: &NodeRecord, seen: &SeenLeases) {
        if rec.fence.as_ref().is_some_and(|f| f.state == "recovered") {
            return;
        }
        info!(node = %dead, primary = %self.me, "recovery complete: every VM of the fenced node that may move runs elsewhere");
        let by = rec.fence.as_ref().and_then(|f| f.by.clone());
        let r = FenceRecord {
            state: "recovered".into(),
            by,
            reason: None,
            since: crate::hostinfo::now_rfc3339(),
            primary: self.me.clone(),
            lease: self.lease_of(dead, seen),
        };
        let value = serde_json::to_string(&r).unwrap_or_default();
        match self
            .store
            .put(&schema::node_key(dead, NodeField::Fence), value)
            .await
        {
            Ok(_) => self.power_on_after_recovery(dead, rec),
            Err(e) => {
                warn!(node = %dead, primary = %self.me, error = %e, "recovered state not written; the next tick writes it again")
            }
        }
        self.set_domain_state(dead, rec, DomainState::Flushed).await;
    }

    async fn set_domain_state(&self, node: &str, rec: &NodeRecord, to: DomainState) {
        if rec.domain_state == Some(to) {
            return;
        }
        let key = schema::node_key(node, NodeField::DomainState);
        if let Err(e) = self.store.put(&key, to.as_str()).await {
            warn!(node = %node, to = to.as_str(), error = %e, "domain_state not written");
        }
    }

    /// Break the fenced node's RBD locks on the VM's volumes, then retarget it.
    async fn move_vm(&self, dead: &str, vm: &Vm, target: &str, ips: &[IpAddr]) {
        if let Err(e) = self.break_locks(dead, vm, ips).await {
            warn!(node = %dead, vm = %vm.name, uuid = %vm.uuid, error = %e, "RBD locks of the fenced node not broken; the VM waits");
            return;
        }
        let node_key = domain::vm_key(&vm.uuid, VmField::Node);
        let rev = self
            .vms
            .get(&vm.uuid)
            .map(|e| domain::key_revision(&e.keys, VmField::Node))
            .unwrap_or(0);
        let t = TxnBuilder::new()
            .absent(&domain::vm_key(&vm.uuid, VmField::Lock))
            .absent(&schema::node_key(dead, NodeField::Alive))
            .value_is(
                &schema::node_key(dead, NodeField::DaemonState),
                DaemonState::Fenced.as_str(),
            )
            .mod_revision_is(&node_key, rev)
            .put(&node_key, target)
            .put(&domain::vm_key(&vm.uuid, VmField::LastNode), dead)
            .put(&domain::vm_key(&vm.uuid, VmField::State), "start");
        match self.store.txn(t).await {
            Ok(r) if r.succeeded() => {
                warn!(node = %dead, vm = %vm.name, uuid = %vm.uuid, target = %target, primary = %self.me, "VM recovered: it starts on its new node")
            }
            Ok(_) => {
                info!(node = %dead, vm = %vm.name, uuid = %vm.uuid, "VM not moved: it changed, its lock is held or the node is back; next tick")
            }
            Err(e) => {
                warn!(node = %dead, vm = %vm.name, uuid = %vm.uuid, error = %e, "VM not moved; next tick")
            }
        }
    }

    async fn break_locks(&self, dead: &str, vm: &Vm, ips: &[IpAddr]) -> Result<(), String> {
        let Some(ceph) = &self.ceph else {
            return Ok(());
        };
        let disks = crate::ceph::rbd_disks(&vm.xml).map_err(|e| e.to_string())?;
        for d in disks.iter().filter(|d| !d.shared) {
            crate::ceph::locks::break_fenced_locks(&**ceph, &d.image, ips, dead, &vm.name)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn by_str(by: FencedBy) -> &'static str {
    match by {
        FencedBy::Ipmi => "ipmi",
        FencedBy::SelfFence => "self-fence",
        FencedBy::Record => "record",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bmc_from_etcd_is_checked_before_ipmitool() {
        let ok = BmcInfo {
            host: "10.0.0.9".into(),
            port: 623,
            user: "fence".into(),
        };
        assert!(check_bmc(&ok).is_ok());
        for (host, user) in [
            ("-oProxyCommand", "fence"),
            ("a b", "fence"),
            ("10.0.0.9", "-E"),
            ("10.0.0.9", "a;b"),
            ("", "fence"),
        ] {
            let b = BmcInfo {
                host: host.into(),
                port: 623,
                user: user.into(),
            };
            assert!(check_bmc(&b).is_err(), "{host:?} {user:?}");
        }
    }
}
