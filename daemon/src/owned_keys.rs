//! The node's own keys are level-triggered: on every keepalive tick the node compares what
//! etcd holds under `nodes/<node>/` (its Node object's cached keys, kept current by the
//! watch — no extra read) with what it should hold, and rewrites what differs. A deleted or
//! forged `daemon_state`, `coordinator_state`, `mode`, `info/fqdn` or `info`, or a
//! `domain_state` that does not parse, is repaired within a tick instead of staying wrong
//! because the node only remembered what it last wrote.
//!
//! Each repair is a compare-and-swap on the revision the cache saw, so a cache that lags
//! behind a write of our own changes nothing (and logs nothing); the next tick looks again.
//!
//! Also here: the operator's `confirm_removals` request, seen in the same keys.

use std::sync::{Arc, Mutex};

use debvisor_objects::node::{CoordinatorState, DaemonState, DomainState, NodeInfo};
use debvisor_objects::reactor::ObjectKeys;
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, StoreError, TxnBuilder};
use tracing::info;

/// What this node's keys should hold, and what it saw of them.
pub struct OwnKeys {
    node: String,
    mode: &'static str,
    fqdn: Option<String>,
    /// The `coordinator_state` the election last set.
    coordinator: Arc<Mutex<CoordinatorState>>,
    /// `info` as the keepalive last wrote it.
    info: Arc<Mutex<NodeInfo>>,
    /// The last `domain_state` that parsed (what a garbage value is repaired to).
    domain_state: Mutex<DomainState>,
    /// Revision of `confirm_removals` already acted on (or there at startup).
    confirmed: Mutex<Option<i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(keys: &ObjectKeys, f: NodeField) -> Option<(String, i64)> {
    keys.get(f.suffix()).map(|e| {
        (
            String::from_utf8_lossy(&e.value).trim().to_string(),
            e.mod_revision,
        )
    })
}

impl OwnKeys {
    /// The expected keys of `node`.
    pub fn new(
        node: &str,
        mode: &'static str,
        fqdn: Option<String>,
        coordinator: Arc<Mutex<CoordinatorState>>,
        info: Arc<Mutex<NodeInfo>>,
    ) -> OwnKeys {
        OwnKeys {
            node: node.to_string(),
            mode,
            fqdn,
            coordinator,
            info,
            domain_state: Mutex::new(DomainState::Ready),
            confirmed: Mutex::new(None),
        }
    }

