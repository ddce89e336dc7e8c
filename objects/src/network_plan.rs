//! The host side of a client network, planned purely: desired [`Network`] + this node's
//! context + the observed host → the steps that make the host match. The daemon executes
//! the steps through `debvisor_netconf::HostNet`; here there is no I/O, so every case is
//! unit-tested.
//!
//! What we create is recognisable by name (`dvbr<vni>`, `dvvx<vni>`, `dvvl<vni>`), so
//! removal deletes exactly what we created, also after a restart.

use std::collections::BTreeSet;
use std::net::IpAddr;

use debvisor_netconf::{AddrOwner, Observed, VxlanSpec};
use ipnet::IpNet;

use crate::network::{Network, NetworkType};
use crate::reactor::ObjectError;

/// UDP port of our VXLANs (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN encapsulation overhead subtracted from the underlay MTU.
pub const VXLAN_OVERHEAD: u32 = 50;

/// What this node brings to every client network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostContext {
    /// Does this node hold the gateways (the primary; a standalone node always)?
    pub primary: bool,
    /// Underlay link of managed networks (the cluster network's top link), if any.
    pub vxlan_dev: Option<String>,
    /// Local VXLAN endpoint (the node's cluster address).
    pub vxlan_local: Option<IpAddr>,
    /// MTU of the underlay (cluster network) or of the VLAN parent.
    pub underlay_mtu: u32,
    /// Parent link of bridged (VLAN) networks, if any.
    pub vlan_dev: Option<String>,
}

/// One step on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    CreateVxlan(VxlanSpec),
    /// A VXLAN with other immutable attributes exists: delete it and create this one.
    RecreateVxlan(VxlanSpec),
    CreateVlan {
        link: String,
        parent: String,
        id: u16,
    },
    CreateBridge {
        link: String,
    },
    SetMtu {
        link: String,
        mtu: u32,
    },
    SetMaster {
        link: String,
        master: String,
    },
    SetUp {
        link: String,
    },
    /// Add a gateway address (owned as floating: it moves with the primary).
    AddGateway {
        link: String,
        addr: IpNet,
    },
    RemoveGateway {
        link: String,
        addr: IpNet,
    },
    DeleteLink {
        link: String,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vx = |v: &VxlanSpec| {
            let mut s = format!("{} vni {} port {}", v.name, v.vni, v.dstport);
            if let Some(d) = &v.dev {
                s.push_str(&format!(" dev {d}"));
            }
            if let Some(l) = v.local {
                s.push_str(&format!(" local {l}"));
            }
            if let Some(g) = v.group {
                s.push_str(&format!(" group {g}"));
            }
            s
        };
        match self {
            Step::CreateVxlan(v) => write!(f, "create vxlan {}", vx(v)),
            Step::RecreateVxlan(v) => write!(f, "recreate vxlan {}", vx(v)),
            Step::CreateVlan { link, parent, id } => {
                write!(f, "create vlan {link} id {id} on {parent}")
            }
            Step::CreateBridge { link } => write!(f, "create bridge {link}"),
            Step::SetMtu { link, mtu } => write!(f, "set {link} mtu {mtu}"),
            Step::SetMaster { link, master } => write!(f, "enslave {link} to {master}"),
            Step::SetUp { link } => write!(f, "set {link} up"),
            Step::AddGateway { link, addr } => write!(f, "add gateway {addr} on {link}"),
            Step::RemoveGateway { link, addr } => write!(f, "remove gateway {addr} from {link}"),
            Step::DeleteLink { link } => write!(f, "delete {link}"),
        }
    }
}

/// The plan for one network, with the MTU it ends up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// MTU of the network's bridge.
    pub mtu: u32,
    /// The requested MTU was lowered to fit the underlay.
    pub clamped: bool,
}

/// Multicast group of a managed network's VXLAN: `239.<vni bytes>`, one group per VNI so
/// nodes only receive the flooding of networks they carry.
pub fn vxlan_group(vni: u32) -> IpAddr {
    let b = vni.to_be_bytes();
    IpAddr::from([239, b[1], b[2], b[3]])
}

