//! The Domain object end to end with real KVM guests (`qemu:///system`, TCG without
//! /dev/kvm): etcd → running qemu; stop; a guest that ignores ACPI destroyed after the
//! timeout; a killed qemu restarted; a daemon killed with SIGKILL and restarted adopts the
//! running guest (same qemu PID); a bad definition, or one the XML policy refuses (a disk on
//! /etc/shadow), reported without touching the host.
//!
//! Needs root. Every guest is removed by its guard, also when a test fails: guards are
//! declared before the daemons, so a daemon is always killed before the guests go.

use std::time::Duration;

use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{assert_guest_uses_kvm, require_kvm, system_libvirt, TestDomain};
use debvisor_tests::{
    eventually, is_message, skip_unless_root, str_field, DaemonBuilder, DaemonProcess, EtcdProcess,
    TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn libvirt() -> (tokio::runtime::Runtime, Libvirt) {
    system_libvirt().expect("libvirtd running")
}

fn daemon(etcd: &EtcdProcess, node: &str, state_dir: &std::path::Path) -> DaemonProcess {
    daemon_with(DaemonBuilder::qemu(node, etcd, state_dir))
}

fn daemon_with(b: DaemonBuilder) -> DaemonProcess {
    let mut d = b
        .env("DEBVISOR_DOMAINS_RESTART_BACKOFF", "200ms")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

/// The etcd side of a test guest (the `TestDomain` guard removes it from libvirt).
fn vm(d: &TestDomain) -> TestVm {
    TestVm::of_domain(d, WAIT)
}

fn key(d: &TestDomain, f: &str) -> String {
    vm(d).key(f)
}

fn status(etcd: &EtcdProcess, d: &TestDomain) -> Option<Value> {
    vm(d).status(etcd)
}

/// Wait for `state`, whichever node writes it (each test here has one node).
fn wait_status(etcd: &EtcdProcess, d: &TestDomain, state: &str) -> Value {
    eventually(&format!("{} status {state}", d.name), WAIT, || {
        status(etcd, d).filter(|s| s["state"] == state)
    })
}

fn qemu_pid(rt: &tokio::runtime::Runtime, lv: &Libvirt, d: &TestDomain) -> Option<u32> {
    rt.block_on(lv.get(&d.uuid))
        .ok()
        .flatten()
        .filter(|i| i.state == DomainState::Running)
        .and_then(|i| i.pid)
}

fn define(etcd: &EtcdProcess, d: &TestDomain, node: &str) {
    let xml = d.xml();
    vm(d).put(etcd, &[("xml", &xml), ("node", node), ("state", "start")]);
}

#[test]
fn real_guest_lifecycle_crash_restart_and_acpi_timeout() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = libvirt();
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    // Guests before the daemon: locals drop in reverse order, so on a failure the daemon is
    // killed first and cannot define or start a guest again after its guard removed it.
    let g = TestDomain::new(&lv, "e2e");
    let dmn = daemon(&etcd, "kvm1", state.path());
    define(&etcd, &g, "kvm1");
    wait_status(&etcd, &g, "running");
    let pid = qemu_pid(&rt, &lv, &g).expect("a qemu process runs the guest");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("qemu cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&g.uuid),
        "the qemu process is our guest's"
    );
    assert_guest_uses_kvm(pid);

    // qemu killed under libvirt: restarted with a new process, the reason logged.
    // SAFETY: kill(2) of the qemu process of the guest this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let new_pid = eventually("guest restarted after its qemu was killed", WAIT, || {
        qemu_pid(&rt, &lv, &g).filter(|p| *p != pid)
    });
    assert_ne!(new_pid, pid);
    let line = eventually("crash logged", WAIT, || {
        dmn.json_lines().into_iter().find(|l| {
            is_message(l, "vm stopped unexpectedly; restarting after backoff")
                && str_field(l, "vm") == Some(g.name.as_str())
        })
    });
    // libvirt's shut-off reason for a qemu that died under it.
    assert_eq!(line["reason"], "crashed", "{line}");
    wait_status(&etcd, &g, "running");

    // The guest has no OS and ignores ACPI: destroyed after the 3 s timeout.
    etcd.put_key(&key(&g, "state"), "shutdown")
        .expect("shutdown");
    wait_status(&etcd, &g, "shutting-down");
    let s = wait_status(&etcd, &g, "stopped");
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("ignored ACPI"),
        "{s}"
    );
    assert_eq!(qemu_pid(&rt, &lv, &g), None);

    // stop of a running guest destroys it at once; the definition stays.
    etcd.put_key(&key(&g, "state"), "start").expect("start");
    wait_status(&etcd, &g, "running");
    etcd.put_key(&key(&g, "state"), "stop").expect("stop");
    wait_status(&etcd, &g, "stopped");
    let info = rt
        .block_on(lv.get(&g.uuid))
        .expect("get")
        .expect("still defined");
    assert_eq!(info.state, DomainState::Shutoff);
    assert!(info.persistent);
}

