//! Issue-3 figures of `debvisor-bench`: the Domain object (VMs under `/debvisor/vms/<uuid>/`).
//!
//! 1. **Start latency** on libvirt's test driver: `--vms` VMs, each written as one
//!    transaction (`xml`, `node`, `state=start`) at a steady 100 per second, so the figure
//!    is latency, not queueing. Per VM: the bench's wall clock just before its write →
//!    the timestamp of the daemon's `domain started` line (the libvirt start returned);
//!    the daemon's other lines of the VM (`run lock acquired`, `domain defined from etcd`,
//!    `vm state changed` to running) split that time; a watch on `vms/` stamps the arrival
//!    of each `running` status.
//! 2. **Convergence** of `--vms` VMs written at once (batched transactions, as fast as etcd
//!    takes them) to a fresh daemon: until every status is `running` (watch arrival), and
//!    until the last `domain started` line (daemon clock).
//! 3. **etcd requests per keepalive tick** with 0 VMs and then with the same daemon holding
//!    `--vms` running VMs (etcd `/metrics` deltas over `--ticks` ticks, the foundation's
//!    machinery and its 1 s tick), plus the daemon's RSS and CPU over each window.
//! 4. **Real guests** (`qemu:///system`, root): write → status `running` of `--guests`
//!    tiny guests one after another; each is deleted from etcd afterwards (the daemon
//!    destroys and undefines it) and guarded by a [`TestDomain`] that removes it through
//!    libvirt if anything fails.
//!
//! Every etcd and daemon is owned by a local (killed on drop, on every return path).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use debvisor_daemon::hypervisor::Libvirt;
use debvisor_tests::libvirt::{
    ensure_libvirtd, random_uuid, sweep_stale, test_driver_xml, unique_name, TestDomain, QEMU_URI,
};
use debvisor_tests::{DaemonBuilder, DaemonProcess, EtcdProcess};
use etcd_client::{Client, DeleteOptions, EventType, Txn, TxnOp, WatchOptions};
use serde_json::Value;

use super::clock::{epoch_micros, now_utc_string, parse_rfc3339_micros};
use super::host::{clk_tck, cpu_ticks, loadavg, status_kib};
use super::logs::str_field;
use super::report::{bench_command, publish, Machine};
use super::stats::{mib, ms, nearest_rank, per_tick, summarize, verdict};
use super::ticks::{
    count_window, fetch_metrics, next_put, watch_key, Metrics, WatchMsg, TICK_INTERVAL, TICK_TTL,
};
use crate::{Args, BenchResult};

/// Start marker of the generated section in `docs/benchmarks.md`.
const MARK_START: &str = "<!-- bench:vms:start -->";
/// End marker of the generated section in `docs/benchmarks.md`.
const MARK_END: &str = "<!-- bench:vms:end -->";
/// Most VMs accepted by `--vms`.
pub(crate) const MAX_VMS: usize = 20_000;
/// Target: p99 of write → `domain started`.
const TARGET_LATENCY_P99_MS: f64 = 20.0;
/// Target: all VMs converged, per VM (10 s for 1000).
const TARGET_CONVERGE_PER_VM_MS: f64 = 10.0;
/// VMs in the "first VMs" row of figure 1 (before a backlog can build up).
const FIRST_VMS: usize = 100;
/// etcd's default `--max-txn-ops`.
pub(crate) const TXN_MAX_OPS: usize = 128;
/// Keys per VM in a request (`xml`, `node`, `state`).
pub(crate) const KEYS_PER_VM: usize = 3;
const _: () = assert!(TXN_MAX_OPS / KEYS_PER_VM * KEYS_PER_VM <= TXN_MAX_OPS);

/// Write `vms` for `node` as an operator would, as many per transaction as etcd takes;
/// the number of transactions.
pub(crate) async fn put_vms(
    client: &mut etcd_client::Client,
    vms: &[VmSpec],
    node: &str,
) -> BenchResult<usize> {
    let mut txns = 0;
    for chunk in vms.chunks(TXN_MAX_OPS / KEYS_PER_VM) {
        let ops: Vec<TxnOp> = chunk.iter().flat_map(|v| v.ops(node)).collect();
        let r = client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| format!("writing {} VMs: {e}", chunk.len()))?;
        if !r.succeeded() {
            return Err("a VM write transaction failed".to_owned());
        }
        txns += 1;
    }
    Ok(txns)
}
/// The daemon's default `domains.stats_writes_per_tick` (records per stats sample).
const STATS_BUDGET: usize = 64;
/// The daemon's default `domains.stats_sample_interval`, in keepalive ticks of this figure.
const STATS_SAMPLE_TICKS: usize = 10;
/// How long a daemon may take to reach `run`.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Base deadline of a phase, plus [`PHASE_PER_VM`] per VM.
pub(crate) const PHASE_BASE: Duration = Duration::from_secs(60);
/// Deadline added per VM.
pub(crate) const PHASE_PER_VM: Duration = Duration::from_millis(50);
/// Deadline of one real guest reaching `running` / being removed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Settle after a daemon reached `run` before writing.
const SETTLE: Duration = Duration::from_secs(2);
/// Prefix of the VM keys.
pub(crate) const VMS_PREFIX: &str = "/debvisor/vms/";

/// Node of the latency daemon.
const NODE_LAT: &str = "bench-vm-lat";
/// Node of the convergence / per-tick daemon.
const NODE_CONV: &str = "bench-vm-conv";
/// Node of the real-guest daemon.
const NODE_KVM: &str = "bench-vm-kvm";

/// The issue-3 figures: run, print, write the section.
pub(crate) fn run(args: &Args, machine: &Machine) -> BenchResult<()> {
    let started = now_utc_string();
    let n = args.vms;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    eprintln!(
        "debvisor-bench: [vms 1/4] write → domain started, {n} VMs at {}/s (test driver)",
        args.vm_rate
    );
    let lat = bench_latency(&rt, n, args.vm_rate)?;
    eprintln!(
        "debvisor-bench: [vms 2/4 + 3/4] etcd requests per tick with 0 VMs, converge {n} VMs, \
         requests per tick with {n} VMs"
    );
    let conv = bench_converge(&rt, n, args.ticks)?;
    let kvm = if !debvisor_tests::is_root() {
        Err("not root: qemu:///system needs root".to_owned())
    } else {
        eprintln!(
            "debvisor-bench: [vms 4/4] real guests on {QEMU_URI}, {} runs",
            args.guests
        );
        match bench_guests(&rt, args.guests) {
            Ok(k) => Ok(k),
            // Setup problems (no libvirtd) are reported; a failure mid-run is an error.
            Err(GuestError::Unavailable(e)) => Err(e),
            Err(GuestError::Failed(e)) => return Err(e),
        }
    };
    rt.shutdown_timeout(Duration::from_secs(5));
    let report = render(args, machine, &started, &lat, &conv, &kvm);
    publish(args, MARK_START, MARK_END, &report)
}

