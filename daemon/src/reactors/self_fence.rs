//! Self-fence: every node stops its guests a margin before its lease could expire on the
//! server, when no renewal came (`valid_until − fencing.self_fence_margin`, monotonic), and
//! starts none until the lease is good again. So no guest of a node runs later than its lease
//! expiry on the server — the bound that lets the primary move a dead node's VMs. Needs no
//! etcd: it acts exactly when etcd is away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_objects::fencing::must_self_fence;
use debvisor_objects::lease::LeaseState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::domain::DomainHost;

/// Watch the lease and self-fence `domains` at the deadline, until `cancel`.
pub fn spawn(
    domains: Arc<DomainHost>,
    mut lease: watch::Receiver<LeaseState>,
    margin: Duration,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let state = *lease.borrow_and_update();
            let until = state.valid_until();
            let now = Instant::now();
            if must_self_fence(now, until, margin) {
                if !domains.is_self_fenced() {
                    let why = match state {
                        LeaseState::Lost { .. } => "the node lease is lost".to_string(),
                        _ => format!(
                            "the node lease was not renewed and may expire on the server within {}ms",
                            margin.as_millis()
                        ),
                    };
                    let n = domains.self_fence(&why).await;
                    info!(node = %domains_node(&domains), guests = n, reason = %why, "self-fence complete; nothing starts here until the lease is good again");
                }
            } else if domains.lift_self_fence() {
                info!(node = %domains_node(&domains), "node lease good again: self-fence lifted, guests may start");
            }
            // Sleep until the next deadline, or the next change of the lease.
            let wake = until
                .map(|u| u.checked_sub(margin).unwrap_or(u))
                .filter(|w| *w > Instant::now())
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = lease.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    });
}

fn domains_node(d: &DomainHost) -> &str {
    d.node()
}