#[test]
fn restarted_daemon_adopts_running_guests() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = libvirt();
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    // Guests before the daemon: locals drop in reverse order, so on a failure the daemon is
    // killed first and cannot define or start a guest again after its guard removed it.
    let g = TestDomain::new(&lv, "adopt");
    let mut first = daemon(&etcd, "kvm2", state.path());
    define(&etcd, &g, "kvm2");
    wait_status(&etcd, &g, "running");
    let pid = qemu_pid(&rt, &lv, &g).expect("qemu pid");
    assert_guest_uses_kvm(pid);

    first.kill().expect("SIGKILL the daemon");
    let _ = first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        qemu_pid(&rt, &lv, &g),
        Some(pid),
        "guest survives the daemon"
    );

    let second = daemon(&etcd, "kvm2", state.path());
    eventually("lock taken by the new daemon", WAIT, || {
        second
            .json_lines()
            .into_iter()
            .find(|l| is_message(l, "run lock acquired") && str_field(l, "vm") == Some(&g.name))
    });
    wait_status(&etcd, &g, "running");
    assert_eq!(qemu_pid(&rt, &lv, &g), Some(pid), "same qemu process");
    assert!(
        !second
            .json_lines()
            .iter()
            .any(|l| is_message(l, "domain started") && str_field(l, "vm") == Some(&g.name)),
        "the new daemon did not start the guest again"
    );

    // Graceful daemon stop keeps guests running (on_shutdown: keep).
    drop(second);
    assert_eq!(qemu_pid(&rt, &lv, &g), Some(pid));

    // "Host reboot": the guest is off when the daemon comes up; its state is start, so it
    // comes back.
    rt.block_on(lv.destroy(&g.uuid))
        .expect("power the guest off");
    let third = daemon(&etcd, "kvm2", state.path());
    let back = eventually("guest started again after the 'reboot'", WAIT, || {
        qemu_pid(&rt, &lv, &g)
    });
    assert_ne!(back, pid);
    wait_status(&etcd, &g, "running");
    drop(third);
}

#[test]
fn bad_definition_reports_the_field() {
    skip_unless_root!();
    require_kvm();
    let (rt, lv) = libvirt();
    let etcd = EtcdProcess::start().expect("etcd");
    let state = tempfile::tempdir().expect("state dir");
    // Guests before the daemon: locals drop in reverse order, so on a failure the daemon is
    // killed first and cannot define or start a guest again after its guard removed it.
    let g = TestDomain::new(&lv, "bad");
    let h = TestDomain::new(&lv, "worse");
    let k = TestDomain::new(&lv, "nodisk");
    let e = TestDomain::new(&lv, "shadow");
    // The disk of the `nodisk` guest below lives in /nonexistent: this node's policy allows
    // that directory (and only it) for file disks.
    let _d = daemon_with(
        DaemonBuilder::qemu("kvm3", &etcd, state.path())
            .env("DEBVISOR_DOMAINS_XML_POLICY_DISK_DIRS", "/nonexistent"),
    );
    // Well-formed for us, refused by libvirt (unknown machine type).
    let xml = g.xml().replace("machine='pc'", "machine='no-such-machine'");
    etcd.put_keys(&[
        (&key(&g, "xml"), &xml),
        (&key(&g, "node"), "kvm3"),
        (&key(&g, "state"), "start"),
    ])
    .expect("define");
    let s = eventually("libvirt's refusal reported", WAIT, || {
        status(&etcd, &g).filter(|s| s["error"].is_string())
    });
    let err = s["error"].as_str().unwrap_or_default();
    assert!(err.starts_with("xml: "), "{s}");
    assert!(err.contains("define domain"), "libvirt's own message: {s}");
    assert_eq!(s["state"], "fail", "{s}");

    // Not XML at all: invalid before libvirt is asked.
    etcd.put_keys(&[
        (&key(&h, "xml"), "<domain"),
        (&key(&h, "node"), "kvm3"),
        (&key(&h, "state"), "start"),
    ])
    .expect("define");
    let s = eventually("invalid xml reported", WAIT, || {
        status(&etcd, &h).filter(|s| s["state"] == "invalid")
    });
    assert!(s["error"].as_str().unwrap_or_default().starts_with("xml: "));

    // Defined fine, but every start fails (its disk does not exist): retried with backoff,
    // then `fail` with the last error.
    let xml = k.xml().replace(
        "</devices>",
        "<disk type='file' device='disk'><source file='/nonexistent/debvisor-test.img'/>\
         <target dev='vda' bus='virtio'/></disk></devices>",
    );
    assert!(
        xml.contains("nonexistent"),
        "the tiny guest XML has a <devices> element"
    );
    etcd.put_keys(&[
        (&key(&k, "xml"), &xml),
        (&key(&k, "node"), "kvm3"),
        (&key(&k, "state"), "start"),
    ])
    .expect("define");
    let s = wait_status(&etcd, &k, "fail");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("3 failed starts"), "{s}");
    assert!(reason.contains("start failed"), "{s}");

    // A disk on a root-only host file outside the policy's directories: invalid before
    // libvirt is asked — never defined, the file's owner and mode untouched.
    let shadow = std::fs::metadata("/etc/shadow").expect("/etc/shadow");
    let xml = e.xml().replace(
        "</devices>",
        "<disk type='file' device='disk'><source file='/etc/shadow'/>\
         <target dev='vda' bus='virtio'/></disk></devices>",
    );
    etcd.put_keys(&[
        (&key(&e, "xml"), &xml),
        (&key(&e, "node"), "kvm3"),
        (&key(&e, "state"), "start"),
    ])
    .expect("define");
    let s = wait_status(&etcd, &e, "invalid");
    assert_eq!(
        s["error"],
        "xml: <disk type='file' device='disk'> source file /etc/shadow is not under \
         domains.xml_policy.disk_dirs",
        "{s}"
    );
    // Two keepalive ticks later (the daemon went on working), still nothing in libvirt.
    etcd.wait_ticks("kvm3", 2, WAIT);
    assert!(
        rt.block_on(lv.get(&e.uuid)).expect("libvirt").is_none(),
        "defined in libvirt"
    );
    let after = std::fs::metadata("/etc/shadow").expect("/etc/shadow");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (shadow.uid(), shadow.gid(), shadow.mode()),
        "/etc/shadow relabelled"
    );
}
