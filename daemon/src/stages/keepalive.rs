//! Stage `keepalive`: the first keepalive tick (health, `last_seen`), then `daemon_state` =
//! `run`. From here on the run loop ticks on `keepalive.interval`.

use debvisor_objects::node::DaemonState;
use debvisor_objects::Store;
use tracing::warn;

use super::Done;
use crate::config::Config;
use crate::keepalive::Keepalive;
use crate::registration;

/// Tick once and enter `run`. It cannot fail: a failed `daemon_state` write is retried by
/// the run loop.
pub async fn run(cfg: &Config, store: &Store, keepalive: &mut Keepalive) -> Done<()> {
    let node = cfg.node_name();
    keepalive.wait_first_sample(cfg.hypervisor.timeout).await;
    keepalive.tick().await;
    if let Err(e) = registration::set_daemon_state(
        store,
        node,
        DaemonState::Init,
        DaemonState::Run,
        "every object completed its initial sync",
    )
    .await
    {
        warn!(node = %node, error = %e, "daemon_state run not written; will retry on the next tick");
    }
    Done::ok((), format!("tick every {:?}", cfg.keepalive.interval))
}
