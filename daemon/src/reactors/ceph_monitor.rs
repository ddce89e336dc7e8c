//! The Ceph monitor: a task of its own, on its own `ceph.interval` timer, that asks Ceph how
//! it is and shares the answer through a [`watch`] channel, so the keepalive can report it
//! without ever calling Ceph (a slow or dead cluster never delays the tick or the lease).
//!
//! Every node publishes a node-level summary ([`CephNodeHealth`]: status, failing checks,
//! its own OSDs up/in). The primary also collects the cluster state
//! ([`crate::ceph::collect_state`]) and writes only the keys that changed ([`StateWriter`]),
//! in bounded transactions, deleting keys of pools, OSDs and volumes that are gone. When
//! Ceph does not answer, the primary writes `ceph/health` as
//! `{"status":"unreachable","error":…,"since":…}` and leaves the observed keys alone.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_objects::ceph::{health_key, usage_key, OBSERVED_PREFIX};
use debvisor_objects::node::{CephNodeHealth, CephNodeOsd};
use debvisor_objects::{Store, StoreError, TxnBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ceph::{
    batches, collect_state, local_osds, same_host, Ceph, CephError, Collected, KeyChange,
};
use crate::ceph::{Health, OsdTree};
use crate::hostinfo;

/// Most operations in one collector transaction (etcd's default limit is 128).
pub const MAX_TXN_OPS: usize = 64;

/// What the keepalive reads: the latest node-level summary, `None` before the first pass.
pub type CephHealthRx = watch::Receiver<Option<CephNodeHealth>>;

/// What one [`StateWriter::write_state`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Keys put.
    pub puts: usize,
    /// Keys deleted.
    pub deletes: usize,
    /// Transactions sent.
    pub txns: usize,
}

impl WriteStats {
    /// Keys written or deleted.
    pub fn keys(&self) -> usize {
        self.puts + self.deletes
    }
}

/// Writes the primary's collected state as changes only. Remembers what it wrote; the first
/// pass compares with what etcd holds under `ceph/health`, `ceph/usage` and
/// `ceph/observed/`, so a restarted daemon rewrites nothing that is unchanged.
pub struct StateWriter {
    store: Store,
    /// Key → value as last written (or read back); `None` until read from etcd.
    written: Option<BTreeMap<String, String>>,
}

impl StateWriter {
    /// A writer that will read back the current keys before its first write.
    pub fn new(store: Store) -> StateWriter {
        StateWriter {
            store,
            written: None,
        }
    }

    /// What etcd holds of the collector's keys.
    async fn read_back(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let mut out = BTreeMap::new();
        for key in [health_key(), usage_key()] {
            if let Some(kv) = self.store.get(&key).await? {
                out.insert(key, String::from_utf8_lossy(&kv.value).into_owned());
            }
        }
        let (kvs, _) = self.store.list(OBSERVED_PREFIX).await?;
        for kv in kvs {
            out.insert(kv.key, String::from_utf8_lossy(&kv.value).into_owned());
        }
        Ok(out)
    }

    /// Forget what was written: the next write compares with etcd again (another primary
    /// may have written meanwhile).
    pub fn forget(&mut self) {
        self.written = None;
    }

    async fn written(&mut self) -> Result<&mut BTreeMap<String, String>, StoreError> {
        if self.written.is_none() {
            self.written = Some(self.read_back().await?);
        }
        Ok(self.written.get_or_insert_with(BTreeMap::new))
    }

    /// Make etcd hold exactly `current` (under the collector's keys): changed and new keys
    /// put, vanished ones deleted, at most [`MAX_TXN_OPS`] per transaction; the keys of
    /// volumes not readable this time are left as they are ([`Collected::changes_since`]).
    /// A failed transaction leaves the rest for the next pass (what succeeded is remembered).
    pub async fn write_state(&mut self, current: &Collected) -> Result<WriteStats, StoreError> {
        let changes = current.changes_since(self.written().await?);
        self.apply(changes).await
    }

    /// Put only `ceph/health` (Ceph unreachable: the observed keys stay as they were).
    pub async fn write_health(&mut self, value: String) -> Result<WriteStats, StoreError> {
        let key = health_key();
        if self.written().await?.get(&key) == Some(&value) {
            return Ok(WriteStats::default());
        }
        self.apply(vec![KeyChange::Put(key, value)]).await
    }

