//! The Network object end to end: real daemons inside network namespaces, etcd inside a
//! namespace, real bridges/VXLAN, a real dnsmasq and a real DHCP client (busybox udhcpc).
//! Every namespace, link and process is removed on drop, also when a test fails.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use debvisor_tests::{skip_unless_root, DaemonBuilder, DaemonProcess, EtcdProcess, NetNs};
use serde_json::Value;

fn ok(o: std::io::Result<Output>, what: &str) -> String {
    let o = o.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn put(etcd: &EtcdProcess, key: &str, value: &str) {
    let (k, v) = (format!("/debvisor/{key}"), value.to_owned());
    etcd.with_client(|mut c| async move {
        c.put(k, v, None)
            .await
            .map_err(|e| debvisor_tests::HarnessError::State(e.to_string()))?;
        Ok(())
    })
    .expect("etcd put");
}

fn delete_prefix(etcd: &EtcdProcess, prefix: &str) {
    etcd.delete_prefix(prefix).expect("etcd delete");
}

fn get(etcd: &EtcdProcess, key: &str) -> Option<String> {
    etcd.get_key(key).expect("etcd get")
}

fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn link_json(ns: &NetNs, link: &str) -> Option<Value> {
    let o = ns
        .exec_cmd("ip", &["-j", "-d", "addr", "show", "dev", link])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?.first().cloned()
}

fn has_addr(ns: &NetNs, link: &str, addr: &str) -> bool {
    link_json(ns, link)
        .and_then(|l| l["addr_info"].as_array().cloned())
        .map(|a| a.iter().any(|x| x["local"] == addr))
        .unwrap_or(false)
}

/// A "guest": its own namespace, a veth whose host end is enslaved to `bridge` in `node`.
fn guest(node: &NetNs, bridge: &str, host_end: &str, mac: &str) -> NetNs {
    let g = NetNs::create("dvguest").expect("guest ns");
    let peer = format!("{host_end}p");
    ok(
        node.exec_cmd(
            "ip",
            &[
                "link", "add", host_end, "type", "veth", "peer", "name", &peer,
            ],
        )
        .output(),
        "veth",
    );
    ok(
        node.exec_cmd("ip", &["link", "set", &peer, "netns", g.name()])
            .output(),
        "move veth",
    );
    ok(
        node.exec_cmd("ip", &["link", "set", host_end, "master", bridge, "up"])
            .output(),
        "enslave",
    );
    g.ip(&["link", "set", &peer, "name", "eth0"])
        .expect("rename");
    g.ip(&["link", "set", "eth0", "address", mac, "up"])
        .expect("guest up");
    g
}

fn udhcpc(g: &NetNs) -> Option<String> {
    let o = g
        .exec_cmd(
            "busybox",
            &[
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-t",
                "8",
                "-T",
                "1",
                "-s",
                "/bin/true",
            ],
        )
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // "udhcpc: lease of 10.1.0.7 obtained from 10.1.0.1, lease time 3600"
    text.lines().find_map(|l| {
        l.split("lease of ")
            .nth(1)?
            .split_whitespace()
            .next()
            .map(str::to_owned)
    })
}

fn start_node(
    node: &NetNs,
    etcd: &EtcdProcess,
    name: &str,
    yaml: &str,
    env: &[(&str, &str)],
) -> DaemonProcess {
    let mut b = DaemonBuilder::new(name)
        .netns(node.name())
        .endpoints(&[etcd.endpoint()])
        .yaml(yaml);
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut d = b.spawn().expect("spawn daemon");
    d.wait_run(Duration::from_secs(30))
        .expect("daemon reaches run");
    d
}

const MANAGED: &str = r#"{"type":"managed","description":"tenant","domain":"t.example",
  "ipv4":{"network":"10.1.0.0/24","gateway":"10.1.0.1"},
  "ipv6":{"network":"fd00:1::/64","gateway":"fd00:1::1"},
  "dhcp4":{"enabled":true,"start":"10.1.0.100","end":"10.1.0.150"}}"#;

