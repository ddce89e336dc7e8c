use super::*;
use crate::config::FirewallAllow;
use serde_json::{json, Value};

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn small_config() -> FirewallConfig {
    FirewallConfig {
        enabled: true,
        extra_allow: vec![FirewallAllow {
            proto: Proto::Udp,
            port: "6800-7300".parse().unwrap(),
            source: Some("192.0.2.0/25".into()),
            comment: Some("ceph".into()),
        }],
        ..Default::default()
    }
}

fn small_network() -> NetworkRules {
    NetworkRules {
        vni: 100,
        bridge: "vmbr100".into(),
        acls_in: vec![
            Acl {
                order: 20,
                action: AclAction::Accept,
                proto: Some(AclProto::Tcp),
                source: None,
                dest: Some(cidr("10.100.0.0/24")),
                ports: vec![PortRange::single(443), PortRange::single(80)],
                description: Some("web".into()),
            },
            Acl {
                order: 9,
                action: AclAction::Reject,
                proto: Some(AclProto::Tcp),
                source: Some(cidr("10.9.0.0/16")),
                dest: None,
                ports: vec![],
                description: None,
            },
        ],
        acls_out: vec![],
        default_in: AclAction::Drop,
        default_out: AclAction::Accept,
        dhcp_dns: false,
    }
}

/// A ruleset with one network and a few ACLs (also used by the drift tests of `observe`).
pub(crate) fn small_ruleset() -> Ruleset {
    Ruleset::from_config(
        &small_config(),
        &[cidr("192.0.2.0/24"), cidr("192.0.2.128/25")],
        &[small_network()],
    )
    .unwrap()
}

/// The whole rendered batch (comment ids included: they must stay stable across releases, or an
/// upgrade re-applies every node's table), compared with a golden file reviewed against
/// `nft list`. On a mismatch the actual rendering is written next to it.
#[test]
fn golden_json_for_a_small_ruleset() {
    let batch: Value = serde_json::from_str(&small_ruleset().to_json().unwrap()).unwrap();
    let mut actual = serde_json::to_string_pretty(&batch).unwrap();
    actual.push('\n');
    let golden = include_str!("../../testdata/small_ruleset.json");
    if actual != golden {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/small_ruleset.json.actual"
        );
        let _ = std::fs::write(path, &actual);
        panic!(
            "rendered batch differs from testdata/small_ruleset.json (actual written to {path})"
        );
    }
}

#[test]
fn batch_replaces_only_our_table() {
    let batch: Value = serde_json::from_str(&small_ruleset().to_json().unwrap()).unwrap();
    let cmds = batch["nftables"].as_array().unwrap();
    let table = json!({"table": {"family": "inet", "name": "debvisor"}});
    assert_eq!(cmds[0], json!({ "add": table }));
    assert_eq!(cmds[1], json!({ "delete": table }));
    assert_eq!(cmds[2], json!({ "add": table }));
    for c in cmds {
        let text = c.to_string();
        assert!(!text.contains("\"flush\""), "{text}");
        assert!(!text.contains("ruleset"), "{text}");
        let obj = c["add"].as_object().or(c["delete"].as_object()).unwrap();
        let body = obj.values().next().unwrap();
        assert_eq!(body["family"], "inet");
        let table = body.get("table").unwrap_or(&body["name"]);
        assert_eq!(table, "debvisor");
    }
    // Chains come before rules (rules may jump to any chain).
    let first_rule = cmds
        .iter()
        .position(|c| c["add"].get("rule").is_some())
        .unwrap();
    assert!(cmds[first_rule..]
        .iter()
        .all(|c| c["add"].get("rule").is_some()));
}

#[test]
fn removal_batch_is_add_then_delete_table() {
    let v = serde_json::to_value(removal_batch()).unwrap();
    assert_eq!(
        v,
        json!({"nftables": [
            {"add": {"table": {"family": "inet", "name": "debvisor"}}},
            {"delete": {"table": {"family": "inet", "name": "debvisor"}}},
        ]})
    );
}