    async fn apply(&mut self, changes: Vec<KeyChange>) -> Result<WriteStats, StoreError> {
        let mut stats = WriteStats::default();
        for batch in batches(changes, MAX_TXN_OPS) {
            let mut t = TxnBuilder::new();
            for c in &batch {
                t = match c {
                    KeyChange::Put(k, v) => t.put(k, v.clone()),
                    KeyChange::Delete(k) => t.delete(k),
                };
            }
            self.store.txn(t).await?;
            stats.txns += 1;
            let written = self.written.get_or_insert_with(BTreeMap::new);
            for c in batch {
                match c {
                    KeyChange::Put(k, v) => {
                        stats.puts += 1;
                        written.insert(k, v);
                    }
                    KeyChange::Delete(k) => {
                        stats.deletes += 1;
                        written.remove(&k);
                    }
                }
            }
        }
        Ok(stats)
    }
}

/// The `ceph/health` value while Ceph does not answer.
pub fn unreachable_health_json(error: &str, since: &str) -> String {
    serde_json::json!({
        "status": CephNodeHealth::UNREACHABLE,
        "error": error,
        "since": since,
    })
    .to_string()
}

/// Status and failing check names from a collected `ceph/health` value.
fn status_of(health_json: Option<&String>) -> (String, Vec<String>) {
    let v: serde_json::Value = health_json
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let status = v["status"].as_str().unwrap_or("unknown").to_string();
    let checks = v["checks"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (status, checks)
}

/// The node-level summary from a collected state (the primary's pass: no extra Ceph calls).
pub fn summary_from_state(state: &BTreeMap<String, String>, hostname: &str) -> CephNodeHealth {
    let (status, checks) = status_of(state.get(&health_key()));
    let prefix = format!("{OBSERVED_PREFIX}osds/");
    let osds: Vec<(i64, serde_json::Value)> = state
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, v)| {
            let id = k[prefix.len()..].parse().ok()?;
            Some((id, serde_json::from_str(v).ok()?))
        })
        .collect();
    CephNodeHealth {
        status,
        checks,
        osds: osds
            .iter()
            .filter(|(_, v)| same_host(v["node"].as_str().unwrap_or_default(), hostname))
            .map(|(id, v)| CephNodeOsd {
                id: *id,
                up: v["up"].as_bool().unwrap_or(false),
                r#in: v["in"].as_bool().unwrap_or(false),
            })
            .collect(),
        error: None,
        since: String::new(),
    }
}

/// The node-level summary of a node that does not collect: `ceph health detail`, OSD
/// metadata (which OSDs are ours) and the OSD tree (up/in), asked together.
pub async fn node_summary<C: Ceph>(ceph: &C, hostname: &str) -> Result<CephNodeHealth, CephError> {
    node_view(ceph, hostname).await.map(|(_, s)| s)
}

/// Cluster health and the node-level summary (see [`node_summary`]).
async fn node_view<C: Ceph>(
    ceph: &C,
    hostname: &str,
) -> Result<(Health, CephNodeHealth), CephError> {
    let (health, meta, tree): (Health, _, OsdTree) =
        futures::try_join!(ceph.health(), ceph.osd_metadata(), ceph.osd_tree())?;
    let mine = local_osds(&meta, hostname);
    let summary = CephNodeHealth {
        status: health.status.as_str().to_string(),
        checks: health.checks.keys().cloned().collect(),
        osds: tree
            .nodes
            .iter()
            .filter(|n| n.kind == "osd" && mine.contains(&n.id))
            .map(|n| CephNodeOsd {
                id: n.id,
                up: n.is_up(),
                r#in: n.is_in(),
            })
            .collect(),
        error: None,
        since: String::new(),
    };
    Ok((health, summary))
}

