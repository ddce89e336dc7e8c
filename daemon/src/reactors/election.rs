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
    /// The handover request as the request watcher last saw it: read without waiting, so
    /// the primary's loop never blocks on etcd while its lease deadline runs.
    request: watch::Receiver<Option<String>>,
    /// Its sender, until `spawn` hands it to the request watcher.
    request_tx: Option<watch::Sender<Option<String>>>,
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

/// Bound of the etcd calls made while primary (the lease deadline keeps running).
const SHORT: Duration = Duration::from_millis(500);

/// When this node's primacy must end: resolves with the reason once the lease is lost or
/// its deadline (`valid_until − margin`, the bound before which the server cannot expire
/// it) passes without a renewal. The takeover and the primary loop both race their work
/// against it, so a primary never outlives its lease whatever it is waiting for.
async fn lease_ends(
    lease_state: &mut watch::Receiver<LeaseState>,
    margin: Duration,
) -> &'static str {
    loop {
        let deadline = lease_state
            .borrow()
            .valid_until()
            .map(|v| v.checked_sub(margin).unwrap_or(v));
        let Some(deadline) = deadline else {
            return "the node lease is lost";
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                return "the node lease was not renewed in time; it may expire on the server";
            }
            changed = lease_state.changed() => {
                if changed.is_err() || matches!(*lease_state.borrow(), LeaseState::Lost { .. }) {
                    return "the node lease is lost";
                }
            }
        }
    }
}

