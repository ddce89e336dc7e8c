//! A hung libvirtd must not take the daemon down (issue 12, break 3): a real `debvisord`
//! drives two KVM guests on an isolated libvirtd (own network, mount and UTS namespaces, so
//! freezing it affects nobody else); the libvirtd is frozen with SIGSTOP for 40 s, long
//! enough for call timeouts (10 s) and libvirt's client keepalive (5 s × 3; the event
//! connection's, and on the unfixed driver the call connection's) to expire while calls are
//! still blocked in it, then thawed with SIGCONT.
//!
//! Asserted: the daemon stays alive and keeps its `alive` key throughout; the outage and
//! its end are logged once each (warn, info), not once per call; the guests' qemu processes
//! keep running with the same PIDs; after the thaw the daemon reports libvirt healthy again
//! and carries out a state change requested then.
//!
//! On this machine the unfixed daemon survived the freeze (3 of 3 runs; it failed only the
//! log assertions). A second test drives the driver alone with more callers than the daemon
//! has: the unfixed driver died with the reported SIGSEGV inside libvirt
//! (`virConnectListAllDomains` → `virNetClientSendWithReply`, right after the thaw) in 2 of 4
//! runs (3 of 9 with an earlier ad-hoc variant; 0 of 8 of that variant with only libvirt's
//! keepalive switched off on call connections).
//!
//! Needs root and libvirtd/qemu (KVM, else TCG). Everything is removed on drop, and the
//! libvirtd is thawed by a guard if the test fails while it is frozen.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use debvisor_daemon::hypervisor::{ErrorKind, HypervisorError, MAX_CONCURRENT_CALLS};
use debvisor_tests::libvirt::tiny_guest_xml;
use debvisor_tests::{
    is_message, skip_unless_root, str_field, DaemonBuilder, DaemonProcess, EtcdProcess,
    LibvirtSolo, TestVm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// How long libvirtd stays frozen: beyond the call timeout (10 s) and libvirt's keepalive
/// (a probe every 5 s, closed after 3 unanswered).
const FREEZE: Duration = Duration::from_secs(40);
const NODE: &str = "hang1";
/// The driver's outage lines (see `daemon/src/hypervisor/libvirt.rs`).
const OUTAGE: &str = "libvirt not answering";
const RECOVERED: &str = "libvirt answering again";

/// SIGSTOPs a process we started; SIGCONTs it on [`Frozen::thaw`] or drop (a failed
/// assertion must not leave the libvirtd frozen for the harness's teardown).
struct Frozen(Option<u32>);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        // SAFETY: kill(2) on the PID of the libvirtd the harness started and still holds.
        let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        assert_eq!(r, 0, "SIGSTOP libvirtd {pid}");
        Frozen(Some(pid))
    }

    fn thaw(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

fn daemon(etcd: &EtcdProcess, solo: &LibvirtSolo) -> DaemonProcess {
    let mut d = DaemonBuilder::new(NODE)
        .endpoints(&[etcd.endpoint()])
        .env("DEBVISOR_HYPERVISOR_URI", &solo.lv.local_uri())
        .env("DEBVISOR_HYPERVISOR_PEER_URI", &solo.lv.peer_uri())
        .env("DEBVISOR_DOMAINS_SHUTDOWN_TIMEOUT", "3s")
        .spawn()
        .expect("spawn daemon");
    d.wait_run(WAIT).expect("daemon reaches run");
    d
}

fn define(g: &TestVm, etcd: &EtcdProcess) {
    let xml = tiny_guest_xml(&g.name, &g.uuid);
    g.put(etcd, &[("xml", &xml), ("node", NODE), ("state", "start")]);
}

fn count(d: &DaemonProcess, message: &str) -> Vec<Value> {
    d.json_lines()
        .into_iter()
        .filter(|l| is_message(l, message))
        .collect()
}

fn health(etcd: &EtcdProcess) -> Option<Value> {
    etcd.get_key(&format!("nodes/{NODE}/health"))
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
}

/// Poll for `within`, asserting every 250 ms that the daemon runs and `alive` is present.
fn watch(d: &mut DaemonProcess, etcd: &EtcdProcess, within: Duration, what: &str) {
    let until = Instant::now() + within;
    while Instant::now() < until {
        assert!(
            d.is_running(),
            "debvisord died {what}; last output:\n{}",
            d.tail(40)
        );
        let alive = etcd
            .get_key(&format!("nodes/{NODE}/alive"))
            .expect("etcd answers");
        assert!(alive.is_some(), "the alive key vanished {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Poll `f` every 250 ms until it holds, asserting meanwhile that the daemon runs and
/// keeps `alive`; panics naming `what` after [`WAIT`].
fn until(d: &mut DaemonProcess, etcd: &EtcdProcess, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; health {:?}; last output:\n{}",
            health(etcd),
            d.tail(40)
        );
        watch(
            d,
            etcd,
            Duration::from_millis(250),
            &format!("waiting for {what}"),
        );
    }
}

#[test]
fn a_frozen_libvirtd_does_not_take_the_daemon_down() {
    skip_unless_root!();
    let solo = LibvirtSolo::start("hang").expect("an isolated libvirtd");
    let etcd = EtcdProcess::start().expect("etcd");
    let mut d = daemon(&etcd, &solo);

    let guests = [TestVm::new("hang-a", WAIT), TestVm::new("hang-b", WAIT)];
    for g in &guests {
        define(g, &etcd);
    }
    for g in &guests {
        g.wait_status(&etcd, "running", NODE);
    }
    let mut before = solo.lv.qemu_pids();
    before.sort();
    assert_eq!(before.len(), 2, "two qemu processes: {before:?}");

    let t0 = Instant::now();
    let mut frozen = Frozen::freeze(solo.lv.libvirtd_pid());
    eprintln!("libvirt_hang: libvirtd {} frozen", solo.lv.libvirtd_pid());
    watch(&mut d, &etcd, FREEZE, "while libvirtd was frozen");
    frozen.thaw();
    eprintln!("libvirt_hang: libvirtd thawed after {:?}", t0.elapsed());

    // The guests never noticed.
    let mut after = solo.lv.qemu_pids();
    after.sort();
    assert_eq!(after, before, "the same qemu processes still run");

    // Converged again: libvirt healthy in the node's health, a new request carried out.
    until(&mut d, &etcd, "health libvirt=true", || {
        health(&etcd).is_some_and(|h| h["libvirt"] == true)
    });
    let [a, b] = &guests;
    b.request(&etcd, NODE, "stop");
    let state = |g: &TestVm| {
        g.status(&etcd)
            .map(|s| (s["state"].clone(), s["node"].clone()))
    };
    until(&mut d, &etcd, "the stopped guest reported stopped", || {
        state(b) == Some(("stopped".into(), NODE.into()))
    });
    until(&mut d, &etcd, "the other guest reported running", || {
        state(a) == Some(("running".into(), NODE.into()))
    });
    let left = solo.lv.qemu_pids();
    assert_eq!(left.len(), 1, "one qemu left: {left:?}");
    // The driver noticed, once, and said so once it answered again.
    d.wait_for(|l| is_message(l, RECOVERED), WAIT)
        .expect("recovery logged");
    let outage = count(&d, OUTAGE);
    assert_eq!(outage.len(), 1, "one outage line: {outage:?}");
    assert_eq!(
        str_field(&outage[0], "level"),
        Some("WARN"),
        "{}",
        outage[0]
    );
    assert!(str_field(&outage[0], "op").is_some(), "{}", outage[0]);
    assert!(outage[0].get("timeout_ms").is_some(), "{}", outage[0]);
    let back = count(&d, RECOVERED);
    assert_eq!(back.len(), 1, "one recovery line: {back:?}");
    assert_eq!(str_field(&back[0], "level"), Some("INFO"), "{}", back[0]);
    let outage_ms = back[0]["outage_ms"].as_u64().expect("outage_ms");
    assert!(outage_ms >= 10_000, "{}", back[0]);

    watch(&mut d, &etcd, Duration::from_secs(2), "after the thaw");
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn many_callers_through_a_frozen_libvirtd() {
    skip_unless_root!();
    const CALLERS: usize = 24;
    let solo = LibvirtSolo::start("hangx").expect("an isolated libvirtd");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let lv = solo.lv.libvirt(Duration::from_secs(3));
    rt.block_on(async {
        lv.probe().await.expect("libvirtd answers before the freeze");
        let base_threads = threads();
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        // Frozen before the callers start, as in the runs that crashed.
        let mut frozen = Frozen::freeze(solo.lv.libvirtd_pid());
        let mut callers = Vec::new();
        for i in 0..CALLERS {
            let (lv, stop, failed) = (lv.clone(), stop.clone(), failed.clone());
            callers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r: Result<(), HypervisorError> = match i % 3 {
                        0 => lv.list().await.map(|_| ()),
                        1 => lv.all_stats().await.map(|_| ()),
                        _ => lv.probe().await.map(|_| ()),
                    };
                    if let Err(e) = r {
                        assert!(
                            matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Connection),
                            "only timeouts and connection errors while frozen: {e}"
                        );
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        let until = Instant::now() + Duration::from_secs(35);
        let mut most = 0;
        while Instant::now() < until {
            most = most.max(threads());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        frozen.thaw();
        eprintln!(
            "libvirt_hang: {} failed calls while frozen; threads {base_threads} before, at most {most} while frozen",
            failed.load(Ordering::Relaxed)
        );
        assert!(failed.load(Ordering::Relaxed) > 0, "the freeze was noticed");
        assert!(
            most <= base_threads + MAX_CONCURRENT_CALLS + 16,
            "a hung libvirtd costs a bounded number of threads: {most} (base {base_threads})"
        );
        // The callers keep going through the thaw (when the crash came), then stop.
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop.store(true, Ordering::Relaxed);
        for c in callers {
            c.await.expect("caller task");
        }
        // Answers again.
        let deadline = Instant::now() + WAIT;
        loop {
            if lv.probe().await.is_ok() && lv.list().await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "libvirt answers again after the thaw");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        lv.close().await;
    });
}