#[test]
fn managed_network_on_a_standalone_node_serves_dhcp_and_reports_leases() {
    skip_unless_root!();
    let node = NetNs::create("dvnode").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    put(&etcd, "networks/100/spec", MANAGED);
    put(
        &etcd,
        "networks/100/reservations/52:54:00:00:00:07",
        r#"{"ip":"10.1.0.7","hostname":"web"}"#,
    );
    let mut d = start_node(&node, &etcd, "solo", "", &[]);

    // Bridge, VXLAN (local only: no cluster network), gateways, status.
    eventually("bridge with gateways", Duration::from_secs(15), || {
        has_addr(&node, "dvbr100", "10.1.0.1") && has_addr(&node, "dvbr100", "fd00:1::1")
    });
    let ra = node
        .exec_cmd("cat", &["/proc/sys/net/ipv6/conf/dvbr100/accept_ra"])
        .output()
        .expect("sysctl");
    assert_eq!(
        String::from_utf8_lossy(&ra.stdout).trim(),
        "0",
        "no RA autoconfiguration on tenant bridges"
    );
    let vx = link_json(&node, "dvvx100").expect("vxlan link");
    assert_eq!(vx["master"], "dvbr100");
    assert_eq!(vx["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(vx["linkinfo"]["info_data"]["id"], 100);
    eventually("status ready", Duration::from_secs(10), || {
        get(&etcd, "networks/100/status/solo")
            .map(|s| s.contains("\"ready\""))
            .unwrap_or(false)
    });

    // A reserved guest gets its address; another one gets one from the range.
    let g1 = guest(&node, "dvbr100", "gv1", "52:54:00:00:00:07");
    assert_eq!(
        udhcpc(&g1).as_deref(),
        Some("10.1.0.7"),
        "reservation honoured"
    );
    let g2 = guest(&node, "dvbr100", "gv2", "52:54:00:00:00:42");
    let ip2 = udhcpc(&g2).expect("a dynamic lease");
    let last: u8 = ip2
        .rsplit('.')
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    assert!(
        ip2.starts_with("10.1.0.") && (100..=150).contains(&last),
        "{ip2} in the range"
    );
    eventually("leases reported to etcd", Duration::from_secs(15), || {
        let k = etcd.keys_under("networks/100/leases/").expect("etcd keys");
        k.iter().any(|x| x.ends_with("52:54:00:00:00:07"))
            && k.iter().any(|x| x.ends_with("52:54:00:00:00:42"))
    });
    let lease: Value = serde_json::from_str(
        &get(&etcd, "networks/100/leases/52:54:00:00:00:07").unwrap_or_default(),
    )
    .expect("lease JSON");
    assert_eq!(lease["ip"], "10.1.0.7");
    assert_eq!(lease["hostname"], "web");

    // A new reservation reaches dnsmasq: it is part of the config dnsmasq reads as root, so
    // a change restarts it (its leases stay in the lease file).
    put(
        &etcd,
        "networks/100/reservations/52:54:00:00:00:09",
        r#"{"ip":"10.1.0.9"}"#,
    );
    d.wait_for(
        |v| v["message"] == "dnsmasq configuration changed; restarting it",
        Duration::from_secs(10),
    )
    .expect("restart for the reservation");
    d.wait_for(
        |v| v["message"] == "dnsmasq started" && v["network"] == 100,
        Duration::from_secs(10),
    )
    .expect("dnsmasq back");
    let g3 = guest(&node, "dvbr100", "gv3", "52:54:00:00:00:09");
    assert_eq!(udhcpc(&g3).as_deref(), Some("10.1.0.9"));

    // An invalid update: error status naming the field, the host left as it was.
    put(
        &etcd,
        "networks/100/spec",
        &MANAGED.replace("\"gateway\":\"10.1.0.1\"", "\"gateway\":\"10.9.0.1\""),
    );
    eventually("error status", Duration::from_secs(10), || {
        get(&etcd, "networks/100/status/solo")
            .map(|s| s.contains("spec.ipv4.gateway"))
            .unwrap_or(false)
    });
    assert!(
        has_addr(&node, "dvbr100", "10.1.0.1"),
        "nothing torn down for a bad spec"
    );
    put(&etcd, "networks/100/spec", MANAGED);
    eventually("ready again", Duration::from_secs(10), || {
        get(&etcd, "networks/100/status/solo")
            .map(|s| s.contains("\"ready\""))
            .unwrap_or(false)
    });

    // Drift: someone deletes our bridge; the resync tick brings it back with its gateway.
    ok(
        node.exec_cmd("ip", &["link", "del", "dvbr100"]).output(),
        "delete bridge",
    );
    eventually("bridge recreated", Duration::from_secs(15), || {
        has_addr(&node, "dvbr100", "10.1.0.1")
    });

    // Deleting the network removes exactly what we created, and our dnsmasq.
    delete_prefix(&etcd, "networks/100/");
    eventually("links removed", Duration::from_secs(15), || {
        link_json(&node, "dvbr100").is_none() && link_json(&node, "dvvx100").is_none()
    });
    d.wait_for(
        |v| v["message"] == "dnsmasq stopped",
        Duration::from_secs(10),
    )
    .expect("dnsmasq stopped");
    assert!(
        link_json(&node, "gv1").is_some(),
        "the guests' own veths stay"
    );
    assert!(
        etcd.keys_under("networks/100/")
            .expect("etcd keys")
            .is_empty(),
        "status and leases cleaned up: {:?}",
        etcd.keys_under("networks/100/").expect("etcd keys")
    );
}

#[test]
fn two_nodes_carry_a_managed_network_over_vxlan() {
    skip_unless_root!();
    // A switch namespace with a bridge; each node namespace has eth0 on it.
    let sw = NetNs::create("dvsw").expect("switch ns");
    sw.ip(&["link", "add", "sw", "type", "bridge"])
        .expect("switch bridge");
    sw.ip(&["addr", "add", "192.0.2.254/24", "dev", "sw"])
        .expect("switch addr");
    sw.ip(&["link", "set", "sw", "up"]).expect("switch up");
    let etcd = EtcdProcess::start_in(sw.name(), "192.0.2.254".parse().expect("ip"))
        .expect("etcd on the switch");
    let mut nodes = Vec::new();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        let ns = NetNs::create(&format!("dv{name}")).expect("node ns");
        let (a, b) = (format!("dv{name}a"), format!("dv{name}b"));
        ok(
            ns.exec_cmd(
                "ip",
                &["link", "add", &a, "type", "veth", "peer", "name", &b],
            )
            .output(),
            "veth",
        );
        ok(
            ns.exec_cmd("ip", &["link", "set", &b, "netns", sw.name()])
                .output(),
            "to switch",
        );
        sw.ip(&["link", "set", &b, "master", "sw", "up"])
            .expect("switch port");
        ns.ip(&["link", "set", &a, "name", "eth0"]).expect("rename");
        let addr = format!("192.0.2.{}/24", i + 1);
        let yaml = format!("networking:\n  host_networks:\n    cluster:\n      device: eth0\n      addresses: [{addr}]\n");
        let d = start_node(
            &ns,
            &etcd,
            name,
            &yaml,
            &[
                ("DEBVISOR_NODE_MODE", "clustered"),
                ("DEBVISOR_NODE_COORDINATORS", "n1,n2"),
            ],
        );
        nodes.push((ns, d));
    }
    // The host-networking stage configured the cluster address.
    assert!(has_addr(&nodes[0].0, "eth0", "192.0.2.1"));

    // A managed network without gateway (no primary elected yet in clustered mode).
    put(
        &etcd,
        "networks/200/spec",
        r#"{"type":"managed","ipv4":{"network":"10.2.0.0/24"}}"#,
    );
    let mut guests = Vec::new();
    for (i, (ns, _)) in nodes.iter().enumerate() {
        eventually("bridge on each node", Duration::from_secs(15), || {
            link_json(ns, "dvbr200").is_some()
        });
        let vx = link_json(ns, "dvvx200").expect("vxlan");
        assert_eq!(vx["linkinfo"]["info_data"]["group"], "239.0.0.200");
        assert_eq!(vx["mtu"], 1450, "clamped to the cluster MTU − 50");
        let g = guest(
            ns,
            "dvbr200",
            &format!("gw{i}"),
            &format!("52:54:00:00:02:0{i}"),
        );
        g.ip(&["addr", "add", &format!("10.2.0.1{i}/24"), "dev", "eth0"])
            .expect("guest addr");
        guests.push(g);
    }
    let out = guests[0]
        .exec_cmd("busybox", &["ping", "-c", "3", "-W", "2", "10.2.0.11"])
        .output()
        .expect("ping");
    assert!(
        out.status.success(),
        "ping across VXLAN: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (_, d) in &nodes {
        assert!(
            !d.json_lines().iter().any(|v| v["level"] == "ERROR"),
            "no errors on {}",
            d.node()
        );
    }
}

fn nft_table(ns: &NetNs) -> Option<Value> {
    let o = ns
        .exec_cmd("nft", &["-j", "list", "table", "inet", "debvisor"])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn chains(t: &Value) -> Vec<String> {
    t["nftables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["chain"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_node_firewall_follows_networks_and_heals_a_deleted_rule() {
    skip_unless_root!();
    let node = NetNs::create("dvfw").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    // A network present before the daemon starts is in the very first ruleset.
    put(
        &etcd,
        "networks/300/spec",
        r#"{"type":"managed","ipv4":{"network":"10.3.0.0/24","gateway":"10.3.0.1"}}"#,
    );
    put(
        &etcd,
        "networks/300/acl/in/10",
        r#"{"action":"drop","proto":"tcp","port":"23","description":"no telnet"}"#,
    );
    // A foreign table that must survive everything we do.
    ok(
        node.exec_cmd("nft", &["add", "table", "inet", "other"])
            .output(),
        "foreign table",
    );
    let d = start_node(
        &node,
        &etcd,
        "fw",
        "",
        &[("DEBVISOR_FIREWALL_ENABLED", "true")],
    );
    let stage = d
        .json_lines()
        .into_iter()
        .find(|v| v["message"] == "stage complete" && v["stage"] == "firewall")
        .expect("firewall stage");
    assert_eq!(stage["outcome"], "ok");
    assert!(
        stage["detail"]
            .as_str()
            .unwrap_or("")
            .contains("1 networks"),
        "{stage}"
    );
    let t = nft_table(&node).expect("our table");
    let c = chains(&t);
    for want in ["input", "forward", "output", "net300-in", "net300-out"] {
        assert!(c.iter().any(|x| x == want), "chain {want} in {c:?}");
    }

    // A second network arrives: its chains appear.
    put(
        &etcd,
        "networks/301/spec",
        r#"{"type":"managed","ipv4":{"network":"10.4.0.0/24"}}"#,
    );
    eventually("chains of network 301", Duration::from_secs(10), || {
        nft_table(&node)
            .map(|t| chains(&t).iter().any(|x| x == "net301-in"))
            .unwrap_or(false)
    });

    // Someone deletes our telnet-drop rule: the resync tick puts it back.
    let t = nft_table(&node).expect("table");
    let handle = t["nftables"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|x| {
                x["rule"]["chain"] == "net300-in"
                    && x["rule"]["comment"]
                        .as_str()
                        .unwrap_or("")
                        .contains("no telnet")
            })
        })
        .and_then(|x| x["rule"]["handle"].as_u64())
        .expect("telnet rule");
    ok(
        node.exec_cmd(
            "nft",
            &[
                "delete",
                "rule",
                "inet",
                "debvisor",
                "net300-in",
                "handle",
                &handle.to_string(),
            ],
        )
        .output(),
        "delete rule",
    );
    let before = d
        .json_lines()
        .iter()
        .filter(|v| v["message"] == "firewall re-applied (drift corrected)")
        .count();
    eventually("rule restored", Duration::from_secs(10), || {
        nft_table(&node)
            .and_then(|t| {
                t["nftables"].as_array().map(|a| {
                    a.iter().any(|x| {
                        x["rule"]["comment"]
                            .as_str()
                            .unwrap_or("")
                            .contains("no telnet")
                    })
                })
            })
            .unwrap_or(false)
    });
    eventually(
        "the repair is logged as drift",
        Duration::from_secs(5),
        || {
            d.json_lines()
                .iter()
                .filter(|v| v["message"] == "firewall re-applied (drift corrected)")
                .count()
                > before
        },
    );

    // Removing a network removes its chains; the foreign table is still there.
    delete_prefix(&etcd, "networks/301/");
    eventually("chains of 301 gone", Duration::from_secs(10), || {
        nft_table(&node)
            .map(|t| !chains(&t).iter().any(|x| x == "net301-in"))
            .unwrap_or(false)
    });
    ok(
        node.exec_cmd("nft", &["list", "table", "inet", "other"])
            .output(),
        "foreign table survives",
    );
}

/// Log lines of `d` whose message is `m` and whose `network` field is `vni`.
fn count_lines(d: &DaemonProcess, m: &str, vni: u64) -> usize {
    d.json_lines()
        .iter()
        .filter(|v| v["message"] == m && v["network"] == vni)
        .count()
}

#[test]
fn an_invalid_network_is_logged_once_per_distinct_error() {
    skip_unless_root!();
    let node = NetNs::create("dvinv").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    let bad_gateway = MANAGED.replace("\"gateway\":\"10.1.0.1\"", "\"gateway\":\"10.9.0.1\"");
    put(&etcd, "networks/110/spec", &bad_gateway);
    // keepalive.interval is 1 s in the harness: the network reactor resyncs every second.
    let d = start_node(&node, &etcd, "inv", "", &[]);
    const INVALID: &str = "network invalid; nothing changed on the host for it";
    eventually("error status", Duration::from_secs(10), || {
        get(&etcd, "networks/110/status/inv")
            .map(|s| s.contains("spec.ipv4.gateway"))
            .unwrap_or(false)
    });
    etcd.wait_ticks("inv", 4, Duration::from_secs(10));
    assert_eq!(
        count_lines(&d, INVALID, 110),
        1,
        "one warning for one error over several ticks"
    );

    // A different error is a new warning, once.
    let bad_range = MANAGED.replace("\"start\":\"10.1.0.100\"", "\"start\":\"10.7.0.100\"");
    put(&etcd, "networks/110/spec", &bad_range);
    eventually("second error status", Duration::from_secs(10), || {
        get(&etcd, "networks/110/status/inv")
            .map(|s| !s.contains("spec.ipv4.gateway") && s.contains("\"error\""))
            .unwrap_or(false)
    });
    etcd.wait_ticks("inv", 3, Duration::from_secs(10));
    assert_eq!(
        count_lines(&d, INVALID, 110),
        2,
        "one more for the new error"
    );

    // Valid again: one info line, and no more warnings.
    put(&etcd, "networks/110/spec", MANAGED);
    eventually("ready", Duration::from_secs(10), || {
        get(&etcd, "networks/110/status/inv")
            .map(|s| s.contains("\"ready\""))
            .unwrap_or(false)
    });
    etcd.wait_ticks("inv", 3, Duration::from_secs(10));
    assert_eq!(count_lines(&d, "network valid again", 110), 1);
    assert_eq!(count_lines(&d, INVALID, 110), 2);
}

#[test]
fn a_network_id_with_a_newline_and_an_escape_cannot_forge_log_lines() {
    skip_unless_root!();
    let node = NetNs::create("dvlog").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    // A key name from outside: a newline, a forged line, and an ANSI colour escape.
    put(
        &etcd,
        "networks/7\nFORGED level=ERROR node taken over \u{1b}[31mred/spec",
        MANAGED,
    );
    // The plain-text stderr format (the harness default is JSON, which escapes by itself).
    let d = DaemonBuilder::new("logs")
        .netns(node.name())
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_LOGGING_FORMAT", "text")
        .spawn()
        .expect("spawn daemon");
    eventually(
        "the non-numeric id is logged",
        Duration::from_secs(30),
        || d.lines().iter().any(|l| l.contains("non-numeric VNI")),
    );
    let lines = d.lines();
    let line = lines
        .iter()
        .find(|l| l.contains("non-numeric VNI"))
        .expect("line");
    assert!(
        line.contains("FORGED") && line.contains("\\n"),
        "the id stays on its line, escaped: {line:?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("FORGED")),
        "no forged line:\n{}",
        lines.join("\n")
    );
    assert!(
        !lines.iter().any(|l| l.contains('\u{1b}')),
        "no raw escape character in the output"
    );
}

/// Run `program args…` as the unprivileged user `nobody` (runuser), `stdin` fed to it;
/// returns whether it succeeded and its stderr.
fn as_nobody(program: &str, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runuser");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("runuser output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mode bits, owner and group of `p` (not following a symlink).
fn stat(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn dnsmasq_files_are_private_and_planted_files_are_neither_followed_nor_reported() {
    skip_unless_root!();
    // A base directory everyone may traverse, so only the daemon's own modes keep `nobody`
    // out of its directories.
    let base = tempfile::tempdir().expect("tempdir");
    chmod(base.path(), 0o755);
    let state = base.path().join("state");
    let run = base.path().join("run");
    let leases_dir = state.join("dnsmasq");
    // The layout an older version left: a world-writable (sticky) lease directory.
    std::fs::create_dir_all(&leases_dir).expect("mkdir");
    chmod(&state, 0o755);
    chmod(&leases_dir, 0o1777);
    // A root-only file the attacker wants overwritten.
    let secret = base.path().join("secret");
    std::fs::write(&secret, "root only\n").expect("secret");
    chmod(&secret, 0o600);
    // A real unprivileged user plants a symlink as network 120's lease file and a fake lease
    // as network 121's.
    let l120 = leases_dir.join("120.leases");
    let l121 = leases_dir.join("121.leases");
    let (ok1, e1) = as_nobody(
        "ln",
        &[
            "-s",
            &secret.display().to_string(),
            &l120.display().to_string(),
        ],
        "",
    );
    assert!(ok1, "planting the symlink as nobody: {e1}");
    let (ok2, e2) = as_nobody(
        "tee",
        &[&l121.display().to_string()],
        "0 52:54:00:66:66:66 10.2.0.66 evil *\n",
    );
    assert!(ok2, "planting the lease as nobody: {e2}");
    assert_eq!(stat(&l121).1, 65534, "the fake lease belongs to nobody");

    let node = NetNs::create("dvsec").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    put(&etcd, "networks/120/spec", MANAGED);
    put(
        &etcd,
        "networks/121/spec",
        r#"{"type":"managed","ipv4":{"network":"10.2.0.0/24","gateway":"10.2.0.1"},
            "dhcp4":{"enabled":true,"start":"10.2.0.100","end":"10.2.0.150"}}"#,
    );
    let mut d = DaemonBuilder::new("sec")
        .netns(node.name())
        .endpoints(&[etcd.endpoint()])
        .state_dir(&state)
        .env("DEBVISOR_PATHS_RUN_DIR", &run.display().to_string())
        .spawn()
        .expect("spawn daemon");
    d.wait_run(Duration::from_secs(30)).expect("run");
    for vni in ["120", "121"] {
        eventually("ready", Duration::from_secs(15), || {
            get(&etcd, &format!("networks/{vni}/status/sec"))
                .map(|s| s.contains("\"ready\""))
                .unwrap_or(false)
        });
    }
    eventually("both dnsmasq started", Duration::from_secs(15), || {
        d.json_lines()
            .iter()
            .filter(|v| v["message"] == "dnsmasq started")
            .count()
            >= 2
    });

    // The symlink was not followed: the root-only file is intact; the lease files are ours.
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        "root only\n"
    );
    assert_eq!(stat(&secret), (0o600, 0, 0));
    for l in [&l120, &l121] {
        assert!(
            std::fs::symlink_metadata(l).expect("lease").is_file(),
            "{}",
            l.display()
        );
        assert_eq!(stat(l), (0o640, 0, 0), "{}", l.display());
    }
    assert!(
        !std::fs::read_to_string(&l121)
            .expect("lease")
            .contains("52:54:00:66:66:66"),
        "the fake lease is gone"
    );
    assert!(
        d.json_lines().iter().any(|v| v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("untrusted lease file removed")),
        "the removal is logged"
    );

    // Every directory and file: owned by root, 0750 / 0640 (or tighter).
    let dirs = [
        state.clone(),
        run.clone(),
        leases_dir.clone(),
        run.join("dnsmasq"),
        run.join("dnsmasq/120"),
        run.join("dnsmasq/121"),
    ];
    for p in &dirs {
        assert_eq!(stat(p), (0o750, 0, 0), "{}", p.display());
    }
    for p in [
        run.join("dnsmasq/120/dnsmasq.conf"),
        run.join("dnsmasq/120/dnsmasq.pid"),
        run.join("dnsmasq/120/dnsmasq.log"),
        state.join("node_id"),
    ] {
        let (mode, uid, gid) = stat(&p);
        assert!(
            mode & 0o137 == 0 && uid == 0 && gid == 0,
            "{}: {mode:04o} {uid}:{gid}",
            p.display()
        );
    }
    // The unprivileged user can write nowhere in them.
    for p in &dirs {
        let (ok, _) = as_nobody("touch", &[&p.join("planted").display().to_string()], "");
        assert!(!ok, "nobody could create a file in {}", p.display());
    }
    let (ok, _) = as_nobody("tee", &["-a", &l120.display().to_string()], "x\n");
    assert!(!ok, "nobody could append to the lease file");

    // dnsmasq (which dropped to its own user) still serves and records leases in the
    // root-only directory; the fake lease never reaches etcd.
    let g = guest(&node, "dvbr120", "gs1", "52:54:00:00:01:20");
    let ip = udhcpc(&g).expect("a lease on network 120");
    assert!(ip.starts_with("10.1.0."), "{ip}");
    eventually("lease reported", Duration::from_secs(15), || {
        etcd.keys_under("networks/120/leases/")
            .expect("keys")
            .iter()
            .any(|k| k.ends_with("52:54:00:00:01:20"))
    });
    assert!(
        etcd.keys_under("networks/121/leases/")
            .expect("keys")
            .is_empty(),
        "no lease reported from the planted file"
    );
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        "root only\n",
        "a lease written by dnsmasq did not land in the symlink's target"
    );
    assert!(
        d.json_lines().iter().all(|v| v["level"] != "ERROR"),
        "no errors:\n{}",
        d.tail(40)
    );
}

