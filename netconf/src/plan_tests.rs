//! Planner tests: every layout from an empty host, re-planned after applying (no actions),
//! drift cases (exactly the corrective actions), sharing, conflicts and ownership. The plans
//! are applied through [`MemoryHost`] with the real executor.

use super::*;
use crate::model::{AddrState, DefaultRoute, LinkState, VlanInfo};
use crate::{apply, release_floating, take_floating, Change, HostNet, MemoryHost, NetconfError};
use futures::executor::block_on;

fn phys(index: u32, name: &str) -> LinkState {
    let mut l = LinkState::new(index, name, None, 1500);
    l.mac = Some(vec![2, 0, 0, 0, 0, index as u8]);
    l
}

/// A host with `lo` (up) and two physical NICs, down, MTU 1500.
fn host() -> Observed {
    let mut lo = LinkState::new(1, "lo", None, 65536);
    lo.up = true;
    Observed::default()
        .with_link(lo)
        .with_link(phys(2, "eth0"))
        .with_link(phys(3, "eth1"))
}

fn cidr(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

fn net(device: &str) -> HostNetwork {
    HostNetwork {
        device: device.into(),
        ..Default::default()
    }
}

fn with_addrs(mut n: HostNetwork, addrs: &[&str]) -> HostNetwork {
    n.addresses = addrs.iter().map(|a| a.to_string()).collect();
    n
}

fn cluster(n: HostNetwork) -> HostNetworks {
    HostNetworks {
        cluster: Some(n),
        ..Default::default()
    }
}

fn s(x: &str) -> String {
    x.to_owned()
}
fn a_up(n: &str, l: &str) -> Action {
    Action::SetUp {
        network: s(n),
        link: s(l),
    }
}
fn a_mtu(n: &str, l: &str, mtu: u32) -> Action {
    Action::SetMtu {
        network: s(n),
        link: s(l),
        mtu,
    }
}
fn a_master(n: &str, l: &str, m: &str) -> Action {
    Action::SetMaster {
        network: s(n),
        link: s(l),
        master: s(m),
    }
}
fn a_add(n: &str, l: &str, a: &str) -> Action {
    Action::AddAddress {
        network: s(n),
        link: s(l),
        addr: cidr(a),
    }
}
fn a_rm(n: &str, l: &str, a: &str) -> Action {
    Action::RemoveAddress {
        network: s(n),
        link: s(l),
        addr: cidr(a),
    }
}
fn a_bridge(n: &str, l: &str) -> Action {
    Action::CreateBridge {
        network: s(n),
        link: s(l),
    }
}
fn a_vlan(n: &str, l: &str, parent: &str, id: u16) -> Action {
    Action::CreateVlan {
        network: s(n),
        link: s(l),
        parent: s(parent),
        id,
    }
}
fn a_route(n: &str, l: &str, gw: &str) -> Action {
    Action::ReplaceDefaultRoute {
        network: s(n),
        link: s(l),
        gateway: gw.parse().expect("ip"),
    }
}

/// Plan against `obs`, apply through the executor, and check that the result needs nothing
/// more. Returns the first plan and the host afterwards.
fn converge(desired: &HostNetworks, obs: Observed) -> (Vec<Action>, MemoryHost) {
    let actions = plan(desired, &obs);
    let host = MemoryHost::new(obs);
    block_on(apply(&host, &actions)).expect("apply");
    let again = plan(desired, &host.snapshot());
    assert!(
        again.is_empty(),
        "not converged after {actions:#?}: {again:#?}"
    );
    (actions, host)
}

fn link<'a>(o: &'a Observed, name: &str) -> &'a LinkState {
    o.link(name).unwrap_or_else(|| panic!("no link {name}"))
}

fn addrs(o: &Observed, name: &str) -> Vec<String> {
    link(o, name)
        .addresses
        .iter()
        .map(|a| a.cidr.to_string())
        .collect()
}

// ---- layouts from an empty host ----

#[test]
fn device_only() {
    let d = cluster(with_addrs(net("eth0"), &["10.0.0.11/24", "fd00::11/64"]));
    let (actions, h) = converge(&d, host());
    assert_eq!(
        actions,
        vec![
            a_up("cluster", "eth0"),
            a_add("cluster", "eth0", "10.0.0.11/24"),
            a_add("cluster", "eth0", "fd00::11/64"),
        ]
    );
    let o = h.snapshot();
    assert!(link(&o, "eth0").up);
    assert_eq!(addrs(&o, "eth0"), ["10.0.0.11/24", "fd00::11/64"]);
    assert!(link(&o, "eth0")
        .addresses
        .iter()
        .all(|a| a.owner == AddrOwner::Node));
}

