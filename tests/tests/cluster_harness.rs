//! The multi-node cluster harness (`debvisor_tests::cluster`) against today's daemon: nodes
//! reach `run` and see each other, etcd members die and come back, each fault does what it
//! says on the wire, the invariant checker flags what is provoked and nothing else, and
//! nothing is left behind.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use debvisor_tests::cluster::{wait_until, Cluster, Leftovers, ViolationKind};
use debvisor_tests::skip_unless_root;
use serde_json::Value;

/// Slack on top of the lease TTL for a lost lease to show in etcd (the lease runs out at
/// TTL after its last refresh; etcd revokes on its next check).
const SLACK: Duration = Duration::from_secs(15);
/// How long a node may take to come back to `run` and `alive` after a fault heals.
const BACK: Duration = Duration::from_secs(30);

/// `debvisorctl --output json status` from node `i`.
fn status(c: &Cluster, i: usize) -> Vec<Value> {
    // Exit 3: something needs attention (the summary lists it); the nodes are listed anyway.
    let out = c
        .node(i)
        .ctl(&["--output", "json", "status"])
        .expect("debvisorctl status");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "debvisorctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("status JSON")
        .as_array()
        .cloned()
        .expect("an array")
}

/// Wait until `name`'s `alive` key is gone; returns when it was seen gone.
fn wait_not_alive(c: &Cluster, name: &str, within: Duration) -> Instant {
    wait_until(&format!("{name}'s alive key to vanish"), within, || {
        let alive = c.alive_nodes().ok()?;
        (!alive.iter().any(|n| n == name)).then(Instant::now)
    })
    .expect("alive key vanishes")
}

/// Wait until `name` is alive and in `run` again in etcd.
fn wait_back(c: &Cluster, name: &str) {
    wait_until(&format!("{name} alive and in run"), BACK, || {
        let alive = c.alive_nodes().ok()?.iter().any(|n| n == name);
        let run = c.daemon_state(name).ok()?.as_deref() == Some("run");
        (alive && run).then_some(())
    })
    .expect("node back");
}

#[test]
fn three_nodes_and_three_members_reach_run_and_see_each_other() {
    skip_unless_root!();
    let t = Instant::now();
    let c = Cluster::builder().build().expect("cluster");
    eprintln!("3 nodes + 3 etcd members up in {:?}", t.elapsed());
    let rows = status(&c, 0);
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["c1", "c2", "c3"], "{rows:?}");
    for r in &rows {
        assert_eq!(r["alive"], true, "{r}");
        assert_eq!(r["daemon_state"], "run", "{r}");
        assert_eq!(r["mode"], "clustered", "{r}");
    }
    // The election: exactly one primary, the others secondaries.
    let primary = wait_until("a primary elected", Duration::from_secs(20), || {
        c.primary().ok().flatten()
    })
    .expect("primary");
    let states = c.coordinator_states().expect("states");
    for (n, st) in &states {
        let want = if *n == primary {
            "primary"
        } else {
            "secondary"
        };
        assert_eq!(st, want, "{n}: {states:?}");
    }
    assert_eq!(c.etcd().len(), 3);
    assert!(c.etcd().leader().expect("leader").is_some());
    // The cluster network carries node-to-node traffic.
    assert!(c.node(0).ping(c.node(2).addr()), "c1 → c3");
    // The primary holds the floating address, in its namespace and on the wire; the checker
    // has sampled all along.
    let fl = IpAddr::from(c.floating().expect("floating"));
    c.checker()
        .wait_holder(fl, &primary, Duration::from_secs(10))
        .expect("the primary holds the floating address");
    c.checker()
        .wait_samples(3, Duration::from_secs(10))
        .expect("samples");
    let h = c.checker().holder_of(fl);
    assert_eq!(
        (h.nodes.clone(), h.wire.clone()),
        (vec![primary.clone()], vec![primary.clone()]),
        "{h:?}"
    );
    c.checker().assert_clean();
    let stats = c.checker().stats();
    eprintln!("checker: {stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    let left = Leftovers::of(&c);
    assert_eq!(left.pids.len(), 6, "3 daemons + 3 etcd members");
    let t = Instant::now();
    drop(c);
    eprintln!("torn down in {:?}", t.elapsed());
    left.assert_gone();
}

