//! `--vm-start` (issue 17): what the daemon adds to starting a defined guest, against
//! libvirt's own path on the same host in the same run.
//!
//! Two tiny KVM guests on `qemu:///system` (the harness' `tiny_guest_xml`), both defined
//! and shut off:
//!
//! - *raw*: defined by the bench through the `virt` crate; per cycle the bench times
//!   `virDomainCreate` alone (the domain looked up beforehand), then destroys it.
//! - *daemon*: written to etcd with `state=stop`, so the daemon defines it and keeps it
//!   defined; per cycle the bench writes `state=start` (one put) and takes the timestamp of
//!   the daemon's `domain started` line (logged when its `virDomainCreate` returned), then
//!   writes `state=stop` and waits until the daemon destroyed it and reported `stopped`.
//!
//! Both intervals end when `virDomainCreate` returned (qemu launched and running). The
//! cycles interleave (raw first in even cycles, daemon first in odd ones), so drift of the
//! machine's load hits both. Overhead = median(daemon) − median(raw); the paired
//! per-cycle differences are reported too.
//!
//! The etcd, the daemon and both guests are owned by locals (killed, destroyed and
//! undefined on every return path).

use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::hypervisor::{DomainState, Libvirt};
use debvisor_tests::libvirt::{ensure_libvirtd, sweep_stale, tiny_guest_xml, TestDomain, QEMU_URI};
use debvisor_tests::{DaemonProcess, EtcdProcess};
use etcd_client::{Client, Txn, TxnOp};
use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;

use super::clock::{epoch_micros, now_utc_string, parse_rfc3339_micros};
use super::host::load_triple;
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::{ms, summarize, verdict, Summary};
use super::vms::{connect, spawn_daemon, vm_key};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:vm-start:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:vm-start:end -->";
/// Node of the daemon.
const NODE: &str = "bench-vm-start";
/// Target: median overhead over raw `virDomainCreate` (ms).
const TARGET_OVERHEAD_MS: f64 = 5.0;
/// How long one start or stop may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval while waiting for the daemon's line or libvirt's state.
const POLL: Duration = Duration::from_millis(5);

/// Per-cycle figures (ms).
#[derive(Debug, Default)]
struct Samples {
    raw: Vec<f64>,
    daemon: Vec<f64>,
    /// Write → `run lock acquired` (daemon clock).
    lock: Vec<f64>,
    /// `run lock acquired` → `domain started`.
    lock_to_started: Vec<f64>,
    /// daemon − raw of the same cycle.
    paired: Vec<f64>,
}

/// Run the figure and publish it.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let started = now_utc_string();
    let load0 = load_triple();
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    if !debvisor_tests::kvm_available() {
        return Err("no usable /dev/kvm: the figure is about KVM guests".into());
    }
    ensure_libvirtd().map_err(|e| format!("libvirtd: {e}"))?;
    let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
    rt.block_on(lv.list())
        .map_err(|e| format!("{QEMU_URI}: {e}"))?;
    rt.block_on(sweep_stale(&lv));
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let mut d = spawn_daemon(&etcd, NODE, &[("DEBVISOR_HYPERVISOR_URI", QEMU_URI)])?;
    let mut client = rt.block_on(connect(&etcd))?;
    // Guards: destroyed and undefined through libvirt when dropped, also on errors.
    let raw_g = TestDomain::new(&lv, "rawstart");
    let dmn_g = TestDomain::new(&lv, "dmnstart");
    let conn =
        Connect::open(Some(QEMU_URI)).map_err(|e| format!("virt connect {QEMU_URI}: {e}"))?;
    let result = cycles(
        &rt,
        &lv,
        &conn,
        &mut d,
        &mut client,
        &raw_g,
        &dmn_g,
        args.runs,
    );
    // Stop the daemon before the guards remove its guest, so it cannot start it again.
    let _ = d.kill();
    drop(raw_g);
    drop(dmn_g);
    let mut conn = conn;
    let _ = conn.close();
    drop(etcd);
    rt.shutdown_timeout(Duration::from_secs(5));
    let samples = result?;
    let report = render(
        args,
        machine,
        &started,
        &samples,
        (&load0, &load_triple()),
        t0.elapsed(),
    );
    publish(args, MARK_START, MARK_END, &report)
}

