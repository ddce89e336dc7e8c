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
//! Two end points per start. *Launched*: the timestamp of libvirt's `starting up` line in
//! the guest's log (`/var/log/libvirt/qemu/<name>.log`, written by libvirtd just before it
//! executes qemu, in ms) — the "qemu launched", without qemu's own start (hundreds
//! of ms that spread by ±100 ms here). *Returned*: `virDomainCreate` returned (qemu up and
//! running). The cycles interleave (raw first in even cycles, daemon first in odd ones), so
//! drift of the machine's load hits both. Overhead = median(daemon) − median(raw) of the
//! launch intervals (the target); the paired per-cycle differences are reported too.
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

use super::clock::{epoch_micros, parse_rfc3339_micros};
use super::host::{bench_runtime, fs_type_of, load_triple, RunStart};
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

/// Directory of the per-guest logs of the system libvirtd's qemu driver.
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";

/// Per-cycle figures (ms).
#[derive(Debug, Default)]
struct Samples {
    /// Create entered → `starting up` (raw) and write → `starting up` (daemon).
    raw_launch: Vec<f64>,
    daemon_launch: Vec<f64>,
    /// daemon − raw launch of the same cycle.
    paired_launch: Vec<f64>,
    raw: Vec<f64>,
    daemon: Vec<f64>,
    /// Write → `run lock acquired` (daemon clock).
    lock: Vec<f64>,
    /// `run lock acquired` → `domain started`.
    lock_to_started: Vec<f64>,
    /// daemon − raw of the same cycle.
    paired: Vec<f64>,
    /// The bench's `state=start` put, round trip (one etcd commit).
    put: Vec<f64>,
    /// Put returned (the write committed) → `starting up`.
    after_put: Vec<f64>,
}

/// Run the figure and publish it.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let RunStart {
        started,
        load: load0,
        t0,
    } = RunStart::now();
    let rt = bench_runtime(1)?;
    if !debvisor_tests::kvm_available() {
        return Err("no usable /dev/kvm: the figure is about KVM guests".into());
    }
    ensure_libvirtd().map_err(|e| format!("libvirtd: {e}"))?;
    let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
    rt.block_on(lv.list())
        .map_err(|e| format!("{QEMU_URI}: {e}"))?;
    rt.block_on(sweep_stale(&lv));
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let etcd_fs = fs_type_of(etcd.data_dir());
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
        &etcd_fs,
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
            let r = raw_cycle(&raw, &raw_g.name)?;
            (r, daemon_cycle(rt, lv, client, d, dmn_g)?)
        } else {
            let dm = daemon_cycle(rt, lv, client, d, dmn_g)?;
            (raw_cycle(&raw, &raw_g.name)?, dm)
        };
        eprintln!(
            "debvisor-bench: [vm-start] cycle {}: launched raw {:.1} ms, daemon {:.1} ms; \
             returned raw {:.1} ms, daemon {:.1} ms",
            i + 1,
            r.launch,
            dm.launch,
            r.returned,
            dm.returned
        );
        s.raw_launch.push(r.launch);
        s.daemon_launch.push(dm.launch);
        s.paired_launch.push(dm.launch - r.launch);
        s.raw.push(r.returned);
        s.daemon.push(dm.returned);
        s.paired.push(dm.returned - r.returned);
        s.put.push(dm.put);
        s.after_put.push(dm.launch - dm.put);
        if let Some((lock, rest)) = dm.split {
            s.lock.push(lock);
            s.lock_to_started.push(rest);
        }
    }
    Ok(s)
}

/// One start's figures (ms from the start's trigger).
#[derive(Debug, Clone, Copy)]
struct Start {
    /// → libvirt's `starting up` line (qemu about to be executed).
    launch: f64,
    /// → `virDomainCreate` returned.
    returned: f64,
    /// Daemon only: write → `run lock acquired`, and from there → `domain started`.
    split: Option<(f64, f64)>,
    /// Daemon only: the put's round trip.
    put: f64,
}

/// Time `virDomainCreate` of the defined, shut-off raw guest; destroy it afterwards.
fn raw_cycle(dom: &Domain, name: &str) -> BenchResult<Start> {
    let wall = epoch_micros(SystemTime::now());
    let t = Instant::now();
    dom.create()
        .map_err(|e| format!("raw virDomainCreate: {e}"))?;
    let returned = ms(t.elapsed());
    let launched = launched_at(name, wall);
    // A guest that already stopped by itself (a tiny diskless guest can crash on a loaded
    // machine) needs no destroy; the start was measured all the same.
    if let Err(e) = dom.destroy() {
        if dom.is_active().unwrap_or(true) {
            return Err(format!("raw virDomainDestroy: {e}"));
        }
    }
    let launched = launched?;
    Ok(Start {
        launch: (launched - wall) as f64 / 1000.0,
        returned,
        split: None,
        put: 0.0,
    })
}

/// The time (µs since the epoch) of the guest's first `starting up` line at or after `wall`
/// (less the line's millisecond truncation).
fn launched_at(name: &str, wall: i64) -> BenchResult<i64> {
    let path = std::path::Path::new(QEMU_LOG_DIR).join(format!("{name}.log"));
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .filter_map(starting_up_micros)
        .find(|ts| *ts + 1000 > wall)
        .ok_or_else(|| {
            format!(
                "no `starting up` line after the start in {}",
                path.display()
            )
        })
}