#[test]
fn a_single_member_etcd_serves_a_cluster() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let rows = status(&c, 1);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["alive"] == true && r["daemon_state"] == "run"));
    assert_eq!(c.alive_nodes().expect("alive"), ["c1", "c2"]);
    assert_eq!(c.etcd().leader().expect("leader").as_deref(), Some("e1"));
    c.checker().assert_clean();
    let left = Leftovers::of(&c);
    assert_eq!(left.pids.len(), 3);
    drop(c);
    left.assert_gone();
}

#[test]
fn start_order_deferred_nodes_and_a_coordinator_subset() {
    skip_unless_root!();
    let c = Cluster::builder()
        .etcd_members(1)
        .coordinators(&[0, 1])
        .start_order(&[1, 0])
        .defer_start(&[2])
        .wait_each(true)
        .node_env(1, "DEBVISOR_NODE_RACK", "r2")
        .build()
        .expect("cluster");
    assert_eq!(c.alive_nodes().expect("alive"), ["c1", "c2"]);
    assert!(!c.node(2).is_running(), "c3 is deferred");
    // c2 reached run before c1 was even spawned.
    let ts = |i: usize, pred: &dyn Fn(&Value) -> bool| -> String {
        c.node(i)
            .json_lines()
            .into_iter()
            .find(|v| pred(v))
            .and_then(|v| v["timestamp"].as_str().map(str::to_owned))
            .expect("log line")
    };
    let c2_run = ts(1, &|v| {
        v["message"] == "stage complete" && v["stage"] == "keepalive"
    });
    let c1_start = ts(0, &|v| v["message"] == "debvisord starting");
    assert!(c2_run < c1_start, "{c2_run} < {c1_start}");
    c.node(2).start().expect("start c3");
    c.node(2)
        .wait_run(Duration::from_secs(30))
        .expect("c3 in run");
    let states = wait_until(
        "c3 a client, one of c1/c2 primary",
        Duration::from_secs(20),
        || {
            let st = c.coordinator_states().ok()?;
            let roles = (st.get("c1")?.as_str(), st.get("c2")?.as_str());
            (st.get("c3").map(String::as_str) == Some("client")
                && matches!(roles, ("primary", "secondary") | ("secondary", "primary")))
            .then_some(st)
        },
    )
    .expect("roles");
    assert_eq!(states["c3"], "client", "not in node.coordinators");
    let info: Value =
        serde_json::from_str(&c.etcd_get("nodes/c2/info").expect("get").expect("info"))
            .expect("json");
    assert_eq!(info["rack"], "r2", "per-node environment");
    c.checker().assert_clean();
}

#[test]
fn isolated_libvirtds_one_per_node() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .isolated_libvirt(true)
        .build()
        .expect("cluster");
    for n in c.nodes() {
        let lv = n.libvirt().expect("a libvirtd");
        let check = n
            .json_lines()
            .into_iter()
            .find(|v| v["message"] == "stage complete" && v["stage"] == "hypervisor-check")
            .expect("hypervisor check");
        assert_eq!(check["outcome"], "ok", "{check}");
        assert!(
            check["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(&lv.local_uri())),
            "{} uses its own libvirtd: {check}",
            n.name()
        );
        assert_eq!(lv.addr(), n.addr());
    }
    let left = Leftovers::of(&c);
    assert_eq!(left.pids.len(), 5, "2 daemons, 2 libvirtds, 1 etcd member");
    drop(c);
    left.assert_gone();
}

#[test]
fn a_killed_etcd_leader_leaves_the_cluster_usable_and_rejoins_on_restart() {
    skip_unless_root!();
    let c = Cluster::builder().nodes(2).build().expect("cluster");
    let leader = c.etcd().leader_index().expect("leader").expect("a leader");
    let killed = c.kill_member(leader).expect("kill the leader");
    assert_eq!(c.etcd().pid(leader).expect("member"), None);
    // The two others elect a new leader and serve reads and writes.
    wait_until(
        "a write while a member is down",
        Duration::from_secs(15),
        || c.etcd_put("test/while-down", "yes").ok(),
    )
    .expect("write");
    eprintln!("writable again {:?} after the kill", killed.elapsed());
    assert_eq!(
        c.etcd_get("test/while-down").expect("get").as_deref(),
        Some("yes")
    );
    let new_leader = c.etcd().leader_index().expect("leader");
    assert!(
        new_leader.is_some() && new_leader != Some(leader),
        "{new_leader:?}"
    );
    // The daemons keep their leases through it (they have the other endpoints).
    std::thread::sleep(c.lease_ttl() + Duration::from_secs(1));
    assert_eq!(c.alive_nodes().expect("alive"), ["c1", "c2"]);
    for n in ["c1", "c2"] {
        assert_eq!(c.daemon_state(n).expect("state").as_deref(), Some("run"));
    }
    // Restarted, the member rejoins and has what was written without it.
    c.restart_member(leader).expect("restart");
    assert_eq!(
        c.etcd()
            .get_from(leader, "test/while-down")
            .expect("read from the restarted member")
            .as_deref(),
        Some("yes")
    );
    c.checker().assert_clean();
}

