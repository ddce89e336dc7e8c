//! Real migration through the libvirt driver between two libvirtd instances on this machine,
//! each in its own network, mount and UTS namespace (harness `LibvirtPair`): the guest keeps
//! running while its qemu process moves from one namespace to the other, both live and as a
//! paused copy, and back; an unreachable destination fails cleanly leaving the guest where
//! it was; a guest hops across three nodes on a bridge; nothing is left behind afterwards.
//!
//! Needs root, libvirtd and qemu (KVM, else TCG). Durations are printed, never asserted.

use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::{
    DomainEvent, DomainInfo, DomainState, ErrorKind, Libvirt, Lifecycle, MigrateOptions, StopReason,
};
use debvisor_tests::libvirt::{assert_guest_uses_kvm, require_kvm, TestDomain};
use debvisor_tests::libvirt_pair::{
    process_netns_inode, IsolatedLibvirt, LibvirtCluster, LibvirtPair,
};
use debvisor_tests::skip_unless_root;
use tokio::sync::mpsc;

const CALL_TIMEOUT: Duration = Duration::from_secs(20);
const EVENT_WAIT: Duration = Duration::from_secs(30);
const GONE_WAIT: Duration = Duration::from_secs(15);

async fn start_pair() -> LibvirtPair {
    tokio::task::spawn_blocking(LibvirtPair::start)
        .await
        .expect("pair start thread")
        .expect("two isolated libvirtd instances")
}

/// Drop on a blocking thread (Drop waits for libvirt and processes).
async fn drop_blocking<T: Send + 'static>(v: T) {
    tokio::task::spawn_blocking(move || drop(v))
        .await
        .expect("drop thread");
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

async fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + GONE_WAIT;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Lifecycle events of `uuid` up to and including the first satisfying `last`; panics
/// with what arrived if none does within [`EVENT_WAIT`].
async fn events_until(
    rx: &mut mpsc::Receiver<DomainEvent>,
    uuid: &str,
    what: &str,
    last: impl Fn(&Lifecycle) -> bool,
) -> Vec<Lifecycle> {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(DomainEvent::Lifecycle { uuid: u, event, .. })) if u == uuid => {
                let done = last(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("{what}: event subscription ended; seen {seen:?}"),
            Err(_) => panic!("{what}: no such event within {EVENT_WAIT:?}; seen {seen:?}"),
        }
    }
}

/// The running guest on `inst` with its qemu PID inside that instance's namespace, running
/// with KVM (unless KVM is unusable here and that may be skipped).
async fn running_on(lv: &Libvirt, inst: &IsolatedLibvirt, uuid: &str) -> (DomainInfo, u32) {
    let info = lv
        .get(uuid)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("domain {uuid} on {}", inst.label()));
    assert_eq!(
        info.state,
        DomainState::Running,
        "{}: {info:?}",
        inst.label()
    );
    assert!(info.persistent, "{}: persistent: {info:?}", inst.label());
    let pid = info
        .pid
        .unwrap_or_else(|| panic!("{}: qemu PID: {info:?}", inst.label()));
    assert_eq!(
        process_netns_inode(pid),
        Some(inst.netns_inode()),
        "qemu {pid} runs in the netns of {}",
        inst.label()
    );
    assert!(
        cmdline(pid).contains(uuid),
        "qemu {pid} is our guest: {}",
        cmdline(pid)
    );
    assert_guest_uses_kvm(pid);
    (info, pid)
}

fn live_opts() -> MigrateOptions {
    MigrateOptions {
        live: true,
        max_downtime_ms: Some(300),
        bandwidth_mib_s: None,
        timeout: Duration::from_secs(120),
    }
}