    /// Rewrite every own key whose value in `keys` (the node's keys as the watch last saw
    /// them) is missing or wrong; returns how many were repaired.
    pub async fn repair(&self, store: &Store, keys: &ObjectKeys) -> Result<usize, StoreError> {
        let mut fixes: Vec<(NodeField, Option<String>, String, &'static str)> = Vec::new();
        let daemon = text(keys, NodeField::DaemonState);
        // `fenced` is the primary's verdict on a node it fenced: readmission lifts it.
        let fenced = daemon
            .as_ref()
            .is_some_and(|(v, _)| v == DaemonState::Fenced.as_str());
        if !fenced && daemon.as_ref().map(|(v, _)| v.as_str()) != Some(DaemonState::Run.as_str()) {
            fixes.push((
                NodeField::DaemonState,
                daemon.map(|d| d.0),
                DaemonState::Run.to_string(),
                "this daemon is running",
            ));
        }
        let coord = text(keys, NodeField::CoordinatorState);
        let want = *lock(&self.coordinator);
        if coord.as_ref().map(|(v, _)| v.as_str()) != Some(want.as_str()) {
            fixes.push((
                NodeField::CoordinatorState,
                coord.map(|c| c.0),
                want.to_string(),
                "this node's role in the election",
            ));
        }
        match text(keys, NodeField::DomainState) {
            Some((v, _)) if v.parse::<DomainState>().is_ok() => {
                if let Ok(d) = v.parse::<DomainState>() {
                    *lock(&self.domain_state) = d;
                }
            }
            other => {
                let want = lock(&self.domain_state).to_string();
                fixes.push((
                    NodeField::DomainState,
                    other.map(|o| o.0),
                    want,
                    "not a drain state; the last valid one restored",
                ));
            }
        }
        let mode = text(keys, NodeField::Mode);
        if mode.as_ref().map(|(v, _)| v.as_str()) != Some(self.mode) {
            fixes.push((
                NodeField::Mode,
                mode.map(|m| m.0),
                self.mode.to_string(),
                "node.mode",
            ));
        }
        let info = lock(&self.info).clone();
        let cached_info = keys
            .get(NodeField::Info.suffix())
            .and_then(|e| serde_json::from_slice::<NodeInfo>(&e.value).ok());
        if cached_info.as_ref() != Some(&info) {
            let was = keys
                .get(NodeField::Info.suffix())
                .map(|e| String::from_utf8_lossy(&e.value).into_owned());
            fixes.push((
                NodeField::Info,
                was,
                serde_json::to_string(&info).unwrap_or_default(),
                "host facts",
            ));
        }
        let mut repaired = 0;
        for (field, was, want, why) in fixes {
            if self.cas_put(store, keys, field, &want).await? {
                repaired += 1;
                let from = was.as_deref().unwrap_or("(missing)");
                let from = if field == NodeField::Info {
                    "(differs)"
                } else {
                    from
                };
                let to = if field == NodeField::Info {
                    "(this host's facts)"
                } else {
                    want.as_str()
                };
                info!(node = %self.node, key = field.suffix(), from, to, reason = why, "own key repaired");
            }
        }
        repaired += self.repair_fqdn(store, keys).await?;
        Ok(repaired)
    }

    /// `info/fqdn` from `node.fqdn`: present with that value, or absent.
    async fn repair_fqdn(&self, store: &Store, keys: &ObjectKeys) -> Result<usize, StoreError> {
        let cached = text(keys, NodeField::Fqdn);
        let key = schema::node_key(&self.node, NodeField::Fqdn);
        let t = match (&self.fqdn, &cached) {
            (Some(want), Some((v, _))) if v == want => return Ok(0),
            (None, None) => return Ok(0),
            (Some(want), _) => self
                .guard(TxnBuilder::new(), keys, NodeField::Fqdn)
                .put(&key, want.as_str()),
            (None, Some(_)) => self
                .guard(TxnBuilder::new(), keys, NodeField::Fqdn)
                .delete(&key),
        };
        if store.txn(t).await?.succeeded() {
            info!(node = %self.node, key = NodeField::Fqdn.suffix(), from = cached.map(|c| c.0).as_deref().unwrap_or("(missing)"),
                to = self.fqdn.as_deref().unwrap_or("(none)"), reason = "node.fqdn", "own key repaired");
            return Ok(1);
        }
        Ok(0)
    }

    /// Compare on the revision the cache saw (absent when it saw none).
    fn guard(&self, t: TxnBuilder, keys: &ObjectKeys, f: NodeField) -> TxnBuilder {
        let key = schema::node_key(&self.node, f);
        match keys.get(f.suffix()) {
            Some(e) => t.mod_revision_is(&key, e.mod_revision),
            None => t.absent(&key),
        }
    }

    async fn cas_put(
        &self,
        store: &Store,
        keys: &ObjectKeys,
        f: NodeField,
        value: &str,
    ) -> Result<bool, StoreError> {
        let key = schema::node_key(&self.node, f);
        let t = self.guard(TxnBuilder::new(), keys, f).put(&key, value);
        Ok(store.txn(t).await?.succeeded())
    }

    /// A new `confirm_removals` from an operator since the last one acted on (the value
    /// there when the daemon started counts as acted on). Any new write counts, whatever
    /// its revision: a replaced store starts its revisions again.
    pub fn confirm_requested(&self, keys: &ObjectKeys) -> bool {
        let rev = keys
            .get(NodeField::ConfirmRemovals.suffix())
            .map_or(0, |e| e.mod_revision);
        let mut seen = lock(&self.confirmed);
        let new = matches!(*seen, Some(r) if rev != r && rev != 0);
        *seen = Some(rev);
        new
    }
}
