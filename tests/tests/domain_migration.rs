//! Migration and drain through the daemons with real KVM guests: two `debvisord` nodes,
//! each driving its own isolated libvirtd (own network, mount and UTS namespaces, reached
//! over a veth pair), one etcd. `debvisorctl vm migrate --live --wait` moves a running guest
//! (its qemu process moves, the target adopts it without booting it); `node flush --wait`
//! drains a node by each VM's method and `node unflush --wait` brings the VMs back.
//!
//! Needs root. The harness removes every libvirtd, qemu, namespace and directory on drop.

use std::time::Duration;

use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{assert_guest_uses_kvm, require_kvm, tiny_guest_xml};
use debvisor_tests::libvirt_pair::process_netns_inode;
use debvisor_tests::{
    is_message, skip_unless_root, str_field, DaemonBuilder, DaemonProcess, EtcdProcess,
    IsolatedLibvirt, LibvirtPair, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn daemon(etcd: &EtcdProcess, node: &str, lv: &IsolatedLibvirt) -> DaemonProcess {
    let mut d = DaemonBuilder::new(node)
        .endpoints(&[etcd.endpoint()])
        .clustered(&[node])
        .env("DEBVISOR_HYPERVISOR_URI", &lv.local_uri())
        .env("DEBVISOR_HYPERVISOR_PEER_URI", &lv.peer_uri())
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

/// A tiny KVM guest with its migration method, written in one transaction.
fn define(g: &TestVm, etcd: &EtcdProcess, node: &str, method: &str) {
    let xml = tiny_guest_xml(&g.name, &g.uuid);
    let meta = format!("{{\"migration_method\":\"{method}\"}}");
    g.put(
        etcd,
        &[
            ("xml", &xml),
            ("node", node),
            ("metadata", &meta),
            ("state", "start"),
        ],
    );
}

fn wait_running_on(g: &TestVm, etcd: &EtcdProcess, node: &str) -> Value {
    g.wait_status(etcd, "running", node)
}

fn qemu_pid(rt: &tokio::runtime::Runtime, lv: &Libvirt, uuid: &str) -> Option<u32> {
    rt.block_on(lv.get(uuid))
        .ok()
        .flatten()
        .filter(|i| i.state == DomainState::Running)
        .and_then(|i| i.pid)
}

fn started_here(d: &DaemonProcess, g: &TestVm) -> bool {
    d.json_lines()
        .iter()
        .any(|l| is_message(l, "domain started") && str_field(l, "vm") == Some(g.name.as_str()))
}

#[test]
fn live_migration_and_a_two_node_drain_with_real_guests() {
    skip_unless_root!();
    require_kvm();
    let pair = LibvirtPair::start().expect("two isolated libvirtds");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (lva, lvb) = (
        pair.a.libvirt(Duration::from_secs(30)),
        pair.b.libvirt(Duration::from_secs(30)),
    );
    let etcd = EtcdProcess::start().expect("etcd");
    let a = daemon(&etcd, "kvm-a", &pair.a);
    let b = daemon(&etcd, "kvm-b", &pair.b);

    // Live migration requested with the CLI, waited for with the CLI.
    let g = TestVm::new("live", WAIT);
    define(&g, &etcd, "kvm-a", "live");
    wait_running_on(&g, &etcd, "kvm-a");
    let pid_a = qemu_pid(&rt, &lva, &g.uuid).expect("qemu on a");
    assert_eq!(process_netns_inode(pid_a), Some(pair.a.netns_inode()));
    assert_guest_uses_kvm(pid_a);
    a.ctl_ok(&[
        "vm",
        "migrate",
        &g.name,
        "--live",
        "--target",
        "kvm-b",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let s = wait_running_on(&g, &etcd, "kvm-b");
    assert_eq!(s["reason"], "migrated", "{s}");
    let pid_b = qemu_pid(&rt, &lvb, &g.uuid).expect("qemu on b");
    assert_ne!(pid_b, pid_a);
    assert_guest_uses_kvm(pid_b);
    assert_eq!(process_netns_inode(pid_b), Some(pair.b.netns_inode()));
    assert!(
        rt.block_on(lva.get(&g.uuid)).expect("get on a").is_none(),
        "nothing left on the source"
    );
    assert!(
        !started_here(&b, &g),
        "the target adopted the guest, it did not boot it"
    );
    assert!(a
        .json_lines()
        .iter()
        .any(|l| is_message(l, "live migration done") && str_field(l, "vm") == Some(&g.name)));
    assert_eq!(g.get(&etcd, "owner").as_deref(), Some("kvm-b"));
    assert_eq!(g.get(&etcd, "lock").as_deref(), Some("kvm-b"));
    assert_eq!(g.get(&etcd, "last_node").as_deref(), Some("kvm-a"));
    assert_eq!(g.get(&etcd, "state").as_deref(), Some("start"));

    // Back with unmigrate; then drain kvm-a with one live and one shutdown-method guest.
    a.ctl_ok(&["vm", "unmigrate", &g.name, "--wait", "--timeout", "60s"]);
    wait_running_on(&g, &etcd, "kvm-a");
    assert!(g.get(&etcd, "last_node").is_none());
    let h = TestVm::new("cold", WAIT);
    define(&h, &etcd, "kvm-a", "shutdown");
    wait_running_on(&h, &etcd, "kvm-a");
    let live_pid = qemu_pid(&rt, &lva, &g.uuid).expect("live guest on a");

    a.ctl_ok(&["node", "flush", "kvm-a", "--wait", "--timeout", "90s"]);
    wait_running_on(&g, &etcd, "kvm-b");
    wait_running_on(&h, &etcd, "kvm-b");
    assert!(
        rt.block_on(lva.list()).expect("list a").is_empty(),
        "kvm-a is empty"
    );
    let moved = qemu_pid(&rt, &lvb, &g.uuid).expect("live guest on b");
    assert_ne!(moved, live_pid);
    assert!(
        b.json_lines()
            .iter()
            .any(|l| is_message(l, "domain started") && str_field(l, "vm") == Some(&h.name)),
        "the shutdown-method guest was booted on the target"
    );

    a.ctl_ok(&["node", "unflush", "kvm-a", "--wait", "--timeout", "90s"]);
    wait_running_on(&g, &etcd, "kvm-a");
    wait_running_on(&h, &etcd, "kvm-a");
    assert!(
        rt.block_on(lvb.list()).expect("list b").is_empty(),
        "kvm-b is empty again"
    );
    assert_eq!(
        etcd.get_key("nodes/kvm-a/domain_state")
            .expect("get")
            .as_deref(),
        Some("ready")
    );
}
