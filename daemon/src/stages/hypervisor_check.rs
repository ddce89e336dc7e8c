//! Stage `hypervisor-check`: open libvirt and ask for its version and domain counts. Not
//! fatal: a node whose libvirt does not answer keeps its lease, reports `libvirt=false` in
//! its health and retries on every tick.

use debvisor_objects::node::NodeInfo;
use tracing::warn;

use super::{Done, Outcome, Stage, StageResult};
use crate::config::Config;
use crate::hypervisor::Libvirt;

/// Probe libvirt; hands on the driver and `info` with libvirt's version when it answered.
pub async fn run(cfg: &Config, info: NodeInfo) -> StageResult<(Libvirt, NodeInfo)> {
    let libvirt = Libvirt::new(&cfg.hypervisor.uri, cfg.hypervisor.timeout)
        .with_validation(cfg.hypervisor.validate_xml);
    match libvirt.probe().await {
        Ok(p) => {
            let detail = format!(
                "{} libvirt {} ({} running, {} defined)",
                cfg.hypervisor.uri, p.version, p.running, p.defined
            );
            let mut info = info;
            info.libvirt_version = Some(p.version);
            Ok(Done::ok((libvirt, info), detail))
        }
        Err(e) => {
            warn!(node = %cfg.node_name(), stage = Stage::HypervisorCheck.name(), error = %e, "libvirt not reachable; continuing degraded");
            Ok(Done::with(
                (libvirt, info),
                Outcome::Degraded,
                e.to_string(),
            ))
        }
    }
}
