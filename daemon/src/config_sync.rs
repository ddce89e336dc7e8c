//! Config sync: the cluster-wide settings in `config/blob` (version `config/current_version`)
//! applied on this node at runtime, and the node's report in `nodes/<node>/config/{version,
//! last_applied_at,status}`.
//!
//! On every tick the task reads the two keys; a version it has not handled yet is parsed and
//! validated as a whole ([`ClusterConfig::parse`]), then checked against this node (every
//! `sysctl` key must exist here), and only then applied: nothing of a refused blob is applied
//! and the previous version stays in force. The status is
//! - `OK`: applied; `config/version` and `last_applied_at` move to it;
//! - `ERROR: field: reason`: refused (the field named);
//! - `STALE: reason`: valid, but it sets what this daemon cannot apply without a restart
//!   (`firewall_allow`, `node_status`); nothing applied.
//!
//! Applied at runtime: `log_level` (until the next SIGHUP, which rereads the file), and
//! `sysctl` on nodes with `networking.sysctl.apply` (written under `/proc/sys`; if one write
//! fails, the ones already written are put back). `vm_defaults` are read by `debvisorctl`.
//!
//! A standalone node also writes `self/node_id` (its name under `nodes/`) for DebVisor's
//! `hostname-register.sh`; a clustered store has no single "self".

use std::path::PathBuf;
use std::time::Duration;

use debvisor_objects::cluster_config::{ClusterConfig, ConfigFieldError, SyncStatus};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Store, StoreError, TxnBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::logging::LogHandle;

/// The config sync of one node.
pub struct ConfigSync {
    /// This node.
    pub node: String,
    /// The store.
    pub store: Store,
    /// The log filter to change.
    pub log: LogHandle,
    /// The configured `logging.level` (in force when the blob sets none).
    pub base_level: String,
    /// `networking.sysctl.apply`: whether this node writes kernel parameters.
    pub sysctl_apply: bool,
    /// Write `self/node_id` (standalone nodes only).
    pub standalone: bool,
    /// Where kernel parameters live (`/proc/sys`; a test may point elsewhere).
    pub proc_sys: PathBuf,
}

fn sysctl_path(root: &std::path::Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

impl ConfigSync {
    /// Check the blob against this node: every sysctl key exists here.
    fn check_here(&self, c: &ClusterConfig) -> Result<(), ConfigFieldError> {
        for k in c.sysctl.keys() {
            if !sysctl_path(&self.proc_sys, k).exists() {
                return Err(ConfigFieldError::new(
                    format!("sysctl.{k}"),
                    "no such kernel parameter on this node",
                ));
            }
        }
        Ok(())
    }

    /// Apply `c` whole or not at all.
    fn apply(&self, c: &ClusterConfig) -> SyncStatus {
        if let Err(e) = self.check_here(c) {
            return SyncStatus::Error(e);
        }
        let mut not_here = Vec::new();
        if !c.firewall_allow.is_empty() {
            not_here.push("firewall_allow");
        }
        if c.node_status.is_some() {
            not_here.push("node_status");
        }
        if !not_here.is_empty() {
            return SyncStatus::Stale(format!(
                "{} not applied at runtime by this debvisord; the previous settings stay in force",
                not_here.join(", ")
            ));
        }
        let level = c.log_level.as_deref().unwrap_or(&self.base_level);
        if let Err(e) = crate::logging::filter_for(level) {
            return SyncStatus::Error(ConfigFieldError::new("log_level", e));
        }
        if self.sysctl_apply {
            let mut written: Vec<(PathBuf, String)> = Vec::new();
            for (k, v) in &c.sysctl {
                let p = sysctl_path(&self.proc_sys, k);
                let old = std::fs::read_to_string(&p).unwrap_or_default();
                if let Err(e) = std::fs::write(&p, v) {
                    for (p, old) in written.iter().rev() {
                        let _ = std::fs::write(p, old.trim_end());
                    }
                    return SyncStatus::Error(ConfigFieldError::new(
                        format!("sysctl.{k}"),
                        format!("cannot write {}: {e}", p.display()),
                    ));
                }
                written.push((p, old));
            }
        }
        if let Err(e) = self.log.set_level(level) {
            return SyncStatus::Stale(e);
        }
        SyncStatus::Ok
    }

    /// One pass: handle a version not handled yet. Returns the version handled.
    pub async fn pass(&self, handled: Option<&str>) -> Result<Option<String>, StoreError> {
        let Some(version) = self
            .store
            .get(&schema::config_current_version())
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        else {
            return Ok(handled.map(str::to_string));
        };
        if handled == Some(version.as_str()) {
            return Ok(Some(version));
        }
        let blob = self
            .store
            .get(&schema::config_blob())
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        let status = match ClusterConfig::parse(&blob) {
            Ok(c) => self.apply(&c),
            Err(e) => SyncStatus::Error(e),
        };
        let key = |f| schema::node_key(&self.node, f);
        let mut t = TxnBuilder::new().put(&key(NodeField::ConfigStatus), status.value());
        if status == SyncStatus::Ok {
            t = t.put(&key(NodeField::ConfigVersion), version.clone()).put(
                &key(NodeField::ConfigLastAppliedAt),
                crate::hostinfo::now_rfc3339(),
            );
        }
        self.store.txn(t).await?;
        match &status {
            SyncStatus::Ok => {
                info!(node = %self.node, version = %version, "cluster config applied")
            }
            other => {
                warn!(node = %self.node, version = %version, status = %other.value(), "cluster config not applied; the previous one stays in force")
            }
        }
        Ok(Some(version))
    }

    /// Run a pass every `interval` until `cancel`.
    pub fn spawn(self, interval: Duration, cancel: CancellationToken) {
        tokio::spawn(async move {
            let mut handled: Option<String> = None;
            let mut self_written = !self.standalone;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !self_written {
                    match self
                        .store
                        .put(schema::SELF_NODE_ID, self.node.clone())
                        .await
                    {
                        Ok(()) => self_written = true,
                        Err(e) => {
                            warn!(node = %self.node, error = %e, "cannot write self/node_id; retrying")
                        }
                    }
                }
                match self.pass(handled.as_deref()).await {
                    Ok(h) => handled = h,
                    Err(e) => {
                        warn!(node = %self.node, error = %e, "config sync pass failed; retrying on the next tick")
                    }
                }
            }
        });
    }
}
