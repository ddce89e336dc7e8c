//! The libvirt hypervisor driver against the real system libvirtd (`qemu:///system`) with
//! tiny diskless KVM guests (TCG without /dev/kvm): boot to running with a real qemu PID,
//! lifecycle events, a guest that ignores ACPI, a qemu killed under libvirt, counters.
//!
//! Needs root; the harness starts virtlogd/libvirtd if they are not running and leaves
//! them running. Every guest is destroyed and undefined by its guard, also on failure.

use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::{DomainState, Libvirt, Lifecycle, Outcome, StopReason};
use debvisor_tests::libvirt::{
    assert_guest_uses_kvm, ensure_libvirtd, kvm_available, require_kvm, sweep_stale, wait_event,
    TestDomain, QEMU_URI,
};
use debvisor_tests::skip_unless_root;

const EVENT_WAIT: Duration = Duration::from_secs(15);

async fn system_libvirt() -> Libvirt {
    ensure_libvirtd().expect("libvirtd running");
    let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
    sweep_stale(&lv).await;
    lv
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_lifecycle() {
    skip_unless_root!();
    require_kvm();
    let lv = system_libvirt().await;
    let d = TestDomain::new(&lv, "life");
    let mut rx = lv.events().await.expect("subscribe");

    assert_eq!(lv.define(&d.xml()).await.expect("define"), d.uuid);
    wait_event(&mut rx, &d.uuid, EVENT_WAIT, |e| {
        matches!(e, Lifecycle::Defined { updated: false })
    })
    .await
    .expect("defined event");

    let t0 = Instant::now();
    assert_eq!(lv.start(&d.uuid).await.expect("start"), Outcome::Changed);
    let started = t0.elapsed();
    let info = lv.get(&d.uuid).await.expect("get").expect("defined");
    let running = t0.elapsed();
    assert_eq!(info.state, DomainState::Running, "{info:?}");
    assert_eq!(info.reason, "booted");
    eprintln!(
        "{} guest: start returned after {started:?}, running observed after {running:?}",
        if kvm_available() { "KVM" } else { "TCG" }
    );
    wait_event(
        &mut rx,
        &d.uuid,
        EVENT_WAIT,
        |e| matches!(e, Lifecycle::Started { reason } if reason == "booted"),
    )
    .await
    .expect("started event");

    let pid = info.pid.expect("qemu PID while running");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} exists"
    );
    let cmd = cmdline(pid);
    assert!(
        cmd.contains("qemu-system") && cmd.contains(&d.uuid),
        "{cmd}"
    );
    // A real KVM guest, not a silent TCG fallback.
    assert_guest_uses_kvm(pid);
    assert_eq!((info.vcpus, info.memory_kib), (1, 65536), "{info:?}");
    assert_eq!(lv.start(&d.uuid).await.expect("start"), Outcome::Unchanged);

    let stats = lv.stats(&d.uuid).await.expect("stats");
    assert!(stats.active && stats.cpu_time_ns > 0, "{stats:?}");
    assert_eq!((stats.vcpus, stats.memory_kib), (1, 65536), "{stats:?}");
    assert_eq!(
        (stats.block_rd_bytes, stats.net_rx_bytes),
        (0, 0),
        "diskless, NIC-less"
    );
    let all = lv.all_stats().await.expect("all stats");
    assert!(
        all.iter()
            .any(|s| s.uuid == d.uuid && s.active && s.cpu_time_ns > 0),
        "{all:?}"
    );
    let xml = lv.xml(&d.uuid).await.expect("xml");
    assert!(xml.contains(&d.uuid) && xml.contains(&d.name));

    // The firmware-only guest ignores the ACPI power button.
    assert_eq!(
        lv.shutdown(&d.uuid).await.expect("shutdown"),
        Outcome::Changed
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = lv.get(&d.uuid).await.expect("get").expect("defined");
    assert_eq!(info.state, DomainState::Running, "ACPI ignored: {info:?}");
    assert_eq!(info.pid, Some(pid), "same qemu");

    // So the Domain object destroys it.
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("destroy"),
        Outcome::Changed
    );
    wait_event(&mut rx, &d.uuid, EVENT_WAIT, |e| {
        matches!(e, Lifecycle::Stopped { .. })
    })
    .await
    .map(|e| {
        assert_eq!(
            e,
            Lifecycle::Stopped {
                reason: StopReason::Destroyed
            }
        )
    })
    .expect("stopped event");
    let info = lv.get(&d.uuid).await.expect("get").expect("persistent");
    assert_eq!(
        (info.state, info.reason.as_str()),
        (DomainState::Shutoff, "destroyed")
    );
    assert_eq!((info.pid, info.cpu_time_ns), (None, 0));
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || !cmdline(pid).contains(&d.uuid)
    );
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("destroy"),
        Outcome::Unchanged
    );

    assert_eq!(
        lv.undefine(&d.uuid).await.expect("undefine"),
        Outcome::Changed
    );
    wait_event(&mut rx, &d.uuid, EVENT_WAIT, |e| {
        matches!(e, Lifecycle::Undefined)
    })
    .await
    .expect("undefined event");
    assert!(lv.get(&d.uuid).await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_is_reported_stopped() {
    skip_unless_root!();
    require_kvm();
    let lv = system_libvirt().await;
    let d = TestDomain::new(&lv, "kill");
    let mut rx = lv.events().await.expect("subscribe");
    lv.define(&d.xml()).await.expect("define");
    lv.start(&d.uuid).await.expect("start");
    let pid = lv
        .get(&d.uuid)
        .await
        .expect("get")
        .and_then(|i| i.pid)
        .expect("qemu PID");
    assert!(cmdline(pid).contains(&d.uuid), "our guest's qemu");
    assert_guest_uses_kvm(pid);

    // SAFETY: kill(2) of the qemu process of the guest this test just started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let ev = wait_event(&mut rx, &d.uuid, EVENT_WAIT, |e| {
        matches!(e, Lifecycle::Stopped { .. } | Lifecycle::Crashed { .. })
    })
    .await
    .expect("stopped event");
    eprintln!("SIGKILLed qemu: {ev:?} after {:?}", t0.elapsed());
    assert!(
        matches!(
            ev,
            Lifecycle::Stopped {
                reason: StopReason::Failed | StopReason::Crashed
            }
        ),
        "{ev:?}"
    );
    let info = lv.get(&d.uuid).await.expect("get").expect("persistent");
    assert_eq!(
        (info.state, info.reason.as_str()),
        (DomainState::Shutoff, "crashed")
    );
    assert_eq!(info.pid, None);
}
