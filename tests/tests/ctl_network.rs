//! `debvisorctl network …` against a real etcd: the real binary, the keys it writes, what it
//! refuses (with the field named and nothing written), and what it prints.

use debvisor_tests::CtlCluster as Cluster;
use etcd_client::Client;
use serde_json::Value;

const PREFIX: &str = "/debvisor/networks/";

async fn get_json(c: &mut Client, key: &str) -> Option<Value> {
    let r = c.get(format!("{PREFIX}{key}"), None).await.expect("get");
    r.kvs()
        .first()
        .map(|kv| serde_json::from_slice(kv.value()).expect("stored JSON"))
}

async fn put(c: &mut Client, key: &str, value: &str) {
    c.put(format!("{PREFIX}{key}"), value, None)
        .await
        .expect("put");
}

async fn count(c: &mut Client, prefix: &str) -> usize {
    let r = c
        .get(
            format!("{PREFIX}{prefix}"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("count");
    r.count() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_list_show_set_remove_round_trip() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    let added = cl.json(&[
        "network",
        "add",
        "100",
        "--type",
        "managed",
        "--description",
        "tenant a",
        "--mtu",
        "1450",
        "--domain",
        "a.example",
        "--name-server",
        "10.1.0.1",
        "--name-server",
        "9.9.9.9",
        "--ipv4",
        "10.1.0.0/24",
        "--gateway4",
        "10.1.0.1",
        "--ipv6",
        "fd00:1::/64",
        "--gateway6",
        "fd00:1::1",
        "--dhcp4",
        "--dhcp4-start",
        "10.1.0.100",
        "--dhcp4-end",
        "10.1.0.199",
    ]);
    assert_eq!(added["vni"], 100);
    let spec = get_json(&mut c, "100/spec").await.expect("spec written");
    assert_eq!(spec, added["spec"]);
    assert_eq!(spec["type"], "managed");
    assert_eq!(spec["description"], "tenant a");
    assert_eq!(spec["mtu"], 1450);
    assert_eq!(spec["domain"], "a.example");
    assert_eq!(
        spec["name_servers"],
        serde_json::json!(["10.1.0.1", "9.9.9.9"])
    );
    assert_eq!(spec["ipv4"]["network"], "10.1.0.0/24");
    assert_eq!(spec["ipv4"]["gateway"], "10.1.0.1");
    assert_eq!(spec["ipv6"]["gateway"], "fd00:1::1");
    assert_eq!(spec["dhcp4"]["enabled"], true);
    assert_eq!(spec["dhcp4"]["start"], "10.1.0.100");
    assert_eq!(spec["dhcp4"]["end"], "10.1.0.199");

    // Table mode prints a confirmation.
    let text = cl.ok(&[
        "network",
        "add",
        "7",
        "--type",
        "bridged",
        "--ipv4",
        "10.7.0.0/24",
    ]);
    assert!(text.contains("network 7 added"), "{text}");

    // Node reports (written by nodes in real life).
    put(
        &mut c,
        "100/status/n1",
        r#"{"state":"ready","bridge":"vmbr100"}"#,
    )
    .await;
    put(
        &mut c,
        "100/status/n2",
        r#"{"state":"ready","bridge":"vmbr100"}"#,
    )
    .await;
    put(
        &mut c,
        "7/status/n1",
        r#"{"state":"error","error":"link: no VLAN support"}"#,
    )
    .await;
    put(&mut c, "7/status/n2", r#"{"state":"ready"}"#).await;

    let list = cl.json(&["network", "list"]);
    let arr = list.as_array().expect("array");
    assert_eq!(
        arr.iter().map(|n| n["vni"].clone()).collect::<Vec<_>>(),
        vec![Value::from(7), Value::from(100)],
        "numeric order: {list}"
    );
    assert_eq!(arr[1]["status_summary"], "2/2 ready");
    assert_eq!(
        arr[0]["status_summary"],
        "error on n1: link: no VLAN support"
    );
    assert_eq!(arr[1]["valid"], true);
    let table = cl.ok(&["network", "list"]);
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    for col in [
        "VNI",
        "TYPE",
        "IPV4",
        "IPV6",
        "DHCP",
        "MTU",
        "STATUS",
        "DESCRIPTION",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row7 = lines.next().expect("row 7");
    assert!(
        row7.starts_with("7 ") && row7.contains("bridged") && row7.contains("error on n1"),
        "{table}"
    );
    let row100 = lines.next().expect("row 100");
    assert!(
        row100.starts_with("100")
            && row100.contains("10.1.0.0/24")
            && row100.contains("fd00:1::/64")
            && row100.contains("10.1.0.100-10.1.0.199")
            && row100.contains("1450")
            && row100.contains("2/2 ready")
            && row100.contains("tenant a"),
        "{table}"
    );

    let show = cl.json(&["network", "show", "100"]);
    assert_eq!(show["spec"], spec);
    assert_eq!(show["status"]["n1"]["bridge"], "vmbr100");
    assert_eq!(show["valid"], true);
    let show_text = cl.ok(&["network", "show", "100"]);
    for needle in [
        "network 100",
        "managed",
        "10.1.0.0/24 gateway 10.1.0.1",
        "a.example",
        "2/2 ready",
        "reservations:",
        "acl:",
        "leases:",
    ] {
        assert!(show_text.contains(needle), "{needle:?} in {show_text}");
    }

    // set: read-modify-write of the spec.
    let set = cl.json(&[
        "network",
        "set",
        "100",
        "--mtu",
        "1400",
        "--no-dhcp4",
        "--unset",
        "domain",
        "--description",
        "tenant b",
    ]);
    let spec2 = get_json(&mut c, "100/spec").await.expect("spec");
    assert_eq!(set["spec"], spec2);
    assert_eq!(spec2["mtu"], 1400);
    assert_eq!(spec2["dhcp4"]["enabled"], false);
    assert_eq!(spec2["dhcp4"]["start"], "10.1.0.100", "range kept");
    assert!(spec2.get("domain").is_none(), "{spec2}");
    assert_eq!(spec2["description"], "tenant b");
    assert_eq!(spec2["ipv4"], spec["ipv4"], "untouched fields kept");

    // remove: everything under networks/100/ goes, including node reports.
    cl.ok(&[
        "network",
        "dhcp",
        "add",
        "100",
        "52:54:00:00:00:01",
        "10.1.0.50",
    ]);
    put(
        &mut c,
        "100/leases/52:54:00:00:00:01",
        r#"{"ip":"10.1.0.50"}"#,
    )
    .await;
    let removed = cl.json(&["network", "remove", "100"]);
    assert_eq!(removed["keys"]["spec"], 1);
    assert_eq!(removed["keys"]["status"], 2);
    assert_eq!(count(&mut c, "100/").await, 0);
    assert_eq!(count(&mut c, "7/").await, 3, "other networks untouched");
    let list = cl.json(&["network", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    cl.refused(&["network", "remove", "100"], "network 100 not found")
        .await;
    cl.refused(&["network", "show", "100"], "network 100 not found")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_the_field_named_and_nothing_written() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    cl.ok(&[
        "network",
        "add",
        "20",
        "--type",
        "managed",
        "--ipv4",
        "10.20.0.0/16",
        "--gateway4",
        "10.20.0.1",
    ]);
    cl.ok(&[
        "network",
        "dhcp",
        "add",
        "20",
        "52:54:00:00:00:01",
        "10.20.0.50",
    ]);
    cl.ok(&[
        "network", "acl", "add", "20", "in", "--order", "10", "--action", "accept",
    ]);
    let add = |vni: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["network", "add", vni];
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            add("10", &["--type", "managed", "--ipv4", "10.1.0.1/24"]),
            "spec.ipv4.network (--ipv4)",
        ),
        (
            add("10", &["--type", "managed", "--ipv4", "10.1.0.0/33"]),
            "spec.ipv4.network",
        ),
        (
            add(
                "10",
                &[
                    "--type",
                    "managed",
                    "--ipv4",
                    "10.1.0.0/24",
                    "--gateway4",
                    "10.2.0.1",
                ],
            ),
            "spec.ipv4.gateway (--gateway4)",
        ),
        (add("0", &["--type", "managed"]), "vni"),
        (add("16777216", &["--type", "managed"]), "vni"),
        (add("ten", &["--type", "managed"]), "vni"),
        (
            add("5000", &["--type", "bridged"]),
            "a bridged network is a VLAN id",
        ),
        (
            add(
                "10",
                &[
                    "--type",
                    "bridged",
                    "--ipv4",
                    "10.1.0.0/24",
                    "--gateway4",
                    "10.1.0.1",
                ],
            ),
            "spec.type (--type)",
        ),
        (
            add("10", &["--type", "managed", "--ipv4", "10.20.5.0/24"]),
            "overlaps 10.20.0.0/16 of network 20",
        ),
        (
            add("20", &["--type", "managed", "--ipv4", "10.99.0.0/24"]),
            "network 20 already exists",
        ),
        (
            add("10", &["--type", "managed", "--mtu", "100"]),
            "spec.mtu (--mtu)",
        ),
        (
            add("10", &["--type", "managed", "--gateway4", "10.1.0.1"]),
            "--gateway4: needs --ipv4",
        ),
        (
            add(
                "10",
                &[
                    "--type",
                    "managed",
                    "--ipv4",
                    "10.1.0.0/24",
                    "--dhcp4",
                    "--dhcp4-start",
                    "10.1.0.10",
                    "--dhcp4-end",
                    "10.1.0.20",
                ],
            ),
            "spec.dhcp4.enabled (--dhcp4)",
        ),
        (
            add("10", &["--type", "managed", "--name-server", "dns.example"]),
            "spec.name_servers[0] (--name-server)",
        ),
        (
            vec!["network", "dhcp", "add", "20", "zz:zz", "10.20.0.9"],
            "MAC",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "01:00:5e:00:00:01",
                "10.20.0.9",
            ],
            "multicast",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "52:54:00:00:00:02",
                "10.99.0.9",
            ],
            "reservations/52:54:00:00:00:02.ip (IP)",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "52:54:00:00:00:02",
                "10.20.0.1",
            ],
            "gateway",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "52:54:00:00:00:02",
                "10.20.0.50",
            ],
            "10.20.0.50 is already reserved for MAC 52:54:00:00:00:01",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "52:54:00:00:00:02",
                "10.20.0.51",
                "--hostname",
                "web.example",
            ],
            "(--hostname)",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "20",
                "52-54-00-00-00-01",
                "10.20.0.52",
            ],
            "already has a reservation",
        ),
        (
            vec![
                "network",
                "dhcp",
                "add",
                "21",
                "52:54:00:00:00:02",
                "10.20.0.9",
            ],
            "network 21 not found",
        ),
        (
            vec![
                "network", "acl", "add", "20", "in", "--order", "10", "--action", "drop",
            ],
            "already has acl in rule 10",
        ),
        (
            vec![
                "network", "acl", "add", "20", "in", "--order", "11", "--action", "drop", "--port",
                "22",
            ],
            "acl/in/11.port (--port): a port needs proto tcp or udp",
        ),
        (
            vec![
                "network",
                "acl",
                "add",
                "20",
                "out",
                "--order",
                "11",
                "--action",
                "drop",
                "--source",
                "10.0.0.1/8",
            ],
            "acl/out/11.source (--source)",
        ),
        (
            vec!["network", "acl", "remove", "20", "out", "10"],
            "no acl out rule 10",
        ),
        (
            vec!["network", "dhcp", "remove", "20", "52:54:00:00:00:09"],
            "no reservation for 52:54:00:00:00:09",
        ),
        (
            vec![
                "network",
                "set",
                "20",
                "--ipv4",
                "10.30.0.0/24",
                "--gateway4",
                "10.30.0.1",
            ],
            "reservations/52:54:00:00:00:01.ip",
        ),
        (
            vec!["network", "set", "20", "--gateway4", "10.20.0.50"],
            "is the network's gateway",
        ),
        (vec!["network", "set", "20"], "nothing to change"),
        (
            vec!["network", "set", "21", "--mtu", "1500"],
            "network 21 not found",
        ),
        (
            vec!["network", "set", "20", "--mtu", "1500", "--unset", "mtu"],
            "--unset mtu",
        ),
    ];
    for (args, needle) in &cases {
        cl.refused(args, needle).await;
    }
    // A failed set left the spec as it was.
    let spec = get_json(&mut c, "20/spec").await.expect("spec");
    assert_eq!(spec["ipv4"]["network"], "10.20.0.0/16");
    assert_eq!(count(&mut c, "10/").await, 0);

    // Usage errors are clap's: exit 2.
    for args in [
        vec!["network", "add", "10"],
        vec!["network", "add", "10", "--type", "routed"],
        vec![
            "network", "acl", "add", "20", "sideways", "--order", "1", "--action", "drop",
        ],
        vec!["network", "acl", "remove", "20", "in", "ten"],
        vec!["network", "set", "20", "--dhcp4", "--no-dhcp4"],
    ] {
        let out = cl.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_order_is_numeric_and_dhcp_list_shows_leases() {
    let cl = Cluster::start();
    let mut c = cl.client().await;
    cl.ok(&[
        "network",
        "add",
        "30",
        "--type",
        "managed",
        "--ipv4",
        "10.30.0.0/24",
        "--gateway4",
        "10.30.0.1",
        "--dhcp4",
        "--dhcp4-start",
        "10.30.0.100",
        "--dhcp4-end",
        "10.30.0.200",
    ]);
    for (dir, order, extra) in [
        (
            "in",
            "10",
            vec!["--action", "accept", "--proto", "tcp", "--port", "22"],
        ),
        (
            "in",
            "9",
            vec!["--action", "drop", "--source", "192.0.2.0/24"],
        ),
        (
            "in",
            "100",
            vec!["--action", "reject", "--description", "the rest"],
        ),
        (
            "out",
            "5",
            vec!["--action", "accept", "--proto", "udp", "--port", "53-54"],
        ),
    ] {
        let mut args = vec!["network", "acl", "add", "30", dir, "--order", order];
        args.extend(extra);
        cl.ok(&args);
    }
    let rule = get_json(&mut c, "30/acl/in/10").await.expect("acl key");
    assert_eq!(
        rule,
        serde_json::json!({"action":"accept","proto":"tcp","port":"22"})
    );
    let all = cl.json(&["network", "acl", "list", "30"]);
    let orders: Vec<(String, u64)> = all
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["direction"].as_str().unwrap_or_default().to_string(),
                r["order"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        orders,
        vec![
            ("in".into(), 9),
            ("in".into(), 10),
            ("in".into(), 100),
            ("out".into(), 5)
        ]
    );
    let table = cl.ok(&["network", "acl", "list", "30", "in"]);
    let firsts: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(firsts, vec!["9", "10", "100"], "{table}");
    assert!(table.lines().next().is_some_and(|h| h.starts_with("DIR")));
    let show = cl.json(&["network", "show", "30"]);
    assert_eq!(show["acl"]["in"][0]["order"], 9);
    assert_eq!(show["acl"]["out"][0]["port"], "53-54");
    let removed = cl.json(&["network", "acl", "remove", "30", "in", "10"]);
    assert_eq!(removed["order"], 10);
    assert!(get_json(&mut c, "30/acl/in/10").await.is_none());

    // DHCP: a reservation (MAC normalized), and leases written by the primary.
    let r = cl.json(&[
        "network",
        "dhcp",
        "add",
        "30",
        "52-54-00-AA-BB-CC",
        "10.30.0.50",
        "--hostname",
        "web",
    ]);
    assert_eq!(r["mac"], "52:54:00:aa:bb:cc");
    assert_eq!(
        get_json(&mut c, "30/reservations/52:54:00:aa:bb:cc").await,
        Some(serde_json::json!({"ip":"10.30.0.50","hostname":"web"}))
    );
    put(
        &mut c,
        "30/leases/52:54:00:aa:bb:cc",
        r#"{"mac":"52:54:00:aa:bb:cc","ip":"10.30.0.50","hostname":"web","expires":"2030-01-01T00:00:00Z"}"#,
    )
    .await;
    put(
        &mut c,
        "30/leases/52:54:00:00:00:77",
        r#"{"mac":"52:54:00:00:00:77","ip":"10.30.0.101","hostname":"dyn","expires":"2030-01-01T00:00:00Z"}"#,
    )
    .await;
    let list = cl.json(&["network", "dhcp", "list", "30"]);
    assert_eq!(list["reservations"][0]["hostname"], "web");
    let leases = list["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 2);
    let lease = |mac: &str| {
        leases
            .iter()
            .find(|l| l["mac"] == mac)
            .cloned()
            .unwrap_or_else(|| panic!("lease {mac} in {list}"))
    };
    assert_eq!(lease("52:54:00:aa:bb:cc")["reserved"], true);
    assert_eq!(lease("52:54:00:00:00:77")["reserved"], false);
    assert_eq!(lease("52:54:00:00:00:77")["ip"], "10.30.0.101");
    let table = cl.ok(&["network", "dhcp", "list", "30"]);
    assert!(table.contains("RESERVED"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("52:54:00:00:00:77")
            && l.contains("10.30.0.101")
            && l.trim_end().ends_with("no")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.contains("52:54:00:aa:bb:cc")
            && l.contains("2030-01-01T00:00:00Z")
            && l.trim_end().ends_with("yes")),
        "{table}"
    );
    let show = cl.json(&["network", "show", "30"]);
    assert_eq!(show["leases"].as_array().map(Vec::len), Some(2));
    cl.ok(&["network", "dhcp", "remove", "30", "52:54:00:AA:BB:CC"]);
    assert!(get_json(&mut c, "30/reservations/52:54:00:aa:bb:cc")
        .await
        .is_none());
    let list = cl.json(&["network", "dhcp", "list", "30"]);
    assert_eq!(list["reservations"], serde_json::json!([]));
    let still = list["leases"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["mac"] == "52:54:00:aa:bb:cc"))
        .expect("lease stays after its reservation is removed");
    assert_eq!(still["reserved"], false);
}

/// The write guard of the network commands is a ranged compare ("no key under
/// `networks/<vni>/acl/` modified after R"); prove this etcd honours it, including on an
/// empty range, so a lost race is detected rather than silently overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_honours_the_ranged_guard_of_network_writes() {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let cl = Cluster::start();
    let mut c = cl.client().await;
    let guard = |rev: i64, prefix: &str| {
        Compare::mod_revision(format!("{PREFIX}{prefix}"), CompareOp::Less, rev + 1).with_prefix()
    };
    let txn = |rev: i64, prefix: &str| {
        Txn::new()
            .when(vec![guard(rev, prefix)])
            .and_then(vec![TxnOp::put(format!("{PREFIX}1/probe"), "x", None)])
    };
    let rev = cl.etcd.current_revision().await.expect("revision");
    let r = c.txn(txn(rev, "1/acl/")).await.expect("txn");
    assert!(r.succeeded(), "an empty range passes the guard");
    let rev = cl.etcd.current_revision().await.expect("revision");
    put(&mut c, "1/acl/in/10", r#"{"action":"drop"}"#).await;
    put(&mut c, "1/status/n1", r#"{"state":"ready"}"#).await;
    let r = c.txn(txn(rev, "1/acl/")).await.expect("txn");
    assert!(!r.succeeded(), "a rule written after R fails the guard");
    let r = c.txn(txn(rev, "1/reservations/")).await.expect("txn");
    assert!(r.succeeded(), "a status write elsewhere does not");
    let rev = cl.etcd.current_revision().await.expect("revision");
    let r = c.txn(txn(rev, "1/acl/")).await.expect("txn");
    assert!(r.succeeded(), "re-read at a new R passes");
}