#[test]
fn device_with_mtu() {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.mtu = Some(9000);
    let (actions, h) = converge(&cluster(n), host());
    assert_eq!(
        actions,
        vec![
            a_mtu("cluster", "eth0", 9000),
            a_up("cluster", "eth0"),
            a_add("cluster", "eth0", "10.0.0.11/24"),
        ]
    );
    assert_eq!(link(&h.snapshot(), "eth0").mtu, 9000);
}

#[test]
fn device_and_bridge() {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24", "fd00::11/64"]);
    n.bridge = Some("brc".into());
    n.mtu = Some(9000);
    let (actions, h) = converge(&cluster(n), host());
    assert_eq!(
        actions,
        vec![
            a_bridge("cluster", "brc"),
            a_mtu("cluster", "eth0", 9000),
            a_master("cluster", "eth0", "brc"),
            a_mtu("cluster", "brc", 9000),
            a_up("cluster", "eth0"),
            a_up("cluster", "brc"),
            a_add("cluster", "brc", "10.0.0.11/24"),
            a_add("cluster", "brc", "fd00::11/64"),
        ]
    );
    let o = h.snapshot();
    assert_eq!(link(&o, "brc").kind.as_deref(), Some("bridge"));
    assert_eq!(link(&o, "eth0").master.as_deref(), Some("brc"));
    assert!(addrs(&o, "eth0").is_empty());
    assert_eq!(addrs(&o, "brc").len(), 2);
}

#[test]
fn bridge_without_mtu_leaves_mtus_alone() {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.bridge = Some("brc".into());
    let (actions, _) = converge(&cluster(n), host());
    assert!(!actions.iter().any(|a| matches!(a, Action::SetMtu { .. })));
}

#[test]
fn vlan_only() {
    let mut n = with_addrs(net("eth0"), &["10.0.10.11/24"]);
    n.vlan = Some(10);
    let (actions, h) = converge(&cluster(n), host());
    assert_eq!(
        actions,
        vec![
            a_vlan("cluster", "eth0.10", "eth0", 10),
            a_up("cluster", "eth0"),
            a_up("cluster", "eth0.10"),
            a_add("cluster", "eth0.10", "10.0.10.11/24"),
        ]
    );
    let o = h.snapshot();
    let v = link(&o, "eth0.10");
    assert_eq!(v.kind.as_deref(), Some("vlan"));
    assert_eq!(
        v.vlan,
        Some(VlanInfo {
            id: 10,
            parent: Some("eth0".into())
        })
    );
}

#[test]
fn vlan_and_bridge_with_mtu() {
    let mut n = with_addrs(net("eth0"), &["10.0.10.11/24"]);
    n.vlan = Some(10);
    n.bridge = Some("br10".into());
    n.mtu = Some(9000);
    let (actions, h) = converge(&cluster(n), host());
    assert_eq!(
        actions,
        vec![
            a_vlan("cluster", "eth0.10", "eth0", 10),
            a_bridge("cluster", "br10"),
            a_mtu("cluster", "eth0", 9000),
            a_mtu("cluster", "eth0.10", 9000),
            a_master("cluster", "eth0.10", "br10"),
            a_mtu("cluster", "br10", 9000),
            a_up("cluster", "eth0"),
            a_up("cluster", "eth0.10"),
            a_up("cluster", "br10"),
            a_add("cluster", "br10", "10.0.10.11/24"),
        ]
    );
    let o = h.snapshot();
    for l in ["eth0", "eth0.10", "br10"] {
        assert_eq!(link(&o, l).mtu, 9000, "{l}");
        assert!(link(&o, l).up, "{l}");
    }
    assert_eq!(link(&o, "eth0.10").master.as_deref(), Some("br10"));
    assert_eq!(link(&o, "eth0").master, None);
}

#[test]
fn mtu_decrease_goes_child_first() {
    let mut n = with_addrs(net("eth0"), &["10.0.10.11/24"]);
    n.vlan = Some(10);
    n.mtu = Some(9000);
    let (_, h) = converge(&cluster(n.clone()), host());
    n.mtu = Some(1400);
    let (actions, _) = converge(&cluster(n), h.snapshot());
    assert_eq!(
        actions,
        vec![
            a_mtu("cluster", "eth0.10", 1400),
            a_mtu("cluster", "eth0", 1400)
        ]
    );
}