/// The monitor's state from pass to pass.
pub struct CephMonitor<C> {
    ceph: Arc<C>,
    node: String,
    hostname: String,
    /// The primary collects and writes the cluster state (fixed, or following the role).
    primary: bool,
    role: Option<crate::reactors::role::RoleView>,
    writer: StateWriter,
    tx: watch::Sender<Option<CephNodeHealth>>,
    /// Status of the last pass and since when (RFC3339) it holds.
    status: Option<(String, String)>,
    /// While Ceph does not answer: the first error, since when (RFC3339), and when (clock).
    unreachable: Option<(String, String, Instant)>,
    /// The store refused the last write (logged once per outage).
    store_failing: bool,
    /// The last full collection failed while Ceph answered (logged once until it works).
    collect_failing: bool,
    /// How long the last pass took, in seconds as `f64` bits (`/metrics`).
    last_duration: Arc<AtomicU64>,
}

/// What `/metrics` reads of the Ceph monitor: its latest summary and how long its last
/// pass took (seconds as `f64` bits; 0 before the first pass ends).
#[derive(Clone)]
pub struct CephMonitorView {
    /// The latest node-level summary.
    pub health: CephHealthRx,
    /// Duration of the last pass.
    pub last_duration: Arc<AtomicU64>,
}

impl<C: Ceph + 'static> CephMonitor<C> {
    /// A monitor for `node`; `primary` also collects and writes `ceph/…`.
    pub fn new(ceph: Arc<C>, store: Store, node: String, primary: bool) -> (Self, CephHealthRx) {
        let (tx, rx) = watch::channel(None);
        let m = CephMonitor {
            ceph,
            node,
            hostname: hostinfo::hostname(),
            primary,
            role: None,
            writer: StateWriter::new(store),
            tx,
            status: None,
            unreachable: None,
            store_failing: false,
            collect_failing: false,
            last_duration: Arc::default(),
        };
        (m, rx)
    }

    /// Follow the role signal instead of the fixed flag (the election moves the primary).
    pub fn with_role(mut self, role: crate::reactors::role::RoleView) -> Self {
        self.role = Some(role);
        self
    }

    /// Is this node the primary for this pass? On becoming it, what was written is
    /// forgotten: another primary may have written since.
    fn refresh_primary(&mut self) -> bool {
        if let Some(r) = &self.role {
            let now = r.is_primary();
            if now && !self.primary {
                self.writer.forget();
            }
            self.primary = now;
        }
        self.primary
    }

    /// The last pass's duration (shared; updated after every pass of [`CephMonitor::spawn`]).
    pub fn duration_handle(&self) -> Arc<AtomicU64> {
        self.last_duration.clone()
    }

    /// Run [`CephMonitor::pass`] every `interval` until `cancel`, in its own task.
    pub fn spawn(mut self, interval: Duration, cancel: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let started = Instant::now();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.pass() => {}
                }
                self.last_duration.store(
                    started.elapsed().as_secs_f64().to_bits(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        });
    }

    /// One pass: ask Ceph, publish the summary, and on the primary write what changed.
    pub async fn pass(&mut self) {
        if !self.refresh_primary() {
            match node_summary(&*self.ceph, &self.hostname).await {
                Ok(s) => self.answered(s, None).await,
                Err(e) => self.unanswered(e).await,
            }
            return;
        }
        match collect_state(&*self.ceph).await {
            Ok(state) => {
                if self.collect_failing {
                    self.collect_failing = false;
                    info!(node = %self.node, "ceph state collection works again");
                }
                let summary = summary_from_state(&state.state, &self.hostname);
                self.answered(summary, Some(state)).await
            }
            // No answer within the timeout: Ceph is away; do not spend another timeout.
            Err(e) if e.is_timeout() => self.unanswered(e).await,
            // One call failed (a tool crashed, a pool vanished mid-pass): Ceph may still
            // answer. Report its health and leave the observed state as it is.
            Err(e) => match node_view(&*self.ceph, &self.hostname).await {
                Ok((health, summary)) => {
                    if !self.collect_failing {
                        self.collect_failing = true;
                        warn!(node = %self.node, error = %e,
                            "ceph state collection failed; health still reported, observed state kept");
                    }
                    self.answered(summary, None).await;
                    // Same form as collect_state's (a Value, so the same key order).
                    let value = serde_json::to_value(&health)
                        .unwrap_or_default()
                        .to_string();
                    let r = self.writer.write_health(value).await;
                    self.store_result(r);
                }
                Err(e2) => {
                    debug!(node = %self.node, error = %e, "ceph state collection failed");
                    self.unanswered(e2).await
                }
            },
        }
    }

    async fn answered(&mut self, mut summary: CephNodeHealth, state: Option<Collected>) {
        let node = self.node.as_str();
        if let Some((error, since, at)) = self.unreachable.take() {
            info!(node, status = %summary.status, outage_s = at.elapsed().as_secs(), since = %since,
                last_error = %error, "ceph reachable again");
        }
        let changed = self.status.as_ref().map(|(s, _)| s) != Some(&summary.status);
        if changed {
            let from = self
                .status
                .as_ref()
                .map(|(s, _)| s.as_str())
                .unwrap_or("none");
            if summary.is_ok() {
                info!(node, from, to = %summary.status, "ceph health changed");
            } else {
                warn!(node, from, to = %summary.status, checks = ?summary.checks, "ceph health changed");
            }
            self.status = Some((summary.status.clone(), hostinfo::now_rfc3339()));
        }
        summary.since = self
            .status
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        self.tx.send_replace(Some(summary));
        if let Some(state) = state {
            let r = self.writer.write_state(&state).await;
            self.store_result(r);
        }
    }

    async fn unanswered(&mut self, e: CephError) {
        let node = self.node.as_str();
        let (error, since, _) = self.unreachable.get_or_insert_with(|| {
            warn!(node, error = %e, "ceph unreachable; reporting it and keeping the observed state");
            (e.to_string(), hostinfo::now_rfc3339(), Instant::now())
        });
        debug!(node, error = %e, "ceph still unreachable");
        let (error, since) = (error.clone(), since.clone());
        self.status = Some((CephNodeHealth::UNREACHABLE.to_string(), since.clone()));
        self.tx.send_replace(Some(CephNodeHealth {
            status: CephNodeHealth::UNREACHABLE.to_string(),
            checks: Vec::new(),
            osds: Vec::new(),
            error: Some(error.clone()),
            since: since.clone(),
        }));
        if self.primary {
            let r = self
                .writer
                .write_health(unreachable_health_json(&error, &since))
                .await;
            self.store_result(r);
        }
    }

    fn store_result(&mut self, r: Result<WriteStats, StoreError>) {
        let node = self.node.as_str();
        match r {
            Ok(s) => {
                if self.store_failing {
                    info!(node, "ceph state written again");
                    self.store_failing = false;
                }
                if s.keys() > 0 {
                    debug!(
                        node,
                        puts = s.puts,
                        deletes = s.deletes,
                        txns = s.txns,
                        "ceph state written"
                    );
                }
            }
            Err(e) if !self.store_failing => {
                self.store_failing = true;
                warn!(node, error = %e, "ceph state not written; retrying on the next pass");
            }
            Err(e) => debug!(node, error = %e, "ceph state still not written"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_from_collected_state() {
        let state: BTreeMap<String, String> = [
            (
                "ceph/health",
                r#"{"status":"HEALTH_WARN","checks":{"OSDMAP_FLAGS":{"severity":"HEALTH_WARN","message":"noout flag(s) set","detail":[],"muted":false}}}"#,
            ),
            ("ceph/observed/osds/0", r#"{"up":true,"in":true,"node":"h1"}"#),
            ("ceph/observed/osds/1", r#"{"up":false,"in":true,"node":"h1.example"}"#),
            ("ceph/observed/osds/2", r#"{"up":true,"in":true,"node":"h2"}"#),
            ("ceph/observed/pools/rbd", "{}"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = summary_from_state(&state, "h1");
        assert_eq!(s.status, "HEALTH_WARN");
        assert_eq!(s.checks, ["OSDMAP_FLAGS"]);
        assert_eq!(
            s.osds,
            [
                CephNodeOsd {
                    id: 0,
                    up: true,
                    r#in: true
                },
                CephNodeOsd {
                    id: 1,
                    up: false,
                    r#in: true
                }
            ]
        );
        let empty = summary_from_state(&BTreeMap::new(), "h1");
        assert_eq!(empty.status, "unknown");
    }

    #[test]
    fn unreachable_value() {
        let v: serde_json::Value = serde_json::from_str(&unreachable_health_json(
            "timed out",
            "2026-12-05T10:00:00Z",
        ))
        .expect("json");
        assert_eq!(v["status"], "unreachable");
        assert_eq!(v["error"], "timed out");
    }
}
