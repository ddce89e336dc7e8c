//! Stage `coordinator-services`: what a coordinator runs besides the daemon — the embedded
//! etcd of a standalone node (supervised by the daemon), the configured coordinator units
//! and the Ceph units (through systemd). A Ceph unit that does not start costs storage, not
//! the node: the stage ends `degraded` and the node runs.

use std::time::Duration;

use tracing::warn;

use super::{Done, Outcome, Stage, StageResult};
use crate::config::{Config, NodeMode, ServiceBackend};
use crate::services::{self, ProcessSpec, Supervised};

/// How long a `systemctl start` of one unit may take.
const UNIT_START_TIMEOUT: Duration = Duration::from_secs(90);

/// Start this node's coordinator services; hands on the processes the daemon supervises.
/// On failure, what this stage started is stopped again.
pub async fn run(cfg: &Config) -> StageResult<Vec<Supervised>> {
    let node = cfg.node_name();
    let mut started = Vec::new();
    let mut detail = Vec::new();
    if cfg.node.mode == NodeMode::Standalone && cfg.store.embedded.enabled {
        // etcd wants its data directory private (0700); it holds the whole cluster state.
        for note in crate::securefs::private_dir(&cfg.embedded_data_dir(), 0o700)
            .map_err(|e| e.to_string())?
        {
            tracing::warn!(node = %node, repair = %note, "embedded etcd data directory repaired");
        }
        let s = Supervised::start(embedded_etcd_spec(cfg))
            .await
            .map_err(|e| e.to_string())?;
        detail.push(format!(
            "embedded etcd pid {} on 127.0.0.1:{}",
            s.pid().unwrap_or(0),
            cfg.store.embedded.client_port
        ));
        started.push(s);
    }
    if cfg.is_coordinator() && !cfg.services.coordinator_units.is_empty() {
        if units_by_systemd(cfg) {
            for unit in &cfg.services.coordinator_units {
                if let Err(e) = services::systemctl("start", unit, UNIT_START_TIMEOUT).await {
                    stop(&started).await;
                    return Err(e.to_string());
                }
                detail.push(format!("{unit} started"));
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
        if units_by_systemd(cfg) {
            for unit in &ceph_units {
                match services::systemctl("start", unit, UNIT_START_TIMEOUT).await {
                    Ok(()) => detail.push(format!("{unit} started")),
                    Err(e) => {
                        warn!(node = %node, stage = Stage::CoordinatorServices.name(), unit = %unit, error = %e,
                            "ceph unit did not start; continuing without it");
                        detail.push(format!("{unit} failed to start (warning: {e})"));
                        ceph_unit_failed = true;
                    }
                }
            }
        } else {
            detail.push("ceph units not started: systemd is not PID 1".into());
        }
    }
    if detail.is_empty() {
        return Ok(Done::with(
            started,
            Outcome::Skipped,
            "no coordinator services for this node",
        ));
    }
    let outcome = if ceph_unit_failed {
        Outcome::Degraded
    } else {
        Outcome::Ok
    };
    Ok(Done::with(started, outcome, detail.join(", ")))
}

/// Stop the supervised services (at shutdown, or when startup fails after they started).
pub async fn stop(services: &[Supervised]) {
    for s in services {
        s.stop(Duration::from_secs(10)).await;
    }
}

/// Whether coordinator units (etcd, Ceph) are started through systemd (`services.backend`).
fn units_by_systemd(cfg: &Config) -> bool {
    match cfg.services.backend {
        ServiceBackend::Systemd => true,
        ServiceBackend::Process => false,
        ServiceBackend::Auto => services::systemd_is_pid1(),
    }
}

/// The embedded etcd of a standalone node: one member on loopback, data in the state dir.
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