/// The VXLAN link a managed network needs on this node.
pub fn vxlan_spec(net: &Network, ctx: &HostContext) -> VxlanSpec {
    VxlanSpec {
        name: net.link_name(),
        vni: net.vni,
        dev: ctx.vxlan_dev.clone(),
        dstport: VXLAN_PORT,
        local: ctx.vxlan_local,
        ttl: Some(16),
        group: ctx.vxlan_dev.as_ref().map(|_| vxlan_group(net.vni)),
    }
}

fn mtu_for(net: &Network, ctx: &HostContext) -> (u32, bool) {
    let max = match net.kind {
        NetworkType::Managed => ctx.underlay_mtu.saturating_sub(VXLAN_OVERHEAD),
        NetworkType::Bridged => ctx.underlay_mtu,
    };
    match net.mtu {
        Some(m) if m > max => (max, true),
        Some(m) => (m, false),
        None => (max, false),
    }
}

/// Gateway addresses the bridge carries on this node.
pub fn gateways(net: &Network, ctx: &HostContext) -> Vec<IpNet> {
    if !ctx.primary || net.kind != NetworkType::Managed {
        return Vec::new();
    }
    [&net.ipv4, &net.ipv6]
        .into_iter()
        .flatten()
        // Validated: the gateway lies inside the network, so the length fits its family.
        .filter_map(|f| f.gateway.and_then(|g| IpNet::new(g, f.network.len).ok()))
        .collect()
}