fn descriptions(r: &Ruleset, chain: &str) -> Vec<String> {
    r.chain(chain)
        .unwrap()
        .rules()
        .iter()
        .map(|r| r.description().to_owned())
        .collect()
}

#[test]
fn input_chain_shape() {
    let r = small_ruleset();
    let input = r.chain("input").unwrap();
    assert_eq!(
        input.base_chain(),
        Some(&BaseChain {
            hook: Hook::Input,
            priority: 0,
            policy: Policy::Drop
        })
    );
    let d = descriptions(&r, "input");
    let want_prefix = [
        "loopback",
        "established and related",
        "invalid state",
        "icmp and icmpv6 (neighbour discovery)",
        "ssh",
        "etcd client from cluster (ipv4)",
        "etcd peer from cluster (ipv4)",
        "libvirt tls from cluster (ipv4)",
        "libvirt migration from cluster (ipv4)",
        "ceph",
        "log dropped",
        "drop the rest",
    ];
    assert_eq!(d, want_prefix);
    // The contained /25 was folded into the /24: a single prefix, not a set.
    let etcd = serde_json::to_value(input.rules()[5].expr()).unwrap();
    assert_eq!(
        etcd[0]["match"]["right"],
        json!({"prefix": {"addr": "192.0.2.0", "len": 24}})
    );
    assert_eq!(
        r.chain("output").unwrap().base_chain().unwrap().policy,
        Policy::Accept
    );
}

#[test]
fn rpc_and_ipv6_cluster_rules() {
    let cfg = FirewallConfig {
        rpc_enabled: true,
        ..Default::default()
    };
    let r = Ruleset::from_config(
        &cfg,
        &[
            cidr("2001:db8::/64"),
            cidr("10.0.0.0/8"),
            cidr("2001:db8:1::/64"),
        ],
        &[],
    )
    .unwrap();
    let d = descriptions(&r, "input");
    assert!(
        d.contains(&"debvisor rpc from cluster (ipv4)".to_owned()),
        "{d:?}"
    );
    assert!(
        d.contains(&"debvisor rpc from cluster (ipv6)".to_owned()),
        "{d:?}"
    );
    let rule = r
        .chain("input")
        .unwrap()
        .rules()
        .iter()
        .find(|x| x.description() == "etcd peer from cluster (ipv6)")
        .unwrap();
    let v = serde_json::to_value(rule.expr()).unwrap();
    assert_eq!(
        v[0]["match"]["left"],
        json!({"payload": {"protocol": "ip6", "field": "saddr"}})
    );
    assert_eq!(
        v[0]["match"]["right"],
        json!({"set": [
            {"prefix": {"addr": "2001:db8::", "len": 64}},
            {"prefix": {"addr": "2001:db8:1::", "len": 64}},
        ]})
    );
    assert_eq!(v[1]["match"]["right"], json!(2380));
    // No networks: forward has only the conntrack rules, and no net chains exist.
    assert_eq!(r.chains().len(), 3);
    assert_eq!(
        descriptions(&r, "forward"),
        ["established and related", "invalid state"]
    );
    // Standalone node: no cluster rules at all.
    let r = Ruleset::from_config(&FirewallConfig::default(), &[], &[]).unwrap();
    assert!(!descriptions(&r, "input")
        .iter()
        .any(|d| d.contains("cluster")));
}

