//! A node destroys a guest only on evidence (issue "guest safety"): an etcd that comes back
//! empty, a burst of deletions, a stray key naming a domain DebVisor did not create — none
//! of them takes a guest down until an operator confirms; and the keys a node owns are
//! repaired from etcd, not from its memory.
//!
//! Real KVM guests on `qemu:///system` where the break involved them (empty etcd, foreign
//! domain); the libvirt test driver elsewhere. Needs root for the real guests.

use std::time::Duration;

use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{
    assert_guest_uses_kvm, require_kvm, system_libvirt, test_driver_xml, TestDomain,
};
use debvisor_tests::{
    eventually, is_message, skip_unless_root, str_field, DaemonBuilder, DaemonProcess, EtcdProcess,
    TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn qemu_pid(rt: &tokio::runtime::Runtime, lv: &Libvirt, uuid: &str) -> Option<u32> {
    rt.block_on(lv.get(uuid))
        .ok()
        .flatten()
        .filter(|i| i.state == DomainState::Running)
        .and_then(|i| i.pid)
}

fn defined(rt: &tokio::runtime::Runtime, lv: &Libvirt, uuid: &str) -> bool {
    rt.block_on(lv.get(uuid)).ok().flatten().is_some()
}

fn lines_with(d: &DaemonProcess, msg: &str) -> Vec<Value> {
    d.json_lines()
        .into_iter()
        .filter(|l| is_message(l, msg))
        .collect()
}

fn health(etcd: &EtcdProcess, node: &str) -> Option<Value> {
    etcd.get_key(&format!("nodes/{node}/health"))
        .ok()
        .flatten()
        .and_then(|h| serde_json::from_str(&h).ok())
}

/// Wait until the node's health reports `count` held removals; returns the report.
fn wait_held(etcd: &EtcdProcess, node: &str, count: u64) -> Value {
    eventually(
        &format!("{node} reports {count} held removals"),
        WAIT,
        || {
            health(etcd, node)
                .map(|h| h["removals_held"].clone())
                .filter(|r| r["count"] == count)
        },
    )
}

/// Break 1: etcd comes back empty (a wiped data dir: same cluster id, revision back near 1).
/// The node re-registers into the new store, holds the removal of every guest, reports it,
/// and the guests keep running with the same qemu processes until an operator confirms.
#[test]
fn an_empty_etcd_destroys_no_guest_until_an_operator_confirms() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd");
    // Guests before the daemon: dropped after it, so a failing test leaves no qemu behind.
    let guests: Vec<TestDomain> = (0..3)
        .map(|i| TestDomain::new(&lv, &format!("wipe{i}")))
        .collect();
    let mut etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    let mut d = DaemonBuilder::qemu("wipe1", &etcd, state.path())
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    for g in &guests {
        let vm = TestVm::of_domain(g, WAIT);
        vm.put(
            &etcd,
            &[("xml", &g.xml()), ("node", "wipe1"), ("state", "start")],
        );
    }
    for g in &guests {
        TestVm::of_domain(g, WAIT).wait_status(&etcd, "running", "wipe1");
    }
    let pids: Vec<u32> = guests
        .iter()
        .map(|g| qemu_pid(&rt, &lv, &g.uuid).expect("qemu runs"))
        .collect();
    assert_guest_uses_kvm(pids[0]);

    etcd.wipe().expect("wipe etcd");
    d.wait_for_message("store replaced under this node", WAIT)
        .expect("the replaced store is noticed");
    d.wait_for_message("re-registered with a fresh lease", WAIT)
        .expect("the node registers into the new store");
    let held = wait_held(&etcd, "wipe1", 3);
    assert!(
        held["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("store replaced"),
        "{held}"
    );
    etcd.wait_ticks("wipe1", 3, WAIT);
    for (g, pid) in guests.iter().zip(&pids) {
        assert_eq!(
            qemu_pid(&rt, &lv, &g.uuid),
            Some(*pid),
            "{} still runs in the same qemu",
            g.name
        );
    }
    assert!(lines_with(
        &d,
        "vm removed from etcd; domain destroyed and undefined here"
    )
    .is_empty());
    let h = health(&etcd, "wipe1").expect("health");
    assert!(
        h["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|x| x.as_str().unwrap_or_default().contains("confirm-removals"))),
        "{h}"
    );

    // The operator says the empty store is the truth: now the guests go.
    let out = d.ctl_ok(&["node", "confirm-removals", "wipe1"]);
    assert!(out.contains("wipe1"), "{out}");
    for g in &guests {
        eventually(
            &format!("{} removed after the confirmation", g.name),
            WAIT,
            || (!defined(&rt, &lv, &g.uuid)).then_some(()),
        );
    }
    eventually("held removals cleared from health", WAIT, || {
        health(&etcd, "wipe1").filter(|h| h["removals_held"].is_null())
    });
    assert!(d.is_running());
}

/// Break 1, second half: a burst of deletions from the same store (a prefix delete) is held
/// as a mass removal; one VM removed on its own is removed after the settle time; a held
/// VM whose keys come back is simply adopted again.
#[test]
fn a_mass_deletion_is_held_until_confirmed_and_a_single_one_is_not() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("mass1")
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_DOMAINS_REMOVAL_SETTLE", "1s")
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let vms: Vec<TestVm> = (0..6)
        .map(|i| TestVm::new(&format!("mass{i}"), WAIT))
        .collect();
    for vm in &vms {
        let xml = test_driver_xml(&vm.name, &vm.uuid);
        vm.put(
            &etcd,
            &[("xml", &xml), ("node", "mass1"), ("state", "start")],
        );
    }
    for vm in &vms {
        vm.wait_status(&etcd, "running", "mass1");
    }
    let removed = |d: &DaemonProcess, vm: &TestVm| {
        lines_with(
            d,
            "vm removed from etcd; domain destroyed and undefined here",
        )
        .iter()
        .any(|l| str_field(l, "vm") == Some(vm.name.as_str()))
    };

    // One VM on its own: removed (after the settle time).
    etcd.delete_prefix(&format!("vms/{}/", vms[0].uuid))
        .expect("delete one");
    eventually("a single removal is carried out", WAIT, || {
        removed(&d, &vms[0]).then_some(())
    });

    // The other five at once: more than half of the node's VMs vanish — held.
    etcd.delete_prefix("vms/").expect("delete all");
    d.wait_for_message("removals from etcd held", WAIT)
        .expect("mass removal held");
    let held = wait_held(&etcd, "mass1", 5);
    // The single removal a moment ago counts in the same window.
    assert!(
        held["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("VMs vanished from etcd within"),
        "{held}"
    );
    etcd.wait_ticks("mass1", 3, WAIT);
    for vm in &vms[1..] {
        assert!(
            !removed(&d, vm),
            "{} was destroyed despite the hold",
            vm.name
        );
    }

    // Keys that come back: the VM is simply adopted again.
    let back = &vms[1];
    back.put(
        &etcd,
        &[
            ("xml", &test_driver_xml(&back.name, &back.uuid)),
            ("node", "mass1"),
            ("state", "start"),
        ],
    );
    back.wait_status(&etcd, "running", "mass1");
    wait_held(&etcd, "mass1", 4);

    d.ctl_ok(&["node", "confirm-removals", "mass1"]);
    for vm in &vms[2..] {
        eventually(
            &format!("{} removed after the confirmation", vm.name),
            WAIT,
            || removed(&d, vm).then_some(()),
        );
    }
    assert!(!removed(&d, back), "the VM whose keys came back stays");
    eventually("held removals cleared", WAIT, || {
        health(&etcd, "mass1").filter(|h| h["removals_held"].is_null())
    });
}

/// Break 2: a domain created outside DebVisor is never destroyed, whatever appears and
/// disappears under `vms/<its uuid>/`.
#[test]
fn a_domain_debvisor_did_not_create_is_never_destroyed() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = system_libvirt().expect("libvirtd");
    let g = TestDomain::new(&lv, "foreign");
    rt.block_on(lv.define(&g.xml())).expect("define by hand");
    rt.block_on(lv.start(&g.uuid)).expect("start by hand");
    let pid = qemu_pid(&rt, &lv, &g.uuid).expect("qemu runs");
    assert_guest_uses_kvm(pid);
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    let mut d = DaemonBuilder::qemu("frgn1", &etcd, state.path())
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let vm = TestVm::of_domain(&g, WAIT);

    // A stray key, then its deletion.
    vm.put(&etcd, &[("metadata", "{}")]);
    eventually("the stray VM reported invalid", WAIT, || {
        vm.status(&etcd).filter(|s| s["state"] == "invalid")
    });
    etcd.delete_prefix(&format!("vms/{}/", g.uuid))
        .expect("delete");
    d.wait_for_message(
        "keys of a VM removed from etcd named a domain DebVisor did not define",
        WAIT,
    )
    .expect("left alone");
    assert_eq!(qemu_pid(&rt, &lv, &g.uuid), Some(pid));

    // A full definition for this UUID asking to stop it on this node: refused, left alone.
    vm.put(
        &etcd,
        &[("xml", &g.xml()), ("node", "frgn1"), ("state", "stop")],
    );
    let s = vm.wait_status(&etcd, "fail", "frgn1");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not defined by DebVisor"),
        "{s}"
    );
    etcd.put_key(&vm.key("state"), "start").expect("start");
    // Its definition touched by hand (once the start request has been looked at): the daemon
    // no longer remembers that the domain is not its own, so the start path sends the run
    // lock before it looks at the host — and gives the lock back once it has looked.
    etcd.wait_ticks("frgn1", 2, WAIT);
    rt.block_on(lv.define(&g.xml())).expect("redefine by hand");
    eventually("the early run lock given back", WAIT, || {
        lines_with(&d, "early run lock given back")
            .into_iter()
            .next()
    });
    assert_eq!(vm.get(&etcd, "lock"), None, "no run lock left behind");
    assert_eq!(
        vm.get(&etcd, "owner"),
        None,
        "owner put back as it was (none)"
    );
    etcd.delete_prefix(&format!("vms/{}/", g.uuid))
        .expect("delete again");
    etcd.wait_ticks("frgn1", 3, WAIT);
    assert_eq!(
        qemu_pid(&rt, &lv, &g.uuid),
        Some(pid),
        "the foreign guest still runs"
    );
    assert!(lines_with(&d, "domain destroyed").is_empty());
    assert!(lines_with(
        &d,
        "vm removed from etcd; domain destroyed and undefined here"
    )
    .is_empty());
}

