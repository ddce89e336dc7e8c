//! The full VM resync is off the keepalive tick (issue 17): a guest that changes behind the
//! daemon's back is followed through its libvirt event, without a full resync; what no
//! event reports (a domain defined by hand after the daemon started) is found by the full
//! resync on its own `domains.resync_interval`.
//!
//! Real KVM guests on `qemu:///system` (the test driver's host lives inside the daemon, so
//! nothing can change it behind its back). Needs root and KVM. The daemon logs at debug
//! level: each full resync writes one `full VM resync` line.

use std::time::Duration;

use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{require_kvm, system_libvirt, TestDomain};
use debvisor_tests::{
    is_message, skip_unless_root, str_field, DaemonBuilder, DaemonProcess, EtcdProcess, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const FULL_RESYNC: &str = "full VM resync";

fn qemu_pid(rt: &tokio::runtime::Runtime, lv: &Libvirt, uuid: &str) -> Option<u32> {
    rt.block_on(lv.get(uuid))
        .ok()
        .flatten()
        .filter(|i| i.state == DomainState::Running)
        .and_then(|i| i.pid)
}

fn daemon(node: &str, etcd: &EtcdProcess, state: &std::path::Path, resync: &str) -> DaemonProcess {
    let mut d = DaemonBuilder::qemu(node, etcd, state)
        .env("DEBVISOR_DOMAINS_RESYNC_INTERVAL", resync)
        .env("DEBVISOR_DOMAINS_RESTART_BACKOFF", "200ms")
        .env("DEBVISOR_LOGGING_LEVEL", "debug")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

/// Index of the first line at or after `from` that is `msg` (for `vm` when given).
fn first_after(lines: &[Value], from: usize, msg: &str, vm: Option<&str>) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| is_message(l, msg) && vm.is_none_or(|v| str_field(l, "vm") == Some(v)))
        .map(|(i, _)| i)
}

/// A guest destroyed by hand is restarted because libvirt told the daemon so: with the full
/// resync at 10 minutes (it ran at the first tick), none runs from the destroy through the
/// restart and the keepalive ticks after it.
#[test]
fn a_guest_destroyed_behind_the_daemons_back_is_followed_by_its_event() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd");
    // Before the daemon: dropped after it, so a failing test leaves no qemu behind.
    let g = TestDomain::new(&lv, "evres");
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    let mut d = daemon("evres1", &etcd, state.path(), "10m");
    let vm = TestVm::of_domain(&g, WAIT);
    vm.put(
        &etcd,
        &[("xml", &g.xml()), ("node", "evres1"), ("state", "start")],
    );
    vm.wait_status(&etcd, "running", "evres1");
    d.wait_for(|l| is_message(l, FULL_RESYNC), WAIT)
        .expect("the first full resync ran");
    let pid = qemu_pid(&rt, &lv, &g.uuid).expect("qemu runs");

    let before = d.json_lines().len();
    rt.block_on(lv.destroy(&g.uuid))
        .expect("destroy behind the daemon's back");
    d.wait_for(
        |l| {
            is_message(l, "vm stopped unexpectedly; restarting after backoff")
                && str_field(l, "vm") == Some(g.name.as_str())
        },
        WAIT,
    )
    .expect("the stop is noticed");
    let restarted = debvisor_tests::eventually("the guest runs again", WAIT, || {
        qemu_pid(&rt, &lv, &g.uuid).filter(|p| *p != pid)
    });
    assert_ne!(restarted, pid);
    // Keepalive ticks after all that: none of them, nor anything since the destroy, ran a
    // full resync (the tick does not list the domains; the event did the work).
    etcd.wait_ticks("evres1", 3, WAIT);
    let lines = d.json_lines();
    assert!(
        first_after(
            &lines,
            before,
            "vm stopped unexpectedly; restarting after backoff",
            Some(&g.name),
        )
        .is_some(),
        "the stop line after the destroy"
    );
    assert_eq!(
        first_after(&lines, before, FULL_RESYNC, None).map(|i| &lines[i]),
        None,
        "a full resync ran after the destroy: the keepalive tick lists the domains again"
    );
}

/// A domain defined by hand after the daemon's first full resync sends an event the daemon
/// does not act on (no VM of that UUID): only a later full resync, on its own interval,
/// notes it as foreign, and it is left alone.
#[test]
fn a_domain_no_event_reports_is_found_by_the_full_resync_on_its_interval() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd");
    let g = TestDomain::new(&lv, "slowres");
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    let mut d = daemon("slowres1", &etcd, state.path(), "3s");
    d.wait_for(|l| is_message(l, FULL_RESYNC), WAIT)
        .expect("the first full resync ran");
    let before = d.json_lines().len();
    rt.block_on(lv.define(&g.xml())).expect("define by hand");
    d.wait_for(
        |l| {
            is_message(l, "foreign domain (not defined by this node) left alone")
                && str_field(l, "vm") == Some(g.name.as_str())
        },
        WAIT,
    )
    .expect("the full resync notes the foreign domain");
    let lines = d.json_lines();
    let noted = first_after(
        &lines,
        before,
        "foreign domain (not defined by this node) left alone",
        Some(&g.name),
    )
    .expect("the note after the define");
    assert!(
        first_after(&lines, before, FULL_RESYNC, None).is_some_and(|i| i < noted),
        "the note came from a full resync after the define"
    );
    assert!(
        rt.block_on(lv.get(&g.uuid)).ok().flatten().is_some(),
        "the foreign domain is still defined"
    );
}
