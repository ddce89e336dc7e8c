//! The pure planner: config + observed host → the actions that make the host match.
//!
//! No I/O here, so every layout and drift case is unit-tested without a kernel.
//!
//! # Semantics
//!
//! Each host network (`cluster`, `storage`, `upstream`) is a chain of links:
//!
//! * `device` — must exist (a NIC or a bond); it is never created.
//! * `vlan` (optional) — the 802.1Q link `<device>.<vlan>` on the device, created if missing.
//! * `bridge` (optional) — created if missing; the VLAN (or else the device) is its port.
//!
//! The topmost link (bridge, else VLAN, else device) carries the network's `addresses`. The
//! `mtu` applies to every link of the chain; a link shared by several networks (storage and
//! upstream may share the cluster device, VLAN or bridge) gets the largest MTU asked for, since
//! a parent must be at least as large as what rides on it. A shared link yields one action,
//! labelled with every network using it (`cluster,storage`).
//!
//! The default route per address family comes from the first of `upstream`, `cluster`,
//! `storage` whose `gateway` is of that family, via that network's top link.
//!
//! # Ownership: what we remove
//!
//! Addresses we add are marked in the kernel with `IFA_PROTO` ([`NODE_ADDR_PROTO`], floating
//! ones [`FLOATING_ADDR_PROTO`]). The planner removes an address only if it carries one of
//! these marks and is no longer wanted on that link; an address anyone else configured (an
//! operator, DHCP, the kernel's link-local) is never touched, even when it is not in the
//! config. Addresses listed by a network that cannot be planned ([`Action::Blocked`]) are
//! kept wherever they are, so a config mistake never strips a working address. Floating
//! addresses are added and removed by [`crate::take_floating`] / [`crate::release_floating`]
//! only; the planner removes a floating-marked address only when it is not the configured
//! floating address of its link any more (stale after a config change). A client network's
//! gateway ([`GATEWAY_ADDR_PROTO`], put on its bridge by the network's reconciler on the
//! primary) is never touched here.
//!
//! Links are never deleted by the planner: a bridge dropped from the config stays until an
//! operator removes it (the node may be carrying traffic over it).
//!
//! # Order
//!
//! Create links → MTU of devices and VLANs (decreases child-first, then increases
//! parent-first) → masters → MTU of bridges (after enslaving, which may auto-adjust a bridge's
//! MTU) → up → add addresses → remove stale addresses → default routes → [`Action::Blocked`]
//! last, so that everything that can be configured is.
//!
//! [`NODE_ADDR_PROTO`]: crate::NODE_ADDR_PROTO
//! [`FLOATING_ADDR_PROTO`]: crate::FLOATING_ADDR_PROTO
//! [`GATEWAY_ADDR_PROTO`]: crate::GATEWAY_ADDR_PROTO

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{check_ifname, parse_cidr};
use crate::model::{AddrOwner, Observed};
use crate::{HostNetwork, HostNetworks};

/// The MTU a newly created bridge starts with.
const NEW_BRIDGE_MTU: u32 = 1500;

/// One step towards the desired host state. `network` names the host network(s) the link
/// belongs to (`cluster`, `cluster,storage`; `stale` for an address no network wants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create bridge `link` (down).
    CreateBridge { network: String, link: String },
    /// Create VLAN `link` with `id` on `parent` (down).
    CreateVlan {
        network: String,
        link: String,
        parent: String,
        id: u16,
    },
    /// Set the MTU of `link`.
    SetMtu {
        network: String,
        link: String,
        mtu: u32,
    },
    /// Enslave `link` to bridge `master`.
    SetMaster {
        network: String,
        link: String,
        master: String,
    },
    /// Bring `link` up.
    SetUp { network: String, link: String },
    /// Add node address `addr` to `link`.
    AddAddress {
        network: String,
        link: String,
        addr: IpNet,
    },
    /// Remove an address we added earlier from `link`.
    RemoveAddress {
        network: String,
        link: String,
        addr: IpNet,
    },
    /// Point the default route of `gateway`'s family via `gateway` on `link`.
    ReplaceDefaultRoute {
        network: String,
        link: String,
        gateway: IpAddr,
    },
    /// `network` cannot be configured (missing device, name clash, …); nothing was planned
    /// for it. The executor reports it as [`crate::NetconfError::Blocked`].
    Blocked {
        network: String,
        link: String,
        reason: String,
    },
}