// ---------------------------------------------------------------------------------------
// VMs, keys, writes
// ---------------------------------------------------------------------------------------

/// One VM the bench writes.
#[derive(Debug, Clone)]
pub(crate) struct VmSpec {
    pub(crate) uuid: String,
    name: String,
    xml: String,
}

impl VmSpec {
    /// A test-driver VM.
    pub(crate) fn test_driver() -> VmSpec {
        let uuid = random_uuid();
        let name = unique_name("bench");
        let xml = test_driver_xml(&name, &uuid);
        VmSpec { uuid, name, xml }
    }

    /// The VM of guest `g` (its UUID, name and tiny-guest XML for `g`'s driver); `g`
    /// removes it from libvirt when dropped.
    pub(crate) fn of_domain(g: &TestDomain) -> VmSpec {
        VmSpec {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            xml: g.xml(),
        }
    }

    /// The request's puts: definition, target and `state=start` together.
    pub(crate) fn ops(&self, node: &str) -> Vec<TxnOp> {
        vec![
            TxnOp::put(vm_key(&self.uuid, "xml"), self.xml.as_str(), None),
            TxnOp::put(vm_key(&self.uuid, "node"), node, None),
            TxnOp::put(vm_key(&self.uuid, "state"), "start", None),
        ]
    }
}

/// `/debvisor/vms/<uuid>/<field>`.
pub(crate) fn vm_key(uuid: &str, field: &str) -> String {
    format!("{VMS_PREFIX}{uuid}/{field}")
}

/// Connect a client to `etcd`.
pub(crate) async fn connect(etcd: &EtcdProcess) -> BenchResult<Client> {
    let ep = etcd.endpoint();
    Client::connect([ep.as_str()], None)
        .await
        .map_err(|e| format!("connecting to {ep}: {e}"))
}

/// Spawn a daemon for `node` (harness defaults: test driver, keepalive 1 s, TTL 3 s — the
/// foundation's tick figure) with `env` overrides, and wait until it is in `run`.
pub(crate) fn spawn_daemon(
    etcd: &EtcdProcess,
    node: &str,
    env: &[(&str, &str)],
) -> BenchResult<DaemonProcess> {
    let mut b = DaemonBuilder::new(node)
        .endpoints(&[etcd.endpoint()])
        .env(
            "DEBVISOR_KEEPALIVE_INTERVAL",
            &format!("{}s", TICK_INTERVAL.as_secs()),
        )
        .env(
            "DEBVISOR_KEEPALIVE_LEASE_TTL",
            &format!("{}s", TICK_TTL.as_secs()),
        );
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut d = b
        .spawn()
        .map_err(|e| format!("spawning debvisord {node}: {e}"))?;
    d.wait_run(RUN_TIMEOUT)
        .map_err(|e| format!("debvisord {node} did not reach run: {e}"))?;
    Ok(d)
}

// ---------------------------------------------------------------------------------------
// Status watch
// ---------------------------------------------------------------------------------------

/// A status put seen by the watch: uuid, its `state`, arrival instant.
pub(crate) type StatusSeen = (String, String, Instant);

/// A watch on `vms/` forwarding every status put (uuid, `state`, arrival instant): the
/// benches' "status back on a watch" clock.
pub(crate) struct StatusWatch {
    rx: mpsc::Receiver<Result<StatusSeen, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusWatch {
    /// Open the watch on `etcd` (returns once etcd confirmed it).
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        etcd: &EtcdProcess,
    ) -> BenchResult<StatusWatch> {
        StatusWatch::start_at(rt, &etcd.endpoint())
    }

    /// Open the watch on `endpoint` (returns once etcd confirmed it).
    pub(crate) fn start_at(
        rt: &tokio::runtime::Runtime,
        endpoint: &str,
    ) -> BenchResult<StatusWatch> {
        let mut client = rt
            .block_on(Client::connect([endpoint], None))
            .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let task = rt.spawn(async move {
            let res: Result<(), String> = async {
                let mut s = client
                    .watch(VMS_PREFIX, Some(WatchOptions::new().with_prefix()))
                    .await
                    .map_err(|e| format!("watching {VMS_PREFIX}: {e}"))?;
                loop {
                    let msg = s
                        .message()
                        .await
                        .map_err(|e| format!("watch {VMS_PREFIX}: {e}"))?
                        .ok_or_else(|| format!("watch {VMS_PREFIX}: stream closed"))?;
                    let at = Instant::now();
                    if msg.created() {
                        let _ = ready_tx.send(Ok(()));
                    }
                    if msg.canceled() {
                        return Err(format!("watch canceled by etcd: {}", msg.cancel_reason()));
                    }
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if ev.event_type() != EventType::Put {
                            continue;
                        }
                        let key = String::from_utf8_lossy(kv.key());
                        let Some(uuid) = key
                            .strip_prefix(VMS_PREFIX)
                            .and_then(|r| r.strip_suffix("/status"))
                        else {
                            continue;
                        };
                        let state = serde_json::from_slice::<Value>(kv.value())
                            .ok()
                            .and_then(|v| v["state"].as_str().map(str::to_owned))
                            .unwrap_or_default();
                        if tx.send(Ok((uuid.to_owned(), state, at))).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            .await;
            if let Err(e) = res {
                let _ = ready_tx.send(Err(e.clone()));
                let _ = tx.send(Err(e));
            }
        });
        let w = StatusWatch { rx, task };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(w),
            Ok(Err(e)) => Err(format!("opening the status watch: {e}")),
            Err(_) => Err("the status watch was not created within 10 s".into()),
        }
    }

    /// The next status put within `timeout`: `Ok(None)` when none came, an error when the
    /// watch failed or ended.
    pub(crate) fn next(&self, timeout: Duration) -> BenchResult<Option<StatusSeen>> {
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(seen)) => Ok(Some(seen)),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the status watch ended".into()),
        }
    }

    /// Collect `running` arrivals until all of `want` are in or `deadline`; the daemon must
    /// stay up meanwhile, and SIGINT/SIGTERM (when a bench routed them to
    /// [`super::scale::check_interrupted`]) end the wait.
    pub(crate) fn wait_all(
        &self,
        want: &HashSet<String>,
        d: &mut DaemonProcess,
        timeout: Duration,
    ) -> BenchResult<HashMap<String, Instant>> {
        let deadline = Instant::now() + timeout;
        let mut got: HashMap<String, Instant> = HashMap::new();
        while got.len() < want.len() {
            super::scale::check_interrupted()?;
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "only {} of {} VMs running after {timeout:?}\n{}",
                    got.len(),
                    want.len(),
                    d.tail(30)
                ));
            }
            match self.next((deadline - now).min(Duration::from_millis(500)))? {
                Some((uuid, state, at)) => {
                    if state == "running" && want.contains(&uuid) {
                        got.entry(uuid).or_insert(at);
                    }
                }
                None => {
                    if !d.is_running() {
                        return Err(format!(
                            "debvisord {} exited while VMs were starting\n{}",
                            d.node(),
                            d.tail(40)
                        ));
                    }
                }
            }
        }
        Ok(got)
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Daemon log timestamps
// ---------------------------------------------------------------------------------------