/// Migrate `uuid` from `src` to `dst` and check the move: running and persistent on `dst`
/// in a new qemu inside `dst`'s namespace started for an incoming migration (never booted),
/// gone and undefined on `src`, old qemu exited. Returns the new qemu PID.
async fn migrate_and_check(
    (src, lv_src): (&IsolatedLibvirt, &Libvirt),
    (dst, lv_dst): (&IsolatedLibvirt, &Libvirt),
    uuid: &str,
    opts: MigrateOptions,
) -> u32 {
    let (_, old_pid) = running_on(lv_src, src, uuid).await;
    let mut rx_src = lv_src.events().await.expect("subscribe source");
    let mut rx_dst = lv_dst.events().await.expect("subscribe destination");
    let live = opts.live;

    let t0 = Instant::now();
    lv_src
        .migrate(uuid, &dst.peer_uri(), opts)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "migrate {} -> {}: {e}\n--- {} log ---\n{}\n--- {} log ---\n{}",
                src.label(),
                dst.label(),
                src.label(),
                src.log_tail(20),
                dst.label(),
                dst.log_tail(20)
            )
        });
    eprintln!(
        "{} migration {} -> {} of a 64 MiB guest took {:?}",
        if live { "live" } else { "paused-copy" },
        src.label(),
        dst.label(),
        t0.elapsed()
    );

    let (_, new_pid) = running_on(lv_dst, dst, uuid).await;
    assert_ne!(new_pid, old_pid, "a new qemu process on {}", dst.label());
    assert!(
        cmdline(new_pid).contains("-incoming"),
        "destination qemu was started for an incoming migration: {}",
        cmdline(new_pid)
    );
    assert!(
        lv_src.get(uuid).await.expect("get on source").is_none(),
        "undefined on {}",
        src.label()
    );
    assert!(wait_gone(old_pid).await, "source qemu {old_pid} exited");
    assert!(
        !src.qemu_pids().iter().any(|(_, p)| *p == old_pid),
        "no pid file left on {}",
        src.label()
    );

    let on_dst = events_until(
        &mut rx_dst,
        uuid,
        "destination resumed",
        |e| matches!(e, Lifecycle::Resumed { reason } if reason == "migrated"),
    )
    .await;
    eprintln!("events on {}: {on_dst:?}", dst.label());
    assert!(
        on_dst
            .iter()
            .any(|e| matches!(e, Lifecycle::Started { reason } if reason == "migrated")),
        "{on_dst:?}"
    );
    assert!(
        !on_dst.iter().any(|e| matches!(
            e,
            Lifecycle::Started { reason } if reason == "booted"
        ) || matches!(
            e,
            Lifecycle::Stopped { .. } | Lifecycle::ShuttingDown { .. }
        )),
        "no boot or shutdown on {}: {on_dst:?}",
        dst.label()
    );
    let on_src = events_until(&mut rx_src, uuid, "source stopped", |e| {
        matches!(e, Lifecycle::Stopped { .. })
    })
    .await;
    eprintln!("events on {}: {on_src:?}", src.label());
    // libvirt 9.0 sends no Undefined event for VIR_MIGRATE_UNDEFINE_SOURCE; the definition
    // is checked gone above.
    assert_eq!(
        on_src.last(),
        Some(&Lifecycle::Stopped {
            reason: StopReason::Migrated
        }),
        "{on_src:?}"
    );
    new_pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_moves_the_qemu_process_and_back() {
    skip_unless_root!();
    require_kvm();
    let pair = start_pair().await;
    let (a, b) = (&pair.a, &pair.b);
    let lv_a = a.libvirt(CALL_TIMEOUT);
    let lv_b = b.libvirt(CALL_TIMEOUT);

    // Two distinct "hosts".
    assert_ne!(a.host_uuid(), b.host_uuid());
    assert_ne!(a.netns_inode(), b.netns_inode());
    for inst in [a, b] {
        assert_eq!(
            process_netns_inode(inst.libvirtd_pid()),
            Some(inst.netns_inode()),
            "libvirtd {} in its netns",
            inst.label()
        );
    }
    let own_uts = std::fs::read_link("/proc/self/ns/uts").expect("own uts ns");
    let uts_a = std::fs::read_link(format!("/proc/{}/ns/uts", a.libvirtd_pid())).expect("uts");
    let uts_b = std::fs::read_link(format!("/proc/{}/ns/uts", b.libvirtd_pid())).expect("uts");
    assert!(own_uts != uts_a && uts_a != uts_b, "own UTS namespaces");

    let d = TestDomain::new(&lv_a, "live");
    assert_eq!(lv_a.define(&d.xml()).await.expect("define on a"), d.uuid);
    lv_a.start(&d.uuid).await.expect("start on a");

    let pid_b = migrate_and_check((a, &lv_a), (b, &lv_b), &d.uuid, live_opts()).await;
    assert!(a.qemu_pids().is_empty(), "{:?}", a.qemu_pids());
    assert_eq!(b.qemu_pids(), vec![(d.name.clone(), pid_b)]);

    let pid_a = migrate_and_check((b, &lv_b), (a, &lv_a), &d.uuid, live_opts()).await;
    assert!(b.qemu_pids().is_empty(), "{:?}", b.qemu_pids());
    assert_eq!(a.qemu_pids(), vec![(d.name.clone(), pid_a)]);

    // Teardown leaves nothing: no libvirtd, no qemu, no namespace, no directory.
    let daemons = [a.libvirtd_pid(), b.libvirtd_pid()];
    let dirs = [a.run_dir(), b.run_dir()];
    let namespaces = [
        pair.netns_a().name().to_string(),
        pair.netns_b().name().to_string(),
    ];
    drop_blocking(d).await;
    drop_blocking(pair).await;
    for pid in daemons.into_iter().chain([pid_a]) {
        assert!(!alive(pid), "process {pid} ended");
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} removed", dir.display());
    }
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in namespaces {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&ns)),
            "netns {ns} deleted: {listed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_copy_migration_moves_the_guest() {
    skip_unless_root!();
    require_kvm();
    let pair = start_pair().await;
    let (a, b) = (&pair.a, &pair.b);
    let lv_a = a.libvirt(CALL_TIMEOUT);
    let lv_b = b.libvirt(CALL_TIMEOUT);
    let d = TestDomain::new(&lv_a, "paused");
    lv_a.define(&d.xml()).await.expect("define on a");
    lv_a.start(&d.uuid).await.expect("start on a");

    let opts = MigrateOptions {
        live: false,
        ..live_opts()
    };
    migrate_and_check((a, &lv_a), (b, &lv_b), &d.uuid, opts).await;
    drop_blocking(d).await;
    drop_blocking(pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destination_fails_and_the_guest_stays() {
    skip_unless_root!();
    require_kvm();
    let pair = start_pair().await;
    let (a, b) = (&pair.a, &pair.b);
    let lv_a = a.libvirt(CALL_TIMEOUT);
    let lv_b = b.libvirt(CALL_TIMEOUT);
    let d = TestDomain::new(&lv_a, "unreach");
    lv_a.define(&d.xml()).await.expect("define on a");
    lv_a.start(&d.uuid).await.expect("start on a");
    let (_, pid) = running_on(&lv_a, a, &d.uuid).await;

    let dest = pair.unreachable_peer_uri();
    let t0 = Instant::now();
    let e = lv_a
        .migrate(&d.uuid, &dest, live_opts())
        .await
        .expect_err("no libvirtd at the destination");
    eprintln!(
        "migration to {dest} failed after {:?} ({:?}): {e}",
        t0.elapsed(),
        e.kind()
    );
    assert!(e.to_string().contains(&dest), "error names {dest}: {e}");
    assert_ne!(
        e.kind(),
        ErrorKind::Connection,
        "the connection to the source libvirtd is fine: {e}"
    );
    assert!(
        e.to_string().contains(&d.uuid),
        "error names the domain: {e}"
    );

    let (_, still) = running_on(&lv_a, a, &d.uuid).await;
    assert_eq!(still, pid, "same qemu process keeps running on a");
    assert!(lv_b.get(&d.uuid).await.expect("get on b").is_none());
    assert!(b.qemu_pids().is_empty());

    // A failed attempt leaves no job behind: a real migration still works.
    migrate_and_check((a, &lv_a), (b, &lv_b), &d.uuid, live_opts()).await;
    drop_blocking(d).await;
    drop_blocking(pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_hops_across_a_three_node_bridge() {
    skip_unless_root!();
    require_kvm();
    let cluster = tokio::task::spawn_blocking(|| LibvirtCluster::start(3))
        .await
        .expect("cluster start thread")
        .expect("three isolated libvirtd instances");
    let nodes = cluster.nodes();
    let lvs: Vec<Libvirt> = nodes.iter().map(|n| n.libvirt(CALL_TIMEOUT)).collect();
    let d = TestDomain::new(&lvs[0], "hops");
    lvs[0].define(&d.xml()).await.expect("define on n0");
    lvs[0].start(&d.uuid).await.expect("start on n0");

    migrate_and_check(
        (&nodes[0], &lvs[0]),
        (&nodes[2], &lvs[2]),
        &d.uuid,
        live_opts(),
    )
    .await;
    let pid = migrate_and_check(
        (&nodes[2], &lvs[2]),
        (&nodes[1], &lvs[1]),
        &d.uuid,
        live_opts(),
    )
    .await;
    assert_eq!(nodes[1].qemu_pids(), vec![(d.name.clone(), pid)]);
    assert!(nodes[0].qemu_pids().is_empty() && nodes[2].qemu_pids().is_empty());

    // libvirt refuses a migration to the host it runs on (same host UUID).
    let e = lvs[1]
        .migrate(&d.uuid, &nodes[1].peer_uri(), live_opts())
        .await
        .expect_err("migration to itself");
    eprintln!("migration to itself: {e}");
    assert!(
        e.to_string().contains(nodes[1].host_uuid()),
        "libvirt names the configured host UUID: {e}"
    );
    let (_, still) = running_on(&lvs[1], &nodes[1], &d.uuid).await;
    assert_eq!(still, pid, "still the same qemu on n1");
    drop_blocking(d).await;
    drop_blocking(cluster).await;
}
