//! The domain-XML policy (`domains.xml_policy`) through real daemons on libvirt's test driver
//! (`test:///default`) and a real etcd: a VM whose XML asks for qemu passthrough or a disk on
//! a host file outside the allowed directories is `invalid` with the element named and is
//! never defined; a running VM whose XML turns refused keeps running; the config switches
//! allow what they name. The same refusal on `qemu:///system` is in `domain_qemu.rs`.

use std::time::Duration;

use debvisor_tests::libvirt::test_driver_xml;
use debvisor_tests::{
    eventually, is_message, str_field, DaemonBuilder, DaemonProcess, EtcdProcess, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

fn daemon(etcd: &EtcdProcess, node: &str, env: &[(&str, &str)]) -> DaemonProcess {
    let mut b = DaemonBuilder::new(node)
        .endpoints(&[etcd.endpoint()])
        .clustered(&[node])
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s");
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut d = b.spawn().expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

/// The test driver's guest with a `<qemu:commandline>` passing `-S`.
fn passthrough_xml(vm: &TestVm) -> String {
    test_driver_xml(&vm.name, &vm.uuid)
        .replacen(
            "<domain type='test'>",
            &format!("<domain type='test' xmlns:qemu='{QEMU_NS}'>"),
            1,
        )
        .replacen(
            "</domain>",
            "  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>\n</domain>",
            1,
        )
}

/// The test driver's guest with a disk on `/etc/shadow`.
fn shadow_xml(vm: &TestVm) -> String {
    test_driver_xml(&vm.name, &vm.uuid).replacen(
        "</domain>",
        "  <devices><disk type='file' device='disk'><source file='/etc/shadow'/>\
         <target dev='vda' bus='virtio'/></disk></devices>\n</domain>",
        1,
    )
}

fn wait_invalid(etcd: &EtcdProcess, vm: &TestVm, node: &str) -> Value {
    eventually(&format!("{} invalid", vm.name), WAIT, || {
        vm.status(etcd)
            .filter(|s| s["state"] == "invalid" && s["node"] == node)
    })
}

fn logged(d: &DaemonProcess, msg: &str, vm: &str) -> bool {
    d.json_lines()
        .iter()
        .any(|l| is_message(l, msg) && str_field(l, "vm") == Some(vm))
}

#[test]
fn refused_xml_is_invalid_with_the_element_named_and_never_defined() {
    let etcd = EtcdProcess::start().expect("etcd");
    let d = daemon(&etcd, "pol1", &[]);
    let qemu = TestVm::new("qemu", WAIT);
    let shadow = TestVm::new("shadow", WAIT);
    let good = TestVm::new("good", WAIT);
    for (vm, xml) in [
        (&qemu, passthrough_xml(&qemu)),
        (&shadow, shadow_xml(&shadow)),
        (&good, test_driver_xml(&good.name, &good.uuid)),
    ] {
        vm.put(
            &etcd,
            &[("xml", &xml), ("node", "pol1"), ("state", "start")],
        );
    }
    good.wait_status(&etcd, "running", "pol1");

    let s = wait_invalid(&etcd, &qemu, "pol1");
    assert_eq!(
        s["error"],
        "xml: <qemu:commandline> is not allowed (domains.xml_policy.allow_qemu_passthrough)",
        "{s}"
    );
    // "nothing done": the daemon's libvirt has no domain of that UUID.
    assert_eq!(s["reason"], "definition invalid; nothing done", "{s}");
    let s = wait_invalid(&etcd, &shadow, "pol1");
    assert_eq!(
        s["error"],
        "xml: <disk type='file' device='disk'> source file /etc/shadow is not under \
         domains.xml_policy.disk_dirs",
        "{s}"
    );
    assert_eq!(s["reason"], "definition invalid; nothing done", "{s}");

    // Several resync ticks later (positive signal: the keepalive went on), still nothing
    // on the host, no lock taken.
    etcd.wait_ticks("pol1", 3, WAIT);
    for vm in [&qemu, &shadow] {
        assert_eq!(
            vm.status(&etcd).map(|s| s["state"].clone()),
            Some("invalid".into())
        );
        assert!(vm.get(&etcd, "lock").is_none(), "{}: lock taken", vm.name);
        assert!(
            !logged(&d, "domain defined from etcd", &vm.name),
            "{} defined",
            vm.name
        );
        assert!(
            !logged(&d, "domain started", &vm.name),
            "{} started",
            vm.name
        );
    }
    // The journal line: warn, `vm state changed` to invalid with the element in `error`.
    let line = d
        .json_lines()
        .into_iter()
        .find(|l| {
            is_message(l, "vm state changed")
                && str_field(l, "uuid") == Some(qemu.uuid.as_str())
                && str_field(l, "to") == Some("invalid")
        })
        .expect("invalid transition logged");
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(
        str_field(&line, "error").is_some_and(|e| e.contains("<qemu:commandline>")),
        "{line}"
    );
    let s = good.status(&etcd).expect("good status");
    assert_eq!(s["state"], "running", "other VMs unaffected: {s}");
}

#[test]
fn a_running_vm_turning_refused_keeps_running_and_the_switches_allow() {
    let etcd = EtcdProcess::start().expect("etcd");
    let d = daemon(&etcd, "pol2", &[]);
    let vm = TestVm::new("turns", WAIT);
    let plain = test_driver_xml(&vm.name, &vm.uuid);
    vm.put(
        &etcd,
        &[("xml", &plain), ("node", "pol2"), ("state", "start")],
    );
    vm.wait_status(&etcd, "running", "pol2");

    etcd.put_key(&vm.key("xml"), &passthrough_xml(&vm))
        .expect("new xml");
    let s = wait_invalid(&etcd, &vm, "pol2");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("left as it is"),
        "{s}"
    );
    // Three keepalive ticks later (the daemon went on working), still nothing done to it.
    etcd.wait_ticks("pol2", 3, WAIT);
    assert!(!logged(&d, "domain destroyed", &vm.name), "destroyed");
    assert!(!logged(&d, "ACPI shutdown sent", &vm.name), "shut down");
    assert_eq!(vm.get(&etcd, "lock").as_deref(), Some("pol2"), "lock kept");
    // Back to an allowed XML: found running, not restarted.
    etcd.put_key(&vm.key("xml"), &plain).expect("repair");
    let s = vm.wait_status(&etcd, "running", "pol2");
    assert_eq!(s["reason"], "running", "not restarted: {s}");
    assert!(!logged(&d, "domain destroyed", &vm.name), "destroyed");

    // A node whose policy allows passthrough and disks in /etc runs both.
    let _open = daemon(
        &etcd,
        "pol3",
        &[
            ("DEBVISOR_DOMAINS_XML_POLICY_ALLOW_QEMU_PASSTHROUGH", "true"),
            ("DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS", "/etc"),
        ],
    );
    let qemu = TestVm::new("qemu-ok", WAIT);
    let shadow = TestVm::new("shadow-ok", WAIT);
    for (v, xml) in [
        (&qemu, passthrough_xml(&qemu)),
        (&shadow, shadow_xml(&shadow)),
    ] {
        v.put(
            &etcd,
            &[("xml", &xml), ("node", "pol3"), ("state", "start")],
        );
    }
    qemu.wait_status(&etcd, "running", "pol3");
    shadow.wait_status(&etcd, "running", "pol3");
}