#[test]
fn full_layout_with_gateway_on_upstream() {
    let mut up = with_addrs(net("eth1"), &["192.0.2.11/24", "2001:db8::11/64"]);
    up.bridge = Some("brup".into());
    up.gateway = Some("192.0.2.1".into());
    let mut cl = with_addrs(net("eth0"), &["10.0.0.11/24", "fd00::11/64"]);
    cl.gateway = Some("fd00::1".into());
    let d = HostNetworks {
        cluster: Some(cl),
        storage: None,
        upstream: Some(up),
    };
    let (actions, h) = converge(&d, host());
    let routes: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::ReplaceDefaultRoute { .. }))
        .collect();
    assert_eq!(
        routes,
        [
            &a_route("upstream", "brup", "192.0.2.1"),
            &a_route("cluster", "eth0", "fd00::1"),
        ]
    );
    assert_eq!(
        actions.last(),
        Some(&a_route("cluster", "eth0", "fd00::1")),
        "routes come after addresses"
    );
    let o = h.snapshot();
    assert_eq!(o.default_routes.len(), 2);
}

#[test]
fn upstream_gateway_wins_over_cluster_for_the_same_family() {
    let mut up = with_addrs(net("eth1"), &["192.0.2.11/24"]);
    up.gateway = Some("192.0.2.1".into());
    let mut cl = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    cl.gateway = Some("10.0.0.1".into());
    let d = HostNetworks {
        cluster: Some(cl),
        storage: None,
        upstream: Some(up),
    };
    let (actions, _) = converge(&d, host());
    let routes: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::ReplaceDefaultRoute { .. }))
        .collect();
    assert_eq!(routes, [&a_route("upstream", "eth1", "192.0.2.1")]);
}

// ---- sharing ----

#[test]
fn storage_shares_the_cluster_device() {
    let d = HostNetworks {
        cluster: Some(with_addrs(net("eth0"), &["10.0.0.11/24"])),
        storage: Some(with_addrs(net("eth0"), &["10.1.0.11/24"])),
        upstream: None,
    };
    let (actions, h) = converge(&d, host());
    assert_eq!(
        actions,
        vec![
            a_up("cluster,storage", "eth0"),
            a_add("cluster,storage", "eth0", "10.0.0.11/24"),
            a_add("cluster,storage", "eth0", "10.1.0.11/24"),
        ]
    );
    assert_eq!(addrs(&h.snapshot(), "eth0").len(), 2);
}

#[test]
fn all_three_share_one_bridge() {
    let b = |a: &str| {
        let mut n = with_addrs(net("eth0"), &[a]);
        n.bridge = Some("br0".into());
        n
    };
    let d = HostNetworks {
        cluster: Some(b("10.0.0.11/24")),
        storage: Some(b("10.1.0.11/24")),
        upstream: Some(b("10.2.0.11/24")),
    };
    let (actions, _) = converge(&d, host());
    let lbl = "cluster,storage,upstream";
    assert_eq!(
        actions,
        vec![
            a_bridge(lbl, "br0"),
            a_master(lbl, "eth0", "br0"),
            a_up(lbl, "eth0"),
            a_up(lbl, "br0"),
            a_add(lbl, "br0", "10.0.0.11/24"),
            a_add(lbl, "br0", "10.1.0.11/24"),
            a_add(lbl, "br0", "10.2.0.11/24"),
        ]
    );
}

#[test]
fn storage_vlan_on_the_cluster_device_raises_the_device_mtu() {
    let mut cl = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    cl.mtu = Some(1500);
    let mut st = with_addrs(net("eth0"), &["10.1.0.11/24"]);
    st.vlan = Some(20);
    st.mtu = Some(9000);
    let d = HostNetworks {
        cluster: Some(cl),
        storage: Some(st),
        upstream: None,
    };
    let (actions, h) = converge(&d, host());
    assert_eq!(
        actions,
        vec![
            a_vlan("storage", "eth0.20", "eth0", 20),
            a_mtu("cluster,storage", "eth0", 9000),
            a_mtu("storage", "eth0.20", 9000),
            a_up("cluster,storage", "eth0"),
            a_up("storage", "eth0.20"),
            a_add("cluster,storage", "eth0", "10.0.0.11/24"),
            a_add("storage", "eth0.20", "10.1.0.11/24"),
        ]
    );
    assert_eq!(link(&h.snapshot(), "eth0").mtu, 9000);
}