/// Plan the host for `net`. An error names the field and means: change nothing.
pub fn plan_host(net: &Network, ctx: &HostContext, obs: &Observed) -> Result<Plan, ObjectError> {
    let bridge = net.bridge_name();
    let link = net.link_name();
    let (mtu, clamped) = mtu_for(net, ctx);
    if mtu < 576 {
        return Err(ObjectError::new(
            "spec.mtu",
            format!(
                "the underlay MTU {} leaves {mtu}, below 576",
                ctx.underlay_mtu
            ),
        ));
    }
    let mut steps = Vec::new();
    // Links that exist under these names but are not ours are a conflict: never touch them.
    if let Some(b) = obs.link(&bridge) {
        if b.kind.as_deref() != Some("bridge") {
            return Err(ObjectError::new(
                "vni",
                format!("{bridge} exists on this node and is not a bridge"),
            ));
        }
    }
    match net.kind {
        NetworkType::Managed => {
            let want = vxlan_spec(net, ctx);
            match obs.link(&link) {
                None => steps.push(Step::CreateVxlan(want)),
                Some(l) if l.kind.as_deref() != Some("vxlan") => {
                    return Err(ObjectError::new(
                        "vni",
                        format!("{link} exists on this node and is not a VXLAN"),
                    ));
                }
                Some(l) if l.vxlan.as_ref() != Some(&want) => steps.push(Step::RecreateVxlan(want)),
                Some(_) => {}
            }
        }
        NetworkType::Bridged => {
            let parent = ctx.vlan_dev.clone().ok_or_else(|| {
                ObjectError::new(
                    "spec.type",
                    "bridged networks need networking.host_networks.cluster on this node",
                )
            })?;
            let id =
                u16::try_from(net.vni).map_err(|_| ObjectError::new("vni", "not a VLAN id"))?;
            match obs.link(&link) {
                None => steps.push(Step::CreateVlan {
                    link: link.clone(),
                    parent,
                    id,
                }),
                Some(l)
                    if l.vlan.as_ref().map(|v| (v.id, v.parent.as_deref()))
                        != Some((id, Some(parent.as_str()))) =>
                {
                    return Err(ObjectError::new(
                        "vni",
                        format!("{link} exists on this node with other VLAN settings"),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let created = |name: &str| {
        steps.iter().any(|s| {
            matches!(s, Step::CreateVxlan(v) | Step::RecreateVxlan(v) if v.name == name)
                || matches!(s, Step::CreateVlan { link, .. } if link == name)
        })
    };
    let link_new = created(&link);
    let bridge_obs = obs.link(&bridge);
    if bridge_obs.is_none() {
        steps.push(Step::CreateBridge {
            link: bridge.clone(),
        });
    }
    let link_obs = if link_new { None } else { obs.link(&link) };
    for (name, o) in [(&link, link_obs), (&bridge, bridge_obs)] {
        if o.map(|l| l.mtu) != Some(mtu) {
            steps.push(Step::SetMtu {
                link: name.clone(),
                mtu,
            });
        }
    }
    if link_obs.and_then(|l| l.master.as_deref()) != Some(bridge.as_str()) {
        steps.push(Step::SetMaster {
            link: link.clone(),
            master: bridge.clone(),
        });
    }
    for (name, o) in [(&link, link_obs), (&bridge, bridge_obs)] {
        if !o.map(|l| l.up).unwrap_or(false) {
            steps.push(Step::SetUp { link: name.clone() });
        }
    }
    let want_gw = gateways(net, ctx);
    let have: Vec<(IpNet, AddrOwner)> = bridge_obs
        .map(|b| b.addresses.iter().map(|a| (a.cidr, a.owner)).collect())
        .unwrap_or_default();
    for g in &want_gw {
        if !have.iter().any(|(c, _)| c == g) {
            steps.push(Step::AddGateway {
                link: bridge.clone(),
                addr: *g,
            });
        }
    }
    for (c, owner) in have {
        // `Floating`: a gateway put there before gateways had their own mark.
        if owner.primary_only() && !want_gw.contains(&c) {
            steps.push(Step::RemoveGateway {
                link: bridge.clone(),
                addr: c,
            });
        }
    }
    Ok(Plan {
        steps,
        mtu,
        clamped,
    })
}

/// Remove what we created for network `vni` (bridge first, then its VXLAN/VLAN link).
pub fn plan_removal(vni: u32, obs: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    for (name, kind) in [
        (format!("dvbr{vni}"), "bridge"),
        (format!("dvvx{vni}"), "vxlan"),
        (format!("dvvl{vni}"), "vlan"),
    ] {
        if obs.link(&name).and_then(|l| l.kind.as_deref()) == Some(kind) {
            steps.push(Step::DeleteLink { link: name });
        }
    }
    steps
}

/// VNIs of the client-network bridges present on the host (to find networks deleted while
/// the daemon was not watching).
pub fn host_vnis(obs: &Observed) -> BTreeSet<u32> {
    obs.links
        .values()
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .filter_map(|l| l.name.strip_prefix("dvbr")?.parse::<u32>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::parse_network;
    use crate::reactor::KeyEntry;
    use debvisor_netconf::{AddrState, LinkState, VlanInfo};

    fn net(spec: &str) -> Network {
        let k = KeyEntry::object(&[("spec", spec)]);
        parse_network("100", &k).expect("valid spec")
    }

    fn managed() -> Network {
        net(
            r#"{"type":"managed","ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"},"ipv6":{"network":"fd00:1::/64","gateway":"fd00:1::1"}}"#,
        )
    }

    fn ctx(primary: bool) -> HostContext {
        HostContext {
            primary,
            vxlan_dev: Some("eth0".into()),
            vxlan_local: Some("192.0.2.1".parse().expect("ip")),
            underlay_mtu: 1500,
            vlan_dev: Some("eth0".into()),
        }
    }

    /// Apply steps to an observed state the way the host would.
    fn simulate(mut obs: Observed, steps: &[Step]) -> Observed {
        for s in steps {
            match s {
                Step::CreateVxlan(v) | Step::RecreateVxlan(v) => {
                    let mut l = LinkState::new(10, &v.name, Some("vxlan"), 1500);
                    l.vxlan = Some(v.clone());
                    obs.links.insert(v.name.clone(), l);
                }
                Step::CreateVlan { link, parent, id } => {
                    let mut l = LinkState::new(11, link, Some("vlan"), 1500);
                    l.vlan = Some(VlanInfo {
                        id: *id,
                        parent: Some(parent.clone()),
                    });
                    obs.links.insert(link.clone(), l);
                }
                Step::CreateBridge { link } => {
                    obs.links
                        .insert(link.clone(), LinkState::new(12, link, Some("bridge"), 1500));
                }
                Step::SetMtu { link, mtu } => obs.links.get_mut(link).expect("link").mtu = *mtu,
                Step::SetMaster { link, master } => {
                    obs.links.get_mut(link).expect("link").master = Some(master.clone())
                }
                Step::SetUp { link } => obs.links.get_mut(link).expect("link").up = true,
                Step::AddGateway { link, addr } => obs
                    .links
                    .get_mut(link)
                    .expect("link")
                    .addresses
                    .push(AddrState {
                        cidr: *addr,
                        owner: AddrOwner::Gateway,
                    }),
                Step::RemoveGateway { link, addr } => obs
                    .links
                    .get_mut(link)
                    .expect("link")
                    .addresses
                    .retain(|a| a.cidr != *addr),
                Step::DeleteLink { link } => {
                    obs.links.remove(link);
                }
            }
        }
        obs
    }

    fn base() -> Observed {
        Observed::default().with_link(LinkState::new(2, "eth0", None, 1500))
    }

    #[test]
    fn managed_network_from_scratch_then_nothing_to_do() {
        let n = managed();
        let p = plan_host(&n, &ctx(true), &base()).expect("plan");
        assert_eq!(p.mtu, 1450);
        assert!(!p.clamped);
        assert!(
            matches!(&p.steps[0], Step::CreateVxlan(v) if v.vni == 100 && v.dstport == 4789 && v.group == Some("239.0.0.100".parse().expect("ip")))
        );
        assert!(p.steps.contains(&Step::CreateBridge {
            link: "dvbr100".into()
        }));
        assert!(p.steps.contains(&Step::SetMaster {
            link: "dvvx100".into(),
            master: "dvbr100".into()
        }));
        assert_eq!(
            p.steps
                .iter()
                .filter(|s| matches!(s, Step::AddGateway { .. }))
                .count(),
            2
        );
        let after = simulate(base(), &p.steps);
        assert_eq!(
            plan_host(&n, &ctx(true), &after).expect("replan").steps,
            vec![]
        );
    }

    /// The host after `n` was planned and carried out on the primary.
    fn primary_state(n: &Network) -> Observed {
        simulate(
            base(),
            &plan_host(n, &ctx(true), &base()).expect("plan").steps,
        )
    }

    /// How many gateways `p` removes.
    fn gateway_removals(p: &Plan) -> usize {
        p.steps
            .iter()
            .filter(|s| matches!(s, Step::RemoveGateway { .. }))
            .count()
    }

    #[test]
    fn a_secondary_carries_the_network_without_gateways_and_drops_them_when_demoted() {
        let n = managed();
        let p = plan_host(&n, &ctx(false), &base()).expect("plan");
        assert!(!p.steps.iter().any(|s| matches!(s, Step::AddGateway { .. })));
        let demote = plan_host(&n, &ctx(false), &primary_state(&n)).expect("plan");
        assert_eq!(gateway_removals(&demote), 2);
        assert_eq!(
            demote.steps.len(),
            2,
            "only the gateways go: {:?}",
            demote.steps
        );
    }

    #[test]
    fn gateways_carry_their_own_mark_and_an_old_floating_marked_one_is_still_removed() {
        let n = managed();
        let primary_state = primary_state(&n);
        let marks: Vec<AddrOwner> = primary_state.links["dvbr100"]
            .addresses
            .iter()
            .map(|a| a.owner)
            .collect();
        assert_eq!(marks, [AddrOwner::Gateway, AddrOwner::Gateway]);
        // A gateway put there by an older daemon (floating mark): dropped on demotion too.
        let mut old = primary_state.clone();
        for a in &mut old.links.get_mut("dvbr100").expect("br").addresses {
            a.owner = AddrOwner::Floating;
        }
        let demote = plan_host(&n, &ctx(false), &old).expect("plan");
        assert_eq!(gateway_removals(&demote), 2);
    }

    #[test]
    fn mtu_is_clamped_to_the_underlay_and_reported() {
        let n = net(r#"{"type":"managed","mtu":9000}"#);
        let p = plan_host(&n, &ctx(true), &base()).expect("plan");
        assert_eq!((p.mtu, p.clamped), (1450, true));
        let n = net(r#"{"type":"managed","mtu":1400}"#);
        assert_eq!(plan_host(&n, &ctx(true), &base()).expect("plan").mtu, 1400);
    }

    #[test]
    fn drift_is_corrected_with_exactly_the_missing_steps() {
        let n = managed();
        let good = primary_state(&n);
        let mut d = good.clone();
        d.links.get_mut("dvbr100").expect("br").mtu = 1500;
        d.links.get_mut("dvvx100").expect("vx").up = false;
        d.links
            .get_mut("dvbr100")
            .expect("br")
            .addresses
            .retain(|a| !a.cidr.addr().is_ipv4());
        let steps = plan_host(&n, &ctx(true), &d).expect("plan").steps;
        assert_eq!(
            steps,
            vec![
                Step::SetMtu {
                    link: "dvbr100".into(),
                    mtu: 1450
                },
                Step::SetUp {
                    link: "dvvx100".into()
                },
                Step::AddGateway {
                    link: "dvbr100".into(),
                    addr: IpNet::new("10.1.0.1".parse().expect("ip"), 24).expect("prefix")
                },
            ]
        );
        // A deleted bridge is recreated and the VXLAN re-enslaved.
        let mut d = good.clone();
        d.links.remove("dvbr100");
        d.links.get_mut("dvvx100").expect("vx").master = None;
        let steps = plan_host(&n, &ctx(true), &d).expect("plan").steps;
        assert!(steps.contains(&Step::CreateBridge {
            link: "dvbr100".into()
        }));
        assert!(steps.contains(&Step::SetMaster {
            link: "dvvx100".into(),
            master: "dvbr100".into()
        }));
        assert_eq!(
            plan_host(&n, &ctx(true), &simulate(d, &steps))
                .expect("plan")
                .steps,
            vec![]
        );
    }

    #[test]
    fn changed_vxlan_attributes_recreate_the_link() {
        let n = managed();
        let good = primary_state(&n);
        let mut c = ctx(true);
        c.vxlan_local = Some("192.0.2.9".parse().expect("ip"));
        let steps = plan_host(&n, &c, &good).expect("plan").steps;
        assert!(matches!(&steps[0], Step::RecreateVxlan(v) if v.local == c.vxlan_local));
    }

    #[test]
    fn foreign_links_with_our_names_are_never_touched() {
        let n = managed();
        let obs = base().with_link(LinkState::new(5, "dvbr100", Some("veth"), 1500));
        assert_eq!(
            plan_host(&n, &ctx(true), &obs).map_err(|e| e.field),
            Err("vni".to_string())
        );
        let obs = base().with_link(LinkState::new(5, "dvvx100", Some("bridge"), 1500));
        assert_eq!(
            plan_host(&n, &ctx(true), &obs).map_err(|e| e.field),
            Err("vni".to_string())
        );
        // Foreign addresses on our bridge are left alone.
        let good = primary_state(&n);
        let mut g = good.clone();
        g.links
            .get_mut("dvbr100")
            .expect("br")
            .addresses
            .push(AddrState {
                cidr: IpNet::new("10.1.0.200".parse().expect("ip"), 24).expect("prefix"),
                owner: AddrOwner::Foreign,
            });
        assert_eq!(plan_host(&n, &ctx(true), &g).expect("plan").steps, vec![]);
    }

    #[test]
    fn bridged_networks_are_vlans_on_the_configured_device() {
        let n = net(r#"{"type":"bridged","ipv4":{"network":"10.5.0.0/24"}}"#);
        let p = plan_host(&n, &ctx(true), &base()).expect("plan");
        assert_eq!(
            p.steps[0],
            Step::CreateVlan {
                link: "dvvl100".into(),
                parent: "eth0".into(),
                id: 100
            }
        );
        assert!(
            !p.steps.iter().any(|s| matches!(s, Step::AddGateway { .. })),
            "no gateway on bridged"
        );
        let after = simulate(base(), &p.steps);
        assert_eq!(
            plan_host(&n, &ctx(true), &after).expect("replan").steps,
            vec![]
        );
        let mut c = ctx(true);
        c.vlan_dev = None;
        assert_eq!(
            plan_host(&n, &c, &base()).map_err(|e| e.field),
            Err("spec.type".to_string())
        );
    }

    #[test]
    fn removal_deletes_exactly_what_we_created() {
        let n = managed();
        let good = primary_state(&n);
        let with_foreign = good
            .clone()
            .with_link(LinkState::new(9, "dvvl100", Some("veth"), 1500));
        let steps = plan_removal(100, &with_foreign);
        assert_eq!(
            steps,
            vec![
                Step::DeleteLink {
                    link: "dvbr100".into()
                },
                Step::DeleteLink {
                    link: "dvvx100".into()
                }
            ]
        );
        assert_eq!(host_vnis(&good), [100].into());
        assert!(plan_removal(100, &base()).is_empty());
    }

    #[test]
    fn groups_are_per_vni() {
        assert_eq!(
            vxlan_group(100),
            "239.0.0.100".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            vxlan_group(16_777_215),
            "239.255.255.255".parse::<IpAddr>().expect("ip")
        );
    }
}