/// Follow `election/request` (list, then watch; again after a break) into `tx`, until
/// `stop`, so the election reads it without waiting on etcd.
fn spawn_request_watcher(store: Store, tx: watch::Sender<Option<String>>, stop: CancellationToken) {
    tokio::spawn(async move {
        let name_of = |v: &[u8]| {
            let n = String::from_utf8_lossy(v).trim().to_string();
            (!n.is_empty()).then_some(n)
        };
        let mut delay = Duration::from_millis(200);
        loop {
            let listed = tokio::select! {
                _ = stop.cancelled() => return,
                r = store.list(REQUEST) => r,
            };
            let rev = match listed {
                Ok((kvs, rev)) => {
                    let v = kvs
                        .iter()
                        .find(|kv| kv.key == REQUEST)
                        .and_then(|kv| name_of(&kv.value));
                    tx.send_replace(v);
                    delay = Duration::from_millis(200);
                    rev
                }
                Err(_) => {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let Ok(mut w) = store.watch(REQUEST, rev + 1).await else {
                continue;
            };
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = w.message() => m,
                };
                let Ok(Some(resp)) = msg else { break };
                if resp.canceled() {
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if store.rel(&String::from_utf8_lossy(kv.key())) != Some(REQUEST) {
                        continue;
                    }
                    match ev.event_type() {
                        EventType::Put => tx.send_replace(name_of(kv.value())),
                        EventType::Delete => tx.send_replace(None),
                    };
                }
            }
        }
    });
}

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
        let (tx, request) = watch::channel(None);
        Election {
            node,
            store,
            lease,
            lease_state,
            role,
            state,
            nodes,
            cfg,
            request,
            request_tx: Some(tx),
        }
    }

    /// Run until `stop` (graceful stop: a primary relinquishes first); `done` fires when the
    /// relinquish is complete.
    pub fn spawn(mut self, stop: CancellationToken, done: CancellationToken) {
        if let Some(tx) = self.request_tx.take() {
            spawn_request_watcher(self.store.clone(), tx, stop.clone());
        }
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
            let exit = match self.takeover(&lk, &stop).await {
                Some(exit) => exit,
                None => self.primary(&lk, &stop).await,
            };
            match exit {
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

    /// The handover request, if any: `Some(name)` (never waits).
    fn request(&self) -> Option<String> {
        self.request.borrow().clone()
    }

    /// Does a handover request ask this node to stay out of the line? Only while it names
    /// another node that could still take over (alive, in `run`, a coordinator): a target
    /// that died before it cleared the request (killed right after it won) must not keep
    /// every coordinator out of the election forever. The next primary refuses and clears
    /// such a request.
    fn stepping_aside(&self) -> bool {
        self.request()
            .is_some_and(|n| n != self.node && self.eligible(&n).is_ok())
    }

    /// Delete the handover request, bounded (never holds up the loop for long).
    async fn clear_request(&self) {
        let _ = tokio::time::timeout(SHORT, self.store.delete(REQUEST)).await;
    }

    /// Campaign until this node leads; `None` on stop. Steps out while a handover to another
    /// node is pending and while the lease is not good.
    async fn campaign(&mut self, stop: &CancellationToken) -> Option<LeaderKey> {
        let name = self.store.abs(ELECTION);
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if self.stepping_aside() || !self.lease_good() {
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
                    _ = self.request.changed() => {
                        if self.stepping_aside() {
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
                    // And is the lease still good by our own clock? A win that was
                    // answered before this process froze (SIGSTOP, a stall) and is read
                    // after it thawed may be stale: the lease may have expired meanwhile
                    // and another node taken over. No duties then.
                    match self.store.get(&rel).await {
                        Ok(Some(kv))
                            if kv.lease == self.lease.load(Ordering::SeqCst)
                                && self.lease_good() =>
                        {
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

    /// Won: bring the duties up, then write `primary` — all within the lease deadline. A
    /// takeover held up past it (etcd or a duty stuck: the link cut right after the win)
    /// demotes instead of keeping a role it can no longer hold: otherwise the duties would
    /// keep the floating address up (even re-adding it after the guardian released it)
    /// while another node takes over. `Some(exit)` when the takeover did not complete.
    async fn takeover(&self, lk: &LeaderKey, stop: &CancellationToken) -> Option<Exit> {
        let up = async {
            self.set_state(
                CoordinatorState::Takeover,
                &format!("won the election (lease {:x})", lk.lease()),
            )
            .await;
            let generation = self.role.set(true);
            self.wait_duties(generation, "up").await;
            // The request is cleared before `primary` is written, so whoever waits for
            // `primary` (`node primary NAME --wait`) finds the request gone with it.
            if self.request().as_deref() == Some(self.node.as_str()) {
                self.clear_request().await;
                info!(node = %self.node, "handover request fulfilled");
            }
            self.set_state(CoordinatorState::Primary, "primary duties up")
                .await;
        };
        let mut lease_state = self.lease_state.clone();
        tokio::select! {
            _ = up => None,
            _ = stop.cancelled() => Some(Exit::Stop),
            why = lease_ends(&mut lease_state, self.cfg.demote_margin) => Some(self.demote(why).await),
        }
    }

    /// Primary until stop, a handover, a lost key or lease trouble.
    async fn primary(&mut self, lk: &LeaderKey, stop: &CancellationToken) -> Exit {
        let key = String::from_utf8_lossy(lk.key()).into_owned();
        let rel = self.store.rel(&key).map(str::to_string).unwrap_or(key);
        let watch_key = |store: Store, rel: String, from: i64| async move {
            tokio::time::timeout(SHORT, store.watch(&rel, from))
                .await
                .ok()
                .and_then(Result::ok)
        };
        let mut watch = watch_key(self.store.clone(), rel.clone(), lk.rev() + 1).await;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the current handover request was first seen (it times out).
        let mut handover_since: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Exit::Stop,
                why = lease_ends(&mut self.lease_state, self.cfg.demote_margin) => {
                    return self.demote(why).await;
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
                            watch = watch_key(self.store.clone(), rel.clone(), lk.rev() + 1).await;
                        }
                    }
                }
                _ = poll.tick() => {
                    if watch.is_none() {
                        watch = watch_key(self.store.clone(), rel.clone(), lk.rev() + 1).await;
                    }
                    let Some(to) = self.request() else {
                        handover_since = None;
                        continue;
                    };
                    if handover_since.as_ref().map(|(n, _)| n) != Some(&to) {
                        handover_since = Some((to.clone(), Instant::now()));
                    }
                    let since = handover_since.as_ref().map_or_else(Instant::now, |(_, t)| *t);
                    if let Some(exit) = self.handover(&to, since).await {
                        return exit;
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

    /// One look at a handover request for `to` (seen since `since`): `Some(Handover)` once
    /// only `to` waits in the line; an impossible request, or one that did not come about in
    /// time, is refused (logged, removed). Every etcd call is short: the primary's loop must
    /// keep watching its lease deadline.
    async fn handover(&self, to: &str, since: Instant) -> Option<Exit> {
        if to == self.node {
            self.clear_request().await;
            return None;
        }
        if let Err(why) = self.eligible(to) {
            warn!(node = %self.node, target = to, reason = %why, "handover request refused");
            self.clear_request().await;
            return None;
        }
        match tokio::time::timeout(SHORT, self.waiting()).await {
            Ok(Ok(w)) if w.iter().any(|n| n == to) && w.iter().all(|n| n == to) => {
                return Some(Exit::Handover(to.to_string()));
            }
            _ => {}
        }
        if since.elapsed() >= self.cfg.handover_timeout {
            warn!(node = %self.node, target = to, "handover request refused: the target is not waiting alone in the election");
            self.clear_request().await;
        }
        None
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