#[test]
fn a_network_may_use_another_networks_bridge_as_its_device() {
    let mut cl = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    cl.bridge = Some("br0".into());
    let up = with_addrs(net("br0"), &["10.9.0.11/24"]);
    let d = HostNetworks {
        cluster: Some(cl),
        storage: None,
        upstream: Some(up),
    };
    let (_, h) = converge(&d, host());
    assert_eq!(
        addrs(&h.snapshot(), "br0"),
        ["10.0.0.11/24", "10.9.0.11/24"]
    );
}

// ---- conflicts: blocked networks change nothing, others go ahead ----

fn blocked(actions: &[Action]) -> Vec<(&str, &str)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Blocked { network, link, .. } => Some((network.as_str(), link.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn missing_device_blocks_only_its_network() {
    let d = HostNetworks {
        cluster: Some(with_addrs(net("eth0"), &["10.0.0.11/24"])),
        storage: Some(with_addrs(net("eth9"), &["10.1.0.11/24"])),
        upstream: None,
    };
    let actions = plan(&d, &host());
    assert_eq!(blocked(&actions), [("storage", "eth9")]);
    assert!(matches!(actions.last(), Some(Action::Blocked { .. })));
    assert_eq!(
        &actions[..2],
        &[
            a_up("cluster", "eth0"),
            a_add("cluster", "eth0", "10.0.0.11/24")
        ]
    );
    // The executor applies everything before the blocked one, then reports it.
    let h = MemoryHost::new(host());
    let e = block_on(apply(&h, &actions)).expect_err("blocked");
    assert!(
        matches!(&e, NetconfError::Blocked { network, link, .. } if network == "storage" && link == "eth9"),
        "{e}"
    );
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert_eq!(addrs(&h.snapshot(), "eth0"), ["10.0.0.11/24"]);
}

#[test]
fn two_bridges_on_one_device_block_the_second() {
    let mut cl = net("eth0");
    cl.bridge = Some("br0".into());
    let mut st = net("eth0");
    st.bridge = Some("br1".into());
    let d = HostNetworks {
        cluster: Some(cl),
        storage: Some(st),
        upstream: None,
    };
    let actions = plan(&d, &host());
    assert_eq!(blocked(&actions), [("storage", "eth0")]);
    assert!(!actions
        .iter()
        .any(|a| a.link() == "br1" && !matches!(a, Action::Blocked { .. })));
}

#[test]
fn addresses_on_a_bridge_port_are_refused() {
    let mut cl = net("eth0");
    cl.bridge = Some("br0".into());
    let st = with_addrs(net("eth0"), &["10.1.0.11/24"]);
    let d = HostNetworks {
        cluster: Some(cl),
        storage: Some(st),
        upstream: None,
    };
    let actions = plan(&d, &host());
    assert_eq!(blocked(&actions), [("storage", "eth0")]);
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::AddAddress { .. })));
}

#[test]
fn vlan_and_bridge_of_the_same_name_conflict() {
    let mut cl = net("eth0");
    cl.bridge = Some("eth1.5".into());
    let mut st = net("eth1");
    st.vlan = Some(5);
    let d = HostNetworks {
        cluster: Some(cl),
        storage: Some(st),
        upstream: None,
    };
    assert_eq!(blocked(&plan(&d, &host())), [("storage", "eth1.5")]);
}

#[test]
fn existing_link_of_another_kind_blocks() {
    let mut n = net("eth0");
    n.bridge = Some("eth1".into());
    assert_eq!(blocked(&plan(&cluster(n), &host())), [("cluster", "eth1")]);

    let mut o = host();
    let mut v = LinkState::new(9, "eth0.10", Some("vlan"), 1500);
    v.vlan = Some(VlanInfo {
        id: 11,
        parent: Some("eth0".into()),
    });
    o.links.insert(v.name.clone(), v);
    let mut n = net("eth0");
    n.vlan = Some(10);
    assert_eq!(blocked(&plan(&cluster(n), &o)), [("cluster", "eth0.10")]);
}