#[test]
fn acls_are_in_numeric_order_with_default_last() {
    let r = small_ruleset();
    assert_eq!(
        descriptions(&r, "net100-in"),
        ["acl 9", "acl 20: web", "default drop"]
    );
    assert_eq!(descriptions(&r, "net100-out"), ["default accept"]);
    let chain = r.chain("net100-in").unwrap();
    let acl9 = serde_json::to_value(chain.rules()[0].expr()).unwrap();
    assert_eq!(
        acl9,
        json!([
            {"match": {"left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.9.0.0", "len": 16}}, "op": "=="}},
            {"match": {"left": {"meta": {"key": "l4proto"}}, "right": "tcp", "op": "=="}},
            {"counter": null},
            {"reject": {"type": "tcp reset"}},
        ])
    );
    // Ports were sorted; accept is `return` (the forward chain accepts after all ACLs pass).
    let acl20 = serde_json::to_value(chain.rules()[1].expr()).unwrap();
    assert_eq!(acl20[1]["match"]["right"], json!({"set": [80, 443]}));
    assert_eq!(acl20[3], json!({"return": null}));
    // Forward dispatches through verdict maps.
    let fwd = r.chain("forward").unwrap();
    let vmap = serde_json::to_value(fwd.rules()[2].expr()).unwrap();
    assert_eq!(
        vmap,
        json!([{"vmap": {"key": {"meta": {"key": "iifname"}},
                         "data": {"set": [["vmbr100", {"jump": {"target": "net100-out"}}]]}}}])
    );
}

#[test]
fn ports_and_cidrs_are_merged() {
    assert_eq!(
        merge_ports(&[
            "10-20".parse().unwrap(),
            PortRange::single(21),
            PortRange::single(5),
            "15-16".parse().unwrap()
        ]),
        vec![PortRange::single(5), "10-21".parse().unwrap()]
    );
    assert_eq!(
        normalize_cidrs(&[
            cidr("10.1.0.0/16"),
            cidr("10.0.0.0/8"),
            cidr("10.0.0.0/8"),
            cidr("fd00::/8")
        ]),
        vec![cidr("10.0.0.0/8"), cidr("fd00::/8")]
    );
}