impl Action {
    /// The host network(s) this action is for.
    pub fn network(&self) -> &str {
        match self {
            Action::CreateBridge { network, .. }
            | Action::CreateVlan { network, .. }
            | Action::SetMtu { network, .. }
            | Action::SetMaster { network, .. }
            | Action::SetUp { network, .. }
            | Action::AddAddress { network, .. }
            | Action::RemoveAddress { network, .. }
            | Action::ReplaceDefaultRoute { network, .. }
            | Action::Blocked { network, .. } => network,
        }
    }

    /// The interface this action is about.
    pub fn link(&self) -> &str {
        match self {
            Action::CreateBridge { link, .. }
            | Action::CreateVlan { link, .. }
            | Action::SetMtu { link, .. }
            | Action::SetMaster { link, .. }
            | Action::SetUp { link, .. }
            | Action::AddAddress { link, .. }
            | Action::RemoveAddress { link, .. }
            | Action::ReplaceDefaultRoute { link, .. }
            | Action::Blocked { link, .. } => link,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Action::CreateBridge { link, .. } => write!(f, "create bridge {link}"),
            Action::CreateVlan {
                link, parent, id, ..
            } => write!(f, "create vlan {link} (id {id} on {parent})"),
            Action::SetMtu { link, mtu, .. } => write!(f, "set mtu of {link} to {mtu}"),
            Action::SetMaster { link, master, .. } => write!(f, "enslave {link} to {master}"),
            Action::SetUp { link, .. } => write!(f, "bring {link} up"),
            Action::AddAddress { link, addr, .. } => write!(f, "add {addr} to {link}"),
            Action::RemoveAddress { link, addr, .. } => write!(f, "remove {addr} from {link}"),
            Action::ReplaceDefaultRoute { link, gateway, .. } => {
                write!(f, "default route via {gateway} dev {link}")
            }
            Action::Blocked { link, reason, .. } => write!(f, "blocked at {link}: {reason}"),
        }
    }
}

/// Name of the VLAN link `<device>.<id>` the planner creates for a network with a `vlan`.
pub fn vlan_name(device: &str, id: u16) -> String {
    format!("{device}.{id}")
}