#[test]
fn bad_names_and_values_block_before_any_action() {
    let mut n = net("enp0s31f6abcdef"); // 15 chars: fine as a device…
    n.vlan = Some(100); // …but "enp0s31f6abcdef.100" is too long.
    let mut o = host();
    o.links.insert(n.device.clone(), phys(7, "enp0s31f6abcdef"));
    let actions = plan(&cluster(n), &o);
    assert_eq!(actions.len(), 1);
    assert_eq!(blocked(&actions), [("cluster", "enp0s31f6abcdef.100")]);

    let mut n = net("eth0");
    n.bridge = Some("a/b".into());
    assert_eq!(blocked(&plan(&cluster(n), &host())), [("cluster", "a/b")]);

    let mut n = net("eth0");
    n.bridge = Some("eth0".into());
    assert_eq!(blocked(&plan(&cluster(n), &host())), [("cluster", "eth0")]);

    let n = with_addrs(net("eth0"), &["10.0.0.300/24"]);
    assert_eq!(plan(&cluster(n), &host()).len(), 1);
    let mut n = net("eth0");
    n.vlan = Some(0);
    assert_eq!(plan(&cluster(n), &host()).len(), 1);
}

// ---- drift ----

fn bridged() -> HostNetworks {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24", "fd00::11/64"]);
    n.bridge = Some("brc".into());
    n.mtu = Some(9000);
    n.gateway = Some("10.0.0.1".into());
    cluster(n)
}

#[test]
fn drift_address_removed() {
    let d = bridged();
    let (_, h) = converge(&d, host());
    h.modify(|o| {
        if let Some(l) = o.links.get_mut("brc") {
            l.addresses.retain(|a| a.cidr != cidr("fd00::11/64"));
        }
    });
    let (actions, _) = converge(&d, h.snapshot());
    assert_eq!(actions, vec![a_add("cluster", "brc", "fd00::11/64")]);
}

#[test]
fn drift_mtu_changed() {
    let d = bridged();
    let (_, h) = converge(&d, host());
    h.modify(|o| {
        if let Some(l) = o.links.get_mut("eth0") {
            l.mtu = 1500;
        }
    });
    let (actions, _) = converge(&d, h.snapshot());
    assert_eq!(actions, vec![a_mtu("cluster", "eth0", 9000)]);
}

#[test]
fn drift_bridge_deleted() {
    let d = bridged();
    let (_, h) = converge(&d, host());
    block_on(h.delete_link("brc")).expect("delete");
    let (actions, _) = converge(&d, h.snapshot());
    assert_eq!(
        actions,
        vec![
            a_bridge("cluster", "brc"),
            a_master("cluster", "eth0", "brc"),
            a_mtu("cluster", "brc", 9000),
            a_up("cluster", "brc"),
            a_add("cluster", "brc", "10.0.0.11/24"),
            a_add("cluster", "brc", "fd00::11/64"),
            a_route("cluster", "brc", "10.0.0.1"),
        ]
    );
}

#[test]
fn drift_link_down() {
    let d = bridged();
    let (_, h) = converge(&d, host());
    h.modify(|o| {
        if let Some(l) = o.links.get_mut("brc") {
            l.up = false;
        }
    });
    let (actions, _) = converge(&d, h.snapshot());
    assert_eq!(actions, vec![a_up("cluster", "brc")]);
}

#[test]
fn drift_default_route_changed() {
    let d = bridged();
    let (_, h) = converge(&d, host());
    h.modify(|o| {
        o.default_routes = vec![DefaultRoute {
            ipv6: false,
            gateway: Some("10.0.0.254".parse().expect("ip")),
            link: Some("brc".into()),
            metric: 0,
        }]
    });
    let actions = plan(&d, &h.snapshot());
    assert_eq!(actions, vec![a_route("cluster", "brc", "10.0.0.1")]);
    let changes = block_on(apply(&h, &actions)).expect("apply");
    assert_eq!(
        changes,
        vec![Change {
            network: "cluster".into(),
            link: "brc".into(),
            what: "default-route",
            from: "default via 10.0.0.254 dev brc metric 0".into(),
            to: "default via 10.0.0.1 dev brc".into(),
        }]
    );
}

