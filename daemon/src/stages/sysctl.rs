//! Stage `sysctl`: verify and set the kernel parameters a hypervisor needs (forwarding,
//! bridge netfilter, ARP behaviour), when `networking.sysctl.apply` is on.

use std::path::Path;

use tracing::info;

use super::{Done, Outcome, Stage, StageResult};
use crate::config::Config;

/// Apply the planned sysctl values; each change is logged with its old and new value.
pub fn run(cfg: &Config) -> StageResult<()> {
    if !cfg.networking.sysctl.apply {
        return Ok(Done::with(
            (),
            Outcome::Skipped,
            "networking.sysctl.apply is false",
        ));
    }
    let node = cfg.node_name();
    let wanted = debvisor_netconf::sysctl::plan(&cfg.networking.sysctl);
    let changes = debvisor_netconf::sysctl::apply(Path::new("/proc/sys"), &wanted)
        .map_err(|e| e.to_string())?;
    for c in &changes {
        info!(node = %node, stage = Stage::Sysctl.name(), key = %c.key, before = %c.before, after = %c.after, "sysctl changed");
    }
    Ok(Done::ok(
        (),
        format!("{} keys verified, {} changed", wanted.len(), changes.len()),
    ))
}