#[test]
fn zero_prefix_means_the_whole_family() {
    let r = Ruleset::from_config(&FirewallConfig::default(), &[cidr("0.0.0.0/0")], &[]).unwrap();
    let rule = &r.chain("input").unwrap().rules()[5];
    let v = serde_json::to_value(rule.expr()).unwrap();
    assert_eq!(
        v[0],
        json!({"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}})
    );
}

fn problems(err: FirewallError) -> Vec<String> {
    match err {
        FirewallError::Invalid(p) => p.into_iter().map(|p| p.path).collect(),
        other => panic!("not a validation error: {other}"),
    }
}

#[test]
fn validation_errors_name_the_field() {
    let mut bad = small_network();
    bad.bridge = "a-very-long-bridge-name".into();
    bad.acls_in[0].order = 9; // duplicate of acls_in[1]
    bad.acls_in[1].ports = vec![PortRange::single(22)];
    bad.acls_in[1].proto = Some(AclProto::Icmp);
    bad.acls_in[0].source = Some(cidr("fd00::/64")); // dest is IPv4
    bad.acls_in[0].description = Some("say \"hi\"".into());
    let mut dup = small_network();
    dup.bridge = "br*".into();
    let cfg = FirewallConfig {
        log_rate: "fast".into(),
        ..Default::default()
    };
    let err = Ruleset::from_config(&cfg, &[], &[bad, dup]).unwrap_err();
    let msg = err.to_string();
    let p = problems(err);
    for want in [
        "firewall.log_rate",
        "networks[0].bridge",
        "networks[0].acls_in[1].order",
        "networks[0].acls_in[1].ports",
        "networks[0].acls_in[0]",
        "networks[0].acls_in[0].description",
        "networks[1].vni",
        "networks[1].bridge",
    ] {
        assert!(p.contains(&want.to_owned()), "{want} not in {p:?}");
    }
    assert!(msg.contains("1 to 15 bytes"), "{msg}");
}

#[test]
fn interface_names() {
    for ok in ["lo", "vmbr100", "br-0.12", "abcdefghijklmno"] {
        assert!(check_ifname(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "abcdefghijklmnop",
        "a/b",
        "a b",
        "a:1",
        "br*",
        ".",
        "..",
        "a\"b",
    ] {
        assert!(check_ifname(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn custom_rules_go_to_existing_chains_only() {
    let mut r = small_ruleset();
    let n = r.rule_count();
    r.add_custom_rule("input", "custom", vec![Statement::Accept(None)])
        .unwrap();
    assert_eq!(r.rule_count(), n + 1);
    assert_eq!(
        r.chain("input")
            .unwrap()
            .rules()
            .last()
            .unwrap()
            .description(),
        "custom"
    );
    assert!(matches!(
        r.add_custom_rule("nope", "x", vec![Statement::Accept(None)]),
        Err(FirewallError::Invalid(_))
    ));
    assert!(r.add_custom_rule("input", "x", vec![]).is_err());
}

#[test]
fn ids_are_stable_and_content_addressed() {
    let a = small_ruleset();
    let b = small_ruleset();
    assert_eq!(a, b);
    let ids = |r: &Ruleset| -> Vec<String> {
        r.chains()
            .iter()
            .flat_map(|c| c.rules().iter().map(|r| r.id().to_owned()))
            .collect()
    };
    // A changed port changes exactly the affected rule's id.
    let cfg = FirewallConfig {
        ssh_port: 2222,
        ..small_config()
    };
    let c = Ruleset::from_config(&cfg, &[cidr("192.0.2.0/24")], &[small_network()]).unwrap();
    let changed: Vec<_> = ids(&a)
        .into_iter()
        .zip(ids(&c))
        .filter(|(x, y)| x != y)
        .collect();
    assert_eq!(changed.len(), 1);
    let rule = &a.chain("input").unwrap().rules()[4];
    assert_eq!(parse_comment(&rule.comment()), Some(("ssh", rule.id())));
    assert_eq!(parse_comment("ssh #xyz"), None);
    assert_eq!(parse_comment("someone's rule"), None);
}

#[test]
fn managed_networks_reach_dhcp_and_dns() {
    let mut net = small_network();
    net.dhcp_dns = true;
    let r = Ruleset::from_config(&FirewallConfig::default(), &[], &[net]).unwrap();
    let input = r.chain("input").unwrap();
    let udp = input
        .rules()
        .iter()
        .find(|x| x.description() == "net100 dhcp and dns (udp)")
        .unwrap();
    assert_eq!(
        serde_json::to_value(udp.expr()).unwrap(),
        json!([
            {"match": {"left": {"meta": {"key": "iifname"}}, "right": "vmbr100", "op": "=="}},
            {"match": {"left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": {"set": [53, 67, 547]}, "op": "=="}},
            {"accept": null},
        ])
    );
    // Before the log-and-drop tail.
    let d = descriptions(&r, "input");
    let pos = |s: &str| d.iter().position(|x| x == s).unwrap();
    assert!(pos("net100 dns (tcp)") < pos("log dropped"));
}

#[test]
fn network_rules_deserialize_from_json() {
    let n: NetworkRules = serde_json::from_value(json!({
        "vni": 7,
        "bridge": "vmbr7",
        "acls_in": [{"order": 2, "action": "reject", "proto": "tcp", "source": "10.0.0.5/8",
                     "ports": [22, "8000-8100"], "description": "ssh and web"}],
        "default_in": "drop",
        "dhcp_dns": true
    }))
    .unwrap();
    assert_eq!(n.acls_in[0].source, Some(cidr("10.0.0.0/8")));
    assert_eq!(n.acls_in[0].ports[1], "8000-8100".parse().unwrap());
    assert_eq!(n.default_out, AclAction::Accept);
    assert!(
        serde_json::from_value::<NetworkRules>(json!({"vni": 1, "bridge": "b", "bogus": 1}))
            .is_err()
    );
    assert!(serde_json::from_value::<Acl>(
        json!({"order": 1, "action": "accept", "source": "10.0.0.0/99"})
    )
    .is_err());
}
