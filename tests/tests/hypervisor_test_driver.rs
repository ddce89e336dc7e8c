//! The libvirt hypervisor driver against libvirt's in-process test driver
//! (`test:///default`): idempotent lifecycle, states with reasons, stats, lifecycle events,
//! refusals before libvirt is called, libvirt's own messages, and timeouts.
//!
//! The test driver's state is shared by all connections of this process, so every test
//! uses its own domains (UUID and `dvtest-` name) and looks only at them.

use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use debvisor_daemon::hypervisor::{
    DomainState, ErrorKind, HypervisorError, Libvirt, Lifecycle, MigrateOptions, Op, Outcome,
    StopReason,
};
use debvisor_tests::libvirt::{random_uuid, wait_event, TestDomain, TEST_URI};

const EVENT_WAIT: Duration = Duration::from_secs(5);

fn test_driver() -> Libvirt {
    Libvirt::new(TEST_URI, Duration::from_secs(10))
}

#[tokio::test]
async fn lifecycle_is_idempotent_and_emits_events() {
    let lv = test_driver();
    let d = TestDomain::new(&lv, "life");
    let mut rx = lv.events().await.expect("subscribe");

    assert_eq!(lv.define(&d.xml()).await.expect("define"), d.uuid);
    let bigger = d.xml().replace("'MiB'>64<", "'MiB'>128<");
    assert_eq!(lv.define(&bigger).await.expect("redefine"), d.uuid);
    let i = lv.get(&d.uuid).await.expect("get").expect("defined");
    assert_eq!(i.name, d.name);
    assert_eq!(i.state, DomainState::Shutoff);
    assert!(i.persistent && !i.autostart);
    assert_eq!((i.max_memory_kib, i.vcpus, i.pid), (131072, 1, None));

    assert_eq!(lv.start(&d.uuid).await.expect("start"), Outcome::Changed);
    assert_eq!(lv.start(&d.uuid).await.expect("start"), Outcome::Unchanged);
    let i = lv.get(&d.uuid).await.expect("get").expect("defined");
    assert_eq!(
        (i.state, i.reason.as_str()),
        (DomainState::Running, "booted")
    );

    // The test driver obeys a shutdown at once.
    assert_eq!(
        lv.shutdown(&d.uuid).await.expect("shutdown"),
        Outcome::Changed
    );
    let i = lv.get(&d.uuid).await.expect("get").expect("defined");
    assert_eq!(
        (i.state, i.reason.as_str()),
        (DomainState::Shutoff, "shutdown")
    );
    assert_eq!(
        lv.shutdown(&d.uuid).await.expect("shutdown"),
        Outcome::Unchanged
    );
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("destroy"),
        Outcome::Unchanged
    );

    lv.start(&d.uuid).await.expect("start");
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("destroy"),
        Outcome::Changed
    );
    let i = lv.get(&d.uuid).await.expect("get").expect("defined");
    assert_eq!(
        (i.state, i.reason.as_str()),
        (DomainState::Shutoff, "destroyed")
    );
    assert_eq!(i.cpu_time_ns, 0);

    assert_eq!(
        lv.undefine(&d.uuid).await.expect("undefine"),
        Outcome::Changed
    );
    assert_eq!(
        lv.undefine(&d.uuid).await.expect("undefine"),
        Outcome::Unchanged
    );
    assert!(lv.get(&d.uuid).await.expect("get").is_none());
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("absent"),
        Outcome::Unchanged
    );
    assert_eq!(
        lv.shutdown(&d.uuid).await.expect("absent"),
        Outcome::Unchanged
    );
    let e = lv.start(&d.uuid).await.expect_err("absent");
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains(&d.uuid), "{e}");
    assert!(lv.xml(&d.uuid).await.expect_err("absent").is_not_found());

    let expected = [
        Lifecycle::Defined { updated: false },
        Lifecycle::Defined { updated: true },
        Lifecycle::Started {
            reason: "booted".into(),
        },
        Lifecycle::Stopped {
            reason: StopReason::Shutdown,
        },
        Lifecycle::Started {
            reason: "booted".into(),
        },
        Lifecycle::Stopped {
            reason: StopReason::Destroyed,
        },
        Lifecycle::Undefined,
    ];
    for want in expected {
        let got = wait_event(&mut rx, &d.uuid, EVENT_WAIT, |e| {
            !matches!(e, Lifecycle::ShuttingDown { .. })
        })
        .await
        .expect("event");
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn undefining_a_running_domain_leaves_it_transient() {
    let lv = test_driver();
    let d = TestDomain::new(&lv, "transient");
    lv.define(&d.xml()).await.expect("define");
    lv.start(&d.uuid).await.expect("start");
    assert_eq!(
        lv.undefine(&d.uuid).await.expect("undefine"),
        Outcome::Changed
    );
    let i = lv.get(&d.uuid).await.expect("get").expect("still running");
    assert_eq!(i.state, DomainState::Running);
    assert!(!i.persistent);
    // Undefining the running transient domain again is fine and changes nothing.
    assert_eq!(
        lv.undefine(&d.uuid).await.expect("again"),
        Outcome::Unchanged
    );
    assert_eq!(
        lv.destroy(&d.uuid).await.expect("destroy"),
        Outcome::Changed
    );
    assert!(
        lv.get(&d.uuid).await.expect("get").is_none(),
        "transient: gone"
    );
}

#[tokio::test]
async fn list_reports_every_domain_with_its_state() {
    let lv = test_driver();
    let off = TestDomain::new(&lv, "off");
    let on = TestDomain::new(&lv, "on");
    lv.define(&off.xml()).await.expect("define");
    lv.define(&on.xml()).await.expect("define");
    lv.start(&on.uuid).await.expect("start");

    let all = lv.list().await.expect("list");
    let find = |u: &str| all.iter().find(|i| i.uuid == u).cloned();
    let i = find(&off.uuid).expect("listed");
    assert_eq!(
        (i.state, i.name.as_str()),
        (DomainState::Shutoff, off.name.as_str())
    );
    let i = find(&on.uuid).expect("listed");
    assert_eq!(
        (i.state, i.reason.as_str()),
        (DomainState::Running, "booted")
    );
    assert!(i.cpu_time_ns > 0, "{i:?}");
    assert_eq!((i.vcpus, i.memory_kib), (1, 65536));
    // The test driver's own domain "test" is there too (a foreign domain for us).
    assert!(all
        .iter()
        .any(|i| i.name == "test" && i.state == DomainState::Running));

    // Many concurrent calls share one connection and a bounded set of threads.
    let calls = (0..64).map(|_| lv.get(&on.uuid));
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("get").map(|i| i.state), Some(DomainState::Running));
    }
}