#[test]
fn executor_reports_what_was_and_what_is() {
    let d = bridged();
    let actions = plan(&d, &host());
    let h = MemoryHost::new(host());
    let changes = block_on(apply(&h, &actions)).expect("apply");
    let got: Vec<(&str, &str, String, String)> = changes
        .iter()
        .map(|c| (c.what, c.link.as_str(), c.from.clone(), c.to.clone()))
        .collect();
    let w = |what, link, from: &str, to: &str| (what, link, from.to_owned(), to.to_owned());
    assert_eq!(
        got,
        vec![
            w("link", "brc", "absent", "bridge"),
            w("mtu", "eth0", "1500", "9000"),
            w("master", "eth0", "none", "brc"),
            w("mtu", "brc", "1500", "9000"),
            w("state", "eth0", "down", "up"),
            w("state", "brc", "down", "up"),
            w("address", "brc", "absent", "10.0.0.11/24"),
            w("address", "brc", "absent", "fd00::11/64"),
            w(
                "default-route",
                "brc",
                "none",
                "default via 10.0.0.1 dev brc"
            ),
        ]
    );
    assert!(changes.iter().all(|c| c.network == "cluster"));
    // A plan made stale by the host (already done) produces no changes.
    assert!(block_on(apply(&h, &actions)).expect("apply").is_empty());
}

// ---- ownership ----

fn with_addr(mut o: Observed, link: &str, a: &str, owner: AddrOwner) -> Observed {
    if let Some(l) = o.links.get_mut(link) {
        l.addresses.push(AddrState {
            cidr: cidr(a),
            owner,
        });
        l.up = true;
    }
    o
}

#[test]
fn only_our_stale_addresses_are_removed() {
    let o = with_addr(host(), "eth0", "10.0.0.11/24", AddrOwner::Node);
    let o = with_addr(o, "eth0", "10.0.0.12/24", AddrOwner::Node);
    let o = with_addr(o, "eth0", "10.0.0.99/24", AddrOwner::Foreign);
    let o = with_addr(o, "eth0", "fe80::1/64", AddrOwner::Foreign);
    let o = with_addr(o, "eth1", "10.7.0.1/24", AddrOwner::Node); // no network uses eth1
    let d = cluster(with_addrs(net("eth0"), &["10.0.0.11/24"]));
    let (actions, h) = converge(&d, o);
    assert_eq!(
        actions,
        vec![
            a_rm("cluster", "eth0", "10.0.0.12/24"),
            a_rm("stale", "eth1", "10.7.0.1/24"),
        ]
    );
    assert_eq!(
        addrs(&h.snapshot(), "eth0"),
        ["10.0.0.11/24", "10.0.0.99/24", "fe80::1/64"]
    );
}

#[test]
fn addresses_move_to_a_new_bridge() {
    let d = cluster(with_addrs(net("eth0"), &["10.0.0.11/24"]));
    let (_, h) = converge(&d, host());
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.bridge = Some("brc".into());
    let (actions, h) = converge(&cluster(n), h.snapshot());
    assert_eq!(
        actions,
        vec![
            a_bridge("cluster", "brc"),
            a_master("cluster", "eth0", "brc"),
            a_up("cluster", "brc"),
            a_add("cluster", "brc", "10.0.0.11/24"),
            a_rm("cluster", "eth0", "10.0.0.11/24"),
        ]
    );
    assert!(addrs(&h.snapshot(), "eth0").is_empty());
}

#[test]
fn a_blocked_network_keeps_its_addresses() {
    let o = with_addr(host(), "eth0", "10.0.0.11/24", AddrOwner::Node);
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.bridge = Some("eth1".into()); // not a bridge: blocked
    let actions = plan(&cluster(n), &o);
    assert_eq!(actions.len(), 1, "{actions:#?}");
    assert_eq!(blocked(&actions), [("cluster", "eth1")]);
}

#[test]
fn floating_addresses_are_not_planned_but_stale_ones_go() {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.floating = Some("10.0.0.100/24".into());
    let d = cluster(n.clone());
    // Not primary: nothing about the floating address.
    let (actions, _) = converge(&d, host());
    assert!(!actions.iter().any(|a| a.to_string().contains("10.0.0.100")));
    // Primary: held floating address stays.
    let o = with_addr(host(), "eth0", "10.0.0.100/24", AddrOwner::Floating);
    let actions = plan(&d, &o);
    assert!(!actions.iter().any(|a| a.to_string().contains("10.0.0.100")));
    // Config changed to another floating address / another link: the old one goes.
    let o = with_addr(o, "eth1", "10.0.0.101/24", AddrOwner::Floating);
    let mut n2 = n.clone();
    n2.floating = Some("10.0.0.200/24".into());
    let actions = plan(&cluster(n2), &o);
    let rms: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::RemoveAddress { .. }))
        .collect();
    assert_eq!(
        rms,
        [
            &a_rm("cluster", "eth0", "10.0.0.100/24"),
            &a_rm("stale", "eth1", "10.0.0.101/24"),
        ]
    );
}