#[test]
fn a_cut_link_expires_the_alive_key_and_healing_brings_the_node_back() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let (c1, c2) = (c.node(0), c.node(1));
    assert!(c1.ping(c2.addr()));
    let cut = c2.cut_link().expect("cut");
    assert!(!c1.ping(c2.addr()), "c2 is off the wire");
    let gone = wait_not_alive(&c, "c2", c.lease_ttl() + SLACK);
    eprintln!("c2's alive key gone {:?} after the cut", gone - cut);
    assert!(
        gone - cut >= Duration::from_secs(1),
        "a lease expiry, not a revoke"
    );
    assert!(c2.is_running(), "the daemon itself runs on");
    assert_eq!(c.alive_nodes().expect("alive"), ["c1"]);
    let healed = c2.heal_link().expect("heal");
    wait_back(&c, "c2");
    eprintln!("c2 back {:?} after the heal", healed.elapsed());
    // One ping with a 1 s timeout may go to a neighbour entry the cut left failed: retried.
    wait_until("c1 reaches c2 again", SLACK, || {
        c1.ping(c2.addr()).then_some(())
    })
    .expect("c2 back on the wire");
    c.checker().assert_clean();
}

#[test]
fn a_cut_from_etcd_expires_the_alive_key_while_peers_still_answer() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let c2 = c.node(1);
    let cut = c2.cut_etcd().expect("cut etcd");
    assert!(c2.is_etcd_cut());
    let gone = wait_not_alive(&c, "c2", c.lease_ttl() + SLACK);
    eprintln!("c2's alive key gone {:?} after the cut", gone - cut);
    // Only the etcd client port is cut: the peers and the member's host still answer.
    assert!(c2.ping(c.node(0).addr()), "c2 → c1");
    assert!(c2.ping(c.etcd().addr(0).expect("member")), "c2 → e1 (ICMP)");
    assert!(c.node(0).ping(c2.addr()), "c1 → c2");
    let healed = c2.heal_etcd().expect("heal");
    wait_back(&c, "c2");
    eprintln!("c2 back {:?} after the heal", healed.elapsed());
    c.checker().assert_clean();
}

#[test]
fn a_stopped_daemon_loses_its_lease_and_comes_back_when_continued() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let c2 = c.node(1);
    let pid = c2.pid().expect("pid");
    let stopped = c2.stop().expect("SIGSTOP");
    assert!(c2.is_stopped());
    let gone = wait_not_alive(&c, "c2", c.lease_ttl() + SLACK);
    eprintln!("c2's alive key gone {:?} after SIGSTOP", gone - stopped);
    assert_eq!(c2.pid(), Some(pid), "frozen, not dead");
    c2.cont().expect("SIGCONT");
    wait_back(&c, "c2");
    assert_eq!(c2.pid(), Some(pid), "the same process came back");
    c.checker().assert_clean();
}

#[test]
fn kill9_sigterm_restart_and_flapping() {
    skip_unless_root!();
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .build()
        .expect("cluster");
    let c2 = c.node(1);
    let node_id = |c: &Cluster| -> String {
        let info = c.etcd_get("nodes/c2/info").expect("get").expect("info");
        serde_json::from_str::<Value>(&info).expect("json")["node_id"]
            .as_str()
            .expect("node_id")
            .to_owned()
    };
    let id = node_id(&c);

    // SIGKILL: nothing is revoked, the lease runs out.
    let killed = c2.kill9().expect("kill -9");
    assert!(!c2.is_running());
    let gone = wait_not_alive(&c, "c2", c.lease_ttl() + SLACK);
    eprintln!("after kill -9: alive gone in {:?}", gone - killed);
    c2.restart().expect("restart");
    c2.wait_run(Duration::from_secs(30)).expect("run again");
    wait_back(&c, "c2");
    assert_eq!(node_id(&c), id, "the same state dir");

    // SIGTERM: a graceful stop revokes the lease at once.
    let termed = c2.sigterm().expect("SIGTERM");
    assert_eq!(
        c2.wait_exit(Duration::from_secs(10)).expect("exit"),
        Some(0)
    );
    let gone = wait_not_alive(&c, "c2", Duration::from_secs(2));
    eprintln!("after SIGTERM: alive gone in {:?}", gone - termed);
    c2.start().expect("start");
    c2.wait_run(Duration::from_secs(30)).expect("run again");

    // Flapping shorter than the lease: the node stays alive, the port ends up.
    let flap = c2.flap_link(Duration::from_millis(400), 3).expect("flap");
    let started = flap.started_at();
    let mut saw_down = false;
    while flap.cycles() < 3 && started.elapsed() < Duration::from_secs(10) {
        saw_down |= !c.node(0).ping(c2.addr());
    }
    flap.wait().expect("flapping done");
    assert!(saw_down, "some ping was lost while flapping");
    assert!(c.node(0).ping(c2.addr()), "the port is up after flapping");
    wait_back(&c, "c2");
    c.checker().assert_clean();
}