/// `2026-12-06 17:11:46.468+0000: starting up libvirt version: …` → µs since the epoch.
fn starting_up_micros(line: &str) -> Option<i64> {
    let (stamp, rest) = line.split_once(": ")?;
    if !rest.starts_with("starting up") {
        return None;
    }
    let utc = stamp.strip_suffix("+0000")?;
    parse_rfc3339_micros(&format!("{utc}Z"))
}

/// One daemon start: write → `starting up` and → `domain started` (ms), and the split at
/// `run lock acquired`; then stop it again.
fn daemon_cycle(
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    client: &mut Client,
    d: &mut DaemonProcess,
    g: &TestDomain,
) -> BenchResult<Start> {
    let uuid = g.uuid.as_str();
    let wall = epoch_micros(SystemTime::now());
    let t = Instant::now();
    rt.block_on(client.put(vm_key(uuid, "state"), "start", None))
        .map_err(|e| format!("writing state=start: {e}"))?;
    let put = ms(t.elapsed());
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
    let returned = (started - wall) as f64 / 1000.0;
    let split = lock.map(|l| ((l - wall) as f64 / 1000.0, (started - l) as f64 / 1000.0));
    let launched = launched_at(&g.name, wall);
    rt.block_on(client.put(vm_key(uuid, "state"), "stop", None))
        .map_err(|e| format!("writing state=stop: {e}"))?;
    wait_stopped(rt, lv, client, d, uuid)?;
    Ok(Start {
        launch: (launched? - wall) as f64 / 1000.0,
        returned,
        split,
        put,
    })
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
    etcd_fs: &str,
) -> String {
    use std::fmt::Write as _;
    let (raw_l, dmn_l) = (summarize(&s.raw_launch), summarize(&s.daemon_launch));
    let (raw, dmn) = (summarize(&s.raw), summarize(&s.daemon));
    let overhead = dmn_l.median - raw_l.median;
    let committed_overhead = summarize(&s.after_put).median - raw_l.median;
    let returned_overhead = dmn.median - raw.median;
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
         a fresh etcd 3.4 on loopback (its data dir on `{etcd_fs}`: a commit waits for that \
         filesystem's fsync), keepalive every 1 s; two tiny guests (64 MiB, 1 vCPU, no \
         disk), {} interleaved cycles",
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
         beforehand), from the moment the bench calls it. *Daemon*: a defined, shut-off guest \
         the daemon owns (`state=stop`), from the bench's wall clock just before its put of \
         `state=start`. *Launched*: → the `starting up` line libvirtd writes to the guest's \
         log (`{QEMU_LOG_DIR}/<name>.log`, millisecond stamps) just before it executes \
         qemu — the issue's \"qemu launched\". *Returned*: → `virDomainCreate` returned \
         (qemu up and running; for the daemon the timestamp of its `domain started` line). \
         Between the write and libvirt the daemon path holds the watch event, the reconcile \
         (libvirt lookups), the run-lock transaction (an etcd commit) and its own create.\n"
    );
    let rows: [(&str, &[f64]); 10] = [
        ("**raw: create → launched**", &s.raw_launch),
        ("**daemon: write → launched**", &s.daemon_launch),
        (
            "paired launched: daemon − raw, same cycle",
            &s.paired_launch,
        ),
        (
            "daemon: put returned (write committed) → launched",
            &s.after_put,
        ),
        ("daemon: write → `run lock acquired`", &s.lock),
        (
            "of which the bench's put (round trip, one etcd commit)",
            &s.put,
        ),
        ("raw: create → returned", &s.raw),
        ("daemon: write → `domain started` (returned)", &s.daemon),
        (
            "daemon: `run lock acquired` → `domain started`",
            &s.lock_to_started,
        ),
        ("paired returned: daemon − raw, same cycle", &s.paired),
    ];
    let _ = writeln!(o, "| ms | median | p90 | min | max |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    for (name, xs) in rows {
        let _ = writeln!(o, "{}", row(name, &summarize(xs)));
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "| measure | value | target | verdict |");
    let _ = writeln!(o, "|---|---:|---|---|");
    let _ = writeln!(
        o,
        "| **overhead to qemu launched: median(daemon) − median(raw)** (ms) | **{overhead:.2}** | ≤ {TARGET_OVERHEAD_MS} | {} |",
        verdict(overhead <= TARGET_OVERHEAD_MS)
    );
    let _ = writeln!(
        o,
        "| overhead to qemu launched from the committed write: median(put returned → launched) − median(raw) (ms) | {committed_overhead:.2} | (the target counts the write's own commit) | — |"
    );
    let _ = writeln!(
        o,
        "| overhead to create returned: median(daemon) − median(raw) (ms) | {returned_overhead:.2} | (qemu's own start spreads too much to judge) | — |"
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_starting_up_line_gives_the_launch_time() {
        let line = "2026-12-06 17:11:46.468+0000: starting up libvirt version: 9.0.0, qemu";
        let at = starting_up_micros(line);
        assert_eq!(at, parse_rfc3339_micros("2026-12-06T17:11:46.468Z"));
        assert!(at.is_some());
        assert_eq!(
            starting_up_micros("2026-12-06 17:11:53.140+0000: shutting down, reason=destroyed"),
            None
        );
        assert_eq!(starting_up_micros("-msg timestamp=on"), None);
    }
}