/// Daemon-clock timestamps (µs since the epoch) of one VM's lines.
#[derive(Debug, Clone, Default)]
struct VmLines {
    lock: Option<i64>,
    defined: Option<i64>,
    started: Option<i64>,
    /// `vm state changed` with `to=running` (logged after the status write succeeded).
    running: Option<i64>,
}

/// The VM lines of `d`, by uuid; plus warnings and errors counted.
fn vm_lines(d: &DaemonProcess) -> (HashMap<String, VmLines>, usize, usize) {
    let mut out: HashMap<String, VmLines> = HashMap::new();
    let (mut warns, mut errs) = (0, 0);
    for v in d.json_lines() {
        match str_field(&v, "level") {
            Some("WARN") => warns += 1,
            Some("ERROR") => errs += 1,
            _ => {}
        }
        let Some(uuid) = str_field(&v, "uuid") else {
            continue;
        };
        let Some(ts) = str_field(&v, "timestamp").and_then(parse_rfc3339_micros) else {
            continue;
        };
        let e = out.entry(uuid.to_owned()).or_default();
        let first = |slot: &mut Option<i64>| {
            if slot.is_none() {
                *slot = Some(ts);
            }
        };
        match str_field(&v, "message") {
            Some("run lock acquired") => first(&mut e.lock),
            Some("domain defined from etcd") => first(&mut e.defined),
            Some("domain started") => first(&mut e.started),
            Some("vm state changed") if str_field(&v, "to") == Some("running") => {
                first(&mut e.running)
            }
            _ => {}
        }
    }
    (out, warns, errs)
}

/// Milliseconds between two µs timestamps.
fn span_ms(from: i64, to: i64) -> f64 {
    (to - from) as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// An etcd latency histogram's change between two snapshots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistDelta {
    pub(crate) count: f64,
    pub(crate) mean_ms: f64,
    /// Upper bounds (ms) of the buckets holding the median and the 99th percentile.
    pub(crate) p50_le_ms: f64,
    pub(crate) p99_le_ms: f64,
}

/// Delta of Prometheus histogram `name` (seconds) between `a` and `b`; `None` if absent or
/// empty.
pub(crate) fn hist_delta(a: &Metrics, b: &Metrics, name: &str) -> Option<HistDelta> {
    let count = b.sum(&format!("{name}_count"), &[])? - a.sum(&format!("{name}_count"), &[])?;
    let sum = b.sum(&format!("{name}_sum"), &[])? - a.sum(&format!("{name}_sum"), &[])?;
    if count <= 0.0 {
        return None;
    }
    let bucket = format!("{name}_bucket");
    let mut les: Vec<(f64, String)> = b
        .series
        .iter()
        .filter(|(n, _, _)| *n == bucket)
        .filter_map(|(_, l, _)| {
            let le = l.get("le")?;
            let v = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((v, le.clone()))
        })
        .collect();
    les.sort_by(|x, y| x.0.total_cmp(&y.0));
    let cum = |le: &str| -> f64 {
        b.sum(&bucket, &[("le", le)]).unwrap_or(0.0) - a.sum(&bucket, &[("le", le)]).unwrap_or(0.0)
    };
    let bound = |q: f64| -> f64 {
        les.iter()
            .find(|(_, le)| cum(le) >= q * count)
            .map_or(f64::NAN, |(v, _)| v * 1000.0)
    };
    Some(HistDelta {
        count,
        mean_ms: sum / count * 1000.0,
        p50_le_ms: bound(0.5),
        p99_le_ms: bound(0.99),
    })
}

/// etcd's disk latencies between two snapshots: WAL fsync and backend commit.
#[derive(Debug, Clone, Copy)]
struct Disk {
    fsync: Option<HistDelta>,
    commit: Option<HistDelta>,
}

impl Disk {
    fn between(a: &Metrics, b: &Metrics) -> Disk {
        Disk {
            fsync: hist_delta(a, b, "etcd_disk_wal_fsync_duration_seconds"),
            commit: hist_delta(a, b, "etcd_disk_backend_commit_duration_seconds"),
        }
    }
}

/// p50 / p90 / p99 / max (nearest rank) and min of a sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pct {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

