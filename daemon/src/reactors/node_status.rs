//! Node status (`nodes/<node>/status`: `OK`, `DEGRADED: reasons`, `DOWN: reason`), derived
//! by the primary from every node's health with the `node_status:` thresholds, on the
//! keepalive interval; written only when it changes, one line per change.

use std::sync::Arc;
use std::time::Duration;

use debvisor_objects::node::{derive_status, status_value, NodeKind, StatusThresholds};
use debvisor_objects::schema::{self, NodeField};
use debvisor_objects::{Reactor, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::role::RoleView;

/// How long ago an RFC 3339 time was (`None` when it does not parse).
fn age(rfc3339: &str) -> Option<Duration> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    let d = time::OffsetDateTime::now_utc() - t;
    Some(Duration::from_secs_f64(d.as_seconds_f64().max(0.0)))
}

/// One pass: the status of every node, written where it differs from etcd.
pub async fn pass(
    store: &Store,
    nodes: &Reactor<NodeKind>,
    me: &str,
    t: &StatusThresholds,
) -> usize {
    let mut written = 0;
    for (name, entry) in nodes.list() {
        let Ok(n) = entry.parsed.as_ref() else {
            continue;
        };
        let (st, why) = derive_status(n, n.last_seen.as_deref().and_then(age), t);
        let value = status_value(st, &why);
        let current = entry
            .keys
            .get(NodeField::Status.suffix())
            .map(|e| String::from_utf8_lossy(&e.value).trim().to_string());
        if current.as_deref() == Some(value.as_str()) {
            continue;
        }
        match store
            .put(&schema::node_key(&name, NodeField::Status), value.as_str())
            .await
        {
            Ok(()) => {
                written += 1;
                info!(node = %name, primary = me, from = current.as_deref().unwrap_or("-"), to = %value, "node status changed");
            }
            Err(e) => {
                warn!(node = %name, primary = me, error = %e, "node status not written; retrying on the next tick")
            }
        }
    }
    written
}

/// On the primary, derive and write every node's status every `interval`, until `cancel`.
pub fn spawn(
    store: Store,
    nodes: Arc<Reactor<NodeKind>>,
    me: String,
    role: RoleView,
    thresholds: StatusThresholds,
    interval: Duration,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if role.is_primary() {
                pass(&store, &nodes, &me, &thresholds).await;
            }
        }
    });
}