/// Define both guests, then `runs` interleaved cycles.
#[allow(clippy::too_many_arguments)]
fn cycles(
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    conn: &Connect,
    d: &mut DaemonProcess,
    client: &mut Client,
    raw_g: &TestDomain,
    dmn_g: &TestDomain,
    runs: usize,
) -> BenchResult<Samples> {
    let raw = Domain::define_xml(conn, &tiny_guest_xml(&raw_g.name, &raw_g.uuid))
        .map_err(|e| format!("defining the raw guest: {e}"))?;
    let ops = vec![
        TxnOp::put(
            vm_key(&dmn_g.uuid, "xml"),
            tiny_guest_xml(&dmn_g.name, &dmn_g.uuid),
            None,
        ),
        TxnOp::put(vm_key(&dmn_g.uuid, "node"), NODE, None),
        TxnOp::put(vm_key(&dmn_g.uuid, "state"), "stop", None),
    ];
    rt.block_on(client.txn(Txn::new().and_then(ops)))
        .map_err(|e| format!("writing the daemon's guest: {e}"))?;
    wait_stopped(rt, lv, client, d, &dmn_g.uuid)?;
    let mut s = Samples::default();
    for i in 0..runs {
        let (r, dm) = if i % 2 == 0 {
            let r = raw_cycle(&raw)?;
            (r, daemon_cycle(rt, lv, client, d, &dmn_g.uuid)?)
        } else {
            let dm = daemon_cycle(rt, lv, client, d, &dmn_g.uuid)?;
            (raw_cycle(&raw)?, dm)
        };
        eprintln!(
            "debvisor-bench: [vm-start] cycle {}: raw {r:.1} ms, daemon {:.1} ms",
            i + 1,
            dm.0
        );
        s.raw.push(r);
        s.daemon.push(dm.0);
        s.paired.push(dm.0 - r);
        if let Some((lock, rest)) = dm.1 {
            s.lock.push(lock);
            s.lock_to_started.push(rest);
        }
    }
    Ok(s)
}

/// Time `virDomainCreate` of the defined, shut-off raw guest; destroy it afterwards.
fn raw_cycle(dom: &Domain) -> BenchResult<f64> {
    let t = Instant::now();
    dom.create()
        .map_err(|e| format!("raw virDomainCreate: {e}"))?;
    let took = ms(t.elapsed());
    dom.destroy()
        .map_err(|e| format!("raw virDomainDestroy: {e}"))?;
    Ok(took)
}

/// One daemon start: write → `domain started` (ms), and the split at `run lock acquired`;
/// then stop it again.
fn daemon_cycle(
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    client: &mut Client,
    d: &mut DaemonProcess,
    uuid: &str,
) -> BenchResult<(f64, Option<(f64, f64)>)> {
    let wall = epoch_micros(SystemTime::now());
    rt.block_on(client.put(vm_key(uuid, "state"), "start", None))
        .map_err(|e| format!("writing state=start: {e}"))?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let (started, lock) = loop {
        let lines = d.json_lines();
        let after = |msg: &str| line_after(&lines, uuid, msg, wall);
        if let Some(s) = after("domain started") {
            break (s, after("run lock acquired"));
        }
        if Instant::now() >= deadline || !d.is_running() {
            return Err(format!(
                "no `domain started` of {uuid} within {STEP_TIMEOUT:?}\n{}",
                d.tail(30)
            ));
        }
        std::thread::sleep(POLL);
    };
    let total = (started - wall) as f64 / 1000.0;
    let split = lock.map(|l| ((l - wall) as f64 / 1000.0, (started - l) as f64 / 1000.0));
    rt.block_on(client.put(vm_key(uuid, "state"), "stop", None))
        .map_err(|e| format!("writing state=stop: {e}"))?;
    wait_stopped(rt, lv, client, d, uuid)?;
    Ok((total, split))
}

