//! Stage `firewall`: the node's own nft table `inet debvisor`, with every network already in
//! etcd, so a restarted daemon never drops guest traffic between the base table and the
//! network chains. Not fatal: a ruleset nft refuses is retried on every resync.

use debvisor_firewall::Nft;
use debvisor_objects::Store;
use tracing::{error, warn};

use super::{Done, Outcome, Stage, StageResult};
use crate::config::Config;
use crate::reactors::network::{network_rules_from_store, FirewallSync};

/// Apply the ruleset when `firewall.enabled`; hands on the firewall for the Network object.
pub async fn run(cfg: &Config, store: &Store, primary: bool) -> StageResult<Option<FirewallSync>> {
    if !cfg.firewall.enabled {
        return Ok(Done::with(
            None,
            Outcome::Skipped,
            "firewall.enabled is false",
        ));
    }
    let node = cfg.node_name();
    let sync = FirewallSync::new(
        cfg.firewall.clone(),
        crate::hostnet::cluster_cidrs(&cfg.networking),
        Nft::new(),
    );
    let nets = match network_rules_from_store(store, primary).await {
        Ok(n) => n,
        Err(e) => {
            warn!(node = %node, stage = Stage::Firewall.name(), error = %e, "cannot list networks; base ruleset only");
            Vec::new()
        }
    };
    let n = nets.len();
    match sync.sync(nets).await {
        Ok(changed) => {
            let how = if changed {
                "applied"
            } else {
                "already in place"
            };
            Ok(Done::ok(
                Some(sync),
                format!("table inet debvisor with {n} networks ({how})"),
            ))
        }
        Err(e) => {
            error!(node = %node, stage = Stage::Firewall.name(), error = %e, "firewall not applied; retrying on every resync");
            Ok(Done::with(Some(sync), Outcome::Degraded, e))
        }
    }
}