#[tokio::test]
async fn stats_of_running_and_stopped_domains() {
    let lv = test_driver();
    let on = TestDomain::new(&lv, "stats-on");
    let off = TestDomain::new(&lv, "stats-off");
    lv.define(&on.xml()).await.expect("define");
    lv.define(&off.xml()).await.expect("define");
    lv.start(&on.uuid).await.expect("start");

    let s = lv.stats(&on.uuid).await.expect("stats");
    assert!(s.active);
    assert!(s.cpu_time_ns > 0, "{s:?}");
    assert_eq!((s.vcpus, s.memory_kib, s.max_memory_kib), (1, 65536, 65536));
    assert_eq!(s.name, on.name);
    let s = lv.stats(&off.uuid).await.expect("stats");
    assert!(!s.active);
    assert_eq!(s.cpu_time_ns, 0);

    let all = lv.all_stats().await.expect("all stats");
    let s = all
        .iter()
        .find(|s| s.uuid == on.uuid)
        .expect("running one listed");
    assert!(s.active && s.cpu_time_ns > 0 && s.vcpus == 1, "{s:?}");
    let s = all
        .iter()
        .find(|s| s.uuid == off.uuid)
        .expect("stopped one listed");
    assert!(!s.active && s.cpu_time_ns == 0, "{s:?}");
    assert!(lv
        .stats(&random_uuid())
        .await
        .expect_err("absent")
        .is_not_found());
}