/// Break 5: the keys a node owns are compared with etcd on every tick and repaired.
#[test]
fn owned_keys_deleted_or_forged_are_repaired() {
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = DaemonBuilder::new("own1")
        .endpoints(&[etcd.endpoint()])
        .spawn()
        .expect("spawn");
    d.wait_run(WAIT).expect("run");
    let vm = TestVm::new("own", WAIT);
    vm.put(
        &etcd,
        &[
            ("xml", &test_driver_xml(&vm.name, &vm.uuid)),
            ("node", "own1"),
            ("state", "start"),
        ],
    );
    vm.wait_status(&etcd, "running", "own1");

    // The VM's status: deleted, then forged.
    etcd.delete_prefix(&vm.key("status"))
        .expect("delete status");
    vm.wait_status(&etcd, "running", "own1");
    etcd.put_key(
        &vm.key("status"),
        r#"{"state":"stopped","since":"2020-01-01T00:00:00Z","reason":"forged","error":null,"node":"own1"}"#,
    )
    .expect("forge status");
    vm.wait_status(&etcd, "running", "own1");
    // The owner, deleted while this node holds the lock.
    etcd.delete_prefix(&vm.key("owner")).expect("delete owner");
    eventually("owner repaired", WAIT, || {
        (vm.get(&etcd, "owner").as_deref() == Some("own1")).then_some(())
    });

    // The node's own keys.
    let key = |f: &str| format!("nodes/own1/{f}");
    let wait_value = |f: &str, want: &str| {
        eventually(&format!("{f} repaired to {want}"), WAIT, || {
            (etcd.get_key(&key(f)).ok().flatten().as_deref() == Some(want)).then_some(())
        })
    };
    etcd.put_key(&key("daemon_state"), "stop")
        .expect("forge daemon_state");
    wait_value("daemon_state", "run");
    etcd.put_key(&key("domain_state"), "garbage")
        .expect("garbage domain_state");
    wait_value("domain_state", "ready");
    wait_value("coordinator_state", "primary");
    etcd.put_key(&key("coordinator_state"), "client")
        .expect("forge role");
    wait_value("coordinator_state", "primary");
    etcd.delete_prefix(&key("mode")).expect("delete mode");
    wait_value("mode", "standalone");
    etcd.put_key(&key("info"), "{not json")
        .expect("garbage info");
    eventually("info repaired", WAIT, || {
        etcd.get_key(&key("info"))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str::<Value>(&v).ok())
            .filter(|v| v["hostname"].is_string())
    });
    // The log line follows the repaired value; the harness reads the daemon's stderr on its
    // own thread, so the line may arrive a moment after the value is seen in etcd.
    for f in [
        "daemon_state",
        "domain_state",
        "coordinator_state",
        "mode",
        "info",
    ] {
        eventually(&format!("a repair of {f} is logged"), WAIT, || {
            lines_with(&d, "own key repaired")
                .iter()
                .any(|l| str_field(l, "key") == Some(f))
                .then_some(())
        });
    }

    // A garbage `status` (the primary's key) does not make the node invalid for anyone.
    etcd.put_key(&key("status"), "BAD").expect("garbage status");
    etcd.wait_ticks("own1", 2, WAIT);
    // Exit 3: the garbage status needs attention; the nodes are listed anyway.
    let out = d.ctl(&["--output", "json", "status"]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: Value = serde_json::from_slice(&out.stdout).expect("json");
    let me = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == "own1"))
        .cloned()
        .expect("own1 listed");
    assert_eq!(me["valid"], true, "{me}");
    assert_eq!(me["daemon_state"], "run", "{me}");
    assert!(d.is_running());
}