/// The link that carries a network's addresses (and floating address): the bridge if set,
/// else the VLAN link, else the device.
pub fn top_link(net: &HostNetwork) -> String {
    match (&net.bridge, net.vlan) {
        (Some(b), _) => b.clone(),
        (None, Some(id)) => vlan_name(&net.device, id),
        (None, None) => net.device.clone(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// Must exist; never created.
    Device,
    Vlan {
        parent: String,
        id: u16,
    },
    Bridge,
}

impl Role {
    fn describe(&self) -> String {
        match self {
            Role::Device => "a device".into(),
            Role::Vlan { parent, id } => format!("VLAN {id} on {parent}"),
            Role::Bridge => "a bridge".into(),
        }
    }
}

/// The merged wish for one link.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    role: Role,
    /// 0 device, 1 VLAN, 2 bridge: creation and MTU order.
    layer: u8,
    networks: Vec<&'static str>,
    mtu: Option<u32>,
    master: Option<String>,
    addresses: Vec<IpNet>,
}

impl Spec {
    fn label(&self) -> String {
        self.networks.join(",")
    }
}

type Blocked = (String, String); // (link, reason)

/// The links one network wants, checked against its own config and the observed host.
fn network_specs(
    name: &'static str,
    net: &HostNetwork,
    observed: &Observed,
    created_elsewhere: &BTreeSet<String>,
) -> Result<Vec<Spec>, Blocked> {
    let bad = |link: &str, reason: String| (link.to_owned(), reason);
    check_ifname(&net.device).map_err(|r| bad(&net.device, r))?;
    let mut addresses = Vec::new();
    for a in &net.addresses {
        addresses.push(parse_cidr(a).map_err(|r| bad(&net.device, format!("address {r}")))?);
    }
    if let Some(g) = &net.gateway {
        g.parse::<IpAddr>()
            .map_err(|_| bad(&net.device, format!("gateway {g:?} is not an IP address")))?;
    }
    if let Some(f) = &net.floating {
        parse_cidr(f).map_err(|r| bad(&net.device, format!("floating {r}")))?;
    }
    if !observed.links.contains_key(&net.device) && !created_elsewhere.contains(&net.device) {
        return Err(bad(
            &net.device,
            "device does not exist (physical devices are never created)".into(),
        ));
    }
    let mtu = net.mtu.map(u32::from);
    let mut specs = vec![Spec {
        name: net.device.clone(),
        role: Role::Device,
        layer: 0,
        networks: vec![name],
        mtu,
        master: None,
        addresses: Vec::new(),
    }];
    if let Some(id) = net.vlan {
        if !(1..=4094).contains(&id) {
            return Err(bad(&net.device, format!("VLAN id {id} is not in 1..=4094")));
        }
        let vname = vlan_name(&net.device, id);
        check_ifname(&vname).map_err(|r| bad(&vname, format!("VLAN link name: {r}")))?;
        if let Some(l) = observed.link(&vname) {
            let same = l.kind.as_deref() == Some("vlan")
                && l.vlan
                    .as_ref()
                    .is_some_and(|v| v.id == id && v.parent.as_deref() == Some(&net.device));
            if !same {
                return Err(bad(
                    &vname,
                    format!(
                        "exists but is not VLAN {id} on {} (kind {}, vlan {:?})",
                        net.device,
                        l.kind.as_deref().unwrap_or("device"),
                        l.vlan
                    ),
                ));
            }
        }
        specs.push(Spec {
            name: vname,
            role: Role::Vlan {
                parent: net.device.clone(),
                id,
            },
            layer: 1,
            networks: vec![name],
            mtu,
            master: None,
            addresses: Vec::new(),
        });
    }
    if let Some(br) = &net.bridge {
        check_ifname(br).map_err(|r| bad(br, r))?;
        if specs.iter().any(|s| &s.name == br) {
            return Err(bad(br, "the bridge cannot be its own port".into()));
        }
        if let Some(l) = observed.link(br) {
            if l.kind.as_deref() != Some("bridge") {
                return Err(bad(
                    br,
                    format!(
                        "exists as a {} link, not a bridge",
                        l.kind.as_deref().unwrap_or("physical")
                    ),
                ));
            }
        }
        if let Some(port) = specs.last_mut() {
            port.master = Some(br.clone());
        }
        specs.push(Spec {
            name: br.clone(),
            role: Role::Bridge,
            layer: 2,
            networks: vec![name],
            mtu,
            master: None,
            addresses: Vec::new(),
        });
    }
    if let Some(top) = specs.last_mut() {
        top.addresses = addresses;
    }
    Ok(specs)
}

/// Merge one network's specs into the accumulated ones; on conflict nothing is merged.
fn merge(acc: &mut Vec<Spec>, new: Vec<Spec>) -> Result<(), Blocked> {
    let mut cand = acc.clone();
    for s in new {
        let Some(e) = cand.iter_mut().find(|e| e.name == s.name) else {
            cand.push(s);
            continue;
        };
        match (&e.role, &s.role) {
            (a, b) if a == b => {}
            (_, Role::Device) => {}
            (Role::Device, _) => {
                e.role = s.role.clone();
                e.layer = s.layer;
            }
            (a, b) => {
                return Err((
                    s.name.clone(),
                    format!(
                        "wanted as {} but network {} has it as {}",
                        b.describe(),
                        e.label(),
                        a.describe()
                    ),
                ))
            }
        }
        match (&e.master, &s.master) {
            (Some(a), Some(b)) if a != b => {
                return Err((
                    s.name.clone(),
                    format!(
                        "wanted as a port of {b} but network {} makes it a port of {a}",
                        e.label()
                    ),
                ))
            }
            (None, Some(b)) => e.master = Some(b.clone()),
            _ => {}
        }
        e.mtu = e.mtu.max(s.mtu);
        for a in s.addresses {
            if !e.addresses.contains(&a) {
                e.addresses.push(a);
            }
        }
        for n in s.networks {
            if !e.networks.contains(&n) {
                e.networks.push(n);
            }
        }
    }
    if let Some(s) = cand
        .iter()
        .find(|s| s.master.is_some() && !s.addresses.is_empty())
    {
        return Err((
            s.name.clone(),
            format!(
                "carries addresses but is a port of bridge {} (addresses belong on the bridge)",
                s.master.as_deref().unwrap_or("?")
            ),
        ));
    }
    *acc = cand;
    Ok(())
}

/// Compute the actions that make the host match `desired` (see the module docs for the
/// semantics, ownership and order). Floating addresses are not planned here.
pub fn plan(desired: &HostNetworks, observed: &Observed) -> Vec<Action> {
    // Names some network creates: a network may use another's bridge as its "device".
    let created: BTreeSet<String> = desired
        .iter()
        .flat_map(|(_, n)| {
            n.vlan
                .map(|id| vlan_name(&n.device, id))
                .into_iter()
                .chain(n.bridge.clone())
        })
        .collect();

    let mut specs: Vec<Spec> = Vec::new();
    let mut blocked: Vec<Action> = Vec::new();
    let mut ok_networks: Vec<(&'static str, &HostNetwork)> = Vec::new();
    // Addresses of blocked networks: kept wherever they are.
    let mut protected: Vec<IpNet> = Vec::new();
    for (name, net) in desired.iter() {
        let r = network_specs(name, net, observed, &created).and_then(|s| merge(&mut specs, s));
        match r {
            Ok(()) => ok_networks.push((name, net)),
            Err((link, reason)) => {
                protected.extend(net.addresses.iter().filter_map(|a| parse_cidr(a).ok()));
                protected.extend(net.floating.as_deref().and_then(|f| parse_cidr(f).ok()));
                blocked.push(Action::Blocked {
                    network: name.to_owned(),
                    link,
                    reason,
                });
            }
        }
    }

    let mut out = Vec::new();
    let mut by_layer: Vec<&Spec> = specs.iter().collect();
    by_layer.sort_by_key(|s| s.layer);

    // Predicted MTU / master / up of every spec link once the create phase has run.
    let mut mtu_now: BTreeMap<&str, u32> = BTreeMap::new();
    let mut new_links: BTreeSet<&str> = BTreeSet::new();
    for s in &by_layer {
        match observed.link(&s.name) {
            Some(l) => {
                mtu_now.insert(&s.name, l.mtu);
            }
            None => {
                let network = s.label();
                let link = s.name.clone();
                let mtu = match &s.role {
                    Role::Vlan { parent, id } => {
                        out.push(Action::CreateVlan {
                            network,
                            link,
                            parent: parent.clone(),
                            id: *id,
                        });
                        mtu_now.get(parent.as_str()).copied().unwrap_or(1500)
                    }
                    Role::Bridge => {
                        out.push(Action::CreateBridge { network, link });
                        NEW_BRIDGE_MTU
                    }
                    // Blocked in network_specs unless another network creates it.
                    Role::Device => continue,
                };
                mtu_now.insert(&s.name, mtu);
                new_links.insert(&s.name);
            }
        }
    }

    // MTU of devices and VLANs: lower child-first, then raise parent-first.
    let mtu_action = |s: &Spec, m: u32| Action::SetMtu {
        network: s.label(),
        link: s.name.clone(),
        mtu: m,
    };
    for s in by_layer.iter().rev().filter(|s| s.role != Role::Bridge) {
        if let (Some(m), Some(&cur)) = (s.mtu, mtu_now.get(s.name.as_str())) {
            if m < cur {
                out.push(mtu_action(s, m));
            }
        }
    }
    for s in by_layer.iter().filter(|s| s.role != Role::Bridge) {
        if let (Some(m), Some(&cur)) = (s.mtu, mtu_now.get(s.name.as_str())) {
            if m > cur {
                out.push(mtu_action(s, m));
            }
        }
    }

    for s in &by_layer {
        if let Some(m) = &s.master {
            let cur = observed.link(&s.name).and_then(|l| l.master.as_deref());
            if cur != Some(m.as_str()) {
                out.push(Action::SetMaster {
                    network: s.label(),
                    link: s.name.clone(),
                    master: m.clone(),
                });
            }
        }
    }

    // Bridge MTU after enslaving: a new bridge always gets it set explicitly (the kernel
    // adjusts an unset bridge MTU to its ports' minimum when a port joins).
    for s in by_layer.iter().filter(|s| s.role == Role::Bridge) {
        if let Some(m) = s.mtu {
            let cur = mtu_now.get(s.name.as_str()).copied();
            if new_links.contains(s.name.as_str()) || cur != Some(m) {
                out.push(mtu_action(s, m));
            }
        }
    }

    for s in &by_layer {
        if !observed.link(&s.name).is_some_and(|l| l.up) {
            out.push(Action::SetUp {
                network: s.label(),
                link: s.name.clone(),
            });
        }
    }

    for s in &specs {
        let link = observed.link(&s.name);
        for a in &s.addresses {
            if !link.is_some_and(|l| l.has_address(a)) {
                out.push(Action::AddAddress {
                    network: s.label(),
                    link: s.name.clone(),
                    addr: *a,
                });
            }
        }
    }

    // Stale addresses we own.
    let floating_wanted: Vec<(String, IpNet)> = ok_networks
        .iter()
        .filter_map(|(_, n)| {
            let f = n.floating.as_deref()?.parse().ok()?;
            Some((top_link(n), f))
        })
        .collect();
    for l in observed.links.values() {
        let spec = specs.iter().find(|s| s.name == l.name);
        for a in &l.addresses {
            let stale = match a.owner {
                // A client network's gateway belongs to that network's reconciler.
                AddrOwner::Foreign | AddrOwner::Gateway => false,
                AddrOwner::Node => !spec.is_some_and(|s| s.addresses.contains(&a.cidr)),
                AddrOwner::Floating => !floating_wanted.contains(&(l.name.clone(), a.cidr)),
            };
            if stale && !protected.contains(&a.cidr) {
                out.push(Action::RemoveAddress {
                    network: spec.map_or_else(|| "stale".to_owned(), |s| s.label()),
                    link: l.name.clone(),
                    addr: a.cidr,
                });
            }
        }
    }

    for ipv6 in [false, true] {
        let pick = ["upstream", "cluster", "storage"]
            .into_iter()
            .find_map(|want| {
                let (name, net) = ok_networks.iter().find(|(n, _)| *n == want)?;
                let gw: IpAddr = net.gateway.as_deref()?.parse().ok()?;
                (gw.is_ipv6() == ipv6).then(|| (*name, top_link(net), gw))
            });
        if let Some((name, link, gw)) = pick {
            let present = observed.default_routes.iter().any(|r| {
                r.ipv6 == ipv6 && r.gateway == Some(gw) && r.link.as_deref() == Some(&link)
            });
            if !present {
                out.push(Action::ReplaceDefaultRoute {
                    network: name.to_owned(),
                    link,
                    gateway: gw,
                });
            }
        }
    }

    out.extend(blocked);
    out
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