/// The daemon-clock timestamp (µs) of the first line `msg` of `uuid` at or after `wall`.
fn line_after(lines: &[Value], uuid: &str, msg: &str, wall: i64) -> Option<i64> {
    lines
        .iter()
        .filter(|v| str_field(v, "uuid") == Some(uuid) && str_field(v, "message") == Some(msg))
        .filter_map(|v| str_field(v, "timestamp").and_then(parse_rfc3339_micros))
        .find(|ts| *ts >= wall)
}

/// Until libvirt has the guest defined and shut off and its status says `stopped`.
fn wait_stopped(
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    client: &mut Client,
    d: &mut DaemonProcess,
    uuid: &str,
) -> BenchResult<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let off = matches!(
            rt.block_on(lv.get(uuid)),
            Ok(Some(i)) if i.state == DomainState::Shutoff
        );
        let status = rt
            .block_on(client.get(vm_key(uuid, "status"), None))
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
            .and_then(|v| serde_json::from_slice::<Value>(&v).ok());
        if off && status.is_some_and(|s| s["state"] == "stopped") {
            return Ok(());
        }
        if Instant::now() >= deadline || !d.is_running() {
            return Err(format!(
                "guest {uuid} not defined, shut off and `stopped` within {STEP_TIMEOUT:?}\n{}",
                d.tail(30)
            ));
        }
        std::thread::sleep(POLL * 2);
    }
}

/// One row: median, p90, min, max.
fn row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
        s.median, s.p90, s.min, s.max
    )
}

/// The report.
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    s: &Samples,
    load: (&str, &str),
    took: Duration,
) -> String {
    use std::fmt::Write as _;
    let (raw, dmn) = (summarize(&s.raw), summarize(&s.daemon));
    let overhead = dmn.median - raw.median;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### VM start overhead over raw libvirt, issue 17 ({started})\n"
    );
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); one daemon on `qemu:///system` (KVM) against \
         a fresh etcd 3.4 on loopback, keepalive every 1 s; two tiny guests (64 MiB, 1 vCPU, \
         no disk), {} interleaved cycles",
        m.profile,
        s.raw.len()
    );
    let _ = writeln!(
        o,
        "- load (`cat /proc/loadavg`) before: `{}`, after: `{}`; whole bench {:.1} min (the \
         machine is shared)\n",
        load.0,
        load.1,
        took.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        o,
        "*Raw*: the bench's own `virDomainCreate` of a defined, shut-off guest (looked up \
         beforehand), timed around the call. *Daemon*: a defined, shut-off guest the daemon \
         owns (`state=stop`); the bench's wall clock just before its put of `state=start` → \
         the timestamp of the daemon's `domain started` line, logged when the daemon's \
         `virDomainCreate` returned. Both end when libvirt's create returned. In between the \
         daemon path holds: the watch event, the reconcile (libvirt lookups), the run-lock \
         transaction (an etcd commit) and its own create.\n"
    );
    let _ = writeln!(o, "| ms | median | p90 | min | max |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let _ = writeln!(o, "{}", row("raw `virDomainCreate`", &raw));
    let _ = writeln!(o, "{}", row("daemon: write → `domain started`", &dmn));
    let _ = writeln!(
        o,
        "{}",
        row("daemon: write → `run lock acquired`", &summarize(&s.lock))
    );
    let _ = writeln!(
        o,
        "{}",
        row(
            "daemon: `run lock acquired` → `domain started`",
            &summarize(&s.lock_to_started)
        )
    );
    let _ = writeln!(
        o,
        "{}",
        row("paired: daemon − raw, same cycle", &summarize(&s.paired))
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "| measure | value | target | verdict |");
    let _ = writeln!(o, "|---|---:|---|---|");
    let _ = writeln!(
        o,
        "| **overhead: median(daemon) − median(raw)** (ms) | **{overhead:.2}** | ≤ {TARGET_OVERHEAD_MS} | {} |",
        verdict(overhead <= TARGET_OVERHEAD_MS)
    );
    o
}
