//! Primary-coordinator election over etcd's election API (`election/primary`), the campaign
//! bound to the node lease, and the node's `coordinator_state` machine:
//!
//! ```text
//! secondary → takeover → primary → relinquish → secondary
//! ```
//!
//! Each step is written to etcd and logged once with its reason. Takeover brings the primary
//! duties up (through the role signal, [`super::role`]) and only then writes `primary`;
//! relinquish tears them down and only then resigns, so another coordinator can take over
//! only after this one dropped the floating addresses and gateways.
//!
//! A primary that cannot renew its lease demotes itself locally before the lease can expire
//! on the server — at `valid_until − keepalive.demote_margin`, where `valid_until` is the send
//! time of the last good renewal plus the TTL on the monotonic clock — without waiting for
//! etcd, and writes `secondary` once etcd answers again. A primary whose election key
//! vanishes (lease lost, key deleted) demotes at once.
//!
//! A non-coordinator never campaigns (`client`). A standalone node always wins and publishes
//! `primary`; it has nobody to hand over to, so it keeps its duties across a graceful stop.
//!
//! `debvisorctl node primary NAME` writes `election/request`: the other secondaries step out
//! of the line, the primary relinquishes once only NAME is waiting, NAME wins and clears the
//! request.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debvisor_objects::lease::LeaseState;
use debvisor_objects::node::{CoordinatorState, DaemonState, NodeKind};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Reactor, Store};
use etcd_client::{EventType, LeaderKey, ResignOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::role::RoleSender;

/// The election's settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// This node may become primary (`node.coordinators`, or standalone).
    pub coordinator: bool,
    /// Standalone: always primary, no campaign.
    pub standalone: bool,
    /// How long before the lease could expire on the server a primary demotes itself.
    pub demote_margin: Duration,
    /// Longest wait for the duties to come up or go down.
    pub duty_timeout: Duration,
    /// Longest wait for the other secondaries to step out of the line on a handover.
    pub handover_timeout: Duration,
}

/// The node's `coordinator_state`, shared with the repair of its own keys.
pub type CoordinatorCell = Arc<Mutex<CoordinatorState>>;

/// The election of one node.
pub struct Election {
    node: String,
    store: Store,
    lease: Arc<AtomicI64>,
    lease_state: watch::Receiver<LeaseState>,
    role: RoleSender,
    state: CoordinatorCell,
    nodes: Arc<Reactor<NodeKind>>,
    cfg: ElectionConfig,
}