/// A process started for a test, killed by PID on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own unreaped child.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A dnsmasq in the namespace of node `i` with `args` (DNS off, foreground, logging to
/// `<cluster dir>/dnsmasq-<i>.log`).
fn dnsmasq(c: &Cluster, i: usize, args: &[&str]) -> Proc {
    let mut all = vec![
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",
        "--pid-file=",
        "--log-facility=-",
    ];
    all.extend_from_slice(args);
    let log = std::fs::File::create(c.dir().join(format!("dnsmasq-{i}.log"))).expect("log");
    let child = c
        .node(i)
        .netns()
        .exec_cmd("dnsmasq", &all)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn dnsmasq");
    Proc(child)
}

#[test]
fn the_checker_flags_what_is_provoked_and_nothing_else() {
    skip_unless_root!();
    // No floating address of the daemons' own here (the elected primary would hold it): the
    // test provokes its violations with an address it adds by hand.
    let c = Cluster::builder()
        .nodes(2)
        .etcd_members(1)
        .floating(None)
        .build()
        .expect("cluster");
    let chk = c.checker();
    let settle = || {
        chk.wait_samples(3, Duration::from_secs(10))
            .expect("samples")
    };
    let fl: std::net::Ipv4Addr = "192.0.2.100".parse().expect("ip");
    let fl_ip = IpAddr::from(fl);
    chk.watch(fl_ip);
    let (c1, c2) = (c.node(0), c.node(1));

    // One holder of the floating address: no violation, seen in c1 and on the wire.
    let cidr = format!("{fl}/24");
    c1.exec_ok("ip", &["addr", "add", &cidr, "dev", "eth0"])
        .expect("add");
    let since = chk
        .wait_holder(fl_ip, "c1", Duration::from_secs(5))
        .expect("c1 holds it");
    settle();
    let h = chk.holder_of(fl_ip);
    assert_eq!(h.nodes, ["c1"]);
    assert_eq!(h.wire, ["c1"], "c1 answers ARP for it");
    assert_eq!(h.since, since);
    chk.assert_clean();

    // A second holder: flagged in the namespaces and on the wire.
    c2.exec_ok("ip", &["addr", "add", &cidr, "dev", "eth0"])
        .expect("add");
    settle();
    c2.exec_ok("ip", &["addr", "del", &cidr, "dev", "eth0"])
        .expect("del");
    c1.exec_ok("ip", &["addr", "del", &cidr, "dev", "eth0"])
        .expect("del");
    settle();
    let v = chk.violations();
    eprintln!("{v:#?}");
    let kinds: Vec<ViolationKind> = v.iter().map(|x| x.kind).collect();
    assert_eq!(
        kinds,
        [
            ViolationKind::AddressInNamespaces,
            ViolationKind::AddressOnWire
        ],
        "{v:?}"
    );
    for x in &v {
        assert_eq!(x.subject, fl.to_string());
        assert_eq!(x.holders, ["c1", "c2"]);
        assert!(x.samples >= 2 && x.first_seen <= x.last_seen, "{x:?}");
    }
    assert!(chk.holder_of(fl_ip).nodes.is_empty());
    chk.clear_violations();

    // A second primary in etcd: a node no daemon repairs, holding an alive key.
    let real = wait_until("the elected primary", Duration::from_secs(20), || {
        c.primary().ok().flatten()
    })
    .expect("primary");
    settle();
    assert_eq!(chk.primary().nodes, std::slice::from_ref(&real));
    chk.assert_clean();
    c.etcd_put("nodes/ghost1/alive", "{}").expect("put");
    c.etcd_put("nodes/ghost1/coordinator_state", "primary")
        .expect("put");
    settle();
    assert!(c.primary().is_err(), "two primaries");
    c.etcd_delete_prefix("nodes/ghost").expect("delete");
    settle();
    let v = chk.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::Primary);
    let mut want = vec![real.clone(), "ghost1".to_string()];
    want.sort();
    assert_eq!(v[0].holders, want);
    chk.clear_violations();
    // A `primary` left by a node without a lease is stale, not a second primary.
    c.etcd_put("nodes/ghost2/coordinator_state", "primary")
        .expect("put");
    settle();
    assert_eq!(chk.primary().nodes, std::slice::from_ref(&real));
    assert_eq!(c.primary().expect("one primary"), Some(real.clone()));
    c.etcd_delete_prefix("nodes/ghost").expect("delete");
    chk.assert_clean();

    // Network 300: the daemons create its bridge (no gateway in the spec, so no dnsmasq of
    // the primary's). A DHCP server started by hand on c1 stands in for one.
    c.etcd_put(
        "networks/300/spec",
        r#"{"type":"managed","ipv4":{"network":"10.3.0.0/24"}}"#,
    )
    .expect("network spec");
    for n in [c1, c2] {
        n.wait_link("dvbr300", Duration::from_secs(15))
            .expect("bridge");
    }
    c1.exec_ok("ip", &["addr", "add", "10.3.0.1/24", "dev", "dvbr300"])
        .expect("server address");
    let leases = c.dir().join("dvbr300.leases");
    let leasefile = format!("--dhcp-leasefile={}", leases.display());
    let _server = dnsmasq(
        &c,
        0,
        &[
            "--interface=dvbr300",
            "--bind-interfaces",
            "--user=root",
            "--dhcp-range=10.3.0.100,10.3.0.150,255.255.255.0,1h",
            &leasefile,
        ],
    );
    let guest = c1.dhcp_guest(300, "52:54:00:00:03:01").expect("guest");
    let lease = guest.dhcp().unwrap_or_else(|e| {
        let log = std::fs::read_to_string(c.dir().join("dnsmasq-0.log")).unwrap_or_default();
        panic!("no lease: {e}\n--- dnsmasq ---\n{log}")
    });
    eprintln!("{lease:?}");
    assert!(lease.ip.octets()[..3] == [10, 3, 0] && lease.ip.octets()[3] >= 100);
    assert_eq!(lease.server_id, Some(Ipv4Addr::new(10, 3, 0, 1)));
    assert_eq!(lease.prefix_len, Some(24));
    let server = lease.server_mac.as_deref().expect("the server's MAC");
    assert_eq!(c.node_of_mac(server).map(|n| n.name()), Some("c1"));
    // The guest asks again for its address and keeps it.
    let again = guest.dhcp_request(Some(lease.ip)).expect("renewal");
    assert_eq!(again.ip, lease.ip);
    guest.configure(&again).expect("configure");
    settle();
    let seen = chk.dnsmasq();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].node.as_str(), seen[0].vni), ("c1", Some(300)));
    chk.assert_clean();

    // A second dnsmasq naming the same bridge, on another node: flagged.
    let fake = dnsmasq(&c, 1, &["--interface=dvbr300"]);
    settle();
    drop(fake);
    settle();
    let v = chk.violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].kind, ViolationKind::Dnsmasq);
    assert_eq!(v[0].subject, "network 300");
    assert!(v[0].holders[0].starts_with("c1 pid ") && v[0].holders[1].starts_with("c2 pid "));
    chk.clear_violations();

    // Clean again.
    settle();
    chk.assert_clean();
    let stats = chk.stats();
    eprintln!("checker: {stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    skip_unless_root!();
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let c = Cluster::builder()
            .nodes(1)
            .etcd_members(1)
            .build()
            .expect("cluster");
        let _flap = c
            .node(0)
            .flap_link(Duration::from_secs(1), 100)
            .expect("flap");
        c.node(0).stop().expect("SIGSTOP");
        *seen.lock().expect("lock") = Some(Leftovers::of(&c));
        panic!("simulated test failure (expected)");
    });
    assert!(r.is_err());
    let left = seen.into_inner().expect("lock").expect("recorded");
    assert_eq!(left.pids.len(), 2, "a daemon and an etcd member");
    left.assert_gone();
}
