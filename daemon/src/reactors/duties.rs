//! The primary-only duties that must be in place before a takeover writes `primary` (and
//! gone before a relinquish resigns), each following the role signal in its own task and
//! acknowledging what it applied:
//!
//! - `host-networks`: the floating addresses of the host networks, announced with gratuitous
//!   ARP / unsolicited NA when taken (and the host networks' drift, on every resync);
//! - `networks`: the gateways on the client networks' bridges and one dnsmasq per managed
//!   network (every network reconciled with the new role);
//! - `ceph`: Ceph state collection and the pool/volume reconcilers (they act on their next
//!   pass; acknowledged at once).
//!
//! Losing the role needs no etcd: addresses go, dnsmasq stops, gateways are removed by
//! reconciles that only touch the host.

use std::sync::Arc;
use std::time::Duration;

use debvisor_netconf::{Netlink, NetworkingConfig};
use debvisor_objects::network::NetworkKind;
use debvisor_objects::Reactor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ceph_objects::CephReactors;
use super::network::NetworkHost;
use super::role::{Duty, Role};

/// Run `apply` for the current role and after every change, acknowledging each, until
/// `cancel`.
fn follow<F, Fut>(mut duty: Duty, cancel: CancellationToken, mut apply: F)
where
    F: FnMut(Role) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut role = duty.role();
        loop {
            apply(role).await;
            duty.done(role);
            tokio::select! {
                _ = cancel.cancelled() => return,
                next = duty.changed() => match next {
                    Some(r) => role = r,
                    None => return,
                },
            }
        }
    });
}

/// The node's own host networks, with the floating addresses on the primary only: applied
/// when the role changes and checked again every `resync` (drift: an address someone
/// removed comes back). The one task that touches them, so a demotion is never undone by a
/// resync that read the old role.
pub fn spawn_host_networks(
    node: String,
    netlink: Arc<Netlink>,
    cfg: NetworkingConfig,
    resync: Duration,
    mut duty: Duty,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        let mut role = duty.role();
        let mut tick = tokio::time::interval(resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut changed_role = true;
        loop {
            match crate::hostnet::ensure_host(&*netlink, &cfg, role.primary).await {
                Ok(changes) if !changes.is_empty() => {
                    if changed_role {
                        info!(node = %node, primary = role.primary, changes = changes.len(), "host networks follow the role (floating addresses)");
                    } else {
                        info!(node = %node, changes = changes.len(), "host network drift corrected");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(node = %node, primary = role.primary, error = %e, "host networking resync failed; retrying")
                }
            }
            duty.done(role);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => changed_role = false,
                next = duty.changed() => match next {
                    Some(r) => {
                        role = r;
                        changed_role = true;
                    }
                    None => return,
                },
            }
        }
    });
}

/// The client networks' gateways and dnsmasq follow the role: every network is reconciled
/// with it (bounded by `settle`).
pub fn spawn_networks(
    net_host: Arc<NetworkHost>,
    networks: Arc<Reactor<NetworkKind>>,
    settle: Duration,
    duty: Duty,
    cancel: CancellationToken,
) {
    follow(duty, cancel, move |role| {
        let (net_host, networks) = (net_host.clone(), networks.clone());
        async move {
            net_host.set_primary(role.primary).await;
            if !networks.settle(settle).await {
                warn!(node = %net_host.node, primary = role.primary, "client networks not all reconciled for the new role in time; they follow on their own");
            }
        }
    })
}

/// Ceph's primary-only work follows the role on its next pass.
pub fn spawn_ceph(objects: Option<Arc<CephReactors>>, duty: Duty, cancel: CancellationToken) {
    follow(duty, cancel, move |role| {
        let objects = objects.clone();
        async move {
            if let Some(c) = &objects {
                c.set_primary(role.primary);
            }
        }
    })
}