#[tokio::test]
async fn bad_xml_is_refused_with_a_reason() {
    let lv = test_driver();
    let d = TestDomain::new(&lv, "badxml");

    // Not well-formed, or without identity: refused here.
    for (xml, want) in [
        ("<domain type='test'><name>x</name>", "not well-formed"),
        ("<domain type='test'><name>x</name></domain>", "no <uuid>"),
    ] {
        let e = lv.define(xml).await.expect_err(xml);
        assert!(
            matches!(e, HypervisorError::InvalidXml { op: Op::Define, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(want), "{e}");
    }

    // Well-formed but wrong for libvirt: with validation on, libvirt's schema says why.
    let unknown_element = d.xml().replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><bogus/>");
    let strict = lv.clone().with_validation(true);
    let e = strict.define(&unknown_element).await.expect_err("schema");
    let HypervisorError::Domain {
        op,
        domain,
        message,
        ..
    } = &e
    else {
        panic!("expected a libvirt error, got {e}");
    };
    assert_eq!(*op, Op::Define);
    assert_eq!(domain.uuid.as_deref(), Some(d.uuid.as_str()));
    assert_eq!(domain.name.as_deref(), Some(d.name.as_str()));
    assert!(!message.is_empty());
    eprintln!("libvirt on an unknown element: {e}");
    assert!(e.to_string().contains(&d.name) && e.to_string().contains(&d.uuid));

    let bad_memory = d.xml().replace("'MiB'>64<", "'MiB'>lots<");
    let e = lv.define(&bad_memory).await.expect_err("memory");
    assert_eq!(e.op(), Some(Op::Define));
    eprintln!("libvirt on bad memory: {e}");
    assert!(
        lv.get(&d.uuid).await.expect("get").is_none(),
        "nothing defined"
    );
}

#[tokio::test]
async fn bad_uuids_and_names_are_refused_before_libvirt() {
    // Nothing listens on this socket: any libvirt call would fail with a connection error.
    let lv = Libvirt::new(
        "qemu+unix:///system?socket=/nonexistent/debvisor-test.sock",
        Duration::from_secs(5),
    );
    for bad in [
        "",
        "nope",
        "0A1B2C3D-4E5F-6789-ABCD-EF0123456789",
        "0a1b2c3d-4e5f-6789-abcd-ef012345678",
        "../../etc/passwd",
    ] {
        let checks = [
            lv.get(bad).await.map(|_| ()),
            lv.start(bad).await.map(|_| ()),
            lv.shutdown(bad).await.map(|_| ()),
            lv.destroy(bad).await.map(|_| ()),
            lv.undefine(bad).await.map(|_| ()),
            lv.xml(bad).await.map(|_| ()),
            lv.stats(bad).await.map(|_| ()),
            lv.migrate(bad, TEST_URI, MigrateOptions::default()).await,
        ];
        for r in checks {
            let e = r.expect_err(bad);
            assert!(
                matches!(e, HypervisorError::InvalidUuid { .. }),
                "{bad:?}: {e}"
            );
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
        }
    }
    let u = random_uuid();
    for name in ["a b", "../x", "-x", "x;rm"] {
        let xml = format!("<domain type='test'><name>{name}</name><uuid>{u}</uuid></domain>");
        let e = lv.define(&xml).await.expect_err(name);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name}: {e}");
    }
    // A valid UUID does reach for libvirt, and says which domain and operation failed.
    let e = lv.start(&u).await.expect_err("unreachable");
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert!(e.to_string().contains(&format!("start domain {u}")), "{e}");
}

#[tokio::test]
async fn migration_errors_name_the_domain() {
    let lv = test_driver();
    let d = TestDomain::new(&lv, "migrate");
    lv.define(&d.xml()).await.expect("define");
    let e = lv
        .migrate(
            &d.uuid,
            "qemu+tcp://192.0.2.1/system",
            MigrateOptions::default(),
        )
        .await
        .expect_err("not running");
    assert_eq!(e.kind(), ErrorKind::InvalidOperation, "{e}");
    lv.start(&d.uuid).await.expect("start");
    let opts = MigrateOptions {
        live: true,
        max_downtime_ms: None,
        bandwidth_mib_s: Some(100),
        timeout: Duration::from_secs(10),
    };
    let e = lv
        .migrate(&d.uuid, "qemu+tcp://192.0.2.1/system", opts)
        .await
        .expect_err("the test driver does not migrate");
    eprintln!("test driver migration: {e}");
    assert_eq!(e.op(), Some(Op::Migrate));
    assert!(
        e.to_string()
            .contains(&format!("migrate domain '{}' ({})", d.name, d.uuid)),
        "{e}"
    );
    let i = lv.get(&d.uuid).await.expect("get").expect("still here");
    assert_eq!(i.state, DomainState::Running);
}

// Paused clock: the runtime (one thread) advances time only when it has nothing to run, so the
// ticker's 200 ms fire before the calls' 500 ms timeouts exactly when the runtime stayed free
// while libvirt hung; no wall-clock measurement.
#[tokio::test(start_paused = true)]
async fn a_silent_libvirtd_times_out_without_blocking_the_runtime() {
    // A "libvirtd" that accepts connections and never answers.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            keep.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
    });
    let lv = Libvirt::new(
        &format!("qemu+unix:///system?socket={}", sock.display()),
        Duration::from_millis(500),
    );
    let u = random_uuid();
    let ticker = tokio::spawn(tokio::time::sleep(Duration::from_millis(200)));
    let e = lv.get(&u).await.expect_err("silent");
    // The runtime kept running while libvirt hung: the ticker, due before the timeout,
    // finished before the call returned (checked before this task yields again).
    assert!(
        ticker.is_finished(),
        "the runtime was blocked while the libvirt call hung"
    );
    // The call returned by its own timeout, not by an answer or an error of the socket.
    assert!(
        matches!(e, HypervisorError::DomainTimeout { op: Op::Get, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&u), "{e}");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    ticker.await.expect("ticker");
    let e = lv.list().await.expect_err("still silent");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // Release the hung calls: EOF makes libvirt give up.
    held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    drop(dir);
}
