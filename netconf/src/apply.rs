//! The executor: run planned [`Action`]s through a [`HostNet`], log and return what changed.
//! Also the floating-address calls the election drives.

use std::fmt;

use ipnet::IpNet;

use crate::config::parse_cidr;
use crate::host::{HostNet, Outcome};
use crate::model::AddrOwner;
use crate::plan::{plan, top_link, Action};
use crate::{HostNetwork, HostNetworks, NetconfError};

/// One change made to the host: what it was and what it is now. Each is also logged as one
/// `info` line with the fields `network`, `link`, `what`, `from`, `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Host network(s) the link belongs to (`cluster`, `cluster,storage`, `stale`).
    pub network: String,
    /// Interface changed.
    pub link: String,
    /// What changed: `link`, `mtu`, `master`, `state`, `address`, `default-route`,
    /// `floating`.
    pub what: &'static str,
    /// Before (`absent`, `none`, `down`, `1500`, …).
    pub from: String,
    /// After.
    pub to: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{} {} {}: {} -> {}",
            self.network, self.link, self.what, self.from, self.to
        )
    }
}

fn log(c: &Change) {
    tracing::info!(
        network = %c.network,
        link = %c.link,
        what = c.what,
        from = %c.from,
        to = %c.to,
        "host network changed"
    );
}

/// Run `actions` in order, stopping at the first error (an [`Action::Blocked`] is reported as
/// [`NetconfError::Blocked`]; the planner puts those last). Actions that turn out to be no-ops
/// on the real host produce no [`Change`]. Every change is logged as it is made, so the log is
/// complete even when a later action fails.
pub async fn apply(host: &impl HostNet, actions: &[Action]) -> Result<Vec<Change>, NetconfError> {
    let mut changes = Vec::new();
    for a in actions {
        let change = |what: &'static str, from: String, to: String| Change {
            network: a.network().to_owned(),
            link: a.link().to_owned(),
            what,
            from,
            to,
        };
        let c = match a {
            Action::CreateBridge { link, .. } => match host.ensure_bridge(link).await? {
                Outcome::Unchanged => None,
                Outcome::Changed(()) => Some(change("link", "absent".into(), "bridge".into())),
            },
            Action::CreateVlan {
                link, parent, id, ..
            } => match host.ensure_vlan(link, parent, *id).await? {
                Outcome::Unchanged => None,
                Outcome::Changed(()) => Some(change(
                    "link",
                    "absent".into(),
                    format!("vlan {id} on {parent}"),
                )),
            },
            Action::SetMtu { link, mtu, .. } => match host.ensure_mtu(link, *mtu).await? {
                Outcome::Unchanged => None,
                Outcome::Changed(old) => Some(change("mtu", old.to_string(), mtu.to_string())),
            },
            Action::SetMaster { link, master, .. } => {
                match host.ensure_master(link, master).await? {
                    Outcome::Unchanged => None,
                    Outcome::Changed(old) => Some(change(
                        "master",
                        old.unwrap_or_else(|| "none".into()),
                        master.clone(),
                    )),
                }
            }
            Action::SetUp { link, .. } => match host.ensure_up(link).await? {
                Outcome::Unchanged => None,
                Outcome::Changed(()) => Some(change("state", "down".into(), "up".into())),
            },
            Action::AddAddress { link, addr, .. } => {
                match host.ensure_address(link, *addr, AddrOwner::Node).await? {
                    Outcome::Unchanged => None,
                    Outcome::Changed(()) => {
                        Some(change("address", "absent".into(), addr.to_string()))
                    }
                }
            }
            Action::RemoveAddress { link, addr, .. } => {
                match host.remove_address(link, *addr).await? {
                    Outcome::Unchanged => None,
                    Outcome::Changed(()) => {
                        Some(change("address", addr.to_string(), "absent".into()))
                    }
                }
            }
            Action::ReplaceDefaultRoute { link, gateway, .. } => {
                match host.ensure_default_route(link, *gateway).await? {
                    Outcome::Unchanged => None,
                    Outcome::Changed(old) => Some(change(
                        "default-route",
                        old.map_or_else(|| "none".into(), |r| r.to_string()),
                        format!("default via {gateway} dev {link}"),
                    )),
                }
            }
            Action::Blocked {
                network,
                link,
                reason,
            } => {
                tracing::warn!(network = %network, link = %link, %reason, "host network not configured");
                return Err(NetconfError::Blocked {
                    network: network.clone(),
                    link: link.clone(),
                    reason: reason.clone(),
                });
            }
        };
        if let Some(c) = c {
            log(&c);
            changes.push(c);
        }
    }
    Ok(changes)
}

/// Make the host match `desired`: observe → [`plan`] → [`apply`]. Returns the changes
/// (empty when the host already matched). Call it at startup and on every resync tick: it
/// corrects drift (a deleted bridge, a removed address, a changed MTU, a link set down).
pub async fn ensure(
    host: &impl HostNet,
    desired: &HostNetworks,
) -> Result<Vec<Change>, NetconfError> {
    let observed = host.observe().await?;
    apply(host, &plan(desired, &observed)).await
}

fn floating_of(network: &str, net: &HostNetwork) -> Result<Option<IpNet>, NetconfError> {
    net.floating
        .as_deref()
        .map(|f| {
            parse_cidr(f).map_err(|reason| NetconfError::Config {
                network: network.to_owned(),
                reason: format!("floating: {reason}"),
            })
        })
        .transpose()
}

/// Put the floating address of host network `network` on its top link and announce it
/// (gratuitous ARP / unsolicited NA) — called when this node becomes primary. Idempotent: if
/// the address is already there nothing is sent and `None` is returned (call
/// [`HostNet::announce`] to re-announce). `None` as well when the network has no floating
/// address.
pub async fn take_floating(
    host: &impl HostNet,
    network: &str,
    net: &HostNetwork,
) -> Result<Option<Change>, NetconfError> {
    let Some(addr) = floating_of(network, net)? else {
        return Ok(None);
    };
    let link = top_link(net);
    match host
        .ensure_address(&link, addr, AddrOwner::Floating)
        .await?
    {
        Outcome::Unchanged => Ok(None),
        Outcome::Changed(()) => {
            let c = Change {
                network: network.to_owned(),
                link: link.clone(),
                what: "floating",
                from: "absent".into(),
                to: addr.to_string(),
            };
            log(&c);
            host.announce(&link, addr).await?;
            Ok(Some(c))
        }
    }
}

/// Remove the floating address of `network` from its top link — called when this node stops
/// being primary. Idempotent (`None` when it was not there). An identical address that is not
/// marked as a floating address by us (an operator's) is left alone.
pub async fn release_floating(
    host: &impl HostNet,
    network: &str,
    net: &HostNetwork,
) -> Result<Option<Change>, NetconfError> {
    let Some(addr) = floating_of(network, net)? else {
        return Ok(None);
    };
    let link = top_link(net);
    let observed = host.observe().await?;
    let ours = observed.link(&link).is_some_and(|l| {
        l.addresses
            .iter()
            .any(|a| a.cidr == addr && a.owner == AddrOwner::Floating)
    });
    if !ours {
        return Ok(None);
    }
    match host.remove_address(&link, addr).await? {
        Outcome::Unchanged => Ok(None),
        Outcome::Changed(()) => {
            let c = Change {
                network: network.to_owned(),
                link,
                what: "floating",
                from: addr.to_string(),
                to: "absent".into(),
            };
            log(&c);
            Ok(Some(c))
        }
    }
}