/// Percentiles of `xs` (empty → NaN).
pub(crate) fn pct(xs: &[f64]) -> Pct {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let at = |q: f64| nearest_rank(&v, q).unwrap_or(f64::NAN);
    Pct {
        n,
        min: v.first().copied().unwrap_or(f64::NAN),
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

// ---------------------------------------------------------------------------------------
// Figure 1: write → domain started, paced
// ---------------------------------------------------------------------------------------

/// Results of figure 1.
#[derive(Debug, Clone)]
struct LatencyResult {
    n: usize,
    /// Requested writes per second.
    pace: u32,
    /// Achieved write rate (writes per second over the write phase).
    rate: f64,
    /// Write → `domain started` (ms), per VM.
    started: Vec<f64>,
    /// Write → `run lock acquired`.
    to_lock: Vec<f64>,
    /// Lock → `domain defined from etcd`.
    lock_to_defined: Vec<f64>,
    /// Defined → started (the libvirt start call).
    defined_to_started: Vec<f64>,
    /// Started → `vm state changed` to running (status write).
    started_to_status: Vec<f64>,
    /// Write → the `running` status arrived on the bench's watch.
    status_seen: Vec<f64>,
    /// The bench's write transaction round trips.
    write_rtt: Vec<f64>,
    warns: usize,
    errs: usize,
    /// etcd's disk latencies over the figure.
    disk: Disk,
    /// Load average at the start and the end.
    load: (f64, f64),
}

/// Figure 1 on a fresh etcd and daemon.
fn bench_latency(rt: &tokio::runtime::Runtime, n: usize, pace: u32) -> BenchResult<LatencyResult> {
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let mut d = spawn_daemon(&etcd, NODE_LAT, &[])?;
    std::thread::sleep(SETTLE);
    let vms: Vec<VmSpec> = (0..n).map(|_| VmSpec::test_driver()).collect();
    let watch = StatusWatch::start(rt, &etcd)?;
    let mut client = rt.block_on(connect(&etcd))?;
    let period = Duration::from_secs(1) / pace.max(1);
    let load0 = loadavg();
    let m0 = fetch_metrics(etcd.client_addr())?;
    // (wall clock just before the write, instant, round trip)
    let writes: Vec<(i64, Instant, Duration)> = rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
        for (i, vm) in vms.iter().enumerate() {
            let due = t0 + period * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(due).await;
            let wall = epoch_micros(SystemTime::now());
            let at = Instant::now();
            let r = client
                .txn(Txn::new().and_then(vm.ops(NODE_LAT)))
                .await
                .map_err(|e| format!("writing VM {}: {e}", vm.name))?;
            if !r.succeeded() {
                return Err(format!("writing VM {}: transaction failed", vm.name));
            }
            out.push((wall, at, at.elapsed()));
        }
        Ok::<_, String>(out)
    })?;
    let span = match (writes.first(), writes.last()) {
        (Some(a), Some(b)) => b.1.duration_since(a.1),
        _ => Duration::ZERO,
    };
    let want: HashSet<String> = vms.iter().map(|v| v.uuid.clone()).collect();
    let seen = watch.wait_all(&want, &mut d, PHASE_BASE + PHASE_PER_VM * n as u32)?;
    let m1 = fetch_metrics(etcd.client_addr())?;
    let load1 = loadavg();
    drop(watch);
    // The `vm state changed` line follows the status write: give the pipe a moment.
    std::thread::sleep(Duration::from_millis(200));
    let (lines, warns, errs) = vm_lines(&d);
    let mut r = LatencyResult {
        n,
        pace,
        rate: if span.is_zero() {
            f64::NAN
        } else {
            (n.saturating_sub(1)) as f64 / span.as_secs_f64()
        },
        started: Vec::new(),
        to_lock: Vec::new(),
        lock_to_defined: Vec::new(),
        defined_to_started: Vec::new(),
        started_to_status: Vec::new(),
        status_seen: Vec::new(),
        write_rtt: writes.iter().map(|w| ms(w.2)).collect(),
        warns,
        errs,
        disk: Disk::between(&m0, &m1),
        load: (load0, load1),
    };
    for (i, (vm, (wall, at, _))) in vms.iter().zip(&writes).enumerate() {
        let l = lines
            .get(&vm.uuid)
            .ok_or_else(|| format!("no log lines for VM {} ({})", vm.name, vm.uuid))?;
        let started = l
            .started
            .ok_or_else(|| format!("no `domain started` line for VM {}", vm.name))?;
        r.started.push(span_ms(*wall, started));
        if let Some(lock) = l.lock {
            r.to_lock.push(span_ms(*wall, lock));
            if let Some(def) = l.defined {
                r.lock_to_defined.push(span_ms(lock, def));
                r.defined_to_started.push(span_ms(def, started));
            }
        }
        if let Some(run) = l.running {
            r.started_to_status.push(span_ms(started, run));
        }
        if let Some(s) = seen.get(&vm.uuid) {
            r.status_seen.push(ms(s.duration_since(*at)));
        }
        // One line per VM for a closer look (stderr only): index, write → lock / defined /
        // started (ms).
        let rel = |t: Option<i64>| t.map_or(f64::NAN, |t| span_ms(*wall, t));
        eprintln!(
            "debvisor-bench: vm-latency {i} lock {:.2} defined {:.2} started {:.2}",
            rel(l.lock),
            rel(l.defined),
            rel(Some(started))
        );
    }
    drop(d);
    drop(etcd);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Figures 2 and 3: convergence, requests per tick with 0 and N VMs
// ---------------------------------------------------------------------------------------

/// One per-tick window of figure 3.
#[derive(Debug, Clone)]
struct TickWindow {
    ticks: usize,
    window: Duration,
    before: Metrics,
    after: Metrics,
    /// Daemon utime+stime ticks over the window.
    cpu_ticks: u64,
    /// etcd utime+stime ticks over the window.
    etcd_ticks: u64,
    rss_kib: u64,
    anon_kib: u64,
    threads: u64,
}

impl TickWindow {
    /// Per-tick delta of a counter (`None` when etcd does not expose it).
    fn per_tick(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let d = self.after.sum(name, labels)? - self.before.sum(name, labels)?;
        (self.ticks > 0).then(|| d / self.ticks as f64)
    }
}

/// Results of figures 2 and 3.
#[derive(Debug, Clone)]
struct ConvergeResult {
    n: usize,
    /// Write transactions and the time to write them all.
    txns: usize,
    write_all: Duration,
    /// Per VM: t0 → its `running` status arrived on the watch (ms).
    running: Vec<f64>,
    /// t0 → the last `domain started` line (daemon clock, ms).
    last_started: f64,
    /// t0 → the first `domain started` line.
    first_started: f64,
    /// Daemon / etcd CPU over the convergence (s).
    cpu_s: f64,
    etcd_cpu_s: f64,
    /// Daemon VmHWM after convergence.
    hwm_kib: u64,
    warns: usize,
    errs: usize,
    idle0: TickWindow,
    idle_n: TickWindow,
    /// Ticks waited after convergence before the N-VM window.
    settle_ticks: usize,
    clk_tck: u64,
    disk: Disk,
    load: (f64, f64),
}

/// Measure one window of `ticks` keepalive ticks of `d` (watching its `last_seen`), after
/// `settle` extra ticks.
fn tick_window(
    rt: &tokio::runtime::Runtime,
    etcd: &EtcdProcess,
    d: &mut DaemonProcess,
    settle: usize,
    ticks: usize,
) -> BenchResult<TickWindow> {
    let (tx, rx) = mpsc::channel::<WatchMsg>();
    let key = format!("/debvisor/nodes/{}/last_seen", d.node());
    let watcher = rt.spawn(watch_key(etcd.endpoint(), key, tx));
    let res = (|| {
        for _ in 0..settle {
            next_put(&rx, TICK_INTERVAL * 5)?;
        }
        let pid = d.pid();
        let etcd_pid = etcd.pid().ok_or("etcd is not running")?;
        // count_window samples before its first and after its last snapshot: CPU is read
        // around it, which adds the warm-up ticks' half-interval edges (noted in the text).
        let c0 = cpu_ticks(pid)?;
        let e0 = cpu_ticks(etcd_pid)?;
        let t0 = Instant::now();
        let (n, window, _revs, before, after) = count_window(etcd, &rx, ticks)?;
        let spent = t0.elapsed();
        let c1 = cpu_ticks(pid)?;
        let e1 = cpu_ticks(etcd_pid)?;
        Ok::<_, String>((n, window, before, after, c1 - c0, e1 - e0, spent))
    })();
    watcher.abort();
    let (n, window, before, after, cpu, ecpu, spent) = res?;
    if !d.is_running() {
        return Err(format!(
            "debvisord {} exited during the tick window\n{}",
            d.node(),
            d.tail(40)
        ));
    }
    let pid = d.pid();
    // CPU is per the whole measured span (warm-up included), scaled in render by `spent`.
    Ok(TickWindow {
        ticks: n,
        window: spent.max(window),
        before,
        after,
        cpu_ticks: cpu,
        etcd_ticks: ecpu,
        rss_kib: status_kib(pid, "VmRSS")?,
        anon_kib: status_kib(pid, "RssAnon")?,
        threads: status_kib(pid, "Threads")?,
    })
}

/// Figures 2 and 3 on one fresh etcd and daemon: the 0-VM window, the convergence, the
/// N-VM window.
fn bench_converge(
    rt: &tokio::runtime::Runtime,
    n: usize,
    ticks: usize,
) -> BenchResult<ConvergeResult> {
    let tck = clk_tck()?;
    let etcd = EtcdProcess::start().map_err(|e| format!("starting etcd: {e}"))?;
    let etcd_pid = etcd.pid().ok_or("etcd is not running")?;
    let mut d = spawn_daemon(&etcd, NODE_CONV, &[])?;
    std::thread::sleep(SETTLE);
    eprintln!("debvisor-bench: vms: requests per tick with 0 VMs ({ticks} ticks)");
    let idle0 = tick_window(rt, &etcd, &mut d, 0, ticks)?;

    eprintln!("debvisor-bench: vms: converging {n} VMs written at once");
    let vms: Vec<VmSpec> = (0..n).map(|_| VmSpec::test_driver()).collect();
    let watch = StatusWatch::start(rt, &etcd)?;
    let mut client = rt.block_on(connect(&etcd))?;
    let pid = d.pid();
    let load0 = loadavg();
    let m0 = fetch_metrics(etcd.client_addr())?;
    let cpu0 = cpu_ticks(pid)?;
    let ecpu0 = cpu_ticks(etcd_pid)?;
    let wall0 = epoch_micros(SystemTime::now());
    let t0 = Instant::now();
    let txns = rt.block_on(put_vms(&mut client, &vms, NODE_CONV))?;
    let write_all = t0.elapsed();
    let want: HashSet<String> = vms.iter().map(|v| v.uuid.clone()).collect();
    let seen = watch.wait_all(&want, &mut d, PHASE_BASE + PHASE_PER_VM * n as u32)?;
    let cpu1 = cpu_ticks(pid)?;
    let ecpu1 = cpu_ticks(etcd_pid)?;
    let m1 = fetch_metrics(etcd.client_addr())?;
    let load1 = loadavg();
    drop(watch);
    std::thread::sleep(Duration::from_millis(200));
    let hwm = status_kib(pid, "VmHWM")?;
    let (lines, warns, errs) = vm_lines(&d);
    let starts: Vec<i64> = vms
        .iter()
        .filter_map(|v| lines.get(&v.uuid).and_then(|l| l.started))
        .collect();
    if starts.len() != n {
        return Err(format!(
            "{} of {n} VMs logged `domain started`",
            starts.len()
        ));
    }
    let last = starts.iter().copied().max().unwrap_or(wall0);
    let first = starts.iter().copied().min().unwrap_or(wall0);
    let running: Vec<f64> = seen.values().map(|at| ms(at.duration_since(t0))).collect();

    // Every VM's first stats record is written within ceil(N / budget) samples; then the
    // steady state.
    let settle_ticks = n.div_ceil(STATS_BUDGET) * STATS_SAMPLE_TICKS + 2;
    eprintln!(
        "debvisor-bench: vms: requests per tick with {n} VMs ({settle_ticks} settle + {ticks} ticks)"
    );
    let idle_n = tick_window(rt, &etcd, &mut d, settle_ticks, ticks)?;
    drop(client);
    drop(d);
    drop(etcd);
    Ok(ConvergeResult {
        n,
        txns,
        write_all,
        running,
        last_started: span_ms(wall0, last),
        first_started: span_ms(wall0, first),
        cpu_s: cpu1.saturating_sub(cpu0) as f64 / tck as f64,
        etcd_cpu_s: ecpu1.saturating_sub(ecpu0) as f64 / tck as f64,
        hwm_kib: hwm,
        warns,
        errs,
        idle0,
        idle_n,
        settle_ticks,
        clk_tck: tck,
        disk: Disk::between(&m0, &m1),
        load: (load0, load1),
    })
}

// ---------------------------------------------------------------------------------------
// Figure 4: real guests
// ---------------------------------------------------------------------------------------

/// Why figure 4 did not produce numbers.
enum GuestError {
    /// The host cannot run it (reported in the section, the bench goes on).
    Unavailable(String),
    /// It started and failed (the bench fails).
    Failed(String),
}

/// Results of figure 4.
#[derive(Debug, Clone)]
struct GuestResult {
    kvm: bool,
    /// Write → status `running` on the watch (ms), per run.
    running: Vec<f64>,
    /// Write → `domain started` (daemon clock).
    started: Vec<f64>,
    /// `domain defined from etcd` → `domain started`: libvirt's start of qemu.
    start_call: Vec<f64>,
    /// Delete from etcd → the domain is gone from libvirt (bench polls every 20 ms).
    removed: Vec<f64>,
}

/// Figure 4: `runs` tiny guests on `qemu:///system`, one at a time.
fn bench_guests(rt: &tokio::runtime::Runtime, runs: usize) -> Result<GuestResult, GuestError> {
    use GuestError::{Failed, Unavailable};
    ensure_libvirtd().map_err(|e| Unavailable(format!("libvirtd: {e}")))?;
    let lv = Libvirt::new(QEMU_URI, Duration::from_secs(20));
    rt.block_on(lv.list())
        .map_err(|e| Unavailable(format!("{QEMU_URI}: {e}")))?;
    rt.block_on(sweep_stale(&lv));
    let etcd = EtcdProcess::start().map_err(|e| Failed(format!("starting etcd: {e}")))?;
    let mut d =
        spawn_daemon(&etcd, NODE_KVM, &[("DEBVISOR_HYPERVISOR_URI", QEMU_URI)]).map_err(Failed)?;
    std::thread::sleep(SETTLE);
    let mut client = rt.block_on(connect(&etcd)).map_err(Failed)?;
    let mut out = GuestResult {
        kvm: debvisor_tests::kvm_available(),
        running: Vec::new(),
        started: Vec::new(),
        start_call: Vec::new(),
        removed: Vec::new(),
    };
    for i in 0..runs {
        // Removes the guest through libvirt when dropped (also on every error path).
        let g = TestDomain::new(&lv, "bench");
        match guest_run(rt, &lv, &etcd, &mut d, &mut client, &g) {
            Ok(r) => {
                eprintln!(
                    "debvisor-bench: guest run {}: running after {:.0} ms, removed after {:.0} ms",
                    i + 1,
                    r.running,
                    r.removed
                );
                out.running.push(r.running);
                out.removed.push(r.removed);
                out.started.extend(r.started);
                out.start_call.extend(r.start_call);
            }
            Err(e) => {
                // Stop the daemon first so it cannot start the guest again after the guard
                // removed it.
                let _ = d.kill();
                drop(g);
                return Err(Failed(e));
            }
        }
    }
    drop(d);
    drop(etcd);
    Ok(out)
}

/// One real-guest run (ms).
struct GuestRun {
    running: f64,
    started: Option<f64>,
    start_call: Option<f64>,
    removed: f64,
}

/// Write guest `g` to etcd for `d`, wait for `running`, delete it from etcd and wait until
/// the daemon removed it from libvirt.
fn guest_run(
    rt: &tokio::runtime::Runtime,
    lv: &Libvirt,
    etcd: &EtcdProcess,
    d: &mut DaemonProcess,
    client: &mut Client,
    g: &TestDomain,
) -> BenchResult<GuestRun> {
    let watch = StatusWatch::start(rt, etcd)?;
    let xml = g.xml();
    let ops = vec![
        TxnOp::put(vm_key(&g.uuid, "xml"), xml.as_str(), None),
        TxnOp::put(vm_key(&g.uuid, "node"), NODE_KVM, None),
        TxnOp::put(vm_key(&g.uuid, "state"), "start", None),
    ];
    let wall = epoch_micros(SystemTime::now());
    let t0 = Instant::now();
    rt.block_on(client.txn(Txn::new().and_then(ops)))
        .map_err(|e| format!("writing guest {}: {e}", g.name))?;
    let want: HashSet<String> = [g.uuid.clone()].into();
    let seen = watch.wait_all(&want, d, GUEST_TIMEOUT)?;
    drop(watch);
    let at = seen
        .get(&g.uuid)
        .copied()
        .ok_or_else(|| format!("guest {} not seen running", g.name))?;
    let running = ms(at.duration_since(t0));
    std::thread::sleep(Duration::from_millis(100));
    let (lines, _, _) = vm_lines(d);
    let l = lines.get(&g.uuid).cloned().unwrap_or_default();
    let started = l.started.map(|s| span_ms(wall, s));
    let start_call = l.started.zip(l.defined).map(|(s, def)| span_ms(def, s));
    // Delete it from etcd: the daemon destroys and undefines it.
    let t_del = Instant::now();
    rt.block_on(client.delete(
        format!("{VMS_PREFIX}{}/", g.uuid),
        Some(DeleteOptions::new().with_prefix()),
    ))
    .map_err(|e| format!("deleting guest {}: {e}", g.name))?;
    let deadline = t_del + GUEST_TIMEOUT;
    loop {
        match rt.block_on(lv.get(&g.uuid)) {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => return Err(format!("libvirt get {}: {e}", g.name)),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "guest {} still defined {GUEST_TIMEOUT:?} after its deletion from etcd\n{}",
                g.name,
                d.tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(GuestRun {
        running,
        started,
        start_call,
        removed: ms(t_del.elapsed()),
    })
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// Figure-1 rows of etcd's own disk latencies (histogram buckets: p50/p99 are bucket upper
/// bounds).
fn disk_rows(d: &Disk) -> String {
    let mut o = String::new();
    for (what, h) in [
        ("etcd WAL fsync", d.fsync),
        ("etcd backend commit", d.commit),
    ] {
        if let Some(h) = h {
            o.push_str(&format!(
                "| {what} (etcd's histogram: {:.0} over the figure, mean {:.2}; p50/p99 are bucket bounds) | ≤ {} | - | ≤ {} | - | - | - |\n",
                h.count,
                h.mean_ms,
                h.p50_le_ms,
                h.p99_le_ms
            ));
        }
    }
    o.trim_end().to_owned()
}

/// A per-tick value, `n/a` when missing.
fn fmt_tick(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), per_tick)
}

/// The markdown section (also printed to stdout).
fn render(
    args: &Args,
    m: &Machine,
    started: &str,
    lat: &LatencyResult,
    conv: &ConvergeResult,
    kvm: &Result<GuestResult, String>,
) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let n = lat.n;
    let _ = writeln!(o, "### VMs (Domain object), issue 3 ({started})\n");
    let _ = writeln!(o, "- command: `{}`", bench_command(args, m));
    let _ = writeln!(o, "- machine: {m}");
    let _ = writeln!(
        o,
        "- profile: `{}` (bench and `debvisord`); etcd 3.4 (`/usr/bin/etcd`) on loopback, a \
         fresh etcd and daemon per figure; daemons at the foundation's tick figure settings \
         (keepalive every {}s, lease TTL {}s), `domains.stats_writes_per_tick` {STATS_BUDGET} \
         (default); figures 1–3 on libvirt `test:///default` (in the daemon's process)\n",
        m.profile,
        TICK_INTERVAL.as_secs(),
        TICK_TTL.as_secs()
    );

    // Figure 1.
    let s = pct(&lat.started);
    let _ = writeln!(
        o,
        "#### 1. etcd write of `state=start` → libvirt start issued ({n} VMs at {}/s)\n",
        lat.pace
    );
    let _ = writeln!(
        o,
        "Each VM is one transaction (`xml`, `node`, `state=start`), written at a steady \
         {} per second (achieved {:.1}/s) to one daemon, so that a VM's start does not \
         queue behind others as long as the daemon keeps up with that rate (figure 2 gives \
         its throughput; the second row is the first {FIRST_VMS} VMs alone). *Write → started*: the bench's wall clock just before the \
         write → the timestamp of the daemon's `domain started` line (logged when libvirt's \
         start returned; same host clock). The other rows split it with the daemon's own \
         lines of the VM: *write → lock* covers the watch event, the reactor queue, a libvirt \
         lookup and the lock transaction; then the definition and the start through \
         libvirt; then the `running` status transaction (`vm state changed`). *Status seen*: \
         the `running` status arriving on the bench's watch of `vms/`.\n",
        lat.pace, lat.rate
    );
    let _ = writeln!(
        o,
        "| measure (ms) | p50 | p90 | p99 | max | target | verdict |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---|---|");
    let _ = writeln!(
        o,
        "| **write → `domain started`** | {:.2} | {:.2} | **{:.2}** | {:.2} | p99 ≤ {TARGET_LATENCY_P99_MS:.0} | {} |",
        s.p50,
        s.p90,
        s.p99,
        s.max,
        verdict(s.n == n && s.p99 <= TARGET_LATENCY_P99_MS)
    );
    let first = &lat.started[..lat.started.len().min(FIRST_VMS)];
    let f = pct(first);
    let _ = writeln!(
        o,
        "| write → `domain started`, first {} VMs | {:.2} | {:.2} | {:.2} | {:.2} | - | - |",
        first.len(),
        f.p50,
        f.p90,
        f.p99,
        f.max
    );
    for (label, xs) in [
        ("write → `run lock acquired`", &lat.to_lock),
        ("lock → `domain defined from etcd`", &lat.lock_to_defined),
        (
            "defined → `domain started` (libvirt start)",
            &lat.defined_to_started,
        ),
        ("started → status `running` written", &lat.started_to_status),
        (
            "write → status `running` seen by the bench",
            &lat.status_seen,
        ),
        ("the bench's write transaction, round trip", &lat.write_rtt),
    ] {
        let p = pct(xs);
        let _ = writeln!(
            o,
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | - | - |",
            p.p50, p.p90, p.p99, p.max
        );
    }
    let _ = writeln!(o, "{}", disk_rows(&lat.disk));
    let _ = writeln!(
        o,
        "\nLoad average (1 min) at the start / end: {:.2} / {:.2}. Warnings / errors the \
         daemon logged over the figure: {} / {}.\n",
        lat.load.0, lat.load.1, lat.warns, lat.errs
    );

    // Figure 2.
    let r = pct(&conv.running);
    let all = r.max;
    let target = TARGET_CONVERGE_PER_VM_MS * conv.n as f64;
    let _ = writeln!(o, "#### 2. Converging {} VMs written at once\n", conv.n);
    let _ = writeln!(
        o,
        "A fresh daemon (after the 0-VM window of figure 3); the {} VMs written in {} \
         transactions of ≤ {} VMs ({} puts) back to back; t = 0 just before the first. \
         *Running*: each VM's `running` status arriving on a watch of `vms/` opened \
         beforehand (stamped on arrival). *Last `domain started`*: the daemon's timestamp of \
         the last such line − t = 0 (wall clock). CPU from `/proc/<pid>/stat` from t = 0 to \
         the last status.\n",
        conv.n,
        conv.txns,
        TXN_MAX_OPS / KEYS_PER_VM,
        TXN_MAX_OPS / KEYS_PER_VM * KEYS_PER_VM
    );
    let _ = writeln!(o, "| measure | value | target | verdict |");
    let _ = writeln!(o, "|---|---:|---|---|");
    let _ = writeln!(
        o,
        "| all VMs written ({} txns) (ms) | {:.1} | - | - |",
        conv.txns,
        ms(conv.write_all)
    );
    let _ = writeln!(
        o,
        "| first `domain started` / first status `running` (ms) | {:.1} / {:.1} | - | - |",
        conv.first_started, r.min
    );
    let _ = writeln!(
        o,
        "| median / p90 VM status `running` (ms) | {:.1} / {:.1} | - | - |",
        r.p50, r.p90
    );
    let _ = writeln!(
        o,
        "| **all {} statuses `running`** (ms) | **{:.1}** | ≤ {:.0} | {} |",
        conv.n,
        all,
        target,
        verdict(r.n == conv.n && all <= target)
    );
    let _ = writeln!(
        o,
        "| **last `domain started`** (ms) | **{:.1}** | ≤ {:.0} | {} |",
        conv.last_started,
        target,
        verdict(conv.last_started <= target)
    );
    let _ = writeln!(
        o,
        "| throughput: N / all running (VMs/s) | {:.0} | - | - |",
        conv.n as f64 / (all / 1000.0)
    );
    let _ = writeln!(
        o,
        "| CPU (s): debvisord / etcd | {:.2} / {:.2} | - | - |",
        conv.cpu_s, conv.etcd_cpu_s
    );
    let _ = writeln!(
        o,
        "| debvisord VmHWM after convergence (MiB) | {:.1} | - | - |",
        mib(conv.hwm_kib)
    );
    let _ = writeln!(
        o,
        "| warnings / errors logged (whole daemon life so far) | {} / {} | - | - |",
        conv.warns, conv.errs
    );
    for (what, h) in [
        ("etcd WAL fsync", conv.disk.fsync),
        ("etcd backend commit", conv.disk.commit),
    ] {
        if let Some(h) = h {
            let _ = writeln!(
                o,
                "| {what}: count, mean (ms) | {:.0}, {:.2} | - | - |",
                h.count, h.mean_ms
            );
        }
    }
    let _ = writeln!(
        o,
        "| load average (1 min) at t = 0 / at the end | {:.2} / {:.2} | - | - |",
        conv.load.0, conv.load.1
    );
    let _ = writeln!(
        o,
        "\nTarget: 10 s for 1000 VMs (scaled linearly: {TARGET_CONVERGE_PER_VM_MS:.0} ms per VM).\n"
    );

    // Figure 3.
    let (a, b) = (&conv.idle0, &conv.idle_n);
    let _ = writeln!(
        o,
        "#### 3. etcd requests per keepalive tick, 0 VMs vs {} running VMs (tick {}s)\n",
        conv.n,
        TICK_INTERVAL.as_secs()
    );
    let _ = writeln!(
        o,
        "The same daemon and etcd: a window of {} ticks before any VM was written, and one \
         of {} ticks with the {} VMs running and idle, after {} ticks of settling \
         (⌈N / {STATS_BUDGET}⌉ stats samples of {STATS_SAMPLE_TICKS} ticks + 2: every VM's \
         first stats record written). Deltas of etcd's \
         `/metrics` as in the foundation's figure 3 (the bench's own watch is opened before \
         and dropped after each window; `/metrics` is plain HTTP). Per-VM stats records \
         (`vmstats/`) go out in the stats sampler's own transactions, at most {STATS_BUDGET} \
         per sample, only for new or changed VMs. RSS at the end of \
         each window; CPU over the window including its warm-up ticks ({:.1} s / {:.1} s).\n",
        a.ticks,
        b.ticks,
        conv.n,
        conv.settle_ticks,
        a.window.as_secs_f64(),
        b.window.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| per tick | 0 VMs | {} VMs | target | verdict |",
        conv.n
    );
    let _ = writeln!(o, "|---|---:|---:|---|---|");
    let handled = |w: &TickWindow, method: &str| {
        w.per_tick("grpc_server_handled_total", &[("grpc_method", method)])
    };
    for method in ["Txn", "Range", "Put", "DeleteRange", "LeaseGrant"] {
        let (x, y) = (handled(a, method), handled(b, method));
        let ok = match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() <= 0.05 + 1e-9,
            _ => false,
        };
        let _ = writeln!(
            o,
            "| gRPC {method} (unary, handled) | {} | {} | same as 0 VMs | {} |",
            fmt_tick(x),
            fmt_tick(y),
            verdict(ok)
        );
    }
    let ka = |w: &TickWindow| {
        w.per_tick(
            "grpc_server_msg_received_total",
            &[("grpc_method", "LeaseKeepAlive")],
        )
    };
    let (x, y) = (ka(a), ka(b));
    let tol = 1.0 / a.ticks.min(b.ticks).max(1) as f64 + 0.05;
    let _ = writeln!(
        o,
        "| LeaseKeepAlive stream msgs received | {} | {} | same as 0 VMs | {} |",
        fmt_tick(x),
        fmt_tick(y),
        verdict(matches!((x, y), (Some(x), Some(y)) if (x - y).abs() <= tol))
    );
    let wm = |w: &TickWindow| {
        w.per_tick(
            "grpc_server_msg_received_total",
            &[
                ("grpc_method", "Watch"),
                ("grpc_service", "etcdserverpb.Watch"),
            ],
        )
    };
    let _ = writeln!(
        o,
        "| Watch stream msgs received | {} | {} | - | - |",
        fmt_tick(wm(a)),
        fmt_tick(wm(b))
    );
    let (x, y) = (
        a.per_tick("etcd_mvcc_put_total", &[]),
        b.per_tick("etcd_mvcc_put_total", &[]),
    );
    let bound = 3.0 + STATS_BUDGET as f64;
    let _ = writeln!(
        o,
        "| keys written (etcd_mvcc_put_total) | {} | {} | ≤ 3 + {STATS_BUDGET} | {} |",
        fmt_tick(x),
        fmt_tick(y),
        verdict(matches!((x, y), (Some(x), Some(y)) if x <= bound && y <= bound))
    );
    for (label, name) in [
        ("etcd_mvcc_range_total", "etcd_mvcc_range_total"),
        ("store revision", "etcd_debugging_mvcc_current_revision"),
        (
            "raft proposals committed",
            "etcd_server_proposals_committed_total",
        ),
    ] {
        let _ = writeln!(
            o,
            "| {label} | {} | {} | - | - |",
            fmt_tick(a.per_tick(name, &[])),
            fmt_tick(b.per_tick(name, &[]))
        );
    }
    let cpu =
        |w: &TickWindow, t: u64| t as f64 / conv.clk_tck as f64 / w.window.as_secs_f64() * 100.0;
    let _ = writeln!(o, "\n| idle daemon | 0 VMs | {} VMs |", conv.n);
    let _ = writeln!(o, "|---|---:|---:|");
    let _ = writeln!(
        o,
        "| debvisord RSS (MiB) | {:.1} | {:.1} |",
        mib(a.rss_kib),
        mib(b.rss_kib)
    );
    let _ = writeln!(
        o,
        "| of which anonymous (MiB) | {:.1} | {:.1} |",
        mib(a.anon_kib),
        mib(b.anon_kib)
    );
    let _ = writeln!(o, "| threads | {} | {} |", a.threads, b.threads);
    let _ = writeln!(
        o,
        "| debvisord CPU (% of one core) | {:.2} | {:.2} |",
        cpu(a, a.cpu_ticks),
        cpu(b, b.cpu_ticks)
    );
    let _ = writeln!(
        o,
        "| etcd CPU (% of one core) | {:.2} | {:.2} |",
        cpu(a, a.etcd_ticks),
        cpu(b, b.etcd_ticks)
    );
    let _ = writeln!(
        o,
        "\nTarget for the request rows: constant in the number of VMs (the same client \
         requests per tick as with none). RSS and CPU are reported, not judged.\n"
    );

    // Figure 4.
    let _ = writeln!(
        o,
        "#### 4. Real guests on `{QEMU_URI}`: write → status `running` ({} runs)\n",
        args.guests
    );
    match kvm {
        Err(why) => {
            let _ = writeln!(o, "Not measured: {why}.");
        }
        Ok(g) => {
            let _ = writeln!(
                o,
                "One daemon on `{QEMU_URI}` ({}); a diskless 64 MiB, 1-vCPU guest that only \
                 reaches its firmware (the harness' `tiny_guest_xml`), written as one \
                 transaction, one guest at a time; t = 0 just before the write; *running* = \
                 its status arriving on a watch. Then it is deleted from etcd and the bench \
                 polls libvirt (every 20 ms) until the daemon has destroyed and undefined it.\n",
                if g.kvm { "KVM" } else { "no /dev/kvm: TCG" }
            );
            let _ = writeln!(o, "| measure (ms) | median | min | max |");
            let _ = writeln!(o, "|---|---:|---:|---:|");
            for (label, xs) in [
                ("**write → status `running`**", &g.running),
                ("write → `domain started` (daemon clock)", &g.started),
                (
                    "`domain defined` → `domain started` (libvirt starts qemu)",
                    &g.start_call,
                ),
                ("delete from etcd → domain gone from libvirt", &g.removed),
            ] {
                let p = pct(xs);
                let _ = writeln!(
                    o,
                    "| {label} | {:.1} | {:.1} | {:.1} |",
                    summarize(xs).median,
                    p.min,
                    p.max
                );
            }
            let _ = writeln!(o, "\nNo target: reported.");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = pct(&xs);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.max, p.min),
            (50.0, 90.0, 99.0, 100.0, 1.0)
        );
        assert!(pct(&[]).p99.is_nan());
    }

    #[test]
    fn histogram_deltas() {
        let snap = |b1: f64, b8: f64, inf: f64, sum: f64| {
            Metrics::parse(&format!(
                "h_bucket{{le=\"0.001\"}} {b1}\nh_bucket{{le=\"0.008\"}} {b8}\n\
                 h_bucket{{le=\"+Inf\"}} {inf}\nh_sum {sum}\nh_count {inf}\n"
            ))
        };
        let a = snap(10.0, 10.0, 10.0, 0.005);
        // 100 more: 60 ≤ 1 ms, 39 ≤ 8 ms, 1 above; 0.2 s in all.
        let b = snap(70.0, 109.0, 110.0, 0.205);
        let h = hist_delta(&a, &b, "h").expect("delta");
        assert_eq!(h.count, 100.0);
        assert!((h.mean_ms - 2.0).abs() < 1e-9, "{h:?}");
        assert_eq!(h.p50_le_ms, 1.0);
        assert_eq!(h.p99_le_ms, 8.0);
        assert!(hist_delta(&a, &a, "h").is_none());
        assert!(hist_delta(&a, &b, "missing").is_none());
    }

    #[test]
    fn vm_requests_fit_a_transaction() {
        let v = VmSpec::test_driver();
        assert_eq!(v.ops("n1").len(), KEYS_PER_VM);
        assert_eq!(
            vm_key(&v.uuid, "state"),
            format!("/debvisor/vms/{}/state", v.uuid)
        );
    }
}