/// A process this test caused (a dnsmasq of a killed daemon): SIGKILLed by PID on drop if it
/// still runs, so a failing test leaves nothing behind.
struct Reaped(u32);

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.0)).unwrap_or_default();
        if pid_alive(self.0) && comm.trim() == "dnsmasq" {
            // SAFETY: kill(2) on the dnsmasq this test's daemon started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

#[test]
fn the_dnsmasq_of_a_network_that_became_invalid_is_adopted_and_stopped_with_the_daemon() {
    skip_unless_root!();
    let node = NetNs::create("dvorph").expect("node ns");
    let etcd =
        EtcdProcess::start_in(node.name(), "127.0.0.1".parse().expect("ip")).expect("etcd in ns");
    put(&etcd, "networks/130/spec", MANAGED);
    // State and run directories kept across the two daemons.
    let base = tempfile::tempdir().expect("tempdir");
    let (state, run) = (base.path().join("state"), base.path().join("run"));
    let daemon = |name: &str| {
        let mut d = DaemonBuilder::new("orph")
            .netns(node.name())
            .endpoints(&[etcd.endpoint()])
            .state_dir(&state)
            .env("DEBVISOR_PATHS_RUN_DIR", &run.display().to_string())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        d.wait_run(Duration::from_secs(30)).expect("run");
        d
    };
    let mut d1 = daemon("first");
    let started = d1
        .wait_for(
            |v| v["message"] == "dnsmasq started" && v["network"] == 130,
            Duration::from_secs(15),
        )
        .expect("dnsmasq started");
    let pid = started["pid"].as_u64().expect("pid") as u32;
    let _guard = Reaped(pid);
    assert!(pid_alive(pid));

    // The daemon crashes; dnsmasq keeps serving. Meanwhile the spec turns invalid.
    d1.kill().expect("kill daemon");
    assert!(pid_alive(pid), "dnsmasq outlives a crashed daemon");
    put(
        &etcd,
        "networks/130/spec",
        &MANAGED.replace("\"gateway\":\"10.1.0.1\"", "\"gateway\":\"10.9.0.1\""),
    );

    // The next daemon reports the error and leaves the host as it is (dnsmasq included)...
    let mut d2 = daemon("second");
    eventually("error status", Duration::from_secs(10), || {
        get(&etcd, "networks/130/status/orph")
            .map(|s| s.contains("spec.ipv4.gateway"))
            .unwrap_or(false)
    });
    etcd.wait_ticks("orph", 2, Duration::from_secs(10));
    assert!(pid_alive(pid), "an invalid spec keeps the host as it is");
    assert!(has_addr(&node, "dvbr130", "10.1.0.1"), "gateway kept");

    // ...but stops it with itself: no orphan after SIGTERM.
    d2.signal(libc::SIGTERM).expect("SIGTERM");
    assert!(d2
        .wait_exit(Duration::from_secs(30))
        .expect("exit")
        .success());
    eventually(
        "dnsmasq stopped with the daemon",
        Duration::from_secs(10),
        || !pid_alive(pid),
    );
    assert!(
        d2.json_lines()
            .iter()
            .any(|v| v["message"] == "dnsmasq of an invalid network adopted; it keeps serving until the spec is fixed or the daemon stops"
                && v["network"] == 130),
        "the adoption is logged:\n{}",
        d2.tail(30)
    );
}