#[test]
fn a_client_network_gateway_is_never_the_host_planners() {
    // The primary's gateway of client network 400 on its bridge, and the same mark on a
    // link the host networks use: neither is planned away, primary or not.
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.floating = Some("10.0.0.100/24".into());
    let mut o = host().with_link(LinkState::new(9, "dvbr400", Some("bridge"), 1450));
    o = with_addr(o, "eth0", "10.0.0.11/24", AddrOwner::Node);
    o = with_addr(o, "dvbr400", "10.4.0.1/24", AddrOwner::Gateway);
    o = with_addr(o, "eth0", "10.9.0.1/24", AddrOwner::Gateway);
    let actions = plan(&cluster(n), &o);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RemoveAddress { .. })),
        "{actions:#?}"
    );
    // The same address marked floating (not the configured one) would go: the mark decides.
    let o = with_addr(host(), "eth1", "10.4.0.1/24", AddrOwner::Floating);
    let actions = plan(&cluster(with_addrs(net("eth0"), &[])), &o);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::RemoveAddress { .. }))
            .collect::<Vec<_>>(),
        [&a_rm("stale", "eth1", "10.4.0.1/24")]
    );
}

#[test]
fn take_and_release_floating() {
    let mut n = with_addrs(net("eth0"), &["10.0.0.11/24"]);
    n.bridge = Some("brc".into());
    n.floating = Some("10.0.0.100/24".into());
    let (_, h) = converge(&cluster(n.clone()), host());

    let c = block_on(take_floating(&h, "cluster", &n)).expect("take");
    assert_eq!(
        c,
        Some(Change {
            network: "cluster".into(),
            link: "brc".into(),
            what: "floating",
            from: "absent".into(),
            to: "10.0.0.100/24".into(),
        })
    );
    assert_eq!(h.announced(), [("brc".to_owned(), cidr("10.0.0.100/24"))]);
    assert_eq!(
        block_on(take_floating(&h, "cluster", &n)).expect("take"),
        None
    );
    assert_eq!(h.announced().len(), 1, "no re-announce when already held");
    // The planner leaves a held floating address alone.
    assert!(plan(&cluster(n.clone()), &h.snapshot()).is_empty());

    let c = block_on(release_floating(&h, "cluster", &n)).expect("release");
    assert_eq!(
        c.map(|c| (c.from, c.to)),
        Some(("10.0.0.100/24".into(), "absent".into()))
    );
    assert_eq!(
        block_on(release_floating(&h, "cluster", &n)).expect("release"),
        None
    );
    assert_eq!(addrs(&h.snapshot(), "brc"), ["10.0.0.11/24"]);

    // An identical address an operator put there is not ours to release.
    h.modify(|o| {
        if let Some(l) = o.links.get_mut("brc") {
            l.addresses.push(AddrState {
                cidr: cidr("10.0.0.100/24"),
                owner: AddrOwner::Foreign,
            });
        }
    });
    assert_eq!(
        block_on(release_floating(&h, "cluster", &n)).expect("release"),
        None
    );
    assert!(addrs(&h.snapshot(), "brc").contains(&"10.0.0.100/24".to_owned()));

    // No floating address configured: nothing to do.
    assert_eq!(
        block_on(take_floating(&h, "cluster", &net("eth0"))).expect("take"),
        None
    );
}

#[test]
fn unsupported_vlan_kind_is_reported_as_such() {
    let mut n = net("eth0");
    n.vlan = Some(10);
    let h = MemoryHost::new(host()).without_kind("vlan");
    let e = block_on(crate::ensure(&h, &cluster(n))).expect_err("no 8021q");
    assert!(e.is_unsupported(), "{e}");
    assert!(e.to_string().contains("eth0.10"), "{e}");
}

#[test]
fn empty_config_plans_nothing() {
    assert!(plan(&HostNetworks::default(), &host()).is_empty());
}

#[test]
fn helpers() {
    let mut n = net("eth0");
    assert_eq!(top_link(&n), "eth0");
    n.vlan = Some(7);
    assert_eq!(top_link(&n), "eth0.7");
    n.bridge = Some("br7".into());
    assert_eq!(top_link(&n), "br7");
    assert_eq!(vlan_name("eth0", 7), "eth0.7");
}