/// What the primary loop ended with.
enum Exit {
    /// Graceful stop: relinquish and return.
    Stop,
    /// Hand over to this node.
    Handover(String),
    /// Demoted locally (lease trouble, key gone): the duties are already down.
    Demoted(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

use schema::{ELECTION_PRIMARY as ELECTION, ELECTION_REQUEST as REQUEST};

impl Election {
    /// An election for `node`; `state` is the cell its own-keys repair reads.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        store: Store,
        lease: Arc<AtomicI64>,
        lease_state: watch::Receiver<LeaseState>,
        role: RoleSender,
        state: CoordinatorCell,
        nodes: Arc<Reactor<NodeKind>>,
        cfg: ElectionConfig,
    ) -> Election {
        Election {
            node,
            store,
            lease,
            lease_state,
            role,
            state,
            nodes,
            cfg,
        }
    }

    /// Run until `stop` (graceful stop: a primary relinquishes first); `done` fires when the
    /// relinquish is complete.
    pub fn spawn(self, stop: CancellationToken, done: CancellationToken) {
        tokio::spawn(async move {
            self.run(stop).await;
            done.cancel();
        });
    }

    async fn run(mut self, stop: CancellationToken) {
        if !self.cfg.coordinator {
            self.set_state(
                CoordinatorState::Client,
                "not in node.coordinators: never campaigns",
            )
            .await;
            stop.cancelled().await;
            return;
        }
        if self.cfg.standalone {
            self.standalone(stop).await;
            return;
        }
        loop {
            self.set_state(CoordinatorState::Secondary, "waiting in the election")
                .await;
            let Some(lk) = self.campaign(&stop).await else {
                return;
            };
            self.takeover(&lk).await;
            match self.primary(&lk, &stop).await {
                Exit::Stop => {
                    self.relinquish(&lk, "daemon stopping").await;
                    return;
                }
                Exit::Handover(to) => {
                    self.relinquish(&lk, &format!("handover to {to} requested"))
                        .await;
                }
                Exit::Demoted(why) => {
                    // The duties are down; say so once etcd answers again.
                    self.wait_store(&stop).await;
                    self.set_state(CoordinatorState::Secondary, &format!("demoted: {why}"))
                        .await;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// A standalone node: takeover at once, primary until the daemon stops.
    async fn standalone(&mut self, stop: CancellationToken) {
        self.set_state(CoordinatorState::Secondary, "standalone")
            .await;
        self.set_state(CoordinatorState::Takeover, "standalone: always the primary")
            .await;
        let generation = self.role.set(true);
        self.wait_duties(generation, "up").await;
        self.set_state(CoordinatorState::Primary, "duties up").await;
        stop.cancelled().await;
        // Nobody takes over from a standalone node: its addresses and gateways stay for the
        // next start.
        self.set_state(
            CoordinatorState::Relinquish,
            "daemon stopping (standalone: duties stay on the host)",
        )
        .await;
        self.set_state(CoordinatorState::Secondary, "stopped").await;
    }

    /// Write `coordinator_state` (and log the transition once); the own-keys repair keeps it.
    async fn set_state(&self, to: CoordinatorState, reason: &str) {
        let from = {
            let mut s = lock(&self.state);
            std::mem::replace(&mut *s, to)
        };
        let key = schema::node_key(&self.node, NodeField::CoordinatorState);
        match self.store.put(&key, to.as_str()).await {
            Ok(()) => {
                info!(node = %self.node, from = %from, to = %to, reason, "coordinator_state changed")
            }
            Err(e) => {
                warn!(node = %self.node, from = %from, to = %to, reason, error = %e, "coordinator_state changed; not written yet (repaired on a later tick)")
            }
        }
    }

    async fn wait_duties(&self, generation: u64, what: &str) {
        let missing = self.role.applied(generation, self.cfg.duty_timeout).await;
        if !missing.is_empty() {
            warn!(node = %self.node, duties = ?missing, timeout_ms = self.cfg.duty_timeout.as_millis() as u64,
                "primary duties not {what} in time; going on");
        }
    }

    /// Is the lease good for at least the margin?
    fn lease_good(&self) -> bool {
        let s = *self.lease_state.borrow();
        matches!(s, LeaseState::Alive { id, valid_until, .. }
            if id == self.lease.load(Ordering::SeqCst)
                && Instant::now() + self.cfg.demote_margin < valid_until)
    }

    /// The handover request, if any: `Some(name)`.
    async fn request(&self) -> Option<String> {
        let kv = self.store.get(REQUEST).await.ok()??;
        let name = String::from_utf8_lossy(&kv.value).trim().to_string();
        (!name.is_empty()).then_some(name)
    }

    /// Campaign until this node leads; `None` on stop. Steps out while a handover to another
    /// node is pending and while the lease is not good.
    async fn campaign(&mut self, stop: &CancellationToken) -> Option<LeaderKey> {
        let name = self.store.abs(ELECTION);
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let waiting_for = self.request().await.filter(|n| n != &self.node);
            if waiting_for.is_some() || !self.lease_good() {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = self.lease_state.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            let lease = self.lease.load(Ordering::SeqCst);
            let mut client = self.store.client().election_client();
            let campaign = client.campaign(name.clone(), self.node.clone(), lease);
            tokio::pin!(campaign);
            let won = loop {
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    r = &mut campaign => break r,
                    changed = self.lease_state.changed() => {
                        if changed.is_err() || self.lease.load(Ordering::SeqCst) != lease {
                            // Re-registered: campaign again with the new lease.
                            break Err(etcd_client::Error::InvalidArgs("lease changed".into()));
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if self.request().await.is_some_and(|n| n != self.node) {
                            // Step out of the line (dropping the campaign resigns it).
                            break Err(etcd_client::Error::InvalidArgs("handover pending".into()));
                        }
                    }
                }
            };
            match won {
                Ok(mut resp) => {
                    let Some(lk) = resp.take_leader() else {
                        continue;
                    };
                    // Still ours and still bound to our current lease?
                    let rel = String::from_utf8_lossy(lk.key()).into_owned();
                    let rel = self.store.rel(&rel).map(str::to_string).unwrap_or(rel);
                    match self.store.get(&rel).await {
                        Ok(Some(kv)) if kv.lease == self.lease.load(Ordering::SeqCst) => {
                            return Some(lk)
                        }
                        _ => continue,
                    }
                }
                Err(e) => {
                    if !matches!(e, etcd_client::Error::InvalidArgs(_)) {
                        warn!(node = %self.node, error = %debvisor_objects::store::error_chain(&e), "campaign failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
    }

    /// Won: bring the duties up, then write `primary`.
    async fn takeover(&self, lk: &LeaderKey) {
        self.set_state(
            CoordinatorState::Takeover,
            &format!("won the election (lease {:x})", lk.lease()),
        )
        .await;
        let generation = self.role.set(true);
        self.wait_duties(generation, "up").await;
        self.set_state(CoordinatorState::Primary, "primary duties up")
            .await;
        if self.request().await.as_deref() == Some(self.node.as_str()) {
            let _ = self.store.delete(REQUEST).await;
            info!(node = %self.node, "handover request fulfilled");
        }
    }

    /// Primary until stop, a handover, a lost key or lease trouble.
    async fn primary(&mut self, lk: &LeaderKey, stop: &CancellationToken) -> Exit {
        let key = String::from_utf8_lossy(lk.key()).into_owned();
        let rel = self.store.rel(&key).map(str::to_string).unwrap_or(key);
        let mut watch = self.store.watch(&rel, lk.rev() + 1).await.ok();
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .lease_state
                .borrow()
                .valid_until()
                .map(|v| v.checked_sub(self.cfg.demote_margin).unwrap_or(v));
            let Some(deadline) = deadline else {
                return self.demote("the node lease is lost").await;
            };
            let deadline = tokio::time::Instant::from_std(deadline);
            tokio::select! {
                _ = stop.cancelled() => return Exit::Stop,
                _ = tokio::time::sleep_until(deadline) => {
                    return self.demote("the node lease was not renewed in time; it may expire on the server").await;
                }
                changed = self.lease_state.changed() => {
                    if changed.is_err() || matches!(*self.lease_state.borrow(), LeaseState::Lost { .. }) {
                        return self.demote("the node lease is lost").await;
                    }
                }
                msg = async {
                    match watch.as_mut() {
                        Some(w) => w.message().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match msg {
                        Ok(Some(resp)) => {
                            let gone = resp.canceled()
                                || resp.events().iter().any(|e| e.event_type() == EventType::Delete);
                            if gone {
                                return self.demote("the election key is gone").await;
                            }
                        }
                        _ => {
                            // The watch broke: watch again from the key's revision.
                            watch = self.store.watch(&rel, lk.rev() + 1).await.ok();
                        }
                    }
                }
                _ = poll.tick() => {
                    if let Some(to) = self.request().await {
                        if let Some(exit) = self.handover(&to).await {
                            return exit;
                        }
                    }
                }
            }
        }
    }

    /// Drop the duties without waiting for etcd.
    async fn demote(&self, why: &str) -> Exit {
        warn!(node = %self.node, reason = why, "primary demoting itself: floating addresses, gateways and dnsmasq dropped");
        let generation = self.role.set(false);
        self.wait_duties(generation, "down").await;
        Exit::Demoted(why.to_string())
    }

    /// Wait until the store answers (to write `secondary` after a local demotion).
    async fn wait_store(&self, stop: &CancellationToken) {
        let mut delay = Duration::from_millis(200);
        while !stop.is_cancelled() && self.store.probe().await.is_err() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// A handover request for `to`: `Some(Handover)` once only `to` waits in the line;
    /// an impossible request is refused (logged, removed).
    async fn handover(&self, to: &str) -> Option<Exit> {
        if to == self.node {
            let _ = self.store.delete(REQUEST).await;
            return None;
        }
        if let Err(why) = self.eligible(to) {
            warn!(node = %self.node, target = to, reason = %why, "handover request refused");
            let _ = self.store.delete(REQUEST).await;
            return None;
        }
        let deadline = Instant::now() + self.cfg.handover_timeout;
        loop {
            match self.waiting().await {
                Ok(w) if w.iter().any(|n| n == to) && w.iter().all(|n| n == to) => {
                    return Some(Exit::Handover(to.to_string()));
                }
                Ok(_) if Instant::now() >= deadline => {
                    warn!(node = %self.node, target = to, "handover request refused: the target is not waiting alone in the election");
                    let _ = self.store.delete(REQUEST).await;
                    return None;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Can `to` become primary: a live coordinator in `run`?
    fn eligible(&self, to: &str) -> Result<(), String> {
        let entry = self.nodes.get(to).ok_or("no such node")?;
        let n = entry.parsed.as_ref().map_err(|e| format!("invalid: {e}"))?;
        if !n.alive {
            return Err("not alive".into());
        }
        if n.daemon_state != Some(DaemonState::Run) {
            return Err("not in run".into());
        }
        if n.coordinator_state == Some(CoordinatorState::Client) {
            return Err("not a coordinator".into());
        }
        Ok(())
    }

    /// The node names waiting in the election besides this one.
    async fn waiting(&self) -> Result<Vec<String>, String> {
        let (kvs, _) = self
            .store
            .list(&format!("{ELECTION}/"))
            .await
            .map_err(|e| e.to_string())?;
        let mine = self.lease.load(Ordering::SeqCst);
        Ok(kvs
            .into_iter()
            .filter(|kv| kv.lease != mine)
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .collect())
    }

    /// Tear the duties down, then resign, then `secondary`.
    async fn relinquish(&self, lk: &LeaderKey, why: &str) {
        self.set_state(CoordinatorState::Relinquish, why).await;
        let generation = self.role.set(false);
        self.wait_duties(generation, "down").await;
        let mut client = self.store.client().election_client();
        let resign = client.resign(Some(ResignOptions::new().with_leader(lk.clone())));
        match tokio::time::timeout(self.store.request_timeout(), resign).await {
            Ok(Ok(_)) => info!(node = %self.node, "resigned from the election"),
            Ok(Err(e)) => {
                warn!(node = %self.node, error = %debvisor_objects::store::error_chain(&e), "resign failed; the election key goes with the lease")
            }
            Err(_) => {
                warn!(node = %self.node, "resign timed out; the election key goes with the lease")
            }
        }
        self.set_state(CoordinatorState::Secondary, "resigned")
            .await;
    }
}
